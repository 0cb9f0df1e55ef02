//! The `nats` downstream: publishes each envelope to a subject rendered from a template.
//!
//! With `jetStream: true` (the default) every message is published through JetStream with
//! `Nats-Msg-Id` set to the envelope id and counts as delivered only on the stream's publish
//! acknowledgement, so it is durable and takes part in `acknowledge: stored`. Up to
//! [`WINDOW`] publishes are in flight on the one connection, in queue order. When
//! acknowledgements stop coming (connection lost, server restarted) every publish still in flight
//! is sent again, in the same order, once the client has reconnected: the server drops the copies
//! it already stored by their message id, and a device's messages keep their order. A message
//! the server refuses (no stream for the subject, too large, a stream limit) is retried
//! `maxRetries` times with backoff, then dead-lettered (`nats_failed`) with the server's reason.
//!
//! With `jetStream: false` a message is published on core NATS and counts as delivered once the
//! client took it for its connection: not durable (NATS itself keeps nothing).
//!
//! While disconnected the module takes nothing from its queue, so a full queue pushes back on
//! the device connections; the client reconnects by itself with jittered backoff.

use std::collections::VecDeque;
use std::future::IntoFuture as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, context::PublishError, publish::PublishAck};
use async_nats::{ConnectOptions, Event, HeaderMap, ServerError};
use bytes::Bytes;
use iotgate_core::definition::DownstreamDefinition;
use iotgate_core::Envelope;
use tokio::sync::mpsc;

use super::link::{
    header_safe, reconnect_delay, retry_delay, AddressTemplate, LinkState, ProbeReport, Settler,
    DRAIN_GRACE,
};
use super::{encode, Delivery, FrameBody};

/// JetStream publishes awaiting their acknowledgement.
pub const WINDOW: usize = 1024;

type AckFuture =
    Pin<Box<dyn std::future::Future<Output = Result<PublishAck, PublishError>> + Send>>;

struct InFlight {
    delivery: Delivery,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
    /// Attempts the server refused.
    attempts: u32,
    /// Sent again after acknowledgements stopped: a duplicate answer is our own copy.
    resent: bool,
    ack: AckFuture,
}

/// The bytes published for an envelope, as for the websocket downstream.
pub(crate) fn body_bytes(body: FrameBody) -> Bytes {
    match body {
        FrameBody::Text(text) => text.into_bytes(),
        FrameBody::Binary(bytes) => bytes,
    }
}

/// Envelope metadata as NATS headers; `Nats-Msg-Id` lets JetStream drop redeliveries.
fn headers(envelope: &Envelope, format: iotgate_core::definition::SubscriberFormat) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        envelope.id.to_string().as_str(),
    );
    headers.insert("Iotgate-Listener", header_safe(&envelope.listener_key));
    if let Some(device) = envelope.device_id.as_deref() {
        headers.insert("Iotgate-Device-Id", header_safe(device));
    }
    if let Some(claimed) = envelope.claimed_device_id.as_deref() {
        headers.insert("Iotgate-Claimed-Device-Id", header_safe(claimed));
    }
    if let Some(device_type) = envelope.device_type.as_deref() {
        headers.insert("Iotgate-Device-Type", header_safe(device_type));
    }
    headers.insert(
        "Iotgate-Authenticated",
        if envelope.authenticated {
            "true"
        } else {
            "false"
        },
    );
    if let Ok(received) = envelope
        .received_at
        .format(&time::format_description::well_known::Rfc3339)
    {
        headers.insert("Iotgate-Received-At", received);
    }
    if let Some(id) = envelope.message_id.as_ref().and_then(|id| id.dedup_key()) {
        headers.insert("Iotgate-Message-Id", header_safe(&id));
    }
    headers.insert(
        "Content-Type",
        match format {
            iotgate_core::definition::SubscriberFormat::Msgpack => "application/msgpack",
            _ => "application/json",
        },
    );
    headers
}

