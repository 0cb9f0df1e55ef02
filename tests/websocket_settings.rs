//! End-to-end tests of a listener's `websocket` settings through the running binary: separate
//! frame and message caps, auto-ping interval, timeout and payload, the idle timeout, failByDrop,
//! the closing handshake timeout, an own port's opening handshake timeout, the 422s that name
//! bad values by pointer, and a client-mode listener that keeps the same timeouts plus its
//! sentinel's maxFailures and authTimeoutSeconds.
//!
//! Where a test must see exactly what goes over the wire (pings nobody answers, a close frame
//! that is or is not sent, when TCP ends), it uses [`RawClient`], a WebSocket client written
//! out by hand on a TCP socket, because tungstenite answers pings and close frames by itself.
// tungstenite's accept_hdr callback must return its large ErrorResponse type by value.
#![allow(clippy::result_large_err)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// A hand-written client
// ---------------------------------------------------------------------------------------------

/// A frame as the server sent it.
#[derive(Debug, PartialEq)]
struct RawFrame {
    opcode: u8,
    payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame.
    fn close_code(&self) -> Option<u16> {
        (self.opcode == 0x8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
    fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default()).into_owned()
    }
}

/// What reading the next frame found.
#[derive(Debug)]
enum Read {
    Frame(RawFrame),
    /// TCP ended (EOF or reset).
    Ended,
    Timeout,
}

struct RawClient {
    socket: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    /// Connects and upgrades at `port` and `path`; panics unless the answer is 101.
    async fn connect(port: u16, path: &str) -> Self {
        let (socket, buffer, _) = raw_websocket_upgrade(port, path, "").await;
        Self { socket, buffer }
    }

    /// Reads the next whole frame the server sent.
    async fn read_frame(&mut self, timeout: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buffer) {
                self.buffer.drain(..used);
                return Read::Frame(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.socket.read(&mut chunk)).await {
                Err(_) => return Read::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Read::Ended,
                Ok(Ok(n)) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until a close frame, skipping others; panics on anything else.
    async fn expect_close_frame(&mut self, timeout: Duration) -> RawFrame {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Read::Frame(frame) if frame.opcode == 0x8 => return frame,
                Read::Frame(_) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Waits for TCP to end, skipping frames; returns the frames seen, panics on a timeout.
    async fn expect_end(&mut self, timeout: Duration) -> Vec<RawFrame> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Read::Frame(frame) => seen.push(frame),
                Read::Ended => return seen,
                Read::Timeout => panic!("the connection stayed open; frames seen: {seen:?}"),
            }
        }
    }

    /// Sends one masked frame (`first` is FIN, RSV and opcode bits).
    async fn send(&mut self, first: u8, payload: &[u8]) {
        let mut frame = vec![first];
        let mask = [0x11, 0x22, 0x33, 0x44];
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        // A server that already hung up may reset the write; the reads tell what happened.
        let _ = self.socket.write_all(&frame).await;
    }

    /// Sends only a frame header declaring `length` payload bytes (no payload follows).
    async fn send_header_only(&mut self, first: u8, length: u64) {
        let mut frame = vec![first, 0x80 | 127];
        frame.extend_from_slice(&length.to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, 0]);
        let _ = self.socket.write_all(&frame).await;
    }
}

