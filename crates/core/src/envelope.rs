//! The [`Envelope`]: one device message in flight, from the listener that received it to every
//! downstream module it is delivered to. Envelopes are shared (`Arc<Envelope>`) once routed, so a
//! fan-out to several downstreams never copies the payload.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

/// How a listener decodes each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentType {
    Json,
    Text,
    Binary,
}

impl ContentType {
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Json => "json",
            ContentType::Text => "text",
            ContentType::Binary => "binary",
        }
    }
}

/// The decoded message body.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Json(Value),
    Text(String),
    Binary(Bytes),
}

impl Payload {
    /// The payload as JSON: itself for json, a string for text, base64 for binary.
    pub fn to_json(&self) -> Value {
        match self {
            Payload::Json(v) => v.clone(),
            Payload::Text(s) => Value::String(s.clone()),
            Payload::Binary(b) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
        }
    }

    pub fn as_json(&self) -> Option<&Value> {
        match self {
            Payload::Json(v) => Some(v),
            _ => None,
        }
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Payload::Json(v) => v.serialize(serializer),
            Payload::Text(s) => serializer.serialize_str(s),
            Payload::Binary(b) => {
                serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
            }
        }
    }
}

/// Per-connection facts every envelope of that connection carries (shared, built once at
/// connect time).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionMetadata(pub BTreeMap<String, String>);

/// One message in flight.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Time-ordered unique id (UUID v7), also the telemetry row id.
    pub id: Uuid,
    /// The listener that received it.
    pub listener_key: Arc<str>,
    /// Process-unique id of the device connection, to correlate messages and logs.
    pub connection_id: u64,
    /// The peer address of the connection.
    pub source_address: Option<SocketAddr>,
    /// Wall-clock receive time, stored and shown.
    pub received_at: OffsetDateTime,
    /// Monotonic receive time, for the pipeline latency histogram.
    pub received_instant: Instant,
    pub content_type: ContentType,
    /// Size of the message as received, in bytes.
    pub size: usize,
    /// The decoded body; for json with body credentials, the access key is already removed.
    pub payload: Payload,
    /// The device, once identified by the sentinel (or by the message on a Basic listener).
    pub device_id: Option<Arc<str>>,
    /// The device's type from the registry, for route selection.
    pub device_type: Option<Arc<str>>,
    /// True once the sentinel (or the listener's Basic credentials) vouched for the message.
    pub authenticated: bool,
    /// Connection metadata (sub-protocol, listener mode, ...).
    pub metadata: Arc<ConnectionMetadata>,
}

impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(11))?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("listenerKey", &*self.listener_key)?;
        map.serialize_entry("connectionId", &self.connection_id)?;
        map.serialize_entry("sourceAddress", &self.source_address.map(|a| a.to_string()))?;
        map.serialize_entry("receivedAt", &format_timestamp(self.received_at))?;
        map.serialize_entry("contentType", &self.content_type)?;
        map.serialize_entry("deviceId", &self.device_id.as_deref())?;
        map.serialize_entry("deviceType", &self.device_type.as_deref())?;
        map.serialize_entry("authenticated", &self.authenticated)?;
        map.serialize_entry("payload", &self.payload)?;
        map.serialize_entry("metadata", &*self.metadata)?;
        map.end()
    }
}

/// RFC 3339 with microseconds, UTC: the one timestamp format of the API.
pub fn format_timestamp(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    at.format(&format).unwrap_or_else(|_| at.to_string())
}

/// Removes the value at a JSON pointer (used to strip credentials before routing). Returns true
/// when something was removed.
pub fn remove_at_pointer(value: &mut Value, pointer: &str) -> bool {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return false;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    let parent = if parent.is_empty() {
        Some(value)
    } else {
        value.pointer_mut(parent)
    };
    match parent {
        Some(Value::Object(map)) => map.remove(&last).is_some(),
        Some(Value::Array(items)) => match last.parse::<usize>() {
            Ok(index) if index < items.len() => {
                items.remove(index);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

/// A fresh envelope id for a message received at `received_at`: UUID v7 (time-ordered, from the
/// receive time the envelope carries anyway, so the clock is read once) with its random bits from
/// the thread-local RNG, which avoids a getrandom system call per message.
pub fn new_envelope_id(received_at: OffsetDateTime) -> Uuid {
    use rand::RngCore;
    let mut random = [0u8; 10];
    rand::thread_rng().fill_bytes(&mut random);
    let millis = received_at.unix_timestamp_nanos() / 1_000_000;
    uuid::Builder::from_unix_timestamp_millis(millis as u64, &random).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn removes_nested_credential() {
        let mut v = json!({"auth": {"key": "s3cret", "id": "d"}, "t": 1});
        assert!(remove_at_pointer(&mut v, "/auth/key"));
        assert_eq!(v, json!({"auth": {"id": "d"}, "t": 1}));
        assert!(!remove_at_pointer(&mut v, "/missing/key"));
    }

    #[test]
    fn binary_payload_serializes_as_base64() {
        let p = Payload::Binary(Bytes::from_static(&[1, 2, 3]));
        assert_eq!(serde_json::to_value(&p).unwrap(), json!("AQID"));
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_123_456_789).unwrap();
        assert_eq!(format_timestamp(at), "2023-11-14T22:13:20.123456Z");
    }
}
