//! Sealing of client-mode listener passwords. A client listener must send its password, so it
//! cannot be stored as a one-way hash; it is encrypted (ChaCha20-Poly1305) under a key derived
//! from the server secret, which lives in the data directory rather than the database.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};

const PREFIX: &str = "sealed:v1:";

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

#[cfg(test)]
mod tests {
    use super::*;

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