/// One unmasked server frame at the start of `buffer`, with the bytes it used.
fn parse_server_frame(buffer: &[u8]) -> Option<(RawFrame, usize)> {
    if buffer.len() < 2 {
        return None;
    }
    let opcode = buffer[0] & 0x0f;
    let (length, header) = match buffer[1] & 0x7f {
        126 if buffer.len() >= 4 => (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4),
        127 if buffer.len() >= 10 => (
            u64::from_be_bytes(buffer[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buffer.len() < header + length {
        return None;
    }
    Some((
        RawFrame {
            opcode,
            payload: buffer[header..header + length].to_vec(),
        },
        header + length,
    ))
}

const FIN_BINARY: u8 = 0x82;
const FIN_CLOSE: u8 = 0x88;

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

/// A server with a lenient access-key sentinel `sen` and the listener `def` (plus `websocket`
/// settings) created and running.
async fn server_with_listener(key: &str, path: &str, extra: Value) -> TestServer {
    let server = TestServer::start().await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 1000))
        .await;
    create_listener(&server, key, path, extra).await;
    server
}

async fn create_listener(server: &TestServer, key: &str, path: &str, extra: Value) -> Value {
    let mut def = listener_def(key, path, "sen");
    for (k, v) in extra.as_object().unwrap() {
        def[k] = v.clone();
    }
    server.create_ok("listeners", &def).await;
    server.wait_listener_state(key, "running").await
}

/// The port of an own-port listener, from its status URL.
fn own_port(status: &Value) -> u16 {
    let url = status["url"]
        .as_str()
        .unwrap_or_else(|| panic!("url in {status}"));
    url.strip_prefix("ws://127.0.0.1:")
        .and_then(|rest| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("url {url} is not ws://127.0.0.1:PORT/..."))
}

// ---------------------------------------------------------------------------------------------
// Server mode
// ---------------------------------------------------------------------------------------------

/// A 16 KiB frame cap with a 1 MiB message cap: a 1 MiB message in 64 frames of 16 KiB is
/// accepted whole (the listener echoes it), one 16 KiB + 1 frame closes with 1009, and so does
/// a fragmented message one byte over 1 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_cap_and_message_cap_are_separate() {
    const FRAME: usize = 16 * 1024;
    const MESSAGE: usize = 1024 * 1024;
    let server = server_with_listener(
        "caps",
        "/caps",
        json!({"contentType": "binary", "echo": true, "maxMessageBytes": MESSAGE,
               "websocket": {"maxFrameBytes": FRAME}}),
    )
    .await;

    let (mut ws, message) = send_fragmented(&server, "/caps", MESSAGE, FRAME).await;
    match next_event(&mut ws, WAIT).await {
        WsEvent::Binary(echoed) => {
            assert_eq!(echoed.len(), MESSAGE);
            assert!(echoed == message, "the echoed message differs");
        }
        other => panic!("expected the 1 MiB message echoed back, got {other:?}"),
    }

    let (mut ws, _) = server_ws(&server, "/caps").await;
    ws.send(Message::Binary(vec![7u8; FRAME + 1].into()))
        .await
        .unwrap();
    assert_eq!(
        expect_close(&mut ws, WAIT).await,
        1009,
        "one frame over maxFrameBytes"
    );

    let (mut ws, _) = send_fragmented(&server, "/caps", MESSAGE + 1, FRAME).await;
    assert_eq!(
        expect_close(&mut ws, WAIT).await,
        1009,
        "a message over maxMessageBytes"
    );
}

/// Connects and sends one binary message of `total` bytes in frames of `frame` bytes.
async fn send_fragmented(
    server: &TestServer,
    path: &str,
    total: usize,
    frame: usize,
) -> (Ws, Vec<u8>) {
    let (mut ws, _) = server_ws(server, path).await;
    let message: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<&[u8]> = message.chunks(frame).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Binary)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(chunk.to_vec(), opcode, i + 1 == chunks.len());
        // The server may close mid-message (over the cap); the close is read afterwards.
        if ws.send(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    (ws, message)
}

async fn server_ws(server: &TestServer, path: &str) -> (Ws, UpgradeResponse) {
    server
        .ws_connect(path, &WsOptions::new())
        .await
        .unwrap_or_else(|e| panic!("connect to {path}: {}", describe_ws_error(&e)))
}

/// Pings go out every interval with the configured payload; a client that never answers is
/// closed with 1001 once the ping timeout passes, while a client that answers stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_ping_closes_a_peer_that_does_not_answer() {
    let server = server_with_listener(
        "pings",
        "/pings",
        json!({"websocket": {"autoPingIntervalSeconds": 1, "autoPingTimeoutSeconds": 2, "autoPingSize": 8}}),
    )
    .await;
    // tungstenite answers every ping while it is read: this one must stay connected.
    let (mut answering, _) = server_ws(&server, "/pings").await;
    let answering =
        tokio::spawn(async move { next_event(&mut answering, Duration::from_secs(6)).await });
    let mut silent = RawClient::connect(server.port, "/pings").await;
    let started = Instant::now();
    let mut pings = 0;
    let close = loop {
        match silent.read_frame(WAIT).await {
            Read::Frame(frame) if frame.opcode == 0x9 => {
                assert_eq!(frame.payload.len(), 8, "autoPingSize");
                pings += 1;
            }
            Read::Frame(frame) if frame.opcode == 0x8 => break frame,
            other => panic!("expected pings then a close frame, got {other:?}"),
        }
    };
    let after = started.elapsed();
    assert_eq!(close.close_code(), Some(1001), "{}", close.close_reason());
    assert_eq!(close.close_reason(), "heartbeat timeout");
    assert!(pings >= 1, "no ping before the close");
    // The first ping goes out after 1 s, the peer has 2 s to answer it.
    assert!(
        after >= Duration::from_millis(2500) && after < Duration::from_secs(6),
        "closed after {after:?}"
    );
    let answering = answering.await.unwrap();
    assert!(
        matches!(answering, WsEvent::Timeout),
        "the answering client was closed too: {answering:?}"
    );
}

