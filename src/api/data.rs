//! Read side: telemetry, dead letters, schemas and the OpenAPI document.

use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt as _;
use iotgate_core::envelope::format_timestamp;
use iotgate_store::{TelemetryCursor, TelemetryQuery, TelemetryRow};
use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{parse_query, AppState};
use crate::auth::Viewer;
use crate::error::ApiError;

/// The OpenAPI document of this API, kept in `docs/openapi.json`.
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/telemetry", web::get().to(telemetry))
        .route("/telemetry/export", web::get().to(export_telemetry))
        .route("/deadletters", web::get().to(dead_letters))
        .route("/nodes", web::get().to(nodes))
        .route("/schemas/{kind}", web::get().to(schema))
        .route("/openapi.json", web::get().to(openapi));
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TelemetryParams {
    device_id: Option<String>,
    listener: Option<String>,
    /// RFC 3339; rows received at or after it.
    from: Option<String>,
    /// RFC 3339; rows received before it.
    to: Option<String>,
    limit: Option<i64>,
    /// `nextCursor` of the previous page.
    cursor: Option<String>,
    /// Export only: `ndjson` (default) or `csv`.
    format: Option<String>,
}

impl TelemetryParams {
    /// The store query these parameters ask for (without a limit).
    fn query(&self) -> Result<TelemetryQuery, ApiError> {
        let non_empty = |value: &Option<String>| value.clone().filter(|s| !s.is_empty());
        // An empty from/to is refused like any other text that is not a time: the OpenAPI
        // document declares them date-time, and silently reading `to=` as "no bound" hid typos.
        let instant = |name: &str, value: &Option<String>| -> Result<Option<String>, ApiError> {
            value
                .clone()
                .map(|text| {
                    OffsetDateTime::parse(&text, &Rfc3339)
                        .map(format_timestamp)
                        .map_err(|_| {
                            ApiError::BadRequest(format!(
                                "{name} is not an RFC 3339 time (like 2026-11-30T12:00:00Z)"
                            ))
                        })
                })
                .transpose()
        };
        let before = match non_empty(&self.cursor) {
            None => None,
            Some(text) => Some(TelemetryCursor::decode(&text).ok_or_else(|| {
                ApiError::BadRequest(
                    "cursor is not a nextCursor this API returned; start again without it".into(),
                )
            })?),
        };
        Ok(TelemetryQuery {
            device_id: non_empty(&self.device_id),
            listener_key: non_empty(&self.listener),
            from: instant("from", &self.from)?,
            to: instant("to", &self.to)?,
            before,
            limit: 0,
        })
    }
}

fn parse_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn telemetry_item(row: &TelemetryRow) -> Value {
    let mut item = json!({
        "id": row.id,
        "listenerKey": row.listener_key,
        "connectionId": row.connection_id,
        "sourceAddress": row.source_address,
        "receivedAt": row.received_at,
        "contentType": row.content_type,
        "deviceId": row.device_id,
        "deviceType": row.device_type,
        "authenticated": row.authenticated,
        "messageId": row.message_id,
        "messageType": row.message_type,
        "payload": parse_text(&row.payload),
        "metadata": parse_text(&row.metadata),
        "downstream": row.downstream_key,
    });
    if let Some(claimed) = &row.claimed_device_id {
        item["claimedDeviceId"] = json!(claimed);
    }
    item
}

fn cursor_after(row: &TelemetryRow) -> TelemetryCursor {
    TelemetryCursor {
        received_at: row.received_at.clone(),
        id: row.id.clone(),
    }
}

/// One page, newest first. `nextCursor` is set when older rows exist; rows stored while a client
/// pages are newer than its cursor, so they never shift or repeat a page.
async fn telemetry(
    state: web::Data<AppState>,
    _: Viewer,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let params: TelemetryParams = parse_query(&request)?;
    let limit = params.limit.unwrap_or(100).clamp(1, 1000);
    let mut query = params.query()?;
    // One row more than asked tells whether another page exists.
    query.limit = limit + 1;
    let mut rows = state.store.telemetry_page(&query).await?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|row| cursor_after(row).encode())
    } else {
        None
    };
    let items: Vec<Value> = rows.iter().map(telemetry_item).collect();
    Ok(HttpResponse::Ok().json(json!({"items": items, "nextCursor": next_cursor})))
}

/// Rows per database round trip of an export: the memory an export holds at a time.
const EXPORT_PAGE: i64 = 1000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum ExportFormat {
    Ndjson,
    Csv,
}

const CSV_HEADER: &str = "id,receivedAt,listenerKey,deviceId,deviceType,authenticated,claimedDeviceId,messageId,messageType,contentType,connectionId,sourceAddress,downstream,payload,metadata\r\n";

/// A CSV field (RFC 4180): quoted when it holds a comma, quote or line break.
fn csv_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

