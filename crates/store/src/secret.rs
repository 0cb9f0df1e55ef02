//! The server secret: 32 random bytes in a file (`<data-dir>/server.secret` unless
//! `--secret-file` says otherwise), created on first start. It keys the access-key HMAC and seals
//! client-mode listener passwords and device keys. It is kept out of the database on purpose, so
//! a copied database alone reveals nothing usable.
//!
//! Nodes sharing one database must share the secret, or each would refuse the devices the others
//! registered. The database therefore keeps a check value (an HMAC of a fixed text under the
//! secret, which reveals nothing of it) and a node whose secret gives another value refuses to
//! start; see [`Store::settle_secret_check`].

use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::engine::{on_pool, Columns};
use crate::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("could not read or write the server secret at {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the server secret at {0} is not 32 bytes; restore it from backup (access keys depend on it)")]
    Malformed(String),
}

#[derive(Clone)]
pub struct ServerSecret([u8; 32]);

impl std::fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerSecret(<redacted>)")
    }
}

/// The text whose HMAC under the secret is the check value.
const CHECK_TEXT: &[u8] = b"iotgate server secret check v1";

impl ServerSecret {
    /// Where the secret lives by default: beside the SQLite database.
    pub fn default_path(data_dir: &Path) -> PathBuf {
        data_dir.join("server.secret")
    }

    /// Reads the secret at `path`, or creates one there when there is no file.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        match Self::load(path)? {
            Some(secret) => Ok(secret),
            None => Self::create(path),
        }
    }

    /// Reads the secret at `path`; `None` when there is no file.
    pub fn load(path: &Path) -> Result<Option<Self>, SecretError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let bytes: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| SecretError::Malformed(path.display().to_string()))?;
                Ok(Some(Self(bytes)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SecretError::Io {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Creates a new random secret at `path` (readable by its owner alone); fails if a file is
    /// already there.
    pub fn create(path: &Path) -> Result<Self, SecretError> {
        let io = |source| SecretError::Io {
            path: path.display().to_string(),
            source,
        };
        let bytes = iotgate_core::credentials::random_bytes::<32>();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(Self(bytes))
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The check value kept in the database: hex HMAC-SHA-256 of a fixed text under the secret.
    pub fn check_value(&self) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key size");
        mac.update(CHECK_TEXT);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// What the database said about a secret's check value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretCheck {
    /// The database had none (first start, or a database from before checks): this one is kept.
    Recorded,
    /// The database holds the same check value.
    Matches,
    /// The database was set up with another secret.
    Mismatch,
}

impl Store {
    /// The check value the database holds, if any.
    pub async fn secret_check(&self) -> Result<Option<String>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query("SELECT value FROM server_settings WHERE name = 'secret_check'")
                .fetch_optional(pool)
                .await?;
            Ok(row.map(|row| row.col_at(0)).transpose()?)
        })
    }

    /// Compares `check` with the database's check value, recording it when there is none. Two
    /// nodes starting at once with different secrets cannot both record theirs: the insert keeps
    /// the first, and the second then reads it and sees the mismatch.
    pub async fn settle_secret_check(&self, check: &str) -> Result<SecretCheck, StoreError> {
        let inserted = on_pool!(self, pool => sqlx::query(
            "INSERT INTO server_settings (name, value) VALUES ('secret_check', $1) ON CONFLICT (name) DO NOTHING",
        )
        .bind(check)
        .execute(pool)
        .await?
        .rows_affected());
        if inserted == 1 {
            return Ok(SecretCheck::Recorded);
        }
        match self.secret_check().await? {
            Some(stored) if stored == check => Ok(SecretCheck::Matches),
            _ => Ok(SecretCheck::Mismatch),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_value_depends_on_the_secret_and_does_not_contain_it() {
        let a = ServerSecret([7; 32]);
        let b = ServerSecret([8; 32]);
        assert_eq!(a.check_value(), a.check_value());
        assert_ne!(a.check_value(), b.check_value());
        assert_eq!(a.check_value().len(), 64);
        let secret_hex: String = a.0.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!a.check_value().contains(&secret_hex[..16]));
    }
}
