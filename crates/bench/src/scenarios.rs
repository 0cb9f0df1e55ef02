//! The four scenarios. Each configures the fresh server over the REST API, drives the load,
//! prints a human-readable block and returns the JSON summary line's object.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{metric_sum, Api};
use crate::load::{
    connect, connect_many, query_encode, request, sender_config, small_config, ConnectedSubscriber,
    DeviceLoad, SendPlan, Timeline,
};
use crate::server::{own_rss_bytes, Server};

/// The final JSON line's fields, in the order they are printed (`scenario` first).
pub type Summary = Vec<(&'static str, Value)>;

/// `summary!["key" => value, ...]`: a [`Summary`] with every value turned into JSON.
macro_rules! summary {
    ($($key:literal => $value:expr),* $(,)?) => {
        vec![$(($key, serde_json::json!($value))),*]
    };
}
pub(crate) use summary;

/// Renders a summary as one line of JSON with the fields in order.
pub fn summary_line(summary: &Summary) -> String {
    let mut line = String::from("{");
    for (i, (key, value)) in summary.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&Value::from(*key).to_string());
        line.push(':');
        line.push_str(&value.to_string());
    }
    line.push('}');
    line
}

/// Settings shared by the scenarios (already resolved from the command line).
pub struct Options {
    /// The server binary, for scenarios that start a second server or restart one.
    pub server_bin: std::path::PathBuf,
    /// Unacknowledged messages per connection (ack and crash scenarios).
    pub window: usize,
    pub connections: usize,
    pub devices: usize,
    pub seconds: u64,
    pub warmup: u64,
    pub rate: u64,
    pub in_flight: usize,
    pub concurrency: usize,
}

const LISTENER_KEY: &str = "bench";
const LISTENER_PATH: &str = "/bench";
const SENTINEL_KEY: &str = "bench-keys";
const LIVE_DOWNSTREAM: &str = "bench-live";
const STORE_DOWNSTREAM: &str = "bench-store";
const BASIC_LISTENER_KEY: &str = "bench-basic";
const BASIC_USER: &str = "device";
const BASIC_PASSWORD: &str = "bench-basic-pass-1";

/// Creates sentinel `bench-keys` and the anonymous json listener `bench` at `/bench`, and waits
/// until the listener runs.
pub(crate) async fn create_device_listener(api: &Api) -> Result<()> {
    api.create(
        "sentinels",
        json!({"key": SENTINEL_KEY, "name": "Bench keys", "method": "accessKey"}),
    )
    .await?;
    api.create(
        "listeners",
        json!({
            "key": LISTENER_KEY, "name": "Bench", "listenerType": "websocket", "mode": "server",
            "contentType": "json", "path": LISTENER_PATH, "anonymous": true, "sentinel": SENTINEL_KEY
        }),
    )
    .await?;
    api.wait_listener_running(LISTENER_KEY).await?;
    Ok(())
}

/// Creates route `bench-route` from listener `bench` to `downstreams`.
pub(crate) async fn create_route(api: &Api, downstreams: &[&str]) -> Result<()> {
    api.create(
        "routes",
        json!({"key": "bench-route", "name": "Bench route", "listeners": [LISTENER_KEY],
               "downstreams": downstreams}),
    )
    .await?;
    Ok(())
}

/// Registers the devices and opens the sending device connections.
pub(crate) async fn open_device_connections(
    server: &Server,
    api: &Api,
    opts: &Options,
) -> Result<(Vec<crate::api::DeviceKey>, Vec<crate::load::Ws>, usize)> {
    let t = Instant::now();
    let keys = api.register_devices(opts.devices.max(1)).await?;
    println!(
        "registered {} devices in {:.2} s",
        keys.len(),
        t.elapsed().as_secs_f64()
    );
    let url = format!("{}{LISTENER_PATH}", server.ws_base());
    let t = Instant::now();
    let (conns, failures, sample) =
        connect_many(&url, opts.connections, opts.concurrency, sender_config()).await?;
    println!(
        "opened {} device connections in {:.2} s ({failures} failed)",
        conns.len(),
        t.elapsed().as_secs_f64()
    );
    if let Some(sample) = sample {
        eprintln!("warning: a device connect failed: {sample}");
    }
    if conns.is_empty() {
        bail!("no device connection could be opened");
    }
    Ok((keys, conns, failures))
}

pub(crate) fn plan(opts: &Options) -> SendPlan {
    SendPlan {
        rate: opts.rate,
        in_flight: opts.in_flight,
        timeline: Timeline::new(
            Duration::from_secs(opts.warmup),
            Duration::from_secs(opts.seconds.max(1)),
        ),
    }
}

