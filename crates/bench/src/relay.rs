//! The ceiling: a bare WebSocket relay that does what iotgate's `websocket` scenario asks of
//! iotgate, minus everything iotgate adds — no parsing, no authentication, no routing. Text
//! frames that devices send to `/telemetry` (any path but `/live`) are forwarded verbatim to
//! every `/live` subscriber. tokio-tungstenite with 4 KiB read buffers, a bounded broadcast
//! channel, and subscriber writes batched until the channel is empty (one flush per batch).
//!
//! It runs as its own process (`iotgate-bench relay-server`), so its CPU time is read from
//! `/proc/<pid>/stat` the same way as iotgate's.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames a subscriber may fall behind before it misses the oldest (as iotgate's hub).
const SUBSCRIBER_BUFFER: usize = 16_384;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// The relay server's main loop (the `relay-server` subcommand).
pub async fn serve(bind: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(bind).await?;
    println!("relay listening on {}", listener.local_addr()?);
    let (frames, _) = broadcast::channel::<Utf8Bytes>(SUBSCRIBER_BUFFER);
    loop {
        let (socket, _) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        tokio::spawn(connection(socket, frames.clone()));
    }
}

// tungstenite's accept callback must return its large ErrorResponse type by value.
#[allow(clippy::result_large_err)]
async fn connection(socket: TcpStream, frames: broadcast::Sender<Utf8Bytes>) {
    let path = Arc::new(Mutex::new(String::new()));
    let seen = path.clone();
    let callback = move |request: &Request, response: Response| {
        *seen.lock().expect("path lock") = request.uri().path().to_owned();
        Ok(response)
    };
    let Ok(ws) =
        tokio_tungstenite::accept_hdr_async_with_config(socket, callback, Some(config())).await
    else {
        return;
    };
    let path = path.lock().expect("path lock").clone();
    let (mut sink, mut stream) = ws.split();
    if path == "/live" {
        let mut receiver = frames.subscribe();
        loop {
            let frame = match receiver.recv().await {
                Ok(frame) => frame,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if sink.feed(Message::Text(frame)).await.is_err() {
                return;
            }
            // Everything already queued goes out with the same flush.
            while let Ok(frame) = receiver.try_recv() {
                if sink.feed(Message::Text(frame)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    } else {
        while let Some(Ok(message)) = stream.next().await {
            if let Message::Text(text) = message {
                let _ = frames.send(text);
            }
        }
    }
}

/// The relay as a child process of the bench.
pub struct RelayProcess {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
}

impl RelayProcess {
    /// Starts `bench_bin relay-server` and waits for its listening line.
    pub async fn start(bench_bin: &Path) -> Result<RelayProcess> {
        let mut child = Command::new(bench_bin)
            .arg("relay-server")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} relay-server", bench_bin.display()))?;
        let pid = child.id().context("the relay exited at once")?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("relay listening on ") {
                    return Ok(rest.trim().parse::<SocketAddr>()?);
                }
            }
            bail!("the relay closed its stdout before listening")
        })
        .await
        .context("the relay did not start within 10 s")??;
        Ok(RelayProcess { child, pid, addr })
    }

    pub fn cpu_time(&self) -> Result<Duration> {
        crate::server::process_cpu_time(self.pid)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
