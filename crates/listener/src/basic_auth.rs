//! Basic credentials of a non-anonymous server listener, verified against an Argon2id hash at
//! most once per distinct credential.
//!
//! Argon2id costs ~35 ms of one core here; a reconnect storm of thousands of devices presenting
//! the same credential must not pay it each time. Verified outcomes are cached by the SHA-256 of
//! the presented `user:password` (never the password itself), and concurrent first attempts with
//! the same credential share one verification (single flight). The cache lives in the listener,
//! so it is dropped whenever the listener's definition changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, Semaphore};

/// Distinct credentials remembered per listener; past this the cache starts over (a flood of
/// distinct wrong passwords cannot grow memory without bound).
const CACHE_LIMIT: usize = 10_000;

pub struct BasicCredentialVerifier {
    user_name: String,
    password_hash: String,
    outcomes: Mutex<HashMap<[u8; 32], Arc<OnceCell<bool>>>>,
    /// Limits concurrent Argon2 runs process-wide (each takes 19 MiB and a core).
    hashing: Arc<Semaphore>,
}

impl std::fmt::Debug for BasicCredentialVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BasicCredentialVerifier")
            .field("user_name", &self.user_name)
            .finish_non_exhaustive()
    }
}

impl BasicCredentialVerifier {
    pub fn new(user_name: String, password_hash: String, hashing: Arc<Semaphore>) -> Self {
        Self {
            user_name,
            password_hash,
            outcomes: Mutex::new(HashMap::new()),
            hashing,
        }
    }

    /// Checks an `Authorization` header value.
    pub async fn verify_header(&self, header: Option<&str>) -> bool {
        let Some((user, password)) = header.and_then(iotgate_core::credentials::parse_basic) else {
            return false;
        };
        self.verify(&user, &password).await
    }

    pub async fn verify(&self, user: &str, password: &str) -> bool {
        let mut hasher = Sha256::new();
        hasher.update(user.as_bytes());
        hasher.update([0u8]);
        hasher.update(password.as_bytes());
        let fingerprint: [u8; 32] = hasher.finalize().into();
        let cell = {
            let mut outcomes = self.outcomes.lock().expect("credential cache lock");
            if outcomes.len() >= CACHE_LIMIT && !outcomes.contains_key(&fingerprint) {
                outcomes.clear();
            }
            outcomes.entry(fingerprint).or_default().clone()
        };
        *cell
            .get_or_init(|| async {
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
                let password_ok =
                    tokio::task::spawn_blocking(move || verify_argon2(&hash, &password))
                        .await
                        .unwrap_or(false);
                user_ok && password_ok
            })
            .await
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
