//! Inbound permessage-deflate: turns every compressed message of the peer (RSV1 on its first
//! frame) into ordinary frames carrying the inflated bytes.
//!
//! In server mode [`MessageInflater`] sits in front of the frame guard: the guard and actix's
//! codec behind it then see an uncompressed message and apply their rules to the inflated bytes
//! (the message cap and UTF-8 of text). In client mode it sits in front of tungstenite (see
//! [`super::client_stream`]). The frame cap is checked here, on the compressed frame as it came
//! and on what it inflates to; the frames written here are never larger than it. In server mode
//! the frames written here are masked with the key 0 (the codec wants masked client frames, and
//! XOR with 0 leaves the payload as inflated); in client mode they are unmasked, as server
//! frames are. Every other frame passes through untouched, reserved bits and all, so RSV1 on a
//! continuation or a control frame still reaches the guard (or tungstenite) and fails with 1002.
//!
//! A compression bomb cannot grow memory: inflating happens in steps of at most one output frame,
//! this stream yields once a frame is ready, and the message is stopped (1009) as soon as its
//! inflated size passes `maxMessageBytes`, before more input is inflated.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use bytes::BytesMut;
use flate2::{Decompress, FlushDecompress, Status};
use futures_util::Stream;

use super::{
    apply_mask, write_frame_header, Agreement, FrameHeader, HeaderReader, Role, DEFLATE_TAIL,
};
use crate::frame_guard::{GuardVerdict, PayloadPoll, StreamState, Violation};

/// Largest frame written for inflated bytes (lower when the frame cap is lower).
const OUTPUT_FRAME_BYTES: usize = 16 * 1024;
/// Compressed bytes unmasked per inflate call.
const UNMASK_STEP: usize = 1024;
/// The mask key of the frames written here: the payload goes unchanged.
const ZERO_MASK: [u8; 4] = [0; 4];

/// The frame being read.
#[derive(Debug, Clone, Copy)]
enum CurrentFrame {
    /// Between frames (or inside a header).
    None,
    /// A frame passed on as it came: this many payload bytes are left.
    Untouched { left: u64 },
    /// A frame of a compressed message.
    Compressed {
        left: u64,
        mask: [u8; 4],
        /// Payload bytes already read (the mask's position).
        offset: usize,
        fin: bool,
    },
}

/// Rewrites the peer's byte stream of a connection that negotiated permessage-deflate.
pub struct MessageInflater {
    /// The peer's frames are masked (iotgate is the server); the frames written here are then
    /// masked with the zero key, else unmasked.
    masked: bool,
    decompress: Decompress,
    /// `client_no_context_takeover`: every message starts with an empty window.
    reset_each_message: bool,
    max_frame_bytes: u64,
    max_message_bytes: u64,
    header: HeaderReader,
    frame: CurrentFrame,
    /// The opcode of the compressed message in progress (0: none).
    message_opcode: u8,
    /// Whether a frame of the message in progress was written (later ones are continuations).
    message_started: bool,
    inflated: u64,
    /// Bytes inflated from the current (or last) compressed frame: the frame cap holds for them.
    frame_inflated: u64,
    /// The peer ended its deflate stream (BFINAL): the inflater restarts with the next message.
    stream_ended: bool,
    /// Inflated bytes not yet written as a frame: the first `output_len` of the buffer, whose
    /// size is the largest frame written.
    output: Vec<u8>,
    output_len: usize,
    unmasked: [u8; UNMASK_STEP],
}

/// Why [`MessageInflater::process`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// The input is used up.
    NeedInput,
    /// A frame's worth of output is ready; call again with the rest of the input.
    OutputReady,
}

