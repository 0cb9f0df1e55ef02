//! Capacity against a ceiling. The same load as the `websocket` scenario — devices sending JSON
//! telemetry, one subscriber receiving every message — driven against iotgate (listener →
//! access-key sentinel → route → websocket downstream, envelope format) and against the bare
//! relay of [`crate::relay`]. A step offers one rate for a warm-up and a measured window and
//! passes when nothing is lost and the send → subscriber p99 stays under 50 ms. `capacity`
//! raises the rate by ×1.25 per step (each step run twice, the better kept: the machine is
//! shared) and reports the highest passing rate of each, their ratio, and the server CPU time
//! per delivered message read from `/proc/<pid>/stat` over the measured window. It then offers
//! iotgate 2× and 5× its capacity to show what a subscriber still receives under overload.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::api::{metric_sum, Api, DeviceKey};
use crate::load::{
    connect_many, query_encode, sender_config, ConnectedSubscriber, DeviceLoad, SendPlan, Timeline,
};
use crate::relay::RelayProcess;
use crate::scenarios::{summary, Options, Summary};
use crate::server::Server;

/// The p99 a step must stay under.
const P99_LIMIT_US: u64 = 50_000;
/// The factor between steps.
const STEP_FACTOR: f64 = 1.25;

/// What a step drives.
pub enum Target<'a> {
    Iotgate { server: &'a Server, api: &'a Api },
    Relay(&'a RelayProcess),
}

impl Target<'_> {
    fn name(&self) -> &'static str {
        match self {
            Target::Iotgate { .. } => "iotgate",
            Target::Relay(_) => "relay",
        }
    }

    fn device_url(&self) -> String {
        match self {
            Target::Iotgate { server, .. } => format!("{}/bench", server.ws_base()),
            Target::Relay(relay) => format!("ws://{}/telemetry", relay.addr),
        }
    }

    fn subscriber_url(&self) -> String {
        match self {
            Target::Iotgate { server, api } => format!(
                "{}/bench-live?token={}",
                server.ws_base(),
                query_encode(&api.token)
            ),
            Target::Relay(relay) => format!("ws://{}/live", relay.addr),
        }
    }

    fn cpu_time(&self) -> Result<Duration> {
        match self {
            Target::Iotgate { server, .. } => server.cpu_time(),
            Target::Relay(relay) => relay.cpu_time(),
        }
    }

    async fn dropped_by_server(&self) -> f64 {
        match self {
            Target::Iotgate { api, .. } => api
                .metrics()
                .await
                .ok()
                .and_then(|m| metric_sum(&m, "iotgate_subscriber_dropped_total", ""))
                .unwrap_or(0.0),
            Target::Relay(_) => 0.0,
        }
    }
}

/// One step's figures.
#[derive(Clone, Debug)]
pub struct Step {
    pub offered: u64,
    pub delivered_per_second: f64,
    pub sent: u64,
    pub received: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub cpu_us_per_message: f64,
    pub error_frames: u64,
}

impl Step {
    pub fn passed(&self) -> bool {
        self.p99_us < P99_LIMIT_US && self.received >= self.sent && self.error_frames == 0
    }

    fn better(self, other: Step) -> Step {
        match (self.passed(), other.passed()) {
            (true, false) => self,
            (false, true) => other,
            _ if self.p99_us <= other.p99_us => self,
            _ => other,
        }
    }

    fn line(&self, who: &str) -> String {
        format!(
            "{who:>8} {:>8} msg/s offered: {:>8.0} delivered/s, lost {:>7}, p50/p99/p99.9 {:.1}/{:.1}/{:.1} ms, CPU {:.1} µs/msg {}",
            self.offered,
            self.delivered_per_second,
            self.sent.saturating_sub(self.received),
            self.p50_us as f64 / 1000.0,
            self.p99_us as f64 / 1000.0,
            self.p999_us as f64 / 1000.0,
            self.cpu_us_per_message,
            if self.passed() { "pass" } else { "FAIL" }
        )
    }

    fn to_json(&self) -> Value {
        json!({"offered": self.offered, "deliveredPerSecond": self.delivered_per_second.round(),
               "sent": self.sent, "received": self.received, "p50Us": self.p50_us,
               "p99Us": self.p99_us, "p999Us": self.p999_us,
               "cpuUsPerMessage": (self.cpu_us_per_message * 10.0).round() / 10.0,
               "passed": self.passed()})
    }
}

