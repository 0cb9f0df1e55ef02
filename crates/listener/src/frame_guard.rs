//! A guard in front of the WebSocket codec that reads every client frame header as the bytes
//! arrive, and stops the connection as soon as the stream breaks a rule:
//!
//! - the frame cap (`websocket.maxFrameBytes`) and the message cap (`maxMessageBytes`): actix-http
//!   compares a frame's declared length with its limit only once the whole frame has arrived, so a
//!   header announcing 2^63 bytes would make the connection buffer whatever follows (→ 1009);
//! - the framing rules of RFC 6455 (reserved bits without an extension, reserved opcodes,
//!   fragmented or oversized control frames, a continuation with no message, a new message inside
//!   a fragmented one, an unmasked client frame) (→ 1002);
//! - UTF-8 in text messages, checked as fragments arrive, so a bad byte fails the connection at
//!   once instead of when the last fragment comes (RFC 6455 "fail fast"; Autobahn 6.4.x) (→ 1007).
//!
//! On a connection that negotiated permessage-deflate, `deflate::inflate` runs in front of the
//! guard and hands it each compressed message inflated, as frames with RSV1 clear: the caps and
//! the UTF-8 check then hold for the inflated bytes, and any RSV1 the guard still sees is one the
//! extension does not allow (a continuation, a control frame).
//!
//! The bytes before the offending frame are passed on first, so the codec still delivers every
//! message that was complete before it (actix-ws would otherwise return its own error ahead of
//! them: Autobahn's "echo before the error" cases); the next read returns the error, and the
//! connection task reads the verdict to pick the close code. Payloads are never buffered: text
//! payloads are unmasked a few bytes at a time on the stack to be checked.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use futures_util::Stream;

/// What the guard found wrong; shared with the connection task.
#[derive(Debug, Default)]
pub struct GuardVerdict(AtomicU8);

/// The kinds of [`GuardVerdict`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A frame over the frame cap, or a message over the message cap (1009).
    TooBig,
    /// A text message that is not UTF-8 (1007).
    InvalidUtf8,
    /// A frame that breaks RFC 6455's framing rules (1002).
    Protocol,
}

impl Violation {
    /// How the connection is closed for it (`too_big`: the reason naming the caps).
    pub fn close_reason(self, too_big: impl FnOnce() -> String) -> actix_ws::CloseReason {
        use actix_ws::{CloseCode, CloseReason};
        let (code, description) = match self {
            Violation::TooBig => (CloseCode::Size, too_big()),
            Violation::InvalidUtf8 => {
                (CloseCode::Invalid, "text message is not valid UTF-8".into())
            }
            Violation::Protocol => (
                CloseCode::Protocol,
                "the frame breaks the WebSocket framing rules (RFC 6455 section 5)".into(),
            ),
        };
        CloseReason {
            code,
            description: Some(description),
        }
    }
}

/// RFC 6455 §5.2: how many bytes a frame header takes, from its second byte (the 7-bit length,
/// which may announce a 2- or 8-byte extended length, and the mask bit).
pub(crate) fn header_size(second_byte: u8) -> usize {
    let extended = match second_byte & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second_byte & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

/// The payload length a complete frame header declares.
pub(crate) fn declared_length(header: &[u8]) -> u64 {
    match header[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([header[2], header[3]])),
        127 => u64::from_be_bytes(header[2..10].try_into().expect("8 bytes")),
        n => u64::from(n),
    }
}

impl GuardVerdict {
    pub(crate) fn set(&self, violation: Violation) {
        let code = match violation {
            Violation::TooBig => 1,
            Violation::InvalidUtf8 => 2,
            Violation::Protocol => 3,
        };
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The violation found, if any.
    pub fn get(&self) -> Option<Violation> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(Violation::TooBig),
            2 => Some(Violation::InvalidUtf8),
            3 => Some(Violation::Protocol),
            _ => None,
        }
    }
}

/// What [`FrameGuard::inspect`] decided about one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inspection {
    /// Every byte may go on.
    Pass,
    /// The first `keep` bytes may go on (frames complete before the offending one); then the
    /// stream must end with an error.
    Stop { keep: usize },
}

