//! Client-mode listeners: iotgate connects out to `ws(s)://hostName[:port]path`, sending Origin,
//! the sub-protocol, Basic credentials (when not anonymous) and extra headers, and reconnects
//! after any drop with exponential backoff and jitter. Received messages enter the pipeline like
//! messages from a server-mode connection; rejections are answered on the same socket.
//!
//! The connection keeps the same rules a server-mode connection does: the `websocket` settings
//! (opening and closing handshake timeouts, auto-ping, idle timeout, frame and message caps,
//! failByDrop), the sentinel's `maxFailures` and the listener's `authTimeoutSeconds`. When one of
//! the last two closes the connection, the remote is sending what the sentinel refuses, so the
//! reconnect backs off as after a failed connect instead of starting over at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use iotgate_core::compression_settings::EffectiveCompressionSettings;
use iotgate_core::definition::ListenerDefinition;
use iotgate_core::envelope::ConnectionMetadata;
use iotgate_core::log_safe::url_for_log;
use iotgate_core::websocket_settings::EffectiveWebSocketSettings;
use iotgate_pipeline::{ListenerContext, Pipeline, SessionCloser};
use rand::Rng;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::acks::{answer_ready, drain_step, next_outcome, AckTracker, DRAIN_LIMIT};
use crate::connection::{handle_frame, Connection};
use crate::deflate::client_stream::{CompressingStream, InflateFailure};
use crate::frame_guard::Violation;
use crate::server::CONNECTION_IDS;
use crate::status::{ListenerState, ListenerStatus};
use crate::timers::{authentication_limit, ConnectionTimers, Due};

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct ClientListener {
    pub definition: ListenerDefinition,
    pub context: ListenerContext,
    pub status: Arc<ListenerStatus>,
    /// The definition's `websocket` settings with defaults and shorthands applied.
    websocket: EffectiveWebSocketSettings,
    /// permessage-deflate to offer; `None` when the listener does not compress.
    compression: Option<EffectiveCompressionSettings>,
    /// The unsealed password, only in memory, only when not anonymous.
    password: Option<String>,
    tls: Arc<rustls::ClientConfig>,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for ClientListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientListener")
            .field("key", &self.definition.key)
            .finish_non_exhaustive()
    }
}

enum SessionEnd {
    Shutdown,
    Dropped(String),
    /// iotgate closed the connection because the remote's messages broke the sentinel's rules
    /// (maxFailures, authTimeoutSeconds): the reconnect keeps backing off.
    Refused(String),
}

impl ClientListener {
    pub fn new(
        definition: ListenerDefinition,
        context: ListenerContext,
        status: Arc<ListenerStatus>,
        password: Option<String>,
        tls: Arc<rustls::ClientConfig>,
        pipeline: Arc<Pipeline>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            websocket: definition.websocket_settings(),
            compression: definition.compression_settings(),
            definition,
            context,
            status,
            password,
            tls,
            pipeline,
            shutdown,
        }
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub fn url(&self) -> String {
        let d = &self.definition;
        let scheme = if d.secure { "wss" } else { "ws" };
        let host = d.host_name.as_deref().unwrap_or("localhost");
        match d.port {
            Some(port) => format!("{scheme}://{host}:{port}{}", d.path),
            None => format!("{scheme}://{host}{}", d.path),
        }
    }

    /// Connects, serves, and reconnects until the listener is stopped.
    pub async fn run(self: Arc<Self>) {
        let span = tracing::info_span!("client_listener", listener = %self.definition.key);
        self.run_inner().instrument(span).await
    }

