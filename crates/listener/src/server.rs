//! Server-mode listeners: the upgrade checks and the per-connection task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, FromRequest as _, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError, Session};
use iotgate_core::compression_settings::EffectiveCompressionSettings;
use iotgate_core::definition::{ListenerDefinition, ListenerProtocol};
use iotgate_core::envelope::ConnectionMetadata;
use iotgate_core::websocket_settings::EffectiveWebSocketSettings;
use iotgate_core::ContentType;
use iotgate_pipeline::{
    ConnectionAuth, ConnectionCredentials, ConnectionPresence, ListenerContext, Pipeline,
    Rejection, RejectionCode, SessionCloser,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::acks::{answer_ready, drain_step, next_outcome, AckTracker, DRAIN_LIMIT};
use crate::basic_auth::{BasicCredentialVerifier, BasicOutcome};
use crate::connection::{handle_frame, Connection};
use crate::limits::{ConnectionLimits, ConnectionPermit, Refusal};
use crate::status::{ListenerState, ListenerStatus};
use crate::timers::{authentication_limit, ConnectionTimers, Due};
use crate::webpubsub::protocol::Dialect;
use crate::webpubsub::session::{ResumeRefusal, Session as WebPubSubSession};
use crate::webpubsub::Attach;

/// Process-wide connection ids, shared by server and client listeners.
pub static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

/// A running server-mode listener. Requests reach it through the main port's path table or its
/// own HTTP server; both call [`ServerListener::handle_upgrade`].
pub struct ServerListener {
    pub definition: ListenerDefinition,
    pub context: ListenerContext,
    pub status: Arc<ListenerStatus>,
    /// The definition's `websocket` settings with defaults and shorthands applied, resolved once.
    pub(crate) websocket: EffectiveWebSocketSettings,
    /// permessage-deflate limits, resolved once; `None` when the listener does not compress.
    compression: Option<EffectiveCompressionSettings>,
    basic: Option<BasicCredentialVerifier>,
    pub(crate) pipeline: Arc<Pipeline>,
    /// The bus to other nodes (`--bus-url`): Web PubSub group messages reach members there too.
    pub(crate) bus: Option<iotgate_pipeline::bus::LiveBus>,
    /// Web PubSub listeners: connections that dropped and may be resumed.
    pub(crate) webpubsub_sessions: Arc<crate::webpubsub::session::SessionStore>,
    /// Process-wide admission (connection caps, connect rate), shared by every listener.
    limits: Arc<ConnectionLimits>,
    /// The allowed origins, parsed once (empty: any origin).
    origins: Vec<iotgate_core::origin::OriginPattern>,
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
    // Each part is a separate shared service the supervisor owns; a builder would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        definition: ListenerDefinition,
        context: ListenerContext,
        status: Arc<ListenerStatus>,
        basic: Option<BasicCredentialVerifier>,
        pipeline: Arc<Pipeline>,
        bus: Option<iotgate_pipeline::bus::LiveBus>,
        limits: Arc<ConnectionLimits>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            origins: definition.origin_patterns(),
            websocket: definition.websocket_settings(),
            compression: definition.compression_settings(),
            definition,
            context,
            status,
            basic,
            pipeline,
            bus,
            webpubsub_sessions: Arc::default(),
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
        // The client's address (behind a trusted proxy, the one it names): what every
        // per-address limit, the envelopes and the audit see.
        let client = crate::client_address::client_info(&request).address;
        // Admission before anything else: a connect flood costs a map lookup, not a handshake.
        let permit = match self.limits.admit(client.map(|a| a.ip())) {
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
        if !self.origins.is_empty() {
            let origin = request
                .headers()
                .get(header::ORIGIN)
                .and_then(|v| v.to_str().ok());
            if !origin.is_some_and(|o| iotgate_core::origin::origin_allowed(&self.origins, o)) {
                metrics.upgrade_rejected(key, "origin");
                // The answer names no allowed origin: that list is the operator's business.
                return error_response(
                    HttpResponse::Forbidden(),
                    "origin_forbidden",
                    "the Origin header is not allowed for this listener",
                );
            }
        }
        if let Some(basic) = &self.basic {
            let authorization = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let outcome = basic
                .verify_header(authorization, client.map(|a| a.ip()))
                .await;
            if let BasicOutcome::Throttled(retry_after) = outcome {
                metrics.upgrade_rejected(key, "credentials_throttled");
                let mut response = error_response(
                    HttpResponse::TooManyRequests(),
                    "too_many_failures",
                    "too many credentials from this address needed checking; slow down",
                );
                if let Ok(value) = HeaderValue::from_str(&retry_after.to_string()) {
                    response.headers_mut().insert(header::RETRY_AFTER, value);
                }
                return response;
            }
            if outcome != BasicOutcome::Accepted {
                metrics.upgrade_rejected(key, "credentials");
                self.pipeline.auth_failures.note(
                    &self.context.key,
                    None,
                    client.map(|a| a.ip()),
                    "basic_credentials",
                );
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
        if let Err(rejection) = &auth {
            if iotgate_pipeline::auth_failures::is_authentication_failure(rejection.code) {
                self.pipeline.auth_failures.note(
                    &self.context.key,
                    rejection.claimed_device_id.as_deref(),
                    client.map(|a| a.ip()),
                    rejection.code.as_str(),
                );
            }
            // A connection token is refused before the upgrade: the client reads the reason
            // from the HTTP answer, as Azure Web PubSub clients expect, and no socket is opened.
            if self.pipeline.refuses_before_upgrade(&self.context) {
                metrics.upgrade_rejected(key, rejection.code.as_str());
                tracing::info!(
                    code = rejection.code.as_str(),
                    "connection token refused before the upgrade"
                );
                let builder = if rejection.code == RejectionCode::SentinelUnavailable {
                    HttpResponse::ServiceUnavailable()
                } else {
                    HttpResponse::Unauthorized()
                };
                let mut response =
                    error_response(builder, rejection.code.as_str(), &rejection.message);
                if rejection.code != RejectionCode::SentinelUnavailable {
                    response.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"iotgate\""),
                    );
                }
                return response;
            }
        }

        // Web PubSub: the connection must be identified now (a 401 before the upgrade, as the
        // service answers), and a resume must find its session.
        let webpubsub = if self.definition.protocol == ListenerProtocol::Webpubsub {
            match self.prepare_webpubsub(&request, &auth, &offered).await {
                Ok(plan) => Some(plan),
                Err(response) => return response,
            }
        } else {
            None
        };

        // The frame guard enforces the frame and message caps from frame headers, before any
        // buffering.
        let verdict = Arc::new(crate::frame_guard::GuardVerdict::default());
        // permessage-deflate, when the listener allows it and the client offers something it can
        // honour: compressed messages are inflated ahead of the guard, so its caps and UTF-8
        // check apply to the inflated bytes.
        let deflate = self.compression.as_ref().and_then(|settings| {
            let offers = request
                .headers()
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .filter_map(|value| value.to_str().ok());
            crate::deflate::negotiate(offers, settings)
        });
        let mut payload = body.into_inner();
        if let Some(agreement) = &deflate {
            payload = crate::deflate::inflate::inflating_payload(
                payload,
                agreement,
                self.websocket.max_frame_bytes,
                self.websocket.max_message_bytes,
                verdict.clone(),
            );
        }
        let mut guarded = crate::frame_guard::guard_payload(
            payload,
            self.websocket.max_frame_bytes,
            self.websocket.max_message_bytes,
            verdict.clone(),
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
        if let Some(agreement) = &deflate {
            response = crate::deflate::deflate_body::deflating_response(response, agreement);
            if let Ok(value) = HeaderValue::from_str(&agreement.response) {
                response
                    .headers_mut()
                    .insert(header::SEC_WEBSOCKET_EXTENSIONS, value);
            }
        }
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
        // ArkFlow's name for where a message came from: the client's address (behind a
        // trusted proxy, the address the proxy vouches for).
        if let Some(client) = client {
            metadata
                .0
                .insert("__meta_source".into(), client.to_string());
        }
        if let Some(plan) = webpubsub {
            return self.start_webpubsub(
                plan, response, session, stream, auth, permit, verdict, client, metadata,
            );
        }
        let connection = Connection {
            id: CONNECTION_IDS.fetch_add(1, Ordering::Relaxed),
            peer: client,
            metadata: Arc::new(metadata),
        };
        let span = connection_span(&self.definition.key, &connection);
        match auth {
            Ok(auth) => {
                let stream = self.message_stream(stream);
                actix_web::rt::spawn(
                    self.clone()
                        .run_connection(connection, session, stream, auth, permit, verdict)
                        .instrument(span),
                );
            }
            Err(rejection) => {
                actix_web::rt::spawn(
                    self.clone()
                        .refuse_connection(session, rejection, permit)
                        .instrument(span),
                );
            }
        }
        response
    }

    /// A connection whose credentials were refused at connect: told why, then closed.
    async fn refuse_connection(
        self: Arc<Self>,
        mut session: Session,
        rejection: Rejection,
        _permit: ConnectionPermit,
    ) {
        let counters = &self.context.counters;
        counters.connections.inc();
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
    }

    /// Serves one connection until it closes.
    ///
    /// Its future lives as long as the connection, so its size is memory held by every idle
    /// connection. Hence a plain fn returning an `async move` block (an `async fn` keeps a second
    /// copy of every argument), and the awaits that happen once per connection (the close here,
    /// the presence events inside `ConnectionPresence`) are boxed: the future is as large as its
    /// largest await, and those were the largest.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep a second copy of every argument in the future"
    )]
    fn run_connection(
        self: Arc<Self>,
        connection: Connection,
        mut session: Session,
        mut stream: actix_ws::AggregatedMessageStream,
        mut auth: ConnectionAuth,
        permit: ConnectionPermit,
        verdict: Arc<crate::frame_guard::GuardVerdict>,
    ) -> impl std::future::Future<Output = ()> {
        async move {
            let counters = &self.context.counters;
            counters.connections.inc();
            if let Some(binding) = &auth.binding {
                tracing::Span::current()
                    .record("device", tracing::field::display(&binding.device_id));
                tracing::debug!(device = %binding.device_id, "connection bound to device");
            }
            // A registry change (device disabled or deleted, its key rotated) or a disabled
            // sentinel closes this connection at once.
            let closer = SessionCloser::new();
            self.context.live.register(&closer);
            self.pipeline.watch_connection(&mut auth, closer.clone());
            // Addressable from now on: messages to the device, its groups or the listener arrive
            // on `downlinks` and are written between reads.
            let (registration, mut downlinks) = self.pipeline.connections.register(
                connection.id,
                self.context.key.clone(),
                auth.device.clone(),
                connection.peer,
            );
            // Device presence: `$connected` once the connection speaks for a device (now, with
            // credentials given at connect), `$disconnected` when it ends.
            let authenticates = self.context.sentinel.is_some();
            let mut presence = ConnectionPresence::new(self.context.key.clone(), connection.peer);
            if let Some(device) = &auth.device {
                presence
                    .bind(&self.pipeline, &registration, device, authenticates)
                    .await;
            }
            // The peer's own close frame, for the `$disconnected` event.
            let mut peer_close: Option<CloseReason> = None;

            let websocket = &self.websocket;
            let ping_payload = websocket.ping_payload();
            let mut peer_closed = false;
            // Pings and their answers, the idle timeout, the deadline to authenticate a message
            // (behind a sentinel) and the token's expiry (a connection opened with a token ends
            // with it), all on one timer.
            let mut timers = ConnectionTimers::new(
                websocket,
                authentication_limit(&self.definition, self.context.sentinel.is_some()),
                token_time_left(&auth),
            );
            let timer = timers.sleep();
            tokio::pin!(timer);
            let (mut acks, mut late_answers) = match AckTracker::new(
                &self.definition,
                counters.clone(),
                self.pipeline.metrics.clone(),
            ) {
                // Boxed: most listeners do not acknowledge, and their connections then hold 8 bytes.
                Some((tracker, receiver)) => (Some(Box::new(tracker)), Some(receiver)),
                None => (None, None),
            };

            let close: Option<CloseReason> = loop {
                let awaiting = acks.as_deref().is_some_and(AckTracker::awaits_answers);
                // With maxInFlight messages unanswered, the socket is not read: TCP pushes back.
                let may_read = acks.as_deref().is_none_or(AckTracker::can_read);
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => {
                        // Every message in flight is answered before the connection closes.
                        if let Some(tracker) = acks.as_deref_mut() {
                            let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
                            let mut peer_gone = false;
                            while let Some(frames) = drain_step(tracker, &mut late_answers, deadline).await {
                                if send_frames(&mut session, frames).await.is_err() {
                                    peer_gone = true;
                                    break;
                                }
                            }
                            if peer_gone {
                                break None;
                            }
                        }
                        break Some(CloseReason { code: CloseCode::Away, description: Some("listener stopped or reconfigured".into()) });
                    }
                    cause = closer.closed() => {
                        tracing::info!(reason = cause.as_str(), "closing the connection after a registry change");
                        break Some(CloseReason { code: CloseCode::Policy, description: Some(cause.as_str().into()) });
                    }
                    Some(outcome) = next_outcome(&mut late_answers), if awaiting => {
                        let frames = answer_ready(acks.as_deref_mut(), &mut late_answers, outcome);
                        if send_frames(&mut session, frames).await.is_err() {
                            break None;
                        }
                    }
                    due = timers.next(timer.as_mut(), auth.authenticated) => match due {
                        Due::TokenExpired => {
                            tracing::info!("the connection token expired");
                            break Some(CloseReason { code: CloseCode::Policy, description: Some(RejectionCode::TokenExpired.as_str().into()) });
                        }
                        Due::Unauthenticated { within } => {
                            tracing::info!("no authenticated message within the deadline");
                            break Some(CloseReason { code: CloseCode::Policy, description: Some(format!("no authenticated message within {} s", within.as_secs())) });
                        }
                        Due::PingUnanswered => {
                            tracing::debug!(timeout = ?websocket.auto_ping_timeout, "peer did not answer a ping in time");
                            break Some(CloseReason { code: CloseCode::Away, description: Some("heartbeat timeout".into()) });
                        }
                        Due::Idle => {
                            tracing::debug!(timeout = ?websocket.idle_timeout, "no data frame within the idle timeout");
                            break Some(CloseReason { code: CloseCode::Normal, description: Some("idle timeout".into()) });
                        }
                        Due::Ping => {
                            if session.ping(&ping_payload).await.is_err() {
                                break None;
                            }
                        }
                    },
                    Some(downlink) = downlinks.recv() => {
                        if send_downlink(&mut session, &downlink, self.context.content_type).await.is_err() {
                            break None;
                        }
                    }
                    message = stream.recv(), if may_read => {
                        timers.frame_received();
                        if matches!(message, Some(Ok(AggregatedMessage::Text(_) | AggregatedMessage::Binary(_)))) {
                            timers.data_received();
                        }
                        let (bytes, text_frame) = match message {
                            Some(Ok(AggregatedMessage::Text(text))) => {
                                if self.definition.echo && session.text(text.clone()).await.is_err() {
                                    break None;
                                }
                                (text.into_bytes(), true)
                            }
                            Some(Ok(AggregatedMessage::Binary(bytes))) => {
                                if self.definition.echo && session.binary(bytes.clone()).await.is_err() {
                                    break None;
                                }
                                (bytes, false)
                            }
                            Some(Ok(AggregatedMessage::Ping(payload))) => {
                                self.note_activity(&auth);
                                if session.pong(&payload).await.is_err() { break None; }
                                continue;
                            }
                            Some(Ok(AggregatedMessage::Pong(_))) => {
                                self.note_activity(&auth);
                                continue;
                            }
                            Some(Ok(AggregatedMessage::Close(reason))) => {
                                tracing::debug!(?reason, "peer closed");
                                peer_close = reason;
                                peer_closed = true;
                                break Some(CloseReason { code: CloseCode::Normal, description: None });
                            }
                            Some(Err(ProtocolError::Overflow)) => {
                                break Some(CloseReason { code: CloseCode::Size, description: Some(websocket.oversize_reason()) });
                            }
                            Some(Err(_)) if verdict.get().is_some() => {
                                let violation = verdict.get().expect("checked in the guard");
                                break Some(violation.close_reason(|| websocket.oversize_reason()));
                            }
                            Some(Err(error)) if is_invalid_utf8(&error) => {
                                break Some(CloseReason { code: CloseCode::Invalid, description: Some("text message is not valid UTF-8".into()) });
                            }
                            Some(Err(error)) => {
                                tracing::debug!(error = %error, "protocol error");
                                break Some(CloseReason { code: CloseCode::Protocol, description: Some(crate::connection::close_reason_text(&error.to_string())) });
                            }
                            None => break None,
                        };
                        // Boxed: the per-message state machine (envelope, routing) then lives on the
                        // heap only while a message is in flight, which keeps idle connections small.
                        let reply = Box::pin(handle_frame(&self.pipeline, &self.context, &connection, &mut auth, acks.as_deref_mut(), bytes, text_frame)).await;
                        if let Some(device) = &auth.device {
                            presence.bind(&self.pipeline, &registration, device, authenticates).await;
                        }
                        if send_frames(&mut session, reply.frames).await.is_err() {
                            break None;
                        }
                        if let Some(rejection) = reply.close {
                            tracing::info!(code = rejection.code.as_str(), "closing connection after repeated failures");
                            break Some(CloseReason { code: CloseCode::Policy, description: Some(format!("too many rejected messages ({})", rejection.code.as_str())) });
                        }
                    }
                }
            };
            // What the `$disconnected` event says: the peer's close frame when it sent one, else
            // ours; neither when the connection was lost.
            let (close_code, close_reason) = match peer_close.as_ref().or(close.as_ref()) {
                Some(reason) => (Some(u16::from(reason.code)), reason.description.clone()),
                None => (None, Some("the connection was lost".to_owned())),
            };
            Box::pin(end_connection(
                session,
                &mut stream,
                close,
                peer_closed,
                websocket,
            ))
            .await;
            counters.connections.dec();
            presence
                .end(&self.pipeline, &registration, close_code, close_reason)
                .await;
            // The connection's place under the listener's caps is held until here (named, so the
            // block captures it).
            drop(permit);
        }
    }

    /// A ping or pong from a device counts as contact (not as a message).
    fn note_activity(&self, auth: &ConnectionAuth) {
        if let Some(device) = auth
            .device
            .as_deref()
            .and_then(|d| self.pipeline.registry.get(d))
        {
            let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000;
            device.note_activity(now as i64);
        }
    }

    /// The connection's messages, with the listener's frame and message caps applied.
    fn message_stream(&self, stream: actix_ws::MessageStream) -> actix_ws::AggregatedMessageStream {
        stream
            .max_frame_size(self.websocket.max_frame_bytes)
            .aggregate_continuations()
            .max_continuation_size(self.websocket.max_message_bytes)
    }

    /// The Web PubSub checks before the upgrade: credentials that name a device, and for a
    /// resume (`awps_connection_id`, `awps_reconnection_token`) the session to take back.
    async fn prepare_webpubsub(
        &self,
        request: &HttpRequest,
        auth: &Result<ConnectionAuth, Rejection>,
        offered: &[String],
    ) -> Result<WebPubSubPlan, HttpResponse> {
        let metrics = &self.pipeline.metrics;
        let key = &self.definition.key;
        let device = match auth {
            Err(rejection) => {
                metrics.upgrade_rejected(key, rejection.code.as_str());
                return Err(error_response(
                    HttpResponse::Unauthorized(),
                    rejection.code.as_str(),
                    &rejection.message,
                ));
            }
            Ok(auth) => match &auth.device {
                Some(device) => device.clone(),
                None => {
                    metrics.upgrade_rejected(key, "missing_credentials");
                    return Err(error_response(
                        HttpResponse::Unauthorized(),
                        "missing_credentials",
                        "a Web PubSub listener identifies the device at connect: give a connection token (access_token or Authorization: Bearer) or the sentinel's query or header credentials",
                    ));
                }
            },
        };
        let dialect = Dialect::negotiate(offered.iter().map(String::as_str));
        let query: Vec<(String, String)> =
            url::form_urlencoded::parse(request.query_string().as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        let find = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let resume = match (find("awps_connection_id"), find("awps_reconnection_token")) {
            (Some(id), Some(token)) if dialect.is_reliable() => {
                let not_found = || {
                    metrics.upgrade_rejected(key, "connection_not_found");
                    error_response(
                        HttpResponse::NotFound(),
                        "connection_not_found",
                        "no resumable connection with this id and token (it ended, or its resume window passed)",
                    )
                };
                let id: u64 = id.parse().map_err(|_| not_found())?;
                match self.webpubsub_sessions.resume(id, &token, &device).await {
                    Ok(resumed) => Some(resumed),
                    Err(ResumeRefusal::NotFound) => return Err(not_found()),
                    Err(ResumeRefusal::OtherUser) => {
                        metrics.upgrade_rejected(key, "connection_of_another_device");
                        return Err(error_response(
                            HttpResponse::Forbidden(),
                            "connection_of_another_device",
                            "the connection to resume belongs to another device",
                        ));
                    }
                }
            }
            _ => None,
        };
        Ok(WebPubSubPlan {
            device,
            dialect,
            resume,
        })
    }

    /// Starts serving an accepted Web PubSub upgrade: a new session, or the resumed one.
    #[allow(clippy::too_many_arguments)]
    fn start_webpubsub(
        self: Arc<Self>,
        plan: WebPubSubPlan,
        mut response: HttpResponse,
        session: Session,
        stream: actix_ws::MessageStream,
        auth: Result<ConnectionAuth, Rejection>,
        permit: ConnectionPermit,
        verdict: Arc<crate::frame_guard::GuardVerdict>,
        client: Option<std::net::SocketAddr>,
        mut metadata: ConnectionMetadata,
    ) -> HttpResponse {
        let Ok(auth) = auth else {
            unreachable!("prepare_webpubsub refused connections without credentials");
        };
        if let Some(protocol) = plan.dialect.sub_protocol() {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
            metadata.0.insert("subProtocol".into(), protocol.into());
        }
        let attach = match plan.resume {
            Some((resumed, takeover)) => Attach {
                session: resumed,
                takeover,
                resumed: true,
            },
            None => {
                let id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed);
                let (registration, downlinks) = self.pipeline.connections.register(
                    id,
                    self.context.key.clone(),
                    Some(plan.device.clone()),
                    client,
                );
                let takeover = self.webpubsub_sessions.attach_new(id);
                // The token's `webpubsub.group` claim: groups joined at connect.
                let token_groups = auth.binding.as_ref().map(|b| b.groups.clone());
                for group in token_groups.iter().flat_map(|groups| groups.iter()) {
                    if crate::webpubsub::protocol::valid_group_name(group) {
                        registration.join(group);
                    }
                }
                Attach {
                    session: WebPubSubSession::new(
                        registration,
                        downlinks,
                        plan.device.clone(),
                        plan.dialect,
                    ),
                    takeover,
                    resumed: false,
                }
            }
        };
        let connection = Connection {
            id: attach.session.connection_id(),
            peer: client,
            metadata: Arc::new(metadata),
        };
        let stream = self.message_stream(stream);
        let span = connection_span(&self.definition.key, &connection);
        span.record("device", tracing::field::display(&plan.device));
        actix_web::rt::spawn(
            crate::webpubsub::serve(
                self.clone(),
                connection,
                session,
                stream,
                auth,
                attach,
                permit,
                verdict,
            )
            .instrument(span),
        );
        response
    }

    async fn send_error(&self, session: &mut Session, rejection: &Rejection) {
        if !matches!(
            self.context.content_type,
            ContentType::Binary | ContentType::Msgpack
        ) {
            let _ = session.text(rejection.to_frame(None)).await;
        }
    }
}