/// Parses frame headers out of a client byte stream, tracking message sizes, fragmentation and
/// the UTF-8 of text messages.
#[derive(Debug)]
pub struct FrameGuard {
    max_frame_bytes: u64,
    max_message_bytes: u64,
    header: [u8; 14],
    header_len: usize,
    payload_left: u64,
    message_bytes: u64,
    /// A data message was started and its final fragment has not come yet.
    fragmented: bool,
    /// The message in progress is text (its payload is checked as UTF-8).
    text: bool,
    /// The current frame's payload is part of a text message.
    checking: bool,
    /// The current frame is the final fragment of its message.
    fin: bool,
    mask: [u8; 4],
    /// Payload bytes of the current frame seen so far (the mask's position).
    mask_offset: usize,
    /// The start of a UTF-8 sequence cut by a fragment or read boundary (at most 3 bytes).
    utf8_carry: [u8; 4],
    utf8_carry_len: usize,
    verdict: Arc<GuardVerdict>,
}

impl FrameGuard {
    pub fn new(
        max_frame_bytes: usize,
        max_message_bytes: usize,
        verdict: Arc<GuardVerdict>,
    ) -> Self {
        Self {
            max_frame_bytes: max_frame_bytes as u64,
            max_message_bytes: max_message_bytes as u64,
            header: [0; 14],
            header_len: 0,
            payload_left: 0,
            message_bytes: 0,
            fragmented: false,
            text: false,
            checking: false,
            fin: false,
            mask: [0; 4],
            mask_offset: 0,
            utf8_carry: [0; 4],
            utf8_carry_len: 0,
            verdict,
        }
    }

    /// Header bytes needed once the first two are known.
    fn header_size(&self) -> usize {
        header_size(self.header[1])
    }

    fn declared_length(&self) -> u64 {
        declared_length(&self.header)
    }

    fn stop(&self, violation: Violation, frame_start: Option<usize>) -> Inspection {
        self.verdict.set(violation);
        Inspection::Stop {
            keep: frame_start.unwrap_or(0),
        }
    }

    /// Inspects the next chunk of the stream.
    pub fn inspect(&mut self, chunk: &[u8]) -> Inspection {
        let mut at = 0;
        // Where the frame being read began in this chunk (None: in an earlier chunk).
        let mut frame_start = if self.header_len == 0 && self.payload_left == 0 {
            Some(0)
        } else {
            None
        };
        while at < chunk.len() {
            if self.payload_left > 0 {
                let take = self.payload_left.min((chunk.len() - at) as u64) as usize;
                if self.checking && !self.check_utf8(&chunk[at..at + take]) {
                    return self.stop(Violation::InvalidUtf8, frame_start);
                }
                self.payload_left -= take as u64;
                at += take;
                if self.payload_left == 0 && !self.finish_frame() {
                    return self.stop(Violation::InvalidUtf8, frame_start);
                }
                if self.payload_left == 0 {
                    frame_start = Some(at);
                }
                continue;
            }
            let needed = if self.header_len < 2 {
                2
            } else {
                self.header_size()
            };
            let take = (needed - self.header_len).min(chunk.len() - at);
            let first_byte_arrived = self.header_len == 0 && take > 0;
            self.header[self.header_len..self.header_len + take]
                .copy_from_slice(&chunk[at..at + take]);
            self.header_len += take;
            at += take;
            // What the first byte alone breaks is refused as soon as it arrives: the codec
            // checks it before the second byte is there, and would report its error ahead of
            // the messages completed before it.
            if first_byte_arrived {
                if let Err(violation) = self.check_first_byte() {
                    return self.stop(violation, frame_start);
                }
            }
            if self.header_len < 2 || self.header_len < self.header_size() {
                continue;
            }
            if let Err(violation) = self.start_frame() {
                return self.stop(violation, frame_start);
            }
            self.header_len = 0;
            if self.payload_left == 0 {
                if !self.finish_frame() {
                    return self.stop(Violation::InvalidUtf8, frame_start);
                }
                frame_start = Some(at);
            }
        }
        Inspection::Pass
    }

    /// The rules the first header byte (FIN, reserved bits, opcode) can break on its own.
    fn check_first_byte(&self) -> Result<(), Violation> {
        let fin = self.header[0] & 0x80 != 0;
        let opcode = self.header[0] & 0x0f;
        let allowed = match opcode {
            0x1 | 0x2 => !self.fragmented,
            0x0 => self.fragmented,
            0x8..=0xa => fin,
            _ => false,
        };
        if self.header[0] & 0x70 != 0 || !allowed {
            return Err(Violation::Protocol);
        }
        Ok(())
    }

