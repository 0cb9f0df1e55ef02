//! The `websocket-client` downstream: connects out to a WebSocket server (Node-RED's
//! "websocket in" node listening on a path, another gateway) and sends each envelope as one
//! frame in the downstream's `format` (text; MessagePack as binary).
//!
//! A message counts as delivered once its frame is written to the connection: WebSocket has no
//! acknowledgement, so the module is not durable and `acknowledge: stored` does not wait for it.
//! While disconnected, messages wait in the bounded queue (a full queue pushes back on the
//! device connections); the module reconnects with jittered backoff and sends them in order. A
//! frame whose write failed is sent again first on the next connection. What is still queued
//! when the module is stopped while disconnected is dead-lettered (`downstream_stopped`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use iotgate_core::definition::DownstreamDefinition;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Request, StatusCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::link::{reconnect_delay, LinkState, ProbeReport, Settler, DRAIN_GRACE};
use super::{encode, Delivery, FrameBody};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The upgrade request: URL, subprotocol, origin, Basic credentials and extra headers.
fn request(definition: &DownstreamDefinition) -> Result<Request<()>, String> {
    let url = definition.url.as_deref().unwrap_or_default();
    let mut request = url
        .into_client_request()
        .map_err(|e| format!("invalid URL: {e}"))?;
    let headers = request.headers_mut();
    let value =
        |v: &str| HeaderValue::from_str(v).map_err(|e| format!("invalid header value: {e}"));
    if let Some(origin) = &definition.origin {
        headers.insert("origin", value(origin)?);
    }
    if let Some(protocol) = &definition.sub_protocol {
        headers.insert("sec-websocket-protocol", value(protocol)?);
    }
    if let Some(user) = &definition.user_name {
        let password = definition.password.as_deref().unwrap_or_default();
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        headers.insert("authorization", value(&format!("Basic {token}"))?);
    }
    for (name, v) in &definition.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| format!("invalid header name {name}: {e}"))?;
        headers.insert(name, value(v)?);
    }
    Ok(request)
}

/// The URL without query string or user info, for logs and statuses.
fn url_for_log(definition: &DownstreamDefinition) -> String {
    let url = definition.url.as_deref().unwrap_or_default();
    url.split(['?', '#']).next().unwrap_or_default().to_owned()
}

/// Why a connection attempt failed, in words for the status: a 401/403 names the credentials.
fn describe(error: &WsError) -> (LinkState, String) {
    match error {
        WsError::Http(response)
            if matches!(
                response.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            ) =>
        {
            (
                LinkState::Error,
                format!(
                    "the server refused the credentials (HTTP {})",
                    response.status()
                ),
            )
        }
        WsError::Http(response) => (
            LinkState::Error,
            format!(
                "the server refused the upgrade (HTTP {})",
                response.status()
            ),
        ),
        other => (LinkState::Disconnected, format!("connect failed: {other}")),
    }
}

async fn connect(
    definition: &DownstreamDefinition,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Socket, (LinkState, String)> {
    let request = request(definition).map_err(|e| (LinkState::Error, e))?;
    let connector = tokio_tungstenite::Connector::Rustls(tls.clone());
    match tokio::time::timeout(
        Duration::from_secs(15),
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector)),
    )
    .await
    {
        Err(_) => Err((
            LinkState::Disconnected,
            "connect timed out after 15 s".into(),
        )),
        Ok(Err(error)) => Err(describe(&error)),
        Ok(Ok((socket, _response))) => Ok(socket),
    }
}

fn frame(body: FrameBody) -> Message {
    match body {
        FrameBody::Text(text) => Message::text(text.to_string()),
        FrameBody::Binary(bytes) => Message::binary(bytes),
    }
}

