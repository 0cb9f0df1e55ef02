//! Listeners that speak the Azure Web PubSub client protocol (`protocol: "webpubsub"`), so the
//! unmodified `@azure/web-pubsub-client` SDK, or any WebSocket client that writes its frames,
//! can use iotgate as its service.
//!
//! A connection is identified at the upgrade (a connection token's `sub`, or other connect-time
//! credentials) and greeted with `system/connected`. Its `event` frames enter the pipeline as
//! telemetry whose message type is the event name; `joinGroup`, `leaveGroup` and `sendToGroup`
//! act on the connection hub's groups, checked against the token's roles; each request with an
//! `ackId` is answered with an `ack`. Messages to the connection (from the REST API, a route, a
//! group) arrive through its hub queue and are written as `message` frames. On the reliable
//! sub-protocol each such frame carries a `sequenceId`, and a connection that drops is kept
//! (see [`session`]) so the client can resume it without losing a message.

pub mod protocol;
pub mod session;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use iotgate_core::{ContentType, MessageId, Payload};
use iotgate_pipeline::{
    AckOutcome, AckRequest, AckResult, ConnectionAuth, DownlinkBody, IngestError, Ingested,
    Rejection, SessionCloser,
};
use tokio::sync::{mpsc, Notify};

use crate::connection::Connection;
use crate::limits::ConnectionPermit;
use crate::server::ServerListener;
use iotgate_pipeline::token::{permits, GroupAction};
use protocol::{AckError, ClientFrame, Dialect};
use session::Session;

/// How a socket got its session.
pub(crate) struct Attach {
    pub session: Session,
    /// Fires when a resume of this session arrives on another socket.
    pub takeover: Arc<Notify>,
    /// True when the session existed before this socket (a resume).
    pub resumed: bool,
}

/// How the socket's service ended.
enum End {
    /// The socket dropped without a closing handshake: a reliable session waits to be resumed.
    Dropped,
    /// A resume took the session to another socket.
    TakenOver,
    /// The connection is over: tell the client why (when it speaks the protocol) and close.
    Closed {
        reason: Option<CloseReason>,
        tell: Option<String>,
    },
}

/// Ends the connection with `code`; the client is told `description` in full in
/// `system/disconnected`, and the close frame carries as much of it as fits (123 bytes).
fn closed(code: CloseCode, description: impl Into<String>) -> End {
    let description = description.into();
    let reason = crate::connection::close_reason_text(&description);
    End::Closed {
        tell: Some(description),
        reason: Some(CloseReason {
            code,
            description: Some(reason),
        }),
    }
}