    /// Checks a complete header and sets up the frame's payload.
    fn start_frame(&mut self) -> Result<(), Violation> {
        let fin = self.header[0] & 0x80 != 0;
        let reserved_bits = self.header[0] & 0x70;
        let opcode = self.header[0] & 0x0f;
        let masked = self.header[1] & 0x80 != 0;
        let length = self.declared_length();
        if reserved_bits != 0 || !masked {
            return Err(Violation::Protocol);
        }
        match opcode {
            // A new message, which may not start inside a fragmented one.
            0x1 | 0x2 => {
                if self.fragmented {
                    return Err(Violation::Protocol);
                }
                self.text = opcode == 0x1;
                self.message_bytes = length;
                self.fragmented = !fin;
                self.utf8_carry_len = 0;
            }
            // A continuation needs a message to continue.
            0x0 => {
                if !self.fragmented {
                    return Err(Violation::Protocol);
                }
                self.message_bytes = self.message_bytes.saturating_add(length);
                self.fragmented = !fin;
            }
            // Control frames: final, at most 125 bytes; they do not count towards a message.
            0x8..=0xa => {
                if !fin || length > 125 {
                    return Err(Violation::Protocol);
                }
            }
            _ => return Err(Violation::Protocol),
        }
        let data = opcode <= 0x2;
        if data && (length > self.max_frame_bytes || self.message_bytes > self.max_message_bytes) {
            return Err(Violation::TooBig);
        }
        self.checking = data && self.text;
        self.fin = fin;
        let end = self.header_size();
        self.mask = self.header[end - 4..end].try_into().expect("4 bytes");
        self.mask_offset = 0;
        self.payload_left = length;
        Ok(())
    }

    /// At the end of a frame's payload: the final fragment of a text message may not end inside
    /// a UTF-8 sequence.
    fn finish_frame(&mut self) -> bool {
        let ends_text = self.checking && self.fin;
        self.checking = false;
        !(ends_text && self.utf8_carry_len > 0)
    }

    /// Unmasks and checks `masked` payload bytes of a text message, carrying an incomplete
    /// sequence at the end over to the next bytes; false at the first byte that cannot be UTF-8.
    fn check_utf8(&mut self, masked: &[u8]) -> bool {
        let mut buffer = [0u8; 260];
        for piece in masked.chunks(256) {
            let carried = self.utf8_carry_len;
            buffer[..carried].copy_from_slice(&self.utf8_carry[..carried]);
            let mut mask = self.mask;
            mask.rotate_left(self.mask_offset);
            for (out, (byte, key)) in buffer[carried..]
                .iter_mut()
                .zip(piece.iter().zip(mask.iter().cycle()))
            {
                *out = byte ^ key;
            }
            self.mask_offset = (self.mask_offset + piece.len()) % 4;
            let bytes = &buffer[..carried + piece.len()];
            match std::str::from_utf8(bytes) {
                Ok(_) => self.utf8_carry_len = 0,
                Err(error) if error.error_len().is_some() => return false,
                Err(error) => {
                    // An incomplete sequence at the end: keep it for the next bytes.
                    let tail = &bytes[error.valid_up_to()..];
                    self.utf8_carry[..tail.len()].copy_from_slice(tail);
                    self.utf8_carry_len = tail.len();
                }
            }
        }
        true
    }
}

/// A request payload the guard sees before the codec does.
struct GuardedPayload {
    inner: actix_web::dev::Payload,
    guard: FrameGuard,
    state: StreamState,
}

/// What a payload stream answers a poll with.
pub(crate) type PayloadPoll = Poll<Option<Result<Bytes, PayloadError>>>;

/// Where a payload stream that checks the client's bytes is, and how it ends after a violation
/// (shared by the guard and the permessage-deflate inflater in front of it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum StreamState {
    #[default]
    Reading,
    /// The stream was stopped. The next poll answers `Pending` (and wakes the task at once):
    /// actix-ws reads until the payload is pending before it decodes, so this is what lets it
    /// deliver the messages completed before the violation.
    Draining,
    /// The poll after that ends the stream with an error.
    Failing,
    Done,
}

