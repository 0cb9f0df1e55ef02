//! The frames of the Azure Web PubSub client protocol (`json.webpubsub.azure.v1` and
//! `json.reliable.webpubsub.azure.v1`): what a client may send and what the server sends back
//! (which role permits which request is `iotgate_pipeline::token::permits`).
//!
//! Everything here is pure: parsing and frame building, unit-tested against
//! the frames the `@azure/web-pubsub-client` SDK writes and reads.

use std::sync::Arc;

use base64::Engine as _;
use iotgate_pipeline::{Downlink, DownlinkBody, DownlinkSource};
use serde::Deserialize;
use serde_json::{json, Value};

/// The sub-protocol names a client may offer.
pub const JSON_PROTOCOL: &str = "json.webpubsub.azure.v1";
pub const RELIABLE_JSON_PROTOCOL: &str = "json.reliable.webpubsub.azure.v1";

/// Which form of the protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// No Web PubSub sub-protocol offered: the client receives server messages as plain frames,
    /// and each frame it sends is an event named `message`.
    Simple,
    Json,
    /// Sequence ids on messages, `sequenceAck` from the client, resumable connections.
    ReliableJson,
}

impl Dialect {
    /// The dialect for the sub-protocols a client offered (the reliable one wins when both are).
    pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Self {
        let mut dialect = Dialect::Simple;
        for protocol in offered {
            if protocol == RELIABLE_JSON_PROTOCOL {
                return Dialect::ReliableJson;
            }
            if protocol == JSON_PROTOCOL {
                dialect = Dialect::Json;
            }
        }
        dialect
    }

    pub fn sub_protocol(self) -> Option<&'static str> {
        match self {
            Dialect::Simple => None,
            Dialect::Json => Some(JSON_PROTOCOL),
            Dialect::ReliableJson => Some(RELIABLE_JSON_PROTOCOL),
        }
    }

    pub fn is_reliable(self) -> bool {
        self == Dialect::ReliableJson
    }
}

/// How `data` is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    Json,
    Text,
    /// Base64 in the frame.
    Binary,
    /// Base64 in the frame, like binary (the bytes are not interpreted).
    Protobuf,
}

/// One frame a client sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum ClientFrame {
    JoinGroup {
        group: String,
        #[serde(default)]
        ack_id: Option<u64>,
    },
    LeaveGroup {
        group: String,
        #[serde(default)]
        ack_id: Option<u64>,
    },
    SendToGroup {
        group: String,
        #[serde(default)]
        ack_id: Option<u64>,
        #[serde(default)]
        no_echo: bool,
        data_type: DataType,
        data: Value,
    },
    Event {
        event: String,
        #[serde(default)]
        ack_id: Option<u64>,
        data_type: DataType,
        data: Value,
    },
    SequenceAck {
        sequence_id: u64,
    },
    Ping,
}

/// Why a client frame could not be understood; the connection is told and closed (1003).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a Web PubSub frame: {0}")]
    Malformed(String),
}

impl ClientFrame {
    pub fn parse(text: &str) -> Result<Self, FrameError> {
        serde_json::from_str(text).map_err(|e| FrameError::Malformed(e.to_string()))
    }

    /// The ack id the client asked an answer under, if any.
    pub fn ack_id(&self) -> Option<u64> {
        match self {
            ClientFrame::JoinGroup { ack_id, .. }
            | ClientFrame::LeaveGroup { ack_id, .. }
            | ClientFrame::SendToGroup { ack_id, .. }
            | ClientFrame::Event { ack_id, .. } => *ack_id,
            ClientFrame::SequenceAck { .. } | ClientFrame::Ping => None,
        }
    }

    /// The group a group request names.
    pub fn group(&self) -> Option<&str> {
        match self {
            ClientFrame::JoinGroup { group, .. }
            | ClientFrame::LeaveGroup { group, .. }
            | ClientFrame::SendToGroup { group, .. } => Some(group),
            _ => None,
        }
    }
}

/// Longest group name accepted (the service's limit).
pub const MAX_GROUP_NAME: usize = 1024;

/// A group name a client may use: 1–1024 characters, not in the reserved `webpubsub.` space.
pub fn valid_group_name(group: &str) -> bool {
    !group.is_empty() && group.chars().count() <= MAX_GROUP_NAME && !group.starts_with("webpubsub.")
}

/// The error names an `ack` carries (the SDK treats `Duplicate` as success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckError {
    Forbidden,
    Duplicate,
    InternalServerError,
    BadRequest,
}

impl AckError {
    fn name(self) -> &'static str {
        match self {
            AckError::Forbidden => "Forbidden",
            AckError::Duplicate => "Duplicate",
            AckError::InternalServerError => "InternalServerError",
            AckError::BadRequest => "BadRequest",
        }
    }
}

pub fn ack_ok(ack_id: u64) -> String {
    json!({"type": "ack", "ackId": ack_id, "success": true}).to_string()
}

pub fn ack_error(ack_id: u64, error: AckError, message: &str) -> String {
    json!({
        "type": "ack",
        "ackId": ack_id,
        "success": false,
        "error": {"name": error.name(), "message": message},
    })
    .to_string()
}

pub fn connected(user_id: &str, connection_id: &str, reconnection_token: Option<&str>) -> String {
    let mut frame = json!({
        "type": "system",
        "event": "connected",
        "userId": user_id,
        "connectionId": connection_id,
    });
    if let Some(token) = reconnection_token {
        frame["reconnectionToken"] = json!(token);
    }
    frame.to_string()
}

