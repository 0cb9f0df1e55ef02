//! The binary's command line beyond the server: the client commands (`iotgate login`, `send`,
//! `json`) against a real server, and the start-up refusal of a database URL this build cannot
//! open. Each command is run as a process, the way a user or a script runs it, and judged by its
//! exit status and what it prints.

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// The binary with `args`, without any inherited `IOTGATE_*` variable, plus `env`; `stdin` is
/// written to its standard input. Killed after 60 s.
async fn iotgate(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_iotgate"));
    command.args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IOTGATE_") {
            command.env_remove(name);
        }
    }
    command
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn iotgate");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.as_bytes())
        .await
        .expect("write stdin");
    drop(input);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("iotgate {args:?} ran longer than 60 s"))
        .expect("wait for iotgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a failure reported the way every command reports one: exit status `code`, one line on
/// standard error containing each of `needles`, and returns that line.
fn one_line_failure(output: &Output, code: i32, needles: &[&str]) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(code),
        "exit status; stderr: {stderr}; stdout: {}",
        text(&output.stdout)
    );
    assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    stderr
}

// ---------------------------------------------------------------------------------------------
// The database URL
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unsupported_database_urls_are_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data_dir = data.to_str().unwrap();
    let base = ["--bind", "127.0.0.1:0", "--data-dir", data_dir];

    // By flag: the scheme is named, the supported ones are listed, the password is not echoed.
    let url = "mysql://iotgate:s3cret-pw@127.0.0.1:3306/iotgate";
    let output = iotgate(&[&base[..], &["--database-url", url]].concat(), &[], "").await;
    let line = one_line_failure(&output, 2, &["`mysql:`", "supported: sqlite:, postgres:"]);
    assert!(
        !line.contains("s3cret-pw"),
        "the URL's password is echoed: {line}"
    );
    assert!(text(&output.stdout).is_empty(), "{}", text(&output.stdout));

    // By environment variable, and a path without any scheme.
    let output = iotgate(&base, &[("IOTGATE_DATABASE_URL", "redis://db/0")], "").await;
    one_line_failure(&output, 2, &["`redis:`", "supported: sqlite:, postgres:"]);
    let output = iotgate(
        &[&base[..], &["--database-url", "./iotgate.db"]].concat(),
        &[],
        "",
    )
    .await;
    one_line_failure(
        &output,
        2,
        &["has no scheme", "supported: sqlite:, postgres:"],
    );

    // Refused before the data directory (or a server secret) was created.
    assert!(
        !data.exists(),
        "the data directory was created for a refused URL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_url_elsewhere_is_used() {
    let elsewhere = tempfile::tempdir().unwrap();
    let db = elsewhere.path().join("elsewhere.db");
    let url = format!("sqlite://{}", db.display());
    let server =
        TestServer::start_with_extra(ServerOptions::new().arg("--database-url").arg(&url)).await;
    server.register_device("kept-elsewhere", "thermo").await;
    assert!(db.exists(), "{} was not created", db.display());
    assert!(
        !Path::new(&server.data_dir).join("iotgate.db").exists(),
        "the default database was created too"
    );
}

// ---------------------------------------------------------------------------------------------
// iotgate login
// ---------------------------------------------------------------------------------------------

