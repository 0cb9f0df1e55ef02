//! Authentication of people and automation: users with Argon2id passwords and a role, browser
//! and API sessions, long-lived API tokens, throttled logins, and the request guards
//! ([`guard::Viewer`], [`guard::Operator`], [`guard::Admin`]) handlers take as arguments.
//!
//! Argon2 runs on the blocking pool with a capacity of its own (device Basic credentials have
//! another), so no flood of device connections can keep an admin from logging in. An unknown
//! user is verified against a dummy hash so response time does not reveal which names exist.
//! Tokens are 256 random bits; only their SHA-256 is stored, and verified credentials are
//! cached in memory until they expire or are revoked. A revoked credential also ends the live
//! subscriptions opened with it.

pub mod guard;
pub mod passwords;
pub mod roles;
pub mod throttle;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use iotgate_core::envelope::format_timestamp;
use iotgate_listener::basic_auth::verify_argon2;
use iotgate_store::{Store, StoreError};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use guard::{Admin, MessageSender, Operator, Viewer};
pub use passwords::{hash_password, hash_password_async, password_problem};
pub use roles::{CredentialKind, CredentialSource, Principal, Role};

use throttle::LoginThrottle;

pub const SESSION_COOKIE: &str = "iotgate_session";
pub const SESSION_LIFETIME: time::Duration = time::Duration::hours(12);
/// API tokens start with this, so they are told from session tokens (and found by secret
/// scanners) at a glance.
pub const API_TOKEN_PREFIX: &str = "iotg_";

pub fn token_digest(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// 256 random bits, base64url.
pub fn random_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(iotgate_core::credentials::random_bytes::<32>())
}

/// Why a login (or a check of one's current password) did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("too many attempts; retry in {0} s")]
    Throttled(u64),
    #[error("wrong user name or password")]
    WrongCredentials,
    #[error("login failed")]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for LoginError {
    fn from(error: StoreError) -> Self {
        LoginError::Internal(error.into())
    }
}

/// A verified credential, as cached.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user_name: String,
    pub role: Role,
    pub kind: CredentialKind,
    pub digest: String,
    pub expires_at: OffsetDateTime,
}

/// A new session: the token (shown once), when it ends, and who it is.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub token: String,
    pub expires_at: OffsetDateTime,
    pub user_name: String,
    pub role: Role,
}

/// Uses of one API token since the last drain.
#[derive(Debug, Clone)]
pub struct TokenUse {
    pub id: String,
    pub name: String,
    pub user_name: String,
    pub count: u64,
    pub last_used_at: OffsetDateTime,
}

/// Live subscriptions' stop signal, per credential.
#[derive(Debug)]
struct Revocation {
    user_name: String,
    expires_at: OffsetDateTime,
    stop: CancellationToken,
}

/// What a login for a user that does not exist is verified against, so that it takes as long as
/// one for a real user (no user enumeration by timing). It is the Argon2id hash, at the same
/// parameters as [`passwords::argon2`], of a password nobody uses; a constant rather than hashed
/// at start-up, which cost every start a 19 MiB Argon2 run and its memory peak.
const UNKNOWN_USER_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$T6etueItE/JN0mNoTD3HZg$pzPoB4JIQJGp5e+Gtf6bkC3diIb5wP0cUfBEW9QFd8E";

pub struct AdminAuth {
    store: Store,
    dummy_hash: String,
    /// Argon2 runs of logins and password checks, apart from device Basic credentials.
    hashing: Arc<Semaphore>,
    throttle: LoginThrottle,
    credentials: Mutex<HashMap<String, Authenticated>>,
    revocations: Mutex<HashMap<String, Revocation>>,
    token_uses: Mutex<HashMap<String, TokenUse>>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth")
    }
}

fn parse_time(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
}

