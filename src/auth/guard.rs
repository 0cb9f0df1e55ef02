//! Authorization as a type. A handler states the least role it needs by the type of one of its
//! arguments: `_: Viewer`, `user: Operator`, `admin: Admin`. The extractor authenticates the
//! request, applies the cross-site rules, checks the role, and hands the handler a [`Principal`],
//! or answers 401 / 403 / 415 before the handler runs. No handler checks credentials by hand.
//!
//! Cross-site rules, for requests that change something:
//! - a request whose credential is the session cookie (the only one a browser attaches on its
//!   own) must come from the UI's own origin (`Sec-Fetch-Site`, else `Origin` against the host);
//!   a `Bearer` token in the `Authorization` header exempts it, any other `Authorization` value
//!   does not;
//! - a body must be `application/json`, which no HTML form can send without a CORS preflight;
//!   only a message to devices ([`MessageSender`]) may also be `text/plain` or
//!   `application/octet-stream`, and such a body riding on the cookie must carry the browser's
//!   own say on where it comes from (`Sec-Fetch-Site` or `Origin`), not merely lack one.

use std::future::Future;
use std::marker::PhantomData;
use std::ops::Deref;
use std::pin::Pin;

use actix_web::http::header;
use actix_web::{dev::Payload, web, FromRequest, HttpRequest};

use super::roles::{CredentialSource, Principal, Role};
use super::SESSION_COOKIE;
use crate::api::AppState;
use crate::error::ApiError;

/// The least role a guard demands.
pub trait RoleRequirement {
    const ROLE: Role;
    /// Whether the body may be other than JSON (text and bytes for devices).
    const RAW_BODIES: bool = false;
}

#[derive(Debug)]
pub struct ViewerRole;
#[derive(Debug)]
pub struct OperatorRole;
#[derive(Debug)]
pub struct AdminRole;

impl RoleRequirement for ViewerRole {
    const ROLE: Role = Role::Viewer;
}
impl RoleRequirement for OperatorRole {
    const ROLE: Role = Role::Operator;
}
impl RoleRequirement for AdminRole {
    const ROLE: Role = Role::Admin;
}

/// An authenticated request whose user has at least role `R`.
#[derive(Debug)]
pub struct Authorized<R> {
    pub principal: Principal,
    role: PhantomData<R>,
}

/// Any signed-in user (every role reads).
pub type Viewer = Authorized<ViewerRole>;
/// Operators and admins: devices, keys.
pub type Operator = Authorized<OperatorRole>;
/// Admins only: definitions, users, the audit log.
pub type Admin = Authorized<AdminRole>;
/// An operator sending a message to devices, whose body may be JSON, text or bytes.
pub type MessageSender = Authorized<MessageSenderRole>;

#[derive(Debug)]
pub struct MessageSenderRole;

impl RoleRequirement for MessageSenderRole {
    const ROLE: Role = Role::Operator;
    const RAW_BODIES: bool = true;
}

impl<R> Deref for Authorized<R> {
    type Target = Principal;

    fn deref(&self) -> &Principal {
        &self.principal
    }
}

/// The token a request presents and where it came from: `Authorization: Bearer` first, then
/// (WebSocket subscribers only) `?token=`, then the session cookie.
pub fn presented_credential(
    request: &HttpRequest,
    allow_query: bool,
) -> Option<(String, CredentialSource)> {
    if let Some(value) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some((scheme, token)) = value.split_once(' ') {
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
                return Some((token.trim().to_owned(), CredentialSource::Header));
            }
        }
    }
    if allow_query {
        if let Some((_, token)) = url::form_urlencoded::parse(request.query_string().as_bytes())
            .find(|(k, _)| k == "token")
        {
            return Some((token.into_owned(), CredentialSource::Query));
        }
    }
    request
        .cookie(SESSION_COOKIE)
        .map(|c| (c.value().to_owned(), CredentialSource::Cookie))
}