/// With idleTimeoutSeconds, a connection that sends no data frame is closed with 1000 "idle
/// timeout" even though it answers pings; data frames keep it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_counts_data_frames_only() {
    let server = server_with_listener(
        "idle",
        "/idle",
        json!({"heartbeatSeconds": 1, "websocket": {"idleTimeoutSeconds": 2}}),
    )
    .await;
    let (mut busy, _) = server_ws(&server, "/idle").await;
    let (mut quiet, _) = server_ws(&server, "/idle").await;
    let started = Instant::now();
    // `busy` sends a frame every 500 ms for 3 s (the sentinel refuses it; that is not data
    // missing), then stops.
    let busy_task = tokio::spawn(async move {
        for _ in 0..6 {
            busy.send(Message::Text("{}".into())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let started = Instant::now();
        let code = expect_close(&mut busy, WAIT).await;
        (code, started.elapsed())
    });
    // `quiet` answers pings (tungstenite does while reading) but sends no data.
    let mut close = None;
    while close.is_none() {
        match quiet.next().await {
            Some(Ok(Message::Close(frame))) => close = Some(frame),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    let quiet_after = started.elapsed();
    let frame = close.unwrap().expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), 1000);
    assert_eq!(frame.reason.as_str(), "idle timeout");
    assert!(
        quiet_after >= Duration::from_millis(1800) && quiet_after < Duration::from_secs(5),
        "the quiet connection closed after {quiet_after:?}"
    );
    let (code, busy_after) = busy_task.await.unwrap();
    assert_eq!(code, 1000);
    assert!(
        busy_after >= Duration::from_millis(1200),
        "the busy connection was closed {busy_after:?} after its last frame"
    );
}

/// A frame over the cap and an unknown opcode: a close frame (1009, 1002) by default, and
/// with failByDrop no close frame at all, just the end of TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_by_drop_ends_tcp_without_a_close_frame() {
    let server = server_with_listener("polite", "/polite", json!({"maxMessageBytes": 4096})).await;
    create_listener(
        &server,
        "blunt",
        "/blunt",
        json!({"maxMessageBytes": 4096, "websocket": {"failByDrop": true}}),
    )
    .await;
    for (what, violation) in [("oversize frame", 0u8), ("unknown opcode 0x3", 1)] {
        let mut polite = RawClient::connect(server.port, "/polite").await;
        let mut blunt = RawClient::connect(server.port, "/blunt").await;
        for client in [&mut polite, &mut blunt] {
            if violation == 0 {
                client.send_header_only(FIN_BINARY, 1 << 20).await;
            } else {
                client.send(0x83, b"x").await;
            }
        }
        let frame = polite.expect_close_frame(WAIT).await;
        let want = if violation == 0 { 1009 } else { 1002 };
        assert_eq!(
            frame.close_code(),
            Some(want),
            "{what}: {}",
            frame.close_reason()
        );
        let seen = blunt.expect_end(WAIT).await;
        assert!(
            seen.iter().all(|f| f.opcode != 0x8),
            "{what}: failByDrop sent a close frame: {seen:?}"
        );
    }
}

