//! Read side: telemetry, dead letters, schemas and the OpenAPI document.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{require_admin, AppState};
use crate::auth::PresentedToken;
use crate::error::ApiError;

/// The OpenAPI document of this API, kept in `docs/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/telemetry", web::get().to(telemetry))
        .route("/deadletters", web::get().to(dead_letters))
        .route("/schemas/{kind}", web::get().to(schema))
        .route("/openapi.json", web::get().to(openapi));
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TelemetryQuery {
    device_id: Option<String>,
    listener: Option<String>,
    limit: Option<i64>,
}

fn parse_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

async fn telemetry(
    state: web::Data<AppState>,
    token: PresentedToken,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    // Parsed after authentication: without a token, every answer is 401.
    let query = web::Query::<TelemetryQuery>::from_query(request.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let rows = state
        .store
        .query_telemetry(
            query.device_id.as_deref().filter(|s| !s.is_empty()),
            query.listener.as_deref().filter(|s| !s.is_empty()),
            limit,
        )
        .await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "id": row.id,
                "listenerKey": row.listener_key,
                "connectionId": row.connection_id,
                "sourceAddress": row.source_address,
                "receivedAt": row.received_at,
                "contentType": row.content_type,
                "deviceId": row.device_id,
                "deviceType": row.device_type,
                "authenticated": true,
                "payload": parse_text(&row.payload),
                "metadata": parse_text(&row.metadata),
                "downstream": row.downstream_key,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"items": items})))
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<i64>,
}

async fn dead_letters(
    state: web::Data<AppState>,
    token: PresentedToken,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    // Parsed after authentication: without a token, every answer is 401.
    let query = web::Query::<LimitQuery>::from_query(request.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let rows = state.store.query_dead_letters(limit).await?;
    let items: Vec<Value> = rows
        .iter()
        .map(|row| {
            json!({
                "id": row.id,
                "listenerKey": row.listener_key,
                "deviceId": row.device_id,
                "module": row.module,
                "reason": row.reason,
                "message": row.message,
                "receivedAt": row.received_at,
                "contentType": row.content_type,
                "payload": row.payload.as_deref().map(parse_text),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"items": items})))
}

async fn schema(
    state: web::Data<AppState>,
    token: PresentedToken,
    kind: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    state
        .schemas
        .document(&kind)
        .map(|document| HttpResponse::Ok().json(document))
        .ok_or_else(|| ApiError::NotFound(format!("no schema named {kind}")))
}

async fn openapi(
    state: web::Data<AppState>,
    token: PresentedToken,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI))
}
