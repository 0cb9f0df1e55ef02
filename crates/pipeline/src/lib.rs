//! The message path after a listener: the in-memory [`DeviceRegistry`], the [`Sentinel`] that
//! identifies and authenticates each device, the [`Router`] that selects downstream modules, the
//! downstream modules themselves, dead letters, and metrics.
//!
//! The hot path (`Pipeline::ingest`) touches no database and no slow hash: the registry is a
//! memory map of HMAC digests, the topology (sentinels, routes, downstreams) is an atomically
//! swapped snapshot, and every queue is bounded so a slow sink pushes back on the device socket.

pub mod ack;
pub mod auth_failures;
pub mod bus;
pub mod connections;
pub mod deadletter;
pub mod downstream;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod presence;
pub mod registry;
pub mod rejection;
pub mod router;
pub mod sentinel;
pub mod sessions;
pub mod token;

pub use ack::{AckOutcome, AckResult, AckStatus, OutcomeSender};
pub use auth_failures::AuthFailureTally;
pub use connections::{
    ConnectionHub, Delivery, Downlink, DownlinkBody, DownlinkReceiver, DownlinkSource, PlainFrame,
    Registration,
};
pub use deadletter::{DeadLetterLimits, DeadLetters, KeepPayload};
pub use downstream::{Downstream, SubscriberFrame, SubscriberHub};
pub use metrics::{ListenerCounters, Metrics};
pub use outbox::{Outbox, Queued};
pub use pipeline::{
    AckRequest, ConnectionAuth, IngestError, Ingested, ListenerContext, Pipeline, Topology,
};
pub use presence::{ConnectionPresence, PresenceEvent, PresenceKind};
pub use registry::{DeviceRegistry, RegisteredDevice};
pub use rejection::{Rejection, RejectionCode};
pub use router::Router;
pub use sentinel::{ConnectTimeValues, ConnectionCredentials, DeviceBinding, Sentinel};
pub use sessions::{CloseCause, LiveConnections, SessionCloser};
pub use token::{permits, GroupAction, TokenVerifier};
