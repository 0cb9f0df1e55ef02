//! End-to-end tests of the listener options the seed platforms have: origin allowlists with
//! wildcards, MessagePack listeners and downstreams (driven by Python's `msgpack`), Node-RED's
//! whole-message mode, ArkFlow's source metadata and `${ENV}` header values, shared-access
//! signatures (made by the Python snippet in docs/API.md), and static content on the main port.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Runs a Python script with `args`; returns its standard output, panicking with its output if
/// it fails.
async fn run_python(script: String, args: Vec<String>) -> String {
    let python = python_clients();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(python)
            .arg("-c")
            .arg(&script)
            .args(&args)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "python failed:\n--- script ---\n{script}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Origins
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_lists_and_wildcards_decide_the_upgrade() {
    let server = TestServer::start().await;
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    let mut def = listener_def("web", "/web", "sen");
    def["origin"] = json!(["https://app.example.com", "https://*.example.org"]);
    server.create_ok("listeners", &def).await;
    server.wait_listener_state("web", "running").await;

    for allowed in [
        "https://app.example.com",
        "https://APP.example.com:443",
        "https://a.example.org",
        "https://b.c.example.org",
    ] {
        let result = server
            .ws_connect("/web", &WsOptions::new().origin(allowed))
            .await;
        assert!(result.is_ok(), "{allowed} should be allowed");
    }
    for refused in [
        "https://example.org",
        "https://evilexample.org",
        "http://app.example.com",
        "https://app.example.com:8443",
        "null",
    ] {
        let response = expect_refused(
            server
                .ws_connect("/web", &WsOptions::new().origin(refused))
                .await,
            403,
            refused,
        );
        let body =
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).to_string();
        assert!(body.contains("origin_forbidden"), "{body}");
        assert!(
            !body.contains("example"),
            "the refusal names no allowed origin: {body}"
        );
    }
    expect_refused(
        server.ws_connect("/web", &WsOptions::new()).await,
        403,
        "no Origin",
    );

    // One string keeps working; bad entries and client-mode lists are refused with pointers.
    let mut single = listener_def("single", "/single", "sen");
    single["origin"] = json!("https://app.example.com");
    server.create_ok("listeners", &single).await;
    let mut bad = listener_def("bad", "/bad", "sen");
    bad["origin"] = json!([
        "https://ok.example.com",
        "https://a.*.example.com",
        "example.com/x"
    ]);
    let body = expect_error(
        server.create("listeners", &bad).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&body), ["/origin/1", "/origin/2"], "{body}");
    let client = json!({"key": "out", "name": "o", "listenerType": "websocket", "mode": "client",
        "contentType": "json", "hostName": "127.0.0.1", "port": 9, "path": "/x", "sentinel": "sen",
        "origin": ["https://a.example.com", "https://*.example.com"]});
    let body = expect_error(
        server.create("listeners", &client).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&body), ["/origin", "/origin/1"], "{body}");
}

// ---------------------------------------------------------------------------------------------
// MessagePack
// ---------------------------------------------------------------------------------------------

const MSGPACK_CLIENT: &str = r#"
import asyncio, json, sys
import msgpack, websockets

async def main(listener_url, live_url, key):
    async with websockets.connect(live_url) as live:
        await asyncio.sleep(0.3)
        async with websockets.connect(listener_url) as device:
            reading = {"deviceId": "m-1", "accessKey": key, "messageId": 7,
                       "temperature": 21.5, "tags": ["a", "b"], "ok": True}
            await device.send(msgpack.packb(reading))
            print(json.dumps({"ack": json.loads(await device.recv())}))
            # bytes have no JSON form: refused, with the id
            await device.send(msgpack.packb({"deviceId": "m-1", "accessKey": key,
                                             "messageId": 8, "blob": b"\x00\x01"}))
            print(json.dumps({"refusal": json.loads(await device.recv())}))
            # a text frame on a msgpack listener: refused
            await device.send(json.dumps({"deviceId": "m-1", "accessKey": key, "messageId": 9}))
            print(json.dumps({"text": json.loads(await device.recv())}))
        frame = await asyncio.wait_for(live.recv(), timeout=10)
        assert isinstance(frame, bytes), type(frame)
        print(json.dumps({"live": msgpack.unpackb(frame)}))

