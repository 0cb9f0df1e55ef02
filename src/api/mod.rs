//! The admin REST API under `/api/v1`, plus `/healthz` and `/metrics`.
//!
//! Every handler states the least role it needs by the type of its guard argument
//! ([`Viewer`](crate::auth::Viewer), [`Operator`](crate::auth::Operator),
//! [`Admin`](crate::auth::Admin)); the guard answers 401/403/415 before the handler runs.

mod audit_routes;
mod auth_routes;
mod connection_tokens;
mod data;
mod definitions;
mod devices;
mod messages;
mod tokens;
mod users;

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use iotgate_core::SchemaRegistry;
use iotgate_pipeline::Pipeline;
use iotgate_store::Store;

use crate::accounts::Accounts;
use crate::audit::AuditLog;
use crate::auth::{AdminAuth, Viewer};
use crate::error::ApiError;
use crate::supervisor::Supervisor;

/// Shared state of every handler.
pub struct AppState {
    pub store: Store,
    pub schemas: Arc<SchemaRegistry>,
    pub pipeline: Arc<Pipeline>,
    pub supervisor: Arc<Supervisor>,
    pub auth: Arc<AdminAuth>,
    pub accounts: Arc<Accounts>,
    pub audit: Arc<AuditLog>,
    /// The main port serves TLS itself (the session cookie is then `Secure`).
    pub tls: bool,
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The NATS bus between nodes (`--bus-url`), for `/healthz` and messages to devices
    /// connected to other nodes.
    pub bus: Option<iotgate_pipeline::bus::LiveBus>,
    /// Messages queued for offline devices.
    pub outbox: Arc<iotgate_pipeline::Outbox>,
}

/// Routes of the main port; `/metrics` is public only with `--metrics-public`.
pub fn configure(config: &mut web::ServiceConfig, metrics_public: bool) {
    config.route("/healthz", web::get().to(healthz));
    if metrics_public {
        config.route("/metrics", web::get().to(public_metrics));
    } else {
        config.route("/metrics", web::get().to(metrics));
    }
    config.service(
        web::scope("/api/v1")
            .configure(auth_routes::configure)
            .configure(users::configure)
            .configure(tokens::configure)
            .configure(audit_routes::configure)
            .configure(definitions::configure)
            .configure(messages::configure)
            .configure(devices::configure)
            .configure(connection_tokens::configure)
            .configure(data::configure)
            .default_service(web::to(api_not_found)),
    );
}

/// 200 while the process serves and its database answers; 503 with the reason while the
/// database is unreachable (the process keeps running and reconnects by itself).
async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    let health = state.store.health();
    // A bus that is away degrades live views only: reported, not a reason to take the node out.
    let bus = state.bus.as_ref().map(|bus| {
        if bus.is_connected() {
            "connected"
        } else {
            "reconnecting"
        }
    });
    if health.is_up() {
        let mut body = serde_json::json!({"status": "ok"});
        if let Some(bus) = bus {
            body["bus"] = serde_json::json!(bus);
        }
        return HttpResponse::Ok().json(body);
    }
    HttpResponse::ServiceUnavailable().json(serde_json::json!({
        "status": "unavailable",
        "reason": format!(
            "the {} database is unreachable: {}",
            state.store.engine().name(),
            health.reason().unwrap_or_default()
        ),
    }))
}

/// The Prometheus text of the pipeline's metrics.
pub fn metrics_response(pipeline: &Pipeline) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(pipeline.metrics.encode())
}

async fn metrics(state: web::Data<AppState>, _: Viewer) -> HttpResponse {
    metrics_response(&state.pipeline)
}

async fn public_metrics(state: web::Data<AppState>) -> HttpResponse {
    metrics_response(&state.pipeline)
}

async fn api_not_found(_: Viewer, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound(format!(
        "no API route {} {}",
        request.method(),
        iotgate_core::log_safe::LogSafe(request.path())
    )))
}

/// Parses a query string after authentication (so that without a token every answer is 401).
pub fn parse_query<T: serde::de::DeserializeOwned>(request: &HttpRequest) -> Result<T, ApiError> {
    web::Query::<T>::from_query(request.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))
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
