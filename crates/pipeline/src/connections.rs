//! Addressable connections: which device connections are open, on which listener, speaking for
//! which device, in which groups, so that messages can travel *to* devices: to one device, to a
//! group, to every connection of a listener, or back to the connection that sent a message.
//!
//! A connection registers once, when its upgrade succeeds, and gets a bounded queue of
//! [`Downlink`]s that its task writes to the socket between reads. Sending never waits: a full
//! queue (a device that stopped reading) refuses that one connection's copy, counted in
//! `iotgate_downlink_dropped`, and every send says how many connections took the message, so the
//! caller (the REST API, a route) can tell its own caller the truth.
//!
//! The [`Registration`] is the connection's handle: dropping it (the connection task ending, or
//! a resumable session expiring) removes the connection and its group memberships.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use serde_json::Value;
use tokio::sync::mpsc;

/// Messages waiting for one connection's socket; beyond it new ones are refused for that
/// connection (it does not read, or reads far slower than it is sent to).
pub const DOWNLINK_QUEUE: usize = 256;

/// The body of a message to a device, as the sender gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum DownlinkBody {
    Json(Value),
    Text(Arc<str>),
    Binary(Bytes),
}

impl DownlinkBody {
    /// The body as text to store or to carry between nodes: its kind (`json`, `text`,
    /// `binary`) and JSON text, the text itself, or base64 of the bytes.
    pub fn encode(&self) -> (&'static str, String) {
        use base64::Engine as _;
        match self {
            DownlinkBody::Json(value) => ("json", value.to_string()),
            DownlinkBody::Text(text) => ("text", text.to_string()),
            DownlinkBody::Binary(bytes) => (
                "binary",
                base64::engine::general_purpose::STANDARD.encode(bytes),
            ),
        }
    }

    /// A body [`encode`](Self::encode)d; `None` for an unknown kind or a corrupt text.
    pub fn decode(kind: &str, text: &str) -> Option<Self> {
        use base64::Engine as _;
        match kind {
            "json" => serde_json::from_str(text).ok().map(DownlinkBody::Json),
            "text" => Some(DownlinkBody::Text(Arc::from(text))),
            "binary" => base64::engine::general_purpose::STANDARD
                .decode(text)
                .ok()
                .map(|bytes| DownlinkBody::Binary(bytes.into())),
            _ => None,
        }
    }
}

/// Who a message to a device comes from; protocols that say so (Web PubSub's `from`) tell the
/// device, plain listeners send only the body.
#[derive(Debug, Clone, PartialEq)]
pub enum DownlinkSource {
    /// The platform: the REST API or a route.
    Server,
    /// A group a connection sent to; `from_user` is the sending device.
    Group {
        group: Arc<str>,
        from_user: Option<Arc<str>>,
    },
}

/// One message to a device connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Downlink {
    pub body: DownlinkBody,
    pub source: DownlinkSource,
}

impl Downlink {
    pub fn from_server(body: DownlinkBody) -> Arc<Self> {
        Arc::new(Self {
            body,
            source: DownlinkSource::Server,
        })
    }
}

/// A message to a device as one WebSocket frame of a plain listener (no protocol around it).
#[derive(Debug, Clone, PartialEq)]
pub enum PlainFrame {
    Text(String),
    Binary(Bytes),
}

impl Downlink {
    /// The frame a plain listener of `content_type` sends: JSON as a text frame (MessagePack in
    /// a binary frame on msgpack listeners), text as text, bytes as a binary frame.
    pub fn plain_frame(&self, content_type: iotgate_core::ContentType) -> PlainFrame {
        match (&self.body, content_type) {
            (DownlinkBody::Json(value), iotgate_core::ContentType::Msgpack) => {
                match rmp_serde::to_vec_named(value) {
                    Ok(bytes) => PlainFrame::Binary(Bytes::from(bytes)),
                    // A JSON value always encodes; keep the text form if it ever did not.
                    Err(_) => PlainFrame::Text(value.to_string()),
                }
            }
            (DownlinkBody::Json(value), _) => PlainFrame::Text(value.to_string()),
            (DownlinkBody::Text(text), _) => PlainFrame::Text(text.to_string()),
            (DownlinkBody::Binary(bytes), _) => PlainFrame::Binary(bytes.clone()),
        }
    }
}

/// The receiving end a connection task reads.
pub type DownlinkReceiver = mpsc::Receiver<Arc<Downlink>>;

