//! End-to-end tests of the `nats` and `mqtt` downstreams against real brokers: the machine's
//! NATS with JetStream on 127.0.0.1:4222 and Mosquitto on 127.0.0.1:1883 (each test uses its own
//! subjects, topics and streams), and for outages private `nats-server` / `mosquitto` processes on
//! random ports that the tests kill and start again (`tests/brokers/setup.sh` installs them when
//! missing). A broker that is not reachable fails the test with a message saying so: nothing is
//! skipped.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const LOCAL_NATS: &str = "nats://127.0.0.1:4222";
const LOCAL_MQTT_PORT: u16 = 1883;

/// A lowercase token no other test run uses.
fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t{}x{nanos}", std::process::id())
}

fn setup_brokers() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/brokers/setup.sh");
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        status.success(),
        "{} could not provide nats-server and mosquitto ({status}); install them with `apt-get install nats-server mosquitto`",
        script.display()
    );
}

async fn nats_client(url: &str) -> async_nats::Client {
    if url == LOCAL_NATS {
        // Starts the machine's NATS when it is down (and fails saying how, when it cannot).
        setup_brokers();
    }
    match tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url)).await {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => panic!(
            "NATS with JetStream must be reachable at {url} for this test (Debian: apt-get install nats-server; run nats-server -js): {error}"
        ),
        Err(_) => panic!("NATS at {url} did not answer within 5 s; these tests need a running nats-server -js"),
    }
}

async fn require_mosquitto(port: u16) {
    if port == LOCAL_MQTT_PORT {
        setup_brokers();
    }
    if let Err(error) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
        panic!("Mosquitto must be reachable at 127.0.0.1:{port} for this test (Debian: apt-get install mosquitto): {error}");
    }
}

/// Sentinel `sen`, the downstream, listener `dev` at `/dev` (extra fields merged) and a route
/// from it to the downstream; registers `devices` and returns their keys.
async fn pipeline(
    server: &TestServer,
    downstream: &Value,
    listener_fields: Value,
    devices: &[&str],
) -> Vec<String> {
    server.create_ok("downstreams", downstream).await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 1000))
        .await;
    let mut listener = listener_def("dev", "/dev", "sen");
    for (k, v) in listener_fields.as_object().unwrap() {
        listener[k] = v.clone();
    }
    server.create_ok("listeners", &listener).await;
    server
        .create_ok(
            "routes",
            &json!({"key": "route-a", "name": "route-a", "listeners": ["dev"], "downstreams": [downstream["key"]]}),
        )
        .await;
    server.wait_listener_state("dev", "running").await;
    let mut keys = Vec::new();
    for device in devices {
        keys.push(server.register_device(device, "meter").await.0);
    }
    keys
}

