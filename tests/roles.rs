//! The whole matrix of routes × roles, taken from the OpenAPI document: every operation names
//! the least role it needs (`x-required-role`), and each role gets 403 below it and is let
//! through at or above it. A route added without a role, or with a check that differs from
//! what the document says, fails here.

mod common;

use std::collections::BTreeMap;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const ROLES: [&str; 3] = ["viewer", "operator", "admin"];

fn rank(role: &str) -> usize {
    ROLES
        .iter()
        .position(|r| *r == role)
        .unwrap_or_else(|| panic!("unknown role {role}"))
}

/// A path value that exists nowhere, so allowed destructive operations answer 404 and change
/// nothing.
fn path_value(name: &str, schema: &Value) -> String {
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.as_str().unwrap().to_owned();
    }
    match name {
        "userName" => "nobody-here".into(),
        "deviceId" => "no-such-device".into(),
        "id" => "no-such-token".into(),
        _ => "no-such-key".into(),
    }
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => doc.pointer(r.trim_start_matches('#')).unwrap(),
        None => v,
    }
}

/// Signs in as a new user of `role` (created by the admin); returns the session token.
async fn token_of(server: &TestServer, role: &str) -> String {
    if role == "admin" {
        return server.token().await;
    }
    let user = format!("{role}-user");
    let password = format!("{role}-password-12345");
    server
        .create_ok(
            "users",
            &json!({"userName": user, "role": role, "password": password}),
        )
        .await;
    server.login_as(&user, &password).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_checks_the_role_the_document_names() {
    let server = TestServer::start().await;
    let doc = server.get_ok("/api/v1/openapi.json").await;
    let mut tokens = BTreeMap::new();
    for role in ROLES {
        tokens.insert(role, token_of(&server, role).await);
    }
    let mut failures = Vec::new();
    let mut checked = 0;
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let path_params: Vec<Value> = item["parameters"].as_array().cloned().unwrap_or_default();
        for method in ["get", "post", "put", "patch", "delete"] {
            let Some(op) = item.get(method) else { continue };
            let id = format!("{} {path}", method.to_uppercase());
            if op["security"].as_array().is_some_and(|s| s.is_empty()) {
                assert!(
                    op.get("x-required-role").is_none(),
                    "{id} is public and names a role"
                );
                continue;
            }
            let required = op["x-required-role"]
                .as_str()
                .unwrap_or_else(|| panic!("{id} names no x-required-role"));
            // Logging out would end the session this test uses; every role may, and the
            // document says viewer.
            if op["operationId"] == "logout" {
                assert_eq!(required, "viewer");
                continue;
            }
            operations += 1;
            let mut url_path = path.clone();
            for p in path_params
                .iter()
                .chain(op["parameters"].as_array().into_iter().flatten())
            {
                let p = resolve(&doc, p);
                if p["in"] == "path" {
                    let name = p["name"].as_str().unwrap();
                    url_path = url_path.replace(
                        &format!("{{{name}}}"),
                        &path_value(name, resolve(&doc, &p["schema"])),
                    );
                }
            }
            for role in ROLES {
                let mut request = server
                    .http
                    .request(
                        Method::from_bytes(method.to_uppercase().as_bytes()).unwrap(),
                        server.url(&url_path),
                    )
                    .bearer_auth(&tokens[role]);
                if op.get("requestBody").is_some() {
                    request = request.json(&json!({}));
                }
                let (status, body) = body_json(request.send().await.unwrap()).await;
                checked += 1;
                let allowed = rank(role) >= rank(required);
                let ok = if allowed {
                    status != 401 && status != 403 && status.as_u16() < 500
                } else {
                    status == 403 && body["error"]["code"] == "forbidden"
                };
                if !ok {
                    failures.push(format!(
                        "{id} as {role} (needs {required}): {status} {body}"
                    ));
                }
            }
        }
    }
    println!(
        "FIGURE: role matrix: {operations} operations × 3 roles = {checked} requests, each answered as x-required-role says"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        operations >= 40,
        "only {operations} operations: is the document complete?"
    );
}
