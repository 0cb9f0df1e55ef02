//! Admin passwords: Argon2id at the OWASP parameters, hashed and verified on the blocking pool,
//! and the rules a new password must meet.

use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Shortest admin password accepted, at bootstrap and on every change. Twelve characters is
/// what current guidance (NIST SP 800-63B, OWASP) asks of passwords that guard administration.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted: Argon2 takes any length, but a megabyte "password" is an attack.
pub const MAX_PASSWORD_CHARS: usize = 1024;

/// Argon2id at the OWASP parameters (m=19456 KiB, t=2, p=1).
pub fn argon2() -> Argon2<'static> {
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(19_456, 2, 1, None).expect("valid Argon2 parameters"),
    )
}

/// Hashes a password (blocking: call from the blocking pool or at start-up).
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .expect("Argon2 hashing of a bounded password cannot fail")
        .to_string()
}

/// Hashes on the blocking pool.
pub async fn hash_password_async(password: String) -> anyhow::Result<String> {
    Ok(tokio::task::spawn_blocking(move || hash_password(&password)).await?)
}

/// Why a new password is refused, in words for the person choosing it; `None` when it is fine.
pub fn password_problem(password: &str) -> Option<String> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Some(format!(
            "a password needs at least {MIN_PASSWORD_CHARS} characters (this one has {chars})"
        ));
    }
    if chars > MAX_PASSWORD_CHARS {
        return Some(format!(
            "a password can have at most {MAX_PASSWORD_CHARS} characters"
        ));
    }
    if password.trim().is_empty() {
        return Some("a password cannot be only spaces".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_rules() {
        assert!(password_problem("short-pass1").is_some(), "11 characters");
        assert!(password_problem("change-me-now").is_none(), "13 characters");
        assert!(password_problem("e2e-Admin-Passw0rd!").is_none());
        assert!(password_problem("            ").is_some());
        assert!(password_problem(&"x".repeat(1025)).is_some());
        // Characters, not bytes: twelve two-byte characters are twelve.
        assert!(password_problem(&"é".repeat(12)).is_none());
    }
}
