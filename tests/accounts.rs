//! Users and roles, one's own password, API tokens and the audit log, through the running binary.

mod common;

use std::time::Duration;

use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn call(
    server: &TestServer,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = server
        .http
        .request(method, server.url(path))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    body_json(request.send().await.unwrap()).await
}

async fn create_user(server: &TestServer, user: &str, role: &str) -> String {
    let password = format!("{user}-password-1234");
    server
        .create_ok(
            "users",
            &json!({"userName": user, "role": role, "password": password}),
        )
        .await;
    password
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_who_may_change_what() {
    let server = TestServer::start().await;
    let operator_password = create_user(&server, "olga", "operator").await;
    let viewer_password = create_user(&server, "victor", "viewer").await;
    let olga = server.login_as("olga", &operator_password).await;
    let victor = server.login_as("victor", &viewer_password).await;
    use reqwest::Method as M;

    let (s, me) = call(&server, &victor, M::GET, "/api/v1/auth/me", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me["role"], "viewer", "{me}");
    assert_eq!(me["credential"], "session");

    let device = json!({"deviceId": "d1", "name": "d1", "deviceType": "t"});
    let (s, b) = call(
        &server,
        &victor,
        M::POST,
        "/api/v1/devices",
        Some(device.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "viewer registering a device: {b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("operator"),
        "{b}"
    );
    let (s, b) = call(&server, &olga, M::POST, "/api/v1/devices", Some(device)).await;
    assert_eq!(s, StatusCode::CREATED, "operator registering a device: {b}");
    let (s, _) = call(
        &server,
        &olga,
        M::POST,
        "/api/v1/devices/d1/keys/primary",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(&server, &victor, M::GET, "/api/v1/devices", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &server,
        &olga,
        M::POST,
        "/api/v1/sentinels",
        Some(sentinel_def("sen", 5)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "operator writing a definition");
    let (s, _) = call(&server, &olga, M::GET, "/api/v1/sentinels", None).await;
    assert_eq!(s, StatusCode::OK, "operator reading definitions");
    let (s, _) = call(&server, &olga, M::GET, "/api/v1/users", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = call(&server, &olga, M::GET, "/api/v1/audit", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // A role change applies to a signed-in session at once.
    server
        .patch("/api/v1/users/victor", &json!({"role": "operator"}))
        .await;
    let (s, b) = call(
        &server,
        &victor,
        M::POST,
        "/api/v1/devices",
        Some(json!({"deviceId": "d2", "name": "d2", "deviceType": "t"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "promoted viewer: {b}");

    // A deleted user is signed out at once.
    let r = server.delete("/api/v1/users/victor").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (s, _) = call(&server, &victor, M::GET, "/api/v1/devices", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_managed_and_the_last_admin_stays() {
    let server = TestServer::start().await;
    let list = server.get_ok("/api/v1/users").await;
    assert_eq!(
        list["items"],
        json!([{"userName": "admin", "role": "admin", "createdAt": list["items"][0]["createdAt"]}])
    );
    expect_error(server.delete("/api/v1/users/admin").await, 409, "conflict").await;
    let b = expect_error(
        server
            .patch("/api/v1/users/admin", &json!({"role": "operator"}))
            .await,
        409,
        "conflict",
    )
    .await;
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("last admin"),
        "{b}"
    );

    // Bad input: a short password, a reserved name, an unknown role and field; a duplicate.
    for (body, pointers) in [
        (
            json!({"userName": "jane", "role": "admin", "password": "short-pass1"}),
            vec!["/password"],
        ),
        (
            json!({"userName": "me", "role": "viewer", "password": "long-enough-password"}),
            vec!["/userName"],
        ),
        (
            json!({"userName": "jane", "role": "root", "password": "long-enough-password", "shell": "/bin/sh"}),
            vec!["/role", "/shell"],
        ),
    ] {
        let b = expect_error(
            server.create("users", &body).await,
            422,
            "validation_failed",
        )
        .await;
        let mut found = detail_pointers(&b);
        found.sort();
        assert_eq!(found, pointers, "{body}: {b}");
    }
    let jane_password = create_user(&server, "jane", "admin").await;
    expect_error(
        server
            .create(
                "users",
                &json!({"userName": "jane", "role": "viewer", "password": "long-enough-password"}),
            )
            .await,
        409,
        "conflict",
    )
    .await;

    // With a second admin, the first may step down; then jane is the last one.
    let stepped_down = server
        .patch("/api/v1/users/admin", &json!({"role": "viewer"}))
        .await;
    assert_eq!(stepped_down.status(), StatusCode::OK);
    let jane = server.login_as("jane", &jane_password).await;
    let (s, _) = call(
        &server,
        &jane,
        reqwest::Method::DELETE,
        "/api/v1/users/jane",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);

    // An admin's password reset signs the user out everywhere.
    let admin_session = server.login_as("admin", ADMIN_PASSWORD).await;
    let (s, _) = call(
        &server,
        &jane,
        reqwest::Method::PATCH,
        "/api/v1/users/admin",
        Some(json!({"password": "a-brand-new-password"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &server,
        &admin_session,
        reqwest::Method::GET,
        "/api/v1/auth/me",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    server.login_as("admin", "a-brand-new-password").await;

    // The audit log has every change, with who and what.
    let audit = call(
        &server,
        &jane,
        reqwest::Method::GET,
        "/api/v1/audit?action=user.update",
        None,
    )
    .await
    .1;
    let items = audit["items"].as_array().unwrap();
    assert_eq!(items[0]["actor"], "jane", "{audit}");
    assert_eq!(items[0]["details"]["password"], "reset", "{audit}");
    assert_eq!(items[1]["actor"], "admin", "{audit}");
    assert_eq!(
        items[1]["details"]["role"],
        json!({"from": "admin", "to": "viewer"}),
        "{audit}"
    );
    assert!(!audit.to_string().contains("a-brand-new-password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_change_their_own_password() {
    let server = TestServer::start().await;
    let password = create_user(&server, "pat", "viewer").await;
    let current = server.login_as("pat", &password).await;
    let other = server.login_as("pat", &password).await;
    let change = |body: Value| {
        let (http, url, current) = (
            server.http.clone(),
            server.url("/api/v1/users/me/password"),
            current.clone(),
        );
        async move {
            http.post(url)
                .bearer_auth(current)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let b = expect_error(
        change(json!({"currentPassword": "not-it", "newPassword": "pats-new-password"})).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&b), ["/currentPassword"], "{b}");
    let b = expect_error(
        change(json!({"currentPassword": password, "newPassword": "eleven-char"})).await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(detail_pointers(&b), ["/newPassword"], "{b}");
    let r = change(json!({"currentPassword": password, "newPassword": "pats-new-password"})).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // The session that changed it goes on; the other one ended; the new password works.
    let (s, _) = call(
        &server,
        &current,
        reqwest::Method::GET,
        "/api/v1/auth/me",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &server,
        &other,
        reqwest::Method::GET,
        "/api/v1/auth/me",
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    server.login_as("pat", "pats-new-password").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_are_shown_once_capped_by_role_and_revocable() {
    let server = TestServer::start().await;
    let password = create_user(&server, "ops", "operator").await;
    let ops = server.login_as("ops", &password).await;
    use reqwest::Method as M;

    let (s, b) = call(
        &server,
        &ops,
        M::POST,
        "/api/v1/tokens",
        Some(json!({"name": "ci", "role": "admin", "expiresAt": in_days(30)})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a token above its creator: {b}");
    let (s, b) = call(
        &server,
        &ops,
        M::POST,
        "/api/v1/tokens",
        Some(json!({"name": "ci", "role": "operator", "expiresAt": "2020-01-01T00:00:00Z"})),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(detail_pointers(&b), ["/expiresAt"]);
    let (s, created) = call(
        &server,
        &ops,
        M::POST,
        "/api/v1/tokens",
        Some(json!({"name": "ci", "role": "operator", "expiresAt": in_days(30)})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("iotg_") && token.len() > 40, "{token}");
    let id = created["id"].as_str().unwrap().to_owned();

    // The token works on its own, with its role.
    let (s, me) = call(&server, &token, M::GET, "/api/v1/auth/me", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(me["credential"], "token");
    assert_eq!(me["tokenName"], "ci");
    let (s, _) = call(
        &server,
        &token,
        M::POST,
        "/api/v1/devices",
        Some(json!({"deviceId": "d1", "name": "d1", "deviceType": "t"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    // Never listed with its secret; the owner sees theirs, an admin sees everyone's.
    let (_, mine) = call(&server, &ops, M::GET, "/api/v1/tokens", None).await;
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);
    assert!(!mine.to_string().contains(&token), "{mine}");
    let all = server.get_ok("/api/v1/tokens").await;
    assert!(all["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == id.as_str()));
    // The owner demoted: the token cannot do more than its owner any more.
    server
        .patch("/api/v1/users/ops", &json!({"role": "viewer"}))
        .await;
    let (s, _) = call(
        &server,
        &token,
        M::POST,
        "/api/v1/devices",
        Some(json!({"deviceId": "d2", "name": "d2", "deviceType": "t"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = call(&server, &token, M::GET, "/api/v1/devices", None).await;
    assert_eq!(s, StatusCode::OK);
    // Revoked: at once.
    let (s, _) = call(
        &server,
        &ops,
        M::DELETE,
        &format!("/api/v1/tokens/{id}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = call(&server, &token, M::GET, "/api/v1/devices", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = call(
        &server,
        &ops,
        M::DELETE,
        &format!("/api/v1/tokens/{id}"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_pages_newest_first_and_filters() {
    let server = TestServer::start().await;
    for i in 0..7 {
        server.register_device(&format!("dev-{i}"), "t").await;
    }
    // Newest first, keyset pages without gaps or repeats.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/audit?action=device.create&limit=3&cursor={c}"),
            None => "/api/v1/audit?action=device.create&limit=3".to_owned(),
        };
        let page = server.get_ok(&path).await;
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            seen.push(item["targetKey"].as_str().unwrap().to_owned());
            assert_eq!(item["actor"], "admin");
            assert_eq!(item["credential"], "session");
            assert_eq!(item["sourceAddress"], "127.0.0.1");
            assert_eq!(item["outcome"], "success");
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..7).rev().map(|i| format!("dev-{i}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);
    // The device diff names the fields, never a key.
    let latest = server
        .get_ok("/api/v1/audit?action=device.create&limit=1")
        .await;
    assert_eq!(
        latest["items"][0]["details"]["deviceId"]["to"], "dev-6",
        "{latest}"
    );
    assert!(!latest.to_string().contains("AccessKey"));

    // Filters.
    let later = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let none = server.get_ok(&format!("/api/v1/audit?from={later}")).await;
    assert_eq!(none["items"], json!([]));
    assert_eq!(none["nextCursor"], Value::Null);
    let before = server
        .get_ok(&format!("/api/v1/audit?to={later}&actor=admin&limit=500"))
        .await;
    assert!(before["items"].as_array().unwrap().len() >= 8, "{before}");
    let nobody = server.get_ok("/api/v1/audit?actor=nobody").await;
    assert_eq!(nobody["items"], json!([]));
    expect_error(
        server.get("/api/v1/audit?cursor=not-a-cursor").await,
        400,
        "bad_request",
    )
    .await;
    expect_error(
        server.get("/api/v1/audit?from=yesterday").await,
        400,
        "bad_request",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_authentication_failures_are_summarized_not_written_one_by_one() {
    let mut server = TestServer::start().await;
    setup_store_pipeline(&server, 1000).await;
    let (key, _) = server.register_device("d1", "thermo").await;
    let mut device = server.connect_device("/devices").await;
    for _ in 0..30 {
        send_json(&mut device, &device_msg("d1", "not-the-key", json!({}))).await;
    }
    for _ in 0..10 {
        send_json(&mut device, &device_msg("ghost", "whatever", json!({}))).await;
    }
    // A good message after them: once it is stored, every failure before it was counted.
    send_json(&mut device, &device_msg("d1", &key, json!({"ok": true}))).await;
    server.wait_telemetry("d1", 1).await;
    drop(device);
    // Summaries are written every minute and at shutdown.
    server.stop().await;
    server.restart().await;
    let audit = server
        .get_ok("/api/v1/audit?action=device.auth_failed&limit=100")
        .await;
    let items = audit["items"].as_array().unwrap();
    let total = |device: &str, reason: &str| -> u64 {
        items
            .iter()
            .filter(|i| i["targetKey"] == device)
            .map(|i| i["details"]["reasons"][reason].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(total("d1", "invalid_key"), 30, "{audit}");
    assert_eq!(total("ghost", "unknown_device"), 10, "{audit}");
    assert!(
        items.len() <= 4,
        "one row per device per minute, not one per failure: {audit}"
    );
    for item in items {
        assert_eq!(item["sourceAddress"], "127.0.0.1", "{item}");
        assert_eq!(item["details"]["listener"], "devices", "{item}");
        assert_eq!(item["outcome"], "failure");
    }
    println!(
        "FIGURE: 40 device authentication failures → {} audit rows",
        items.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_and_token_use_are_audited() {
    let mut server = TestServer::start().await;
    let r = server
        .http
        .post(server.url("/api/v1/auth/login"))
        .json(&json!({"userName": "admin", "password": "wrong-password-here"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (s, created) = body_json(
        server
            .post(
                "/api/v1/tokens",
                &json!({"name": "grafana", "role": "viewer", "expiresAt": in_days(7)}),
            )
            .await,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let token = created["token"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        let (s, _) = call(
            &server,
            &token,
            reqwest::Method::GET,
            "/api/v1/devices",
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }
    server.stop().await;
    server.restart().await;
    let logins = server.get_ok("/api/v1/audit?action=auth.login").await;
    let items = logins["items"].as_array().unwrap();
    assert!(
        items.iter().any(|i| i["outcome"] == "failure"
            && i["actor"] == "admin"
            && i["details"]["reason"] == "wrong_credentials"),
        "{logins}"
    );
    assert!(
        items
            .iter()
            .any(|i| i["outcome"] == "success" && i["credential"] == "password"),
        "{logins}"
    );
    let used = server.get_ok("/api/v1/audit?action=token.used").await;
    let row = &used["items"][0];
    assert_eq!(row["targetKey"], created["id"], "{used}");
    assert_eq!(row["details"]["requests"], 3, "{used}");
    let listed = server.get_ok("/api/v1/tokens").await;
    assert!(listed["items"][0]["lastUsedAt"].is_string(), "{listed}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_rows_past_the_retention_are_deleted() {
    let mut server = TestServer::start().await;
    server.register_device("recent", "t").await;
    server.stop().await;
    // An entry from 40 days ago, written straight into the database the server uses.
    let store = iotgate_store::Store::connect(&server.database_url())
        .await
        .unwrap();
    let old = time::OffsetDateTime::now_utc() - time::Duration::days(40);
    store
        .insert_audit(&[iotgate_store::AuditRow {
            id: "00000000-0000-7000-8000-000000000001".into(),
            occurred_at: iotgate_core::envelope::format_timestamp(old),
            actor: Some("admin".into()),
            credential: Some("session".into()),
            source_address: Some("127.0.0.1".into()),
            action: "device.create".into(),
            target_kind: Some("device".into()),
            target_key: Some("ancient".into()),
            outcome: "success".into(),
            details: "{}".into(),
        }])
        .await
        .unwrap();
    store.close().await;
    server.options = ServerOptions::new().arg("--audit-retention-days").arg("30");
    server.restart().await;
    let audit = server.get_ok("/api/v1/audit?action=device.create").await;
    let keys: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["targetKey"].as_str())
        .collect();
    assert_eq!(keys, ["recent"], "{audit}");
}
