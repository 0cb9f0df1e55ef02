//! Group fan-out on a Web PubSub listener: `--connections` clients (default 1,000) join one
//! group over `json.webpubsub.azure.v1`, with client URLs from the token API, and one more client
//! sends `sendToGroup` frames at `--rate` (default 100/s) for `--seconds`. Every member receives
//! every message; each carries its send time, so the members measure publish → member latency.
//! Printed: deliveries per second, latency percentiles, messages lost, server CPU per delivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::api::Api;
use crate::load::{connect, request, small_config, unix_nanos, Ws};
use crate::scenarios::{summary, Options, Summary};
use crate::server::Server;

const LISTENER: &str = "bench-wps";
const PATH: &str = "/bench-wps";
const GROUP: &str = "fan";

/// A client URL (with its token) for each of `n` new devices.
async fn client_urls(api: &Api, n: usize) -> Result<Vec<String>> {
    let devices = api.register_devices(n).await?;
    let mut urls = Vec::with_capacity(n);
    for device in &devices {
        let answer = api
            .post(
                &format!("devices/{}/token", device.device_id),
                &json!({"listener": LISTENER,
                        "roles": ["webpubsub.joinLeaveGroup", "webpubsub.sendToGroup"]}),
            )
            .await?;
        let url = answer["url"]
            .as_str()
            .context("the token answer has no url")?;
        urls.push(url.to_owned());
    }
    Ok(urls)
}

/// Connects with the JSON Web PubSub sub-protocol and waits for `connected`.
async fn open(url: &str) -> Result<Ws> {
    let mut req = request(url, None)?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "json.webpubsub.azure.v1".parse().expect("a header value"),
    );
    let mut ws = connect(req, small_config()).await?;
    let first = next_json(&mut ws).await?;
    if first["event"] != "connected" {
        bail!("expected system/connected first, got {first}");
    }
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> Result<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return Ok(serde_json::from_str(&text)?),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => bail!("expected a text frame, got {other:?}"),
            Err(_) => bail!("no frame within 10 s"),
        }
    }
}

/// What one member saw.
struct Received {
    count: u64,
    latency_us: Histogram<u64>,
}

pub async fn fanout(server: &Server, api: &Api, opts: &Options) -> Result<Summary> {
    api.create(
        "sentinels",
        json!({"key": "bench-tokens", "name": "Bench tokens", "method": "token"}),
    )
    .await?;
    api.create(
        "listeners",
        json!({"key": LISTENER, "name": "Bench Web PubSub", "listenerType": "websocket",
               "mode": "server", "contentType": "json", "path": PATH, "anonymous": true,
               "sentinel": "bench-tokens", "protocol": "webpubsub"}),
    )
    .await?;
    api.wait_listener_running(LISTENER).await?;
    let members = opts.connections;
    let mut urls = client_urls(api, members + 1).await?;
    let publisher_url = urls.pop().expect("one more url than members");

    // Members: connect, join, then count and time every group message until told to stop.
    let (stop, _) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<()>>();
    let mut tasks = JoinSet::new();
    let joining = Instant::now();
    for url in urls {
        let permits = permits.clone();
        let ready = ready_tx.clone();
        let mut stop = stop.subscribe();
        tasks.spawn(async move {
            let permit = permits.acquire_owned().await.expect("never closed");
            let joined = async {
                let mut ws = open(&url).await?;
                ws.send(Message::Text(
                    json!({"type": "joinGroup", "group": GROUP, "ackId": 1})
                        .to_string()
                        .into(),
                ))
                .await?;
                let ack = next_json(&mut ws).await?;
                if ack["success"] != true {
                    bail!("joinGroup was not acknowledged: {ack}");
                }
                Ok(ws)
            }
            .await;
            drop(permit);
            let mut ws = match joined {
                Ok(ws) => {
                    let _ = ready.send(Ok(()));
                    ws
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return None;
                }
            };
            drop(ready);
            let mut received = Received {
                count: 0,
                latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            };
            loop {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    next = ws.next() => match next {
                        Some(Ok(Message::Text(text))) => {
                            let now = unix_nanos();
                            let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                            if let Some(sent) = frame["data"]["sentAtNs"].as_u64() {
                                received.count += 1;
                                received
                                    .latency_us
                                    .saturating_record(now.saturating_sub(sent) / 1_000);
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
            Some(received)
        });
    }
    drop(ready_tx);
    let mut joined = 0usize;
    let mut failures = 0usize;
    let mut sample = None;
    while let Some(result) = ready_rx.recv().await {
        match result {
            Ok(()) => joined += 1,
            Err(e) => {
                failures += 1;
                sample.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let join_seconds = joining.elapsed().as_secs_f64();
    eprintln!("{joined} members joined in {join_seconds:.1} s ({failures} failed)");
    if let Some(sample) = &sample {
        eprintln!("first failure: {sample}");
    }
    if joined == 0 {
        bail!("no member joined the group");
    }

    // The publisher: sendToGroup at the rate, without acks (fire and forget, as the SDK's
    // fireAndForget option sends).
    let rate = if opts.rate == 0 { 100 } else { opts.rate };
    let mut publisher = open(&publisher_url).await?;
    let cpu_before = server.cpu_time()?;
    let total = rate * opts.seconds;
    let started = Instant::now();
    for seq in 0..total {
        let due = started + Duration::from_secs_f64(seq as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let frame = json!({"type": "sendToGroup", "group": GROUP, "noEcho": true,
                           "dataType": "json", "data": {"seq": seq, "sentAtNs": unix_nanos()}});
        publisher
            .send(Message::Text(frame.to_string().into()))
            .await?;
    }
    let sending = started.elapsed().as_secs_f64();
    let expected = total * joined as u64;

    // Let the last messages arrive, then stop the members and gather what they saw.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = server.cpu_time()?.saturating_sub(cpu_before);
    let rss = server.rss_bytes()?;
    let _ = stop.send(true);
    let mut delivered = 0u64;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    while let Some(joined) = tasks.join_next().await {
        if let Some(received) = joined? {
            delivered += received.count;
            latency.add(&received.latency_us)?;
        }
    }
    let _ = publisher.close(None).await;
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1e3;
    let deliveries_per_second = delivered as f64 / sending;
    println!("fan-out to a group of {joined} Web PubSub clients, one publisher at {rate} msg/s for {sending:.1} s");
    println!(
        "  deliveries: {delivered} of {expected} ({} lost), {deliveries_per_second:.0}/s",
        expected.saturating_sub(delivered)
    );
    println!(
        "  publish → member latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1e3
    );
    println!(
        "  server CPU per delivery: {:.2} µs; server RSS {:.1} MB",
        cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64,
        rss as f64 / 1e6
    );
    Ok(summary![
        "scenario" => "fanout",
        "members" => joined,
        "joinFailures" => failures,
        "publishRate" => rate,
        "published" => total,
        "expected" => expected,
        "delivered" => delivered,
        "lost" => expected.saturating_sub(delivered),
        "deliveriesPerSecond" => deliveries_per_second.round(),
        "p50Ms" => ms(0.5),
        "p99Ms" => ms(0.99),
        "maxMs" => latency.max() as f64 / 1e3,
        "cpuMicrosPerDelivery" => cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64,
        "serverRssMb" => rss as f64 / 1e6,
    ])
}