impl MessageInflater {
    /// The inflater for what the peer of iotgate in `role` sends.
    pub fn new(
        agreement: &Agreement,
        role: Role,
        max_frame_bytes: usize,
        max_message_bytes: usize,
    ) -> Self {
        let output_frame_bytes = OUTPUT_FRAME_BYTES.min(max_frame_bytes).max(1);
        let peer = agreement.peer_compression(role);
        Self {
            masked: role == Role::Server,
            decompress: Decompress::new_with_window_bits(false, peer.window_bits),
            reset_each_message: peer.no_context_takeover,
            max_frame_bytes: max_frame_bytes as u64,
            max_message_bytes: max_message_bytes as u64,
            header: HeaderReader::default(),
            frame: CurrentFrame::None,
            message_opcode: 0,
            message_started: false,
            inflated: 0,
            frame_inflated: 0,
            stream_ended: false,
            output: vec![0; output_frame_bytes],
            output_len: 0,
            unmasked: [0; UNMASK_STEP],
        }
    }

    /// Reads `input` from `*at`, appending what goes on to `out`.
    pub(crate) fn process(
        &mut self,
        input: &[u8],
        at: &mut usize,
        out: &mut BytesMut,
    ) -> Result<Progress, Violation> {
        while *at < input.len() {
            match self.frame {
                CurrentFrame::None => {
                    let (used, header) = self.header.feed(&input[*at..]);
                    *at += used;
                    if let Some(header) = header {
                        self.start_frame(&header, out)?;
                        if self.end_frame_if_done(out)? == Progress::OutputReady {
                            return Ok(Progress::OutputReady);
                        }
                    }
                }
                CurrentFrame::Untouched { left } => {
                    let take = left.min((input.len() - *at) as u64) as usize;
                    out.extend_from_slice(&input[*at..*at + take]);
                    *at += take;
                    self.frame = CurrentFrame::Untouched {
                        left: left - take as u64,
                    };
                    self.end_frame_if_done(out)?;
                }
                CurrentFrame::Compressed { .. } => {
                    let ready = self.inflate_payload(input, at, out)?;
                    let ended = self.end_frame_if_done(out)?;
                    if ready || ended == Progress::OutputReady {
                        return Ok(Progress::OutputReady);
                    }
                }
            }
        }
        Ok(Progress::NeedInput)
    }

    /// Decides what a complete header starts: a compressed frame to inflate, or a frame to pass.
    fn start_frame(&mut self, header: &FrameHeader, out: &mut BytesMut) -> Result<(), Violation> {
        let opcode = header.opcode();
        let well_formed = !header.other_reserved_bits() && header.mask.is_some() == self.masked;
        let starts_compressed =
            well_formed && header.rsv1() && matches!(opcode, 0x1 | 0x2) && self.message_opcode == 0;
        let continues_compressed =
            well_formed && !header.rsv1() && opcode == 0x0 && self.message_opcode != 0;
        if !(starts_compressed || continues_compressed) {
            // Control frames, uncompressed messages, and every frame breaking a rule (the guard
            // behind refuses those as they are).
            out.extend_from_slice(header.raw_bytes());
            self.frame = CurrentFrame::Untouched {
                left: header.length,
            };
            return Ok(());
        }
        // The frame cap holds for the frames on the wire as well as for the inflated ones.
        if header.length > self.max_frame_bytes {
            return Err(Violation::TooBig);
        }
        self.frame_inflated = 0;
        if starts_compressed {
            self.message_opcode = opcode;
            self.message_started = false;
            self.inflated = 0;
        }
        self.frame = CurrentFrame::Compressed {
            left: header.length,
            mask: header.mask.unwrap_or(ZERO_MASK),
            offset: 0,
            fin: header.fin(),
        };
        Ok(())
    }

    /// At the end of a frame's payload: back to reading headers, and at the end of a compressed
    /// message its last inflated bytes and final frame.
    fn end_frame_if_done(&mut self, out: &mut BytesMut) -> Result<Progress, Violation> {
        match self.frame {
            CurrentFrame::Untouched { left: 0 } => self.frame = CurrentFrame::None,
            CurrentFrame::Compressed { left: 0, fin, .. } => {
                self.frame = CurrentFrame::None;
                if fin {
                    self.finish_message(out)?;
                    return Ok(Progress::OutputReady);
                }
            }
            _ => {}
        }
        Ok(Progress::NeedInput)
    }

