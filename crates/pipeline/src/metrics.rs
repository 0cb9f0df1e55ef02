//! Prometheus metrics. Modules take their counter handles once, when they are built, so the hot
//! path increments an atomic and never looks up a label set.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::rejection::RejectionCode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SentinelLabel {
    sentinel: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    sentinel: String,
    reason: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DownstreamLabel {
    downstream: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

/// Counters of one listener, shared by all its connections.
#[derive(Clone, Debug, Default)]
pub struct ListenerCounters {
    pub connections: Gauge,
    pub received: Counter,
    pub accepted: Counter,
    pub rejected: Counter,
}

/// Counters of one downstream module.
#[derive(Clone, Debug, Default)]
pub struct DownstreamCounters {
    pub delivered: Counter,
    pub queue_depth: Gauge,
    pub subscriber_dropped: Counter,
}

pub struct Metrics {
    registry: Registry,
    connections: Family<ListenerLabel, Gauge>,
    received: Family<ListenerLabel, Counter>,
    accepted: Family<ListenerLabel, Counter>,
    listener_rejected: Family<ListenerLabel, Counter>,
    authenticated: Family<SentinelLabel, Counter>,
    rejected: Family<RejectionLabels, Counter>,
    routed: Family<RouteLabel, Counter>,
    delivered: Family<DownstreamLabel, Counter>,
    queue_depth: Family<DownstreamLabel, Gauge>,
    subscriber_dropped: Family<DownstreamLabel, Counter>,
    dead_lettered: Family<ReasonLabel, Counter>,
    pub latency: Histogram,
    pub upgrade_rejected: Family<Vec<(String, String)>, Counter<u64, AtomicU64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("iotgate");
        let connections = Family::<ListenerLabel, Gauge>::default();
        registry.register(
            "connections",
            "Open device connections per listener",
            connections.clone(),
        );
        let received = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "messages_received",
            "Messages received per listener",
            received.clone(),
        );
        let accepted = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "messages_accepted",
            "Messages authenticated and routed per listener",
            accepted.clone(),
        );
        let listener_rejected = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "listener_messages_rejected",
            "Messages rejected per listener",
            listener_rejected.clone(),
        );
        let authenticated = Family::<SentinelLabel, Counter>::default();
        registry.register(
            "messages_authenticated",
            "Messages authenticated per sentinel",
            authenticated.clone(),
        );
        let rejected = Family::<RejectionLabels, Counter>::default();
        registry.register(
            "messages_rejected",
            "Messages rejected per sentinel and reason",
            rejected.clone(),
        );
        let routed = Family::<RouteLabel, Counter>::default();
        registry.register(
            "messages_routed",
            "Envelopes matched per route",
            routed.clone(),
        );
        let delivered = Family::<DownstreamLabel, Counter>::default();
        registry.register(
            "messages_delivered",
            "Envelopes delivered per downstream module",
            delivered.clone(),
        );
        let queue_depth = Family::<DownstreamLabel, Gauge>::default();
        registry.register(
            "queue_depth",
            "Envelopes waiting in a downstream module's queue",
            queue_depth.clone(),
        );
        let subscriber_dropped = Family::<DownstreamLabel, Counter>::default();
        registry.register(
            "subscriber_dropped",
            "Envelopes a slow websocket subscriber missed",
            subscriber_dropped.clone(),
        );
        let dead_lettered = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "messages_dead_lettered",
            "Envelopes dead-lettered per reason",
            dead_lettered.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.000_01, 2.0, 22));
        registry.register(
            "pipeline_latency_seconds",
            "Time from receipt to delivery",
            latency.clone(),
        );
        let upgrade_rejected = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "upgrades_rejected",
            "WebSocket upgrades refused per listener and reason",
            upgrade_rejected.clone(),
        );
        Self {
            registry,
            connections,
            received,
            accepted,
            listener_rejected,
            authenticated,
            rejected,
            routed,
            delivered,
            queue_depth,
            subscriber_dropped,
            dead_lettered,
            latency,
            upgrade_rejected,
        }
    }

    pub fn listener(&self, key: &str) -> ListenerCounters {
        let label = ListenerLabel {
            listener: key.to_owned(),
        };
        ListenerCounters {
            connections: self.connections.get_or_create(&label).clone(),
            received: self.received.get_or_create(&label).clone(),
            accepted: self.accepted.get_or_create(&label).clone(),
            rejected: self.listener_rejected.get_or_create(&label).clone(),
        }
    }

    pub fn downstream(&self, key: &str) -> DownstreamCounters {
        let label = DownstreamLabel {
            downstream: key.to_owned(),
        };
        DownstreamCounters {
            delivered: self.delivered.get_or_create(&label).clone(),
            queue_depth: self.queue_depth.get_or_create(&label).clone(),
            subscriber_dropped: self.subscriber_dropped.get_or_create(&label).clone(),
        }
    }

    pub fn authenticated(&self, sentinel: &str) -> Counter {
        self.authenticated
            .get_or_create(&SentinelLabel {
                sentinel: sentinel.to_owned(),
            })
            .clone()
    }

    /// Rejections are rare, so a label lookup per rejection is fine.
    pub fn rejected(&self, sentinel: &str, code: RejectionCode) -> Counter {
        self.rejected
            .get_or_create(&RejectionLabels {
                sentinel: sentinel.to_owned(),
                reason: code.as_str().to_owned(),
            })
            .clone()
    }

    pub fn routed(&self, route: &str) -> Counter {
        self.routed
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .clone()
    }

    pub fn dead_lettered(&self, reason: &str) -> Counter {
        self.dead_lettered
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .clone()
    }

    pub fn upgrade_rejected(&self, listener: &str, reason: &str) {
        self.upgrade_rejected
            .get_or_create(&vec![
                ("listener".to_owned(), listener.to_owned()),
                ("reason".to_owned(), reason.to_owned()),
            ])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