impl StreamState {
    /// The answer to a poll once the stream was stopped; `None` while it is reading.
    pub(crate) fn poll_stopped(&mut self, cx: &mut Context<'_>) -> Option<PayloadPoll> {
        match *self {
            StreamState::Reading => None,
            StreamState::Draining => {
                *self = StreamState::Failing;
                cx.waker().wake_by_ref();
                Some(Poll::Pending)
            }
            StreamState::Failing => {
                *self = StreamState::Done;
                Some(Poll::Ready(Some(Err(PayloadError::Overflow))))
            }
            StreamState::Done => Some(Poll::Ready(None)),
        }
    }

    /// Stops the stream after a violation; `kept` (the frames complete before it) goes on first.
    pub(crate) fn stop(&mut self, cx: &mut Context<'_>, kept: Bytes) -> PayloadPoll {
        if kept.is_empty() {
            *self = StreamState::Failing;
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            *self = StreamState::Draining;
            Poll::Ready(Some(Ok(kept)))
        }
    }
}

impl Stream for GuardedPayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> PayloadPoll {
        let this = &mut *self;
        if let Some(answer) = this.state.poll_stopped(cx) {
            return answer;
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(bytes))) => match this.guard.inspect(&bytes) {
                Inspection::Pass => Poll::Ready(Some(Ok(bytes))),
                Inspection::Stop { keep } => this.state.stop(cx, bytes.slice(..keep)),
            },
            other => other,
        }
    }
}

