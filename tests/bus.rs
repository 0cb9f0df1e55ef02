//! The NATS bus between nodes (`--bus-url`): a live subscriber on node A receives, exactly once,
//! every message a device sends through node C, and its own node's messages once too.
//!
//! Uses the machine's NATS server on 127.0.0.1:4222 (`IOTGATE_TEST_NATS_URL` names another) and
//! PostgreSQL as `tests/postgres.rs`; both must run: the tests fail, never skip.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use common::postgres::TestDatabase;
use common::*;
use serde_json::{json, Value};

fn nats_url() -> String {
    std::env::var("IOTGATE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// Fails with how to start NATS when it does not answer.
async fn require_nats() {
    let url = nats_url();
    let address = url.trim_start_matches("nats://").to_owned();
    if tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(&address),
    )
    .await
    .map_or(true, |connected| connected.is_err())
    {
        panic!(
            "NATS is not reachable at {url}. These tests need it: start it with `start-stop-daemon \
             --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js \
             -sd /var/lib/nats-server -l /var/log/nats-server.log`, or set IOTGATE_TEST_NATS_URL."
        );
    }
}

async fn node(database: &TestDatabase, secret: Option<&std::path::Path>) -> TestServer {
    let mut options = ServerOptions::new()
        .env("IOTGATE_DATABASE_URL", &database.url)
        .env("IOTGATE_BUS_URL", nats_url());
    if let Some(secret) = secret {
        options = options.env("IOTGATE_SECRET_FILE", secret.to_str().unwrap());
    }
    TestServer::start_with_extra(options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_node_receives_every_nodes_messages_exactly_once() {
    require_nats().await;
    let database = TestDatabase::create().await;
    let a = node(&database, None).await;
    let secret = a.data_dir.join("server.secret");
    let c = node(&database, Some(&secret)).await;
    let health: Value = a
        .http
        .get(a.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["bus"], "connected", "{health}");
    let metrics = a.metrics().await;
    assert_eq!(metric_value(&metrics, "iotgate_bus_up", &[]), Some(1.0));

    a.create_ok(
        "downstreams",
        &ws_downstream_def("live", "/live", "envelope"),
    )
    .await;
    a.create_ok("routes", &route_def("to-live", &["live"]))
        .await;
    let (key, _) = a.register_device("far", "thermo").await;
    // The listener comes last; C applies changes in the order they were made (PostgreSQL
    // notifications), so once it runs there, the routes and the device are there as well. (The
    // API reads the database, so asking C for the device would not say its registry has it.)
    setup_store_pipeline(&a, 100).await;
    c.wait_listener_state("devices", "running").await;

    let mut live = a.subscribe("/live").await;
    let mut via_c = c.connect_device("/devices").await;
    let mut via_a = a.connect_device("/devices").await;
    for n in 0..20 {
        send_json(
            &mut via_c,
            &device_msg("far", &key, json!({"n": n, "via": "c"})),
        )
        .await;
    }
    for n in 20..25 {
        send_json(
            &mut via_a,
            &device_msg("far", &key, json!({"n": n, "via": "a"})),
        )
        .await;
    }
    let frames = recv_n_json(&mut live, 25, WAIT).await;
    let ids: HashSet<&str> = frames.iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 25, "no envelope twice");
    let mut ns: Vec<i64> = frames
        .iter()
        .map(|f| f["payload"]["n"].as_i64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, (0..25).collect::<Vec<_>>());
    // Nothing more: no duplicate arrives late.
    expect_silence(&mut live, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn an_unreachable_bus_is_one_line_naming_the_host() {
    let database = TestDatabase::create().await;
    let data = tempfile::tempdir().unwrap();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_iotgate"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IOTGATE_") {
            command.env_remove(name);
        }
    }
    let output = command
        .args(["--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("IOTGATE_DATABASE_URL", &database.url)
        .env("IOTGATE_BUS_URL", "nats://bus-user:s3cret@127.0.0.1:1")
        .env("IOTGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let own: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("iotgate: "))
        .collect();
    assert_eq!(own.len(), 1, "{stderr}");
    assert!(
        own[0].contains("cannot connect to the NATS bus at 127.0.0.1:1"),
        "{}",
        own[0]
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// Messages to devices reach connections on every node, and `delivered` counts them all: a
/// device connected to C is reached through A's API, a listener broadcast counts both nodes'
/// connections, and a message queued on A is handed over when the device connects to C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_through_one_node_reaches_devices_on_every_node() {
    require_nats().await;
    let database = TestDatabase::create().await;
    let a = node(&database, None).await;
    let secret = a.data_dir.join("server.secret");
    let c = node(&database, Some(&secret)).await;
    a.create_ok(
        "sentinels",
        &json!({"key": "qsen", "name": "query credentials", "method": "accessKey",
                "deviceId": {"from": "query", "name": "deviceId"},
                "accessKey": {"from": "query", "name": "accessKey"}}),
    )
    .await;
    let (far_key, _) = a.register_device("far", "thermo").await;
    let (near_key, _) = a.register_device("near", "thermo").await;
    let (later_key, _) = a.register_device("later", "thermo").await;
    // The listener last: once it runs on C, C has applied the devices registered before it.
    a.create_ok("listeners", &listener_def("qry", "/q", "qsen"))
        .await;
    a.wait_listener_state("qry", "running").await;
    c.wait_listener_state("qry", "running").await;
    // Both nodes see each other live.
    let aa = &a;
    wait_for("two live nodes", WAIT, || async move {
        let nodes = aa.get_ok("/api/v1/nodes").await;
        (nodes["items"].as_array().map_or(0, Vec::len) == 2).then_some(())
    })
    .await;

    let query =
        |device: &str, key: &str| format!("/q?deviceId={device}&accessKey={}", url_encode(key));
    let mut far = c.connect_device(&query("far", &far_key)).await;
    let mut near = a.connect_device(&query("near", &near_key)).await;
    c.wait_device_online("far", true).await;
    a.wait_device_online("near", true).await;

    // Presence is the platform's: A shows far's connection on C, and lists both as online.
    let seen_from_a = a.get_ok("/api/v1/devices/far").await;
    assert_eq!(seen_from_a["online"], true, "{seen_from_a}");
    let c_id = c.get_ok("/api/v1/nodes").await["nodeId"].clone();
    assert_eq!(seen_from_a["connections"][0]["node"], c_id, "{seen_from_a}");
    assert_eq!(seen_from_a["connections"][0]["listener"], "qry");
    let online = a.get_ok("/api/v1/devices?online=true").await;
    let ids: Vec<&str> = online["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["far", "near"], "{online}");

    let (status, body) = body_json(
        a.post("/api/v1/devices/far/messages", &json!({"to": "far"}))
            .await,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["delivered"], 1, "{body}");
    assert_eq!(recv_json(&mut far, WAIT).await, json!({"to": "far"}));

    let (status, body) = body_json(
        a.post("/api/v1/listeners/qry/messages", &json!({"to": "all"}))
            .await,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["delivered"], 2, "both nodes' connections: {body}");
    assert_eq!(recv_json(&mut far, WAIT).await, json!({"to": "all"}));
    assert_eq!(recv_json(&mut near, WAIT).await, json!({"to": "all"}));

    // Connected nowhere: refused, or queued and handed over by whichever node it connects to.
    let (status, body) = body_json(a.post("/api/v1/devices/later/messages", &json!(1)).await).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (409, Some("device_offline")),
        "{body}"
    );
    let (status, body) = body_json(
        a.post(
            "/api/v1/devices/later/messages?queue=true&ttlSeconds=60",
            &json!({"queued": 1}),
        )
        .await,
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["queued"].as_bool()),
        (202, Some(true)),
        "{body}"
    );
    let mut later = c.connect_device(&query("later", &later_key)).await;
    assert_eq!(recv_json(&mut later, WAIT).await, json!({"queued": 1}));
    expect_silence(&mut far, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_pubsub_group_spans_the_nodes() {
    require_nats().await;
    let database = TestDatabase::create().await;
    let a = node(&database, None).await;
    let secret = a.data_dir.join("server.secret");
    let b = node(&database, Some(&secret)).await;
    a.create_ok(
        "sentinels",
        &json!({"key": "tokens", "name": "tokens", "method": "token"}),
    )
    .await;
    a.create_ok(
        "listeners",
        &json!({"key": "hub", "name": "hub", "listenerType": "websocket", "mode": "server",
                "contentType": "json", "path": "/hub", "anonymous": true, "sentinel": "tokens",
                "protocol": "webpubsub"}),
    )
    .await;
    a.wait_listener_state("hub", "running").await;
    b.wait_listener_state("hub", "running").await;
    let roles = json!(["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"]);
    let mut sockets = Vec::new();
    for (node, device) in [(&a, "phone-a"), (&b, "phone-b")] {
        a.register_device(device, "phone").await;
        let (status, token) = body_json(
            a.post(
                &format!("/api/v1/devices/{device}/token"),
                &json!({"listener": "hub", "roles": roles, "groups": ["room"]}),
            )
            .await,
        )
        .await;
        assert_eq!(status, 200, "{token}");
        // The URL names node A; each device connects to its own node with the same token.
        let query = token["url"].as_str().unwrap().split_once('?').unwrap().1;
        // A device registered on A reaches B's registry within a second (NOTIFY): until then B
        // answers 401 unknown_device.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut ws = loop {
            match ws_connect_url(
                &node.ws_url(&format!("/hub?{query}")),
                &WsOptions::new().protocol("json.webpubsub.azure.v1"),
            )
            .await
            {
                Ok((ws, _)) => break ws,
                Err(e)
                    if upgrade_status(&e) == Some(401) && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{device}: {}", describe_ws_error(&e)),
            }
        };
        let connected = next_text_json(&mut ws).await;
        assert_eq!(connected["userId"], device);
        sockets.push(ws);
    }
    // phone-a (on node A) sends to the room it joined through its token; phone-b on node B
    // receives it as a group message from phone-a.
    let frame = json!({"type": "sendToGroup", "group": "room", "ackId": 1, "noEcho": true,
                       "dataType": "json", "data": {"hello": "from A"}});
    futures_util::SinkExt::send(
        &mut sockets[0],
        tokio_tungstenite::tungstenite::Message::Text(frame.to_string().into()),
    )
    .await
    .unwrap();
    assert_eq!(next_text_json(&mut sockets[0]).await["success"], true);
    assert_eq!(
        next_text_json(&mut sockets[1]).await,
        json!({"type": "message", "from": "group", "group": "room", "fromUserId": "phone-a",
               "dataType": "json", "data": {"hello": "from A"}})
    );
}
