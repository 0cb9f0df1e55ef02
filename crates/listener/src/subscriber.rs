//! WebSocket subscribers of a websocket downstream module (the live view). The credential is
//! checked by the caller; this serves the socket.
//!
//! A subscriber has its own queue in the hub (filtered by device and listener there). The
//! response body is a stream that, each time the connection can take more, drains the **whole**
//! queue and encodes it into one buffer: one write per batch, with no channel or extra task
//! between the queue and the socket. (actix-ws's `Session` hands frames one at a time through a
//! 32-slot channel to the task that writes them; on a worker busy with device connections every
//! 32 frames then wait a full round of that worker's tasks, and a fast feed collapses.) A task
//! reads what the subscriber sends (pings, close) and answers through the same body stream.
//!
//! A subscriber that falls behind loses the oldest frames, or with `mode=latest` all but the
//! newest per device (counted), rather than slowing devices. The socket lives no longer than
//! the credential it was opened with: it is closed (1008) when that session or token is revoked
//! or expires; a changed downstream closes it with 1012 (reconnect); shutdown with 1001.

use std::sync::{Arc, Weak};
use std::time::Duration;

use actix_codec::Encoder as _;
use actix_http::ws::{Codec, Message};
use actix_web::body::{BodyStream, MessageBody as _};
use actix_web::web::{Bytes, BytesMut};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason};
use futures_util::StreamExt;
use iotgate_pipeline::downstream::{DeliveryMode, FrameBody, Subscription};
use iotgate_pipeline::SubscriberHub;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use iotgate_pipeline::downstream::SubscriberFilter;

/// When a subscription must end besides shutdown: its credential revoked or expired.
#[derive(Debug, Clone)]
pub struct SubscriptionLimits {
    /// Cancelled when the session or token is revoked.
    pub revoked: CancellationToken,
    /// Time left until the credential expires.
    pub expires_in: Duration,
}

/// What the reader task asks the body stream to send.
enum Control {
    Pong(Bytes),
    Close(Option<CloseReason>),
}

/// Removes the subscription from its hub when the socket is gone.
struct Unsubscribe {
    hub: Weak<SubscriberHub>,
    subscription: Arc<Subscription>,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.unsubscribe(&self.subscription);
        }
    }
}

/// The body stream's state.
struct Writer {
    registration: Unsubscribe,
    control: mpsc::UnboundedReceiver<Control>,
    codec: Codec,
    finished: bool,
}

impl Writer {
    fn encode(&mut self, message: Message, buffer: &mut BytesMut) {
        if let Err(error) = self.codec.encode(message, buffer) {
            tracing::debug!(error = %error, "subscriber frame could not be encoded");
        }
    }

    /// The next chunk of the response: control frames first, then every queued frame.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        let mut buffer = BytesMut::new();
        let subscription = self.registration.subscription.clone();
        tokio::select! {
            biased;
            control = self.control.recv() => match control {
                Some(Control::Pong(payload)) => self.encode(Message::Pong(payload), &mut buffer),
                Some(Control::Close(reason)) => {
                    self.encode(Message::Close(reason), &mut buffer);
                    self.finished = true;
                }
                // The reader is gone: the peer left.
                None => return None,
            },
            _ = subscription.retired() => {
                self.encode(
                    Message::Close(Some(CloseReason {
                        code: CloseCode::Restart,
                        description: Some("downstream reconfigured; reconnect".into()),
                    })),
                    &mut buffer,
                );
                self.finished = true;
            }
            batch = subscription.next_batch() => {
                for frame in batch {
                    let message = match &frame.body {
                        FrameBody::Text(text) => Message::Text(text.clone()),
                        FrameBody::Binary(bytes) => Message::Binary(bytes.clone()),
                    };
                    self.encode(message, &mut buffer);
                }
            }
        }
        Some(buffer.freeze())
    }
}

pub fn serve_subscriber(
    hub: Arc<SubscriberHub>,
    request: &HttpRequest,
    body: web::Payload,
    filter: SubscriberFilter,
    mode: DeliveryMode,
    shutdown: CancellationToken,
    limits: SubscriptionLimits,
) -> HttpResponse {
    let mut response = match actix_http::ws::handshake(request.head()) {
        Ok(response) => response,
        Err(error) => {
            return HttpResponse::BadRequest().json(serde_json::json!({"error": {
                "code": "websocket_upgrade_required",
                "message": format!("not a valid WebSocket upgrade request: {error}")}}))
        }
    };
    let subscription = hub.subscribe(filter, mode);
    // Held weakly: a replaced downstream must be able to go away (which retires its
    // subscriptions, and the subscriber is told to reconnect).
    let registration = Unsubscribe {
        hub: Arc::downgrade(&hub),
        subscription,
    };
    drop(hub);
    let (control, control_rx) = mpsc::unbounded_channel();
    let writer = Writer {
        registration,
        control: control_rx,
        codec: Codec::new(),
        finished: false,
    };
    let chunks = futures_util::stream::unfold(writer, |mut writer| async move {
        let chunk = writer.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), writer))
    });

    // The reader: what the subscriber sends, and the reasons to end the subscription. (Only
    // actix-ws's decoding half is used; its own sending half is dropped unused.)
    let mut incoming = match actix_ws::handle(request, body) {
        Ok((_, _, incoming)) => incoming.max_frame_size(4096).aggregate_continuations(),
        Err(error) => {
            return HttpResponse::BadRequest().json(serde_json::json!({"error": {
                "code": "websocket_upgrade_required",
                "message": format!("not a valid WebSocket upgrade request: {error}")}}))
        }
    };
    actix_web::rt::spawn(async move {
        let expiry = tokio::time::sleep(limits.expires_in);
        tokio::pin!(expiry);
        let reason = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Some(CloseReason { code: CloseCode::Away, description: Some("server shutting down".into()) }),
                _ = limits.revoked.cancelled() => break Some(CloseReason { code: CloseCode::Policy, description: Some("session_revoked".into()) }),
                _ = &mut expiry => break Some(CloseReason { code: CloseCode::Policy, description: Some("session_expired".into()) }),
                message = incoming.next() => match message {
                    Some(Ok(AggregatedMessage::Ping(payload))) => {
                        if control.send(Control::Pong(payload)).is_err() {
                            return;
                        }
                    }
                    Some(Ok(AggregatedMessage::Close(_))) => break None,
                    Some(Ok(_)) => {}
                    // The peer went away or broke the protocol: nothing more to say to it.
                    None | Some(Err(_)) => return,
                },
            }
        };
        let _ = control.send(Control::Close(reason));
    });
    response
        .message_body(BodyStream::new(Box::pin(chunks)).boxed())
        .map(HttpResponse::from)
        .unwrap_or_else(|error| {
            HttpResponse::InternalServerError().json(serde_json::json!({"error": {
                "code": "internal_error", "message": error.to_string()}}))
        })
}
