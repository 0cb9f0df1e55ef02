//! permessage-deflate from the client's side (RFC 7692 §5 and §7.1), for client-mode listeners:
//! iotgate words one offer from the listener's `compression` settings, and checks the server's
//! answer against it. An answer that breaks the offer fails the connection (the server would
//! compress in a way iotgate did not agree to); no answer means the connection runs
//! uncompressed.
//!
//! The settings keep the RFC's names: `server*` parameters are what iotgate asks of the remote
//! server, `client*` parameters are what iotgate itself does.

use iotgate_core::compression_settings::EffectiveCompressionSettings;

use super::negotiation::{parse_offer, EXTENSION, SMALLEST_ZLIB_WINDOW_BITS};
use super::Agreement;

/// The `Sec-WebSocket-Extensions` value of the upgrade request.
pub fn offer(settings: &EffectiveCompressionSettings) -> String {
    let mut offer = String::from(EXTENSION);
    if settings.server_no_context_takeover {
        offer.push_str("; server_no_context_takeover");
    }
    if settings.client_no_context_takeover {
        offer.push_str("; client_no_context_takeover");
    }
    if settings.server_max_window_bits < 15 {
        offer.push_str(&format!(
            "; server_max_window_bits={}",
            settings.server_max_window_bits
        ));
    }
    // Always offered: it tells the server iotgate accepts a smaller window for what it sends
    // (a server may refuse an offer without it when it wants one).
    if settings.client_max_window_bits < 15 {
        offer.push_str(&format!(
            "; client_max_window_bits={}",
            settings.client_max_window_bits
        ));
    } else {
        offer.push_str("; client_max_window_bits");
    }
    offer
}

