//! Client-mode listeners: iotgate connects out to `ws(s)://hostName[:port]path`, sending Origin,
//! the sub-protocol, Basic credentials (when not anonymous) and extra headers, and reconnects
//! after any drop with exponential backoff and jitter. Received messages enter the pipeline like
//! messages from a server-mode connection; rejections are answered on the same socket.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use iotgate_core::definition::ListenerDefinition;
use iotgate_core::envelope::ConnectionMetadata;
use iotgate_core::ContentType;
use iotgate_pipeline::{ConnectionAuth, IngestError, ListenerContext, Pipeline, Rejection};
use rand::Rng;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::server::{Connection, CONNECTION_IDS};
use crate::status::{ListenerState, ListenerStatus};

const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct ClientListener {
    pub definition: ListenerDefinition,
    pub context: ListenerContext,
    pub status: Arc<ListenerStatus>,
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
            let outcome = tokio::select! {
                _ = self.shutdown.cancelled() => SessionEnd::Shutdown,
                outcome = self.connect_and_serve(&url, &mut attempt) => outcome,
            };
            match outcome {
                SessionEnd::Shutdown => break,
                SessionEnd::Dropped(error) => {
                    tracing::warn!(listener = %self.definition.key, url = %url, error = %error, attempt, "client listener disconnected; will retry");
                    self.status.set(ListenerState::Retrying, Some(error));
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
            .map_err(|e| format!("invalid URL {url}: {e}"))?;
        let headers = request.headers_mut();
        let d = &self.definition;
        let value =
            |v: &str| HeaderValue::from_str(v).map_err(|e| format!("invalid header value: {e}"));
        if let Some(origin) = &d.origin {
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
        let max = self.definition.max_message_bytes;
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let connector = tokio_tungstenite::Connector::Rustls(self.tls.clone());
        let connected = tokio::time::timeout(
            Duration::from_secs(15),
            tokio_tungstenite::connect_async_tls_with_config(
                request,
                Some(config),
                true,
                Some(connector),
            ),
        )
        .await;
        let (socket, _response) = match connected {
            Err(_) => return SessionEnd::Dropped("connect timed out after 15 s".into()),
            Ok(Err(error)) => return SessionEnd::Dropped(format!("connect failed: {error}")),
            Ok(Ok(parts)) => parts,
        };
        *attempt = 0;
        let counters = &self.context.counters;
        counters.connections.inc();
        self.status.set(ListenerState::Running, None);
        tracing::info!(url = %url, "client listener connected");

        let mut metadata = ConnectionMetadata::default();
        metadata.0.insert("mode".into(), "client".into());
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

    async fn serve(
        &self,
        socket: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        connection: &Connection,
    ) -> SessionEnd {
        let (mut sink, mut stream) = socket.split();
        let mut auth = ConnectionAuth::default();
        let heartbeat = Duration::from_secs(u64::from(self.definition.heartbeat_seconds));
        let mut ticker = tokio::time::interval(if heartbeat.is_zero() {
            Duration::from_secs(3600)
        } else {
            heartbeat
        });
        ticker.tick().await;
        let mut last_seen = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    let _ = sink.send(Message::Close(Some(CloseFrame { code: CloseCode::Away, reason: "listener stopped".into() }))).await;
                    return SessionEnd::Shutdown;
                }
                _ = ticker.tick(), if !heartbeat.is_zero() => {
                    if last_seen.elapsed() > heartbeat * 2 {
                        return SessionEnd::Dropped("the server stopped answering pings".into());
                    }
                    if let Err(error) = sink.send(Message::Ping(Default::default())).await {
                        return SessionEnd::Dropped(format!("ping failed: {error}"));
                    }
                }
                message = stream.next() => {
                    last_seen = Instant::now();
                    let bytes = match message {
                        Some(Ok(Message::Text(text))) => {
                            if self.definition.echo {
                                if let Err(error) = sink.send(Message::Text(text.clone())).await {
                                    return SessionEnd::Dropped(format!("echo failed: {error}"));
                                }
                            }
                            bytes::Bytes::from(text)
                        }
                        Some(Ok(Message::Binary(bytes))) => {
                            if self.definition.echo {
                                if let Err(error) = sink.send(Message::Binary(bytes.clone())).await {
                                    return SessionEnd::Dropped(format!("echo failed: {error}"));
                                }
                            }
                            bytes
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                        Some(Ok(Message::Close(frame))) => {
                            // tungstenite queued the close reply; send it and let the server
                            // end the connection, so the closing handshake completes cleanly.
                            let _ = sink.flush().await;
                            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                                while stream.next().await.is_some() {}
                            })
                            .await;
                            return SessionEnd::Dropped(match frame {
                                Some(f) => format!("the server closed the connection ({}: {})", u16::from(f.code), f.reason),
                                None => "the server closed the connection".into(),
                            });
                        }
                        Some(Err(error)) => return SessionEnd::Dropped(format!("connection error: {error}")),
                        None => return SessionEnd::Dropped("the connection ended".into()),
                    };
                    let mut envelope = connection.envelope(&self.context, bytes.len());
                    let outcome = match Pipeline::decode(self.context.content_type, bytes) {
                        Ok(payload) => {
                            envelope.payload = payload;
                            self.pipeline.ingest(&self.context, &mut auth, envelope).await
                        }
                        Err(rejection) => Err(self.pipeline.reject_undecodable(&self.context, &mut auth, &envelope, rejection).await),
                    };
                    if let Err(IngestError::Rejected { rejection, .. }) = outcome {
                        // Failures are reported back but never close an outbound connection: the
                        // remote server speaks for many devices.
                        if let Err(error) = self.send_error(&mut sink, &rejection).await {
                            return SessionEnd::Dropped(format!("send failed: {error}"));
                        }
                    }
                }
            }
        }
    }

    async fn send_error<S>(&self, sink: &mut S, rejection: &Rejection) -> Result<(), S::Error>
    where
        S: futures_util::Sink<Message> + Unpin,
    {
        if self.context.content_type == ContentType::Binary {
            return Ok(());
        }
        sink.send(Message::Text(rejection.to_frame().into())).await
    }
}

/// Exponential backoff with full jitter in the upper half: 250 ms, 500 ms, ... up to 30 s.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_START
        .saturating_mul(1u32 << attempt.min(8))
        .min(BACKOFF_MAX);
    let millis = ceiling.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(millis / 2..=millis))
}
