//! WebSocket protocol conformance: the Autobahn|Testsuite (`wstest`, autobahntestsuite 0.8.2)
//! against the real binary, cases 1–7, 9 and 10 (framing, pings, reserved bits, opcodes,
//! fragmentation, UTF-8, closing, large messages and performance, auto-fragmentation), and 12
//! and 13 (permessage-deflate: compressed echo of many message sizes, and the negotiation of
//! window sizes and context takeover), in both modes.
//!
//! * [`server_mode_conformance`]: wstest's fuzzing *client* connects to a server-mode listener
//!   (`contentType: binary`, `echo: true`, 16 MiB messages, no heartbeat, `compression`
//!   enabled) whose sentinel reads the device's credentials from the query string, so every fuzz
//!   message is authenticated, routed and echoed.
//! * [`client_mode_conformance`]: wstest's fuzzing *server* is driven by a client-mode listener
//!   (the same settings, with Basic credentials instead of a sentinel). For case N the listener's `path` is set (hot reload, `PUT`) to `/runCase?case=N&agent=iotgate`;
//!   the connection goes through a small TCP gate in this test that lets exactly one connection
//!   with that path through, so a reconnect after the case ended never adds a second run of it.
//!
//! wstest needs Python 2.7: `tests/autobahn/setup.sh` creates (or reuses) the virtualenv
//! `target/autobahn-venv`. Both tests FAIL when it cannot be set up or run; they never skip.
//! A case passes when its `behavior` is OK or INFORMATIONAL (client mode: also NON-STRICT, which
//! tungstenite's per-frame UTF-8 check gives in 6.4.3 and 6.4.4) and its `behaviorClose`
//! OK or INFORMATIONAL; `tests/autobahn/expected-non-ok.json` lists, with reasons, the cases
//! allowed to differ (and with which result). Reports (index.html, index.json, one file per case)
//! and a summary (`summary.txt`) are written to `target/autobahn/{server,client}/`. To see the
//! summary: `cargo test --test autobahn -- --nocapture`.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// The case groups both modes run: framing through auto-fragmentation, and 12.* and 13.*
/// (permessage-deflate; the listeners enable `compression`, so wstest's offers and answers are
/// met, and cases that negotiate nothing run uncompressed as before).
const CASES: [&str; 11] = [
    "1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*", "12.*", "13.*",
];
/// Left out: the last four cases of every 12.* and 13.* group (1,000 messages of 128 KiB each,
/// the largest fragment sizes). They took half of each mode's time (1,042 of 2,024 s on a slow day
/// of the 2-core machine, nearly all of it wstest compressing in Python 2) and add no path the
/// other 168 compression cases do not take: 64 and 128 KiB messages stay in (x.10 to x.14), and
/// `tests/compression.rs` sends 4 MiB. (wstest matches these as regular-expression prefixes.)
const EXCLUDED_CASES: [&str; 8] = [
    "12.*.15", "12.*.16", "12.*.17", "12.*.18", "13.*.15", "13.*.16", "13.*.17", "13.*.18",
];
/// How many cases those groups hold in autobahntestsuite 0.8.2, less the excluded (a guard
/// against a cut-short run): 301 in 1–10, 90 − 20 in 12.* and 126 − 28 in 13.* (`Case12_X_X`,
/// `Case13_X_X` of its case/case12_x_x.py).
const CASE_COUNT: usize = 301 + 70 + 98;
const AGENT: &str = "iotgate";
const MAX_MESSAGE_BYTES: u64 = 16 * 1024 * 1024;

const ACCEPTABLE_BEHAVIOR: [&str; 3] = ["OK", "NON-STRICT", "INFORMATIONAL"];
/// Server mode allows no NON-STRICT case: our frame guard fails fast on invalid UTF-8 and lets
/// every message completed before a violation through first (see `frame_guard.rs`).
const ACCEPTABLE_SERVER_BEHAVIOR: [&str; 2] = ["OK", "INFORMATIONAL"];
const ACCEPTABLE_CLOSE: [&str; 2] = ["OK", "INFORMATIONAL"];

