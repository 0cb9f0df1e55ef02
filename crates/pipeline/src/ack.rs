//! Acknowledged delivery inside the pipeline: what a listener hears back about one message.
//!
//! A message on a listener with `acknowledge: stored` gets a [`DeliveryTicket`]. Every *durable*
//! downstream it is routed to (the telemetry store, a webhook) receives a [`Receipt`] with the
//! envelope and settles it once its work is committed — or refused, with a reason and a hint when
//! to retry. When the last receipt is settled the ticket sends one [`AckOutcome`] to the
//! connection that received the message. A receipt that is dropped unsettled (a module stopped, a
//! queue closed) refuses the message, so every message a device waits on gets an answer.
//!
//! Refusals win over acknowledgements: if one durable downstream committed the message and
//! another could not, the device is refused and retries; the downstream that had it already
//! recognises the retry as a duplicate by its message id.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iotgate_core::MessageId;
use tokio::sync::mpsc;

use crate::registry::RegisteredDevice;
use crate::rejection::{Rejection, RejectionCode};

/// What an acknowledgement says was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    /// In the queue of every routed downstream (or routed only to non-durable ones).
    Accepted,
    /// Committed by every durable downstream it was routed to.
    Stored,
}

impl AckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Accepted => "accepted",
            AckStatus::Stored => "stored",
        }
    }
}

/// The answer a device gets about one message.
#[derive(Debug, Clone, PartialEq)]
pub enum AckResult {
    Acked {
        status: AckStatus,
        /// The message was already stored earlier (a retry); it was not stored again.
        duplicate: bool,
    },
    Refused(Rejection),
}

/// One message's answer, sent to its connection.
#[derive(Debug)]
pub struct AckOutcome {
    pub message_id: MessageId,
    pub result: AckResult,
    /// When the listener received the message, for the acknowledgement latency histogram.
    pub received: Instant,
}

/// Where the answers of one connection's messages go. Unbounded on purpose: a connection has at
/// most `maxInFlight` unanswered messages, each answered once, so the channel holds at most that
/// many outcomes.
pub type OutcomeSender = mpsc::UnboundedSender<AckOutcome>;

struct TicketState {
    message_id: MessageId,
    received: Instant,
    /// Receipts not yet settled, plus one while the pipeline is still handing receipts out.
    pending: AtomicUsize,
    durable_targets: AtomicUsize,
    duplicate: AtomicBool,
    /// The first refusal; it decides the answer.
    refusal: Mutex<Option<Rejection>>,
    outcomes: OutcomeSender,
    /// The message's id and its device, remembered when the answer is an acknowledgement, so an
    /// immediate retry is answered without delivering it again.
    remember: Option<(String, Arc<RegisteredDevice>)>,
}

impl TicketState {
    fn outcome(&self) -> AckOutcome {
        let refusal = self.refusal.lock().expect("ticket lock").take();
        let result = match refusal {
            Some(rejection) => AckResult::Refused(rejection),
            None => {
                let status = if self.durable_targets.load(Ordering::Relaxed) > 0 {
                    AckStatus::Stored
                } else {
                    AckStatus::Accepted
                };
                if let Some((key, device)) = &self.remember {
                    device.remember_ack(key, status);
                }
                AckResult::Acked {
                    status,
                    duplicate: self.duplicate.load(Ordering::Relaxed),
                }
            }
        };
        AckOutcome {
            message_id: self.message_id.clone(),
            result,
            received: self.received,
        }
    }

    /// Counts one settlement down; the last one produces the outcome.
    fn release(&self) -> Option<AckOutcome> {
        (self.pending.fetch_sub(1, Ordering::AcqRel) == 1).then(|| self.outcome())
    }
}

/// The pipeline's side of one acknowledged message while it hands receipts out.
pub struct DeliveryTicket {
    state: Arc<TicketState>,
}

impl DeliveryTicket {
    pub fn new(
        message_id: MessageId,
        received: Instant,
        outcomes: OutcomeSender,
        remember: Option<(String, Arc<RegisteredDevice>)>,
    ) -> Self {
        Self {
            state: Arc::new(TicketState {
                message_id,
                received,
                pending: AtomicUsize::new(1),
                durable_targets: AtomicUsize::new(0),
                duplicate: AtomicBool::new(false),
                refusal: Mutex::new(None),
                outcomes,
                remember,
            }),
        }
    }