/// Serves one Web PubSub socket until it ends, then parks or ends its session.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    listener: Arc<ServerListener>,
    connection: Connection,
    mut socket: actix_ws::Session,
    mut stream: actix_ws::AggregatedMessageStream,
    mut auth: ConnectionAuth,
    attach: Attach,
    _permit: ConnectionPermit,
    verdict: Arc<crate::frame_guard::GuardVerdict>,
) {
    let Attach {
        mut session,
        takeover,
        resumed,
    } = attach;
    let definition = &listener.definition;
    let context = &listener.context;
    let pipeline = &listener.pipeline;
    let counters = &context.counters;
    counters.connections.inc();

    let closer = SessionCloser::new();
    context.live.register(&closer);
    pipeline.watch_connection(&mut auth, closer.clone());

    let dialect = session.dialect;
    let mut greeting = Vec::new();
    if dialect != Dialect::Simple {
        greeting.push(protocol::connected(
            &session.user_id,
            &session.connection_id().to_string(),
            dialect
                .is_reliable()
                .then_some(session.reconnection_token.as_str()),
        ));
    }
    if resumed {
        greeting.extend(session.unacknowledged().map(str::to_owned));
    }
    let mut end = None;
    for frame in greeting {
        if socket.text(frame).await.is_err() {
            end = Some(End::Dropped);
            break;
        }
    }
    // `$connected` after the greeting, so the client does not wait on the announcement.
    if !resumed {
        let presence =
            iotgate_pipeline::ConnectionPresence::new(context.key.clone(), connection.peer);
        session.announce(pipeline, presence).await;
    }

    let heartbeat = listener.websocket.auto_ping_interval;
    let mut ticker = tokio::time::interval(if heartbeat.is_zero() {
        Duration::from_secs(3600)
    } else {
        heartbeat
    });
    ticker.tick().await;
    let mut last_seen = Instant::now();
    // A connection opened with a token ends when the token expires (no resume after that).
    let token_expiry = crate::server::token_time_left(&auth);
    let token_expired =
        tokio::time::sleep(token_expiry.unwrap_or(Duration::from_secs(86_400 * 366)));
    tokio::pin!(token_expired);
    // Answers of events waiting for durable downstreams (acknowledge: stored), by ack id.
    let (outcomes, mut late_answers) = mpsc::unbounded_channel::<AckOutcome>();
    let mut waiting: HashSet<u64> = HashSet::new();
    let max_in_flight = definition.max_in_flight() as usize;
    let ack_mode = match definition.acknowledge {
        iotgate_core::definition::AcknowledgeMode::Stored => {
            iotgate_core::definition::AcknowledgeMode::Stored
        }
        // A Web PubSub ack means at least "the service has it".
        _ => iotgate_core::definition::AcknowledgeMode::Accepted,
    };
    let request = AckRequest {
        mode: ack_mode,
        outcomes,
    };

    let end = match end {
        Some(end) => end,
        None => loop {
            tokio::select! {
                biased;
                _ = listener.shutdown_token().cancelled() => {
                    break closed(CloseCode::Away, "listener stopped or reconfigured");
                }
                cause = closer.closed() => {
                    break closed(CloseCode::Policy, cause.as_str());
                }
                _ = takeover.notified() => break End::TakenOver,
                _ = &mut token_expired, if token_expiry.is_some() => {
                    tracing::info!("the connection token expired");
                    break closed(CloseCode::Policy, iotgate_pipeline::RejectionCode::TokenExpired.as_str());
                }
                Some(outcome) = late_answers.recv() => {
                    let MessageId::Frame(ack_id) = outcome.message_id else { continue };
                    waiting.remove(&ack_id);
                    let frame = ack_frame(&mut session, ack_id, Ok(Ingested::Answered(outcome.result)));
                    if let Some(frame) = frame {
                        if socket.text(frame).await.is_err() {
                            break End::Dropped;
                        }
                    }
                }
                Some(downlink) = session.downlinks.recv(), if session.can_take_message() => {
                    let sent = match dialect {
                        Dialect::Simple => {
                            crate::server::send_downlink(&mut socket, &downlink, ContentType::Json).await
                        }
                        Dialect::Json => socket.text(protocol::message(&downlink, None)).await,
                        Dialect::ReliableJson => {
                            let frame = session.sequence(|id| protocol::message(&downlink, Some(id)));
                            socket.text(frame).await
                        }
                    };
                    if sent.is_err() {
                        break End::Dropped;
                    }
                }
                _ = ticker.tick(), if !heartbeat.is_zero() => {
                    if last_seen.elapsed() > listener.websocket.auto_ping_timeout {
                        tracing::debug!("peer stopped answering pings");
                        break End::Dropped;
                    }
                    if socket.ping(&listener.websocket.ping_payload()).await.is_err() {
                        break End::Dropped;
                    }
                }
                message = stream.recv(), if waiting.len() < max_in_flight => {
                    last_seen = Instant::now();
                    // `ingest` and `handle` are boxed where they are awaited: their state (about
                    // 2.5 KB) then lives on the heap only while a message is in flight, and an
                    // idle connection's future stays small, as in the device loop.
                    let frames = match message {
                        Some(Ok(AggregatedMessage::Text(text))) => {
                            match dialect {
                                Dialect::Simple => {
                                    let payload = serde_json::from_str(&text)
                                        .map(Payload::Json)
                                        .unwrap_or_else(|_| Payload::Text(text.to_string()));
                                    let content_type = match payload {
                                        Payload::Json(_) => ContentType::Json,
                                        _ => ContentType::Text,
                                    };
                                    let result = Box::pin(ingest(&listener, &connection, &mut auth, "message", payload, content_type, text.len(), None, None)).await;
                                    if let Err(IngestError::Rejected { rejection, close: true }) = result {
                                        break rejected_close(&rejection);
                                    }
                                    Vec::new()
                                }
                                _ => match ClientFrame::parse(&text) {
                                    Ok(frame) => {
                                        match Box::pin(handle(&listener, &connection, &mut auth, &mut session, &request, &mut waiting, frame)).await {
                                            Ok(frames) => frames,
                                            Err(end) => break end,
                                        }
                                    }
                                    Err(error) => break closed(CloseCode::Unsupported, error.to_string()),
                                },
                            }
                        }
                        Some(Ok(AggregatedMessage::Binary(bytes))) => {
                            if dialect != Dialect::Simple {
                                break closed(CloseCode::Unsupported, "the JSON Web PubSub protocols take text frames only");
                            }
                            let size = bytes.len();
                            let result = Box::pin(ingest(&listener, &connection, &mut auth, "message", Payload::Binary(bytes), ContentType::Binary, size, None, None)).await;
                            if let Err(IngestError::Rejected { rejection, close: true }) = result {
                                break rejected_close(&rejection);
                            }
                            Vec::new()
                        }
                        Some(Ok(AggregatedMessage::Ping(payload))) => {
                            if socket.pong(&payload).await.is_err() { break End::Dropped; }
                            continue;
                        }
                        Some(Ok(AggregatedMessage::Pong(_))) => continue,
                        Some(Ok(AggregatedMessage::Close(reason))) => {
                            tracing::debug!(?reason, "peer closed");
                            break End::Closed { reason: Some(CloseReason { code: CloseCode::Normal, description: None }), tell: None };
                        }
                        Some(Err(ProtocolError::Overflow)) => {
                            break closed(CloseCode::Size, listener.websocket.oversize_reason());
                        }
                        Some(Err(_)) if verdict.get().is_some() => {
                            let violation = verdict.get().expect("checked in the guard");
                            let reason = violation.close_reason(|| listener.websocket.oversize_reason());
                            break closed(reason.code, reason.description.unwrap_or_default());
                        }
                        Some(Err(error)) => {
                            tracing::debug!(error = %error, "protocol error");
                            break End::Dropped;
                        }
                        None => break End::Dropped,
                    };
                    let mut gone = false;
                    for frame in frames {
                        if socket.text(frame).await.is_err() {
                            gone = true;
                            break;
                        }
                    }
                    if gone {
                        break End::Dropped;
                    }
                }
            }
        },
    };

    let store = &listener.webpubsub_sessions;
    let window = Duration::from_secs(u64::from(definition.resume_window_seconds));
    let expire = {
        let pipeline = listener.pipeline.clone();
        move |session: Session| async move {
            session
                .finish(
                    &pipeline,
                    None,
                    Some("the connection was lost and not resumed in time".to_owned()),
                )
                .await;
        }
    };
    match end {
        End::TakenOver => {
            tracing::debug!("connection resumed on another socket");
            store.detach(session, window, expire);
        }
        End::Dropped if dialect.is_reliable() && !window.is_zero() => {
            tracing::debug!(
                window_seconds = window.as_secs(),
                "socket dropped; session kept for resume"
            );
            store.detach(session, window, expire);
        }
        End::Dropped => {
            store.forget(session.connection_id());
            Box::pin(session.finish(pipeline, None, Some("the connection was lost".to_owned())))
                .await;
        }
        End::Closed { reason, tell } => {
            store.forget(session.connection_id());
            if let (Some(message), true) = (&tell, dialect != Dialect::Simple) {
                let _ = socket.text(protocol::disconnected(message)).await;
            }
            let code = reason.as_ref().map(|r| u16::from(r.code));
            let description = reason.as_ref().and_then(|r| r.description.clone());
            let _ = socket.close(reason).await;
            Box::pin(session.finish(pipeline, code, description)).await;
        }
    }
    counters.connections.dec();
}

