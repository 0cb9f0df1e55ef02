//! Device presence: a `$connected` event when a connection binds to a device (credentials at
//! connect, or its first authenticated message) and a `$disconnected` event when it ends, with
//! the connection id, listener, source address and, on the way out, the close code and reason.
//!
//! Connection tasks hand events to one bounded queue (a full queue makes the connection task
//! wait, like any other stage). One worker takes them in order and:
//! - keeps the newest [`RECENT_EVENTS`] in memory (`GET /api/v1/devices/{id}/events`);
//! - routes each as an envelope whose `messageType` is the event type and whose payload is the
//!   event, so routes that select `$connected`/`$disconnected` can store or forward them. Only
//!   routes that name them by `messageType` take them: the routes that existed before presence
//!   did keep seeing only what devices send;
//! - on `$connected`, hands the connection the messages queued while the device was offline.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use iotgate_core::envelope::{format_timestamp, new_envelope_id, ConnectionMetadata};
use iotgate_core::{ContentType, Envelope, Payload};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use crate::connections::Registration;
use crate::outbox::Outbox;
use crate::Pipeline;

/// Events kept in memory per node, newest replacing oldest.
pub const RECENT_EVENTS: usize = 2_000;

/// Events waiting for the worker; beyond it connection tasks wait.
const PRESENCE_QUEUE: usize = 4_096;

/// Message types of presence events; they start with `$` so no device payload type collides.
pub const CONNECTED: &str = "$connected";
pub const DISCONNECTED: &str = "$disconnected";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceKind {
    Connected,
    Disconnected,
}

impl PresenceKind {
    pub fn message_type(self) -> &'static str {
        match self {
            PresenceKind::Connected => CONNECTED,
            PresenceKind::Disconnected => DISCONNECTED,
        }
    }
}

/// One connection of a device beginning or ending.
#[derive(Debug, Clone)]
pub struct PresenceEvent {
    pub kind: PresenceKind,
    pub device_id: Arc<str>,
    /// A sentinel authenticated the device (false: a listener without a sentinel took the
    /// device id the connection's messages claim).
    pub authenticated: bool,
    pub connection_id: u64,
    pub listener: Arc<str>,
    pub source_address: Option<SocketAddr>,
    pub at: OffsetDateTime,
    /// `$disconnected`: the close code sent or received (absent when the connection was lost
    /// without a closing handshake).
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
}

impl PresenceEvent {
    /// The event as the API shows it and as the envelope's payload.
    pub fn to_json(&self) -> Value {
        let mut event = json!({
            "type": self.kind.message_type(),
            "deviceId": &*self.device_id,
            "connectionId": self.connection_id,
            "listener": &*self.listener,
            "sourceAddress": self.source_address.map(|a| a.to_string()),
            "at": format_timestamp(self.at),
        });
        if self.kind == PresenceKind::Disconnected {
            event["closeCode"] = json!(self.close_code);
            event["closeReason"] = json!(self.close_reason);
        }
        event
    }

    fn envelope(&self, device_type: Option<Arc<str>>) -> Envelope {
        let payload = self.to_json();
        Envelope {
            id: new_envelope_id(self.at),
            listener_key: self.listener.clone(),
            connection_id: self.connection_id,
            source_address: self.source_address,
            received_at: self.at,
            received_instant: std::time::Instant::now(),
            content_type: ContentType::Json,
            size: 0,
            payload: Payload::Json(payload),
            device_id: self.authenticated.then(|| self.device_id.clone()),
            device_type,
            authenticated: self.authenticated,
            claimed_device_id: (!self.authenticated).then(|| self.device_id.clone()),
            metadata: Arc::new(ConnectionMetadata::default()),
            message_id: None,
            dedup_window: None,
            attributes: None,
            message_type: Some(Arc::from(self.kind.message_type())),
        }
    }
}

/// The presence queue and the recent events of this node.
#[derive(Debug)]
pub struct Presence {
    sender: mpsc::Sender<PresenceEvent>,
    /// Taken once by the worker ([`run_presence`]).
    receiver: Mutex<Option<mpsc::Receiver<PresenceEvent>>>,
    recent: Mutex<VecDeque<Arc<PresenceEvent>>>,
}