async fn token_works(server: &TestServer, token: &str) -> bool {
    let response = server
        .http
        .get(server.url("/api/v1/auth/me"))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET /api/v1/auth/me");
    response.status() == StatusCode::OK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_prints_a_token_the_api_accepts() {
    let server = TestServer::start().await;
    let url = server.base_url.clone();

    // Password from IOTGATE_PASSWORD.
    let output = iotgate(
        &["login", "--url", &url],
        &[("IOTGATE_PASSWORD", ADMIN_PASSWORD)],
        "",
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "only the token: {stdout}");
    assert!(
        token_works(&server, stdout.trim()).await,
        "the printed token is refused"
    );

    // Password on standard input; the URL from IOTGATE_URL.
    let output = iotgate(
        &["login"],
        &[("IOTGATE_URL", &url)],
        &format!("{ADMIN_PASSWORD}\n"),
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(token_works(&server, text(&output.stdout).trim()).await);

    // Wrong password, no password, no server: one line each, nothing on standard output.
    let output = iotgate(
        &["login", "--url", &url],
        &[("IOTGATE_PASSWORD", "wrong")],
        "",
    )
    .await;
    one_line_failure(
        &output,
        1,
        &["iotgate login:", "wrong user name or password", "401"],
    );
    assert!(output.stdout.is_empty());
    let output = iotgate(&["login", "--url", &url], &[], "").await;
    one_line_failure(&output, 1, &["no password", "IOTGATE_PASSWORD"]);
    let output = iotgate(
        &["login", "--url", "http://127.0.0.1:1"],
        &[("IOTGATE_PASSWORD", "x")],
        "",
    )
    .await;
    one_line_failure(
        &output,
        1,
        &["cannot reach http://127.0.0.1:1/", "is the server running?"],
    );

    // A client command ignores the server's settings, even a broken one in the environment.
    let output = iotgate(
        &["login", "--url", &url],
        &[
            ("IOTGATE_PASSWORD", ADMIN_PASSWORD),
            ("IOTGATE_BIND", "not-an-address"),
        ],
        "",
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    // But a server flag given with a command is a mistake worth naming.
    let output = iotgate(&["--bind", "127.0.0.1:0", "login"], &[], "").await;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
}

// ---------------------------------------------------------------------------------------------
// iotgate send
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_delivers_messages_and_reports_what_the_server_answers() {
    let server = TestServer::start().await;
    setup_store_pipeline(&server, 5).await;
    let (key, _) = server.register_device("cli-1", "thermo").await;
    let url = server.ws_url("/devices");
    let message = |n: u32| device_msg("cli-1", &key, json!({"n": n})).to_string();

    // Messages as arguments: accepted, so nothing is answered and the status is 0.
    let output = iotgate(&["send", &url, &message(1), &message(2)], &[], "").await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        output.stdout.is_empty(),
        "accepted messages get no answer: {}",
        text(&output.stdout)
    );
    assert!(
        text(&output.stderr).contains("2 messages sent"),
        "{}",
        text(&output.stderr)
    );

    // Lines of standard input, blank lines skipped.
    let lines = format!("{}\n\n{}\n{}\n", message(3), message(4), message(5));
    let output = iotgate(&["send", &url, "--wait-ms", "300"], &[], &lines).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("3 messages sent"),
        "{}",
        text(&output.stderr)
    );
    let stored = server.wait_telemetry("cli-1", 5).await;
    let mut numbers: Vec<i64> = stored
        .iter()
        .map(|t| t["payload"]["n"].as_i64().unwrap())
        .collect();
    numbers.sort();
    assert_eq!(numbers, [1, 2, 3, 4, 5]);

    // A wrong key: the error frame is printed on standard output and the status is 1.
    let bad = device_msg("cli-1", "WRONG-KEY", json!({"n": 6})).to_string();
    let output = iotgate(&["send", &url, &bad], &[], "").await;
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let answer: Value =
        serde_json::from_str(text(&output.stdout).trim()).expect("the answer is JSON");
    assert_eq!(answer["error"]["code"], "invalid_key", "{answer}");
    assert!(
        text(&output.stderr).contains("1 answer (1 error)"),
        "{}",
        text(&output.stderr)
    );

    // Nothing at that path: the refused upgrade is one line with the server's reason.
    let output = iotgate(&["send", &server.ws_url("/nowhere"), "{}"], &[], "").await;
    one_line_failure(
        &output,
        1,
        &[
            "refused the WebSocket upgrade",
            "404",
            "nothing is served at /nowhere",
        ],
    );
    // Not a WebSocket URL: a usage error.
    let output = iotgate(&["send", &server.url("/devices"), "{}"], &[], "").await;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_passes_basic_credentials_headers_and_sub_protocol_at_the_upgrade() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok("routes", &route_def("all", &["store"]))
        .await;
    server
        .create_ok(
            "listeners",
            &json!({
                "key": "guarded", "name": "Guarded", "listenerType": "websocket", "mode": "server",
                "contentType": "json", "path": "/guarded", "anonymous": false,
                "userName": "gate-user", "password": "gate-pass-1",
                "origin": "https://plant.example", "subProtocol": "iot.v1"
            }),
        )
        .await;
    server.wait_listener_state("guarded", "running").await;
    let url = server.ws_url("/guarded");
    let args = [
        "send",
        &url,
        "--user",
        "gate-user",
        "--protocol",
        "iot.v1",
        "-H",
        "Origin: https://plant.example",
        r#"{"reading":7}"#,
    ];

    let output = iotgate(&args, &[("IOTGATE_DEVICE_PASSWORD", "gate-pass-1")], "").await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let s = &server;
    wait_for("the message in the store", WAIT, || async move {
        let items = s.telemetry("listener=guarded").await;
        items
            .iter()
            .any(|t| t["payload"]["reading"] == 7)
            .then_some(())
    })
    .await;

    let output = iotgate(&args, &[("IOTGATE_DEVICE_PASSWORD", "wrong")], "").await;
    one_line_failure(&output, 1, &["refused the WebSocket upgrade", "401"]);
    let output = iotgate(&args, &[], "").await;
    one_line_failure(&output, 1, &["--user needs", "IOTGATE_DEVICE_PASSWORD"]);
}

// ---------------------------------------------------------------------------------------------
// iotgate json
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn json_prints_a_value_and_fails_on_an_error_answer() {
    let answer = r#"{"deviceId":"d","primaryAccessKey":"abc","properties":{"floor":2}}"#;
    let output = iotgate(&["json", "/primaryAccessKey"], &[], answer).await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "abc\n");
    let output = iotgate(&["json"], &[], answer).await;
    assert!(text(&output.stdout).contains("\n  \"properties\": {\n    \"floor\": 2\n  }"));

    let error = r#"{"error":{"code":"conflict","message":"device d already exists"}}"#;
    let output = iotgate(&["json", "/primaryAccessKey"], &[], error).await;
    one_line_failure(&output, 1, &["iotgate json:", "device d already exists"]);
    assert!(output.stdout.is_empty());
    let output = iotgate(&["json", "/secondaryAccessKey"], &[], answer).await;
    one_line_failure(
        &output,
        1,
        &["nothing at /secondaryAccessKey", "primaryAccessKey"],
    );
    let output = iotgate(&["json", "primaryAccessKey"], &[], answer).await;
    assert_eq!(output.status.code(), Some(2), "a pointer starts with /");
}
