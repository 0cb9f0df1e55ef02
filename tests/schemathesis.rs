//! The admin API against its own OpenAPI document.
//!
//! - `schemathesis_finds_no_server_error_or_document_violation` runs schemathesis (PyPI, pinned by
//!   `tests/schemathesis/setup.sh`, installed into `target/schemathesis-venv`) against a fresh
//!   server: no 5xx, every response conforms to the document (status codes, content types,
//!   headers, bodies), invalid input is refused, authentication is not ignored.
//! - `every_protected_operation_answers_401_without_credentials` walks the document itself: every
//!   operation that does not declare `security: []` answers 401 without credentials, with a bad
//!   bearer token and with a bad session cookie; only login and healthz are public (metrics too
//!   with `--metrics-public`, which this server does not have).
//!
//! Knobs (environment): `IOTGATE_SCHEMATHESIS_EXAMPLES` (examples per operation, default 25),
//! `IOTGATE_SCHEMATHESIS_SEED` (default fixed, so a CI failure reproduces; set another to explore).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// Examples per operation (bounded: the whole test stays around a minute).
const DEFAULT_EXAMPLES: u32 = 25;
const DEFAULT_SEED: u64 = 20261122;
/// Upper bound for one schemathesis run; it is killed after that.
const RUN_LIMIT: Duration = Duration::from_secs(300);

fn venv() -> PathBuf {
    repo_root().join("target").join("schemathesis-venv")
}

/// Runs the (idempotent) setup script and returns the schemathesis executable.
fn schemathesis_executable() -> PathBuf {
    let script = repo_root().join("tests/schemathesis/setup.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("SCHEMATHESIS_VENV", venv())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = venv().join("bin").join("schemathesis");
    assert!(exe.is_file(), "{} missing after setup", exe.display());
    exe
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The OpenAPI document as the running server serves it (it needs a token).
async fn served_document(server: &TestServer) -> Value {
    server.get_ok("/api/v1/openapi.json").await
}

/// Output and success of one schemathesis run (killed after [`RUN_LIMIT`]).
struct RunResult {
    success: bool,
    output: String,
    took: Duration,
}

fn run_schemathesis(exe: &Path, workdir: &Path, name: &str, args: &[String]) -> RunResult {
    let started = Instant::now();
    let log = workdir.join(format!("schemathesis-{name}.log"));
    let log_file = std::fs::File::create(&log).expect("schemathesis log file");
    // Run in a scratch directory: schemathesis looks for a config file upwards from the current
    // directory and hypothesis keeps a database (.hypothesis/) there.
    let mut child = Command::new(exe)
        .arg("run")
        .args(args)
        .current_dir(workdir)
        .env("NO_COLOR", "1")
        .env("COLUMNS", "120")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file.try_clone().unwrap()))
        .stderr(Stdio::from(log_file))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for schemathesis") {
            break Some(status);
        }
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut output = std::fs::read_to_string(&log).unwrap_or_default();
    if status.is_none() {
        output.push_str(&format!("\n[killed after {RUN_LIMIT:?}]\n"));
    }
    RunResult {
        success: status.is_some_and(|s| s.success()),
        output,
        took: started.elapsed(),
    }
}

/// Operations that create or replace listeners and downstreams. They are fuzzed in a run of
/// their own, with positive data only, against a copy of the document narrowed so that nothing
/// generated can make the server connect anywhere but the loopback: a client-mode listener dials
/// its `hostName` at once, and a webhook posts to its `url`. (Negative data could put any
/// string there, and the server, rightly, accepts many of them.)
const OUTBOUND_CAPABLE: [&str; 4] = [
    "createListener",
    "replaceListener",
    "createDownstream",
    "replaceDownstream",
];

/// Operations that can end or demote the run's own credential (a stateful run learns user names
/// from `GET /users` and may reset the signed-in admin's password). They are fuzzed in a run of
/// their own, with an API token of an admin made for it.
const ACCOUNT_CHANGING: [&str; 2] = ["updateUser", "deleteUser"];

fn narrowed_for_loopback(doc: &Value) -> Value {
    let mut doc = doc.clone();
    let schemas = &mut doc["components"]["schemas"];
    let listener = &mut schemas["ListenerDefinition"]["properties"];
    listener["mode"] = json!({"const": "server"});
    listener["hostName"] = json!({"type": "string", "enum": ["127.0.0.1"]});
    // A file name is read by the server: keep generated ones away from /dev and /proc.
    listener["tlsCertFile"] = json!({"type": "string", "enum": ["/nonexistent/iotgate-cert.pem"]});
    listener["tlsKeyFile"] = json!({"type": "string", "enum": ["/nonexistent/iotgate-key.pem"]});
    let downstream = &mut schemas["DownstreamDefinition"]["properties"];
    downstream["url"] = json!({"type": "string", "enum": ["http://127.0.0.1:9/iotgate-hook"]});
    doc
}