impl Default for Presence {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel(PRESENCE_QUEUE);
        Self {
            sender,
            receiver: Mutex::new(Some(receiver)),
            recent: Mutex::new(VecDeque::with_capacity(64)),
        }
    }
}

impl Presence {
    /// Queues an event for the worker; waits while the queue is full.
    pub async fn announce(&self, event: PresenceEvent) {
        // The receiver lives as long as the process serves; after shutdown nothing listens.
        let _ = self.sender.send(event).await;
    }

    fn remember(&self, event: Arc<PresenceEvent>) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(event);
    }

    /// The device's events this node still remembers, newest first, at most `limit`.
    pub fn recent(&self, device_id: &str, limit: usize) -> Vec<Arc<PresenceEvent>> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .rev()
            .filter(|e| &*e.device_id == device_id)
            .take(limit)
            .cloned()
            .collect()
    }
}

/// Device changes a connection announces (`$disconnected` of one device, `$connected` of the
/// next). A gateway speaking for many devices over one connection would otherwise emit two events
/// per message; beyond this it keeps being re-bound in the hub, silently.
pub const MAX_ANNOUNCED_SWITCHES: u32 = 16;

/// What a connection task keeps to announce its device's presence: which device it is bound
/// to, so a re-binding and the end are announced for the right device.
#[derive(Debug)]
pub struct ConnectionPresence {
    listener: Arc<str>,
    source_address: Option<SocketAddr>,
    /// The device the hub has the connection bound to (compared on every message).
    hub_device: Option<Arc<str>>,
    /// The device announced as connected, and whether a sentinel authenticated it.
    bound: Option<(Arc<str>, bool)>,
    /// Device changes announced so far.
    switches: u32,
}

impl ConnectionPresence {
    pub fn new(listener: Arc<str>, source_address: Option<SocketAddr>) -> Self {
        Self {
            listener,
            source_address,
            hub_device: None,
            bound: None,
            switches: 0,
        }
    }

    fn event(
        &self,
        kind: PresenceKind,
        registration: &Registration,
        device: &Arc<str>,
        authenticated: bool,
    ) -> PresenceEvent {
        PresenceEvent {
            kind,
            device_id: device.clone(),
            authenticated,
            connection_id: registration.connection_id(),
            listener: self.listener.clone(),
            source_address: self.source_address,
            at: OffsetDateTime::now_utc(),
            close_code: None,
            close_reason: None,
        }
    }

    /// Binds the connection to `device` in the hub and announces it when that is new (a
    /// connection that starts speaking for another device ends its presence for the first, up
    /// to [`MAX_ANNOUNCED_SWITCHES`] times). Cheap when nothing changed: one comparison.
    ///
    /// Connection loops call this for every message and live as long as their connections: the
    /// announcing part is boxed, so this future stays small in theirs.
    pub async fn bind(
        &mut self,
        pipeline: &Pipeline,
        registration: &Registration,
        device: &Arc<str>,
        authenticated: bool,
    ) {
        if self.hub_device.as_ref() == Some(device) {
            return;
        }
        Box::pin(self.rebind(pipeline, registration, device, authenticated)).await;
    }

    async fn rebind(
        &mut self,
        pipeline: &Pipeline,
        registration: &Registration,
        device: &Arc<str>,
        authenticated: bool,
    ) {
        registration.bind_device(device);
        self.hub_device = Some(device.clone());
        if self.bound.is_some() {
            if self.switches == MAX_ANNOUNCED_SWITCHES {
                tracing::info!(
                    switches = MAX_ANNOUNCED_SWITCHES,
                    "the connection keeps changing devices; further changes are not announced"
                );
            }
            self.switches = self.switches.saturating_add(1);
            if self.switches > MAX_ANNOUNCED_SWITCHES {
                return;
            }
        }
        if let Some((previous, was_authenticated)) = self.bound.take() {
            let mut ended = self.event(
                PresenceKind::Disconnected,
                registration,
                &previous,
                was_authenticated,
            );
            ended.close_reason = Some("the connection now speaks for another device".into());
            pipeline.presence.announce(ended).await;
        }
        let event = self.event(PresenceKind::Connected, registration, device, authenticated);
        pipeline.presence.announce(event).await;
        self.bound = Some((device.clone(), authenticated));
    }

