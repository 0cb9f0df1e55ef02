//! iotgate behind a real load balancer: HAProxy from Debian's packages (installed by
//! `tests/proxies/setup.sh` when missing), started by the test in front of the binary.
//!
//! Everything runs on the loopback, so clients take source addresses of their own in 127/8
//! (`127.0.0.7`, ...) while HAProxy reaches iotgate from `127.0.0.1`, the one trusted proxy. The
//! address iotgate records is then visibly the client's, not the balancer's:
//! - HTTP mode with `option forwardfor`: the API (audit log, login limits) and a path-mounted
//!   listener (envelopes);
//! - TCP mode with `send-proxy-v2` and `send-proxy` (PROXY protocol v2 and v1) in front of an
//!   own-port listener with `proxyProtocol: true`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http;
use tokio_tungstenite::WebSocketStream;

fn ensure_haproxy() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/proxies/setup.sh");
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        status.success(),
        "{} could not provide haproxy ({status}); install it with `apt-get install haproxy`",
        script.display()
    );
}

/// A running HAProxy, killed on drop.
struct Haproxy {
    child: Child,
    http_port: u16,
    proxy_v2_port: u16,
    proxy_v1_port: u16,
    _config: tempfile::TempDir,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Haproxy {
    fn start(main_port: u16, own_port: u16) -> Self {
        let (http_port, proxy_v2_port, proxy_v1_port) = (free_port(), free_port(), free_port());
        let config = format!(
            "global\n  maxconn 256\n\
             defaults\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  timeout tunnel 60s\n\
             frontend api\n  mode http\n  bind 127.0.0.1:{http_port}\n  option forwardfor\n  default_backend iotgate\n\
             backend iotgate\n  mode http\n  server main 127.0.0.1:{main_port}\n\
             frontend devices_v2\n  mode tcp\n  bind 127.0.0.1:{proxy_v2_port}\n  default_backend edge_v2\n\
             backend edge_v2\n  mode tcp\n  server edge 127.0.0.1:{own_port} send-proxy-v2\n\
             frontend devices_v1\n  mode tcp\n  bind 127.0.0.1:{proxy_v1_port}\n  default_backend edge_v1\n\
             backend edge_v1\n  mode tcp\n  server edge 127.0.0.1:{own_port} send-proxy\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&file)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "haproxy rejects the test configuration: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy");
        let haproxy = Self {
            child,
            http_port,
            proxy_v2_port,
            proxy_v1_port,
            _config: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [http_port, proxy_v2_port, proxy_v1_port] {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "haproxy is not listening on {port}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        haproxy
    }
}

/// A WebSocket client connecting from `source` (an address of its own on the loopback).
async fn ws_from(
    source: [u8; 4],
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(WebSocketStream<tokio::net::TcpStream>, SocketAddr), String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|e| e.to_string())?;
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| e.to_string())?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let mut request = format!("ws://127.0.0.1:{port}{path}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    for (name, value) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())?;
    Ok((ws, local))
}

fn http_from(source: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::from(source))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The stored envelope of `device` whose payload has `via`.
async fn envelope_via(server: &TestServer, device: &str, via: &str) -> Value {
    wait_for(&format!("the envelope via {via}"), WAIT, || async {
        server
            .telemetry(&format!("deviceId={device}&limit=100"))
            .await
            .into_iter()
            .find(|e| e["payload"]["via"] == via)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_the_client_address_is_the_one_haproxy_names() {
    tokio::task::spawn_blocking(ensure_haproxy).await.unwrap();
    let server = TestServer::start_with_extra(
        ServerOptions::new()
            .arg("--trusted-proxies")
            .arg("127.0.0.1"),
    )
    .await;
    setup_store_pipeline(&server, 100).await;
    let edge = json!({"key": "edge", "name": "edge", "listenerType": "websocket", "mode": "server",
        "contentType": "json", "hostName": "127.0.0.1", "port": 0, "path": "/edge",
        "proxyProtocol": true, "sentinel": "sen"});
    server.create_ok("listeners", &edge).await;
    let status = server.wait_listener_state("edge", "running").await;
    let own_port: u16 = status["url"]
        .as_str()
        .and_then(|u| u.rsplit(':').next())
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {status}"));
    let (key, _) = server.register_device("d1", "thermo").await;
    let haproxy = Haproxy::start(server.port, own_port);

    // HTTP mode, a path-mounted listener: the client's address from X-Forwarded-For, even
    // though the client put a forged one in front.
    let (mut ws, _) = ws_from(
        [127, 0, 0, 7],
        haproxy.http_port,
        "/devices",
        &[("x-forwarded-for", "6.6.6.6")],
    )
    .await
    .expect("WebSocket through HAProxy");
    send_json(&mut ws, &device_msg("d1", &key, json!({"via": "http"}))).await;
    let envelope = envelope_via(&server, "d1", "http").await;
    assert_eq!(envelope["sourceAddress"], "127.0.0.7:0", "{envelope}");

    // PROXY protocol v2 and v1 in front of the own-port listener: address and port.
    for (source, port, via) in [
        ([127, 0, 0, 8], haproxy.proxy_v2_port, "proxy-v2"),
        ([127, 0, 0, 9], haproxy.proxy_v1_port, "proxy-v1"),
    ] {
        let (mut ws, local) = ws_from(source, port, "/edge", &[])
            .await
            .unwrap_or_else(|e| panic!("WebSocket through HAProxy {via}: {e}"));
        send_json(&mut ws, &device_msg("d1", &key, json!({"via": via}))).await;
        let envelope = envelope_via(&server, "d1", via).await;
        assert_eq!(
            envelope["sourceAddress"],
            local.to_string(),
            "{via}: {envelope}"
        );
        assert_eq!(envelope["listenerKey"], "edge");
    }

    // Straight to the PROXY port, from a peer that is not a trusted proxy: refused before any
    // HTTP. Straight to the main port with a forged header: the header is not believed.
    assert!(
        ws_from([127, 0, 0, 10], own_port, "/edge", &[])
            .await
            .is_err(),
        "an untrusted peer got through the PROXY protocol port"
    );
    let (mut ws, local) = ws_from(
        [127, 0, 0, 11],
        server.port,
        "/devices",
        &[("x-forwarded-for", "6.6.6.6")],
    )
    .await
    .expect("direct WebSocket");
    send_json(&mut ws, &device_msg("d1", &key, json!({"via": "direct"}))).await;
    let envelope = envelope_via(&server, "d1", "direct").await;
    assert_eq!(envelope["sourceAddress"], local.to_string(), "{envelope}");

    // The API: the audit log records the client, and login limits count per client, not per
    // balancer.
    let api = format!("http://127.0.0.1:{}/api/v1/auth/login", haproxy.http_port);
    let login = |source: [u8; 4], password: &str| {
        http_from(source)
            .post(&api)
            .json(&json!({"userName": "admin", "password": password}))
            .send()
    };
    let r = login([127, 0, 0, 12], ADMIN_PASSWORD).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for _ in 0..5 {
        let r = login([127, 0, 0, 13], "wrong-password-guess")
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let r = login([127, 0, 0, 13], ADMIN_PASSWORD).await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the sixth attempt from one client"
    );
    let r = login([127, 0, 0, 14], ADMIN_PASSWORD).await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "another client behind the same balancer"
    );
    let audit = server
        .get_ok("/api/v1/audit?action=auth.login&limit=100")
        .await;
    let addresses: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["sourceAddress"].as_str())
        .collect();
    for client in ["127.0.0.12", "127.0.0.13", "127.0.0.14"] {
        assert!(addresses.contains(&client), "{client} not in {addresses:?}");
    }
    println!("FIGURE: behind HAProxy 2.6: envelopes, logins and limits saw the client addresses (X-Forwarded-For, PROXY v1 and v2); forged headers and untrusted PROXY peers ignored or refused");
}
