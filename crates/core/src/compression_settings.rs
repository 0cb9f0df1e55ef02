//! Per-listener permessage-deflate settings (RFC 7692): the `compression` object of a listener
//! definition. Off unless `enabled`; the other fields bound what iotgate agrees to when a device
//! offers the extension (server mode), or what it offers to the remote server (client mode). The
//! names are the RFC's: `server*` is the WebSocket server's side, `client*` the client's.
//! [`EffectiveCompressionSettings`] is what the listener code reads, with the defaults applied.

use serde::{Deserialize, Serialize};

use crate::definition::ListenerDefinition;

/// Messages shorter than this go out uncompressed when nothing is set: below it the deflate
/// header and the CPU cost outweigh what compression saves.
pub const DEFAULT_COMPRESSION_THRESHOLD: usize = 64;

/// The `compression` object as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompressionSettings {
    /// Accept permessage-deflate when a peer offers it.
    #[serde(default)]
    pub enabled: bool,
    /// iotgate compresses every message on its own (no shared window between messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_no_context_takeover: Option<bool>,
    /// Ask the peer to compress every message on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_no_context_takeover: Option<bool>,
    /// Largest LZ77 window iotgate compresses with (2^bits bytes), 9 to 15.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_max_window_bits: Option<u8>,
    /// Largest window the peer may compress with, 8 to 15: bounds the inflate memory per
    /// connection. A peer that cannot be told (its offer lacks `client_max_window_bits`) is then
    /// declined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_max_window_bits: Option<u8>,
    /// Messages shorter than this many bytes are sent uncompressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<usize>,
}

/// The compression a listener runs with; `None` from
/// [`ListenerDefinition::compression_settings`] when it is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveCompressionSettings {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: u8,
    pub client_max_window_bits: u8,
    pub threshold: usize,
}

impl Default for EffectiveCompressionSettings {
    /// What `{"enabled": true}` alone means: full windows, context takeover both ways.
    fn default() -> Self {
        Self {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
            threshold: DEFAULT_COMPRESSION_THRESHOLD,
        }
    }
}

impl ListenerDefinition {
    /// The compression settings, or `None` when compression is off.
    pub fn compression_settings(&self) -> Option<EffectiveCompressionSettings> {
        let given = self.compression.as_ref().filter(|c| c.enabled)?;
        let default = EffectiveCompressionSettings::default();
        Some(EffectiveCompressionSettings {
            server_no_context_takeover: given
                .server_no_context_takeover
                .unwrap_or(default.server_no_context_takeover),
            client_no_context_takeover: given
                .client_no_context_takeover
                .unwrap_or(default.client_no_context_takeover),
            server_max_window_bits: given
                .server_max_window_bits
                .unwrap_or(default.server_max_window_bits),
            client_max_window_bits: given
                .client_max_window_bits
                .unwrap_or(default.client_max_window_bits),
            threshold: given.threshold.unwrap_or(default.threshold),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_listeners::{listener, parse};
    use serde_json::json;

    #[test]
    fn absent_or_disabled_means_off() {
        assert_eq!(
            parse(&listener(json!({}))).unwrap().compression_settings(),
            None
        );
        let disabled = json!({"compression": {"enabled": false, "threshold": 10}});
        assert_eq!(
            parse(&listener(disabled)).unwrap().compression_settings(),
            None
        );
    }

    #[test]
    fn defaults_apply_when_enabled() {
        let d = parse(&listener(
            json!({"compression": {"enabled": true, "clientMaxWindowBits": 10}}),
        ))
        .unwrap();
        assert_eq!(
            d.compression_settings(),
            Some(EffectiveCompressionSettings {
                server_no_context_takeover: false,
                client_no_context_takeover: false,
                server_max_window_bits: 15,
                client_max_window_bits: 10,
                threshold: DEFAULT_COMPRESSION_THRESHOLD,
            })
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        for (settings, pointer) in [
            (
                json!({"enabled": true, "serverMaxWindowBits": 8}),
                "/compression/serverMaxWindowBits",
            ),
            (
                json!({"enabled": true, "clientMaxWindowBits": 16}),
                "/compression/clientMaxWindowBits",
            ),
            (
                json!({"enabled": true, "threshold": -1}),
                "/compression/threshold",
            ),
            (json!({"enabled": "yes"}), "/compression/enabled"),
            (json!({"level": 9}), "/compression/level"),
        ] {
            let problems = parse(&listener(json!({"compression": settings}))).unwrap_err();
            assert_eq!(problems, [pointer], "{settings}");
        }
    }

    #[test]
    fn client_mode_compresses_too() {
        let d = parse(&listener(
            json!({"mode": "client", "hostName": "feed.example",
            "compression": {"enabled": true, "serverMaxWindowBits": 12}}),
        ))
        .unwrap();
        let settings = d.compression_settings().unwrap();
        assert_eq!(settings.server_max_window_bits, 12);
    }
}
