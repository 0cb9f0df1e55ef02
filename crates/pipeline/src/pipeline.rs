//! The pipeline as listeners see it: `ingest` takes one envelope through sentinel, router and
//! downstream modules. The topology (sentinels, routes, downstreams) is an immutable snapshot
//! swapped atomically when a definition changes, so a change never pauses message flow and
//! listeners keep their connections.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use iotgate_core::definition::ListenerDefinition;
use iotgate_core::{ContentType, Envelope, Payload};

use crate::deadletter::DeadLetters;
use crate::downstream::{Downstream, SubscriberHub};
use crate::metrics::{ListenerCounters, Metrics};
use crate::registry::DeviceRegistry;
use crate::rejection::{Rejection, RejectionCode};
use crate::router::Router;
use crate::sentinel::{ConnectTimeValues, ConnectionCredentials, DeviceBinding, Sentinel};

/// The running sentinels, routes and downstream modules at one moment.
#[derive(Debug, Default)]
pub struct Topology {
    pub sentinels: HashMap<String, Arc<Sentinel>>,
    pub router: Router,
    pub downstreams: HashMap<String, Downstream>,
}

impl Topology {
    /// The subscriber hub mounted at `path`, if a websocket downstream uses it.
    pub fn hub_at(&self, path: &str) -> Option<Arc<SubscriberHub>> {
        self.downstreams.values().find_map(|d| match d {
            Downstream::Subscribers(hub) if hub.path == path => Some(hub.clone()),
            _ => None,
        })
    }
}

/// What a listener's connections need to know about their listener.
#[derive(Debug, Clone)]
pub struct ListenerContext {
    pub key: Arc<str>,
    pub content_type: ContentType,
    pub sentinel: Option<String>,
    pub counters: ListenerCounters,
}

impl ListenerContext {
    pub fn new(definition: &ListenerDefinition, metrics: &Metrics) -> Self {
        Self {
            key: Arc::from(definition.key.as_str()),
            content_type: definition.content_type,
            sentinel: definition.sentinel.clone(),
            counters: metrics.listener(&definition.key),
        }
    }
}

/// Per-connection authentication state kept by the listener's connection task.
#[derive(Debug, Default)]
pub struct ConnectionAuth {
    pub binding: Option<DeviceBinding>,
    pub connect_values: ConnectTimeValues,
    /// Consecutive device failures.
    pub failures: u32,
    /// True once one message of this connection passed the sentinel (or credentials given at
    /// connect time did).
    pub authenticated: bool,
}

pub struct Pipeline {
    pub registry: Arc<DeviceRegistry>,
    pub dead_letters: DeadLetters,
    pub metrics: Arc<Metrics>,
    topology: ArcSwap<Topology>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").finish_non_exhaustive()
    }
}

/// The outcome the connection task acts on.
#[derive(Debug)]
pub enum IngestError {
    /// Tell the device; close the connection with 1008 when `close` is set.
    Rejected { rejection: Rejection, close: bool },
}

impl Pipeline {
    pub fn new(
        registry: Arc<DeviceRegistry>,
        dead_letters: DeadLetters,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            registry,
            dead_letters,
            metrics,
            topology: ArcSwap::from_pointee(Topology::default()),
        }
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// Installs a new topology and returns the previous one (whose downstream modules drain
    /// once its last user lets go of it).
    pub fn replace_topology(&self, topology: Topology) -> Arc<Topology> {
        self.topology.swap(Arc::new(topology))
    }

    /// Connect-time authentication for a listener with a sentinel. `Ok(None)` when the listener
    /// has no sentinel.
    pub fn authenticate_connection(
        &self,
        listener: &ListenerContext,
        request: &ConnectionCredentials,
    ) -> Result<ConnectionAuth, Rejection> {
        let Some(sentinel_key) = &listener.sentinel else {
            return Ok(ConnectionAuth::default());
        };
        let topology = self.topology.load();
        let sentinel = topology
            .sentinels
            .get(sentinel_key)
            .filter(|s| s.enabled())
            .ok_or_else(|| sentinel_unavailable(sentinel_key))?;
        let (binding, connect_values) =
            sentinel.authenticate_connection(&self.registry, request)?;
        Ok(ConnectionAuth {
            authenticated: binding.is_some(),
            binding,
            connect_values,
            failures: 0,
        })
    }

    /// Decodes a received message per the listener's content type.
    pub fn decode(content_type: ContentType, bytes: bytes::Bytes) -> Result<Payload, Rejection> {
        match content_type {
            ContentType::Json => serde_json::from_slice(&bytes)
                .map(Payload::Json)
                .map_err(|e| {
                    Rejection::new(
                        RejectionCode::MalformedJson,
                        format!("the message is not valid JSON: {e}"),
                    )
                }),
            ContentType::Text => match String::from_utf8(bytes.to_vec()) {
                Ok(text) => Ok(Payload::Text(text)),
                Err(_) => Err(Rejection::new(
                    RejectionCode::MalformedJson,
                    "the message is not valid UTF-8 text",
                )),
            },
            ContentType::Binary => Ok(Payload::Binary(bytes)),
        }
    }