/// wstest in fuzzingclient mode must finish within this (a hang guard: the run takes 15–35 minutes
/// on 2 shared cores, nearly all of it wstest compressing and checking 12.* and 13.*).
const SERVER_RUN_LIMIT: Duration = Duration::from_secs(3000);
/// The cases without compression (1.* to 10.*, 301 of them) must take less than this in all:
/// 20–40 s on 2 shared cores. A side that waits out a timeout on every case (e.g. not closing the
/// TCP connection after the closing handshake) shows here at once, whatever the machine's speed;
/// 12.* and 13.* take as long as wstest (Python 2) needs to compress 1000 messages per case, which
/// varied from 15 to 34 minutes between sessions on this machine, so their time proves nothing.
const UNCOMPRESSED_CASES_BUDGET: Duration = Duration::from_secs(300);
/// One client-mode case (connect to the end of the connection).
const CLIENT_CASE_LIMIT: Duration = Duration::from_secs(60);
/// All client-mode cases.
const CLIENT_RUN_LIMIT: Duration = Duration::from_secs(3000);
/// From the listener PUT to the gated connection for the case.
const CLIENT_CONNECT_LIMIT: Duration = Duration::from_secs(20);

const DEVICE_ID: &str = "autobahn-fuzzer";
const CLIENT_USER: &str = "autobahn";
const CLIENT_PASSWORD: &str = "autobahn-client-password";

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn server_mode_conformance() {
    let _serial = serial();
    let wstest = setup_wstest();
    runtime().block_on(server_mode(wstest));
}

#[test]
fn client_mode_conformance() {
    let _serial = serial();
    let wstest = setup_wstest();
    runtime().block_on(client_mode(wstest));
}