    /// A receipt for one more durable downstream.
    pub fn receipt(&self) -> Receipt {
        self.state.pending.fetch_add(1, Ordering::AcqRel);
        self.state.durable_targets.fetch_add(1, Ordering::Relaxed);
        Receipt {
            state: Some(self.state.clone()),
        }
    }

    /// Refuses the message outright (e.g. a routed downstream is not running).
    pub fn refuse(&self, rejection: Rejection) {
        let mut refusal = self.state.refusal.lock().expect("ticket lock");
        refusal.get_or_insert(rejection);
    }

    /// Every receipt is out. Returns the outcome now when nothing is left to wait for (no durable
    /// target, or all settled already); otherwise it will be sent to the connection.
    pub fn dispatched(self) -> Option<AckOutcome> {
        self.state.release()
    }
}

/// A durable downstream's promise to settle one acknowledged message.
pub struct Receipt {
    state: Option<Arc<TicketState>>,
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Receipt")
    }
}

impl Receipt {
    /// The downstream committed the message (or already held it: `duplicate`).
    pub fn stored(mut self, duplicate: bool) {
        if let Some(state) = self.state.take() {
            if duplicate {
                state.duplicate.store(true, Ordering::Relaxed);
            }
            settle(&state);
        }
    }

    /// The downstream could not commit the message; the device should retry after the hint.
    pub fn refused(mut self, message: impl Into<String>, retry_after: Duration) {
        if let Some(state) = self.state.take() {
            refuse_into(&state, unavailable(message, retry_after));
            settle(&state);
        }
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            refuse_into(
                &state,
                unavailable(
                    "the downstream stopped before it committed the message",
                    Duration::from_secs(1),
                ),
            );
            settle(&state);
        }
    }
}

fn unavailable(message: impl Into<String>, retry_after: Duration) -> Rejection {
    Rejection::new(RejectionCode::DownstreamUnavailable, message).retry_after(retry_after)
}

fn refuse_into(state: &TicketState, rejection: Rejection) {
    state
        .refusal
        .lock()
        .expect("ticket lock")
        .get_or_insert(rejection);
}

fn settle(state: &TicketState) {
    if let Some(outcome) = state.release() {
        // The connection may be gone (the device disconnected): its answer has nowhere to go,
        // and the device will retry on its next connection.
        let _ = state.outcomes.send(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket() -> (DeliveryTicket, mpsc::UnboundedReceiver<AckOutcome>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (
            DeliveryTicket::new(MessageId::Frame(1), Instant::now(), sender, None),
            receiver,
        )
    }

    #[test]
    fn no_durable_target_answers_at_once_as_accepted() {
        let (ticket, _rx) = ticket();
        let outcome = ticket.dispatched().expect("answered at once");
        assert_eq!(
            outcome.result,
            AckResult::Acked {
                status: AckStatus::Accepted,
                duplicate: false
            }
        );
    }

    #[test]
    fn the_last_receipt_answers_through_the_channel() {
        let (ticket, mut rx) = ticket();
        let a = ticket.receipt();
        let b = ticket.receipt();
        assert!(ticket.dispatched().is_none());
        a.stored(false);
        assert!(rx.try_recv().is_err(), "one receipt is still open");
        b.stored(true);
        let outcome = rx.try_recv().expect("answered");
        assert_eq!(
            outcome.result,
            AckResult::Acked {
                status: AckStatus::Stored,
                duplicate: true
            }
        );
    }

    #[test]
    fn a_refusal_wins_and_a_dropped_receipt_refuses() {
        let (ticket, mut rx) = ticket();
        let a = ticket.receipt();
        let b = ticket.receipt();
        assert!(ticket.dispatched().is_none());
        a.stored(false);
        drop(b);
        let outcome = rx.try_recv().expect("answered");
        match outcome.result {
            AckResult::Refused(rejection) => {
                assert_eq!(rejection.code, RejectionCode::DownstreamUnavailable);
                assert!(rejection.retry_after.is_some());
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn settled_before_dispatch_answers_from_dispatch() {
        let (ticket, mut rx) = ticket();
        ticket
            .receipt()
            .refused("down", Duration::from_millis(1500));
        let outcome = ticket.dispatched().expect("answered at dispatch");
        assert!(
            matches!(outcome.result, AckResult::Refused(ref r) if r.retry_after == Some(Duration::from_millis(1500)))
        );
        assert!(rx.try_recv().is_err(), "answered once");
    }
}
