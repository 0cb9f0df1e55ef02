//! Devices are addressable: messages to a device, a listener's connections or a group through the
//! REST API (online, offline, queued for the next connection, expired into dead letters), replies
//! to the sender through a route's `devices` downstream, and presence (`$connected` /
//! `$disconnected` events routed, stored and listed; `online` and `connections` on the device).
//! Real binary, real WebSocket clients. The two-node case is in `tests/bus.rs`.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt as _;
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// A sentinel reading credentials from the query string (`?deviceId=&accessKey=`), so a
/// connection is bound to its device the moment it opens.
fn query_sentinel(key: &str) -> Value {
    json!({"key": key, "name": "query credentials", "method": "accessKey",
           "deviceId": {"from": "query", "name": "deviceId"},
           "accessKey": {"from": "query", "name": "accessKey"}})
}

/// The standard store pipeline (`/devices`, body credentials) plus listener `q` at `/q` whose
/// devices give their credentials in the query string.
async fn setup(server: &TestServer) {
    setup_store_pipeline(server, 100).await;
    server.create_ok("sentinels", &query_sentinel("qsen")).await;
    server
        .create_ok("listeners", &listener_def("qry", "/q", "qsen"))
        .await;
    server.wait_listener_state("qry", "running").await;
}

async fn connect_bound(server: &TestServer, device: &str, key: &str) -> Ws {
    server
        .connect_device(&format!(
            "/q?deviceId={device}&accessKey={}",
            url_encode(key)
        ))
        .await
}

