//! Acknowledged delivery on one connection: names each message, keeps the number of unanswered
//! messages under `maxInFlight` (the connection stops reading beyond it, so TCP pushes back on
//! the device), and turns answers into frames:
//!
//! - `{"ack":{"messageId":"m-17","status":"stored"}}`, with `"duplicate":true` for a retry of a
//!   message already stored;
//! - `{"error":{"code":"...","message":"...","messageId":"m-17","retryAfterMs":2000}}`.
//!
//! Ids the device chose are answered as soon as their answer is known, in any order. Frame
//! numbers (text and binary listeners) are answered in order and acknowledgements are
//! cumulative: answers that are ready together are sent as one ack for the highest frame, and a
//! refusal is always sent before any ack of a later frame.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use iotgate_core::definition::{AcknowledgeMode, ListenerDefinition, MessageIdRule};
use iotgate_core::{MessageId, Payload};
use iotgate_pipeline::{
    AckOutcome, AckRequest, AckResult, AckStatus, ListenerCounters, Metrics, Rejection,
    RejectionCode,
};
use tokio::sync::mpsc;

/// How long a stopping connection waits for the answers of its messages in flight before it
/// refuses the rest with `shutting_down`.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);

pub struct AckTracker {
    rule: MessageIdRule,
    max_in_flight: usize,
    dedup_window: Option<Duration>,
    request: AckRequest,
    /// Data frames received so far: the last frame's number.
    frames_received: u64,
    /// Messages handed to the pipeline whose answer has not come yet, oldest first.
    waiting: VecDeque<MessageId>,
    /// Frame mode: answers that wait for an earlier frame's answer.
    held: BTreeMap<u64, AckResult>,
    /// Frame mode: the next frame number to answer.
    next_frame: u64,
    listener_key: std::sync::Arc<str>,
    counters: ListenerCounters,
    metrics: std::sync::Arc<Metrics>,
}

impl AckTracker {
    /// The tracker of a new connection and the receiver of its late answers; `None` when the
    /// listener does not acknowledge.
    pub fn new(
        definition: &ListenerDefinition,
        counters: ListenerCounters,
        metrics: std::sync::Arc<Metrics>,
    ) -> Option<(Self, mpsc::UnboundedReceiver<AckOutcome>)> {
        if definition.acknowledge == AcknowledgeMode::None {
            return None;
        }
        let (outcomes, receiver) = mpsc::unbounded_channel();
        let window = u64::from(definition.dedup_window_seconds());
        Some((
            Self {
                rule: definition.message_id_rule(),
                max_in_flight: definition.max_in_flight().max(1) as usize,
                dedup_window: (window > 0).then(|| Duration::from_secs(window)),
                request: AckRequest {
                    mode: definition.acknowledge,
                    outcomes,
                },
                frames_received: 0,
                waiting: VecDeque::new(),
                held: BTreeMap::new(),
                next_frame: 1,
                listener_key: std::sync::Arc::from(definition.key.as_str()),
                counters,
                metrics,
            },
            receiver,
        ))
    }

    pub fn request(&self) -> &AckRequest {
        &self.request
    }

    pub fn dedup_window(&self) -> Option<Duration> {
        self.dedup_window
    }

    /// Unanswered messages, including frame answers held back for order.
    pub fn in_flight(&self) -> usize {
        self.waiting.len() + self.held.len()
    }

    /// False once `maxInFlight` messages are unanswered: stop reading the socket.
    pub fn can_read(&self) -> bool {
        self.in_flight() < self.max_in_flight
    }

