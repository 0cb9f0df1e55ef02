//! Admin authentication: users with Argon2id passwords, bearer tokens / session cookies, and
//! throttling of failed logins per address.
//!
//! Argon2 runs on the blocking pool, never on an async worker, and an unknown user is verified
//! against a dummy hash so response time does not reveal which user names exist. Tokens are 256
//! random bits; only their SHA-256 is stored, and verified sessions are cached in memory.

use std::collections::HashMap;
use std::future::{ready, Ready};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{dev::Payload, FromRequest, HttpRequest};
use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use iotgate_listener::basic_auth::verify_argon2;
use iotgate_store::Store;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::Semaphore;

use crate::error::ApiError;

pub const SESSION_COOKIE: &str = "iotgate_session";
const SESSION_LIFETIME: time::Duration = time::Duration::hours(12);
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
const MAX_FAILURES: u32 = 5;

/// Argon2id at the OWASP parameters (m=19456 KiB, t=2, p=1).
pub fn argon2() -> Argon2<'static> {
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(19_456, 2, 1, None).expect("valid Argon2 parameters"),
    )
}

/// Hashes a password (blocking: call from the blocking pool or at start-up).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .expect("Argon2 hashing of a bounded password cannot fail")
        .to_string()
}

/// Hashes on the blocking pool.
pub async fn hash_password_async(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::Internal(e.into()))
}

pub fn token_digest(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone)]
struct CachedSession {
    user_name: String,
    expires_at: OffsetDateTime,
}

pub struct AdminAuth {
    store: Store,
    dummy_hash: String,
    sessions: Mutex<HashMap<String, CachedSession>>,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
    hashing: Arc<Semaphore>,
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth")
    }
}

impl AdminAuth {
    pub fn new(store: Store, hashing: Arc<Semaphore>) -> Self {
        Self {
            store,
            dummy_hash: hash_password("iotgate dummy password for unknown users"),
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            hashing,
        }
    }

    /// Creates the first admin when there is no user. Returns the generated password when none
    /// was given, so the caller can print it once.
    pub async fn bootstrap(&self, password: Option<&str>) -> anyhow::Result<Option<String>> {
        if self.store.count_users().await? > 0 {
            return Ok(None);
        }
        let (password, generated) = match password {
            Some(p) if !p.is_empty() => (p.to_owned(), false),
            _ => (
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(iotgate_core::credentials::random_bytes::<18>()),
                true,
            ),
        };
        let hash = hash_password_async(password.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let now = iotgate_core::envelope::format_timestamp(OffsetDateTime::now_utc());
        self.store.insert_user("admin", &hash, &now).await?;
        tracing::info!(user = "admin", "created the first admin user");
        Ok(generated.then_some(password))
    }

    fn throttled(&self, address: IpAddr) -> Option<u64> {
        let mut failures = self.failures.lock().expect("failures lock");
        match failures.get(&address) {
            Some((count, since)) if since.elapsed() < FAILURE_WINDOW => {
                (*count >= MAX_FAILURES).then(|| (FAILURE_WINDOW - since.elapsed()).as_secs() + 1)
            }
            Some(_) => {
                failures.remove(&address);
                None
            }
            None => None,
        }
    }

    fn note_failure(&self, address: IpAddr) {
        let mut failures = self.failures.lock().expect("failures lock");
        if failures.len() > 100_000 {
            failures.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(address).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= FAILURE_WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    /// Verifies credentials and opens a session: `(token, expiresAt)`.
    pub async fn login(
        &self,
        address: IpAddr,
        user_name: &str,
        password: &str,
    ) -> Result<(String, OffsetDateTime), ApiError> {
        if let Some(retry_after) = self.throttled(address) {
            return Err(ApiError::TooManyRequests(retry_after));
        }
        let stored = self.store.user_password_hash(user_name).await?;
        let known = stored.is_some();
        let hash = stored.unwrap_or_else(|| self.dummy_hash.clone());
        let password = password.to_owned();
        let permit = self
            .hashing
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ApiError::Internal(e.into()))?;
        let verified = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verify_argon2(&hash, &password)
        })
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
        if !(known && verified) {
            self.note_failure(address);
            tracing::info!(user = %user_name, %address, "failed admin login");
            return Err(ApiError::Unauthorized);
        }
        self.failures
            .lock()
            .expect("failures lock")
            .remove(&address);
        // Expired sessions are purged here: logins are rare, so this costs nothing noticeable
        // and the table never fills with dead rows.
        let now = OffsetDateTime::now_utc();
        if let Err(error) = self
            .store
            .delete_expired_sessions(&iotgate_core::envelope::format_timestamp(now))
            .await
        {
            tracing::warn!(error = %error, "could not purge expired sessions");
        }
        self.sessions
            .lock()
            .expect("sessions lock")
            .retain(|_, session| session.expires_at > now);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(iotgate_core::credentials::random_bytes::<32>());
        let expires_at = OffsetDateTime::now_utc() + SESSION_LIFETIME;
        let digest = token_digest(&token);
        self.store
            .insert_session(
                &digest,
                user_name,
                &iotgate_core::envelope::format_timestamp(expires_at),
            )
            .await?;
        self.sessions.lock().expect("sessions lock").insert(
            digest,
            CachedSession {
                user_name: user_name.to_owned(),
                expires_at,
            },
        );
        Ok((token, expires_at))
    }