/// After iotgate sends a close frame it waits closeHandshakeTimeoutMs for the peer's before it
/// drops TCP; a peer that answers ends the connection at once; without the setting TCP ends
/// right after the close frame, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_handshake_timeout_waits_for_the_peers_close_frame() {
    let server = server_with_listener(
        "patient",
        "/patient",
        json!({"websocket": {"idleTimeoutSeconds": 1, "closeHandshakeTimeoutMs": 1500}}),
    )
    .await;
    create_listener(
        &server,
        "hasty",
        "/hasty",
        json!({"websocket": {"idleTimeoutSeconds": 1}}),
    )
    .await;

    // No answer: TCP stays open for the timeout.
    let mut silent = RawClient::connect(server.port, "/patient").await;
    let frame = silent.expect_close_frame(WAIT).await;
    assert_eq!(frame.close_code(), Some(1000));
    let closed_at = Instant::now();
    silent.expect_end(WAIT).await;
    let held = closed_at.elapsed();
    assert!(
        held >= Duration::from_millis(1300) && held < Duration::from_secs(4),
        "TCP ended {held:?} after the close frame (closeHandshakeTimeoutMs 1500)"
    );

    // An answer ends it at once.
    let mut answering = RawClient::connect(server.port, "/patient").await;
    answering.expect_close_frame(WAIT).await;
    let closed_at = Instant::now();
    answering.send(FIN_CLOSE, &1000u16.to_be_bytes()).await;
    answering.expect_end(WAIT).await;
    assert!(
        closed_at.elapsed() < Duration::from_millis(800),
        "TCP ended {:?} after the peer's close frame",
        closed_at.elapsed()
    );

    // No setting: no wait.
    let mut default = RawClient::connect(server.port, "/hasty").await;
    default.expect_close_frame(WAIT).await;
    let closed_at = Instant::now();
    default.expect_end(WAIT).await;
    assert!(
        closed_at.elapsed() < Duration::from_millis(800),
        "TCP ended {:?} after the close frame without closeHandshakeTimeoutMs",
        closed_at.elapsed()
    );
}

/// An own-port listener's openHandshakeTimeoutMs drops a connection that sends no upgrade
/// request, well before the server-wide 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_port_open_handshake_timeout_drops_a_slow_client() {
    let server = TestServer::start().await;
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    let status = create_listener(
        &server,
        "own",
        "/own",
        json!({"port": 0, "hostName": "127.0.0.1", "websocket": {"openHandshakeTimeoutMs": 600}}),
    )
    .await;
    let port = own_port(&status);
    let mut slow = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    slow.write_all(b"GET /own HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(4), slow.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "the slow client was not dropped within 4 s");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(400) && after < Duration::from_millis(2500),
        "dropped after {after:?} (openHandshakeTimeoutMs 600)"
    );
    // A prompt client still connects.
    RawClient::connect(port, "/own").await;
}