    /// True while an answer is still to come from the pipeline.
    pub fn awaits_answers(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Counts one data frame; returns its number.
    pub fn frame_received(&mut self) -> u64 {
        self.frames_received += 1;
        self.frames_received
    }

    /// The id of the message in frame `frame`: the frame number, or the value at the listener's
    /// body pointer (`payload` is the decoded message; `None` when it could not be decoded).
    pub fn message_id(
        &self,
        frame: u64,
        payload: Option<&Payload>,
    ) -> Result<MessageId, Rejection> {
        let pointer = match &self.rule {
            MessageIdRule::Frame => return Ok(MessageId::Frame(frame)),
            MessageIdRule::Body { pointer } => pointer,
        };
        let value = match payload {
            Some(Payload::Json(value)) => value.pointer(pointer),
            _ => None,
        };
        match value {
            None | Some(serde_json::Value::Null) => Err(Rejection::new(
                RejectionCode::MissingMessageId,
                format!("an acknowledged message needs its id at {pointer}; it was not routed"),
            )),
            Some(value) => MessageId::from_json(value).map_err(|problem| {
                Rejection::new(
                    RejectionCode::InvalidMessageId,
                    format!("{problem}; the message was not routed"),
                )
            }),
        }
    }

    /// The pipeline will answer `id` later.
    pub fn wait_for(&mut self, id: MessageId) {
        self.waiting.push_back(id);
    }

    /// An answer for `id`; returns the frames to send now.
    pub fn answer(&mut self, id: MessageId, result: AckResult, received: Instant) -> Vec<String> {
        self.answer_all([AckOutcome {
            message_id: id,
            result,
            received,
        }])
    }

    /// Every answer that is ready at once (a committed batch answers many messages of one
    /// connection together): the frames of all of them, so the connection wakes and writes once
    /// per batch instead of once per message, and frame mode sends one cumulative ack for the
    /// whole run instead of one per answer.
    pub fn answer_all(&mut self, outcomes: impl IntoIterator<Item = AckOutcome>) -> Vec<String> {
        let mut frames = Vec::new();
        for outcome in outcomes {
            self.record(
                outcome.message_id,
                outcome.result,
                outcome.received,
                &mut frames,
            );
        }
        if !self.held.is_empty() {
            frames.extend(self.release_in_order());
        }
        frames
    }

    /// Takes one answer: a body id's frame goes into `frames` at once, a frame number's answer
    /// is held until [`Self::release_in_order`].
    fn record(
        &mut self,
        id: MessageId,
        result: AckResult,
        received: Instant,
        frames: &mut Vec<String>,
    ) {
        if let Some(index) = self.waiting.iter().position(|w| *w == id) {
            self.waiting.remove(index);
        }
        self.count(&result, received);
        match id {
            MessageId::Frame(frame) => {
                self.held.insert(frame, result);
            }
            id => frames.push(frame_for(&id, &result)),
        }
    }

    /// The listener is stopping and its messages' answers did not all come in time: refuses
    /// every message still unanswered. Returns the frames to send before closing.
    pub fn refuse_all_waiting(&mut self) -> Vec<String> {
        let mut frames = Vec::new();
        while let Some(id) = self.waiting.front().cloned() {
            let rejection = Rejection::new(
                RejectionCode::ShuttingDown,
                "the listener stopped before the message was committed; send it again",
            )
            .retry_after(Duration::from_secs(1));
            frames.extend(self.answer(id, AckResult::Refused(rejection), Instant::now()));
        }
        frames
    }

    fn count(&self, result: &AckResult, received: Instant) {
        self.metrics
            .ack_latency
            .observe(received.elapsed().as_secs_f64());
        match result {
            AckResult::Acked { status, duplicate } => {
                match status {
                    AckStatus::Accepted => self.counters.acked_accepted.inc(),
                    AckStatus::Stored => self.counters.acked_stored.inc(),
                };
                if *duplicate {
                    self.counters.duplicates.inc();
                }
            }
            AckResult::Refused(rejection) => {
                self.metrics.refused(&self.listener_key, rejection.code);
            }
        }
    }

    /// Sends every held frame answer that no earlier frame holds back. A run of acks with one
    /// status becomes one cumulative ack for its last frame; refusals go out one by one.
    fn release_in_order(&mut self) -> Vec<String> {
        let mut frames = Vec::new();
        let mut run: Option<(u64, AckResult)> = None;
        while let Some(result) = self.held.remove(&self.next_frame) {
            let frame = self.next_frame;
            self.next_frame += 1;
            match result {
                AckResult::Acked { status, .. } => {
                    let status_changed = matches!(
                        &run,
                        Some((_, AckResult::Acked { status: run_status, .. })) if *run_status != status
                    );
                    if status_changed {
                        if let Some((last, acked)) = run.take() {
                            frames.push(frame_for(&MessageId::Frame(last), &acked));
                        }
                    }
                    run = Some((frame, result));
                }
                AckResult::Refused(_) => {
                    if let Some((last, acked)) = run.take() {
                        frames.push(frame_for(&MessageId::Frame(last), &acked));
                    }
                    frames.push(frame_for(&MessageId::Frame(frame), &result));
                }
            }
        }
        if let Some((last, acked)) = run {
            frames.push(frame_for(&MessageId::Frame(last), &acked));
        }
        frames
    }
}

/// The text frame that tells the device about one message.
fn frame_for(id: &MessageId, result: &AckResult) -> String {
    match result {
        // Written straight into one string (the id through serde, which escapes it): acks are
        // one per message on the hot path, and a `Value` tree per ack cost four allocations more.
        AckResult::Acked { status, duplicate } => {
            let mut frame = String::with_capacity(64);
            frame.push_str(r#"{"ack":{"messageId":"#);
            match id {
                MessageId::Frame(number) => {
                    let _ = std::fmt::Write::write_fmt(&mut frame, format_args!("{number}"));
                }
                id => frame
                    .push_str(&serde_json::to_string(id).expect("a message id always serializes")),
            }
            frame.push_str(r#","status":""#);
            frame.push_str(status.as_str());
            frame.push('"');
            if *duplicate {
                frame.push_str(r#","duplicate":true"#);
            }
            frame.push_str("}}");
            frame
        }
        AckResult::Refused(rejection) => rejection.to_frame(Some(id)),
    }
}

/// One step of draining a stopping connection: the frames of the next answer that comes in,
/// or, once `deadline` has passed, the refusals (`shutting_down`) of everything still unanswered;
/// `None` when nothing is left. A stopping connection sends what each step returns, then closes.
pub async fn drain_step(
    tracker: &mut AckTracker,
    late_answers: &mut Option<mpsc::UnboundedReceiver<AckOutcome>>,
    deadline: tokio::time::Instant,
) -> Option<Vec<String>> {
    if !tracker.awaits_answers() {
        return None;
    }
    tokio::select! {
        _ = tokio::time::sleep_until(deadline) => Some(tracker.refuse_all_waiting()),
        outcome = next_outcome(late_answers) => Some(match outcome {
            Some(outcome) => answer_ready(Some(tracker), late_answers, outcome),
            // Every sender is gone: no answer can come any more.
            None => tracker.refuse_all_waiting(),
        }),
    }
}

/// At most this many answers are taken in one go, so a flood of answers cannot keep a
/// connection from reading its socket or its downlinks for long.
const MAX_ANSWERS_AT_ONCE: usize = 256;

/// The frames answering `first` and the answers already waiting behind it (up to
/// [`MAX_ANSWERS_AT_ONCE`]); nothing when the connection does not acknowledge.
pub fn answer_ready(
    tracker: Option<&mut AckTracker>,
    late_answers: &mut Option<mpsc::UnboundedReceiver<AckOutcome>>,
    first: AckOutcome,
) -> Vec<String> {
    let (Some(tracker), Some(answers)) = (tracker, late_answers.as_mut()) else {
        return Vec::new();
    };
    let waiting = std::iter::from_fn(|| answers.try_recv().ok()).take(MAX_ANSWERS_AT_ONCE - 1);
    tracker.answer_all(std::iter::once(first).chain(waiting))
}

/// Waits for the next late answer; never resolves when the listener does not acknowledge.
pub async fn next_outcome(
    receiver: &mut Option<mpsc::UnboundedReceiver<AckOutcome>>,
) -> Option<AckOutcome> {
    match receiver {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn tracker(doc: Value) -> AckTracker {
        let definition: ListenerDefinition = serde_json::from_value(doc).unwrap();
        let metrics = std::sync::Arc::new(Metrics::new());
        AckTracker::new(&definition, metrics.listener("l"), metrics)
            .expect("acknowledging")
            .0
    }

    fn listener(content_type: &str) -> Value {
        json!({"key": "l-1", "name": "l", "listenerType": "websocket", "mode": "server",
               "contentType": content_type, "path": "/d", "sentinel": "s-1",
               "acknowledge": "stored", "maxInFlight": 3})
    }

    fn acked(status: AckStatus) -> AckResult {
        AckResult::Acked {
            status,
            duplicate: false,
        }
    }

    fn parse(frames: &[String]) -> Vec<Value> {
        frames
            .iter()
            .map(|f| serde_json::from_str(f).unwrap())
            .collect()
    }

    #[test]
    fn body_ids_are_read_and_answered_at_once() {
        let mut t = tracker(listener("json"));
        let payload = Payload::Json(json!({"messageId": "m-1"}));
        let id = t.message_id(1, Some(&payload)).unwrap();
        assert_eq!(id, MessageId::Text("m-1".into()));
        let missing = t
            .message_id(2, Some(&Payload::Json(json!({}))))
            .unwrap_err();
        assert_eq!(missing.code, RejectionCode::MissingMessageId);
        let invalid = t
            .message_id(3, Some(&Payload::Json(json!({"messageId": [1]}))))
            .unwrap_err();
        assert_eq!(invalid.code, RejectionCode::InvalidMessageId);

        t.wait_for(id.clone());
        assert_eq!(t.in_flight(), 1);
        let frames = parse(&t.answer(id, acked(AckStatus::Stored), Instant::now()));
        assert_eq!(
            frames,
            [json!({"ack": {"messageId": "m-1", "status": "stored"}})]
        );
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn frames_are_answered_in_order_and_cumulatively() {
        let mut t = tracker(listener("text"));
        let ids: Vec<MessageId> = (0..4)
            .map(|_| {
                let n = t.frame_received();
                t.message_id(n, None).unwrap()
            })
            .collect();
        for id in &ids[..3] {
            t.wait_for(id.clone());
        }
        assert!(!t.can_read(), "three in flight is the limit");
        // Frame 3 and 2 answer first: held back until frame 1 is answered.
        assert!(t
            .answer(ids[2].clone(), acked(AckStatus::Stored), Instant::now())
            .is_empty());
        let refusal = Rejection::new(RejectionCode::DownstreamUnavailable, "down")
            .retry_after(Duration::from_millis(2000));
        assert!(t
            .answer(ids[1].clone(), AckResult::Refused(refusal), Instant::now())
            .is_empty());
        let frames = parse(&t.answer(ids[0].clone(), acked(AckStatus::Stored), Instant::now()));
        assert_eq!(
            frames,
            [
                json!({"ack": {"messageId": 1, "status": "stored"}}),
                json!({"error": {"code": "downstream_unavailable", "message": "down", "messageId": 2, "retryAfterMs": 2000}}),
                json!({"ack": {"messageId": 3, "status": "stored"}}),
            ]
        );
        // Frame 4 answered at once after that.
        let frames = parse(&t.answer(ids[3].clone(), acked(AckStatus::Accepted), Instant::now()));
        assert_eq!(
            frames,
            [json!({"ack": {"messageId": 4, "status": "accepted"}})]
        );
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_stopping_connection_refuses_what_is_left() {
        let mut t = tracker(listener("json"));
        t.wait_for(MessageId::Text("a".into()));
        t.wait_for(MessageId::Integer(7.into()));
        let frames = parse(&t.refuse_all_waiting());
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1]["error"]["code"], "shutting_down");
        assert_eq!(frames[1]["error"]["messageId"], 7);
        assert!(!t.awaits_answers());
    }

    fn outcome(id: MessageId, result: AckResult) -> AckOutcome {
        AckOutcome {
            message_id: id,
            result,
            received: Instant::now(),
        }
    }

    #[test]
    fn answers_ready_together_leave_as_one_cumulative_ack() {
        let mut t = tracker(listener("binary"));
        let ids: Vec<MessageId> = (0..3)
            .map(|_| {
                let n = t.frame_received();
                t.message_id(n, None).unwrap()
            })
            .collect();
        for id in &ids {
            t.wait_for(id.clone());
        }
        let frames = parse(
            &t.answer_all(
                ids.iter()
                    .rev()
                    .map(|id| outcome(id.clone(), acked(AckStatus::Stored))),
            ),
        );
        assert_eq!(
            frames,
            [json!({"ack": {"messageId": 3, "status": "stored"}})]
        );
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn ack_frames_are_json_whatever_the_id() {
        let mut t = tracker(listener("json"));
        let ids = [
            MessageId::Text("quote \" backslash \\ newline \n é".into()),
            MessageId::Integer((-42).into()),
            MessageId::Integer(u64::MAX.into()),
        ];
        for id in &ids {
            t.wait_for(id.clone());
        }
        let frames = parse(&t.answer_all([
            outcome(ids[0].clone(), acked(AckStatus::Accepted)),
            outcome(
                ids[1].clone(),
                AckResult::Acked {
                    status: AckStatus::Stored,
                    duplicate: true,
                },
            ),
            outcome(ids[2].clone(), acked(AckStatus::Stored)),
        ]));
        assert_eq!(
            frames,
            [
                json!({"ack": {"messageId": "quote \" backslash \\ newline \n é", "status": "accepted"}}),
                json!({"ack": {"messageId": -42, "status": "stored", "duplicate": true}}),
                json!({"ack": {"messageId": u64::MAX, "status": "stored"}}),
            ]
        );
    }
}