    async fn run_inner(self: Arc<Self>) {
        let url = self.url();
        self.status.set_url(url.clone());
        let mut attempt: u32 = 0;
        loop {
            self.status.set(
                if attempt == 0 {
                    ListenerState::Connecting
                } else {
                    ListenerState::Retrying
                },
                None,
            );
            let attempts_before = attempt;
            let outcome = tokio::select! {
                _ = self.shutdown.cancelled() => SessionEnd::Shutdown,
                outcome = self.connect_and_serve(&url, &mut attempt) => outcome,
            };
            match outcome {
                SessionEnd::Shutdown => break,
                SessionEnd::Dropped(error) => {
                    tracing::warn!(listener = %self.definition.key, url = %url_for_log(&url), error = %error, attempt, "client listener disconnected; will retry");
                    self.status.set(ListenerState::Retrying, Some(error));
                }
                SessionEnd::Refused(reason) => {
                    attempt = attempts_before;
                    tracing::warn!(listener = %self.definition.key, url = %url_for_log(&url), reason = %reason, attempt, "client listener closed the connection: the remote's messages were refused; will retry with backoff");
                    self.status.set(ListenerState::Retrying, Some(reason));
                }
            }
            let delay = backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.status.set(ListenerState::Stopped, None);
    }

    fn request(
        &self,
        url: &str,
    ) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, String> {
        let mut request = url
            .into_client_request()
            .map_err(|e| format!("invalid URL {}: {e}", url_for_log(url)))?;
        let headers = request.headers_mut();
        let d = &self.definition;
        let value =
            |v: &str| HeaderValue::from_str(v).map_err(|e| format!("invalid header value: {e}"));
        if let Some(origin) = d.origin.as_ref().and_then(|o| o.entries().first()) {
            headers.insert("origin", value(origin)?);
        }
        if let Some(protocol) = &d.sub_protocol {
            headers.insert("sec-websocket-protocol", value(protocol)?);
        }
        if !d.anonymous {
            let user = d.user_name.as_deref().unwrap_or_default();
            let password = self.password.as_deref().unwrap_or_default();
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            headers.insert("authorization", value(&format!("Basic {token}"))?);
        }
        for (name, v) in &d.headers {
            let name =
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|e| format!("invalid header name {name}: {e}"))?;
            headers.insert(name, value(v)?);
        }
        Ok(request)
    }

