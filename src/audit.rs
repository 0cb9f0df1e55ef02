//! The audit log: who changed what, when, from where; logins and failed logins; API token use;
//! device authentication failures. Written to the `audit_log` table, read newest first through
//! `GET /api/v1/audit`, purged past the retention (`--audit-retention-days`).
//!
//! What can be flooded by someone without credentials is summarized instead of written row by
//! row, so the log cannot be used to fill the disk or to bury the changes it exists to show:
//! - device authentication failures: one row per (listener, device, address) per minute with
//!   counts by reason (from [`AuthFailureTally`]);
//! - failed logins: the first [`FAILED_LOGIN_ROWS_PER_MINUTE`] of a minute get a row each, the
//!   rest one summary row per (user, address);
//! - API token use: one row per token per minute with the number of requests.
//!
//! Diffs never carry a secret: passwords are not stored in documents at all, and header values
//! (sealed at rest) show as `<redacted>`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use iotgate_core::envelope::format_timestamp;
use iotgate_pipeline::AuthFailureTally;
use iotgate_store::{AuditQuery, AuditRow, Store, StoreError};
use serde_json::{json, Map, Value};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::auth::{AdminAuth, Principal};

/// Failed logins written one row each per minute; the rest are summarized.
pub const FAILED_LOGIN_ROWS_PER_MINUTE: u32 = 100;
/// How often summaries are written.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
/// How often rows past the retention are deleted.
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// Success or failure of what was attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// One thing to write down.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    action: &'static str,
    outcome: Outcome,
    actor: Option<String>,
    credential: Option<String>,
    address: Option<String>,
    target_kind: Option<String>,
    target_key: Option<String>,
    details: Value,
}

impl AuditEvent {
    pub fn new(action: &'static str) -> Self {
        Self {
            action,
            outcome: Outcome::Success,
            actor: None,
            credential: None,
            address: None,
            target_kind: None,
            target_key: None,
            details: json!({}),
        }
    }

    /// An action by a signed-in user, with their credential and address.
    pub fn by(principal: &Principal, action: &'static str) -> Self {
        let mut event = Self::new(action);
        event.actor = Some(principal.user_name.clone());
        event.credential = Some(principal.kind.audit_name());
        event.address = principal.address();
        event
    }

    pub fn actor(mut self, actor: &str) -> Self {
        self.actor = Some(actor.chars().take(128).collect());
        self
    }

    pub fn credential(mut self, credential: &str) -> Self {
        self.credential = Some(credential.to_owned());
        self
    }

    pub fn address(mut self, address: Option<IpAddr>) -> Self {
        self.address = address.map(|a| a.to_string());
        self
    }

    pub fn target(mut self, kind: &str, key: &str) -> Self {
        self.target_kind = Some(kind.to_owned());
        self.target_key = Some(key.chars().take(200).collect());
        self
    }

    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    pub fn failed(mut self) -> Self {
        self.outcome = Outcome::Failure;
        self
    }

    fn into_row(self, at: OffsetDateTime) -> AuditRow {
        AuditRow {
            id: uuid::Uuid::now_v7().to_string(),
            occurred_at: format_timestamp(at),
            actor: self.actor,
            credential: self.credential,
            source_address: self.address,
            action: self.action.to_owned(),
            target_kind: self.target_kind,
            target_key: self.target_key,
            outcome: match self.outcome {
                Outcome::Success => "success",
                Outcome::Failure => "failure",
            }
            .to_owned(),
            details: self.details.to_string(),
        }
    }
}

#[derive(Debug, Default)]
struct FailedLogins {
    /// Rows written this minute.
    written: u32,
    /// Failures past the per-minute rows, by (user, address).
    summarized: BTreeMap<(String, Option<String>), u64>,
}

