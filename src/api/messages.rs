//! Messages to devices: to one device, to a group of a listener, or to every connection of a
//! listener, answered with how many live connections took the message (on every node, when
//! several share a NATS bus), and device presence (its recent connect and disconnect events).
//!
//! A message to a device that has no open connection is refused with `device_offline`, or, when
//! the sender asks for it (`?queue=true&ttlSeconds=`), kept for the device's next connection.
//! Operators and admins send; every send is in the audit log (where it went and how many
//! connections took it, never the body).

use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt as _;
use iotgate_core::definition::DefinitionKind;
use iotgate_core::log_safe::LogSafe;
use iotgate_pipeline::bus::RemoteTarget;
use iotgate_pipeline::outbox::MAX_TTL;
use iotgate_pipeline::{Delivery, Downlink, DownlinkBody, Queued};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{parse_query, AppState};
use crate::audit::AuditEvent;
use crate::auth::{MessageSender, Viewer};
use crate::error::ApiError;

/// The largest message body accepted for devices.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// How long a send waits for the other nodes' counts.
const NODE_ANSWER_WAIT: Duration = Duration::from_secs(1);
/// A queued message's time to live when the sender names none.
const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Presence events shown per request at most.
const MAX_EVENTS: usize = 500;

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route(
            "/devices/{device_id}/messages",
            web::post().to(send_to_device),
        )
        .route("/devices/{device_id}/events", web::get().to(device_events))
        .route(
            "/listeners/{key}/messages",
            web::post().to(send_to_listener),
        )
        .route(
            "/listeners/{key}/groups/{group}/messages",
            web::post().to(send_to_group),
        );
}

/// Reads the body as the message: JSON, text or bytes by its Content-Type, at most
/// [`MAX_MESSAGE_BYTES`].
async fn read_message(
    request: &HttpRequest,
    mut payload: web::Payload,
) -> Result<DownlinkBody, ApiError> {
    let essence = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    let kind = match essence.as_deref() {
        Some("application/json") => "json",
        Some("text/plain") => "text",
        Some("application/octet-stream") => "binary",
        Some(other) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "a message is sent as application/json, text/plain or application/octet-stream, not {}",
                LogSafe(other)
            )))
        }
        None => {
            return Err(ApiError::UnsupportedMediaType(
                "say what the message is: Content-Type application/json, text/plain or application/octet-stream".into(),
            ))
        }
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_MESSAGE_BYTES) {
        return Err(ApiError::PayloadTooLarge(MAX_MESSAGE_BYTES));
    }
    let mut bytes = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::BadRequest(format!("the body could not be read: {e}")))?;
        if bytes.len() + chunk.len() > MAX_MESSAGE_BYTES {
            return Err(ApiError::PayloadTooLarge(MAX_MESSAGE_BYTES));
        }
        bytes.extend_from_slice(&chunk);
    }
    if bytes.is_empty() {
        return Err(ApiError::BadRequest(
            "the body is the message to send; it is empty".into(),
        ));
    }
    match kind {
        "json" => crate::error::parse_json(&bytes).map(DownlinkBody::Json),
        "text" => String::from_utf8(bytes.to_vec())
            .map(|text| DownlinkBody::Text(text.into()))
            .map_err(|_| ApiError::BadRequest("a text/plain message must be UTF-8".into())),
        _ => Ok(DownlinkBody::Binary(bytes.freeze())),
    }
}

/// 404 unless `key` is a defined listener.
async fn require_listener(state: &AppState, key: &str) -> Result<(), ApiError> {
    state
        .supervisor
        .get(DefinitionKind::Listener, key)
        .await
        .map(|_| ())
        .map_err(|_| ApiError::NotFound(format!("listener {} not found", LogSafe(key))))
}

