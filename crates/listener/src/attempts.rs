//! Attempt limits for anything that costs an Argon2 run: admin logins and Basic credentials, per
//! source address.
//!
//! An attempt is counted when it **starts**, before the slow verification, not when it has
//! failed: otherwise a burst of parallel attempts all pass the check while the first is still
//! hashing, and the limit means nothing. A success gives the key a clean slate (a device that
//! finally has the right password, a NAT address with many good devices).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys remembered before stale ones are swept (bounds memory under a spray of addresses).
const SWEEP_ABOVE: usize = 100_000;

#[derive(Debug)]
struct Window {
    attempts: u32,
    started: Instant,
}

/// At most `limit` unsuccessful attempts per key per `window`; 0 lifts the limit.
#[derive(Debug)]
pub struct AttemptLimiter<K> {
    limit: u32,
    window: Duration,
    entries: Mutex<HashMap<K, Window>>,
}

impl<K: Hash + Eq + Clone> AttemptLimiter<K> {
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt by `key` now. `Err(seconds)`: over the limit, retry after that long.
    pub fn begin(&self, key: &K) -> Result<(), u64> {
        if self.limit == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("attempt limiter lock");
        if entries.len() > SWEEP_ABOVE {
            let window = self.window;
            entries.retain(|_, w| now.duration_since(w.started) < window);
        }
        let entry = entries.entry(key.clone()).or_insert(Window {
            attempts: 0,
            started: now,
        });
        if now.duration_since(entry.started) >= self.window {
            *entry = Window {
                attempts: 0,
                started: now,
            };
        }
        if entry.attempts >= self.limit {
            let left = self
                .window
                .saturating_sub(now.duration_since(entry.started));
            return Err(left.as_secs() + 1);
        }
        entry.attempts += 1;
        Ok(())
    }

    /// A successful attempt: the key starts over.
    pub fn succeeded(&self, key: &K) {
        if self.limit == 0 {
            return;
        }
        self.entries
            .lock()
            .expect("attempt limiter lock")
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_count_when_they_start() {
        let limiter = AttemptLimiter::new(3, Duration::from_secs(60));
        // Three attempts in flight at once: none has failed yet, and still the fourth is refused.
        for _ in 0..3 {
            limiter.begin(&"10.0.0.1").unwrap();
        }
        let retry = limiter.begin(&"10.0.0.1").unwrap_err();
        assert!((1..=60).contains(&retry), "{retry}");
        assert!(
            limiter.begin(&"10.0.0.2").is_ok(),
            "another key has its own budget"
        );
        limiter.succeeded(&"10.0.0.1");
        assert!(limiter.begin(&"10.0.0.1").is_ok(), "a success starts over");
    }

    #[test]
    fn the_window_passes() {
        let limiter = AttemptLimiter::new(1, Duration::from_millis(30));
        limiter.begin(&1).unwrap();
        assert!(limiter.begin(&1).is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert!(limiter.begin(&1).is_ok());
    }

    #[test]
    fn zero_is_unlimited() {
        let limiter = AttemptLimiter::new(0, Duration::from_secs(60));
        for _ in 0..1000 {
            limiter.begin(&1).unwrap();
        }
    }
}
