//! End-to-end tests of who may speak for a device: registry changes that close live connections
//! at once, listeners without a sentinel whose messages only claim a device, and dead letters that
//! an unauthenticated flood cannot use to fill the disk (written as the attack).

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn query_sentinel() -> Value {
    json!({"key": "query-keys", "name": "query keys", "method": "accessKey",
           "deviceId": {"from": "query", "name": "deviceId"},
           "accessKey": {"from": "query", "name": "accessKey"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_changes_close_live_connections_within_a_second() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server.create_ok("sentinels", &query_sentinel()).await;
    server
        .create_ok("sentinels", &sentinel_def("body", 100))
        .await;
    server
        .create_ok(
            "listeners",
            &listener_def("at-connect", "/at-connect", "query-keys"),
        )
        .await;
    server
        .create_ok("listeners", &listener_def("in-body", "/in-body", "body"))
        .await;
    server
        .create_ok("routes", &route_def("all", &["store"]))
        .await;
    server.wait_listener_state("at-connect", "running").await;
    server.wait_listener_state("in-body", "running").await;
    let (key_a, _) = server.register_device("dev-a", "meter").await;
    let (key_b, _) = server.register_device("dev-b", "meter").await;
    let (key_c, _) = server.register_device("dev-c", "meter").await;
    let connect = |device: &str, key: &str| {
        format!(
            "/at-connect?deviceId={device}&accessKey={}",
            url_encode(key)
        )
    };

    // Bound at connect time and idle: disabling the device closes it.
    let mut a = server.connect_device(&connect("dev-a", &key_a)).await;
    server.wait_device_online("dev-a", true).await;
    let started = Instant::now();
    let r = server
        .patch("/api/v1/devices/dev-a", &json!({"enabled": false}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        close_of(&mut a, Duration::from_secs(1)).await,
        (1008, "device_disabled".into())
    );
    println!(
        "device disabled → connection closed in {:?}",
        started.elapsed()
    );

    // Body credentials: rotating the key the connection used closes it; rotating the other
    // key does not.
    let mut b = server.connect_device("/in-body").await;
    send_json(&mut b, &device_msg("dev-b", &key_b, json!({"n": 1}))).await;
    server.wait_telemetry("dev-b", 1).await;
    let r = server
        .post("/api/v1/devices/dev-b/keys/secondary", &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    expect_silence(&mut b, Duration::from_millis(500)).await;
    let r = server
        .post("/api/v1/devices/dev-b/keys/primary", &json!({}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        close_of(&mut b, Duration::from_secs(1)).await,
        (1008, "key_rotated".into())
    );

    // Deleting the device closes its connection.
    let mut c = server.connect_device(&connect("dev-c", &key_c)).await;
    server.wait_device_online("dev-c", true).await;
    let r = server.delete("/api/v1/devices/dev-c").await;
    assert_eq!(r.status(), 204);
    assert_eq!(
        close_of(&mut c, Duration::from_secs(1)).await,
        (1008, "device_deleted".into())
    );

    // Disabling a sentinel closes the connections of the listeners that use it, and only those.
    let (key_d, _) = server.register_device("dev-d", "meter").await;
    let mut d = server.connect_device(&connect("dev-d", &key_d)).await;
    let mut other = server.connect_device("/in-body").await;
    server.wait_device_online("dev-d", true).await;
    let mut disabled = query_sentinel();
    disabled["enabled"] = json!(false);
    server.update_ok("sentinels", &disabled).await;
    assert_eq!(
        close_of(&mut d, Duration::from_secs(1)).await,
        (1008, "sentinel_disabled".into())
    );
    expect_silence(&mut other, Duration::from_millis(300)).await;
    // A new connection to that listener is refused until the sentinel is back.
    let mut again = server.connect_device(&connect("dev-d", &key_d)).await;
    let frame = recv_json(&mut again, WAIT).await;
    assert_eq!(frame["error"]["code"], "sentinel_unavailable", "{frame}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_a_sentinel_only_claim_their_device() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("verified", "/verified", "envelope"),
        )
        .await;
    server
        .create_ok(
            "listeners",
            &json!({"key": "gateway", "name": "Gateway", "listenerType": "websocket", "mode": "server",
                    "contentType": "json", "path": "/gateway", "anonymous": false,
                    "userName": "gw", "password": "gateway-pass-1"}),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["store"]))
        .await;
    server
        .create_ok(
            "routes",
            &json!({"key": "only-verified", "name": "v", "deviceIdentity": "authenticated",
                    "downstreams": ["verified"]}),
        )
        .await;
    server.wait_listener_state("gateway", "running").await;
    server.register_device("meter-1", "meter").await;
    server.register_device("meter-2", "meter").await;
    server
        .patch("/api/v1/devices/meter-2", &json!({"enabled": false}))
        .await;
    let mut viewer = server.subscribe("/verified").await;

    let (mut ws, _) = server
        .ws_connect("/gateway", &WsOptions::new().basic("gw", "gateway-pass-1"))
        .await
        .unwrap();
    send_json(&mut ws, &json!({"deviceId": "meter-1", "kwh": 5})).await;
    send_json(&mut ws, &json!({"deviceId": "unregistered-9", "kwh": 6})).await;
    send_json(&mut ws, &json!({"deviceId": "meter-2", "kwh": 7})).await;
    let frame = recv_json(&mut ws, WAIT).await;
    assert_eq!(
        frame["error"]["code"], "device_disabled",
        "a disabled device is refused: {frame}"
    );

    let items = wait_for("the two claimed messages", WAIT, || async {
        let items = server.telemetry("listener=gateway").await;
        (items.len() >= 2).then_some(items)
    })
    .await;
    assert_eq!(items.len(), 2, "{items:?}");
    for item in &items {
        assert_eq!(item["authenticated"], false, "{item}");
        assert!(
            item["deviceId"].is_null(),
            "a claim is not an identity: {item}"
        );
        assert!(item["deviceType"].is_null(), "{item}");
    }
    let claimed: Vec<&str> = items
        .iter()
        .map(|i| i["claimedDeviceId"].as_str().unwrap())
        .collect();
    assert!(
        claimed.contains(&"meter-1") && claimed.contains(&"unregistered-9"),
        "{claimed:?}"
    );
    // A route for authenticated devices never sees them.
    expect_silence(&mut viewer, Duration::from_millis(300)).await;
    let dead = server
        .wait_deadletter("the disabled claim", WAIT, |d| {
            d["reason"] == "device_disabled"
        })
        .await;
    assert_eq!(dead["deviceId"], "meter-2");
}

/// The attack: connections that never authenticate send 10 KB of garbage as fast as they can.
/// Dead letters stay within their row and size caps, one address is rate limited, payloads are
/// cut to 1 KiB, and an authenticated device keeps flowing meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_flood_cannot_fill_the_disk_through_dead_letters() {
    let server = TestServer::start_with_extra(
        ServerOptions::new()
            .args(["--dead-letter-max-rows", "100"])
            .args(["--dead-letter-max-bytes", "60000"])
            .args(["--dead-letter-rate-per-ip", "20"])
            .args(["--max-connections-per-ip", "0"])
            .args(["--connect-rate-per-ip", "0"]),
    )
    .await;
    setup_store_pipeline(&server, 1000).await;
    let (key, _) = server.register_device("d1", "meter").await;

    let junk = "A".repeat(10_000);
    let attackers: Vec<_> = (0..4)
        .map(|a| {
            let url = server.ws_url("/devices");
            let junk = junk.clone();
            tokio::spawn(async move {
                let (mut ws, _) = ws_connect_url(&url, &WsOptions::new()).await.unwrap();
                for _ in 0..300 {
                    let body = json!({"deviceId": format!("ghost-{a}"), "accessKey": "guess", "junk": junk});
                    if ws.send(Message::Text(body.to_string().into())).await.is_err() {
                        break;
                    }
                    // Read the refusals so the socket never fills up.
                    while let Ok(Some(_)) =
                        tokio::time::timeout(Duration::from_millis(1), ws.next()).await
                    {}
                }
                // Close and read to the end: dropping a socket with unread refusals in it would
                // reset the connection, and the server would lose the frames it had not read yet.
                let _ = ws.close(None).await;
                while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
            })
        })
        .collect();
    let mut device = server.connect_device("/devices").await;
    for i in 0..100 {
        send_json(&mut device, &device_msg("d1", &key, json!({"i": i}))).await;
    }
    for attacker in attackers {
        attacker.await.unwrap();
    }
    assert_eq!(
        server.wait_telemetry("d1", 100).await.len(),
        100,
        "the device kept flowing"
    );

    // The attackers stopped sending; the last refusals may still be on their way through the
    // server, so the counts are read until all 1200 are in (or 10 s pass).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (written, suppressed) = loop {
        let metrics = server.metrics().await;
        let written =
            metric_value(&metrics, "iotgate_messages_dead_lettered_total", &[]).unwrap_or(0.0);
        let suppressed =
            metric_value(&metrics, "iotgate_dead_letters_suppressed_total", &[]).unwrap_or(0.0);
        if written + suppressed >= 1200.0 || std::time::Instant::now() > deadline {
            break (written, suppressed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "flood of 1200 rejections: {written} written as dead letters, {suppressed} only counted"
    );
    assert_eq!(written + suppressed, 1200.0);
    assert!(
        suppressed > 900.0,
        "one address is held to its rate: {suppressed} suppressed"
    );

    let mut conn = server.database_connection().await;
    let [rows, size] = conn
        .integers(
            "SELECT COUNT(*), CAST(COALESCE(SUM(COALESCE(LENGTH(payload), 0) + LENGTH(message)), 0) AS BIGINT) FROM dead_letters",
        )
        .await;
    conn.close().await;
    println!("dead-letter table after the flood: {rows} rows, {size} bytes");
    assert!(rows <= 100, "{rows} rows");
    assert!(size <= 60_000, "{size} bytes");
    for letter in server.deadletters().await {
        assert_eq!(letter["payloadTruncated"], true, "{letter}");
        assert!(
            letter["payload"].as_str().unwrap().len() <= 1024,
            "{letter}"
        );
    }
}