pub(crate) async fn run_ws_client(
    definition: DownstreamDefinition,
    settler: Settler,
    tls: Arc<rustls::ClientConfig>,
    mut receiver: mpsc::Receiver<Delivery>,
) {
    let url = url_for_log(&definition);
    // A message taken from the queue whose frame did not go out: sent first next time.
    let mut held: Option<Delivery> = None;
    let mut attempt = 0;
    let mut first = true;
    let mut closed = false;
    let mut stop_after: Option<Instant> = None;
    'reconnect: loop {
        match connect(&definition, &tls).await {
            Ok(socket) => {
                attempt = 0;
                tracing::info!(downstream = %settler.key, url = %url, reconnect = !first, "connected to the WebSocket server");
                settler.connected(first);
                first = false;
                let (mut sink, mut stream) = socket.split();
                let reason = loop {
                    let delivery = match held.take() {
                        Some(delivery) => delivery,
                        None => tokio::select! {
                            next = receiver.recv() => match next {
                                Some(delivery) => {
                                    settler.counters.queue_depth.dec();
                                    delivery
                                }
                                None => {
                                    let _ = sink.close().await;
                                    break 'reconnect;
                                }
                            },
                            // Reading answers pings and notices a close.
                            incoming = stream.next() => match incoming {
                                Some(Ok(Message::Close(close))) => break format!("the server closed the connection ({close:?})"),
                                Some(Ok(_)) => continue,
                                Some(Err(error)) => break format!("the connection failed: {error}"),
                                None => break "the server closed the connection".to_owned(),
                            },
                        },
                    };
                    match sink
                        .send(frame(encode(&delivery.envelope, definition.format)))
                        .await
                    {
                        Ok(()) => settler.delivered(delivery, false),
                        Err(error) => {
                            settler.counters.failed.inc();
                            held = Some(delivery);
                            break format!("sending failed: {error}");
                        }
                    }
                };
                tracing::warn!(downstream = %settler.key, url = %url, reason = %reason, "WebSocket connection lost; reconnecting");
                settler.disconnected(LinkState::Disconnected, Some(reason));
            }
            Err((state, message)) => {
                if attempt == 0 {
                    tracing::warn!(downstream = %settler.key, url = %url, error = %message, "cannot connect to the WebSocket server; retrying with backoff");
                }
                settler.disconnected(state, Some(message));
            }
        }
        attempt += 1;
        let wait = tokio::time::sleep(reconnect_delay(attempt));
        tokio::pin!(wait);
        // While waiting, notice a queue that closed (the module was changed or deleted).
        loop {
            tokio::select! {
                _ = &mut wait => break,
                _ = tokio::time::sleep(Duration::from_millis(100)), if !closed => {
                    if receiver.is_closed() {
                        closed = true;
                        stop_after = Some(Instant::now() + DRAIN_GRACE);
                    }
                }
            }
        }
        if stop_after.is_some_and(|t| Instant::now() >= t) {
            break;
        }
        if closed && held.is_none() && receiver.is_empty() {
            break;
        }
    }
    // Stopped while disconnected: what could not be sent becomes a dead letter.
    let message = format!("the downstream stopped while {url} was unreachable");
    if let Some(delivery) = held.take() {
        settler
            .give_up(delivery, "downstream_stopped", &message)
            .await;
    }
    receiver.close();
    while let Some(delivery) = receiver.recv().await {
        settler.counters.queue_depth.dec();
        settler
            .give_up(delivery, "downstream_stopped", &message)
            .await;
    }
    settler.disconnected(LinkState::Disconnected, None);
    tracing::debug!(downstream = %settler.key, "websocket-client downstream stopped");
}

/// Connects once (the upgrade answer says whether credentials were accepted), then sends a ping
/// and waits for the pong: no data frame, so the receiving flow is not disturbed.
pub async fn probe(
    definition: &DownstreamDefinition,
    tls: &Arc<rustls::ClientConfig>,
) -> ProbeReport {
    let mut report = ProbeReport::default();
    let url = url_for_log(definition);
    let mut socket = match connect(definition, tls).await {
        Ok(socket) => socket,
        Err((state, message)) => {
            if state == LinkState::Error && message.contains("HTTP") {
                report.connected = true;
                report.step("connect", true, format!("reached {url}"));
                report.step("authenticate", false, message);
            } else {
                report.step("connect", false, message);
            }
            return report.finish();
        }
    };
    report.connected = true;
    report.authenticated = true;
    report.step("connect", true, format!("connected to {url}"));
    report.step(
        "authenticate",
        true,
        "the server accepted the WebSocket upgrade",
    );
    let pinged = async {
        socket
            .send(Message::Ping(b"iotgate-probe".to_vec().into()))
            .await?;
        while let Some(message) = socket.next().await {
            if let Message::Pong(_) = message? {
                return Ok(());
            }
        }
        Err(WsError::ConnectionClosed)
    };
    match tokio::time::timeout(Duration::from_secs(5), pinged).await {
        Ok(Ok(())) => {
            report.published = true;
            report.step("publish", true, "sent a ping probe and received its pong");
        }
        Ok(Err(error)) => report.step("publish", false, format!("the probe failed: {error}")),
        Err(_) => report.step("publish", false, "no pong within 5 s"),
    }
    let _ = socket.close(None).await;
    report.finish()
}
