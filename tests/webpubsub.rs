//! End-to-end tests of listeners that speak the Azure Web PubSub client protocol: the unmodified
//! `@azure/web-pubsub-client` 1.0.4 SDK in Node 20 (`tests/webpubsub-sdk`) with client URLs from
//! `POST /api/v1/devices/{id}/token` (groups, events into telemetry, duplicate ack ids, a
//! connection cut without a closing handshake and resumed without losing a group message, a
//! missing role refused); and the raw frames from a plain WebSocket client.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const PATH: &str = "/client/hubs/chat";

/// A token sentinel, a Web PubSub listener, and a route taking `telemetry` events (and only
/// those: selected by the envelope's message type) to the store.
async fn web_pubsub_platform(server: &TestServer) {
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok(
            "sentinels",
            &json!({"key": "wps-tokens", "name": "connection tokens", "method": "token"}),
        )
        .await;
    server
        .create_ok(
            "listeners",
            &json!({"key": "chat", "name": "chat hub", "listenerType": "websocket", "mode": "server",
                    "contentType": "json", "path": PATH, "anonymous": true, "sentinel": "wps-tokens",
                    "protocol": "webpubsub"}),
        )
        .await;
    server
        .create_ok(
            "routes",
            &json!({"key": "telemetry-events", "name": "telemetry events", "listeners": ["chat"],
                    "messageType": {"values": ["telemetry"]}, "downstreams": ["store"]}),
        )
        .await;
    server.wait_listener_state("chat", "running").await;
}

/// The client URL for `device` with `roles`, as the admin UI's "Client URL" button gets it.
async fn client_url(server: &TestServer, device: &str, roles: &[&str]) -> String {
    let resp = server
        .post(
            &format!("/api/v1/devices/{device}/token"),
            &json!({"listener": "chat", "roles": roles}),
        )
        .await;
    let (status, body) = body_json(resp).await;
    assert_eq!(status, 200, "token for {device}: {body}");
    body["url"].as_str().expect("url").to_owned()
}

/// Installs the pinned SDK and `ws` (tests/webpubsub-sdk/setup.sh), failing with its output.
fn node_clients() {
    let setup = Command::new("bash")
        .arg(repo_root().join("tests/webpubsub-sdk/setup.sh"))
        .output()
        .expect("run tests/webpubsub-sdk/setup.sh");
    assert!(
        setup.status.success(),
        "tests/webpubsub-sdk/setup.sh failed:\n{}",
        String::from_utf8_lossy(&setup.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_node_ws_client_exchanges_the_raw_frames() {
    node_clients();
    let server = TestServer::start().await;
    web_pubsub_platform(&server).await;
    server.register_device("dev-ws", "phone").await;
    let url = client_url(
        &server,
        "dev-ws",
        &["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"],
    )
    .await;
    let run = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(repo_root().join("tests/webpubsub-sdk/raw-ws.mjs"))
            .arg(url)
            .output()
            .expect("start node")
    })
    .await
    .unwrap();
    let frames = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "raw-ws.mjs failed: {frames}");
    let rows = server.wait_telemetry("dev-ws", 1).await;
    assert_eq!(rows[0]["payload"], json!({"from": "ws"}));
    assert_eq!(rows[0]["messageType"], "telemetry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_sdk_joins_sends_resumes_and_is_refused_without_a_role() {
    node_clients();
    let server = TestServer::start().await;
    web_pubsub_platform(&server).await;
    for device in ["dev-a", "dev-b", "dev-c"] {
        server.register_device(device, "phone").await;
    }
    let both = ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"];
    let config = json!({
        "deviceA": "dev-a",
        "deviceB": "dev-b",
        "urlA": client_url(&server, "dev-a", &both).await,
        "urlB": client_url(&server, "dev-b", &["webpubsub.joinLeaveGroup.room", "webpubsub.sendToGroup.room"]).await,
        "urlNoRoles": client_url(&server, "dev-c", &[]).await,
    });
    assert!(config["urlA"].as_str().unwrap().contains(PATH));

    let config_text = config.to_string();
    let checks = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("node")
            .arg(repo_root().join("tests/webpubsub-sdk/scenario.mjs"))
            .arg(config_text)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start node");
        let stdout = child.stdout.take().unwrap();
        let lines: Vec<Value> = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str(&line).ok())
            .collect();
        (child.wait().expect("node exit"), lines)
    });
    let (status, lines) = tokio::time::timeout(Duration::from_secs(120), checks)
        .await
        .expect("the SDK scenario finished within two minutes")
        .unwrap();
    let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] != json!(true)).collect();
    assert!(
        status.success() && failed.is_empty(),
        "SDK scenario failed ({status}): {failed:?}\nall checks: {lines:?}"
    );
    let passed: Vec<&str> = lines.iter().filter_map(|l| l["check"].as_str()).collect();
    for check in [
        "connected",
        "joined",
        "group_message",
        "event_acked",
        "duplicate_ack",
        "cut",
        "resumed",
        "after_resume",
        "forbidden",
        "done",
    ] {
        assert!(
            passed.contains(&check),
            "check {check} did not run: {passed:?}"
        );
    }

    // The events are telemetry of message type "telemetry", from the token's device.
    let rows = server.wait_telemetry("dev-a", 2).await;
    let mut temperatures: Vec<f64> = rows
        .iter()
        .map(|r| {
            assert_eq!(r["messageType"], "telemetry", "{r}");
            assert_eq!(r["authenticated"], true);
            r["payload"]["temperature"].as_f64().unwrap()
        })
        .collect();
    temperatures.sort_by(f64::total_cmp);
    assert_eq!(temperatures, vec![21.5, 22.5]);
}

