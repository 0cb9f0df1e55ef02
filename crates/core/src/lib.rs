//! The vocabulary every iotgate crate shares: the [`Envelope`] that carries one device message
//! through the pipeline, the definition kinds an operator stores ([`ListenerDefinition`],
//! [`SentinelDefinition`], [`RouteDefinition`], [`DownstreamDefinition`]), the JSON Schema registry
//! that validates them, and the credential primitives used by the device registry.
//!
//! This crate knows nothing about HTTP or databases, so validation and matching stay pure and can
//! be tested and fuzzed on their own.

pub mod compression_settings;
pub mod credentials;
pub mod definition;
pub mod env_subst;
pub mod envelope;
pub mod log_safe;
pub mod message_id;
pub mod origin;
pub mod schema;
#[cfg(test)]
mod test_listeners;
pub mod websocket_settings;

pub use definition::{
    AcknowledgeMode, Definition, DefinitionKind, DeviceIdentity, DownstreamDefinition,
    DownstreamType, ListenerDefinition, ListenerMode, Locator, LocatorSource, MessageIdRule,
    MessageTypeSelector, RouteDefinition, SentinelDefinition, SentinelMethod, SubscriberFormat,
};
pub use envelope::{ConnectionMetadata, ContentType, Envelope, Payload};
pub use message_id::{InvalidMessageId, MessageId};
pub use schema::{Problem, SchemaRegistry};
