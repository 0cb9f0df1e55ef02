//! WebSocket listener modules.
//!
//! - [`server`]: devices connect to iotgate, on the main port at the listener's path or on an own
//!   port (optionally TLS). The upgrade is checked in a fixed order (path, origin, Basic
//!   credentials, sub-protocol) and each connection runs as one task that reads, decodes and hands
//!   messages to the pipeline, with heartbeats and size limits.
//! - [`client`]: iotgate connects out to a remote WebSocket server and reconnects with
//!   exponential backoff and jitter; received messages enter the pipeline like server messages.
//! - [`subscriber`]: admin-token WebSocket subscribers of a websocket downstream module.

pub mod acks;
pub mod attempts;
pub mod basic_auth;
pub mod client;
pub mod client_address;
mod connection;
pub mod deflate;
pub mod frame_guard;
pub mod limits;
pub mod own_port;
pub mod proxy_protocol;
pub mod server;
pub mod status;
pub mod subscriber;
mod timers;
pub mod webpubsub;

pub use attempts::AttemptLimiter;
pub use basic_auth::{BasicCredentialVerifier, BasicOutcome};
pub use client::ClientListener;
pub use client_address::{ClientInfo, TrustedProxies};
pub use limits::{ConnectionLimitSettings, ConnectionLimits};
pub use server::ServerListener;
pub use status::{ListenerState, ListenerStatus, ListenerStatusView};
