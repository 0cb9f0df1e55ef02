//! Dead letters: envelopes that could not be authenticated or delivered, kept with their reason
//! in the database (visible in the API and UI) and counted per reason. Writes are batched by one
//! task behind a bounded queue; a full queue pushes back on whoever is producing dead letters
//! (for a misbehaving device: its own socket).
//!
//! Rejected traffic must not be able to fill the disk, whoever sends it:
//! - the table is capped by rows (`--dead-letter-max-rows`) and by size
//!   (`--dead-letter-max-bytes`); over either, the oldest rows are deleted in small batches after
//!   each write;
//! - a connection that never authenticated keeps at most 1 KiB of a payload;
//! - rejections from one source address are written at most `--dead-letter-rate-per-ip` per
//!   second (bursts of ten times that); the rest are counted, not stored.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Rejection dead letters per source address (token buckets).
    per_address: Arc<Mutex<AddressBuckets>>,
}

/// The limits of the dead-letter table.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterLimits {
    pub max_rows: u64,
    pub max_bytes: u64,
    /// Rejection dead letters written per second per source address (0 = unlimited).
    pub rate_per_address: u32,
}

/// Token buckets per source address. Bounded: addresses idle for a minute are forgotten when
/// the map grows large.
#[derive(Debug)]
struct AddressBuckets {
    rate: f64,
    burst: f64,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

/// Addresses tracked before idle ones are swept.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

impl AddressBuckets {
    fn allow(&mut self, address: IpAddr) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        if self.buckets.len() >= MAX_TRACKED_ADDRESSES {
            self.buckets
                .retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(60));
        }
        let (tokens, at) = self.buckets.entry(address).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How much of a rejected message's payload a dead letter keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepPayload {
    All,
    /// At most this many bytes of the serialized payload (marked truncated when cut).
    Prefix(usize),
    /// None (undecodable bytes may hold a credential the sentinel never saw).
    Nothing,
}

/// Rows deleted per statement when the table is over its cap.
const TRIM_BATCH: i64 = 2_000;

impl DeadLetters {
    /// Creates the sink and its writer task; the task ends once every sender is dropped and the
    /// queue is flushed.
    pub fn start(
        store: Store,
        metrics: Arc<Metrics>,
        capacity: usize,
        limits: DeadLetterLimits,
        runtime: &tokio::runtime::Handle,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, receiver) = mpsc::channel(capacity);
        let task = runtime.spawn(write_dead_letters(store, receiver, limits));
        let rate = f64::from(limits.rate_per_address);
        let per_address = Arc::new(Mutex::new(AddressBuckets {
            rate,
            burst: (rate * 10.0).max(1.0),
            buckets: HashMap::new(),
        }));
        (
            Self {
                sender,
                metrics,
                per_address,
            },
            task,
        )
    }

    /// Like [`DeadLetters::record_with`] for a message a device sent and the pipeline refused:
    /// written only within the source address's rate; beyond it, only counted.
    pub async fn record_rejection(
        &self,
        envelope: &Envelope,
        claimed_device_id: Option<&str>,
        keep: KeepPayload,
        module: &str,
        reason: &str,
        message: &str,
    ) {
        if let Some(address) = envelope.source_address.map(|a| a.ip()) {
            let allowed = self
                .per_address
                .lock()
                .expect("dead letter buckets lock")
                .allow(address);
            if !allowed {
                self.metrics.dead_letters_suppressed(reason).inc();
                return;
            }
        }
        self.record_with(envelope, claimed_device_id, keep, module, reason, message)
            .await;
    }

    /// Records an envelope that went no further. The payload is stored as the pipeline holds it,
    /// i.e. with body credentials already removed by the sentinel.
    pub async fn record(&self, envelope: &Envelope, module: &str, reason: &str, message: &str) {
        self.record_with(envelope, None, KeepPayload::All, module, reason, message)
            .await;
    }

    /// Like [`DeadLetters::record`], with the device id a rejected message claimed, and keeping
    /// as much of the payload as `keep` allows.
    pub async fn record_with(
        &self,
        envelope: &Envelope,
        claimed_device_id: Option<&str>,
        keep: KeepPayload,
        module: &str,
        reason: &str,
        message: &str,
    ) {
        let (payload, payload_truncated) = match keep {
            KeepPayload::Nothing => (None, false),
            KeepPayload::All => (serde_json::to_string(&envelope.payload).ok(), false),
            KeepPayload::Prefix(max) => match serde_json::to_string(&envelope.payload) {
                Ok(text) if text.len() > max => (Some(truncate_at_char(&text, max)), true),
                Ok(text) => (Some(text), false),
                Err(_) => (None, false),
            },
        };
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
            payload,
            payload_truncated,
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

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
fn truncate_at_char(text: &str, max: usize) -> String {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

async fn write_dead_letters(
    store: Store,
    mut receiver: mpsc::Receiver<Item>,
    limits: DeadLetterLimits,
) {
    // Counted once; afterwards the writer knows what it added and deleted.
    let (mut rows_held, mut bytes_held) = match store.dead_letter_totals().await {
        Ok(totals) => totals,
        Err(error) => {
            tracing::warn!(error = %error, "could not count dead letters; assuming none");
            (0, 0)
        }
    };
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
                Ok(()) => {
                    rows_held += rows.len() as u64;
                    bytes_held += rows.iter().map(row_size).sum::<u64>();
                    rows.clear();
                }
                Err(error) => {
                    tracing::warn!(error = %error, rows = rows.len(), "could not store dead letters; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        while rows_held > limits.max_rows || bytes_held > limits.max_bytes {
            // By rows, exactly the excess; by size, a batch at a time.
            let excess = rows_held.saturating_sub(limits.max_rows).max(1);
            match store
                .delete_oldest_dead_letters(excess.min(TRIM_BATCH as u64) as i64)
                .await
            {
                Ok((0, _)) => {
                    // Nothing left to delete: the counts drifted (another process wrote).
                    (rows_held, bytes_held) = store.dead_letter_totals().await.unwrap_or((0, 0));
                    break;
                }
                Ok((deleted, bytes)) => {
                    rows_held = rows_held.saturating_sub(deleted);
                    bytes_held = bytes_held.saturating_sub(bytes);
                }
                Err(error) => {
                    tracing::warn!(error = %error, "could not delete the oldest dead letters; will try again");
                    break;
                }
            }
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// The size a row adds to the table, as [`Store::dead_letter_totals`] counts it.
fn row_size(row: &DeadLetterRow) -> u64 {
    (row.payload.as_ref().map_or(0, |p| p.chars().count()) + row.message.chars().count()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_own_bucket() {
        let mut buckets = AddressBuckets {
            rate: 1.0,
            burst: 3.0,
            buckets: HashMap::new(),
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| buckets.allow(a)));
        assert!(!buckets.allow(a), "the burst is spent");
        assert!(buckets.allow(b), "another address is not affected");
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_at_char("abcdef", 4), "abcd");
        assert_eq!(truncate_at_char("aé", 2), "a");
        assert_eq!(truncate_at_char("ab", 10), "ab");
    }
}