impl AdminAuth {
    pub fn new(store: Store, hashing: Arc<Semaphore>) -> Self {
        Self {
            store,
            dummy_hash: UNKNOWN_USER_HASH.to_owned(),
            hashing,
            throttle: LoginThrottle::default(),
            credentials: Mutex::new(HashMap::new()),
            revocations: Mutex::new(HashMap::new()),
            token_uses: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Creates the first admin when there is no user. Returns the generated password when none
    /// was given, so the caller can print it once. A given password must meet the rules.
    pub async fn bootstrap(&self, password: Option<&str>) -> anyhow::Result<Option<String>> {
        if self.store.count_users().await? > 0 {
            return Ok(None);
        }
        let (password, generated) = match password {
            Some(p) if !p.is_empty() => {
                if let Some(problem) = password_problem(p) {
                    anyhow::bail!("IOTGATE_ADMIN_PASSWORD is not accepted: {problem}");
                }
                (p.to_owned(), false)
            }
            _ => (random_token()[..24].to_owned(), true),
        };
        let hash = hash_password_async(password.clone()).await?;
        let now = format_timestamp(OffsetDateTime::now_utc());
        self.store
            .insert_user("admin", &hash, Role::Admin.as_str(), &now)
            .await?;
        tracing::info!(user = "admin", "created the first admin user");
        Ok(generated.then_some(password))
    }

    /// Checks a user's password, throttled per address and per user; the role on success.
    pub async fn verify_password(
        &self,
        address: Option<IpAddr>,
        user_name: &str,
        password: &str,
    ) -> Result<Role, LoginError> {
        let attempt = self
            .throttle
            .begin(address, user_name)
            .map_err(LoginError::Throttled)?;
        let stored = self.store.user_credentials(user_name).await?;
        let known = stored.is_some();
        let (hash, role) = stored.unwrap_or_else(|| (self.dummy_hash.clone(), String::new()));
        let password = password.to_owned();
        let permit = self
            .hashing
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| LoginError::Internal(e.into()))?;
        let verified = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verify_argon2(&hash, &password)
        })
        .await
        .map_err(|e| LoginError::Internal(e.into()))?;
        match Role::parse(&role) {
            Some(role) if known && verified => {
                attempt.succeeded();
                Ok(role)
            }
            _ => {
                attempt.failed();
                Err(LoginError::WrongCredentials)
            }
        }
    }

    /// Verifies credentials and opens a session.
    pub async fn login(
        &self,
        address: Option<IpAddr>,
        user_name: &str,
        password: &str,
    ) -> Result<NewSession, LoginError> {
        let role = self.verify_password(address, user_name, password).await?;
        // Expired sessions are purged here: logins are rare, so this costs nothing noticeable
        // and the table never fills with dead rows.
        let now = OffsetDateTime::now_utc();
        if let Err(error) = self
            .store
            .delete_expired_sessions(&format_timestamp(now))
            .await
        {
            tracing::warn!(error = %error, "could not purge expired sessions");
        }
        self.credentials
            .lock()
            .expect("credentials lock")
            .retain(|_, c| c.expires_at > now);
        self.revocations
            .lock()
            .expect("revocations lock")
            .retain(|_, r| r.expires_at > now && !r.stop.is_cancelled());
        let token = random_token();
        let expires_at = now + SESSION_LIFETIME;
        let digest = token_digest(&token);
        self.store
            .insert_session(&digest, user_name, &format_timestamp(expires_at))
            .await?;
        self.credentials.lock().expect("credentials lock").insert(
            digest.clone(),
            Authenticated {
                user_name: user_name.to_owned(),
                role,
                kind: CredentialKind::Session,
                digest,
                expires_at,
            },
        );
        Ok(NewSession {
            token,
            expires_at,
            user_name: user_name.to_owned(),
            role,
        })
    }

    /// The credential a token stands for, if it is valid now.
    pub async fn authenticate(&self, token: &str) -> Option<Authenticated> {
        if token.is_empty() || token.len() > 256 {
            return None;
        }
        let digest = token_digest(token);
        let now = OffsetDateTime::now_utc();
        let cached = self
            .credentials
            .lock()
            .expect("credentials lock")
            .get(&digest)
            .cloned();
        let credential = match cached {
            Some(credential) => credential,
            None => {
                let credential = if token.starts_with(API_TOKEN_PREFIX) {
                    let found = self.store.find_api_token(&digest).await.ok()??;
                    let token_role = Role::parse(&found.token.role)?;
                    let owner_role = Role::parse(&found.owner_role)?;
                    Authenticated {
                        user_name: found.token.user_name,
                        role: token_role.min(owner_role),
                        kind: CredentialKind::ApiToken {
                            id: found.token.id,
                            name: found.token.name,
                        },
                        digest: digest.clone(),
                        expires_at: parse_time(&found.token.expires_at)?,
                    }
                } else {
                    let found = self.store.find_session(&digest).await.ok()??;
                    Authenticated {
                        user_name: found.user_name,
                        role: Role::parse(&found.role)?,
                        kind: CredentialKind::Session,
                        digest: digest.clone(),
                        expires_at: parse_time(&found.expires_at)?,
                    }
                };
                if credential.expires_at > now {
                    self.credentials
                        .lock()
                        .expect("credentials lock")
                        .insert(digest.clone(), credential.clone());
                }
                credential
            }
        };
        if credential.expires_at <= now {
            self.credentials
                .lock()
                .expect("credentials lock")
                .remove(&digest);
            return None;
        }
        if let CredentialKind::ApiToken { id, name } = &credential.kind {
            let mut uses = self.token_uses.lock().expect("token uses lock");
            let entry = uses.entry(id.clone()).or_insert_with(|| TokenUse {
                id: id.clone(),
                name: name.clone(),
                user_name: credential.user_name.clone(),
                count: 0,
                last_used_at: now,
            });
            entry.count += 1;
            entry.last_used_at = now;
        }
        Some(credential)
    }

    /// Ends a session or token (by digest): it stops working at once, and so do the live
    /// subscriptions opened with it.
    pub fn forget_credential(&self, digest: &str) {
        self.credentials
            .lock()
            .expect("credentials lock")
            .remove(digest);
        if let Some(revocation) = self
            .revocations
            .lock()
            .expect("revocations lock")
            .remove(digest)
        {
            revocation.stop.cancel();
        }
    }

    /// After a user changed: cached credentials are read again (new role), and with `revoke`
    /// every credential but `keep` stops working at once, live subscriptions included.
    pub fn forget_user(&self, user_name: &str, revoke: bool, keep: Option<&str>) {
        self.credentials
            .lock()
            .expect("credentials lock")
            .retain(|digest, c| c.user_name != user_name || Some(digest.as_str()) == keep);
        if revoke {
            let mut revocations = self.revocations.lock().expect("revocations lock");
            revocations.retain(|digest, r| {
                if r.user_name == user_name && Some(digest.as_str()) != keep {
                    r.stop.cancel();
                    false
                } else {
                    true
                }
            });
        }
    }

    pub async fn logout(&self, digest: &str) -> Result<(), StoreError> {
        self.forget_credential(digest);
        self.store.delete_session(digest).await
    }

    /// A signal that fires when this credential is revoked (logout, user deleted, password
    /// reset, token revoked). Its expiry is the subscriber's own business.
    pub fn revocation_signal(&self, principal: &Principal) -> CancellationToken {
        self.revocations
            .lock()
            .expect("revocations lock")
            .entry(principal.digest.clone())
            .or_insert_with(|| Revocation {
                user_name: principal.user_name.clone(),
                expires_at: principal.expires_at,
                stop: CancellationToken::new(),
            })
            .stop
            .clone()
    }

    /// API token uses since the last call.
    pub fn drain_token_uses(&self) -> Vec<TokenUse> {
        std::mem::take(&mut *self.token_uses.lock().expect("token uses lock"))
            .into_values()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::PasswordHash;

    /// The unknown-user hash must cost what a real one costs, or timing tells users apart.
    #[test]
    fn unknown_user_hash_has_the_real_parameters() {
        let dummy = PasswordHash::new(UNKNOWN_USER_HASH).expect("a valid PHC string");
        let real_hash = hash_password("a real password of some length");
        let real = PasswordHash::new(&real_hash).unwrap();
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(dummy.params, real.params);
    }
}
