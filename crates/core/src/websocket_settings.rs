//! Per-listener WebSocket transport settings: the `websocket` object of a listener definition.
//!
//! The names follow Crossbar.io's WebSocket transport options (`max_frame_size`,
//! `open_handshake_timeout`, `close_handshake_timeout`, `auto_ping_interval`,
//! `auto_ping_timeout`, `auto_ping_size`, `fail_by_drop`) plus an idle timeout, so operators who
//! know one gateway can tune the other. Every field is optional and an absent one keeps the
//! behaviour listeners had before the object existed; [`EffectiveWebSocketSettings`] is what the
//! listener code reads, with the defaults and the older shorthands (`heartbeatSeconds`,
//! `maxMessageBytes`) already applied, so no listener re-derives them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::definition::{ListenerDefinition, ListenerMode, ListenerProtocol};
use crate::schema::Problem;

/// How long a client-mode listener waits for its connect and upgrade when nothing is set.
pub const DEFAULT_CLIENT_OPEN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a client-mode listener waits for the server to end the connection after a close
/// frame, when nothing is set.
pub const DEFAULT_CLIENT_CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `websocket` object as written: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebSocketSettings {
    /// Largest single frame; a larger one fails the connection with 1009. Default:
    /// `maxMessageBytes`, so only whole messages are capped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<usize>,
    /// Time from TCP accept (server, own port) or connect start (client) to a completed upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_handshake_timeout_ms: Option<u64>,
    /// After iotgate sends a close frame, how long it waits for the peer's before dropping TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_handshake_timeout_ms: Option<u64>,
    /// Seconds between pings (0 = no pings). Default: `heartbeatSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_ping_interval_seconds: Option<u32>,
    /// Seconds a peer has to answer a ping (a pong or any other frame) before it is closed.
    /// Default: twice the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_ping_timeout_seconds: Option<u32>,
    /// Bytes of payload in each ping (0 to 125, the most a control frame may carry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_ping_size: Option<u8>,
    /// On a protocol violation, drop TCP at once instead of sending a close frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_by_drop: Option<bool>,
    /// Seconds without a received data frame after which the connection is closed with 1000
    /// "idle timeout" (0 = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u32>,
}

/// The settings a connection runs with: defaults and shorthands applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveWebSocketSettings {
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    /// `None`: the server-wide `--handshake-timeout-ms` applies (server mode).
    pub open_handshake_timeout: Option<Duration>,
    /// Zero: TCP is dropped as soon as the close frame is written.
    pub close_handshake_timeout: Duration,
    /// Zero: no pings.
    pub auto_ping_interval: Duration,
    pub auto_ping_timeout: Duration,
    pub auto_ping_size: usize,
    pub fail_by_drop: bool,
    /// Zero: no idle timeout.
    pub idle_timeout: Duration,
}

impl EffectiveWebSocketSettings {
    /// The close reason for a frame or message over the caps.
    pub fn oversize_reason(&self) -> String {
        if self.max_frame_bytes >= self.max_message_bytes {
            format!(
                "message exceeds maxMessageBytes ({})",
                self.max_message_bytes
            )
        } else {
            format!(
                "frame exceeds maxFrameBytes ({}) or message exceeds maxMessageBytes ({})",
                self.max_frame_bytes, self.max_message_bytes
            )
        }
    }

    /// The payload of each ping.
    pub fn ping_payload(&self) -> Vec<u8> {
        vec![0; self.auto_ping_size]
    }
}

