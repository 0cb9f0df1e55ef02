//! The device registry API. Access keys are returned once (on registration and rotation) and
//! stored only as HMAC digests; every write updates the in-memory registry at once. Everyone
//! signed in reads; operators and admins change devices and rotate keys, and every change is in
//! the audit log (a key rotation says which key, never the key). Reads add the device's
//! presence: `online` and its open `connections` (with a bus, gathered from every node).

use actix_web::{web, HttpRequest, HttpResponse};
use iotgate_core::credentials::generate_access_key;
use iotgate_core::log_safe::LogSafe;
use iotgate_store::DeviceRecord;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_query, AppState};
use crate::audit::{diff, no_secrets, AuditEvent};
use crate::auth::{Operator, Viewer};
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
    operator: Operator,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
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
        primary_key_sealed: Some(state.pipeline.registry.seal_key(&primary)),
        secondary_key_sealed: Some(state.pipeline.registry.seal_key(&secondary)),
        created_at: iotgate_core::envelope::format_timestamp(time::OffsetDateTime::now_utc()),
        last_contact: None,
        message_count: 0,
    };
    state.store.insert_device(&device).await?;
    state.pipeline.registry.upsert(&device);
    tracing::info!(device = %device.device_id, "device registered");
    state
        .audit
        .record(
            AuditEvent::by(&operator, "device.create")
                .target("device", &device.device_id)
                .details(diff(&json!({}), &view(&device), no_secrets)),
        )
        .await;
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
    /// Only devices with (true) or without (false) an open connection (on any node, with a bus).
    online: Option<bool>,
}

/// The device resource as `GET /devices/{id}` shows it: the stored fields, whether it has
/// open connections, and which (on every node, with a bus).
async fn live_view(state: &AppState, device: &DeviceRecord) -> Value {
    let mut view = view(device);
    if let (Value::Object(view), Value::Object(presence)) = (
        &mut view,
        super::messages::connections_view(state, &device.device_id).await,
    ) {
        view.extend(presence);
    }
    view
}

/// A device as lists show it: `online` from the platform's view (`online`, gathered once per
/// page), `connections` this node's (asking every node for every row would cost a round trip each).
fn list_view(
    state: &AppState,
    device: &DeviceRecord,
    online: &std::collections::HashSet<String>,
) -> Value {
    let mut view = view(device);
    let connections: Vec<Value> = state
        .pipeline
        .connections
        .device_connections(&device.device_id)
        .iter()
        .map(|c| {
            let mut connection = c.to_json();
            connection["node"] = json!(state.store.node_id());
            connection
        })
        .collect();
    view["online"] = json!(online.contains(&device.device_id));
    view["connections"] = json!(connections);
    view
}

async fn list(
    state: web::Data<AppState>,
    _: Viewer,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query: ListQuery = parse_query(&request)?;
    let offset = query.offset.unwrap_or(0).max(0);
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    let search = query.search.as_deref().filter(|s| !s.is_empty());
    let online = super::messages::online_devices(&state).await;
    let (mut devices, total) = match query.online {
        None => state.store.list_devices(search, offset, limit).await?,
        // Presence lives in memory: the matching devices are filtered here, then paged.
        Some(wanted) => {
            let (all, _) = state.store.list_devices(search, 0, i64::MAX).await?;
            let matching: Vec<DeviceRecord> = all
                .into_iter()
                .filter(|d| online.contains(&d.device_id) == wanted)
                .collect();
            let total = matching.len() as i64;
            let page = matching
                .into_iter()
                .skip(offset as usize)
                .take(limit as usize)
                .collect();
            (page, total)
        }
    };
    for device in &mut devices {
        state.pipeline.registry.add_unflushed_contacts(device);
    }
    Ok(HttpResponse::Ok().json(json!({
        "items": devices.iter().map(|d| list_view(&state, d, &online)).collect::<Vec<_>>(),
        "total": total,
        "offset": offset,
        "limit": limit,
    })))
}

async fn load(state: &AppState, device_id: &str) -> Result<DeviceRecord, ApiError> {
    let mut device = state
        .store
        .get_device(device_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("device {device_id} not found")))?;
    state.pipeline.registry.add_unflushed_contacts(&mut device);
    Ok(device)
}

async fn get(
    state: web::Data<AppState>,
    _: Viewer,
    device_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let device = load(&state, &device_id).await?;
    Ok(HttpResponse::Ok().json(live_view(&state, &device).await))
}

#[tracing::instrument(name = "change_device", skip_all, fields(device = %LogSafe(&device_id)))]
async fn patch(
    state: web::Data<AppState>,
    operator: Operator,
    device_id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body = parse_json(&body)?;
    validate(&state, "device-patch", &body)?;
    let mut device = load(&state, &device_id).await?;
    let before = view(&device);
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
    let after = view(&device);
    state
        .audit
        .record(
            AuditEvent::by(&operator, "device.update")
                .target("device", &device.device_id)
                .details(diff(&before, &after, no_secrets)),
        )
        .await;
    Ok(HttpResponse::Ok().json(after))
}

#[tracing::instrument(name = "delete_device", skip_all, fields(device = %LogSafe(&device_id)))]
async fn delete(
    state: web::Data<AppState>,
    operator: Operator,
    device_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.store.delete_device(&device_id).await?;
    state.pipeline.registry.remove(&device_id);
    state
        .audit
        .record(AuditEvent::by(&operator, "device.delete").target("device", &device_id))
        .await;
    Ok(HttpResponse::NoContent().finish())
}

#[tracing::instrument(name = "rotate_device_key", skip_all, fields(device = %LogSafe(&path.0), which = %LogSafe(&path.1)))]
async fn rotate_key(
    state: web::Data<AppState>,
    operator: Operator,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (device_id, which) = path.into_inner();
    if which != "primary" && which != "secondary" {
        return Err(ApiError::NotFound(format!(
            "no key named {which}: use primary or secondary"
        )));
    }
    let mut device = load(&state, &device_id).await?;
    let key = generate_access_key();
    let digest = state.pipeline.registry.hasher().digest(&key);
    let sealed = Some(state.pipeline.registry.seal_key(&key));
    if which == "primary" {
        device.primary_key_digest = digest;
        device.primary_key_sealed = sealed;
    } else {
        device.secondary_key_digest = digest;
        device.secondary_key_sealed = sealed;
    }
    state.store.update_device(&device).await?;
    state.pipeline.registry.upsert(&device);
    tracing::info!(device = %device_id, which = %which, "device key rotated");
    state
        .audit
        .record(
            AuditEvent::by(&operator, "device.key_rotate")
                .target("device", &device_id)
                .details(json!({"key": which})),
        )
        .await;
    Ok(HttpResponse::Ok().json(json!({
        "deviceId": device_id,
        format!("{which}AccessKey"): key,
    })))
}
