//! The client side of the load: WebSocket connects, device connections that send JSON telemetry
//! at a paced rate, and the subscriber that measures end-to-end latency.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::api::DeviceKey;

/// A client WebSocket connection.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long one connect (TCP + upgrade) may take before it counts as a failure.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Client settings for connections that only wait (idle scenario, handshake timing): a 4 KiB read
/// buffer instead of tungstenite's 128 KiB, so 10,000 of them do not cost the machine 1.3 GB.
pub fn small_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// Client settings for sending device connections: small read buffer, a write buffer that lets a
/// burst of frames go out in one syscall.
pub fn sender_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(64 * 1024)
}

/// Client settings for the subscriber, which receives every envelope.
pub fn subscriber_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(128 * 1024)
}

/// Builds an upgrade request for a `ws://127.0.0.1...` URL, optionally with an Authorization header.
pub fn request(url: &str, authorization: Option<&str>) -> Result<Request> {
    if !url.starts_with("ws://127.") && !url.starts_with("ws://[::1]") {
        bail!("refusing a non-loopback URL: {url}");
    }
    let mut req = url
        .into_client_request()
        .with_context(|| format!("bad URL {url}"))?;
    if let Some(value) = authorization {
        req.headers_mut().insert(
            "authorization",
            value.parse().context("bad Authorization header value")?,
        );
    }
    Ok(req)
}

/// Connects with a timeout; the error says the HTTP status when the upgrade was refused.
pub async fn connect(req: Request, config: WebSocketConfig) -> Result<Ws> {
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(req, Some(config), true),
    )
    .await
    {
        Err(_) => bail!("connect timed out after {} s", CONNECT_TIMEOUT.as_secs()),
        Ok(Err(WsError::Http(resp))) => bail!("upgrade refused with HTTP {}", resp.status()),
        Ok(Err(e)) => Err(e).context("connect failed"),
        Ok(Ok((ws, _resp))) => Ok(ws),
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay as they are).
pub fn query_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Nanoseconds since the UNIX epoch (the clock both sender and subscriber read).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Opens `count` connections with at most `concurrency` connects in flight.
/// Returns the open connections (in completion order), the failure count and a sample failure.
pub async fn connect_many(
    url: &str,
    count: usize,
    concurrency: usize,
    config: WebSocketConfig,
) -> Result<(Vec<Ws>, usize, Option<String>)> {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for _ in 0..count {
        let req = request(url, None)?;
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            connect(req, config).await
        });
    }
    let mut open = Vec::with_capacity(count);
    let mut failures = 0;
    let mut sample = None;
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            Ok(ws) => open.push(ws),
            Err(e) => {
                failures += 1;
                sample.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    Ok((open, failures, sample))
}

/// The timeline of a sending run, shared by every connection and the measuring side.
#[derive(Clone, Copy)]
pub struct Timeline {
    /// Sending starts (warm-up begins).
    pub start: Instant,
    /// The measured window begins (warm-up ends).
    pub window_start: Instant,
    /// The measured window ends and sending stops.
    pub end: Instant,
}

impl Timeline {
    /// A timeline starting a little after now, so every task is spawned before the first send.
    pub fn new(warmup: Duration, measured: Duration) -> Timeline {
        let start = Instant::now() + Duration::from_millis(200);
        Timeline {
            start,
            window_start: start + warmup,
            end: start + warmup + measured,
        }
    }

    /// Whether `t` lies in the measured window.
    pub fn in_window(&self, t: Instant) -> bool {
        t >= self.window_start && t < self.end
    }
}

/// Counters the device connections update while running.
#[derive(Default)]
pub struct SendStats {
    /// Messages written to the socket over the whole run (warm-up included).
    pub sent_total: AtomicU64,
    /// Messages written during the measured window.
    pub sent_window: AtomicU64,
    /// `{"error":...}` frames the server sent back (rejected messages).
    pub error_frames: AtomicU64,
    /// Connections the server closed or that failed while the bench still used them.
    pub closed_by_server: AtomicU64,
    /// Writers that have stopped sending (after `end`, or on error).
    pub writers_done: AtomicUsize,
    /// The first error frame / close reason, to show the user why.
    pub first_problem: Mutex<Option<String>>,
}