fn print_run(label: &str, run: &RunResult) {
    println!(
        "======== schemathesis: {label} ({:.1} s, {}) ========\n{}",
        run.took.as_secs_f64(),
        if run.success { "passed" } else { "FAILED" },
        run.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_or_document_violation() {
    let exe = tokio::task::spawn_blocking(schemathesis_executable)
        .await
        .expect("setup task");
    let version = Command::new(&exe)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .replace("schemathesis, version ", "")
        })
        .unwrap_or_default();

    let server = TestServer::start().await;
    let token = server.token().await;
    let doc = served_document(&server).await;
    let work = tempfile::tempdir().expect("temp dir");
    let doc_file = work.path().join("openapi.json");
    std::fs::write(&doc_file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let narrowed_file = work.path().join("openapi-loopback.json");
    std::fs::write(
        &narrowed_file,
        serde_json::to_vec_pretty(&narrowed_for_loopback(&doc)).unwrap(),
    )
    .unwrap();

    let examples: u32 = env_or("IOTGATE_SCHEMATHESIS_EXAMPLES", DEFAULT_EXAMPLES);
    let seed: u64 = env_or("IOTGATE_SCHEMATHESIS_SEED", DEFAULT_SEED);
    let common_args = |file: &Path| -> Vec<String> {
        vec![
            file.display().to_string(),
            "--url".into(),
            server.base_url.clone(),
            "--header".into(),
            format!("Authorization: Bearer {token}"),
            "--max-examples".into(),
            examples.to_string(),
            "--seed".into(),
            seed.to_string(),
            "--request-timeout".into(),
            "10".into(),
            "--no-color".into(),
            "--checks".into(),
            "all".into(),
            // Excluded checks, and why:
            // - positive_data_acceptance: the document cannot say everything the server checks.
            //   Cross-field rules (a store downstream takes no `maxRetries`; `secure` needs `port`
            //   and the PEM files) and references (a route's downstreams must exist) make
            //   schema-valid bodies answer 422, which this check counts as a failure; 422 is the
            //   documented answer for them.
            // - unsupported_method: methods the document does not list answer 404 (or 401), not
            //   405, except on the definition collections; reported to the lead, not a document
            //   violation. Remove this exclusion once the server answers 405.
            "--exclude-checks".into(),
            "positive_data_acceptance,unsupported_method".into(),
            // Logging out would revoke the token the run authenticates with.
            "--exclude-operation-id".into(),
            "logout".into(),
        ]
    };

    // Run 3 fuzzes the user operations as an admin of its own with an API token (which outlives a
    // password reset), next to a second admin so "the last admin" is not always the answer. Made
    // now: run 1's failed logins throttle this address.
    for (user, password) in [
        ("fuzz-runner", "fuzz-runner-password"),
        ("spare-admin", "spare-admin-password"),
    ] {
        server
            .create_ok(
                "users",
                &json!({"userName": user, "role": "admin", "password": password}),
            )
            .await;
    }
    let runner = server
        .http
        .post(server.url("/api/v1/auth/login"))
        .json(&json!({"userName": "fuzz-runner", "password": "fuzz-runner-password"}))
        .send()
        .await
        .unwrap();
    let runner_session = body_json(runner).await.1["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let expires = (time::OffsetDateTime::now_utc() + time::Duration::days(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let created = server
        .http
        .post(server.url("/api/v1/tokens"))
        .bearer_auth(&runner_session)
        .json(&json!({"name": "schemathesis", "role": "admin", "expiresAt": expires}))
        .send()
        .await
        .unwrap();
    let runner_token = body_json(created).await.1["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // Run 1: every operation but logout, the outbound-capable and the account-changing ones,
    // positive and negative data.
    let mut args = common_args(&doc_file);
    for op in OUTBOUND_CAPABLE.iter().chain(&ACCOUNT_CHANGING) {
        args.push("--exclude-operation-id".into());
        args.push((*op).into());
    }
    let dir = work.path().to_path_buf();
    let exe1 = exe.clone();
    let run1 = tokio::task::spawn_blocking(move || run_schemathesis(&exe1, &dir, "run1", &args))
        .await
        .expect("schemathesis task");
    print_run("all operations but logout and outbound-capable ones", &run1);

    // Run 2: listeners and downstreams, positive data, loopback-only document.
    let mut args = common_args(&narrowed_file);
    args.push("--mode".into());
    args.push("positive".into());
    for op in OUTBOUND_CAPABLE {
        args.push("--include-operation-id".into());
        args.push(op.into());
    }
    let dir = work.path().to_path_buf();
    let exe2 = exe.clone();
    let run2 = tokio::task::spawn_blocking(move || run_schemathesis(&exe2, &dir, "run2", &args))
        .await
        .expect("schemathesis task");
    print_run(
        "create/replace listeners and downstreams (positive, loopback only)",
        &run2,
    );

    // Run 3: the user operations, with the runner's own API token (made before run 1, whose
    // failed logins throttle this address).
    let mut args = common_args(&doc_file);
    let header = args
        .iter()
        .position(|a| a.starts_with("Authorization: Bearer "))
        .unwrap();
    args[header] = format!("Authorization: Bearer {runner_token}");
    for op in ACCOUNT_CHANGING
        .iter()
        .chain(&["createUser", "listUsers", "getUser"])
    {
        args.push("--include-operation-id".into());
        args.push((*op).into());
    }
    let dir = work.path().to_path_buf();
    let run3 = tokio::task::spawn_blocking(move || run_schemathesis(&exe, &dir, "run3", &args))
        .await
        .expect("schemathesis task");
    print_run("user operations (own admin, API token)", &run3);

    // The server is still healthy, and no client listener was created.
    let health = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let listeners = server.get_ok("/api/v1/listeners").await;
    for l in listeners.as_array().unwrap() {
        assert_ne!(
            l["mode"], "client",
            "a client-mode listener was created: {l}"
        );
    }
    println!(
        "FIGURE: schemathesis {version}: {examples} examples/operation, seed {seed}: run 1 {:.1} s, run 2 {:.1} s, run 3 {:.1} s; {} listeners and {} downstreams left behind",
        run1.took.as_secs_f64(),
        run2.took.as_secs_f64(),
        run3.took.as_secs_f64(),
        listeners.as_array().unwrap().len(),
        server.get_ok("/api/v1/downstreams").await.as_array().unwrap().len()
    );
    let panics = server.stderr.lock().unwrap().matches("panicked").count();
    assert_eq!(
        panics, 0,
        "the server panicked during the run (see its log)"
    );
    assert!(
        run1.success && run2.success && run3.success,
        "schemathesis found problems (run 1 {}, run 2 {}, run 3 {}); see the output above",
        run1.success,
        run2.success,
        run3.success
    );
    // Run 1 kept its session: nothing it may call can end it.
    let (s, _) = body_json(server.get("/api/v1/auth/me").await).await;
    assert_eq!(s, 200, "run 1 lost its session");
}

// ---------------------------------------------------------------------------------------------
// Every protected operation answers 401
// ---------------------------------------------------------------------------------------------

/// Resolves a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("unresolved $ref {r}")),
        None => v,
    }
}

/// A plausible value for a path parameter: the first of its enum, else one that matches the
/// key and device id patterns (so no path validation can answer before authentication).
fn path_value(doc: &Value, param: &Value) -> String {
    let schema = resolve(doc, &param["schema"]);
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.as_str().unwrap().to_string();
    }
    "demo-key".to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protected_operation_answers_401_without_credentials() {
    let server = TestServer::start().await;
    let doc = served_document(&server).await;
    let global_security = doc["security"].clone();
    assert!(
        global_security.as_array().is_some_and(|s| !s.is_empty()),
        "the document declares no global security: {global_security}"
    );
    let methods = ["get", "post", "put", "patch", "delete"];
    let mut public = Vec::new();
    let mut checked = 0;
    let mut failures = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let path_params: Vec<Value> = item["parameters"].as_array().cloned().unwrap_or_default();
        for m in methods {
            let Some(op) = item.get(m) else { continue };
            let id = format!("{} {path}", m.to_uppercase());
            if op["security"].as_array().is_some_and(|s| s.is_empty()) {
                public.push(id);
                continue;
            }
            assert!(
                op["responses"].get("401").is_some(),
                "{id} needs authentication but does not document 401"
            );
            let mut url_path = path.clone();
            let params = path_params
                .iter()
                .chain(op["parameters"].as_array().into_iter().flatten());
            for p in params {
                let p = resolve(&doc, p);
                if p["in"] == "path" {
                    let name = p["name"].as_str().unwrap();
                    url_path = url_path.replace(&format!("{{{name}}}"), &path_value(&doc, p));
                }
            }
            assert!(!url_path.contains('{'), "{id}: unfilled path parameter");
            let method = Method::from_bytes(m.to_uppercase().as_bytes()).unwrap();
            let credentials: [(&str, Option<(&str, String)>); 3] = [
                ("no credentials", None),
                (
                    "a bad bearer token",
                    Some(("authorization", "Bearer not-a-real-token".to_string())),
                ),
                (
                    "a bad session cookie",
                    Some(("cookie", "iotgate_session=not-a-real-token".to_string())),
                ),
            ];
            for (what, header) in credentials {
                let mut req = server.http.request(method.clone(), server.url(&url_path));
                if let Some((name, value)) = &header {
                    req = req.header(*name, value);
                }
                if op.get("requestBody").is_some() {
                    req = req.json(&json!({}));
                }
                let resp = req.send().await.unwrap_or_else(|e| panic!("{id}: {e}"));
                let (status, body) = body_json(resp).await;
                checked += 1;
                if status.as_u16() != 401 || body["error"]["code"] != "unauthorized" {
                    failures.push(format!("{id} with {what}: {status} {body}"));
                }
            }
        }
    }
    public.sort();
    println!(
        "FIGURE: authentication: {checked} requests to {} protected operations (no credentials, bad token, bad cookie) all answered 401; public: {public:?}",
        checked / 3
    );
    assert!(failures.is_empty(), "not 401:\n{}", failures.join("\n"));
    assert_eq!(
        public,
        ["GET /healthz", "POST /api/v1/auth/login"],
        "the public operations of the document"
    );
    assert!(
        checked >= 3 * 30,
        "only {checked} requests: is the document complete?"
    );
}
