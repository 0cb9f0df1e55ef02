//! Downstream modules: where routed envelopes go.
//!
//! - `store`: the built-in telemetry table, written in batches (whatever is queued, up to
//!   `batchSize`, per transaction); a failed write is retried, never dropped.
//! - `websocket`: a [`SubscriberHub`] that fans envelopes out to admin-token subscribers. Each
//!   envelope is serialized once per hub, not per subscriber. A subscriber that cannot keep up
//!   misses the oldest frames (counted); devices are never slowed by a viewer.
//! - `webhook`: HTTP POST of the envelope with bounded concurrency, retries with exponential
//!   backoff and jitter, and a dead letter after the last retry.
//!
//! Store and webhook modules sit behind a bounded queue: a full queue makes `deliver` wait, which
//! stops the device connection from reading further, so memory stays flat under a slow sink.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iotgate_core::definition::{DownstreamDefinition, DownstreamType, SubscriberFormat};
use iotgate_core::envelope::format_timestamp;
use iotgate_core::Envelope;
use iotgate_store::{Store, TelemetryRow};
use prometheus_client::metrics::histogram::Histogram;
use rand::Rng;
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::deadletter::DeadLetters;
use crate::metrics::{DownstreamCounters, Metrics};

/// One frame for websocket subscribers, serialized once, with the fields subscribers filter on.
#[derive(Debug)]
pub struct SubscriberFrame {
    pub listener_key: Arc<str>,
    pub device_id: Option<Arc<str>>,
    pub text: String,
}

/// Fan-out point of a websocket downstream.
#[derive(Debug)]
pub struct SubscriberHub {
    pub key: Arc<str>,
    pub path: String,
    format: SubscriberFormat,
    sender: broadcast::Sender<Arc<SubscriberFrame>>,
    pub counters: DownstreamCounters,
    latency: Histogram,
}

/// Frames a subscriber may fall behind before it misses the oldest.
const SUBSCRIBER_BUFFER: usize = 16_384;

