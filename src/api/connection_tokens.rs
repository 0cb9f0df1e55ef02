//! Connection tokens for the `token` sentinel method: an operator asks for a device's token on
//! one listener and gets the ready-to-use client URL that carries it (as the Azure portal's
//! "Client URL" does); an admin rotates a token sentinel's generated secret with a grace period.
//! Tokens are signed here and never stored; the audit log says who issued which, never the token.

use actix_web::{web, HttpRequest, HttpResponse};
use iotgate_core::log_safe::LogSafe;
use iotgate_pipeline::token::{issue_hs256, IssuedClaims};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use crate::audit::AuditEvent;
use crate::auth::{Admin, Operator};
use crate::error::{parse_json, ApiError};
use crate::supervisor::TokenIssuer;

/// The token lifetime when the request names none.
const DEFAULT_EXPIRES_IN_MINUTES: u64 = 60;

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/devices/{device_id}/token", web::post().to(issue))
        .route(
            "/sentinels/{key}/token-secret/rotate",
            web::post().to(rotate_secret),
        );
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenRequest {
    listener: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    expires_in_minutes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RotationRequest {
    #[serde(default)]
    grace_seconds: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn validated<T: serde::de::DeserializeOwned>(
    state: &AppState,
    schema: &str,
    body: &[u8],
) -> Result<T, ApiError> {
    let body = parse_json(body)?;
    let problems = state.schemas.problems(schema, &body);
    if !problems.is_empty() {
        return Err(ApiError::Validation(problems));
    }
    serde_json::from_value(body).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// The host part of a URL: `name` as is, an IPv6 address in brackets.
fn url_host(name: &str) -> String {
    if name.contains(':') && !name.starts_with('[') {
        format!("[{name}]")
    } else {
        name.to_owned()
    }
}

/// The `ws[s]://host[:port]/path` a device connects to: a listener on its own port is reached at
/// its host name (the request's host when it binds every address) and its bound port, over
/// `wss` when it is `secure`; a path-mounted listener is reached where this request came in.
fn client_base_url(
    state: &AppState,
    issuer: &TokenIssuer,
    request: &HttpRequest,
) -> Result<String, ApiError> {
    let listener = &issuer.listener;
    let info = request.connection_info();
    let request_host = info.host().to_owned();
    if listener.port.is_none() {
        let secure = issuer.main_tls || info.scheme() == "https";
        let scheme = if secure { "wss" } else { "ws" };
        return Ok(format!("{scheme}://{request_host}{}", listener.path));
    }
    let scheme = if listener.secure { "wss" } else { "ws" };
    // The bound port (a listener configured with port 0 gets one at start).
    let port = state
        .supervisor
        .listener_status(&listener.key)
        .and_then(|status| status.url)
        .and_then(|url| url::Url::parse(&url).ok())
        .and_then(|url| url.port())
        .or(listener.port.filter(|p| *p != 0))
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "listener {} is not running; start it to get its URL",
                listener.key
            ))
        })?;
    let bound_everywhere = listener
        .host_name
        .as_deref()
        .is_none_or(|h| h == "0.0.0.0" || h == "::" || h == "[::]");
    let host = if bound_everywhere {
        // The request's host without its port (an IPv6 literal keeps its brackets).
        match request_host.rsplit_once(':') {
            Some((name, port))
                if port.chars().all(|c| c.is_ascii_digit())
                    && (!name.contains(':') || name.ends_with(']')) =>
            {
                name.to_owned()
            }
            _ => request_host,
        }
    } else {
        url_host(listener.host_name.as_deref().unwrap_or_default())
    };
    Ok(format!("{scheme}://{host}:{port}{}", listener.path))
}

#[tracing::instrument(name = "issue_connection_token", skip_all, fields(device = %LogSafe(&device_id)))]
async fn issue(
    state: web::Data<AppState>,
    operator: Operator,
    device_id: web::Path<String>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let asked: TokenRequest = validated(&state, "device-token", &body)?;
    if state.pipeline.registry.get(&device_id).is_none() {
        return Err(ApiError::NotFound(format!("device {device_id} not found")));
    }
    let issuer = state.supervisor.token_issuer(&asked.listener).await?;
    let minutes = asked
        .expires_in_minutes
        .unwrap_or(DEFAULT_EXPIRES_IN_MINUTES);
    let now = unix_now();
    let expires_at = now.saturating_add(minutes.saturating_mul(60));
    let token = issue_hs256(
        &issuer.secret,
        &IssuedClaims {
            sub: &device_id,
            iat: now,
            exp: expires_at,
            aud: issuer.audience.as_deref(),
            role: &asked.roles,
            groups: &asked.groups,
        },
    );
    let base = client_base_url(&state, &issuer, &request)?;
    let mut url = url::Url::parse(&base)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("client URL {base}: {e}")))?;
    url.query_pairs_mut().append_pair("access_token", &token);
    let expires = time::OffsetDateTime::from_unix_timestamp(expires_at as i64)
        .map(iotgate_core::envelope::format_timestamp)
        .unwrap_or_default();
    tracing::info!(listener = %asked.listener, minutes, "connection token issued");
    state
        .audit
        .record(
            AuditEvent::by(&operator, "device.token_issue")
                .target("device", &device_id)
                .details(json!({
                    "listener": asked.listener,
                    "roles": asked.roles,
                    "groups": asked.groups,
                    "expiresAt": expires,
                })),
        )
        .await;
    Ok(HttpResponse::Ok().json(json!({
        "token": token,
        "url": url.as_str(),
        "expiresAt": expires,
    })))
}

#[tracing::instrument(name = "rotate_token_secret", skip_all, fields(sentinel = %LogSafe(&key)))]
async fn rotate_secret(
    state: web::Data<AppState>,
    admin: Admin,
    key: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body = if body.is_empty() {
        web::Bytes::from_static(b"{}")
    } else {
        body
    };
    let asked: RotationRequest = validated(&state, "token-secret-rotation", &body)?;
    let previous_valid_until = state
        .supervisor
        .rotate_token_secret(&key, asked.grace_seconds)
        .await?;
    let until = time::OffsetDateTime::from_unix_timestamp(previous_valid_until as i64)
        .map(iotgate_core::envelope::format_timestamp)
        .unwrap_or_default();
    state
        .audit
        .record(
            AuditEvent::by(&admin, "sentinel.token_secret_rotate")
                .target("sentinel", &key)
                .details(json!({"graceSeconds": asked.grace_seconds})),
        )
        .await;
    Ok(HttpResponse::Ok().json(json!({
        "sentinel": key.as_str(),
        "graceSeconds": asked.grace_seconds,
        "previousSecretValidUntil": until,
    })))
}