impl SendStats {
    fn note_problem(&self, problem: impl FnOnce() -> String) {
        let mut first = self.first_problem.lock().expect("not poisoned");
        if first.is_none() {
            *first = Some(problem());
        }
    }
}

/// How the device connections send.
#[derive(Clone, Copy)]
pub struct SendPlan {
    /// Total messages per second over all connections; 0 = as fast as the sockets accept.
    pub rate: u64,
    /// Messages written before each flush (and the most a connection catches up in one go).
    pub in_flight: usize,
    pub timeline: Timeline,
}

/// Device connections sending in the background; see [`DeviceLoad::spawn`].
pub struct DeviceLoad {
    pub stats: Arc<SendStats>,
    /// Connections that took part.
    pub connections: usize,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl DeviceLoad {
    /// Starts one writer and one reader task per connection. Connection `i` speaks for device
    /// `keys[i % keys.len()]`.
    pub fn spawn(conns: Vec<Ws>, keys: &[DeviceKey], plan: SendPlan) -> DeviceLoad {
        let stats = Arc::new(SendStats::default());
        let (shutdown, _) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let connections = conns.len();
        let per_conn_rate = plan.rate as f64 / connections.max(1) as f64;
        for (i, ws) in conns.into_iter().enumerate() {
            let key = &keys[i % keys.len()];
            let prefix = format!(
                "{{\"deviceId\":\"{}\",\"accessKey\":\"{}\",\"seq\":",
                key.device_id, key.access_key
            );
            // Spread the connections' send instants evenly over one period.
            let phase = i as f64 / connections.max(1) as f64;
            let (sink, stream) = ws.split();
            tasks.spawn(read_device_frames(
                stream,
                stats.clone(),
                shutdown.subscribe(),
            ));
            tasks.spawn(write_device_frames(
                sink,
                prefix,
                per_conn_rate,
                phase,
                plan,
                stats.clone(),
                shutdown.subscribe(),
            ));
        }
        DeviceLoad {
            stats,
            connections,
            shutdown,
            tasks,
        }
    }

    /// Waits until every writer has stopped sending (at most `limit`); returns whether all did.
    pub async fn wait_writers_done(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.stats.writers_done.load(Ordering::Acquire) < self.connections {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Closes every connection (Close frame) and waits for the tasks (at most 15 s).
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(Duration::from_secs(15), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
        }
    }
}

/// Sends `{"deviceId":..,"accessKey":..,"seq":N,"sentAtNs":T,"temperature":21.5}` until
/// `timeline.end`, then waits for shutdown and closes the connection.
async fn write_device_frames(
    mut sink: futures_util::stream::SplitSink<Ws, Message>,
    prefix: String,
    per_conn_rate: f64,
    phase: f64,
    plan: SendPlan,
    stats: Arc<SendStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Timeline {
        start,
        window_start,
        end,
    } = plan.timeline;
    tokio::time::sleep_until(start.into()).await;
    let mut seq: u64 = 0;
    let batch_max = plan.in_flight.max(1) as u64;
    'send: loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let batch = if plan.rate == 0 {
            batch_max
        } else {
            // Messages due by now under a steady rate; falling behind is caught up in bursts.
            let due = (now.duration_since(start).as_secs_f64() * per_conn_rate + phase) as u64;
            if due <= seq {
                let next = start + Duration::from_secs_f64((seq + 1) as f64 / per_conn_rate);
                let next = next.checked_sub(Duration::from_secs_f64(phase / per_conn_rate));
                let wake = next.unwrap_or(now).clamp(now, end);
                tokio::time::sleep_until(wake.into()).await;
                continue;
            }
            (due - seq).min(batch_max)
        };
        for _ in 0..batch {
            // One fresh String per frame: the frame owns its bytes until the socket has them.
            let mut text = String::with_capacity(prefix.len() + 64);
            text.push_str(&prefix);
            let _ = write!(
                text,
                "{seq},\"sentAtNs\":{},\"temperature\":21.5}}",
                unix_nanos()
            );
            if sink.feed(Message::Text(text.into())).await.is_err() {
                break 'send;
            }
            seq += 1;
            stats.sent_total.fetch_add(1, Ordering::Relaxed);
            if now >= window_start {
                stats.sent_window.fetch_add(1, Ordering::Relaxed);
            }
        }
        if sink.flush().await.is_err() {
            break;
        }
    }
    // Whatever was fed but not yet flushed goes out now (bounded: the server may push back).
    let _ = tokio::time::timeout(Duration::from_secs(10), sink.flush()).await;
    stats.writers_done.fetch_add(1, Ordering::Release);
    let _ = shutdown.wait_for(|stop| *stop).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(Message::Close(None))).await;
}