    /// Takes one envelope through sentinel, router and downstream modules.
    pub async fn ingest(
        &self,
        listener: &ListenerContext,
        auth: &mut ConnectionAuth,
        mut envelope: Envelope,
    ) -> Result<(), IngestError> {
        listener.counters.received.inc();
        let topology = self.topology.load_full();

        if let Some(sentinel_key) = &listener.sentinel {
            let Some(sentinel) = topology.sentinels.get(sentinel_key).filter(|s| s.enabled())
            else {
                let rejection = sentinel_unavailable(sentinel_key);
                return Err(self
                    .reject(listener, auth, &envelope, sentinel_key, rejection, u32::MAX)
                    .await);
            };
            match sentinel.authenticate_message(
                &self.registry,
                auth.binding.as_ref(),
                &auth.connect_values,
                &mut envelope.payload,
            ) {
                Ok(device) => {
                    auth.failures = 0;
                    auth.authenticated = true;
                    if let Some(rate) = sentinel.definition.device_messages_per_second {
                        match device.reserve(rate, MAX_RATE_WAIT) {
                            // Waiting here stops this connection from reading: TCP pushes back
                            // on the device, and no other device is slowed.
                            Some(wait) if !wait.is_zero() => tokio::time::sleep(wait).await,
                            Some(_) => {}
                            None => {
                                let rejection = Rejection::new(
                                    RejectionCode::RateLimited,
                                    format!("the device exceeds {rate} messages per second"),
                                )
                                .claimed_by(&device.device_id);
                                self.metrics
                                    .rejected(&sentinel.key, RejectionCode::RateLimited)
                                    .inc();
                                listener.counters.rejected.inc();
                                return Err(IngestError::Rejected {
                                    rejection,
                                    close: false,
                                });
                            }
                        }
                    }
                    device.note_contact(unix_micros(&envelope));
                    envelope.device_id = Some(device.device_id.clone());
                    envelope.device_type = Some(device.device_type.clone());
                    envelope.authenticated = true;
                }
                Err(rejection) => {
                    let max = sentinel.max_failures();
                    return Err(self
                        .reject(listener, auth, &envelope, sentinel_key, rejection, max)
                        .await);
                }
            }
        } else {
            // A listener without a sentinel requires Basic credentials at connect time: the
            // connection is authenticated; the device is identified from the body when it names
            // a registered device.
            envelope.authenticated = true;
            let named = envelope
                .payload
                .as_json()
                .and_then(|v| v.get("deviceId"))
                .and_then(|v| v.as_str())
                .and_then(|id| self.registry.get(id));
            if let Some(device) = named {
                device.note_contact(unix_micros(&envelope));
                envelope.device_id = Some(device.device_id.clone());
                envelope.device_type = Some(device.device_type.clone());
            }
        }

        let mut targets = Vec::new();
        topology.router.select(&envelope, &mut targets);
        if targets.is_empty() {
            let rejection = Rejection::new(
                RejectionCode::Unrouted,
                "no route matches this message; it was kept as a dead letter",
            );
            return Err(self
                .reject(listener, auth, &envelope, "router", rejection, u32::MAX)
                .await);
        }
        let envelope = Arc::new(envelope);
        for key in &targets {
            match topology.downstreams.get(&**key) {
                Some(downstream) => {
                    if let Err(stopped) = downstream.deliver(envelope.clone()).await {
                        self.dead_letters
                            .record(&envelope, key, "downstream_stopped", &stopped.to_string())
                            .await;
                    }
                }
                None => {
                    self.dead_letters
                        .record(
                            &envelope,
                            key,
                            "downstream_missing",
                            &format!("route target {key} is not a running downstream module"),
                        )
                        .await;
                }
            }
        }
        listener.counters.accepted.inc();
        Ok(())
    }

    /// Dead-letters and counts a rejected envelope and decides whether to close.
    async fn reject(
        &self,
        listener: &ListenerContext,
        auth: &mut ConnectionAuth,
        envelope: &Envelope,
        module: &str,
        rejection: Rejection,
        max_failures: u32,
    ) -> IngestError {
        listener.counters.rejected.inc();
        // Undecodable bytes are not kept: they may hold a credential the sentinel never saw.
        let decoded = rejection.code != RejectionCode::MalformedJson;
        self.dead_letters
            .record_with(
                envelope,
                rejection.claimed_device_id.as_deref(),
                decoded,
                module,
                rejection.code.as_str(),
                &rejection.message,
            )
            .await;
        let mut close = false;
        if rejection.code.is_device_failure() {
            auth.failures += 1;
            close = auth.failures >= max_failures;
        }
        IngestError::Rejected { rejection, close }
    }

    /// Records a message that could not even be decoded (no envelope payload to keep).
    pub async fn reject_undecodable(
        &self,
        listener: &ListenerContext,
        auth: &mut ConnectionAuth,
        envelope: &Envelope,
        rejection: Rejection,
    ) -> IngestError {
        let max = listener
            .sentinel
            .as_ref()
            .and_then(|k| {
                self.topology
                    .load()
                    .sentinels
                    .get(k)
                    .map(|s| s.max_failures())
            })
            .unwrap_or(u32::MAX);
        listener.counters.received.inc();
        self.reject(
            listener,
            auth,
            envelope,
            &listener.key.clone(),
            rejection,
            max,
        )
        .await
    }
}

/// A device this far ahead of its rate is refused rather than slowed.
const MAX_RATE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

fn sentinel_unavailable(key: &str) -> Rejection {
    Rejection::new(
        RejectionCode::SentinelUnavailable,
        format!("sentinel {key} is not running; messages are refused until it is"),
    )
}

fn unix_micros(envelope: &Envelope) -> i64 {
    (envelope.received_at.unix_timestamp_nanos() / 1000) as i64
}