pub struct AuditLog {
    store: Store,
    failed_logins: Mutex<FailedLogins>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

/// An audit page: rows newest first and the cursor of the next page, if there is one.
#[derive(Debug)]
pub struct AuditPage {
    pub items: Vec<Value>,
    pub next_cursor: Option<String>,
}

/// Why an audit page could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuditQueryError {
    #[error("{0}")]
    BadParameter(String),
    #[error("audit storage failed")]
    Store(#[from] StoreError),
}

impl AuditLog {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            failed_logins: Mutex::new(FailedLogins::default()),
        }
    }

    /// Writes one event. An audit row that cannot be written is logged loudly; the change it
    /// describes has happened either way.
    pub async fn record(&self, event: AuditEvent) {
        let row = event.into_row(OffsetDateTime::now_utc());
        if let Err(error) = self.store.insert_audit(std::slice::from_ref(&row)).await {
            tracing::error!(error = %error, action = %row.action, "could not write an audit row");
        }
    }

    /// A failed login: a row of its own while this minute has room, else counted for the
    /// minute's summary.
    pub async fn record_failed_login(&self, user: &str, address: Option<IpAddr>, reason: &str) {
        let own_row = {
            let mut failed = self.failed_logins.lock().expect("failed logins lock");
            if failed.written < FAILED_LOGIN_ROWS_PER_MINUTE {
                failed.written += 1;
                true
            } else {
                *failed
                    .summarized
                    .entry((
                        user.chars().take(128).collect(),
                        address.map(|a| a.to_string()),
                    ))
                    .or_insert(0) += 1;
                false
            }
        };
        if own_row {
            self.record(
                AuditEvent::new("auth.login")
                    .actor(user)
                    .address(address)
                    .details(json!({"reason": reason}))
                    .failed(),
            )
            .await;
        }
    }

    /// Writes the summaries of the minute that passed: device authentication failures, failed
    /// logins past the per-minute rows, API token use (and the tokens' last use).
    pub async fn write_summaries(&self, device_failures: &AuthFailureTally, auth: &AdminAuth) {
        let now = OffsetDateTime::now_utc();
        let mut rows = Vec::new();
        for (key, counts) in device_failures.drain() {
            let mut event = AuditEvent::new("device.auth_failed")
                .target("device", key.device_id.as_deref().unwrap_or(""))
                .address(key.address)
                .details(json!({
                    "listener": &*key.listener,
                    "count": counts.total,
                    "reasons": counts.by_reason,
                    "period": "minute",
                }))
                .failed();
            if key.device_id.is_none() {
                event.target_key = None;
            }
            rows.push(event.into_row(now));
        }
        let summarized = {
            let mut failed = self.failed_logins.lock().expect("failed logins lock");
            failed.written = 0;
            std::mem::take(&mut failed.summarized)
        };
        for ((user, address), count) in summarized {
            let mut event = AuditEvent::new("auth.login")
                .actor(&user)
                .details(json!({"reason": "summary", "count": count, "period": "minute"}))
                .failed();
            event.address = address;
            rows.push(event.into_row(now));
        }
        let uses = auth.drain_token_uses();
        let mut touched = Vec::new();
        for token_use in uses {
            touched.push((
                token_use.id.clone(),
                format_timestamp(token_use.last_used_at),
            ));
            rows.push(
                AuditEvent::new("token.used")
                    .actor(&token_use.user_name)
                    .credential(&format!("token:{}", token_use.id))
                    .target("token", &token_use.id)
                    .details(json!({"name": token_use.name, "requests": token_use.count, "period": "minute"}))
                    .into_row(now),
            );
        }
        if let Err(error) = self.store.insert_audit(&rows).await {
            tracing::error!(error = %error, rows = rows.len(), "could not write audit summaries");
        }
        if let Err(error) = self.store.touch_api_tokens(&touched).await {
            tracing::warn!(error = %error, "could not record API token use");
        }
    }

    /// Deletes rows older than `retention` (`None`: keeps everything).
    pub async fn purge(&self, retention: Option<time::Duration>) {
        let Some(before) = retention.and_then(|r| OffsetDateTime::now_utc().checked_sub(r)) else {
            return;
        };
        let before = format_timestamp(before);
        match self.store.delete_audit_before(&before).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "audit rows past the retention deleted"),
            Err(error) => tracing::warn!(error = %error, "could not purge the audit log"),
        }
    }

    /// Writes summaries every minute and purges every hour until `stop`, then writes the last
    /// summaries. (The first purge is the caller's, at start-up, before the API answers.)
    pub fn spawn_maintenance(
        self: Arc<Self>,
        device_failures: Arc<AuthFailureTally>,
        auth: Arc<AdminAuth>,
        retention: Option<time::Duration>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut summaries = tokio::time::interval(SUMMARY_INTERVAL);
            summaries.tick().await;
            let mut purges = tokio::time::interval(PURGE_INTERVAL);
            purges.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = summaries.tick() => self.write_summaries(&device_failures, &auth).await,
                    _ = purges.tick() => self.purge(retention).await,
                }
            }
            self.write_summaries(&device_failures, &auth).await;
        })
    }

    /// One page, newest first. `from` / `to` are RFC 3339; `cursor` is the `nextCursor` of the
    /// page before.
    pub async fn page(
        &self,
        from: Option<&str>,
        to: Option<&str>,
        actor: Option<&str>,
        action: Option<&str>,
        limit: i64,
        cursor: Option<&str>,
    ) -> Result<AuditPage, AuditQueryError> {
        let instant = |name: &str, text: Option<&str>| -> Result<Option<String>, AuditQueryError> {
            text.map(|t| {
                OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .map(format_timestamp)
                    .map_err(|_| {
                        AuditQueryError::BadParameter(format!(
                            "{name} must be an RFC 3339 date-time such as 2026-11-22T10:00:00Z"
                        ))
                    })
            })
            .transpose()
        };
        let before = cursor
            .filter(|c| !c.is_empty())
            .map(decode_cursor)
            .transpose()?;
        let query = AuditQuery {
            from: instant("from", from)?,
            to: instant("to", to)?,
            actor: actor.filter(|a| !a.is_empty()).map(str::to_owned),
            action: action.filter(|a| !a.is_empty()).map(str::to_owned),
            before,
            limit: limit + 1,
        };
        let mut rows = self.store.query_audit(&query).await?;
        let more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let next_cursor = more.then(|| rows.last().map(encode_cursor)).flatten();
        Ok(AuditPage {
            items: rows.iter().map(view).collect(),
            next_cursor,
        })
    }
}

