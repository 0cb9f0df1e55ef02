//! The admin REST API under `/api/v1`, plus `/healthz` and `/metrics`.

mod auth_routes;
mod data;
mod definitions;
mod devices;

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use iotgate_core::SchemaRegistry;
use iotgate_pipeline::Pipeline;
use iotgate_store::Store;

use crate::auth::{AdminAuth, PresentedToken};
use crate::error::ApiError;
use crate::supervisor::Supervisor;

/// Shared state of every handler.
pub struct AppState {
    pub store: Store,
    pub schemas: Arc<SchemaRegistry>,
    pub pipeline: Arc<Pipeline>,
    pub supervisor: Arc<Supervisor>,
    pub auth: Arc<AdminAuth>,
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// The signed-in admin, or 401 (403 for a cookie-borne write from another site).
pub async fn require_admin(state: &AppState, token: &PresentedToken) -> Result<String, ApiError> {
    let user = match &token.token {
        Some(token) => state
            .auth
            .authenticate(token)
            .await
            .ok_or(ApiError::Unauthorized)?,
        None => return Err(ApiError::Unauthorized),
    };
    if !token.same_origin {
        return Err(ApiError::Forbidden(
            "a cross-site request cannot change anything; use the admin UI or a bearer token"
                .into(),
        ));
    }
    Ok(user)
}

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/healthz", web::get().to(healthz))
        .route("/metrics", web::get().to(metrics))
        .service(
            web::scope("/api/v1")
                .configure(auth_routes::configure)
                .configure(definitions::configure)
                .configure(devices::configure)
                .configure(data::configure)
                .default_service(web::to(api_not_found)),
        );
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.pipeline.metrics.encode())
}

async fn api_not_found(
    state: web::Data<AppState>,
    token: PresentedToken,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    Err(ApiError::NotFound(format!(
        "no API route {} {}",
        request.method(),
        request.path()
    )))
}

/// Query-string errors as the API's JSON errors.
pub fn query_error(
    error: actix_web::error::QueryPayloadError,
    _: &HttpRequest,
) -> actix_web::Error {
    ApiError::BadRequest(format!("invalid query string: {error}")).into()
}

/// Path errors as the API's JSON errors.
pub fn path_error(error: actix_web::error::PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::NotFound(format!("invalid path: {error}")).into()
}
