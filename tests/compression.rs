//! permessage-deflate (RFC 7692) on server-mode listeners, through the running binary:
//!
//! - a real client (Python `websockets`, which offers the extension by default) negotiates it,
//!   sends compressed JSON that is stored inflated, and receives its ack and a downlink
//!   compressed;
//! - on the wire (a hand-written client): the negotiated answer, compressed frames from the
//!   server with RSV1 on the first frame, a compression bomb closed with 1009 while the server's
//!   memory stays flat, invalid UTF-8 found after inflating (1007), RSV1 where it is not allowed
//!   (1002), and a listener without compression that ignores the offer;
//! - client mode: a client-mode listener offers the extension to a real server (Python
//!   `websockets`), inflates what it sends and compresses its echo; a compression bomb from the
//!   server closes with 1009; a server answer that breaks the offer fails the connection with
//!   1002 and the reason in the listener's status;
//! - the 422s for bad `compression` values.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

/// Listener `zip` at `/zip` with compression on (threshold 16 bytes, so acks are compressed
/// too), acks once accepted, credentials in the query string, 1 MiB messages; listener `plain`
/// at `/plain` the same without compression; both routed to a store. Device `d1` is registered;
/// returns its access key.
async fn setup(server: &TestServer) -> String {
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok(
            "sentinels",
            &json!({"key": "qsen", "name": "query credentials", "method": "accessKey",
                "maxFailures": 1000,
                "deviceId": {"from": "query", "name": "deviceId"},
                "accessKey": {"from": "query", "name": "accessKey"}}),
        )
        .await;
    for (key, compression) in [
        ("zip", json!({"enabled": true, "threshold": 16})),
        ("plain", json!({"enabled": false})),
    ] {
        let mut def = listener_def(key, &format!("/{key}"), "qsen");
        def["acknowledge"] = json!("accepted");
        def["maxMessageBytes"] = json!(1 << 20);
        def["compression"] = compression;
        server.create_ok("listeners", &def).await;
        server.wait_listener_state(key, "running").await;
    }
    server
        .create_ok("routes", &route_def("all", &["store"]))
        .await;
    let (key, _) = server.register_device("d1", "thermo").await;
    key
}

fn device_path(listener: &str, key: &str) -> String {
    format!("/{listener}?deviceId=d1&accessKey={}", url_encode(key))
}

/// Deflates one message as a client does (sync flush, tail stripped).
fn deflate_message(compress: &mut Compress, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() / 2 + 1024);
    let mut fed = 0;
    loop {
        out.reserve(64 * 1024);
        let before = compress.total_in();
        compress
            .compress_vec(&message[fed..], &mut out, FlushCompress::Sync)
            .unwrap();
        fed += (compress.total_in() - before) as usize;
        if fed == message.len() && out.len() < out.capacity() {
            break;
        }
    }
    assert!(out.ends_with(&DEFLATE_TAIL));
    out.truncate(out.len() - DEFLATE_TAIL.len());
    out
}

/// Inflates one message from the server (tail appended).
fn inflate_message(decompress: &mut Decompress, payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&DEFLATE_TAIL);
    let mut out = Vec::with_capacity(1 << 20);
    decompress
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

// ---------------------------------------------------------------------------------------------
// A hand-written client: it sees RSV1 and sends what it likes
// ---------------------------------------------------------------------------------------------

/// A frame as the server sent it.
#[derive(Debug)]
struct ServerFrame {
    first_byte: u8,
    payload: Vec<u8>,
}

impl ServerFrame {
    fn opcode(&self) -> u8 {
        self.first_byte & 0x0f
    }
    fn rsv1(&self) -> bool {
        self.first_byte & RSV1 != 0
    }
    fn close_code(&self) -> Option<u16> {
        (self.opcode() == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

struct RawClient {
    socket: TcpStream,
    buffer: Vec<u8>,
    /// The upgrade answer's `Sec-WebSocket-Extensions`, if any.
    extensions: Option<String>,
}

impl RawClient {
    /// Upgrades at `path` on `port`, offering `offer` as `Sec-WebSocket-Extensions`.
    async fn connect(port: u16, path: &str, offer: Option<&str>) -> Self {
        let offer = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let (socket, buffer, head) = raw_websocket_upgrade(port, path, &offer).await;
        let extensions = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_string())
        });
        Self {
            socket,
            buffer,
            extensions,
        }
    }