    async fn connect_and_serve(&self, url: &str, attempt: &mut u32) -> SessionEnd {
        let request = match self.request(url) {
            Ok(request) => request,
            Err(error) => return SessionEnd::Dropped(error),
        };
        let websocket = &self.websocket;
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(websocket.max_message_bytes))
            .max_frame_size(Some(websocket.max_frame_bytes));
        let open_timeout = websocket
            .open_handshake_timeout
            .unwrap_or(iotgate_core::websocket_settings::DEFAULT_CLIENT_OPEN_HANDSHAKE_TIMEOUT);
        match &self.compression {
            None => {
                let connector = tokio_tungstenite::Connector::Rustls(self.tls.clone());
                let connecting = async {
                    tokio_tungstenite::connect_async_tls_with_config(
                        request,
                        Some(config),
                        true,
                        Some(connector),
                    )
                    .await
                    .map(|(socket, _response)| socket)
                    .map_err(|error| format!("connect failed: {error}"))
                };
                match within_open_timeout(open_timeout, connecting).await {
                    Ok(socket) => self.serve_connected(socket, url, attempt).await,
                    Err(end) => end,
                }
            }
            Some(settings) => {
                let connecting = self.connect_compressing(request, config, settings);
                match within_open_timeout(open_timeout, connecting).await {
                    Ok(socket) => self.serve_connected(socket, url, attempt).await,
                    Err(end) => end,
                }
            }
        }
    }

    /// Connects with a permessage-deflate offer: TCP, TLS for `wss`, then the upgrade over a
    /// [`CompressingStream`], switched on as the server's answer says. An answer that does not
    /// fit the offer fails the connection with 1002 and the reason.
    async fn connect_compressing(
        &self,
        mut request: tokio_tungstenite::tungstenite::handshake::client::Request,
        config: WebSocketConfig,
        settings: &EffectiveCompressionSettings,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<
            CompressingStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
        >,
        String,
    > {
        let offer = crate::deflate::client_offer::offer(settings);
        request.headers_mut().insert(
            "sec-websocket-extensions",
            HeaderValue::from_str(&offer).map_err(|e| format!("invalid offer: {e}"))?,
        );
        let uri = request.uri().clone();
        let secure = uri.scheme_str() == Some("wss");
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .ok_or_else(|| "connect failed: the URL has no host".to_owned())?;
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("connect failed: {e}"))?;
        tcp.set_nodelay(true)
            .map_err(|e| format!("connect failed: {e}"))?;
        let stream = if secure {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("connect failed: invalid host name {host}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("connect failed: TLS: {e}"))?;
            tokio_tungstenite::MaybeTlsStream::Rustls(tls)
        } else {
            tokio_tungstenite::MaybeTlsStream::Plain(tcp)
        };
        let (mut socket, response) = tokio_tungstenite::client_async_with_config(
            request,
            CompressingStream::new(stream),
            Some(config),
        )
        .await
        .map_err(|e| format!("connect failed: {e}"))?;
        let answers = response
            .headers()
            .get_all("sec-websocket-extensions")
            .iter()
            .filter_map(|value| value.to_str().ok());
        match crate::deflate::client_offer::agreement(answers, settings) {
            Ok(agreement) => {
                match &agreement {
                    Some(agreement) => {
                        tracing::debug!(listener = %self.definition.key, answer = %agreement.response, "permessage-deflate negotiated")
                    }
                    None => {
                        tracing::debug!(listener = %self.definition.key, "the server declined permessage-deflate; the connection runs uncompressed")
                    }
                }
                socket.get_mut().start(
                    agreement.as_ref(),
                    self.websocket.max_frame_bytes,
                    self.websocket.max_message_bytes,
                );
                Ok(socket)
            }
            Err(problem) => {
                let reason = format!("invalid permessage-deflate answer: {problem}");
                let frame = CloseFrame {
                    code: CloseCode::Protocol,
                    reason: truncate_reason(&reason).to_owned().into(),
                };
                let _ = socket.close(Some(frame)).await;
                Err(format!("connect failed: {reason}"))
            }
        }
    }

    /// Serves an upgraded connection until it ends.
    async fn serve_connected<S>(
        &self,
        socket: tokio_tungstenite::WebSocketStream<S>,
        url: &str,
        attempt: &mut u32,
    ) -> SessionEnd
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        *attempt = 0;
        let counters = &self.context.counters;
        counters.connections.inc();
        self.status.set(ListenerState::Running, None);
        tracing::info!(url = %url_for_log(url), "client listener connected");

        let mut metadata = ConnectionMetadata::default();
        metadata.0.insert("mode".into(), "client".into());
        // Where messages come from: the remote's URL, without query string or user info (they
        // may carry a credential).
        metadata
            .0
            .insert("__meta_source".into(), url_for_log(url).to_string());
        if let Some(p) = &self.definition.sub_protocol {
            metadata.0.insert("subProtocol".into(), p.clone());
        }
        let connection = Connection {
            id: CONNECTION_IDS.fetch_add(1, Ordering::Relaxed),
            peer: None,
            metadata: Arc::new(metadata),
        };
        let end = self.serve(socket, &connection).await;
        counters.connections.dec();
        end
    }

    async fn serve<S>(
        &self,
        socket: tokio_tungstenite::WebSocketStream<S>,
        connection: &Connection,
    ) -> SessionEnd
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (mut sink, mut stream) = socket.split();
        let mut auth = self
            .pipeline
            .authenticate_connection(&self.context, &Default::default())
            .unwrap_or_default();
        let websocket = &self.websocket;
        let ping_payload = bytes::Bytes::from(websocket.ping_payload());
        // Pings and their answers, the idle timeout and, behind a sentinel, the deadline for the
        // remote's first authenticated message (as for a device connection), on one timer.
        let mut timers = ConnectionTimers::new(
            websocket,
            authentication_limit(&self.definition, self.context.sentinel.is_some()),
            None,
        );
        let timer = timers.sleep();
        tokio::pin!(timer);
        // A remote speaks for many devices: a registry change does not close it, but a
        // disabled sentinel does (the listener then reconnects and is refused until it is back).
        let closer = SessionCloser::new();
        self.context.live.register(&closer);
        // Addressable as this listener's connection (and as the sender a route replies to); it
        // is bound to no one device, since the remote speaks for many.
        let (_registration, mut downlinks) =
            self.pipeline
                .connections
                .register(connection.id, self.context.key.clone(), None, None);
        let (mut acks, mut late_answers) = match AckTracker::new(
            &self.definition,
            self.context.counters.clone(),
            self.pipeline.metrics.clone(),
        ) {
            Some((tracker, receiver)) => (Some(tracker), Some(receiver)),
            None => (None, None),
        };
        let close_timeout = websocket.close_handshake_timeout;
        loop {
            let awaiting = acks.as_ref().is_some_and(AckTracker::awaits_answers);
            // With maxInFlight messages unanswered, the socket is not read: TCP pushes back.
            let may_read = acks.as_ref().is_none_or(AckTracker::can_read);
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    // Every message in flight is answered before the connection closes.
                    if let Some(tracker) = acks.as_mut() {
                        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
                        while let Some(frames) = drain_step(tracker, &mut late_answers, deadline).await {
                            if send_frames(&mut sink, frames).await.is_err() {
                                break;
                            }
                        }
                    }
                    close_first(&mut sink, &mut stream, CloseCode::Away, "listener stopped", close_timeout).await;
                    return SessionEnd::Shutdown;
                }
                cause = closer.closed() => {
                    close_first(&mut sink, &mut stream, CloseCode::Policy, cause.as_str(), close_timeout).await;
                    return SessionEnd::Dropped(format!("closed by iotgate: {}", cause.as_str()));
                }
                Some(outcome) = next_outcome(&mut late_answers), if awaiting => {
                    let frames = answer_ready(acks.as_mut(), &mut late_answers, outcome);
                    if let Err(error) = send_frames(&mut sink, frames).await {
                        return SessionEnd::Dropped(format!("send failed: {error}"));
                    }
                }
                due = timers.next(timer.as_mut(), auth.authenticated) => match due {
                    Due::Unauthenticated { within } => {
                        let reason = format!("no authenticated message within {} s", within.as_secs());
                        close_first(&mut sink, &mut stream, CloseCode::Policy, &reason, close_timeout).await;
                        return SessionEnd::Refused(format!("{reason} (authTimeoutSeconds)"));
                    }
                    Due::PingUnanswered => {
                        close_first(&mut sink, &mut stream, CloseCode::Away, "heartbeat timeout", close_timeout).await;
                        return SessionEnd::Dropped(format!("the server did not answer a ping within {} s", websocket.auto_ping_timeout.as_secs()));
                    }
                    Due::Idle => {
                        close_first(&mut sink, &mut stream, CloseCode::Normal, "idle timeout", close_timeout).await;
                        return SessionEnd::Dropped(format!("no data from the server within {} s (idleTimeoutSeconds)", websocket.idle_timeout.as_secs()));
                    }
                    Due::Ping => {
                        if let Err(error) = sink.send(Message::Ping(ping_payload.clone())).await {
                            return SessionEnd::Dropped(format!("ping failed: {error}"));
                        }
                    }
                    // A client listener's connection has no token of its own.
                    Due::TokenExpired => unreachable!("client connections are given no token expiry"),
                },
                Some(downlink) = downlinks.recv() => {
                        let frame = match downlink.plain_frame(self.context.content_type) {
                        iotgate_pipeline::PlainFrame::Text(text) => Message::Text(text.into()),
                        iotgate_pipeline::PlainFrame::Binary(bytes) => Message::Binary(bytes),
                    };
                    if let Err(error) = sink.send(frame).await {
                        return SessionEnd::Dropped(format!("send failed: {error}"));
                    }
                }
                message = stream.next(), if may_read => {
                    timers.frame_received();
                    if matches!(message, Some(Ok(Message::Text(_) | Message::Binary(_)))) {
                        timers.data_received();
                    }
                    let (bytes, text_frame) = match message {
                        Some(Ok(Message::Text(text))) => {
                            if self.definition.echo {
                                if let Err(error) = sink.send(Message::Text(text.clone())).await {
                                    return SessionEnd::Dropped(format!("echo failed: {error}"));
                                }
                            }
                            (bytes::Bytes::from(text), true)
                        }
                        Some(Ok(Message::Binary(bytes))) => {
                            if self.definition.echo {
                                if let Err(error) = sink.send(Message::Binary(bytes.clone())).await {
                                    return SessionEnd::Dropped(format!("echo failed: {error}"));
                                }
                            }
                            (bytes, false)
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                        Some(Ok(Message::Close(frame))) => {
                            // tungstenite queued the close reply; send it and let the server
                            // end the connection, so the closing handshake completes cleanly.
                            let _ = sink.flush().await;
                            let _ = tokio::time::timeout(close_timeout, async {
                                while stream.next().await.is_some() {}
                            })
                            .await;
                            return SessionEnd::Dropped(match frame {
                                Some(f) => format!("the server closed the connection ({}: {})", u16::from(f.code), f.reason),
                                None => "the server closed the connection".into(),
                            });
                        }
                        Some(Err(error)) => {
                            // A protocol violation by the server fails the connection: with a
                            // close frame naming it, or with failByDrop by dropping TCP.
                            if let Some(code) = violation_code(&error) {
                                if !websocket.fail_by_drop {
                                    let reason = violation_reason(&error);
                                    close_first(&mut sink, &mut stream, code, truncate_reason(&reason), close_timeout).await;
                                }
                            }
                            return SessionEnd::Dropped(format!("connection error: {error}"));
                        }
                        None => return SessionEnd::Dropped("the connection ended".into()),
                    };
                    let reply = handle_frame(&self.pipeline, &self.context, connection, &mut auth, acks.as_mut(), bytes, text_frame).await;
                    if let Err(error) = send_frames(&mut sink, reply.frames).await {
                        return SessionEnd::Dropped(format!("send failed: {error}"));
                    }
                    // The sentinel's maxFailures applies as on a device connection: the remote
                    // keeps sending what the sentinel refuses, so iotgate hangs up and backs off.
                    if let Some(rejection) = reply.close {
                        let reason = format!("too many rejected messages ({})", rejection.code.as_str());
                        close_first(&mut sink, &mut stream, CloseCode::Policy, &reason, close_timeout).await;
                        return SessionEnd::Refused(format!("{reason} (the sentinel's maxFailures)"));
                    }
                }
            }
        }
    }
}

