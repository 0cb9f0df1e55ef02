//! The store-facing suites a second time, every test server on a PostgreSQL database of its own
//! (created on the machine's PostgreSQL at 127.0.0.1:5432 and dropped when the test ends; see
//! `common::postgres`), so that the test command checks both engines with the same tests.
//!
//! Each suite is the very file its SQLite run compiles; what switches the engine is this binary's
//! name (`common::postgres::engine_is_postgres`). PostgreSQL that cannot be reached fails these
//! tests with the command that starts it; they never skip.

// Each suite brings its own `mod common;`, as it does in its own binary: the copies are meant.
#![allow(clippy::duplicate_mod)]

#[path = "accounts.rs"]
mod accounts;
#[path = "acknowledged.rs"]
mod acknowledged;
#[path = "api.rs"]
mod api;
#[path = "device_trust.rs"]
mod device_trust;
#[path = "downlink.rs"]
mod downlink;
#[path = "pipeline.rs"]
mod pipeline;

mod common;

/// Guards the switch above: without it every suite here would silently run on SQLite again.
#[tokio::test]
async fn the_suites_in_this_binary_store_in_postgresql() {
    let server = common::TestServer::start().await;
    let database = server
        .database
        .clone()
        .expect("a test server in on_postgres has a PostgreSQL database");
    let created = server
        .post(
            "/api/v1/devices",
            &serde_json::json!({"deviceId": "engine-probe", "name": "engine probe", "deviceType": "probe"}),
        )
        .await;
    assert_eq!(created.status(), reqwest::StatusCode::CREATED);
    let ids = database
        .query_text("SELECT device_id FROM devices WHERE device_id = 'engine-probe'")
        .await;
    assert_eq!(ids, ["engine-probe"]);
}
