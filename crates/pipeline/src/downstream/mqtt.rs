//! The `mqtt` downstream: publishes each envelope to a topic rendered from a template, MQTT
//! 3.1.1 through rumqttc.
//!
//! QoS 1 (the default) counts a message as delivered only on the broker's PUBACK: durable, it
//! takes part in `acknowledge: stored`. Up to [`WINDOW`] publishes are in flight. The module
//! keeps every unacknowledged publish itself; when the connection drops they are all published
//! again, in their original order, as soon as the client has reconnected (a clean session each
//! time, so the broker's session state never matters). A subscriber may therefore see a message
//! twice (QoS 1 is at least once), but a device's messages arrive in order. QoS 0 counts a message
//! as delivered once it is written to the connection: not durable.
//!
//! One task drives the rumqttc event loop (it is never cancelled mid-write); another takes
//! envelopes from the queue, and only while connected and below the window, so a stalled broker
//! pushes back through the bounded queue onto the device connections.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iotgate_core::definition::{mqtt_topic_problem, DownstreamDefinition};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Outgoing,
    Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::link::{reconnect_delay, AddressTemplate, LinkState, ProbeReport, Settler, DRAIN_GRACE};
use super::nats::body_bytes;
use super::{encode, Delivery};

/// Publishes awaiting their PUBACK.
pub const WINDOW: usize = 1000;

