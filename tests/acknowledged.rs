//! End-to-end tests of acknowledged delivery: listeners with `acknowledge`, message ids, acks
//! and refusals on the device's own connection, de-duplication of retries (also across a
//! restart), the in-flight limit, outages of the store and of a webhook, a crash in the middle of
//! a run, graceful shutdown and telemetry retention. The dead-letter cap is tested as an attack in
//! device_trust.rs.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An anonymous json listener at `path` behind sentinel `sen` with acknowledgement fields.
fn ack_listener(key: &str, path: &str, fields: Value) -> Value {
    let mut def = listener_def(key, path, "sen");
    for (k, v) in fields.as_object().unwrap() {
        def[k] = v.clone();
    }
    def
}

/// Sentinel `sen`, the store downstream `store` (extra fields merged), `listener`, and a route
/// from it to `downstreams`; waits until the listener runs.
async fn pipeline(
    server: &TestServer,
    store_fields: Value,
    listener: &Value,
    downstreams: &[&str],
) {
    let mut store = store_def("store");
    for (k, v) in store_fields.as_object().unwrap() {
        store[k] = v.clone();
    }
    server.create_ok("downstreams", &store).await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 1000))
        .await;
    server.create_ok("listeners", listener).await;
    let key = listener["key"].as_str().unwrap();
    server
        .create_ok(
            "routes",
            &json!({"key": format!("{key}-route"), "name": "r", "listeners": [key], "downstreams": downstreams}),
        )
        .await;
    server.wait_listener_state(key, "running").await;
}

/// The next JSON text frame (pings skipped), or a panic naming what was awaited.
async fn answer(ws: &mut Ws) -> Value {
    recv_json(ws, WAIT).await
}

fn msg(device: &str, key: &str, id: Value, extra: Value) -> Value {
    let mut m = device_msg(device, key, extra);
    m["messageId"] = id;
    m
}

/// Rows of the telemetry table read straight from the database file: (device, message id).
async fn stored_rows(server: &TestServer) -> Vec<(Option<String>, Option<String>)> {
    let mut conn = server.database_connection().await;
    let rows = conn
        .text_pairs("SELECT device_id, message_id FROM telemetry")
        .await;
    conn.close().await;
    rows
}

async fn count_rows(server: &TestServer, table: &str) -> i64 {
    let mut conn = server.database_connection().await;
    let [count] = conn
        .integers(&format!("SELECT COUNT(*) FROM {table}"))
        .await;
    conn.close().await;
    count
}

