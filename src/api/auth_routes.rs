//! `/auth`: login, logout, me.

use actix_web::cookie::{Cookie, SameSite};
use actix_web::{web, HttpRequest, HttpResponse};
use iotgate_core::log_safe::LogSafe;
use iotgate_listener::client_address::client_info;
use serde::Deserialize;

use super::AppState;
use crate::audit::AuditEvent;
use crate::auth::guard::{has_body, is_json};
use crate::auth::{CredentialKind, LoginError, Viewer, SESSION_COOKIE};
use crate::error::{parse_json, ApiError};

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/auth/login", web::post().to(login))
        .route("/auth/logout", web::post().to(logout))
        .route("/auth/me", web::get().to(me));
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoginRequest {
    user_name: String,
    password: String,
}

/// The session cookie is `Secure` when the browser reached us over HTTPS: our own TLS, or a
/// trusted proxy that says so.
fn session_cookie(state: &AppState, request: &HttpRequest, token: String) -> Cookie<'static> {
    let https = state.tls || client_info(request).https;
    Cookie::build(SESSION_COOKIE, token)
        .http_only(true)
        .secure(https)
        .same_site(SameSite::Strict)
        .path("/")
        .max_age(actix_web::cookie::time::Duration::hours(12))
        .finish()
}

async fn login(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    // Like every write, a login is JSON: an HTML form on another site cannot send it (no login
    // CSRF into someone else's account).
    if has_body(&request) && !is_json(&request) {
        return Err(ApiError::UnsupportedMediaType(
            "a request body must be sent as Content-Type: application/json".into(),
        ));
    }
    let value = parse_json(&body)?;
    let login: LoginRequest = serde_json::from_value(value).map_err(|e| {
        ApiError::Validation(vec![iotgate_core::Problem::new(
            "",
            format!("expected {{userName, password}}: {e}"),
        )])
    })?;
    let client = client_info(&request);
    let address = client.ip();
    match state
        .auth
        .login(address, &login.user_name, &login.password)
        .await
    {
        Ok(session) => {
            tracing::info!(user = %LogSafe(&session.user_name), address = ?address, "signed in");
            state
                .audit
                .record(
                    AuditEvent::new("auth.login")
                        .actor(&session.user_name)
                        .credential("password")
                        .address(address)
                        .details(serde_json::json!({"role": session.role})),
                )
                .await;
            let cookie = session_cookie(&state, &request, session.token.clone());
            Ok(HttpResponse::Ok().cookie(cookie).json(serde_json::json!({
                "token": session.token,
                "expiresAt": iotgate_core::envelope::format_timestamp(session.expires_at),
                "userName": session.user_name,
                "role": session.role,
            })))
        }
        Err(error) => {
            let reason = match &error {
                LoginError::WrongCredentials => Some("wrong_credentials"),
                LoginError::Throttled(_) => Some("throttled"),
                LoginError::Internal(_) => None,
            };
            if let Some(reason) = reason {
                tracing::info!(user = %LogSafe(&login.user_name), address = ?address, reason, "failed admin login");
                state
                    .audit
                    .record_failed_login(&login.user_name, address, reason)
                    .await;
            }
            Err(error.into())
        }
    }
}

async fn logout(state: web::Data<AppState>, user: Viewer) -> Result<HttpResponse, ApiError> {
    match &user.kind {
        CredentialKind::Session => {
            state.auth.logout(&user.digest).await?;
            state
                .audit
                .record(AuditEvent::by(&user, "auth.logout"))
                .await;
        }
        // An API token is revoked through /tokens, not by "logging out" with it.
        CredentialKind::ApiToken { .. } => {}
    }
    let mut removal = Cookie::build(SESSION_COOKIE, "").path("/").finish();
    removal.make_removal();
    Ok(HttpResponse::NoContent().cookie(removal).finish())
}

async fn me(user: Viewer) -> HttpResponse {
    let (credential, token_name) = match &user.kind {
        CredentialKind::Session => ("session", None),
        CredentialKind::ApiToken { name, .. } => ("token", Some(name.clone())),
    };
    HttpResponse::Ok().json(serde_json::json!({
        "userName": user.user_name,
        "role": user.role,
        "credential": credential,
        "tokenName": token_name,
        "expiresAt": iotgate_core::envelope::format_timestamp(user.expires_at),
    }))
}