impl SubscriberHub {
    fn new(definition: &DownstreamDefinition, metrics: &Metrics) -> Self {
        let (sender, _) = broadcast::channel(SUBSCRIBER_BUFFER);
        Self {
            key: Arc::from(definition.key.as_str()),
            path: definition.path.clone().unwrap_or_default(),
            format: definition.format,
            sender,
            counters: metrics.downstream(&definition.key),
            latency: metrics.latency.clone(),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<SubscriberFrame>> {
        self.sender.subscribe()
    }

    fn publish(&self, envelope: &Envelope) {
        self.counters.delivered.inc();
        self.latency
            .observe(envelope.received_instant.elapsed().as_secs_f64());
        if self.sender.receiver_count() == 0 {
            return;
        }
        let text = match self.format {
            SubscriberFormat::Envelope => serde_json::to_string(envelope),
            SubscriberFormat::Payload => serde_json::to_string(&envelope.payload),
        }
        .unwrap_or_default();
        // An error only means the last subscriber left in between: nothing to deliver to.
        let _ = self.sender.send(Arc::new(SubscriberFrame {
            listener_key: envelope.listener_key.clone(),
            device_id: envelope.device_id.clone(),
            text,
        }));
    }
}

/// Why an envelope could not be handed to a downstream module.
#[derive(Debug, thiserror::Error)]
#[error("downstream {0} has stopped")]
pub struct DownstreamStopped(pub Arc<str>);

/// A running downstream module, as the router sees it.
#[derive(Debug, Clone)]
pub enum Downstream {
    Queue {
        key: Arc<str>,
        sender: mpsc::Sender<Arc<Envelope>>,
        counters: DownstreamCounters,
    },
    Subscribers(Arc<SubscriberHub>),
}

/// What building a downstream needs from the platform.
#[derive(Clone, Debug)]
pub struct DownstreamContext {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub dead_letters: DeadLetters,
    pub http: reqwest::Client,
    pub runtime: tokio::runtime::Handle,
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
        match definition.downstream_type {
            DownstreamType::Websocket => (
                Downstream::Subscribers(Arc::new(SubscriberHub::new(definition, &context.metrics))),
                None,
            ),
            DownstreamType::Store => {
                let (sender, receiver) = mpsc::channel(definition.queue_capacity);
                let task = context.runtime.spawn(
                    run_store(
                        key.clone(),
                        context.store.clone(),
                        receiver,
                        definition.batch_size,
                        counters.clone(),
                        context.metrics.latency.clone(),
                    )
                    .instrument(tracing::info_span!("downstream", key = %key, kind = "store")),
                );
                (
                    Downstream::Queue {
                        key,
                        sender,
                        counters,
                    },
                    Some(task),
                )
            }
            DownstreamType::Webhook => {
                let (sender, receiver) = mpsc::channel(definition.queue_capacity);
                let task = context.runtime.spawn(
                    run_webhook(
                        definition.clone(),
                        context.clone(),
                        receiver,
                        counters.clone(),
                    )
                    .instrument(tracing::info_span!("downstream", key = %key, kind = "webhook")),
                );
                (
                    Downstream::Queue {
                        key,
                        sender,
                        counters,
                    },
                    Some(task),
                )
            }
        }
    }

    pub fn key(&self) -> &Arc<str> {
        match self {
            Downstream::Queue { key, .. } => key,
            Downstream::Subscribers(hub) => &hub.key,
        }
    }

    /// Hands an envelope over; waits while the module's queue is full (backpressure).
    pub async fn deliver(&self, envelope: Arc<Envelope>) -> Result<(), DownstreamStopped> {
        match self {
            Downstream::Queue {
                key,
                sender,
                counters,
            } => {
                counters.queue_depth.inc();
                let sent = sender.send(envelope).await;
                if sent.is_err() {
                    counters.queue_depth.dec();
                    return Err(DownstreamStopped(key.clone()));
                }
                Ok(())
            }
            Downstream::Subscribers(hub) => {
                hub.publish(&envelope);
                Ok(())
            }
        }
    }
}

fn telemetry_row(envelope: &Envelope, downstream: &str) -> TelemetryRow {
    TelemetryRow {
        id: envelope.id.to_string(),
        listener_key: envelope.listener_key.to_string(),
        device_id: envelope.device_id.as_deref().map(str::to_owned),
        device_type: envelope.device_type.as_deref().map(str::to_owned),
        connection_id: i64::try_from(envelope.connection_id).unwrap_or(i64::MAX),
        source_address: envelope.source_address.map(|a| a.to_string()),
        received_at: format_timestamp(envelope.received_at),
        content_type: envelope.content_type.as_str().to_owned(),
        payload: serde_json::to_string(&envelope.payload).unwrap_or_else(|_| "null".into()),
        metadata: serde_json::to_string(&*envelope.metadata).unwrap_or_else(|_| "{}".into()),
        downstream_key: downstream.to_owned(),
    }
}

async fn run_store(
    key: Arc<str>,
    store: Store,
    mut receiver: mpsc::Receiver<Arc<Envelope>>,
    batch_size: usize,
    counters: DownstreamCounters,
    latency: Histogram,
) {
    let mut batch = Vec::with_capacity(batch_size);
    let mut rows = Vec::with_capacity(batch_size);
    while receiver.recv_many(&mut batch, batch_size).await > 0 {
        // Under load, linger a moment for a fuller batch: fewer, larger transactions.
        let linger_until = tokio::time::Instant::now() + STORE_LINGER;
        while batch.len() < batch_size {
            let room = batch_size - batch.len();
            match tokio::time::timeout_at(linger_until, receiver.recv_many(&mut batch, room)).await
            {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        rows.extend(batch.iter().map(|e| telemetry_row(e, &key)));
        let mut backoff = Duration::from_millis(50);
        while let Err(error) = store.insert_telemetry(&rows).await {
            tracing::warn!(downstream = %key, error = %error, rows = rows.len(), "telemetry batch not stored; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        let count = batch.len() as i64;
        counters.queue_depth.dec_by(count);
        counters.delivered.inc_by(count as u64);
        for envelope in &batch {
            latency.observe(envelope.received_instant.elapsed().as_secs_f64());
        }
        batch.clear();
        rows.clear();
    }
    tracing::debug!(downstream = %key, "store downstream drained and stopped");
}

/// How long a partial store batch waits for more envelopes.
const STORE_LINGER: Duration = Duration::from_millis(5);

/// Webhook requests in flight per module.
const WEBHOOK_CONCURRENCY: usize = 16;

async fn run_webhook(
    definition: DownstreamDefinition,
    context: DownstreamContext,
    mut receiver: mpsc::Receiver<Arc<Envelope>>,
    counters: DownstreamCounters,
) {
    let definition = Arc::new(definition);
    let permits = Arc::new(Semaphore::new(WEBHOOK_CONCURRENCY));
    let mut in_flight = JoinSet::new();
    while let Some(envelope) = receiver.recv().await {
        counters.queue_depth.dec();
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let definition = definition.clone();
        let context = context.clone();
        let counters = counters.clone();
        in_flight.spawn(async move {
            deliver_webhook(&definition, &context, &counters, &envelope).await;
            drop(permit);
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
    tracing::debug!(downstream = %definition.key, "webhook downstream drained and stopped");
}

async fn deliver_webhook(
    definition: &DownstreamDefinition,
    context: &DownstreamContext,
    counters: &DownstreamCounters,
    envelope: &Envelope,
) {
    let url = definition.url.as_deref().unwrap_or_default();
    let body = match serde_json::to_vec(envelope) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(error = %error, "envelope could not be serialized");
            return;
        }
    };
    let mut last_error = String::new();
    for attempt in 0..=definition.max_retries {
        if attempt > 0 {
            let base = 200u64.saturating_mul(1 << (attempt - 1).min(6));
            let jitter = rand::thread_rng().gen_range(0..=base / 2);
            tokio::time::sleep(Duration::from_millis((base + jitter).min(10_000))).await;
        }
        let mut request = context
            .http
            .post(url)
            .timeout(Duration::from_millis(definition.timeout_ms))
            .header("content-type", "application/json")
            .header("x-iotgate-envelope-id", envelope.id.to_string())
            .body(body.clone());
        for (name, value) in &definition.headers {
            request = request.header(name, value);
        }
        let started = Instant::now();
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                counters.delivered.inc();
                context
                    .metrics
                    .latency
                    .observe(envelope.received_instant.elapsed().as_secs_f64());
                tracing::trace!(downstream = %definition.key, elapsed_ms = started.elapsed().as_millis() as u64, "webhook delivered");
                return;
            }
            Ok(response) => {
                let status = response.status();
                last_error = format!("the webhook answered {status}");
                // A 4xx other than 408/429 will not get better by retrying.
                if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
                    break;
                }
            }
            Err(error) => {
                last_error = format!("the webhook request failed: {error}");
            }
        }
        tracing::debug!(downstream = %definition.key, attempt, error = %last_error, "webhook delivery failed");
    }
    tracing::warn!(downstream = %definition.key, envelope = %envelope.id, error = %last_error, "webhook gave up; envelope dead-lettered");
    context
        .dead_letters
        .record(envelope, &definition.key, "webhook_failed", &last_error)
        .await;
}