/// The two runs take turns: each wants both cores, and cases 9.* measure time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn server_mode(wstest: PathBuf) {
    let started = Instant::now();
    let dir = mode_dir("server");
    let mut server = TestServer::start().await;
    let (access_key, _) = server.register_device(DEVICE_ID, "autobahn").await;
    create_pipeline(&server).await;
    server
        .create_ok(
            "listeners",
            &json!({
                "key": "autobahn", "name": "Autobahn fuzzing client", "listenerType": "websocket",
                "mode": "server", "contentType": "binary", "echo": true,
                "maxMessageBytes": MAX_MESSAGE_BYTES, "heartbeatSeconds": 0, "path": "/echo",
                "anonymous": true, "sentinel": "autobahn-query",
                // Cases 12 and 13 offer permessage-deflate; the others offer nothing and run
                // uncompressed as before.
                "compression": {"enabled": true}
            }),
        )
        .await;
    server.wait_listener_state("autobahn", "running").await;

    let path = format!(
        "/echo?deviceId={}&key={}",
        urlencode(DEVICE_ID),
        urlencode(&access_key)
    );
    // A set-up mistake should fail here, not as 301 failed cases.
    {
        let mut ws = server.connect_device(&path).await;
        ws.send(Message::Binary(b"autobahn sanity".to_vec().into()))
            .await
            .expect("send the sanity message");
        match next_event(&mut ws, WAIT).await {
            WsEvent::Binary(b) => assert_eq!(b, b"autobahn sanity", "echo of the sanity message"),
            other => panic!("the server-mode listener did not echo the sanity message: {other:?}"),
        }
        let _ = ws.close(None).await;
    }

    let spec = json!({
        "outdir": dir.join("reports"),
        "servers": [{"agent": AGENT, "url": server.ws_url(&path)}],
        "cases": CASES,
        "exclude-cases": EXCLUDED_CASES,
        "exclude-agent-cases": {},
    });
    write_spec(&dir, &spec);

    let run_started = Instant::now();
    let mut wstest = Wstest::spawn(&wstest, "fuzzingclient", &dir, &[]);
    let deadline = Instant::now() + SERVER_RUN_LIMIT;
    let status = loop {
        if let Some(status) = wstest.try_exit() {
            break status;
        }
        if Instant::now() >= deadline {
            wstest.kill();
            panic!(
                "wstest fuzzingclient did not finish within {SERVER_RUN_LIMIT:?}\n{}",
                wstest.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let run_time = run_started.elapsed();
    assert!(
        status.success(),
        "wstest fuzzingclient exited with {status}\n{}",
        wstest.log_tail()
    );
    assert_alive(&mut server);

    finish(
        "server",
        "wstest -m fuzzingclient against a server-mode listener",
        &dir,
        run_time,
        started,
        Vec::new(),
    );
}

async fn client_mode(wstest: PathBuf) {
    let started = Instant::now();
    let dir = mode_dir("client");
    let fuzz_port = free_port();
    let spec = json!({
        "url": format!("ws://127.0.0.1:{fuzz_port}"),
        "outdir": dir.join("reports"),
        "cases": CASES,
        "exclude-cases": EXCLUDED_CASES,
        "exclude-agent-cases": {},
    });
    write_spec(&dir, &spec);
    // --webport 0: no embedded web server (it would take port 8080).
    let mut wstest = Wstest::spawn(&wstest, "fuzzingserver", &dir, &["--webport", "0"]);
    let count = case_count(&mut wstest, fuzz_port).await;
    assert_eq!(
        count, CASE_COUNT,
        "the fuzzing server offers {count} cases for {CASES:?}"
    );

    let mut server = TestServer::start().await;
    create_pipeline(&server).await;
    let mut gate = Gate::start(fuzz_port).await;

    let run_started = Instant::now();
    let deadline = run_started + CLIENT_RUN_LIMIT;
    let mut problems = Vec::new();
    for case in 1..=count {
        let path = format!("/runCase?case={case}&agent={AGENT}");
        gate.expect(&path, case);
        let def = client_listener_def(gate.port, &path, true);
        if case == 1 {
            server.create_ok("listeners", &def).await;
        } else {
            server.update_ok("listeners", &def).await;
        }
        if !gate.wait_connected(case, CLIENT_CONNECT_LIMIT).await {
            let status = server.listener_status("autobahn-client").await;
            panic!(
                "case {case}: the client-mode listener did not connect with path {path} within \
                 {CLIENT_CONNECT_LIMIT:?}; listener status {status}; paths refused by the gate: {:?}",
                gate.refused
            );
        }
        if !gate.wait_ended(case, CLIENT_CASE_LIMIT).await {
            problems.push(format!(
                "case {case}: the connection did not end within {CLIENT_CASE_LIMIT:?} \
                 (the next case's PUT restarted the listener)"
            ));
        }
        if Instant::now() >= deadline {
            panic!("client mode: only {case} of {count} cases ran within {CLIENT_RUN_LIMIT:?}");
        }
    }
    // No reconnect may add a run now.
    server
        .update_ok(
            "listeners",
            &client_listener_def(gate.port, "/runCase?case=1&agent=none", false),
        )
        .await;
    server
        .wait_listener_state("autobahn-client", "disabled")
        .await;
    let run_time = run_started.elapsed();
    assert_alive(&mut server);
    eprintln!(
        "client mode: {count} cases in {run_time:.1?}; {} reconnects refused by the gate",
        gate.refused.len()
    );

    update_reports(&mut wstest, fuzz_port, &dir).await;
    drop(wstest);
    finish(
        "client",
        "wstest -m fuzzingserver driving a client-mode listener",
        &dir,
        run_time,
        started,
        problems,
    );
}

// ---------------------------------------------------------------------------------------------
// iotgate definitions
// ---------------------------------------------------------------------------------------------

/// The sentinel (query credentials), the websocket downstream and a route to it. Nobody
/// subscribes to the downstream: accepted messages are broadcast to no one.
async fn create_pipeline(server: &TestServer) {
    server
        .create_ok(
            "sentinels",
            &json!({
                "key": "autobahn-query", "name": "Autobahn query credentials", "method": "accessKey",
                "deviceId": {"from": "query", "name": "deviceId"},
                "accessKey": {"from": "query", "name": "key"}
            }),
        )
        .await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("autobahn-sink", "/autobahn-sink", "payload"),
        )
        .await;
    server
        .create_ok("routes", &route_def("autobahn-route", &["autobahn-sink"]))
        .await;
}

/// The client-mode listener. It is not anonymous (Basic credentials, which the fuzzing server
/// ignores) and so needs no sentinel: a client-mode connection has no query credentials of its
/// own, and with a sentinel every fuzz message would be dead-lettered. This way the messages are
/// accepted and routed like a real remote gateway's.
fn client_listener_def(port: u16, path: &str, enabled: bool) -> Value {
    json!({
        "key": "autobahn-client", "name": "Autobahn fuzzing server", "listenerType": "websocket",
        "mode": "client", "hostName": "127.0.0.1", "port": port, "path": path,
        "contentType": "binary", "echo": true, "maxMessageBytes": MAX_MESSAGE_BYTES,
        "heartbeatSeconds": 0, "anonymous": false, "userName": CLIENT_USER,
        "password": CLIENT_PASSWORD, "enabled": enabled,
        // The fuzzing server speaks plain ws:// on the loopback.
        "allowInsecureCredentials": true,
        // Offered on every connection: 12.* and 13.* accept it, the other cases decline it.
        "compression": {"enabled": true}
    })
}

fn assert_alive(server: &mut TestServer) {
    let child = server.child.as_mut().expect("iotgate was started");
    if let Ok(Some(status)) = child.try_wait() {
        panic!("iotgate died during the fuzzing run: {status}");
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

// ---------------------------------------------------------------------------------------------
// wstest: setup and processes
// ---------------------------------------------------------------------------------------------

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent (the target directory)")
        .to_path_buf()
}

/// Runs tests/autobahn/setup.sh (creates or reuses target/autobahn-venv); returns `wstest`.
fn setup_wstest() -> PathBuf {
    let venv = target_dir().join("autobahn-venv");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/autobahn/setup.sh");
    let started = Instant::now();
    let output = Command::new("bash")
        .arg(&script)
        .env("AUTOBAHN_VENV", &venv)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Autobahn|Testsuite could not be set up ({} exited with {}); this test needs Python \
         2.7 (pyenv 2.7.18) and PyPI.\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        script.display(),
        output.status
    );
    eprintln!(
        "{} ({:.1?})",
        stdout.lines().last().unwrap_or("autobahn setup done"),
        started.elapsed()
    );
    let wstest = venv.join("bin/wstest");
    assert!(
        wstest.exists(),
        "{} succeeded but {} is missing",
        script.display(),
        wstest.display()
    );
    wstest
}

/// `target/autobahn/<mode>`, without the reports of an earlier run.
fn mode_dir(mode: &str) -> PathBuf {
    let dir = target_dir().join("autobahn").join(mode);
    let reports = dir.join("reports");
    if reports.exists() {
        fs::remove_dir_all(&reports).expect("remove old reports");
    }
    fs::create_dir_all(&reports).expect("create the report directory");
    dir
}

fn write_spec(dir: &Path, spec: &Value) {
    fs::write(
        dir.join("spec.json"),
        serde_json::to_string_pretty(spec).unwrap(),
    )
    .expect("write spec.json");
}

/// A wstest child process, killed when dropped; its output goes to `<dir>/wstest.log`.
struct Wstest {
    child: Option<Child>,
    log: PathBuf,
}

impl Wstest {
    fn spawn(wstest: &Path, mode: &str, dir: &Path, extra: &[&str]) -> Self {
        let log = dir.join("wstest.log");
        let out = fs::File::create(&log).expect("create wstest.log");
        let err = out.try_clone().expect("clone the log handle");
        let child = Command::new(wstest)
            .args(["-m", mode, "-s", "spec.json"])
            .args(extra)
            .current_dir(dir)
            .env("PYTHONWARNINGS", "ignore")
            .env("PYTHONUNBUFFERED", "1")
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", wstest.display()));
        Self {
            child: Some(child),
            log,
        }
    }

    fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        child.try_wait().expect("wait for wstest")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- {} (last {} lines) ---\n{}",
            self.log.display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }
}