/// Reads what the server sends a device connection: counts error frames and server closes.
async fn read_device_frames(
    mut stream: futures_util::stream::SplitStream<Ws>,
    stats: Arc<SendStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return,
            next = stream.next() => next,
        };
        match next {
            Some(Ok(Message::Text(text))) => {
                if text.as_str().contains("\"error\"") {
                    stats.error_frames.fetch_add(1, Ordering::Relaxed);
                    stats.note_problem(|| format!("error frame: {}", text.as_str()));
                }
            }
            Some(Ok(Message::Close(frame))) => {
                stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
                stats.note_problem(|| format!("server closed a connection: {frame:?}"));
                return;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
                stats.note_problem(|| format!("connection failed: {e}"));
                return;
            }
            None => {
                stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
                stats.note_problem(|| "the server ended a connection".to_owned());
                return;
            }
        }
    }
}

/// Counters the subscriber updates while running.
#[derive(Default)]
pub struct SubscriberStats {
    /// Frames received over the whole run.
    pub received_total: AtomicU64,
    /// Frames received during the measured window.
    pub received_window: AtomicU64,
    /// Frames without a readable `sentAtNs`.
    pub unparsed: AtomicU64,
}

/// A subscriber connected on a thread of its own, not reading yet: [`ConnectedSubscriber::start`]
/// hands it the timeline.
///
/// The viewer of a real deployment is another process, scheduled by the OS apart from the
/// devices. Here the load generator's tasks would otherwise share one runtime with the
/// subscriber: offered more than the server can deliver, 100 writers that never sleep starve the
/// one reader, the socket backs up, and the figure shows the bench's reader instead of the
/// server. On its own thread (with its own runtime and I/O driver) the reader gets the OS's fair
/// share of the CPU, as a separate process would.
pub struct ConnectedSubscriber {
    stats: Arc<SubscriberStats>,
    shutdown: watch::Sender<bool>,
    start: tokio::sync::oneshot::Sender<Timeline>,
    done: tokio::sync::oneshot::Receiver<Histogram<u64>>,
}

/// The running subscriber; [`Subscriber::finish`] returns the latency histogram.
pub struct Subscriber {
    pub stats: Arc<SubscriberStats>,
    shutdown: watch::Sender<bool>,
    done: tokio::sync::oneshot::Receiver<Histogram<u64>>,
}