/// What a send reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Connections whose queue took the message.
    pub delivered: usize,
    /// Connections that were addressed but whose queue was full.
    pub dropped: usize,
}

impl std::ops::AddAssign for Delivery {
    fn add_assign(&mut self, other: Self) {
        self.delivered += other.delivered;
        self.dropped += other.dropped;
    }
}

/// One open connection as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub connection_id: u64,
    pub listener: Arc<str>,
    pub device: Option<Arc<str>>,
    pub peer: Option<SocketAddr>,
    pub connected_at: time::OffsetDateTime,
    pub groups: Vec<Arc<str>>,
}

impl ConnectionInfo {
    /// The connection as the device API shows it.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "connectionId": self.connection_id,
            "listener": &*self.listener,
            "sourceAddress": self.peer.map(|p| p.to_string()),
            "connectedAt": iotgate_core::envelope::format_timestamp(self.connected_at),
        })
    }
}

struct Entry {
    listener: Arc<str>,
    device: Option<Arc<str>>,
    peer: Option<SocketAddr>,
    connected_at: time::OffsetDateTime,
    sender: mpsc::Sender<Arc<Downlink>>,
    groups: HashSet<Arc<str>>,
}

/// Group names are scoped by listener: two listeners' "alerts" groups are different groups.
type GroupKey = (Arc<str>, Arc<str>);

#[derive(Default)]
struct HubState {
    connections: HashMap<u64, Entry>,
    by_device: HashMap<Arc<str>, HashSet<u64>>,
    by_listener: HashMap<Arc<str>, HashSet<u64>>,
    groups: HashMap<GroupKey, HashSet<u64>>,
}

impl HubState {
    fn remove_from_index<K: std::hash::Hash + Eq>(
        index: &mut HashMap<K, HashSet<u64>>,
        key: &K,
        id: u64,
    ) {
        if let Some(ids) = index.get_mut(key) {
            ids.remove(&id);
            if ids.is_empty() {
                index.remove(key);
            }
        }
    }
}

/// Every addressable connection of this node.
pub struct ConnectionHub {
    state: RwLock<HubState>,
    delivered: Counter,
    dropped: Counter,
}

impl std::fmt::Debug for ConnectionHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionHub").finish_non_exhaustive()
    }
}

impl Default for ConnectionHub {
    fn default() -> Self {
        Self::new(Counter::default(), Counter::default())
    }
}

impl ConnectionHub {
    pub fn new(delivered: Counter, dropped: Counter) -> Self {
        Self {
            state: RwLock::default(),
            delivered,
            dropped,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HubState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HubState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds connection `id` of `listener`; `device` when credentials given at connect already
    /// named it (otherwise [`Registration::bind_device`] once a message does).
    pub fn register(
        self: &Arc<Self>,
        id: u64,
        listener: Arc<str>,
        device: Option<Arc<str>>,
        peer: Option<SocketAddr>,
    ) -> (Registration, DownlinkReceiver) {
        let (sender, receiver) = mpsc::channel(DOWNLINK_QUEUE);
        let mut state = self.write();
        state
            .by_listener
            .entry(listener.clone())
            .or_default()
            .insert(id);
        if let Some(device) = &device {
            state
                .by_device
                .entry(device.clone())
                .or_default()
                .insert(id);
        }
        state.connections.insert(
            id,
            Entry {
                listener,
                device,
                peer,
                connected_at: time::OffsetDateTime::now_utc(),
                sender,
                groups: HashSet::new(),
            },
        );
        (
            Registration {
                hub: self.clone(),
                id,
            },
            receiver,
        )
    }

    fn unregister(&self, id: u64) {
        let mut state = self.write();
        let Some(entry) = state.connections.remove(&id) else {
            return;
        };
        HubState::remove_from_index(&mut state.by_listener, &entry.listener, id);
        if let Some(device) = &entry.device {
            HubState::remove_from_index(&mut state.by_device, device, id);
        }
        for group in entry.groups {
            HubState::remove_from_index(&mut state.groups, &(entry.listener.clone(), group), id);
        }
    }

    /// Queues `message` for each of `ids` (skipping `except`), without waiting.
    fn offer<'a>(
        &self,
        state: &HubState,
        ids: impl Iterator<Item = &'a u64>,
        except: Option<u64>,
        message: &Arc<Downlink>,
    ) -> Delivery {
        let mut delivery = Delivery::default();
        for id in ids {
            if Some(*id) == except {
                continue;
            }
            let Some(entry) = state.connections.get(id) else {
                continue;
            };
            match entry.sender.try_send(message.clone()) {
                Ok(()) => {
                    delivery.delivered += 1;
                    self.delivered.inc();
                }
                // A closed queue is a connection ending right now: it is not addressed any more.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    delivery.dropped += 1;
                    self.dropped.inc();
                }
            }
        }
        delivery
    }

