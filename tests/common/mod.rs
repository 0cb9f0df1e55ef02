//! End-to-end test harness.
//!
//! Every test starts the real `iotgate` binary as a child process, bound to `127.0.0.1:0` with its
//! own data directory, and drives it only the way an operator and a device would: through the HTTP
//! API and real WebSocket clients. The child's standard output is read for the machine-readable
//! lines (`iotgate listening on ...`, `generated admin password: ...`); its standard error (the
//! logs) is drained into a buffer and printed when a test panics, so a failure shows what the
//! server said.
#![allow(dead_code)]

pub mod hook;
pub mod postgres;
#[allow(unused_imports)]
pub use hook::*;

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, http, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A WebSocket client stream (plain or TLS).
pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;
/// The HTTP response to a WebSocket upgrade request (101, or the error response).
pub type UpgradeResponse = tungstenite::handshake::client::Response;

/// The admin password tests start the server with (through `IOTGATE_ADMIN_PASSWORD`).
pub const ADMIN_PASSWORD: &str = "e2e-Admin-Passw0rd!";
/// How long a fresh binary may take to print its listening line (debug build, migrations).
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time to wait for something asynchronous (a message to arrive, a state to change).
pub const WAIT: Duration = Duration::from_secs(15);

const LISTENING_PREFIX: &str = "iotgate listening on ";
pub const GENERATED_PASSWORD_PREFIX: &str = "generated admin password: ";

/// Installs the ring crypto provider once per process (rustls needs one chosen).
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Percent-encodes a query-string value (RFC 3986 unreserved characters stay).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `Basic base64(user:pass)`.
pub fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", b64(&format!("{user}:{pass}")))
}

// ---------------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------------

struct Spawned {
    child: Child,
    port: u16,
    /// `http`, or `https` when the main port serves TLS.
    scheme: String,
}

/// Extra command-line arguments and environment variables for the server process (kept across
/// restarts), e.g. `--tls-ca-file <PEM>`.
#[derive(Debug, Default, Clone)]
pub struct ServerOptions {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl ServerOptions {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<const N: usize>(mut self, args: [&str; N]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.push((name.to_string(), value.into()));
        self
    }
}

/// Spawns the binary and blocks until it prints its listening line (or dies, or times out).
fn spawn_server(
    data_dir: &Path,
    env_password: Option<&str>,
    extra: &ServerOptions,
    stdout_buf: Arc<Mutex<String>>,
    stderr_buf: Arc<Mutex<String>>,
) -> Spawned {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iotgate"));
    cmd.arg("--bind")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data_dir);
    for var in [
        "IOTGATE_ADMIN_PASSWORD",
        "IOTGATE_BIND",
        "IOTGATE_DATA_DIR",
        "IOTGATE_DATABASE_URL",
        "IOTGATE_LOG_FORMAT",
        "IOTGATE_TLS_CA_FILE",
        "IOTGATE_TRUSTED_PROXIES",
        "IOTGATE_TLS_CERT_FILE",
        "IOTGATE_TLS_KEY_FILE",
        "IOTGATE_METRICS_PUBLIC",
        "IOTGATE_METRICS_BIND",
        "IOTGATE_AUDIT_RETENTION_DAYS",
        "IOTGATE_AUTH_FAILURES_PER_IP",
        "IOTGATE_SECRET_FILE",
        "IOTGATE_BUS_URL",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info");
    if let Some(pw) = env_password {
        cmd.env("IOTGATE_ADMIN_PASSWORD", pw);
    }
    cmd.args(&extra.args);
    for (name, value) in &extra.env {
        cmd.env(name, value);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn the iotgate binary");

    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().expect("child stdout");
    {
        let buf = stdout_buf.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                {
                    let mut b = buf.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
                let _ = tx.send(line);
            }
        });
    }
    let err = child.stderr.take().expect("child stderr");
    {
        let buf = stderr_buf.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut chunk = [0u8; 8192];
            loop {
                match r.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n])),
                }
            }
        });
    }

    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some((scheme, rest)) = line
                    .trim()
                    .strip_prefix(LISTENING_PREFIX)
                    .and_then(|url| url.split_once("://"))
                {
                    let port = rest
                        .trim_end_matches('/')
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok())
                        .unwrap_or_else(|| panic!("cannot parse the port from {line:?}"));
                    return Spawned {
                        child,
                        port,
                        scheme: scheme.to_owned(),
                    };
                }
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "iotgate did not print `{LISTENING_PREFIX}PORT` ({e:?}); exit: {status:?}\n\
                     --- stdout ---\n{}\n--- stderr ---\n{}",
                    stdout_buf.lock().unwrap(),
                    stderr_buf.lock().unwrap()
                );
            }
        }
    }
}