fn rejected_close(rejection: &Rejection) -> End {
    tracing::info!(
        code = rejection.code.as_str(),
        "closing connection after repeated failures"
    );
    closed(
        CloseCode::Policy,
        format!("too many rejected messages ({})", rejection.code.as_str()),
    )
}

/// Takes one protocol frame; returns the frames to answer with, or how the connection ends.
async fn handle(
    listener: &Arc<ServerListener>,
    connection: &Connection,
    auth: &mut ConnectionAuth,
    session: &mut Session,
    request: &AckRequest,
    waiting: &mut HashSet<u64>,
    frame: ClientFrame,
) -> Result<Vec<String>, End> {
    let roles = granted_roles(auth);
    // What every request with an ack id and every group request share, checked once.
    let ack_id = frame.ack_id();
    if let Some(id) = ack_id.filter(|id| session.ack_ids.contains(*id)) {
        return Ok(vec![protocol::ack_error(
            id,
            AckError::Duplicate,
            "this ackId was answered before",
        )]);
    }
    if frame
        .group()
        .is_some_and(|g| !protocol::valid_group_name(g))
    {
        return Ok(answer(
            session,
            ack_id,
            Err((
                AckError::BadRequest,
                "the group name must have 1 to 1024 characters and not start with webpubsub."
                    .into(),
            )),
        ));
    }
    let joining = matches!(frame, ClientFrame::JoinGroup { .. });
    match frame {
        ClientFrame::Ping => Ok(vec![protocol::pong()]),
        ClientFrame::SequenceAck { sequence_id } => {
            session.acknowledge(sequence_id);
            Ok(Vec::new())
        }
        ClientFrame::JoinGroup { group, .. } | ClientFrame::LeaveGroup { group, .. } => {
            if !permits(&roles, GroupAction::JoinLeave, &group) {
                let verb = if joining { "join" } else { "leave" };
                return Ok(answer(
                    session,
                    ack_id,
                    Err((
                        AckError::Forbidden,
                        format!("the connection has no role to {verb} group {group}"),
                    )),
                ));
            }
            if joining {
                session.registration.join(&group);
            } else {
                session.registration.leave(&group);
            }
            Ok(answer(session, ack_id, Ok(())))
        }
        ClientFrame::SendToGroup {
            group,
            no_echo,
            data_type,
            data,
            ..
        } => {
            if !permits(&roles, GroupAction::Send, &group) {
                return Ok(answer(
                    session,
                    ack_id,
                    Err((
                        AckError::Forbidden,
                        format!("the connection has no role to send to group {group}"),
                    )),
                ));
            }
            let body = match protocol::decode_data(data_type, data) {
                Ok(body) => body,
                Err(message) => {
                    return Ok(answer(
                        session,
                        ack_id,
                        Err((AckError::BadRequest, message)),
                    ))
                }
            };
            if listener.definition.route_group_messages {
                let (payload, content_type, size) = payload_of(&body);
                let mut attributes = serde_json::Map::new();
                attributes.insert("group".into(), serde_json::Value::String(group.clone()));
                let result = ingest(
                    listener,
                    connection,
                    auth,
                    "sendToGroup",
                    payload,
                    content_type,
                    size,
                    None,
                    Some(attributes),
                )
                .await;
                if let Err(IngestError::Rejected { rejection, close }) = result {
                    if close {
                        return Err(rejected_close(&rejection));
                    }
                    return Ok(answer(
                        session,
                        ack_id,
                        Err((AckError::InternalServerError, rejection.message)),
                    ));
                }
            }
            let downlink = Arc::new(iotgate_pipeline::Downlink {
                body,
                source: iotgate_pipeline::DownlinkSource::Group {
                    group: Arc::from(group.as_str()),
                    from_user: Some(session.user_id.clone()),
                },
            });
            let except = no_echo.then(|| session.connection_id());
            session
                .registration
                .hub()
                .to_group(&listener.context.key, &group, except, &downlink);
            if let Some(bus) = &listener.bus {
                bus.send_to_group_elsewhere(
                    &listener.context.key,
                    &group,
                    &session.user_id,
                    &downlink.body,
                )
                .await;
            }
            Ok(answer(session, ack_id, Ok(())))
        }
        ClientFrame::Event {
            event,
            data_type,
            data,
            ..
        } => {
            if event.is_empty() || event.len() > 128 || event.starts_with('$') {
                return Ok(answer(
                    session,
                    ack_id,
                    Err((
                        AckError::BadRequest,
                        "the event name must have 1 to 128 characters and not start with $".into(),
                    )),
                ));
            }
            let body = match protocol::decode_data(data_type, data) {
                Ok(body) => body,
                Err(message) => {
                    return Ok(answer(
                        session,
                        ack_id,
                        Err((AckError::BadRequest, message)),
                    ))
                }
            };
            let (payload, content_type, size) = payload_of(&body);
            let result = ingest(
                listener,
                connection,
                auth,
                &event,
                payload,
                content_type,
                size,
                ack_id.map(|id| (id, request)),
                None,
            )
            .await;
            if let (Some(id), Ok(Ingested::Pending)) = (ack_id, &result) {
                waiting.insert(id);
                return Ok(Vec::new());
            }
            if let Err(IngestError::Rejected {
                rejection,
                close: true,
            }) = &result
            {
                let end = rejected_close(rejection);
                return Err(end);
            }
            Ok(ack_id
                .and_then(|id| ack_frame(session, id, result))
                .into_iter()
                .collect())
        }
    }
}