    /// To one connection.
    pub fn to_connection(&self, id: u64, message: &Arc<Downlink>) -> Delivery {
        let state = self.read();
        self.offer(&state, std::iter::once(&id), None, message)
    }

    /// To every connection of `device`, or only those on `listener` when given.
    pub fn to_device(
        &self,
        device: &str,
        listener: Option<&str>,
        message: &Arc<Downlink>,
    ) -> Delivery {
        let state = self.read();
        let Some(ids) = state.by_device.get(device) else {
            return Delivery::default();
        };
        let ids = ids.iter().filter(|id| {
            listener.is_none_or(|listener| {
                state
                    .connections
                    .get(id)
                    .is_some_and(|e| &*e.listener == listener)
            })
        });
        self.offer(&state, ids, None, message)
    }

    /// To every member of `group` on `listener`, except connection `except` (Web PubSub's
    /// `noEcho`).
    pub fn to_group(
        &self,
        listener: &str,
        group: &str,
        except: Option<u64>,
        message: &Arc<Downlink>,
    ) -> Delivery {
        let state = self.read();
        let key: GroupKey = (Arc::from(listener), Arc::from(group));
        match state.groups.get(&key) {
            Some(ids) => self.offer(&state, ids.iter(), except, message),
            None => Delivery::default(),
        }
    }

    /// To every connection of `listener`.
    pub fn to_listener(&self, listener: &str, message: &Arc<Downlink>) -> Delivery {
        let state = self.read();
        match state.by_listener.get(listener) {
            Some(ids) => self.offer(&state, ids.iter(), None, message),
            None => Delivery::default(),
        }
    }

    /// The open connections of `device`, oldest first.
    pub fn device_connections(&self, device: &str) -> Vec<ConnectionInfo> {
        let state = self.read();
        let mut connections: Vec<ConnectionInfo> = state
            .by_device
            .get(device)
            .into_iter()
            .flatten()
            .filter_map(|id| state.connections.get(id).map(|e| info(*id, e)))
            .collect();
        connections.sort_by_key(|c| c.connection_id);
        connections
    }

    /// Devices with at least one open connection.
    pub fn online_devices(&self) -> HashSet<Arc<str>> {
        self.read().by_device.keys().cloned().collect()
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.read().connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn info(id: u64, entry: &Entry) -> ConnectionInfo {
    let mut groups: Vec<Arc<str>> = entry.groups.iter().cloned().collect();
    groups.sort();
    ConnectionInfo {
        connection_id: id,
        listener: entry.listener.clone(),
        device: entry.device.clone(),
        peer: entry.peer,
        connected_at: entry.connected_at,
        groups,
    }
}

/// A connection's place in the hub; dropping it removes the connection.
pub struct Registration {
    hub: Arc<ConnectionHub>,
    id: u64,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .finish()
    }
}

impl Registration {
    pub fn connection_id(&self) -> u64 {
        self.id
    }

    pub fn hub(&self) -> &Arc<ConnectionHub> {
        &self.hub
    }

    /// Names the device this connection speaks for, once a message identified it. Returns true
    /// when that is new (the connection was not bound, or bound to another device).
    pub fn bind_device(&self, device: &Arc<str>) -> bool {
        let mut state = self.hub.write();
        let Some(entry) = state.connections.get_mut(&self.id) else {
            return false;
        };
        if entry.device.as_deref() == Some(&**device) {
            return false;
        }
        let previous = entry.device.replace(device.clone());
        if let Some(previous) = previous {
            HubState::remove_from_index(&mut state.by_device, &previous, self.id);
        }
        state
            .by_device
            .entry(device.clone())
            .or_default()
            .insert(self.id);
        true
    }

    /// The device this connection speaks for, if known.
    pub fn device(&self) -> Option<Arc<str>> {
        self.hub
            .read()
            .connections
            .get(&self.id)
            .and_then(|e| e.device.clone())
    }