fn csv_line(out: &mut String, row: &TelemetryRow) {
    let connection_id = row.connection_id.to_string();
    let fields: [&str; 15] = [
        &row.id,
        &row.received_at,
        &row.listener_key,
        row.device_id.as_deref().unwrap_or(""),
        row.device_type.as_deref().unwrap_or(""),
        if row.authenticated { "true" } else { "false" },
        row.claimed_device_id.as_deref().unwrap_or(""),
        row.message_id.as_deref().unwrap_or(""),
        row.message_type.as_deref().unwrap_or(""),
        &row.content_type,
        &connection_id,
        row.source_address.as_deref().unwrap_or(""),
        &row.downstream_key,
        &row.payload,
        &row.metadata,
    ];
    for (index, field) in fields.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        csv_field(out, field);
    }
    out.push_str("\r\n");
}

/// Every row the filters select, newest first, as NDJSON (one item per line, as in the page
/// answer) or CSV. Streamed page by page with the same keyset as the pages, so the answer is
/// never held in memory whatever its size.
async fn export_telemetry(
    state: web::Data<AppState>,
    _: Viewer,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let params: TelemetryParams = parse_query(&request)?;
    let format = match params.format.as_deref().unwrap_or("ndjson") {
        "ndjson" => ExportFormat::Ndjson,
        "csv" => ExportFormat::Csv,
        other => {
            return Err(ApiError::BadRequest(format!(
                "format is ndjson or csv, not {}",
                iotgate_core::log_safe::LogSafe(other)
            )))
        }
    };
    let mut query = params.query()?;
    query.limit = EXPORT_PAGE;
    // The first page is read before the answer starts, so a database error is a proper status.
    let first = state.store.telemetry_page(&query).await?;
    let store = state.store.clone();
    let header = (format == ExportFormat::Csv).then(|| Bytes::from_static(CSV_HEADER.as_bytes()));
    let pages = futures_util::stream::unfold(
        (Some(first), query, store),
        move |(page, mut query, store)| async move {
            let rows = match page {
                Some(rows) => rows,
                None => {
                    // The previous page was the last one.
                    query.before.as_ref()?;
                    match store.telemetry_page(&query).await {
                        Ok(rows) => rows,
                        Err(error) => {
                            tracing::warn!(error = %error, "telemetry export ended early");
                            let error = std::io::Error::other(error.to_string());
                            // Cut the answer short: the client sees an incomplete body.
                            query.before = None;
                            return Some((Err(error), (None, query, store)));
                        }
                    }
                }
            };
            if rows.is_empty() {
                return None;
            }
            let full = rows.len() as i64 == query.limit;
            query.before = full.then(|| rows.last().map(cursor_after)).flatten();
            let mut out = String::with_capacity(rows.len() * 256);
            for row in &rows {
                match format {
                    ExportFormat::Ndjson => {
                        out.push_str(&telemetry_item(row).to_string());
                        out.push('\n');
                    }
                    ExportFormat::Csv => csv_line(&mut out, row),
                }
            }
            Some((Ok(Bytes::from(out)), (None, query, store)))
        },
    );
    let body = futures_util::stream::iter(header.map(Ok)).chain(pages);
    let (content_type, file) = match format {
        ExportFormat::Ndjson => ("application/x-ndjson", "telemetry.ndjson"),
        ExportFormat::Csv => ("text/csv; charset=utf-8", "telemetry.csv"),
    };
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((
            "Content-Disposition",
            format!("attachment; filename=\"{file}\""),
        ))
        .streaming(body))
}

/// The nodes sharing this database that wrote a heartbeat within the node timeout.
async fn nodes(state: web::Data<AppState>, _: Viewer) -> Result<HttpResponse, ApiError> {
    let since = crate::cluster::timestamp_ago(crate::cluster::NODE_TIMEOUT);
    let own = state.store.node_id().to_owned();
    let items: Vec<Value> = state
        .store
        .live_nodes(&since)
        .await?
        .into_iter()
        .map(|node| {
            json!({
                "nodeId": node.node_id,
                "address": node.address,
                "startedAt": node.started_at,
                "lastSeen": node.last_seen,
                "self": node.node_id == own,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"items": items, "nodeId": own})))
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<i64>,
}

async fn dead_letters(
    state: web::Data<AppState>,
    _: Viewer,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query: LimitQuery = parse_query(&request)?;
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
                // A truncated payload is the start of its JSON text, kept as a string.
                "payload": if row.payload_truncated {
                    row.payload.clone().map(Value::String)
                } else {
                    row.payload.as_deref().map(parse_text)
                },
                "payloadTruncated": row.payload_truncated,
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"items": items})))
}

async fn schema(
    state: web::Data<AppState>,
    _: Viewer,
    kind: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state
        .schemas
        .document(&kind)
        .map(|document| HttpResponse::Ok().json(document))
        .ok_or_else(|| ApiError::NotFound(format!("no schema named {kind}")))
}

async fn openapi(_: Viewer) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI))
}