impl Drop for Wstest {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Waits for the fuzzing server to accept connections and asks it for `/getCaseCount`.
async fn case_count(wstest: &mut Wstest, port: u16) -> usize {
    let url = format!("ws://127.0.0.1:{port}/getCaseCount");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = wstest.try_exit() {
            panic!(
                "wstest fuzzingserver exited with {status} before serving\n{}",
                wstest.log_tail()
            );
        }
        if let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url.as_str()),
        )
        .await
        {
            match next_event(&mut ws, WAIT).await {
                WsEvent::Text(t) => {
                    return t
                        .trim()
                        .parse()
                        .unwrap_or_else(|e| panic!("getCaseCount answered {t:?}: {e}"))
                }
                other => panic!("getCaseCount: expected the count, got {other:?}"),
            }
        }
        if Instant::now() >= deadline {
            panic!(
                "wstest fuzzingserver did not accept connections on port {port} within 30 s\n{}",
                wstest.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `/updateReports?agent=iotgate`: the fuzzing server writes the reports, then closes.
async fn update_reports(wstest: &mut Wstest, port: u16, dir: &Path) {
    let url = format!("ws://127.0.0.1:{port}/updateReports?agent={AGENT}");
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    .expect("connect to /updateReports in time")
    .unwrap_or_else(|e| panic!("connect to /updateReports: {e}\n{}", wstest.log_tail()));
    loop {
        match next_event(&mut ws, Duration::from_secs(60)).await {
            WsEvent::Text(_) | WsEvent::Binary(_) => continue,
            WsEvent::Close(_) | WsEvent::Ended | WsEvent::Error(_) => break,
            WsEvent::Timeout => panic!(
                "/updateReports did not close within 60 s\n{}",
                wstest.log_tail()
            ),
        }
    }
    let index = dir.join("reports/index.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !index.exists() {
        assert!(
            Instant::now() < deadline,
            "{} was not written\n{}",
            index.display(),
            wstest.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The gate between the client-mode listener and the fuzzing server
// ---------------------------------------------------------------------------------------------

enum GateEvent {
    Connected(usize),
    Ended(usize),
    Refused(String),
}

/// A TCP relay that passes exactly one connection per expected request path (`GET <path>`) to
/// the fuzzing server and refuses every other one. The bytes are relayed unchanged, half-closes
/// included, so who closes the TCP connection first is what the fuzzing server sees.
struct Gate {
    port: u16,
    expected: Arc<Mutex<Option<(String, usize)>>>,
    events: mpsc::UnboundedReceiver<GateEvent>,
    /// Request paths refused so far (reconnects to a finished case).
    refused: Vec<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gate {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let port = listener.local_addr().unwrap().port();
        let expected: Arc<Mutex<Option<(String, usize)>>> = Arc::new(Mutex::new(None));
        let (tx, events) = mpsc::unbounded_channel();
        let task = {
            let expected = expected.clone();
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    tokio::spawn(gate_connection(
                        socket,
                        expected.clone(),
                        tx.clone(),
                        upstream,
                    ));
                }
            })
        };
        Self {
            port,
            expected,
            events,
            refused: Vec::new(),
            task,
        }
    }

    fn expect(&self, path: &str, case: usize) {
        *self.expected.lock().unwrap() = Some((path.to_string(), case));
    }

    async fn next_event(&mut self, deadline: tokio::time::Instant) -> Option<GateEvent> {
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(GateEvent::Refused(path))) => self.refused.push(path),
                Ok(Some(event)) => return Some(event),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    async fn wait_connected(&mut self, case: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while let Some(event) = self.next_event(deadline).await {
            if matches!(event, GateEvent::Connected(c) if c == case) {
                return true;
            }
        }
        false
    }

    async fn wait_ended(&mut self, case: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while let Some(event) = self.next_event(deadline).await {
            if matches!(event, GateEvent::Ended(c) if c == case) {
                return true;
            }
        }
        false
    }
}

async fn gate_connection(
    mut inbound: TcpStream,
    expected: Arc<Mutex<Option<(String, usize)>>>,
    events: mpsc::UnboundedSender<GateEvent>,
    upstream: u16,
) {
    // The request head: iotgate sends nothing else before the fuzzing server's 101.
    let mut head = Vec::new();
    let read_head = async {
        let mut buf = [0u8; 4096];
        loop {
            let n = inbound.read(&mut buf).await.ok()?;
            if n == 0 || head.len() > 64 * 1024 {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(());
            }
        }
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(10), read_head).await,
        Ok(Some(()))
    ) {
        return;
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .unwrap_or_default()
        .to_string();
    // The fuzzing server refuses (400) a Host header naming another port than its own.
    let head: String = head
        .split_inclusive("\r\n")
        .map(|line| match line.split_once(':') {
            Some((name, _)) if name.eq_ignore_ascii_case("host") => {
                format!("{name}: 127.0.0.1:{upstream}\r\n")
            }
            _ => line.to_string(),
        })
        .collect();
    let case = {
        let mut slot = expected.lock().unwrap();
        match slot.as_ref() {
            Some((want, case)) if *want == path => {
                let case = *case;
                *slot = None;
                case
            }
            _ => {
                let _ = events.send(GateEvent::Refused(path));
                return;
            }
        }
    };
    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        let _ = events.send(GateEvent::Refused(format!(
            "{path} (fuzzing server unreachable)"
        )));
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let _ = events.send(GateEvent::Connected(case));
    if outbound.write_all(head.as_bytes()).await.is_ok() {
        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
    }
    let _ = events.send(GateEvent::Ended(case));
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

struct CaseResult {
    id: String,
    behavior: String,
    behavior_close: String,
    duration_ms: u64,
    report_file: String,
}

impl CaseResult {
    fn acceptable(&self, mode: &str) -> bool {
        let behaviors: &[&str] = if mode == "server" {
            &ACCEPTABLE_SERVER_BEHAVIOR
        } else {
            &ACCEPTABLE_BEHAVIOR
        };
        behaviors.contains(&self.behavior.as_str())
            && ACCEPTABLE_CLOSE.contains(&self.behavior_close.as_str())
    }
}

/// Cases 12.* and 13.*: permessage-deflate.
fn is_compression_case(id: &str) -> bool {
    matches!(id.split('.').next(), Some("12" | "13"))
}

fn case_key(id: &str) -> Vec<u32> {
    id.split('.')
        .map(|p| p.parse().unwrap_or(u32::MAX))
        .collect()
}

fn load_index(reports: &Path) -> Vec<CaseResult> {
    let path = reports.join("index.json");
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read the report {}: {e}", path.display()));
    let index: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let cases = index[AGENT].as_object().unwrap_or_else(|| {
        panic!(
            "{} has no results for agent {AGENT:?} (no case ran: look for refused upgrades \
                 in iotgate's log and in wstest.log): {text:.500}",
            path.display()
        )
    });
    let mut results: Vec<CaseResult> = cases
        .iter()
        .map(|(id, r)| CaseResult {
            id: id.clone(),
            behavior: r["behavior"].as_str().unwrap_or("?").to_string(),
            behavior_close: r["behaviorClose"].as_str().unwrap_or("?").to_string(),
            duration_ms: r["duration"].as_u64().unwrap_or(0),
            report_file: r["reportfile"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    results.sort_by_key(|r| case_key(&r.id));
    results
}

/// One field of the case's own report, as text.
fn case_field(reports: &Path, result: &CaseResult, field: &str) -> String {
    fs::read_to_string(reports.join(&result.report_file))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v[field].as_str().map(str::to_owned))
        .unwrap_or_else(|| "-".into())
}

/// What the case's own report says: description, expectation, result and the close details.
fn case_detail(reports: &Path, result: &CaseResult) -> String {
    let path = reports.join(&result.report_file);
    let Ok(report) = fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
    else {
        return format!("    (no readable case report {})", path.display());
    };
    let text = |k: &str| -> String {
        match &report[k] {
            Value::String(s) => s.replace("<br>", " ").replace('\n', " "),
            Value::Null => "-".into(),
            other => other.to_string(),
        }
    };
    format!(
        "    description: {}\n    expectation: {}\n    result: {}\n    resultClose: {}\n    \
         expectedClose: {}; localCloseCode {} remoteCloseCode {} remoteCloseReason {}; wasClean {} \
         ({}); droppedByMe {} failedByMe {}; duration {} ms; report {}",
        text("description"),
        text("expectation"),
        text("result"),
        text("resultClose"),
        text("expectedClose"),
        text("localCloseCode"),
        text("remoteCloseCode"),
        text("remoteCloseReason"),
        text("wasClean"),
        text("wasNotCleanReason"),
        text("droppedByMe"),
        text("failedByMe"),
        result.duration_ms,
        path.display()
    )
}

/// One entry of tests/autobahn/expected-non-ok.json.
struct Allowed {
    behavior: String,
    behavior_close: String,
    reason: String,
}

fn load_allow_list(mode: &str) -> BTreeMap<String, Allowed> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/autobahn/expected-non-ok.json");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let list: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let entries = list[mode]
        .as_array()
        .unwrap_or_else(|| panic!("{} has no array {mode:?}", path.display()));
    let mut allowed = BTreeMap::new();
    for entry in entries {
        let field = |k: &str| -> String {
            entry[k]
                .as_str()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| panic!("{}: {mode} entry {entry} needs {k:?}", path.display()))
                .to_string()
        };
        let case = field("case");
        let previous = allowed.insert(
            case.clone(),
            Allowed {
                behavior: field("behavior"),
                behavior_close: field("behaviorClose"),
                reason: field("reason"),
            },
        );
        assert!(
            previous.is_none(),
            "{}: case {case} listed twice for {mode}",
            path.display()
        );
    }
    allowed
}

/// Parses the report, prints and stores the summary, and asserts every case (both modes run
/// [`CASES`] less [`EXCLUDED_CASES`]: [`CASE_COUNT`] of them).
fn finish(
    mode: &str,
    what: &str,
    dir: &Path,
    run_time: Duration,
    started: Instant,
    mut problems: Vec<String>,
) {
    let reports = dir.join("reports");
    let results = load_index(&reports);
    let allowed = load_allow_list(mode);
    if results.len() != CASE_COUNT {
        problems.push(format!(
            "the report has {} cases, expected {CASE_COUNT}",
            results.len()
        ));
    }
    let mut behaviors: BTreeMap<&str, usize> = BTreeMap::new();
    let mut closes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut notable: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut allowed_seen = Vec::new();
    let mut failed: BTreeMap<String, Vec<&CaseResult>> = BTreeMap::new();
    for r in &results {
        *behaviors.entry(&r.behavior).or_default() += 1;
        *closes.entry(&r.behavior_close).or_default() += 1;
        if r.behavior != "OK" || r.behavior_close != "OK" {
            notable
                .entry(format!("{} / {}", r.behavior, r.behavior_close))
                .or_default()
                .push(&r.id);
        }
        match allowed.get(&r.id) {
            Some(a) if a.behavior == r.behavior && a.behavior_close == r.behavior_close => {
                allowed_seen.push(format!(
                    "  {} {} / {}: {}",
                    r.id, r.behavior, r.behavior_close, a.reason
                ));
            }
            Some(a) if r.acceptable(mode) => problems.push(format!(
                "case {} is listed in expected-non-ok.json ({} / {}) but now passes ({} / {}): \
                 remove the entry",
                r.id, a.behavior, a.behavior_close, r.behavior, r.behavior_close
            )),
            Some(a) => problems.push(format!(
                "case {}: behavior {} / behaviorClose {}, but expected-non-ok.json allows {} / {}\n{}",
                r.id,
                r.behavior,
                r.behavior_close,
                a.behavior,
                a.behavior_close,
                case_detail(&reports, r)
            )),
            None if r.acceptable(mode) => {}
            None => failed
                .entry(format!(
                    "behavior {} / behaviorClose {} ({})",
                    r.behavior,
                    r.behavior_close,
                    case_field(&reports, r, "resultClose")
                ))
                .or_default()
                .push(r),
        }
    }
    // Failures grouped by outcome: every case id, and the details of the first few.
    for (outcome, cases) in &failed {
        let ids: Vec<&str> = cases.iter().map(|r| r.id.as_str()).collect();
        let mut text = format!("{} case(s) with {outcome}: {}", cases.len(), ids.join(" "));
        for r in cases.iter().take(3) {
            text.push_str(&format!("\n  case {}:\n{}", r.id, case_detail(&reports, r)));
        }
        problems.push(text);
    }
    for case in allowed.keys() {
        if !results.iter().any(|r| &r.id == case) {
            problems.push(format!(
                "case {case} is listed in expected-non-ok.json but is not in the report"
            ));
        }
    }

    let mut by_time: Vec<&CaseResult> = results.iter().collect();
    by_time.sort_by_key(|r| std::cmp::Reverse(r.duration_ms));
    let slowest = |n: usize, keep: fn(&CaseResult) -> bool| {
        by_time
            .iter()
            .filter(|r| keep(r))
            .take(n)
            .map(|r| format!("{} {} ms", r.id, r.duration_ms))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let uncompressed = Duration::from_millis(
        results
            .iter()
            .filter(|r| !is_compression_case(&r.id))
            .map(|r| r.duration_ms)
            .sum(),
    );
    if uncompressed > UNCOMPRESSED_CASES_BUDGET {
        problems.push(format!(
            "the cases without compression took {uncompressed:.1?} in all, over the budget of \
             {UNCOMPRESSED_CASES_BUDGET:?} (something waits out a timeout?); slowest of them: {}",
            slowest(10, |r| !is_compression_case(&r.id))
        ));
    }

    let fmt_counts = |m: &BTreeMap<&str, usize>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let case_time: u64 = results.iter().map(|r| r.duration_ms).sum();
    let mut summary = format!(
        "Autobahn|Testsuite 0.8.2, {mode} mode ({what}), cases {} less {}: {} cases, wstest run {:.1?} \
         (sum of case durations {:.1} s), whole test {:.1?}\n  behavior: {}\n  behaviorClose: {}\n",
        CASES.join(" "),
        EXCLUDED_CASES.join(" "),
        results.len(),
        run_time,
        case_time as f64 / 1000.0,
        started.elapsed(),
        fmt_counts(&behaviors),
        fmt_counts(&closes),
    );
    for (kind, ids) in &notable {
        summary.push_str(&format!("  {kind}: {}\n", ids.join(" ")));
    }
    summary.push_str(&format!("  slowest: {}\n", slowest(6, |_| true)));
    if !allowed_seen.is_empty() {
        summary.push_str("  allowed by tests/autobahn/expected-non-ok.json:\n");
        summary.push_str(&allowed_seen.join("\n"));
        summary.push('\n');
    }
    summary.push_str(&format!(
        "  report: {}\n",
        reports.join("index.html").display()
    ));
    let _ = fs::write(dir.join("summary.txt"), &summary);
    println!("{summary}");
    assert!(
        problems.is_empty(),
        "{mode} mode: {} problem(s) (summary on standard output and in {}):\n{}",
        problems.len(),
        dir.join("summary.txt").display(),
        problems.join("\n")
    );
}
