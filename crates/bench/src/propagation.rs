//! propagation: two nodes on one fresh PostgreSQL database; each of 100 listeners created on
//! node A is timed from the request on A to the listener running on node B (B polled through
//! its status API, about every millisecond).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;

use crate::api::Api;
use crate::postgres::BenchDatabase;
use crate::scenarios::{summary, Options, Summary};
use crate::server::Server;

const CHANGES: usize = 100;

pub async fn propagation(opts: &Options, admin_url: &str) -> Result<Summary> {
    let database = BenchDatabase::create(admin_url).await?;
    let a = Server::start_node(&opts.server_bin, &database.url, None).await?;
    let secret = a.data_dir.join("server.secret");
    let b = Server::start_node(&opts.server_bin, &database.url, Some(&secret)).await?;
    eprintln!("nodes on one database: A {} and B {}", a.addr, b.addr);
    let on_a = Api::login(a.http_base()).await?;
    let on_b = Api::login(b.http_base()).await?;
    on_a.create(
        "sentinels",
        json!({"key": "prop-keys", "name": "Propagation keys", "method": "accessKey"}),
    )
    .await?;

    let mut took = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        let key = format!("prop-{i}");
        let started = Instant::now();
        on_a.create(
            "listeners",
            json!({
                "key": key, "name": "Propagation", "listenerType": "websocket", "mode": "server",
                "contentType": "json", "path": format!("/prop-{i}"), "anonymous": true,
                "sentinel": "prop-keys"
            }),
        )
        .await?;
        loop {
            if let Ok(status) = on_b.listener_status(&key).await {
                if status["state"] == "running" {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("listener {key} was not running on node B 30 s after its creation on A");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        took.push(started.elapsed());
    }
    a.stop().await?;
    b.stop().await?;
    database.drop_database().await?;

    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q).ceil() as usize).clamp(1, took.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (p50, p99, max) = (at(0.50), at(0.99), *took.last().expect("changes"));
    println!("== scenario propagation ==");
    println!("changes                  {CHANGES} listeners created on node A");
    println!(
        "created on A → running on B   p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        ms(p50),
        ms(p99),
        ms(max)
    );
    Ok(summary![
        "scenario" => "propagation",
        "changes" => CHANGES,
        "p50Ms" => (ms(p50) * 10.0).round() / 10.0,
        "p99Ms" => (ms(p99) * 10.0).round() / 10.0,
        "maxMs" => (ms(max) * 10.0).round() / 10.0,
    ])
}
