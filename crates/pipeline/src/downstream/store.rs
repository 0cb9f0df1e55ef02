//! The `store` downstream: the built-in telemetry table, written in batches (whatever is queued,
//! up to `batchSize`, per transaction).
//!
//! A batch that fails to commit is retried with backoff, and nothing in it is dropped silently:
//! - an envelope nobody waits on (`acknowledge: none` or `accepted`) stays in the batch until it
//!   is stored;
//! - an envelope a device waits on (`acknowledge: stored`) is refused with
//!   `downstream_unavailable` and a retry hint once `timeoutMs` has passed since it was queued,
//!   and leaves the batch: it is then never stored by this attempt, so the device's retry is the
//!   only copy. A message stored but whose acknowledgement was lost is recognised by its message
//!   id when it comes again (a duplicate).

use std::sync::Arc;
use std::time::{Duration, Instant};

use iotgate_core::definition::DownstreamDefinition;
use iotgate_core::envelope::{format_timestamp, EnvelopeMetadata};
use iotgate_core::Envelope;
use iotgate_store::{Engine, Store, TelemetryRow};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::retention::{run_retention, RetentionPolicy};
use super::Delivery;
use crate::metrics::DownstreamCounters;

/// How long a partial batch waits for more envelopes.
const STORE_LINGER: Duration = Duration::from_millis(5);
/// First wait after a failed commit; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(crate) struct StoreModule {
    pub key: Arc<str>,
    pub store: Store,
    pub batch_size: usize,
    /// How long a message a device waits on may take to commit before it is refused.
    pub commit_timeout: Duration,
    pub retention: RetentionPolicy,
    pub counters: DownstreamCounters,
    pub latency: Histogram,
}

impl StoreModule {
    pub fn new(
        definition: &DownstreamDefinition,
        store: Store,
        counters: DownstreamCounters,
        latency: Histogram,
    ) -> Self {
        Self {
            key: Arc::from(definition.key.as_str()),
            store,
            batch_size: definition.batch_size,
            commit_timeout: Duration::from_millis(definition.timeout_ms),
            retention: RetentionPolicy {
                max_age: definition
                    .retention_hours
                    .map(|hours| Duration::from_secs(u64::from(hours) * 3600)),
                max_rows: definition.max_rows,
            },
            counters,
            latency,
        }
    }

    /// Writes batches until the queue is closed (every sender dropped) and drained.
    ///
    /// On PostgreSQL two batches may be committing at once: while the server writes one (and
    /// waits for its WAL flush), the next is gathered and sent, so neither side idles. SQLite has
    /// one writer at a time; there a second transaction would only wait on the first's lock.
    pub async fn run(self, mut receiver: mpsc::Receiver<Delivery>) {
        let retention_stop = CancellationToken::new();
        let retention = self.retention.is_active().then(|| {
            tokio::spawn(run_retention(
                self.store.clone(),
                self.key.clone(),
                self.retention.clone(),
                retention_stop.clone(),
            ))
        });
        let in_flight_limit = match self.store.engine() {
            Engine::Postgres => 2,
            Engine::Sqlite => 1,
        };
        let this = Arc::new(self);
        let mut committing = tokio::task::JoinSet::new();
        let mut batch: Vec<Delivery> = Vec::with_capacity(this.batch_size);
        while receiver.recv_many(&mut batch, this.batch_size).await > 0 {
            // Under load, linger a moment for a fuller batch: fewer, larger transactions.
            let linger_until = tokio::time::Instant::now() + STORE_LINGER;
            while batch.len() < this.batch_size {
                let room = this.batch_size - batch.len();
                match tokio::time::timeout_at(linger_until, receiver.recv_many(&mut batch, room))
                    .await
                {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            this.counters.queue_depth.dec_by(batch.len() as i64);
            if in_flight_limit == 1 {
                this.commit(&mut batch).await;
                batch.clear();
                continue;
            }
            while committing.len() >= in_flight_limit {
                committing.join_next().await;
            }
            let mut taken = std::mem::replace(&mut batch, Vec::with_capacity(this.batch_size));
            let module = this.clone();
            committing.spawn(async move { module.commit(&mut taken).await });
        }
        while committing.join_next().await.is_some() {}
        retention_stop.cancel();
        if let Some(task) = retention {
            let _ = task.await;
        }
        tracing::debug!(downstream = %this.key, "store downstream drained and stopped");
    }

    /// Commits one batch, retrying until every envelope in it is stored or refused.
    async fn commit(&self, batch: &mut Vec<Delivery>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let rows: Vec<TelemetryRow> = batch
                .iter()
                .map(|d| telemetry_row(&d.envelope, &self.key))
                .collect();
            match self.store.insert_telemetry(&rows).await {
                Ok(duplicates) => {
                    let mut stored = 0u64;
                    for (delivery, duplicate) in batch.drain(..).zip(duplicates) {
                        if !duplicate {
                            stored += 1;
                        }
                        self.latency
                            .observe(delivery.envelope.received_instant.elapsed().as_secs_f64());
                        if let Some(receipt) = delivery.receipt {
                            receipt.stored(duplicate);
                        }
                    }
                    self.counters.delivered.inc_by(stored);
                    return;
                }
                Err(error) => {
                    tracing::warn!(downstream = %self.key, error = %error, rows = rows.len(), "telemetry batch not stored; retrying");
                    self.counters.failed.inc();
                    let retry_after = (backoff * 4).max(Duration::from_secs(1));
                    let now = Instant::now();
                    // Devices that waited long enough are told now; their messages leave the
                    // batch so a later commit cannot store what was refused.
                    let mut kept = Vec::with_capacity(batch.len());
                    for delivery in batch.drain(..) {
                        match delivery.receipt {
                            Some(receipt)
                                if now.duration_since(delivery.queued_at)
                                    >= self.commit_timeout =>
                            {
                                receipt.refused(
                                    format!(
                                        "the telemetry store could not commit the message: {error}"
                                    ),
                                    retry_after,
                                );
                            }
                            receipt => kept.push(Delivery {
                                receipt,
                                ..delivery
                            }),
                        }
                    }
                    *batch = kept;
                    if batch.is_empty() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

fn telemetry_row(envelope: &Envelope, downstream: &str) -> TelemetryRow {
    let message_id = envelope.message_id.as_ref().and_then(|id| id.dedup_key());
    let duplicate_if_stored_since = match (&message_id, envelope.dedup_window) {
        (Some(_), Some(window)) if !window.is_zero() => {
            Some(format_timestamp(envelope.received_at - window))
        }
        _ => None,
    };
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
        metadata: serde_json::to_string(&EnvelopeMetadata(envelope))
            .unwrap_or_else(|_| "{}".into()),
        downstream_key: downstream.to_owned(),
        message_id,
        authenticated: envelope.authenticated,
        claimed_device_id: envelope.claimed_device_id.as_deref().map(str::to_owned),
        message_type: envelope.message_type.as_deref().map(str::to_owned),
        duplicate_if_stored_since,
    }
}
