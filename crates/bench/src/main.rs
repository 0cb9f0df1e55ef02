//! `iotgate-bench`: starts the iotgate release binary on a loopback port with a fresh data
//! directory, configures it over the REST API, drives one load scenario against it and prints
//! the figures: a human-readable block, then one line of JSON for the README.
//!
//! Every phase is bounded by a time limit, and every address is loopback.

mod api;
mod load;
mod scenarios;
mod server;

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

    /// Device connections [default: websocket 100, store 100, idle 10000, basic-connects 5000].
    #[arg(long)]
    connections: Option<usize>,

    /// Registered devices `bench-0..N`; connection i speaks for device i % N
    /// [default: the number of connections].
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

    /// Connects in progress at once (all scenarios open connections in batches of this size).
    #[arg(long, default_value_t = 200)]
    concurrency: usize,

    /// Keep the server's temporary data directory (its path is printed) for inspection.
    #[arg(long)]
    keep_data_dir: bool,
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
}

impl Scenario {
    fn default_connections(self) -> usize {
        match self {
            Scenario::Websocket | Scenario::Store => 100,
            Scenario::Idle => 10_000,
            Scenario::BasicConnects => 5_000,
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
        connections,
        devices: cli.devices.unwrap_or(connections),
        seconds: cli.seconds,
        warmup: cli.warmup,
        rate: cli.rate,
        in_flight: cli.in_flight,
        concurrency: cli.concurrency,
    };

    let server = Server::start(&cli.server_bin, cli.keep_data_dir).await?;
    eprintln!(
        "server {} started on {}",
        cli.server_bin.display(),
        server.addr
    );
    let result = run(&server, cli.scenario, &opts).await;
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

async fn run(server: &Server, scenario: Scenario, opts: &Options) -> Result<scenarios::Summary> {
    let api = Api::login(server.http_base()).await?;
    match scenario {
        Scenario::Websocket => scenarios::websocket(server, &api, opts).await,
        Scenario::Store => scenarios::store(server, &api, opts).await,
        Scenario::Idle => scenarios::idle(server, &api, opts).await,
        Scenario::BasicConnects => scenarios::basic_connects(server, &api, opts).await,
    }
}
