//! Three iotgate nodes on one PostgreSQL database and one server secret: definitions and registry
//! changes made on any node take effect on every node within a second, sessions work (and end)
//! on every node, and `GET /api/v1/nodes` lists the live nodes and drops one killed with SIGKILL.
//!
//! Path-mounted listeners are served by every node on its own main port; an own-port listener
//! is bound at the node's `--port-offset` (several nodes on one machine).

mod common;

use std::time::{Duration, Instant};

use common::postgres::TestDatabase;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// What "within a second" is measured against.
const PROPAGATION: Duration = Duration::from_secs(1);

async fn start_node(database: &TestDatabase, secret: Option<&std::path::Path>) -> TestServer {
    let mut options = ServerOptions::new().env("IOTGATE_DATABASE_URL", &database.url);
    if let Some(secret) = secret {
        options = options.env("IOTGATE_SECRET_FILE", secret.to_str().unwrap());
    }
    TestServer::start_with_extra(options).await
}

/// Polls `check` until it gives a value, failing after `limit`; returns the value and how long
/// it took.
async fn within<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return (value, started.elapsed());
        }
        if started.elapsed() > limit {
            panic!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn listener_state(node: &TestServer, key: &str) -> Option<String> {
    let response = node.get(&format!("/api/v1/listeners/{key}/status")).await;
    if response.status() != StatusCode::OK {
        return None;
    }
    let status: Value = response.json().await.ok()?;
    status["state"].as_str().map(str::to_owned)
}

async fn node_ids(node: &TestServer) -> Vec<String> {
    let nodes = node.get_ok("/api/v1/nodes").await;
    nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["nodeId"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_definitions_registry_and_sessions_within_a_second() {
    let database = TestDatabase::create().await;
    let a = start_node(&database, None).await;
    let secret = a.data_dir.join("server.secret");
    let b = start_node(&database, Some(&secret)).await;
    let mut c = start_node(&database, Some(&secret)).await;

    // Every node lists the three.
    let (ids, _) = within("three live nodes", Duration::from_secs(10), || async {
        let ids = node_ids(&a).await;
        (ids.len() == 3).then_some(ids)
    })
    .await;
    let own = a.get_ok("/api/v1/nodes").await;
    assert_eq!(
        own["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["self"] == true)
            .count(),
        1,
        "{own}"
    );

    // Each node's metrics name it.
    let metrics = b.metrics().await;
    let b_id = b.get_ok("/api/v1/nodes").await["nodeId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        metric_value(&metrics, "iotgate_node_info", &[("node", &b_id)]),
        Some(1.0),
        "{metrics}"
    );

    // A device registered on A, before the pipeline: each node applies the changes in the order
    // they were made, so once the listener runs on B and C they know the device as well.
    let (key, _) = a.register_device("roamer", "thermo").await;
    // A pipeline made on A runs on B and C within a second.
    setup_store_pipeline(&a, 100).await;
    for node in [&b, &c] {
        let (_, took) = within("listener running on another node", PROPAGATION, || async {
            (listener_state(node, "devices").await.as_deref() == Some("running")).then_some(())
        })
        .await;
        println!("listener propagated in {took:?}");
    }

    // A's status API says which nodes run the listener (others' from their heartbeats).
    let (entries, _) = within(
        "the listener on three nodes",
        Duration::from_secs(10),
        || async {
            let statuses = a.get_ok("/api/v1/status/listeners").await;
            let devices = statuses
                .as_array()?
                .iter()
                .find(|s| s["key"] == "devices")?
                .clone();
            let nodes = devices["nodes"].as_array()?.clone();
            (nodes.len() == 3).then_some(nodes)
        },
    )
    .await;
    assert!(
        entries.iter().all(|n| n["state"] == "running"),
        "{entries:?}"
    );
    assert_eq!(entries.iter().filter(|n| n["self"] == true).count(), 1);

    // The device registered on A sends through B and C; A stores everything.
    let mut via_b = b.connect_device("/devices").await;
    let mut via_c = c.connect_device("/devices").await;
    send_json(&mut via_b, &device_msg("roamer", &key, json!({"via": "b"}))).await;
    send_json(&mut via_c, &device_msg("roamer", &key, json!({"via": "c"}))).await;
    a.wait_telemetry("roamer", 2).await;

    // Re-keyed on C: the connections that used the old key close on A and B, and the old key is
    // refused everywhere, within a second.
    let mut via_a = a.connect_device("/devices").await;
    send_json(&mut via_a, &device_msg("roamer", &key, json!({"via": "a"}))).await;
    a.wait_telemetry("roamer", 3).await;
    let rotated = c
        .post("/api/v1/devices/roamer/keys/primary", &json!({}))
        .await;
    let (status, rotated) = body_json(rotated).await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_key = rotated["primaryAccessKey"].as_str().unwrap().to_owned();
    let started = Instant::now();
    assert_eq!(expect_close(&mut via_a, PROPAGATION).await, 1008);
    assert_eq!(expect_close(&mut via_b, PROPAGATION).await, 1008);
    println!(
        "key rotation closed connections on A and B in {:?}",
        started.elapsed()
    );
    let mut retry = a.connect_device("/devices").await;
    send_json(
        &mut retry,
        &device_msg("roamer", &key, json!({"old": true})),
    )
    .await;
    expect_error_frame(&mut retry, "invalid_key").await;
    send_json(
        &mut retry,
        &device_msg("roamer", &new_key, json!({"new": true})),
    )
    .await;
    a.wait_telemetry("roamer", 4).await;

    // Disabled on B: refused on A and C.
    let disabled = b
        .patch("/api/v1/devices/roamer", &json!({"enabled": false}))
        .await;
    assert_eq!(disabled.status(), StatusCode::OK);
    assert_eq!(expect_close(&mut retry, PROPAGATION).await, 1008);
    assert_eq!(expect_close(&mut via_c, PROPAGATION).await, 1008);
    let mut on_c = c.connect_device("/devices").await;
    send_json(
        &mut on_c,
        &device_msg("roamer", &new_key, json!({"disabled": true})),
    )
    .await;
    expect_error_frame(&mut on_c, "device_disabled").await;

    // A session from A's login works on C.
    let token = a.login().await;
    let me = c
        .http
        .get(c.url("/api/v1/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    // Signed out on A: refused on C within a second, although C had it cached.
    let logout = a
        .http
        .post(a.url("/api/v1/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(logout.status().is_success(), "{}", logout.status());
    within("the ended session refused on C", PROPAGATION, || async {
        let me = c
            .http
            .get(c.url("/api/v1/auth/me"))
            .bearer_auth(&token)
            .send()
            .await
            .ok()?;
        (me.status() == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;

    // The listener deleted on B stops on A and C within a second.
    assert_eq!(
        b.delete("/api/v1/listeners/devices").await.status(),
        StatusCode::NO_CONTENT
    );
    for node in [&a, &c] {
        within("listener gone on another node", PROPAGATION, || async {
            listener_state(node, "devices")
                .await
                .is_none()
                .then_some(())
        })
        .await;
    }

    // C killed with SIGKILL: gone from the list after the node timeout.
    let c_id = {
        let listed = c.get_ok("/api/v1/nodes").await;
        listed["nodeId"].as_str().unwrap().to_owned()
    };
    assert!(ids.contains(&c_id));
    c.kill_hard();
    within(
        "the killed node dropped",
        Duration::from_secs(30),
        || async {
            let ids = node_ids(&a).await;
            (ids.len() == 2 && !ids.contains(&c_id)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_one_machine_bind_an_own_port_listener_at_their_port_offset() {
    let database = TestDatabase::create().await;
    let first = start_node(&database, None).await;
    let secret = first.data_dir.join("server.secret");
    // Two free ports: the listener names the lower one; the second node's offset reaches the other.
    let (a, b) = (free_port(), free_port());
    let (port, offset) = (a.min(b), a.max(b) - a.min(b));
    assert!(offset > 0, "two distinct free ports");
    let second = TestServer::start_with_extra(
        ServerOptions::new()
            .env("IOTGATE_DATABASE_URL", &database.url)
            .env("IOTGATE_SECRET_FILE", secret.to_str().unwrap())
            .arg("--port-offset")
            .arg(offset.to_string()),
    )
    .await;
    first.create_ok("sentinels", &sentinel_def("keys", 5)).await;
    let mut listener = listener_def("own-port", "/own", "keys");
    listener["port"] = json!(port);
    listener["hostName"] = json!("127.0.0.1");
    first.create_ok("listeners", &listener).await;
    for (node, bound) in [(&first, port), (&second, port + offset)] {
        let (status, _) = within("the listener runs", PROPAGATION * 5, || async {
            let response = node.get("/api/v1/listeners/own-port/status").await;
            let status: Value = response.json().await.ok()?;
            (status["state"] == "running").then_some(status)
        })
        .await;
        assert_eq!(
            status["url"],
            format!("ws://127.0.0.1:{bound}/own"),
            "the status names the port bound"
        );
        let (ws, _) = ws_connect_url(&format!("ws://127.0.0.1:{bound}/own"), &WsOptions::new())
            .await
            .unwrap_or_else(|e| panic!("connect on port {bound}: {}", describe_ws_error(&e)));
        drop(ws);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_move_to_the_other_nodes_when_one_is_killed_under_load() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let database = TestDatabase::create().await;
    let a = start_node(&database, None).await;
    let secret = a.data_dir.join("server.secret");
    let mut b = start_node(&database, Some(&secret)).await;
    let c = start_node(&database, Some(&secret)).await;
    a.create_ok("downstreams", &store_def("store")).await;
    a.create_ok("sentinels", &sentinel_def("keys", 1000)).await;
    a.create_ok("listeners", &listener_def("devices", "/devices", "keys"))
        .await;
    a.create_ok("routes", &route_def("all", &["store"])).await;
    for node in [&a, &b, &c] {
        within("the listener runs", PROPAGATION * 5, || async {
            (listener_state(node, "devices").await.as_deref() == Some("running")).then_some(())
        })
        .await;
    }

    // Four devices send every 10 ms through node B; a device whose connection fails moves on to
    // the next node of its list (A, then C), as a device behind a load balancer would.
    let urls = [
        b.ws_url("/devices"),
        a.ws_url("/devices"),
        c.ws_url("/devices"),
    ];
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut devices = Vec::new();
    for i in 0..4 {
        let id = format!("mover-{i}");
        let (key, _) = a.register_device(&id, "meter").await;
        let urls = urls.clone();
        let mut stop = stop.subscribe();
        devices.push(tokio::spawn(async move {
            let mut node = 0;
            let mut seq = 0u64;
            let mut moves = 0;
            'connect: loop {
                let Ok((mut ws, _)) = ws_connect_url(&urls[node], &WsOptions::new()).await else {
                    node = (node + 1) % urls.len();
                    moves += 1;
                    assert!(moves < 20, "{id} found no node to connect to");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                loop {
                    if *stop.borrow() {
                        let _ = ws.close(None).await;
                        return (id, seq, moves);
                    }
                    let message = json!({"deviceId": id, "accessKey": key, "seq": seq});
                    if ws
                        .send(Message::Text(message.to_string().into()))
                        .await
                        .is_err()
                    {
                        node = (node + 1) % urls.len();
                        moves += 1;
                        continue 'connect;
                    }
                    seq += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.kill_hard();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = stop.send(true);
    for device in devices {
        let (id, sent, moves) = device.await.unwrap();
        assert!(moves >= 1, "{id} never left the killed node");
        // What the device sent after the kill reached the store through A or C: its newest
        // stored message is from the last second of the run.
        let (newest, _) = within(
            &format!("{id}'s last messages to be stored"),
            Duration::from_secs(10),
            || async {
                let page = a
                    .get_ok(&format!("/api/v1/telemetry?deviceId={id}&limit=1"))
                    .await;
                let newest = page["items"][0]["payload"]["seq"].as_u64()?;
                (newest + 100 >= sent).then_some(newest)
            },
        )
        .await;
        assert!(
            newest + 100 >= sent,
            "{id}: sent {sent}, newest stored {newest} ({:?} after the kill)",
            killed_at.elapsed()
        );
    }
}