impl ConnectedSubscriber {
    /// Connects to `url` on a new thread, retrying for up to 10 s (a downstream may start a
    /// moment after the API answered).
    pub async fn connect(url: &str) -> Result<ConnectedSubscriber> {
        let req = request(url, None)?;
        let stats = Arc::new(SubscriberStats::default());
        let (shutdown, stop) = watch::channel(false);
        let (start, start_rx) = tokio::sync::oneshot::channel::<Timeline>();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let (connected_tx, connected) = tokio::sync::oneshot::channel::<Result<()>>();
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("bench-subscriber".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = connected_tx.send(Err(e.into()));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let ws = loop {
                        match connect(req.clone(), subscriber_config()).await {
                            Ok(ws) => break ws,
                            Err(e) if Instant::now() >= deadline => {
                                let _ = connected_tx.send(Err(e));
                                return;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                        }
                    };
                    let _ = connected_tx.send(Ok(()));
                    let Ok(timeline) = start_rx.await else {
                        return;
                    };
                    let _ = done_tx.send(read_frames(ws, timeline, thread_stats, stop).await);
                });
            })
            .context("the subscriber thread could not start")?;
        connected
            .await
            .context("the subscriber thread ended")?
            .with_context(|| format!("the subscriber could not connect to {url}"))?;
        Ok(ConnectedSubscriber {
            stats,
            shutdown,
            start,
            done,
        })
    }

    /// Starts reading: for each envelope received in the measured window, records
    /// now − payload.sentAtNs in microseconds.
    pub fn start(self, timeline: Timeline) -> Subscriber {
        let _ = self.start.send(timeline);
        Subscriber {
            stats: self.stats,
            shutdown: self.shutdown,
            done: self.done,
        }
    }
}

impl Subscriber {
    /// Stops reading and returns the latency histogram (µs).
    pub async fn finish(self) -> Result<Histogram<u64>> {
        let _ = self.shutdown.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.done)
            .await
            .context("the subscriber did not stop")?
            .context("the subscriber thread failed")
    }
}

/// The subscriber's read loop, until `stop` turns true or the connection ends.
async fn read_frames(
    ws: Ws,
    timeline: Timeline,
    stats: Arc<SubscriberStats>,
    mut stop: watch::Receiver<bool>,
) -> Histogram<u64> {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let (_sink, mut stream) = ws.split();
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            next = stream.next() => next,
        };
        let sent_at = match next {
            Some(Ok(Message::Text(text))) => sent_at_ns(text.as_bytes()),
            Some(Ok(Message::Binary(bytes))) => sent_at_ns(&bytes),
            Some(Ok(Message::Close(frame))) => {
                eprintln!("warning: the server closed the subscriber: {frame:?}");
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                eprintln!("warning: the subscriber connection failed: {e}");
                break;
            }
            None => break,
        };
        let now_ns = unix_nanos();
        stats.received_total.fetch_add(1, Ordering::Relaxed);
        if !timeline.in_window(Instant::now()) {
            continue;
        }
        stats.received_window.fetch_add(1, Ordering::Relaxed);
        match sent_at {
            Some(sent) => hist.saturating_record(now_ns.saturating_sub(sent) / 1_000),
            None => {
                stats.unparsed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    hist
}

/// Finds `"sentAtNs"` in an envelope or payload and parses the number after it, without
/// deserialising the whole document.
fn sent_at_ns(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sentAtNs\"";
    let at = frame.windows(KEY.len()).position(|w| w == KEY)?;
    let mut rest = frame[at + KEY.len()..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace());
    if *rest.next()? != b':' {
        return None;
    }
    let mut value: u64 = 0;
    let mut digits = 0;
    for &b in rest.skip_while(|b| b.is_ascii_whitespace()) {
        if !b.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::{query_encode, sent_at_ns};

    #[test]
    fn finds_sent_at_in_envelope() {
        let env = br#"{"id":"x","payload":{"deviceId":"bench-1","seq":5,"sentAtNs": 1700000000123456789,"temperature":21.5}}"#;
        assert_eq!(sent_at_ns(env), Some(1_700_000_000_123_456_789));
        assert_eq!(sent_at_ns(br#"{"sentAtNs":"x"}"#), None);
        assert_eq!(sent_at_ns(br#"{"other":1}"#), None);
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(query_encode("aZ09-_.~"), "aZ09-_.~");
        assert_eq!(query_encode("a+b/c="), "a%2Bb%2Fc%3D");
    }
}
