//! End-to-end tests of server-mode listeners: upgrade checks, message size limits, own ports,
//! TLS, and live reconfiguration (changes touch only the listener they name).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

const ORIGIN: &str = "https://plant.example";
const PROTO: &str = "iot.v1";
const USER: &str = "gate-user";
const PASS: &str = "gate-pass-1";

fn guarded_def() -> Value {
    json!({
        "key": "guarded", "name": "Guarded", "listenerType": "websocket", "mode": "server",
        "contentType": "json", "path": "/guarded", "anonymous": false, "userName": USER,
        "password": PASS, "origin": ORIGIN, "subProtocol": PROTO
    })
}

fn good() -> WsOptions {
    WsOptions::new()
        .origin(ORIGIN)
        .basic(USER, PASS)
        .protocol(PROTO)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_checks_in_order() {
    let server = TestServer::start().await;
    server.create_ok("listeners", &guarded_def()).await;
    server.wait_listener_state("guarded", "running").await;

    // Path.
    expect_refused(
        server.ws_connect("/not-guarded", &good()).await,
        404,
        "wrong path",
    );
    // Origin: wrong, missing; checked before credentials.
    expect_refused(
        server
            .ws_connect("/guarded", &good().origin("https://evil.example"))
            .await,
        403,
        "wrong origin",
    );
    let mut no_origin = good();
    no_origin.origin = None;
    expect_refused(
        server.ws_connect("/guarded", &no_origin).await,
        403,
        "missing origin",
    );
    let wrong_origin_no_creds = WsOptions::new()
        .origin("https://evil.example")
        .protocol(PROTO);
    expect_refused(
        server.ws_connect("/guarded", &wrong_origin_no_creds).await,
        403,
        "origin checked before credentials",
    );
    // Credentials: missing, wrong password, wrong user; checked before the sub-protocol.
    let mut no_creds = good();
    no_creds.authorization = None;
    let resp = expect_refused(
        server.ws_connect("/guarded", &no_creds).await,
        401,
        "missing Basic credentials",
    );
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .expect("401 without WWW-Authenticate");
    assert!(challenge.contains("Basic"), "WWW-Authenticate: {challenge}");
    for opts in [
        good().basic(USER, "wrong-pass"),
        good().basic("someone", PASS),
        good().authorization("Bearer abc"),
    ] {
        let resp = expect_refused(
            server.ws_connect("/guarded", &opts).await,
            401,
            "wrong credentials",
        );
        assert!(resp.headers().get("www-authenticate").is_some());
    }
    let mut wrong_creds_no_proto = good().basic(USER, "wrong-pass");
    wrong_creds_no_proto.protocol = None;
    expect_refused(
        server.ws_connect("/guarded", &wrong_creds_no_proto).await,
        401,
        "credentials checked before sub-protocol",
    );
    // Sub-protocol: missing, wrong.
    let mut no_proto = good();
    no_proto.protocol = None;
    let resp = expect_refused(
        server.ws_connect("/guarded", &no_proto).await,
        400,
        "missing sub-protocol",
    );
    if let Some(body) = resp.body() {
        let text = String::from_utf8_lossy(body);
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            assert_eq!(v["error"]["code"], "subprotocol_required", "{v}");
        }
    }
    expect_refused(
        server
            .ws_connect("/guarded", &good().protocol("mqtt"))
            .await,
        400,
        "wrong sub-protocol",
    );

    // Everything right: 101 with the configured protocol echoed.
    let (mut ws, resp) = server
        .ws_connect("/guarded", &good())
        .await
        .unwrap_or_else(|e| panic!("correct upgrade refused: {}", describe_ws_error(&e)));
    assert_eq!(resp.status().as_u16(), 101);
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some(PROTO)
    );
    expect_silence(&mut ws, Duration::from_millis(200)).await;
    // Offering several protocols, one of them right.
    let (_ws2, resp) = server
        .ws_connect("/guarded", &good().protocol(&format!("other, {PROTO}")))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "upgrade with a protocol list refused: {}",
                describe_ws_error(&e)
            )
        });
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some(PROTO)
    );

    // PUT without the password keeps the stored one.
    let mut changed = guarded_def();
    changed.as_object_mut().unwrap().remove("password");
    changed["name"] = json!("Guarded, renamed");
    server.update_ok("listeners", &changed).await;
    server.wait_listener_state("guarded", "running").await;
    let s = &server;
    wait_until(
        "the old password to work after a PUT without password",
        WAIT,
        || async move { s.ws_connect("/guarded", &good()).await.is_ok() },
    )
    .await;
    // PUT with a new password replaces it.
    let mut changed = guarded_def();
    changed["password"] = json!("new-pass-2");
    server.update_ok("listeners", &changed).await;
    wait_until("the new password to work", WAIT, || async move {
        s.ws_connect("/guarded", &good().basic(USER, "new-pass-2"))
            .await
            .is_ok()
    })
    .await;
    expect_refused(
        server.ws_connect("/guarded", &good()).await,
        401,
        "old password after a password change",
    );
}

