//! The `nats` and `mqtt` scenarios. First the broker alone, driven by one client of the library
//! iotgate uses (async-nats, rumqttc) with the same message and window for the measured seconds:
//! the ceiling. Then devices → sentinel → route → a `nats` (JetStream, publish acks) or `mqtt`
//! (QoS 1, PUBACK) downstream on the same broker, counted as delivered by iotgate's own
//! `iotgate_messages_delivered_total`, and iotgate's share of the ceiling.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::api::{metric_sum, Api};
use crate::load::DeviceLoad;
use crate::scenarios::{
    create_device_listener, create_route, first_problem, mib, open_device_connections, plan,
    print_listener_status, rate_text, server_rss, summary, Options, Summary,
};
use crate::server::Server;

/// Where the brokers are (the machine's NATS with JetStream and Mosquitto).
pub struct Brokers {
    pub nats_url: String,
    pub mqtt_host: String,
    pub mqtt_port: u16,
}

/// iotgate's windows (crates/pipeline: nats::WINDOW, mqtt::WINDOW), used for the ceiling too.
const NATS_WINDOW: usize = 1024;
const MQTT_WINDOW: usize = 1000;
const DOWNSTREAM: &str = "bench-broker";

/// A device payload of the size iotgate publishes in `format: payload` (about 150 bytes): the
/// ceiling publishes this same message.
fn payload(seq: u64) -> Vec<u8> {
    format!(
        "{{\"deviceId\":\"bench-17\",\"accessKey\":\"k7Qm3Hc9Xw2Lr5Tz8Vb1Nd4Pf6Gj0Sa\",\"seq\":{seq},\"sentAtNs\":1764460800123456789,\"temperature\":21.5}}"
    )
    .into_bytes()
}

async fn delivered(api: &Api) -> Result<f64> {
    let text = api.metrics().await?;
    Ok(metric_sum(
        &text,
        "iotgate_messages_delivered_total",
        &format!("downstream=\"{DOWNSTREAM}\""),
    )
    .unwrap_or(0.0))
}

async fn delivered_at(api: &Api) -> Result<(f64, Instant)> {
    let before = Instant::now();
    let count = delivered(api).await?;
    Ok((count, before + (Instant::now() - before) / 2))
}

/// What the gateway run measured.
struct GatewayRun {
    per_second: f64,
    sent_total: u64,
    delivered_total: u64,
    all_delivered: bool,
    errors: u64,
    connections: usize,
    connect_failures: usize,
    rss: Option<u64>,
}

/// Devices → downstream `definition`, counted by iotgate's delivered counter.
async fn gateway_run(
    server: &Server,
    api: &Api,
    opts: &Options,
    definition: Value,
) -> Result<GatewayRun> {
    create_device_listener(api).await?;
    api.create("downstreams", definition).await?;
    create_route(api, &[DOWNSTREAM]).await?;
    let (keys, conns, connect_failures) = open_device_connections(server, api, opts).await?;
    let baseline = delivered(api).await?;
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
    let (start, t_start) = delivered_at(api).await?;
    tokio::time::sleep_until(timeline.end.into()).await;
    let (end, t_end) = delivered_at(api).await?;
    let rss = server_rss(server);
    let per_second = (end - start) / (t_end - t_start).as_secs_f64().max(1e-3);
    if !load.wait_writers_done(Duration::from_secs(30)).await {
        eprintln!("warning: some device connections were still flushing 30 s after the end");
    }
    let sent_total = load.stats.sent_total.load(Ordering::Relaxed);
    let t_drain = Instant::now();
    let mut delivered_total;
    loop {
        delivered_total = (delivered(api).await? - baseline).round() as u64;
        let errors = load.stats.error_frames.load(Ordering::Relaxed);
        if delivered_total + errors >= sent_total || t_drain.elapsed() >= Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = api.listener_status("bench").await.unwrap_or(Value::Null);
    print_listener_status(&status);
    if let Some(problem) = first_problem(&load) {
        println!("first problem            {problem}");
    }
    let errors = load.stats.error_frames.load(Ordering::Relaxed);
    let connections = load.connections;
    load.shutdown().await;
    Ok(GatewayRun {
        per_second,
        sent_total,
        delivered_total,
        all_delivered: delivered_total + errors >= sent_total,
        errors,
        connections,
        connect_failures,
        rss,
    })
}

/// JetStream alone: one async-nats client publishing the payload with `NATS_WINDOW` acks
/// outstanding for `seconds`; acknowledged publishes per second.
async fn nats_ceiling(url: &str, subject: &str, seconds: u64) -> Result<f64> {
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))?;
    let js = async_nats::jetstream::new(client);
    let mut pending = VecDeque::with_capacity(NATS_WINDOW);
    let end = Instant::now() + Duration::from_secs(seconds.max(1));
    let started = Instant::now();
    let mut acked = 0u64;
    let mut seq = 0u64;
    while Instant::now() < end {
        while pending.len() < NATS_WINDOW {
            seq += 1;
            let ack = js
                .publish(subject.to_owned(), payload(seq).into())
                .await
                .context("JetStream publish")?;
            pending.push_back(ack);
        }
        let ack = pending.pop_front().expect("filled above");
        ack.await.context("JetStream publish acknowledgement")?;
        acked += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    while let Some(ack) = pending.pop_front() {
        let _ = ack.await;
    }
    Ok(acked as f64 / elapsed)
}