/// One running `iotgate` child process with its own data directory.
pub struct TestServer {
    /// The main HTTP/WebSocket port (read from the listening line).
    pub port: u16,
    /// `http://127.0.0.1:PORT` (`https://` when the main port serves TLS).
    pub base_url: String,
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    /// Keeps a temporary data directory alive for the life of the test (None for a given path).
    _tmp: Option<tempfile::TempDir>,
    /// `IOTGATE_ADMIN_PASSWORD` passed to every (re)start, if any.
    pub env_password: Option<String>,
    /// Extra arguments / environment passed to every (re)start.
    pub options: ServerOptions,
    /// The admin password the harness logs in with.
    pub password: Option<String>,
    /// Everything the child(ren) printed on standard output / error, across restarts.
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    /// Length of `stdout` when the current child was started.
    stdout_mark: usize,
    /// Plain client: no cookie store, 30 s timeout.
    pub http: reqwest::Client,
    token: Mutex<Option<String>>,
    /// The PostgreSQL database of this server (`IOTGATE_TEST_ENGINE=postgres`), dropped with it.
    pub database: Option<Arc<postgres::TestDatabase>>,
}

impl TestServer {
    /// Fresh temporary data directory, admin password [`ADMIN_PASSWORD`].
    pub async fn start() -> Self {
        Self::start_with(None, Some(ADMIN_PASSWORD)).await
    }

    /// Uses (and does not delete) the given data directory.
    pub async fn start_with_dir(path: &Path) -> Self {
        Self::start_with(Some(path.to_path_buf()), Some(ADMIN_PASSWORD)).await
    }

    pub async fn start_with(dir: Option<PathBuf>, env_password: Option<&str>) -> Self {
        Self::start_with_options(dir, env_password, ServerOptions::default()).await
    }

    /// Fresh temporary data directory, admin password [`ADMIN_PASSWORD`], extra args / env.
    pub async fn start_with_extra(options: ServerOptions) -> Self {
        Self::start_with_options(None, Some(ADMIN_PASSWORD), options).await
    }

