//! End-to-end tests of the admin API: authentication, definition CRUD and validation, schemas,
//! the OpenAPI document and the device registry. Each test runs its own `iotgate` process.

mod common;

use std::collections::BTreeSet;

use base64::Engine as _;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_returns_token_and_a_strict_http_only_cookie() {
    let server = TestServer::start().await;
    let resp = server
        .http
        .post(server.url("/api/v1/auth/login"))
        .json(&json!({"userName": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let cookies: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let body: Value = resp.json().await.unwrap();
    let token = body["token"].as_str().expect("token").to_string();
    assert!(token.len() >= 16, "token too short: {token:?}");
    assert!(body["expiresAt"].is_string(), "expiresAt missing: {body}");

    let session = cookies
        .iter()
        .find(|c| c.starts_with("iotgate_session="))
        .unwrap_or_else(|| panic!("no iotgate_session cookie in {cookies:?}"));
    assert!(
        session.contains("HttpOnly"),
        "cookie not HttpOnly: {session}"
    );
    assert!(
        session.contains("SameSite=Strict"),
        "cookie not SameSite=Strict: {session}"
    );
    assert!(
        session.contains("Path=/"),
        "cookie without Path=/: {session}"
    );
    assert!(
        session.starts_with(&format!("iotgate_session={token}")),
        "cookie value is not the token: {session}"
    );

    // The bearer token works.
    let me = server
        .http
        .get(server.url("/api/v1/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (s, b) = body_json(me).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["userName"], "admin");

    // The cookie alone works too (the browser path).
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let r = browser
        .post(server.url("/api/v1/auth/login"))
        .json(&json!({"userName": "admin", "password": ADMIN_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let me = browser
        .get(server.url("/api/v1/auth/me"))
        .send()
        .await
        .unwrap();
    let (s, b) = body_json(me).await;
    assert_eq!(s, StatusCode::OK, "cookie authentication failed: {b}");
    assert_eq!(b["userName"], "admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_401() {
    let server = TestServer::start().await;
    for body in [
        json!({"userName": "admin", "password": "not-the-password"}),
        json!({"userName": "nobody", "password": ADMIN_PASSWORD}),
    ] {
        let r = server
            .http
            .post(server.url("/api/v1/auth/login"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let cookie = r.headers().get("set-cookie").cloned();
        expect_error(r, 401, "unauthorized").await;
        assert!(cookie.is_none(), "a failed login set a cookie: {cookie:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixth_failed_login_in_a_row_is_429() {
    let server = TestServer::start().await;
    let bad = json!({"userName": "admin", "password": "wrong-password"});
    for i in 1..=5 {
        let r = server
            .http
            .post(server.url("/api/v1/auth/login"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "failed login #{i}");
    }
    let r = server
        .http
        .post(server.url("/api/v1/auth/login"))
        .json(&bad)
        .send()
        .await
        .unwrap();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    expect_error(r, 429, "too_many_requests").await;
    let secs: u64 = retry_after
        .as_deref()
        .expect("429 without Retry-After")
        .trim()
        .parse()
        .expect("Retry-After in seconds");
    assert!(
        (1..=60).contains(&secs),
        "Retry-After {secs} not within a minute"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_a_token() {
    let server = TestServer::start().await;
    let mut routes: Vec<(Method, String)> = vec![
        (Method::GET, "/api/v1/auth/me".into()),
        (Method::POST, "/api/v1/auth/logout".into()),
        (Method::GET, "/api/v1/devices".into()),
        (Method::POST, "/api/v1/devices".into()),
        (Method::GET, "/api/v1/devices/dev-1".into()),
        (Method::PATCH, "/api/v1/devices/dev-1".into()),
        (Method::DELETE, "/api/v1/devices/dev-1".into()),
        (Method::POST, "/api/v1/devices/dev-1/keys/primary".into()),
        (Method::POST, "/api/v1/devices/dev-1/keys/secondary".into()),
        (Method::POST, "/api/v1/devices/dev-1/messages".into()),
        (Method::GET, "/api/v1/devices/dev-1/events".into()),
        (Method::POST, "/api/v1/listeners/abc/messages".into()),
        (
            Method::POST,
            "/api/v1/listeners/abc/groups/g/messages".into(),
        ),
        (Method::GET, "/api/v1/telemetry".into()),
        (Method::GET, "/api/v1/telemetry/export".into()),
        (Method::GET, "/api/v1/nodes".into()),
        (Method::GET, "/api/v1/deadletters".into()),
        (Method::GET, "/api/v1/schemas/listener".into()),
        (Method::GET, "/api/v1/openapi.json".into()),
        (Method::GET, "/api/v1/listeners/abc/status".into()),
    ];
    for kind in ["listeners", "sentinels", "routes", "downstreams"] {
        routes.push((Method::GET, format!("/api/v1/{kind}")));
        routes.push((Method::POST, format!("/api/v1/{kind}")));
        routes.push((Method::GET, format!("/api/v1/{kind}/abc")));
        routes.push((Method::PUT, format!("/api/v1/{kind}/abc")));
        routes.push((Method::DELETE, format!("/api/v1/{kind}/abc")));
    }
    for (method, path) in &routes {
        for auth in [None, Some("Bearer not-a-valid-token")] {
            let mut req = server.http.request(method.clone(), server.url(path));
            if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                req = req.json(&json!({}));
            }
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            let (s, b) = body_json(r).await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {auth:?}: {b}"
            );
            assert_eq!(b["error"]["code"], "unauthorized", "{method} {path}: {b}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_open_and_metrics_need_a_token() {
    let server = TestServer::start().await;
    let r = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    let (s, b) = body_json(r).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b, json!({"status": "ok"}));
    let r = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "unauthorized").await;
    let text = server.metrics().await;
    assert!(
        text.contains("iotgate_"),
        "metrics without iotgate_ families:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_invalidates_only_that_token() {
    let server = TestServer::start().await;
    let t1 = server.login().await;
    let t2 = server.login().await;
    assert_ne!(t1, t2, "two logins returned the same token");
    let r = server
        .http
        .post(server.url("/api/v1/auth/logout"))
        .bearer_auth(&t1)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = server
        .http
        .get(server.url("/api/v1/auth/me"))
        .bearer_auth(&t1)
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "unauthorized").await;
    let r = server
        .http
        .get(server.url("/api/v1/devices"))
        .bearer_auth(&t1)
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "unauthorized").await;
    let r = server
        .http
        .get(server.url("/api/v1/auth/me"))
        .bearer_auth(&t2)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "logging out one session ended another"
    );
}

// ---------------------------------------------------------------------------------------------
// Definition CRUD
// ---------------------------------------------------------------------------------------------

/// Create, duplicate, list, get, update, mismatched-key update, unknown key, delete.
/// A definition as the API shows it: header values are secrets, returned as `<redacted>`.
fn shown(def: &Value) -> Value {
    let mut shown = def.clone();
    if let Some(headers) = shown.get_mut("headers").and_then(Value::as_object_mut) {
        for value in headers.values_mut() {
            *value = json!("<redacted>");
        }
    }
    shown
}

async fn crud_roundtrip(server: &TestServer, kind: &str, def: &Value, changed: &Value) {
    let key = def["key"].as_str().unwrap();
    let (def_shown, changed_shown) = (&shown(def), &shown(changed));
    let r = server.create(kind, def).await;
    let location = r
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    let (s, created) = body_json(r).await;
    assert_eq!(s, StatusCode::CREATED, "POST {kind}: {created}");
    assert_fields(def_shown, &created);
    let location = location.unwrap_or_else(|| panic!("POST {kind} without Location"));
    assert!(
        location.ends_with(&format!("/api/v1/{kind}/{key}")),
        "Location {location}"
    );

    expect_error(server.create(kind, def).await, 409, "conflict").await;

    let list = server.get_ok(&format!("/api/v1/{kind}")).await;
    let list = list
        .as_array()
        .unwrap_or_else(|| panic!("GET {kind} is not an array: {list}"));
    let item = list
        .iter()
        .find(|d| d["key"] == key)
        .unwrap_or_else(|| panic!("{key} not listed: {list:?}"));
    assert_fields(def_shown, item);

    let one = server.get_ok(&format!("/api/v1/{kind}/{key}")).await;
    assert_fields(def_shown, &one);

    let (s, updated) = body_json(server.put(&format!("/api/v1/{kind}/{key}"), changed).await).await;
    assert_eq!(s, StatusCode::OK, "PUT {kind}: {updated}");
    assert_fields(changed_shown, &updated);
    let one = server.get_ok(&format!("/api/v1/{kind}/{key}")).await;
    assert_fields(changed_shown, &one);

    // The body's key must equal the path's.
    let mut other = changed.clone();
    other["key"] = json!("another-key");
    let (s, b) = body_json(server.put(&format!("/api/v1/{kind}/{key}"), &other).await).await;
    match s.as_u16() {
        422 => {
            assert_eq!(b["error"]["code"], "validation_failed", "{b}");
            assert!(
                detail_pointers(&b).iter().any(|p| p == "/key"),
                "no /key pointer: {b}"
            );
        }
        400 => assert!(b["error"]["code"].is_string(), "{b}"),
        _ => panic!("PUT with a mismatched key: expected 422 (or 400), got {s}: {b}"),
    }
    // ... and nothing changed.
    let one = server.get_ok(&format!("/api/v1/{kind}/{key}")).await;
    assert_eq!(one["key"], key);

    // Unknown key.
    expect_error(
        server.get(&format!("/api/v1/{kind}/no-such-key")).await,
        404,
        "not_found",
    )
    .await;
    let mut ghost = changed.clone();
    ghost["key"] = json!("no-such-key");
    expect_error(
        server
            .put(&format!("/api/v1/{kind}/no-such-key"), &ghost)
            .await,
        404,
        "not_found",
    )
    .await;
    expect_error(
        server.delete(&format!("/api/v1/{kind}/no-such-key")).await,
        404,
        "not_found",
    )
    .await;

    let r = server.delete(&format!("/api/v1/{kind}/{key}")).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    expect_error(
        server.get(&format!("/api/v1/{kind}/{key}")).await,
        404,
        "not_found",
    )
    .await;
    expect_error(
        server.delete(&format!("/api/v1/{kind}/{key}")).await,
        404,
        "not_found",
    )
    .await;
    let list = server.get_ok(&format!("/api/v1/{kind}")).await;
    assert!(
        !list.as_array().unwrap().iter().any(|d| d["key"] == key),
        "{key} still listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_crud_and_order() {
    let server = TestServer::start().await;
    let def = json!({
        "key": "sen-main", "name": "Main sentinel", "description": "body credentials",
        "method": "accessKey", "deviceId": {"from": "body", "pointer": "/id"},
        "accessKey": {"from": "body", "pointer": "/auth/key"}, "maxFailures": 7, "enabled": true
    });
    let mut changed = def.clone();
    changed["name"] = json!("Renamed sentinel");
    changed["maxFailures"] = json!(9);
    crud_roundtrip(&server, "sentinels", &def, &changed).await;

    // The list is ordered by key.
    server
        .create_ok("sentinels", &sentinel_def("sen-zulu", 5))
        .await;
    server
        .create_ok("sentinels", &sentinel_def("sen-alpha", 5))
        .await;
    server
        .create_ok("sentinels", &sentinel_def("sen-mike", 5))
        .await;
    let list = server.get_ok("/api/v1/sentinels").await;
    let keys: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["key"].as_str())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "sentinels not ordered by key");
    assert!(
        keys.contains(&"sen-zulu") && keys.contains(&"sen-alpha") && keys.contains(&"sen-mike")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_crud() {
    let server = TestServer::start().await;
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    let def = json!({
        "key": "plant-a", "name": "Plant A", "description": "hall 3", "listenerType": "websocket",
        "mode": "server", "contentType": "json", "path": "/plant-a", "anonymous": true,
        "sentinel": "sen", "heartbeatSeconds": 20, "maxMessageBytes": 4096, "enabled": true
    });
    let mut changed = def.clone();
    changed["name"] = json!("Plant A (renamed)");
    changed["maxMessageBytes"] = json!(8192);
    crud_roundtrip(&server, "listeners", &def, &changed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstreams_crud() {
    let server = TestServer::start().await;
    let store = json!({"key": "store-main", "name": "Store", "type": "store", "batchSize": 100, "queueCapacity": 1000});
    let mut changed = store.clone();
    changed["batchSize"] = json!(200);
    crud_roundtrip(&server, "downstreams", &store, &changed).await;

    let ws = json!({"key": "live-view", "name": "Live", "type": "websocket", "path": "/stream/live", "format": "payload"});
    let mut changed = ws.clone();
    changed["format"] = json!("envelope");
    crud_roundtrip(&server, "downstreams", &ws, &changed).await;

    let hook = json!({
        "key": "hook-main", "name": "Hook", "type": "webhook", "url": "http://127.0.0.1:9/hook",
        "headers": {"x-api-key": "abc"}, "maxRetries": 2, "timeoutMs": 1000
    });
    let mut changed = hook.clone();
    changed["maxRetries"] = json!(3);
    crud_roundtrip(&server, "downstreams", &hook, &changed).await;

    // A webhook needs a url; an unknown type is rejected.
    let r = server
        .create(
            "downstreams",
            &json!({"key": "hook-two", "name": "x", "type": "webhook"}),
        )
        .await;
    expect_error(r, 422, "validation_failed").await;
    let r = server
        .create(
            "downstreams",
            &json!({"key": "kafka-one", "name": "x", "type": "kafka"}),
        )
        .await;
    let b = expect_error(r, 422, "validation_failed").await;
    assert!(
        detail_pointers(&b).iter().any(|p| p == "/type"),
        "no /type pointer: {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_crud() {
    let server = TestServer::start().await;
    server.create_ok("downstreams", &store_def("store")).await;
    server
        .create_ok(
            "downstreams",
            &ws_downstream_def("live", "/stream/live", "envelope"),
        )
        .await;
    let def = json!({
        "key": "thermo-route", "name": "Thermometers", "deviceTypes": ["thermo"], "deviceIds": ["d1", "d2"],
        "messageType": {"pointer": "/type", "values": ["telemetry"]}, "downstreams": ["store"], "enabled": true
    });
    let mut changed = def.clone();
    changed["downstreams"] = json!(["store", "live"]);
    changed["deviceIds"] = json!(["d3"]);
    crud_roundtrip(&server, "routes", &def, &changed).await;

    // At least one downstream.
    let r = server
        .create(
            "routes",
            &json!({"key": "empty-route", "name": "x", "downstreams": []}),
        )
        .await;
    let b = expect_error(r, 422, "validation_failed").await;
    assert!(
        detail_pointers(&b)
            .iter()
            .any(|p| p.starts_with("/downstreams")),
        "no /downstreams pointer: {b}"
    );
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_400() {
    let server = TestServer::start().await;
    for kind in ["listeners", "sentinels", "routes", "downstreams", "devices"] {
        let r = server
            .api(Method::POST, &format!("/api/v1/{kind}"))
            .await
            .header("content-type", "application/json")
            .body(r#"{"key": "abc", "name": "#)
            .send()
            .await
            .unwrap();
        expect_error(r, 400, "malformed_json").await;
    }
    server
        .create_ok("sentinels", &sentinel_def("sen-one", 5))
        .await;
    let r = server
        .api(Method::PUT, "/api/v1/sentinels/sen-one")
        .await
        .header("content-type", "application/json")
        .body("[1, 2")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "malformed_json").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_field_is_422_with_its_pointer() {
    let server = TestServer::start().await;
    let mut def = sentinel_def("sen-one", 5);
    def["bogus"] = json!(1);
    let b = expect_error(
        server.create("sentinels", &def).await,
        422,
        "validation_failed",
    )
    .await;
    let pointers = detail_pointers(&b);
    assert!(
        pointers.iter().any(|p| p.contains("bogus")),
        "no pointer naming `bogus`: {b}"
    );

    server
        .create_ok("sentinels", &sentinel_def("sen-two", 5))
        .await;
    let mut l = listener_def("plant-a", "/plant-a", "sen-two");
    l["bogusField"] = json!("x");
    let b = expect_error(
        server.create("listeners", &l).await,
        422,
        "validation_failed",
    )
    .await;
    assert!(
        detail_pointers(&b).iter().any(|p| p.contains("bogusField")),
        "{b}"
    );
    // Nothing was stored.
    expect_error(
        server.get("/api/v1/listeners/plant-a").await,
        404,
        "not_found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_validation_lists_every_problem() {
    let server = TestServer::start().await;
    let def = json!({
        "key": "Bad_Key", "name": "bad", "listenerType": "websocket", "mode": "server",
        "contentType": "json", "path": "/bad", "port": 70000, "anonymous": false
    });
    let b = expect_error(
        server.create("listeners", &def).await,
        422,
        "validation_failed",
    )
    .await;
    let pointers = detail_pointers(&b);
    for want in ["/port", "/key", "/userName"] {
        assert!(
            pointers.iter().any(|p| p == want),
            "missing a problem at {want}: {b}"
        );
    }
    for d in b["error"]["details"].as_array().unwrap() {
        assert!(
            d["message"].as_str().is_some_and(|m| !m.is_empty()),
            "detail without message: {d}"
        );
    }

    // An anonymous listener needs a sentinel.
    let mut anon = listener_def("plant-b", "/plant-b", "x");
    anon.as_object_mut().unwrap().remove("sentinel");
    let b = expect_error(
        server.create("listeners", &anon).await,
        422,
        "validation_failed",
    )
    .await;
    assert!(
        detail_pointers(&b).iter().any(|p| p == "/sentinel"),
        "no /sentinel pointer: {b}"
    );

    // Other schema rules.
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    let cases = [
        ("/path", json!({"path": "no-slash"})),
        ("/contentType", json!({"contentType": "xml"})),
        ("/mode", json!({"mode": "both"})),
        ("/maxMessageBytes", json!({"maxMessageBytes": 8})),
        ("/heartbeatSeconds", json!({"heartbeatSeconds": 4000})),
    ];
    for (pointer, patch) in cases {
        let mut d = listener_def("plant-c", "/plant-c", "sen");
        d.as_object_mut()
            .unwrap()
            .extend(patch.as_object().unwrap().clone());
        let b = expect_error(
            server.create("listeners", &d).await,
            422,
            "validation_failed",
        )
        .await;
        assert!(
            detail_pointers(&b).iter().any(|p| p == pointer),
            "{patch}: no {pointer} pointer: {b}"
        );
    }
    // A secure server listener needs its own port and the PEM files.
    let mut tls = listener_def("plant-d", "/plant-d", "sen");
    tls["secure"] = json!(true);
    expect_error(
        server.create("listeners", &tls).await,
        422,
        "validation_failed",
    )
    .await;
    // A client listener needs a hostName.
    let mut client = listener_def("plant-e", "/feed", "sen");
    client["mode"] = json!("client");
    let b = expect_error(
        server.create("listeners", &client).await,
        422,
        "validation_failed",
    )
    .await;
    assert!(
        detail_pointers(&b).iter().any(|p| p == "/hostName"),
        "no /hostName pointer: {b}"
    );

    let list = server.get_ok("/api/v1/listeners").await;
    assert_eq!(list, json!([]), "invalid listeners were stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_path_conflict_is_409() {
    let server = TestServer::start().await;
    server.create_ok("sentinels", &sentinel_def("sen", 5)).await;
    server
        .create_ok("listeners", &listener_def("plant-a", "/shared", "sen"))
        .await;
    let r = server
        .create("listeners", &listener_def("plant-b", "/shared", "sen"))
        .await;
    expect_error(r, 409, "conflict").await;
    expect_error(
        server.get("/api/v1/listeners/plant-b").await,
        404,
        "not_found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_password_is_never_returned() {
    let server = TestServer::start().await;
    let secret = "Very-Secret-Listener-Pass-1";
    let def = json!({
        "key": "guarded", "name": "Guarded", "listenerType": "websocket", "mode": "server",
        "contentType": "json", "path": "/guarded", "anonymous": false, "userName": "gate",
        "password": secret
    });
    let r = server.create("listeners", &def).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let text = r.text().await.unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert!(
        body.get("password").is_none(),
        "POST returned the password: {body}"
    );
    assert!(!text.contains(secret), "POST response contains the secret");
    assert_eq!(body["userName"], "gate");

    for path in ["/api/v1/listeners/guarded", "/api/v1/listeners"] {
        let r = server.get(path).await;
        assert_eq!(r.status(), StatusCode::OK);
        let text = r.text().await.unwrap();
        assert!(
            !text.contains(secret),
            "GET {path} contains the secret: {text}"
        );
        assert!(
            !text.contains("\"password\""),
            "GET {path} has a password field: {text}"
        );
    }
    // PUT without password keeps it (and still never returns it).
    let mut changed = def.clone();
    changed.as_object_mut().unwrap().remove("password");
    changed["name"] = json!("Guarded 2");
    let r = server.put("/api/v1/listeners/guarded", &changed).await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains(secret) && !text.contains("\"password\""),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_and_openapi() {
    let server = TestServer::start().await;
    let listener = server.get_ok("/api/v1/schemas/listener").await;
    assert_eq!(
        listener["additionalProperties"],
        json!(false),
        "listener schema: {listener}"
    );
    assert!(
        listener["properties"]["port"].is_object(),
        "listener schema lacks properties.port"
    );
    for kind in ["sentinel", "route", "downstream", "device"] {
        let s = server.get_ok(&format!("/api/v1/schemas/{kind}")).await;
        assert!(
            s.is_object()
                && (s.get("properties").is_some()
                    || s.get("$defs").is_some()
                    || s.get("oneOf").is_some()),
            "schema {kind} does not look like a JSON schema: {s}"
        );
    }
    expect_error(server.get("/api/v1/schemas/widget").await, 404, "not_found").await;

    let api = server.get_ok("/api/v1/openapi.json").await;
    let version = api["openapi"]
        .as_str()
        .unwrap_or_else(|| panic!("no openapi field: {api}"));
    assert!(version.starts_with("3."), "openapi {version}");
    let paths = api["paths"].as_object().expect("paths object");
    assert!(
        paths.keys().any(|p| p.contains("listeners")),
        "no listeners path: {:?}",
        paths.keys()
    );
    assert!(
        paths.keys().any(|p| p.contains("devices")),
        "no devices path: {:?}",
        paths.keys()
    );
}

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------

fn decode_key(k: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(k.trim_end_matches('='))
        .unwrap_or_else(|e| panic!("key {k:?} is not base64url: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_crud_never_returns_keys() {
    let server = TestServer::start().await;
    let r = server
        .create("devices", &json!({"deviceId": "thermo-1", "name": "Thermo 1", "deviceType": "thermo", "properties": {"floor": 3}}))
        .await;
    let (s, b) = body_json(r).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let p = b["primaryAccessKey"]
        .as_str()
        .expect("primaryAccessKey")
        .to_string();
    let k2 = b["secondaryAccessKey"]
        .as_str()
        .expect("secondaryAccessKey")
        .to_string();
    assert_ne!(p, k2);
    assert_eq!(decode_key(&p).len(), 32, "primary key is not 32 bytes");
    assert_eq!(decode_key(&k2).len(), 32, "secondary key is not 32 bytes");
    assert_eq!(b["deviceId"], "thermo-1");
    assert_eq!(b["deviceType"], "thermo");
    assert_eq!(b["enabled"], true);
    assert_eq!(b["properties"], json!({"floor": 3}));

    for path in [
        "/api/v1/devices/thermo-1",
        "/api/v1/devices",
        "/api/v1/devices?search=thermo",
    ] {
        let r = server.get(path).await;
        assert_eq!(r.status(), StatusCode::OK);
        let text = r.text().await.unwrap();
        assert!(
            !text.contains(&p) && !text.contains(&k2),
            "GET {path} leaks a key: {text}"
        );
        assert!(
            !text.contains("AccessKey"),
            "GET {path} has a key field: {text}"
        );
    }
    let one = server.get_ok("/api/v1/devices/thermo-1").await;
    assert_eq!(one["name"], "Thermo 1");
    assert_eq!(one["messageCount"], 0);
    assert!(one["createdAt"].is_string());

    // Duplicate id.
    let r = server
        .create(
            "devices",
            &json!({"deviceId": "thermo-1", "name": "again", "deviceType": "thermo"}),
        )
        .await;
    expect_error(r, 409, "conflict").await;
    // Invalid id.
    let r = server
        .create(
            "devices",
            &json!({"deviceId": "bad id!", "name": "x", "deviceType": "thermo"}),
        )
        .await;
    let b = expect_error(r, 422, "validation_failed").await;
    assert!(detail_pointers(&b).iter().any(|p| p == "/deviceId"), "{b}");

    // PATCH.
    let (s, b) = body_json(
        server
            .patch(
                "/api/v1/devices/thermo-1",
                &json!({"name": "Thermo One", "properties": {"floor": 4}}),
            )
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["name"], "Thermo One");
    let one = server.get_ok("/api/v1/devices/thermo-1").await;
    assert_eq!(one["name"], "Thermo One");
    assert_eq!(one["properties"], json!({"floor": 4}));
    assert_eq!(one["deviceType"], "thermo");

    // Key rotation answer.
    let (s, b) = body_json(
        server
            .post("/api/v1/devices/thermo-1/keys/primary", &json!({}))
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["deviceId"], "thermo-1");
    let new_p = b["primaryAccessKey"]
        .as_str()
        .expect("new primaryAccessKey");
    assert_ne!(new_p, p);
    assert_eq!(decode_key(new_p).len(), 32);

    // Unknown device.
    expect_error(server.get("/api/v1/devices/ghost").await, 404, "not_found").await;
    expect_error(
        server
            .patch("/api/v1/devices/ghost", &json!({"name": "x"}))
            .await,
        404,
        "not_found",
    )
    .await;
    expect_error(
        server
            .post("/api/v1/devices/ghost/keys/primary", &json!({}))
            .await,
        404,
        "not_found",
    )
    .await;
    expect_error(
        server.delete("/api/v1/devices/ghost").await,
        404,
        "not_found",
    )
    .await;

    // Delete.
    assert_eq!(
        server.delete("/api/v1/devices/thermo-1").await.status(),
        StatusCode::NO_CONTENT
    );
    expect_error(
        server.get("/api/v1/devices/thermo-1").await,
        404,
        "not_found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_paging_and_search() {
    let server = TestServer::start().await;
    let mut all = BTreeSet::new();
    for i in 0..7 {
        let id = format!("pump-{i:02}");
        server.register_device(&id, "pump").await;
        all.insert(id);
    }
    for id in ["valve-a", "valve-b"] {
        server.register_device(id, "valve").await;
        all.insert(id.to_string());
    }

    let mut seen = BTreeSet::new();
    for offset in [0, 3, 6] {
        let page = server
            .get_ok(&format!("/api/v1/devices?offset={offset}&limit=3"))
            .await;
        assert_eq!(page["total"], 9, "{page}");
        assert_eq!(page["offset"], offset, "{page}");
        assert_eq!(page["limit"], 3, "{page}");
        let items = page["items"].as_array().unwrap();
        assert_eq!(items.len(), 3, "page at {offset}: {page}");
        for d in items {
            assert!(
                seen.insert(d["deviceId"].as_str().unwrap().to_string()),
                "device on two pages: {d}"
            );
        }
    }
    assert_eq!(seen, all, "paging did not cover every device once");
    let past = server.get_ok("/api/v1/devices?offset=9&limit=3").await;
    assert_eq!(past["items"], json!([]));
    assert_eq!(past["total"], 9);

    let found = server.get_ok("/api/v1/devices?search=valve").await;
    assert_eq!(found["total"], 2, "{found}");
    let ids: BTreeSet<&str> = found["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["deviceId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from(["valve-a", "valve-b"]));
    let none = server
        .get_ok("/api/v1/devices?search=nothing-like-this")
        .await;
    assert_eq!(none["total"], 0);
    assert_eq!(none["items"], json!([]));
}

/// The admin UI is served from the binary with a strict Content-Security-Policy, and its
/// assets path does not leak anything outside `admin-ui/public/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_ui_is_served_with_a_strict_csp() {
    let server = TestServer::start().await;
    let response = reqwest::get(server.url("/")).await.unwrap();
    assert_eq!(response.status(), 200);
    let csp = response
        .headers()
        .get("content-security-policy")
        .expect("CSP header")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(response.text().await.unwrap().contains("<"));
    // Percent-encoded, so the client sends the dot segments as they are (a literal `..` would be
    // resolved by the client before sending and never reach the assets route).
    let outside = reqwest::get(server.url("/assets/%2e%2e/%2e%2e/Cargo.toml"))
        .await
        .unwrap();
    assert_eq!(outside.status(), 404);
    let body = outside.text().await.unwrap();
    assert!(!body.contains("[workspace]"), "{body}");
    // And a real asset is served from the same route.
    let style = reqwest::get(server.url("/assets/styles.css"))
        .await
        .unwrap();
    assert_eq!(style.status(), 200);
}

/// A state-changing request riding on the session cookie is refused when it comes from another
/// site (CSRF); the same request from our own origin, or with a bearer token, goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_writes_from_other_sites_are_refused() {
    let server = TestServer::start().await;
    let client = reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap();
    let login = client
        .post(server.url("/api/v1/auth/login"))
        .json(&json!({"userName": "admin", "password": server.password()}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let sentinel = json!({"key": "csrf-check", "name": "c", "method": "accessKey"});

    let cross = client
        .post(server.url("/api/v1/sentinels"))
        .header("sec-fetch-site", "cross-site")
        .json(&sentinel)
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
    let body: Value = cross.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden");

    let foreign_origin = client
        .post(server.url("/api/v1/sentinels"))
        .header("origin", "http://evil.example")
        .json(&sentinel)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign_origin.status(), 403);
    // Nothing was created by the refused requests.
    assert_eq!(
        server.get("/api/v1/sentinels/csrf-check").await.status(),
        404
    );

    // Reads with the cookie are fine from anywhere (SameSite=Strict keeps the cookie home).
    let read = client
        .get(server.url("/api/v1/status/listeners"))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);

    let same = client
        .post(server.url("/api/v1/sentinels"))
        .header("sec-fetch-site", "same-origin")
        .json(&sentinel)
        .send()
        .await
        .unwrap();
    assert_eq!(same.status(), 201);
}

/// `GET /api/v1/status/listeners` lists every listener's live status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_listener_statuses_are_listed() {
    let server = TestServer::start().await;
    server
        .create_ok(
            "sentinels",
            &json!({"key": "keys", "name": "k", "method": "accessKey"}),
        )
        .await;
    for (key, enabled) in [("beta", false), ("alpha", true)] {
        server
            .create_ok(
                "listeners",
                &json!({"key": key, "name": key, "listenerType": "websocket", "mode": "server",
                        "contentType": "json", "path": format!("/{key}"), "sentinel": "keys",
                        "enabled": enabled}),
            )
            .await;
    }
    let statuses = server.get_ok("/api/v1/status/listeners").await;
    let statuses = statuses.as_array().unwrap();
    assert_eq!(statuses.len(), 2);
    assert_eq!(statuses[0]["key"], "alpha");
    assert_eq!(statuses[0]["state"], "running");
    assert_eq!(statuses[1]["key"], "beta");
    assert_eq!(statuses[1]["state"], "disabled");
}

/// A live-feed subscription that rides on the session cookie must come from our own origin: a
/// page on another port of the same host gets the cookie too (SameSite ignores ports) and must
/// not be able to read telemetry. A token in the URL or a bearer header is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_subscriptions_from_other_origins_are_refused() {
    let server = TestServer::start().await;
    server
        .create_ok(
            "downstreams",
            &json!({"key": "live", "name": "Live", "type": "websocket", "path": "/live"}),
        )
        .await;
    let token = server.token().await;
    let cookie = format!("iotgate_session={token}");
    let own_origin = format!("http://127.0.0.1:{}", server.port);

    let foreign = WsOptions::new()
        .origin("http://127.0.0.1:9999")
        .header("cookie", &cookie);
    let refused = server
        .ws_connect("/live", &foreign)
        .await
        .expect_err("foreign origin accepted");
    assert_eq!(upgrade_status(&refused), Some(403));

    let cross_site = WsOptions::new()
        .header("sec-fetch-site", "same-site")
        .header("cookie", &cookie);
    let refused = server
        .ws_connect("/live", &cross_site)
        .await
        .expect_err("same-site accepted");
    assert_eq!(upgrade_status(&refused), Some(403));

    let own = WsOptions::new()
        .origin(&own_origin)
        .header("cookie", &cookie);
    assert!(server.ws_connect("/live", &own).await.is_ok());

    // The token in the URL cannot be forged by another site, whatever its Origin.
    let url_token = WsOptions::new().origin("http://127.0.0.1:9999");
    assert!(server
        .ws_connect(&format!("/live?token={token}"), &url_token)
        .await
        .is_ok());
}
