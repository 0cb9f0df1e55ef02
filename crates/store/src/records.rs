//! Row types: plain data moved between the database and the layers above.

use serde_json::Value;

use crate::engine::Columns;
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
    pub(crate) fn from_row(row: &impl Columns) -> Result<Self, StoreError> {
        let document: String = row.col("document")?;
        Ok(Self {
            kind: row.col("kind")?,
            key: row.col("key")?,
            document: serde_json::from_str(&document)?,
            secret: row.col("secret")?,
            created_at: row.col("created_at")?,
            updated_at: row.col("updated_at")?,
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
    /// The keys sealed under the server secret (for shared-access signatures); absent for keys
    /// issued before sealing existed.
    pub primary_key_sealed: Option<String>,
    pub secondary_key_sealed: Option<String>,
    pub created_at: String,
    pub last_contact: Option<String>,
    pub message_count: i64,
}

fn digest(row: &impl Columns, column: &str) -> Result<[u8; 32], StoreError> {
    let bytes: Vec<u8> = row.col(column)?;
    bytes.try_into().map_err(|_| {
        StoreError::Database(sqlx::Error::Decode(
            format!("{column} is not a 32-byte digest").into(),
        ))
    })
}

impl DeviceRecord {
    pub(crate) fn from_row(row: &impl Columns) -> Result<Self, StoreError> {
        let properties: String = row.col("properties")?;
        Ok(Self {
            device_id: row.col("device_id")?,
            name: row.col("name")?,
            device_type: row.col("device_type")?,
            enabled: row.col("enabled")?,
            properties: serde_json::from_str(&properties)?,
            primary_key_digest: digest(row, "primary_key_digest")?,
            secondary_key_digest: digest(row, "secondary_key_digest")?,
            primary_key_sealed: row.col("primary_key_sealed")?,
            secondary_key_sealed: row.col("secondary_key_sealed")?,
            created_at: row.col("created_at")?,
            last_contact: row.col("last_contact")?,
            message_count: row.col("message_count")?,
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
    /// The id the device gave the message (acknowledging listeners), as text.
    pub message_id: Option<String>,
    /// False for messages from listeners without a sentinel (the device is only claimed).
    pub authenticated: bool,
    pub claimed_device_id: Option<String>,
    /// The envelope's message type (a Web PubSub event name, `$connected`, ...), when it has one.
    pub message_type: Option<String>,
    /// Insert only, never read back: when set (and `message_id` and `device_id` are too), a row of
    /// the same downstream, device and message id received at or after this time makes this one
    /// a duplicate, which is then not stored.
    pub duplicate_if_stored_since: Option<String>,
}

impl TelemetryRow {
    pub(crate) fn from_row(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.col("id")?,
            listener_key: row.col("listener_key")?,
            device_id: row.col("device_id")?,
            device_type: row.col("device_type")?,
            connection_id: row.col("connection_id")?,
            source_address: row.col("source_address")?,
            received_at: row.col("received_at")?,
            content_type: row.col("content_type")?,
            payload: row.col("payload")?,
            metadata: row.col("metadata")?,
            downstream_key: row.col("downstream_key")?,
            message_id: row.col("message_id")?,
            authenticated: row.col("authenticated")?,
            claimed_device_id: row.col("claimed_device_id")?,
            message_type: row.col("message_type")?,
            duplicate_if_stored_since: None,
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
    /// True when `payload` holds only the start of the serialized payload (a connection that
    /// never authenticated keeps at most 1 KiB), so it may not parse as JSON.
    pub payload_truncated: bool,
}

impl DeadLetterRow {
    pub(crate) fn from_row(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.col("id")?,
            listener_key: row.col("listener_key")?,
            device_id: row.col("device_id")?,
            module: row.col("module")?,
            reason: row.col("reason")?,
            message: row.col("message")?,
            received_at: row.col("received_at")?,
            content_type: row.col("content_type")?,
            payload: row.col("payload")?,
            payload_truncated: row.col("payload_truncated")?,
        })
    }
}