/// Mosquitto alone: one rumqttc client publishing the payload at QoS 1 with `MQTT_WINDOW` in
/// flight for `seconds`; PUBACKed publishes per second.
async fn mqtt_ceiling(host: &str, port: u16, topic: &str, seconds: u64) -> Result<f64> {
    let mut options =
        rumqttc::MqttOptions::new(format!("iotgate-bench-{}", std::process::id()), host, port);
    options
        .set_inflight(MQTT_WINDOW as u16)
        .set_keep_alive(Duration::from_secs(30))
        .set_request_channel_capacity(MQTT_WINDOW * 2);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, MQTT_WINDOW * 2);
    let topic = topic.to_owned();
    let publisher = tokio::spawn(async move {
        let mut seq = 0u64;
        loop {
            seq += 1;
            if client
                .publish(
                    topic.clone(),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    payload(seq),
                )
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut started = None;
    let mut acked = 0u64;
    let deadline = Instant::now() + Duration::from_secs(seconds.max(1) + 10);
    loop {
        let event = tokio::time::timeout_at(deadline.into(), eventloop.poll())
            .await
            .context("the MQTT ceiling run did not finish")?;
        match event.context("MQTT connection")? {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) => {
                started = Some(Instant::now());
            }
            rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => {
                acked += 1;
                if let Some(t) = started {
                    if t.elapsed() >= Duration::from_secs(seconds.max(1)) {
                        publisher.abort();
                        return Ok(acked as f64 / t.elapsed().as_secs_f64());
                    }
                }
            }
            _ => {}
        }
    }
}

fn print_result(name: &str, run: &GatewayRun, ceiling: f64) {
    println!();
    println!("== scenario {name} ==");
    println!(
        "connections              {} ({} failed to connect)",
        run.connections, run.connect_failures
    );
    println!("messages sent            {}", run.sent_total);
    println!(
        "messages delivered       {} (iotgate_messages_delivered_total{{downstream=\"{DOWNSTREAM}\"}})",
        run.delivered_total
    );
    println!(
        "delivered/s              {:.0} (during the measured window)",
        run.per_second
    );
    println!(
        "all accepted delivered   {}",
        if run.all_delivered { "yes" } else { "no" }
    );
    println!("error frames             {}", run.errors);
    println!("broker alone             {ceiling:.0} acknowledged publishes/s (one client, same message and window)");
    println!(
        "iotgate / broker alone   {:.2}",
        run.per_second / ceiling.max(1.0)
    );
    println!("server RSS under load    {}", mib(run.rss));
}

/// nats: devices → JetStream with publish acks; then JetStream alone.
pub async fn nats(
    server: &Server,
    api: &Api,
    opts: &Options,
    brokers: &Brokers,
) -> Result<Summary> {
    let id = std::process::id();
    let stream = format!("IOTGATE_BENCH_{id}");
    let prefix = format!("iotgate-bench-{id}");
    // The broker alone first, while nothing else publishes to it, into the stream iotgate then
    // uses (same storage, same subjects).
    let client = async_nats::connect(&brokers.nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {}", brokers.nats_url))?;
    let js = async_nats::jetstream::new(client);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.*.*")],
        ..Default::default()
    })
    .await
    .context("creating the bench stream")?;
    println!("measuring JetStream alone for {} s ...", opts.seconds);
    let ceiling = nats_ceiling(
        &brokers.nats_url,
        &format!("{prefix}.ceiling.d"),
        opts.seconds,
    )
    .await;
    let run = match ceiling {
        Ok(_) => {
            gateway_run(
                server,
                api,
                opts,
                json!({"key": DOWNSTREAM, "name": "Bench NATS", "type": "nats", "url": brokers.nats_url,
                       "subject": format!("{prefix}.{{listenerKey}}.{{deviceId}}"), "stream": stream,
                       "format": "payload", "queueCapacity": 100000}),
            )
            .await
        }
        Err(_) => Err(anyhow::anyhow!("not run: the broker-alone run failed")),
    };
    // The stream is the bench's own: removed afterwards.
    let _ = js.delete_stream(&stream).await;
    let ceiling = ceiling?;
    let run = run?;
    if !run.all_delivered {
        eprintln!("warning: not every accepted message was delivered within 60 s");
    }
    print_result("nats", &run, ceiling);
    Ok(summary![
        "scenario" => "nats",
        "messagesPerSecond" => run.per_second.round(),
        "brokerAlonePerSecond" => ceiling.round(),
        "ratio" => (run.per_second / ceiling.max(1.0) * 100.0).round() / 100.0,
        "connections" => run.connections,
        "seconds" => opts.seconds,
        "messagesSent" => run.sent_total,
        "messagesDelivered" => run.delivered_total,
        "allAcceptedDelivered" => run.all_delivered,
        "window" => NATS_WINDOW,
        "serverRssBytes" => run.rss,
    ])
}