impl ListenerDefinition {
    /// The WebSocket settings this listener's connections run with.
    pub fn websocket_settings(&self) -> EffectiveWebSocketSettings {
        let given = self.websocket.clone().unwrap_or_default();
        let client = self.mode == ListenerMode::Client;
        let interval = given
            .auto_ping_interval_seconds
            .unwrap_or(self.heartbeat_seconds);
        EffectiveWebSocketSettings {
            max_frame_bytes: given
                .max_frame_bytes
                .unwrap_or(self.max_message_bytes)
                .min(self.max_message_bytes),
            max_message_bytes: self.max_message_bytes,
            open_handshake_timeout: match given.open_handshake_timeout_ms {
                Some(ms) => Some(Duration::from_millis(ms)),
                None if client => Some(DEFAULT_CLIENT_OPEN_HANDSHAKE_TIMEOUT),
                None => None,
            },
            close_handshake_timeout: match given.close_handshake_timeout_ms {
                Some(ms) => Duration::from_millis(ms),
                None if client => DEFAULT_CLIENT_CLOSE_HANDSHAKE_TIMEOUT,
                None => Duration::ZERO,
            },
            auto_ping_interval: Duration::from_secs(u64::from(interval)),
            auto_ping_timeout: Duration::from_secs(u64::from(
                given
                    .auto_ping_timeout_seconds
                    .unwrap_or(interval.saturating_mul(2)),
            )),
            auto_ping_size: usize::from(given.auto_ping_size.unwrap_or(0)),
            fail_by_drop: given.fail_by_drop.unwrap_or(false),
            idle_timeout: Duration::from_secs(u64::from(given.idle_timeout_seconds.unwrap_or(0))),
        }
    }

