//! The pipeline as listeners see it: `ingest` takes one envelope through sentinel, router and
//! downstream modules. The topology (sentinels, routes, downstreams) is an immutable snapshot
//! swapped atomically when a definition changes, so a change never pauses message flow and
//! listeners keep their connections.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use iotgate_core::definition::{AcknowledgeMode, ListenerDefinition, MessageMode};
use iotgate_core::{ContentType, Envelope, Payload};

use crate::ack::{AckResult, AckStatus, DeliveryTicket, OutcomeSender};
use crate::auth_failures::{is_authentication_failure, AuthFailureTally};
use crate::connections::ConnectionHub;
use crate::deadletter::{DeadLetters, KeepPayload};
use crate::downstream::{Downstream, SubscriberHub};
use crate::metrics::{ListenerCounters, Metrics};
use crate::registry::DeviceRegistry;
use crate::rejection::{Rejection, RejectionCode};
use crate::router::Router;
use crate::sentinel::{ConnectTimeValues, ConnectionCredentials, DeviceBinding, Sentinel};
use crate::sessions::{LiveConnections, SessionCloser};
use iotgate_core::credentials::KeyDigest;

/// The running sentinels, routes and downstream modules at one moment.
#[derive(Debug, Default)]
pub struct Topology {
    pub sentinels: HashMap<String, Arc<Sentinel>>,
    pub router: Router,
    pub downstreams: HashMap<String, Downstream>,
}

impl Topology {
    /// The subscriber hub of the websocket downstream `key`, if it is one.
    pub fn hub(&self, key: &str) -> Option<Arc<SubscriberHub>> {
        match self.downstreams.get(key) {
            Some(Downstream::Subscribers(hub)) => Some(hub.clone()),
            _ => None,
        }
    }

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
    /// The listener's open connections, so a change to its sentinel can close them.
    pub live: Arc<LiveConnections>,
    /// Whether a frame is the payload or a whole message object.
    pub message_mode: MessageMode,
}