    /// The user of a valid token.
    pub async fn authenticate(&self, token: &str) -> Option<String> {
        let digest = token_digest(token);
        let now = OffsetDateTime::now_utc();
        let cached = self
            .sessions
            .lock()
            .expect("sessions lock")
            .get(&digest)
            .cloned();
        let session = match cached {
            Some(session) => session,
            None => {
                let (user_name, expires_at) = self.store.find_session(&digest).await.ok()??;
                let expires_at = OffsetDateTime::parse(
                    &expires_at,
                    &time::format_description::well_known::Rfc3339,
                )
                .ok()?;
                let session = CachedSession {
                    user_name,
                    expires_at,
                };
                self.sessions
                    .lock()
                    .expect("sessions lock")
                    .insert(digest.clone(), session.clone());
                session
            }
        };
        if session.expires_at <= now {
            self.sessions.lock().expect("sessions lock").remove(&digest);
            return None;
        }
        Some(session.user_name)
    }

    pub async fn logout(&self, token: &str) -> Result<(), ApiError> {
        let digest = token_digest(token);
        self.sessions.lock().expect("sessions lock").remove(&digest);
        self.store.delete_session(&digest).await?;
        Ok(())
    }
}

/// The presented token: `Authorization: Bearer`, the session cookie, or (for WebSocket
/// subscribers, which browsers cannot give headers) a `token` query parameter.
pub fn presented_token(request: &HttpRequest, allow_query: bool) -> Option<String> {
    if let Some(value) = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some((scheme, token)) = value.split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") {
                return Some(token.trim().to_owned());
            }
        }
    }
    if let Some(cookie) = request.cookie(SESSION_COOKIE) {
        return Some(cookie.value().to_owned());
    }
    if allow_query {
        return url::form_urlencoded::parse(request.query_string().as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned());
    }
    None
}

/// True when the request carries its token itself (bearer header or `token` query parameter),
/// which no other site can make a browser send.
pub fn token_not_from_cookie(request: &HttpRequest) -> bool {
    request
        .headers()
        .contains_key(actix_web::http::header::AUTHORIZATION)
        || url::form_urlencoded::parse(request.query_string().as_bytes()).any(|(k, _)| k == "token")
}

/// The token of a request, extracted without verifying (verification is async; handlers call
/// [`crate::api::require_admin`]), with the cross-site check of cookie-authenticated writes.
#[derive(Debug, Clone)]
pub struct PresentedToken {
    pub token: Option<String>,
    /// False for a state-changing request that rides on the session cookie but does not come
    /// from our own origin: a browser sent it on another site's behalf (CSRF).
    pub same_origin: bool,
}

/// True when the request comes from the UI's own origin. Browsers send `Sec-Fetch-Site`; older
/// ones at least send `Origin` with cross-site writes, which must then name our host.
pub fn from_own_origin(request: &HttpRequest) -> bool {
    let headers = request.headers();
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin" || site == "none";
    }
    match headers
        .get(actix_web::http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(origin) => {
            let host = headers
                .get(actix_web::http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            origin
                .split_once("://")
                .is_some_and(|(_, rest)| rest.trim_end_matches('/') == host)
        }
    }
}

impl FromRequest for PresentedToken {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let bearer = request
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .is_some();
        let token = presented_token(request, false);
        let unsafe_method = !matches!(
            *request.method(),
            actix_web::http::Method::GET
                | actix_web::http::Method::HEAD
                | actix_web::http::Method::OPTIONS
        );
        // Bearer tokens are never sent by a browser on its own, so only cookie writes need it.
        let same_origin = bearer || !unsafe_method || from_own_origin(request);
        ready(Ok(PresentedToken { token, same_origin }))
    }
}