    pub async fn start_with_options(
        dir: Option<PathBuf>,
        env_password: Option<&str>,
        options: ServerOptions,
    ) -> Self {
        install_crypto();
        let names_database = options.args.iter().any(|a| a.starts_with("--database-url"))
            || options
                .env
                .iter()
                .any(|(name, _)| name == "IOTGATE_DATABASE_URL");
        let database = if postgres::engine_is_postgres() && !names_database {
            Some(Arc::new(postgres::TestDatabase::create().await))
        } else {
            None
        };
        let (tmp, data_dir) = match dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::tempdir().expect("temp dir");
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let mut server = Self {
            port: 0,
            base_url: String::new(),
            child: None,
            data_dir,
            _tmp: tmp,
            env_password: env_password.map(str::to_owned),
            options,
            password: env_password.map(str::to_owned),
            stdout: Arc::new(Mutex::new(String::new())),
            stderr: Arc::new(Mutex::new(String::new())),
            stdout_mark: 0,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            token: Mutex::new(None),
            database,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        self.stdout_mark = self.stdout.lock().unwrap().len();
        let dir = self.data_dir.clone();
        let pw = self.env_password.clone();
        let mut extra = self.options.clone();
        // The test's own PostgreSQL database, on every (re)start, whatever options a test sets
        // later, unless they name a database themselves.
        let names_database = extra.args.iter().any(|a| a.starts_with("--database-url"))
            || extra
                .env
                .iter()
                .any(|(name, _)| name == "IOTGATE_DATABASE_URL");
        if let (Some(database), false) = (&self.database, names_database) {
            extra = extra.env("IOTGATE_DATABASE_URL", database.url.clone());
        }
        let (out, err) = (self.stdout.clone(), self.stderr.clone());
        let spawned = tokio::task::spawn_blocking(move || {
            spawn_server(&dir, pw.as_deref(), &extra, out, err)
        })
        .await
        .expect("spawn task");
        self.port = spawned.port;
        self.base_url = format!("{}://127.0.0.1:{}", spawned.scheme, spawned.port);
        if spawned.scheme == "https" {
            // Tests of TLS check the certificate with clients of their own; the harness's client
            // only needs to reach the API.
            self.http = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .danger_accept_invalid_certs(true)
                .build()
                .expect("http client");
        }
        self.child = Some(spawned.child);
        *self.token.lock().unwrap() = None;
    }

    /// Standard output of the current child only.
    pub fn stdout_of_this_run(&self) -> String {
        self.stdout.lock().unwrap()[self.stdout_mark..].to_string()
    }

    /// Waits for `generated admin password: X` on this run's stdout; remembers X as the password.
    pub async fn wait_generated_password(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout_of_this_run();
            if let Some(line) = out
                .lines()
                .find(|l| l.trim_start().starts_with(GENERATED_PASSWORD_PREFIX))
            {
                let pw = line.trim_start()[GENERATED_PASSWORD_PREFIX.len()..]
                    .trim()
                    .to_string();
                self.password = Some(pw.clone());
                return Some(pw);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// SIGKILL (a crash: nothing is flushed, no connection is closed cleanly) and reap it.
    pub fn kill_hard(&mut self) {
        let mut child = self.child.take().expect("server is running");
        child.kill().expect("SIGKILL the server");
        let _ = child.wait();
        self.stderr
            .lock()
            .unwrap()
            .push_str("\n======== harness: iotgate killed with SIGKILL ========\n");
    }

    /// The SQLite database of this server's data directory.
    /// The URL of the database this server runs on (SQLite file or its PostgreSQL database).
    pub fn database_url(&self) -> String {
        match &self.database {
            Some(database) => database.url.clone(),
            None => format!("sqlite://{}", self.database_path().display()),
        }
    }

    /// A direct connection to this server's database, whichever the engine.
    pub async fn database_connection(&self) -> postgres::DirectConnection {
        postgres::DirectConnection::connect(&self.database_url()).await
    }

    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("iotgate.db")
    }

    /// SIGTERM, wait (≤ 30 s) for the exit and assert it is a success. Returns the exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server is running");
        let pid = child.id();
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    // Let the log threads catch the last lines.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    assert!(
                        status.success(),
                        "iotgate exited with {status:?} after SIGTERM (expected 0)"
                    );
                    return status;
                }
                Ok(None) => {}
                Err(e) => panic!("waiting for iotgate: {e}"),
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("iotgate did not exit within 30 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the binary again on the same data directory (after [`stop`](Self::stop)).
    pub async fn restart(&mut self) {
        self.stderr
            .lock()
            .unwrap()
            .push_str("\n======== harness: restarting iotgate ========\n");
        self.spawn().await;
    }

    pub fn dump_logs(&self) {
        let err = self.stderr.lock().unwrap();
        let lines: Vec<&str> = err.lines().collect();
        let from = lines.len().saturating_sub(400);
        eprintln!(
            "\n======== iotgate stdout ========\n{}\n======== iotgate stderr (last {} lines) ========\n{}\n================================",
            self.stdout.lock().unwrap(),
            lines.len() - from,
            lines[from..].join("\n")
        );
    }

    // ------------------------------------------------------------------ HTTP

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    pub fn password(&self) -> String {
        self.password.clone().expect("admin password known")
    }

    /// Logs in as admin (asserting 200) and returns a fresh token.
    pub async fn login(&self) -> String {
        let resp = self
            .http
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({"userName": "admin", "password": self.password()}))
            .send()
            .await
            .expect("login request");
        let (status, body) = body_json(resp).await;
        assert_eq!(status, StatusCode::OK, "login failed: {body}");
        body["token"]
            .as_str()
            .expect("token in login response")
            .to_string()
    }

