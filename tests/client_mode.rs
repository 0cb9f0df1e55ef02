//! End-to-end tests of client-mode listeners: iotgate connects out to a WebSocket server (run by
//! the test), sends the configured upgrade headers, takes device messages from it, and reconnects
//! when the remote goes away.
// tungstenite's accept_hdr callback must return its large ErrorResponse type by value.
#![allow(clippy::result_large_err)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::WebSocketStream;

/// One accepted upgrade: the request line's URI, its headers, and the server-side stream.
struct Accepted {
    uri: String,
    headers: http::HeaderMap,
    ws: WebSocketStream<TcpStream>,
}

/// A WebSocket server standing in for a remote device gateway.
struct Remote {
    port: u16,
    accepted: mpsc::UnboundedReceiver<Accepted>,
    task: tokio::task::JoinHandle<()>,
}

impl Remote {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        Self::serve(listener, port)
    }

    /// Binds the same port again (after [`stop_accepting`](Self::stop_accepting)).
    async fn restart(&mut self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding port {}: {e}", self.port),
            }
        };
        let fresh = Self::serve(listener, self.port);
        self.task.abort();
        *self = fresh;
    }

    fn serve(listener: TcpListener, port: u16) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let captured: Arc<Mutex<Option<(String, http::HeaderMap)>>> =
                        Arc::new(Mutex::new(None));
                    let cap = captured.clone();
                    let callback = move |req: &Request,
                                         mut resp: Response|
                          -> Result<Response, ErrorResponse> {
                        if let Some(p) = req.headers().get("sec-websocket-protocol") {
                            let first = p
                                .to_str()
                                .unwrap_or("")
                                .split(',')
                                .next()
                                .unwrap_or("")
                                .trim()
                                .to_string();
                            if !first.is_empty() {
                                resp.headers_mut()
                                    .insert("sec-websocket-protocol", first.parse().unwrap());
                            }
                        }
                        *cap.lock().unwrap() = Some((req.uri().to_string(), req.headers().clone()));
                        Ok(resp)
                    };
                    if let Ok(ws) = tokio_tungstenite::accept_hdr_async(sock, callback).await {
                        let (uri, headers) = captured.lock().unwrap().take().unwrap();
                        let _ = tx.send(Accepted { uri, headers, ws });
                    }
                });
            }
        });
        Self {
            port,
            accepted: rx,
            task,
        }
    }

    /// Drops the listening socket: new connections are refused.
    fn stop_accepting(&self) {
        self.task.abort();
    }

    async fn next_accept(&mut self, timeout: Duration) -> Accepted {
        match tokio::time::timeout(timeout, self.accepted.recv()).await {
            Ok(Some(a)) => a,
            Ok(None) => panic!("remote server stopped"),
            Err(_) => panic!("iotgate did not connect to the remote within {timeout:?}"),
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header(h: &http::HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_sends_configured_headers_and_reconnects() {
    let mut remote = Remote::start().await;
    let server = TestServer::start().await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("out", "/stream/out", "envelope"),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["out"]))
        .await;
    let def = json!({
        "key": "remote-a", "name": "Remote A", "listenerType": "websocket", "mode": "client",
        "contentType": "json", "hostName": "127.0.0.1", "port": remote.port, "path": "/feed",
        "origin": "https://iotgate.example", "subProtocol": "iot.v1", "headers": {"x-tenant": "t1"},
        "anonymous": false, "userName": "gw", "password": "gw-pass-1234", "heartbeatSeconds": 5,
        // The test's remote speaks plain ws:// on the loopback.
        "allowInsecureCredentials": true
    });
    let created = server.create_ok("listeners", &def).await;
    assert!(
        created.get("password").is_none(),
        "client password returned: {created}"
    );

    let first = remote.next_accept(WAIT).await;
    assert_eq!(first.uri, "/feed");
    assert_eq!(
        header(&first.headers, "origin").as_deref(),
        Some("https://iotgate.example")
    );
    let proto = header(&first.headers, "sec-websocket-protocol")
        .expect("no Sec-WebSocket-Protocol offered");
    assert!(
        proto.split(',').any(|p| p.trim() == "iot.v1"),
        "offered {proto}"
    );
    assert_eq!(
        header(&first.headers, "authorization"),
        Some(basic("gw", "gw-pass-1234"))
    );
    assert_eq!(header(&first.headers, "x-tenant").as_deref(), Some("t1"));
    let st = server.wait_listener_state("remote-a", "running").await;

    if let Some(url) = st["url"].as_str() {
        assert!(
            url.starts_with(&format!("ws://127.0.0.1:{}/feed", remote.port)),
            "status url {url}"
        );
    }

    // The remote goes away: iotgate retries ...
    remote.stop_accepting();
    let mut ws = first.ws;
    let _ = ws.close(None).await;
    drop(ws);
    let st = server.wait_listener_state("remote-a", "retrying").await;
    assert!(
        st["lastError"].is_string(),
        "retrying without lastError: {st}"
    );
    // ... and reconnects once the remote is back.
    remote.restart().await;
    let second = remote.next_accept(Duration::from_secs(40)).await;
    assert_eq!(
        header(&second.headers, "authorization"),
        Some(basic("gw", "gw-pass-1234"))
    );
    assert_eq!(header(&second.headers, "x-tenant").as_deref(), Some("t1"));
    let st = server.wait_listener_state("remote-a", "running").await;
    assert!(
        st["lastError"].is_null(),
        "lastError kept after reconnecting: {st}"
    );

    // Messages from the remote flow to subscribers.
    let mut sub = server.subscribe("/stream/out").await;
    let mut ws = second.ws;
    send_json(&mut ws, &json!({"deviceId": "gw-dev", "reading": 7})).await;
    // The outgoing connection counts in the listener's status.
    let st = server.listener_status("remote-a").await;
    assert_eq!(
        st["connections"], 1,
        "a running client listener counts its connection: {st}"
    );
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["listenerKey"], "remote-a", "{}", got[0]);
    assert_eq!(
        got[0]["payload"],
        json!({"deviceId": "gw-dev", "reading": 7})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_with_sentinel_authenticates_messages() {
    let mut remote = Remote::start().await;
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 100).await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let def = json!({
        "key": "remote-b", "name": "Remote B", "listenerType": "websocket", "mode": "client",
        "contentType": "json", "hostName": "127.0.0.1", "port": remote.port, "path": "/devices-feed",
        "anonymous": true, "sentinel": "sen"
    });
    server.create_ok("listeners", &def).await;
    let acc = remote.next_accept(WAIT).await;
    assert_eq!(acc.uri, "/devices-feed");
    assert!(
        acc.headers.get("authorization").is_none(),
        "an anonymous client sent credentials"
    );
    server.wait_listener_state("remote-b", "running").await;
    let mut ws = acc.ws;

    send_json(
        &mut ws,
        &device_msg("d1", &key, json!({"temperature": 3.5})),
    )
    .await;
    let items = server.wait_telemetry("d1", 1).await;
    assert_eq!(items[0]["listenerKey"], "remote-b");
    assert_eq!(items[0]["authenticated"], true);
    assert_eq!(
        items[0]["payload"],
        json!({"deviceId": "d1", "temperature": 3.5})
    );

    // A bad key is answered on the connection, like on a server-mode listener.
    send_json(
        &mut ws,
        &device_msg("d1", "not-the-key", json!({"temperature": 4})),
    )
    .await;
    expect_error_frame(&mut ws, "invalid_key").await;
    server
        .wait_deadletter("invalid_key", WAIT, |d| {
            d["reason"] == "invalid_key" && d["listenerKey"] == "remote-b"
        })
        .await;

    // Deleting the listener closes the outgoing connection and stops reconnecting.
    let r = server.delete("/api/v1/listeners/remote-b").await;
    assert_eq!(r.status().as_u16(), 204);
    match next_event(&mut ws, WAIT).await {
        WsEvent::Close(_) | WsEvent::Ended | WsEvent::Error(_) => {}
        other => panic!("the deleted client listener kept its connection: {other:?}"),
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        remote.accepted.try_recv().is_err(),
        "a deleted client listener reconnected"
    );
}

/// Without `--tls-ca-file` only the public web roots are trusted, so a remote with a self-signed
/// certificate must be refused (state `retrying` with `lastError`) and never get a WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_client_mode_refuses_an_untrusted_certificate() {
    install_crypto();
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let server_cfg = Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![certified.cert.der().clone()],
                rustls::pki_types::PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der())
                    .into(),
            )
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let tls_client_hellos = Arc::new(AtomicUsize::new(0));
    let upgrades = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (hellos, upgrades, stop) = (tls_client_hellos.clone(), upgrades.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let Ok((sock, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                sock.set_nonblocking(false).unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut first = [0u8; 1];
                if sock.peek(&mut first).is_ok() && first[0] == 0x16 {
                    hellos.fetch_add(1, Ordering::SeqCst);
                }
                let conn = rustls::ServerConnection::new(server_cfg.clone()).unwrap();
                let tls = rustls::StreamOwned::new(conn, sock);
                if tokio_tungstenite::tungstenite::accept(tls).is_ok() {
                    upgrades.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }

    let server = TestServer::start().await;
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    let def = json!({
        "key": "remote-tls", "name": "Remote TLS", "listenerType": "websocket", "mode": "client",
        "contentType": "json", "hostName": "127.0.0.1", "port": port, "path": "/feed",
        "secure": true, "anonymous": true, "sentinel": "sen"
    });
    server.create_ok("listeners", &def).await;
    let st = server.wait_listener_state("remote-tls", "retrying").await;
    assert!(
        st["lastError"].as_str().is_some_and(|e| !e.is_empty()),
        "{st}"
    );
    let h = tls_client_hellos.clone();
    wait_until("a TLS ClientHello from iotgate", WAIT, || {
        let h = h.clone();
        async move { h.load(Ordering::SeqCst) > 0 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        upgrades.load(Ordering::SeqCst),
        0,
        "iotgate trusted a self-signed certificate"
    );
    let status: Value = server.listener_status("remote-tls").await;
    assert_ne!(status["state"], "running", "{status}");
    stop.store(true, Ordering::SeqCst);
}

/// A blocking `wss://` server presenting one certificate: counts TLS ClientHellos and completed
/// WebSocket upgrades, sends `message` on every accepted connection, then keeps reading (so
/// iotgate's pings are answered) until stopped.
struct TlsRemote {
    port: u16,
    hellos: Arc<AtomicUsize>,
    upgrades: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl TlsRemote {
    fn start(certified: &rcgen::CertifiedKey, message: String) -> Self {
        install_crypto();
        let server_cfg = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(
                    vec![certified.cert.der().clone()],
                    rustls::pki_types::PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der())
                        .into(),
                )
                .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let hellos = Arc::new(AtomicUsize::new(0));
        let upgrades = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let (hellos, upgrades, stop) = (hellos.clone(), upgrades.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((sock, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let (hellos, upgrades, stop) = (hellos.clone(), upgrades.clone(), stop.clone());
                    let (cfg, message) = (server_cfg.clone(), message.clone());
                    std::thread::spawn(move || {
                        sock.set_nonblocking(false).unwrap();
                        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut first = [0u8; 1];
                        if sock.peek(&mut first).is_ok() && first[0] == 0x16 {
                            hellos.fetch_add(1, Ordering::SeqCst);
                        }
                        let conn = rustls::ServerConnection::new(cfg).unwrap();
                        let tls = rustls::StreamOwned::new(conn, sock);
                        let Ok(mut ws) = tokio_tungstenite::tungstenite::accept(tls) else {
                            return;
                        };
                        upgrades.fetch_add(1, Ordering::SeqCst);
                        if ws
                            .send(tokio_tungstenite::tungstenite::Message::Text(
                                message.into(),
                            ))
                            .is_err()
                        {
                            return;
                        }
                        let _ = ws
                            .get_ref()
                            .sock
                            .set_read_timeout(Some(Duration::from_millis(200)));
                        while !stop.load(Ordering::SeqCst) {
                            match ws.read() {
                                Ok(_) => {}
                                Err(tokio_tungstenite::tungstenite::Error::Io(e))
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                        let _ = ws.close(None);
                        let _ = ws.flush();
                    });
                }
            });
        }
        Self {
            port,
            hellos,
            upgrades,
            stop,
        }
    }
}

impl Drop for TlsRemote {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// With `--tls-ca-file` naming a self-signed certificate, a secure client-mode listener trusts a
/// remote presenting exactly that certificate (by DNS name and by IP address) and takes device
/// messages from it; a remote presenting another self-signed certificate is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_client_mode_trusts_the_configured_ca_file() {
    trusts_only_the_configured_ca_file(json!({"enabled": false})).await;
}

/// The same with compression offered: those listeners make the TCP and TLS connection
/// themselves (to put the permessage-deflate stream under tungstenite), so certificate checks
/// by name and by IP address must hold there too. The remote declines the extension.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_client_mode_with_compression_trusts_only_the_configured_ca_file() {
    trusts_only_the_configured_ca_file(json!({"enabled": true})).await;
}

async fn trusts_only_the_configured_ca_file(compression: Value) {
    install_crypto();
    let trusted =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let stranger =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let pem_dir = tempfile::tempdir().unwrap();
    let ca_file = pem_dir.path().join("ca.pem");
    std::fs::write(&ca_file, trusted.cert.pem()).unwrap();

    let server = TestServer::start_with_extra(
        ServerOptions::new()
            .arg("--tls-ca-file")
            .arg(ca_file.to_str().unwrap()),
    )
    .await;
    setup_store_pipeline(&server, 100).await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let by_name = TlsRemote::start(
        &trusted,
        device_msg("d1", &key, json!({"via": "wss-localhost"})).to_string(),
    );
    let by_ip = TlsRemote::start(
        &trusted,
        device_msg("d1", &key, json!({"via": "wss-ip"})).to_string(),
    );
    let untrusted = TlsRemote::start(
        &stranger,
        device_msg("d1", &key, json!({"via": "wss-untrusted"})).to_string(),
    );

    let client = |key: &str, host: &str, port: u16| {
        json!({
            "key": key, "name": key, "listenerType": "websocket", "mode": "client",
            "contentType": "json", "hostName": host, "port": port, "path": "/feed",
            "secure": true, "anonymous": true, "sentinel": "sen", "compression": compression
        })
    };
    server
        .create_ok("listeners", &client("tls-name", "localhost", by_name.port))
        .await;
    server
        .create_ok("listeners", &client("tls-ip", "127.0.0.1", by_ip.port))
        .await;
    server
        .create_ok(
            "listeners",
            &client("tls-stranger", "localhost", untrusted.port),
        )
        .await;

    for (key, host, port) in [
        ("tls-name", "localhost", by_name.port),
        ("tls-ip", "127.0.0.1", by_ip.port),
    ] {
        let st = server.wait_listener_state(key, "running").await;
        assert!(st["lastError"].is_null(), "{st}");
        assert_eq!(
            st["url"].as_str(),
            Some(format!("wss://{host}:{port}/feed").as_str()),
            "{st}"
        );
    }
    let items = server.wait_telemetry("d1", 2).await;
    let mut seen: Vec<(String, String)> = items
        .iter()
        .map(|t| {
            assert_eq!(t["authenticated"], true, "{t}");
            (
                t["listenerKey"].as_str().unwrap_or("").to_string(),
                t["payload"]["via"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("tls-ip".to_string(), "wss-ip".to_string()),
            ("tls-name".to_string(), "wss-localhost".to_string())
        ],
        "{items:?}"
    );
    assert!(
        items.iter().all(|t| !t.to_string().contains(&key)),
        "a key was stored: {items:?}"
    );
    assert!(by_name.upgrades.load(Ordering::SeqCst) >= 1);
    assert!(by_ip.upgrades.load(Ordering::SeqCst) >= 1);

    // The CA file adds one trust anchor; it does not switch verification off.
    let st = server.wait_listener_state("tls-stranger", "retrying").await;
    let last_error = st["lastError"].as_str().unwrap_or("").to_ascii_lowercase();
    assert!(
        last_error.contains("certificate"),
        "lastError should say the certificate was refused: {st}"
    );
    let h = untrusted.hellos.clone();
    wait_until("a TLS ClientHello to the untrusted remote", WAIT, || {
        let h = h.clone();
        async move { h.load(Ordering::SeqCst) > 0 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        untrusted.upgrades.load(Ordering::SeqCst),
        0,
        "iotgate trusted a certificate that is not in the CA file"
    );
    assert_ne!(
        server.listener_status("tls-stranger").await["state"],
        "running"
    );
    // Nothing from the untrusted remote reached the store.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.telemetry("deviceId=d1&limit=1000").await.len(), 2);
}

/// A client-mode listener acknowledges to the remote server it connected to: the remote speaks
/// for its devices, sends ids, and hears acks and refusals naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_acknowledges_to_the_remote() {
    let mut remote = Remote::start().await;
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 100).await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let def = json!({
        "key": "remote-c", "name": "Remote C", "listenerType": "websocket", "mode": "client",
        "contentType": "json", "hostName": "127.0.0.1", "port": remote.port, "path": "/feed",
        "anonymous": true, "sentinel": "sen", "acknowledge": "stored", "maxInFlight": 8
    });
    server.create_ok("listeners", &def).await;
    let mut ws = remote.next_accept(WAIT).await.ws;
    server.wait_listener_state("remote-c", "running").await;

    for i in 0..20 {
        let mut m = device_msg("d1", &key, json!({"i": i}));
        m["messageId"] = json!(format!("r-{i}"));
        send_json(&mut ws, &m).await;
    }
    let mut acked = std::collections::HashSet::new();
    while acked.len() < 20 {
        let frame = recv_json(&mut ws, WAIT).await;
        assert_eq!(frame["ack"]["status"], "stored", "{frame}");
        acked.insert(frame["ack"]["messageId"].as_str().unwrap().to_owned());
    }
    let mut bad = device_msg("d1", "wrong", json!({}));
    bad["messageId"] = json!("r-bad");
    send_json(&mut ws, &bad).await;
    let frame = recv_json(&mut ws, WAIT).await;
    assert_eq!(frame["error"]["code"], "invalid_key", "{frame}");
    assert_eq!(frame["error"]["messageId"], "r-bad");
    assert_eq!(server.wait_telemetry("d1", 20).await.len(), 20);
}