/// Wraps a request payload so the guard sees every chunk before the codec does.
pub fn guard_payload(
    payload: actix_web::dev::Payload,
    max_frame_bytes: usize,
    max_message_bytes: usize,
    verdict: Arc<GuardVerdict>,
) -> actix_web::dev::Payload {
    let guarded = GuardedPayload {
        inner: payload,
        guard: FrameGuard::new(max_frame_bytes, max_message_bytes, verdict),
        state: StreamState::Reading,
    };
    actix_web::dev::Payload::from(Box::pin(guarded) as actix_http::BoxedPayloadStream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame header (masked with 1, 2, 3, 4 unless `masked` is false).
    fn frame(opcode: u8, fin: bool, length: u64, masked: bool) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match length {
            0..=125 => out.push(mask_bit | length as u8),
            126..=0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(length as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&length.to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&MASK);
        }
        out
    }

    const MASK: [u8; 4] = [1, 2, 3, 4];

    /// A whole masked frame carrying `payload`.
    fn with_payload(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = frame(opcode, fin, payload.len() as u64, true);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        out
    }

    fn guard(max: usize) -> (FrameGuard, Arc<GuardVerdict>) {
        let verdict = Arc::new(GuardVerdict::default());
        (FrameGuard::new(max, max, verdict.clone()), verdict)
    }

    fn passes(g: &mut FrameGuard, bytes: &[u8]) -> bool {
        g.inspect(bytes) == Inspection::Pass
    }

    #[test]
    fn huge_declared_length_trips_at_the_header() {
        let (mut g, verdict) = guard(4096);
        let header = frame(0x2, true, (1 << 63) - 1, true);
        // Delivered a byte at a time, the guard still trips once the length is known.
        let mut ok = true;
        for byte in &header {
            ok = passes(&mut g, std::slice::from_ref(byte));
            if !ok {
                break;
            }
        }
        assert!(!ok);
        assert_eq!(verdict.get(), Some(Violation::TooBig));
    }

    #[test]
    fn frames_within_the_limit_pass_across_chunk_boundaries() {
        let (mut g, verdict) = guard(300);
        let mut stream = with_payload(0x1, true, &[b'a'; 200]);
        stream.extend(with_payload(0x9, true, &[0; 4]));
        stream.extend(with_payload(0x2, true, &[0xff; 300]));
        for piece in stream.chunks(7) {
            assert!(passes(&mut g, piece));
        }
        assert_eq!(verdict.get(), None);
    }

    #[test]
    fn continuations_count_towards_the_message() {
        let (mut g, _) = guard(10);
        assert!(passes(&mut g, &with_payload(0x2, false, &[0; 4])));
        assert!(passes(&mut g, &with_payload(0x0, false, &[0; 4])));
        // A control frame in between does not count.
        assert!(passes(&mut g, &with_payload(0x9, true, &[0; 5])));
        assert!(!passes(&mut g, &frame(0x0, true, 3, true)));
    }

    #[test]
    fn frame_cap_below_the_message_cap_passes_fragmented_messages() {
        let verdict = Arc::new(GuardVerdict::default());
        let mut g = FrameGuard::new(16, 64, verdict.clone());
        // Four 16-byte frames make a 64-byte message: within both caps.
        for (opcode, fin) in [(0x2, false), (0x0, false), (0x0, false), (0x0, true)] {
            assert!(passes(&mut g, &with_payload(opcode, fin, &[0; 16])));
        }
        assert_eq!(verdict.get(), None);
        // One 17-byte frame is over the frame cap, though far under the message cap.
        assert!(!passes(&mut g, &frame(0x2, true, 17, true)));
        assert_eq!(verdict.get(), Some(Violation::TooBig));
    }

    #[test]
    fn invalid_utf8_fails_at_its_fragment_not_at_the_end_of_the_message() {
        let (mut g, verdict) = guard(4096);
        assert!(passes(&mut g, &with_payload(0x1, false, b"caf")));
        // "é" cut between two fragments (and a ping between them) is fine.
        assert!(passes(&mut g, &with_payload(0x0, false, &[0xc3])));
        assert!(passes(&mut g, &with_payload(0x9, true, b"ping")));
        assert!(passes(&mut g, &with_payload(0x0, false, &[0xa9, b' '])));
        // 0xff can never be UTF-8: the guard stops here, before the final fragment.
        assert_eq!(
            g.inspect(&with_payload(0x0, false, &[b'o', 0xff, b'k'])),
            Inspection::Stop { keep: 0 }
        );
        assert_eq!(verdict.get(), Some(Violation::InvalidUtf8));
    }

    #[test]
    fn multibyte_text_unmasks_right_across_reads_and_long_payloads() {
        // 700 bytes of two-byte characters, read 7 bytes at a time: a wrong mask position or a
        // lost carry would turn them into invalid UTF-8.
        let text = "é".repeat(350);
        let (mut g, verdict) = guard(4096);
        for piece in with_payload(0x1, true, text.as_bytes()).chunks(7) {
            assert!(passes(&mut g, piece));
        }
        // And in one read, longer than the 256-byte unmasking buffer.
        assert!(passes(&mut g, &with_payload(0x1, true, text.as_bytes())));
        assert_eq!(verdict.get(), None);
    }

    #[test]
    fn a_message_may_not_end_inside_a_utf8_sequence() {
        let (mut g, verdict) = guard(4096);
        assert!(!passes(
            &mut g,
            &with_payload(0x1, true, &[b'a', 0xe2, 0x82])
        ));
        assert_eq!(verdict.get(), Some(Violation::InvalidUtf8));
        // Binary messages are not checked.
        let (mut g, _) = guard(4096);
        assert!(passes(&mut g, &with_payload(0x2, true, &[0xff, 0xfe])));
    }

    #[test]
    fn frames_complete_before_a_violation_go_on_to_the_codec() {
        let (mut g, verdict) = guard(4096);
        let first = with_payload(0x1, true, b"hello");
        let mut stream = first.clone();
        // Reserved bit 1 set, no extension negotiated.
        let mut bad = with_payload(0x1, true, b"x");
        bad[0] |= 0x40;
        stream.extend(bad);
        assert_eq!(g.inspect(&stream), Inspection::Stop { keep: first.len() });
        assert_eq!(verdict.get(), Some(Violation::Protocol));
    }

    #[test]
    fn framing_rules_are_enforced() {
        let protocol = |bytes: Vec<u8>| {
            let (mut g, verdict) = guard(4096);
            let stopped = !passes(&mut g, &bytes);
            stopped && verdict.get() == Some(Violation::Protocol)
        };
        // A reserved opcode, an unmasked frame, a continuation of nothing, a fragmented ping,
        // a 126-byte ping, a new message inside a fragmented one.
        assert!(protocol(with_payload(0x3, true, b"")));
        assert!(protocol(frame(0x1, true, 0, false)));
        assert!(protocol(with_payload(0x0, true, b"x")));
        assert!(protocol(with_payload(0x9, false, b"")));
        assert!(protocol(with_payload(0x9, true, &[0; 126])));
        let mut interleaved = with_payload(0x1, false, b"a");
        interleaved.extend(with_payload(0x1, true, b"b"));
        assert!(protocol(interleaved));
    }
}
