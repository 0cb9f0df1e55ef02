//! Row types: plain data moved between the database and the layers above.

use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use crate::StoreError;

/// A stored definition document of any kind.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDefinition {
    pub kind: String,
    pub key: String,
    /// The document as submitted, minus write-only secrets.
    pub document: Value,
    /// The stored form of a write-only secret (Argon2id PHC string or sealed password).
    pub secret: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl StoredDefinition {
    pub(crate) fn from_row(row: &SqliteRow) -> Result<Self, StoreError> {
        let document: String = row.try_get("document")?;
        Ok(Self {
            kind: row.try_get("kind")?,
            key: row.try_get("key")?,
            document: serde_json::from_str(&document)?,
            secret: row.try_get("secret")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// A registered device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRecord {
    pub device_id: String,
    pub name: String,
    pub device_type: String,
    pub enabled: bool,
    pub properties: Value,
    pub primary_key_digest: [u8; 32],
    pub secondary_key_digest: [u8; 32],
    pub created_at: String,
    pub last_contact: Option<String>,
    pub message_count: i64,
}

fn digest(row: &SqliteRow, column: &str) -> Result<[u8; 32], StoreError> {
    let bytes: Vec<u8> = row.try_get(column)?;
    bytes.try_into().map_err(|_| {
        StoreError::Database(sqlx::Error::Decode(
            format!("{column} is not a 32-byte digest").into(),
        ))
    })
}

impl DeviceRecord {
    pub(crate) fn from_row(row: &SqliteRow) -> Result<Self, StoreError> {
        let properties: String = row.try_get("properties")?;
        Ok(Self {
            device_id: row.try_get("device_id")?,
            name: row.try_get("name")?,
            device_type: row.try_get("device_type")?,
            enabled: row.try_get("enabled")?,
            properties: serde_json::from_str(&properties)?,
            primary_key_digest: digest(row, "primary_key_digest")?,
            secondary_key_digest: digest(row, "secondary_key_digest")?,
            created_at: row.try_get("created_at")?,
            last_contact: row.try_get("last_contact")?,
            message_count: row.try_get("message_count")?,
        })
    }
}

/// Accumulated contact of one device since the last flush.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceContact {
    pub device_id: String,
    pub last_contact: String,
    pub messages: i64,
}

/// One row of the telemetry store.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryRow {
    pub id: String,
    pub listener_key: String,
    pub device_id: Option<String>,
    pub device_type: Option<String>,
    pub connection_id: i64,
    pub source_address: Option<String>,
    pub received_at: String,
    pub content_type: String,
    /// The payload as JSON text (string for text, base64 string for binary).
    pub payload: String,
    pub metadata: String,
    pub downstream_key: String,
}

impl TelemetryRow {
    pub(crate) fn from_row(row: &SqliteRow) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.try_get("id")?,
            listener_key: row.try_get("listener_key")?,
            device_id: row.try_get("device_id")?,
            device_type: row.try_get("device_type")?,
            connection_id: row.try_get("connection_id")?,
            source_address: row.try_get("source_address")?,
            received_at: row.try_get("received_at")?,
            content_type: row.try_get("content_type")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
            downstream_key: row.try_get("downstream_key")?,
        })
    }
}

/// One dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterRow {
    pub id: String,
    pub listener_key: Option<String>,
    pub device_id: Option<String>,
    /// The module that gave up on it (sentinel key, router, downstream key).
    pub module: String,
    /// Machine-readable reason code, e.g. `invalid_key`, `unrouted`, `webhook_failed`.
    pub reason: String,
    /// Human-readable explanation.
    pub message: String,
    pub received_at: String,
    pub content_type: Option<String>,
    /// The payload as JSON text, with credentials removed; absent when it could not be kept.
    pub payload: Option<String>,
}

impl DeadLetterRow {
    pub(crate) fn from_row(row: &SqliteRow) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.try_get("id")?,
            listener_key: row.try_get("listener_key")?,
            device_id: row.try_get("device_id")?,
            module: row.try_get("module")?,
            reason: row.try_get("reason")?,
            message: row.try_get("message")?,
            received_at: row.try_get("received_at")?,
            content_type: row.try_get("content_type")?,
            payload: row.try_get("payload")?,
        })
    }
}