/// What the connection runs with, from every `Sec-WebSocket-Extensions` value of the upgrade
/// response: `Ok(None)` when the server declined compression, `Err` naming the problem when the
/// answer does not fit the offer.
pub fn agreement<'a>(
    response_values: impl IntoIterator<Item = &'a str>,
    settings: &EffectiveCompressionSettings,
) -> Result<Option<Agreement>, String> {
    let extensions: Vec<&str> = response_values
        .into_iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|extension| !extension.is_empty())
        .collect();
    let extension = match extensions.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        several => {
            return Err(format!(
                "the server answered {} extensions ({}); iotgate offered one",
                several.len(),
                several.join(", ")
            ))
        }
    };
    let name = extension.split(';').next().unwrap_or_default().trim();
    if !name.eq_ignore_ascii_case(EXTENSION) {
        return Err(format!(
            "the server answered with the extension {name:?}, which iotgate did not offer"
        ));
    }
    let answer = parse_offer(extension).ok_or_else(|| {
        format!(
            "the server's answer {extension:?} has an unknown, repeated or out-of-range parameter"
        )
    })?;

    // The window the server compresses with: what it answered, which may not exceed what
    // iotgate asked for; when iotgate asked for less than 15 bits, the server must answer.
    let server_window_bits = match answer.server_max_window_bits {
        Some(bits) if bits > settings.server_max_window_bits => {
            return Err(format!(
            "the server answered server_max_window_bits={bits}, more than the {} iotgate asked for",
            settings.server_max_window_bits
        ))
        }
        Some(bits) => bits,
        None if settings.server_max_window_bits < 15 => {
            return Err(format!(
                "the server did not accept server_max_window_bits={} (its answer leaves it out)",
                settings.server_max_window_bits
            ))
        }
        None => 15,
    };
    if settings.server_no_context_takeover && !answer.server_no_context_takeover {
        return Err(
            "the server did not accept server_no_context_takeover (its answer leaves it out)"
                .into(),
        );
    }
    // The window iotgate compresses with: at most what it offered, smaller when the server says.
    let client_window_bits = match answer.client_max_window_bits {
        Some(None) => {
            return Err("the server answered client_max_window_bits without a value".into())
        }
        Some(Some(bits)) if bits > settings.client_max_window_bits => {
            return Err(format!(
            "the server answered client_max_window_bits={bits}, more than the {} iotgate offered",
            settings.client_max_window_bits
        ))
        }
        Some(Some(bits)) => bits,
        None => settings.client_max_window_bits,
    };
    Ok(Some(Agreement {
        response: extension.to_owned(),
        server_no_context_takeover: answer.server_no_context_takeover,
        client_no_context_takeover: settings.client_no_context_takeover
            || answer.client_no_context_takeover,
        // zlib inflates with 9 to 15 bits; a larger window reads any smaller one.
        server_window_bits: server_window_bits.max(SMALLEST_ZLIB_WINDOW_BITS),
        // 8 bits stays 8: iotgate then sends every message uncompressed (see the deflater).
        client_window_bits,
        threshold: settings.threshold,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EffectiveCompressionSettings {
        EffectiveCompressionSettings::default()
    }

    #[test]
    fn the_offer_follows_the_settings() {
        assert_eq!(
            offer(&settings()),
            "permessage-deflate; client_max_window_bits"
        );
        let strict = EffectiveCompressionSettings {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 10,
            client_max_window_bits: 9,
            threshold: 0,
        };
        assert_eq!(
            offer(&strict),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10; client_max_window_bits=9"
        );
    }

    #[test]
    fn answers_that_fit_the_default_offer() {
        let none: [&str; 0] = [];
        assert_eq!(agreement(none, &settings()), Ok(None));
        let plain = agreement(["permessage-deflate"], &settings())
            .unwrap()
            .unwrap();
        assert_eq!(
            (plain.server_window_bits, plain.client_window_bits),
            (15, 15)
        );
        assert!(!plain.server_no_context_takeover && !plain.client_no_context_takeover);
        // What Autobahn's fuzzing server and Python websockets answer.
        let told = agreement(
            ["permessage-deflate; client_max_window_bits=9; client_no_context_takeover; server_max_window_bits=12"],
            &settings(),
        )
        .unwrap()
        .unwrap();
        assert_eq!((told.server_window_bits, told.client_window_bits), (12, 9));
        assert!(told.client_no_context_takeover && !told.server_no_context_takeover);
        // 8 bits: inflated with 9, and iotgate's own window stays 8 (it then does not compress).
        let eight = agreement(
            ["permessage-deflate; server_max_window_bits=8; client_max_window_bits=8"],
            &settings(),
        )
        .unwrap()
        .unwrap();
        assert_eq!((eight.server_window_bits, eight.client_window_bits), (9, 8));
    }

    #[test]
    fn answers_that_break_the_offer_fail() {
        let strict = EffectiveCompressionSettings {
            server_no_context_takeover: true,
            server_max_window_bits: 10,
            client_max_window_bits: 12,
            ..settings()
        };
        let table: &[(&str, &EffectiveCompressionSettings, &str)] = &[
            ("x-webkit-deflate-frame", &settings(), "did not offer"),
            (
                "permessage-deflate, permessage-deflate",
                &settings(),
                "2 extensions",
            ),
            (
                "permessage-deflate; server_max_window_bits=16",
                &settings(),
                "out-of-range",
            ),
            ("permessage-deflate; foo", &settings(), "unknown"),
            (
                "permessage-deflate; client_max_window_bits",
                &settings(),
                "without a value",
            ),
            (
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=12",
                &strict,
                "more than the 10",
            ),
            (
                "permessage-deflate; server_no_context_takeover",
                &strict,
                "server_max_window_bits=10",
            ),
            (
                "permessage-deflate; server_max_window_bits=10",
                &strict,
                "server_no_context_takeover",
            ),
            (
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=9; client_max_window_bits=13",
                &strict,
                "more than the 12",
            ),
        ];
        for (answer, settings, problem) in table {
            let error = agreement([*answer], settings).unwrap_err();
            assert!(error.contains(problem), "{answer}: {error}");
        }
        let fits = agreement(
            ["permessage-deflate; server_no_context_takeover; server_max_window_bits=9"],
            &strict,
        )
        .unwrap()
        .unwrap();
        assert_eq!((fits.server_window_bits, fits.client_window_bits), (9, 12));
    }
}
