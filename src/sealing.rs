//! Sealing of secrets iotgate must send and so cannot hash: client-mode listener passwords, and
//! the header values of client-mode listeners and webhooks (`Authorization: Bearer ...` and the
//! like). They are encrypted (ChaCha20-Poly1305) under a key derived from the server secret, which
//! lives in the data directory rather than the database, so a copied database reveals none.
//!
//! Header values are returned by the API as [`REDACTED`]; sending [`REDACTED`] back for a header
//! means "keep the stored value", so a definition can be read, edited and written back without
//! ever holding the secret.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use iotgate_core::Problem;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

const PREFIX: &str = "sealed:v1:";

/// What the API shows instead of a header value, and accepts back as "unchanged".
pub const REDACTED: &str = "<redacted>";

#[derive(Clone)]
pub struct PasswordSealer {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for PasswordSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordSealer(<key>)")
    }
}

impl PasswordSealer {
    pub fn new(server_secret: &[u8]) -> Self {
        // A separate key for this use, so the HMAC key and the sealing key never coincide.
        let mut hasher = Sha256::new();
        hasher.update(b"iotgate password sealing v1");
        hasher.update(server_secret);
        let key: [u8; 32] = hasher.finalize().into();
        Self {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
        }
    }

    pub fn seal(&self, password: &str) -> String {
        let nonce = iotgate_core::credentials::random_bytes::<12>();
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), password.as_bytes())
            .expect("encryption of a short password cannot fail");
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(PREFIX)
    }

    pub fn unseal(&self, stored: &str) -> Option<String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(stored.strip_prefix(PREFIX)?)
            .ok()?;
        if bytes.len() < 12 {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(12);
        let plain = self.cipher.decrypt(Nonce::from_slice(nonce), sealed).ok()?;
        String::from_utf8(plain).ok()
    }
}

/// The headers of a submitted document, ready for storage and for running.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedHeaders {
    /// Header values sealed, for the stored document.
    pub stored: Value,
    /// Header values in clear, for the module that sends them.
    pub plain: Value,
}

impl PasswordSealer {
    /// Seals the `headers` of a submitted document. [`REDACTED`] stands for the value stored for
    /// the same header in `previous` (the stored document's headers); with none stored, it is a
    /// problem at that header's pointer.
    pub fn seal_headers(
        &self,
        submitted: &Map<String, Value>,
        previous: Option<&Value>,
    ) -> Result<SealedHeaders, Vec<Problem>> {
        let mut stored = Map::new();
        let mut plain = Map::new();
        let mut problems = Vec::new();
        for (name, value) in submitted {
            let Some(text) = value.as_str() else {
                // Not a string: left as is for the schema to report.
                stored.insert(name.clone(), value.clone());
                plain.insert(name.clone(), value.clone());
                continue;
            };
            if text == REDACTED {
                let kept = previous
                    .and_then(|p| p.as_object())
                    .and_then(|p| {
                        p.get(name).or_else(|| {
                            p.iter()
                                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                                .map(|(_, v)| v)
                        })
                    })
                    .and_then(Value::as_str);
                match kept.map(|k| (k, self.open_stored(k))) {
                    Some((sealed, Some(clear))) => {
                        stored.insert(name.clone(), Value::String(self.seal_if_clear(sealed)));
                        plain.insert(name.clone(), Value::String(clear));
                    }
                    _ => problems.push(Problem::new(
                        format!("/headers/{}", name.replace('~', "~0").replace('/', "~1")),
                        format!("{REDACTED} stands for the stored value, but no value is stored for {name}; send the value"),
                    )),
                }
                continue;
            }
            stored.insert(name.clone(), Value::String(self.seal(text)));
            plain.insert(name.clone(), value.clone());
        }
        if problems.is_empty() {
            Ok(SealedHeaders {
                stored: Value::Object(stored),
                plain: Value::Object(plain),
            })
        } else {
            Err(problems)
        }
    }

    /// A stored header value in clear: unsealed, or as it is when it predates sealing. `None`
    /// when it is sealed under another server secret.
    pub fn open_stored(&self, stored: &str) -> Option<String> {
        if Self::is_sealed(stored) {
            self.unseal(stored)
        } else {
            Some(stored.to_owned())
        }
    }

    fn seal_if_clear(&self, stored: &str) -> String {
        if Self::is_sealed(stored) {
            stored.to_owned()
        } else {
            self.seal(stored)
        }
    }

