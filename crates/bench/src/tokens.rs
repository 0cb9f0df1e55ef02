//! The `tokens` scenario: WebSocket handshakes with connection tokens (the `token` sentinel
//! method). Each connect carries an HS256 token in `access_token`, which the server verifies
//! before the upgrade (one HMAC, an in-memory registry lookup); the client waits for the 101,
//! then closes. Prints handshakes per second and the handshake latency percentiles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{metric_sum, Api};
use crate::load::{connect, request, small_config};
use crate::scenarios::{summary, Options, Summary};
use crate::server::Server;

const SENTINEL_KEY: &str = "bench-tokens";
const LISTENER_KEY: &str = "bench-tokens";
/// Tokens are issued through the API for at most this many devices; connection i uses token
/// i % devices (verification costs the same whichever device a token names).
const MAX_TOKEN_DEVICES: usize = 500;

pub async fn tokens(server: &Server, api: &Api, opts: &Options) -> Result<Summary> {
    api.create(
        "sentinels",
        json!({"key": SENTINEL_KEY, "name": "Bench tokens", "method": "token"}),
    )
    .await?;
    api.create(
        "listeners",
        json!({
            "key": LISTENER_KEY, "name": "Bench tokens", "listenerType": "websocket",
            "mode": "server", "contentType": "json", "path": "/bench-tokens",
            "anonymous": true, "sentinel": SENTINEL_KEY
        }),
    )
    .await?;
    api.wait_listener_running(LISTENER_KEY).await?;
    let devices = opts.devices.clamp(1, MAX_TOKEN_DEVICES);
    let t = Instant::now();
    let keys = api.register_devices(devices).await?;
    let mut urls = Vec::with_capacity(keys.len());
    for key in &keys {
        let answer = api
            .post(
                &format!("devices/{}/token", key.device_id),
                &json!({"listener": LISTENER_KEY, "roles": ["webpubsub.sendToGroup"], "expiresInMinutes": 60}),
            )
            .await?;
        let url = answer["url"]
            .as_str()
            .with_context(|| format!("no url in {answer}"))?;
        // The client URL the API answers is used as it is; it must point at this server.
        if !url.starts_with(&format!("{}/bench-tokens?access_token=", server.ws_base())) {
            bail!(
                "the issued URL {url} does not point at {}",
                server.ws_base()
            );
        }
        urls.push(url.to_owned());
    }
    println!(
        "registered {devices} devices and issued their tokens in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    // One connect first, so a setup problem is reported as itself rather than as n failures.
    let mut first = connect(request(&urls[0], None)?, small_config())
        .await
        .context("the first token connect failed")?;
    let _ = first.close(None).await;
    drop(first);

    let n = opts.connections;
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let t = Instant::now();
    for i in 0..n {
        let req = request(&urls[i % urls.len()], None)?;
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let started = Instant::now();
            let mut ws = connect(req, small_config()).await?;
            let took = started.elapsed();
            // Close and wait for the server's close frame, so the connection's whole life is
            // inside the measured window.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                ws.send(Message::Close(None)).await?;
                while let Some(message) = ws.next().await {
                    if matches!(message?, Message::Close(_)) {
                        break;
                    }
                }
                Ok::<(), tokio_tungstenite::tungstenite::Error>(())
            })
            .await;
            Ok::<Duration, anyhow::Error>(took)
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut failures = 0usize;
    let mut sample = None;
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            Ok(took) => hist.saturating_record(took.as_micros() as u64),
            Err(e) => {
                failures += 1;
                sample.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let total = t.elapsed().as_secs_f64();
    let ok = hist.len();
    if ok == 0 {
        bail!(
            "no token handshake succeeded: {}",
            sample.unwrap_or_default()
        );
    }
    let per_second = ok as f64 / total.max(1e-6);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    let (p50, p99, max) = (ms(0.5), ms(0.99), hist.max() as f64 / 1e3);
    let refused =
        metric_sum(&api.metrics().await?, "iotgate_upgrades_rejected_total", "").unwrap_or(0.0);

    println!();
    println!("== scenario tokens ==");
    println!(
        "handshakes               {ok} of {n} ({failures} failed, {refused} refused by the server), {} at a time",
        opts.concurrency
    );
    println!("devices with tokens      {devices}");
    println!("total                    {total:.2} s");
    println!("handshakes/s             {per_second:.0}");
    println!("handshake ms             p50 {p50:.2}  p99 {p99:.2}  max {max:.2}");
    if let Some(sample) = &sample {
        println!("first failure            {sample}");
    }
    Ok(summary![
        "scenario" => "tokens",
        "connections" => n,
        "concurrency" => opts.concurrency,
        "devices" => devices,
        "connected" => ok,
        "failures" => failures,
        "refused" => refused,
        "totalSeconds" => total,
        "handshakesPerSecond" => per_second.round(),
        "handshakeMs" => json!({"p50": p50, "p99": p99, "max": max}),
    ])
}