    /// Rules across the `websocket` object and the rest of the definition. `document` is the
    /// definition as written: the shorthand `heartbeatSeconds` conflicts with
    /// `autoPingIntervalSeconds` only when it was given, which the typed view (with its
    /// default) cannot tell.
    pub fn validate_websocket(&self, document: &Value, problems: &mut Vec<Problem>) {
        let Some(given) = &self.websocket else {
            return;
        };
        if let Some(frame) = given.max_frame_bytes {
            if frame > self.max_message_bytes {
                problems.push(Problem::new(
                    "/websocket/maxFrameBytes",
                    format!(
                        "maxFrameBytes ({frame}) must not exceed maxMessageBytes ({}): a frame is part of one message",
                        self.max_message_bytes
                    ),
                ));
            }
        }
        if let (Some(shorthand), Some(interval)) = (
            document.get("heartbeatSeconds").and_then(Value::as_u64),
            given.auto_ping_interval_seconds,
        ) {
            if shorthand != u64::from(interval) {
                let message = format!(
                    "heartbeatSeconds ({shorthand}) and websocket.autoPingIntervalSeconds ({interval}) disagree: heartbeatSeconds is a shorthand for the interval, give one of them"
                );
                problems.push(Problem::new("/heartbeatSeconds", message.clone()));
                problems.push(Problem::new("/websocket/autoPingIntervalSeconds", message));
            }
        }
        let interval = given
            .auto_ping_interval_seconds
            .unwrap_or(self.heartbeat_seconds);
        if interval == 0 {
            for (pointer, present) in [
                (
                    "/websocket/autoPingTimeoutSeconds",
                    given.auto_ping_timeout_seconds.is_some(),
                ),
                ("/websocket/autoPingSize", given.auto_ping_size.is_some()),
            ] {
                if present {
                    problems.push(Problem::new(
                        pointer,
                        "applies only when pings are on: the auto-ping interval (heartbeatSeconds or websocket.autoPingIntervalSeconds) is 0",
                    ));
                }
            }
        }
        if given.open_handshake_timeout_ms.is_some() && self.is_path_mounted() {
            problems.push(Problem::new(
                "/websocket/openHandshakeTimeoutMs",
                "a listener on the main port shares its HTTP server: --handshake-timeout-ms applies there; give the listener its own port (or use client mode) to set its own",
            ));
        }
        if self.protocol == ListenerProtocol::Webpubsub {
            for (pointer, present) in [
                (
                    "/websocket/closeHandshakeTimeoutMs",
                    given.close_handshake_timeout_ms.is_some(),
                ),
                ("/websocket/failByDrop", given.fail_by_drop.is_some()),
                (
                    "/websocket/idleTimeoutSeconds",
                    given.idle_timeout_seconds.is_some(),
                ),
            ] {
                if present {
                    problems.push(Problem::new(
                        pointer,
                        "not supported on Web PubSub listeners: they keep their own session lifecycle (resume window); frame caps and auto-ping apply",
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_listeners::{listener, parse};
    use serde_json::json;

    #[test]
    fn absent_settings_keep_todays_behaviour() {
        let server = parse(&listener(json!({}))).unwrap().websocket_settings();
        assert_eq!(
            server,
            EffectiveWebSocketSettings {
                max_frame_bytes: 65536,
                max_message_bytes: 65536,
                open_handshake_timeout: None,
                close_handshake_timeout: Duration::ZERO,
                auto_ping_interval: Duration::from_secs(30),
                auto_ping_timeout: Duration::from_secs(60),
                auto_ping_size: 0,
                fail_by_drop: false,
                idle_timeout: Duration::ZERO,
            }
        );
        let client = parse(&listener(
            json!({"mode": "client", "hostName": "feed.example"}),
        ))
        .unwrap()
        .websocket_settings();
        assert_eq!(
            client.open_handshake_timeout,
            Some(DEFAULT_CLIENT_OPEN_HANDSHAKE_TIMEOUT)
        );
        assert_eq!(
            client.close_handshake_timeout,
            DEFAULT_CLIENT_CLOSE_HANDSHAKE_TIMEOUT
        );
    }

    #[test]
    fn shorthands_feed_the_settings() {
        let d = parse(&listener(
            json!({"heartbeatSeconds": 5, "maxMessageBytes": 1048576, "websocket": {"maxFrameBytes": 16384}}),
        ))
        .unwrap();
        let s = d.websocket_settings();
        assert_eq!(s.auto_ping_interval, Duration::from_secs(5));
        assert_eq!(s.auto_ping_timeout, Duration::from_secs(10));
        assert_eq!((s.max_frame_bytes, s.max_message_bytes), (16384, 1048576));
        // The same interval given twice is no conflict.
        assert!(parse(&listener(
            json!({"heartbeatSeconds": 5, "websocket": {"autoPingIntervalSeconds": 5}})
        ))
        .is_ok());
    }

    #[test]
    fn conflicting_interval_names_both_fields() {
        let problems = parse(&listener(
            json!({"heartbeatSeconds": 30, "websocket": {"autoPingIntervalSeconds": 10}}),
        ))
        .unwrap_err();
        assert_eq!(
            problems,
            ["/heartbeatSeconds", "/websocket/autoPingIntervalSeconds"]
        );
    }

    #[test]
    fn frame_cap_cannot_exceed_the_message_cap() {
        let problems = parse(&listener(
            json!({"maxMessageBytes": 4096, "websocket": {"maxFrameBytes": 8192}}),
        ))
        .unwrap_err();
        assert_eq!(problems, ["/websocket/maxFrameBytes"]);
    }

    #[test]
    fn bounds_and_unknown_fields_are_schema_problems() {
        for (settings, pointer) in [
            (json!({"autoPingSize": 126}), "/websocket/autoPingSize"),
            (json!({"maxFrameBytes": 8}), "/websocket/maxFrameBytes"),
            (
                json!({"autoPingTimeoutSeconds": 0}),
                "/websocket/autoPingTimeoutSeconds",
            ),
            (
                json!({"closeHandshakeTimeoutMs": -1}),
                "/websocket/closeHandshakeTimeoutMs",
            ),
            (json!({"pingEvery": 3}), "/websocket/pingEvery"),
        ] {
            let problems = parse(&listener(json!({"websocket": settings}))).unwrap_err();
            assert_eq!(problems, [pointer], "{settings}");
        }
    }

    #[test]
    fn open_handshake_timeout_needs_an_own_port_or_client_mode() {
        let settings = json!({"openHandshakeTimeoutMs": 2000});
        assert_eq!(
            parse(&listener(json!({"websocket": settings}))).unwrap_err(),
            ["/websocket/openHandshakeTimeoutMs"]
        );
        assert!(parse(&listener(json!({"port": 0, "websocket": settings}))).is_ok());
        let client = parse(&listener(
            json!({"mode": "client", "hostName": "feed.example", "websocket": settings}),
        ))
        .unwrap();
        assert_eq!(
            client.websocket_settings().open_handshake_timeout,
            Some(Duration::from_millis(2000))
        );
    }

    #[test]
    fn ping_settings_need_pings() {
        let problems = parse(&listener(
            json!({"heartbeatSeconds": 0, "websocket": {"autoPingTimeoutSeconds": 5, "autoPingSize": 4}}),
        ))
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "/websocket/autoPingSize",
                "/websocket/autoPingTimeoutSeconds"
            ]
        );
    }
}
