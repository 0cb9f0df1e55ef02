//! Dead letters: envelopes that could not be authenticated or delivered, kept with their reason
//! in the database (visible in the API and UI) and counted per reason. Writes are batched by one
//! task behind a bounded queue; a full queue pushes back on whoever is producing dead letters
//! (for a misbehaving device: its own socket).

use std::sync::Arc;
use std::time::Duration;

use iotgate_core::envelope::format_timestamp;
use iotgate_core::Envelope;
use iotgate_store::{DeadLetterRow, Store};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// What travels to the writer: rows, or a marker answered once every earlier row is written.
#[derive(Debug)]
enum Item {
    Row(Box<DeadLetterRow>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

#[derive(Clone, Debug)]
pub struct DeadLetters {
    sender: mpsc::Sender<Item>,
    metrics: Arc<Metrics>,
}

impl DeadLetters {
    /// Creates the sink and its writer task; the task ends once every sender is dropped and the
    /// queue is flushed.
    pub fn start(
        store: Store,
        metrics: Arc<Metrics>,
        capacity: usize,
        runtime: &tokio::runtime::Handle,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(capacity);
        let task = runtime.spawn(write_dead_letters(store, receiver));
        (Self { sender, metrics }, task)
    }

    /// Records an envelope that went no further. The payload is stored as the pipeline holds it,
    /// i.e. with body credentials already removed by the sentinel.
    pub async fn record(&self, envelope: &Envelope, module: &str, reason: &str, message: &str) {
        self.record_with(envelope, None, true, module, reason, message)
            .await;
    }

    /// Like [`DeadLetters::record`], with the device id a rejected message claimed, and without
    /// the payload when it could not be decoded (raw bytes may hold a credential).
    pub async fn record_with(
        &self,
        envelope: &Envelope,
        claimed_device_id: Option<&str>,
        keep_payload: bool,
        module: &str,
        reason: &str,
        message: &str,
    ) {
        let row = DeadLetterRow {
            // Its own id: one envelope can fail in several downstream modules.
            id: uuid::Uuid::now_v7().to_string(),
            listener_key: Some(envelope.listener_key.to_string()),
            device_id: envelope
                .device_id
                .as_deref()
                .or(claimed_device_id)
                .map(str::to_owned),
            module: module.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            received_at: format_timestamp(envelope.received_at),
            content_type: Some(envelope.content_type.as_str().to_owned()),
            payload: keep_payload
                .then(|| serde_json::to_string(&envelope.payload).ok())
                .flatten(),
        };
        self.record_row(row).await;
    }

    pub async fn record_row(&self, row: DeadLetterRow) {
        self.metrics.dead_lettered(&row.reason).inc();
        if self.sender.send(Item::Row(Box::new(row))).await.is_err() {
            tracing::error!("dead letter writer has stopped; a dead letter was not stored");
        }
    }

    /// Waits until every dead letter recorded before this call is in the database.
    pub async fn flush(&self) {
        let (done, written) = tokio::sync::oneshot::channel();
        if self.sender.send(Item::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

async fn write_dead_letters(store: Store, mut receiver: mpsc::Receiver<Item>) {
    let mut items = Vec::with_capacity(256);
    let mut rows = Vec::with_capacity(256);
    let mut flushes = Vec::new();
    while receiver.recv_many(&mut items, 256).await > 0 {
        for item in items.drain(..) {
            match item {
                Item::Row(row) => rows.push(*row),
                Item::Flush(done) => flushes.push(done),
            }
        }
        let mut backoff = Duration::from_millis(50);
        while !rows.is_empty() {
            match store.insert_dead_letters(&rows).await {
                Ok(()) => rows.clear(),
                Err(error) => {
                    tracing::warn!(error = %error, rows = rows.len(), "could not store dead letters; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}