    /// Logs in as `user` (asserting 200) and returns the session token.
    pub async fn login_as(&self, user: &str, password: &str) -> String {
        let resp = self
            .http
            .post(self.url("/api/v1/auth/login"))
            .json(&json!({"userName": user, "password": password}))
            .send()
            .await
            .expect("login request");
        let (status, body) = body_json(resp).await;
        assert_eq!(status, StatusCode::OK, "login as {user} failed: {body}");
        body["token"]
            .as_str()
            .expect("token in login response")
            .to_string()
    }

    /// A cached admin token (logs in on first use, and again after a restart).
    pub async fn token(&self) -> String {
        let cached = self.token.lock().unwrap().clone();
        if let Some(t) = cached {
            return t;
        }
        let t = self.login().await;
        *self.token.lock().unwrap() = Some(t.clone());
        t
    }

    /// A request with `Authorization: Bearer <admin token>`.
    pub async fn api(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let t = self.token().await;
        self.http.request(method, self.url(path)).bearer_auth(t)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.api(Method::GET, path)
            .await
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.api(Method::POST, path)
            .await
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    pub async fn put(&self, path: &str, body: &Value) -> Response {
        self.api(Method::PUT, path)
            .await
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {path}: {e}"))
    }

    pub async fn patch(&self, path: &str, body: &Value) -> Response {
        self.api(Method::PATCH, path)
            .await
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PATCH {path}: {e}"))
    }

    pub async fn delete(&self, path: &str) -> Response {
        self.api(Method::DELETE, path)
            .await
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE {path}: {e}"))
    }

    /// GET, assert 200, return the JSON body.
    pub async fn get_ok(&self, path: &str) -> Value {
        let (s, b) = body_json(self.get(path).await).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {b}");
        b
    }

    /// `POST /api/v1/{kind}`.
    pub async fn create(&self, kind: &str, def: &Value) -> Response {
        self.post(&format!("/api/v1/{kind}"), def).await
    }

    /// `POST /api/v1/{kind}`, asserting 201; returns the body.
    pub async fn create_ok(&self, kind: &str, def: &Value) -> Value {
        let (s, b) = body_json(self.create(kind, def).await).await;
        assert_eq!(s, StatusCode::CREATED, "creating {kind} {def}: {b}");
        b
    }

    /// `PUT /api/v1/{kind}/{def.key}`, asserting 200.
    pub async fn update_ok(&self, kind: &str, def: &Value) -> Value {
        let key = def["key"].as_str().expect("key");
        let (s, b) = body_json(self.put(&format!("/api/v1/{kind}/{key}"), def).await).await;
        assert_eq!(s, StatusCode::OK, "updating {kind} {def}: {b}");
        b
    }

    /// Registers a device; returns (primaryAccessKey, secondaryAccessKey).
    /// Waits until the device API shows `id` online (or offline, with `want` false) and returns
    /// the device. Online, a connection is past its setup: it watches the registry (a change to
    /// the device closes it) and is addressable.
    pub async fn wait_device_online(&self, id: &str, want: bool) -> Value {
        let path = format!("/api/v1/devices/{id}");
        wait_for(&format!("device {id} online={want}"), WAIT, || async {
            let resource = self.get_ok(&path).await;
            (resource["online"] == want).then_some(resource)
        })
        .await
    }

    pub async fn register_device(&self, id: &str, device_type: &str) -> (String, String) {
        let b = self
            .create_ok(
                "devices",
                &json!({"deviceId": id, "name": format!("device {id}"), "deviceType": device_type}),
            )
            .await;
        let p = b["primaryAccessKey"]
            .as_str()
            .unwrap_or_else(|| panic!("primaryAccessKey in {b}"))
            .to_string();
        let s = b["secondaryAccessKey"]
            .as_str()
            .unwrap_or_else(|| panic!("secondaryAccessKey in {b}"))
            .to_string();
        (p, s)
    }

    pub async fn listener_status(&self, key: &str) -> Value {
        self.get_ok(&format!("/api/v1/listeners/{key}/status"))
            .await
    }

    /// Polls the listener's status until `state` equals `want`; returns that status.
    pub async fn wait_listener_state(&self, key: &str, want: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let st = self.listener_status(key).await;
            if st["state"] == want {
                return st;
            }
            if Instant::now() >= deadline {
                panic!(
                    "listener {key} did not reach state {want:?} within {WAIT:?}; last status {st}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /api/v1/telemetry?{query}` items.
    pub async fn telemetry(&self, query: &str) -> Vec<Value> {
        let b = self.get_ok(&format!("/api/v1/telemetry?{query}")).await;
        b["items"]
            .as_array()
            .unwrap_or_else(|| panic!("telemetry items in {b}"))
            .clone()
    }

    /// Waits until the telemetry of `device_id` has at least `n` items; returns them (newest first).
    pub async fn wait_telemetry(&self, device_id: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let items = self
                .telemetry(&format!("deviceId={device_id}&limit=1000"))
                .await;
            if items.len() >= n {
                return items;
            }
            if Instant::now() >= deadline {
                panic!("telemetry for {device_id}: wanted {n} items within {WAIT:?}, have {}: {items:?}", items.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn deadletters(&self) -> Vec<Value> {
        let b = self.get_ok("/api/v1/deadletters?limit=1000").await;
        b["items"]
            .as_array()
            .unwrap_or_else(|| panic!("dead letter items in {b}"))
            .clone()
    }

    /// Waits until a dead letter satisfying `pred` exists; returns it.
    pub async fn wait_deadletter(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let items = self.deadletters().await;
            if let Some(found) = items.iter().find(|d| pred(d)) {
                return found.clone();
            }
            if Instant::now() >= deadline {
                panic!("no dead letter {what} within {timeout:?}; have {items:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /metrics` (with the admin token: metrics are not public by default).
    pub async fn metrics(&self) -> String {
        let resp = self
            .http
            .get(self.url("/metrics"))
            .bearer_auth(self.token().await)
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.expect("metrics body")
    }

    // ------------------------------------------------------------------ WebSocket

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{}", self.port, path)
    }

    /// Upgrade on the main port.
    pub async fn ws_connect(
        &self,
        path: &str,
        opts: &WsOptions,
    ) -> Result<(Ws, UpgradeResponse), tungstenite::Error> {
        ws_connect_url(&self.ws_url(path), opts).await
    }

    /// A plain device connection on the main port that must succeed.
    pub async fn connect_device(&self, path: &str) -> Ws {
        match self.ws_connect(path, &WsOptions::new()).await {
            Ok((ws, _)) => ws,
            Err(e) => panic!("device connect to {path}: {}", describe_ws_error(&e)),
        }
    }

    /// A WebSocket-downstream subscriber at `path` (may carry a query) with `?token=`. Retries a
    /// 404 for a few seconds (a freshly created downstream), then pauses briefly so the
    /// subscription is registered before the test sends traffic.
    pub async fn subscribe(&self, path: &str) -> Ws {
        let token = self.token().await;
        let sep = if path.contains('?') { '&' } else { '?' };
        let full = format!("{path}{sep}token={token}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.ws_connect(&full, &WsOptions::new()).await {
                Ok((ws, _)) => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    return ws;
                }
                Err(e) if upgrade_status(&e) == Some(404) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("subscribing to {path}: {}", describe_ws_error(&e)),
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            std::thread::sleep(Duration::from_millis(100));
            self.dump_logs();
        }
    }
}

/// Status and JSON body (Null when empty, a JSON string when not JSON).
pub async fn body_json(resp: Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, value)
}

/// Asserts the status and the `{"error":{"code","message"}}` shape; returns the body.
pub async fn expect_error(resp: Response, status: u16, code: &str) -> Value {
    let (s, b) = body_json(resp).await;
    assert_eq!(s.as_u16(), status, "expected {status} {code}, got {s}: {b}");
    assert_eq!(b["error"]["code"], code, "error code; body {b}");
    assert!(
        b["error"]["message"].is_string(),
        "error.message missing: {b}"
    );
    b
}

/// The JSON pointers of `error.details`.
pub fn detail_pointers(body: &Value) -> Vec<String> {
    body["error"]["details"]
        .as_array()
        .unwrap_or_else(|| panic!("error.details in {body}"))
        .iter()
        .map(|d| {
            d["pointer"]
                .as_str()
                .unwrap_or_else(|| panic!("pointer in {d}"))
                .to_string()
        })
        .collect()
}

/// Asserts that every top-level field of `expected` is equal in `actual`.
pub fn assert_fields(expected: &Value, actual: &Value) {
    for (k, v) in expected.as_object().expect("object") {
        assert_eq!(
            &actual[k], v,
            "field {k} differs; expected {expected}, got {actual}"
        );
    }
}

/// Sum of the samples of metric `name` whose labels include every `(label, value)`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let metric_name = line.split(['{', ' ']).next().unwrap_or("");
        if metric_name != name {
            continue;
        }
        let label_part = match (line.find('{'), line.find('}')) {
            (Some(a), Some(b)) if b > a => &line[a + 1..b],
            _ => "",
        };
        if labels.iter().all(|(k, v)| {
            label_part
                .split(',')
                .any(|kv| kv.trim() == format!("{k}=\"{v}\""))
        }) {
            let value: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// An RFC 3339 time `days` from now (e.g. an API token's expiry).
pub fn in_days(days: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::days(days))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formatting")
}

/// A loopback port that was free a moment ago (for a flag that needs a fixed port).
/// Waits for the close frame; returns its code and reason.
pub async fn close_of(ws: &mut Ws, within: Duration) -> (u16, String) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, futures_util::StreamExt::next(ws)).await {
            Ok(Some(Ok(tungstenite::Message::Close(Some(frame))))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Ok(Some(Ok(tungstenite::Message::Close(None)))) => {
                panic!("a close frame without a code")
            }
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("the connection ended without a close frame: {other:?}"),
            Err(_) => panic!("no close frame within {within:?}"),
        }
    }
}

/// The next text frame as JSON (pings and pongs skipped), within 5 s.
pub async fn next_text_json(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), futures_util::StreamExt::next(ws)).await
        {
            Ok(Some(Ok(tungstenite::Message::Text(text)))) => {
                return serde_json::from_str(&text).expect("a JSON text frame")
            }
            Ok(Some(Ok(tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_)))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// The repository's root (where the test helpers and scripts live).
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the client-library virtualenv (websockets, msgpack), made (or reused) by
/// `tests/python-clients/setup.sh`; panics with the script's output when it fails.
pub fn python_clients() -> std::path::PathBuf {
    let root = repo_root();
    let out = std::process::Command::new("bash")
        .arg(root.join("tests/python-clients/setup.sh"))
        .output()
        .expect("run tests/python-clients/setup.sh");
    assert!(
        out.status.success(),
        "tests/python-clients/setup.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    root.join("target/python-clients-venv/bin/python")
}

/// Closes device sockets only once `listener` has read `want` messages in all: a close ends a
/// connection's reads, so closing earlier could drop what is still in the socket.
pub async fn close_once_read<S>(server: &TestServer, listener: &str, want: u64, sockets: Vec<S>)
where
    S: futures_util::Sink<tungstenite::Message> + Unpin,
{
    wait_until(
        "the listener to read every message",
        Duration::from_secs(30),
        || async {
            server.listener_status(listener).await["messagesReceived"]
                .as_u64()
                .unwrap_or(0)
                >= want
        },
    )
    .await;
    for mut socket in sockets {
        let _ = futures_util::SinkExt::close(&mut socket).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Polls `cond` every 50 ms until it is true; panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `f` every 50 ms until it returns Some; panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients
// ---------------------------------------------------------------------------------------------

/// Extra upgrade headers and TLS settings for a client connection.
#[derive(Default, Clone)]
pub struct WsOptions {
    pub origin: Option<String>,
    pub protocol: Option<String>,
    pub authorization: Option<String>,
    pub headers: Vec<(String, String)>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl WsOptions {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn origin(mut self, o: &str) -> Self {
        self.origin = Some(o.to_string());
        self
    }
    /// `Sec-WebSocket-Protocol` (may be a comma-separated list).
    pub fn protocol(mut self, p: &str) -> Self {
        self.protocol = Some(p.to_string());
        self
    }
    pub fn basic(mut self, user: &str, pass: &str) -> Self {
        self.authorization = Some(basic(user, pass));
        self
    }
    pub fn authorization(mut self, value: &str) -> Self {
        self.authorization = Some(value.to_string());
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    pub fn tls(mut self, cfg: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(cfg);
        self
    }
}

/// Connects (10 s limit). Non-101 answers come back as `Err(Error::Http(response))`.
pub async fn ws_connect_url(
    url: &str,
    opts: &WsOptions,
) -> Result<(Ws, UpgradeResponse), tungstenite::Error> {
    let mut req = url.into_client_request()?;
    {
        let h = req.headers_mut();
        if let Some(o) = &opts.origin {
            h.insert(http::header::ORIGIN, o.parse().unwrap());
        }
        if let Some(p) = &opts.protocol {
            h.insert(http::header::SEC_WEBSOCKET_PROTOCOL, p.parse().unwrap());
        }
        if let Some(a) = &opts.authorization {
            h.insert(http::header::AUTHORIZATION, a.parse().unwrap());
        }
        for (n, v) in &opts.headers {
            h.insert(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
    }
    let connector = opts.tls.clone().map(tokio_tungstenite::Connector::Rustls);
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_tls_with_config(req, None, true, connector),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => panic!("WebSocket connect to {url} timed out"),
    }
}

/// The HTTP status of a refused upgrade.
pub fn upgrade_status(err: &tungstenite::Error) -> Option<u16> {
    match err {
        tungstenite::Error::Http(r) => Some(r.status().as_u16()),
        _ => None,
    }
}

pub fn describe_ws_error(err: &tungstenite::Error) -> String {
    match err {
        tungstenite::Error::Http(r) => format!(
            "HTTP {} {:?} body {:?}",
            r.status(),
            r.headers(),
            r.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
        ),
        other => format!("{other}"),
    }
}

/// Asserts that the upgrade was refused with `status`; returns the response.
pub fn expect_refused(
    result: Result<(Ws, UpgradeResponse), tungstenite::Error>,
    status: u16,
    what: &str,
) -> UpgradeResponse {
    match result {
        Ok((_, resp)) => panic!(
            "{what}: expected HTTP {status}, but the upgrade succeeded ({})",
            resp.status()
        ),
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(
                resp.status().as_u16(),
                status,
                "{what}: wrong status; headers {:?} body {:?}",
                resp.headers(),
                resp.body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
            );
            resp
        }
        Err(e) => panic!("{what}: expected HTTP {status}, got error {e}"),
    }
}

/// Something observed on a client stream.
#[derive(Debug)]
pub enum WsEvent {
    Text(String),
    Binary(Vec<u8>),
    /// A close frame with its code (None when the frame had no code).
    Close(Option<u16>),
    /// The stream ended without a close frame.
    Ended,
    Error(String),
    Timeout,
}

/// The next text/binary/close event (pings and pongs are skipped), or Timeout.
pub async fn next_event<S>(ws: &mut S, timeout: Duration) -> WsEvent
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return WsEvent::Timeout,
            Ok(None) => return WsEvent::Ended,
            Ok(Some(Err(e))) => return WsEvent::Error(e.to_string()),
            Ok(Some(Ok(msg))) => match msg {
                Message::Text(t) => return WsEvent::Text(t.as_str().to_owned()),
                Message::Binary(b) => return WsEvent::Binary(b.to_vec()),
                Message::Close(f) => return WsEvent::Close(f.map(|f| u16::from(f.code))),
                _ => continue,
            },
        }
    }
}

/// The next frame, which must be JSON text.
pub async fn recv_json<S>(ws: &mut S, timeout: Duration) -> Value
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    match next_event(ws, timeout).await {
        WsEvent::Text(t) => {
            serde_json::from_str(&t).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {t}"))
        }
        other => panic!("expected a JSON text frame, got {other:?}"),
    }
}

/// The next frame must be `{"error":{"code": code, "message": ...}}`.
pub async fn expect_error_frame<S>(ws: &mut S, code: &str) -> Value
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let v = recv_json(ws, WAIT).await;
    assert_eq!(v["error"]["code"], code, "error frame: {v}");
    assert!(
        v["error"]["message"].is_string(),
        "error frame without message: {v}"
    );
    v
}

/// Waits for a close frame (skipping data frames) and returns its code.
pub async fn expect_close<S>(ws: &mut S, timeout: Duration) -> u16
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(ws, left).await {
            WsEvent::Text(_) | WsEvent::Binary(_) => continue,
            WsEvent::Close(Some(code)) => return code,
            other => panic!("expected a close frame with a code, got {other:?}"),
        }
    }
}

/// Asserts nothing (no data, no close) arrives for `dur`.
pub async fn expect_silence<S>(ws: &mut S, dur: Duration)
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    match next_event(ws, dur).await {
        WsEvent::Timeout => {}
        other => panic!("expected nothing for {dur:?}, got {other:?}"),
    }
}

/// Receives `n` JSON text frames.
pub async fn recv_n_json<S>(ws: &mut S, n: usize, timeout: Duration) -> Vec<Value>
where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(ws, left).await {
            WsEvent::Text(t) => {
                out.push(serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}")))
            }
            other => panic!(
                "expected {n} JSON frames, had {} ({out:?}), then {other:?}",
                out.len()
            ),
        }
    }
    out
}