    /// Sends one masked frame (`first_byte`: FIN, RSV and opcode bits).
    async fn send(&mut self, first_byte: u8, payload: &[u8]) {
        let mut frame = vec![first_byte];
        let mask = [0x5a, 0x17, 0xc3, 0x08];
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

    /// The next frame, or `None` when TCP ends first.
    async fn next_frame(&mut self) -> Option<ServerFrame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buffer) {
                self.buffer.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = tokio::time::timeout(WAIT, self.socket.read(&mut chunk))
                .await
                .expect("a frame or the end of the connection in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next data frame (pings skipped).
    async fn next_data_frame(&mut self) -> ServerFrame {
        loop {
            let frame = self.next_frame().await.expect("a frame");
            if frame.opcode() != OP_PING {
                return frame;
            }
        }
    }

    /// The close code the connection ends with (`None`: TCP ended without a close frame).
    async fn close_code(&mut self) -> Option<u16> {
        while let Some(frame) = self.next_frame().await {
            if frame.opcode() == OP_CLOSE {
                return frame.close_code();
            }
        }
        None
    }
}

fn parse_server_frame(buffer: &[u8]) -> Option<(ServerFrame, usize)> {
    if buffer.len() < 2 {
        return None;
    }
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
        ServerFrame {
            first_byte: buffer[0],
            payload: buffer[header..header + length].to_vec(),
        },
        header + length,
    ))
}

// ---------------------------------------------------------------------------------------------
// A real client
// ---------------------------------------------------------------------------------------------

/// Python put in front of the scripts below: records the opcode and RSV1 bit of every data frame
/// a connection's permessage-deflate extension encodes (sent) and decodes (received).
const RECORD_DATA_FRAMES: &str = r#"
def record_data_frames(extensions):
    sent, received = [], []
    for extension in extensions:
        encode, decode = extension.encode, extension.decode
        def recording_encode(frame, encode=encode):
            out = encode(frame)
            if out.opcode.value in (1, 2):
                sent.append([out.opcode.value, out.rsv1])
            return out
        def recording_decode(frame, *, max_size=None, decode=decode):
            if frame.opcode.value in (1, 2):
                received.append([frame.opcode.value, frame.rsv1])
            return decode(frame, max_size=max_size)
        extension.encode, extension.decode = recording_encode, recording_decode
    return sent, received
"#;

/// Connects with Python `websockets` (compression="deflate"), records the RSV1 bit of every
/// data frame it sends and receives through its permessage-deflate extension, sends one JSON
/// message, reads the ack, then waits for one downlink; prints a JSON report.
const PYTHON_CLIENT: &str = r#"
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main(uri):
    async with connect(uri, compression="deflate", ping_interval=None) as ws:
        header = ws.response.headers.get("Sec-WebSocket-Extensions")
        extensions = ws.protocol.extensions
        sent, received = record_data_frames(extensions)
        message = {"messageId": "m-1", "readings": [{"sensor": "t%d" % i, "celsius": 20.5} for i in range(50)]}
        await ws.send(json.dumps(message))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 10))
        print("ACKED", flush=True)
        downlink = json.loads(await asyncio.wait_for(ws.recv(), 20))
        print(json.dumps({"header": header, "extensions": [e.name for e in extensions],
                          "ack": ack, "downlink": downlink, "sent": sent, "received": received}))