pub(crate) fn rate_text(rate: u64) -> String {
    if rate == 0 {
        "unlimited".to_owned()
    } else {
        format!("{rate} msg/s")
    }
}

pub(crate) fn first_problem(load: &DeviceLoad) -> Option<String> {
    load.stats
        .first_problem
        .lock()
        .expect("not poisoned")
        .clone()
}

/// Reads the server's RSS, printing a warning instead of failing.
pub(crate) fn server_rss(server: &Server) -> Option<u64> {
    server
        .rss_bytes()
        .map_err(|e| eprintln!("warning: cannot read the server's VmRSS: {e:#}"))
        .ok()
}

pub(crate) fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(
        || "?".to_owned(),
        |b| format!("{:.1} MiB", b as f64 / 1048576.0),
    )
}

/// websocket: devices → listener → sentinel → route → websocket downstream → 1 subscriber.
pub async fn websocket(server: &Server, api: &Api, opts: &Options) -> Result<Summary> {
    create_device_listener(api).await?;
    api.create(
        "downstreams",
        json!({"key": LIVE_DOWNSTREAM, "name": "Bench live", "type": "websocket",
               "path": "/bench-live", "format": "envelope"}),
    )
    .await?;
    create_route(api, &[LIVE_DOWNSTREAM]).await?;

    let sub_url = format!(
        "{}/bench-live?token={}",
        server.ws_base(),
        query_encode(&api.token)
    );
    let subscriber = ConnectedSubscriber::connect(&sub_url).await?;
    // Let the server register the subscription before the first envelope.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (keys, conns, connect_failures) = open_device_connections(server, api, opts).await?;
    let plan = plan(opts);
    let timeline = plan.timeline;
    let subscriber = subscriber.start(timeline);
    let load = DeviceLoad::spawn(conns, &keys, plan);
    println!(
        "sending: {} connections, {} devices, rate {}, {} in flight, {} s warm-up + {} s measured",
        load.connections,
        keys.len(),
        rate_text(opts.rate),
        opts.in_flight,
        opts.warmup,
        opts.seconds
    );

    tokio::time::sleep_until(timeline.window_start.into()).await;
    let cpu_start = server.cpu_time().ok();
    tokio::time::sleep_until(timeline.end.into()).await;
    let cpu_end = server.cpu_time().ok();
    let rss_loaded = server_rss(server);
    if !load.wait_writers_done(Duration::from_secs(30)).await {
        eprintln!("warning: some device connections were still flushing 30 s after the end");
    }
    // Drain: until the subscriber has what was sent (less rejections), no progress for 3 s, or 15 s.
    let sent_total = load.stats.sent_total.load(Ordering::Relaxed);
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    let mut last = (u64::MAX, Instant::now());
    loop {
        let received = subscriber.stats.received_total.load(Ordering::Relaxed);
        let errors = load.stats.error_frames.load(Ordering::Relaxed);
        if received + errors >= sent_total || Instant::now() >= drain_deadline {
            break;
        }
        if received != last.0 {
            last = (received, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = api.metrics().await.unwrap_or_else(|e| {
        eprintln!("warning: {e:#}");
        String::new()
    });
    let dropped = metric_sum(&metrics, "iotgate_subscriber_dropped_total", "");
    let status = api
        .listener_status(LISTENER_KEY)
        .await
        .unwrap_or(Value::Null);
    // Read the device-side counters before our own Close frames can produce server closes.
    let problem = first_problem(&load);
    let sent_window = load.stats.sent_window.load(Ordering::Relaxed);
    let errors = load.stats.error_frames.load(Ordering::Relaxed);
    let closed = load.stats.closed_by_server.load(Ordering::Relaxed);
    let connections = load.connections;
    let sub_stats = subscriber.stats.clone();
    let hist = subscriber.finish().await?;
    load.shutdown().await;

    let received_total = sub_stats.received_total.load(Ordering::Relaxed);
    let received_window = sub_stats.received_window.load(Ordering::Relaxed);
    let unparsed = sub_stats.unparsed.load(Ordering::Relaxed);
    let measured = opts.seconds.max(1) as f64;
    let per_second = received_window as f64 / measured;
    let lat = Latency::from(&hist);

    println!();
    println!("== scenario websocket ==");
    println!("connections              {connections} ({connect_failures} failed to connect)");
    println!("messages sent            {sent_total} ({sent_window} in the measured window)");
    println!(
        "messages received        {} by the subscriber ({} in the measured window)",
        received_total, received_window
    );
    if unparsed > 0 {
        println!("frames without sentAtNs  {unparsed}");
    }
    println!("messages/s               {per_second:.0} (received in the window / {measured} s)");
    println!(
        "latency µs               p50 {}  p99 {}  p99.9 {}  max {}  ({} samples)",
        lat.p50, lat.p99, lat.p999, lat.max, lat.count
    );
    let cpu_us_per_message = match (cpu_start, cpu_end) {
        (Some(start), Some(end)) => {
            (end - start).as_secs_f64() * 1e6 / (received_window.max(1) as f64)
        }
        _ => f64::NAN,
    };
    println!("server CPU per message   {cpu_us_per_message:.1} µs (over the measured window)");
    println!("error frames             {errors}");
    println!("connections closed       {closed} by the server during the run");
    if let Some(d) = dropped {
        println!("subscriber dropped       {d} (iotgate_subscriber_dropped_total)");
    }
    print_listener_status(&status);
    println!("server RSS under load    {}", mib(rss_loaded));
    if let Some(p) = problem {
        println!("first problem            {p}");
    }
    Ok(summary![
        "scenario" => "websocket",
        "messagesPerSecond" => per_second.round(),
        "connections" => connections,
        "connectFailures" => connect_failures,
        "devices" => keys.len(),
        "rate" => opts.rate,
        "inFlight" => opts.in_flight,
        "seconds" => opts.seconds,
        "messagesSent" => sent_total,
        "messagesSentInWindow" => sent_window,
        "messagesReceived" => received_total,
        "messagesReceivedInWindow" => received_window,
        "latencyUs" => lat.to_json(),
        "errorFrames" => errors,
        "connectionsClosedByServer" => closed,
        "subscriberDropped" => dropped,
        "serverCpuUsPerMessage" => (cpu_us_per_message * 10.0).round() / 10.0,
        "serverRssBytes" => rss_loaded,
    ])
}

/// Percentiles of a microsecond histogram.
struct Latency {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
    count: u64,
}

impl Latency {
    fn from(hist: &Histogram<u64>) -> Latency {
        Latency {
            p50: hist.value_at_quantile(0.50),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
            count: hist.len(),
        }
    }

    fn to_json(&self) -> Value {
        json!({"p50": self.p50, "p99": self.p99, "p999": self.p999, "max": self.max, "samples": self.count})
    }
}

pub(crate) fn print_listener_status(status: &Value) {
    if status.is_object() {
        println!(
            "listener status          received {}  accepted {}  rejected {}  connections {}",
            status["messagesReceived"],
            status["messagesAccepted"],
            status["messagesRejected"],
            status["connections"]
        );
    }
}

/// The delivered counter of downstream `bench-store` (0 before the first delivery).
async fn stored_count(api: &Api) -> Result<f64> {
    let text = api.metrics().await?;
    Ok(metric_sum(
        &text,
        "iotgate_messages_delivered_total",
        "downstream=\"bench-store\"",
    )
    .unwrap_or(0.0))
}

/// Reads the stored counter and the instant halfway through the request.
async fn stored_count_at(api: &Api) -> Result<(f64, Instant)> {
    let before = Instant::now();
    let count = stored_count(api).await?;
    let after = Instant::now();
    Ok((count, before + (after - before) / 2))
}

/// store: devices → listener → sentinel → route → store downstream (telemetry rows).
pub async fn store(server: &Server, api: &Api, opts: &Options) -> Result<Summary> {
    create_device_listener(api).await?;
    api.create(
        "downstreams",
        json!({"key": STORE_DOWNSTREAM, "name": "Bench store", "type": "store"}),
    )
    .await?;
    create_route(api, &[STORE_DOWNSTREAM]).await?;

    let (keys, conns, connect_failures) = open_device_connections(server, api, opts).await?;
    let baseline = stored_count(api).await?;
    let plan = plan(opts);
    let timeline = plan.timeline;
    let load = DeviceLoad::spawn(conns, &keys, plan);
    println!(
        "sending: {} connections, {} devices, rate {}, {} in flight, {} s warm-up + {} s measured",
        load.connections,
        keys.len(),
        rate_text(opts.rate),
        opts.in_flight,
        opts.warmup,
        opts.seconds
    );

    tokio::time::sleep_until(timeline.window_start.into()).await;
    let (stored_start, t_start) = stored_count_at(api).await?;
    tokio::time::sleep_until(timeline.end.into()).await;
    let (stored_end, t_end) = stored_count_at(api).await?;
    let rss_loaded = server_rss(server);
    let window_secs = (t_end - t_start).as_secs_f64().max(1e-3);
    let per_second = (stored_end - stored_start) / window_secs;

    if !load.wait_writers_done(Duration::from_secs(30)).await {
        eprintln!("warning: some device connections were still flushing 30 s after the end");
    }
    let sent_total = load.stats.sent_total.load(Ordering::Relaxed);
    // Wait (at most 30 s) until every accepted message is stored.
    let t_drain = Instant::now();
    let mut stored_total;
    loop {
        stored_total = (stored_count(api).await? - baseline).round() as u64;
        let errors = load.stats.error_frames.load(Ordering::Relaxed);
        if stored_total + errors >= sent_total || t_drain.elapsed() >= Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_secs = t_drain.elapsed().as_secs_f64();
    let status = api
        .listener_status(LISTENER_KEY)
        .await
        .unwrap_or(Value::Null);
    // Read the device-side counters before our own Close frames can produce server closes.
    let problem = first_problem(&load);
    let sent_window = load.stats.sent_window.load(Ordering::Relaxed);
    let errors = load.stats.error_frames.load(Ordering::Relaxed);
    let closed = load.stats.closed_by_server.load(Ordering::Relaxed);
    let connections = load.connections;
    load.shutdown().await;

    let accepted = sent_total.saturating_sub(errors);
    let all_stored = stored_total == accepted;

    println!();
    println!("== scenario store ==");
    println!("connections              {connections} ({connect_failures} failed to connect)");
    println!("messages sent            {sent_total} ({sent_window} in the measured window)");
    println!(
        "messages stored          {stored_total} (iotgate_messages_delivered_total{{downstream=\"bench-store\"}})"
    );
    println!(
        "messages/s               {per_second:.0} (stored during the window / {window_secs:.2} s)"
    );
    println!(
        "all accepted messages stored: {} ({accepted} accepted, {stored_total} stored, {drain_secs:.1} s after sending stopped)",
        if all_stored { "yes" } else { "no" }
    );
    println!("error frames             {errors}");
    println!("connections closed       {closed} by the server during the run");
    print_listener_status(&status);
    println!("server RSS under load    {}", mib(rss_loaded));
    if let Some(p) = problem {
        println!("first problem            {p}");
    }
    Ok(summary![
        "scenario" => "store",
        "messagesPerSecond" => per_second.round(),
        "connections" => connections,
        "connectFailures" => connect_failures,
        "devices" => keys.len(),
        "rate" => opts.rate,
        "inFlight" => opts.in_flight,
        "seconds" => opts.seconds,
        "messagesSent" => sent_total,
        "messagesSentInWindow" => sent_window,
        "messagesStored" => stored_total,
        "allAcceptedStored" => all_stored,
        "errorFrames" => errors,
        "connectionsClosedByServer" => closed,
        "serverRssBytes" => rss_loaded,
    ])
}

/// idle: N open, silent device connections; the server's memory per connection.
pub async fn idle(server: &Server, api: &Api, opts: &Options) -> Result<Summary> {
    create_device_listener(api).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = server.rss_bytes()?;
    let own_before = own_rss_bytes().ok();

    let url = format!("{}{LISTENER_PATH}", server.ws_base());
    let n = opts.connections;
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let (shutdown, _) = watch::channel(false);
    let (results_tx, mut results_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let mut holders = JoinSet::new();
    let t = Instant::now();
    for _ in 0..n {
        let req = request(&url, None)?;
        let permits = permits.clone();
        let results = results_tx.clone();
        let mut stop = shutdown.subscribe();
        holders.spawn(async move {
            let permit = permits
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let ws = connect(req, small_config()).await;
            drop(permit);
            let mut ws = match ws {
                Ok(ws) => {
                    let _ = results.send(Ok(()));
                    ws
                }
                Err(e) => {
                    let _ = results.send(Err(format!("{e:#}")));
                    return;
                }
            };
            drop(results);
            // Hold the connection, answering pings, until told to stop.
            loop {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    next = ws.next() => match next {
                        Some(Ok(_)) => {}
                        _ => return,
                    },
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
        });
    }
    drop(results_tx);
    let mut connected = 0usize;
    let mut failures = 0usize;
    let mut sample = None;
    // Every attempt reports once; each is bounded by the connect timeout.
    while let Some(result) = results_rx.recv().await {
        match result {
            Ok(()) => connected += 1,
            Err(e) => {
                failures += 1;
                sample.get_or_insert(e);
            }
        }
        if connected + failures == n {
            break;
        }
    }
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = server.rss_bytes()?;
    let own_after = own_rss_bytes().ok();
    let status = api
        .listener_status(LISTENER_KEY)
        .await
        .unwrap_or(Value::Null);

    let _ = shutdown.send(true);
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        while holders.join_next().await.is_some() {}
    })
    .await;
    if closed.is_err() {
        holders.abort_all();
    }

    let grown = rss_after.saturating_sub(rss_before);
    let per_conn = grown as f64 / connected.max(1) as f64;
    println!();
    println!("== scenario idle ==");
    println!("connections              {connected} open of {n} ({failures} failed)");
    println!(
        "connect time             {connect_secs:.2} s ({:.0} connects/s, {} at a time)",
        connected as f64 / connect_secs.max(1e-6),
        opts.concurrency
    );
    println!(
        "server RSS               before {}  after {}",
        mib(Some(rss_before)),
        mib(Some(rss_after))
    );
    println!(
        "per connection           {per_conn:.0} bytes ({:.2} KiB)",
        per_conn / 1024.0
    );
    if status.is_object() {
        println!(
            "listener connections     {} (status)",
            status["connections"]
        );
    }
    if let (Some(b), Some(a)) = (own_before, own_after) {
        println!(
            "bench RSS                {} → {}",
            mib(Some(b)),
            mib(Some(a))
        );
    }
    if let Some(sample) = &sample {
        println!("first failure            {sample}");
    }
    Ok(summary![
        "scenario" => "idle",
        "connections" => n,
        "connected" => connected,
        "failures" => failures,
        "connectSeconds" => connect_secs,
        "rssBeforeBytes" => rss_before,
        "rssAfterBytes" => rss_after,
        "bytesPerConnection" => per_conn.round(),
        "kibPerConnection" => (per_conn / 1024.0 * 100.0).round() / 100.0,
        "listenerConnections" => status.get("connections").cloned(),
    ])
}

/// basic-connects: WebSocket upgrades with Basic credentials against a non-anonymous listener.
pub async fn basic_connects(server: &Server, api: &Api, opts: &Options) -> Result<Summary> {
    api.create(
        "listeners",
        json!({
            "key": BASIC_LISTENER_KEY, "name": "Bench basic", "listenerType": "websocket",
            "mode": "server", "contentType": "json", "path": "/bench-basic",
            "anonymous": false, "userName": BASIC_USER, "password": BASIC_PASSWORD
        }),
    )
    .await?;
    api.wait_listener_running(BASIC_LISTENER_KEY).await?;
    let url = format!("{}/bench-basic", server.ws_base());
    let authorization = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{BASIC_USER}:{BASIC_PASSWORD}"))
    );

    // The first connect pays for the one Argon2 verification; timed on its own.
    let t = Instant::now();
    let mut first = connect(request(&url, Some(&authorization))?, small_config())
        .await
        .context("the first Basic-authenticated connect failed")?;
    let first_ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = first.close(None).await;
    drop(first);

    let n = opts.connections;
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let t = Instant::now();
    for _ in 0..n {
        let req = request(&url, Some(&authorization))?;
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let started = Instant::now();
            let mut ws = connect(req, small_config()).await?;
            let took = started.elapsed();
            let _ =
                tokio::time::timeout(Duration::from_secs(2), ws.send(Message::Close(None))).await;
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
    let per_second = ok as f64 / total.max(1e-6);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    let (p50, p99, max) = (ms(0.5), ms(0.99), hist.max() as f64 / 1e3);

    println!();
    println!("== scenario basic-connects ==");
    println!(
        "connects                 {ok} of {n} ({failures} failed), {} at a time",
        opts.concurrency
    );
    println!("first connect            {first_ms:.1} ms (includes the one Argon2 verification)");
    println!("total                    {total:.2} s");
    println!("connects/s               {per_second:.0}");
    println!("handshake ms             p50 {p50:.2}  p99 {p99:.2}  max {max:.2}");
    if let Some(sample) = &sample {
        println!("first failure            {sample}");
    }
    Ok(summary![
        "scenario" => "basic-connects",
        "connections" => n,
        "concurrency" => opts.concurrency,
        "connected" => ok,
        "failures" => failures,
        "totalSeconds" => total,
        "connectsPerSecond" => per_second.round(),
        "firstConnectMs" => first_ms,
        "handshakeMs" => json!({"p50": p50, "p99": p99, "max": max}),
    ])
}