/// Sentinel `sen`, anonymous listener `small` at /small with maxMessageBytes 1024, subscriber
/// downstream `out` at /stream/out, route `all`.
async fn small_listener(server: &TestServer) {
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    let mut l = listener_def("small", "/small", "sen");
    l["maxMessageBytes"] = json!(1024);
    server.create_ok("listeners", &l).await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("out", "/stream/out", "envelope"),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["out"]))
        .await;
    server.wait_listener_state("small", "running").await;
}

fn padded(id: &str, key: &str, total: usize) -> Value {
    let base = device_msg(id, key, json!({"pad": ""})).to_string().len();
    device_msg(
        id,
        key,
        json!({"pad": "x".repeat(total.saturating_sub(base))}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_message_closes_with_1009_only_that_connection() {
    let server = TestServer::start().await;
    small_listener(&server).await;
    let (k1, _) = server.register_device("d1", "thermo").await;
    let (k2, _) = server.register_device("d2", "thermo").await;
    let mut sub = server.subscribe("/stream/out").await;
    let mut c1 = server.connect_device("/small").await;
    let mut c2 = server.connect_device("/small").await;

    let big = padded("d1", &k1, 2000);
    assert!(big.to_string().len() > 1024);
    send_json(&mut c1, &big).await;
    assert_eq!(expect_close(&mut c1, WAIT).await, 1009);

    let fits = padded("d2", &k2, 1000);
    assert!(fits.to_string().len() <= 1024);
    send_json(&mut c2, &fits).await;
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["deviceId"], "d2");
    send_json(&mut c2, &device_msg("d2", &k2, json!({"n": 2}))).await;
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["payload"]["n"], 2);
    expect_silence(&mut sub, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_port_listener_reports_its_url() {
    let server = TestServer::start().await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    let mut l = listener_def("own-port", "/own", "sen");
    l["port"] = json!(0);
    l["hostName"] = json!("127.0.0.1");
    server.create_ok("listeners", &l).await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("out", "/stream/out", "envelope"),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["out"]))
        .await;
    let st = server.wait_listener_state("own-port", "running").await;
    let url = st["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no url in {st}"))
        .to_string();
    let port: u16 = url
        .strip_prefix("ws://127.0.0.1:")
        .and_then(|r| r.strip_suffix("/own"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("url {url} is not ws://127.0.0.1:PORT/own"));
    assert_ne!(port, 0);
    assert_ne!(
        port, server.port,
        "an own-port listener must not use the main port"
    );
    assert!(st["lastError"].is_null(), "{st}");

    let (key, _) = server.register_device("d1", "thermo").await;
    let mut sub = server.subscribe("/stream/out").await;
    let (mut dev, _) = ws_connect_url(&url, &WsOptions::new())
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {}", describe_ws_error(&e)));
    send_json(
        &mut dev,
        &device_msg("d1", &key, json!({"via": "own-port"})),
    )
    .await;
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["payload"]["via"], "own-port");
    assert_eq!(got[0]["listenerKey"], "own-port");
    let st = server.listener_status("own-port").await;
    assert_eq!(st["connections"], 1, "{st}");

    // The path is not mounted on the main port.
    let r = server.ws_connect("/own", &WsOptions::new()).await;
    expect_refused(r, 404, "own-port listener path on the main port");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_on_its_own_port() {
    install_crypto();
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let pem_dir = tempfile::tempdir().unwrap();
    let cert_file = pem_dir.path().join("cert.pem");
    let key_file = pem_dir.path().join("key.pem");
    std::fs::write(&cert_file, certified.cert.pem()).unwrap();
    std::fs::write(&key_file, certified.key_pair.serialize_pem()).unwrap();

    let server = TestServer::start().await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    // secure without the PEM files is invalid.
    let mut bad = listener_def("tls-bad", "/tls-bad", "sen");
    bad["secure"] = json!(true);
    bad["port"] = json!(0);
    expect_error(
        server.create("listeners", &bad).await,
        422,
        "validation_failed",
    )
    .await;

    let mut l = listener_def("tls-lis", "/tls", "sen");
    l["secure"] = json!(true);
    l["port"] = json!(0);
    l["hostName"] = json!("127.0.0.1");
    l["tlsCertFile"] = json!(cert_file.to_str().unwrap());
    l["tlsKeyFile"] = json!(key_file.to_str().unwrap());
    server.create_ok("listeners", &l).await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("out", "/stream/out", "envelope"),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["out"]))
        .await;
    let st = server.wait_listener_state("tls-lis", "running").await;
    let url = st["url"]
        .as_str()
        .unwrap_or_else(|| panic!("no url in {st}"))
        .to_string();
    assert!(
        url.starts_with("wss://127.0.0.1:") && url.ends_with("/tls"),
        "url {url}"
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).unwrap();
    let cfg = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    let (key, _) = server.register_device("d1", "thermo").await;
    let mut sub = server.subscribe("/stream/out").await;
    let (mut dev, _) = ws_connect_url(&url, &WsOptions::new().tls(cfg))
        .await
        .unwrap_or_else(|e| panic!("wss connect {url}: {}", describe_ws_error(&e)));
    send_json(&mut dev, &device_msg("d1", &key, json!({"via": "tls"}))).await;
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["payload"]["via"], "tls");
    assert_eq!(got[0]["listenerKey"], "tls-lis");

    // Plain ws:// on the TLS port does not get a WebSocket.
    let plain = url.replacen("wss://", "ws://", 1);
    assert!(
        ws_connect_url(&plain, &WsOptions::new()).await.is_err(),
        "plain ws:// worked on a TLS listener"
    );

    // A listener whose certificate file does not exist reports an error state.
    let mut broken = listener_def("tls-broken", "/tls-broken", "sen");
    broken["secure"] = json!(true);
    broken["port"] = json!(0);
    broken["hostName"] = json!("127.0.0.1");
    broken["tlsCertFile"] = json!(pem_dir.path().join("missing.pem").to_str().unwrap());
    broken["tlsKeyFile"] = json!(key_file.to_str().unwrap());
    let r = server.create("listeners", &broken).await;
    if r.status() == StatusCode::CREATED {
        let st = server.wait_listener_state("tls-broken", "error").await;
        assert!(st["lastError"].is_string(), "{st}");
    } else {
        expect_error(r, 422, "validation_failed").await;
    }
    // ... and the healthy one is untouched.
    assert_eq!(server.listener_status("tls-lis").await["state"], "running");
}

