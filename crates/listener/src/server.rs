//! Server-mode listeners: the upgrade checks and the per-connection task.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, FromRequest as _, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError, Session};
use iotgate_core::definition::ListenerDefinition;
use iotgate_core::envelope::{new_envelope_id, ConnectionMetadata};
use iotgate_core::{ContentType, Envelope, Payload};
use iotgate_pipeline::{
    ConnectionAuth, ConnectionCredentials, IngestError, ListenerContext, Pipeline, Rejection,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::basic_auth::BasicCredentialVerifier;
use crate::limits::{ConnectionLimits, ConnectionPermit, Refusal};
use crate::status::{ListenerState, ListenerStatus};

/// Process-wide connection ids, shared by server and client listeners.
pub static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// A running server-mode listener. Requests reach it through the main port's path table or its
/// own HTTP server; both call [`ServerListener::handle_upgrade`].
pub struct ServerListener {
    pub definition: ListenerDefinition,
    pub context: ListenerContext,
    pub status: Arc<ListenerStatus>,
    basic: Option<BasicCredentialVerifier>,
    pipeline: Arc<Pipeline>,
    /// Process-wide admission (connection caps, connect rate), shared by every listener.
    limits: Arc<ConnectionLimits>,
    /// Cancelled when the listener is replaced, disabled, deleted or the process stops; every
    /// connection task closes its socket with 1001 then.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for ServerListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerListener")
            .field("key", &self.definition.key)
            .finish_non_exhaustive()
    }
}

fn error_response(
    mut builder: actix_web::HttpResponseBuilder,
    code: &str,
    message: &str,
) -> HttpResponse {
    builder.json(serde_json::json!({"error": {"code": code, "message": message}}))
}

