//! The bus between nodes (NATS): a live subscriber on any node receives the envelopes ingested on
//! every node.
//!
//! A websocket downstream's hub hands every frame it serializes to [`LiveBus::offer`]; a task
//! publishes it once on `<prefix>.live.<downstream key>` with the ingesting node in a header.
//! Every node subscribes to `<prefix>.live.>` and fans frames from other nodes out to its own
//! subscribers of that downstream (its own frames it skips: they were fanned out locally). The
//! prefix is derived from the server secret's check value, so platforms sharing one NATS server
//! never see each other's traffic.
//!
//! Messages to devices travel the same way: a send to a device, a group or a listener's
//! connections is published on `<prefix>.downlink` (with a reply inbox when the sender wants to
//! know how many connections took it: the REST API); every other node hands it to its own
//! connections and answers with its count.
//!
//! Presence questions too: `<prefix>.presence` asks the other nodes for one device's open
//! connections, or for every device they have a connection of, so the device API shows the
//! platform's view rather than one node's.
//!
//! The bus is not durable, like the live views it feeds: a full outgoing queue drops the frame
//! (counted in `iotgate_bus_dropped_total`), and a NATS server that goes away is reconnected
//! with backoff by the client while ingest and durable downstreams go on without it
//! (`iotgate_bus_up`, `/healthz`).

use std::collections::HashSet;
use std::sync::Arc;

use async_nats::connection::State;
use async_nats::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use serde::{Deserialize, Serialize};

use crate::connections::{ConnectionHub, Delivery, Downlink, DownlinkBody, DownlinkSource};
use crate::downstream::{FrameBody, SubscriberFrame};
use crate::metrics::Metrics;
use crate::Pipeline;

/// Frames waiting to be published; beyond it new ones are dropped.
const OUTGOING_QUEUE: usize = 65_536;

const NODE: &str = "Iotgate-Node";
const LISTENER: &str = "Iotgate-Listener";
const DEVICE: &str = "Iotgate-Device";
const BODY: &str = "Iotgate-Body";

/// The publishing side handed to subscriber hubs; cheap to clone.
#[derive(Clone, Debug)]
pub struct LiveBus {
    outgoing: mpsc::Sender<(Arc<str>, Arc<SubscriberFrame>)>,
    dropped: Counter,
    client: async_nats::Client,
    /// `<prefix>.downlink`: messages to device connections on other nodes.
    downlink_subject: Arc<str>,
    /// `<prefix>.presence`: questions about other nodes' connections.
    presence_subject: Arc<str>,
    node: Arc<str>,
}

/// Which connections on other nodes a message to devices is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "to", rename_all = "lowercase")]
pub enum RemoteTarget {
    Device {
        device: String,
        listener: Option<String>,
    },
    Group {
        listener: String,
        group: String,
    },
    Listener {
        listener: String,
    },
}

/// A message to devices as it travels between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RemoteDownlink {
    #[serde(flatten)]
    target: RemoteTarget,
    /// `json`, `text` or `binary` (see [`DownlinkBody::encode`]).
    kind: String,
    body: String,
    /// The device that sent it to a group (Web PubSub `sendToGroup`): members then read it as a
    /// group message from that user, not as a message from the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from_user: Option<String>,
}

/// A node's answer: how many of its connections took the message.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct RemoteDelivery {
    delivered: usize,
    dropped: usize,
}

impl RemoteTarget {
    /// Hands `message` to this node's connections it names.
    pub fn deliver_locally(&self, hub: &ConnectionHub, message: &Arc<Downlink>) -> Delivery {
        match self {
            RemoteTarget::Device { device, listener } => {
                hub.to_device(device, listener.as_deref(), message)
            }
            RemoteTarget::Group { listener, group } => hub.to_group(listener, group, None, message),
            RemoteTarget::Listener { listener } => hub.to_listener(listener, message),
        }
    }
}