    /// Announces the end of the connection (when it was bound to a device).
    pub async fn end(
        self,
        pipeline: &Pipeline,
        registration: &Registration,
        close_code: Option<u16>,
        close_reason: Option<String>,
    ) {
        if let Some((device, authenticated)) = &self.bound {
            let mut event = self.event(
                PresenceKind::Disconnected,
                registration,
                device,
                *authenticated,
            );
            event.close_code = close_code;
            event.close_reason = close_reason;
            // Boxed, like `bind`'s announcing: this future is part of every connection loop's,
            // which lives as long as its connection, and this await would be its largest.
            Box::pin(pipeline.presence.announce(event)).await;
        }
    }
}

/// The presence worker: remembers, routes and (on `$connected`) delivers queued messages, in
/// the order events happened, until every sender is gone or `stop`.
pub async fn run_presence(
    pipeline: Arc<Pipeline>,
    outbox: Option<Arc<Outbox>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let Some(mut events) = pipeline
        .presence
        .receiver
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        tracing::error!("the presence worker was started twice");
        return;
    };
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        pipeline
            .metrics
            .presence_events
            .get_or_create(&vec![(
                "type".to_owned(),
                event.kind.message_type().to_owned(),
            )])
            .inc();
        let event = Arc::new(event);
        pipeline.presence.remember(event.clone());
        let device_type = pipeline
            .registry
            .get(&event.device_id)
            .map(|d| d.device_type.clone());
        pipeline.route_event(event.envelope(device_type)).await;
        if event.kind == PresenceKind::Connected {
            if let Some(outbox) = &outbox {
                outbox
                    .deliver_queued(&event.device_id, &event.listener, event.connection_id)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(device: &str, n: u64) -> PresenceEvent {
        PresenceEvent {
            kind: PresenceKind::Connected,
            device_id: Arc::from(device),
            authenticated: true,
            connection_id: n,
            listener: Arc::from("plant"),
            source_address: None,
            at: OffsetDateTime::now_utc(),
            close_code: None,
            close_reason: None,
        }
    }

    #[test]
    fn recent_events_are_bounded_and_newest_first_per_device() {
        let presence = Presence::default();
        for n in 0..(RECENT_EVENTS as u64 + 10) {
            presence.remember(Arc::new(event(if n % 2 == 0 { "a" } else { "b" }, n)));
        }
        let a = presence.recent("a", 3);
        let ids: Vec<u64> = a.iter().map(|e| e.connection_id).collect();
        assert_eq!(
            ids,
            [
                RECENT_EVENTS as u64 + 8,
                RECENT_EVENTS as u64 + 6,
                RECENT_EVENTS as u64 + 4
            ]
        );
        assert_eq!(presence.recent("a", usize::MAX).len(), RECENT_EVENTS / 2);
        assert!(presence.recent("nobody", 10).is_empty());
    }

    #[test]
    fn a_disconnect_names_its_close_code_and_reason() {
        let mut ended = event("a", 7);
        ended.kind = PresenceKind::Disconnected;
        ended.close_code = Some(1000);
        ended.close_reason = Some("bye".into());
        let json = ended.to_json();
        assert_eq!(json["type"], "$disconnected");
        assert_eq!(json["closeCode"], 1000);
        assert_eq!(json["closeReason"], "bye");
        assert_eq!(json["connectionId"], 7);
        let envelope = ended.envelope(None);
        assert_eq!(envelope.message_type.as_deref(), Some("$disconnected"));
        assert_eq!(envelope.device_id.as_deref(), Some("a"));
        assert!(event("a", 1).to_json().get("closeCode").is_none());
    }
}
