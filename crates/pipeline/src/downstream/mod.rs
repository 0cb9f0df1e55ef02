//! Downstream modules: where routed envelopes go.
//!
//! - [`store`]: the built-in telemetry table, written in batches; durable.
//! - [`subscribers`]: the `websocket` type, live subscribers fed from a broadcast hub; not durable.
//! - [`webhook`]: HTTP POST of each envelope with retries; durable.
//! - [`nats`]: NATS publishes; durable with JetStream (publish acknowledgements).
//! - [`mqtt`]: MQTT publishes; durable with QoS 1 (PUBACK).
//! - [`ws_client`]: the `websocket-client` type, frames sent to a remote server; not durable.
//! - [`devices`]: the `devices` type, messages sent to device connections; not durable.
//!
//! Durable modules sit behind a bounded queue of [`Delivery`]s: a full queue makes `deliver` wait,
//! which stops the device connection from reading further, so memory stays flat under a slow
//! sink. A delivery for a message a device waits on (`acknowledge: stored`) carries a
//! [`Receipt`] the module settles once the message is committed or refused.

mod devices;
pub mod link;
mod mqtt;
mod nats;
mod retention;
mod store;
mod subscribers;
mod webhook;
mod ws_client;

use std::sync::Arc;
use std::time::Instant;

use iotgate_core::definition::{DownstreamDefinition, DownstreamType};
use iotgate_core::Envelope;
use iotgate_store::Store;
use tokio::sync::mpsc;
use tracing::Instrument as _;

pub use devices::DeviceSender;
pub use link::{LinkState, LinkStatus, LinkStatusView, ProbeReport};
pub use subscribers::{
    encode, DeliveryMode, FrameBody, SubscriberFilter, SubscriberFrame, SubscriberHub, Subscription,
};

use crate::ack::Receipt;
use crate::deadletter::DeadLetters;
use crate::metrics::{DownstreamCounters, Metrics};

/// One envelope handed to a durable downstream module.
#[derive(Debug)]
pub struct Delivery {
    pub envelope: Arc<Envelope>,
    /// Present when a device waits for this module to commit the message.
    pub receipt: Option<Receipt>,
    /// When it entered the module's queue: a device's wait is measured from here.
    pub queued_at: Instant,
}

/// Why an envelope could not be handed to a downstream module.
#[derive(Debug, thiserror::Error)]
#[error("downstream {0} has stopped")]
pub struct DownstreamStopped(pub Arc<str>);

/// A running downstream module, as the router sees it.
#[derive(Debug, Clone)]
pub enum Downstream {
    /// A module behind a bounded queue (store, webhook, nats, mqtt, websocket-client).
    Queue {
        key: Arc<str>,
        sender: mpsc::Sender<Delivery>,
        counters: DownstreamCounters,
        /// Whether it commits what it takes (acknowledging listeners wait for it).
        durable: bool,
        /// The connection of a module that connects out.
        status: Option<Arc<LinkStatus>>,
    },
    Subscribers(Arc<SubscriberHub>),
    /// Sends to device connections (the `devices` type).
    Devices(Arc<DeviceSender>),
}

/// What building a downstream needs from the platform.
#[derive(Clone, Debug)]
pub struct DownstreamContext {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub dead_letters: DeadLetters,
    pub http: reqwest::Client,
    pub runtime: tokio::runtime::Handle,
    /// TLS settings for modules that connect out (wss://, mqtts://, tls://).
    pub client_tls: Arc<rustls::ClientConfig>,
    /// The bus to other nodes (`--bus-url`), for websocket and devices downstreams.
    pub bus: Option<crate::bus::LiveBus>,
    /// The open device connections, for devices downstreams.
    pub connections: Arc<crate::connections::ConnectionHub>,
}

