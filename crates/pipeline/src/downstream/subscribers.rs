//! The `websocket` downstream: a [`SubscriberHub`] that fans envelopes out to subscribers (the
//! live view, dashboards). Not durable: a listener that acknowledges `stored` does not wait
//! for it, and devices are never slowed by a viewer.
//!
//! Each envelope is serialized once per hub, into a frame every subscriber shares (a cheap
//! reference-counted clone, never a copy per subscriber). Every subscriber has its own bounded
//! queue, filled by the hub and drained in whole batches by the subscriber's socket task, so a
//! fast feed costs one wake-up and one flush per batch rather than per frame. A subscriber
//! that cannot keep up loses the **oldest** frames, half its queue at a time (counted in
//! `iotgate_subscriber_dropped_total`): under overload it keeps receiving the newest data at
//! the rate it can take instead of collapsing. A dashboard may instead ask for `latest` mode:
//! only the newest frame per device is kept until the socket takes it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use bytestring::ByteString;
use iotgate_core::definition::{DownstreamDefinition, SubscriberFormat};
use iotgate_core::Envelope;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::LiveBus;
use crate::metrics::{DownstreamCounters, Metrics};

/// One frame for websocket subscribers, serialized once, with the fields subscribers filter on.
#[derive(Debug)]
pub struct SubscriberFrame {
    pub listener_key: Arc<str>,
    pub device_id: Option<Arc<str>>,
    pub body: FrameBody,
}

/// What a frame carries: JSON text, or bytes (MessagePack). Both clone by reference count.
#[derive(Debug, Clone)]
pub enum FrameBody {
    Text(ByteString),
    Binary(bytes::Bytes),
}

/// Serializes an envelope in a downstream's `format`: the one place every downstream that sends
/// frames gets its bytes from.
pub fn encode(envelope: &Envelope, format: SubscriberFormat) -> FrameBody {
    let text = |result: Result<String, serde_json::Error>| {
        FrameBody::Text(
            result
                .unwrap_or_else(|error| {
                    tracing::error!(error = %error, "envelope could not be serialized");
                    String::new()
                })
                .into(),
        )
    };
    match format {
        SubscriberFormat::Envelope => text(serde_json::to_string(envelope)),
        SubscriberFormat::Payload => text(serde_json::to_string(&envelope.payload)),
        SubscriberFormat::Message => text(serde_json::to_string(&envelope.node_red_message())),
        SubscriberFormat::Msgpack => {
            // Human-readable, so ids and times are the same strings as in the JSON envelope
            // (uuid would otherwise write 16 raw bytes).
            let mut bytes = Vec::with_capacity(256);
            let mut serializer = rmp_serde::Serializer::new(&mut bytes)
                .with_struct_map()
                .with_human_readable();
            match serde::Serialize::serialize(envelope, &mut serializer) {
                Ok(()) => FrameBody::Binary(bytes.into()),
                Err(error) => {
                    tracing::error!(error = %error, "envelope could not be encoded as MessagePack");
                    FrameBody::Binary(bytes::Bytes::new())
                }
            }
        }
    }
}

/// Frames one subscriber may have queued; beyond it the oldest half is dropped at once. Sized to
/// hold what the workers publish between two turns of the subscriber's writer when devices keep
/// them saturated (8,192 overflowed there and dropped most of the feed). At most about 15 MB of
/// envelopes per subscriber; subscribers that keep up hold the same frames, shared by reference.
pub const SUBSCRIBER_QUEUE: usize = 32_768;

/// Frames a subscriber's writer takes (and encodes into one write) at a time. A backlog is then
/// written as a series of buffers of a few hundred KiB that the allocator reuses, instead of one
/// buffer as large as the whole queue (tens of MB, fresh pages and copies) under overload.
pub const FRAMES_PER_BATCH: usize = 1_024;

/// How a subscriber wants frames when it falls behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeliveryMode {
    /// Every frame, in order; when the queue is full the oldest half is dropped.
    #[default]
    All,
    /// Only the newest frame per device is kept until the socket takes it (dashboards).
    Latest,
}

/// Which frames a subscriber wants.
#[derive(Debug, Default, Clone)]
pub struct SubscriberFilter {
    pub device_id: Option<String>,
    pub listener: Option<String>,
}

impl SubscriberFilter {
    fn wants(&self, frame: &SubscriberFrame) -> bool {
        self.device_id
            .as_deref()
            .is_none_or(|d| frame.device_id.as_deref() == Some(d))
            && self
                .listener
                .as_deref()
                .is_none_or(|l| &*frame.listener_key == l)
    }
}

