//! Runtime settings: flags that mirror environment variables. Definitions are not settings; they
//! live in the database and change through the API.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "iotgate",
    version,
    about = "IoT device pipeline: WebSocket listeners, sentinel authentication, routes and downstream modules"
)]
pub struct Config {
    /// Address of the main port: admin API, UI, metrics and path-mounted listeners.
    #[arg(long, env = "IOTGATE_BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,
    /// Directory for the SQLite database and the server secret.
    #[arg(long, env = "IOTGATE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Database URL; defaults to sqlite://<data-dir>/iotgate.db.
    #[arg(long, env = "IOTGATE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Password of the first admin user, used only when the database has no user yet.
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
    /// Log line format: text for people, json for log shippers.
    #[arg(long, env = "IOTGATE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}
