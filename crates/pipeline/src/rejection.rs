//! Why a message was not routed. The code is sent to the device, stored with the dead letter and
//! counted; the message never contains a credential.

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
        }
    }

    /// Failures the device is responsible for; enough of them in a row close the connection.
    pub fn is_device_failure(self) -> bool {
        !matches!(
            self,
            RejectionCode::Unrouted
                | RejectionCode::SentinelUnavailable
                | RejectionCode::RateLimited
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
}

impl Rejection {
    pub fn new(code: RejectionCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            claimed_device_id: None,
        }
    }

    pub fn claimed_by(mut self, device_id: &str) -> Self {
        self.claimed_device_id = Some(device_id.to_owned());
        self
    }

    /// The error frame sent to the device: `{"error":{"code":"...","message":"..."}}`.
    pub fn to_frame(&self) -> String {
        serde_json::json!({"error": {"code": self.code.as_str(), "message": self.message}})
            .to_string()
    }
}
