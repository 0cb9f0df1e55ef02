//! Acknowledged delivery under load.
//!
//! - `ack`: devices → sentinel → route → the SQLite store with `acknowledge: stored`, each
//!   connection keeping up to `--window` messages unacknowledged; prints acknowledged messages
//!   per second and the send → ack latency. Then the same load on a fresh server with
//!   `acknowledge: none` (no window: the server's push-back paces the devices), stored messages
//!   per second, side by side.
//! - `crash`: the `ack` load, SIGKILL of the server in the middle of it, a restart on the same
//!   data directory, every device resending what it never heard acknowledged; then the database
//!   is read: acknowledged before the kill, found after the restart, duplicates (must be 0).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use sqlx::Connection as _;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{metric_sum, Api, DeviceKey};
use crate::load::{connect_many, sender_config, Timeline, Ws};
use crate::scenarios::{summary, Options, Summary};
use crate::server::Server;

const LISTENER_KEY: &str = "bench";
const LISTENER_PATH: &str = "/bench";
const STORE_KEY: &str = "bench-store";

/// Sentinel, store, a listener with `acknowledge` = `mode`, and a route; waits until it runs.
async fn configure(api: &Api, mode: &str, window: usize) -> Result<()> {
    api.create(
        "sentinels",
        json!({"key": "bench-keys", "name": "Bench keys", "method": "accessKey"}),
    )
    .await?;
    api.create(
        "downstreams",
        json!({"key": STORE_KEY, "name": "Bench store", "type": "store"}),
    )
    .await?;
    let mut listener = json!({
        "key": LISTENER_KEY, "name": "Bench", "listenerType": "websocket", "mode": "server",
        "contentType": "json", "path": LISTENER_PATH, "anonymous": true, "sentinel": "bench-keys",
        "acknowledge": mode,
    });
    if mode != "none" {
        listener["maxInFlight"] = json!(window);
    }
    api.create("listeners", listener).await?;
    api.create(
        "routes",
        json!({"key": "bench-route", "name": "Bench route", "listeners": [LISTENER_KEY],
               "downstreams": [STORE_KEY]}),
    )
    .await?;
    api.wait_listener_running(LISTENER_KEY).await?;
    Ok(())
}

/// What every device connection of a run saw.
#[derive(Default)]
struct AckStats {
    sent: AtomicU64,
    acked: AtomicU64,
    acked_in_window: AtomicU64,
    duplicates: AtomicU64,
    refused: AtomicU64,
    latency_us: Mutex<Option<Histogram<u64>>>,
}

/// One device's ids: sent and acknowledged (for the crash check).
#[derive(Default)]
struct Ledger {
    sent: Vec<u64>,
    acked: HashSet<u64>,
}