/// The tracing span of one connection; `device` is recorded once known.
fn connection_span(listener: &str, connection: &Connection) -> tracing::Span {
    tracing::info_span!(
        "connection",
        listener = %listener,
        connection = connection.id,
        peer = ?connection.peer,
        device = tracing::field::Empty,
    )
}

/// What the Web PubSub checks found before the upgrade.
struct WebPubSubPlan {
    device: Arc<str>,
    dialect: Dialect,
    resume: Option<(WebPubSubSession, Arc<tokio::sync::Notify>)>,
}

/// Ends a connection. A protocol violation (1002, 1007, 1009) with `failByDrop` sends no close
/// frame: the session is dropped, actix ends the upgraded response and TCP closes. Otherwise
/// the close frame goes out; when iotgate closed first and `closeHandshakeTimeoutMs` is set,
/// TCP stays open until the peer's close frame arrives or that time passes. `close` is `None`
/// when the peer is already gone.
async fn end_connection(
    session: Session,
    stream: &mut actix_ws::AggregatedMessageStream,
    close: Option<CloseReason>,
    peer_closed: bool,
    websocket: &EffectiveWebSocketSettings,
) {
    let Some(reason) = close else {
        let _ = session.close(None).await;
        return;
    };
    let violation = matches!(
        reason.code,
        CloseCode::Protocol | CloseCode::Invalid | CloseCode::Size
    );
    if violation && websocket.fail_by_drop {
        tracing::debug!(code = u16::from(reason.code), reason = ?reason.description, "failing the connection by dropping it");
        drop(session);
        return;
    }
    if peer_closed || websocket.close_handshake_timeout.is_zero() {
        let _ = session.close(Some(reason)).await;
        return;
    }
    // `close` consumes its handle and ends the response stream once every handle is gone; a
    // second handle keeps TCP open while the peer's close frame is awaited.
    let hold_open = session.clone();
    if session.close(Some(reason)).await.is_ok() {
        let answered = tokio::time::timeout(websocket.close_handshake_timeout, async {
            while let Some(message) = stream.recv().await {
                if matches!(message, Ok(AggregatedMessage::Close(_)) | Err(_)) {
                    return;
                }
            }
        })
        .await;
        if answered.is_err() {
            tracing::debug!(timeout = ?websocket.close_handshake_timeout, "the peer did not answer the close frame in time; dropping the connection");
        }
    }
    drop(hold_open);
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

/// How long the connection's token is valid for, on connections opened with a connection token
/// (they end when it expires); `None` for every other credential.
pub(crate) fn token_time_left(auth: &ConnectionAuth) -> Option<Duration> {
    let at = auth
        .binding
        .as_ref()
        .filter(|b| b.closes_at_expiry)
        .and_then(|b| b.expires_at)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Some(Duration::from_secs(at).saturating_sub(now))
}

/// Writes one message to a device as the listener's plain frame.
pub(crate) async fn send_downlink(
    session: &mut Session,
    downlink: &iotgate_pipeline::Downlink,
    content_type: ContentType,
) -> Result<(), actix_ws::Closed> {
    match downlink.plain_frame(content_type) {
        iotgate_pipeline::PlainFrame::Text(text) => session.text(text).await,
        iotgate_pipeline::PlainFrame::Binary(bytes) => session.binary(bytes).await,
    }
}

/// Sends text frames in order.
async fn send_frames(session: &mut Session, frames: Vec<String>) -> Result<(), actix_ws::Closed> {
    for frame in frames {
        session.text(frame).await?;
    }
    Ok(())
}

/// Marks a listener as running at `url`.
pub fn mark_running(status: &ListenerStatus, url: String) {
    status.set_url(url);
    status.set(ListenerState::Running, None);
}
