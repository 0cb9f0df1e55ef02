//! The message path after a listener: the in-memory [`DeviceRegistry`], the [`Sentinel`] that
//! identifies and authenticates each device, the [`Router`] that selects downstream modules, the
//! downstream modules themselves, dead letters, and metrics.
//!
//! The hot path (`Pipeline::ingest`) touches no database and no slow hash: the registry is a
//! memory map of HMAC digests, the topology (sentinels, routes, downstreams) is an atomically
//! swapped snapshot, and every queue is bounded so a slow sink pushes back on the device socket.

pub mod deadletter;
pub mod downstream;
pub mod metrics;
pub mod pipeline;
pub mod registry;
pub mod rejection;
pub mod router;
pub mod sentinel;

pub use deadletter::DeadLetters;
pub use downstream::{Downstream, SubscriberFrame, SubscriberHub};
pub use metrics::{ListenerCounters, Metrics};
pub use pipeline::{ConnectionAuth, IngestError, ListenerContext, Pipeline, Topology};
pub use registry::{DeviceRegistry, RegisteredDevice};
pub use rejection::{Rejection, RejectionCode};
pub use router::Router;
pub use sentinel::{ConnectTimeValues, ConnectionCredentials, DeviceBinding, Sentinel};