impl ListenerContext {
    pub fn new(definition: &ListenerDefinition, metrics: &Metrics) -> Self {
        Self {
            key: Arc::from(definition.key.as_str()),
            content_type: definition.content_type,
            sentinel: definition.sentinel.clone(),
            counters: metrics.listener(&definition.key),
            live: Arc::default(),
            message_mode: definition.message_mode,
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
    /// The connection's close switch, when a registry change should close it (device
    /// connections of server-mode listeners; a client-mode connection speaks for a remote).
    pub session: Option<Arc<SessionCloser>>,
    /// The device the connection speaks for: named by credentials at connect time, or by the
    /// last message that authenticated (listeners without a sentinel: the last claim). The
    /// listener binds the connection to it so messages to the device reach it.
    pub device: Option<Arc<str>>,
    /// The (device, key digest) pairs already attached to the registry's live sessions.
    attached: Vec<(Arc<str>, Option<KeyDigest>)>,
}

impl ConnectionAuth {
    /// Tells the registry this connection speaks for `device` with the key of `digest`, once
    /// per pair (a connection usually speaks for one device, so the list stays tiny).
    fn attach(&mut self, registry: &DeviceRegistry, device: &Arc<str>, digest: Option<KeyDigest>) {
        let Some(closer) = &self.session else {
            return;
        };
        if self
            .attached
            .iter()
            .any(|(d, k)| Arc::ptr_eq(d, device) && *k == digest)
        {
            return;
        }
        registry.attach_session(device, digest, closer);
        // A gateway speaking for very many devices keeps its registrations in the registry;
        // this list only saves repeated work, so it may forget.
        if self.attached.len() >= 64 {
            self.attached.clear();
        }
        self.attached.push((device.clone(), digest));
    }
}

pub struct Pipeline {
    pub registry: Arc<DeviceRegistry>,
    pub dead_letters: DeadLetters,
    pub metrics: Arc<Metrics>,
    /// Device authentication failures, summarized into the audit log once a minute.
    pub auth_failures: Arc<AuthFailureTally>,
    /// Open device connections, addressable by device, group and listener.
    pub connections: Arc<ConnectionHub>,
    /// Device connect and disconnect events: their queue and this node's recent ones.
    pub presence: crate::presence::Presence,
    topology: ArcSwap<Topology>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").finish_non_exhaustive()
    }
}

/// What an acknowledging listener asks of the pipeline for one message.
#[derive(Debug, Clone)]
pub struct AckRequest {
    /// `Accepted` or `Stored` (a listener with `none` passes no request).
    pub mode: AcknowledgeMode,
    /// Where answers that come later (after durable downstreams commit) are sent.
    pub outcomes: OutcomeSender,
}

/// What became of a message the pipeline took.
#[derive(Debug)]
pub enum Ingested {
    /// The answer is known now: routed (and, for `stored`, nothing durable to wait for), or a
    /// duplicate of a message acknowledged moments ago.
    Answered(AckResult),
    /// Durable downstreams are committing it; the answer arrives on the request's channel.
    Pending,
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
            connections: Arc::new(ConnectionHub::new(
                metrics.downlink_delivered.clone(),
                metrics.downlink_dropped.clone(),
            )),
            registry,
            dead_letters,
            metrics,
            auth_failures: Arc::default(),
            presence: crate::presence::Presence::default(),
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
            // No sentinel: the listener's own Basic credentials (or, in client mode, the remote
            // server it chose to connect to) vouch for the connection.
            return Ok(ConnectionAuth {
                authenticated: true,
                ..ConnectionAuth::default()
            });
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
            device: binding.as_ref().map(|b| b.device_id.clone()),
            binding,
            connect_values,
            ..ConnectionAuth::default()
        })
    }

    /// True when the listener's sentinel answers a refused connection request before the
    /// upgrade (HTTP 401 with the reason) instead of on an opened socket: the token method.
    pub fn refuses_before_upgrade(&self, listener: &ListenerContext) -> bool {
        listener.sentinel.as_ref().is_some_and(|key| {
            self.topology
                .load()
                .sentinels
                .get(key)
                .is_some_and(|s| s.refuses_before_upgrade())
        })
    }

    /// Makes a registry change close this connection: the device it is bound to (now, for
    /// credentials given at connect time; later, as messages authenticate) is watched.
    pub fn watch_connection(&self, auth: &mut ConnectionAuth, closer: Arc<SessionCloser>) {
        auth.session = Some(closer);
        if let Some(binding) = auth.binding.clone() {
            auth.attach(&self.registry, &binding.device_id, binding.key_digest);
        }
    }

    /// Decodes a received message per the listener's content type (`text_frame`: it came in a
    /// text frame rather than a binary one).
    pub fn decode(
        content_type: ContentType,
        text_frame: bool,
        bytes: bytes::Bytes,
    ) -> Result<Payload, Rejection> {
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
            ContentType::Msgpack if text_frame => Err(Rejection::new(
                RejectionCode::MalformedMsgpack,
                "a msgpack listener takes MessagePack in binary frames, not text frames",
            )),
            // MessagePack's value model is JSON's plus binary strings, extension types and
            // non-string map keys; a message using those cannot be routed as JSON and is refused.
            ContentType::Msgpack => rmp_serde::from_slice::<serde_json::Value>(&bytes)
                .map(Payload::Json)
                .map_err(|e| {
                    Rejection::new(
                        RejectionCode::MalformedMsgpack,
                        format!("the message is not MessagePack that maps to JSON: {e}"),
                    )
                }),
        }
    }

    /// Node-RED's whole-message mode: the frame is an object whose `payload` is the message and
    /// whose other properties (`topic`, `_msgid`, ...) travel as the envelope's attributes.
    pub fn split_message(
        payload: Payload,
    ) -> Result<(Payload, serde_json::Map<String, serde_json::Value>), Rejection> {
        let not_a_message = || {
            Rejection::new(
                RejectionCode::MissingPayload,
                "in message mode each frame is a JSON object with a payload property",
            )
        };
        let Payload::Json(serde_json::Value::Object(mut message)) = payload else {
            return Err(not_a_message());
        };
        let inner = message.remove("payload").ok_or_else(not_a_message)?;
        Ok((Payload::Json(inner), message))
    }

    /// Takes one envelope through sentinel, router and downstream modules. With an `ack`
    /// request, also answers it: at once, or later through the request's channel.
    pub async fn ingest(
        &self,
        listener: &ListenerContext,
        auth: &mut ConnectionAuth,
        mut envelope: Envelope,
        ack: Option<&AckRequest>,
    ) -> Result<Ingested, IngestError> {
        listener.counters.received.inc();
        let topology = self.topology.load_full();
        // The device the message was authenticated as, for the recent-acknowledgement check.
        let mut sender_device = None;

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
                Ok((device, digest)) => {
                    auth.failures = 0;
                    auth.authenticated = true;
                    auth.attach(&self.registry, &device.device_id, digest);
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
                                .claimed_by(&device.device_id)
                                .retry_after(MAX_RATE_WAIT);
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
                    if auth.device.as_deref() != Some(&*device.device_id) {
                        auth.device = Some(device.device_id.clone());
                    }
                    envelope.authenticated = true;
                    sender_device = Some(device);
                }
                Err(rejection) => {
                    let max = sentinel.max_failures();
                    return Err(self
                        .reject(listener, auth, &envelope, sentinel_key, rejection, max)
                        .await);
                }
            }
        } else {
            // A listener without a sentinel vouches for the connection (its Basic credentials,
            // or the remote server a client-mode listener chose), not for any device: a deviceId
            // in the body is only a claim. The envelope says so (`authenticated: false`,
            // `claimedDeviceId`), routes can select on it, and a claim of a disabled device is
            // refused.
            envelope.authenticated = false;
            let claimed = envelope
                .payload
                .as_json()
                .and_then(|v| v.get("deviceId"))
                .and_then(|v| v.as_str())
                .map(Arc::<str>::from);
            if let Some(claimed) = claimed {
                if let Some(device) = self.registry.get(&claimed) {
                    if !device.enabled {
                        let rejection =
                            Rejection::new(RejectionCode::DeviceDisabled, "the device is disabled")
                                .claimed_by(&claimed);
                        return Err(self
                            .reject(
                                listener,
                                auth,
                                &envelope,
                                &listener.key.clone(),
                                rejection,
                                u32::MAX,
                            )
                            .await);
                    }
                    device.note_contact(unix_micros(&envelope));
                }
                if auth.device.as_deref() != Some(&*claimed) {
                    auth.device = Some(claimed.clone());
                }
                envelope.claimed_device_id = Some(claimed);
            }
        }

        // A retry of a message this device had acknowledged moments ago (its connection dropped
        // before the acknowledgement arrived) is answered again and goes nowhere: no downstream,
        // live view or webhook sees it twice.
        let recent_key = match (ack, &sender_device, envelope.dedup_window) {
            (Some(_), Some(_), Some(window)) if !window.is_zero() => {
                envelope.message_id.as_ref().and_then(|id| id.dedup_key())
            }
            _ => None,
        };
        if let (Some(key), Some(device)) = (&recent_key, &sender_device) {
            let window = envelope.dedup_window.unwrap_or_default();
            if let Some(status) = device.recently_acked(key, window) {
                listener.counters.accepted.inc();
                return Ok(Ingested::Answered(AckResult::Acked {
                    status,
                    duplicate: true,
                }));
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
        let remember = recent_key.zip(sender_device);
        let ticket = match ack {
            Some(request) if request.mode == AcknowledgeMode::Stored => {
                envelope.message_id.clone().map(|id| {
                    DeliveryTicket::new(
                        id,
                        envelope.received_instant,
                        request.outcomes.clone(),
                        remember.clone(),
                    )
                })
            }
            _ => None,
        };
        // With acknowledgements, a module that cannot take the message refuses it (the device
        // retries); without, the message becomes a dead letter.
        let mut handoff_refused = None;
        let envelope = Arc::new(envelope);
        for key in &targets {
            match topology.downstreams.get(&**key) {
                Some(downstream) => {
                    let receipt = ticket
                        .as_ref()
                        .filter(|_| downstream.is_durable())
                        .map(DeliveryTicket::receipt);
                    if let Err(stopped) = downstream.deliver(envelope.clone(), receipt).await {
                        if ack.is_some() {
                            handoff_refused.get_or_insert_with(|| {
                                downstream_unavailable(&stopped.to_string())
                            });
                        } else {
                            self.dead_letters
                                .record(&envelope, key, "downstream_stopped", &stopped.to_string())
                                .await;
                        }
                    }
                }
                None => {
                    let message = format!("route target {key} is not a running downstream module");
                    if ack.is_some() {
                        handoff_refused.get_or_insert_with(|| downstream_unavailable(&message));
                    } else {
                        self.dead_letters
                            .record(&envelope, key, "downstream_missing", &message)
                            .await;
                    }
                }
            }
        }
        listener.counters.accepted.inc();
        if let Some(ticket) = ticket {
            if let Some(rejection) = handoff_refused {
                ticket.refuse(rejection);
            }
            return Ok(match ticket.dispatched() {
                Some(outcome) => Ingested::Answered(outcome.result),
                None => Ingested::Pending,
            });
        }
        if let Some(rejection) = handoff_refused {
            return Ok(Ingested::Answered(AckResult::Refused(rejection)));
        }
        if let Some((key, device)) = &remember {
            device.remember_ack(key, AckStatus::Accepted);
        }
        Ok(Ingested::Answered(AckResult::Acked {
            status: AckStatus::Accepted,
            duplicate: false,
        }))
    }

    /// Routes an envelope the platform made (a presence event): no sentinel, no
    /// acknowledgement, and no dead letter when no route wants it (such events are for the
    /// routes that ask for them). A downstream that has stopped dead-letters it as for device
    /// messages.
    pub async fn route_event(&self, envelope: Envelope) {
        let topology = self.topology.load_full();
        let mut targets = Vec::new();
        topology.router.select(&envelope, &mut targets);
        if targets.is_empty() {
            return;
        }
        let envelope = Arc::new(envelope);
        for key in &targets {
            let outcome = match topology.downstreams.get(&**key) {
                Some(downstream) => downstream
                    .deliver(envelope.clone(), None)
                    .await
                    .map_err(|stopped| ("downstream_stopped", stopped.to_string())),
                None => Err((
                    "downstream_missing",
                    format!("route target {key} is not a running downstream module"),
                )),
            };
            if let Err((reason, message)) = outcome {
                self.dead_letters
                    .record(&envelope, key, reason, &message)
                    .await;
            }
        }
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
        if is_authentication_failure(rejection.code) {
            self.auth_failures.note(
                &listener.key,
                rejection.claimed_device_id.as_deref(),
                envelope.source_address.map(|a| a.ip()),
                rejection.code.as_str(),
            );
        }
        // Undecodable bytes are not kept: they may hold a credential the sentinel never saw. A
        // connection that never authenticated keeps only the start of what it sent, so nobody
        // can fill the disk through dead letters without credentials.
        let keep = if matches!(
            rejection.code,
            RejectionCode::MalformedJson | RejectionCode::MalformedMsgpack
        ) {
            KeepPayload::Nothing
        } else if auth.authenticated {
            KeepPayload::All
        } else {
            KeepPayload::Prefix(UNAUTHENTICATED_PAYLOAD_BYTES)
        };
        self.dead_letters
            .record_rejection(
                envelope,
                rejection.claimed_device_id.as_deref(),
                keep,
                module,
                rejection.code.as_str(),
                &rejection.message,
            )
            .await;
        let mut close = false;
        if rejection.code.is_device_failure() {
            auth.failures += 1;
            // An expired token will not get better on this connection: the device must
            // reconnect with a new one.
            close = auth.failures >= max_failures || rejection.code == RejectionCode::TokenExpired;
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

/// Bytes of payload a dead letter keeps from a connection that never authenticated.
pub const UNAUTHENTICATED_PAYLOAD_BYTES: usize = 1024;

fn downstream_unavailable(message: &str) -> Rejection {
    Rejection::new(RejectionCode::DownstreamUnavailable, message)
        .retry_after(std::time::Duration::from_secs(1))
}

fn sentinel_unavailable(key: &str) -> Rejection {
    Rejection::new(
        RejectionCode::SentinelUnavailable,
        format!("sentinel {key} is not running; messages are refused until it is"),
    )
    .retry_after(std::time::Duration::from_secs(5))
}

fn unix_micros(envelope: &Envelope) -> i64 {
    (envelope.received_at.unix_timestamp_nanos() / 1000) as i64
}