/// Sends to this node's connections `target` names and, with a bus, to the other live nodes';
/// the counts of all of them.
async fn deliver(state: &AppState, target: &RemoteTarget, body: DownlinkBody) -> Delivery {
    let message = Downlink::from_server(body.clone());
    let mut delivery = target.deliver_locally(&state.pipeline.connections, &message);
    if let Some(bus) = &state.bus {
        delivery += bus
            .send_and_count(target, &body, other_nodes(state).await, NODE_ANSWER_WAIT)
            .await;
    }
    delivery
}

/// How many other nodes are live (whose answers a question on the bus waits for).
async fn other_nodes(state: &AppState) -> usize {
    let since = crate::cluster::timestamp_ago(crate::cluster::NODE_TIMEOUT);
    match state.store.live_nodes(&since).await {
        Ok(nodes) => nodes
            .iter()
            .filter(|n| n.node_id != state.store.node_id())
            .count(),
        Err(error) => {
            tracing::warn!(error = %error, "cannot tell how many nodes are live; this node's connections only");
            0
        }
    }
}

fn delivered(delivery: Delivery) -> Value {
    json!({"delivered": delivery.delivered, "dropped": delivery.dropped})
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DeviceSendQuery {
    listener: Option<String>,
    #[serde(default)]
    queue: bool,
    ttl_seconds: Option<u64>,
}

#[tracing::instrument(name = "send_to_device", skip_all, fields(device = %LogSafe(&device_id)))]
async fn send_to_device(
    state: web::Data<AppState>,
    sender: MessageSender,
    device_id: web::Path<String>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let query: DeviceSendQuery = parse_query(&request)?;
    let ttl = match query.ttl_seconds {
        Some(_) if !query.queue => {
            return Err(ApiError::BadRequest(
                "ttlSeconds applies to queued messages: add queue=true".into(),
            ))
        }
        Some(seconds) if seconds == 0 || seconds > MAX_TTL.as_secs() => {
            return Err(ApiError::BadRequest(format!(
                "ttlSeconds is between 1 and {}",
                MAX_TTL.as_secs()
            )))
        }
        Some(seconds) => Duration::from_secs(seconds),
        None => DEFAULT_TTL,
    };
    if state.pipeline.registry.get(&device_id).is_none() {
        return Err(ApiError::NotFound(format!(
            "device {} not found",
            LogSafe(&device_id)
        )));
    }
    if let Some(listener) = &query.listener {
        require_listener(&state, listener).await?;
    }
    let body = read_message(&request, payload).await?;
    let target = RemoteTarget::Device {
        device: device_id.to_string(),
        listener: query.listener.clone(),
    };
    let delivery = deliver(&state, &target, body.clone()).await;
    let audit = |details: Value| {
        AuditEvent::by(&sender, "device.message")
            .target("device", &device_id)
            .details(details)
    };
    if delivery.delivered > 0 || delivery.dropped > 0 {
        state
            .audit
            .record(audit(json!({"listener": query.listener, "delivered": delivery.delivered, "dropped": delivery.dropped})))
            .await;
        return Ok(HttpResponse::Accepted().json(delivered(delivery)));
    }
    if !query.queue {
        return Err(ApiError::ConflictWith {
            code: "device_offline",
            message: format!(
                "device {} has no open connection{}; send with queue=true&ttlSeconds=N to keep the message for its next connection",
                LogSafe(&device_id),
                query.listener.as_deref().map(|l| format!(" on listener {}", LogSafe(l))).unwrap_or_default()
            ),
        });
    }
    match state
        .outbox
        .queue(&device_id, query.listener.as_deref(), &body, ttl)
        .await?
    {
        Queued::Kept { id, expires_at } => {
            state
                .audit
                .record(audit(json!({"listener": query.listener, "delivered": 0, "queued": true, "expiresAt": expires_at})))
                .await;
            Ok(HttpResponse::Accepted().json(json!({
                "delivered": 0,
                "dropped": 0,
                "queued": true,
                "messageId": id,
                "expiresAt": expires_at,
            })))
        }
        Queued::Full => Err(ApiError::ConflictWith {
            code: "device_queue_full",
            message: format!(
                "device {} already has {} messages waiting for its next connection; wait for it to connect or for them to expire",
                LogSafe(&device_id),
                iotgate_pipeline::outbox::MAX_QUEUED_PER_DEVICE
            ),
        }),
    }
}

#[tracing::instrument(name = "send_to_listener", skip_all, fields(listener = %LogSafe(&key)))]
async fn send_to_listener(
    state: web::Data<AppState>,
    sender: MessageSender,
    key: web::Path<String>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    require_listener(&state, &key).await?;
    let body = read_message(&request, payload).await?;
    let target = RemoteTarget::Listener {
        listener: key.to_string(),
    };
    let delivery = deliver(&state, &target, body).await;
    state
        .audit
        .record(
            AuditEvent::by(&sender, "listener.message")
                .target("listener", &key)
                .details(delivered(delivery)),
        )
        .await;
    Ok(HttpResponse::Accepted().json(delivered(delivery)))
}

#[tracing::instrument(name = "send_to_group", skip_all, fields(listener = %LogSafe(&path.0), group = %LogSafe(&path.1)))]
async fn send_to_group(
    state: web::Data<AppState>,
    sender: MessageSender,
    path: web::Path<(String, String)>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (key, group) = path.into_inner();
    require_listener(&state, &key).await?;
    let body = read_message(&request, payload).await?;
    let target = RemoteTarget::Group {
        listener: key.clone(),
        group: group.clone(),
    };
    let delivery = deliver(&state, &target, body).await;
    let mut details = delivered(delivery);
    details["group"] = json!(group);
    state
        .audit
        .record(
            AuditEvent::by(&sender, "group.message")
                .target("listener", &key)
                .details(details),
        )
        .await;
    Ok(HttpResponse::Accepted().json(delivered(delivery)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    limit: Option<usize>,
}

/// This node's recent presence events of a device, newest first.
async fn device_events(
    state: web::Data<AppState>,
    _: Viewer,
    device_id: web::Path<String>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query: EventsQuery = parse_query(&request)?;
    if state.pipeline.registry.get(&device_id).is_none() {
        return Err(ApiError::NotFound(format!(
            "device {} not found",
            LogSafe(&device_id)
        )));
    }
    if query.limit == Some(0) {
        return Err(ApiError::BadRequest(
            "limit must be at least 1 (values above 500 are taken as 500)".into(),
        ));
    }
    let limit = query.limit.unwrap_or(100).min(MAX_EVENTS);
    let items: Vec<Value> = state
        .pipeline
        .presence
        .recent(&device_id, limit)
        .iter()
        .map(|event| event.to_json())
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "items": items })))
}

/// A device's open connections, as the device resource shows them: this node's and, with a bus,
/// every other live node's (each names its `node`).
pub async fn connections_view(state: &AppState, device_id: &str) -> Value {
    let own = state.store.node_id();
    let mut connections: Vec<Value> = state
        .pipeline
        .connections
        .device_connections(device_id)
        .iter()
        .map(|c| {
            let mut view = c.to_json();
            view["node"] = json!(own);
            view
        })
        .collect();
    if let Some(bus) = &state.bus {
        connections.extend(
            bus.device_connections(device_id, other_nodes(state).await, NODE_ANSWER_WAIT)
                .await,
        );
    }
    json!({"online": !connections.is_empty(), "connections": connections})
}

/// The devices with an open connection on this node and, with a bus, on every other live node.
pub async fn online_devices(state: &AppState) -> std::collections::HashSet<String> {
    let mut online: std::collections::HashSet<String> = state
        .pipeline
        .connections
        .online_devices()
        .iter()
        .map(|d| d.to_string())
        .collect();
    if let Some(bus) = &state.bus {
        online.extend(
            bus.online_devices(other_nodes(state).await, NODE_ANSWER_WAIT)
                .await,
        );
    }
    online
}
