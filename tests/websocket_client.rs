//! End-to-end tests of the `websocket-client` downstream against a real WebSocket server written
//! with Python's `websockets` library (`tests/websocket_client/sink.py`, in the virtualenv that
//! `tests/python-clients/setup.sh` makes): the upgrade carries the subprotocol, origin, Basic
//! credentials and extra headers; every envelope arrives as a text frame in device order; while
//! the server is down messages wait in the queue and arrive after it is back; wrong credentials
//! show in the downstream's status and in the connection test. A real Node-RED 4.1 flow
//! (`tests/node-red`) with a "websocket in" node listening on a path receives the payloads too.
//! Messages waiting for an unreachable server are dead-lettered when the downstream is deleted.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The Python WebSocket server, its output lines collected; killed on drop.
struct Sink {
    child: Option<Child>,
    port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Sink {
    async fn start(port: u16) -> Self {
        let mut sink = Self {
            child: None,
            port,
            lines: Arc::default(),
        };
        sink.spawn().await;
        sink
    }

    async fn spawn(&mut self) {
        let ready_before = self.events("ready").len();
        let mut child = Command::new(python_clients())
            .arg(repo_root().join("tests/websocket_client/sink.py"))
            .args([&self.port.to_string(), "/flows/in", "gw", "flow-password"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the Python WebSocket server");
        let stdout = child.stdout.take().unwrap();
        let lines = self.lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str(&line) {
                    lines.lock().unwrap().push(value);
                }
            }
        });
        self.child = Some(child);
        wait_until("the Python WebSocket server to listen", WAIT, || async {
            self.events("ready").len() > ready_before
        })
        .await;
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l["event"] == kind)
            .cloned()
            .collect()
    }

    async fn wait_texts(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let texts = self.events("text");
            if texts.len() >= n {
                return texts
                    .iter()
                    .map(|t| serde_json::from_str(t["text"].as_str().unwrap()).unwrap())
                    .collect();
            }
            assert!(
                Instant::now() < deadline,
                "the WebSocket server received {} of {n} frames",
                texts.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn setup(server: &TestServer, downstream: &Value, devices: &[&str]) -> Vec<String> {
    server.create_ok("downstreams", downstream).await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 1000))
        .await;
    server
        .create_ok("listeners", &listener_def("dev", "/dev", "sen"))
        .await;
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

async fn send(server: &TestServer, devices: &[&str], keys: &[String], from: u64, to: u64) {
    let before = server.listener_status("dev").await["messagesReceived"]
        .as_u64()
        .unwrap_or(0);
    let mut sockets = Vec::new();
    for _ in devices {
        sockets.push(server.connect_device("/dev").await);
    }
    for n in from..to {
        for (i, device) in devices.iter().enumerate() {
            send_json(
                &mut sockets[i],
                &device_msg(device, &keys[i], json!({"n": n})),
            )
            .await;
        }
    }
    close_once_read(
        server,
        "dev",
        before + (to - from) * devices.len() as u64,
        sockets,
    )
    .await;
}

fn by_device(envelopes: &[Value]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for envelope in envelopes {
        out.entry(envelope["deviceId"].as_str().unwrap().to_owned())
            .or_default()
            .push(envelope["payload"]["n"].as_u64().unwrap());
    }
    out
}

async fn status(server: &TestServer) -> Value {
    server.get_ok("/api/v1/downstreams/out/status").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_websockets_server_receives_every_envelope_in_order_across_its_restart() {
    let port = free_port();
    let mut sink = Sink::start(port).await;
    let server = TestServer::start().await;
    let downstream = json!({"key": "out", "name": "out", "type": "websocket-client",
        "url": format!("ws://127.0.0.1:{port}/flows/in"), "subProtocol": "iot.v1",
        "origin": "https://gateway.example", "headers": {"x-tenant": "acme"},
        "userName": "gw", "password": "flow-password", "format": "envelope"});
    let devices = ["d1", "d2"];
    let keys = setup(&server, &downstream, &devices).await;
    wait_until(
        "the websocket-client downstream to connect",
        WAIT,
        || async { status(&server).await["state"] == "connected" },
    )
    .await;
    let connect = wait_for("the server to see the connection", WAIT, || async {
        sink.events("connect").first().cloned()
    })
    .await;
    assert_eq!(connect["protocol"], "iot.v1", "{connect}");
    assert_eq!(connect["origin"], "https://gateway.example");
    assert_eq!(connect["tenant"], "acme");

    send(&server, &devices, &keys, 0, 30).await;
    let received = by_device(&sink.wait_texts(60).await);
    for device in devices {
        assert_eq!(received[device], (0..30).collect::<Vec<_>>(), "{device}");
    }

    // The server goes away: the module notices, queues, reconnects with backoff and catches up.
    sink.kill();
    wait_until(
        "the downstream to notice the server is gone",
        WAIT,
        || async { status(&server).await["state"] != "connected" },
    )
    .await;
    send(&server, &devices, &keys, 30, 50).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let queued = metric_value(
        &server.metrics().await,
        "iotgate_queue_depth",
        &[("downstream", "out")],
    )
    .unwrap_or(0.0);
    assert!(
        queued > 0.0,
        "messages wait in the queue while the server is down"
    );
    sink.spawn().await;
    // The new process's output starts with its own connect line; old lines stay.
    let all = sink.wait_texts(100).await;
    let received = by_device(&all);
    for device in devices {
        assert_eq!(received[device], (0..50).collect::<Vec<_>>(), "{device}");
    }
    let text = server.metrics().await;
    assert!(
        metric_value(
            &text,
            "iotgate_downstream_reconnects_total",
            &[("downstream", "out")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        metric_value(
            &text,
            "iotgate_messages_delivered_total",
            &[("downstream", "out")]
        ),
        Some(100.0)
    );
    let (_, report) = body_json(
        server
            .post("/api/v1/downstreams/out/test", &json!({}))
            .await,
    )
    .await;
    assert_eq!(report["ok"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_for_the_websocket_server_show_in_status_and_test() {
    let port = free_port();
    let sink = Sink::start(port).await;
    let server = TestServer::start().await;
    let downstream = json!({"key": "out", "name": "out", "type": "websocket-client",
        "url": format!("ws://127.0.0.1:{port}/flows/in"), "userName": "gw", "password": "wrong"});
    setup(&server, &downstream, &[]).await;
    let st = wait_for("an error status", WAIT, || async {
        let st = status(&server).await;
        (st["state"] == "error").then_some(st)
    })
    .await;
    assert!(
        st["lastError"].as_str().unwrap().contains("credentials"),
        "{st}"
    );
    assert!(!sink.events("refused").is_empty());
    let (_, report) = body_json(
        server
            .post("/api/v1/downstreams/out/test", &json!({}))
            .await,
    )
    .await;
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(report["authenticated"], false, "{report}");
    // A password stays sealed: GET shows null.
    let shown = server.get_ok("/api/v1/downstreams/out").await;
    assert_eq!(shown["password"], Value::Null);
}

/// Node-RED 4.1 (tests/node-red, installed by its setup script) with one flow: a "websocket in"
/// node listening on `/ws/iotgate` wired to a "file" node appending each payload as a line.
struct NodeRed {
    child: Child,
    port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl NodeRed {
    /// Node-RED with a "websocket in" node listening at /ws/iotgate (payload mode) that writes
    /// each payload to a file.
    async fn start() -> Self {
        Self::start_on(free_port(), |out| {
            json!([
                {"id": "tab", "type": "tab", "label": "iotgate"},
                {"id": "listener", "type": "websocket-listener", "path": "/ws/iotgate", "wholemsg": "false"},
                {"id": "in", "type": "websocket in", "z": "tab", "name": "from iotgate", "server": "listener",
                 "client": "", "x": 100, "y": 100, "wires": [["file"]]},
                {"id": "file", "type": "file", "z": "tab", "name": "", "filename": out,
                 "filenameType": "str", "appendNewline": true, "createDir": true, "overwriteFile": "false",
                 "encoding": "none", "x": 300, "y": 100, "wires": [[]]}
            ])
        })
        .await
    }

    /// Node-RED on `port` running the flows `flows(out file)` makes.
    async fn start_on(port: u16, flows: impl FnOnce(&str) -> Value) -> Self {
        let setup = Command::new("bash")
            .arg(repo_root().join("tests/node-red/setup.sh"))
            .output()
            .expect("run tests/node-red/setup.sh");
        assert!(
            setup.status.success(),
            "tests/node-red/setup.sh failed:\n{}",
            String::from_utf8_lossy(&setup.stderr)
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("received.txt");
        let flows = flows(out.to_str().unwrap());
        let flows_file = dir.path().join("flows.json");
        std::fs::write(&flows_file, flows.to_string()).unwrap();
        let child = Command::new("node")
            .arg(repo_root().join("tests/node-red/node_modules/node-red/red.js"))
            .args(["--port", &port.to_string(), "--userDir"])
            .arg(dir.path())
            .arg(&flows_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Node-RED");
        let node_red = Self {
            child,
            port,
            out,
            _dir: dir,
        };
        // Node-RED serves its editor once the flows run.
        let url = format!("http://127.0.0.1:{port}/flows");
        wait_until(
            "Node-RED to start its flows",
            Duration::from_secs(60),
            || {
                let url = url.clone();
                async move {
                    reqwest::get(&url)
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }
            },
        )
        .await;
        node_red
    }

    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for NodeRed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_red_flow_listening_on_a_websocket_path_receives_every_payload_in_order() {
    let node_red = NodeRed::start().await;
    let server = TestServer::start().await;
    let downstream = json!({"key": "out", "name": "out", "type": "websocket-client",
        "url": format!("ws://127.0.0.1:{}/ws/iotgate", node_red.port), "format": "payload"});
    let devices = ["d1", "d2"];
    let keys = setup(&server, &downstream, &devices).await;
    wait_until(
        "the websocket-client downstream to connect to Node-RED",
        WAIT,
        || async { status(&server).await["state"] == "connected" },
    )
    .await;
    send(&server, &devices, &keys, 0, 25).await;
    let lines = wait_for(
        "Node-RED to write every payload",
        Duration::from_secs(30),
        || {
            let lines = node_red.lines();
            async move { (lines.len() >= 50).then_some(lines) }
        },
    )
    .await;
    let mut by_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for payload in &lines {
        by_device
            .entry(payload["deviceId"].as_str().unwrap().to_owned())
            .or_default()
            .push(payload["n"].as_u64().unwrap());
    }
    for device in devices {
        assert_eq!(by_device[device], (0..25).collect::<Vec<_>>(), "{device}");
    }
    let (_, report) = body_json(
        server
            .post("/api/v1/downstreams/out/test", &json!({}))
            .await,
    )
    .await;
    assert_eq!(report["ok"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_red_whole_messages_travel_both_ways() {
    // iotgate: a message-mode listener behind a body-credential sentinel, a store, and a
    // websocket-client downstream in message format pointing at Node-RED.
    let server = TestServer::start().await;
    let node_red_port = free_port();
    server.create_ok("downstreams", &store_def("kept")).await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "out", "name": "out", "type": "websocket-client",
                    "url": format!("ws://127.0.0.1:{node_red_port}/ws/whole"), "format": "message"}),
        )
        .await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 1000))
        .await;
    let mut listener = listener_def("whole", "/whole", "sen");
    listener["messageMode"] = json!("message");
    server.create_ok("listeners", &listener).await;
    server
        .create_ok("routes", &route_def("both", &["kept", "out"]))
        .await;
    server.wait_listener_state("whole", "running").await;
    let (key, _) = server.register_device("nr-1", "meter").await;

    // Node-RED → iotgate: an inject node sends a whole message (payload and topic) every second
    // through a "websocket out" node (whole-message client) to the listener. iotgate → Node-RED:
    // the downstream's messages reach a whole-message "websocket in" node, and a function node
    // writes each with its topic and _msgid.
    let iotgate_port = server.port;
    let payload = json!({"deviceId": "nr-1", "accessKey": key, "temperature": 21.5}).to_string();
    let node_red = NodeRed::start_on(node_red_port, |out| {
        json!([
            {"id": "tab", "type": "tab", "label": "iotgate"},
            {"id": "listener", "type": "websocket-listener", "path": "/ws/whole", "wholemsg": "true"},
            {"id": "in", "type": "websocket in", "z": "tab", "name": "from iotgate", "server": "listener",
             "client": "", "x": 100, "y": 100, "wires": [["describe"]]},
            {"id": "describe", "type": "function", "z": "tab", "name": "describe",
             "func": "msg.payload = JSON.stringify({payload: msg.payload, topic: msg.topic, msgid: msg._msgid});\nreturn msg;",
             "outputs": 1, "x": 200, "y": 100, "wires": [["file"]]},
            {"id": "file", "type": "file", "z": "tab", "name": "", "filename": out,
             "filenameType": "str", "appendNewline": true, "createDir": true, "overwriteFile": "false",
             "encoding": "none", "x": 300, "y": 100, "wires": [[]]},
            {"id": "to-iotgate", "type": "websocket-client",
             "path": format!("ws://127.0.0.1:{iotgate_port}/whole"), "tls": "", "wholemsg": "true",
             "hb": "0", "subprotocol": ""},
            {"id": "tick", "type": "inject", "z": "tab", "name": "reading", "repeat": "1", "once": true,
             "onceDelay": "0.5", "topic": "plant/line-1", "payload": payload, "payloadType": "json",
             "props": [{"p": "payload"}, {"p": "topic", "vt": "str"}],
             "x": 100, "y": 200, "wires": [["out"]]},
            {"id": "out", "type": "websocket out", "z": "tab", "name": "to iotgate", "server": "",
             "client": "to-iotgate", "x": 300, "y": 200, "wires": []}
        ])
    })
    .await;

    // Stored: the payload without its key, the message's topic and _msgid in metadata.
    let rows = server.wait_telemetry("nr-1", 1).await;
    assert_eq!(
        rows[0]["payload"],
        json!({"deviceId": "nr-1", "temperature": 21.5})
    );
    assert_eq!(rows[0]["metadata"]["topic"], "plant/line-1", "{}", rows[0]);
    assert!(rows[0]["metadata"]["_msgid"].is_string(), "{}", rows[0]);
    // And back to Node-RED as a whole message: its topic and _msgid arrive as message properties.
    let lines = wait_for(
        "Node-RED to write a whole message",
        Duration::from_secs(30),
        || {
            let lines = node_red.lines();
            async move { (!lines.is_empty()).then_some(lines) }
        },
    )
    .await;
    assert_eq!(lines[0]["topic"], "plant/line-1", "{}", lines[0]);
    assert_eq!(
        lines[0]["payload"],
        json!({"deviceId": "nr-1", "temperature": 21.5})
    );
    assert!(lines[0]["msgid"].is_string(), "{}", lines[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_waits_for_an_unreachable_server_is_dead_lettered_when_the_downstream_is_deleted() {
    // Nothing listens on this port: the module keeps reconnecting and the messages wait.
    let port = free_port();
    let server = TestServer::start().await;
    let downstream = json!({"key": "out", "name": "out", "type": "websocket-client",
        "url": format!("ws://127.0.0.1:{port}/flows/in")});
    let keys = setup(&server, &downstream, &["d1"]).await;
    send(&server, &["d1"], &keys, 0, 3).await;
    wait_until("three messages queued", WAIT, || async {
        metric_value(
            &server.metrics().await,
            "iotgate_queue_depth",
            &[("downstream", "out")],
        ) == Some(3.0)
    })
    .await;
    let st = status(&server).await;
    assert_ne!(st["state"], "connected", "{st}");
    assert!(
        st["lastError"].as_str().unwrap().contains("connect failed"),
        "{st}"
    );
    assert_eq!(server.delete("/api/v1/routes/route-a").await.status(), 204);
    assert_eq!(server.delete("/api/v1/downstreams/out").await.status(), 204);
    // After the drain grace (10 s) every waiting message is a dead letter with the reason.
    let dead = wait_for("three dead letters", Duration::from_secs(40), || async {
        let dead: Vec<Value> = server
            .deadletters()
            .await
            .into_iter()
            .filter(|d| d["reason"] == "downstream_stopped")
            .collect();
        (dead.len() >= 3).then_some(dead)
    })
    .await;
    let mut ns: Vec<u64> = dead
        .iter()
        .map(|d| d["payload"]["n"].as_u64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, [0, 1, 2], "{dead:?}");
    assert!(
        dead[0]["message"].as_str().unwrap().contains("unreachable"),
        "{dead:?}"
    );
}
