//! PostgreSQL as the database: chosen by URL, migrated at start, telemetry in `jsonb`, pages and
//! exports, the shared server secret, and a database that goes away while iotgate runs.
//!
//! Every test makes its own database on the machine's PostgreSQL (see `common::postgres`) and
//! fails, never skips, when PostgreSQL is not running. The rest of the suite runs on PostgreSQL
//! with `IOTGATE_TEST_ENGINE=postgres`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::postgres::{TcpProxy, TestDatabase};
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn start_on(database: &TestDatabase) -> TestServer {
    TestServer::start_with_extra(ServerOptions::new().env("IOTGATE_DATABASE_URL", &database.url))
        .await
}

/// `iotgate` with the given arguments, without any IOTGATE_ variable of the test's environment;
/// returns (exit status code, stderr) once it ends (at most 60 s).
async fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_iotgate"));
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IOTGATE_") {
            command.env_remove(name);
        }
    }
    command
        .env("IOTGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("iotgate ended within 60 s")
        .expect("run iotgate");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The stderr lines the binary wrote itself (not log lines): `iotgate: ...`.
fn own_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|line| line.starts_with("iotgate: "))
        .collect()
}

#[tokio::test]
async fn an_unreachable_database_is_one_line_naming_the_host_and_a_failure_status() {
    let data = tempfile::tempdir().unwrap();
    // Nothing listens on port 1; the password must not be echoed.
    let (code, stderr) = run_to_exit(&[
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
        data.path().to_str().unwrap(),
        "--database-url",
        "postgres://iotgate:s3cret-pw@127.0.0.1:1/fleet",
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    let lines = own_lines(&stderr);
    assert_eq!(lines.len(), 1, "one line of its own: {stderr}");
    assert!(
        lines[0].contains("cannot connect to the PostgreSQL database `fleet` at 127.0.0.1:1"),
        "{}",
        lines[0]
    );
    assert!(
        !stderr.contains("s3cret-pw"),
        "the password is echoed: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_stores_jsonb_telemetry_and_pages_it_newest_first() {
    let database = TestDatabase::create().await;
    let mut server = start_on(&database).await;
    setup_store_pipeline(&server, 5).await;
    let (key, _) = server.register_device("pg-thermo", "thermo").await;
    let (other_key, _) = server.register_device("pg-other", "thermo").await;

    let mut ws = server.connect_device("/devices").await;
    for n in 0..25 {
        send_json(
            &mut ws,
            &device_msg("pg-thermo", &key, json!({"n": n, "t": 20.5})),
        )
        .await;
    }
    let mut other = server.connect_device("/devices").await;
    for n in 0..5 {
        send_json(
            &mut other,
            &device_msg("pg-other", &other_key, json!({"n": n})),
        )
        .await;
    }
    server.wait_telemetry("pg-thermo", 25).await;
    server.wait_telemetry("pg-other", 5).await;

    // Stored in PostgreSQL as jsonb, credentials not among them.
    let types = database
        .query_text(
            "SELECT column_name || ':' || data_type FROM information_schema.columns \
             WHERE table_name = 'telemetry' AND column_name IN ('payload', 'metadata') ORDER BY 1",
        )
        .await;
    assert_eq!(types, ["metadata:jsonb", "payload:jsonb"]);
    let counts = database
        .query_text("SELECT COUNT(*)::text FROM telemetry WHERE (payload->>'n') IS NOT NULL")
        .await;
    assert_eq!(counts, ["30"]);

    // Pages of 10 for one device: newest first, no row twice, none missing, and messages stored
    // while paging do not shift the pages.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut query = String::from("deviceId=pg-thermo&limit=10");
        if let Some(cursor) = &cursor {
            query.push_str(&format!("&cursor={}", url_encode(cursor)));
        }
        let page = server.get_ok(&format!("/api/v1/telemetry?{query}")).await;
        pages += 1;
        let items = page["items"].as_array().unwrap().clone();
        seen.extend(
            items
                .iter()
                .map(|item| item["payload"]["n"].as_i64().unwrap()),
        );
        if pages == 1 {
            // Newer messages arrive after the first page.
            send_json(&mut ws, &device_msg("pg-thermo", &key, json!({"n": 100}))).await;
            server.wait_telemetry("pg-thermo", 26).await;
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (0..25).rev().collect::<Vec<i64>>());

    // A time range: `to` before everything is empty; `from` far back keeps all.
    assert!(server
        .telemetry("deviceId=pg-thermo&to=2000-01-01T00:00:00Z")
        .await
        .is_empty());
    assert_eq!(
        server
            .telemetry("deviceId=pg-other&from=2000-01-01T00:00:00%2B02:00")
            .await
            .len(),
        5
    );
    let bad = server.get("/api/v1/telemetry?from=yesterday").await;
    expect_error(bad, 400, "bad_request").await;
    // An empty bound is not "no bound": it is refused, naming the parameter.
    for query in ["to=", "from="] {
        let bad = server.get(&format!("/api/v1/telemetry?{query}")).await;
        let body = expect_error(bad, 400, "bad_request").await;
        let name = query.trim_end_matches('=');
        assert!(
            body.to_string()
                .contains(&format!("{name} is not an RFC 3339 time")),
            "{body}"
        );
    }
    let bad = server.get("/api/v1/telemetry?cursor=not-a-cursor").await;
    expect_error(bad, 400, "bad_request").await;

    // The export streams every row: NDJSON as the page items, CSV with a header.
    let ndjson = server
        .api(
            reqwest::Method::GET,
            "/api/v1/telemetry/export?deviceId=pg-thermo",
        )
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(ndjson.status(), StatusCode::OK);
    assert_eq!(
        ndjson.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let text = ndjson.text().await.unwrap();
    let items: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(items.len(), 26);
    assert_eq!(items[0]["payload"]["n"], 100);
    assert_eq!(items[25]["payload"]["n"], 0);
    let csv = server
        .api(
            reqwest::Method::GET,
            "/api/v1/telemetry/export?deviceId=pg-other&format=csv",
        )
        .await
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 6, "{csv}");
    assert!(
        lines[0].starts_with("id,receivedAt,listenerKey,deviceId"),
        "{csv}"
    );
    assert!(lines[1].contains(",pg-other,"), "{csv}");
    assert!(
        lines[1].contains(r#","{""n"": 4, ""deviceId"": ""pg-other""}","#),
        "the payload is one quoted field: {csv}"
    );

    // Everything is still there after a restart on the same database.
    drop(ws);
    drop(other);
    server.stop().await;
    server.restart().await;
    assert_eq!(
        server
            .telemetry("deviceId=pg-thermo&limit=1000")
            .await
            .len(),
        26
    );
    let device = server.get_ok("/api/v1/devices/pg-thermo").await;
    assert_eq!(device["deviceType"], "thermo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_database_must_share_the_server_secret() {
    let database = TestDatabase::create().await;
    let first = start_on(&database).await;
    first.register_device("shared-device", "thermo").await;
    let secret = first.data_dir.join("server.secret");

    // A second node with a secret of its own is refused, with why.
    let other = tempfile::tempdir().unwrap();
    let other_secret = other.path().join("other.secret");
    std::fs::write(&other_secret, [9u8; 32]).unwrap();
    let (code, stderr) = run_to_exit(&[
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
        other.path().to_str().unwrap(),
        "--database-url",
        &database.url,
        "--secret-file",
        other_secret.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    let lines = own_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("does not match the secret this database was set up with"),
        "{}",
        lines[0]
    );

    // Without any secret file, it does not invent one for a database that has one.
    let empty = tempfile::tempdir().unwrap();
    let (code, stderr) = run_to_exit(&[
        "--bind",
        "127.0.0.1:0",
        "--data-dir",
        empty.path().to_str().unwrap(),
        "--database-url",
        &database.url,
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("there is no server secret at"), "{stderr}");
    assert!(!empty.path().join("server.secret").exists());

    // With a copy of the first node's secret (by environment variable), it starts, serves the
    // same registry and accepts the device's key.
    let second = TestServer::start_with_extra(
        ServerOptions::new()
            .env("IOTGATE_DATABASE_URL", &database.url)
            .env("IOTGATE_SECRET_FILE", secret.to_str().unwrap()),
    )
    .await;
    let device = second.get_ok("/api/v1/devices/shared-device").await;
    assert_eq!(device["deviceType"], "thermo");
    // The database holds a check value, never the secret.
    let stored = database
        .query_text("SELECT value FROM server_settings WHERE name = 'secret_check'")
        .await;
    assert_eq!(stored.len(), 1);
    let secret_hex: String = std::fs::read(&secret)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_ne!(stored[0], secret_hex);
    assert!(!stored[0].contains(&secret_hex[..16]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_reported_retried_and_recovered() {
    let database = TestDatabase::create().await;
    // iotgate reaches PostgreSQL through a relay whose plug the test pulls.
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let server = TestServer::start_with_extra(
        ServerOptions::new().env("IOTGATE_DATABASE_URL", proxy.url_of(&database)),
    )
    .await;
    setup_store_pipeline(&server, 5).await;
    // A device that waits for its messages to be stored, and a store that gives up after 1 s.
    let mut durable = store_def("durable");
    durable["timeoutMs"] = json!(1000);
    server.create_ok("downstreams", &durable).await;
    let mut acks = listener_def("acks", "/acks", "sen");
    acks["acknowledge"] = json!("stored");
    server.create_ok("listeners", &acks).await;
    server
        .create_ok(
            "routes",
            &json!({"key": "acked", "name": "acked", "listeners": ["acks"], "downstreams": ["durable"]}),
        )
        .await;
    server.wait_listener_state("acks", "running").await;
    let (key, _) = server.register_device("before-outage", "thermo").await;
    let health = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // The database host goes away: connections reset, new ones refused.
    proxy.cut();
    let s = &server;
    let down = wait_for("/healthz 503", WAIT, || async move {
        let response = s.http.get(s.url("/healthz")).send().await.ok()?;
        (response.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())?;
        response.json::<Value>().await.ok()
    })
    .await;
    assert_eq!(down["status"], "unavailable", "{down}");
    let reason = down["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("the PostgreSQL database is unreachable: "),
        "{reason}"
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, "iotgate_database_up", &[]),
        Some(0.0)
    );
    // The API refuses what needs the database with a clear, retryable answer.
    let refused = server.get("/api/v1/devices/before-outage").await;
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some("2".to_owned()),
        "{:?}",
        refused.headers()
    );
    expect_error(refused, 503, "database_unavailable").await;
    // Devices keep being accepted (the registry is in memory); their telemetry waits in the
    // store module's retried batch.
    let mut ws = server.connect_device("/devices").await;
    send_json(
        &mut ws,
        &device_msg("before-outage", &key, json!({"during": "outage"})),
    )
    .await;
    // Durable work is refused clearly while the database is away: the waiting device hears
    // downstream_unavailable with a retry hint instead of an acknowledgement.
    let mut acked = server.connect_device("/acks").await;
    let mut waiting = device_msg("before-outage", &key, json!({"acked": 1}));
    waiting["messageId"] = json!("m-1");
    send_json(&mut acked, &waiting).await;
    let refusal = recv_json(&mut acked, WAIT).await;
    assert_eq!(
        refusal["error"]["code"], "downstream_unavailable",
        "{refusal}"
    );

    // Back: recovered without a restart, and the message sent during the outage is stored.
    proxy.restore().await;
    wait_for(
        "/healthz 200 again",
        Duration::from_secs(30),
        || async move {
            let response = s.http.get(s.url("/healthz")).send().await.ok()?;
            (response.status() == StatusCode::OK).then_some(())
        },
    )
    .await;
    let device = server.get_ok("/api/v1/devices/before-outage").await;
    assert_eq!(device["deviceId"], "before-outage");
    let stored = server.wait_telemetry("before-outage", 1).await;
    assert!(
        stored
            .iter()
            .any(|row| row["payload"]["during"] == "outage"),
        "{stored:?}"
    );
    // The refused message, sent again, is stored and acknowledged.
    send_json(&mut acked, &waiting).await;
    let ack = recv_json(&mut acked, WAIT).await;
    assert_eq!(ack["ack"]["messageId"], "m-1", "{ack}");
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(&metrics, "iotgate_database_up", &[]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "iotgate_database_reconnects_total", &[]),
        Some(1.0)
    );
    assert!(server.child.is_some());
}
