//! Runtime settings: flags that mirror environment variables. Definitions are not settings; they
//! live in the database and change through the API. The README's flag table is checked against
//! these flags by `tests/readme.rs`, so a flag added here must be documented there too.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The server's settings: what `iotgate` with no subcommand takes (the binary's command line
/// flattens them next to its client subcommands).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Address of the main port: admin API, UI, metrics and path-mounted listeners.
    #[arg(long, env = "IOTGATE_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    /// Directory for the SQLite database and the server secret.
    #[arg(long, env = "IOTGATE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Database URL; supported schemes: sqlite:, postgres: (postgresql:). Defaults to
    /// sqlite://<data-dir>/iotgate.db. Nodes sharing one PostgreSQL database must share the
    /// server secret too.
    #[arg(long, env = "IOTGATE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// The server secret's file; created when missing, unless the database already records
    /// another secret. Nodes sharing one database must use copies of the same file. Default:
    /// <data-dir>/server.secret.
    #[arg(long, env = "IOTGATE_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// NATS server carrying live traffic between nodes (e.g. nats://127.0.0.1:4222): a live
    /// subscriber on any node then receives what every node ingests. Without it, live views show
    /// their own node's traffic.
    #[arg(long, env = "IOTGATE_BUS_URL")]
    pub bus_url: Option<String>,
    /// Added to every own port a listener names (not to 0), so several nodes of one platform
    /// can run on one machine: with 100, a listener's port 9001 is bound as 9101.
    #[arg(long, env = "IOTGATE_PORT_OFFSET", default_value_t = 0)]
    pub port_offset: u16,
    /// Password of the first admin user, used only when the database has no user yet; generated
    /// and printed when unset. Prefer the environment variable: a flag shows in `ps`.
    #[arg(long, env = "IOTGATE_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// Extra PEM CA certificates trusted by client-mode listeners and webhooks (private PKI).
    #[arg(long, env = "IOTGATE_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Device connections over all listeners (0 = unlimited).
    #[arg(long, env = "IOTGATE_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// Device connections from one source address (0 = unlimited). Fleets behind one NAT
    /// address need this raised.
    #[arg(long, env = "IOTGATE_MAX_CONNECTIONS_PER_IP", default_value_t = 1_000)]
    pub max_connections_per_ip: usize,
    /// New device connections per second from one address, with bursts of the same size
    /// (0 = unlimited).
    #[arg(long, env = "IOTGATE_CONNECT_RATE_PER_IP", default_value_t = 500)]
    pub connect_rate_per_ip: u32,
    /// Milliseconds a client has to send its whole request head (and finish TLS); slower
    /// clients (slowloris) are dropped.
    #[arg(long, env = "IOTGATE_HANDSHAKE_TIMEOUT_MS", default_value_t = 5_000)]
    pub handshake_timeout_ms: u64,
    /// Dead letters kept; beyond it the oldest are deleted (rejected traffic cannot fill the
    /// disk).
    #[arg(long, env = "IOTGATE_DEAD_LETTER_MAX_ROWS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub dead_letter_max_rows: u64,
    /// Size of the dead-letter table (payloads and messages, about bytes); beyond it the oldest
    /// are deleted.
    #[arg(long, env = "IOTGATE_DEAD_LETTER_MAX_BYTES", default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub dead_letter_max_bytes: u64,
    /// Rejected messages written as dead letters per second from one source address (bursts of
    /// ten times that); the rest are counted, not stored (0 = unlimited).
    #[arg(long, env = "IOTGATE_DEAD_LETTER_RATE_PER_IP", default_value_t = 10)]
    pub dead_letter_rate_per_ip: u32,
    /// A directory of static files (a dashboard, device firmware, docs) served on the main port
    /// under --static-mount; off when not given.
    #[arg(long, env = "IOTGATE_STATIC_DIR")]
    pub static_dir: Option<PathBuf>,
    /// Where --static-dir is served: a path that no API route, the admin UI or a listener uses.
    #[arg(long, env = "IOTGATE_STATIC_MOUNT", default_value = "/site")]
    pub static_mount: String,
    /// Reverse proxies and load balancers (CIDR blocks or addresses, comma-separated) whose
    /// `Forwarded` / `X-Forwarded-For` / `X-Forwarded-Proto` headers, and PROXY protocol
    /// headers, are believed. From any other peer they are ignored. Default: none.
    #[arg(long, env = "IOTGATE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Vec<String>,
    /// PEM certificate chain: the main port serves HTTPS/WSS. Reloaded on SIGHUP.
    #[arg(long, env = "IOTGATE_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "IOTGATE_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Serve /metrics on the main port without authentication. Off by default: /metrics then
    /// needs a token (any role), or use --metrics-bind.
    #[arg(long, env = "IOTGATE_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// A separate address that serves only /metrics, without authentication (for a scraper
    /// on a private network).
    #[arg(long, env = "IOTGATE_METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,
    /// Days the audit log keeps its rows (0 = forever).
    #[arg(long, env = "IOTGATE_AUDIT_RETENTION_DAYS", default_value_t = 90)]
    pub audit_retention_days: u32,
    /// Basic credentials that need a fresh Argon2 verification, per source address per minute,
    /// over all listeners (0 = unlimited). Verified credentials are cached and not counted.
    #[arg(long, env = "IOTGATE_AUTH_FAILURES_PER_IP", default_value_t = 20)]
    pub auth_failures_per_ip: u32,
    /// Log line format: text for people, json for log shippers.
    #[arg(long, env = "IOTGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    /// The database engine the settings name: the embedded SQLite default, or the engine of
    /// `--database-url`. Checked before anything starts, so a URL for an engine this build cannot
    /// use is refused with the list of those it can, not with a driver's "unable to open".
    pub fn database_engine(&self) -> Result<DatabaseEngine, UnsupportedDatabaseUrl> {
        match &self.database_url {
            None => Ok(DatabaseEngine::Sqlite),
            Some(url) => DatabaseEngine::from_url(url),
        }
    }
}

