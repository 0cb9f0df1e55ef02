//! The device registry API. Access keys are returned once (on registration and rotation) and
//! stored only as HMAC digests; every write updates the in-memory registry at once.

use actix_web::{web, HttpRequest, HttpResponse};
use iotgate_core::credentials::generate_access_key;
use iotgate_store::DeviceRecord;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{require_admin, AppState};
use crate::auth::PresentedToken;
use crate::error::{parse_json, ApiError};

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/devices", web::get().to(list))
        .route("/devices", web::post().to(create))
        .route("/devices/{device_id}", web::get().to(get))
        .route("/devices/{device_id}", web::patch().to(patch))
        .route("/devices/{device_id}", web::delete().to(delete))
        .route(
            "/devices/{device_id}/keys/{which}",
            web::post().to(rotate_key),
        );
}

fn view(device: &DeviceRecord) -> Value {
    json!({
        "deviceId": device.device_id,
        "name": device.name,
        "deviceType": device.device_type,
        "enabled": device.enabled,
        "properties": device.properties,
        "createdAt": device.created_at,
        "lastContact": device.last_contact,
        "messageCount": device.message_count,
    })
}

fn validate(state: &AppState, schema: &str, body: &Value) -> Result<(), ApiError> {
    let problems = state.schemas.problems(schema, body);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(problems))
    }
}

#[tracing::instrument(name = "register_device", skip_all)]
async fn create(
    state: web::Data<AppState>,
    token: PresentedToken,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    let body = parse_json(&body)?;
    validate(&state, "device", &body)?;
    let primary = generate_access_key();
    let secondary = generate_access_key();
    let hasher = state.pipeline.registry.hasher();
    let device = DeviceRecord {
        device_id: body["deviceId"].as_str().unwrap_or_default().to_owned(),
        name: body["name"].as_str().unwrap_or_default().to_owned(),
        device_type: body["deviceType"].as_str().unwrap_or_default().to_owned(),
        enabled: body.get("enabled").and_then(Value::as_bool).unwrap_or(true),
        properties: body.get("properties").cloned().unwrap_or_else(|| json!({})),
        primary_key_digest: hasher.digest(&primary),
        secondary_key_digest: hasher.digest(&secondary),
        created_at: iotgate_core::envelope::format_timestamp(time::OffsetDateTime::now_utc()),
        last_contact: None,
        message_count: 0,
    };
    state.store.insert_device(&device).await?;
    state.pipeline.registry.upsert(&device);
    tracing::info!(device = %device.device_id, "device registered");
    let mut response = view(&device);
    response["primaryAccessKey"] = json!(primary);
    response["secondaryAccessKey"] = json!(secondary);
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/v1/devices/{}", device.device_id)))
        .json(response))
}

#[derive(Deserialize)]
struct ListQuery {
    offset: Option<i64>,
    limit: Option<i64>,
    search: Option<String>,
}

async fn list(
    state: web::Data<AppState>,
    token: PresentedToken,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    // Parsed after authentication: without a token, every answer is 401.
    let query = web::Query::<ListQuery>::from_query(request.query_string())
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let offset = query.offset.unwrap_or(0).max(0);
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    let search = query.search.as_deref().filter(|s| !s.is_empty());
    let (devices, total) = state.store.list_devices(search, offset, limit).await?;
    Ok(HttpResponse::Ok().json(json!({
        "items": devices.iter().map(view).collect::<Vec<_>>(),
        "total": total,
        "offset": offset,
        "limit": limit,
    })))
}

async fn load(state: &AppState, device_id: &str) -> Result<DeviceRecord, ApiError> {
    state
        .store
        .get_device(device_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("device {device_id} not found")))
}

async fn get(
    state: web::Data<AppState>,
    token: PresentedToken,
    device_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    Ok(HttpResponse::Ok().json(view(&load(&state, &device_id).await?)))
}

#[tracing::instrument(name = "change_device", skip_all, fields(device = %*device_id))]
async fn patch(
    state: web::Data<AppState>,
    token: PresentedToken,
    device_id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    let body = parse_json(&body)?;
    validate(&state, "device-patch", &body)?;
    let mut device = load(&state, &device_id).await?;
    if let Some(name) = body.get("name").and_then(Value::as_str) {
        device.name = name.to_owned();
    }
    if let Some(device_type) = body.get("deviceType").and_then(Value::as_str) {
        device.device_type = device_type.to_owned();
    }
    if let Some(enabled) = body.get("enabled").and_then(Value::as_bool) {
        device.enabled = enabled;
    }
    if let Some(properties) = body.get("properties") {
        device.properties = properties.clone();
    }
    state.store.update_device(&device).await?;
    state.pipeline.registry.upsert(&device);
    Ok(HttpResponse::Ok().json(view(&device)))
}

#[tracing::instrument(name = "delete_device", skip_all, fields(device = %*device_id))]
async fn delete(
    state: web::Data<AppState>,
    token: PresentedToken,
    device_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    state.store.delete_device(&device_id).await?;
    state.pipeline.registry.remove(&device_id);
    Ok(HttpResponse::NoContent().finish())
}

#[tracing::instrument(name = "rotate_device_key", skip_all, fields(device = %path.0, which = %path.1))]
async fn rotate_key(
    state: web::Data<AppState>,
    token: PresentedToken,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    let (device_id, which) = path.into_inner();
    if which != "primary" && which != "secondary" {
        return Err(ApiError::NotFound(format!(
            "no key named {which}: use primary or secondary"
        )));
    }
    let mut device = load(&state, &device_id).await?;
    let key = generate_access_key();
    let digest = state.pipeline.registry.hasher().digest(&key);
    if which == "primary" {
        device.primary_key_digest = digest;
    } else {
        device.secondary_key_digest = digest;
    }
    state.store.update_device(&device).await?;
    state.pipeline.registry.upsert(&device);
    tracing::info!(device = %device_id, which = %which, "device key rotated");
    Ok(HttpResponse::Ok().json(json!({
        "deviceId": device_id,
        format!("{which}AccessKey"): key,
    })))
}
