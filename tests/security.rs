//! The security review's findings, each written as the attack it describes, and the hardening
//! around them: the live-feed origin bypass, parallel login guessing, Argon2 starvation, webhook
//! redirects, header secrets at rest, file permissions, what logs may show, cross-site writes,
//! subscriptions outliving their session, /metrics, the Secure cookie, TLS on the main port.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

const REDACTED: &str = "<redacted>";

fn trusting_loopback_proxy() -> ServerOptions {
    ServerOptions::new()
        .arg("--trusted-proxies")
        .arg("127.0.0.1")
}

async fn login_from(server: &TestServer, forwarded_for: &str, password: &str) -> reqwest::Response {
    server
        .http
        .post(server.url("/api/v1/auth/login"))
        .header("x-forwarded-for", forwarded_for)
        .json(&json!({"userName": "admin", "password": password}))
        .send()
        .await
        .expect("login request")
}

/// The upgrade must not be a WebSocket; returns its HTTP status.
fn refused(
    result: Result<(Ws, UpgradeResponse), tokio_tungstenite::tungstenite::Error>,
    what: &str,
) -> u16 {
    match result {
        Ok(_) => panic!("{what}: the upgrade succeeded"),
        Err(error) => upgrade_status(&error)
            .unwrap_or_else(|| panic!("{what}: {}", describe_ws_error(&error))),
    }
}

// ---------------------------------------------------------------------------------------------
// High: the live feed's origin check
// ---------------------------------------------------------------------------------------------

/// A websocket downstream at `/live`, ready for subscribers.
async fn live_downstream(server: &TestServer) {
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("live", "/live", "envelope"),
        )
        .await;
    drop(server.subscribe("/live").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_same_site_page_cannot_ride_the_session_cookie_with_a_made_up_token() {
    let server = TestServer::start().await;
    live_downstream(&server).await;
    // The victim is signed in to the admin UI: the browser holds the session cookie.
    let session = server.login().await;
    let cookie = format!("iotgate_session={session}");

    // A page of another origin on the same site opens /live?token=x. The browser attaches the
    // cookie; the page does not know any token, so it makes one up.
    for (what, options) in [
        (
            "Origin of another port",
            WsOptions::new()
                .origin("http://127.0.0.1:1")
                .header("cookie", &cookie),
        ),
        (
            "Sec-Fetch-Site: same-site",
            WsOptions::new()
                .header("sec-fetch-site", "same-site")
                .header("cookie", &cookie),
        ),
    ] {
        let status = refused(server.ws_connect("/live?token=x", &options).await, what);
        assert!(
            status == 401 || status == 403,
            "{what}: a made-up ?token= with the cookie got {status}"
        );
        let status = refused(server.ws_connect("/live", &options).await, what);
        assert_eq!(status, 403, "{what}: the cookie alone from another origin");
    }

    // What is meant to work still works: the UI's own origin with the cookie, and a real token
    // carried by the request itself, from anywhere.
    let own = WsOptions::new()
        .origin(&server.base_url)
        .header("cookie", &cookie);
    server
        .ws_connect("/live", &own)
        .await
        .unwrap_or_else(|e| panic!("the UI's own origin: {}", describe_ws_error(&e)));
    server
        .ws_connect(
            &format!("/live?token={session}"),
            &WsOptions::new().origin("http://127.0.0.1:1"),
        )
        .await
        .unwrap_or_else(|e| panic!("a real token in the query: {}", describe_ws_error(&e)));
}

/// Messages to devices take `text/plain`, which an HTML form on any site can POST without a CORS
/// preflight, and the browser attaches the session cookie. Such a request must carry the
/// browser's own word on where it comes from, naming our origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_cross_site_form_cannot_post_a_text_message_to_a_device_with_the_cookie() {
    let server = TestServer::start().await;
    server.register_device("pump-1", "pump").await;
    let session = server.login().await;
    let cookie = format!("iotgate_session={session}");
    let post_text = |extra: &[(&str, String)]| {
        let mut request = server
            .http
            .post(server.url("/api/v1/devices/pump-1/messages?queue=true"))
            .header("cookie", &cookie)
            .header("content-type", "text/plain")
            .body("open-valve");
        for (name, value) in extra {
            request = request.header(*name, value);
        }
        request.send()
    };

    for (what, headers) in [
        // An old browser sends neither header with a simple form post.
        ("no Origin, no Sec-Fetch-Site", vec![]),
        (
            "Sec-Fetch-Site: cross-site",
            vec![("sec-fetch-site", "cross-site".to_owned())],
        ),
        (
            "Sec-Fetch-Site: same-site",
            vec![("sec-fetch-site", "same-site".to_owned())],
        ),
        (
            "Origin of another site",
            vec![("origin", "https://evil.example".to_owned())],
        ),
    ] {
        let (status, body) = body_json(post_text(&headers).await.expect("request")).await;
        assert_eq!(status, 403, "{what}: {body}");
    }

    // The admin UI's own page may, and so may a bearer token from anywhere.
    let (status, body) = body_json(
        post_text(&[("origin", server.base_url.clone())])
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 202, "the UI's own origin: {body}");
    let (status, body) = body_json(
        server
            .http
            .post(server.url("/api/v1/devices/pump-1/messages?queue=true"))
            .bearer_auth(&session)
            .header("content-type", "text/plain")
            .header("origin", "https://evil.example")
            .body("open-valve")
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 202, "a bearer token: {body}");
}

