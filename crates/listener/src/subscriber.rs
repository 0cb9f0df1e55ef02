//! WebSocket subscribers of a websocket downstream module (the live view). The admin token is
//! checked by the caller; this serves the socket: frames from the hub, filtered by device and
//! listener, with lagging subscribers skipping ahead (counted) rather than slowing devices.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason};
use iotgate_pipeline::SubscriberHub;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

/// Optional subscriber filters from the query string.
#[derive(Debug, Default, Clone)]
pub struct SubscriberFilter {
    pub device_id: Option<String>,
    pub listener: Option<String>,
}

pub fn serve_subscriber(
    hub: Arc<SubscriberHub>,
    request: &HttpRequest,
    body: web::Payload,
    filter: SubscriberFilter,
    shutdown: CancellationToken,
) -> HttpResponse {
    let (response, mut session, stream) = match actix_ws::handle(request, body) {
        Ok(parts) => parts,
        Err(error) => {
            return HttpResponse::BadRequest().json(serde_json::json!({"error": {
                "code": "websocket_upgrade_required",
                "message": format!("not a valid WebSocket upgrade request: {error}")}}))
        }
    };
    let mut frames = hub.subscribe();
    // Only the receiver and the counters go into the task: holding the hub would keep its
    // sender alive, and a replaced downstream could then never tell subscribers to reconnect.
    let dropped = hub.counters.subscriber_dropped.clone();
    drop(hub);
    let mut stream = stream.max_frame_size(4096).aggregate_continuations();
    actix_web::rt::spawn(async move {
        let close = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Some(CloseReason { code: CloseCode::Away, description: Some("server shutting down".into()) }),
                frame = frames.recv() => match frame {
                    Ok(frame) => {
                        if filter.device_id.as_deref().is_some_and(|d| frame.device_id.as_deref() != Some(d)) {
                            continue;
                        }
                        if filter.listener.as_deref().is_some_and(|l| &*frame.listener_key != l) {
                            continue;
                        }
                        if session.text(frame.text.clone()).await.is_err() {
                            break None;
                        }
                    }
                    Err(RecvError::Lagged(missed)) => { dropped.inc_by(missed); }
                    Err(RecvError::Closed) => break Some(CloseReason { code: CloseCode::Restart, description: Some("downstream reconfigured; reconnect".into()) }),
                },
                message = stream.recv() => match message {
                    Some(Ok(AggregatedMessage::Ping(p))) => { if session.pong(&p).await.is_err() { break None; } }
                    Some(Ok(AggregatedMessage::Close(_))) | None | Some(Err(_)) => break None,
                    Some(Ok(_)) => {}
                },
            }
        };
        let _ = session.close(close).await;
    });
    response
}