    /// Adds the connection to `group` (of its listener); false when it already was a member.
    pub fn join(&self, group: &str) -> bool {
        let mut state = self.hub.write();
        let Some(entry) = state.connections.get_mut(&self.id) else {
            return false;
        };
        let group: Arc<str> = Arc::from(group);
        if !entry.groups.insert(group.clone()) {
            return false;
        }
        let key = (entry.listener.clone(), group);
        state.groups.entry(key).or_default().insert(self.id);
        true
    }

    /// Removes the connection from `group`; false when it was not a member.
    pub fn leave(&self, group: &str) -> bool {
        let mut state = self.hub.write();
        let Some(entry) = state.connections.get_mut(&self.id) else {
            return false;
        };
        if !entry.groups.remove(group) {
            return false;
        }
        let key = (entry.listener.clone(), Arc::from(group));
        HubState::remove_from_index(&mut state.groups, &key, self.id);
        true
    }

    /// The groups the connection is in, sorted.
    pub fn groups(&self) -> Vec<Arc<str>> {
        self.hub
            .read()
            .connections
            .get(&self.id)
            .map(|e| info(self.id, e).groups)
            .unwrap_or_default()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Arc<Downlink> {
        Downlink::from_server(body(s))
    }

    fn body(s: &str) -> DownlinkBody {
        DownlinkBody::Text(Arc::from(s))
    }

    #[tokio::test]
    async fn devices_groups_and_listeners_reach_exactly_their_connections() {
        let hub = Arc::new(ConnectionHub::default());
        let (a, mut a_rx) = hub.register(1, "plant".into(), Some("dev-1".into()), None);
        let (b, mut b_rx) = hub.register(2, "plant".into(), None, None);
        let (_c, mut c_rx) = hub.register(3, "office".into(), Some("dev-1".into()), None);

        assert_eq!(hub.to_device("dev-1", None, &text("both")).delivered, 2);
        assert_eq!(
            hub.to_device("dev-1", Some("office"), &text("office only"))
                .delivered,
            1
        );
        assert!(b.bind_device(&Arc::from("dev-2")));
        assert!(!b.bind_device(&Arc::from("dev-2")));
        assert_eq!(hub.to_device("dev-2", None, &text("b")).delivered, 1);

        assert!(a.join("alerts"));
        assert!(!a.join("alerts"));
        assert!(b.join("alerts"));
        // Groups are per listener: office's connection is not in plant's "alerts".
        assert_eq!(
            hub.to_group("office", "alerts", None, &text("x")).delivered,
            0
        );
        assert_eq!(
            hub.to_group("plant", "alerts", Some(1), &text("g"))
                .delivered,
            1
        );
        assert_eq!(hub.to_listener("plant", &text("all")).delivered, 2);

        assert_eq!(a_rx.recv().await.unwrap().body, body("both"));
        assert_eq!(a_rx.recv().await.unwrap().body, body("all"));
        assert_eq!(c_rx.recv().await.unwrap().body, body("both"));
        assert_eq!(c_rx.recv().await.unwrap().body, body("office only"));
        let received: Vec<_> = [b_rx.recv().await, b_rx.recv().await, b_rx.recv().await]
            .into_iter()
            .map(|m| m.unwrap().body.clone())
            .collect();
        assert_eq!(received, vec![body("b"), body("g"), body("all")]);

        assert!(a.leave("alerts"));
        assert!(!a.leave("alerts"));
        drop(b);
        assert_eq!(
            hub.to_group("plant", "alerts", None, &text("none"))
                .delivered,
            0
        );
        assert_eq!(hub.to_device("dev-2", None, &text("gone")).delivered, 0);
        assert_eq!(hub.len(), 2);
        assert_eq!(hub.device_connections("dev-1").len(), 2);
    }

    #[tokio::test]
    async fn a_connection_that_does_not_read_refuses_beyond_its_queue() {
        let hub = Arc::new(ConnectionHub::default());
        let (_slow, _slow_rx) = hub.register(1, "plant".into(), Some("dev-1".into()), None);
        for _ in 0..DOWNLINK_QUEUE {
            assert_eq!(hub.to_connection(1, &text("m")).delivered, 1);
        }
        let over = hub.to_connection(1, &text("one too many"));
        assert_eq!(
            over,
            Delivery {
                delivered: 0,
                dropped: 1
            }
        );
        assert_eq!(hub.dropped.get(), 1);
        assert_eq!(hub.delivered.get(), DOWNLINK_QUEUE as u64);
    }
}
