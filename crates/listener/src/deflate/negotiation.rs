//! The permessage-deflate handshake (RFC 7692 §5 and §7.1): a client lists offers in
//! `Sec-WebSocket-Extensions`, in order of preference; the server accepts at most one, answering
//! with the parameters both sides then keep to. An offer iotgate cannot honour is declined and
//! the next one tried; when none fits, the connection runs uncompressed.

use iotgate_core::compression_settings::EffectiveCompressionSettings;

pub(crate) const EXTENSION: &str = "permessage-deflate";
/// zlib's deflate needs a window of at least 2^9 bytes (it refuses 8 for raw streams), and
/// flate2 asks for 9 to 15 on both directions; a larger inflate window reads any smaller one.
pub(crate) const SMALLEST_ZLIB_WINDOW_BITS: u8 = 9;

/// What both sides agreed to for one connection. `server_*` and `client_*` are the RFC's
/// WebSocket roles: the server is iotgate in server mode and the remote in client mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// The `Sec-WebSocket-Extensions` value of the upgrade response.
    pub response: String,
    /// The server resets its compressor after every message (the client may reset its inflater).
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message (the server resets its inflater).
    pub client_no_context_takeover: bool,
    /// The window the server compresses with (and the client inflates with).
    pub server_window_bits: u8,
    /// The window the client compresses with (and the server inflates with).
    pub client_window_bits: u8,
    /// Messages iotgate sends shorter than this go out uncompressed.
    pub threshold: usize,
}

/// Which end of the WebSocket connection iotgate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A server-mode listener: devices connected to iotgate.
    Server,
    /// A client-mode listener: iotgate connected out.
    Client,
}

/// How one direction of a connection is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direction {
    pub window_bits: u8,
    pub no_context_takeover: bool,
}

impl Agreement {
    /// How iotgate, in `role`, compresses what it sends.
    pub fn own_compression(&self, role: Role) -> Direction {
        match role {
            Role::Server => self.server_direction(),
            Role::Client => self.client_direction(),
        }
    }

    /// How the peer of iotgate in `role` compresses what it sends: what iotgate inflates.
    pub fn peer_compression(&self, role: Role) -> Direction {
        match role {
            Role::Server => self.client_direction(),
            Role::Client => self.server_direction(),
        }
    }

    fn server_direction(&self) -> Direction {
        Direction {
            window_bits: self.server_window_bits,
            no_context_takeover: self.server_no_context_takeover,
        }
    }

    fn client_direction(&self) -> Direction {
        Direction {
            window_bits: self.client_window_bits,
            no_context_takeover: self.client_no_context_takeover,
        }
    }
}

/// One permessage-deflate offer's (or response's) parameters.
#[derive(Debug, Default)]
pub(crate) struct Offer {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value (the client accepts a limit from the server).
    pub client_max_window_bits: Option<Option<u8>>,
}

/// Picks the first offer in `header_values` (every `Sec-WebSocket-Extensions` value of the
/// request, in order) that the listener's settings can honour.
pub fn negotiate<'a>(
    header_values: impl IntoIterator<Item = &'a str>,
    settings: &EffectiveCompressionSettings,
) -> Option<Agreement> {
    header_values
        .into_iter()
        .flat_map(|value| value.split(','))
        .filter_map(parse_offer)
        .find_map(|offer| accept(&offer, settings))
}

/// Parses one extension of the list; `None` for other extensions and for malformed offers
/// (an unknown or repeated parameter, a value out of range), which RFC 7692 §5 says to decline.
pub(crate) fn parse_offer(extension: &str) -> Option<Offer> {
    let mut parts = extension.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut offer = Offer::default();
    for parameter in parts {
        let (name, value) = match parameter.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim()))),
            None => (parameter, None),
        };
        let name = name.to_ascii_lowercase();
        match (name.as_str(), value) {
            ("server_no_context_takeover", None) if !offer.server_no_context_takeover => {
                offer.server_no_context_takeover = true;
            }
            ("client_no_context_takeover", None) if !offer.client_no_context_takeover => {
                offer.client_no_context_takeover = true;
            }
            ("server_max_window_bits", Some(value)) if offer.server_max_window_bits.is_none() => {
                offer.server_max_window_bits = Some(window_bits(value)?);
            }
            ("client_max_window_bits", value) if offer.client_max_window_bits.is_none() => {
                offer.client_max_window_bits = Some(match value {
                    Some(value) => Some(window_bits(value)?),
                    None => None,
                });
            }
            _ => return None,
        }
    }
    Some(offer)
}

