//! Basic credentials of a non-anonymous server listener, verified against an Argon2id hash at
//! most once per distinct credential.
//!
//! Argon2id costs ~35 ms of one core here; a reconnect storm of thousands of devices presenting
//! the same credential must not pay it each time. Verified outcomes are cached by the SHA-256 of
//! the presented `user:password` (never the password itself), and concurrent first attempts with
//! the same credential share one verification (single flight). The cache lives in the listener,
//! so it is dropped whenever the listener's definition changes.
//!
//! Two things keep someone spraying wrong credentials from hurting everyone else:
//! - the credential that verified is remembered apart from the others (a listener has one user
//!   name and one password hash, so there is exactly one such credential), and wrong or pending
//!   ones live in a bounded cache that evicts (moka): a flood of distinct wrong passwords only
//!   pushes out other wrong passwords, never the credential every device uses, the way emptying
//!   a full map did;
//! - credentials that need a fresh Argon2 run are limited per source address (counted before the
//!   run, see [`AttemptLimiter`]), so one address cannot keep the hashing capacity busy. Basic
//!   listeners have their own hashing capacity, apart from admin login's.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};

use crate::attempts::AttemptLimiter;

/// Distinct credentials remembered per listener.
pub const CACHE_CAPACITY: u64 = 10_000;

/// What a presented `Authorization` header earned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasicOutcome {
    Accepted,
    Refused,
    /// Too many credentials from this address needed verifying; retry after this many seconds.
    Throttled(u64),
}

pub struct BasicCredentialVerifier {
    user_name: String,
    password_hash: String,
    /// Fingerprint of the credential that verified, once one has.
    accepted: OnceLock<[u8; 32]>,
    /// Wrong credentials and verifications in flight (single flight per fingerprint).
    outcomes: moka::sync::Cache<[u8; 32], Arc<OnceCell<bool>>>,
    /// Limits concurrent Argon2 runs of all Basic listeners (each takes 19 MiB and a core).
    hashing: Arc<Semaphore>,
    /// Verifications per source address, shared by all Basic listeners.
    attempts: Arc<AttemptLimiter<IpAddr>>,
    /// Argon2 runs so far (what the cache and the limits exist to keep low).
    hash_runs: AtomicU64,
}

impl std::fmt::Debug for BasicCredentialVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicCredentialVerifier")
            .field("user_name", &self.user_name)
            .finish_non_exhaustive()
    }
}

impl BasicCredentialVerifier {
    pub fn new(
        user_name: String,
        password_hash: String,
        hashing: Arc<Semaphore>,
        attempts: Arc<AttemptLimiter<IpAddr>>,
    ) -> Self {
        Self::with_cache_capacity(user_name, password_hash, hashing, attempts, CACHE_CAPACITY)
    }

    pub fn with_cache_capacity(
        user_name: String,
        password_hash: String,
        hashing: Arc<Semaphore>,
        attempts: Arc<AttemptLimiter<IpAddr>>,
        capacity: u64,
    ) -> Self {
        Self {
            user_name,
            password_hash,
            accepted: OnceLock::new(),
            outcomes: moka::sync::Cache::builder().max_capacity(capacity).build(),
            hashing,
            attempts,
            hash_runs: AtomicU64::new(0),
        }
    }

    /// Argon2 verifications run so far.
    pub fn hash_runs(&self) -> u64 {
        self.hash_runs.load(Ordering::Relaxed)
    }

    /// Checks an `Authorization` header value presented from `address`.
    pub async fn verify_header(
        &self,
        header: Option<&str>,
        address: Option<IpAddr>,
    ) -> BasicOutcome {
        let Some((user, password)) = header.and_then(iotgate_core::credentials::parse_basic) else {
            return BasicOutcome::Refused;
        };
        self.verify(&user, &password, address).await
    }