// ---------------------------------------------------------------------------------------------
// Medium: login throttling
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_twenty_parallel_wrong_logins_get_five_guesses() {
    let server = TestServer::start().await;
    let guesses = (0..20).map(|i| {
        let (http, url) = (server.http.clone(), server.url("/api/v1/auth/login"));
        async move {
            http.post(url)
                .json(&json!({"userName": "admin", "password": format!("guess-number-{i:02}")}))
                .send()
                .await
                .expect("login request")
                .status()
                .as_u16()
        }
    });
    let statuses = join_all(guesses).await;
    let verified = statuses.iter().filter(|s| **s == 401).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    println!("FIGURE: 20 parallel wrong logins from one address: {verified} verified (401), {throttled} refused before hashing (429)");
    assert_eq!(
        (verified, throttled),
        (5, 15),
        "statuses {statuses:?}: attempts must be counted before the slow verification"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_guesses_spread_over_addresses_meet_a_per_user_back_off() {
    let server = TestServer::start_with_extra(trusting_loopback_proxy()).await;
    for i in 1..=10 {
        let r = login_from(&server, &format!("203.0.113.{i}"), "not-the-password").await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "guess {i}");
    }
    // The eleventh attempt on the same user must wait, whatever its address, right password
    // or not.
    let r = login_from(&server, "203.0.113.200", ADMIN_PASSWORD).await;
    let retry_after: u64 = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After on 429");
    expect_error(r, 429, "too_many_requests").await;
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    tokio::time::sleep(Duration::from_millis(retry_after * 1000 + 200)).await;
    let r = login_from(&server, "203.0.113.201", ADMIN_PASSWORD).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "after the back-off the right password works"
    );

    // Every failure is in the audit log with the address the proxy named.
    let audit = server
        .get_ok("/api/v1/audit?action=auth.login&limit=100")
        .await;
    let mut failed: Vec<String> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["outcome"] == "failure" && i["details"]["reason"] == "wrong_credentials")
        .map(|i| i["sourceAddress"].as_str().unwrap_or_default().to_owned())
        .collect();
    failed.sort();
    let mut expected: Vec<String> = (1..=10).map(|i| format!("203.0.113.{i}")).collect();
    expected.sort();
    assert_eq!(failed, expected, "audit: {audit}");
}