    /// Inflates compressed payload bytes of the current frame, one step at a time; true once a
    /// frame's worth of output was written to `out`.
    fn inflate_payload(
        &mut self,
        input: &[u8],
        at: &mut usize,
        out: &mut BytesMut,
    ) -> Result<bool, Violation> {
        let CurrentFrame::Compressed {
            left,
            mask,
            offset,
            fin,
        } = self.frame
        else {
            return Ok(false);
        };
        let take = left.min((input.len() - *at) as u64).min(UNMASK_STEP as u64) as usize;
        self.unmasked[..take].copy_from_slice(&input[*at..*at + take]);
        apply_mask(&mut self.unmasked[..take], mask, offset);
        let consumed = if self.stream_ended {
            // Bytes after the peer's final deflate block carry nothing.
            take
        } else {
            let (consumed, produced) =
                self.inflate(Source::Payload(take), FlushDecompress::None)?;
            if consumed == 0 && produced == 0 && !self.stream_ended {
                // Input and room for output, yet no progress: the stream is broken.
                return Err(Violation::Protocol);
            }
            consumed
        };
        *at += consumed;
        self.frame = CurrentFrame::Compressed {
            left: left - consumed as u64,
            mask,
            offset: offset + consumed,
            fin,
        };
        Ok(self.write_if_full(out))
    }

    /// One inflate call into the free part of the output buffer; the bytes it consumed and
    /// produced. Stops the message once its inflated size passes the message cap, or what one
    /// frame inflates to passes the frame cap.
    fn inflate(
        &mut self,
        source: Source,
        flush: FlushDecompress,
    ) -> Result<(usize, usize), Violation> {
        let input = match source {
            Source::Payload(len) => &self.unmasked[..len],
            Source::Tail(from) => &DEFLATE_TAIL[from..],
        };
        let before_in = self.decompress.total_in();
        let before_out = self.decompress.total_out();
        let status = self
            .decompress
            .decompress(input, &mut self.output[self.output_len..], flush)
            .map_err(|_| Violation::Protocol)?;
        let consumed = (self.decompress.total_in() - before_in) as usize;
        let produced = (self.decompress.total_out() - before_out) as usize;
        if status == Status::StreamEnd {
            self.stream_ended = true;
        }
        self.output_len += produced;
        self.inflated += produced as u64;
        self.frame_inflated += produced as u64;
        if self.inflated > self.max_message_bytes || self.frame_inflated > self.max_frame_bytes {
            return Err(Violation::TooBig);
        }
        Ok((consumed, produced))
    }

    /// Writes the output buffer as a non-final frame once it is full; true when it did.
    fn write_if_full(&mut self, out: &mut BytesMut) -> bool {
        if self.output_len < self.output.len() {
            return false;
        }
        self.write_frame(out, false);
        true
    }

    /// Writes the inflated bytes held as one frame of the message: the first carries the
    /// message's opcode, the others are continuations.
    fn write_frame(&mut self, out: &mut BytesMut, fin: bool) {
        let opcode = if self.message_started {
            0x0
        } else {
            self.message_opcode
        };
        let first_byte = if fin { 0x80 } else { 0 } | opcode;
        out.reserve(14 + self.output_len);
        let mask = self.masked.then_some(ZERO_MASK);
        write_frame_header(out, first_byte, self.output_len, mask);
        out.extend_from_slice(&self.output[..self.output_len]);
        self.output_len = 0;
        self.message_started = true;
    }