pub async fn send_json<S>(ws: &mut S, v: &Value)
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send a text frame");
}

pub async fn send_text<S>(ws: &mut S, s: &str)
where
    S: futures_util::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    ws.send(Message::Text(s.to_string().into()))
        .await
        .expect("send a text frame");
}

// ---------------------------------------------------------------------------------------------
// Definitions
// ---------------------------------------------------------------------------------------------

/// Sentinel, accessKey method, default body locators.
pub fn sentinel_def(key: &str, max_failures: u32) -> Value {
    json!({"key": key, "name": format!("sentinel {key}"), "method": "accessKey", "maxFailures": max_failures})
}

/// Anonymous server-mode JSON listener mounted on the main port.
pub fn listener_def(key: &str, path: &str, sentinel: &str) -> Value {
    json!({
        "key": key, "name": format!("listener {key}"), "listenerType": "websocket", "mode": "server",
        "contentType": "json", "path": path, "anonymous": true, "sentinel": sentinel
    })
}

pub fn store_def(key: &str) -> Value {
    json!({"key": key, "name": format!("store {key}"), "type": "store"})
}

pub fn ws_downstream_def(key: &str, path: &str, format: &str) -> Value {
    json!({"key": key, "name": format!("ws {key}"), "type": "websocket", "path": path, "format": format})
}