/// POSTs a message body with its content type.
async fn send(
    server: &TestServer,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (reqwest::StatusCode, Value) {
    let response = server
        .api(Method::POST, path)
        .await
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    body_json(response).await
}

async fn send_json_message(
    server: &TestServer,
    path: &str,
    body: &Value,
) -> (reqwest::StatusCode, Value) {
    send(server, path, "application/json", body.to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_device_receives_json_text_and_bytes_and_shows_online() {
    let server = TestServer::start().await;
    setup(&server).await;
    let (key, _) = server.register_device("d1", "thermo").await;
    server.register_device("d2", "thermo").await;

    let (status, body) =
        send_json_message(&server, "/api/v1/devices/d1/messages", &json!({"set": 1})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "device_offline", "{body}");

    let mut device = connect_bound(&server, "d1", &key).await;
    let resource = server.wait_device_online("d1", true).await;
    let connections = resource["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 1, "{resource}");
    assert_eq!(connections[0]["listener"], "qry");
    assert!(
        connections[0]["connectionId"].as_u64().is_some(),
        "{resource}"
    );
    assert!(connections[0]["sourceAddress"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(connections[0]["connectedAt"].is_string());

    let (status, body) = send_json_message(
        &server,
        "/api/v1/devices/d1/messages",
        &json!({"set": 21.5}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"delivered": 1, "dropped": 0}));
    assert_eq!(recv_json(&mut device, WAIT).await, json!({"set": 21.5}));

    let (status, body) = send(
        &server,
        "/api/v1/devices/d1/messages",
        "text/plain; charset=utf-8",
        "reboot",
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["delivered"].as_u64()),
        (202, Some(1)),
        "{body}"
    );
    match next_event(&mut device, WAIT).await {
        WsEvent::Text(text) => assert_eq!(text, "reboot"),
        other => panic!("expected the text frame, got {other:?}"),
    }
    let (status, _) = send(
        &server,
        "/api/v1/devices/d1/messages",
        "application/octet-stream",
        vec![0u8, 1, 255],
    )
    .await;
    assert_eq!(status, 202);
    match next_event(&mut device, WAIT).await {
        WsEvent::Binary(bytes) => assert_eq!(bytes, [0, 1, 255]),
        other => panic!("expected the binary frame, got {other:?}"),
    }
    // Only the named listener's connections: d1 has none on /devices.
    let (status, body) = send_json_message(
        &server,
        "/api/v1/devices/d1/messages?listener=devices",
        &json!(1),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (409, Some("device_offline")),
        "{body}"
    );

    // The online filter, both ways.
    let online = server.get_ok("/api/v1/devices?online=true").await;
    let ids: Vec<&str> = online["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d1"], "{online}");
    assert_eq!(online["total"], 1);
    let offline = server.get_ok("/api/v1/devices?online=false").await;
    let ids: Vec<&str> = offline["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["d2"], "{offline}");
    assert_eq!(offline["items"][0]["online"], false);
    assert_eq!(offline["items"][0]["connections"], json!([]));

    // Refusals, each with its own code.
    let (status, body) =
        send_json_message(&server, "/api/v1/devices/nobody/messages", &json!(1)).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let big = format!("\"{}\"", "x".repeat(70_000));
    let (status, body) = send(
        &server,
        "/api/v1/devices/d1/messages",
        "application/json",
        big,
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );
    let (status, body) = send(
        &server,
        "/api/v1/devices/d1/messages",
        "application/xml",
        "<a/>",
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (415, Some("unsupported_media_type")),
        "{body}"
    );
    let (status, body) = send(
        &server,
        "/api/v1/devices/d1/messages",
        "application/json",
        "{nope",
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (400, Some("malformed_json")),
        "{body}"
    );
    expect_silence(&mut device, Duration::from_millis(300)).await;

    drop(device);
    server.wait_device_online("d1", false).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, "iotgate_downlink_delivered_total", &[]),
        Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_body_credentials_is_addressable_after_its_first_message() {
    let server = TestServer::start().await;
    setup(&server).await;
    let (key, _) = server.register_device("b1", "thermo").await;
    let mut device = server.connect_device("/devices").await;
    // Open but not yet speaking for anyone.
    let (status, body) =
        send_json_message(&server, "/api/v1/devices/b1/messages", &json!({"hello": 1})).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (409, Some("device_offline")),
        "{body}"
    );

    send_json(&mut device, &device_msg("b1", &key, json!({"t": 20}))).await;
    server.wait_device_online("b1", true).await;
    let (status, body) =
        send_json_message(&server, "/api/v1/devices/b1/messages", &json!({"hello": 2})).await;
    assert_eq!(
        (status.as_u16(), body["delivered"].as_u64()),
        (202, Some(1)),
        "{body}"
    );
    assert_eq!(recv_json(&mut device, WAIT).await, json!({"hello": 2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_for_an_offline_device_arrive_on_its_next_connection_in_order() {
    let server = TestServer::start().await;
    setup(&server).await;
    let (key, _) = server.register_device("sleepy", "thermo").await;

    let (status, body) = send_json_message(
        &server,
        "/api/v1/devices/sleepy/messages?queue=true&ttlSeconds=300",
        &json!({"n": 0}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["delivered"], 0);
    assert_eq!(body["queued"], true);
    assert!(
        body["expiresAt"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{body}"
    );
    for n in 1..100 {
        let (status, body) = send_json_message(
            &server,
            "/api/v1/devices/sleepy/messages?queue=true",
            &json!({"n": n}),
        )
        .await;
        assert_eq!(status, 202, "message {n}: {body}");
    }
    // The 101st does not fit.
    let (status, body) = send_json_message(
        &server,
        "/api/v1/devices/sleepy/messages?queue=true",
        &json!({"n": 100}),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (409, Some("device_queue_full")),
        "{body}"
    );
    let (status, body) = send_json_message(
        &server,
        "/api/v1/devices/sleepy/messages?ttlSeconds=5",
        &json!(1),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );

    let mut device = connect_bound(&server, "sleepy", &key).await;
    let received = recv_n_json(&mut device, 100, WAIT).await;
    let ns: Vec<i64> = received.iter().map(|m| m["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, (0..100).collect::<Vec<_>>());
    // Taken once: a second connection gets nothing more.
    let mut again = connect_bound(&server, "sleepy", &key).await;
    expect_silence(&mut again, Duration::from_millis(500)).await;
    expect_silence(&mut device, Duration::from_millis(100)).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, "iotgate_downlink_queued_total", &[]),
        Some(100.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_message_that_expires_becomes_a_dead_letter() {
    let server = TestServer::start().await;
    setup(&server).await;
    let (key, _) = server.register_device("late", "thermo").await;
    let (status, body) = send_json_message(
        &server,
        "/api/v1/devices/late/messages?queue=true&ttlSeconds=1",
        &json!({"cmd": "open"}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let letter = server
        .wait_deadletter("downlink_expired", WAIT, |d| {
            d["reason"] == "downlink_expired"
        })
        .await;
    assert_eq!(letter["deviceId"], "late", "{letter}");
    assert_eq!(letter["module"], "downlink", "{letter}");
    assert_eq!(letter["payload"], json!({"cmd": "open"}), "{letter}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, "iotgate_downlink_expired_total", &[]),
        Some(1.0)
    );
    // Gone from the queue: connecting now brings nothing.
    let mut device = connect_bound(&server, "late", &key).await;
    expect_silence(&mut device, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_broadcast_reaches_every_connection_and_a_group_only_its_members() {
    let server = TestServer::start().await;
    setup(&server).await;
    let (k1, _) = server.register_device("l1", "thermo").await;
    let (k2, _) = server.register_device("l2", "thermo").await;
    let mut one = connect_bound(&server, "l1", &k1).await;
    let mut two = connect_bound(&server, "l2", &k2).await;
    let mut elsewhere = server.connect_device("/devices").await;
    server.wait_device_online("l1", true).await;
    server.wait_device_online("l2", true).await;

    let (status, body) = send_json_message(
        &server,
        "/api/v1/listeners/qry/messages",
        &json!({"all": true}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"delivered": 2, "dropped": 0}));
    for socket in [&mut one, &mut two] {
        assert_eq!(recv_json(socket, WAIT).await, json!({"all": true}));
    }
    expect_silence(&mut elsewhere, Duration::from_millis(300)).await;

    // Nobody joined a group here (joining is a protocol's business).
    let (status, body) = send_json_message(
        &server,
        "/api/v1/listeners/qry/groups/alerts/messages",
        &json!(1),
    )
    .await;
    assert_eq!(
        (status.as_u16(), body["delivered"].as_u64()),
        (202, Some(0)),
        "{body}"
    );
    expect_silence(&mut one, Duration::from_millis(200)).await;

    let (status, body) =
        send_json_message(&server, "/api/v1/listeners/nope/messages", &json!(1)).await;
    assert_eq!(
        (status.as_u16(), body["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (status, body) = send_json_message(
        &server,
        "/api/v1/listeners/nope/groups/g/messages",
        &json!(1),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // Sending is an operator's write, and audited.
    let audit = server.get_ok("/api/v1/audit?limit=50").await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"listener.message"), "{audit}");
    assert!(actions.contains(&"group.message"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_downstream_replies_to_the_sender_only() {
    let server = TestServer::start().await;
    setup(&server).await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "reply", "name": "reply", "type": "devices", "target": "sender", "format": "payload"}),
        )
        .await;
    server
        .create_ok(
            "routes",
            &json!({"key": "echo", "name": "echo", "listeners": ["qry"], "downstreams": ["reply"]}),
        )
        .await;
    let (k1, _) = server.register_device("r1", "thermo").await;
    let (k2, _) = server.register_device("r2", "thermo").await;
    let mut sender = connect_bound(&server, "r1", &k1).await;
    let mut bystander = connect_bound(&server, "r2", &k2).await;
    send_json(&mut sender, &json!({"ping": 7})).await;
    assert_eq!(recv_json(&mut sender, WAIT).await, json!({"ping": 7}));
    expect_silence(&mut bystander, Duration::from_millis(300)).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "iotgate_messages_delivered_total",
            &[("downstream", "reply")]
        ),
        Some(1.0)
    );

    // A device target sends to the message's device wherever it is connected.
    server
        .create_ok(
            "downstreams",
            &json!({"key": "to-device", "name": "d", "type": "devices", "target": "device", "format": "envelope"}),
        )
        .await;
    server
        .update_ok("routes", &json!({"key": "echo", "name": "echo", "listeners": ["qry"], "downstreams": ["to-device"]}))
        .await;
    let mut second = connect_bound(&server, "r1", &k1).await;
    wait_until("r1 on two connections", WAIT, || async {
        let resource = server.get_ok("/api/v1/devices/r1").await;
        resource["connections"].as_array().map_or(0, Vec::len) == 2
    })
    .await;
    send_json(&mut sender, &json!({"ping": 8})).await;
    for socket in [&mut sender, &mut second] {
        let envelope = recv_json(socket, WAIT).await;
        assert_eq!(envelope["deviceId"], "r1", "{envelope}");
        assert_eq!(envelope["payload"], json!({"ping": 8}), "{envelope}");
    }
    expect_silence(&mut bystander, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_events_are_routed_stored_and_listed_in_order() {
    let server = TestServer::start().await;
    setup(&server).await;
    // Presence goes only to routes that name it: `all` (to `store`) does not see it.
    server
        .create_ok("downstreams", &store_def("presence"))
        .await;
    server
        .create_ok(
            "routes",
            &json!({"key": "presence", "name": "presence", "messageType": {"values": ["$connected", "$disconnected"]}, "downstreams": ["presence"]}),
        )
        .await;
    let (key, _) = server.register_device("p1", "thermo").await;
    let mut device = connect_bound(&server, "p1", &key).await;
    server.wait_device_online("p1", true).await;
    device
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    let _ = expect_close(&mut device, WAIT).await;
    server.wait_device_online("p1", false).await;

    let stored = server.wait_telemetry("p1", 2).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    let types: Vec<&str> = stored
        .iter()
        .map(|t| t["messageType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["$disconnected", "$connected"],
        "newest first: {stored:?}"
    );
    assert!(
        stored.iter().all(|t| t["downstream"] == "presence"),
        "{stored:?}"
    );
    let disconnected = &stored[0]["payload"];
    assert_eq!(disconnected["closeCode"], 1000, "{disconnected}");
    assert_eq!(disconnected["closeReason"], "bye", "{disconnected}");
    assert_eq!(disconnected["listener"], "qry");
    assert_eq!(
        disconnected["connectionId"],
        stored[1]["payload"]["connectionId"]
    );

    let events = server.get_ok("/api/v1/devices/p1/events").await;
    let items = events["items"].as_array().unwrap();
    let types: Vec<&str> = items.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["$disconnected", "$connected"], "{events}");
    assert!(
        items[1]["sourceAddress"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{events}"
    );
    let (status, _) = body_json(server.get("/api/v1/devices/nobody/events").await).await;
    assert_eq!(status, 404);
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "iotgate_presence_events_total",
            &[("type", "$connected")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_counts_as_contact_but_not_as_a_message() {
    let server = TestServer::start().await;
    setup(&server).await;
    let (key, _) = server.register_device("pinger", "thermo").await;
    let mut device = connect_bound(&server, "pinger", &key).await;
    server.wait_device_online("pinger", true).await;
    let before = server.get_ok("/api/v1/devices/pinger").await;
    assert!(before["lastContact"].is_null(), "{before}");
    device.send(Message::Ping(vec![1u8].into())).await.unwrap();
    let after = wait_for("a last contact from the ping", WAIT, || async {
        let resource = server.get_ok("/api/v1/devices/pinger").await;
        resource["lastContact"].is_string().then_some(resource)
    })
    .await;
    assert_eq!(after["messageCount"], 0, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_claiming_many_devices_announces_a_bounded_number_of_changes() {
    let server = TestServer::start().await;
    setup(&server).await;
    server
        .create_ok(
            "listeners",
            &json!({"key": "gateway", "name": "gateway", "listenerType": "websocket", "mode": "server",
                    "contentType": "json", "path": "/gateway", "anonymous": false,
                    "userName": "gw", "password": "gateway-pass-1"}),
        )
        .await;
    server.wait_listener_state("gateway", "running").await;
    let (mut gateway, _) = server
        .ws_connect("/gateway", &WsOptions::new().basic("gw", "gateway-pass-1"))
        .await
        .unwrap();
    server.register_device("meter-last", "meter").await;
    for n in 0..40 {
        send_json(
            &mut gateway,
            &json!({"deviceId": format!("meter-{n}"), "kwh": n}),
        )
        .await;
    }
    send_json(&mut gateway, &json!({"deviceId": "meter-last", "kwh": 0})).await;
    // The connection is addressable as the device it spoke for last.
    let s = &server;
    wait_for("meter-last addressable", WAIT, || async move {
        let (status, _) = send_json_message(
            s,
            "/api/v1/devices/meter-last/messages",
            &json!({"to": "last"}),
        )
        .await;
        (status == 202).then_some(())
    })
    .await;
    assert_eq!(recv_json(&mut gateway, WAIT).await, json!({"to": "last"}));
    let connected = |metrics: &str| {
        metric_value(
            metrics,
            "iotgate_presence_events_total",
            &[("type", "$connected")],
        )
    };
    let disconnected = |metrics: &str| {
        metric_value(
            metrics,
            "iotgate_presence_events_total",
            &[("type", "$disconnected")],
        )
    };
    // Presence events are announced by a worker of their own: wait for it to catch up, then
    // check that it announced no more than that.
    wait_until("the presence events announced", WAIT, || async {
        let metrics = server.metrics().await;
        connected(&metrics) >= Some(17.0) && disconnected(&metrics) >= Some(16.0)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = server.metrics().await;
    // The first device, then 16 announced changes; the other 23 changes are silent.
    assert_eq!(connected(&metrics), Some(17.0), "{metrics}");
    assert_eq!(disconnected(&metrics), Some(16.0), "{metrics}");
}