struct Entry {
    delivery: Delivery,
    topic: String,
    payload: Vec<u8>,
    /// Times the connection dropped while this message was in flight.
    drops: u32,
    _permit: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Tracker {
    connected: bool,
    next_seq: u64,
    /// Unacknowledged messages in the order they were taken from the queue.
    entries: BTreeMap<u64, Entry>,
    /// Sent to the event loop, packet id not yet known (ids are assigned in send order).
    awaiting_id: VecDeque<u64>,
    by_packet_id: HashMap<u16, u64>,
}

impl Tracker {
    /// Hands an entry to the event loop. The request channel holds twice the window, so it
    /// cannot be full; if it ever were, the entry stays unsent and goes out with the others
    /// after the next reconnect.
    fn send(&mut self, client: &AsyncClient, qos: QoS, retain: bool, seq: u64) {
        let entry = &self.entries[&seq];
        match client.try_publish(entry.topic.clone(), qos, retain, entry.payload.clone()) {
            Ok(()) => self.awaiting_id.push_back(seq),
            Err(error) => {
                tracing::warn!(error = %error, "the MQTT request channel refused a publish; it is sent after the next reconnect");
            }
        }
    }
}

fn qos_of(definition: &DownstreamDefinition) -> QoS {
    if definition.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// MQTT options from the definition: host and port from the URL, TLS for mqtts.
pub(crate) fn options(
    definition: &DownstreamDefinition,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<MqttOptions, String> {
    let url = definition.url.as_deref().unwrap_or_default();
    let parsed = url::Url::parse(url).map_err(|e| format!("invalid URL {url}: {e}"))?;
    let secure = parsed.scheme() == "mqtts";
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("the URL {url} names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = parsed.port().unwrap_or(if secure { 8883 } else { 1883 });
    let client_id = definition
        .client_id
        .clone()
        .unwrap_or_else(|| format!("iotgate-{}", definition.key));
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_keep_alive(Duration::from_secs(15))
        .set_clean_session(true)
        .set_inflight(WINDOW as u16)
        .set_request_channel_capacity(WINDOW * 2 + 16)
        .set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
    if let (Some(user), Some(password)) = (&definition.user_name, &definition.password) {
        options.set_credentials(user.clone(), password.clone());
    }
    if secure {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    Ok(options)
}

/// Says what a connection error means, for the status and the log.
fn describe(error: &ConnectionError) -> (LinkState, String) {
    match error {
        ConnectionError::ConnectionRefused(
            code @ (ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized),
        ) => (
            LinkState::Error,
            format!("the broker refused the credentials ({code:?})"),
        ),
        ConnectionError::ConnectionRefused(code) => (
            LinkState::Error,
            format!("the broker refused the connection ({code:?})"),
        ),
        other => (LinkState::Disconnected, other.to_string()),
    }
}

pub(crate) async fn run_mqtt(
    definition: DownstreamDefinition,
    settler: Settler,
    tls: Arc<rustls::ClientConfig>,
    mut receiver: mpsc::Receiver<Delivery>,
) {
    let template = AddressTemplate::mqtt(definition.address_template());
    let options = options(&definition, &tls);
    let (template, options) = match (template, options) {
        (Ok(t), Ok(o)) => (t, o),
        (Err(error), _) | (_, Err(error)) => {
            settler.disconnected(LinkState::Error, Some(error.clone()));
            tracing::error!(downstream = %settler.key, error = %error, "mqtt downstream cannot run");
            while let Some(delivery) = receiver.recv().await {
                settler.counters.queue_depth.dec();
                settler.give_up(delivery, "mqtt_failed", &error).await;
            }
            return;
        }
    };
    let qos = qos_of(&definition);
    let retain = definition.retain;
    let (client, eventloop) = AsyncClient::new(options, WINDOW * 2 + 16);
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let (connected_tx, mut connected_rx) = watch::channel(false);
    let events = tokio::spawn(drive(
        eventloop,
        client.clone(),
        tracker.clone(),
        settler.clone(),
        connected_tx,
        qos,
        retain,
        definition.max_retries,
    ));
    let window = Arc::new(Semaphore::new(WINDOW));
    loop {
        let permit = window
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        if connected_rx.wait_for(|c| *c).await.is_err() {
            break;
        }
        let Some(delivery) = receiver.recv().await else {
            break;
        };
        settler.counters.queue_depth.dec();
        let topic = template.render(&delivery.envelope);
        if let Some(problem) = mqtt_topic_problem(&topic) {
            settler
                .give_up(
                    delivery,
                    "mqtt_failed",
                    &format!("topic {topic}: {problem}"),
                )
                .await;
            continue;
        }
        let payload = body_bytes(encode(&delivery.envelope, definition.format)).to_vec();
        let mut t = tracker.lock().expect("tracker lock");
        let seq = t.next_seq;
        t.next_seq += 1;
        t.entries.insert(
            seq,
            Entry {
                delivery,
                topic,
                payload,
                drops: 0,
                _permit: permit,
            },
        );
        settler.counters.in_flight.inc();
        // Disconnected: it goes out with the others when the connection is back.
        if t.connected {
            t.send(&client, qos, retain, seq);
        }
    }
    // The queue closed: what is in flight gets a grace period, then the rest is given up.
    let deadline = Instant::now() + DRAIN_GRACE;
    while Instant::now() < deadline && !tracker.lock().expect("tracker lock").entries.is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<Entry> = {
        let mut tracker = tracker.lock().expect("tracker lock");
        std::mem::take(&mut tracker.entries).into_values().collect()
    };
    for entry in left {
        settler.counters.in_flight.dec();
        settler
            .give_up(
                entry.delivery,
                "downstream_stopped",
                "the downstream stopped before the MQTT broker acknowledged the message",
            )
            .await;
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), events).await;
    tracing::debug!(downstream = %settler.key, "mqtt downstream drained and stopped");
}

/// Polls the event loop: maps packet ids, settles PUBACKs, and after a reconnect publishes
/// every unacknowledged message again in order.
#[allow(clippy::too_many_arguments)]
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    tracker: Arc<Mutex<Tracker>>,
    settler: Settler,
    connected: watch::Sender<bool>,
    qos: QoS,
    retain: bool,
    max_retries: u32,
) {
    let mut attempt = 0;
    let mut first = true;
    loop {
        let mut settled = Vec::new();
        let mut refused = Vec::new();
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                attempt = 0;
                {
                    let mut t = tracker.lock().expect("tracker lock");
                    t.connected = true;
                    t.awaiting_id.clear();
                    t.by_packet_id.clear();
                    let pending: Vec<u64> = t.entries.keys().copied().collect();
                    if !pending.is_empty() {
                        tracing::info!(downstream = %settler.key, messages = pending.len(), "publishing unacknowledged messages again");
                    }
                    for seq in pending {
                        t.send(&client, qos, retain, seq);
                    }
                }
                tracing::info!(downstream = %settler.key, reconnect = !first, session_present = ack.session_present, "connected to the MQTT broker");
                settler.connected(first);
                first = false;
                let _ = connected.send(true);
            }
            Ok(Event::Outgoing(Outgoing::Publish(packet_id))) => {
                let mut t = tracker.lock().expect("tracker lock");
                if let Some(seq) = t.awaiting_id.pop_front() {
                    if qos == QoS::AtMostOnce {
                        if let Some(entry) = t.entries.remove(&seq) {
                            settled.push(entry);
                        }
                    } else {
                        t.by_packet_id.insert(packet_id, seq);
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let mut t = tracker.lock().expect("tracker lock");
                if let Some(seq) = t.by_packet_id.remove(&ack.pkid) {
                    if let Some(entry) = t.entries.remove(&seq) {
                        settled.push(entry);
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let _ = connected.send(false);
                settler.disconnected(LinkState::Disconnected, None);
                return;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(error) => {
                let (state, message) = describe(&error);
                let was_connected = {
                    let mut t = tracker.lock().expect("tracker lock");
                    let was = t.connected;
                    t.connected = false;
                    t.awaiting_id.clear();
                    t.by_packet_id.clear();
                    // Requests that reached the channel after the event loop emptied it would go
                    // out before the re-sent ones; move them where a new session drops them.
                    eventloop.clean();
                    if was {
                        // The connection dropped with these in flight; one that keeps breaking it
                        // is given up after maxRetries.
                        if let Some((&seq, head)) = t.entries.iter_mut().next() {
                            head.drops += 1;
                            if head.drops > max_retries {
                                if let Some(entry) = t.entries.remove(&seq) {
                                    refused.push(entry);
                                }
                            }
                        }
                    }
                    let expired: Vec<u64> = t
                        .entries
                        .iter()
                        .filter(|(_, e)| settler.expired(&e.delivery))
                        .map(|(s, _)| *s)
                        .collect();
                    for seq in expired {
                        if let Some(entry) = t.entries.remove(&seq) {
                            refused.push(entry);
                        }
                    }
                    was
                };
                let _ = connected.send(false);
                settler.counters.failed.inc();
                if was_connected || first || attempt == 0 {
                    tracing::warn!(downstream = %settler.key, error = %message, "MQTT connection lost or refused; reconnecting");
                }
                settler.disconnected(state, Some(message.clone()));
                for entry in refused.drain(..) {
                    settler.counters.in_flight.dec();
                    settler
                        .give_up(
                            entry.delivery,
                            "mqtt_failed",
                            &format!("not acknowledged by the MQTT broker: {message}"),
                        )
                        .await;
                }
                attempt += 1;
                tokio::time::sleep(reconnect_delay(attempt)).await;
            }
        }
        for entry in settled {
            settler.counters.in_flight.dec();
            settler.delivered(entry.delivery, false);
        }
    }
}

/// Connects once, checks the broker's CONNACK (which says whether the credentials were
/// accepted) and publishes a QoS 1 probe on `iotgate/_probe/<key>`, waiting for its PUBACK.
pub async fn probe(
    definition: &DownstreamDefinition,
    tls: &Arc<rustls::ClientConfig>,
) -> ProbeReport {
    let mut report = ProbeReport::default();
    let url = definition.url.clone().unwrap_or_default();
    let mut options = match options(definition, tls) {
        Ok(options) => options,
        Err(error) => {
            report.step("connect", false, error);
            return report.finish();
        }
    };
    // A probe must not take over the running module's session (same client id).
    options.set_client_id(format!("iotgate-probe-{}", definition.key));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let topic = format!("iotgate/_probe/{}", definition.key);
    let run = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    report.connected = true;
                    report.authenticated = true;
                    report.step("connect", true, format!("connected to {url}"));
                    report.step("authenticate", true, "the broker accepted the connection");
                    if let Err(error) = client
                        .publish(
                            topic.clone(),
                            QoS::AtLeastOnce,
                            false,
                            b"{\"probe\":true}".to_vec(),
                        )
                        .await
                    {
                        report.step(
                            "publish",
                            false,
                            format!("the probe was not published: {error}"),
                        );
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    report.published = true;
                    report.step(
                        "publish",
                        true,
                        format!("published a probe on {topic} (PUBACK received)"),
                    );
                    return;
                }
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    let auth = matches!(
                        code,
                        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized
                    );
                    report.connected = true;
                    report.step("connect", true, format!("reached {url}"));
                    report.step(
                        "authenticate",
                        false,
                        if auth {
                            format!("the broker refused the credentials ({code:?})")
                        } else {
                            format!("the broker refused the connection ({code:?})")
                        },
                    );
                    return;
                }
                Err(error) => {
                    if report.connected {
                        report.step("publish", false, format!("the connection dropped: {error}"));
                    } else {
                        report.step(
                            "connect",
                            false,
                            format!("cannot connect to {url}: {error}"),
                        );
                    }
                    return;
                }
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(8), run)
        .await
        .is_err()
    {
        report.step("timeout", false, "no answer from the broker within 8 s");
    }
    let _ = client.try_disconnect();
    report.finish()
}
