//! End-to-end tests of the process lifecycle: first start, restart on the same data directory, and
//! graceful shutdown on SIGTERM without losing accepted messages.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_admin_password_is_printed_once_and_kept() {
    let mut server = TestServer::start_with(None, None).await;
    let pw = server
        .wait_generated_password(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no `{GENERATED_PASSWORD_PREFIX}` line on stdout: {}",
                server.stdout_of_this_run()
            )
        });
    assert!(pw.len() >= 12, "generated password too short: {pw:?}");
    server.login().await;
    let r = server
        .http
        .post(server.url("/api/v1/auth/login"))
        .json(&json!({"userName": "admin", "password": format!("{pw}x")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(
        !server.stderr.lock().unwrap().contains(&pw),
        "the generated password was logged to stderr"
    );

    server.stop().await;
    server.restart().await;
    server.login().await;
    assert!(
        !server
            .stdout_of_this_run()
            .contains(GENERATED_PASSWORD_PREFIX),
        "a second start printed a new password: {}",
        server.stdout_of_this_run()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_definitions_devices_and_telemetry() {
    let mut server = TestServer::start().await;
    assert!(
        !server
            .stdout_of_this_run()
            .contains(GENERATED_PASSWORD_PREFIX),
        "printed a password although one was given"
    );
    setup_store_pipeline(&server, 5).await;
    server
        .create_ok(
            "listeners",
            &json!({"key": "guarded", "name": "Guarded", "listenerType": "websocket", "mode": "server",
                    "contentType": "json", "path": "/guarded", "anonymous": false, "userName": "gate",
                    "password": "gate-pass", "maxMessageBytes": 2048}),
        )
        .await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("live", "/stream/live", "payload"),
        )
        .await;
    let (key, secondary) = server.register_device("d1", "thermo").await;
    let mut dev = server.connect_device("/devices").await;
    send_json(&mut dev, &device_msg("d1", &key, json!({"n": 1}))).await;
    server.wait_telemetry("d1", 1).await;
    assert!(
        server.data_dir.join("server.secret").is_file(),
        "no server.secret in the data dir"
    );

    let mut before = Vec::new();
    for kind in ["listeners", "sentinels", "routes", "downstreams"] {
        before.push(server.get_ok(&format!("/api/v1/{kind}")).await);
    }
    let devices_before = server.get_ok("/api/v1/devices").await;

    server.stop().await;
    // The device connection was closed on shutdown.
    match next_event(&mut dev, Duration::from_secs(5)).await {
        WsEvent::Close(Some(code)) => assert_eq!(code, 1001, "close code on shutdown"),
        other => panic!("expected close 1001 on shutdown, got {other:?}"),
    }
    server.restart().await;
    server.login().await;

    for (i, kind) in ["listeners", "sentinels", "routes", "downstreams"]
        .iter()
        .enumerate()
    {
        let after = server.get_ok(&format!("/api/v1/{kind}")).await;
        assert_eq!(after, before[i], "{kind} changed across a restart");
    }
    let devices_after = server.get_ok("/api/v1/devices").await;
    assert_eq!(devices_after["total"], devices_before["total"]);
    assert_eq!(devices_after["items"][0]["deviceId"], "d1");
    server.wait_listener_state("devices", "running").await;
    server.wait_listener_state("guarded", "running").await;

    let items = server.telemetry("deviceId=d1").await;
    assert_eq!(items.len(), 1, "telemetry lost across a restart: {items:?}");
    assert_eq!(items[0]["payload"]["n"], 1);

    // Device keys and the listener's stored password still work.
    let mut dev = server.connect_device("/devices").await;
    send_json(&mut dev, &device_msg("d1", &key, json!({"n": 2}))).await;
    send_json(&mut dev, &device_msg("d1", &secondary, json!({"n": 3}))).await;
    let items = server.wait_telemetry("d1", 3).await;
    let ns: BTreeSet<i64> = items
        .iter()
        .map(|t| t["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, BTreeSet::from([1, 2, 3]));
    expect_silence(&mut dev, Duration::from_millis(200)).await;
    server
        .ws_connect("/guarded", &WsOptions::new().basic("gate", "gate-pass"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "listener password lost across a restart: {}",
                describe_ws_error(&e)
            )
        });
    expect_refused(
        server
            .ws_connect("/guarded", &WsOptions::new().basic("gate", "nope"))
            .await,
        401,
        "wrong password",
    );
    // The subscriber downstream is back too.
    let mut sub = server.subscribe("/stream/live").await;
    let mut r = route_def("all", &["store", "live"]);
    r["description"] = json!("now also live");
    server.update_ok("routes", &r).await;
    send_json(&mut dev, &device_msg("d1", &key, json!({"n": 4}))).await;
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0], json!({"deviceId": "d1", "n": 4}));
}

/// Reads a device connection until it ends: returns the text frames (error answers) and the close code.
async fn watch(mut rx: futures_util::stream::SplitStream<Ws>) -> (Vec<String>, Option<u16>) {
    let mut texts = Vec::new();
    let mut close = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(&mut rx, left).await {
            WsEvent::Text(t) => texts.push(t),
            WsEvent::Binary(_) => texts.push("<binary>".into()),
            WsEvent::Close(c) => close = c.or(Some(1005)),
            WsEvent::Ended | WsEvent::Error(_) | WsEvent::Timeout => return (texts, close),
        }
    }
}

async fn blast(
    tx: &mut futures_util::stream::SplitSink<Ws, Message>,
    device: &str,
    key: &str,
    n: usize,
) {
    for seq in 0..n {
        let m = device_msg(
            device,
            key,
            json!({"seq": seq, "temperature": 20.0 + (seq % 10) as f64}),
        );
        tx.feed(Message::Text(m.to_string().into()))
            .await
            .expect("send");
    }
    tx.flush().await.expect("flush");
}

fn seqs(items: &[Value]) -> Vec<u64> {
    let mut s: Vec<u64> = items
        .iter()
        .map(|t| t["payload"]["seq"].as_u64().expect("seq"))
        .collect();
    s.sort();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_no_accepted_message() {
    const N: usize = 1000;
    let mut server = TestServer::start().await;
    setup_store_pipeline(&server, 100).await;
    let (k1, _) = server.register_device("d1", "thermo").await;
    let (k2, _) = server.register_device("d2", "thermo").await;
    let (mut tx1, rx1) = server.connect_device("/devices").await.split();
    let (mut tx2, rx2) = server.connect_device("/devices").await.split();
    let reader1 = tokio::spawn(watch(rx1));
    let reader2 = tokio::spawn(watch(rx2));

    // Phase A: d1 sends N messages; wait until the listener has received them all.
    blast(&mut tx1, "d1", &k1, N).await;
    let s = &server;
    wait_until(
        "the listener to receive phase A",
        Duration::from_secs(60),
        || async move {
            s.listener_status("devices").await["messagesReceived"]
                .as_u64()
                .unwrap_or(0)
                >= N as u64
        },
    )
    .await;
    // Phase B: d2 sends N more and SIGTERM follows at once, while they are in flight.
    blast(&mut tx2, "d2", &k2, N).await;
    let received = server.listener_status("devices").await["messagesReceived"]
        .as_u64()
        .expect("messagesReceived");
    server.stop().await;

    let (texts1, close1) = tokio::time::timeout(Duration::from_secs(10), reader1)
        .await
        .expect("reader 1")
        .unwrap();
    let (texts2, close2) = tokio::time::timeout(Duration::from_secs(10), reader2)
        .await
        .expect("reader 2")
        .unwrap();
    assert!(
        texts1.is_empty(),
        "the idle connection was answered with errors: {texts1:?}"
    );
    assert_eq!(
        close1,
        Some(1001),
        "the idle device connection was not closed with 1001"
    );
    if let Some(c) = close2 {
        assert_eq!(c, 1001, "the busy device connection was closed with {c}");
    }
    // Messages answered with an error frame were rejected, not accepted; they may be missing.
    let rejected = texts2.len();

    server.restart().await;
    let d1 = server.telemetry(&format!("deviceId=d1&limit={N}")).await;
    assert_eq!(
        d1.len(),
        N,
        "phase A messages lost: have {} of {N}",
        d1.len()
    );
    assert_eq!(
        seqs(&d1),
        (0..N as u64).collect::<Vec<_>>(),
        "phase A stored with gaps or duplicates"
    );
    let d2 = server.telemetry(&format!("deviceId=d2&limit={N}")).await;
    let stored2 = seqs(&d2);
    let mut distinct = stored2.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), stored2.len(), "phase B stored twice");
    // Gap-free prefix, except for the rejected ones.
    let highest = stored2.last().map_or(0, |h| h + 1);
    let gaps = highest as usize - stored2.len();
    assert!(
        gaps <= rejected,
        "phase B has {gaps} gaps below seq {highest} but only {rejected} rejections: accepted messages were lost"
    );
    assert!(
        (N + stored2.len() + rejected) as u64 >= received,
        "the listener had received {received} messages before SIGTERM but only {} are stored ({rejected} rejected)",
        N + stored2.len()
    );
    // Shutdown must not turn in-flight messages into rejections.
    assert!(
        texts2.is_empty(),
        "{rejected} in-flight messages were answered with errors during shutdown (stored {} of phase B): {:?}",
        stored2.len(),
        &texts2[..texts2.len().min(3)]
    );
}