pub fn route_def(key: &str, downstreams: &[&str]) -> Value {
    json!({"key": key, "name": format!("route {key}"), "downstreams": downstreams})
}

/// `{"deviceId": id, "accessKey": key, ...extra}`.
pub fn device_msg(id: &str, key: &str, extra: Value) -> Value {
    let mut m = json!({"deviceId": id, "accessKey": key});
    if let Value::Object(e) = extra {
        m.as_object_mut().unwrap().extend(e);
    }
    m
}

/// The standard store pipeline: downstream `store`, sentinel `sen` (given maxFailures), anonymous
/// JSON listener `devices` at `/devices`, route `all` → `store`; waits until the listener runs.
pub async fn setup_store_pipeline(server: &TestServer, max_failures: u32) {
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok("sentinels", &sentinel_def("sen", max_failures))
        .await;
    server
        .create_ok("routes", &route_def("all", &["store"]))
        .await;
    // The listener last: other nodes apply changes in the order they were made, so once it runs
    // on a node, everything before it is in place there too.
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    server.wait_listener_state("devices", "running").await;
}

/// Opens a TCP connection to `port` and upgrades it at `path` by hand, with `extra_headers`
/// (complete `Name: value\r\n` lines) added to the request, for tests that must see or send
/// exact frames. Panics unless the answer is 101 within 10 s. Returns the socket, the bytes the
/// server already sent after the answer's head, and the head itself.
pub async fn raw_websocket_upgrade(
    port: u16,
    path: &str,
    extra_headers: &str,
) -> (tokio::net::TcpStream, Vec<u8>, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut chunk))
            .await
            .expect("upgrade answer in time")
            .unwrap();
        assert!(n > 0, "the server closed before answering the upgrade");
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
    buffer.drain(..head_end);
    (socket, buffer, head)
}