    /// The end of a compressed message: the stripped tail goes in (RFC 7692 §7.2.2), what it
    /// releases is written, then the final frame.
    fn finish_message(&mut self, out: &mut BytesMut) -> Result<(), Violation> {
        let mut fed = 0;
        while !self.stream_ended {
            let (consumed, produced) = self.inflate(Source::Tail(fed), FlushDecompress::Sync)?;
            fed += consumed;
            if self.write_if_full(out) {
                continue;
            }
            if fed == DEFLATE_TAIL.len() || (consumed == 0 && produced == 0) {
                break;
            }
        }
        self.write_frame(out, true);
        self.message_opcode = 0;
        if self.reset_each_message || self.stream_ended {
            self.decompress.reset(false);
            self.stream_ended = false;
        }
        Ok(())
    }
}

/// What an inflate call reads.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// The first bytes of the unmasked buffer.
    Payload(usize),
    /// The deflate tail from this offset.
    Tail(usize),
}

/// A request payload whose compressed messages are inflated before the guard sees them.
struct InflatingPayload {
    inner: actix_web::dev::Payload,
    inflater: MessageInflater,
    /// The chunk being read and how far.
    pending: Bytes,
    at: usize,
    out: BytesMut,
    verdict: Arc<GuardVerdict>,
    /// After a violation, ends the stream as the guard does.
    state: StreamState,
}

impl Stream for InflatingPayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> PayloadPoll {
        let this = &mut *self;
        if let Some(answer) = this.state.poll_stopped(cx) {
            return answer;
        }
        loop {
            if this.at < this.pending.len() {
                match this
                    .inflater
                    .process(&this.pending, &mut this.at, &mut this.out)
                {
                    Ok(Progress::OutputReady) if !this.out.is_empty() => {
                        return Poll::Ready(Some(Ok(this.out.split().freeze())));
                    }
                    Ok(_) => {}
                    Err(violation) => {
                        this.verdict.set(violation);
                        return this.state.stop(cx, this.out.split().freeze());
                    }
                }
                continue;
            }
            if !this.out.is_empty() {
                return Poll::Ready(Some(Ok(this.out.split().freeze())));
            }
            match Pin::new(&mut this.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    this.pending = chunk;
                    this.at = 0;
                }
                other => return other,
            }
        }
    }
}