async fn send_json(ws: &mut Ws, frame: Value) {
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_protocol_frames_groups_events_and_refusals() {
    let server = TestServer::start().await;
    web_pubsub_platform(&server).await;
    server.register_device("dev-x", "phone").await;
    server.register_device("dev-y", "phone").await;
    let url_x = client_url(
        &server,
        "dev-x",
        &["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup.room"],
    )
    .await;
    let url_y = client_url(&server, "dev-y", &["webpubsub.joinLeaveGroup"]).await;
    let json_protocol = WsOptions::new().protocol("json.webpubsub.azure.v1");

    // No token: a 401 with a JSON body before the upgrade.
    let refused = server
        .ws_connect(PATH, &json_protocol)
        .await
        .expect_err("no credentials");
    assert_eq!(upgrade_status(&refused), Some(401));

    let (mut x, response) = ws_connect_url(&url_x, &json_protocol).await.unwrap();
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("json.webpubsub.azure.v1")
    );
    let connected = next_text_json(&mut x).await;
    assert_eq!(connected["type"], "system");
    assert_eq!(connected["event"], "connected");
    assert_eq!(connected["userId"], "dev-x");
    assert!(connected["connectionId"].is_string());
    assert!(
        connected.get("reconnectionToken").is_none(),
        "only the reliable protocol resumes"
    );
    let (mut y, _) = ws_connect_url(&url_y, &json_protocol).await.unwrap();
    next_text_json(&mut y).await;

    send_json(&mut x, json!({"type": "ping"})).await;
    assert_eq!(next_text_json(&mut x).await, json!({"type": "pong"}));

    send_json(
        &mut y,
        json!({"type": "joinGroup", "group": "room", "ackId": 1}),
    )
    .await;
    assert_eq!(
        next_text_json(&mut y).await,
        json!({"type": "ack", "ackId": 1, "success": true})
    );
    // The same ackId again: Duplicate.
    send_json(
        &mut y,
        json!({"type": "joinGroup", "group": "room", "ackId": 1}),
    )
    .await;
    let duplicate = next_text_json(&mut y).await;
    assert_eq!(duplicate["success"], false);
    assert_eq!(duplicate["error"]["name"], "Duplicate");
    // y may join but not send.
    send_json(
        &mut y,
        json!({"type": "sendToGroup", "group": "room", "ackId": 2, "dataType": "text", "data": "hi"}),
    )
    .await;
    let forbidden = next_text_json(&mut y).await;
    assert_eq!(forbidden["success"], false);
    assert_eq!(forbidden["error"]["name"], "Forbidden");

    // x sends to the room without being in it: y gets it with x as the sender.
    send_json(
        &mut x,
        json!({"type": "sendToGroup", "group": "room", "ackId": 7, "dataType": "binary", "data": "AQID"}),
    )
    .await;
    assert_eq!(
        next_text_json(&mut x).await,
        json!({"type": "ack", "ackId": 7, "success": true})
    );
    assert_eq!(
        next_text_json(&mut y).await,
        json!({"type": "message", "from": "group", "group": "room", "fromUserId": "dev-x",
               "dataType": "binary", "data": "AQID"})
    );

    // An event the route selects is stored; one it does not select is a dead letter.
    send_json(
        &mut x,
        json!({"type": "event", "event": "telemetry", "ackId": 8, "dataType": "json", "data": {"rpm": 900}}),
    )
    .await;
    assert_eq!(
        next_text_json(&mut x).await,
        json!({"type": "ack", "ackId": 8, "success": true})
    );
    send_json(
        &mut x,
        json!({"type": "event", "event": "diagnostics", "ackId": 9, "dataType": "text", "data": "fan ok"}),
    )
    .await;
    let unrouted = next_text_json(&mut x).await;
    assert_eq!(unrouted["success"], false, "{unrouted}");
    assert_eq!(unrouted["error"]["name"], "InternalServerError");
    assert!(unrouted["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("unrouted"));
    let rows = server.wait_telemetry("dev-x", 1).await;
    assert_eq!(rows[0]["messageType"], "telemetry");
    assert_eq!(rows[0]["payload"], json!({"rpm": 900}));

    // A message to the device through the API arrives as a message from the server.
    let (status, sent) = body_json(
        server
            .post("/api/v1/devices/dev-y/messages", &json!({"cmd": "reboot"}))
            .await,
    )
    .await;
    assert_eq!(status, 202, "{sent}");
    assert_eq!(sent["delivered"], 1);
    assert_eq!(
        next_text_json(&mut y).await,
        json!({"type": "message", "from": "server", "dataType": "json", "data": {"cmd": "reboot"}})
    );

    // Something that is not a frame of the protocol: told, then closed with 1003.
    send_json(&mut x, json!({"type": "teleport"})).await;
    let told = next_text_json(&mut x).await;
    assert_eq!(told["type"], "system");
    assert_eq!(told["event"], "disconnected");
    match tokio::time::timeout(Duration::from_secs(5), x.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(u16::from(frame.code), 1003),
        other => panic!("expected close 1003, got {other:?}"),
    }
    // y is unaffected.
    send_json(
        &mut y,
        json!({"type": "leaveGroup", "group": "room", "ackId": 3}),
    )
    .await;
    assert_eq!(
        next_text_json(&mut y).await,
        json!({"type": "ack", "ackId": 3, "success": true})
    );

    // Presence: x connected, then disconnected with the close code it was given.
    let events = loop {
        let events = server.get_ok("/api/v1/devices/dev-x/events").await["items"]
            .as_array()
            .unwrap()
            .clone();
        if events.len() >= 2 {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Newest first.
    assert_eq!(events[0]["type"], "$disconnected", "{events:?}");
    assert_eq!(events[0]["closeCode"], 1003);
    assert_eq!(events[0]["listener"], "chat");
    assert_eq!(events[1]["type"], "$connected");
    assert_eq!(events[0]["connectionId"], events[1]["connectionId"]);
    let device = server.get_ok("/api/v1/devices/dev-y").await;
    assert_eq!(device["online"], true, "{device}");
    assert_eq!(
        server.get_ok("/api/v1/devices/dev-x").await["online"],
        false
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_needs_the_right_token_and_replays_what_was_not_acknowledged() {
    let server = TestServer::start().await;
    web_pubsub_platform(&server).await;
    server.register_device("dev-r", "phone").await;
    server.register_device("dev-s", "phone").await;
    let all = ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"];
    let url_r = client_url(&server, "dev-r", &all).await;
    let url_s = client_url(&server, "dev-s", &all).await;
    let reliable = WsOptions::new().protocol("json.reliable.webpubsub.azure.v1");

    let (mut r, _) = ws_connect_url(&url_r, &reliable).await.unwrap();
    let connected = next_text_json(&mut r).await;
    let connection_id = connected["connectionId"].as_str().unwrap().to_owned();
    let token = connected["reconnectionToken"].as_str().unwrap().to_owned();
    send_json(
        &mut r,
        json!({"type": "joinGroup", "group": "g", "ackId": 1}),
    )
    .await;
    assert_eq!(next_text_json(&mut r).await["success"], true);

    let (mut s, _) = ws_connect_url(&url_s, &reliable).await.unwrap();
    next_text_json(&mut s).await;
    for n in 1..=3 {
        send_json(
            &mut s,
            json!({"type": "sendToGroup", "group": "g", "dataType": "json", "data": {"n": n}}),
        )
        .await;
    }
    for n in 1..=3 {
        let message = next_text_json(&mut r).await;
        assert_eq!(message["sequenceId"], n, "{message}");
        assert_eq!(message["data"]["n"], n);
    }
    // Only the first is acknowledged; the socket then drops without a closing handshake.
    send_json(&mut r, json!({"type": "sequenceAck", "sequenceId": 1})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(r);
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_json(
        &mut s,
        json!({"type": "sendToGroup", "group": "g", "dataType": "json", "data": {"n": 4}}),
    )
    .await;

    // A wrong token finds nothing (404); the right one resumes the same connection.
    let wrong = format!("{url_r}&awps_connection_id={connection_id}&awps_reconnection_token=nope");
    let refused = ws_connect_url(&wrong, &reliable)
        .await
        .expect_err("wrong token");
    assert_eq!(upgrade_status(&refused), Some(404));
    // Another device holding the right id and token (leaked, say) may not take the session over
    // (403), and its attempt leaves the session resumable by its own device.
    let hijack = format!(
        "{url_s}&awps_connection_id={connection_id}&awps_reconnection_token={}",
        url_encode(&token)
    );
    let refused = ws_connect_url(&hijack, &reliable)
        .await
        .expect_err("another device's resume");
    assert_eq!(upgrade_status(&refused), Some(403));
    let resume = format!(
        "{url_r}&awps_connection_id={connection_id}&awps_reconnection_token={}",
        url_encode(&token)
    );
    let (mut r, _) = ws_connect_url(&resume, &reliable).await.unwrap();
    let again = next_text_json(&mut r).await;
    assert_eq!(again["event"], "connected");
    assert_eq!(again["connectionId"], connection_id.as_str());
    let replayed: Vec<Value> = [
        next_text_json(&mut r).await,
        next_text_json(&mut r).await,
        next_text_json(&mut r).await,
    ]
    .into_iter()
    .map(|m| json!([m["sequenceId"], m["data"]["n"]]))
    .collect();
    assert_eq!(replayed, vec![json!([2, 2]), json!([3, 3]), json!([4, 4])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_messages_can_be_routed_and_simple_clients_get_server_messages() {
    let server = TestServer::start().await;
    web_pubsub_platform(&server).await;
    // The listener also routes what devices send to groups; a route takes them to the store.
    let mut listener = server.get_ok("/api/v1/listeners/chat").await;
    listener["routeGroupMessages"] = json!(true);
    server.update_ok("listeners", &listener).await;
    server
        .create_ok(
            "routes",
            &json!({"key": "group-messages", "name": "group messages", "listeners": ["chat"],
                    "messageType": {"values": ["sendToGroup"]}, "downstreams": ["store"]}),
        )
        .await;
    server.wait_listener_state("chat", "running").await;
    server.register_device("dev-g", "phone").await;
    server.register_device("dev-plain", "phone").await;
    let url_g = client_url(&server, "dev-g", &["webpubsub.sendToGroup"]).await;
    let (mut g, _) = ws_connect_url(
        &url_g,
        &WsOptions::new().protocol("json.webpubsub.azure.v1"),
    )
    .await
    .unwrap();
    next_text_json(&mut g).await;
    send_json(
        &mut g,
        json!({"type": "sendToGroup", "group": "ops", "ackId": 1, "dataType": "json", "data": {"alarm": true}}),
    )
    .await;
    assert_eq!(next_text_json(&mut g).await["success"], true);
    let rows = server.wait_telemetry("dev-g", 1).await;
    assert_eq!(rows[0]["messageType"], "sendToGroup");
    assert_eq!(rows[0]["payload"], json!({"alarm": true}));
    assert_eq!(rows[0]["metadata"]["group"], "ops");

    // A client without a Web PubSub sub-protocol: no greeting, server messages as plain frames,
    // and what it sends is an event named "message".
    let url_plain = client_url(&server, "dev-plain", &[]).await;
    let (mut plain, response) = ws_connect_url(&url_plain, &WsOptions::new()).await.unwrap();
    assert!(response.headers().get("sec-websocket-protocol").is_none());
    let (status, sent) = body_json(
        server
            .post(
                "/api/v1/devices/dev-plain/messages",
                &json!({"cmd": "ping"}),
            )
            .await,
    )
    .await;
    assert_eq!(
        (status.as_u16(), sent["delivered"].clone()),
        (202, json!(1))
    );
    assert_eq!(next_text_json(&mut plain).await, json!({"cmd": "ping"}));
    let mut route_messages = server.get_ok("/api/v1/routes/telemetry-events").await;
    route_messages["messageType"] = json!({"values": ["telemetry", "message"]});
    server.update_ok("routes", &route_messages).await;
    send_json(&mut plain, json!({"t": 1})).await;
    let rows = server.wait_telemetry("dev-plain", 1).await;
    assert_eq!(rows[0]["messageType"], "message");
    assert_eq!(rows[0]["payload"], json!({"t": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_acknowledge_stored_an_event_is_acked_once_the_store_has_it() {
    let server = TestServer::start().await;
    web_pubsub_platform(&server).await;
    let mut listener = server.get_ok("/api/v1/listeners/chat").await;
    listener["acknowledge"] = json!("stored");
    server.update_ok("listeners", &listener).await;
    server.wait_listener_state("chat", "running").await;
    server.register_device("dev-s", "phone").await;
    let url = client_url(&server, "dev-s", &[]).await;
    let (mut ws, _) = ws_connect_url(&url, &WsOptions::new().protocol("json.webpubsub.azure.v1"))
        .await
        .unwrap();
    next_text_json(&mut ws).await;
    for ack_id in 1..=20u64 {
        send_json(
            &mut ws,
            json!({"type": "event", "event": "telemetry", "ackId": ack_id, "dataType": "json", "data": {"n": ack_id}}),
        )
        .await;
    }
    let mut acked = Vec::new();
    while acked.len() < 20 {
        let ack = next_text_json(&mut ws).await;
        assert_eq!(ack["success"], true, "{ack}");
        acked.push(ack["ackId"].as_u64().unwrap());
    }
    acked.sort_unstable();
    assert_eq!(acked, (1..=20).collect::<Vec<_>>());
    // Acked means stored: every row is there without waiting.
    let rows = server.telemetry("deviceId=dev-s&limit=100").await;
    assert_eq!(rows.len(), 20, "{rows:?}");
}