pub fn disconnected(message: &str) -> String {
    json!({"type": "system", "event": "disconnected", "message": message}).to_string()
}

pub fn pong() -> String {
    json!({"type": "pong"}).to_string()
}

/// The body of a client's `data`, as the pipeline and group members take it.
pub fn decode_data(data_type: DataType, data: Value) -> Result<DownlinkBody, String> {
    match (data_type, data) {
        (DataType::Json, value) => Ok(DownlinkBody::Json(value)),
        (DataType::Text, Value::String(text)) => Ok(DownlinkBody::Text(Arc::from(text))),
        (DataType::Text, _) => Err("dataType text needs data to be a string".into()),
        (DataType::Binary | DataType::Protobuf, Value::String(encoded)) => {
            base64::engine::general_purpose::STANDARD
                .decode(encoded.as_bytes())
                .map(|bytes| DownlinkBody::Binary(bytes.into()))
                .map_err(|e| format!("dataType binary needs base64 data: {e}"))
        }
        (DataType::Binary | DataType::Protobuf, _) => {
            Err("dataType binary needs data to be a base64 string".into())
        }
    }
}

/// A `message` frame for a message to the client; `sequence_id` on reliable connections.
pub fn message(downlink: &Downlink, sequence_id: Option<u64>) -> String {
    let (data_type, data) = match &downlink.body {
        DownlinkBody::Json(value) => ("json", value.clone()),
        DownlinkBody::Text(text) => ("text", Value::String(text.to_string())),
        DownlinkBody::Binary(bytes) => (
            "binary",
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    };
    let mut frame = match &downlink.source {
        DownlinkSource::Server => json!({"type": "message", "from": "server"}),
        DownlinkSource::Group { group, from_user } => {
            let mut frame = json!({"type": "message", "from": "group", "group": &**group});
            if let Some(user) = from_user {
                frame["fromUserId"] = json!(&**user);
            }
            frame
        }
    };
    frame["dataType"] = json!(data_type);
    frame["data"] = data;
    if let Some(id) = sequence_id {
        frame["sequenceId"] = json!(id);
    }
    frame.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frames_the_sdk_writes_parse() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"joinGroup","group":"g1","ackId":1}"#).unwrap(),
            ClientFrame::JoinGroup {
                group: "g1".into(),
                ack_id: Some(1)
            }
        );
        assert_eq!(
            ClientFrame::parse(
                r#"{"type":"sendToGroup","group":"g1","ackId":2,"dataType":"text","data":"hi","noEcho":true}"#
            )
            .unwrap(),
            ClientFrame::SendToGroup {
                group: "g1".into(),
                ack_id: Some(2),
                no_echo: true,
                data_type: DataType::Text,
                data: json!("hi")
            }
        );
        assert_eq!(
            ClientFrame::parse(
                r#"{"type":"event","event":"telemetry","dataType":"json","data":{"t":1}}"#
            )
            .unwrap(),
            ClientFrame::Event {
                event: "telemetry".into(),
                ack_id: None,
                data_type: DataType::Json,
                data: json!({"t": 1})
            }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"sequenceAck","sequenceId":7}"#).unwrap(),
            ClientFrame::SequenceAck { sequence_id: 7 }
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping
        );
        assert!(ClientFrame::parse(r#"{"type":"joinGroup"}"#).is_err());
        assert!(ClientFrame::parse(r#"{"type":"teleport"}"#).is_err());
        assert!(ClientFrame::parse("not json").is_err());
    }

    #[test]
    fn the_reliable_dialect_wins_and_no_offer_means_a_simple_client() {
        assert_eq!(
            Dialect::negotiate([JSON_PROTOCOL, RELIABLE_JSON_PROTOCOL]),
            Dialect::ReliableJson
        );
        assert_eq!(Dialect::negotiate([JSON_PROTOCOL]), Dialect::Json);
        assert_eq!(Dialect::negotiate(["mqtt"]), Dialect::Simple);
    }

    #[test]
    fn messages_carry_their_source_data_type_and_sequence() {
        let group = Downlink {
            body: DownlinkBody::Binary(bytes::Bytes::from_static(b"\x01\x02")),
            source: DownlinkSource::Group {
                group: "g".into(),
                from_user: Some("dev-1".into()),
            },
        };
        let frame: Value = serde_json::from_str(&message(&group, Some(3))).unwrap();
        assert_eq!(
            frame,
            json!({"type": "message", "from": "group", "group": "g", "fromUserId": "dev-1",
                   "dataType": "binary", "data": "AQI=", "sequenceId": 3})
        );
        let server = Downlink {
            body: DownlinkBody::Json(json!({"cmd": "reboot"})),
            source: DownlinkSource::Server,
        };
        let frame: Value = serde_json::from_str(&message(&server, None)).unwrap();
        assert_eq!(
            frame,
            json!({"type": "message", "from": "server", "dataType": "json", "data": {"cmd": "reboot"}})
        );
        assert_eq!(
            decode_data(DataType::Binary, json!("AQI=")).unwrap(),
            DownlinkBody::Binary(bytes::Bytes::from_static(b"\x01\x02"))
        );
        assert!(decode_data(DataType::Text, json!(1)).is_err());
    }
}