#[derive(Debug, Default)]
struct Pending {
    /// `All` mode: frames in arrival order.
    frames: VecDeque<Arc<SubscriberFrame>>,
    /// `Latest` mode: the newest frame per device, and the devices in first-arrival order.
    latest: HashMap<Option<Arc<str>>, Arc<SubscriberFrame>>,
    order: VecDeque<Option<Arc<str>>>,
}

/// One subscriber's queue: the hub pushes, the socket task takes everything at once.
#[derive(Debug)]
pub struct Subscription {
    filter: SubscriberFilter,
    mode: DeliveryMode,
    pending: Mutex<Pending>,
    ready: Notify,
    dropped: Counter,
    /// Cancelled when the hub goes away (the downstream was changed or deleted).
    retired: CancellationToken,
}

impl Subscription {
    fn push(&self, frame: &Arc<SubscriberFrame>) {
        if !self.filter.wants(frame) {
            return;
        }
        {
            let mut pending = self.pending.lock().expect("subscription lock");
            match self.mode {
                DeliveryMode::All => {
                    if pending.frames.len() >= SUBSCRIBER_QUEUE {
                        let oldest = SUBSCRIBER_QUEUE / 2;
                        pending.frames.drain(..oldest);
                        self.dropped.inc_by(oldest as u64);
                    }
                    pending.frames.push_back(frame.clone());
                }
                DeliveryMode::Latest => {
                    let device = frame.device_id.clone();
                    if pending
                        .latest
                        .insert(device.clone(), frame.clone())
                        .is_some()
                    {
                        // Conflated: the older frame of this device is replaced.
                        self.dropped.inc();
                    } else {
                        pending.order.push_back(device);
                    }
                }
            }
        }
        self.ready.notify_one();
    }

    /// Waits until frames are queued and takes them, oldest first: at most
    /// [`FRAMES_PER_BATCH`] in `All` mode, the newest of every device in `Latest` mode.
    pub async fn next_batch(&self) -> Vec<Arc<SubscriberFrame>> {
        loop {
            {
                let mut pending = self.pending.lock().expect("subscription lock");
                if !pending.frames.is_empty() {
                    let take = pending.frames.len().min(FRAMES_PER_BATCH);
                    return pending.frames.drain(..take).collect();
                }
                if !pending.order.is_empty() {
                    let order = std::mem::take(&mut pending.order);
                    let mut latest = std::mem::take(&mut pending.latest);
                    return order
                        .into_iter()
                        .filter_map(|device| latest.remove(&device))
                        .collect();
                }
            }
            self.ready.notified().await;
        }
    }

    /// Resolves when the hub is gone: the subscriber should reconnect.
    pub async fn retired(&self) {
        self.retired.cancelled().await
    }
}

/// Fan-out point of a websocket downstream.
#[derive(Debug)]
pub struct SubscriberHub {
    pub key: Arc<str>,
    pub path: String,
    format: SubscriberFormat,
    subscribers: ArcSwap<Vec<Arc<Subscription>>>,
    /// Serializes subscribe and unsubscribe (the publish path only loads the list).
    changing: Mutex<()>,
    pub counters: DownstreamCounters,
    latency: Histogram,
    retired: CancellationToken,
    /// The bus to the other nodes (`--bus-url`), which get every frame this node serializes.
    bus: Option<LiveBus>,
}

impl Drop for SubscriberHub {
    fn drop(&mut self) {
        self.retired.cancel();
    }
}

impl SubscriberHub {
    pub(crate) fn new(
        definition: &DownstreamDefinition,
        metrics: &Metrics,
        bus: Option<LiveBus>,
    ) -> Self {
        Self {
            key: Arc::from(definition.key.as_str()),
            path: definition.path.clone().unwrap_or_default(),
            format: definition.format,
            subscribers: ArcSwap::from_pointee(Vec::new()),
            changing: Mutex::new(()),
            counters: metrics.downstream(&definition.key),
            latency: metrics.latency.clone(),
            retired: CancellationToken::new(),
            bus,
        }
    }

    /// A new subscriber; it stays until [`SubscriberHub::unsubscribe`] (or the hub goes).
    pub fn subscribe(&self, filter: SubscriberFilter, mode: DeliveryMode) -> Arc<Subscription> {
        let subscription = Arc::new(Subscription {
            filter,
            mode,
            pending: Mutex::new(Pending::default()),
            ready: Notify::new(),
            dropped: self.counters.subscriber_dropped.clone(),
            retired: self.retired.child_token(),
        });
        let _changing = self.changing.lock().expect("hub lock");
        let mut list = Vec::clone(&self.subscribers.load());
        list.push(subscription.clone());
        self.subscribers.store(Arc::new(list));
        subscription
    }