fn encode_cursor(row: &AuditRow) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{}|{}", row.occurred_at, row.id))
}

fn decode_cursor(cursor: &str) -> Result<(String, String), AuditQueryError> {
    let bad = || AuditQueryError::BadParameter("cursor is not one this server gave out".into());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (at, id) = text.split_once('|').ok_or_else(bad)?;
    Ok((at.to_owned(), id.to_owned()))
}

fn view(row: &AuditRow) -> Value {
    json!({
        "id": row.id,
        "occurredAt": row.occurred_at,
        "actor": row.actor,
        "credential": row.credential,
        "sourceAddress": row.source_address,
        "action": row.action,
        "targetKind": row.target_kind,
        "targetKey": row.target_key,
        "outcome": row.outcome,
        "details": serde_json::from_str::<Value>(&row.details).unwrap_or(Value::Null),
    })
}

/// What changed between two JSON objects, field by field: `{"field": {"from": .., "to": ..}}`,
/// with every value passed through `redact` first (changes are found on the raw values, so a
/// changed secret shows as changed, but never as itself).
pub fn diff(before: &Value, after: &Value, redact: impl Fn(&str, &Value) -> Value) -> Value {
    let empty = Map::new();
    let before = before.as_object().unwrap_or(&empty);
    let after = after.as_object().unwrap_or(&empty);
    let mut fields: Vec<&String> = before.keys().chain(after.keys()).collect();
    fields.sort();
    fields.dedup();
    let mut changes = Map::new();
    for field in fields {
        let old = before.get(field);
        let new = after.get(field);
        if old == new {
            continue;
        }
        let shown = |v: Option<&Value>| v.map_or(Value::Null, |v| redact(field, v));
        changes.insert(field.clone(), json!({"from": shown(old), "to": shown(new)}));
    }
    Value::Object(changes)
}

/// Redaction of nothing (for documents that hold no secret).
pub fn no_secrets(_: &str, value: &Value) -> Value {
    value.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_names_changed_fields_and_hides_secrets() {
        let before = json!({"key": "hook", "url": "http://a/", "headers": {"authorization": "sealed:v1:AAA"}});
        let after = json!({"key": "hook", "url": "http://b/", "headers": {"authorization": "sealed:v1:BBB"}, "enabled": false});
        let changes = diff(&before, &after, |field, value| {
            if field == "headers" {
                crate::sealing::redacted_headers(value)
            } else {
                value.clone()
            }
        });
        assert_eq!(
            changes["url"],
            json!({"from": "http://a/", "to": "http://b/"})
        );
        assert_eq!(changes["enabled"], json!({"from": null, "to": false}));
        assert_eq!(
            changes["headers"]["to"]["authorization"],
            crate::sealing::REDACTED
        );
        assert!(!changes.to_string().contains("BBB"));
        assert!(changes.get("key").is_none());
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let row = AuditRow {
            id: "0193".into(),
            occurred_at: "2026-11-22T10:00:00.000000Z".into(),
            actor: None,
            credential: None,
            source_address: None,
            action: "x".into(),
            target_kind: None,
            target_key: None,
            outcome: "success".into(),
            details: "{}".into(),
        };
        let cursor = encode_cursor(&row);
        assert_eq!(
            decode_cursor(&cursor).unwrap(),
            (row.occurred_at.clone(), row.id.clone())
        );
        assert!(decode_cursor("!!!").is_err());
    }
}
