//! Login throttling: per source address and per user, both counted **before** Argon2 runs.
//!
//! - Per address: at most [`ADDRESS_ATTEMPTS`] attempts a minute ([`AttemptLimiter`]); a success
//!   gives the address a clean slate.
//! - Per user: [`FREE_FAILURES`] failures cost nothing more; after that each further attempt on
//!   that user name must wait twice as long as the one before (1 s, 2 s, 4 s ... up to
//!   [`MAX_WAIT`]), one at a time. This is what stops guessing spread over many addresses. The
//!   price is that someone can slow down logins of a user they know the name of; they cannot
//!   lock it out, and every failure is in the audit log. State is forgotten [`FORGET_AFTER`] after
//!   the last failure, and at once on a success.
//!
//! Both refuse with the seconds to wait, which the API returns as `Retry-After`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iotgate_listener::AttemptLimiter;

pub const ADDRESS_ATTEMPTS: u32 = 5;
pub const ADDRESS_WINDOW: Duration = Duration::from_secs(60);
pub const FREE_FAILURES: u32 = 10;
pub const MAX_WAIT: Duration = Duration::from_secs(300);
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// User names remembered before forgotten ones are swept.
const SWEEP_ABOVE: usize = 100_000;

#[derive(Debug)]
struct UserState {
    failures: u32,
    in_flight: u32,
    last_failure: Instant,
}

#[derive(Debug)]
pub struct LoginThrottle {
    addresses: AttemptLimiter<IpAddr>,
    users: Arc<Mutex<HashMap<String, UserState>>>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self {
            addresses: AttemptLimiter::new(ADDRESS_ATTEMPTS, ADDRESS_WINDOW),
            users: Arc::default(),
        }
    }
}

/// One admitted attempt. Report its outcome; dropping it unreported (an internal error) frees
/// its place without counting a failure.
#[must_use]
#[derive(Debug)]
pub struct Attempt<'a> {
    throttle: &'a LoginThrottle,
    address: Option<IpAddr>,
    user: String,
    settled: bool,
}

impl Attempt<'_> {
    pub fn failed(mut self) {
        self.settled = true;
        let mut users = self.throttle.users.lock().expect("login throttle lock");
        if let Some(state) = users.get_mut(&self.user) {
            state.in_flight = state.in_flight.saturating_sub(1);
            state.failures += 1;
            state.last_failure = Instant::now();
        }
    }

    pub fn succeeded(mut self) {
        self.settled = true;
        if let Some(address) = self.address {
            self.throttle.addresses.succeeded(&address);
        }
        self.throttle
            .users
            .lock()
            .expect("login throttle lock")
            .remove(&self.user);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut users = self.throttle.users.lock().expect("login throttle lock");
        if let Some(state) = users.get_mut(&self.user) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }
}

/// The wait required after `failures` failures of one user.
fn wait_after(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    Duration::from_secs(1u64 << doublings).min(MAX_WAIT)
}

impl LoginThrottle {
    /// Admits an attempt on `user` from `address`, or says how many seconds to wait.
    pub fn begin(&self, address: Option<IpAddr>, user: &str) -> Result<Attempt<'_>, u64> {
        if let Some(address) = address {
            self.addresses.begin(&address)?;
        }
        let now = Instant::now();
        let mut users = self.users.lock().expect("login throttle lock");
        if users.len() > SWEEP_ABOVE {
            users.retain(|_, s| {
                s.in_flight > 0 || now.duration_since(s.last_failure) < FORGET_AFTER
            });
        }
        let state = users.entry(user.to_owned()).or_insert(UserState {
            failures: 0,
            in_flight: 0,
            last_failure: now,
        });
        if state.in_flight == 0
            && state.failures > 0
            && now.duration_since(state.last_failure) >= FORGET_AFTER
        {
            state.failures = 0;
        }
        let counted = state.failures + state.in_flight;
        if counted >= FREE_FAILURES {
            // Backing off: one attempt at a time, each after the wait the failures so far earn.
            if state.in_flight > 0 {
                return Err(1);
            }
            let wait = wait_after(state.failures);
            let waited = now.duration_since(state.last_failure);
            if waited < wait {
                return Err((wait - waited).as_secs_f64().ceil().max(1.0) as u64);
            }
        }
        state.in_flight += 1;
        Ok(Attempt {
            throttle: self,
            address,
            user: user.to_owned(),
            settled: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([198, 51, 100, n]))
    }

    #[test]
    fn parallel_attempts_from_one_address_are_counted_before_they_finish() {
        let throttle = LoginThrottle::default();
        let admitted: Vec<_> = (0..20)
            .filter_map(|_| throttle.begin(address(1), "admin").ok())
            .collect();
        assert_eq!(admitted.len() as u32, ADDRESS_ATTEMPTS);
        drop(admitted);
    }

    #[test]
    fn a_user_backs_off_whatever_the_address() {
        let throttle = LoginThrottle::default();
        for n in 0..FREE_FAILURES {
            throttle.begin(address(n as u8), "admin").unwrap().failed();
        }
        // The next attempt, from a fresh address, must wait a second.
        let retry = throttle.begin(address(200), "admin").unwrap_err();
        assert_eq!(retry, 1);
        // Another user is not affected.
        throttle
            .begin(address(201), "operator")
            .unwrap()
            .succeeded();
        std::thread::sleep(Duration::from_millis(1_050));
        let attempt = throttle.begin(address(202), "admin").unwrap();
        // One at a time while backing off.
        assert!(throttle.begin(address(203), "admin").is_err());
        attempt.failed();
        assert_eq!(throttle.begin(address(204), "admin").unwrap_err(), 2);
    }

    #[test]
    fn success_resets_and_unsettled_attempts_free_their_place() {
        let throttle = LoginThrottle::default();
        for n in 0..FREE_FAILURES - 1 {
            throttle.begin(address(n as u8), "admin").unwrap().failed();
        }
        drop(throttle.begin(address(100), "admin").unwrap());
        throttle.begin(address(101), "admin").unwrap().succeeded();
        for n in 0..FREE_FAILURES - 1 {
            throttle
                .begin(address(110 + n as u8), "admin")
                .unwrap()
                .failed();
        }
        assert!(throttle.begin(address(150), "admin").is_ok());
    }

    #[test]
    fn waits_double_up_to_the_cap() {
        assert_eq!(wait_after(FREE_FAILURES - 1), Duration::ZERO);
        assert_eq!(wait_after(FREE_FAILURES), Duration::from_secs(1));
        assert_eq!(wait_after(FREE_FAILURES + 3), Duration::from_secs(8));
        assert_eq!(wait_after(FREE_FAILURES + 40), MAX_WAIT);
    }
}