/// Listeners `lis-a` (/a) and `lis-b` (/b) behind `sen`, subscriber downstream `out`.
async fn two_listeners(server: &TestServer) {
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    server
        .create_ok("listeners", &listener_def("lis-a", "/a", "sen"))
        .await;
    server
        .create_ok("listeners", &listener_def("lis-b", "/b", "sen"))
        .await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("out", "/stream/out", "envelope"),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["out"]))
        .await;
    server.wait_listener_state("lis-a", "running").await;
    server.wait_listener_state("lis-b", "running").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_listener_restarts_only_that_listener() {
    let server = TestServer::start().await;
    two_listeners(&server).await;
    let (ka, _) = server.register_device("dev-a", "thermo").await;
    let (kb, _) = server.register_device("dev-b", "thermo").await;
    let mut sub = server.subscribe("/stream/out").await;
    let mut ca = server.connect_device("/a").await;
    let mut cb = server.connect_device("/b").await;

    // 2000 bytes is fine under the default limit.
    send_json(&mut ca, &padded("dev-a", &ka, 2000)).await;
    send_json(&mut cb, &device_msg("dev-b", &kb, json!({"n": 1}))).await;
    let got = recv_n_json(&mut sub, 2, WAIT).await;
    let mut ids: Vec<&str> = got
        .iter()
        .map(|e| e["deviceId"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["dev-a", "dev-b"]);

    let mut a = listener_def("lis-a", "/a", "sen");
    a["maxMessageBytes"] = json!(1024);
    server.update_ok("listeners", &a).await;

    // A's connection is closed as going away / service restart ...
    let code = expect_close(&mut ca, WAIT).await;
    assert!(
        code == 1001 || code == 1012,
        "close code {code} on a reconfigured listener"
    );
    // ... B's stays open and keeps delivering.
    expect_silence(&mut cb, Duration::from_millis(300)).await;
    send_json(&mut cb, &device_msg("dev-b", &kb, json!({"n": 2}))).await;
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["deviceId"], "dev-b");
    assert_eq!(got[0]["payload"]["n"], 2);

    // A new connection to A has the new limit.
    server.wait_listener_state("lis-a", "running").await;
    let mut ca2 = server.connect_device("/a").await;
    send_json(&mut ca2, &device_msg("dev-a", &ka, json!({"n": 3}))).await;
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["payload"]["n"], 3);
    send_json(&mut ca2, &padded("dev-a", &ka, 2000)).await;
    assert_eq!(
        expect_close(&mut ca2, WAIT).await,
        1009,
        "the new maxMessageBytes is not applied"
    );

    // Changing a sentinel, route or downstream does not drop device connections either.
    server
        .update_ok("sentinels", &sentinel_def("sen", 50))
        .await;
    let mut r = route_def("all", &["out"]);
    r["description"] = json!("changed");
    server.update_ok("routes", &r).await;
    expect_silence(&mut cb, Duration::from_millis(500)).await;
    send_json(&mut cb, &device_msg("dev-b", &kb, json!({"n": 4}))).await;
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["payload"]["n"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_and_deleted_listeners_refuse_connections() {
    let server = TestServer::start().await;
    two_listeners(&server).await;
    let (ka, _) = server.register_device("dev-a", "thermo").await;
    let (kb, _) = server.register_device("dev-b", "thermo").await;
    let mut sub = server.subscribe("/stream/out").await;
    let mut ca = server.connect_device("/a").await;
    let mut cb = server.connect_device("/b").await;

    let mut a = listener_def("lis-a", "/a", "sen");
    a["enabled"] = json!(false);
    server.update_ok("listeners", &a).await;
    match next_event(&mut ca, WAIT).await {
        WsEvent::Close(_) | WsEvent::Ended | WsEvent::Error(_) => {}
        other => panic!("a disabled listener's connection stayed open: {other:?}"),
    }
    server.wait_listener_state("lis-a", "disabled").await;
    let s = &server;
    wait_until(
        "a disabled listener to count 0 connections",
        WAIT,
        || async move { s.listener_status("lis-a").await["connections"] == 0 },
    )
    .await;
    expect_refused(
        server.ws_connect("/a", &WsOptions::new()).await,
        404,
        "disabled listener",
    );

    // B is unaffected.
    send_json(&mut cb, &device_msg("dev-b", &kb, json!({"n": 1}))).await;
    assert_eq!(recv_n_json(&mut sub, 1, WAIT).await[0]["deviceId"], "dev-b");

    // Enable again.
    a["enabled"] = json!(true);
    server.update_ok("listeners", &a).await;
    server.wait_listener_state("lis-a", "running").await;
    let mut ca = server.connect_device("/a").await;
    send_json(&mut ca, &device_msg("dev-a", &ka, json!({"n": 2}))).await;
    assert_eq!(recv_n_json(&mut sub, 1, WAIT).await[0]["deviceId"], "dev-a");

    // Delete.
    assert_eq!(
        server.delete("/api/v1/listeners/lis-a").await.status(),
        StatusCode::NO_CONTENT
    );
    match next_event(&mut ca, WAIT).await {
        WsEvent::Close(_) | WsEvent::Ended | WsEvent::Error(_) => {}
        other => panic!("a deleted listener's connection stayed open: {other:?}"),
    }
    expect_refused(
        server.ws_connect("/a", &WsOptions::new()).await,
        404,
        "deleted listener",
    );
    expect_error(
        server.get("/api/v1/listeners/lis-a/status").await,
        404,
        "not_found",
    )
    .await;
    // The path is free again.
    server
        .create_ok("listeners", &listener_def("lis-c", "/a", "sen"))
        .await;
    server.wait_listener_state("lis-c", "running").await;
    server.connect_device("/a").await;

    expect_silence(&mut cb, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_and_binary_listeners() {
    let server = TestServer::start().await;
    server.create_ok("sentinels", &json!({"key": "qsen", "name": "q", "method": "accessKey",
        "deviceId": {"from": "query", "name": "deviceId"}, "accessKey": {"from": "query", "name": "key"}})).await;
    let mut t = listener_def("text-lis", "/text", "qsen");
    t["contentType"] = json!("text");
    server.create_ok("listeners", &t).await;
    let mut b = listener_def("bin-lis", "/bin", "qsen");
    b["contentType"] = json!("binary");
    server.create_ok("listeners", &b).await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("out", "/stream/out", "envelope"),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["out"]))
        .await;
    server.wait_listener_state("text-lis", "running").await;
    server.wait_listener_state("bin-lis", "running").await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let mut sub = server.subscribe("/stream/out").await;

    let mut tw = server
        .connect_device(&format!("/text?deviceId=d1&key={key}"))
        .await;
    send_text(&mut tw, "temp=21.5 not json").await;
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["payload"], "temp=21.5 not json");
    assert_eq!(got[0]["contentType"], "text");

    use base64::Engine as _;
    use futures_util::SinkExt;
    let mut bw = server
        .connect_device(&format!("/bin?deviceId=d1&key={key}"))
        .await;
    let bytes = vec![0u8, 1, 2, 254, 255];
    bw.send(tokio_tungstenite::tungstenite::Message::Binary(
        bytes.clone().into(),
    ))
    .await
    .unwrap();
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["contentType"], "binary");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(got[0]["payload"].as_str().expect("base64 payload"))
        .expect("payload is base64");
    assert_eq!(decoded, bytes);
}

