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
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AckLabels {
    listener: String,
    status: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    listener: String,
    code: String,
}

/// Counters of one listener, shared by all its connections.
#[derive(Clone, Debug, Default)]
pub struct ListenerCounters {
    pub connections: Gauge,
    pub received: Counter,
    pub accepted: Counter,
    pub rejected: Counter,
    /// Acknowledgements sent, by status.
    pub acked_accepted: Counter,
    pub acked_stored: Counter,
    /// Acknowledgements that said `duplicate`.
    pub duplicates: Counter,
}

/// Counters of one downstream module.
#[derive(Clone, Debug, Default)]
pub struct DownstreamCounters {
    pub delivered: Counter,
    /// Failed attempts (a batch not committed, a request not answered 2xx).
    pub failed: Counter,
    pub queue_depth: Gauge,
    pub subscriber_dropped: Counter,
    /// Connections re-established (nats, mqtt, websocket-client).
    pub reconnects: Counter,
    /// 1 while connected to the broker or server, 0 otherwise (modules that connect out).
    pub connected: Gauge,
    /// Publishes sent and not yet acknowledged (nats, mqtt).
    pub in_flight: Gauge,
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
    delivery_failures: Family<DownstreamLabel, Counter>,
    queue_depth: Family<DownstreamLabel, Gauge>,
    subscriber_dropped: Family<DownstreamLabel, Counter>,
    reconnects: Family<DownstreamLabel, Counter>,
    link_connected: Family<DownstreamLabel, Gauge>,
    in_flight: Family<DownstreamLabel, Gauge>,
    dead_lettered: Family<ReasonLabel, Counter>,
    dead_letters_suppressed: Family<ReasonLabel, Counter>,
    acks: Family<AckLabels, Counter>,
    duplicates: Family<ListenerLabel, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    pub latency: Histogram,
    /// Time from receipt to the acknowledgement (or refusal) going out.
    pub ack_latency: Histogram,
    pub upgrade_rejected: Family<Vec<(String, String)>, Counter<u64, AtomicU64>>,
    /// 1 while the database answers the health watcher's pings, 0 while it does not.
    pub database_up: Gauge,
    /// Times the database came back after the watcher found it unreachable.
    pub database_reconnects: Counter,
    /// 1, labelled with this process's node id: which node a scrape came from when several
    /// share a database (each node serves its own /metrics).
    pub node_info: Family<Vec<(String, String)>, Gauge>,
    /// 1 while connected to the bus (`--bus-url`), 0 while not; absent without a bus.
    pub bus_up: Gauge,
    /// Frames for other nodes dropped because the bus queue was full.
    pub bus_dropped: Counter,
    /// Messages to devices taken by a connection's queue.
    pub downlink_delivered: Counter,
    /// Messages to devices a connection could not take (its queue was full: it does not read).
    pub downlink_dropped: Counter,
    /// Messages to offline devices queued for their next connection.
    pub downlink_queued: Counter,
    /// Queued messages that expired before the device connected (dead-lettered).
    pub downlink_expired: Counter,
    /// Presence events (`$connected`, `$disconnected`) of device connections.
    pub presence_events: Family<Vec<(String, String)>, Counter>,
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
        let delivery_failures = Family::<DownstreamLabel, Counter>::default();
        registry.register(
            "delivery_failures",
            "Failed delivery attempts per downstream module (each is retried or refused)",
            delivery_failures.clone(),
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
        let reconnects = Family::<DownstreamLabel, Counter>::default();
        registry.register(
            "downstream_reconnects",
            "Connections re-established by a downstream that connects out (nats, mqtt, websocket-client)",
            reconnects.clone(),
        );
        let link_connected = Family::<DownstreamLabel, Gauge>::default();
        registry.register(
            "downstream_connected",
            "1 while a downstream that connects out is connected, else 0",
            link_connected.clone(),
        );
        let in_flight = Family::<DownstreamLabel, Gauge>::default();
        registry.register(
            "downstream_in_flight",
            "Publishes sent to a broker and not yet acknowledged",
            in_flight.clone(),
        );
        let dead_lettered = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "messages_dead_lettered",
            "Envelopes dead-lettered per reason",
            dead_lettered.clone(),
        );
        let dead_letters_suppressed = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "dead_letters_suppressed",
            "Rejections not written as dead letters because their source address exceeded its rate",
            dead_letters_suppressed.clone(),
        );
        let acks = Family::<AckLabels, Counter>::default();
        registry.register(
            "acks",
            "Acknowledgements sent to devices per listener and status",
            acks.clone(),
        );
        let duplicates = Family::<ListenerLabel, Counter>::default();
        registry.register(
            "duplicates",
            "Messages acknowledged as duplicates (a retry of a stored message) per listener",
            duplicates.clone(),
        );
        let refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "refusals",
            "Refusals sent to devices on acknowledging listeners per listener and code",
            refusals.clone(),
        );
        let ack_latency = Histogram::new(exponential_buckets(0.000_01, 2.0, 22));
        registry.register(
            "ack_latency_seconds",
            "Time from receipt to the acknowledgement or refusal",
            ack_latency.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.000_01, 2.0, 22));
        registry.register(
            "pipeline_latency_seconds",
            "Time from receipt to delivery",
            latency.clone(),
        );
        let database_up = Gauge::default();
        database_up.set(1);
        registry.register(
            "database_up",
            "1 while the database answers, 0 while it is unreachable (see /healthz for why)",
            database_up.clone(),
        );
        let database_reconnects = Counter::default();
        registry.register(
            "database_reconnects",
            "Times the database became reachable again after an outage",
            database_reconnects.clone(),
        );
        let bus_up = Gauge::default();
        registry.register(
            "bus_up",
            "1 while connected to the NATS bus between nodes (0 while reconnecting; 0 without --bus-url)",
            bus_up.clone(),
        );
        let bus_dropped = Counter::default();
        registry.register(
            "bus_dropped",
            "Live frames for other nodes dropped because the bus queue was full",
            bus_dropped.clone(),
        );
        let downlink_delivered = Counter::default();
        registry.register(
            "downlink_delivered",
            "Messages to devices taken by a connection's queue",
            downlink_delivered.clone(),
        );
        let downlink_dropped = Counter::default();
        registry.register(
            "downlink_dropped",
            "Messages to devices a connection could not take because its queue was full",
            downlink_dropped.clone(),
        );
        let downlink_queued = Counter::default();
        registry.register(
            "downlink_queued",
            "Messages to offline devices queued for their next connection",
            downlink_queued.clone(),
        );
        let downlink_expired = Counter::default();
        registry.register(
            "downlink_expired",
            "Queued messages to devices that expired before the device connected",
            downlink_expired.clone(),
        );
        let presence_events = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "presence_events",
            "Device connection events per type ($connected, $disconnected)",
            presence_events.clone(),
        );
        let node_info = Family::<Vec<(String, String)>, Gauge>::default();
        registry.register(
            "node_info",
            "1, labelled with the node id of the process that serves these metrics",
            node_info.clone(),
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
            delivery_failures,
            queue_depth,
            subscriber_dropped,
            reconnects,
            link_connected,
            in_flight,
            dead_lettered,
            dead_letters_suppressed,
            acks,
            duplicates,
            refusals,
            latency,
            ack_latency,
            upgrade_rejected,
            database_up,
            database_reconnects,
            node_info,
            bus_up,
            bus_dropped,
            downlink_delivered,
            downlink_dropped,
            downlink_queued,
            downlink_expired,
            presence_events,
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
            acked_accepted: self.ack_counter(key, "accepted"),
            acked_stored: self.ack_counter(key, "stored"),
            duplicates: self.duplicates.get_or_create(&label).clone(),
        }
    }

    fn ack_counter(&self, listener: &str, status: &str) -> Counter {
        self.acks
            .get_or_create(&AckLabels {
                listener: listener.to_owned(),
                status: status.to_owned(),
            })
            .clone()
    }

    /// A refusal sent on an acknowledging listener (rare: a label lookup is fine).
    pub fn refused(&self, listener: &str, code: RejectionCode) {
        self.refusals
            .get_or_create(&RefusalLabels {
                listener: listener.to_owned(),
                code: code.as_str().to_owned(),
            })
            .inc();
    }

    pub fn downstream(&self, key: &str) -> DownstreamCounters {
        let label = DownstreamLabel {
            downstream: key.to_owned(),
        };
        DownstreamCounters {
            delivered: self.delivered.get_or_create(&label).clone(),
            failed: self.delivery_failures.get_or_create(&label).clone(),
            queue_depth: self.queue_depth.get_or_create(&label).clone(),
            subscriber_dropped: self.subscriber_dropped.get_or_create(&label).clone(),
            reconnects: self.reconnects.get_or_create(&label).clone(),
            connected: self.link_connected.get_or_create(&label).clone(),
            in_flight: self.in_flight.get_or_create(&label).clone(),
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

    pub fn dead_letters_suppressed(&self, reason: &str) -> Counter {
        self.dead_letters_suppressed
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
