//! Messages for devices that are offline: queued in the database (`queued_downlinks`) when the
//! sender asks for it, handed to the device's next connection (when a connection binds to it, on
//! whichever node), and dead-lettered with reason `downlink_expired` by a periodic sweep when
//! their time to live passes first.
//!
//! Bounded twice: at most [`MAX_QUEUED_PER_DEVICE`] unexpired messages per device (a further one
//! is refused, not queued), and every message expires (at most [`MAX_TTL`]).

use std::sync::Arc;
use std::time::Duration;

use iotgate_core::envelope::format_timestamp;
use iotgate_store::{DeadLetterRow, QueuedDownlink, Store, StoreError};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::connections::{ConnectionHub, Downlink, DownlinkBody};
use crate::deadletter::DeadLetters;
use crate::metrics::Metrics;

/// Unexpired messages one device may have waiting.
pub const MAX_QUEUED_PER_DEVICE: i64 = 100;
/// The longest a message may wait for its device.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often expired messages are looked for.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Expired messages dead-lettered per statement.
const SWEEP_BATCH: i64 = 500;

/// What became of a message queued for an offline device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queued {
    /// Kept until `expires_at` (RFC 3339).
    Kept { id: String, expires_at: String },
    /// The device already has [`MAX_QUEUED_PER_DEVICE`] messages waiting.
    Full,
}

/// The queue of messages for offline devices.
#[derive(Debug)]
pub struct Outbox {
    store: Store,
    hub: Arc<ConnectionHub>,
    dead_letters: DeadLetters,
    metrics: Arc<Metrics>,
}

impl Outbox {
    pub fn new(
        store: Store,
        hub: Arc<ConnectionHub>,
        dead_letters: DeadLetters,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            hub,
            dead_letters,
            metrics,
        }
    }

    /// Queues `body` for `device_id` (only its connections on `listener`, when given) for `ttl`
    /// (capped at [`MAX_TTL`]).
    pub async fn queue(
        &self,
        device_id: &str,
        listener: Option<&str>,
        body: &DownlinkBody,
        ttl: Duration,
    ) -> Result<Queued, StoreError> {
        let now = OffsetDateTime::now_utc();
        let expires = now + ttl.min(MAX_TTL);
        let (kind, text) = body.encode();
        let message = QueuedDownlink {
            id: uuid::Uuid::now_v7().to_string(),
            device_id: device_id.to_owned(),
            listener_key: listener.map(str::to_owned),
            body_kind: kind.to_owned(),
            body: text,
            queued_at: format_timestamp(now),
            expires_at: format_timestamp(expires),
        };
        if !self
            .store
            .queue_downlink(&message, &message.queued_at, MAX_QUEUED_PER_DEVICE)
            .await?
        {
            return Ok(Queued::Full);
        }
        self.metrics.downlink_queued.inc();
        // The device may have connected between the sender's look and the insert: its
        // connection would then not ask for this message, so hand it over now.
        for connection in self.hub.device_connections(device_id) {
            if listener.is_none_or(|l| *connection.listener == *l) {
                self.deliver_queued(device_id, &connection.listener, connection.connection_id)
                    .await;
                break;
            }
        }
        Ok(Queued::Kept {
            id: message.id,
            expires_at: message.expires_at,
        })
    }

    /// Hands the messages waiting for `device_id` to its connection `connection_id` (of
    /// `listener`), oldest first, removing each one taken. A message another connection took
    /// first is not sent twice; one the connection's queue cannot take stays queued.
    pub async fn deliver_queued(&self, device_id: &str, listener: &str, connection_id: u64) {
        let now = format_timestamp(OffsetDateTime::now_utc());
        let waiting = match self.store.queued_downlinks(device_id, &now).await {
            Ok(waiting) => waiting,
            Err(error) => {
                tracing::warn!(error = %error, device = %device_id, "could not read the messages queued for a device; they wait for its next connection");
                return;
            }
        };
        for message in waiting {
            if message
                .listener_key
                .as_deref()
                .is_some_and(|l| l != listener)
            {
                continue;
            }
            let Some(body) = DownlinkBody::decode(&message.body_kind, &message.body) else {
                tracing::warn!(id = %message.id, kind = %message.body_kind, "a queued message has a body kind this version cannot send; it stays until it expires");
                continue;
            };
            // Claimed first, so of two connections (or nodes) only one sends it.
            match self.store.remove_queued_downlink(&message.id).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(error) => {
                    tracing::warn!(error = %error, id = %message.id, "could not take a queued message; it waits for the next connection");
                    return;
                }
            }
            let delivery = self
                .hub
                .to_connection(connection_id, &Downlink::from_server(body));
            if delivery.delivered == 0 {
                tracing::info!(id = %message.id, device = %device_id, "a queued message found its connection gone or full; it is not sent again");
            }
        }
    }

    /// Dead-letters every expired message (reason `downlink_expired`); returns how many.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let now = format_timestamp(OffsetDateTime::now_utc());
        let mut swept = 0;
        loop {
            let expired = self.store.take_expired_downlinks(&now, SWEEP_BATCH).await?;
            let batch = expired.len();
            for message in expired {
                self.metrics.downlink_expired.inc();
                self.dead_letters.record_row(dead_letter(message)).await;
            }
            swept += batch;
            if batch < SWEEP_BATCH as usize {
                return Ok(swept);
            }
        }
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until `stop`.
    pub async fn run_sweeper(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            }
            if let Err(error) = self.sweep().await {
                tracing::debug!(error = %error, "could not sweep expired messages to devices; retrying");
            }
        }
    }
}

/// The dead letter of a message that expired before its device connected.
fn dead_letter(message: QueuedDownlink) -> DeadLetterRow {
    // The payload column holds JSON text: a JSON body as it is, text and base64 as strings.
    let payload = if message.body_kind == "json" {
        message.body
    } else {
        serde_json::Value::String(message.body).to_string()
    };
    DeadLetterRow {
        id: uuid::Uuid::now_v7().to_string(),
        listener_key: message.listener_key,
        message: format!(
            "the message queued at {} for device {} expired at {} before the device connected",
            message.queued_at, message.device_id, message.expires_at
        ),
        device_id: Some(message.device_id),
        module: "downlink".to_owned(),
        reason: "downlink_expired".to_owned(),
        received_at: message.queued_at,
        content_type: Some(message.body_kind),
        payload: Some(payload),
        payload_truncated: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_survive_storage() {
        for body in [
            DownlinkBody::Json(serde_json::json!({"set": 21.5})),
            DownlinkBody::Text(Arc::from("reboot")),
            DownlinkBody::Binary(bytes::Bytes::from_static(&[0, 1, 255])),
        ] {
            let (kind, text) = body.encode();
            assert_eq!(DownlinkBody::decode(kind, &text), Some(body));
        }
        assert_eq!(DownlinkBody::decode("carrier-pigeon", "x"), None);
    }
}