impl ServerListener {
    pub fn new(
        definition: ListenerDefinition,
        context: ListenerContext,
        status: Arc<ListenerStatus>,
        basic: Option<BasicCredentialVerifier>,
        pipeline: Arc<Pipeline>,
        limits: Arc<ConnectionLimits>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            definition,
            context,
            status,
            basic,
            pipeline,
            limits,
            shutdown,
        }
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Checks the upgrade request in the documented order and, when it passes, starts the
    /// connection task. The caller has already matched the path.
    pub async fn handle_upgrade(
        self: Arc<Self>,
        request: HttpRequest,
        body: web::Payload,
    ) -> HttpResponse {
        let metrics = &self.pipeline.metrics;
        let key = &self.definition.key;
        if self.shutdown.is_cancelled() {
            return error_response(
                HttpResponse::ServiceUnavailable(),
                "listener_stopping",
                "the listener is restarting; retry",
            );
        }
        // Admission before anything else: a connect flood costs a map lookup, not a handshake.
        let permit = match self.limits.admit(request.peer_addr().map(|a| a.ip())) {
            Ok(permit) => permit,
            Err(refusal) => {
                metrics.upgrade_rejected(key, refusal.code());
                let builder = match refusal {
                    Refusal::ServerFull => HttpResponse::ServiceUnavailable(),
                    Refusal::AddressFull | Refusal::RateExceeded => HttpResponse::TooManyRequests(),
                };
                let mut response = error_response(builder, refusal.code(), refusal.message());
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                return response;
            }
        };
        if let Some(expected) = &self.definition.origin {
            let origin = request
                .headers()
                .get(header::ORIGIN)
                .and_then(|v| v.to_str().ok());
            if origin != Some(expected.as_str()) {
                metrics.upgrade_rejected(key, "origin");
                return error_response(
                    HttpResponse::Forbidden(),
                    "origin_forbidden",
                    "the Origin header does not match the listener's origin",
                );
            }
        }
        if let Some(basic) = &self.basic {
            let authorization = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if !basic.verify_header(authorization).await {
                metrics.upgrade_rejected(key, "credentials");
                let mut response = error_response(
                    HttpResponse::Unauthorized(),
                    "unauthorized",
                    "valid Basic credentials are required",
                );
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"iotgate\", charset=\"UTF-8\""),
                );
                return response;
            }
        }
        let offered: Vec<String> = request
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        if let Some(required) = &self.definition.sub_protocol {
            if !offered.iter().any(|p| p == required) {
                metrics.upgrade_rejected(key, "subprotocol");
                return error_response(
                    HttpResponse::BadRequest(),
                    "subprotocol_required",
                    &format!("the client must offer the sub-protocol {required}"),
                );
            }
        }

        // Connect-time device credentials (query parameters, headers), copied only when a
        // sentinel will read them.
        let credentials = if self.context.sentinel.is_none() {
            ConnectionCredentials::default()
        } else {
            ConnectionCredentials {
                query: url::form_urlencoded::parse(request.query_string().as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect(),
                headers: request
                    .headers()
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                    .collect(),
            }
        };
        let auth = self
            .pipeline
            .authenticate_connection(&self.context, &credentials);

        // The frame guard enforces maxMessageBytes from frame headers, before any buffering.
        let oversize = Arc::new(AtomicBool::new(false));
        let mut guarded = crate::frame_guard::guard_payload(
            body.into_inner(),
            self.definition.max_message_bytes,
            oversize.clone(),
        );
        let body = match web::Payload::from_request(&request, &mut guarded).await {
            Ok(body) => body,
            Err(error) => {
                return error_response(
                    HttpResponse::BadRequest(),
                    "bad_request",
                    &error.to_string(),
                )
            }
        };
        let (mut response, session, stream) = match actix_ws::handle(&request, body) {
            Ok(parts) => parts,
            Err(error) => {
                metrics.upgrade_rejected(key, "not_websocket");
                return error_response(
                    HttpResponse::BadRequest(),
                    "websocket_upgrade_required",
                    &format!("not a valid WebSocket upgrade request: {error}"),
                );
            }
        };
        let mut metadata = ConnectionMetadata::default();
        if let Some(required) = &self.definition.sub_protocol {
            if let Ok(value) = HeaderValue::from_str(required) {
                response
                    .headers_mut()
                    .insert(header::SEC_WEBSOCKET_PROTOCOL, value);
            }
            metadata.0.insert("subProtocol".into(), required.clone());
        }
        metadata.0.insert("mode".into(), "server".into());
        let connection = Connection {
            id: CONNECTION_IDS.fetch_add(1, Ordering::Relaxed),
            peer: request.peer_addr(),
            metadata: Arc::new(metadata),
        };
        let stream = stream
            .max_frame_size(self.definition.max_message_bytes)
            .aggregate_continuations()
            .max_continuation_size(self.definition.max_message_bytes);
        let span = tracing::info_span!(
            "connection",
            listener = %self.definition.key,
            connection = connection.id,
            peer = ?connection.peer,
            device = tracing::field::Empty,
        );
        actix_web::rt::spawn(
            self.clone()
                .run_connection(connection, session, stream, auth, permit, oversize)
                .instrument(span),
        );
        response
    }

    async fn run_connection(
        self: Arc<Self>,
        connection: Connection,
        mut session: Session,
        mut stream: actix_ws::AggregatedMessageStream,
        auth: Result<ConnectionAuth, Rejection>,
        _permit: ConnectionPermit,
        oversize: Arc<AtomicBool>,
    ) {
        let counters = &self.context.counters;
        counters.connections.inc();
        let mut auth = match auth {
            Ok(auth) => auth,
            Err(rejection) => {
                tracing::info!(
                    code = rejection.code.as_str(),
                    "device credentials refused at connect"
                );
                self.send_error(&mut session, &rejection).await;
                let _ = session
                    .close(Some(CloseReason {
                        code: CloseCode::Policy,
                        description: Some(rejection.message.clone()),
                    }))
                    .await;
                counters.connections.dec();
                return;
            }
        };
        if let Some(binding) = &auth.binding {
            tracing::Span::current().record("device", tracing::field::display(&binding.device_id));
            tracing::debug!(device = %binding.device_id, "connection bound to device");
        }

        let heartbeat = Duration::from_secs(u64::from(self.definition.heartbeat_seconds));
        let mut ticker = tokio::time::interval(if heartbeat.is_zero() {
            Duration::from_secs(3600)
        } else {
            heartbeat
        });
        ticker.tick().await;
        let mut last_seen = Instant::now();
        // Behind a sentinel, a connection must authenticate one message within the deadline.
        let auth_limit = Duration::from_secs(u64::from(self.definition.auth_timeout_seconds));
        let auth_deadline_applies = self.context.sentinel.is_some() && !auth_limit.is_zero();
        let auth_deadline = tokio::time::sleep(if auth_deadline_applies {
            auth_limit
        } else {
            Duration::from_secs(86_400)
        });
        tokio::pin!(auth_deadline);

        let close: Option<CloseReason> = loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    break Some(CloseReason { code: CloseCode::Away, description: Some("listener stopped or reconfigured".into()) });
                }
                _ = &mut auth_deadline, if auth_deadline_applies && !auth.authenticated => {
                    tracing::info!("no authenticated message within the deadline");
                    break Some(CloseReason { code: CloseCode::Policy, description: Some(format!("no authenticated message within {} s", auth_limit.as_secs())) });
                }
                _ = ticker.tick(), if !heartbeat.is_zero() => {
                    if last_seen.elapsed() > heartbeat * 2 {
                        tracing::debug!("peer stopped answering pings");
                        break Some(CloseReason { code: CloseCode::Away, description: Some("heartbeat timeout".into()) });
                    }
                    if session.ping(b"").await.is_err() {
                        break None;
                    }
                }
                message = stream.recv() => {
                    last_seen = Instant::now();
                    let bytes = match message {
                        Some(Ok(AggregatedMessage::Text(text))) => {
                            if self.definition.echo && session.text(text.clone()).await.is_err() {
                                break None;
                            }
                            text.into_bytes()
                        }
                        Some(Ok(AggregatedMessage::Binary(bytes))) => {
                            if self.definition.echo && session.binary(bytes.clone()).await.is_err() {
                                break None;
                            }
                            bytes
                        }
                        Some(Ok(AggregatedMessage::Ping(payload))) => {
                            if session.pong(&payload).await.is_err() { break None; }
                            continue;
                        }
                        Some(Ok(AggregatedMessage::Pong(_))) => continue,
                        Some(Ok(AggregatedMessage::Close(reason))) => {
                            tracing::debug!(?reason, "peer closed");
                            break Some(CloseReason { code: CloseCode::Normal, description: None });
                        }
                        Some(Err(ProtocolError::Overflow)) => {
                            break Some(CloseReason { code: CloseCode::Size, description: Some(format!("message exceeds maxMessageBytes ({})", self.definition.max_message_bytes)) });
                        }
                        Some(Err(_)) if oversize.load(Ordering::Relaxed) => {
                            break Some(CloseReason { code: CloseCode::Size, description: Some(format!("message exceeds maxMessageBytes ({})", self.definition.max_message_bytes)) });
                        }
                        Some(Err(error)) if is_invalid_utf8(&error) => {
                            break Some(CloseReason { code: CloseCode::Invalid, description: Some("text message is not valid UTF-8".into()) });
                        }
                        Some(Err(error)) => {
                            tracing::debug!(error = %error, "protocol error");
                            break Some(CloseReason { code: CloseCode::Protocol, description: Some(error.to_string()) });
                        }
                        None => break None,
                    };
                    // Boxed: the per-message state machine (envelope, routing) then lives on the
                    // heap only while a message is in flight, which keeps idle connections small.
                    match Box::pin(self.handle_message(&connection, &mut auth, bytes)).await {
                        Ok(()) => {}
                        Err(IngestError::Rejected { rejection, close }) => {
                            self.send_error(&mut session, &rejection).await;
                            if close {
                                tracing::info!(code = rejection.code.as_str(), "closing connection after repeated failures");
                                break Some(CloseReason { code: CloseCode::Policy, description: Some(format!("too many rejected messages ({})", rejection.code.as_str())) });
                            }
                        }
                    }
                }
            }
        };
        let _ = session.close(close).await;
        counters.connections.dec();
    }

    async fn handle_message(
        &self,
        connection: &Connection,
        auth: &mut ConnectionAuth,
        bytes: bytes::Bytes,
    ) -> Result<(), IngestError> {
        let mut envelope = connection.envelope(&self.context, bytes.len());
        match Pipeline::decode(self.context.content_type, bytes) {
            Ok(payload) => {
                envelope.payload = payload;
                self.pipeline.ingest(&self.context, auth, envelope).await
            }
            Err(rejection) => Err(self
                .pipeline
                .reject_undecodable(&self.context, auth, &envelope, rejection)
                .await),
        }
    }

    async fn send_error(&self, session: &mut Session, rejection: &Rejection) {
        if self.context.content_type != ContentType::Binary {
            let _ = session.text(rejection.to_frame()).await;
        }
    }
}