/// Bad values are refused with a 422 naming each by its pointer; a good object is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_websocket_settings_are_refused_with_pointers() {
    let server = TestServer::start().await;
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    for (extra, pointers) in [
        (
            json!({"maxMessageBytes": 4096, "websocket": {"maxFrameBytes": 8192}}),
            vec!["/websocket/maxFrameBytes"],
        ),
        (
            json!({"heartbeatSeconds": 30, "websocket": {"autoPingIntervalSeconds": 10}}),
            vec!["/heartbeatSeconds", "/websocket/autoPingIntervalSeconds"],
        ),
        (
            json!({"websocket": {"autoPingSize": 126, "closeHandshakeTimeoutMs": -1}}),
            vec![
                "/websocket/autoPingSize",
                "/websocket/closeHandshakeTimeoutMs",
            ],
        ),
        (
            json!({"websocket": {"openHandshakeTimeoutMs": 1000}}),
            vec!["/websocket/openHandshakeTimeoutMs"],
        ),
        (
            json!({"heartbeatSeconds": 0, "websocket": {"autoPingTimeoutSeconds": 5}}),
            vec!["/websocket/autoPingTimeoutSeconds"],
        ),
        (
            json!({"websocket": {"pingEvery": 5}}),
            vec!["/websocket/pingEvery"],
        ),
    ] {
        let mut def = listener_def("bad", "/bad", "sen");
        for (k, v) in extra.as_object().unwrap() {
            def[k] = v.clone();
        }
        let body = expect_error(
            server.create("listeners", &def).await,
            422,
            "validation_failed",
        )
        .await;
        assert_eq!(detail_pointers(&body), pointers, "{extra}: {body}");
    }
    let settings = json!({"maxFrameBytes": 16384, "autoPingIntervalSeconds": 30,
        "autoPingTimeoutSeconds": 10, "autoPingSize": 4, "idleTimeoutSeconds": 300,
        "closeHandshakeTimeoutMs": 1000, "failByDrop": true});
    let mut def = listener_def("good", "/good", "sen");
    def["heartbeatSeconds"] = json!(30);
    def["websocket"] = settings.clone();
    server.create_ok("listeners", &def).await;
    let stored = server.get_ok("/api/v1/listeners/good").await;
    assert_eq!(stored["websocket"], settings, "{stored}");
}

// ---------------------------------------------------------------------------------------------
// Client mode
// ---------------------------------------------------------------------------------------------

/// A remote WebSocket server: every accepted upgrade comes out of `accepted`.
struct Remote {
    port: u16,
    accepted: tokio::sync::mpsc::UnboundedReceiver<tokio_tungstenite::WebSocketStream<TcpStream>>,
    task: tokio::task::JoinHandle<()>,
}

impl Remote {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, accepted) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(ws) = tokio_tungstenite::accept_async(socket).await {
                        let _ = tx.send(ws);
                    }
                });
            }
        });
        Self {
            port,
            accepted,
            task,
        }
    }

    async fn next_accept(&mut self) -> tokio_tungstenite::WebSocketStream<TcpStream> {
        tokio::time::timeout(WAIT, self.accepted.recv())
            .await
            .expect("iotgate connected to the remote in time")
            .expect("remote running")
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn client_def(key: &str, port: u16, extra: Value) -> Value {
    let mut def = json!({"key": key, "name": format!("client {key}"), "listenerType": "websocket",
        "mode": "client", "contentType": "json", "hostName": "127.0.0.1", "port": port,
        "path": "/feed", "anonymous": true, "sentinel": "sen"});
    for (k, v) in extra.as_object().unwrap() {
        def[k] = v.clone();
    }
    def
}

/// The close frame the remote receives next (other frames skipped), with when it came.
async fn remote_close(
    ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>,
) -> (u16, String, Instant) {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                return (
                    u16::from(frame.code),
                    frame.reason.to_string(),
                    Instant::now(),
                )
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame from iotgate, got {other:?}"),
        }
    }
}

/// A client-mode listener closes with 1008 after its sentinel's maxFailures refused messages
/// and when no message authenticates within authTimeoutSeconds, reconnecting each time; with
/// idleTimeoutSeconds it closes a silent remote with 1000 "idle timeout".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_honours_max_failures_auth_timeout_and_idle_timeout() {
    let mut remote = Remote::start().await;
    let server = TestServer::start().await;
    server.create_ok("sentinels", &sentinel_def("sen", 2)).await;
    server
        .create_ok(
            "listeners",
            &client_def("strict", remote.port, json!({"authTimeoutSeconds": 2})),
        )
        .await;

    // maxFailures 2: the second refused message closes the connection.
    let mut ws = remote.next_accept().await;
    for _ in 0..2 {
        send_json(&mut ws, &device_msg("ghost", "no-such-key", json!({}))).await;
    }
    let (code, reason, _) = remote_close(&mut ws).await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("too many rejected messages"), "{reason}");

    // It reconnects; a remote that sends nothing is closed at the auth deadline.
    let mut ws = remote.next_accept().await;
    let connected = Instant::now();
    let (code, reason, at) = remote_close(&mut ws).await;
    assert_eq!(code, 1008, "{reason}");
    assert_eq!(reason, "no authenticated message within 2 s");
    let after = at - connected;
    assert!(
        after >= Duration::from_millis(1800) && after < Duration::from_secs(5),
        "closed {after:?} after connecting (authTimeoutSeconds 2)"
    );
    let status = server.listener_status("strict").await;
    drop(remote.next_accept().await);
    assert!(
        status["messagesReceived"].as_u64().unwrap_or(0) >= 2,
        "{status}"
    );

    // idleTimeoutSeconds on another listener (no auth deadline): a silent remote is closed.
    let mut remote = Remote::start().await;
    server
        .create_ok(
            "listeners",
            &client_def(
                "idle",
                remote.port,
                json!({"authTimeoutSeconds": 0, "websocket": {"idleTimeoutSeconds": 1}}),
            ),
        )
        .await;
    let mut ws = remote.next_accept().await;
    let connected = Instant::now();
    let (code, reason, at) = remote_close(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1000, "idle timeout"));
    assert!(
        at - connected >= Duration::from_millis(900),
        "{:?}",
        at - connected
    );
}

