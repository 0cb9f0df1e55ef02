//! Why a message was not routed. The code is sent to the device, stored with the dead letter and
//! counted; the message never contains a credential.

use std::time::Duration;

use iotgate_core::MessageId;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionCode {
    MalformedJson,
    MissingCredentials,
    UnknownDevice,
    DeviceDisabled,
    InvalidKey,
    SentinelUnavailable,
    RateLimited,
    Unrouted,
    /// A durable downstream could not commit the message in time (acknowledged delivery).
    DownstreamUnavailable,
    /// An acknowledging json listener got a message without an id.
    MissingMessageId,
    /// The id is not a string or integer of at most 128 characters.
    InvalidMessageId,
    /// The listener is stopping and the message was not committed before the connection closed.
    ShuttingDown,
    /// A msgpack listener got something that is not MessagePack mapping to JSON.
    MalformedMsgpack,
    /// A whole-message listener got a frame that is not an object with `payload`.
    MissingPayload,
    /// A signed token (shared-access signature) that is not well formed or names another
    /// resource.
    InvalidToken,
    /// A signed token whose expiry has passed.
    TokenExpired,
    /// A connection token whose `nbf` is still ahead.
    TokenNotYetValid,
    /// A connection token meant for another audience, or naming none where one is required.
    TokenAudience,
    /// A connection token whose signature does not verify with the sentinel's keys.
    TokenSignature,
    /// A connection token signed with another algorithm than the sentinel's (`none` included).
    TokenAlgorithm,
    /// A token sentinel's connection request without `access_token` or a Bearer header.
    MissingToken,
}

impl RejectionCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectionCode::MalformedJson => "malformed_json",
            RejectionCode::MissingCredentials => "missing_credentials",
            RejectionCode::UnknownDevice => "unknown_device",
            RejectionCode::DeviceDisabled => "device_disabled",
            RejectionCode::InvalidKey => "invalid_key",
            RejectionCode::SentinelUnavailable => "sentinel_unavailable",
            RejectionCode::RateLimited => "rate_limited",
            RejectionCode::Unrouted => "unrouted",
            RejectionCode::DownstreamUnavailable => "downstream_unavailable",
            RejectionCode::MissingMessageId => "missing_message_id",
            RejectionCode::InvalidMessageId => "invalid_message_id",
            RejectionCode::ShuttingDown => "shutting_down",
            RejectionCode::MalformedMsgpack => "malformed_msgpack",
            RejectionCode::MissingPayload => "missing_payload",
            RejectionCode::InvalidToken => "invalid_token",
            RejectionCode::TokenExpired => "token_expired",
            RejectionCode::TokenNotYetValid => "token_not_yet_valid",
            RejectionCode::TokenAudience => "token_audience",
            RejectionCode::TokenSignature => "token_signature",
            RejectionCode::TokenAlgorithm => "token_algorithm",
            RejectionCode::MissingToken => "missing_token",
        }
    }

    /// Failures the device is responsible for; enough of them in a row close the connection.
    pub fn is_device_failure(self) -> bool {
        !matches!(
            self,
            RejectionCode::Unrouted
                | RejectionCode::SentinelUnavailable
                | RejectionCode::RateLimited
                | RejectionCode::DownstreamUnavailable
                | RejectionCode::ShuttingDown
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectionCode,
    pub message: String,
    /// The device id the message claimed, when known: shown with the dead letter so an
    /// operator can tell which device misbehaves (an id is not a secret).
    pub claimed_device_id: Option<String>,
    /// When retrying may succeed: the device should wait this long first.
    pub retry_after: Option<Duration>,
}

impl Rejection {
    pub fn new(code: RejectionCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            claimed_device_id: None,
            retry_after: None,
        }
    }

    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    pub fn claimed_by(mut self, device_id: &str) -> Self {
        self.claimed_device_id = Some(device_id.to_owned());
        self
    }

    /// The error frame sent to the device: `{"error":{"code":"...","message":"..."}}`, with the
    /// message's id on acknowledging listeners and `retryAfterMs` when retrying may succeed.
    pub fn to_frame(&self, message_id: Option<&MessageId>) -> String {
        let mut error = serde_json::json!({"code": self.code.as_str(), "message": self.message});
        if let Some(id) = message_id {
            error["messageId"] = serde_json::to_value(id).unwrap_or_default();
        }
        if let Some(wait) = self.retry_after {
            error["retryAfterMs"] = serde_json::Value::from(wait.as_millis() as u64);
        }
        serde_json::json!({ "error": error }).to_string()
    }
}