/// The database engines iotgate can keep its data in, told apart by the URL's scheme. Adding an
/// engine means a variant here, its scheme(s) in [`DatabaseEngine::from_url`], and a store that
/// opens it (`iotgate_store::Engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseEngine {
    /// `sqlite://path`, `sqlite:path`, `sqlite::memory:`: the embedded default.
    Sqlite,
    /// `postgres://user@host:port/database` (or `postgresql://`): several nodes share it.
    Postgres,
}

impl DatabaseEngine {
    /// Every engine this build supports, in the order messages name them.
    pub const ALL: &'static [DatabaseEngine] = &[DatabaseEngine::Sqlite, DatabaseEngine::Postgres];

    /// The URL scheme (without the colon) that selects the engine.
    pub fn scheme(self) -> &'static str {
        match self {
            DatabaseEngine::Sqlite => "sqlite",
            DatabaseEngine::Postgres => "postgres",
        }
    }

    /// Which engine a database URL is for. Only the scheme is read, and only the scheme is put in
    /// the error: the rest of a URL may hold a password.
    pub fn from_url(url: &str) -> Result<Self, UnsupportedDatabaseUrl> {
        let scheme = url
            .split_once(':')
            .map(|(scheme, _)| scheme)
            .filter(|scheme| is_uri_scheme(scheme));
        let Some(scheme) = scheme else {
            return Err(UnsupportedDatabaseUrl::NoScheme);
        };
        if scheme == "postgresql" {
            return Ok(DatabaseEngine::Postgres);
        }
        DatabaseEngine::ALL
            .iter()
            .copied()
            .find(|engine| engine.scheme() == scheme)
            .ok_or_else(|| UnsupportedDatabaseUrl::Scheme(scheme.to_owned()))
    }
}

/// RFC 3986: a letter, then letters, digits, `+`, `-` or `.`.
fn is_uri_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// "sqlite:, postgres:", for messages.
fn supported_schemes() -> String {
    DatabaseEngine::ALL
        .iter()
        .map(|engine| format!("{}:", engine.scheme()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A database URL this build cannot open. The message names the supported schemes and never
/// repeats the URL (it may carry credentials).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnsupportedDatabaseUrl {
    #[error("the database URL scheme `{0}:` is not supported; supported: {schemes} (for example sqlite://./data/iotgate.db or postgres://iotgate@127.0.0.1:5432/iotgate)", schemes = supported_schemes())]
    Scheme(String),
    #[error("the database URL has no scheme; supported: {schemes} (for example sqlite://./data/iotgate.db or postgres://iotgate@127.0.0.1:5432/iotgate)", schemes = supported_schemes())]
    NoScheme,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_in_every_form_sqlx_accepts_are_sqlite() {
        for url in [
            "sqlite://./data/iotgate.db",
            "sqlite:data.db",
            "sqlite::memory:",
        ] {
            assert_eq!(
                DatabaseEngine::from_url(url),
                Ok(DatabaseEngine::Sqlite),
                "{url}"
            );
        }
    }

    #[test]
    fn postgres_urls_in_both_spellings_are_postgres() {
        for url in [
            "postgres://iotgate@127.0.0.1:5432/iotgate",
            "postgresql://app:pw@db.example/iotgate?sslmode=require",
        ] {
            assert_eq!(
                DatabaseEngine::from_url(url),
                Ok(DatabaseEngine::Postgres),
                "{url}"
            );
        }
    }

    #[test]
    fn other_schemes_are_refused_by_name_without_the_rest_of_the_url() {
        let error = DatabaseEngine::from_url("mysql://app:s3cret@db.example/iotgate")
            .expect_err("mysql is not supported");
        assert_eq!(error, UnsupportedDatabaseUrl::Scheme("mysql".into()));
        let message = error.to_string();
        assert!(
            message.contains("`mysql:`") && message.contains("supported: sqlite:, postgres:"),
            "{message}"
        );
        assert!(!message.contains("s3cret"), "{message}");
        assert_eq!(
            DatabaseEngine::from_url("SQLite://x.db"),
            Err(UnsupportedDatabaseUrl::Scheme("SQLite".into())),
            "sqlx reads only the lower-case scheme"
        );
    }

    #[test]
    fn a_bare_path_has_no_scheme() {
        for url in ["./data/iotgate.db", "/var/lib/iotgate/db:1", ""] {
            assert_eq!(
                DatabaseEngine::from_url(url),
                Err(UnsupportedDatabaseUrl::NoScheme),
                "{url}"
            );
        }
    }
}
