//! The server secret: 32 random bytes in `<data-dir>/server.secret`, created on first start.
//! It keys the access-key HMAC and seals client-mode listener passwords. It is kept out of the
//! database on purpose, so a copied database alone reveals nothing usable.

use std::io::Write;
use std::path::Path;

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

impl ServerSecret {
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SecretError> {
        let path = data_dir.join("server.secret");
        let io = |source| SecretError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let bytes: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| SecretError::Malformed(path.display().to_string()))?;
                Ok(Self(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = iotgate_core::credentials::random_bytes::<32>();
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    options.mode(0o600);
                }
                let mut file = options.open(&path).map_err(io)?;
                file.write_all(&bytes).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok(Self(bytes))
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}
