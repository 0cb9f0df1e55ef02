//! `iotgate-bench`: starts the iotgate release binary on a loopback port with a fresh data
//! directory, configures it over the REST API, drives one load scenario against it and prints
//! the figures: a human-readable block, then one line of JSON for the README.
//!
//! Every phase is bounded by a time limit, and every address is loopback.

mod acks;
mod api;
mod brokers;
mod capacity;
mod fanout;
mod load;
mod postgres;
mod propagation;
mod relay;
mod scenarios;
mod server;
mod tokens;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, ValueEnum};

use crate::api::Api;
use crate::scenarios::Options;
use crate::server::Server;

/// Load generator for the iotgate server.
///
/// The server binary must exist: run `cargo build --release` first (the bench itself runs with
/// `cargo run --release -p iotgate-bench -- <scenario>`). The bench starts that binary with a
/// fresh temporary data directory on `127.0.0.1:0`, configures it over the REST API, runs the
/// scenario and stops it with SIGTERM.
#[derive(Parser)]
#[command(name = "iotgate-bench", version)]
struct Cli {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,

    /// The iotgate server binary, relative to the current directory; build it first with
    /// `cargo build --release`.
    #[arg(long, default_value = "target/release/iotgate")]
    server_bin: PathBuf,

    /// Device connections [default: websocket 100, store 100, idle 10000, basic-connects 5000,
    /// tokens 5000].
    #[arg(long)]
    connections: Option<usize>,

    /// Registered devices `bench-0..N`; connection i speaks for device i % N
    /// [default: the number of connections; tokens: at most 500].
    #[arg(long)]
    devices: Option<usize>,

    /// Measured seconds of sending (websocket, store).
    #[arg(long, default_value_t = 10)]
    seconds: u64,

    /// Warm-up seconds of sending before the measured window (websocket, store).
    #[arg(long, default_value_t = 2)]
    warmup: u64,

    /// Total messages per second over all connections; 0 = as fast as the server takes them.
    #[arg(long, default_value_t = 0)]
    rate: u64,

    /// Messages a connection writes before each flush (there is no ack, so this bounds how many
    /// frames one connection hands the socket at once).
    #[arg(long, default_value_t = 16)]
    in_flight: usize,

    /// Unacknowledged messages a device connection keeps in flight (ack, crash).
    #[arg(long, default_value_t = 64)]
    window: usize,

    /// Connects in progress at once (all scenarios open connections in batches of this size).
    #[arg(long, default_value_t = 200)]
    concurrency: usize,

    /// NATS with JetStream for the nats scenario.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,

    /// The MQTT broker (host:port) for the mqtt scenario.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_broker: String,

    /// Keep the server's temporary data directory (its path is printed) for inspection.
    #[arg(long)]
    keep_data_dir: bool,