asyncio.run(main(sys.argv[1]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_client_sends_and_receives_compressed_messages() {
    let server = TestServer::start().await;
    let key = setup(&server).await;
    let python = python_clients();
    let uri = server.ws_url(&device_path("zip", &key));
    let client = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg("-c")
            .arg(format!("{RECORD_DATA_FRAMES}{PYTHON_CLIENT}"))
            .arg(uri)
            .output()
            .expect("run python")
    });
    // The message arrives inflated and whole.
    let stored = server.wait_telemetry("d1", 1).await;
    let readings = &stored[0]["payload"]["readings"];
    assert_eq!(readings.as_array().map(Vec::len), Some(50), "{}", stored[0]);
    // A downlink of a few hundred bytes, compressed on the way to the device.
    let downlink = json!({"command": "calibrate", "sensors": (0..30).map(|i| format!("t{i}")).collect::<Vec<_>>()});
    let response = server
        .api(Method::POST, "/api/v1/devices/d1/messages")
        .await
        .json(&downlink)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());

    let out = client.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let header = report["header"].as_str().unwrap_or_default();
    assert!(
        header.starts_with("permessage-deflate"),
        "negotiated answer: {report}"
    );
    assert_eq!(report["extensions"], json!(["permessage-deflate"]));
    assert_eq!(report["ack"]["ack"]["messageId"], "m-1", "{report}");
    assert_eq!(report["downlink"], downlink, "{report}");
    // The client compressed its message; iotgate compressed the ack and the downlink.
    assert_eq!(report["sent"], json!([[1, true]]), "{report}");
    assert_eq!(
        report["received"],
        json!([[1, true], [1, true]]),
        "{report}"
    );
}

