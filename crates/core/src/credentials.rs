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

/// Seals device access keys under a key derived from the server secret (ChaCha20-Poly1305), so
/// a sentinel that must recompute a signature with the key itself (shared-access signatures) can
/// recover it, while the database alone still reveals nothing: the secret lives beside it, in
/// the data directory.
#[derive(Clone)]
pub struct KeySealer {
    cipher: chacha20poly1305::ChaCha20Poly1305,
}

impl std::fmt::Debug for KeySealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeySealer(<key>)")
    }
}

const SEALED_PREFIX: &str = "sealed-key:v1:";

impl KeySealer {
    pub fn new(server_secret: &[u8]) -> Self {
        use chacha20poly1305::KeyInit;
        use sha2::Digest;
        // Its own key: neither the HMAC key of the digests nor any other sealing key.
        let mut hasher = Sha256::new();
        hasher.update(b"iotgate device key sealing v1");
        hasher.update(server_secret);
        let key: [u8; 32] = hasher.finalize().into();
        Self {
            cipher: chacha20poly1305::ChaCha20Poly1305::new(&key.into()),
        }
    }

    pub fn seal(&self, access_key: &str) -> String {
        use chacha20poly1305::aead::Aead;
        let nonce = random_bytes::<12>();
        let sealed = self
            .cipher
            .encrypt(&nonce.into(), access_key.as_bytes())
            .expect("sealing a short key cannot fail");
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        format!(
            "{SEALED_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    pub fn unseal(&self, sealed: &str) -> Option<String> {
        use chacha20poly1305::aead::Aead;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed.strip_prefix(SEALED_PREFIX)?)
            .ok()?;
        if bytes.len() < 12 {
            return None;
        }
        let (nonce, sealed) = bytes.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().ok()?;
        let plain = self.cipher.decrypt(&nonce.into(), sealed).ok()?;
        String::from_utf8(plain).ok()
    }
}

/// A shared-access signature, as Azure IoT devices send them:
/// `SharedAccessSignature sr={resource}&sig={signature}&se={expiry}` (fields in any order,
/// others such as `skn` ignored), with `sr` and `sig` URL-encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedAccessSignature {
    /// `sr` exactly as it appears in the token (URL-encoded): what was signed.
    pub signed_resource: String,
    /// `sr` decoded: what the resource template is matched against.
    pub resource: String,
    pub signature: Vec<u8>,
    /// `se`: seconds since the UNIX epoch.
    pub expiry: u64,
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Reads a shared-access signature; `None` when it is not one.
pub fn parse_sas(value: &str) -> Option<SharedAccessSignature> {
    let fields = value
        .trim()
        .strip_prefix("SharedAccessSignature")?
        .trim_start();
    let (mut sr, mut sig, mut se) = (None, None, None);
    for pair in fields.split('&') {
        let (name, value) = pair.split_once('=')?;
        match name {
            "sr" => sr = Some(value),
            "sig" => sig = Some(value),
            "se" => se = Some(value),
            _ => {}
        }
    }
    let signed_resource = sr?.to_owned();
    let resource = percent_decode(&signed_resource)?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(percent_decode(sig?)?)
        .ok()?;
    let expiry = se?.parse().ok()?;
    Some(SharedAccessSignature {
        signed_resource,
        resource,
        signature,
        expiry,
    })
}

/// The signature a device computes: HMAC-SHA-256 over `<sr as sent>\n<se>`, keyed by the bytes
/// of its access key (base64url-decoded, as Azure's samples base64-decode theirs).
pub fn sas_signature(access_key: &str, signed_resource: &str, expiry: u64) -> Option<[u8; 32]> {
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(access_key.trim_end_matches('='))
        .ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(signed_resource.as_bytes());
    mac.update(b"\n");
    mac.update(expiry.to_string().as_bytes());
    Some(mac.finalize().into_bytes().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_round_trip_and_need_the_secret() {
        let sealer = KeySealer::new(b"secret-one");
        let sealed = sealer.seal("key-material");
        assert_eq!(sealer.unseal(&sealed).as_deref(), Some("key-material"));
        assert_eq!(KeySealer::new(b"secret-two").unseal(&sealed), None);
    }

    #[test]
    fn shared_access_signatures_parse_and_verify() {
        let key = generate_access_key();
        let resource = "devices%2Fdev-1";
        let expiry = 1_900_000_000u64;
        let sig = sas_signature(&key, resource, expiry).unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode(sig);
        let token = format!(
            "SharedAccessSignature sr={resource}&sig={}&se={expiry}&skn=ignored",
            encoded
                .replace('+', "%2B")
                .replace('/', "%2F")
                .replace('=', "%3D")
        );
        let parsed = parse_sas(&token).unwrap();
        assert_eq!(parsed.resource, "devices/dev-1");
        assert_eq!(parsed.expiry, expiry);
        assert!(constant_time_eq(&parsed.signature, &sig));
        assert_eq!(parse_sas("Bearer abc"), None);
        assert_eq!(parse_sas("SharedAccessSignature sr=x&se=1"), None);
    }

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
