//! The vocabulary every iotgate crate shares: the [`Envelope`] that carries one device message
//! through the pipeline, the definition kinds an operator stores ([`ListenerDefinition`],
//! [`SentinelDefinition`], [`RouteDefinition`], [`DownstreamDefinition`]), the JSON Schema registry
//! that validates them, and the credential primitives used by the device registry.
//!
//! This crate knows nothing about HTTP or databases, so validation and matching stay pure and can
//! be tested and fuzzed on their own.

pub mod credentials;
pub mod definition;
pub mod envelope;
pub mod schema;

pub use definition::{
    Definition, DefinitionKind, DownstreamDefinition, DownstreamType, ListenerDefinition,
    ListenerMode, Locator, LocatorSource, MessageTypeSelector, RouteDefinition, SentinelDefinition,
    SentinelMethod, SubscriberFormat,
};
pub use envelope::{ConnectionMetadata, ContentType, Envelope, Payload};
pub use schema::{Problem, SchemaRegistry};