impl LiveBus {
    /// Queues a frame of downstream `key` for the other nodes; drops it (counted) when the queue
    /// is full.
    pub fn offer(&self, key: &Arc<str>, frame: &Arc<SubscriberFrame>) {
        if self
            .outgoing
            .try_send((key.clone(), frame.clone()))
            .is_err()
        {
            self.dropped.inc();
        }
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn downlink_payload(
        target: &RemoteTarget,
        body: &DownlinkBody,
        from_user: Option<&str>,
    ) -> Option<bytes::Bytes> {
        let (kind, text) = body.encode();
        let message = RemoteDownlink {
            target: target.clone(),
            kind: kind.to_owned(),
            body: text,
            from_user: from_user.map(str::to_owned),
        };
        serde_json::to_vec(&message).ok().map(bytes::Bytes::from)
    }

    /// Sends a message to the connections `target` names on the other nodes, without waiting
    /// for their counts (a route's `devices` downstream).
    pub async fn send_elsewhere(&self, target: &RemoteTarget, body: &DownlinkBody) {
        self.publish_elsewhere(target, body, None).await;
    }

    /// A device's message to a group (Web PubSub `sendToGroup`) for the group's members on the
    /// other nodes, who read it as sent by `from_user`.
    pub async fn send_to_group_elsewhere(
        &self,
        listener: &str,
        group: &str,
        from_user: &str,
        body: &DownlinkBody,
    ) {
        let target = RemoteTarget::Group {
            listener: listener.to_owned(),
            group: group.to_owned(),
        };
        self.publish_elsewhere(&target, body, Some(from_user)).await;
    }

    async fn publish_elsewhere(
        &self,
        target: &RemoteTarget,
        body: &DownlinkBody,
        from_user: Option<&str>,
    ) {
        let Some(payload) = Self::downlink_payload(target, body, from_user) else {
            return;
        };
        let mut headers = HeaderMap::new();
        headers.insert(NODE, &*self.node);
        if let Err(error) = self
            .client
            .publish_with_headers(self.downlink_subject.to_string(), headers, payload)
            .await
        {
            tracing::debug!(error = %error, "bus publish of a message to devices failed");
        }
    }

    /// Publishes `payload` on `subject` with a reply inbox and gathers the answers of the other
    /// nodes: `other_nodes` of them, or what arrived within `wait` (a node that does not answer
    /// in time is left out, and logged).
    async fn gather(
        &self,
        subject: &str,
        payload: bytes::Bytes,
        other_nodes: usize,
        wait: std::time::Duration,
    ) -> Vec<bytes::Bytes> {
        let mut answers = Vec::new();
        if other_nodes == 0 {
            return answers;
        }
        let inbox = self.client.new_inbox();
        let mut replies = match self.client.subscribe(inbox.clone()).await {
            Ok(replies) => replies,
            Err(error) => {
                tracing::warn!(error = %error, "cannot hear other nodes' answers; this node's only");
                return answers;
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(NODE, &*self.node);
        if let Err(error) = self
            .client
            .publish_with_reply_and_headers(subject.to_owned(), inbox, headers, payload)
            .await
        {
            tracing::warn!(error = %error, "cannot reach the other nodes; this node's only");
            return answers;
        }
        let deadline = tokio::time::Instant::now() + wait;
        use futures_util::StreamExt as _;
        while answers.len() < other_nodes {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(answer)) => answers.push(answer.payload),
                Ok(None) | Err(_) => break,
            }
        }
        if answers.len() < other_nodes {
            tracing::info!(
                heard = answers.len(),
                other_nodes,
                "not every node answered in time; their connections are left out"
            );
        }
        answers
    }

    /// Sends a message to the connections `target` names on the other nodes and adds up their
    /// counts (it waits for every other live node, at most `wait`).
    pub async fn send_and_count(
        &self,
        target: &RemoteTarget,
        body: &DownlinkBody,
        other_nodes: usize,
        wait: std::time::Duration,
    ) -> Delivery {
        let mut total = Delivery::default();
        let Some(payload) = Self::downlink_payload(target, body, None) else {
            return total;
        };
        for answer in self
            .gather(&self.downlink_subject, payload, other_nodes, wait)
            .await
        {
            if let Ok(count) = serde_json::from_slice::<RemoteDelivery>(&answer) {
                total += Delivery {
                    delivered: count.delivered,
                    dropped: count.dropped,
                };
            }
        }
        total
    }

    /// The open connections of `device` on the other nodes, each as
    /// [`ConnectionInfo::to_json`](crate::connections::ConnectionInfo::to_json) with the node's id.
    pub async fn device_connections(
        &self,
        device: &str,
        other_nodes: usize,
        wait: std::time::Duration,
    ) -> Vec<serde_json::Value> {
        let query = PresenceQuery::Connections {
            device: device.to_owned(),
        };
        let payload = serde_json::to_vec(&query).unwrap_or_default().into();
        let mut connections = Vec::new();
        for answer in self
            .gather(&self.presence_subject, payload, other_nodes, wait)
            .await
        {
            if let Ok(serde_json::Value::Array(items)) = serde_json::from_slice(&answer) {
                connections.extend(items);
            }
        }
        connections
    }

    /// The devices with an open connection on the other nodes.
    pub async fn online_devices(
        &self,
        other_nodes: usize,
        wait: std::time::Duration,
    ) -> HashSet<String> {
        let payload = serde_json::to_vec(&PresenceQuery::Online)
            .unwrap_or_default()
            .into();
        let mut online = HashSet::new();
        for answer in self
            .gather(&self.presence_subject, payload, other_nodes, wait)
            .await
        {
            if let Ok(devices) = serde_json::from_slice::<Vec<String>>(&answer) {
                online.extend(devices);
            }
        }
        online
    }
}

/// A question about this node's connections from another node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ask", rename_all = "lowercase")]
enum PresenceQuery {
    /// One device's open connections.
    Connections { device: String },
    /// Every device with an open connection.
    Online,
}

/// The next request published by another node (this node's own are skipped); `None` once `stop`
/// is cancelled or the subscription ends.
async fn next_from_other_nodes(
    requests: &mut async_nats::Subscriber,
    node: &str,
    stop: &CancellationToken,
) -> Option<async_nats::Message> {
    use futures_util::StreamExt as _;
    loop {
        let request = tokio::select! {
            _ = stop.cancelled() => return None,
            request = requests.next() => request?,
        };
        let own = request
            .headers
            .as_ref()
            .and_then(|h| h.get(NODE))
            .is_some_and(|n| n.as_str() == node);
        if !own {
            return Some(request);
        }
    }
}

/// Answers other nodes' questions about this node's connections.
async fn serve_presence(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    node: Arc<str>,
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
) {
    // Its own questions and messages the sending node handles itself.
    while let Some(request) = next_from_other_nodes(&mut requests, &node, &stop).await {
        let Some(reply) = request.reply else {
            continue;
        };
        let answer = match serde_json::from_slice::<PresenceQuery>(&request.payload) {
            Ok(PresenceQuery::Connections { device }) => {
                let connections: Vec<serde_json::Value> = pipeline
                    .connections
                    .device_connections(&device)
                    .iter()
                    .map(|c| {
                        let mut view = c.to_json();
                        view["node"] = serde_json::json!(&*node);
                        view
                    })
                    .collect();
                serde_json::to_vec(&connections)
            }
            Ok(PresenceQuery::Online) => {
                let devices: Vec<Arc<str>> =
                    pipeline.connections.online_devices().into_iter().collect();
                serde_json::to_vec(&devices)
            }
            Err(_) => continue,
        };
        if let Ok(answer) = answer {
            if let Err(error) = client.publish(reply, answer.into()).await {
                tracing::debug!(error = %error, "could not answer another node's presence question");
            }
        }
    }
}

/// Hands messages to devices from other nodes to this node's connections, answering each
/// request that has a reply inbox with this node's count.
async fn serve_downlinks(
    client: async_nats::Client,
    mut requests: async_nats::Subscriber,
    node: Arc<str>,
    pipeline: Arc<Pipeline>,
    stop: CancellationToken,
) {
    // Its own questions and messages the sending node handles itself.
    while let Some(request) = next_from_other_nodes(&mut requests, &node, &stop).await {
        let Ok(message) = serde_json::from_slice::<RemoteDownlink>(&request.payload) else {
            tracing::debug!("a message to devices from another node could not be read");
            continue;
        };
        let Some(body) = DownlinkBody::decode(&message.kind, &message.body) else {
            continue;
        };
        let downlink = match (&message.target, message.from_user) {
            (RemoteTarget::Group { group, .. }, Some(user)) => Arc::new(Downlink {
                body,
                source: DownlinkSource::Group {
                    group: Arc::from(group.as_str()),
                    from_user: Some(Arc::from(user)),
                },
            }),
            _ => Downlink::from_server(body),
        };
        let delivery = message
            .target
            .deliver_locally(&pipeline.connections, &downlink);
        if let Some(reply) = request.reply {
            let answer = RemoteDelivery {
                delivered: delivery.delivered,
                dropped: delivery.dropped,
            };
            let payload = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(error) = client.publish(reply, payload.into()).await {
                tracing::debug!(error = %error, "could not answer another node's message to devices");
            }
        }
    }
}

/// Where the bus is and who this node is.
pub struct BusSettings {
    pub url: String,
    /// Subjects start with it (nodes of one platform share it).
    pub subject_prefix: String,
    pub node: String,
}

/// Connects to NATS (failing when it cannot be reached now), and starts the publishing and
/// receiving tasks, which end at `stop`.
pub async fn connect(
    settings: BusSettings,
    pipeline: Arc<Pipeline>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Result<(LiveBus, tokio::task::JoinHandle<()>), async_nats::ConnectError> {
    let up = metrics.bus_up.clone();
    let options = async_nats::ConnectOptions::new()
        .name("iotgate")
        .event_callback(move |event| {
            let up = up.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        up.set(1);
                        tracing::info!("bus reconnected");
                    }
                    async_nats::Event::Disconnected => {
                        up.set(0);
                        tracing::warn!("bus disconnected; reconnecting with backoff");
                    }
                    other => tracing::debug!(event = %other, "bus event"),
                }
            }
        });
    let client = async_nats::connect_with_options(settings.url.as_str(), options).await?;
    metrics.bus_up.set(1);
    let (outgoing, mut queued) = mpsc::channel::<(Arc<str>, Arc<SubscriberFrame>)>(OUTGOING_QUEUE);
    let downlink_subject: Arc<str> = Arc::from(format!("{}.downlink", settings.subject_prefix));
    let bus = LiveBus {
        outgoing,
        dropped: metrics.bus_dropped.clone(),
        client: client.clone(),
        downlink_subject: downlink_subject.clone(),
        presence_subject: Arc::from(format!("{}.presence", settings.subject_prefix)),
        node: Arc::from(settings.node.as_str()),
    };
    let prefix = settings.subject_prefix.clone();
    let node = settings.node.clone();
    let downlinks = match client.subscribe(downlink_subject.to_string()).await {
        Ok(requests) => Some(serve_downlinks(
            client.clone(),
            requests,
            Arc::from(node.as_str()),
            pipeline.clone(),
            stop.clone(),
        )),
        Err(error) => {
            tracing::error!(error = %error, "cannot subscribe to messages to devices on the bus; only this node's connections receive them");
            None
        }
    };
    let presence = match client.subscribe(bus.presence_subject.to_string()).await {
        Ok(requests) => Some(serve_presence(
            client.clone(),
            requests,
            Arc::from(node.as_str()),
            pipeline.clone(),
            stop.clone(),
        )),
        Err(error) => {
            tracing::error!(error = %error, "cannot subscribe to presence questions on the bus; other nodes see only their own connections");
            None
        }
    };
    // Both serve until `stop`, side by side.
    let downlinks = async move {
        let downlinks = async move {
            if let Some(downlinks) = downlinks {
                downlinks.await;
            }
        };
        let presence = async move {
            if let Some(presence) = presence {
                presence.await;
            }
        };
        tokio::join!(downlinks, presence);
    };
    let publisher = {
        let client = client.clone();
        let prefix = prefix.clone();
        let node = node.clone();
        async move {
            while let Some((key, frame)) = queued.recv().await {
                let mut headers = HeaderMap::new();
                headers.insert(NODE, node.as_str());
                headers.insert(LISTENER, &*frame.listener_key);
                if let Some(device) = &frame.device_id {
                    headers.insert(DEVICE, &**device);
                }
                let payload = match &frame.body {
                    FrameBody::Text(text) => {
                        headers.insert(BODY, "text");
                        bytes::Bytes::copy_from_slice(text.as_bytes())
                    }
                    FrameBody::Binary(bytes) => {
                        headers.insert(BODY, "binary");
                        bytes.clone()
                    }
                };
                let subject = format!("{prefix}.live.{key}");
                if let Err(error) = client.publish_with_headers(subject, headers, payload).await {
                    tracing::debug!(error = %error, "bus publish failed");
                }
            }
        }
    };
    let mut subscription = match client.subscribe(format!("{prefix}.live.>")).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::error!(error = %error, "cannot subscribe to the bus; live views show this node's traffic only");
            let task = tokio::spawn(async move {
                tokio::join!(publisher, downlinks);
            });
            return Ok((bus, task));
        }
    };
    let receiver = async move {
        use futures_util::StreamExt as _;
        let own_subject = format!("{prefix}.live.");
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                message = subscription.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let Some(headers) = &message.headers else {
                continue;
            };
            if headers.get(NODE).map(|v| v.as_str()) == Some(node.as_str()) {
                continue;
            }
            let Some(key) = message.subject.as_str().strip_prefix(&own_subject) else {
                continue;
            };
            let Some(hub) = pipeline.topology().hub(key) else {
                continue;
            };
            let body = match headers.get(BODY).map(|v| v.as_str()) {
                Some("binary") => FrameBody::Binary(message.payload.clone()),
                _ => match bytestring::ByteString::try_from(message.payload.clone()) {
                    Ok(text) => FrameBody::Text(text),
                    Err(_) => continue,
                },
            };
            let frame = Arc::new(SubscriberFrame {
                listener_key: Arc::from(headers.get(LISTENER).map_or("", |v| v.as_str())),
                device_id: headers.get(DEVICE).map(|v| Arc::from(v.as_str())),
                body,
            });
            hub.fan_out(&frame);
        }
    };
    let task = tokio::spawn(async move {
        tokio::join!(publisher, receiver, downlinks);
    });
    Ok((bus, task))
}