/// Sentinel, listener `/bench`, websocket downstream `/bench-live` (envelope format) and a route.
pub async fn configure_iotgate(api: &Api) -> Result<()> {
    api.create(
        "sentinels",
        json!({"key": "bench-keys", "name": "Bench keys", "method": "accessKey"}),
    )
    .await?;
    api.create(
        "listeners",
        json!({"key": "bench", "name": "Bench", "listenerType": "websocket", "mode": "server",
               "contentType": "json", "path": "/bench", "anonymous": true, "sentinel": "bench-keys"}),
    )
    .await?;
    api.create(
        "downstreams",
        json!({"key": "bench-live", "name": "Bench live", "type": "websocket",
               "path": "/bench-live", "format": "envelope"}),
    )
    .await?;
    api.create(
        "routes",
        json!({"key": "bench-route", "name": "Bench route", "listeners": ["bench"],
               "downstreams": ["bench-live"]}),
    )
    .await?;
    api.wait_listener_running("bench").await?;
    Ok(())
}

/// Keys for the relay, which checks none (the frames are the same size as iotgate's).
fn relay_keys(n: usize) -> Vec<DeviceKey> {
    (0..n)
        .map(|i| DeviceKey {
            device_id: format!("bench-{i}"),
            access_key: "x".repeat(43),
        })
        .collect()
}