/// Bounds a way of connecting by the open handshake timeout; its error, or the timeout, ends the
/// session.
async fn within_open_timeout<T>(
    open_timeout: Duration,
    connecting: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, SessionEnd> {
    match tokio::time::timeout(open_timeout, connecting).await {
        Ok(connected) => connected.map_err(SessionEnd::Dropped),
        Err(_) => Err(SessionEnd::Dropped(format!(
            "connect and upgrade timed out after {} ms (openHandshakeTimeoutMs)",
            open_timeout.as_millis()
        ))),
    }
}

/// Closes a connection from iotgate's side: the close frame, then up to `timeout` for the
/// server's answer (its close frame, or the end of the connection) before TCP is dropped.
async fn close_first<S, R>(
    sink: &mut S,
    stream: &mut R,
    code: CloseCode,
    reason: &str,
    timeout: Duration,
) where
    S: futures_util::Sink<Message> + Unpin,
    R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let frame = CloseFrame {
        code,
        reason: reason.to_owned().into(),
    };
    if sink.send(Message::Close(Some(frame))).await.is_err() || timeout.is_zero() {
        return;
    }
    let answered = tokio::time::timeout(timeout, async {
        while let Some(message) = stream.next().await {
            if matches!(message, Ok(Message::Close(_)) | Err(_)) {
                return;
            }
        }
    })
    .await;
    if answered.is_err() {
        tracing::debug!(
            ?timeout,
            "the server did not answer the close frame in time; dropping the connection"
        );
    }
}