    /// store: also run on PostgreSQL and print both figures; propagation: where its nodes'
    /// database is made. The URL names a database on a
    /// server where the user may CREATE DATABASE (e.g. postgres://postgres@127.0.0.1:5432/test);
    /// the bench runs on a fresh database of its own there and drops it afterwards.
    #[arg(long)]
    postgres_url: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Scenario {
    /// Devices → sentinel → route → websocket downstream → 1 subscriber: throughput and
    /// end-to-end latency (now − sentAtNs).
    Websocket,
    /// Devices → sentinel → route → store downstream: stored messages per second.
    Store,
    /// Idle device connections: server memory per connection.
    Idle,
    /// WebSocket upgrades with Basic credentials: connects per second and handshake latency.
    BasicConnects,
    /// WebSocket upgrades with connection tokens (HS256 JWT in access_token, verified before
    /// the upgrade): connect, receive the 101, close; handshakes per second and latency.
    Tokens,
    /// Devices → sentinel → route → store with `acknowledge: stored`, up to --window in flight
    /// per connection: acknowledged messages/s and ack latency, beside `acknowledge: none`.
    Ack,
    /// The ack load, SIGKILL mid-run, restart on the same data, resend what was not acked:
    /// acknowledged before the kill, found after the restart, duplicates.
    Crash,
    /// The websocket load against a bare relay (no parse, no auth): the ceiling. With --rate,
    /// one rate; without, its capacity.
    Ceiling,
    /// iotgate and the bare relay stepped up ×1.25 from --rate (default 10,000) until the p99
    /// passes 50 ms or a message is lost: both capacities, their ratio, CPU per message, and
    /// iotgate at 2× and 5× its capacity.
    Capacity,
    /// Devices → sentinel → route → nats downstream (JetStream, publish acks): delivered
    /// messages/s, then JetStream alone with one async-nats client (same message, same window)
    /// and the ratio.
    Nats,
    /// Devices → sentinel → route → mqtt downstream (QoS 1, PUBACK): delivered messages/s, then
    /// the broker alone with one rumqttc client (same message, same window) and the ratio.
    Mqtt,
    /// Two nodes on one PostgreSQL database (--postgres-url): 100 listeners created on node A,
    /// each timed until it runs on node B; p50 / p99 / max.
    Propagation,
    /// One publisher to a group of --connections (default 1,000) Web PubSub clients at --rate
    /// (default 100 msg/s): deliveries per second, publish → member latency, losses.
    Fanout,
    /// Internal: the bare relay server the ceiling and capacity scenarios start.
    #[value(hide = true)]
    RelayServer,
}

impl Scenario {
    fn default_connections(self) -> usize {
        match self {
            Scenario::Websocket
            | Scenario::Store
            | Scenario::Ack
            | Scenario::Crash
            | Scenario::Ceiling
            | Scenario::Capacity
            | Scenario::Nats
            | Scenario::Mqtt
            | Scenario::Propagation
            | Scenario::RelayServer => 100,
            Scenario::Idle => 10_000,
            Scenario::Fanout => 1_000,
            Scenario::BasicConnects | Scenario::Tokens => 5_000,
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => eprintln!("open-file limit: {limit}"),
        Err(e) => eprintln!("warning: cannot raise the open-file limit: {e}"),
    }
    let connections = cli
        .connections
        .unwrap_or(cli.scenario.default_connections());
    let opts = Options {
        server_bin: cli.server_bin.clone(),
        window: cli.window.max(1),
        connections,
        devices: cli.devices.unwrap_or(connections),
        seconds: cli.seconds,
        warmup: cli.warmup,
        rate: cli.rate,
        in_flight: cli.in_flight,
        concurrency: cli.concurrency,
    };

    match cli.scenario {
        Scenario::RelayServer => {
            return relay::serve("127.0.0.1:0".parse().expect("an address")).await;
        }
        Scenario::Ceiling => {
            let summary = capacity::ceiling(&opts).await?;
            println!("{}", scenarios::summary_line(&summary));
            return Ok(());
        }
        _ => {}
    }
    if let (Scenario::Store, Some(admin_url)) = (cli.scenario, &cli.postgres_url) {
        return store_on_both_engines(&cli, &opts, admin_url).await;
    }
    if let Scenario::Propagation = cli.scenario {
        let Some(admin_url) = &cli.postgres_url else {
            anyhow::bail!("propagation needs --postgres-url (nodes share a PostgreSQL database)");
        };
        let summary = propagation::propagation(&opts, admin_url).await?;
        println!("{}", scenarios::summary_line(&summary));
        return Ok(());
    }
    let server = Server::start(&cli.server_bin, cli.keep_data_dir).await?;
    eprintln!(
        "server {} started on {}",
        cli.server_bin.display(),
        server.addr
    );
    if let Scenario::Crash = cli.scenario {
        // The crash scenario kills and restarts the server itself.
        let api = Api::login(server.http_base()).await?;
        let summary = acks::crash(server, &api, &opts).await?;
        println!("{}", scenarios::summary_line(&summary));
        return Ok(());
    }
    let brokers = brokers_from(&cli)?;
    let result = run(&server, cli.scenario, &opts, &brokers).await;
    let status = server.stop().await;
    let summary = result?;
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("warning: the server exited with {s}"),
        Err(e) => eprintln!("warning: stopping the server: {e:#}"),
    }
    println!("{}", scenarios::summary_line(&summary));
    Ok(())
}

/// The store scenario on SQLite, then on a fresh PostgreSQL database: both summaries, then one
/// line with both figures.
async fn store_on_both_engines(cli: &Cli, opts: &Options, admin_url: &str) -> Result<()> {
    let brokers = brokers_from(cli)?;
    let mut figures = Vec::new();
    let database = postgres::BenchDatabase::create(admin_url).await?;
    for (engine, url) in [
        ("SQLite", None),
        ("PostgreSQL", Some(database.url.as_str())),
    ] {
        let server = Server::start_with_database(&cli.server_bin, cli.keep_data_dir, url).await?;
        eprintln!("server on {engine} started on {}", server.addr);
        let result = run(&server, Scenario::Store, opts, &brokers).await;
        let status = server.stop().await;
        let summary = result?;
        if let Ok(s) = &status {
            if !s.success() {
                eprintln!("warning: the server exited with {s}");
            }
        }
        println!("{}", scenarios::summary_line(&summary));
        figures.push((engine, summary));
    }
    database.drop_database().await?;
    let line: Vec<String> = figures
        .iter()
        .map(|(engine, summary)| {
            let field = |name: &str| {
                summary
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| value.clone())
                    .unwrap_or_default()
            };
            format!(
                "{engine} {} msg/s (all accepted stored: {})",
                field("messagesPerSecond"),
                field("allAcceptedStored")
            )
        })
        .collect();
    println!("store: {}", line.join(", "));
    Ok(())
}

/// Where the broker scenarios find NATS and Mosquitto (`--nats-url`, `--mqtt-broker`).
fn brokers_from(cli: &Cli) -> Result<brokers::Brokers> {
    let (mqtt_host, mqtt_port) = cli
        .mqtt_broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--mqtt-broker must be host:port"))?;
    Ok(brokers::Brokers {
        nats_url: cli.nats_url.clone(),
        mqtt_host,
        mqtt_port,
    })
}

async fn run(
    server: &Server,
    scenario: Scenario,
    opts: &Options,
    brokers: &brokers::Brokers,
) -> Result<scenarios::Summary> {
    let api = Api::login(server.http_base()).await?;
    match scenario {
        Scenario::Websocket => scenarios::websocket(server, &api, opts).await,
        Scenario::Store => scenarios::store(server, &api, opts).await,
        Scenario::Idle => scenarios::idle(server, &api, opts).await,
        Scenario::BasicConnects => scenarios::basic_connects(server, &api, opts).await,
        Scenario::Tokens => tokens::tokens(server, &api, opts).await,
        Scenario::Ack => acks::ack(server, &api, opts).await,
        Scenario::Capacity => capacity::capacity(server, &api, opts).await,
        Scenario::Nats => brokers::nats(server, &api, opts, brokers).await,
        Scenario::Mqtt => brokers::mqtt(server, &api, opts, brokers).await,
        Scenario::Fanout => fanout::fanout(server, &api, opts).await,
        Scenario::Crash | Scenario::Ceiling | Scenario::RelayServer | Scenario::Propagation => {
            unreachable!("handled in main")
        }
    }
}