    pub async fn verify(
        &self,
        user: &str,
        password: &str,
        address: Option<IpAddr>,
    ) -> BasicOutcome {
        let mut hasher = Sha256::new();
        hasher.update(user.as_bytes());
        hasher.update([0u8]);
        hasher.update(password.as_bytes());
        let fingerprint: [u8; 32] = hasher.finalize().into();
        if self
            .accepted
            .get()
            .is_some_and(|known| iotgate_core::credentials::constant_time_eq(known, &fingerprint))
        {
            return BasicOutcome::Accepted;
        }
        let cell = self.outcomes.get_with(fingerprint, Default::default);
        // Single flight: concurrent first attempts with one credential wait for one verification,
        // and only that one counts against the address (a reconnect storm behind one NAT address
        // presenting the right credential costs one attempt, not hundreds).
        let verified = cell
            .get_or_try_init(|| async {
                if let Some(address) = address {
                    self.attempts.begin(&address)?;
                }
                // The user name is compared in constant time too, and the hash is always
                // verified, so a wrong user name costs the same as a wrong password.
                let user_ok = iotgate_core::credentials::constant_time_eq(
                    user.as_bytes(),
                    self.user_name.as_bytes(),
                );
                let hash = self.password_hash.clone();
                let password = password.to_owned();
                let _permit = self
                    .hashing
                    .acquire()
                    .await
                    .expect("semaphore never closed");
                self.hash_runs.fetch_add(1, Ordering::Relaxed);
                let password_ok =
                    tokio::task::spawn_blocking(move || verify_argon2(&hash, &password))
                        .await
                        .unwrap_or(false);
                Ok::<bool, u64>(user_ok && password_ok)
            })
            .await;
        match verified {
            Err(retry_after) => BasicOutcome::Throttled(retry_after),
            Ok(true) => {
                let _ = self.accepted.set(fingerprint);
                self.outcomes.invalidate(&fingerprint);
                if let Some(address) = address {
                    self.attempts.succeeded(&address);
                }
                BasicOutcome::Accepted
            }
            Ok(false) => BasicOutcome::Refused,
        }
    }
}

/// Verifies a password against a PHC-format Argon2 hash.
pub fn verify_argon2(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    use argon2::{Algorithm, Params, Version};

    /// A deliberately cheap hash: these tests count Argon2 runs, they do not time them.
    fn cheap_hash(password: &str) -> String {
        let argon = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8, 1, 1, None).unwrap(),
        );
        argon
            .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
            .unwrap()
            .to_string()
    }

    fn verifier(capacity: u64, per_address: u32) -> BasicCredentialVerifier {
        BasicCredentialVerifier::with_cache_capacity(
            "gateway".into(),
            cheap_hash("right-password"),
            Arc::new(Semaphore::new(2)),
            Arc::new(AttemptLimiter::new(per_address, Duration::from_secs(60))),
            capacity,
        )
    }

    #[tokio::test]
    async fn a_flood_of_wrong_credentials_does_not_evict_the_good_one() {
        let verifier = verifier(64, 0);
        for _ in 0..5 {
            assert_eq!(
                verifier.verify("gateway", "right-password", None).await,
                BasicOutcome::Accepted
            );
        }
        assert_eq!(verifier.hash_runs(), 1);
        // Ten times the capacity in distinct wrong passwords. A cache that starts over when
        // full forgets the good credential here, and its next use costs another Argon2 run.
        for i in 0..640 {
            assert_eq!(
                verifier
                    .verify("gateway", &format!("wrong-{i}"), None)
                    .await,
                BasicOutcome::Refused
            );
            verifier.outcomes.run_pending_tasks();
        }
        let runs = verifier.hash_runs();
        assert_eq!(
            verifier.verify("gateway", "right-password", None).await,
            BasicOutcome::Accepted
        );
        assert_eq!(
            verifier.hash_runs(),
            runs,
            "the good credential was evicted by the flood"
        );
        assert!(verifier.outcomes.entry_count() <= 64);
    }

    #[tokio::test]
    async fn a_storm_of_the_right_credential_from_one_address_counts_once() {
        let verifier = Arc::new(verifier(1_000, 3));
        let gateway: IpAddr = "203.0.113.1".parse().unwrap();
        let storm: Vec<_> = (0..50)
            .map(|_| {
                let verifier = verifier.clone();
                tokio::spawn(async move {
                    verifier
                        .verify("gateway", "right-password", Some(gateway))
                        .await
                })
            })
            .collect();
        for connect in storm {
            assert_eq!(connect.await.unwrap(), BasicOutcome::Accepted);
        }
        assert_eq!(verifier.hash_runs(), 1);
    }

    #[tokio::test]
    async fn fresh_verifications_are_limited_per_address() {
        let verifier = verifier(1_000, 3);
        let attacker: IpAddr = "203.0.113.9".parse().unwrap();
        for i in 0..3 {
            assert_eq!(
                verifier
                    .verify("gateway", &format!("guess-{i}"), Some(attacker))
                    .await,
                BasicOutcome::Refused
            );
        }
        assert!(matches!(
            verifier.verify("gateway", "guess-9", Some(attacker)).await,
            BasicOutcome::Throttled(_)
        ));
        assert_eq!(
            verifier.hash_runs(),
            3,
            "the throttled guess cost no Argon2 run"
        );
        // A known outcome costs nothing and is not limited; other addresses are not affected.
        assert_eq!(
            verifier.verify("gateway", "guess-0", Some(attacker)).await,
            BasicOutcome::Refused
        );
        let device: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            verifier
                .verify("gateway", "right-password", Some(device))
                .await,
            BasicOutcome::Accepted
        );
    }
}