/// The close code for a read error that is the server's protocol violation (1002, 1007, 1009);
/// `None` for errors of the connection itself, where no close frame can go out.
fn violation_code(error: &tokio_tungstenite::tungstenite::Error) -> Option<CloseCode> {
    use tokio_tungstenite::tungstenite::Error;
    match error {
        Error::Capacity(_) => Some(CloseCode::Size),
        Error::Utf8 => Some(CloseCode::Invalid),
        Error::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => None,
        Error::Protocol(_) => Some(CloseCode::Protocol),
        // A compressed message the stream under tungstenite could not inflate.
        Error::Io(_) => inflate_failure(error).map(|failure| match failure.0 {
            Violation::TooBig => CloseCode::Size,
            Violation::InvalidUtf8 => CloseCode::Invalid,
            Violation::Protocol => CloseCode::Protocol,
        }),
        _ => None,
    }
}

/// The close reason for a violation: what the inflater found, or tungstenite's words.
fn violation_reason(error: &tokio_tungstenite::tungstenite::Error) -> String {
    match inflate_failure(error) {
        Some(failure) => failure.to_string(),
        None => error.to_string(),
    }
}

/// The inflater's verdict carried by a read error, if that is what it is.
fn inflate_failure(error: &tokio_tungstenite::tungstenite::Error) -> Option<InflateFailure> {
    match error {
        tokio_tungstenite::tungstenite::Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<InflateFailure>())
            .copied(),
        _ => None,
    }
}

/// A close reason fits in 123 bytes; longer ones are cut at a character boundary.
fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Sends text frames in order.
async fn send_frames<S>(sink: &mut S, frames: Vec<String>) -> Result<(), S::Error>
where
    S: futures_util::Sink<Message> + Unpin,
{
    for frame in frames {
        sink.send(Message::Text(frame.into())).await?;
    }
    Ok(())
}

/// Exponential backoff with full jitter in the upper half: 250 ms, 500 ms, ... up to 30 s.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_START
        .saturating_mul(1u32 << attempt.min(8))
        .min(BACKOFF_MAX);
    let millis = ceiling.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
}
