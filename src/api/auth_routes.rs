//! `/auth`: login, logout, me.

use actix_web::cookie::{Cookie, SameSite};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::{require_admin, AppState};
use crate::auth::{PresentedToken, SESSION_COOKIE};
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

#[tracing::instrument(name = "login", skip_all, fields(peer = ?request.peer_addr()))]
async fn login(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let value = parse_json(&body)?;
    let login: LoginRequest = serde_json::from_value(value).map_err(|e| {
        ApiError::Validation(vec![iotgate_core::Problem::new(
            "",
            format!("expected {{userName, password}}: {e}"),
        )])
    })?;
    let address = request
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let (token, expires_at) = state
        .auth
        .login(address, &login.user_name, &login.password)
        .await?;
    let cookie = Cookie::build(SESSION_COOKIE, token.clone())
        .http_only(true)
        .same_site(SameSite::Strict)
        .path("/")
        .max_age(actix_web::cookie::time::Duration::hours(12))
        .finish();
    Ok(HttpResponse::Ok().cookie(cookie).json(serde_json::json!({
        "token": token,
        "expiresAt": iotgate_core::envelope::format_timestamp(expires_at),
    })))
}

async fn logout(
    state: web::Data<AppState>,
    token: PresentedToken,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    if let Some(token) = &token.token {
        state.auth.logout(token).await?;
    }
    let mut removal = Cookie::build(SESSION_COOKIE, "").path("/").finish();
    removal.make_removal();
    Ok(HttpResponse::NoContent().cookie(removal).finish())
}

async fn me(state: web::Data<AppState>, token: PresentedToken) -> Result<HttpResponse, ApiError> {
    let user = require_admin(&state, &token).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"userName": user})))
}
