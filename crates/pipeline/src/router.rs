//! Route selection: which downstream modules an authenticated envelope goes to. Routes are
//! compiled once per topology change into hash sets, so matching is a few lookups.

use std::collections::HashSet;
use std::sync::Arc;

use iotgate_core::definition::DeviceIdentity;
use iotgate_core::{Envelope, RouteDefinition};
use prometheus_client::metrics::counter::Counter;
use serde_json::Value;

use crate::metrics::Metrics;

#[derive(Debug)]
struct CompiledRoute {
    listeners: Option<HashSet<String>>,
    device_types: Option<HashSet<String>>,
    device_ids: Option<HashSet<String>>,
    /// (payload pointer, or the envelope's message type when `None`; accepted values)
    message_type: Option<(Option<String>, Vec<Value>)>,
    /// Whether the envelope must be authenticated (true) or only claim its device (false).
    authenticated: Option<bool>,
    downstreams: Vec<Arc<str>>,
    routed: Counter,
}

fn member(set: &Option<HashSet<String>>, value: Option<&str>) -> bool {
    match set {
        None => true,
        Some(set) => value.is_some_and(|v| set.contains(v)),
    }
}

impl CompiledRoute {
    fn matches(&self, envelope: &Envelope) -> bool {
        // Platform events (`$connected`, `$disconnected`) go only to routes that name them: a
        // route written for what devices send does not start receiving presence events.
        let platform_event = envelope
            .message_type
            .as_deref()
            .is_some_and(|t| t.starts_with('$'));
        if platform_event && !matches!(&self.message_type, Some((None, _))) {
            return false;
        }
        self.authenticated
            .is_none_or(|wanted| wanted == envelope.authenticated)
            && member(&self.listeners, Some(&envelope.listener_key))
            && member(&self.device_types, envelope.device_type.as_deref())
            && member(&self.device_ids, envelope.device_id.as_deref())
            && match &self.message_type {
                None => true,
                Some((Some(pointer), values)) => envelope
                    .payload
                    .as_json()
                    .and_then(|v| v.pointer(pointer))
                    .is_some_and(|found| values.contains(found)),
                Some((None, values)) => envelope
                    .message_type
                    .as_deref()
                    .is_some_and(|found| values.iter().any(|v| v.as_str() == Some(found))),
            }
    }
}

/// The enabled routes of the current topology.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<CompiledRoute>,
}

impl Router {
    pub fn new(definitions: &[RouteDefinition], metrics: &Metrics) -> Self {
        let set = |v: &Option<Vec<String>>| v.as_ref().map(|v| v.iter().cloned().collect());
        let routes = definitions
            .iter()
            .filter(|d| d.enabled)
            .map(|d| CompiledRoute {
                listeners: set(&d.listeners),
                device_types: set(&d.device_types),
                device_ids: set(&d.device_ids),
                message_type: d
                    .message_type
                    .as_ref()
                    .map(|m| (m.pointer.clone(), m.values.clone())),
                authenticated: d
                    .device_identity
                    .map(|identity| identity == DeviceIdentity::Authenticated),
                downstreams: d
                    .downstreams
                    .iter()
                    .map(|k| Arc::from(k.as_str()))
                    .collect(),
                routed: metrics.routed(&d.key),
            })
            .collect();
        Self { routes }
    }

    /// Fills `targets` with the distinct downstream keys of every matching route.
    pub fn select(&self, envelope: &Envelope, targets: &mut Vec<Arc<str>>) {
        for route in &self.routes {
            if route.matches(envelope) {
                route.routed.inc();
                for key in &route.downstreams {
                    if !targets.contains(key) {
                        targets.push(key.clone());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotgate_core::envelope::ConnectionMetadata;
    use iotgate_core::{ContentType, Payload};
    use serde_json::json;

    fn envelope(listener: &str, device: &str, device_type: &str, payload: Value) -> Envelope {
        Envelope {
            id: uuid::Uuid::now_v7(),
            listener_key: Arc::from(listener),
            connection_id: 1,
            source_address: None,
            received_at: time::OffsetDateTime::now_utc(),
            received_instant: std::time::Instant::now(),
            content_type: ContentType::Json,
            size: 0,
            payload: Payload::Json(payload),
            device_id: Some(Arc::from(device)),
            device_type: Some(Arc::from(device_type)),
            authenticated: true,
            claimed_device_id: None,
            metadata: Arc::new(ConnectionMetadata::default()),
            message_id: None,
            dedup_window: None,
            attributes: None,
            message_type: None,
        }
    }

    fn route(doc: Value) -> RouteDefinition {
        serde_json::from_value(doc).unwrap()
    }

    #[test]
    fn each_selector_filters_and_targets_are_distinct() {
        let metrics = Metrics::new();
        let router = Router::new(
            &[
                route(json!({"key": "all", "name": "a", "downstreams": ["store"]})),
                route(
                    json!({"key": "thermo", "name": "t", "deviceTypes": ["thermo"], "downstreams": ["store", "live"]}),
                ),
                route(
                    json!({"key": "alarms", "name": "x", "listeners": ["plant"], "messageType": {"pointer": "/type", "values": ["alarm"]}, "downstreams": ["hook"]}),
                ),
                route(
                    json!({"key": "off", "name": "o", "enabled": false, "downstreams": ["never"]}),
                ),
            ],
            &metrics,
        );
        let mut targets = Vec::new();
        router.select(
            &envelope("plant", "d1", "thermo", json!({"type": "alarm"})),
            &mut targets,
        );
        let keys: Vec<&str> = targets.iter().map(|k| &**k).collect();
        assert_eq!(keys, ["store", "live", "hook"]);

        targets.clear();
        router.select(
            &envelope("other", "d1", "meter", json!({"type": "alarm"})),
            &mut targets,
        );
        let keys: Vec<&str> = targets.iter().map(|k| &**k).collect();
        assert_eq!(keys, ["store"]);
    }

    #[test]
    fn presence_events_reach_only_the_routes_that_name_them() {
        let metrics = Metrics::new();
        let router = Router::new(
            &[
                route(json!({"key": "all", "name": "a", "downstreams": ["store"]})),
                route(
                    json!({"key": "presence", "name": "p", "messageType": {"values": ["$connected"]}, "downstreams": ["audit"]}),
                ),
            ],
            &metrics,
        );
        let mut connected = envelope("plant", "d1", "thermo", json!({}));
        connected.message_type = Some(Arc::from("$connected"));
        let mut targets = Vec::new();
        router.select(&connected, &mut targets);
        let keys: Vec<&str> = targets.iter().map(|k| &**k).collect();
        assert_eq!(keys, ["audit"]);

        connected.message_type = Some(Arc::from("$disconnected"));
        targets.clear();
        router.select(&connected, &mut targets);
        assert!(targets.is_empty());
    }
}