asyncio.run(main(*sys.argv[1:4]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_devices_and_msgpack_subscribers_with_a_real_client() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("live", "/live", "msgpack"),
        )
        .await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    let mut def = listener_def("packed", "/packed", "sen");
    def["contentType"] = json!("msgpack");
    def["acknowledge"] = json!("stored");
    server.create_ok("listeners", &def).await;
    server
        .create_ok("routes", &route_def("all", &["store", "live"]))
        .await;
    server.wait_listener_state("packed", "running").await;
    let (key, _) = server.register_device("m-1", "meter").await;
    let token = server.token().await;

    let out = run_python(
        MSGPACK_CLIENT.to_owned(),
        vec![
            server.ws_url("/packed"),
            server.ws_url(&format!("/live?token={token}")),
            key.clone(),
        ],
    )
    .await;
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[0]["ack"],
        json!({"ack": {"messageId": 7, "status": "stored"}})
    );
    assert_eq!(lines[1]["refusal"]["error"]["code"], "malformed_msgpack");
    assert_eq!(lines[2]["text"]["error"]["code"], "malformed_msgpack");
    let live = &lines[3]["live"];
    assert_eq!(live["deviceId"], "m-1", "{live}");
    assert_eq!(live["contentType"], "msgpack");
    assert_eq!(
        live["payload"],
        json!({"deviceId": "m-1", "messageId": 7, "temperature": 21.5, "tags": ["a", "b"], "ok": true}),
        "the access key is gone, the rest is the same value"
    );

    let stored = server.wait_telemetry("m-1", 1).await;
    assert_eq!(stored[0]["payload"]["temperature"], 21.5);
    assert_eq!(stored[0]["contentType"], "msgpack");
}

// ---------------------------------------------------------------------------------------------
// Whole-message mode and source metadata
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_messages_keep_their_properties_and_envelopes_name_their_source() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("nodered", "/nodered", "message"),
        )
        .await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    let mut def = listener_def("flows", "/flows", "sen");
    def["messageMode"] = json!("message");
    server.create_ok("listeners", &def).await;
    server
        .create_ok("routes", &route_def("all", &["store", "nodered"]))
        .await;
    server.wait_listener_state("flows", "running").await;
    let (key, _) = server.register_device("n-1", "meter").await;
    let mut node_red = server.subscribe("/nodered").await;

    let mut ws = server.connect_device("/flows").await;
    send_json(
        &mut ws,
        &json!({"payload": {"deviceId": "n-1", "accessKey": key, "kwh": 3},
                "topic": "meters/n-1", "_msgid": "9f1c2a"}),
    )
    .await;
    let message = recv_json(&mut node_red, WAIT).await;
    assert_eq!(
        message,
        json!({"payload": {"deviceId": "n-1", "kwh": 3}, "topic": "meters/n-1", "_msgid": "9f1c2a"})
    );
    send_json(&mut ws, &json!({"topic": "no payload here"})).await;
    expect_error_frame(&mut ws, "missing_payload").await;

    let stored = server.wait_telemetry("n-1", 1).await;
    let envelope = &stored[0];
    assert_eq!(envelope["payload"], json!({"deviceId": "n-1", "kwh": 3}));
    let metadata = &envelope["metadata"];
    assert_eq!(metadata["topic"], "meters/n-1", "{metadata}");
    assert_eq!(metadata["_msgid"], "9f1c2a");
    assert_eq!(metadata["__meta_ingest_time"], envelope["receivedAt"]);
    assert_eq!(metadata["__meta_source"], envelope["sourceAddress"]);
    assert!(metadata["__meta_source"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));

    // A payload-mode listener's envelope in message format gets a topic and a _msgid.
    let mut plain = listener_def("plain", "/plain", "sen");
    plain["contentType"] = json!("json");
    server.create_ok("listeners", &plain).await;
    server.wait_listener_state("plain", "running").await;
    let mut ws = server.connect_device("/plain").await;
    send_json(&mut ws, &device_msg("n-1", &key, json!({"kwh": 4}))).await;
    let message = recv_json(&mut node_red, WAIT).await;
    assert_eq!(message["payload"], json!({"deviceId": "n-1", "kwh": 4}));
    assert_eq!(message["topic"], "n-1");
    assert!(
        message["_msgid"].as_str().is_some_and(|id| id.len() == 36),
        "{message}"
    );

    let mut text = listener_def("lines", "/lines", "sen");
    text["contentType"] = json!("text");
    text["messageMode"] = json!("message");
    let body = expect_error(
        server.create("listeners", &text).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&body), ["/messageMode"], "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_take_environment_variables_when_the_module_starts() {
    let hook = start_hook(200).await;
    let server = TestServer::start_with_extra(
        ServerOptions::new().env("IOTGATE_TEST_HOOK_TOKEN", "from-the-environment"),
    )
    .await;
    let mut hook_def = json!({"key": "hook", "name": "h", "type": "webhook", "url": hook.url,
        "headers": {"authorization": "Bearer ${IOTGATE_TEST_HOOK_TOKEN}", "x-literal": "$${not a variable}"}});
    server.create_ok("downstreams", &hook_def).await;
    setup_store_pipeline(&server, 100).await;
    server
        .create_ok("routes", &route_def("to-hook", &["hook"]))
        .await;
    let (key, _) = server.register_device("e-1", "meter").await;
    let mut ws = server.connect_device("/devices").await;
    send_json(&mut ws, &device_msg("e-1", &key, json!({}))).await;
    let requests = hook.requests.clone();
    wait_until("the webhook request", WAIT, || {
        let requests = requests.clone();
        async move { !requests.lock().unwrap().is_empty() }
    })
    .await;
    let request = hook.requests.lock().unwrap()[0].clone();
    assert_eq!(
        request.header("authorization").as_deref(),
        Some("Bearer from-the-environment")
    );
    assert_eq!(
        request.header("x-literal").as_deref(),
        Some("${not a variable}")
    );
    // Header values are secrets: GET shows neither the reference nor what it resolved to.
    let stored = server.get_ok("/api/v1/downstreams/hook").await;
    assert_eq!(stored["headers"]["authorization"], "<redacted>");
    assert!(!stored.to_string().contains("from-the-environment"));

    hook_def["headers"] = json!({"x-token": "${IOTGATE_TEST_NOT_SET}"});
    let body = expect_error(
        server.put("/api/v1/downstreams/hook", &hook_def).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&body), ["/headers/x-token"], "{body}");
    assert!(body.to_string().contains("IOTGATE_TEST_NOT_SET"), "{body}");
}