// ---------------------------------------------------------------------------------------------
// Heartbeat
// ---------------------------------------------------------------------------------------------

/// What a raw (never answering) WebSocket client saw.
#[derive(Debug, Default)]
struct SilentClientLog {
    /// Times (since the upgrade) of the pings received.
    pings: Vec<Duration>,
    /// Time and code of the server's close frame.
    close: Option<(Duration, Option<u16>)>,
    /// Time the TCP stream ended (EOF or reset).
    ended: Option<Duration>,
}

/// Upgrades by hand on a raw TCP socket, then only reads: pings are never answered (no pong, no
/// data). Returns the socket positioned after the 101 response and any bytes read past it.
async fn raw_upgrade(port: u16, path: &str) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .expect("connect timed out")
    .expect("connect");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk))
            .await
            .expect("101 response timed out")
            .expect("reading the upgrade response");
        assert!(n > 0, "connection closed during the upgrade: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "raw upgrade refused: {head}"
    );
    (sock, buf[end..].to_vec())
}

/// Reads server frames until a close frame or the end of the stream (or `limit`), never writing.
async fn watch_silently(
    mut sock: tokio::net::TcpStream,
    mut buf: Vec<u8>,
    limit: Duration,
) -> SilentClientLog {
    use tokio::io::AsyncReadExt;
    let started = tokio::time::Instant::now();
    let deadline = started + limit;
    let mut log = SilentClientLog::default();
    let mut chunk = [0u8; 4096];
    loop {
        // Parse every complete frame in the buffer.
        loop {
            if buf.len() < 2 {
                break;
            }
            let opcode = buf[0] & 0x0f;
            let masked = buf[1] & 0x80 != 0;
            let (len, mut at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            let mask = if masked {
                if buf.len() < at + 4 {
                    break;
                }
                at += 4;
                Some([buf[at - 4], buf[at - 3], buf[at - 2], buf[at - 1]])
            } else {
                None
            };
            if buf.len() < at + len {
                break;
            }
            let mut payload = buf[at..at + len].to_vec();
            if let Some(m) = mask {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= m[i % 4];
                }
            }
            buf.drain(..at + len);
            match opcode {
                0x9 => log.pings.push(started.elapsed()),
                0x8 => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    log.close.get_or_insert((started.elapsed(), code));
                }
                _ => {}
            }
        }
        if let Some((close_at, _)) = log.close {
            // The server may or may not end TCP right after its close frame; note it if it does
            // within a second, but do not answer the close either.
            if log.ended.is_none() {
                let until = (started + close_at + Duration::from_secs(1)).min(deadline);
                match tokio::time::timeout_at(until, sock.read(&mut chunk)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => log.ended = Some(started.elapsed()),
                    Ok(Ok(_)) => continue,
                    Err(_) => {}
                }
            }
            return log;
        }
        match tokio::time::timeout_at(deadline, sock.read(&mut chunk)).await {
            Err(_) => return log,
            Ok(Ok(0)) | Ok(Err(_)) => {
                log.ended = Some(started.elapsed());
                return log;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `heartbeatSeconds: 1`: a peer that never answers pings is closed after about two intervals;
/// a peer that reads (and so answers pings) stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_closes_silent_peers_and_keeps_live_ones() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 100).await;
    let mut l = listener_def("hb-lis", "/hb", "sen");
    l["heartbeatSeconds"] = json!(1);
    server.create_ok("listeners", &l).await;
    server.wait_listener_state("hb-lis", "running").await;
    let (key, _) = server.register_device("d1", "thermo").await;

    let mut live = server.connect_device("/hb").await;
    let (sock, rest) = raw_upgrade(server.port, "/hb").await;
    let s = &server;
    let (silent, live_event, both_counted) = tokio::join!(
        watch_silently(sock, rest, Duration::from_secs(6)),
        // Reading answers pings (tungstenite replies on the next read).
        next_event(&mut live, Duration::from_millis(4500)),
        async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            s.listener_status("hb-lis").await["connections"].clone()
        }
    );
    assert_eq!(
        both_counted, 2,
        "both connections should be counted while open"
    );
    eprintln!("silent client: {silent:?}");
    assert!(
        !silent.pings.is_empty(),
        "the server sent no ping to the silent peer: {silent:?}"
    );
    let closed_at = match (silent.close, silent.ended) {
        (Some((t, _)), _) => t,
        (None, Some(t)) => t,
        (None, None) => {
            panic!("a peer silent for 6 s at heartbeatSeconds 1 was not closed: {silent:?}")
        }
    };
    assert!(
        closed_at >= Duration::from_millis(1500) && closed_at <= Duration::from_millis(4500),
        "a silent peer must be closed after about 2 missed intervals (2-4 s), was {closed_at:?}: {silent:?}"
    );
    if let Some((_, code)) = silent.close {
        assert!(
            matches!(code, Some(1000..=1014) | None),
            "odd close code: {silent:?}"
        );
    }
    // The live peer was neither closed nor sent anything for 4.5 s.
    assert!(
        matches!(live_event, WsEvent::Timeout),
        "the ping-answering peer got {live_event:?}"
    );
    wait_until(
        "the silent connection to leave the count",
        Duration::from_secs(3),
        || async move { s.listener_status("hb-lis").await["connections"] == 1 },
    )
    .await;
    // The live connection still works.
    send_json(&mut live, &device_msg("d1", &key, json!({"alive": true}))).await;
    let items = server.wait_telemetry("d1", 1).await;
    assert_eq!(items[0]["listenerKey"], "hb-lis");
    assert_eq!(items[0]["payload"]["alive"], true);
    expect_silence(&mut live, Duration::from_millis(1500)).await;
    assert_eq!(server.listener_status("hb-lis").await["connections"], 1);
    drop(live);
    wait_until("the connection count to reach 0", WAIT, || async move {
        s.listener_status("hb-lis").await["connections"] == 0
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Basic credentials: Argon2 once per distinct credential
// ---------------------------------------------------------------------------------------------

fn basic_listener_def(password: Option<&str>) -> Value {
    let mut def = json!({
        "key": "basic-lis", "name": "Basic", "listenerType": "websocket", "mode": "server",
        "contentType": "json", "path": "/basic", "anonymous": false, "userName": "device"
    });
    if let Some(p) = password {
        def["password"] = json!(p);
    }
    def
}

/// 200 concurrent upgrades with the same right credential cost about one Argon2 verification
/// (cache + single flight), and the cache dies with the listener definition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argon2_runs_once_per_distinct_credential() {
    let server = TestServer::start().await;
    // A password shorter than 8 characters is refused.
    let r = server
        .create("listeners", &basic_listener_def(Some("short7x")))
        .await;
    let b = expect_error(r, 422, "validation_failed").await;
    assert!(
        detail_pointers(&b).iter().any(|p| p == "/password"),
        "no /password pointer: {b}"
    );
    server
        .create_ok("listeners", &basic_listener_def(Some("a-long-password")))
        .await;
    server.wait_listener_state("basic-lis", "running").await;
    let url = server.ws_url("/basic");

    let total = 200;
    let limit = Arc::new(tokio::sync::Semaphore::new(50));
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..total {
        let (limit, url) = (limit.clone(), url.clone());
        tasks.spawn(async move {
            let _permit = limit.acquire_owned().await.unwrap();
            let opts = WsOptions::new().basic("device", "a-long-password");
            match ws_connect_url(&url, &opts).await {
                Ok((mut ws, resp)) => {
                    let _ = ws.close(None).await;
                    Ok(resp.status().as_u16())
                }
                Err(e) => Err(describe_ws_error(&e)),
            }
        });
    }
    let mut ok = 0;
    let mut failures = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.expect("connect task") {
            Ok(101) => ok += 1,
            Ok(other) => failures.push(format!("status {other}")),
            Err(e) => failures.push(e),
        }
    }
    let elapsed = started.elapsed();
    eprintln!("{total} Basic-authenticated upgrades took {elapsed:?}");
    assert_eq!(ok, total, "failures: {failures:?}");
    // For scale: the cost of verifications that cannot be cached (distinct wrong passwords).
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10 {
        let url = url.clone();
        tasks.spawn(async move {
            let opts = WsOptions::new().basic("device", &format!("wrong-password-{i}"));
            upgrade_status(
                &ws_connect_url(&url, &opts)
                    .await
                    .expect_err("wrong password accepted"),
            )
        });
    }
    while let Some(r) = tasks.join_next().await {
        assert_eq!(r.expect("connect task"), Some(401));
    }
    let ten_verifications = started.elapsed();
    eprintln!("10 distinct wrong credentials took {ten_verifications:?}");
    // Run per connection, Argon2 would cost the 200 upgrades at least 100 verifications' time on
    // two cores; the bound is half of that, measured on this machine now (a fixed bound either
    // fails a slow machine or, on a fast one, passes 200 verifications: about 1.2 s here).
    let bound = ten_verifications * 5;
    assert!(
        elapsed < bound,
        "{total} upgrades with one credential took {elapsed:?} (bound {bound:?}): Argon2 is not run once per distinct credential"
    );
    // A wrong password is still refused (a cached success is not reused for it).
    expect_refused(
        server
            .ws_connect(
                "/basic",
                &WsOptions::new().basic("device", "a-wrong-password"),
            )
            .await,
        401,
        "wrong password",
    );

    // A new password: the cached verification of the old one must not survive.
    server
        .update_ok(
            "listeners",
            &basic_listener_def(Some("another-long-password")),
        )
        .await;
    let s = &server;
    wait_until("the new password to be accepted", WAIT, || async move {
        s.ws_connect(
            "/basic",
            &WsOptions::new().basic("device", "another-long-password"),
        )
        .await
        .is_ok()
    })
    .await;
    for _ in 0..3 {
        expect_refused(
            server
                .ws_connect(
                    "/basic",
                    &WsOptions::new().basic("device", "a-long-password"),
                )
                .await,
            401,
            "the old password after a password change",
        );
    }
    let (_ws, resp) = server
        .ws_connect(
            "/basic",
            &WsOptions::new().basic("device", "another-long-password"),
        )
        .await
        .unwrap_or_else(|e| panic!("new password refused: {}", describe_ws_error(&e)));
    assert_eq!(resp.status().as_u16(), 101);
}