// ---------------------------------------------------------------------------------------------
// On the wire
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiated_frames_on_the_wire() {
    let server = TestServer::start().await;
    let key = setup(&server).await;
    let path = device_path("zip", &key);

    let mut client = RawClient::connect(
        server.port,
        &path,
        Some("permessage-deflate; server_max_window_bits=10; client_max_window_bits"),
    )
    .await;
    assert_eq!(
        client.extensions.as_deref(),
        Some("permessage-deflate; server_max_window_bits=10")
    );
    let mut compress = Compress::new(Compression::default(), false);
    let mut decompress = Decompress::new_with_window_bits(false, 10);
    // A compressed message in two frames with a ping between: RSV1 on the first only.
    let message = json!({"messageId": "w-1", "note": "x".repeat(500)}).to_string();
    let compressed = deflate_message(&mut compress, message.as_bytes());
    let half = compressed.len() / 2;
    client.send(RSV1 | OP_TEXT, &compressed[..half]).await;
    client.send(FIN | OP_PING, b"hi").await;
    client.send(FIN | OP_CONT, &compressed[half..]).await;
    let pong = client.next_frame().await.unwrap();
    assert_eq!((pong.opcode(), pong.rsv1()), (0xa, false), "{pong:?}");
    let ack = client.next_data_frame().await;
    assert!(ack.rsv1(), "the ack is compressed: {ack:?}");
    let ack: Value =
        serde_json::from_slice(&inflate_message(&mut decompress, &ack.payload)).unwrap();
    assert_eq!(ack["ack"]["messageId"], "w-1", "{ack}");
    // The second message reuses the client's window (context takeover), and so does the
    // server's second ack.
    let message = json!({"messageId": "w-2", "note": "x".repeat(500)}).to_string();
    client
        .send(
            FIN | RSV1 | OP_TEXT,
            &deflate_message(&mut compress, message.as_bytes()),
        )
        .await;
    let ack = client.next_data_frame().await;
    assert!(ack.rsv1());
    let ack: Value =
        serde_json::from_slice(&inflate_message(&mut decompress, &ack.payload)).unwrap();
    assert_eq!(ack["ack"]["messageId"], "w-2", "{ack}");
    // An uncompressed message is fine on a compressed connection.
    let plain = json!({"messageId": "w-3", "n": 3}).to_string();
    client.send(FIN | OP_TEXT, plain.as_bytes()).await;
    let ack = client.next_data_frame().await;
    assert!(ack.rsv1(), "acks from the threshold on are compressed");
    server.wait_telemetry("d1", 3).await;

    // Invalid UTF-8 found only once inflated: 1007.
    let invalid = deflate_message(&mut compress, b"{\"bad\": \"\xff\xfe\"}");
    client.send(FIN | RSV1 | OP_TEXT, &invalid).await;
    assert_eq!(client.close_code().await, Some(1007));

    // RSV1 on a continuation frame, or on a control frame, inside a compressed message: 1002.
    for offending in [FIN | RSV1 | OP_CONT, FIN | RSV1 | OP_PING] {
        let mut client = RawClient::connect(
            server.port,
            &path,
            Some("permessage-deflate; client_max_window_bits"),
        )
        .await;
        let start = deflate_message(&mut Compress::new(Compression::fast(), false), b"{\"a\":");
        client.send(RSV1 | OP_TEXT, &start).await;
        client.send(offending, b"").await;
        assert_eq!(client.close_code().await, Some(1002), "{offending:#x}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_negotiation_rsv1_is_a_protocol_error() {
    let server = TestServer::start().await;
    let key = setup(&server).await;
    // A compressing listener and a client that does not offer the extension; a listener
    // without compression and a client that offers it: no answer, no compression, RSV1 → 1002.
    for (listener, offer) in [
        ("zip", None),
        ("plain", Some("permessage-deflate; client_max_window_bits")),
    ] {
        let mut client = RawClient::connect(server.port, &device_path(listener, &key), offer).await;
        assert_eq!(client.extensions, None, "{listener}");
        let long = json!({"messageId": "p-1", "note": "y".repeat(300)}).to_string();
        client.send(FIN | OP_TEXT, long.as_bytes()).await;
        let ack = client.next_data_frame().await;
        assert!(!ack.rsv1(), "{listener}: {ack:?}");
        let compressed = deflate_message(&mut Compress::new(Compression::fast(), false), b"{}");
        client.send(FIN | RSV1 | OP_TEXT, &compressed).await;
        assert_eq!(client.close_code().await, Some(1002), "{listener}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_bomb_closes_with_1009_and_memory_stays_flat() {
    let server = TestServer::start().await;
    let key = setup(&server).await;
    let pid = server.pid();
    // 100 MiB of zeros deflate to about 100 KiB: one frame, well under the 1 MiB frame cap.
    let zeros = vec![0u8; 100 << 20];
    let bomb = deflate_message(&mut Compress::new(Compression::best(), false), &zeros);
    drop(zeros);
    assert!(bomb.len() < 200 << 10, "bomb of {} bytes", bomb.len());

    let mut client = RawClient::connect(
        server.port,
        &device_path("zip", &key),
        Some("permessage-deflate; client_max_window_bits"),
    )
    .await;
    let rss_before = rss_kib(pid);
    let sampling = tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..100 {
            peak = peak.max(rss_kib(pid));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    });
    let started = std::time::Instant::now();
    client.send(FIN | RSV1 | OP_BINARY, &bomb).await;
    assert_eq!(client.close_code().await, Some(1009));
    let closed_after = started.elapsed();
    let rss_peak = sampling.await.unwrap().max(rss_kib(pid));
    println!(
        "FIGURE: compression bomb ({} KiB inflating to 100 MiB) → 1009 after {closed_after:.1?}; server VmRSS before {rss_before} KiB, peak {rss_peak} KiB",
        bomb.len() >> 10
    );
    // The message cap is 1 MiB: inflating past it would show as tens of MiB.
    assert!(
        rss_peak.saturating_sub(rss_before) < 16 * 1024,
        "server RSS grew by {} KiB",
        rss_peak - rss_before
    );
    // The listener still serves.
    let mut client = RawClient::connect(server.port, &device_path("zip", &key), None).await;
    client
        .send(
            FIN | OP_TEXT,
            json!({"messageId": "after"}).to_string().as_bytes(),
        )
        .await;
    assert_eq!(client.next_data_frame().await.opcode(), OP_TEXT);
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_compression_values_are_422_naming_the_field() {
    let server = TestServer::start().await;
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    let mut def = listener_def("bad", "/bad", "sen");
    def["compression"] = json!({"enabled": true, "serverMaxWindowBits": 8,
        "clientMaxWindowBits": 16, "threshold": -1, "level": 9});
    let body = expect_error(
        server.create("listeners", &def).await,
        422,
        "validation_failed",
    )
    .await;
    let mut pointers = detail_pointers(&body);
    pointers.sort();
    assert_eq!(
        pointers,
        [
            "/compression/clientMaxWindowBits",
            "/compression/level",
            "/compression/serverMaxWindowBits",
            "/compression/threshold"
        ],
        "{body}"
    );
    // Client mode compresses too: the same settings are accepted and kept.
    let client = json!({"key": "out", "name": "o", "listenerType": "websocket", "mode": "client",
        "contentType": "json", "hostName": "127.0.0.1", "port": 9, "path": "/x", "sentinel": "sen",
        "enabled": false, "compression": {"enabled": true, "serverMaxWindowBits": 10}});
    server.create_ok("listeners", &client).await;
    let stored = server.get_ok("/api/v1/listeners/out").await;
    assert_eq!(stored["compression"], client["compression"], "{stored}");
    // Valid settings are kept as written.
    def["compression"] = json!({"enabled": true, "threshold": 256, "serverNoContextTakeover": true,
        "serverMaxWindowBits": 12, "clientMaxWindowBits": 10});
    server.create_ok("listeners", &def).await;
    let stored = server.get_ok("/api/v1/listeners/bad").await;
    assert_eq!(stored["compression"], def["compression"], "{stored}");
}

// ---------------------------------------------------------------------------------------------
// Client mode
// ---------------------------------------------------------------------------------------------

/// A Python `websockets` server with compression (its default): prints `{"port": N}`, then for
/// the first connection prints a JSON report. `echo`: sends one compressible JSON message and
/// reads the echo; `bomb`: sends 4 MiB of zeros (a few KiB compressed) and reports the close.
/// The RSV1 bit of every data frame either way is recorded with [`RECORD_DATA_FRAMES`].
const PYTHON_SERVER: &str = r#"
import asyncio, json, sys
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

async def main(mode):
    done = asyncio.get_running_loop().create_future()
    async def bomb(ws):
        await ws.send("0" * (4 << 20))
        try:
            await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed:
            pass
    async def handler(ws):
        if done.done():
            # A bomb server stays one: iotgate's retries meet the same bomb, so the listener's
            # lastError keeps naming it.
            if mode == "bomb":
                await bomb(ws)
            await ws.wait_closed()
            return
        offer = ws.request.headers.get("Sec-WebSocket-Extensions")
        answer = ws.response.headers.get("Sec-WebSocket-Extensions")
        extensions = ws.protocol.extensions
        sent, received = record_data_frames(extensions)
        report = {"offer": offer, "answer": answer, "extensions": [e.name for e in extensions]}
        if mode == "echo":
            message = {"deviceId": "gw-1", "readings": [{"sensor": "t%d" % i, "celsius": 20.5} for i in range(50)]}
            await ws.send(json.dumps(message))
            report["echo"] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        else:
            await bomb(ws)
            report["closeCode"] = ws.close_code
            report["closeReason"] = ws.close_reason
        report["sent"], report["received"] = sent, received
        done.set_result(report)
    async with serve(handler, "127.0.0.1", 0, compression="deflate", max_size=None,
                     ping_interval=None) as server:
        print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
        print(json.dumps(await asyncio.wait_for(done, 60)), flush=True)
        if mode == "bomb":
            await asyncio.Future()  # serve until the test kills the process

asyncio.run(main(sys.argv[1]))
"#;

/// The Python server of [`PYTHON_SERVER`], running.
struct PythonServer {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    port: u16,
}

impl PythonServer {
    fn start(mode: &str) -> Self {
        let mut child = Command::new(python_clients())
            .arg("-c")
            .arg(format!("{RECORD_DATA_FRAMES}{PYTHON_SERVER}"))
            .arg(mode)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run python");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = sender.send(line);
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("the Python server printed its port");
        let port = serde_json::from_str::<Value>(&first).unwrap()["port"]
            .as_u64()
            .unwrap() as u16;
        Self { child, lines, port }
    }

    /// The report of the first connection.
    async fn report(&mut self) -> Value {
        let line = tokio::task::block_in_place(|| self.lines.recv_timeout(Duration::from_secs(60)))
            .expect("the Python server's report");
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client-mode listener `out` to `127.0.0.1:port/feed` with compression on (threshold 16),
/// echo on, 1 MiB messages, routed to the websocket downstream `/stream/out`. Returns a
/// subscriber to that downstream, connected before the listener exists: the remote may send
/// the moment iotgate connects, and the live downstream does not replay what came before.
async fn client_mode_setup(server: &TestServer, port: u16, compression: Value) -> Ws {
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("out", "/stream/out", "envelope"),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["out"]))
        .await;
    let subscriber = server.subscribe("/stream/out").await;
    let def = json!({"key": "out", "name": "Out", "listenerType": "websocket", "mode": "client",
        "contentType": "json", "hostName": "127.0.0.1", "port": port, "path": "/feed",
        "echo": true, "maxMessageBytes": 1 << 20, "heartbeatSeconds": 0,
        // The remote is trusted with Basic credentials (no sentinel); plain ws:// on loopback.
        "anonymous": false, "userName": "gw", "password": "gw-pass-1234",
        "allowInsecureCredentials": true,
        "compression": compression});
    server.create_ok("listeners", &def).await;
    subscriber
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_compresses_both_ways_with_a_real_server() {
    let mut remote = PythonServer::start("echo");
    let server = TestServer::start().await;
    let mut sub = client_mode_setup(
        &server,
        remote.port,
        json!({"enabled": true, "threshold": 16}),
    )
    .await;
    let report = remote.report().await;
    // iotgate offered the extension, allowing the server to limit its window.
    assert_eq!(
        report["offer"], "permessage-deflate; client_max_window_bits",
        "{report}"
    );
    assert!(
        report["answer"]
            .as_str()
            .is_some_and(|a| a.starts_with("permessage-deflate")),
        "{report}"
    );
    assert_eq!(report["extensions"], json!(["permessage-deflate"]));
    // The server's message was compressed and reached the route inflated and whole ...
    assert_eq!(report["sent"], json!([[1, true]]), "{report}");
    let got = recv_n_json(&mut sub, 1, WAIT).await;
    assert_eq!(got[0]["listenerKey"], "out", "{}", got[0]);
    assert_eq!(
        got[0]["payload"]["readings"].as_array().map(Vec::len),
        Some(50),
        "{}",
        got[0]
    );
    // ... and iotgate's echo went back compressed.
    assert_eq!(report["received"], json!([[1, true]]), "{report}");
    assert_eq!(report["echo"], got[0]["payload"], "{report}");
    let status = server.listener_status("out").await;
    assert_eq!(status["messagesAccepted"], 1, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_closes_a_compression_bomb_with_1009() {
    let mut remote = PythonServer::start("bomb");
    let server = TestServer::start().await;
    client_mode_setup(&server, remote.port, json!({"enabled": true})).await;
    let report = remote.report().await;
    // 4 MiB of zeros in a few KiB: stopped at the 1 MiB cap, with a close frame saying why.
    assert_eq!(report["sent"], json!([[1, true]]), "{report}");
    assert_eq!(report["closeCode"], 1009, "{report}");
    assert!(
        report["closeReason"]
            .as_str()
            .is_some_and(|r| r.contains("inflates past")),
        "{report}"
    );
    let status = server.wait_listener_state("out", "retrying").await;
    assert!(
        status["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("inflates past")),
        "{status}"
    );
}

/// A server whose answer breaks the offer: `server_max_window_bits=12` when iotgate asked for 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_fails_an_answer_that_breaks_the_offer_with_1002() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = TestServer::start().await;
    client_mode_setup(
        &server,
        port,
        json!({"enabled": true, "serverMaxWindowBits": 10}),
    )
    .await;
    let (tcp, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("iotgate connects")
        .unwrap();
    let offered = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen = offered.clone();
    #[allow(clippy::result_large_err)] // the callback's signature is tungstenite's
    let answer_too_large =
        move |request: &tokio_tungstenite::tungstenite::handshake::server::Request,
              mut response: tokio_tungstenite::tungstenite::handshake::server::Response| {
            *seen.lock().unwrap() = request
                .headers()
                .get("sec-websocket-extensions")
                .map(|v| v.to_str().unwrap().to_owned());
            response.headers_mut().insert(
                "sec-websocket-extensions",
                "permessage-deflate; server_max_window_bits=12"
                    .parse()
                    .unwrap(),
            );
            Ok(response)
        };
    let mut ws = tokio_tungstenite::accept_hdr_async(tcp, answer_too_large)
        .await
        .unwrap();
    assert_eq!(
        offered.lock().unwrap().as_deref(),
        Some("permessage-deflate; server_max_window_bits=10; client_max_window_bits")
    );
    let close = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws))
        .await
        .expect("a close frame");
    let Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) = close else {
        panic!("expected a close frame, got {close:?}");
    };
    assert_eq!(u16::from(frame.code), 1002);
    assert!(
        frame.reason.contains("server_max_window_bits=12"),
        "{}",
        frame.reason
    );
    let status = server.wait_listener_state("out", "retrying").await;
    assert!(
        status["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("more than the 10")),
        "{status}"
    );
}