/// True for the codec's complaint about a text message that is not UTF-8 (RFC 6455 asks for
/// close code 1007 there). actix-ws reports it as an I/O error carrying the UTF-8 error, so
/// the error chain is searched for it.
fn is_invalid_utf8(error: &ProtocolError) -> bool {
    // io::Error::source() skips the error it wraps, so look inside it directly.
    if let ProtocolError::Io(io) = error {
        if io.get_ref().is_some_and(|inner| {
            inner.is::<std::str::Utf8Error>() || inner.is::<std::string::FromUtf8Error>()
        }) {
            return true;
        }
    }
    // actix-ws words truncated sequences as "incomplete utf-8 byte sequence".
    error.to_string().contains("utf-8")
}

/// One device connection's fixed facts.
pub(crate) struct Connection {
    pub id: u64,
    pub peer: Option<std::net::SocketAddr>,
    pub metadata: Arc<ConnectionMetadata>,
}

impl Connection {
    /// A new envelope for a message of `size` bytes; the payload is filled in after decoding.
    pub fn envelope(&self, context: &ListenerContext, size: usize) -> Envelope {
        let received_at = time::OffsetDateTime::now_utc();
        Envelope {
            id: new_envelope_id(received_at),
            listener_key: context.key.clone(),
            connection_id: self.id,
            source_address: self.peer,
            received_at,
            received_instant: Instant::now(),
            content_type: context.content_type,
            size,
            payload: Payload::Binary(bytes::Bytes::new()),
            device_id: None,
            device_type: None,
            authenticated: false,
            metadata: self.metadata.clone(),
        }
    }
}

/// Marks a listener as running at `url`.
pub fn mark_running(status: &ListenerStatus, url: String) {
    status.set_url(url);
    status.set(ListenerState::Running, None);
}