/// Sends `{"deviceId","accessKey","messageId":n,...}` with at most `window` unanswered, paced at
/// `per_conn_rate` (0 = as fast as acks allow), until `stop_at`; then waits (at most `drain`) for
/// the answers still due. Refused messages are sent again after their hint.
#[allow(clippy::too_many_arguments)]
async fn drive_acked(
    ws: Ws,
    key: DeviceKey,
    window: usize,
    per_conn_rate: f64,
    timeline: Timeline,
    resend: Vec<u64>,
    new_ids_from: Option<u64>,
    stats: Arc<AckStats>,
    drain: Duration,
) -> Ledger {
    let (mut sink, mut stream) = ws.split();
    let permits = Arc::new(Semaphore::new(window));
    let sent_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (retry_tx, mut retry_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Duration)>();
    let prefix = format!(
        "{{\"deviceId\":\"{}\",\"accessKey\":\"{}\",\"messageId\":",
        key.device_id, key.access_key
    );

    let reader = {
        let (permits, sent_at, ledger, stats) = (
            permits.clone(),
            sent_at.clone(),
            ledger.clone(),
            stats.clone(),
        );
        tokio::spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            while let Some(Ok(message)) = stream.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(ack) = frame.get("ack") {
                    let Some(id) = ack["messageId"].as_u64() else {
                        continue;
                    };
                    let now = Instant::now();
                    if let Some(at) = sent_at.lock().expect("lock").remove(&id) {
                        if timeline.in_window(now) {
                            let _ = histogram.record(now.duration_since(at).as_micros() as u64);
                            stats.acked_in_window.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if ack["duplicate"] == true {
                        stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                    ledger.lock().expect("lock").acked.insert(id);
                    permits.add_permits(1);
                } else if let Some(error) = frame.get("error") {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    if let Some(id) = error["messageId"].as_u64() {
                        sent_at.lock().expect("lock").remove(&id);
                        let wait = error["retryAfterMs"].as_u64().unwrap_or(500);
                        let _ = retry_tx.send((id, Duration::from_millis(wait)));
                    }
                    permits.add_permits(1);
                }
            }
            // The connection is gone (the crash scenario kills the server): wake a sender that
            // waits for a free window slot, or it would wait for acks that can no longer come.
            permits.close();
            histogram
        })
    };

    tokio::time::sleep_until(timeline.start.into()).await;
    let mut next_id = new_ids_from.unwrap_or_default();
    let mut queue: std::collections::VecDeque<u64> = resend.into();
    let mut retries: Vec<(Instant, u64)> = Vec::new();
    let interval = (per_conn_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / per_conn_rate));
    let mut next_send = timeline.start;
    loop {
        let now = Instant::now();
        retries.retain(|(at, id)| {
            let due = *at <= now;
            if due {
                queue.push_back(*id);
            }
            !due
        });
        while let Ok((id, wait)) = retry_rx.try_recv() {
            retries.push((now + wait, id));
        }
        let sending = new_ids_from.is_some() && now < timeline.end;
        let id = match queue.pop_front() {
            Some(id) => id,
            None if sending => {
                if let Some(interval) = interval {
                    if now < next_send {
                        tokio::time::sleep_until(next_send.into()).await;
                    }
                    next_send += interval;
                }
                next_id += 1;
                next_id - 1
            }
            None => {
                let waiting = window - permits.available_permits();
                if waiting == 0 && retries.is_empty() {
                    break;
                }
                if now >= timeline.end + drain {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = permits.acquire().await else {
            break;
        };
        permit.forget();
        let mut text = String::with_capacity(prefix.len() + 48);
        text.push_str(&prefix);
        text.push_str(&format!("{id},\"temperature\":21.5}}"));
        sent_at.lock().expect("lock").insert(id, Instant::now());
        if sink.send(Message::Text(text.into())).await.is_err() {
            break;
        }
        ledger.lock().expect("lock").sent.push(id);
        stats.sent.fetch_add(1, Ordering::Relaxed);
    }
    let _ = sink.send(Message::Close(None)).await;
    let histogram = match tokio::time::timeout(Duration::from_secs(5), reader).await {
        Ok(Ok(histogram)) => Some(histogram),
        _ => None,
    };
    if let Some(histogram) = histogram {
        let mut all = stats.latency_us.lock().expect("lock");
        match all.as_mut() {
            Some(all) => {
                let _ = all.add(&histogram);
            }
            None => *all = Some(histogram),
        }
    }
    Arc::try_unwrap(ledger)
        .map(|m| m.into_inner().expect("lock"))
        .unwrap_or_default()
}

/// Opens the device connections, registering devices first.
async fn open(server: &Server, api: &Api, opts: &Options) -> Result<(Vec<DeviceKey>, Vec<Ws>)> {
    let keys = api.register_devices(opts.devices.max(1)).await?;
    let url = format!("{}{LISTENER_PATH}", server.ws_base());
    let (conns, failures, sample) =
        connect_many(&url, opts.connections, opts.concurrency, sender_config()).await?;
    if failures > 0 {
        bail!(
            "{failures} device connections failed: {}",
            sample.unwrap_or_default()
        );
    }
    Ok((keys, conns))
}

/// Stored rows counted by the store module (its delivered counter).
async fn stored(api: &Api) -> Result<f64> {
    let text = api.metrics().await?;
    Ok(metric_sum(
        &text,
        "iotgate_messages_delivered_total",
        "downstream=\"bench-store\"",
    )
    .unwrap_or(0.0))
}

struct AckRun {
    acked_per_second: f64,
    /// Server CPU time per acknowledged message in the window, µs.
    cpu_us_per_message: f64,
    sent: u64,
    acked: u64,
    refused: u64,
    duplicates: u64,
    latency: Option<Histogram<u64>>,
    stored_per_second: f64,
}

/// One acknowledged run on a configured server.
async fn acked_run(server: &Server, api: &Api, opts: &Options) -> Result<AckRun> {
    let (keys, conns) = open(server, api, opts).await?;
    let timeline = Timeline::new(
        Duration::from_secs(opts.warmup),
        Duration::from_secs(opts.seconds.max(1)),
    );
    let stats = Arc::new(AckStats::default());
    let per_conn_rate = opts.rate as f64 / conns.len().max(1) as f64;
    let mut tasks = JoinSet::new();
    for (i, ws) in conns.into_iter().enumerate() {
        tasks.spawn(drive_acked(
            ws,
            keys[i % keys.len()].clone(),
            opts.window,
            per_conn_rate,
            timeline,
            Vec::new(),
            // Connections sharing a device keep their ids apart.
            Some((i as u64) << 40),
            stats.clone(),
            Duration::from_secs(15),
        ));
    }
    tokio::time::sleep_until(timeline.window_start.into()).await;
    let (stored_start, t0, cpu0) = (stored(api).await?, Instant::now(), server.cpu_time()?);
    tokio::time::sleep_until(timeline.end.into()).await;
    let (stored_end, t1, cpu1) = (stored(api).await?, Instant::now(), server.cpu_time()?);
    while tasks.join_next().await.is_some() {}
    let measured = opts.seconds.max(1) as f64;
    let latency = stats.latency_us.lock().expect("lock").take();
    let acked_in_window = stats.acked_in_window.load(Ordering::Relaxed) as f64;
    Ok(AckRun {
        acked_per_second: acked_in_window / measured,
        cpu_us_per_message: (cpu1 - cpu0).as_secs_f64() * 1e6 / acked_in_window.max(1.0),
        sent: stats.sent.load(Ordering::Relaxed),
        acked: stats.acked.load(Ordering::Relaxed),
        refused: stats.refused.load(Ordering::Relaxed),
        duplicates: stats.duplicates.load(Ordering::Relaxed),
        latency,
        stored_per_second: (stored_end - stored_start) / (t1 - t0).as_secs_f64().max(1e-3),
    })
}

fn percentiles(h: &Option<Histogram<u64>>) -> Value {
    match h {
        Some(h) => json!({"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99),
                          "p999": h.value_at_quantile(0.999), "max": h.max(), "samples": h.len()}),
        None => Value::Null,
    }
}

fn ms(us: &Value, key: &str) -> String {
    us[key]
        .as_u64()
        .map_or_else(|| "-".to_owned(), |v| format!("{:.1}", v as f64 / 1000.0))
}

/// ack: `acknowledge: stored` vs `acknowledge: none`, same load, fresh servers.
pub async fn ack(server: &Server, api: &Api, opts: &Options) -> Result<Summary> {
    configure(api, "stored", opts.window).await?;
    println!(
        "acknowledge: stored — {} connections, {} devices, window {}, rate {}, {} s + {} s",
        opts.connections,
        opts.devices,
        opts.window,
        if opts.rate == 0 {
            "unlimited".to_owned()
        } else {
            format!("{} msg/s", opts.rate)
        },
        opts.warmup,
        opts.seconds
    );
    let acked = acked_run(server, api, opts).await?;

    // The same load without acknowledgements on a fresh server: throughput is what gets stored.
    let plain = Server::start(&opts.server_bin, false).await?;
    let plain_api = Api::login(plain.http_base()).await?;
    configure(&plain_api, "none", opts.window).await?;
    println!("acknowledge: none — same load on a fresh server");
    let (keys, conns) = open(&plain, &plain_api, opts).await?;
    let plan = crate::load::SendPlan {
        rate: opts.rate,
        in_flight: 16,
        timeline: Timeline::new(
            Duration::from_secs(opts.warmup),
            Duration::from_secs(opts.seconds.max(1)),
        ),
    };
    let load = crate::load::DeviceLoad::spawn(conns, &keys, plan);
    tokio::time::sleep_until(plan.timeline.window_start.into()).await;
    let (s0, t0, cpu0) = (stored(&plain_api).await?, Instant::now(), plain.cpu_time()?);
    tokio::time::sleep_until(plan.timeline.end.into()).await;
    let (s1, t1, cpu1) = (stored(&plain_api).await?, Instant::now(), plain.cpu_time()?);
    load.wait_writers_done(Duration::from_secs(30)).await;
    load.shutdown().await;
    let plain_stored_per_second = (s1 - s0) / (t1 - t0).as_secs_f64().max(1e-3);
    let plain_cpu_us = (cpu1 - cpu0).as_secs_f64() * 1e6 / (s1 - s0).max(1.0);
    let _ = plain.stop().await;

    let latency = percentiles(&acked.latency);
    println!();
    println!("== scenario ack ==");
    println!("                           acknowledge: stored   acknowledge: none");
    println!(
        "stored messages/s          {:>19.0}   {:>17.0}",
        acked.stored_per_second, plain_stored_per_second
    );
    println!(
        "acknowledged messages/s    {:>19.0}   {:>17}",
        acked.acked_per_second, "-"
    );
    println!(
        "ack latency ms p50/p99/p99.9  {} / {} / {}   (max {}, {} samples in the window)",
        ms(&latency, "p50"),
        ms(&latency, "p99"),
        ms(&latency, "p999"),
        ms(&latency, "max"),
        latency["samples"]
    );
    println!(
        "sent {}  acked {}  refused {}  duplicates {}",
        acked.sent, acked.acked, acked.refused, acked.duplicates
    );
    Ok(summary![
        "scenario" => "ack",
        "connections" => opts.connections,
        "window" => opts.window,
        "rate" => opts.rate,
        "seconds" => opts.seconds,
        "ackedPerSecond" => acked.acked_per_second.round(),
        "storedPerSecondAcked" => acked.stored_per_second.round(),
        "storedPerSecondNone" => plain_stored_per_second.round(),
        "cpuUsPerMessageAcked" => (acked.cpu_us_per_message * 10.0).round() / 10.0,
        "cpuUsPerMessageNone" => (plain_cpu_us * 10.0).round() / 10.0,
        "ackLatencyUs" => latency,
        "sent" => acked.sent,
        "acked" => acked.acked,
        "refused" => acked.refused,
        "duplicates" => acked.duplicates,
    ])
}

/// Reads (device, message id) of every telemetry row.
async fn stored_ids(data_dir: &Path) -> Result<Vec<(String, String)>> {
    // Read-write although it only reads: after SIGKILL the write-ahead log still holds the last
    // commits, and a read-only connection cannot replay it ("unable to open database file").
    // The server is dead at this point, so nothing else writes.
    let url = format!("sqlite://{}?mode=rw", data_dir.join("iotgate.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&url)
        .await
        .context("opening the database")?;
    let rows: Vec<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT device_id, message_id FROM telemetry")
            .fetch_all(&mut conn)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(d, m)| (d.unwrap_or_default(), m.unwrap_or_default()))
        .collect())
}

/// crash: SIGKILL in the middle of an acknowledged run, restart, resend what was not acked.
pub async fn crash(mut server: Server, api: &Api, opts: &Options) -> Result<Summary> {
    configure(api, "stored", opts.window).await?;
    let (keys, conns) = open(&server, api, opts).await?;
    let run_for = Duration::from_secs(opts.seconds.max(1));
    let timeline = Timeline::new(Duration::ZERO, run_for * 10);
    let stats = Arc::new(AckStats::default());
    let per_conn_rate = opts.rate as f64 / conns.len().max(1) as f64;
    let mut tasks = Vec::new();
    for (i, ws) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(drive_acked(
            ws,
            keys[i % keys.len()].clone(),
            opts.window,
            per_conn_rate,
            timeline,
            Vec::new(),
            Some((i as u64) << 40),
            stats.clone(),
            Duration::ZERO,
        )));
    }
    tokio::time::sleep(run_for).await;
    let temp_dir = server.take_temp_dir();
    let data_dir = server.data_dir.clone();
    server.kill().await?;
    println!(
        "killed the server with SIGKILL after {} s",
        run_for.as_secs()
    );
    let mut ledgers = Vec::new();
    for task in tasks {
        ledgers.push(task.await?);
    }
    let acked_before: usize = ledgers.iter().map(|l| l.acked.len()).sum();
    let sent_before: usize = ledgers.iter().map(|l| l.sent.len()).sum();
    let found: HashSet<(String, String)> = stored_ids(&data_dir).await?.into_iter().collect();
    let mut lost = 0;
    for (i, ledger) in ledgers.iter().enumerate() {
        let device = &keys[i % keys.len()].device_id;
        lost += ledger
            .acked
            .iter()
            .filter(|id| !found.contains(&(device.clone(), id.to_string())))
            .count();
    }

    let restarted = Server::start_in(&opts.server_bin, &data_dir).await?;
    let restarted_api = Api::login(restarted.http_base()).await?;
    restarted_api.wait_listener_running(LISTENER_KEY).await?;
    let url = format!("{}{LISTENER_PATH}", restarted.ws_base());
    let (conns, failures, sample) =
        connect_many(&url, ledgers.len(), opts.concurrency, sender_config()).await?;
    if failures > 0 {
        bail!(
            "{failures} reconnects failed: {}",
            sample.unwrap_or_default()
        );
    }
    let timeline = Timeline::new(Duration::ZERO, Duration::ZERO);
    let resend_stats = Arc::new(AckStats::default());
    let mut tasks = JoinSet::new();
    for ((i, ws), ledger) in conns.into_iter().enumerate().zip(&ledgers) {
        let resend: Vec<u64> = ledger
            .sent
            .iter()
            .filter(|id| !ledger.acked.contains(id))
            .copied()
            .collect();
        tasks.spawn(drive_acked(
            ws,
            keys[i % keys.len()].clone(),
            opts.window,
            0.0,
            timeline,
            resend,
            None,
            resend_stats.clone(),
            Duration::from_secs(60),
        ));
    }
    while tasks.join_next().await.is_some() {}
    let _ = restarted.stop().await;
    let rows = stored_ids(&data_dir).await;
    // Only now may the data directory go: it holds the database just read.
    drop(temp_dir);
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => bail!("reading the database after the run: {e:#}"),
    };
    let distinct: HashSet<&(String, String)> = rows.iter().collect();
    let duplicates = rows.len() - distinct.len();
    let resent = resend_stats.sent.load(Ordering::Relaxed);
    let resend_duplicates = resend_stats.duplicates.load(Ordering::Relaxed);
    println!();
    println!("== scenario crash ==");
    println!("messages sent before the kill      {sent_before}");
    println!("acknowledged before the kill       {acked_before}");
    println!("of those, missing after restart    {lost}");
    println!(
        "stored but not acknowledged        {}",
        found.len().saturating_sub(acked_before)
    );
    println!("resent after restart               {resent} ({resend_duplicates} acknowledged as duplicates)");
    println!(
        "rows after the retries             {} ({} distinct)",
        rows.len(),
        distinct.len()
    );
    println!("duplicate rows                     {duplicates}");
    Ok(summary![
        "scenario" => "crash",
        "sentBeforeKill" => sent_before,
        "ackedBeforeKill" => acked_before,
        "ackedMissingAfterRestart" => lost,
        "storedNotAcked" => found.len().saturating_sub(acked_before),
        "resent" => resent,
        "resendDuplicates" => resend_duplicates,
        "rows" => rows.len(),
        "duplicateRows" => duplicates,
    ])
}