/// A quoted-string parameter value (RFC 7692 §5.1 allows either form).
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// A window size: a decimal 8 to 15 without leading zeros (RFC 7692 §7.1.2.1).
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// The answer to one offer, or `None` when iotgate cannot honour it.
fn accept(offer: &Offer, settings: &EffectiveCompressionSettings) -> Option<Agreement> {
    let mut response = String::from(EXTENSION);
    // iotgate's window: the smaller of the configured and the requested one.
    let server_window_bits = settings
        .server_max_window_bits
        .min(offer.server_max_window_bits.unwrap_or(15));
    if server_window_bits < SMALLEST_ZLIB_WINDOW_BITS {
        return None;
    }
    let server_no_context_takeover =
        settings.server_no_context_takeover || offer.server_no_context_takeover;
    if server_no_context_takeover {
        response.push_str("; server_no_context_takeover");
    }
    // The client may be told to reset its compressor whether or not it offered to (§7.1.1.2).
    if settings.client_no_context_takeover {
        response.push_str("; client_no_context_takeover");
    }
    // Answering with server_max_window_bits is allowed even when it was not asked for
    // (§7.1.2.1); with the default of 15 it is left out.
    if offer.server_max_window_bits.is_some() || server_window_bits < 15 {
        response.push_str(&format!("; server_max_window_bits={server_window_bits}"));
    }
    // client_max_window_bits may only be answered when offered (§7.1.2.2); a client that did not
    // offer it compresses with up to 15 bits, which a lower configured limit cannot allow.
    let client_window_bits = match offer.client_max_window_bits {
        None if settings.client_max_window_bits < 15 => return None,
        None => 15,
        Some(offered) => {
            let bits = settings.client_max_window_bits.min(offered.unwrap_or(15));
            if bits < 15 {
                response.push_str(&format!("; client_max_window_bits={bits}"));
            }
            bits
        }
    };
    Some(Agreement {
        response,
        server_no_context_takeover,
        client_no_context_takeover: settings.client_no_context_takeover,
        server_window_bits,
        client_window_bits: client_window_bits.max(SMALLEST_ZLIB_WINDOW_BITS),
        threshold: settings.threshold,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EffectiveCompressionSettings {
        EffectiveCompressionSettings::default()
    }

    fn answer(offers: &str, settings: &EffectiveCompressionSettings) -> Option<String> {
        negotiate([offers], settings).map(|a| a.response)
    }

    #[test]
    fn offers_and_answers_with_default_settings() {
        let table: &[(&str, Option<&str>)] = &[
            ("permessage-deflate", Some("permessage-deflate")),
            // Python websockets' and browsers' usual offer.
            (
                "permessage-deflate; client_max_window_bits",
                Some("permessage-deflate"),
            ),
            (
                "permessage-deflate; client_max_window_bits=10",
                Some("permessage-deflate; client_max_window_bits=10"),
            ),
            (
                "permessage-deflate; server_max_window_bits=9",
                Some("permessage-deflate; server_max_window_bits=9"),
            ),
            (
                "permessage-deflate; server_max_window_bits=\"12\"",
                Some("permessage-deflate; server_max_window_bits=12"),
            ),
            (
                "permessage-deflate; server_no_context_takeover",
                Some("permessage-deflate; server_no_context_takeover"),
            ),
            // The client's own reset needs no answer.
            (
                "permessage-deflate; client_no_context_takeover",
                Some("permessage-deflate"),
            ),
            // zlib cannot deflate with a 256-byte window: declined, the next offer is taken.
            ("permessage-deflate; server_max_window_bits=8", None),
            (
                "permessage-deflate; server_max_window_bits=8, permessage-deflate",
                Some("permessage-deflate"),
            ),
            // Malformed offers are declined.
            ("permessage-deflate; server_max_window_bits", None),
            ("permessage-deflate; server_max_window_bits=16", None),
            ("permessage-deflate; client_max_window_bits=09", None),
            ("permessage-deflate; server_no_context_takeover=1", None),
            (
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                None,
            ),
            ("permessage-deflate; mystery", None),
            ("x-webkit-deflate-frame", None),
            (
                "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits",
                Some("permessage-deflate"),
            ),
        ];
        for (offer, expected) in table {
            assert_eq!(
                answer(offer, &settings()).as_deref(),
                *expected,
                "offer {offer:?}"
            );
        }
    }

    #[test]
    fn configured_limits_shape_the_answer() {
        let limited = EffectiveCompressionSettings {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 12,
            client_max_window_bits: 10,
            threshold: 64,
        };
        let table: &[(&str, Option<&str>)] = &[
            // A client that cannot be told its window is declined.
            ("permessage-deflate", None),
            (
                "permessage-deflate; client_max_window_bits",
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12; client_max_window_bits=10"),
            ),
            // The smaller of the two wins, both ways.
            (
                "permessage-deflate; client_max_window_bits=9; server_max_window_bits=10",
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10; client_max_window_bits=9"),
            ),
            (
                "permessage-deflate; server_max_window_bits=14; client_max_window_bits=15",
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12; client_max_window_bits=10"),
            ),
        ];
        for (offer, expected) in table {
            assert_eq!(
                answer(offer, &limited).as_deref(),
                *expected,
                "offer {offer:?}"
            );
        }
        let agreement =
            negotiate(["permessage-deflate; client_max_window_bits=8"], &limited).unwrap();
        assert_eq!(
            agreement.response.rsplit("; ").next(),
            Some("client_max_window_bits=8")
        );
        // An 8-bit client window is inflated with 9 bits: a larger window reads it.
        assert_eq!(
            (agreement.server_window_bits, agreement.client_window_bits),
            (12, 9)
        );
        assert!(agreement.server_no_context_takeover && agreement.client_no_context_takeover);
    }

    #[test]
    fn offers_span_several_header_values() {
        let agreement = negotiate(
            [
                "permessage-deflate; server_max_window_bits=8",
                "permessage-deflate; server_max_window_bits=11",
            ],
            &settings(),
        )
        .unwrap();
        assert_eq!(agreement.server_window_bits, 11);
    }
}