/// A client-mode listener pings with the configured payload and drops a remote that stops
/// answering (here: one that never reads its socket, so tungstenite sends no pongs), then
/// reconnects; a remote that never finishes the upgrade is given up after
/// openHandshakeTimeoutMs; a frame over maxFrameBytes is answered with 1009.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_honours_auto_ping_open_handshake_and_frame_cap() {
    let mut remote = Remote::start().await;
    let server = TestServer::start().await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    server
        .create_ok(
            "listeners",
            &client_def(
                "pinger",
                remote.port,
                json!({"authTimeoutSeconds": 0, "maxMessageBytes": 65536, "websocket": {"autoPingIntervalSeconds": 1,
                       "autoPingTimeoutSeconds": 1, "autoPingSize": 5, "maxFrameBytes": 1024,
                       "closeHandshakeTimeoutMs": 15000}}),
            ),
        )
        .await;
    let mut deaf = remote.next_accept().await;
    // Unread, the remote answers no ping: the first goes out after 1 s, iotgate closes 1 s
    // later and then waits up to closeHandshakeTimeoutMs (15 s) for the answer. Reading now
    // sees the frames and answers the close, which lets iotgate connect again. Reading earlier
    // would answer the ping (tungstenite pongs as it reads) and no close would ever come, so the
    // wait leaves a slow machine 4 s of margin, and the read has a deadline instead of hanging.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout_at(give_up.min(tokio::time::Instant::now() + WAIT), deaf.next())
            .await
        {
            Ok(Some(Ok(message))) => {
                let close = matches!(message, Message::Close(_));
                frames.push(message);
                if close {
                    break;
                }
            }
            other => panic!("expected pings then a close frame, got {other:?} after {frames:?}"),
        }
    }
    assert!(
        matches!(&frames[0], Message::Ping(p) if p.len() == 5),
        "no 5-byte ping first: {frames:?}"
    );
    assert!(
        matches!(frames.last(), Some(Message::Close(Some(f))) if u16::from(f.code) == 1001),
        "no 1001 close: {frames:?}"
    );
    let mut ws = remote.next_accept().await;

    // The fresh connection (read, so its pings are answered) gets a frame over the cap.
    ws.send(Message::Binary(vec![1u8; 1025].into()))
        .await
        .unwrap();
    let (code, reason, _) = remote_close(&mut ws).await;
    assert_eq!(code, 1009, "{reason}");

    // A remote that accepts TCP but never answers the upgrade.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_port = mute.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = mute.accept().await {
            sockets.push(socket);
        }
    });
    server
        .create_ok(
            "listeners",
            &client_def(
                "hurried",
                mute_port,
                json!({"websocket": {"openHandshakeTimeoutMs": 500}}),
            ),
        )
        .await;
    let status = wait_for("the upgrade to time out", WAIT, || async {
        let status = server.listener_status("hurried").await;
        status["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("timed out after 500 ms"))
            .then_some(status)
    })
    .await;
    assert_eq!(status["state"], "retrying", "{status}");
    held.abort();
}
