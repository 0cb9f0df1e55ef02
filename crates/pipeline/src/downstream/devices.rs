//! The `devices` downstream: each routed message goes to device connections, back to the
//! connection that sent it (a reply to the session, as Node-RED's websocket-out answers its
//! input), to a group, to every connection of a listener, or to the message's device.
//!
//! Live, not durable, like the `websocket` type: a connection that is not there misses the
//! message, and one whose downlink queue is full refuses it (counted per downstream in
//! `iotgate_subscriber_dropped_total`, next to `iotgate_delivered_total`). Nothing waits: a
//! send is a look-up and a `try_send` per connection. With several nodes, group, listener and
//! device targets reach the other nodes' connections over the bus too; the sender is always on
//! this node (it sent the message here).

use std::sync::Arc;

use iotgate_core::definition::{DeviceTarget, DownstreamDefinition, SubscriberFormat};
use iotgate_core::{Envelope, Payload};

use crate::bus::{LiveBus, RemoteTarget};
use crate::connections::{ConnectionHub, Delivery, Downlink, DownlinkBody};
use crate::metrics::DownstreamCounters;

#[derive(Debug)]
pub struct DeviceSender {
    pub key: Arc<str>,
    target: DeviceTarget,
    group: Option<Arc<str>>,
    /// The listener addressed instead of the message's own.
    listener: Option<Arc<str>>,
    format: SubscriberFormat,
    hub: Arc<ConnectionHub>,
    counters: DownstreamCounters,
    bus: Option<LiveBus>,
}

impl DeviceSender {
    pub fn new(
        definition: &DownstreamDefinition,
        hub: Arc<ConnectionHub>,
        counters: DownstreamCounters,
        bus: Option<LiveBus>,
    ) -> Self {
        Self {
            key: Arc::from(definition.key.as_str()),
            // Validation requires a target; a definition without one answers nobody's messages.
            target: definition.target.unwrap_or(DeviceTarget::Sender),
            group: definition.group.as_deref().map(Arc::from),
            listener: definition.listener.as_deref().map(Arc::from),
            format: definition.format,
            hub,
            counters,
            bus,
        }
    }

    /// The body a device receives for `envelope`.
    fn body(&self, envelope: &Envelope) -> DownlinkBody {
        match self.format {
            SubscriberFormat::Payload => match &envelope.payload {
                Payload::Json(value) => DownlinkBody::Json(value.clone()),
                Payload::Text(text) => DownlinkBody::Text(Arc::from(text.as_str())),
                Payload::Binary(bytes) => DownlinkBody::Binary(bytes.clone()),
            },
            _ => DownlinkBody::Json(serde_json::to_value(envelope).unwrap_or_default()),
        }
    }

    /// Whom on other nodes a message goes to as well (the sender is always here).
    fn remote_target(&self, envelope: &Envelope) -> Option<RemoteTarget> {
        let listener = || {
            self.listener
                .as_deref()
                .unwrap_or(&envelope.listener_key)
                .to_owned()
        };
        match self.target {
            DeviceTarget::Sender => None,
            DeviceTarget::Group => Some(RemoteTarget::Group {
                listener: listener(),
                group: self.group.as_deref()?.to_owned(),
            }),
            DeviceTarget::Listener => Some(RemoteTarget::Listener {
                listener: listener(),
            }),
            DeviceTarget::Device => Some(RemoteTarget::Device {
                device: envelope
                    .device_id
                    .as_deref()
                    .or(envelope.claimed_device_id.as_deref())?
                    .to_owned(),
                listener: self.listener.as_deref().map(str::to_owned),
            }),
        }
    }

    /// Sends `envelope` to the connections the target names.
    pub async fn send(&self, envelope: &Envelope) {
        let body = self.body(envelope);
        let message = Downlink::from_server(body.clone());
        let remote = self.remote_target(envelope);
        let delivery = match (&self.target, &remote) {
            (DeviceTarget::Sender, _) => self.hub.to_connection(envelope.connection_id, &message),
            (_, Some(target)) => target.deliver_locally(&self.hub, &message),
            // A group without a name, a device target for a message of no device.
            (_, None) => Delivery::default(),
        };
        self.counters.delivered.inc_by(delivery.delivered as u64);
        self.counters
            .subscriber_dropped
            .inc_by(delivery.dropped as u64);
        if let (Some(bus), Some(target)) = (&self.bus, &remote) {
            bus.send_elsewhere(target, &body).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotgate_core::envelope::ConnectionMetadata;
    use iotgate_core::ContentType;

    fn envelope(connection_id: u64) -> Envelope {
        Envelope {
            id: uuid::Uuid::now_v7(),
            listener_key: Arc::from("plant"),
            connection_id,
            source_address: None,
            received_at: time::OffsetDateTime::now_utc(),
            received_instant: std::time::Instant::now(),
            content_type: ContentType::Json,
            size: 0,
            payload: Payload::Json(serde_json::json!({"t": 21})),
            device_id: Some(Arc::from("dev-1")),
            device_type: None,
            authenticated: true,
            claimed_device_id: None,
            metadata: Arc::new(ConnectionMetadata::default()),
            message_id: None,
            dedup_window: None,
            attributes: None,
            message_type: None,
        }
    }

    fn sender(document: serde_json::Value, hub: &Arc<ConnectionHub>) -> DeviceSender {
        let definition: DownstreamDefinition = serde_json::from_value(document).unwrap();
        assert!(definition.validate(&serde_json::Value::Null).is_empty());
        DeviceSender::new(
            &definition,
            hub.clone(),
            crate::metrics::Metrics::new().downstream(&definition.key),
            None,
        )
    }

    #[tokio::test]
    async fn each_target_reaches_its_connections() {
        let hub = Arc::new(ConnectionHub::default());
        let (_a, mut a) = hub.register(1, "plant".into(), Some("dev-1".into()), None);
        let (_b, mut b) = hub.register(2, "plant".into(), Some("dev-2".into()), None);
        let reply = sender(
            serde_json::json!({"key": "reply", "name": "r", "type": "devices", "target": "sender", "format": "payload"}),
            &hub,
        );
        reply.send(&envelope(2)).await;
        assert_eq!(
            b.recv().await.unwrap().body,
            DownlinkBody::Json(serde_json::json!({"t": 21}))
        );
        assert!(a.try_recv().is_err(), "only the sender hears the reply");
        assert_eq!(reply.counters.delivered.get(), 1);

        let everyone = sender(
            serde_json::json!({"key": "all", "name": "a", "type": "devices", "target": "listener"}),
            &hub,
        );
        everyone.send(&envelope(1)).await;
        for receiver in [&mut a, &mut b] {
            let DownlinkBody::Json(envelope) = receiver.recv().await.unwrap().body.clone() else {
                panic!("the envelope format sends JSON");
            };
            assert_eq!(envelope["deviceId"], "dev-1");
        }

        let device = sender(
            serde_json::json!({"key": "dev", "name": "d", "type": "devices", "target": "device", "format": "payload"}),
            &hub,
        );
        device.send(&envelope(2)).await;
        assert!(a.recv().await.is_some());
        assert!(b.try_recv().is_err());
    }
}
