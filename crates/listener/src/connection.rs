//! What both listener modes do with one received data frame: build the envelope, decode it, name
//! it (acknowledging listeners), hand it to the pipeline, and turn the result into the frames the
//! device hears back. The modes differ only in how they read and write their sockets.

use std::sync::Arc;
use std::time::Instant;

use iotgate_core::definition::MessageMode;
use iotgate_core::envelope::{new_envelope_id, ConnectionMetadata};
use iotgate_core::{ContentType, Envelope, MessageId, Payload};
use iotgate_pipeline::{
    AckResult, ConnectionAuth, IngestError, Ingested, ListenerContext, Pipeline, Rejection,
};

use crate::acks::AckTracker;

/// The longest close reason a close frame can carry (125 payload bytes minus the 2-byte code).
const MAX_CLOSE_REASON: usize = 123;

/// `text` cut to fit a close frame (on a character boundary, marked with "..."): a longer reason
/// makes the peer refuse the frame (`ControlFrameTooBig`) instead of reading the code.
pub(crate) fn close_reason_text(text: &str) -> String {
    if text.len() <= MAX_CLOSE_REASON {
        return text.to_owned();
    }
    let mut cut = MAX_CLOSE_REASON - 3;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &text[..cut])
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
            claimed_device_id: None,
            metadata: self.metadata.clone(),
            message_id: None,
            dedup_window: None,
            attributes: None,
            message_type: None,
        }
    }
}

/// What the connection does after one frame.
pub(crate) struct Reply {
    /// Text frames to send the device, in order.
    pub frames: Vec<String>,
    /// Close the connection with 1008 after sending them (too many rejected messages).
    pub close: Option<Rejection>,
}

/// Takes one data frame through decoding, naming and the pipeline (`text_frame`: it came in a
/// text frame rather than a binary one).
pub(crate) async fn handle_frame(
    pipeline: &Pipeline,
    context: &ListenerContext,
    connection: &Connection,
    auth: &mut ConnectionAuth,
    mut acks: Option<&mut AckTracker>,
    bytes: bytes::Bytes,
    text_frame: bool,
) -> Reply {
    // The actix-ws message stream is not part of tokio's coop budget, so a connection whose
    // socket always has another message would keep its worker until the buffer is empty. Under
    // overload each worker's round then grows with the backlog, and the subscribers' writers on
    // the same worker wait a whole round between two batches (most of the live feed was
    // dropped). Spending the budget here makes every listener loop (server and client mode)
    // yield once per budget's worth of messages; otherwise it is a thread-local decrement.
    tokio::task::consume_budget().await;
    let frame = acks.as_deref_mut().map(AckTracker::frame_received);
    let mut envelope = connection.envelope(context, bytes.len());
    let received = envelope.received_instant;
    let decoded = Pipeline::decode(context.content_type, text_frame, bytes).and_then(|payload| {
        match context.message_mode {
            MessageMode::Payload => Ok(payload),
            MessageMode::Message => {
                let whole = payload.clone();
                match Pipeline::split_message(payload) {
                    Ok((payload, attributes)) => {
                        envelope.attributes = Some(Box::new(attributes));
                        Ok(payload)
                    }
                    Err(rejection) => {
                        // Kept with the dead letter: it decoded, it just is not a message.
                        envelope.payload = whole;
                        Err(rejection)
                    }
                }
            }
        }
    });
    let payload = match decoded {
        Ok(payload) => payload,
        Err(rejection) => {
            let error = pipeline
                .reject_undecodable(context, auth, &envelope, rejection)
                .await;
            // An undecodable frame has no body id; a frame number still names it.
            let id = frame.and_then(|n| acks.as_deref().and_then(|a| a.message_id(n, None).ok()));
            return reply(context, acks, id, received, Err(error));
        }
    };
    let message_id = match (acks.as_deref(), frame) {
        (Some(tracker), Some(n)) => match tracker.message_id(n, Some(&payload)) {
            Ok(id) => Some(id),
            // Not routed, and not a device failure: the device is told and sends it again
            // with an id.
            Err(rejection) => {
                pipeline.metrics.refused(&context.key, rejection.code);
                return Reply {
                    frames: vec![rejection.to_frame(None)],
                    close: None,
                };
            }
        },
        _ => None,
    };
    envelope.payload = payload;
    envelope.message_id = message_id.clone();
    envelope.dedup_window = acks.as_deref().and_then(AckTracker::dedup_window);
    let request = acks.as_deref().map(|a| a.request().clone());
    let result = pipeline
        .ingest(context, auth, envelope, request.as_ref())
        .await;
    reply(context, acks, message_id, received, result)
}

fn reply(
    context: &ListenerContext,
    acks: Option<&mut AckTracker>,
    message_id: Option<MessageId>,
    received: Instant,
    result: Result<Ingested, IngestError>,
) -> Reply {
    match (acks, message_id, result) {
        (Some(acks), Some(id), Ok(Ingested::Pending)) => {
            acks.wait_for(id);
            Reply {
                frames: Vec::new(),
                close: None,
            }
        }
        (Some(acks), Some(id), Ok(Ingested::Answered(result))) => Reply {
            frames: acks.answer(id, result, received),
            close: None,
        },
        (Some(acks), Some(id), Err(IngestError::Rejected { rejection, close })) => Reply {
            frames: acks.answer(id, AckResult::Refused(rejection.clone()), received),
            close: close.then_some(rejection),
        },
        (_, _, Ok(_)) => Reply {
            frames: Vec::new(),
            close: None,
        },
        (acks, _, Err(IngestError::Rejected { rejection, close })) => Reply {
            // Binary listeners without acknowledgements have no text channel to the device.
            frames: if acks.is_some()
                || !matches!(
                    context.content_type,
                    ContentType::Binary | ContentType::Msgpack
                ) {
                vec![rejection.to_frame(None)]
            } else {
                Vec::new()
            },
            close: close.then_some(rejection),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_close_frame_on_a_character_boundary() {
        assert_eq!(close_reason_text("short"), "short");
        let long = "é".repeat(100);
        let cut = close_reason_text(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON, "{}", cut.len());
        assert!(cut.ends_with("..."));
    }
}
