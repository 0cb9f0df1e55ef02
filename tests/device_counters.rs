//! Device counters across restarts: `messageCount` and `lastContact` are counted in memory on the
//! hot path (two atomics per message) and written to the database in batches, on a timer and once
//! more at shutdown. After a restart the API must show what was counted before it, including
//! messages that arrived after the last timed flush.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_counts_and_last_contact_survive_a_restart() {
    let mut server = TestServer::start().await;
    setup_store_pipeline(&server, 5).await;
    let (key, _) = server.register_device("counted", "thermo").await;

    // Three messages, then wait for the timed flush to write them.
    let mut ws = server.connect_device("/devices").await;
    for n in 0..3 {
        send_json(&mut ws, &device_msg("counted", &key, json!({"n": n}))).await;
    }
    server.wait_telemetry("counted", 3).await;
    let s = &server;
    let flushed = wait_for("messageCount 3", WAIT, || async move {
        let device = s.get_ok("/api/v1/devices/counted").await;
        (device["messageCount"] == 3).then_some(device)
    })
    .await;
    // Let the timed flush (every 2 s) write them.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let first_contact = flushed["lastContact"]
        .as_str()
        .expect("lastContact")
        .to_owned();

    // Two more, and stop at once: only the shutdown flush can write these.
    for n in 3..5 {
        send_json(&mut ws, &device_msg("counted", &key, json!({"n": n}))).await;
    }
    server.wait_telemetry("counted", 5).await;
    // The API adds what is counted but not yet written: never behind the traffic.
    let live = server.get_ok("/api/v1/devices/counted").await;
    assert_eq!(
        live["messageCount"], 5,
        "before any flush could write them: {live}"
    );
    let newest = server.telemetry("deviceId=counted&limit=1").await;
    let newest_received = newest[0]["receivedAt"]
        .as_str()
        .expect("receivedAt")
        .to_owned();
    drop(ws);
    server.stop().await;
    server.restart().await;

    let device = server.get_ok("/api/v1/devices/counted").await;
    assert_eq!(device["messageCount"], 5, "after the restart: {device}");
    let last_contact = device["lastContact"]
        .as_str()
        .expect("lastContact after restart");
    assert_eq!(
        last_contact, newest_received,
        "lastContact is the newest message's receivedAt (the first flush had {first_contact})"
    );
    let listed = server.get_ok("/api/v1/devices?search=counted").await;
    assert_eq!(listed["items"][0]["messageCount"], 5, "{listed}");

    // Counting goes on from the stored values after the restart.
    server.wait_listener_state("devices", "running").await;
    let mut ws = server.connect_device("/devices").await;
    send_json(&mut ws, &device_msg("counted", &key, json!({"n": 5}))).await;
    let s = &server;
    wait_for("messageCount 6 after the restart", WAIT, || async move {
        let device = s.get_ok("/api/v1/devices/counted").await;
        (device["messageCount"] == 6).then_some(())
    })
    .await;
}