/// mqtt: devices → Mosquitto at QoS 1; then Mosquitto alone.
pub async fn mqtt(
    server: &Server,
    api: &Api,
    opts: &Options,
    brokers: &Brokers,
) -> Result<Summary> {
    let id = std::process::id();
    let prefix = format!("iotgate-bench-{id}");
    // The broker alone first, while nothing else publishes to it.
    println!("measuring the MQTT broker alone for {} s ...", opts.seconds);
    let ceiling = mqtt_ceiling(
        &brokers.mqtt_host,
        brokers.mqtt_port,
        &format!("{prefix}/ceiling/d"),
        opts.seconds,
    )
    .await?;
    let run = gateway_run(
        server,
        api,
        opts,
        json!({"key": DOWNSTREAM, "name": "Bench MQTT", "type": "mqtt",
               "url": format!("mqtt://{}:{}", brokers.mqtt_host, brokers.mqtt_port),
               "topic": format!("{prefix}/{{listenerKey}}/{{deviceId}}"), "qos": 1,
               "format": "payload", "queueCapacity": 100000}),
    )
    .await?;
    if !run.all_delivered {
        eprintln!("warning: not every accepted message was delivered within 60 s");
    }
    if ceiling <= 0.0 {
        bail!("the MQTT broker acknowledged nothing");
    }
    print_result("mqtt", &run, ceiling);
    Ok(summary![
        "scenario" => "mqtt",
        "messagesPerSecond" => run.per_second.round(),
        "brokerAlonePerSecond" => ceiling.round(),
        "ratio" => (run.per_second / ceiling.max(1.0) * 100.0).round() / 100.0,
        "connections" => run.connections,
        "seconds" => opts.seconds,
        "messagesSent" => run.sent_total,
        "messagesDelivered" => run.delivered_total,
        "allAcceptedDelivered" => run.all_delivered,
        "window" => MQTT_WINDOW,
        "serverRssBytes" => run.rss,
    ])
}
