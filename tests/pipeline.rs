//! End-to-end tests of the message path: server-mode listener → sentinel → routes → downstream
//! modules (store, WebSocket subscribers, webhook), dead letters, device state and metrics.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// Store path, rejections, dead letters
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_reaches_the_store_without_its_access_key() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 3).await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let mut ws = server.connect_device("/devices").await;
    send_json(
        &mut ws,
        &device_msg("d1", &key, json!({"temperature": 21.5})),
    )
    .await;

    let items = server.wait_telemetry("d1", 1).await;
    assert_eq!(items.len(), 1, "{items:?}");
    let t = &items[0];
    assert_eq!(
        t["payload"],
        json!({"deviceId": "d1", "temperature": 21.5}),
        "stored payload: {t}"
    );
    assert_eq!(t["payload"]["temperature"], 21.5);
    assert!(
        t["payload"].get("accessKey").is_none(),
        "access key stored: {t}"
    );
    assert!(
        !t.to_string().contains(&key),
        "the key appears in the stored envelope: {t}"
    );
    assert_eq!(t["listenerKey"], "devices");
    assert_eq!(t["authenticated"], true);
    assert_eq!(t["deviceId"], "d1");
    assert_eq!(t["deviceType"], "thermo");
    assert_eq!(t["contentType"], "json");
    assert!(t["receivedAt"].is_string() && t["id"].is_string(), "{t}");
    assert!(
        t["sourceAddress"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{t}"
    );

    // The accepted message was not answered.
    expect_silence(&mut ws, Duration::from_millis(300)).await;
    // Filter by listener too; other device has nothing.
    assert_eq!(server.telemetry("listener=devices").await.len(), 1);
    assert!(server.telemetry("deviceId=d2").await.is_empty());
    // The registry counts the contact (it may be written lazily).
    let s = &server;
    let dev = wait_for("the device's messageCount to be 1", WAIT, || async move {
        let dev = s.get_ok("/api/v1/devices/d1").await;
        (dev["messageCount"] == 1).then_some(dev)
    })
    .await;
    assert!(dev["lastContact"].is_string(), "{dev}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_answered_dead_lettered_and_closes_after_max_failures() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 3).await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let bad = "WRONG-KEY-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut ws = server.connect_device("/devices").await;

    send_json(&mut ws, &device_msg("d1", bad, json!({"n": 1}))).await;
    expect_error_frame(&mut ws, "invalid_key").await;
    let dl = server
        .wait_deadletter("invalid_key", WAIT, |d| {
            d["reason"] == "invalid_key" && d["payload"]["n"] == 1
        })
        .await;
    assert_eq!(dl["listenerKey"], "devices", "{dl}");
    assert!(
        !dl.to_string().contains(bad),
        "the rejected credential was dead-lettered: {dl}"
    );
    assert!(dl["payload"].get("accessKey").is_none(), "{dl}");

    // Failures must be consecutive: a good message resets the count.
    send_json(&mut ws, &device_msg("d1", bad, json!({"n": 2}))).await;
    expect_error_frame(&mut ws, "invalid_key").await;
    send_json(&mut ws, &device_msg("d1", &key, json!({"n": 3}))).await;
    server.wait_telemetry("d1", 1).await;
    send_json(&mut ws, &device_msg("d1", bad, json!({"n": 4}))).await;
    expect_error_frame(&mut ws, "invalid_key").await;
    send_json(&mut ws, &device_msg("d1", bad, json!({"n": 5}))).await;
    expect_error_frame(&mut ws, "invalid_key").await;
    expect_silence(&mut ws, Duration::from_millis(300)).await;

    // Third consecutive failure: error frame (optional) then close 1008.
    send_json(&mut ws, &device_msg("d1", bad, json!({"n": 6}))).await;
    let code = expect_close(&mut ws, WAIT).await;
    assert_eq!(code, 1008, "close code after maxFailures");

    let stored = server.telemetry("deviceId=d1").await;
    assert_eq!(
        stored.len(),
        1,
        "only the good message is stored: {stored:?}"
    );
    assert_eq!(stored[0]["payload"]["n"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_missing_and_unknown_are_rejected_with_their_codes() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 100).await;
    let mut ws = server.connect_device("/devices").await;

    send_text(&mut ws, "{\"deviceId\": \"d1\", ").await;
    expect_error_frame(&mut ws, "malformed_json").await;
    send_json(&mut ws, &json!({"temperature": 3})).await;
    expect_error_frame(&mut ws, "missing_credentials").await;
    send_json(
        &mut ws,
        &device_msg(
            "ghost",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            json!({"t": 1}),
        ),
    )
    .await;
    expect_error_frame(&mut ws, "unknown_device").await;

    for reason in ["malformed_json", "missing_credentials", "unknown_device"] {
        server
            .wait_deadletter(reason, WAIT, |d| {
                d["reason"] == reason && d["listenerKey"] == "devices"
            })
            .await;
    }
    // The connection is still usable.
    let (key, _) = server.register_device("d1", "thermo").await;
    send_json(&mut ws, &device_msg("d1", &key, json!({"ok": true}))).await;
    server.wait_telemetry("d1", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_matching_no_route_is_dead_lettered_unrouted() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    let mut r = route_def("only-other", &["store"]);
    r["deviceIds"] = json!(["someone-else"]);
    server.create_ok("routes", &r).await;
    server.wait_listener_state("devices", "running").await;
    let (key, _) = server.register_device("d1", "thermo").await;

    let mut ws = server.connect_device("/devices").await;
    send_json(
        &mut ws,
        &device_msg("d1", &key, json!({"marker": "unrouted-1"})),
    )
    .await;
    let dl = server
        .wait_deadletter("unrouted", WAIT, |d| {
            d["reason"] == "unrouted" && d["deviceId"] == "d1"
        })
        .await;
    assert_eq!(dl["payload"]["marker"], "unrouted-1", "{dl}");
    assert!(
        !dl.to_string().contains(&key),
        "dead letter contains the key: {dl}"
    );
    assert!(server.telemetry("deviceId=d1").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_device_is_rejected_and_reenabled() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 100).await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let mut ws = server.connect_device("/devices").await;

    let (s, b) = body_json(
        server
            .patch("/api/v1/devices/d1", &json!({"enabled": false}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["enabled"], false);
    send_json(&mut ws, &device_msg("d1", &key, json!({"n": 1}))).await;
    expect_error_frame(&mut ws, "device_disabled").await;
    server
        .wait_deadletter("device_disabled", WAIT, |d| {
            d["reason"] == "device_disabled"
        })
        .await;

    server
        .patch("/api/v1/devices/d1", &json!({"enabled": true}))
        .await;
    send_json(&mut ws, &device_msg("d1", &key, json!({"n": 2}))).await;
    let items = server.wait_telemetry("d1", 1).await;
    assert_eq!(items[0]["payload"]["n"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_takes_effect_at_once() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 100).await;
    let (old_primary, secondary) = server.register_device("d1", "thermo").await;
    let mut ws = server.connect_device("/devices").await;
    send_json(&mut ws, &device_msg("d1", &old_primary, json!({"n": 1}))).await;
    server.wait_telemetry("d1", 1).await;

    let b = server
        .post("/api/v1/devices/d1/keys/primary", &json!({}))
        .await;
    let (s, b) = body_json(b).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let new_primary = b["primaryAccessKey"].as_str().unwrap().to_string();

    // The connection that used the old key is closed at once (1008 key_rotated); a new one
    // with the old key is refused.
    assert_eq!(expect_close(&mut ws, WAIT).await, 1008);
    let mut ws = server.connect_device("/devices").await;
    send_json(&mut ws, &device_msg("d1", &old_primary, json!({"n": 2}))).await;
    expect_error_frame(&mut ws, "invalid_key").await;
    send_json(&mut ws, &device_msg("d1", &new_primary, json!({"n": 3}))).await;
    send_json(&mut ws, &device_msg("d1", &secondary, json!({"n": 4}))).await;
    let items = server.wait_telemetry("d1", 3).await;
    let mut ns: Vec<i64> = items
        .iter()
        .map(|t| t["payload"]["n"].as_i64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, vec![1, 3, 4]);
    expect_silence(&mut ws, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_device_is_unknown() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 100).await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let mut ws = server.connect_device("/devices").await;
    send_json(&mut ws, &device_msg("d1", &key, json!({"n": 1}))).await;
    server.wait_telemetry("d1", 1).await;
    assert_eq!(
        server.delete("/api/v1/devices/d1").await.status(),
        StatusCode::NO_CONTENT
    );
    // Its live connection is closed at once (1008 device_deleted); a new one is refused.
    assert_eq!(expect_close(&mut ws, WAIT).await, 1008);
    let mut ws = server.connect_device("/devices").await;
    send_json(&mut ws, &device_msg("d1", &key, json!({"n": 2}))).await;
    expect_error_frame(&mut ws, "unknown_device").await;
}

// ---------------------------------------------------------------------------------------------
// Connection-level credentials (query and header)
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_credentials_bind_the_connection_to_a_device() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok(
            "sentinels",
            &json!({"key": "qsen", "name": "query", "method": "accessKey",
                    "deviceId": {"from": "query", "name": "deviceId"},
                    "accessKey": {"from": "query", "name": "key"}}),
        )
        .await;
    server
        .create_ok("listeners", &listener_def("qlis", "/q", "qsen"))
        .await;
    server
        .create_ok("routes", &route_def("all", &["store"]))
        .await;
    server.wait_listener_state("qlis", "running").await;
    let (key, _) = server.register_device("d1", "thermo").await;

    let mut ws = server
        .connect_device(&format!("/q?deviceId=d1&key={key}"))
        .await;
    send_json(&mut ws, &json!({"temperature": 1})).await;
    send_json(&mut ws, &json!({"temperature": 2})).await;
    let items = server.wait_telemetry("d1", 2).await;
    for t in &items {
        assert_eq!(t["deviceId"], "d1");
        assert_eq!(t["authenticated"], true);
        assert_eq!(t["listenerKey"], "qlis");
    }
    let mut temps: Vec<i64> = items
        .iter()
        .map(|t| t["payload"]["temperature"].as_i64().unwrap())
        .collect();
    temps.sort();
    assert_eq!(temps, vec![1, 2]);

    // Bad key, and no credentials at all: closed with 1008 (or refused at the upgrade).
    for path in [
        "/q?deviceId=d1&key=not-the-key".to_string(),
        "/q".to_string(),
    ] {
        match server.ws_connect(&path, &WsOptions::new()).await {
            Ok((mut bad, _)) => {
                let _ = bad
                    .send(Message::Text(json!({"temperature": 9}).to_string().into()))
                    .await;
                assert_eq!(expect_close(&mut bad, WAIT).await, 1008, "{path}");
            }
            Err(e) => panic!(
                "{path}: expected the connection to be closed with 1008, got {}",
                describe_ws_error(&e)
            ),
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        server.telemetry("deviceId=d1").await.len(),
        2,
        "a message from a rejected connection was stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_header_credentials() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok(
            "sentinels",
            &json!({"key": "hsen", "name": "header", "method": "basic",
                    "credential": {"from": "header", "name": "x-device-auth"}}),
        )
        .await;
    server
        .create_ok("listeners", &listener_def("hlis", "/h", "hsen"))
        .await;
    server
        .create_ok("routes", &route_def("all", &["store"]))
        .await;
    server.wait_listener_state("hlis", "running").await;
    let (key, secondary) = server.register_device("d1", "thermo").await;

    let (mut ws, _) = server
        .ws_connect(
            "/h",
            &WsOptions::new().header("x-device-auth", &b64(&format!("d1:{key}"))),
        )
        .await
        .unwrap_or_else(|e| panic!("{}", describe_ws_error(&e)));
    send_json(&mut ws, &json!({"n": 1})).await;
    // A `Basic ` prefix is allowed, and the secondary key works.
    let (mut ws2, _) = server
        .ws_connect(
            "/h",
            &WsOptions::new().header(
                "x-device-auth",
                &format!("Basic {}", b64(&format!("d1:{secondary}"))),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{}", describe_ws_error(&e)));
    send_json(&mut ws2, &json!({"n": 2})).await;
    let items = server.wait_telemetry("d1", 2).await;
    assert!(
        items
            .iter()
            .all(|t| t["authenticated"] == true && t["listenerKey"] == "hlis"),
        "{items:?}"
    );

    for value in [
        b64("d1:wrong-key"),
        b64("ghost:whatever"),
        "not base64 at all!".to_string(),
    ] {
        match server
            .ws_connect("/h", &WsOptions::new().header("x-device-auth", &value))
            .await
        {
            Ok((mut bad, _)) => assert_eq!(
                expect_close(&mut bad, WAIT).await,
                1008,
                "credential {value}"
            ),
            Err(e) => panic!(
                "{value}: expected close 1008, got {}",
                describe_ws_error(&e)
            ),
        }
    }
    match server.ws_connect("/h", &WsOptions::new()).await {
        Ok((mut bad, _)) => assert_eq!(
            expect_close(&mut bad, WAIT).await,
            1008,
            "no credential header"
        ),
        Err(e) => panic!(
            "no header: expected close 1008, got {}",
            describe_ws_error(&e)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Routes and WebSocket subscribers
// ---------------------------------------------------------------------------------------------

/// Listeners `lis-one` (/one) and `lis-two` (/two) behind sentinel `sen`; WebSocket downstreams
/// `ws-a` (/stream/a) and `ws-b` (/stream/b); devices `thermo-1` (thermo) and `humid-1` (humid).
/// Returns their primary keys.
async fn selector_fixture(server: &TestServer) -> (String, String) {
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    server
        .create_ok("listeners", &listener_def("lis-one", "/one", "sen"))
        .await;
    server
        .create_ok("listeners", &listener_def("lis-two", "/two", "sen"))
        .await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("ws-a", "/stream/a", "envelope"),
        )
        .await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("ws-b", "/stream/b", "envelope"),
        )
        .await;
    server.wait_listener_state("lis-one", "running").await;
    server.wait_listener_state("lis-two", "running").await;
    let (t, _) = server.register_device("thermo-1", "thermo").await;
    let (h, _) = server.register_device("humid-1", "humid").await;
    (t, h)
}

fn markers(envs: &[Value]) -> Vec<String> {
    envs.iter()
        .map(|e| {
            e["payload"]["m"]
                .as_str()
                .unwrap_or_else(|| panic!("no marker in {e}"))
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_selector_device_types() {
    let server = TestServer::start().await;
    let (tk, hk) = selector_fixture(&server).await;
    let mut r = route_def("r-thermo", &["ws-a"]);
    r["deviceTypes"] = json!(["thermo"]);
    server.create_ok("routes", &r).await;
    let mut r = route_def("r-humid", &["ws-b"]);
    r["deviceTypes"] = json!(["humid"]);
    server.create_ok("routes", &r).await;
    let mut a = server.subscribe("/stream/a").await;
    let mut b = server.subscribe("/stream/b").await;

    let mut dev = server.connect_device("/one").await;
    send_json(&mut dev, &device_msg("humid-1", &hk, json!({"m": "humid"}))).await;
    send_json(
        &mut dev,
        &device_msg("thermo-1", &tk, json!({"m": "thermo"})),
    )
    .await;
    assert_eq!(markers(&recv_n_json(&mut a, 1, WAIT).await), ["thermo"]);
    assert_eq!(markers(&recv_n_json(&mut b, 1, WAIT).await), ["humid"]);
    expect_silence(&mut a, Duration::from_millis(700)).await;
    expect_silence(&mut b, Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_selector_device_ids() {
    let server = TestServer::start().await;
    let (tk, hk) = selector_fixture(&server).await;
    let mut r = route_def("r-thermo", &["ws-a"]);
    r["deviceIds"] = json!(["thermo-1"]);
    server.create_ok("routes", &r).await;
    let mut r = route_def("r-humid", &["ws-b"]);
    r["deviceIds"] = json!(["humid-1", "someone-else"]);
    server.create_ok("routes", &r).await;
    let mut a = server.subscribe("/stream/a").await;
    let mut b = server.subscribe("/stream/b").await;

    let mut dev = server.connect_device("/one").await;
    send_json(&mut dev, &device_msg("humid-1", &hk, json!({"m": "humid"}))).await;
    send_json(
        &mut dev,
        &device_msg("thermo-1", &tk, json!({"m": "thermo"})),
    )
    .await;
    assert_eq!(markers(&recv_n_json(&mut a, 1, WAIT).await), ["thermo"]);
    assert_eq!(markers(&recv_n_json(&mut b, 1, WAIT).await), ["humid"]);
    expect_silence(&mut a, Duration::from_millis(700)).await;
    expect_silence(&mut b, Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_selector_listeners() {
    let server = TestServer::start().await;
    let (tk, _) = selector_fixture(&server).await;
    let mut r = route_def("r-one", &["ws-a"]);
    r["listeners"] = json!(["lis-one"]);
    server.create_ok("routes", &r).await;
    let mut r = route_def("r-two", &["ws-b"]);
    r["listeners"] = json!(["lis-two"]);
    server.create_ok("routes", &r).await;
    let mut a = server.subscribe("/stream/a").await;
    let mut b = server.subscribe("/stream/b").await;

    let mut one = server.connect_device("/one").await;
    let mut two = server.connect_device("/two").await;
    send_json(
        &mut two,
        &device_msg("thermo-1", &tk, json!({"m": "via-two"})),
    )
    .await;
    send_json(
        &mut one,
        &device_msg("thermo-1", &tk, json!({"m": "via-one"})),
    )
    .await;
    let got_a = recv_n_json(&mut a, 1, WAIT).await;
    let got_b = recv_n_json(&mut b, 1, WAIT).await;
    assert_eq!(markers(&got_a), ["via-one"]);
    assert_eq!(got_a[0]["listenerKey"], "lis-one");
    assert_eq!(markers(&got_b), ["via-two"]);
    assert_eq!(got_b[0]["listenerKey"], "lis-two");
    expect_silence(&mut a, Duration::from_millis(700)).await;
    expect_silence(&mut b, Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_selector_message_type() {
    let server = TestServer::start().await;
    let (tk, _) = selector_fixture(&server).await;
    let mut r = route_def("r-telemetry", &["ws-a"]);
    r["messageType"] = json!({"pointer": "/type", "values": ["telemetry"]});
    server.create_ok("routes", &r).await;
    let mut r = route_def("r-alarm", &["ws-b"]);
    r["messageType"] = json!({"pointer": "/type", "values": ["alarm", "event"]});
    server.create_ok("routes", &r).await;
    let mut a = server.subscribe("/stream/a").await;
    let mut b = server.subscribe("/stream/b").await;

    let mut dev = server.connect_device("/one").await;
    send_json(
        &mut dev,
        &device_msg("thermo-1", &tk, json!({"m": "status", "type": "status"})),
    )
    .await;
    send_json(
        &mut dev,
        &device_msg("thermo-1", &tk, json!({"m": "alarm", "type": "alarm"})),
    )
    .await;
    send_json(
        &mut dev,
        &device_msg("thermo-1", &tk, json!({"m": "notype"})),
    )
    .await;
    send_json(
        &mut dev,
        &device_msg(
            "thermo-1",
            &tk,
            json!({"m": "telemetry", "type": "telemetry"}),
        ),
    )
    .await;
    assert_eq!(markers(&recv_n_json(&mut a, 1, WAIT).await), ["telemetry"]);
    assert_eq!(markers(&recv_n_json(&mut b, 1, WAIT).await), ["alarm"]);
    expect_silence(&mut a, Duration::from_millis(700)).await;
    expect_silence(&mut b, Duration::from_millis(100)).await;
    // The two that matched nothing are unrouted.
    for m in ["status", "notype"] {
        server
            .wait_deadletter(m, WAIT, |d| {
                d["reason"] == "unrouted" && d["payload"]["m"] == m
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_downstream_gets_an_envelope_once() {
    let server = TestServer::start().await;
    let (tk, hk) = selector_fixture(&server).await;
    server
        .create_ok("routes", &route_def("r-all", &["ws-a"]))
        .await;
    let mut r = route_def("r-thermo", &["ws-a", "ws-b"]);
    r["deviceTypes"] = json!(["thermo"]);
    server.create_ok("routes", &r).await;
    let mut a = server.subscribe("/stream/a").await;
    let mut b = server.subscribe("/stream/b").await;

    let mut dev = server.connect_device("/one").await;
    send_json(&mut dev, &device_msg("thermo-1", &tk, json!({"m": "t1"}))).await;
    send_json(&mut dev, &device_msg("humid-1", &hk, json!({"m": "h1"}))).await;
    let mut got_a = markers(&recv_n_json(&mut a, 2, WAIT).await);
    got_a.sort();
    assert_eq!(got_a, ["h1", "t1"]);
    assert_eq!(markers(&recv_n_json(&mut b, 1, WAIT).await), ["t1"]);
    expect_silence(&mut a, Duration::from_millis(700)).await;
    expect_silence(&mut b, Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribers_formats_filters_and_auth() {
    let server = TestServer::start().await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("live-env", "/stream/env", "envelope"),
        )
        .await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("live-pay", "/stream/pay", "payload"),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["live-env", "live-pay"]))
        .await;
    server.wait_listener_state("devices", "running").await;
    let (k1, _) = server.register_device("d1", "thermo").await;
    let (k2, _) = server.register_device("d2", "thermo").await;

    // Without a token, or with a bad one: 401 at the upgrade.
    let r = server.ws_connect("/stream/env", &WsOptions::new()).await;
    expect_refused(r, 401, "subscriber without token");
    let r = server
        .ws_connect("/stream/env?token=not-a-token", &WsOptions::new())
        .await;
    expect_refused(r, 401, "subscriber with a bad token");
    // A bearer header works as well as ?token=.
    let token = server.token().await;
    let (mut bearer, _) = server
        .ws_connect(
            "/stream/env",
            &WsOptions::new().authorization(&format!("Bearer {token}")),
        )
        .await
        .unwrap_or_else(|e| panic!("bearer subscriber: {}", describe_ws_error(&e)));

    let mut env = server.subscribe("/stream/env").await;
    let mut pay = server.subscribe("/stream/pay").await;
    let mut only_d2 = server.subscribe("/stream/env?deviceId=d2").await;

    let mut dev = server.connect_device("/devices").await;
    send_json(
        &mut dev,
        &device_msg("d1", &k1, json!({"temperature": 21.5, "n": 1})),
    )
    .await;
    send_json(
        &mut dev,
        &device_msg("d2", &k2, json!({"temperature": 19.0, "n": 2})),
    )
    .await;

    let e = recv_n_json(&mut env, 2, WAIT).await;
    assert_eq!(e[0]["deviceId"], "d1", "{e:?}");
    assert_eq!(
        e[0]["payload"],
        json!({"deviceId": "d1", "temperature": 21.5, "n": 1})
    );
    assert_eq!(e[0]["listenerKey"], "devices");
    assert_eq!(e[0]["authenticated"], true);
    assert_eq!(e[0]["deviceType"], "thermo");
    assert!(
        e[0]["receivedAt"].is_string() && e[0]["id"].is_string(),
        "{}",
        e[0]
    );
    assert_eq!(e[1]["deviceId"], "d2");
    for x in &e {
        assert!(
            !x.to_string().contains(&k1) && !x.to_string().contains(&k2),
            "a key reached a subscriber: {x}"
        );
    }

    let p = recv_n_json(&mut pay, 2, WAIT).await;
    assert_eq!(p[0], json!({"deviceId": "d1", "temperature": 21.5, "n": 1}));
    assert_eq!(p[1], json!({"deviceId": "d2", "temperature": 19.0, "n": 2}));

    let f = recv_n_json(&mut only_d2, 1, WAIT).await;
    assert_eq!(f[0]["deviceId"], "d2");
    expect_silence(&mut only_d2, Duration::from_millis(500)).await;

    let bb = recv_n_json(&mut bearer, 2, WAIT).await;
    assert_eq!(bb[0]["deviceId"], "d1");
}

// ---------------------------------------------------------------------------------------------
// Webhook downstream
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_receives_the_envelope() {
    let hook = start_hook(200).await;
    let server = TestServer::start().await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "hook", "name": "hook", "type": "webhook", "url": hook.url,
                    "headers": {"x-hook-secret": "abc123"}, "maxRetries": 2, "timeoutMs": 2000}),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["hook"]))
        .await;
    server.wait_listener_state("devices", "running").await;
    let (key, _) = server.register_device("d1", "thermo").await;

    let mut dev = server.connect_device("/devices").await;
    send_json(
        &mut dev,
        &device_msg("d1", &key, json!({"temperature": 21.5})),
    )
    .await;
    let reqs = hook.requests.clone();
    wait_until("the webhook request", WAIT, || {
        let reqs = reqs.clone();
        async move { !reqs.lock().unwrap().is_empty() }
    })
    .await;
    let req = hook.requests.lock().unwrap()[0].clone();
    assert!(
        req.head.starts_with("POST /hook "),
        "request line: {}",
        req.head
    );
    let head = req.head.to_ascii_lowercase();
    assert!(
        head.contains("content-type: application/json"),
        "{}",
        req.head
    );
    assert!(
        head.contains("x-hook-secret: abc123"),
        "custom header missing: {}",
        req.head
    );
    let env: Value = serde_json::from_slice(&req.body).unwrap_or_else(|e| {
        panic!(
            "body not JSON ({e}): {:?}",
            String::from_utf8_lossy(&req.body)
        )
    });
    assert_eq!(env["deviceId"], "d1", "{env}");
    assert_eq!(env["listenerKey"], "devices");
    assert_eq!(
        env["payload"],
        json!({"deviceId": "d1", "temperature": 21.5})
    );
    assert!(!env.to_string().contains(&key));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hook.hits.load(Ordering::SeqCst), 1, "a 200 was retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_webhook_ends_in_dead_letters() {
    let hook = start_hook(500).await;
    let server = TestServer::start().await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "hook", "name": "hook", "type": "webhook", "url": hook.url, "maxRetries": 1, "timeoutMs": 1000}),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["hook"]))
        .await;
    server.wait_listener_state("devices", "running").await;
    let (key, _) = server.register_device("d1", "thermo").await;

    let mut dev = server.connect_device("/devices").await;
    send_json(
        &mut dev,
        &device_msg("d1", &key, json!({"marker": "hook-fail"})),
    )
    .await;
    let dl = server
        .wait_deadletter("from the webhook", Duration::from_secs(30), |d| {
            d["payload"]["marker"] == "hook-fail"
        })
        .await;
    let reason = dl["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("webhook") || dl["module"].as_str().is_some_and(|m| m.contains("hook")),
        "dead letter does not name the webhook: {dl}"
    );
    assert!(
        reason.contains("webhook"),
        "reason should contain `webhook`: {dl}"
    );
    assert_eq!(dl["deviceId"], "d1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        hook.hits.load(Ordering::SeqCst),
        2,
        "maxRetries 1 means exactly 2 attempts"
    );
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_traffic() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 100).await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let mut dev = server.connect_device("/devices").await;
    for n in 0..3 {
        send_json(&mut dev, &device_msg("d1", &key, json!({"n": n}))).await;
    }
    send_json(&mut dev, &device_msg("d1", "bad-key", json!({"n": 99}))).await;
    expect_error_frame(&mut dev, "invalid_key").await;
    server.wait_telemetry("d1", 3).await;

    let s = &server;
    let text = wait_for("metrics to show the traffic", WAIT, || async move {
        let text = s.metrics().await;
        let received = metric_value(
            &text,
            "iotgate_messages_received_total",
            &[("listener", "devices")],
        )
        .unwrap_or(0.0);
        let delivered = metric_value(
            &text,
            "iotgate_messages_delivered_total",
            &[("downstream", "store")],
        )
        .unwrap_or(0.0);
        (received >= 4.0 && delivered >= 3.0).then_some(text)
    })
    .await;
    assert_eq!(
        metric_value(
            &text,
            "iotgate_messages_received_total",
            &[("listener", "devices")]
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "iotgate_connections", &[("listener", "devices")]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "iotgate_messages_delivered_total",
            &[("downstream", "store")]
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "iotgate_messages_routed_total", &[("route", "all")]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "iotgate_messages_rejected_total",
            &[("sentinel", "sen"), ("reason", "invalid_key")]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("iotgate_pipeline_latency_seconds"),
        "no latency histogram:\n{text}"
    );

    // The listener status agrees.
    let st = server.listener_status("devices").await;
    assert_eq!(st["connections"], 1, "{st}");
    assert_eq!(st["messagesReceived"], 4, "{st}");
    assert_eq!(st["messagesAccepted"], 3, "{st}");
    assert_eq!(st["messagesRejected"], 1, "{st}");

    drop(dev);
    wait_until("the connection gauge to drop", WAIT, || async move {
        metric_value(
            &s.metrics().await,
            "iotgate_connections",
            &[("listener", "devices")],
        ) == Some(0.0)
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Hot reload keeps device connections
// ---------------------------------------------------------------------------------------------

/// Sentinel, route and downstream changes (and unrelated route create/delete) are applied under
/// a live device connection: the same socket keeps delivering to the store and is never closed,
/// and the new settings take effect on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_changes_keep_device_connections() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 5).await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("live", "/stream/live", "envelope"),
        )
        .await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let mut ws = server.connect_device("/devices").await;
    let mut sent = 0usize;

    // Sends message n on the same socket; waits until the store has n messages and checks that
    // nothing came back on the socket.
    async fn deliver(server: &TestServer, ws: &mut Ws, key: &str, sent: &mut usize, step: &str) {
        *sent += 1;
        send_json(
            ws,
            &device_msg("d1", key, json!({"n": *sent, "step": step})),
        )
        .await;
        let items = server.wait_telemetry("d1", *sent).await;
        assert!(
            items.iter().any(|t| t["payload"]["step"] == step),
            "message after `{step}` not stored: {items:?}"
        );
        match next_event(ws, Duration::from_millis(300)).await {
            WsEvent::Timeout => {}
            other => panic!("after `{step}` the device connection got {other:?}"),
        }
    }

    deliver(&server, &mut ws, &key, &mut sent, "initial").await;

    // Sentinel: maxFailures 5 -> 2.
    server.update_ok("sentinels", &sentinel_def("sen", 2)).await;
    deliver(&server, &mut ws, &key, &mut sent, "sentinel changed").await;

    // Route: a second downstream; a subscriber of it sees the next message.
    server
        .update_ok("routes", &route_def("all", &["store", "live"]))
        .await;
    let mut sub = server.subscribe("/stream/live").await;
    deliver(&server, &mut ws, &key, &mut sent, "route changed").await;
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["payload"]["step"], "route changed", "{}", got[0]);

    // Downstream: the store's batchSize and queueCapacity.
    let mut store = store_def("store");
    store["batchSize"] = json!(7);
    store["queueCapacity"] = json!(64);
    server.update_ok("downstreams", &store).await;
    deliver(&server, &mut ws, &key, &mut sent, "downstream changed").await;

    // An unrelated route, created and deleted.
    let mut other = route_def("other", &["store"]);
    other["deviceIds"] = json!(["nobody"]);
    server.create_ok("routes", &other).await;
    deliver(&server, &mut ws, &key, &mut sent, "route created").await;
    assert_eq!(
        server.delete("/api/v1/routes/other").await.status(),
        StatusCode::NO_CONTENT
    );
    deliver(&server, &mut ws, &key, &mut sent, "route deleted").await;

    // A burst right after a downstream change loses nothing.
    store["batchSize"] = json!(3);
    server.update_ok("downstreams", &store).await;
    for i in 0..20 {
        send_json(&mut ws, &device_msg("d1", &key, json!({"burst": i}))).await;
    }
    sent += 20;
    let items = server.wait_telemetry("d1", sent).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let items_now = server.telemetry("deviceId=d1&limit=1000").await;
    assert_eq!(items_now.len(), sent, "duplicates or losses: {items_now:?}");

    // Every message came over one connection, which is still counted.
    let conn_ids: std::collections::BTreeSet<String> = items
        .iter()
        .map(|t| t["connectionId"].to_string())
        .collect();
    assert_eq!(conn_ids.len(), 1, "more than one connection: {conn_ids:?}");
    let st = server.listener_status("devices").await;
    assert_eq!(st["connections"], 1, "{st}");
    assert_eq!(st["messagesAccepted"], sent, "{st}");
    expect_silence(&mut ws, Duration::from_millis(300)).await;

    // The sentinel change applies to the open connection: two failures now close it.
    let bad = "WRONG-KEY-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    send_json(&mut ws, &device_msg("d1", bad, json!({"bad": 1}))).await;
    expect_error_frame(&mut ws, "invalid_key").await;
    send_json(&mut ws, &device_msg("d1", bad, json!({"bad": 2}))).await;
    assert_eq!(
        expect_close(&mut ws, WAIT).await,
        1008,
        "maxFailures 2 not applied to the open connection"
    );
}

/// Dead letters of messages the sentinel rejected name the device the message claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_dead_letter_the_claimed_device_id() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 100).await;
    let (_key, _) = server.register_device("d1", "thermo").await;
    let (key2, _) = server.register_device("d2", "thermo").await;
    let bad = "WRONG-KEY-cccccccccccccccccccccccccccccccccccc";
    let mut ws = server.connect_device("/devices").await;

    send_json(&mut ws, &device_msg("d1", bad, json!({"m": "invalid"}))).await;
    expect_error_frame(&mut ws, "invalid_key").await;
    send_json(
        &mut ws,
        &device_msg("ghost-7", bad, json!({"m": "unknown"})),
    )
    .await;
    expect_error_frame(&mut ws, "unknown_device").await;
    server
        .patch("/api/v1/devices/d2", &json!({"enabled": false}))
        .await;
    send_json(&mut ws, &device_msg("d2", &key2, json!({"m": "disabled"}))).await;
    expect_error_frame(&mut ws, "device_disabled").await;

    let mut wrong = Vec::new();
    for (reason, marker, device) in [
        ("invalid_key", "invalid", "d1"),
        ("unknown_device", "unknown", "ghost-7"),
        ("device_disabled", "disabled", "d2"),
    ] {
        let dl = server
            .wait_deadletter(reason, WAIT, |d| {
                d["reason"] == reason && d["payload"]["m"] == marker
            })
            .await;
        if dl["deviceId"] != device {
            wrong.push(format!(
                "{reason}: deviceId {} (want {device})",
                dl["deviceId"]
            ));
        }
        assert_eq!(dl["listenerKey"], "devices", "{dl}");
        assert!(
            !dl.to_string().contains(bad) && !dl.to_string().contains(&key2),
            "a credential was dead-lettered: {dl}"
        );
    }
    assert!(
        wrong.is_empty(),
        "dead letters without the claimed device id: {wrong:?}"
    );
}

/// Changing a websocket downstream closes its subscribers with 1012 (service restart); they can
/// reconnect and receive again. Device connections are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_websocket_downstream_closes_subscribers_with_1012() {
    let server = TestServer::start().await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("live", "/stream/live", "envelope"),
        )
        .await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("other", "/stream/other", "envelope"),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["live", "other"]))
        .await;
    server.wait_listener_state("devices", "running").await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let mut sub = server.subscribe("/stream/live").await;
    let mut other = server.subscribe("/stream/other").await;
    let mut dev = server.connect_device("/devices").await;
    send_json(&mut dev, &device_msg("d1", &key, json!({"n": 1}))).await;
    assert_eq!(recv_n_json(&mut sub, 1, WAIT).await[0]["payload"]["n"], 1);
    assert_eq!(recv_n_json(&mut other, 1, WAIT).await[0]["payload"]["n"], 1);

    server
        .update_ok(
            "downstreams",
            &ws_downstream_def("live", "/stream/live", "payload"),
        )
        .await;
    assert_eq!(
        expect_close(&mut sub, WAIT).await,
        1012,
        "a subscriber of a changed websocket downstream must be closed with 1012"
    );
    // The other downstream's subscriber and the device stay connected.
    expect_silence(&mut other, Duration::from_millis(300)).await;
    expect_silence(&mut dev, Duration::from_millis(100)).await;

    let mut sub = server.subscribe("/stream/live").await;
    send_json(&mut dev, &device_msg("d1", &key, json!({"n": 2}))).await;
    // The new format (payload) is in effect for the reconnected subscriber.
    assert_eq!(
        recv_n_json(&mut sub, 1, WAIT).await[0],
        json!({"deviceId": "d1", "n": 2})
    );
    assert_eq!(recv_n_json(&mut other, 1, WAIT).await[0]["payload"]["n"], 2);
}

// ---------------------------------------------------------------------------------------------
// References between definitions
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_must_exist_and_block_deletion() {
    let server = TestServer::start().await;

    // A listener naming no existing sentinel.
    let b = expect_error(
        server
            .create(
                "listeners",
                &listener_def("devices", "/devices", "ghost-sentinel"),
            )
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&b), ["/sentinel"], "{b}");
    assert_eq!(
        server.get("/api/v1/listeners/devices").await.status(),
        StatusCode::NOT_FOUND,
        "a refused listener was stored"
    );
    // A route naming an unknown downstream (first, then second position).
    let b = expect_error(
        server
            .create("routes", &route_def("all", &["ghost-downstream"]))
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&b), ["/downstreams/0"], "{b}");
    server.create_ok("downstreams", &store_def("store")).await;
    let b = expect_error(
        server
            .create("routes", &route_def("all", &["store", "ghost-downstream"]))
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&b), ["/downstreams/1"], "{b}");
    assert_eq!(
        server.get("/api/v1/routes/all").await.status(),
        StatusCode::NOT_FOUND
    );

    // With the references in place, deletion of what is used is refused.
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    server
        .create_ok("routes", &route_def("all", &["store"]))
        .await;
    // A PUT that breaks a reference is refused as well.
    let b = expect_error(
        server
            .put(
                "/api/v1/listeners/devices",
                &listener_def("devices", "/devices", "ghost-sentinel"),
            )
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&b), ["/sentinel"], "{b}");

    expect_error(
        server.delete("/api/v1/sentinels/sen").await,
        409,
        "conflict",
    )
    .await;
    expect_error(
        server.delete("/api/v1/downstreams/store").await,
        409,
        "conflict",
    )
    .await;
    // Nothing was deleted, and the pipeline still works.
    server.get_ok("/api/v1/sentinels/sen").await;
    server.get_ok("/api/v1/downstreams/store").await;
    server.wait_listener_state("devices", "running").await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let mut ws = server.connect_device("/devices").await;
    send_json(&mut ws, &device_msg("d1", &key, json!({"n": 1}))).await;
    server.wait_telemetry("d1", 1).await;
    drop(ws);

    // Once the users are gone, deletion works.
    assert_eq!(
        server.delete("/api/v1/routes/all").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        server.delete("/api/v1/downstreams/store").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        server.delete("/api/v1/listeners/devices").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        server.delete("/api/v1/sentinels/sen").await.status(),
        StatusCode::NO_CONTENT
    );
}

// ---------------------------------------------------------------------------------------------
// Backpressure
// ---------------------------------------------------------------------------------------------

/// A slow webhook (50 ms per request) behind a small queue: a device sending 300 messages fast
/// is slowed down, not dropped; every message arrives exactly once and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_webhook_pushes_back_and_loses_nothing() {
    let hook = start_slow_hook(Duration::from_millis(50)).await;
    let server = TestServer::start().await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "hook", "name": "hook", "type": "webhook", "url": hook.url,
                    "queueCapacity": 16, "timeoutMs": 5000, "maxRetries": 5}),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["hook"]))
        .await;
    server.wait_listener_state("devices", "running").await;
    let (key, _) = server.register_device("d1", "thermo").await;

    let total = 300usize;
    let mut dev = server.connect_device("/devices").await;
    // Samples the hook's queue depth while the messages drain.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (http, url, sampling, token) = (
            server.http.clone(),
            server.url("/metrics"),
            sampling.clone(),
            server.token().await,
        );
        tokio::spawn(async move {
            let mut max_depth = 0f64;
            while sampling.load(Ordering::SeqCst) {
                if let Ok(r) = http.get(&url).bearer_auth(&token).send().await {
                    let text = r.text().await.unwrap_or_default();
                    if let Some(d) =
                        metric_value(&text, "iotgate_queue_depth", &[("downstream", "hook")])
                    {
                        max_depth = max_depth.max(d);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            max_depth
        })
    };
    let started = std::time::Instant::now();
    for n in 0..total {
        tokio::time::timeout(
            Duration::from_secs(30),
            send_json(&mut dev, &device_msg("d1", &key, json!({"n": n}))),
        )
        .await
        .unwrap_or_else(|_| panic!("sending message {n} blocked for 30 s"));
    }
    eprintln!("sent {total} messages in {:?}", started.elapsed());

    let reqs = hook.requests.clone();
    wait_until(
        "every message at the webhook",
        Duration::from_secs(60),
        || {
            let reqs = reqs.clone();
            async move { reqs.lock().unwrap().len() >= total }
        },
    )
    .await;
    eprintln!("all {total} delivered after {:?}", started.elapsed());
    sampling.store(false, Ordering::SeqCst);
    let max_depth = tokio::time::timeout(Duration::from_secs(35), sampler)
        .await
        .expect("metrics sampler")
        .expect("sampler task");
    eprintln!("largest queue depth seen: {max_depth}");
    assert!(
        max_depth >= 8.0,
        "the queue never filled ({max_depth}): the test did not exercise backpressure"
    );
    // 16 queued, plus the device's blocked hand-over and the gauge's own update races.
    assert!(
        max_depth <= 20.0,
        "queueCapacity 16 is not a bound: depth {max_depth}"
    );
    // Give a duplicate (a needless retry) the chance to show up.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let reqs = hook.requests.lock().unwrap().clone();
    let mut ids = std::collections::BTreeSet::new();
    let mut ns = std::collections::BTreeSet::new();
    for r in &reqs {
        let header_id = envelope_id_header(&r.head)
            .unwrap_or_else(|| panic!("no x-iotgate-envelope-id header: {}", r.head));
        let env: Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "body not JSON ({e}): {:?}",
                String::from_utf8_lossy(&r.body)
            )
        });
        assert_eq!(env["id"].as_str(), Some(header_id.as_str()), "{env}");
        ids.insert(header_id);
        ns.insert(env["payload"]["n"].as_u64().expect("payload n"));
    }
    assert_eq!(ids.len(), total, "distinct envelope ids at the webhook");
    assert_eq!(
        ns,
        (0..total as u64).collect::<std::collections::BTreeSet<_>>(),
        "every message once"
    );
    assert_eq!(reqs.len(), total, "duplicate deliveries");
    let dls = server.deadletters().await;
    assert!(dls.is_empty(), "dead letters under backpressure: {dls:?}");
    let st = server.listener_status("devices").await;
    assert_eq!(st["messagesAccepted"], total, "{st}");
    assert_eq!(st["messagesRejected"], 0, "{st}");
    assert_eq!(st["connections"], 1, "{st}");
    // The device was never told off or disconnected.
    expect_silence(&mut dev, Duration::from_millis(300)).await;
    let text = server.metrics().await;
    assert_eq!(
        metric_value(
            &text,
            "iotgate_messages_delivered_total",
            &[("downstream", "hook")]
        ),
        Some(total as f64),
        "{text}"
    );
}