    /// Stored headers in clear, for running; the names of headers that cannot be unsealed.
    pub fn open_headers(&self, stored: &Value) -> Result<Value, Vec<String>> {
        let Some(map) = stored.as_object() else {
            return Ok(stored.clone());
        };
        let mut plain = Map::new();
        let mut unreadable = Vec::new();
        for (name, value) in map {
            match value.as_str().map(|v| self.open_stored(v)) {
                Some(Some(clear)) => {
                    plain.insert(name.clone(), Value::String(clear));
                }
                Some(None) => unreadable.push(name.clone()),
                None => {
                    plain.insert(name.clone(), value.clone());
                }
            }
        }
        if unreadable.is_empty() {
            Ok(Value::Object(plain))
        } else {
            Err(unreadable)
        }
    }

    /// Stored headers with every value sealed (values stored before sealing existed get sealed).
    pub fn seal_stored_headers(&self, stored: &Value) -> Value {
        match stored.as_object() {
            Some(map) => Value::Object(
                map.iter()
                    .map(|(name, value)| {
                        let sealed = value.as_str().map_or_else(
                            || value.clone(),
                            |v| Value::String(self.seal_if_clear(v)),
                        );
                        (name.clone(), sealed)
                    })
                    .collect(),
            ),
            None => stored.clone(),
        }
    }
}

/// Header values replaced by [`REDACTED`].
pub fn redacted_headers(headers: &Value) -> Value {
    match headers.as_object() {
        Some(map) => Value::Object(
            map.keys()
                .map(|k| (k.clone(), Value::String(REDACTED.to_owned())))
                .collect(),
        ),
        None => headers.clone(),
    }
}

/// Document fields that hold a sealed secret of a downstream (nats, mqtt, websocket-client).
pub const SEALED_FIELDS: [&str; 2] = ["password", "token"];

/// A stored document as the API shows it: header values redacted, sealed secrets as `null`.
pub fn redacted_document(document: &Value) -> Value {
    let mut shown = document.clone();
    if let Some(headers) = shown.get_mut("headers") {
        *headers = redacted_headers(headers);
    }
    for field in SEALED_FIELDS {
        if let Some(value) = shown.get_mut(field).filter(|v| v.is_string()) {
            *value = Value::Null;
        }
    }
    shown
}

