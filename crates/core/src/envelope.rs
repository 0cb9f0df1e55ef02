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

use crate::message_id::MessageId;

/// How a listener decodes each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContentType {
    Json,
    Text,
    Binary,
    /// MessagePack in binary frames, decoded to the same value model as JSON.
    Msgpack,
}

impl ContentType {
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Json => "json",
            ContentType::Text => "text",
            ContentType::Binary => "binary",
            ContentType::Msgpack => "msgpack",
        }
    }

    /// True when messages decode to a JSON value, so body pointers apply (json, msgpack).
    pub fn is_structured(self) -> bool {
        matches!(self, ContentType::Json | ContentType::Msgpack)
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
    /// True once a sentinel authenticated the device that sent the message.
    pub authenticated: bool,
    /// The device a message names without a sentinel having authenticated it (listeners without
    /// a sentinel: their credentials vouch for the connection, not for the device).
    pub claimed_device_id: Option<Arc<str>>,
    /// Connection metadata (sub-protocol, listener mode, ...).
    pub metadata: Arc<ConnectionMetadata>,
    /// The id the device gave the message, on listeners that acknowledge (see [`MessageId`]).
    pub message_id: Option<MessageId>,
    /// How long the listener wants a repeat of this (device, message id) treated as a
    /// duplicate; `None` or zero: never. Not part of the serialized envelope.
    pub dedup_window: Option<std::time::Duration>,
    /// The message's own properties besides `payload`, on listeners in Node-RED's whole-message
    /// mode (`topic`, `_msgid`, ...). Serialized inside `metadata`.
    pub attributes: Option<Box<serde_json::Map<String, Value>>>,
    /// What kind of message this is when the protocol says so rather than the payload: a Web
    /// PubSub `event` name, or `$connected`/`$disconnected` for presence events. Routes select
    /// on it with a `messageType` selector that has no `pointer`.
    pub message_type: Option<Arc<str>>,
}

/// The envelope's `metadata`: the connection's facts, the receive time as ArkFlow names it
/// (`__meta_ingest_time`), and the message's own attributes (whole-message mode).
pub struct EnvelopeMetadata<'a>(pub &'a Envelope);

impl Serialize for EnvelopeMetadata<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let envelope = self.0;
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in &envelope.metadata.0 {
            map.serialize_entry(key, value)?;
        }
        map.serialize_entry(
            "__meta_ingest_time",
            &format_timestamp(envelope.received_at),
        )?;
        if let Some(attributes) = &envelope.attributes {
            for (key, value) in attributes.iter() {
                // The connection's facts cannot be overwritten by what a message says.
                if !envelope.metadata.0.contains_key(key) && key != "__meta_ingest_time" {
                    map.serialize_entry(key, value)?;
                }
            }
        }
        map.end()
    }
}

impl Envelope {
    /// The whole-message form Node-RED's websocket nodes use: the message's own properties
    /// (whole-message listeners) and `payload`, with `_msgid` (the envelope id unless the message
    /// had one) and `topic` (the device unless the message had one).
    pub fn node_red_message(&self) -> Value {
        let mut message = self.attributes.as_deref().cloned().unwrap_or_default();
        message.insert("payload".to_owned(), self.payload.to_json());
        message
            .entry("_msgid")
            .or_insert_with(|| Value::String(self.id.to_string()));
        if let Some(device) = self
            .device_id
            .as_deref()
            .or(self.claimed_device_id.as_deref())
        {
            message
                .entry("topic")
                .or_insert_with(|| Value::String(device.to_owned()));
        }
        Value::Object(message)
    }
}

impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("listenerKey", &*self.listener_key)?;
        map.serialize_entry("connectionId", &self.connection_id)?;
        map.serialize_entry("sourceAddress", &self.source_address.map(|a| a.to_string()))?;
        map.serialize_entry("receivedAt", &format_timestamp(self.received_at))?;
        map.serialize_entry("contentType", &self.content_type)?;
        map.serialize_entry("deviceId", &self.device_id.as_deref())?;
        map.serialize_entry("deviceType", &self.device_type.as_deref())?;
        map.serialize_entry("authenticated", &self.authenticated)?;
        if let Some(claimed) = &self.claimed_device_id {
            map.serialize_entry("claimedDeviceId", &**claimed)?;
        }
        map.serialize_entry("messageId", &self.message_id)?;
        if let Some(message_type) = &self.message_type {
            map.serialize_entry("messageType", &**message_type)?;
        }
        map.serialize_entry("payload", &self.payload)?;
        map.serialize_entry("metadata", &EnvelopeMetadata(self))?;
        map.end()
    }
}

/// RFC 3339 with microseconds, UTC: the one timestamp format of the API
/// (`2026-11-22T10:00:00.123456Z`). Written digit by digit: every envelope is stamped, and the
/// general formatter of the `time` crate cost more than the rest of the stamping together.
pub fn format_timestamp(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    let year = at.year();
    if !(0..=9999).contains(&year) {
        // Outside what four digits can hold: the general formatter knows what to do.
        return at.to_string();
    }
    let mut out = [0u8; 27];
    let mut put = |at: usize, value: u32, width: usize| {
        let mut value = value;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year as u32, 4);
    put(5, u32::from(u8::from(at.month())), 2);
    put(8, u32::from(at.day()), 2);
    put(11, u32::from(at.hour()), 2);
    put(14, u32::from(at.minute()), 2);
    put(17, u32::from(at.second()), 2);
    put(20, at.microsecond(), 6);
    out[4] = b'-';
    out[7] = b'-';
    out[10] = b'T';
    out[13] = b':';
    out[16] = b':';
    out[19] = b'.';
    out[26] = b'Z';
    String::from_utf8(out.to_vec()).expect("ASCII digits and separators")
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
        let early = OffsetDateTime::from_unix_timestamp(0).unwrap();
        assert_eq!(format_timestamp(early), "1970-01-01T00:00:00.000000Z");
        let offset = time::macros::datetime!(2026-01-02 03:04:05.000007 +02:00);
        assert_eq!(format_timestamp(offset), "2026-01-02T01:04:05.000007Z");
    }

    #[test]
    fn timestamps_match_the_general_formatter() {
        let format = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        for seconds in [
            0i64,
            951_782_400,
            1_709_210_096,
            4_102_444_799,
            253_402_300_799,
        ] {
            for micros in [0i64, 1, 999_999, 500_000] {
                let at = OffsetDateTime::from_unix_timestamp_nanos(
                    i128::from(seconds) * 1_000_000_000 + i128::from(micros) * 1000,
                )
                .unwrap();
                assert_eq!(format_timestamp(at), at.format(&format).unwrap());
            }
        }
    }
}