/// Sends `count` messages `{"n": i}` from each device, on one connection per device, paced by
/// `pause` between rounds.
async fn send_messages(
    server: &TestServer,
    devices: &[&str],
    keys: &[String],
    count: usize,
    pause: Duration,
) {
    let before = server.listener_status("dev").await["messagesReceived"]
        .as_u64()
        .unwrap_or(0);
    let mut sockets = Vec::new();
    for _ in devices {
        sockets.push(server.connect_device("/dev").await);
    }
    for n in 0..count {
        for (i, device) in devices.iter().enumerate() {
            send_json(
                &mut sockets[i],
                &device_msg(device, &keys[i], json!({"n": n})),
            )
            .await;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    close_once_read(
        server,
        "dev",
        before + (count * devices.len()) as u64,
        sockets,
    )
    .await;
}

async fn metric(server: &TestServer, name: &str, downstream: &str) -> f64 {
    metric_value(&server.metrics().await, name, &[("downstream", downstream)]).unwrap_or(0.0)
}

async fn wait_delivered(server: &TestServer, downstream: &str, total: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let delivered = metric(server, "iotgate_messages_delivered_total", downstream).await;
        if delivered >= total as f64 {
            return;
        }
        if Instant::now() >= deadline {
            let metrics = server.metrics().await;
            let lines: Vec<&str> = metrics.lines().filter(|l| l.contains(downstream)).collect();
            panic!("downstream {downstream} delivered {delivered} of {total} within {timeout:?}; metrics: {lines:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every device's `n` values must be 0..count in order (duplicates, which QoS 1 allows, are
/// ignored after their first appearance).
fn assert_device_order(received: &[(String, u64)], devices: &[&str], count: usize) {
    let mut seen: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut firsts: HashSet<(String, u64)> = HashSet::new();
    for (device, n) in received {
        if firsts.insert((device.clone(), *n)) {
            seen.entry(device.as_str()).or_default().push(*n);
        }
    }
    for device in devices {
        let got = seen.get(device).cloned().unwrap_or_default();
        let want: Vec<u64> = (0..count as u64).collect();
        assert_eq!(got, want, "messages of {device} missing or out of order");
    }
}

// ---------------------------------------------------------------------------------------------
// Private brokers
// ---------------------------------------------------------------------------------------------

/// A nats-server with JetStream on its own port and store directory, killed on drop.
struct PrivateNats {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
}

impl PrivateNats {
    async fn start(extra: &[&str]) -> Self {
        setup_brokers();
        let mut nats = Self {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            args: extra.iter().map(|s| s.to_string()).collect(),
        };
        nats.spawn().await;
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        wait_port(self.port).await;
    }

    /// SIGKILL: the connection drops without a goodbye.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A mosquitto on its own port with persistence in its own directory, stopped on drop.
struct PrivateMosquitto {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl PrivateMosquitto {
    async fn start(password_file: Option<&Path>) -> Self {
        setup_brokers();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "listener {port} 127.0.0.1\npersistence true\npersistence_location {}/\nmax_queued_messages 0\nmax_inflight_messages 0\n",
            dir.path().display()
        );
        match password_file {
            Some(file) => config.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                file.display()
            )),
            None => config.push_str("allow_anonymous true\n"),
        }
        std::fs::write(dir.path().join("mosquitto.conf"), config).unwrap();
        let mut mosquitto = Self {
            child: None,
            port,
            dir,
        };
        mosquitto.spawn().await;
        mosquitto
    }

    async fn spawn(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mosquitto");
        self.child = Some(child);
        wait_port(self.port).await;
    }

    /// SIGTERM, so mosquitto saves its sessions (the test subscriber's queued messages).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateMosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the private broker did not listen on {port} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// NATS
// ---------------------------------------------------------------------------------------------

struct StoredNatsMessage {
    subject: String,
    msg_id: String,
    headers: async_nats::HeaderMap,
    body: Value,
}

/// Every message of a stream, in stream order.
async fn read_stream(client: &async_nats::Client, name: &str) -> Vec<StoredNatsMessage> {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js
        .get_stream(name)
        .await
        .unwrap_or_else(|e| panic!("stream {name}: {e}"));
    let info = stream.info().await.expect("stream info").clone();
    let mut out = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        out.push(StoredNatsMessage {
            subject: message.subject.to_string(),
            msg_id: message
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default(),
            body: serde_json::from_slice(&message.payload).unwrap_or(Value::Null),
            headers: message.headers,
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_receives_every_message_in_device_order_with_headers_and_stored_acks() {
    let client = nats_client(LOCAL_NATS).await;
    let id = unique();
    let stream = format!("IOTGATE_{id}");
    let server = TestServer::start().await;
    let downstream = json!({"key": "jets", "name": "jets", "type": "nats", "url": LOCAL_NATS,
        "subject": format!("{id}.{{listenerKey}}.{{deviceType}}.{{deviceId}}"), "stream": stream, "format": "envelope"});
    let devices = ["d1", "d.2", "d:3"];
    let keys = pipeline(&server, &downstream, json!({}), &devices).await;
    let count = 40;
    send_messages(&server, &devices, &keys, count, Duration::ZERO).await;
    wait_delivered(&server, "jets", devices.len() * count, WAIT).await;

    let stored = read_stream(&client, &stream).await;
    assert_eq!(
        stored.len(),
        devices.len() * count,
        "messages in stream {stream}"
    );
    let mut received = Vec::new();
    for message in &stored {
        let envelope = &message.body;
        let device = envelope["deviceId"].as_str().expect("deviceId").to_owned();
        // Characters a subject token cannot hold are replaced by _.
        let token = device.replace('.', "_");
        assert_eq!(message.subject, format!("{id}.dev.meter.{token}"));
        assert_eq!(
            message.msg_id,
            envelope["id"].as_str().unwrap(),
            "Nats-Msg-Id is the envelope id"
        );
        assert_eq!(
            message.headers.get("Iotgate-Device-Id").map(|v| v.as_str()),
            Some(device.as_str())
        );
        assert_eq!(
            message.headers.get("Iotgate-Listener").map(|v| v.as_str()),
            Some("dev")
        );
        received.push((
            device,
            envelope["payload"]["n"].as_u64().expect("payload.n"),
        ));
    }
    assert_device_order(&received, &devices, count);

    // Durable: an acknowledging listener's "stored" waits for JetStream's publish ack.
    server
        .create_ok(
            "listeners",
            &json!({"key": "acks", "name": "acks", "listenerType": "websocket", "mode": "server",
                "contentType": "json", "path": "/acks", "anonymous": true, "sentinel": "sen",
                "acknowledge": "stored", "messageId": {"from": "body", "pointer": "/messageId"}}),
        )
        .await;
    server
        .create_ok("routes", &json!({"key": "route-b", "name": "route-b", "listeners": ["acks"], "downstreams": ["jets"]}))
        .await;
    server.wait_listener_state("acks", "running").await;
    let mut ws = server.connect_device("/acks").await;
    let mut message = device_msg("d1", &keys[0], json!({"n": 999}));
    message["messageId"] = json!("m-1");
    send_json(&mut ws, &message).await;
    let answer = recv_json(&mut ws, WAIT).await;
    assert_eq!(
        answer,
        json!({"ack": {"messageId": "m-1", "status": "stored"}})
    );
    let stored = read_stream(&client, &stream).await;
    assert!(
        stored.iter().any(|m| m.body["payload"]["n"] == 999),
        "the acknowledged message is in the stream"
    );

    let js = async_nats::jetstream::new(client.clone());
    let _ = js.delete_stream(&stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_publishes_payloads_and_is_not_durable() {
    let client = nats_client(LOCAL_NATS).await;
    let id = unique();
    let mut subscriber = client
        .subscribe(format!("{id}.>"))
        .await
        .expect("subscribe");
    client.flush().await.unwrap();
    let server = TestServer::start().await;
    let downstream = json!({"key": "core", "name": "core", "type": "nats", "url": LOCAL_NATS,
        "jetStream": false, "subject": format!("{id}.{{deviceId}}"), "format": "payload"});
    let keys = pipeline(
        &server,
        &downstream,
        json!({"acknowledge": "stored", "messageId": {"from": "body", "pointer": "/messageId"}}),
        &["d1"],
    )
    .await;
    let mut ws = server.connect_device("/dev").await;
    for n in 0..5 {
        let mut message = device_msg("d1", &keys[0], json!({"n": n}));
        message["messageId"] = json!(n);
        send_json(&mut ws, &message).await;
        // Not durable: the device hears "accepted", not "stored".
        assert_eq!(
            recv_json(&mut ws, WAIT).await,
            json!({"ack": {"messageId": n, "status": "accepted"}})
        );
    }
    for n in 0..5 {
        let message = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut subscriber))
            .await
            .expect("a core NATS message")
            .expect("subscription open");
        assert_eq!(message.subject.as_str(), format!("{id}.d1"));
        let payload: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(
            payload["n"], n,
            "payload format carries the device's payload"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_outage_of_five_seconds_loses_nothing_and_duplicates_nothing() {
    let mut nats = PrivateNats::start(&[]).await;
    let server = TestServer::start().await;
    let downstream = json!({"key": "jets", "name": "jets", "type": "nats", "url": nats.url(),
        "subject": "out.{deviceId}", "stream": "OUTAGE"});
    let devices = ["d1", "d2"];
    let keys = pipeline(&server, &downstream, json!({}), &devices).await;
    wait_until("the nats downstream to connect", WAIT, || async {
        server.get_ok("/api/v1/downstreams/jets/status").await["state"] == "connected"
    })
    .await;
    let count = 300;
    let sender = send_messages(&server, &devices, &keys, count, Duration::from_millis(20));
    let outage = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        nats.kill();
        wait_until("the downstream to notice the outage", WAIT, || async {
            server.get_ok("/api/v1/downstreams/jets/status").await["state"] != "connected"
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        nats.spawn().await;
    };
    tokio::join!(sender, outage);
    wait_delivered(
        &server,
        "jets",
        devices.len() * count,
        Duration::from_secs(60),
    )
    .await;

    let client = nats_client(&nats.url()).await;
    let stored = read_stream(&client, "OUTAGE").await;
    let ids: HashSet<&str> = stored.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        stored.len(),
        "JetStream holds no duplicate message ids"
    );
    assert_eq!(
        stored.len(),
        devices.len() * count,
        "every accepted message is in the stream once"
    );
    let received: Vec<(String, u64)> = stored
        .iter()
        .map(|m| {
            (
                m.body["deviceId"].as_str().unwrap().to_owned(),
                m.body["payload"]["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_device_order(&received, &devices, count);
    assert!(
        metric(&server, "iotgate_downstream_reconnects_total", "jets").await >= 1.0,
        "the reconnect is counted in /metrics"
    );
    assert_eq!(
        metric(&server, "iotgate_downstream_connected", "jets").await,
        1.0
    );
    let status = server.get_ok("/api/v1/downstreams/jets/status").await;
    assert!(status["reconnects"].as_u64().unwrap() >= 1, "{status}");
    assert!(
        server.deadletters().await.is_empty(),
        "nothing was dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_jetstream_refuses_is_retried_then_dead_lettered_with_the_reason() {
    nats_client(LOCAL_NATS).await;
    let id = unique();
    let server = TestServer::start().await;
    // No stream captures this subject: JetStream answers "no responders" to every publish.
    let downstream = json!({"key": "nowhere", "name": "nowhere", "type": "nats", "url": LOCAL_NATS,
        "subject": format!("{id}.nostream.{{deviceId}}"), "maxRetries": 1});
    let keys = pipeline(&server, &downstream, json!({}), &["d1"]).await;
    send_messages(&server, &["d1"], &keys, 1, Duration::ZERO).await;
    let dead = server
        .wait_deadletter("from the nats downstream", WAIT, |d| {
            d["reason"] == "nats_failed"
        })
        .await;
    assert!(
        dead["message"]
            .as_str()
            .unwrap_or_default()
            .contains("stream"),
        "the dead letter names the server's reason: {dead}"
    );
    assert_eq!(
        metric(&server, "iotgate_delivery_failures_total", "nowhere").await,
        2.0,
        "two attempts (maxRetries 1)"
    );
    assert_eq!(
        metric(&server, "iotgate_messages_delivered_total", "nowhere").await,
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// MQTT
// ---------------------------------------------------------------------------------------------

/// A QoS 1 subscriber collecting `(topic, payload)`; `clean` false keeps its session on the
/// broker across its own and the broker's restarts.
struct MqttSubscriber {
    received: std::sync::Arc<std::sync::Mutex<Vec<(String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl MqttSubscriber {
    async fn start(port: u16, filter: &str, client_id: &str, clean: bool) -> Self {
        let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        options
            .set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let filter = filter.to_owned();
        let sink = received.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                        if !ack.session_present {
                            client
                                .subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce)
                                .await
                                .unwrap();
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish))) => {
                        let body = serde_json::from_slice(&publish.payload).unwrap_or(Value::Null);
                        sink.lock().unwrap().push((publish.topic.clone(), body));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, subscribed_rx)
            .await
            .unwrap_or_else(|_| {
                panic!("no SUBACK from Mosquitto at 127.0.0.1:{port} within {WAIT:?}")
            })
            .unwrap();
        Self { received, task }
    }

    fn received(&self) -> Vec<(String, Value)> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `n` distinct envelope ids arrived.
    async fn wait_distinct(&self, n: usize, timeout: Duration) -> Vec<(String, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            let distinct: HashSet<String> = got
                .iter()
                .map(|(_, b)| b["id"].as_str().unwrap_or_default().to_owned())
                .collect();
            if distinct.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "the MQTT subscriber got {} of {n} distinct messages within {timeout:?}",
                distinct.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for MqttSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_qos1_subscriber_receives_every_message_in_device_order_and_acks_are_stored() {
    require_mosquitto(LOCAL_MQTT_PORT).await;
    let id = unique();
    let subscriber = MqttSubscriber::start(
        LOCAL_MQTT_PORT,
        &format!("{id}/#"),
        &format!("sub-{id}"),
        true,
    )
    .await;
    let server = TestServer::start().await;
    let downstream = json!({"key": "mqtt-out", "name": "mqtt-out", "type": "mqtt", "url": format!("mqtt://127.0.0.1:{LOCAL_MQTT_PORT}"),
        "topic": format!("{id}/{{listenerKey}}/{{deviceId}}")});
    let devices = ["d1", "d.2", "d:3"];
    let keys = pipeline(&server, &downstream, json!({}), &devices).await;
    let count = 40;
    send_messages(&server, &devices, &keys, count, Duration::ZERO).await;
    wait_delivered(&server, "mqtt-out", devices.len() * count, WAIT).await;
    let got = subscriber.wait_distinct(devices.len() * count, WAIT).await;
    let mut received = Vec::new();
    for (topic, envelope) in &got {
        let device = envelope["deviceId"]
            .as_str()
            .expect("an envelope")
            .to_owned();
        assert_eq!(topic, &format!("{id}/dev/{device}"));
        received.push((device, envelope["payload"]["n"].as_u64().unwrap()));
    }
    assert_device_order(&received, &devices, count);

    // QoS 1 is durable: "stored" waits for the PUBACK.
    server
        .create_ok(
            "listeners",
            &json!({"key": "acks", "name": "acks", "listenerType": "websocket", "mode": "server",
                "contentType": "json", "path": "/acks", "anonymous": true, "sentinel": "sen",
                "acknowledge": "stored", "messageId": {"from": "body", "pointer": "/messageId"}}),
        )
        .await;
    server
        .create_ok("routes", &json!({"key": "route-b", "name": "route-b", "listeners": ["acks"], "downstreams": ["mqtt-out"]}))
        .await;
    server.wait_listener_state("acks", "running").await;
    let mut ws = server.connect_device("/acks").await;
    let mut message = device_msg("d1", &keys[0], json!({"n": 999}));
    message["messageId"] = json!("m-1");
    send_json(&mut ws, &message).await;
    assert_eq!(
        recv_json(&mut ws, WAIT).await,
        json!({"ack": {"messageId": "m-1", "status": "stored"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_outage_of_five_seconds_loses_nothing_and_keeps_device_order() {
    let mut mosquitto = PrivateMosquitto::start(None).await;
    let id = unique();
    let subscriber =
        MqttSubscriber::start(mosquitto.port, "out/#", &format!("sub-{id}"), false).await;
    let server = TestServer::start().await;
    let downstream = json!({"key": "mqtt-out", "name": "mqtt-out", "type": "mqtt",
        "url": format!("mqtt://127.0.0.1:{}", mosquitto.port), "topic": "out/{deviceId}"});
    let devices = ["d1", "d2"];
    let keys = pipeline(&server, &downstream, json!({}), &devices).await;
    wait_until("the mqtt downstream to connect", WAIT, || async {
        server.get_ok("/api/v1/downstreams/mqtt-out/status").await["state"] == "connected"
    })
    .await;
    let count = 300;
    let sender = send_messages(&server, &devices, &keys, count, Duration::from_millis(20));
    let outage = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        mosquitto.stop();
        wait_until("the downstream to notice the outage", WAIT, || async {
            server.get_ok("/api/v1/downstreams/mqtt-out/status").await["state"] != "connected"
        })
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        mosquitto.spawn().await;
    };
    tokio::join!(sender, outage);
    wait_delivered(
        &server,
        "mqtt-out",
        devices.len() * count,
        Duration::from_secs(60),
    )
    .await;
    let got = subscriber
        .wait_distinct(devices.len() * count, Duration::from_secs(30))
        .await;
    let received: Vec<(String, u64)> = got
        .iter()
        .map(|(_, b)| {
            (
                b["deviceId"].as_str().unwrap().to_owned(),
                b["payload"]["n"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_device_order(&received, &devices, count);
    assert!(
        metric(&server, "iotgate_downstream_reconnects_total", "mqtt-out").await >= 1.0,
        "the reconnect is counted in /metrics"
    );
    assert!(
        server.deadletters().await.is_empty(),
        "nothing was dead-lettered"
    );
}

// ---------------------------------------------------------------------------------------------
// Validation, credentials, statuses and the connection test
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_broker_definitions_are_422_naming_the_field() {
    let server = TestServer::start().await;
    let cases = [
        (
            json!({"type": "nats", "url": "http://127.0.0.1:4222"}),
            "/url",
        ),
        (
            json!({"type": "nats", "url": LOCAL_NATS, "subject": "a.{devId}"}),
            "/subject",
        ),
        (
            json!({"type": "nats", "url": LOCAL_NATS, "subject": "a.*.{deviceId}"}),
            "/subject",
        ),
        (
            json!({"type": "nats", "url": LOCAL_NATS, "subject": "a..{deviceId}"}),
            "/subject",
        ),
        (
            json!({"type": "nats", "url": LOCAL_NATS, "jetStream": false, "stream": "S"}),
            "/stream",
        ),
        (
            json!({"type": "nats", "url": LOCAL_NATS, "stream": "a.b"}),
            "/stream",
        ),
        (
            json!({"type": "nats", "url": LOCAL_NATS, "userName": "u", "password": "p", "token": "t"}),
            "/token",
        ),
        (
            json!({"type": "nats", "url": "nats://user:pw@127.0.0.1:4222"}),
            "/url",
        ),
        (
            json!({"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "topic": "a/{deviceId"}),
            "/topic",
        ),
        (
            json!({"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "topic": "a/#"}),
            "/topic",
        ),
        (
            json!({"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "qos": 2}),
            "/qos",
        ),
        (
            json!({"type": "mqtt", "url": "ws://127.0.0.1:1883"}),
            "/url",
        ),
        (
            json!({"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "password": "p"}),
            "/userName",
        ),
        (
            json!({"type": "mqtt", "url": "mqtt://127.0.0.1:1883", "path": "/x"}),
            "/path",
        ),
        (
            json!({"type": "websocket-client", "url": "http://127.0.0.1/"}),
            "/url",
        ),
        (
            json!({"type": "websocket-client", "url": "ws://127.0.0.1:8080/x", "topic": "a"}),
            "/topic",
        ),
        (json!({"type": "websocket-client"}), "/url"),
    ];
    for (fields, pointer) in cases {
        let mut def = json!({"key": "bad", "name": "bad"});
        for (k, v) in fields.as_object().unwrap() {
            def[k] = v.clone();
        }
        let body = expect_error(
            server.create("downstreams", &def).await,
            422,
            "validation_failed",
        )
        .await;
        assert!(
            detail_pointers(&body).contains(&pointer.to_owned()),
            "{def} should be refused at {pointer}: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_returned_as_null_and_kept_on_update() {
    let server = TestServer::start().await;
    let def = json!({"key": "mqtt-out", "name": "mqtt-out", "type": "mqtt", "url": "mqtt://127.0.0.1:1883",
        "userName": "gw", "password": "s3cret-pass", "enabled": false});
    let created = server.create_ok("downstreams", &def).await;
    assert_eq!(created["password"], Value::Null, "{created}");
    let shown = server.get_ok("/api/v1/downstreams/mqtt-out").await;
    assert_eq!(shown["password"], Value::Null, "{shown}");
    assert_eq!(shown["userName"], "gw");
    // Sealed at rest: the database never holds the password in clear.
    let raw = std::fs::read(server.database_path()).unwrap();
    assert!(
        !raw.windows(b"s3cret-pass".len())
            .any(|w| w == b"s3cret-pass"),
        "the password is in the database file in clear"
    );
    // Writing back what GET showed (password null) keeps it.
    server.update_ok("downstreams", &shown).await;
    let mut token = json!({"key": "nats-token", "name": "nats-token", "type": "nats", "url": LOCAL_NATS, "token": "tok-123", "enabled": false});
    assert_eq!(
        server.create_ok("downstreams", &token).await["token"],
        Value::Null
    );
    token["token"] = Value::Null;
    server.update_ok("downstreams", &token).await;
    // Not in the audit log either.
    let audit = server.get_ok("/api/v1/audit?limit=100").await.to_string();
    assert!(
        !audit.contains("s3cret-pass") && !audit.contains("tok-123"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_unknown_hosts_show_in_status_and_in_the_connection_test() {
    let nats = PrivateNats::start(&["--user", "gw", "--pass", "right-password"]).await;
    let server = TestServer::start().await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "wrong", "name": "wrong", "type": "nats", "url": nats.url(),
                "userName": "gw", "password": "wrong-password"}),
        )
        .await;
    let status = wait_for("an error status for wrong credentials", WAIT, || async {
        let status = server.get_ok("/api/v1/downstreams/wrong/status").await;
        (status["state"] == "error").then_some(status)
    })
    .await;
    assert!(
        status["lastError"]
            .as_str()
            .unwrap()
            .contains("authorization"),
        "{status}"
    );
    let (code, report) = body_json(
        server
            .post("/api/v1/downstreams/wrong/test", &json!({}))
            .await,
    )
    .await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["authenticated"], false, "{report}");

    server
        .create_ok(
            "downstreams",
            &json!({"key": "right", "name": "right", "type": "nats", "url": nats.url(),
                "userName": "gw", "password": "right-password"}),
        )
        .await;
    let (_, report) = body_json(
        server
            .post("/api/v1/downstreams/right/test", &json!({}))
            .await,
    )
    .await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["connected"], true);
    assert_eq!(report["authenticated"], true);
    assert_eq!(report["published"], true);

    server
        .create_ok(
            "downstreams",
            &json!({"key": "nowhere", "name": "nowhere", "type": "mqtt", "url": "mqtt://no-such-host.invalid:1883"}),
        )
        .await;
    let status = wait_for("a status for an unknown host", WAIT, || async {
        let status = server.get_ok("/api/v1/downstreams/nowhere/status").await;
        status["lastError"].is_string().then_some(status)
    })
    .await;
    assert_ne!(status["state"], "connected", "{status}");
    let (_, report) = body_json(
        server
            .post("/api/v1/downstreams/nowhere/test", &json!({}))
            .await,
    )
    .await;
    assert_eq!(report["connected"], false, "{report}");
    assert_eq!(report["ok"], false, "{report}");

    // Mosquitto with a password file: wrong credentials are an error status naming them.
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    let status_code = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["gw", "right-password"])
        .status()
        .expect("mosquitto_passwd");
    assert!(status_code.success());
    let mosquitto = PrivateMosquitto::start(Some(&passwords)).await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "mq-wrong", "name": "mq-wrong", "type": "mqtt",
                "url": format!("mqtt://127.0.0.1:{}", mosquitto.port), "userName": "gw", "password": "nope"}),
        )
        .await;
    let status = wait_for(
        "an error status for wrong MQTT credentials",
        WAIT,
        || async {
            let status = server.get_ok("/api/v1/downstreams/mq-wrong/status").await;
            (status["state"] == "error").then_some(status)
        },
    )
    .await;
    assert!(
        status["lastError"]
            .as_str()
            .unwrap()
            .contains("credentials"),
        "{status}"
    );
    let (_, report) = body_json(
        server
            .post("/api/v1/downstreams/mq-wrong/test", &json!({}))
            .await,
    )
    .await;
    assert_eq!(report["authenticated"], false, "{report}");
    server
        .create_ok(
            "downstreams",
            &json!({"key": "mq-right", "name": "mq-right", "type": "mqtt",
                "url": format!("mqtt://127.0.0.1:{}", mosquitto.port), "userName": "gw", "password": "right-password"}),
        )
        .await;
    let (_, report) = body_json(
        server
            .post("/api/v1/downstreams/mq-right/test", &json!({}))
            .await,
    )
    .await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["published"], true, "{report}");

    // Types without a connection have nothing to test.
    server.create_ok("downstreams", &store_def("store")).await;
    expect_error(
        server
            .post("/api/v1/downstreams/store/test", &json!({}))
            .await,
        422,
        "validation_failed",
    )
    .await;
}
