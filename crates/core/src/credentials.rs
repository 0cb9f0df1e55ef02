//! Credential primitives for device access keys and Basic credentials.
//!
//! Device keys are 256-bit random values shown once; only their HMAC-SHA-256 under a server
//! secret is stored. Unlike a password hash this costs well under a microsecond, so the sentinel
//! can check a key on every message, and a leaked database alone does not reveal or let anyone
//! test keys without the secret (which lives in the data directory, not the database).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Length of an access key digest.
pub const KEY_DIGEST_LEN: usize = 32;
pub type KeyDigest = [u8; KEY_DIGEST_LEN];

/// A fresh access key: 32 bytes from the OS RNG, base64url without padding (43 characters).
pub fn generate_access_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Random bytes for secrets and tokens.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// Keyed hashing of access keys under the server secret.
#[derive(Clone)]
pub struct KeyHasher {
    /// The MAC already keyed with the secret; cloned per use so the key schedule runs once.
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher(<secret>)")
    }
}

impl KeyHasher {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            keyed: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length"),
        }
    }

    pub fn digest(&self, key: &str) -> KeyDigest {
        let mut mac = self.keyed.clone();
        mac.update(key.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// True when `key` hashes to one of `candidates`; every candidate is compared in constant
    /// time, so timing reveals neither which key matched nor how much of it.
    pub fn matches_any(&self, key: &str, candidates: &[&KeyDigest]) -> bool {
        let digest = self.digest(key);
        let mut matched = subtle::Choice::from(0);
        for candidate in candidates {
            matched |= digest[..].ct_eq(&candidate[..]);
        }
        matched.into()
    }
}

/// Constant-time equality for secrets of any length (length itself is not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Parses `Basic <base64(user:secret)>` (the `Basic ` prefix is optional, case-insensitive).
pub fn parse_basic(value: &str) -> Option<(String, String)> {
    let value = value.trim();
    let encoded = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("basic") => rest.trim(),
        Some(_) => return None,
        None => value,
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, secret) = decoded.split_once(':')?;
    if user.is_empty() {
        return None;
    }
    Some((user.to_owned(), secret.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_and_long() {
        let a = generate_access_key();
        assert_eq!(a.len(), 43);
        assert_ne!(a, generate_access_key());
    }

    #[test]
    fn digest_depends_on_secret_and_matches() {
        let h1 = KeyHasher::new(b"secret-one");
        let h2 = KeyHasher::new(b"secret-two");
        assert_ne!(h1.digest("k"), h2.digest("k"));
        let d = h1.digest("k");
        let other = h1.digest("other");
        assert!(h1.matches_any("k", &[&other, &d]));
        assert!(!h1.matches_any("x", &[&other, &d]));
    }

    #[test]
    fn parses_basic_with_and_without_prefix() {
        // "dev-1:k:ey" — the secret may contain colons.
        assert_eq!(
            parse_basic("Basic ZGV2LTE6azpleQ=="),
            Some(("dev-1".into(), "k:ey".into()))
        );
        assert_eq!(
            parse_basic("ZGV2LTE6azpleQ=="),
            Some(("dev-1".into(), "k:ey".into()))
        );
        assert_eq!(parse_basic("Bearer abc"), None);
        assert_eq!(parse_basic("!!!"), None);
    }
}