// ---------------------------------------------------------------------------------------------
// Definitions
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgement_fields_are_validated_with_pointers() {
    let server = TestServer::start().await;
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;

    let bad = ack_listener(
        "acks",
        "/acks",
        json!({"acknowledge": "sometimes", "maxInFlight": 0, "messageId": {"from": "body"}}),
    );
    let body = expect_error(
        server.create("listeners", &bad).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(
        detail_pointers(&body),
        ["/acknowledge", "/maxInFlight", "/messageId/pointer"],
        "{body}"
    );

    let loose = ack_listener(
        "acks",
        "/acks",
        json!({"maxInFlight": 8, "dedupWindowSeconds": 5}),
    );
    let body = expect_error(
        server.create("listeners", &loose).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(
        detail_pointers(&body),
        ["/dedupWindowSeconds", "/maxInFlight"],
        "{body}"
    );

    let mut text = ack_listener(
        "acks",
        "/acks",
        json!({"acknowledge": "stored", "messageId": {"from": "body", "pointer": "/id"}}),
    );
    text["contentType"] = json!("text");
    let body = expect_error(
        server.create("listeners", &text).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&body), ["/messageId/from"], "{body}");

    let good = ack_listener(
        "acks",
        "/acks",
        json!({"acknowledge": "stored", "messageId": {"from": "body", "pointer": "/header/id"},
               "maxInFlight": 32, "dedupWindowSeconds": 60}),
    );
    let created = server.create_ok("listeners", &good).await;
    assert_eq!(created["acknowledge"], "stored");
    let fetched = server.get_ok("/api/v1/listeners/acks").await;
    assert_eq!(
        fetched["messageId"],
        json!({"from": "body", "pointer": "/header/id"})
    );
    assert_eq!(fetched["maxInFlight"], 32);

    let store =
        json!({"key": "store", "name": "s", "type": "store", "retentionHours": 0, "maxRows": 10});
    let body = expect_error(
        server.create("downstreams", &store).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(
        detail_pointers(&body),
        ["/maxRows", "/retentionHours"],
        "{body}"
    );
}

// ---------------------------------------------------------------------------------------------
// Acks and refusals
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_acks_refusals_and_duplicates_on_a_json_listener() {
    let server = TestServer::start().await;
    let listener = ack_listener("acks", "/acks", json!({"acknowledge": "stored"}));
    pipeline(&server, json!({}), &listener, &["store"]).await;
    let (key, _) = server.register_device("d1", "meter").await;
    let mut ws = server.connect_device("/acks").await;

    for i in 0..10 {
        send_json(
            &mut ws,
            &msg("d1", &key, json!(format!("m-{i}")), json!({"kwh": i})),
        )
        .await;
    }
    let mut acked = BTreeSet::new();
    for _ in 0..10 {
        let frame = answer(&mut ws).await;
        assert_eq!(frame["ack"]["status"], "stored", "{frame}");
        assert!(frame["ack"].get("duplicate").is_none(), "{frame}");
        acked.insert(frame["ack"]["messageId"].as_str().unwrap().to_owned());
    }
    assert_eq!(acked.len(), 10);

    // An integer id comes back as the same integer.
    send_json(&mut ws, &msg("d1", &key, json!(17), json!({}))).await;
    assert_eq!(
        answer(&mut ws).await,
        json!({"ack": {"messageId": 17, "status": "stored"}})
    );

    // No id: refused, not routed. A bad id: refused.
    send_json(&mut ws, &device_msg("d1", &key, json!({"kwh": 1}))).await;
    let frame = answer(&mut ws).await;
    assert_eq!(frame["error"]["code"], "missing_message_id", "{frame}");
    assert!(frame["error"].get("messageId").is_none());
    send_json(&mut ws, &msg("d1", &key, json!([1]), json!({}))).await;
    assert_eq!(answer(&mut ws).await["error"]["code"], "invalid_message_id");
    send_json(&mut ws, &msg("d1", &key, json!("x".repeat(129)), json!({}))).await;
    assert_eq!(answer(&mut ws).await["error"]["code"], "invalid_message_id");

    // A wrong key: the refusal names the message.
    send_json(&mut ws, &msg("d1", "not-the-key", json!("m-99"), json!({}))).await;
    let frame = answer(&mut ws).await;
    assert_eq!(frame["error"]["code"], "invalid_key", "{frame}");
    assert_eq!(frame["error"]["messageId"], "m-99");

    // A retry of an acknowledged message: acknowledged again, not stored again.
    send_json(&mut ws, &msg("d1", &key, json!("m-3"), json!({"kwh": 3}))).await;
    assert_eq!(
        answer(&mut ws).await,
        json!({"ack": {"messageId": "m-3", "status": "stored", "duplicate": true}})
    );

    let items = server.wait_telemetry("d1", 11).await;
    assert_eq!(items.len(), 11, "{items:?}");
    let ids: HashSet<&str> = items
        .iter()
        .filter_map(|i| i["messageId"].as_str())
        .collect();
    assert!(ids.contains("m-3") && ids.contains("17"), "{ids:?}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "iotgate_acks_total",
            &[("listener", "acks"), ("status", "stored")]
        ),
        Some(12.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "iotgate_duplicates_total",
            &[("listener", "acks")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "iotgate_refusals_total",
            &[("code", "invalid_message_id")]
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_mode_and_routes_without_durable_downstreams() {
    let server = TestServer::start().await;
    let listener = ack_listener("acc", "/acc", json!({"acknowledge": "accepted"}));
    pipeline(&server, json!({}), &listener, &["store"]).await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("live", "/live", "payload"),
        )
        .await;
    server
        .create_ok(
            "listeners",
            &ack_listener("viewers", "/viewers", json!({"acknowledge": "stored"})),
        )
        .await;
    server
        .create_ok(
            "routes",
            &json!({"key": "to-live", "name": "l", "listeners": ["viewers"], "downstreams": ["live"]}),
        )
        .await;
    server.wait_listener_state("viewers", "running").await;
    let (key, _) = server.register_device("d1", "meter").await;

    let mut ws = server.connect_device("/acc").await;
    send_json(&mut ws, &msg("d1", &key, json!("a-1"), json!({}))).await;
    assert_eq!(
        answer(&mut ws).await,
        json!({"ack": {"messageId": "a-1", "status": "accepted"}})
    );
    server.wait_telemetry("d1", 1).await;

    // `stored` with nothing durable routed: the ack says what really happened.
    let mut viewer = server.connect_device("/viewers").await;
    send_json(&mut viewer, &msg("d1", &key, json!("v-1"), json!({}))).await;
    assert_eq!(
        answer(&mut viewer).await,
        json!({"ack": {"messageId": "v-1", "status": "accepted"}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_binary_frames_are_numbered_and_acknowledged_cumulatively() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok(
            "sentinels",
            &json!({"key": "sen", "name": "q", "method": "accessKey",
                    "deviceId": {"from": "query", "name": "deviceId"},
                    "accessKey": {"from": "query", "name": "accessKey"}}),
        )
        .await;
    for (key, content_type, mode) in [("texts", "text", "stored"), ("blobs", "binary", "accepted")]
    {
        let mut def = ack_listener(key, &format!("/{key}"), json!({"acknowledge": mode}));
        def["contentType"] = json!(content_type);
        server.create_ok("listeners", &def).await;
        server.wait_listener_state(key, "running").await;
    }
    server
        .create_ok("routes", &route_def("all", &["store"]))
        .await;
    let (key, _) = server.register_device("d1", "meter").await;
    let query = format!("deviceId=d1&accessKey={}", url_encode(&key));

    let mut text = server.connect_device(&format!("/texts?{query}")).await;
    for i in 1..=20 {
        send_text(&mut text, &format!("reading {i}")).await;
    }
    let mut last = 0;
    while last < 20 {
        let frame = answer(&mut text).await;
        assert_eq!(frame["ack"]["status"], "stored", "{frame}");
        let n = frame["ack"]["messageId"].as_u64().expect("a frame number");
        assert!(n > last && n <= 20, "acks go forward: {n} after {last}");
        last = n;
    }
    assert_eq!(server.wait_telemetry("d1", 20).await.len(), 20);

    let mut blobs = server.connect_device(&format!("/blobs?{query}")).await;
    for i in 0..5u8 {
        blobs
            .send(Message::Binary(vec![i; 8].into()))
            .await
            .unwrap();
    }
    let mut last = 0;
    while last < 5 {
        let frame = answer(&mut blobs).await;
        assert_eq!(frame["ack"]["status"], "accepted", "{frame}");
        last = frame["ack"]["messageId"].as_u64().unwrap();
    }
    assert_eq!(last, 5);
}

// ---------------------------------------------------------------------------------------------
// De-duplication
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_recognised_across_a_restart_and_the_window_ends() {
    let mut server = TestServer::start().await;
    let listener = ack_listener("acks", "/acks", json!({"acknowledge": "stored"}));
    pipeline(&server, json!({}), &listener, &["store"]).await;
    let (key, _) = server.register_device("d1", "meter").await;
    let mut ws = server.connect_device("/acks").await;
    send_json(&mut ws, &msg("d1", &key, json!("m-1"), json!({"v": 1}))).await;
    assert_eq!(answer(&mut ws).await["ack"]["status"], "stored");
    drop(ws);

    server.stop().await;
    server.restart().await;
    server.wait_listener_state("acks", "running").await;
    let mut ws = server.connect_device("/acks").await;
    send_json(&mut ws, &msg("d1", &key, json!("m-1"), json!({"v": 1}))).await;
    assert_eq!(
        answer(&mut ws).await,
        json!({"ack": {"messageId": "m-1", "status": "stored", "duplicate": true}}),
        "the store's index outlives the process"
    );
    assert_eq!(stored_rows(&server).await.len(), 1);
    drop(ws);

    // With a one-second window, the same id a little later is a new message.
    let mut short = listener.clone();
    short["dedupWindowSeconds"] = json!(1);
    server.update_ok("listeners", &short).await;
    server.wait_listener_state("acks", "running").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let mut ws = server.connect_device("/acks").await;
    send_json(&mut ws, &msg("d1", &key, json!("m-1"), json!({"v": 2}))).await;
    assert_eq!(
        answer(&mut ws).await,
        json!({"ack": {"messageId": "m-1", "status": "stored"}})
    );
    assert_eq!(stored_rows(&server).await.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Outages and the in-flight limit
// ---------------------------------------------------------------------------------------------

/// Holds the database's write lock from outside the server for `hold` (SQLite: the database's;
/// PostgreSQL: the telemetry table's, which the server waits for at most its 5 s lock timeout).
async fn lock_database(server: &TestServer, hold: Duration) -> tokio::task::JoinHandle<()> {
    let mut conn = server.database_connection().await;
    if conn.is_postgres() {
        conn.execute("BEGIN", &[]).await;
        conn.execute("LOCK TABLE telemetry IN EXCLUSIVE MODE", &[])
            .await;
    } else {
        conn.execute("BEGIN EXCLUSIVE", &[]).await;
    }
    tokio::spawn(async move {
        tokio::time::sleep(hold).await;
        conn.execute("COMMIT", &[]).await;
        conn.close().await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_store_stops_reading_refuses_with_a_retry_hint_and_stores_retries_once() {
    let server = TestServer::start().await;
    let listener = ack_listener(
        "acks",
        "/acks",
        json!({"acknowledge": "stored", "maxInFlight": 4}),
    );
    pipeline(&server, json!({"timeoutMs": 1000}), &listener, &["store"]).await;
    let (key, _) = server.register_device("d1", "meter").await;
    let mut ws = server.connect_device("/acks").await;

    // The store cannot commit for longer than SQLite's busy timeout (5 s).
    let unlock = lock_database(&server, Duration::from_millis(7_000)).await;
    let total = 30;
    for i in 0..total {
        send_json(
            &mut ws,
            &msg("d1", &key, json!(format!("o-{i}")), json!({"i": i})),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = metric_value(
        &server.metrics().await,
        "iotgate_messages_received_total",
        &[("listener", "acks")],
    )
    .unwrap_or(0.0);
    assert_eq!(
        received, 4.0,
        "the listener reads no further than maxInFlight"
    );

    // Answer everything; resend what is refused after the hint.
    let mut acked = HashSet::new();
    let mut refusals = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < total {
        assert!(
            Instant::now() < deadline,
            "acked {} of {total}",
            acked.len()
        );
        let frame = answer(&mut ws).await;
        if let Some(ack) = frame.get("ack") {
            acked.insert(ack["messageId"].as_str().unwrap().to_owned());
            continue;
        }
        let error = &frame["error"];
        assert_eq!(error["code"], "downstream_unavailable", "{frame}");
        let wait = error["retryAfterMs"].as_u64().expect("a retry hint");
        assert!(wait > 0);
        refusals += 1;
        let id = error["messageId"].clone();
        tokio::time::sleep(Duration::from_millis(wait.min(2000))).await;
        let i: usize = id.as_str().unwrap()[2..].parse().unwrap();
        send_json(&mut ws, &msg("d1", &key, id, json!({"i": i}))).await;
    }
    unlock.await.unwrap();
    assert!(
        refusals >= 4,
        "the first four waited past timeoutMs: {refusals} refusals"
    );
    let rows = stored_rows(&server).await;
    let ids: HashSet<_> = rows.iter().filter_map(|(_, id)| id.clone()).collect();
    assert_eq!(rows.len(), total, "each message stored once");
    assert_eq!(ids.len(), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_refuses_then_takes_each_retry_once() {
    let failures = 5;
    let hook = start_hook_with(Arc::new(move |n| {
        (if n < failures { 503 } else { 200 }, Duration::ZERO)
    }))
    .await;
    let server = TestServer::start().await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "hook", "name": "h", "type": "webhook", "url": hook.url,
                    "maxRetries": 0, "timeoutMs": 1000}),
        )
        .await;
    let listener = ack_listener("acks", "/acks", json!({"acknowledge": "stored"}));
    pipeline(&server, json!({}), &listener, &["hook"]).await;
    let (key, _) = server.register_device("d1", "meter").await;
    let mut ws = server.connect_device("/acks").await;
    let total = 10;
    for i in 0..total {
        send_json(
            &mut ws,
            &msg("d1", &key, json!(format!("w-{i}")), json!({})),
        )
        .await;
    }
    let mut acked = HashSet::new();
    let mut refused = 0;
    while acked.len() < total {
        let frame = answer(&mut ws).await;
        if let Some(ack) = frame.get("ack") {
            assert_eq!(ack["status"], "stored");
            acked.insert(ack["messageId"].as_str().unwrap().to_owned());
        } else {
            assert_eq!(frame["error"]["code"], "downstream_unavailable", "{frame}");
            assert!(frame["error"]["retryAfterMs"].as_u64().unwrap() >= 1000);
            refused += 1;
            let id = frame["error"]["messageId"].clone();
            send_json(&mut ws, &msg("d1", &key, id, json!({}))).await;
        }
    }
    assert_eq!(refused, failures);
    let accepted = hook.accepted.lock().unwrap().clone();
    let keys: Vec<String> = accepted
        .iter()
        .map(|r| r.header("idempotency-key").expect("an idempotency key"))
        .collect();
    let distinct: HashSet<&String> = keys.iter().collect();
    assert_eq!(keys.len(), total, "each message delivered once: {keys:?}");
    assert_eq!(distinct.len(), total);
    assert!(keys.iter().all(|k| k.starts_with("d1/w-")), "{keys:?}");
    assert!(
        server.deadletters().await.is_empty(),
        "refused messages are the device's to retry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_every_message_in_flight_before_1001() {
    let hook = start_slow_hook(Duration::from_millis(800)).await;
    let mut server = TestServer::start().await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "hook", "name": "h", "type": "webhook", "url": hook.url, "timeoutMs": 5000}),
        )
        .await;
    let listener = ack_listener("acks", "/acks", json!({"acknowledge": "stored"}));
    pipeline(&server, json!({}), &listener, &["hook"]).await;
    let (key, _) = server.register_device("d1", "meter").await;
    let mut ws = server.connect_device("/acks").await;
    for i in 0..5 {
        send_json(
            &mut ws,
            &msg("d1", &key, json!(format!("g-{i}")), json!({})),
        )
        .await;
    }
    // Let the listener read them (on shutdown it answers what it read and reads no more); the
    // webhook holds each for 800 ms.
    wait_until("the five messages read", WAIT, || async {
        server.listener_status("acks").await["messagesReceived"] == 5
    })
    .await;
    let stopping = {
        let pid = server.pid();
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
    };
    assert!(stopping.success());
    let mut acked = BTreeSet::new();
    let close = loop {
        match next_event(&mut ws, WAIT).await {
            WsEvent::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(frame["ack"]["status"], "stored", "{frame}");
                acked.insert(frame["ack"]["messageId"].as_str().unwrap().to_owned());
            }
            WsEvent::Close(code) => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(acked.len(), 5, "{acked:?}");
    assert_eq!(close, Some(1001));
    assert_eq!(hook.accepted.lock().unwrap().len(), 5);
    let child = server.child.take().unwrap();
    let status = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// A crash in the middle of a run
// ---------------------------------------------------------------------------------------------

/// One device of the crash test: what it sent and what it heard acknowledged.
#[derive(Default)]
struct DeviceLedger {
    sent: BTreeSet<String>,
    acked: BTreeSet<String>,
}

/// Sends `prefix-0, prefix-1, ...` (and first `resend`) with up to `window` unanswered, until
/// the connection breaks or, with `until_all_acked`, until everything sent is acknowledged.
async fn run_device(
    url: String,
    device: String,
    key: String,
    resend: Vec<String>,
    window: usize,
    stop_sending_after: Option<Duration>,
    mut ledger: DeviceLedger,
) -> DeviceLedger {
    let Ok((ws, _)) = ws_connect_url(&url, &WsOptions::new()).await else {
        return ledger;
    };
    let (mut sink, mut stream) = ws.split();
    let started = Instant::now();
    let mut queue: std::collections::VecDeque<String> = resend.into();
    let mut next = ledger.sent.len();
    let mut in_flight = HashSet::new();
    let mut retry_at: Vec<(Instant, String)> = Vec::new();
    loop {
        let sending = stop_sending_after.is_none_or(|limit| started.elapsed() < limit);
        let now = Instant::now();
        retry_at.retain(|(at, id)| {
            if *at <= now {
                queue.push_back(id.clone());
                false
            } else {
                true
            }
        });
        while in_flight.len() < window {
            let id = match queue.pop_front() {
                Some(id) => id,
                None if sending => {
                    let id = format!("{device}-{next}");
                    next += 1;
                    id
                }
                None => break,
            };
            let body = json!({"deviceId": device, "accessKey": key, "messageId": id, "seq": next});
            if sink
                .send(Message::Text(body.to_string().into()))
                .await
                .is_err()
            {
                return ledger;
            }
            ledger.sent.insert(id.clone());
            in_flight.insert(id);
        }
        if !sending && in_flight.is_empty() && queue.is_empty() && retry_at.is_empty() {
            return ledger;
        }
        let frame = match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
            Err(_) => continue,
            Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str::<Value>(&text).unwrap(),
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return ledger,
        };
        if let Some(ack) = frame.get("ack") {
            let id = ack["messageId"].as_str().unwrap().to_owned();
            in_flight.remove(&id);
            ledger.acked.insert(id);
        } else if let Some(error) = frame.get("error") {
            let id = error["messageId"]
                .as_str()
                .expect("refusals name the message")
                .to_owned();
            in_flight.remove(&id);
            let wait = error["retryAfterMs"].as_u64().unwrap_or(500);
            retry_at.push((Instant::now() + Duration::from_millis(wait), id));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_run_loses_nothing_acknowledged_and_retries_store_no_duplicates() {
    let mut server = TestServer::start_with_extra(
        ServerOptions::new()
            .arg("--max-connections-per-ip")
            .arg("0")
            .arg("--connect-rate-per-ip")
            .arg("0"),
    )
    .await;
    let listener = ack_listener(
        "acks",
        "/acks",
        json!({"acknowledge": "stored", "maxInFlight": 64}),
    );
    pipeline(&server, json!({}), &listener, &["store"]).await;
    let devices = 100;
    let mut keys = Vec::new();
    for i in 0..devices {
        keys.push(server.register_device(&format!("c{i}"), "meter").await.0);
    }

    // Phase 1: every device sends with 16 in flight until the server dies under it.
    let url = server.ws_url("/acks");
    let tasks: Vec<_> = (0..devices)
        .map(|i| {
            tokio::spawn(run_device(
                url.clone(),
                format!("c{i}"),
                keys[i].clone(),
                Vec::new(),
                16,
                None,
                DeviceLedger::default(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.kill_hard();
    let mut ledgers = Vec::new();
    for task in tasks {
        ledgers.push(task.await.unwrap());
    }
    let sent: usize = ledgers.iter().map(|l| l.sent.len()).sum();
    let acked_before: usize = ledgers.iter().map(|l| l.acked.len()).sum();
    assert!(
        acked_before > 1000,
        "the run acknowledged only {acked_before} messages"
    );

    // Everything acknowledged before the crash is in the database.
    let rows = stored_rows(&server).await;
    let stored: HashSet<(String, String)> = rows
        .iter()
        .map(|(d, m)| (d.clone().unwrap(), m.clone().unwrap()))
        .collect();
    for (i, ledger) in ledgers.iter().enumerate() {
        for id in &ledger.acked {
            assert!(
                stored.contains(&(format!("c{i}"), id.clone())),
                "{id} was acknowledged but is not stored"
            );
        }
    }
    let stored_unacked = stored.len() - acked_before;

    // Phase 2: restart on the same data; every device resends what it never heard acknowledged.
    server.restart().await;
    server.wait_listener_state("acks", "running").await;
    let url = server.ws_url("/acks");
    let tasks: Vec<_> = ledgers
        .into_iter()
        .enumerate()
        .map(|(i, ledger)| {
            let resend: Vec<String> = ledger.sent.difference(&ledger.acked).cloned().collect();
            tokio::spawn(run_device(
                url.clone(),
                format!("c{i}"),
                keys[i].clone(),
                resend,
                16,
                Some(Duration::ZERO),
                ledger,
            ))
        })
        .collect();
    let mut all_sent = 0;
    let mut all_acked = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let ledger = task.await.unwrap();
        assert_eq!(
            ledger.sent, ledger.acked,
            "device c{i} got every message acknowledged"
        );
        all_sent += ledger.sent.len();
        all_acked += ledger.acked.len();
    }
    assert_eq!(all_sent, sent, "phase 2 sent nothing new");

    let rows = stored_rows(&server).await;
    let distinct: HashSet<_> = rows.iter().collect();
    println!(
        "crash test: {sent} sent, {acked_before} acknowledged before SIGKILL, {stored_unacked} stored but not acknowledged, {} rows after the retries, {} duplicates",
        rows.len(),
        rows.len() - distinct.len()
    );
    assert_eq!(rows.len(), distinct.len(), "no duplicate rows");
    assert_eq!(rows.len(), all_acked, "every message stored exactly once");
    let metrics = server.metrics().await;
    let duplicates = metric_value(
        &metrics,
        "iotgate_duplicates_total",
        &[("listener", "acks")],
    )
    .unwrap_or(0.0);
    assert_eq!(
        duplicates as usize, stored_unacked,
        "what was stored but not acknowledged came back as duplicates"
    );
}

// ---------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_rows_by_count_and_by_age() {
    let server = TestServer::start().await;
    let listener = ack_listener(
        "acks",
        "/acks",
        json!({"acknowledge": "stored", "maxInFlight": 256}),
    );
    pipeline(&server, json!({"maxRows": 1000}), &listener, &["store"]).await;
    let (key, _) = server.register_device("d1", "meter").await;
    let mut ws = server.connect_device("/acks").await;
    let total = 1300;
    let (mut sink, mut stream) = (&mut ws).split();
    let sender = async {
        for i in 0..total {
            let body = msg("d1", &key, json!(i), json!({"i": i}));
            sink.send(Message::Text(body.to_string().into()))
                .await
                .unwrap();
        }
    };
    let receiver = async {
        let mut acks = 0;
        while acks < total {
            match stream.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    assert!(frame.get("ack").is_some(), "{frame}");
                    acks += 1;
                }
                Some(Ok(_)) => {}
                other => panic!("connection ended: {other:?}"),
            }
        }
    };
    tokio::join!(sender, receiver);
    wait_until(
        "retention to cut the table to 1000 rows",
        Duration::from_secs(30),
        || async { count_rows(&server, "telemetry").await <= 1000 },
    )
    .await;
    let rows = stored_rows(&server).await;
    assert_eq!(rows.len(), 1000);
    let oldest_kept = rows
        .iter()
        .filter_map(|(_, id)| id.as_deref()?.parse::<u64>().ok())
        .min()
        .unwrap();
    assert!(
        oldest_kept >= 300,
        "the oldest rows went first (oldest kept: {oldest_kept})"
    );

    // Rows older than retentionHours go when a store with that setting starts.
    let mut conn = server.database_connection().await;
    for i in 0..50 {
        conn.execute("INSERT INTO telemetry (id, listener_key, device_id, device_type, connection_id, source_address, received_at, content_type, payload, metadata, downstream_key) VALUES ($1, 'old', 'd1', 'meter', 1, NULL, $2, 'json', '{}', '{}', 'archive')",
            &[&format!("old-{i}"), &format!("2020-01-01T00:00:{i:02}.000000Z")])
            .await;
    }
    conn.close().await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "archive", "name": "a", "type": "store", "retentionHours": 24}),
        )
        .await;
    wait_until("retention by age", Duration::from_secs(20), || async {
        let rows = stored_rows(&server).await;
        rows.len() == 1000
    })
    .await;
}
