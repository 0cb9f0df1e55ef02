//! CRUD of listeners, sentinels, routes and downstreams, and listener status. Everyone signed in
//! reads; only admins change definitions. Every change is in the audit log with its diff (header
//! values redacted).

use actix_web::{web, HttpResponse};
use iotgate_core::DefinitionKind;
use serde_json::{json, Value};

use super::AppState;
use crate::audit::{diff, AuditEvent};
use crate::auth::{Admin, Viewer};
use crate::error::{parse_json, ApiError};
use crate::sealing::redacted_headers;

pub fn configure(config: &mut web::ServiceConfig) {
    for kind in DefinitionKind::ALL {
        let collection = format!("/{}", kind.collection());
        let item = format!("/{}/{{key}}", kind.collection());
        config
            .service(
                web::resource(collection)
                    .app_data(web::Data::new(kind))
                    .route(web::get().to(list))
                    .route(web::post().to(create)),
            )
            .service(
                web::resource(item)
                    .app_data(web::Data::new(kind))
                    .route(web::get().to(get))
                    .route(web::put().to(update))
                    .route(web::delete().to(delete)),
            );
    }
    config
        .route("/listeners/{key}/status", web::get().to(listener_status))
        .route(
            "/downstreams/{key}/status",
            web::get().to(downstream_status),
        )
        .route("/downstreams/{key}/test", web::post().to(test_downstream))
        .route("/status/listeners", web::get().to(all_listener_statuses));
}

/// Audit redaction of a definition field: header values are secrets.
fn redact(field: &str, value: &Value) -> Value {
    if field == "headers" {
        redacted_headers(value)
    } else if crate::sealing::SEALED_FIELDS.contains(&field) && value.is_string() {
        Value::String(crate::sealing::REDACTED.to_owned())
    } else {
        value.clone()
    }
}

async fn list(
    state: web::Data<AppState>,
    _: Viewer,
    kind: web::Data<DefinitionKind>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.supervisor.list(**kind).await))
}

async fn create(
    state: web::Data<AppState>,
    admin: Admin,
    kind: web::Data<DefinitionKind>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let document = parse_json(&body)?;
    let change = state.supervisor.create(**kind, document).await?;
    let created = change.view();
    let key = created
        .get("key")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_owned();
    state
        .audit
        .record(
            AuditEvent::by(&admin, "definition.create")
                .target(kind.schema_name(), &key)
                .details(diff(&json!({}), &change.after, redact)),
        )
        .await;
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/v1/{}/{key}", kind.collection())))
        .json(created))
}

async fn get(
    state: web::Data<AppState>,
    _: Viewer,
    kind: web::Data<DefinitionKind>,
    key: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.supervisor.get(**kind, &key).await?))
}

async fn update(
    state: web::Data<AppState>,
    admin: Admin,
    kind: web::Data<DefinitionKind>,
    key: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let document = parse_json(&body)?;
    let change = state.supervisor.update(**kind, &key, document).await?;
    let mut details = diff(
        change.before.as_ref().unwrap_or(&json!({})),
        &change.after,
        redact,
    );
    if body_sets_password(&body) {
        details["password"] = json!("changed");
    }
    state
        .audit
        .record(
            AuditEvent::by(&admin, "definition.update")
                .target(kind.schema_name(), &key)
                .details(details),
        )
        .await;
    Ok(HttpResponse::Ok().json(change.view()))
}

/// A listener password is write-only and never in the stored document, so the diff cannot show
/// it; the audit says that it was set, never what to.
fn body_sets_password(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .is_some_and(|v| v.get("password").is_some())
}

async fn delete(
    state: web::Data<AppState>,
    admin: Admin,
    kind: web::Data<DefinitionKind>,
    key: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let before = state.supervisor.delete(**kind, &key).await?;
    state
        .audit
        .record(
            AuditEvent::by(&admin, "definition.delete")
                .target(kind.schema_name(), &key)
                .details(diff(&before, &json!({}), redact)),
        )
        .await;
    Ok(HttpResponse::NoContent().finish())
}

async fn listener_status(
    state: web::Data<AppState>,
    _: Viewer,
    key: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    // A stored listener always has a status; an unknown key is 404.
    state.supervisor.get(DefinitionKind::Listener, &key).await?;
    let status = state
        .supervisor
        .listener_status(&key)
        .ok_or_else(|| ApiError::NotFound(format!("listener {key} has no status yet")))?;
    Ok(HttpResponse::Ok().json(status))
}

/// This node's listener statuses, each with `nodes`: which live nodes sharing the database run
/// that listener and in which state (this node's entry is live, the others' are from their last
/// heartbeat, at most 5 s old).
async fn all_listener_statuses(
    state: web::Data<AppState>,
    _: Viewer,
) -> Result<HttpResponse, ApiError> {
    let own = state.store.node_id().to_owned();
    let local = state.supervisor.listener_statuses();
    let since = crate::cluster::timestamp_ago(crate::cluster::NODE_TIMEOUT);
    // Other nodes' statuses are extra: without the database, this node's own still answer.
    let others: Vec<(iotgate_store::NodeRecord, Vec<serde_json::Value>)> = state
        .store
        .live_nodes(&since)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|node| node.node_id != own)
        .map(|node| {
            let listeners = serde_json::from_str(&node.listeners).unwrap_or_default();
            (node, listeners)
        })
        .collect();
    let items: Vec<serde_json::Value> = local
        .iter()
        .map(|status| {
            let mut item = serde_json::to_value(status).unwrap_or_default();
            let mut nodes = vec![serde_json::json!({
                "nodeId": own,
                "self": true,
                "state": item["state"],
                "connections": item["connections"],
                "lastError": item["lastError"],
            })];
            for (node, listeners) in &others {
                if let Some(theirs) = listeners.iter().find(|l| l["key"] == item["key"]) {
                    nodes.push(serde_json::json!({
                        "nodeId": node.node_id,
                        "address": node.address,
                        "self": false,
                        "state": theirs["state"],
                        "connections": theirs["connections"],
                        "lastError": theirs["lastError"],
                    }));
                }
            }
            item["nodes"] = serde_json::Value::Array(nodes);
            item
        })
        .collect();
    Ok(HttpResponse::Ok().json(items))
}

/// The connection of a downstream that connects out (nats, mqtt, websocket-client).
async fn downstream_status(
    state: web::Data<AppState>,
    _: Viewer,
    key: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    match state.supervisor.downstream_status(&key).await? {
        Some(status) => Ok(HttpResponse::Ok().json(status)),
        None => Err(ApiError::NotFound(format!(
            "downstream {key} has no connection status (it does not connect out, or it is disabled)"
        ))),
    }
}

/// Tries the connection of a stored downstream once: connect, authenticate, publish a probe.
/// Answers 200 with what happened, whether or not it worked.
async fn test_downstream(
    state: web::Data<AppState>,
    _: Admin,
    key: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    match state.supervisor.probe_downstream(&key).await? {
        Some(report) => Ok(HttpResponse::Ok().json(report)),
        None => Err(ApiError::Validation(vec![iotgate_core::Problem::new(
            "/type",
            "only nats, mqtt and websocket-client downstreams have a connection to test",
        )])),
    }
}