/// Connection options from the definition (credentials in clear at runtime).
fn connect_options(
    definition: &DownstreamDefinition,
    tls: &Arc<rustls::ClientConfig>,
) -> ConnectOptions {
    let mut options = ConnectOptions::new()
        .name(format!("iotgate-{}", definition.key))
        .connection_timeout(Duration::from_secs(5));
    if let (Some(user), Some(password)) = (&definition.user_name, &definition.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = definition.token.as_ref().filter(|t| !t.is_empty()) {
        options = options.token(token.clone());
    }
    if url_of(definition).starts_with("tls://") {
        options = options
            .require_tls(true)
            .tls_client_config(rustls::ClientConfig::clone(tls));
    }
    options
}

fn url_of(definition: &DownstreamDefinition) -> &str {
    definition.url.as_deref().unwrap_or_default()
}

pub(crate) async fn run_nats(
    definition: DownstreamDefinition,
    settler: Settler,
    tls: Arc<rustls::ClientConfig>,
    mut receiver: mpsc::Receiver<Delivery>,
) {
    let template = match AddressTemplate::nats(definition.address_template()) {
        Ok(template) => template,
        Err(error) => {
            // Validation refuses a bad template; a stored one from elsewhere ends up here.
            settler.disconnected(LinkState::Error, Some(format!("subject: {error}")));
            drain_all(
                &settler,
                &mut receiver,
                "nats_failed",
                &format!("subject: {error}"),
            )
            .await;
            return;
        }
    };
    let first = Arc::new(AtomicBool::new(true));
    // With JetStream the module makes its connections itself and counts them there.
    let managed = definition.jet_stream;
    let events = {
        let settler = settler.clone();
        let first = first.clone();
        move |event: Event| {
            let settler = settler.clone();
            let first = first.clone();
            async move {
                match event {
                    Event::Connected if managed => {}
                    Event::ClientError(async_nats::ClientError::MaxReconnects) => {
                        tracing::debug!(downstream = %settler.key, "the lost NATS client closed");
                    }
                    Event::Connected => {
                        let first = first.swap(false, Ordering::AcqRel);
                        tracing::info!(downstream = %settler.key, reconnect = !first, "connected to NATS");
                        settler.connected(first);
                    }
                    Event::Disconnected => {
                        tracing::warn!(downstream = %settler.key, "disconnected from NATS; reconnecting");
                        settler.disconnected(LinkState::Disconnected, None);
                    }
                    Event::ServerError(ServerError::AuthorizationViolation) => {
                        tracing::error!(downstream = %settler.key, "NATS refused the credentials (authorization violation)");
                        settler.disconnected(
                            LinkState::Error,
                            Some(
                                "authorization violation: the server refused the credentials"
                                    .into(),
                            ),
                        );
                    }
                    Event::ServerError(error) => {
                        tracing::warn!(downstream = %settler.key, error = %error, "NATS server error");
                        settler
                            .status
                            .set(settler.status.state(), Some(error.to_string()));
                    }
                    Event::ClientError(error) => {
                        let text = error.to_string();
                        if text.contains("authorization") || text.contains("authentication") {
                            // Refused at connect time: the credentials, not the network.
                            tracing::error!(downstream = %settler.key, error = %text, "NATS refused the credentials; retrying with backoff");
                            settler.disconnected(
                                LinkState::Error,
                                Some(format!("{text}: the server refused the credentials")),
                            );
                        } else {
                            tracing::warn!(downstream = %settler.key, error = %text, "NATS client error");
                            settler.status.set(settler.status.state(), Some(text));
                        }
                    }
                    other => {
                        tracing::debug!(downstream = %settler.key, event = %other, "NATS event")
                    }
                }
            }
        }
    };
    if definition.jet_stream {
        let connect = || {
            // One connection per client: when it drops, the client makes one immediate attempt
            // (which fails while the server is down) and closes, discarding what it still
            // buffered; the module then connects a new client and publishes its window again,
            // in order. A client reconnecting by itself would first flush its stale buffer and
            // could store a later message before an earlier one that was lost.
            connect_options(&definition, &tls)
                .max_reconnects(Some(1))
                .reconnect_delay_callback(|_| Duration::ZERO)
                .event_callback(events.clone())
        };
        run_jetstream(&definition, &settler, &template, connect, receiver).await;
    } else {
        let options = connect_options(&definition, &tls)
            .retry_on_initial_connect()
            .max_reconnects(None::<usize>)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(events);
        match options.connect(url_of(&definition)).await {
            Ok(client) => run_core(&definition, &settler, &template, client, receiver).await,
            Err(error) => {
                let message = format!("cannot connect to {}: {error}", url_of(&definition));
                tracing::error!(downstream = %settler.key, error = %message, "NATS downstream not running");
                settler.disconnected(LinkState::Error, Some(message.clone()));
                drain_all(&settler, &mut receiver, "nats_failed", &message).await;
            }
        }
    }
    tracing::debug!(downstream = %settler.key, "nats downstream drained and stopped");
}

/// Dead-letters (or refuses) everything still queued: the module cannot run.
async fn drain_all(
    settler: &Settler,
    receiver: &mut mpsc::Receiver<Delivery>,
    reason: &str,
    message: &str,
) {
    while let Some(delivery) = receiver.recv().await {
        settler.counters.queue_depth.dec();
        settler.give_up(delivery, reason, message).await;
    }
}

/// Waits until the client is connected; false when the module should stop trying (its queue
/// closed and the drain grace ran out).
async fn wait_connected(client: &async_nats::Client, stop_after: Option<Instant>) -> bool {
    while client.connection_state() != State::Connected {
        if stop_after.is_some_and(|t| Instant::now() >= t) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Creates the configured stream when it is missing.
async fn ensure_stream(
    definition: &DownstreamDefinition,
    template: &AddressTemplate,
    js: &jetstream::Context,
) -> Result<(), String> {
    let Some(stream) = &definition.stream else {
        return Ok(());
    };
    let config = jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![template.stream_subject()],
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map(|_| ())
        .map_err(|error| format!("stream {stream} could not be created: {error}"))
}

/// Sends one publish; its acknowledgement (or the failure to send it) is the returned future.
async fn publish(
    js: &jetstream::Context,
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
) -> AckFuture {
    let message = PublishMessage::build().payload(payload).headers(headers);
    match js.send_publish(subject, message).await {
        Ok(ack) => Box::pin(ack.into_future()),
        Err(error) => Box::pin(std::future::ready(Err(error))),
    }
}

/// How a connection's session ended.
enum SessionEnd {
    /// The queue closed and everything was delivered or given up.
    Finished,
    /// The connection is gone; the window is published again on a new one.
    Lost,
}

async fn run_jetstream<F>(
    definition: &DownstreamDefinition,
    settler: &Settler,
    template: &AddressTemplate,
    connect: F,
    mut receiver: mpsc::Receiver<Delivery>,
) where
    F: Fn() -> ConnectOptions,
{
    let ack_timeout = Duration::from_millis(definition.timeout_ms);
    let url = url_of(definition);
    let mut window: VecDeque<InFlight> = VecDeque::with_capacity(WINDOW);
    // Set when the queue closed: what is still held gets until then.
    let mut stop_after: Option<Instant> = None;
    let mut stream_ready = definition.stream.is_none();
    let mut attempt = 0;
    let mut first = true;
    loop {
        if stop_after.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        if stop_after.is_none() && receiver.is_closed() && window.is_empty() && receiver.is_empty()
        {
            break;
        }
        let client = match connect().connect(url).await {
            Ok(client) => client,
            Err(error) => {
                attempt += 1;
                let text = error.to_string();
                let state = if text.contains("authorization") || text.contains("authentication") {
                    LinkState::Error
                } else {
                    LinkState::Disconnected
                };
                if attempt == 1 {
                    tracing::warn!(downstream = %settler.key, error = %text, "cannot connect to NATS; retrying with backoff");
                }
                settler.disconnected(state, Some(format!("cannot connect to {url}: {text}")));
                if receiver.is_closed() && stop_after.is_none() {
                    stop_after = Some(Instant::now() + DRAIN_GRACE);
                }
                tokio::time::sleep(reconnect_delay(attempt)).await;
                continue;
            }
        };
        attempt = 0;
        tracing::info!(downstream = %settler.key, reconnect = !first, "connected to NATS");
        settler.connected(first);
        first = false;
        let js = jetstream::ContextBuilder::new()
            .timeout(ack_timeout)
            .ack_timeout(ack_timeout)
            .max_ack_inflight(WINDOW * 4)
            .build(client.clone());
        if !stream_ready {
            match ensure_stream(definition, template, &js).await {
                Ok(()) => stream_ready = true,
                Err(message) => {
                    tracing::warn!(downstream = %settler.key, error = %message, "retrying");
                    settler.status.set(LinkState::Error, Some(message));
                    attempt += 1;
                    tokio::time::sleep(reconnect_delay(attempt)).await;
                    continue;
                }
            }
        }
        if !window.is_empty() {
            tracing::info!(downstream = %settler.key, messages = window.len(), "publishing unacknowledged messages again");
        }
        for entry in window.iter_mut() {
            entry.resent = true;
            entry.ack = publish(
                &js,
                entry.subject.clone(),
                entry.headers.clone(),
                entry.payload.clone(),
            )
            .await;
        }
        let end = session(
            definition,
            settler,
            template,
            &client,
            &js,
            &mut window,
            &mut receiver,
            &mut stop_after,
        )
        .await;
        match end {
            SessionEnd::Finished => break,
            SessionEnd::Lost => {
                settler.counters.failed.inc();
                settler.disconnected(
                    LinkState::Disconnected,
                    Some("the connection to NATS was lost".into()),
                );
                tracing::warn!(downstream = %settler.key, in_flight = window.len(), "NATS connection lost; reconnecting");
            }
        }
    }
    give_up_window(
        settler,
        &mut window,
        "the downstream stopped while the NATS server did not acknowledge",
    )
    .await;
    receiver.close();
    while let Some(delivery) = receiver.recv().await {
        settler.counters.queue_depth.dec();
        settler
            .give_up(
                delivery,
                "downstream_stopped",
                "the downstream stopped while NATS was unreachable",
            )
            .await;
    }
}

/// Publishes from the queue on one connection until it is lost or the queue is done.
#[allow(clippy::too_many_arguments)]
async fn session(
    definition: &DownstreamDefinition,
    settler: &Settler,
    template: &AddressTemplate,
    client: &async_nats::Client,
    js: &jetstream::Context,
    window: &mut VecDeque<InFlight>,
    receiver: &mut mpsc::Receiver<Delivery>,
    stop_after: &mut Option<Instant>,
) -> SessionEnd {
    let in_flight = &settler.counters.in_flight;
    // Wakes the loop while it waits on nothing else, to notice a lost connection or the drain
    // deadline (one timer for the session, not one per message).
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if stop_after.is_some() && window.is_empty() {
            return SessionEnd::Finished;
        }
        if stop_after.is_some_and(|t| Instant::now() >= t) {
            return SessionEnd::Finished;
        }
        if client.connection_state() != State::Connected {
            return SessionEnd::Lost;
        }
        let can_take = stop_after.is_none() && window.len() < WINDOW;
        tokio::select! {
            biased;
            result = async { (&mut window.front_mut().expect("guarded").ack).await }, if !window.is_empty() => {
                match result {
                    Ok(ack) => {
                        let entry = window.pop_front().expect("guarded");
                        in_flight.dec();
                        settler.delivered(entry.delivery, ack.duplicate && !entry.resent);
                    }
                    Err(error) => {
                        settler.counters.failed.inc();
                        let transport = matches!(
                            error.kind(),
                            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe
                        );
                        if transport && client.connection_state() != State::Connected {
                            return SessionEnd::Lost;
                        }
                        retry_head(definition, settler, js, window, error, transport).await;
                    }
                }
            }
            next = receiver.recv(), if can_take => match next {
                Some(delivery) => {
                    settler.counters.queue_depth.dec();
                    let body = encode(&delivery.envelope, definition.format);
                    let mut entry = InFlight {
                        subject: template.render(&delivery.envelope),
                        headers: headers(&delivery.envelope, definition.format),
                        payload: body_bytes(body),
                        delivery,
                        attempts: 0,
                        resent: false,
                        ack: Box::pin(std::future::pending()),
                    };
                    entry.ack = publish(js, entry.subject.clone(), entry.headers.clone(), entry.payload.clone()).await;
                    in_flight.inc();
                    window.push_back(entry);
                }
                None => *stop_after = Some(Instant::now() + DRAIN_GRACE),
            },
            _ = tick.tick() => {}
        }
    }
}

async fn give_up_window(settler: &Settler, window: &mut VecDeque<InFlight>, message: &str) {
    while let Some(entry) = window.pop_front() {
        settler.counters.in_flight.dec();
        settler
            .give_up(entry.delivery, "downstream_stopped", message)
            .await;
    }
}

/// The head of the window failed while the connection is up. A refusal by the server concerns
/// that message: it is retried at the back of the window after a backoff, `maxRetries` times,
/// then given up. A missing acknowledgement on a live connection (a slow server) is published
/// again in place.
async fn retry_head(
    definition: &DownstreamDefinition,
    settler: &Settler,
    js: &jetstream::Context,
    window: &mut VecDeque<InFlight>,
    error: PublishError,
    transport: bool,
) {
    let message = error.to_string();
    let mut entry = window.pop_front().expect("the head failed");
    if !transport {
        entry.attempts += 1;
        tracing::debug!(downstream = %settler.key, attempt = entry.attempts, error = %message, "NATS refused a publish");
        settler
            .status
            .set(settler.status.state(), Some(message.clone()));
    }
    if entry.attempts > definition.max_retries || settler.expired(&entry.delivery) {
        settler.counters.in_flight.dec();
        let why = if transport {
            format!("no JetStream acknowledgement: {message}")
        } else {
            format!("NATS refused the message: {message}")
        };
        settler.give_up(entry.delivery, "nats_failed", &why).await;
        return;
    }
    if transport {
        entry.resent = true;
        entry.ack = publish(
            js,
            entry.subject.clone(),
            entry.headers.clone(),
            entry.payload.clone(),
        )
        .await;
        window.push_front(entry);
    } else {
        tokio::time::sleep(retry_delay(entry.attempts)).await;
        entry.ack = publish(
            js,
            entry.subject.clone(),
            entry.headers.clone(),
            entry.payload.clone(),
        )
        .await;
        // At the back: the acknowledgements ahead of it are still coming.
        window.push_back(entry);
    }
}

async fn run_core(
    definition: &DownstreamDefinition,
    settler: &Settler,
    template: &AddressTemplate,
    client: async_nats::Client,
    mut receiver: mpsc::Receiver<Delivery>,
) {
    loop {
        wait_connected(&client, None).await;
        let Some(delivery) = receiver.recv().await else {
            break;
        };
        settler.counters.queue_depth.dec();
        let subject = template.render(&delivery.envelope);
        let payload = body_bytes(encode(&delivery.envelope, definition.format));
        let headers = headers(&delivery.envelope, definition.format);
        match client.publish_with_headers(subject, headers, payload).await {
            Ok(()) => settler.delivered(delivery, false),
            Err(error) => {
                settler.counters.failed.inc();
                settler
                    .give_up(
                        delivery,
                        "nats_failed",
                        &format!("NATS publish failed: {error}"),
                    )
                    .await;
            }
        }
    }
    // What the client still buffers goes out before the module ends.
    let _ = tokio::time::timeout(DRAIN_GRACE, client.flush()).await;
}

/// Connects once (no retries), checks JetStream (and the stream) and publishes a probe on
/// `_iotgate.probe.<key>` (core NATS, so no stream stores it) with a flush round trip.
pub async fn probe(
    definition: &DownstreamDefinition,
    tls: &Arc<rustls::ClientConfig>,
) -> ProbeReport {
    let mut report = ProbeReport::default();
    let url = url_of(definition);
    let client = match tokio::time::timeout(
        Duration::from_secs(8),
        connect_options(definition, tls).connect(url),
    )
    .await
    {
        Ok(Ok(client)) => client,
        Ok(Err(error)) => {
            let text = error.to_string();
            let auth = text.contains("authorization") || text.contains("Authentication");
            report.connected = auth;
            if auth {
                report.step("connect", true, format!("reached {url}"));
                report.step(
                    "authenticate",
                    false,
                    format!("the server refused the credentials: {text}"),
                );
            } else {
                report.step("connect", false, format!("cannot connect to {url}: {text}"));
            }
            return report.finish();
        }
        Err(_) => {
            report.step("connect", false, format!("no answer from {url} within 8 s"));
            return report.finish();
        }
    };
    let info = client.server_info();
    report.connected = true;
    report.authenticated = true;
    report.step(
        "connect",
        true,
        format!("connected to {url} (nats-server {})", info.version),
    );
    report.step("authenticate", true, "the server accepted the connection");
    if definition.jet_stream {
        let js = jetstream::new(client.clone());
        // The account info request, read as plain JSON so any server version answers.
        let info = tokio::time::timeout(
            Duration::from_secs(5),
            client.request("$JS.API.INFO", Bytes::new()),
        )
        .await;
        match info {
            Ok(Ok(reply)) => {
                let body: serde_json::Value =
                    serde_json::from_slice(&reply.payload).unwrap_or_default();
                match body.get("error") {
                    None if body.is_object() => report.step(
                        "jetstream",
                        true,
                        format!(
                            "JetStream is enabled ({} streams in the account)",
                            body["streams"].as_u64().unwrap_or(0)
                        ),
                    ),
                    Some(error) => report.step(
                        "jetstream",
                        false,
                        format!(
                            "JetStream refused: {}",
                            error["description"].as_str().unwrap_or("unknown error")
                        ),
                    ),
                    None => {
                        report.step("jetstream", false, "JetStream gave no account information")
                    }
                }
            }
            Ok(Err(error)) => report.step(
                "jetstream",
                false,
                format!("JetStream is not available: {error}"),
            ),
            Err(_) => report.step("jetstream", false, "JetStream did not answer within 5 s"),
        }
        if let Some(stream) = &definition.stream {
            match js.get_stream(stream).await {
                Ok(_) => report.step("stream", true, format!("stream {stream} exists")),
                Err(error) => report.step(
                    "stream",
                    true,
                    format!("stream {stream} will be created when the module starts ({error})"),
                ),
            }
        }
    }
    let subject = format!("_iotgate.probe.{}", definition.key);
    let published = async {
        client
            .publish(subject.clone(), Bytes::from_static(b"{\"probe\":true}"))
            .await?;
        client.flush().await?;
        Ok::<_, async_nats::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(5), published).await {
        Ok(Ok(())) => {
            report.published = true;
            report.step("publish", true, format!("published a probe on {subject}"));
        }
        Ok(Err(error)) => report.step(
            "publish",
            false,
            format!("the probe was not published: {error}"),
        ),
        Err(_) => report.step(
            "publish",
            false,
            "the probe publish was not flushed within 5 s",
        ),
    }
    report.finish()
}