// ---------------------------------------------------------------------------------------------
// Shared-access signatures
// ---------------------------------------------------------------------------------------------

/// The Python snippet from docs/API.md, so the documented way to make a token is the tested one.
fn documented_sas_snippet() -> String {
    let api = std::fs::read_to_string(repo_root().join("docs/API.md")).unwrap();
    let start = api
        .find("```python sas-token\n")
        .expect("the sas-token snippet in docs/API.md");
    let code = &api[start + "```python sas-token\n".len()..];
    code[..code.find("```").unwrap()].to_owned()
}

async fn sas_token(device: &str, key: &str, ttl: i64, resource: &str) -> String {
    let script = format!(
        "{}\nimport sys\nprint(sas_token(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))",
        documented_sas_snippet()
    );
    run_python(
        script,
        vec![device.into(), key.into(), ttl.to_string(), resource.into()],
    )
    .await
    .trim()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_access_signatures_from_the_documented_snippet() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok(
            "sentinels",
            &json!({"key": "sas", "name": "signatures", "method": "sas",
                    "sasResource": "iot.example.com/devices/{deviceId}"}),
        )
        .await;
    server
        .create_ok(
            "sentinels",
            &json!({"key": "sas-query", "name": "signatures in the query", "method": "sas",
                    "credential": {"from": "query", "name": "sas"}}),
        )
        .await;
    server
        .create_ok("listeners", &listener_def("signed", "/signed", "sas"))
        .await;
    server
        .create_ok(
            "listeners",
            &listener_def("signed-q", "/signed-q", "sas-query"),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["store"]))
        .await;
    server.wait_listener_state("signed", "running").await;
    let (primary, secondary) = server.register_device("s-1", "meter").await;
    let resource = "iot.example.com/devices/{deviceId}";

    // A token from either key, in the Authorization header.
    for key in [&primary, &secondary] {
        let token = sas_token("s-1", key, 3600, resource).await;
        let (mut ws, _) = server
            .ws_connect("/signed", &WsOptions::new().authorization(&token))
            .await
            .unwrap();
        send_json(&mut ws, &json!({"kwh": 1})).await;
        expect_silence(&mut ws, Duration::from_millis(200)).await;
    }
    let stored = server.wait_telemetry("s-1", 2).await;
    assert_eq!(stored[0]["authenticated"], true);

    // In the query string, with the default resource.
    let token = sas_token("s-1", &primary, 3600, "devices/{deviceId}").await;
    let mut ws = server
        .connect_device(&format!("/signed-q?sas={}", url_encode(&token)))
        .await;
    send_json(&mut ws, &json!({"kwh": 2})).await;
    server.wait_telemetry("s-1", 3).await;

    // Refusals at connect: each closes with 1008 after saying why.
    let someone_else = generate_key_like(&primary);
    for (token, code) in [
        (
            sas_token("s-1", &someone_else, 3600, resource).await,
            "invalid_key",
        ),
        (
            sas_token("s-1", &primary, -10, resource).await,
            "token_expired",
        ),
        (
            sas_token("s-1", &primary, 3600, "devices/{deviceId}").await,
            "invalid_token",
        ),
        (
            sas_token("nobody", &primary, 3600, resource).await,
            "unknown_device",
        ),
        ("SharedAccessSignature nonsense".to_owned(), "invalid_token"),
    ] {
        let (mut ws, _) = server
            .ws_connect("/signed", &WsOptions::new().authorization(&token))
            .await
            .unwrap();
        let frame = recv_json(&mut ws, WAIT).await;
        assert_eq!(frame["error"]["code"], code, "{token}: {frame}");
        assert_eq!(expect_close(&mut ws, WAIT).await, 1008);
    }

    // A token that expires while the connection is open: the next message is refused and the
    // connection closed.
    let token = sas_token("s-1", &primary, 2, resource).await;
    let (mut ws, _) = server
        .ws_connect("/signed", &WsOptions::new().authorization(&token))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    send_json(&mut ws, &json!({"kwh": 9})).await;
    expect_error_frame(&mut ws, "token_expired").await;
    assert_eq!(expect_close(&mut ws, WAIT).await, 1008);
}