/// Authenticates a request (401 when it cannot be).
pub async fn authenticate_request(
    state: &AppState,
    request: &HttpRequest,
    allow_query: bool,
) -> Result<Principal, ApiError> {
    let (token, source) =
        presented_credential(request, allow_query).ok_or(ApiError::Unauthorized)?;
    let credential = state
        .auth
        .authenticate(&token)
        .await
        .ok_or(ApiError::Unauthorized)?;
    Ok(Principal {
        user_name: credential.user_name,
        role: credential.role,
        kind: credential.kind,
        digest: credential.digest,
        expires_at: credential.expires_at,
        source,
        client: iotgate_listener::client_address::client_info(request),
    })
}

/// True when the request comes from the UI's own origin. Browsers send `Sec-Fetch-Site`; older
/// ones at least send `Origin` with cross-site writes, which must then name our host (behind a
/// trusted proxy, the host the client asked the proxy for).
pub fn from_own_origin(request: &HttpRequest, principal_host: Option<&str>) -> bool {
    let headers = request.headers();
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin" || site == "none";
    }
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(origin) => {
            let host = principal_host
                .or_else(|| headers.get(header::HOST).and_then(|v| v.to_str().ok()))
                .unwrap_or_default();
            origin
                .split_once("://")
                .is_some_and(|(_, rest)| rest.trim_end_matches('/').eq_ignore_ascii_case(host))
        }
    }
}

fn changes_something(request: &HttpRequest) -> bool {
    !matches!(
        *request.method(),
        actix_web::http::Method::GET
            | actix_web::http::Method::HEAD
            | actix_web::http::Method::OPTIONS
    )
}

/// True when the request carries a body (a length above zero, or chunked).
pub fn has_body(request: &HttpRequest) -> bool {
    let headers = request.headers();
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
        || headers.contains_key(header::TRANSFER_ENCODING)
}

/// True when the request declares a JSON body (`application/json`, any parameters).
pub fn is_json(request: &HttpRequest) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The cross-site and body rules of a request that changes something.
pub fn check_write(
    request: &HttpRequest,
    principal: &Principal,
    raw_bodies: bool,
) -> Result<(), ApiError> {
    if !changes_something(request) {
        return Ok(());
    }
    if principal.source == CredentialSource::Cookie
        && !from_own_origin(request, principal.client.forwarded_host.as_deref())
    {
        return Err(ApiError::Forbidden(
            "a cross-site request cannot change anything; use the admin UI or a bearer token"
                .into(),
        ));
    }
    if has_body(request) && !is_json(request) {
        if !raw_bodies {
            return Err(ApiError::UnsupportedMediaType(
                "a request body must be sent as Content-Type: application/json".into(),
            ));
        }
        // A form can send text cross-site without a preflight: with the cookie, the browser
        // must say where the request comes from (it was checked above to be our origin).
        let headers = request.headers();
        if principal.source == CredentialSource::Cookie
            && !headers.contains_key("sec-fetch-site")
            && !headers.contains_key(header::ORIGIN)
        {
            return Err(ApiError::Forbidden(
                "a body that is not JSON sent with the session cookie needs the browser's Origin header; use a bearer token"
                    .into(),
            ));
        }
    }
    Ok(())
}

impl<R: RoleRequirement + 'static> FromRequest for Authorized<R> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let request = request.clone();
        Box::pin(async move {
            let state = request
                .app_data::<web::Data<AppState>>()
                .cloned()
                .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("no application state")))?;
            let principal = authenticate_request(&state, &request, false).await?;
            check_write(&request, &principal, R::RAW_BODIES)?;
            if principal.role < R::ROLE {
                return Err(ApiError::Forbidden(format!(
                    "this needs the {} role; {} has the {} role",
                    R::ROLE,
                    principal.user_name,
                    principal.role
                )));
            }
            Ok(Authorized {
                principal,
                role: PhantomData,
            })
        })
    }
}