impl Downstream {
    /// Builds and starts the module. The returned task (if any) ends after the module's queue is
    /// closed (every sender dropped) and drained.
    pub fn start(
        definition: &DownstreamDefinition,
        context: &DownstreamContext,
    ) -> (Self, Option<tokio::task::JoinHandle<()>>) {
        let key: Arc<str> = Arc::from(definition.key.as_str());
        let counters = context.metrics.downstream(&definition.key);
        let span =
            tracing::info_span!("downstream", key = %key, kind = ?definition.downstream_type);
        let (sender, receiver) = match definition.downstream_type {
            DownstreamType::Websocket => {
                return (
                    Downstream::Subscribers(Arc::new(SubscriberHub::new(
                        definition,
                        &context.metrics,
                        context.bus.clone(),
                    ))),
                    None,
                )
            }
            DownstreamType::Devices => {
                return (
                    Downstream::Devices(Arc::new(DeviceSender::new(
                        definition,
                        context.connections.clone(),
                        counters,
                        context.bus.clone(),
                    ))),
                    None,
                )
            }
            DownstreamType::Store
            | DownstreamType::Webhook
            | DownstreamType::Nats
            | DownstreamType::Mqtt
            | DownstreamType::WebsocketClient => mpsc::channel(definition.queue_capacity),
        };
        let status = matches!(
            definition.downstream_type,
            DownstreamType::Nats | DownstreamType::Mqtt | DownstreamType::WebsocketClient
        )
        .then(|| Arc::new(LinkStatus::new(&definition.key)));
        let settler = status.as_ref().map(|status| link::Settler {
            key: key.clone(),
            context: context.clone(),
            counters: counters.clone(),
            status: status.clone(),
            timeout: std::time::Duration::from_millis(definition.timeout_ms),
        });
        let task = match definition.downstream_type {
            DownstreamType::Store => {
                let module = store::StoreModule::new(
                    definition,
                    context.store.clone(),
                    counters.clone(),
                    context.metrics.latency.clone(),
                );
                context.runtime.spawn(module.run(receiver).instrument(span))
            }
            DownstreamType::Webhook => context.runtime.spawn(
                webhook::run_webhook(
                    definition.clone(),
                    context.clone(),
                    receiver,
                    counters.clone(),
                )
                .instrument(span),
            ),
            DownstreamType::Nats => context.runtime.spawn(
                nats::run_nats(
                    definition.clone(),
                    settler.expect("built for this type"),
                    context.client_tls.clone(),
                    receiver,
                )
                .instrument(span),
            ),
            DownstreamType::Mqtt => context.runtime.spawn(
                mqtt::run_mqtt(
                    definition.clone(),
                    settler.expect("built for this type"),
                    context.client_tls.clone(),
                    receiver,
                )
                .instrument(span),
            ),
            DownstreamType::WebsocketClient => context.runtime.spawn(
                ws_client::run_ws_client(
                    definition.clone(),
                    settler.expect("built for this type"),
                    context.client_tls.clone(),
                    receiver,
                )
                .instrument(span),
            ),
            DownstreamType::Websocket | DownstreamType::Devices => unreachable!("returned above"),
        };
        (
            Downstream::Queue {
                key,
                sender,
                counters,
                durable: definition.is_durable(),
                status,
            },
            Some(task),
        )
    }

    pub fn key(&self) -> &Arc<str> {
        match self {
            Downstream::Queue { key, .. } => key,
            Downstream::Subscribers(hub) => &hub.key,
            Downstream::Devices(sender) => &sender.key,
        }
    }

    /// True when the module commits what it receives, so an acknowledging listener waits for it.
    pub fn is_durable(&self) -> bool {
        matches!(self, Downstream::Queue { durable: true, .. })
    }

    /// The connection status of a module that connects out (nats, mqtt, websocket-client).
    pub fn link_status(&self) -> Option<LinkStatusView> {
        match self {
            Downstream::Queue {
                status: Some(status),
                ..
            } => Some(status.view()),
            _ => None,
        }
    }

    /// Hands an envelope over; waits while the module's queue is full (backpressure). A receipt
    /// given to a module that has stopped is dropped with the error, which refuses the message.
    pub async fn deliver(
        &self,
        envelope: Arc<Envelope>,
        receipt: Option<Receipt>,
    ) -> Result<(), DownstreamStopped> {
        match self {
            Downstream::Queue {
                key,
                sender,
                counters,
                ..
            } => {
                counters.queue_depth.inc();
                let delivery = Delivery {
                    envelope,
                    receipt,
                    queued_at: Instant::now(),
                };
                if sender.send(delivery).await.is_err() {
                    counters.queue_depth.dec();
                    return Err(DownstreamStopped(key.clone()));
                }
                Ok(())
            }
            Downstream::Subscribers(hub) => {
                hub.publish(&envelope);
                Ok(())
            }
            Downstream::Devices(sender) => {
                sender.send(&envelope).await;
                Ok(())
            }
        }
    }
}

/// Tries a definition's connection once without starting it: connect, authenticate, publish a
/// probe. `None` for types that do not connect out.
pub async fn probe(
    definition: &DownstreamDefinition,
    client_tls: &Arc<rustls::ClientConfig>,
) -> Option<ProbeReport> {
    Some(match definition.downstream_type {
        DownstreamType::Nats => nats::probe(definition, client_tls).await,
        DownstreamType::Mqtt => mqtt::probe(definition, client_tls).await,
        DownstreamType::WebsocketClient => ws_client::probe(definition, client_tls).await,
        DownstreamType::Store
        | DownstreamType::Websocket
        | DownstreamType::Webhook
        | DownstreamType::Devices => return None,
    })
}