/// The Web PubSub roles the connection's credentials grant (a connection token's `role`
/// claim; other credentials grant none).
fn granted_roles(auth: &ConnectionAuth) -> std::sync::Arc<[String]> {
    auth.binding
        .as_ref()
        .map(|binding| binding.roles.clone())
        .unwrap_or_else(|| std::sync::Arc::from(Vec::new()))
}

/// The ack for a request with `ack_id` (none without one); a success is remembered so a repeat
/// is answered `Duplicate`.
fn answer(
    session: &mut Session,
    ack_id: Option<u64>,
    result: Result<(), (AckError, String)>,
) -> Vec<String> {
    let Some(id) = ack_id else {
        return Vec::new();
    };
    match result {
        Ok(()) => {
            session.ack_ids.record(id);
            vec![protocol::ack_ok(id)]
        }
        Err((error, message)) => vec![protocol::ack_error(id, error, &message)],
    }
}

/// The ack for an event the pipeline answered.
fn ack_frame(
    session: &mut Session,
    ack_id: u64,
    result: Result<Ingested, IngestError>,
) -> Option<String> {
    let frames = match result {
        Ok(Ingested::Pending) => return None,
        Ok(Ingested::Answered(AckResult::Acked {
            duplicate: true, ..
        })) => {
            session.ack_ids.record(ack_id);
            vec![protocol::ack_error(
                ack_id,
                AckError::Duplicate,
                "this event was stored before",
            )]
        }
        Ok(Ingested::Answered(AckResult::Acked { .. })) => answer(session, Some(ack_id), Ok(())),
        Ok(Ingested::Answered(AckResult::Refused(rejection)))
        | Err(IngestError::Rejected { rejection, .. }) => {
            let error =
                if iotgate_pipeline::auth_failures::is_authentication_failure(rejection.code) {
                    AckError::Forbidden
                } else {
                    AckError::InternalServerError
                };
            answer(
                session,
                Some(ack_id),
                Err((
                    error,
                    format!("{}: {}", rejection.code.as_str(), rejection.message),
                )),
            )
        }
    };
    frames.into_iter().next()
}