/// Offers `rate` for the warm-up and the measured window; drains and measures.
pub async fn step(
    target: &Target<'_>,
    keys: &[DeviceKey],
    opts: &Options,
    rate: u64,
) -> Result<Step> {
    let subscriber = ConnectedSubscriber::connect(&target.subscriber_url())
        .await
        .with_context(|| format!("the {} subscriber", target.name()))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (conns, failures, sample) = connect_many(
        &target.device_url(),
        opts.connections,
        opts.concurrency,
        sender_config(),
    )
    .await?;
    if failures > 0 {
        bail!(
            "{failures} device connections failed: {}",
            sample.unwrap_or_default()
        );
    }
    let timeline = Timeline::new(
        Duration::from_secs(opts.warmup),
        Duration::from_secs(opts.seconds.max(1)),
    );
    let subscriber = subscriber.start(timeline);
    let load = DeviceLoad::spawn(
        conns,
        keys,
        SendPlan {
            rate,
            in_flight: opts.in_flight,
            timeline,
        },
    );
    let dropped_before = target.dropped_by_server().await;
    tokio::time::sleep_until(timeline.window_start.into()).await;
    let cpu0 = target.cpu_time()?;
    tokio::time::sleep_until(timeline.end.into()).await;
    let cpu1 = target.cpu_time()?;
    load.wait_writers_done(Duration::from_secs(30)).await;
    let sent = load.stats.sent_total.load(Ordering::Relaxed);
    // Drain: until everything arrived, or no progress for 2 s (at most 10 s).
    let until = Instant::now() + Duration::from_secs(10);
    let mut last = (u64::MAX, Instant::now());
    loop {
        let received = subscriber.stats.received_total.load(Ordering::Relaxed);
        if received >= sent || Instant::now() >= until {
            break;
        }
        if received != last.0 {
            last = (received, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error_frames = load.stats.error_frames.load(Ordering::Relaxed);
    let stats = subscriber.stats.clone();
    let histogram = subscriber.finish().await?;
    load.shutdown().await;
    let dropped = target.dropped_by_server().await - dropped_before;
    if dropped > 0.0 {
        eprintln!(
            "{} dropped {dropped} frames for the slow subscriber",
            target.name()
        );
    }
    let received = stats.received_total.load(Ordering::Relaxed);
    let in_window = stats.received_window.load(Ordering::Relaxed) as f64;
    let measured = opts.seconds.max(1) as f64;
    Ok(Step {
        offered: rate,
        delivered_per_second: in_window / measured,
        sent,
        received,
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        cpu_us_per_message: (cpu1 - cpu0).as_secs_f64() * 1e6 / in_window.max(1.0),
        error_frames,
    })
}

/// The better of two runs of a step.
async fn best_of_two(
    target: &Target<'_>,
    keys: &[DeviceKey],
    opts: &Options,
    rate: u64,
) -> Result<Step> {
    let first = step(target, keys, opts, rate).await?;
    println!("{}", first.line(target.name()));
    let second = step(target, keys, opts, rate).await?;
    println!("{}", second.line(target.name()));
    Ok(first.better(second))
}

/// Steps the rate up from `start` until a step fails; returns the last passing step (if any)
/// and every step run.
async fn search(
    target: &Target<'_>,
    keys: &[DeviceKey],
    opts: &Options,
    start: u64,
) -> Result<(Option<Step>, Vec<Step>)> {
    let mut rate = start.max(1000);
    let mut passing = None;
    let mut steps = Vec::new();
    loop {
        let step = best_of_two(target, keys, opts, rate).await?;
        steps.push(step.clone());
        if !step.passed() {
            break;
        }
        passing = Some(step);
        rate = (rate as f64 * STEP_FACTOR) as u64;
        if rate > 2_000_000 {
            break;
        }
    }
    Ok((passing, steps))
}

/// `ceiling`: the bare relay alone, at `--rate` (or its capacity with `--rate 0`).
pub async fn ceiling(opts: &Options) -> Result<Summary> {
    let relay = RelayProcess::start(&std::env::current_exe()?).await?;
    let target = Target::Relay(&relay);
    let keys = relay_keys(opts.devices.max(1));
    let result = if opts.rate > 0 {
        let step = best_of_two(&target, &keys, opts, opts.rate).await?;
        summary!["scenario" => "ceiling", "step" => step.to_json()]
    } else {
        let (capacity, _) = search(&target, &keys, opts, 10_000).await?;
        summary!["scenario" => "ceiling", "capacity" => capacity.map(|s| s.to_json())]
    };
    relay.stop().await;
    Ok(result)
}

/// `capacity`: iotgate and the relay stepped up side by side, then iotgate under overload.
pub async fn capacity(server: &Server, api: &Api, opts: &Options) -> Result<Summary> {
    configure_iotgate(api).await?;
    let iotgate_keys = api.register_devices(opts.devices.max(1)).await?;
    let iotgate = Target::Iotgate { server, api };
    let start = if opts.rate > 0 { opts.rate } else { 10_000 };

    println!("== iotgate ==");
    let (iotgate_capacity, _) = search(&iotgate, &iotgate_keys, opts, start).await?;
    println!("== relay (ceiling) ==");
    let relay = RelayProcess::start(&std::env::current_exe()?).await?;
    let relay_target = Target::Relay(&relay);
    let relay_keys = relay_keys(opts.devices.max(1));
    let (relay_capacity, _) = search(&relay_target, &relay_keys, opts, start).await?;
    relay.stop().await;

    let mut overload = Vec::new();
    if let Some(capacity) = &iotgate_capacity {
        println!("== iotgate under overload ==");
        for factor in [2u64, 5] {
            let step = step(&iotgate, &iotgate_keys, opts, capacity.offered * factor).await?;
            println!("{}", step.line("iotgate"));
            overload.push((factor, step));
        }
    }

    let rate_of = |s: &Option<Step>| s.as_ref().map_or(0, |s| s.offered);
    let ratio = rate_of(&iotgate_capacity) as f64 / rate_of(&relay_capacity).max(1) as f64;
    let cpu_ratio = match (&iotgate_capacity, &relay_capacity) {
        (Some(i), Some(r)) => i.cpu_us_per_message / r.cpu_us_per_message.max(0.01),
        _ => f64::NAN,
    };
    println!();
    println!("== scenario capacity ==");
    println!(
        "capacity (p99 < 50 ms, nothing lost): iotgate {} msg/s, relay {} msg/s, ratio {ratio:.2}",
        rate_of(&iotgate_capacity),
        rate_of(&relay_capacity)
    );
    if let (Some(i), Some(r)) = (&iotgate_capacity, &relay_capacity) {
        println!(
            "server CPU per delivered message at capacity: iotgate {:.1} µs, relay {:.1} µs, ratio {cpu_ratio:.2}",
            i.cpu_us_per_message, r.cpu_us_per_message
        );
    }
    for (factor, step) in &overload {
        let capacity = rate_of(&iotgate_capacity) as f64;
        println!(
            "offered {factor}× capacity: the subscriber received {:.0} msg/s ({:.0}% of capacity)",
            step.delivered_per_second,
            100.0 * step.delivered_per_second / capacity.max(1.0)
        );
    }
    Ok(summary![
        "scenario" => "capacity",
        "iotgate" => iotgate_capacity.map(|s| s.to_json()),
        "relay" => relay_capacity.map(|s| s.to_json()),
        "ratio" => (ratio * 100.0).round() / 100.0,
        "cpuRatio" => (cpu_ratio * 100.0).round() / 100.0,
        "overload" => overload.iter().map(|(f, s)| json!({"factor": f, "step": s.to_json()})).collect::<Vec<_>>(),
    ])
}
