//! TLS on the main port (`--tls-cert-file`, `--tls-key-file`): the admin UI, the API, live
//! subscribers and path-mounted listeners over HTTPS/WSS, with rustls.
//!
//! Certificates are renewed while the server runs (ACME clients replace the files every few
//! weeks), so the certificate is served through a resolver that holds the current one, and
//! SIGHUP reads the files again. A renewal that fails to load (half-written file, key that does
//! not fit) keeps the old certificate and says so in the log: a bad renewal must not take the
//! admin UI down.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The main port's certificate, replaceable at run time.
#[derive(Debug)]
pub struct ReloadableCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
}

fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<CertifiedKey> {
    let open = |path: &Path| {
        std::fs::File::open(path)
            .map(std::io::BufReader::new)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))
    };
    let certs = rustls_pemfile::certs(&mut open(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{} is not PEM: {e}", cert_file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert_file.display());
    }
    let key = rustls_pemfile::private_key(&mut open(key_file)?)
        .map_err(|e| anyhow::anyhow!("{} is not PEM: {e}", key_file.display()))?
        .ok_or_else(|| anyhow::anyhow!("{} holds no private key", key_file.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
        anyhow::anyhow!(
            "the certificate {} and the key {} do not fit together: {e}",
            cert_file.display(),
            key_file.display()
        )
    })
}

impl ReloadableCertificate {
    pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<Self>> {
        let current = load(cert_file, key_file)?;
        Ok(Arc::new(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: ArcSwap::from_pointee(current),
        }))
    }

    /// Reads the files again; on failure the certificate in use stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let fresh = load(&self.cert_file, &self.key_file)?;
        self.current.store(Arc::new(fresh));
        Ok(())
    }

    /// A server configuration that always presents the current certificate.
    pub fn server_config(self: &Arc<Self>) -> rustls::ServerConfig {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config
    }

    /// Reloads on every SIGHUP until `stop`.
    #[cfg(unix)]
    pub fn reload_on_sighup(
        self: Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    received = hangups.recv() => {
                        if received.is_none() {
                            break;
                        }
                        match self.reload() {
                            Ok(()) => tracing::info!(cert = %self.cert_file.display(), "TLS certificate reloaded"),
                            Err(error) => tracing::error!(error = format!("{error:#}"), "TLS certificate not reloaded; the previous one stays in use"),
                        }
                    }
                }
            }
        }))
    }
}

impl ResolvesServerCert for ReloadableCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