/// Another well-formed access key (same length and alphabet), not the device's.
fn generate_key_like(key: &str) -> String {
    key.chars()
        .rev()
        .map(|c| if c == 'A' { 'B' } else { c })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Static content
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_content_is_served_beside_the_api_and_never_under_a_listener() {
    let site = tempfile::tempdir().unwrap();
    std::fs::write(site.path().join("index.html"), "<h1>Plant dashboard</h1>").unwrap();
    std::fs::write(site.path().join("app.js"), "console.log('dashboard');").unwrap();
    std::fs::write(site.path().join(".secret"), "hidden").unwrap();
    let outside = site.path().parent().unwrap().join("outside-the-site.txt");
    std::fs::write(&outside, "not served").unwrap();
    let mut server = TestServer::start_with_extra(
        ServerOptions::new().args(["--static-dir", site.path().to_str().unwrap()]),
    )
    .await;

    let http = reqwest::Client::new();
    let index = http.get(server.url("/site/")).send().await.unwrap();
    assert_eq!(index.status(), 200);
    assert!(index.text().await.unwrap().contains("Plant dashboard"));
    let js = http.get(server.url("/site/app.js")).send().await.unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("javascript"));
    for refused in [
        "/site/.secret",
        "/site/%2e%2e/outside-the-site.txt",
        "/site/..%2foutside-the-site.txt",
    ] {
        let status = http.get(server.url(refused)).send().await.unwrap().status();
        assert!(status.is_client_error(), "{refused}: {status}");
    }
    // The API and the admin UI are still there.
    assert_eq!(
        http.get(server.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    let response = server
        .create("listeners", &listener_def("under", "/site/devices", "sen"))
        .await;
    let body = expect_error(response, 409, "conflict").await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("/site/devices") && message.contains("/site"),
        "{message}"
    );

    // A stored listener under the mount stops a later start that serves static content there.
    server.stop().await;
    let dir = server.data_dir.clone();
    let mut plain = TestServer::start_with_dir(&dir).await;
    plain
        .create_ok("listeners", &listener_def("later", "/docs/devices", "sen"))
        .await;
    plain.stop().await;
    let out = Command::new(env!("CARGO_BIN_EXE_iotgate"))
        .args(["--bind", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap()])
        .args([
            "--static-dir",
            site.path().to_str().unwrap(),
            "--static-mount",
            "/docs",
        ])
        .env("IOTGATE_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/docs/devices")
            && stderr.contains("listener later")
            && stderr.contains("--static-mount"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(outside);
}