impl PasswordSealer {
    /// Seals a downstream's `password` and `token` in a submitted document. A string is sealed
    /// (in clear in `runtime`); `""` removes the field; `null` or absent keeps the stored value,
    /// as long as the document still uses it (a password needs a `userName`, a token needs
    /// none).
    pub fn seal_secret_fields(
        &self,
        document: &mut Value,
        runtime: &mut Value,
        previous: Option<&Value>,
    ) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        let has_user = document
            .get("userName")
            .and_then(Value::as_str)
            .is_some_and(|u| !u.is_empty());
        for field in SEALED_FIELDS {
            let (Some(doc), Some(run)) = (document.as_object_mut(), runtime.as_object_mut()) else {
                return Ok(());
            };
            match doc.get(field).cloned() {
                Some(Value::String(text)) if text.is_empty() => {
                    doc.remove(field);
                    run.remove(field);
                }
                Some(Value::String(text)) => {
                    doc.insert(field.to_owned(), Value::String(self.seal(&text)));
                    run.insert(field.to_owned(), Value::String(text));
                }
                None | Some(Value::Null) => {
                    doc.remove(field);
                    run.remove(field);
                    let wanted = if field == "password" {
                        has_user
                    } else {
                        !has_user
                    };
                    let stored = previous
                        .and_then(|p| p.get(field))
                        .and_then(Value::as_str)
                        .filter(|_| wanted);
                    if let Some(stored) = stored {
                        match self.open_stored(stored) {
                            Some(clear) => {
                                doc.insert(field.to_owned(), Value::String(self.seal_if_clear(stored)));
                                run.insert(field.to_owned(), Value::String(clear));
                            }
                            None => problems.push(Problem::new(
                                format!("/{field}"),
                                "the stored value cannot be unsealed with this server secret; send it again",
                            )),
                        }
                    }
                }
                // Not a string: left for the schema to report.
                Some(_) => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// A stored document's sealed `password`/`token` in clear, for running; the fields that
    /// cannot be unsealed.
    pub fn open_secret_fields(&self, document: &mut Value) -> Result<(), Vec<String>> {
        let mut unreadable = Vec::new();
        for field in SEALED_FIELDS {
            if let Some(value) = document.get_mut(field) {
                if let Some(stored) = value.as_str() {
                    match self.open_stored(stored) {
                        Some(clear) => *value = Value::String(clear),
                        None => unreadable.push(field.to_owned()),
                    }
                }
            }
        }
        if unreadable.is_empty() {
            Ok(())
        } else {
            Err(unreadable)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn headers_are_sealed_and_the_placeholder_keeps_the_stored_value() {
        let sealer = PasswordSealer::new(b"0123456789abcdef0123456789abcdef");
        let submitted = json!({"authorization": "Bearer s3cret", "x-tenant": "t1"});
        let first = sealer
            .seal_headers(submitted.as_object().unwrap(), None)
            .unwrap();
        assert!(!first.stored.to_string().contains("s3cret"));
        assert_eq!(first.plain, submitted);
        // Read back redacted, written back unchanged except one value.
        let edited = json!({"Authorization": REDACTED, "x-tenant": "t2"});
        let second = sealer
            .seal_headers(edited.as_object().unwrap(), Some(&first.stored))
            .unwrap();
        assert_eq!(second.plain["Authorization"], "Bearer s3cret");
        assert_eq!(second.plain["x-tenant"], "t2");
        assert_eq!(
            redacted_document(&json!({"headers": second.stored}))["headers"]["x-tenant"],
            REDACTED
        );
        // A placeholder with nothing stored is a problem at its pointer.
        let problems = sealer
            .seal_headers(
                json!({"x-new": REDACTED}).as_object().unwrap(),
                Some(&first.stored),
            )
            .unwrap_err();
        assert_eq!(problems[0].pointer, "/headers/x-new");
        // Values stored in clear before sealing existed are read, and sealed on the next write.
        let legacy = json!({"authorization": "Bearer old"});
        assert_eq!(sealer.open_headers(&legacy).unwrap(), legacy);
        assert!(!sealer
            .seal_stored_headers(&legacy)
            .to_string()
            .contains("old"));
    }

    #[test]
    fn downstream_secrets_are_sealed_kept_on_null_and_removed_on_empty() {
        let sealer = PasswordSealer::new(b"secret");
        let mut doc = json!({"userName": "u", "password": "p4ss", "token": null});
        let mut runtime = doc.clone();
        sealer
            .seal_secret_fields(&mut doc, &mut runtime, None)
            .unwrap();
        assert!(PasswordSealer::is_sealed(doc["password"].as_str().unwrap()));
        assert_eq!(runtime["password"], "p4ss");
        assert!(doc.get("token").is_none());
        assert_eq!(redacted_document(&doc)["password"], Value::Null);

        let stored = doc.clone();
        let mut kept = json!({"userName": "u", "password": null});
        let mut runtime = kept.clone();
        sealer
            .seal_secret_fields(&mut kept, &mut runtime, Some(&stored))
            .unwrap();
        assert_eq!(kept["password"], stored["password"]);
        assert_eq!(runtime["password"], "p4ss");
        let mut opened = kept.clone();
        sealer.open_secret_fields(&mut opened).unwrap();
        assert_eq!(opened["password"], "p4ss");

        let mut removed = json!({"userName": "u", "password": ""});
        let mut runtime = removed.clone();
        sealer
            .seal_secret_fields(&mut removed, &mut runtime, Some(&stored))
            .unwrap();
        assert!(removed.get("password").is_none() && runtime.get("password").is_none());

        // Without a userName the stored password no longer applies.
        let mut no_user = json!({});
        let mut runtime = no_user.clone();
        sealer
            .seal_secret_fields(&mut no_user, &mut runtime, Some(&stored))
            .unwrap();
        assert!(no_user.get("password").is_none());
    }

    #[test]
    fn round_trips_and_detects_tampering() {
        let sealer = PasswordSealer::new(b"0123456789abcdef0123456789abcdef");
        let sealed = sealer.seal("hunter2-but-longer");
        assert!(PasswordSealer::is_sealed(&sealed));
        assert_eq!(
            sealer.unseal(&sealed).as_deref(),
            Some("hunter2-but-longer")
        );
        let other = PasswordSealer::new(b"another secret of thirty-two byt");
        assert_eq!(other.unseal(&sealed), None);
    }
}