/// Wraps a request payload so compressed messages reach the guard inflated.
pub fn inflating_payload(
    payload: actix_web::dev::Payload,
    agreement: &Agreement,
    max_frame_bytes: usize,
    max_message_bytes: usize,
    verdict: Arc<GuardVerdict>,
) -> actix_web::dev::Payload {
    let inflating = InflatingPayload {
        inner: payload,
        inflater: MessageInflater::new(agreement, Role::Server, max_frame_bytes, max_message_bytes),
        pending: Bytes::new(),
        at: 0,
        out: BytesMut::new(),
        verdict,
        state: StreamState::Reading,
    };
    actix_web::dev::Payload::from(Box::pin(inflating) as actix_http::BoxedPayloadStream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn agreement(client_no_context_takeover: bool) -> Agreement {
        Agreement {
            response: "permessage-deflate".into(),
            server_no_context_takeover: false,
            client_no_context_takeover,
            server_window_bits: 15,
            client_window_bits: 15,
            threshold: 0,
        }
    }

    /// A client's compressed message: sync-flushed, tail stripped.
    fn deflate(compress: &mut Compress, message: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(message.len() + 64);
        compress
            .compress_vec(message, &mut out, FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&DEFLATE_TAIL));
        out.truncate(out.len() - 4);
        out
    }

    /// A masked client frame.
    fn frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = BytesMut::new();
        write_frame_header(&mut out, first_byte, payload.len(), Some(mask));
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out.to_vec()
    }

    /// The messages of an uncompressed client frame stream (opcode, payload), checking that
    /// no frame has a reserved bit and none is larger than `max_frame`.
    fn messages(stream: &[u8], max_frame: u64) -> Vec<(u8, Vec<u8>)> {
        let mut at = 0;
        let mut messages = Vec::new();
        let mut current: Option<(u8, Vec<u8>)> = None;
        while at < stream.len() {
            let (used, header) = HeaderReader::default().feed(&stream[at..]);
            let header = header.expect("whole frames");
            assert!(!header.rsv1() && !header.other_reserved_bits());
            assert!(header.length <= max_frame);
            at += used;
            let mask = header.mask.expect("masked");
            let payload: Vec<u8> = stream[at..at + header.length as usize]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            at += header.length as usize;
            if header.opcode() >= 0x8 {
                messages.push((header.opcode(), payload));
                continue;
            }
            let entry = current.get_or_insert((header.opcode(), Vec::new()));
            entry.1.extend(payload);
            if header.fin() {
                messages.push(current.take().unwrap());
            }
        }
        messages
    }

    /// Runs `stream` through an inflater, `read` bytes at a time.
    fn inflate_all(
        inflater: &mut MessageInflater,
        stream: &[u8],
        read: usize,
    ) -> Result<Vec<u8>, Violation> {
        let mut out = BytesMut::new();
        for piece in stream.chunks(read) {
            let mut at = 0;
            while at < piece.len() {
                inflater.process(piece, &mut at, &mut out)?;
            }
        }
        Ok(out.to_vec())
    }

    #[test]
    fn compressed_messages_come_out_as_plain_frames() {
        let text = "{\"temperature\": 21.5, \"unit\": \"C\"} ".repeat(2000);
        let mut compress = Compress::new(Compression::default(), false);
        let compressed = deflate(&mut compress, text.as_bytes());
        // One compressed text message in three frames with a ping between, an uncompressed
        // binary message, then a second compressed message that reuses the window.
        let third = compressed.len() / 3;
        let mut stream = frame(0x41, &compressed[..third]);
        stream.extend(frame(0x89, b"ping"));
        stream.extend(frame(0x00, &compressed[third..2 * third]));
        stream.extend(frame(0x80, &compressed[2 * third..]));
        stream.extend(frame(0x82, &[1, 2, 3]));
        let again = deflate(&mut compress, b"hello hello hello");
        stream.extend(frame(0xc1, &again));
        for read in [1, 7, 1000, stream.len()] {
            let mut inflater =
                MessageInflater::new(&agreement(false), Role::Server, 1 << 20, 1 << 20);
            let out = inflate_all(&mut inflater, &stream, read).unwrap();
            assert_eq!(
                messages(&out, OUTPUT_FRAME_BYTES as u64),
                [
                    (0x9, b"ping".to_vec()),
                    (0x1, text.as_bytes().to_vec()),
                    (0x2, vec![1, 2, 3]),
                    (0x1, b"hello hello hello".to_vec()),
                ],
                "read {read} bytes at a time"
            );
        }
    }

    #[test]
    fn no_context_takeover_resets_the_window() {
        let mut inflater = MessageInflater::new(&agreement(true), Role::Server, 4096, 4096);
        let mut compress = Compress::new(Compression::default(), false);
        let first = deflate(&mut compress, b"abcabcabcabc");
        compress.reset();
        let second = deflate(&mut compress, b"abcabcabcabc");
        let mut stream = frame(0xc1, &first);
        stream.extend(frame(0xc1, &second));
        let out = inflate_all(&mut inflater, &stream, 5).unwrap();
        assert_eq!(messages(&out, 4096).len(), 2);
    }

    #[test]
    fn a_bomb_stops_at_the_message_cap_without_inflating_it_all() {
        let zeros = vec![0u8; 8 << 20];
        let mut compress = Compress::new(Compression::best(), false);
        let bomb = deflate(&mut compress, &zeros);
        assert!(bomb.len() < 16 << 10);
        let mut inflater = MessageInflater::new(&agreement(false), Role::Server, 1 << 20, 1 << 20);
        let stream = frame(0xc2, &bomb);
        let mut out = BytesMut::new();
        let mut at = 0;
        let result = loop {
            match inflater.process(&stream, &mut at, &mut out) {
                Ok(Progress::OutputReady) => {
                    // What is yielded goes on; never more than a frame at a time.
                    assert!(out.len() <= OUTPUT_FRAME_BYTES + 14);
                    out.clear();
                }
                other => break other,
            }
        };
        assert_eq!(result, Err(Violation::TooBig));
        assert!(inflater.inflated <= (1 << 20) + OUTPUT_FRAME_BYTES as u64);
    }

    #[test]
    fn rsv1_outside_a_first_frame_passes_to_the_guard() {
        // RSV1 on a ping, or on a continuation with no message, is not inflated: it goes on
        // unchanged and the guard refuses it (1002).
        for stream in [frame(0xc9, b"x"), frame(0xc0, b"x")] {
            let mut inflater = MessageInflater::new(&agreement(false), Role::Server, 4096, 4096);
            assert_eq!(inflate_all(&mut inflater, &stream, 3).unwrap(), stream);
        }
        // Nor on the continuation of a compressed message.
        let mut inflater = MessageInflater::new(&agreement(false), Role::Server, 4096, 4096);
        let compressed = deflate(&mut Compress::new(Compression::fast(), false), b"a");
        let mut stream = frame(0x41, &compressed);
        let continuation = frame(0xc0, b"x");
        stream.extend(&continuation);
        let out = inflate_all(&mut inflater, &stream, 100).unwrap();
        assert!(
            out.ends_with(&continuation),
            "the continuation keeps its RSV1"
        );
    }

    #[test]
    fn corrupt_data_is_a_protocol_error() {
        let mut inflater = MessageInflater::new(&agreement(false), Role::Server, 4096, 4096);
        let stream = frame(0xc1, &[0xff; 32]);
        assert_eq!(
            inflate_all(&mut inflater, &stream, 100),
            Err(Violation::Protocol)
        );
    }

    #[test]
    fn oversized_wire_frames_are_too_big() {
        let mut inflater = MessageInflater::new(&agreement(false), Role::Server, 16, 4096);
        let stream = frame(0xc1, &[0; 17]);
        assert_eq!(
            inflate_all(&mut inflater, &stream, 100),
            Err(Violation::TooBig)
        );
    }

    #[test]
    fn the_frame_cap_holds_for_what_a_frame_inflates_to() {
        let mut compress = Compress::new(Compression::default(), false);
        let message = deflate(&mut compress, &[b'a'; 3000]);
        assert!(message.len() < 100);
        // 3000 bytes from one frame: over a 1000-byte frame cap, under the message cap.
        let mut inflater = MessageInflater::new(&agreement(false), Role::Server, 1000, 1 << 20);
        assert_eq!(
            inflate_all(&mut inflater, &frame(0xc1, &message), 100),
            Err(Violation::TooBig)
        );
        // The same message compressed into frames of at most 1000 inflated bytes each passes.
        let mut compress = Compress::new(Compression::default(), false);
        let mut stream = Vec::new();
        for (i, piece) in [[b'a'; 1000]; 3].iter().enumerate() {
            let mut out = Vec::with_capacity(1100);
            compress
                .compress_vec(piece, &mut out, FlushCompress::Sync)
                .unwrap();
            let last = i == 2;
            if last {
                out.truncate(out.len() - 4);
            }
            let first_byte = match (i, last) {
                (0, _) => 0x41,
                (_, false) => 0x00,
                (_, true) => 0x80,
            };
            stream.extend(frame(first_byte, &out));
        }
        let mut inflater = MessageInflater::new(&agreement(false), Role::Server, 1000, 1 << 20);
        let out = inflate_all(&mut inflater, &stream, 100).unwrap();
        assert_eq!(messages(&out, 1000), [(0x1, vec![b'a'; 3000])]);
    }
}
