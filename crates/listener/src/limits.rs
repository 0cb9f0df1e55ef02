//! Connection admission: a global cap on device connections, a cap per source address, and a
//! connect-rate limit per source address (token bucket). Checked first at every upgrade, before
//! any credential work, so a flood of connects costs a map lookup each, never an Argon2 run.
//!
//! Many IoT fleets sit behind one NAT address, so the per-address limits are settings
//! (`--max-connections-per-ip`, `--connect-rate-per-ip`; 0 lifts them).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The configured limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimitSettings {
    /// Device connections over all listeners; 0 = unlimited.
    pub max_connections: usize,
    /// Device connections from one address; 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// New connections per second from one address (bursts up to the same number); 0 = unlimited.
    pub connect_rate_per_ip: u32,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ServerFull,
    AddressFull,
    RateExceeded,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Refusal::ServerFull => "server_full",
            Refusal::AddressFull => "too_many_connections",
            Refusal::RateExceeded => "connect_rate_exceeded",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::ServerFull => {
                "the server holds its maximum number of device connections; retry later"
            }
            Refusal::AddressFull => "too many connections from this address",
            Refusal::RateExceeded => "too many connection attempts from this address; slow down",
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refreshed: Instant,
}

#[derive(Debug, Default)]
struct PerAddress {
    open: HashMap<IpAddr, usize>,
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Debug)]
pub struct ConnectionLimits {
    settings: ConnectionLimitSettings,
    open: AtomicUsize,
    per_address: Mutex<PerAddress>,
}

/// Held for the life of a connection; gives its place back when dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    address: Option<IpAddr>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(address) = self.address {
            let mut per = self.limits.per_address.lock().expect("limits lock");
            if let Some(count) = per.open.get_mut(&address) {
                *count -= 1;
                if *count == 0 {
                    per.open.remove(&address);
                }
            }
        }
    }
}

impl ConnectionLimits {
    pub fn new(settings: ConnectionLimitSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            open: AtomicUsize::new(0),
            per_address: Mutex::new(PerAddress::default()),
        })
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Admits a connection from `address` or says why not.
    pub fn admit(self: &Arc<Self>, address: Option<IpAddr>) -> Result<ConnectionPermit, Refusal> {
        let s = self.settings;
        let mut per = self.per_address.lock().expect("limits lock");
        if let Some(address) = address {
            if s.connect_rate_per_ip > 0 {
                let rate = f64::from(s.connect_rate_per_ip);
                let now = Instant::now();
                if per.buckets.len() > 100_000 {
                    // Forget addresses whose bucket has refilled: they carry no state worth keeping.
                    per.buckets
                        .retain(|_, b| now.duration_since(b.refreshed).as_secs_f64() * rate < rate);
                }
                let bucket = per.buckets.entry(address).or_insert(Bucket {
                    tokens: rate,
                    refreshed: now,
                });
                let elapsed = now.duration_since(bucket.refreshed).as_secs_f64();
                bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
                bucket.refreshed = now;
                if bucket.tokens < 1.0 {
                    return Err(Refusal::RateExceeded);
                }
                bucket.tokens -= 1.0;
            }
            if s.max_connections_per_ip > 0
                && per.open.get(&address).copied().unwrap_or(0) >= s.max_connections_per_ip
            {
                return Err(Refusal::AddressFull);
            }
        }
        if s.max_connections > 0 && self.open.load(Ordering::Relaxed) >= s.max_connections {
            return Err(Refusal::ServerFull);
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        if let Some(address) = address {
            *per.open.entry(address).or_insert(0) += 1;
        }
        Ok(ConnectionPermit {
            limits: self.clone(),
            address,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_ip: usize, rate: u32) -> Arc<ConnectionLimits> {
        ConnectionLimits::new(ConnectionLimitSettings {
            max_connections: max,
            max_connections_per_ip: per_ip,
            connect_rate_per_ip: rate,
        })
    }

    #[test]
    fn caps_count_open_connections_and_release_on_drop() {
        let l = limits(3, 2, 0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.admit(Some(a)).unwrap();
        let _p2 = l.admit(Some(a)).unwrap();
        assert_eq!(l.admit(Some(a)).unwrap_err(), Refusal::AddressFull);
        let _p3 = l.admit(Some(b)).unwrap();
        assert_eq!(l.admit(Some(b)).unwrap_err(), Refusal::ServerFull);
        drop(p1);
        assert!(l.admit(Some(a)).is_ok());
    }

    #[test]
    fn connect_rate_allows_a_burst_then_refuses() {
        let l = limits(0, 0, 5);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let permits: Vec<_> = (0..5).map(|_| l.admit(Some(a)).unwrap()).collect();
        assert_eq!(l.admit(Some(a)).unwrap_err(), Refusal::RateExceeded);
        // Another address has its own bucket.
        assert!(l.admit(Some("10.0.0.9".parse().unwrap())).is_ok());
        drop(permits);
    }
}