#[test]
fn an_admin_password_under_twelve_characters_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_iotgate"))
        .args(["--bind", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("IOTGATE_ADMIN_PASSWORD", "short-pass1")
        .env_remove("IOTGATE_DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn iotgate");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("iotgate started with an 11-character admin password");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "exit {status}");
    assert!(
        stderr.contains("at least 12 characters"),
        "the refusal does not say why: {stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Medium: device listeners starving admin login of Argon2
// ---------------------------------------------------------------------------------------------

fn basic_listener(key: &str, path: &str) -> Value {
    json!({"key": key, "name": key, "listenerType": "websocket", "mode": "server",
           "contentType": "json", "path": path, "anonymous": false, "userName": "gateway",
           "password": "gateway-password-1"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_flood_of_wrong_basic_credentials_does_not_starve_admin_login() {
    let server = TestServer::start_with_extra(trusting_loopback_proxy()).await;
    server
        .create_ok("listeners", &basic_listener("gateways", "/gw"))
        .await;
    server.wait_listener_state("gateways", "running").await;
    // Sixty distinct wrong credentials from sixty addresses (so the per-address limit does not
    // stop them): sixty Argon2 runs queued on the device listeners' capacity.
    let flood_started = Instant::now();
    let flood: Vec<_> = (0..60)
        .map(|i| {
            let url = server.ws_url("/gw");
            tokio::spawn(async move {
                let options = WsOptions::new()
                    .basic("gateway", &format!("wrong-password-{i}"))
                    .header("x-forwarded-for", &format!("198.51.100.{}", i + 1));
                let result = ws_connect_url(&url, &options).await;
                let status = result.err().and_then(|e| upgrade_status(&e));
                (status, flood_started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let login_started = Instant::now();
    let token = server.login().await;
    let login_took = login_started.elapsed();
    let login_done = flood_started.elapsed();
    assert!(!token.is_empty());
    let mut finished = Vec::new();
    for task in flood {
        let (status, at) = task.await.unwrap();
        assert_eq!(status, Some(401), "a wrong credential was not refused");
        finished.push(at);
    }
    finished.sort();
    let median = finished[finished.len() / 2];
    let last = *finished.last().unwrap();
    println!(
        "FIGURE: admin login during a flood of 60 wrong Basic credentials: {} ms (flood: median refusal at {} ms, last at {} ms)",
        login_took.as_millis(),
        median.as_millis(),
        last.as_millis()
    );
    assert!(
        login_done < median,
        "the admin login ({login_done:?}) waited behind the device flood (median {median:?}): Argon2 capacity is shared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_one_address_cannot_keep_basic_verification_busy() {
    let server = TestServer::start().await;
    server
        .create_ok("listeners", &basic_listener("gateways", "/gw"))
        .await;
    server.wait_listener_state("gateways", "running").await;
    let right = WsOptions::new().basic("gateway", "gateway-password-1");
    server
        .ws_connect("/gw", &right)
        .await
        .unwrap_or_else(|e| panic!("the right credential: {}", describe_ws_error(&e)));
    let mut statuses = Vec::new();
    for i in 0..25 {
        let options = WsOptions::new().basic("gateway", &format!("guess-{i}"));
        statuses.push(refused(
            server.ws_connect("/gw", &options).await,
            "wrong credential",
        ));
    }
    assert_eq!(&statuses[..20], &[401; 20], "{statuses:?}");
    assert_eq!(&statuses[20..], &[429; 5], "{statuses:?}");
    // The credential verified before costs nothing and is not limited: devices behind the same
    // address keep connecting.
    server.ws_connect("/gw", &right).await.unwrap_or_else(|e| {
        panic!(
            "the right credential after the guesses: {}",
            describe_ws_error(&e)
        )
    });
    let rejected = metric_value(
        &server.metrics().await,
        "iotgate_upgrades_rejected_total",
        &[("reason", "credentials_throttled")],
    );
    assert_eq!(rejected, Some(5.0), "metric");
}

// ---------------------------------------------------------------------------------------------
// Medium: webhooks and redirects
// ---------------------------------------------------------------------------------------------

async fn webhook_pipeline(server: &TestServer, url: &str, headers: Value) -> String {
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "hook", "name": "hook", "type": "webhook", "url": url,
                    "headers": headers, "maxRetries": 0, "timeoutMs": 2000}),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["hook"]))
        .await;
    server.wait_listener_state("devices", "running").await;
    server.register_device("d1", "thermo").await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_webhook_redirect_does_not_carry_envelopes_elsewhere() {
    let elsewhere = start_hook(200).await;
    let redirector = start_hook_answering(
        302,
        vec![(
            "location".into(),
            elsewhere.url.replace("/hook", "/collect"),
        )],
    )
    .await;
    let server = TestServer::start().await;
    let key = webhook_pipeline(
        &server,
        &redirector.url,
        json!({"authorization": "Bearer hook-token"}),
    )
    .await;
    let mut device = server.connect_device("/devices").await;
    send_json(&mut device, &device_msg("d1", &key, json!({"t": 1}))).await;
    let dead = server
        .wait_deadletter("webhook_failed", WAIT, |d| d["reason"] == "webhook_failed")
        .await;
    assert!(
        dead["message"].as_str().unwrap_or_default().contains("302"),
        "{dead}"
    );
    assert_eq!(redirector.hits.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        elsewhere.hits.load(Ordering::SeqCst),
        0,
        "the redirect was followed: {:?}",
        elsewhere.requests.lock().unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Medium: header secrets, files
// ---------------------------------------------------------------------------------------------

/// Every byte of every file in the data directory, as lossy text.
fn data_dir_text(dir: &std::path::Path) -> String {
    let mut all = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.push_str(&String::from_utf8_lossy(&std::fs::read(&path).unwrap()));
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_secrets_are_sealed_at_rest_and_never_returned() {
    let hook = start_hook(200).await;
    let server = TestServer::start().await;
    let key = webhook_pipeline(
        &server,
        &hook.url,
        json!({"authorization": "Bearer hook-secret-4711", "x-tenant": "tenant-a"}),
    )
    .await;
    let listener = json!({"key": "feed", "name": "feed", "listenerType": "websocket",
        "mode": "client", "contentType": "json", "hostName": "127.0.0.1", "port": 1,
        "secure": true, "path": "/in", "sentinel": "sen",
        "headers": {"x-api-key": "listener-secret-0815"}});
    let created = server.create_ok("listeners", &listener).await;
    assert_eq!(created["headers"]["x-api-key"], REDACTED, "{created}");

    let stored = server.get_ok("/api/v1/downstreams/hook").await;
    assert_eq!(stored["headers"]["authorization"], REDACTED, "{stored}");
    assert_eq!(stored["headers"]["x-tenant"], REDACTED, "{stored}");
    let listed = server.get_ok("/api/v1/listeners").await.to_string();
    assert!(!listed.contains("listener-secret-0815"), "{listed}");

    // Neither the database nor its journal holds a secret in clear.
    let files = data_dir_text(&server.data_dir);
    for secret in ["hook-secret-4711", "listener-secret-0815", "tenant-a"] {
        assert!(!files.contains(secret), "{secret} is stored in clear");
    }

    // What was read can be written back: the placeholder keeps the stored value.
    let mut edited = stored.clone();
    edited["timeoutMs"] = json!(3000);
    let updated = server.update_ok("downstreams", &edited).await;
    assert_eq!(updated["headers"]["authorization"], REDACTED);
    let mut device = server.connect_device("/devices").await;
    send_json(&mut device, &device_msg("d1", &key, json!({"t": 1}))).await;
    let requests = hook.requests.clone();
    wait_until("the webhook request", WAIT, || {
        let requests = requests.clone();
        async move { !requests.lock().unwrap().is_empty() }
    })
    .await;
    let head = hook.requests.lock().unwrap()[0].head.to_ascii_lowercase();
    assert!(
        head.contains("authorization: bearer hook-secret-4711"),
        "{head}"
    );
    assert!(head.contains("x-tenant: tenant-a"), "{head}");

    // A placeholder for a header that was never stored is refused, with its pointer.
    let mut unknown = stored.clone();
    unknown["headers"]["x-new"] = json!(REDACTED);
    let b = expect_error(
        server.put("/api/v1/downstreams/hook", &unknown).await,
        422,
        "validation_failed",
    )
    .await;
    assert!(
        detail_pointers(&b).contains(&"/headers/x-new".to_string()),
        "{b}"
    );

    // The audit diff says a header changed, never what to.
    let mut rotated = stored.clone();
    rotated["headers"]["authorization"] = json!("Bearer rotated-secret-9");
    server.update_ok("downstreams", &rotated).await;
    let audit = server
        .get_ok("/api/v1/audit?action=definition.update&limit=10")
        .await;
    let text = audit.to_string();
    assert!(
        !text.contains("rotated-secret-9") && !text.contains("hook-secret-4711"),
        "{text}"
    );
    let latest = &audit["items"][0];
    assert_eq!(latest["targetKey"], "hook", "{latest}");
    assert_eq!(
        latest["details"]["headers"]["to"]["authorization"], REDACTED,
        "{latest}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_and_database_are_private() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("nested").join("data");
    let server = TestServer::start_with_options(
        Some(dir.clone()),
        Some(ADMIN_PASSWORD),
        ServerOptions::new(),
    )
    .await;
    // Some writes, so the journal files exist.
    server.register_device("d1", "thermo").await;
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&dir), 0o700, "data directory");
    for file in [
        "server.secret",
        "iotgate.db",
        "iotgate.db-wal",
        "iotgate.db-shm",
    ] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_show_no_url_credentials_and_no_raw_control_characters() {
    let server = TestServer::start().await;
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    // A client listener whose remote path carries a token, to a port where nothing listens.
    server
        .create_ok(
            "listeners",
            &json!({"key": "feed", "name": "feed", "listenerType": "websocket", "mode": "client",
                    "contentType": "json", "hostName": "127.0.0.1", "port": 1,
                    "path": "/in?token=QUERY-SECRET-1", "sentinel": "sen"}),
        )
        .await;
    server.wait_listener_state("feed", "retrying").await;
    // A webhook with user info and a signed query, to a port where nothing listens.
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "hook", "name": "hook", "type": "webhook",
                    "url": "http://hookuser:USERINFO-SECRET-2@127.0.0.1:9/hook?sig=QUERY-SECRET-3",
                    "maxRetries": 0, "timeoutMs": 1000}),
        )
        .await;
    server
        .create_ok("routes", &route_def("all", &["hook"]))
        .await;
    server.wait_listener_state("devices", "running").await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let mut device = server.connect_device("/devices").await;
    send_json(&mut device, &device_msg("d1", &key, json!({"t": 1}))).await;
    let dead = server
        .wait_deadletter("webhook_failed", WAIT, |d| d["reason"] == "webhook_failed")
        .await;
    // A user name made to forge a log line.
    let r = server
        .http
        .post(server.url("/api/v1/auth/login"))
        .json(
            &json!({"userName": "intruder\nlevel=ERROR forged line", "password": "whatever-it-is"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = server.stderr.lock().unwrap().clone();
    for secret in ["QUERY-SECRET-1", "USERINFO-SECRET-2", "QUERY-SECRET-3"] {
        assert!(!log.contains(secret), "{secret} is in the log");
        assert!(
            !dead.to_string().contains(secret),
            "{secret} is in the dead letter: {dead}"
        );
    }
    assert!(
        log.contains("client listener disconnected"),
        "the client listener's retry was not logged at all"
    );
    assert!(
        !log.lines()
            .any(|l| l.trim_start().starts_with("level=ERROR forged line")),
        "a user name forged a log line"
    );
    assert!(
        log.contains("intruder\\nlevel=ERROR"),
        "the user name is not in the log, escaped"
    );
}

// ---------------------------------------------------------------------------------------------
// Low: cross-site writes, subscriptions, metrics, cookies, client credentials
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_write_needs_our_origin_whatever_authorization_it_carries() {
    let server = TestServer::start().await;
    let session = server.login().await;
    let device = |id: &str| json!({"deviceId": id, "name": id, "deviceType": "t"});
    // A cross-site form or fetch cannot set a Bearer header without a preflight, but it can be
    // made to carry another Authorization scheme; that must not exempt the cookie.
    let r = server
        .http
        .post(server.url("/api/v1/devices"))
        .header("cookie", format!("iotgate_session={session}"))
        .header("origin", "http://evil.example")
        .header("authorization", "Basic Zm9vOmJhcg==")
        .json(&device("d1"))
        .send()
        .await
        .unwrap();
    expect_error(r, 403, "forbidden").await;
    // A body that is not application/json is refused, whatever the credential.
    let r = server
        .http
        .post(server.url("/api/v1/devices"))
        .bearer_auth(&session)
        .header("content-type", "text/plain")
        .body(device("d2").to_string())
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "unsupported_media_type").await;
    // Nor can a form on another site sign the browser in to an account of the attacker's.
    let r = server
        .http
        .post(server.url("/api/v1/auth/login"))
        .header("content-type", "text/plain")
        .body(json!({"userName": "admin", "password": ADMIN_PASSWORD}).to_string())
        .send()
        .await
        .unwrap();
    expect_error(r, 415, "unsupported_media_type").await;
    // The admin UI's own requests work: cookie, own origin, JSON.
    let r = server
        .http
        .post(server.url("/api/v1/devices"))
        .header("cookie", format!("iotgate_session={session}"))
        .header("origin", &server.base_url)
        .json(&device("d3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_subscriptions_end_with_their_session_or_token() {
    let server = TestServer::start().await;
    live_downstream(&server).await;
    // A session signed out.
    let session = server.login().await;
    let (mut by_session, _) = server
        .ws_connect(&format!("/live?token={session}"), &WsOptions::new())
        .await
        .unwrap();
    let r = server
        .http
        .post(server.url("/api/v1/auth/logout"))
        .bearer_auth(&session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        expect_close(&mut by_session, Duration::from_secs(2)).await,
        1008
    );

    // An API token revoked.
    let expires = in_days(30);
    let created = server
        .post(
            "/api/v1/tokens",
            &json!({"name": "dashboard", "role": "viewer", "expiresAt": expires}),
        )
        .await;
    let (s, created) = body_json(created).await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    let (mut by_token, _) = server
        .ws_connect(
            "/live",
            &WsOptions::new().authorization(&format!("Bearer {token}")),
        )
        .await
        .unwrap();
    let r = server
        .delete(&format!(
            "/api/v1/tokens/{}",
            created["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        expect_close(&mut by_token, Duration::from_secs(2)).await,
        1008
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_public_only_when_asked() {
    let port = free_port();
    let server = TestServer::start_with_extra(
        ServerOptions::new()
            .arg("--metrics-bind")
            .arg(format!("127.0.0.1:{port}")),
    )
    .await;
    let anonymous = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    expect_error(anonymous, 401, "unauthorized").await;
    assert!(server.metrics().await.contains("iotgate_"));
    let separate = server
        .http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(separate.status(), StatusCode::OK);
    assert!(separate.text().await.unwrap().contains("iotgate_"));

    let public = TestServer::start_with_extra(ServerOptions::new().arg("--metrics-public")).await;
    let r = public
        .http
        .get(public.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

fn set_cookie(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_is_secure_when_the_browser_used_https() {
    let proxied = TestServer::start_with_extra(trusting_loopback_proxy()).await;
    let login = |server: &TestServer, proto: Option<&str>| {
        let mut request = server
            .http
            .post(server.url("/api/v1/auth/login"))
            .json(&json!({"userName": "admin", "password": ADMIN_PASSWORD}));
        if let Some(proto) = proto {
            request = request
                .header("x-forwarded-for", "203.0.113.5")
                .header("x-forwarded-proto", proto);
        }
        request.send()
    };
    let r = login(&proxied, Some("https")).await.unwrap();
    assert!(set_cookie(&r).contains("Secure"), "{}", set_cookie(&r));
    let r = login(&proxied, None).await.unwrap();
    assert!(!set_cookie(&r).contains("Secure"), "{}", set_cookie(&r));
    // From a peer that is not a trusted proxy, the header means nothing.
    let direct = TestServer::start().await;
    let r = login(&direct, Some("https")).await.unwrap();
    assert!(!set_cookie(&r).contains("Secure"), "{}", set_cookie(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_listeners_do_not_send_credentials_in_clear_unless_told_to() {
    let server = TestServer::start().await;
    let mut def = json!({"key": "feed", "name": "feed", "listenerType": "websocket",
        "mode": "client", "contentType": "json", "hostName": "127.0.0.1", "port": 1,
        "path": "/in", "anonymous": false, "userName": "gw", "password": "gateway-password-1"});
    let b = expect_error(
        server.create("listeners", &def).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&b), ["/secure"], "{b}");
    def["allowInsecureCredentials"] = json!(true);
    server.create_ok("listeners", &def).await;
}

// ---------------------------------------------------------------------------------------------
// TLS on the main port
// ---------------------------------------------------------------------------------------------

struct Pem {
    certified: rcgen::CertifiedKey,
}

impl Pem {
    fn new() -> Self {
        Self {
            certified: rcgen::generate_simple_self_signed(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .unwrap(),
        }
    }

    fn write(&self, cert: &std::path::Path, key: &std::path::Path) {
        std::fs::write(cert, self.certified.cert.pem()).unwrap();
        std::fs::write(key, self.certified.key_pair.serialize_pem()).unwrap();
    }

    fn der(&self) -> Vec<u8> {
        self.certified.cert.der().to_vec()
    }
}

/// The certificate the server presents on a fresh connection: verified against `root` when
/// given, else only read. `None` when no TLS answer came.
fn presented_certificate(port: u16, root: Option<&[u8]>) -> Option<Vec<u8>> {
    let config = match root {
        Some(root) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(rustls::pki_types::CertificateDer::from(root.to_vec()))
                .unwrap();
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
        None => rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything))
            .with_no_client_auth(),
    };
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    let mut stream = rustls::Stream::new(&mut connection, &mut socket);
    std::io::Write::write_all(
        &mut stream,
        b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n",
    )
    .ok()?;
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut stream, &mut answer);
    if !String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(connection.peer_certificates()?[0].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_port_serves_tls_and_reloads_its_certificate_on_sighup() {
    install_crypto();
    let files = tempfile::tempdir().unwrap();
    let (cert, key) = (files.path().join("cert.pem"), files.path().join("key.pem"));
    let first = Pem::new();
    first.write(&cert, &key);
    let server = TestServer::start_with_extra(
        ServerOptions::new()
            .arg("--tls-cert-file")
            .arg(cert.to_str().unwrap())
            .arg("--tls-key-file")
            .arg(key.to_str().unwrap()),
    )
    .await;
    assert!(
        server.base_url.starts_with("https://"),
        "{}",
        server.base_url
    );
    let port = server.port;
    let root = first.der();
    let seen = tokio::task::spawn_blocking(move || presented_certificate(port, Some(&root)))
        .await
        .unwrap();
    assert_eq!(
        seen,
        Some(first.der()),
        "the configured certificate, verified"
    );

    // The browser's cookie is Secure over TLS.
    let r = server
        .http
        .post(server.url("/api/v1/auth/login"))
        .json(&json!({"userName": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert!(set_cookie(&r).contains("Secure"), "{}", set_cookie(&r));

    // Path-mounted listeners are served over WSS, and their URL says so.
    server
        .create_ok("sentinels", &sentinel_def("sen", 100))
        .await;
    server
        .create_ok("listeners", &listener_def("devices", "/devices", "sen"))
        .await;
    let status = server.wait_listener_state("devices", "running").await;
    let url = status["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("wss://"), "{url}");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(first.certified.cert.der().clone()).unwrap();
    let tls = Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    ws_connect_url(&url, &WsOptions::new().tls(tls))
        .await
        .unwrap_or_else(|e| panic!("wss to {url}: {}", describe_ws_error(&e)));

    // A renewed certificate is picked up on SIGHUP, without a restart. A broken one first: the
    // certificate in use stays.
    let pid = server.pid();
    let hangup = || {
        let st = Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(st.success());
    };
    std::fs::write(&cert, "not a certificate").unwrap();
    hangup();
    wait_until("the failed reload in the log", WAIT, || async {
        server
            .stderr
            .lock()
            .unwrap()
            .contains("TLS certificate not reloaded")
    })
    .await;
    let still = tokio::task::spawn_blocking(move || presented_certificate(port, None))
        .await
        .unwrap();
    assert_eq!(
        still,
        Some(first.der()),
        "a broken renewal replaced the certificate"
    );

    let second = Pem::new();
    second.write(&cert, &key);
    hangup();
    let second_der = second.der();
    wait_for("the renewed certificate", WAIT, || {
        let second_der = second_der.clone();
        async move {
            let seen = tokio::task::spawn_blocking(move || presented_certificate(port, None))
                .await
                .ok()??;
            (seen == second_der).then_some(())
        }
    })
    .await;
    assert_eq!(server.pid(), pid, "the server was restarted");
}

/// Reads whatever certificate is presented (the test compares it byte for byte).
#[derive(Debug)]
struct AcceptAnything;
impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// User enumeration: a login naming a user that does not exist is verified against a stored
/// dummy hash, so it answers exactly like a wrong password for a real user, and it counts
/// against the address like one (the dummy hash is a constant since it stopped being computed
/// at start-up; this is the test that it is still used).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_a_made_up_user_name_answers_like_a_wrong_password() {
    let server = TestServer::start().await;
    let attempt = |user: &'static str| {
        server
            .http
            .post(server.url("/api/v1/auth/login"))
            .json(&json!({"userName": user, "password": "not the password at all"}))
            .send()
    };
    let real = attempt("admin").await.expect("login request");
    let (real_status, real_body) = body_json(real).await;
    let made_up = attempt("no-such-operator").await.expect("login request");
    let (made_up_status, made_up_body) = body_json(made_up).await;
    assert_eq!(real_status, 401, "{real_body}");
    assert_eq!(
        (made_up_status, made_up_body),
        (real_status, real_body),
        "an unknown user must be indistinguishable from a wrong password"
    );
}