    pub fn unsubscribe(&self, subscription: &Arc<Subscription>) {
        let _changing = self.changing.lock().expect("hub lock");
        let mut list = Vec::clone(&self.subscribers.load());
        list.retain(|s| !Arc::ptr_eq(s, subscription));
        self.subscribers.store(Arc::new(list));
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.load().len()
    }

    pub(crate) fn publish(&self, envelope: &Envelope) {
        self.counters.delivered.inc();
        self.latency
            .observe(envelope.received_instant.elapsed().as_secs_f64());
        let subscribers = self.subscribers.load();
        // Without a bus, nobody else could want the frame: skip serializing it.
        if subscribers.is_empty() && self.bus.is_none() {
            return;
        }
        let frame = Arc::new(SubscriberFrame {
            listener_key: envelope.listener_key.clone(),
            device_id: envelope.device_id.clone(),
            body: encode(envelope, self.format),
        });
        for subscriber in subscribers.iter() {
            subscriber.push(&frame);
        }
        if let Some(bus) = &self.bus {
            bus.offer(&self.key, &frame);
        }
    }

    /// A frame another node ingested (from the bus): to this node's subscribers only.
    pub fn fan_out(&self, frame: &Arc<SubscriberFrame>) {
        for subscriber in self.subscribers.load().iter() {
            subscriber.push(frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(device: &str, n: u32) -> Arc<SubscriberFrame> {
        Arc::new(SubscriberFrame {
            listener_key: Arc::from("l"),
            device_id: Some(Arc::from(device)),
            body: FrameBody::Text(n.to_string().into()),
        })
    }

    fn subscription(mode: DeliveryMode, filter: SubscriberFilter) -> Subscription {
        Subscription {
            filter,
            mode,
            pending: Mutex::default(),
            ready: Notify::new(),
            dropped: Counter::default(),
            retired: CancellationToken::new(),
        }
    }

    fn texts(batch: &[Arc<SubscriberFrame>]) -> Vec<String> {
        batch
            .iter()
            .map(|f| match &f.body {
                FrameBody::Text(t) => t.to_string(),
                FrameBody::Binary(_) => String::new(),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_oldest_half_and_keeps_the_newest() {
        let s = subscription(DeliveryMode::All, SubscriberFilter::default());
        for n in 0..(SUBSCRIBER_QUEUE as u32 + 10) {
            s.push(&frame("d", n));
        }
        let batch = take_queued(&s).await;
        assert_eq!(s.dropped.get(), (SUBSCRIBER_QUEUE / 2) as u64);
        assert_eq!(batch.len(), SUBSCRIBER_QUEUE / 2 + 10);
        assert_eq!(
            texts(&batch).first().unwrap(),
            &(SUBSCRIBER_QUEUE / 2).to_string()
        );
        assert_eq!(
            texts(&batch).last().unwrap(),
            &(SUBSCRIBER_QUEUE + 9).to_string()
        );
    }

    /// Every queued frame, batch after batch.
    async fn take_queued(s: &Subscription) -> Vec<Arc<SubscriberFrame>> {
        let mut all = Vec::new();
        while !s.pending.lock().unwrap().frames.is_empty() {
            all.extend(s.next_batch().await);
        }
        all
    }

    #[tokio::test]
    async fn a_backlog_is_taken_in_bounded_batches_in_order() {
        let s = subscription(DeliveryMode::All, SubscriberFilter::default());
        let queued = FRAMES_PER_BATCH as u32 * 2 + 5;
        for n in 0..queued {
            s.push(&frame("d", n));
        }
        let batches = [
            s.next_batch().await,
            s.next_batch().await,
            s.next_batch().await,
        ]
        .map(|batch| {
            assert!(batch.len() <= FRAMES_PER_BATCH);
            texts(&batch)
        });
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [FRAMES_PER_BATCH, FRAMES_PER_BATCH, 5]
        );
        let expected: Vec<String> = (0..queued).map(|n| n.to_string()).collect();
        assert_eq!(batches.concat(), expected);
        assert_eq!(s.dropped.get(), 0);
    }

    #[tokio::test]
    async fn latest_mode_keeps_the_newest_frame_per_device_in_first_seen_order() {
        let s = subscription(DeliveryMode::Latest, SubscriberFilter::default());
        s.push(&frame("a", 1));
        s.push(&frame("b", 2));
        s.push(&frame("a", 3));
        assert_eq!(texts(&s.next_batch().await), ["3", "2"]);
        assert_eq!(s.dropped.get(), 1);
    }

    #[tokio::test]
    async fn filters_keep_other_devices_out() {
        let s = subscription(
            DeliveryMode::All,
            SubscriberFilter {
                device_id: Some("a".into()),
                listener: None,
            },
        );
        s.push(&frame("b", 1));
        s.push(&frame("a", 2));
        assert_eq!(texts(&s.next_batch().await), ["2"]);
    }
}