fn payload_of(body: &DownlinkBody) -> (Payload, ContentType, usize) {
    match body {
        DownlinkBody::Json(value) => (
            Payload::Json(value.clone()),
            ContentType::Json,
            value.to_string().len(),
        ),
        DownlinkBody::Text(text) => (
            Payload::Text(text.to_string()),
            ContentType::Text,
            text.len(),
        ),
        DownlinkBody::Binary(bytes) => (
            Payload::Binary(bytes.clone()),
            ContentType::Binary,
            bytes.len(),
        ),
    }
}

/// One event into the pipeline, as telemetry of message type `event`.
#[allow(clippy::too_many_arguments)]
async fn ingest(
    listener: &ServerListener,
    connection: &Connection,
    auth: &mut ConnectionAuth,
    event: &str,
    payload: Payload,
    content_type: ContentType,
    size: usize,
    ack: Option<(u64, &AckRequest)>,
    attributes: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<Ingested, IngestError> {
    let mut envelope = connection.envelope(&listener.context, size);
    envelope.content_type = content_type;
    envelope.payload = payload;
    envelope.message_type = Some(Arc::from(event));
    envelope.attributes = attributes.map(Box::new);
    // Ack ids restart with every client, so they name an answer, never a duplicate to drop:
    // frame-kind ids are never used to de-duplicate.
    envelope.message_id = ack.map(|(id, _)| MessageId::Frame(id));
    let request = ack.map(|(_, request)| request);
    listener
        .pipeline
        .ingest(&listener.context, auth, envelope, request)
        .await
}
