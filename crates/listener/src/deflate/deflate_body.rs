//! Outbound permessage-deflate: [`MessageDeflater`] rewrites the byte stream of frames iotgate
//! writes, compressing the payload of each data message of at least `threshold` bytes (RSV1 on
//! its first frame, the deflate tail stripped from its end, RFC 7692 §7.2.1); control frames and
//! shorter messages pass unchanged. A chunk with nothing to compress is passed on as it is,
//! without a copy.
//!
//! In server mode it sits behind actix-ws's encoder, as the upgrade response's body (everything
//! written through the `Session`: acks, errors, downlinks, Web PubSub frames). In client mode it
//! sits behind tungstenite's (see [`super::client_stream`]): those frames are masked, so a
//! payload is unmasked, compressed, and masked again with its frame's key.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::web::Bytes;
use bytes::BytesMut;
use flate2::{Compress, Compression, FlushCompress};

use super::negotiation::SMALLEST_ZLIB_WINDOW_BITS;
use super::{apply_mask, write_frame_header, Agreement, HeaderReader, Role, DEFLATE_TAIL};

/// Compresses the data messages of a server frame stream.
pub struct MessageDeflater {
    compress: Compress,
    /// False when the agreed window is one zlib cannot compress with (8 bits): every message
    /// then goes out uncompressed, which RFC 7692 allows.
    enabled: bool,
    /// No context takeover for iotgate's side: every message is compressed on its own.
    reset_each_message: bool,
    threshold: usize,
    /// A fragmented message is in progress; whether it is being compressed.
    fragmented: Option<bool>,
    /// The start of a frame cut off at the end of the previous chunk.
    partial: BytesMut,
    /// Compressed payload of the frame being written, reused.
    compressed: Vec<u8>,
    /// The unmasked payload of a masked frame being compressed, reused.
    unmasked: Vec<u8>,
}

impl MessageDeflater {
    /// The deflater for what iotgate in `role` sends.
    pub fn new(agreement: &Agreement, role: Role) -> Self {
        let own = agreement.own_compression(role);
        let enabled = own.window_bits >= SMALLEST_ZLIB_WINDOW_BITS;
        Self {
            compress: Compress::new_with_window_bits(
                Compression::default(),
                false,
                own.window_bits.max(SMALLEST_ZLIB_WINDOW_BITS),
            ),
            enabled,
            reset_each_message: own.no_context_takeover,
            threshold: agreement.threshold,
            fragmented: None,
            partial: BytesMut::new(),
            compressed: Vec::new(),
            unmasked: Vec::new(),
        }
    }

    /// Whether a data frame is compressed: fragmented messages always (their size is not known
    /// from their first frame), whole ones from the threshold on.
    fn compresses(&self, opcode: u8, fin: bool, length: u64) -> bool {
        if !self.enabled {
            return false;
        }
        match opcode {
            0x1 | 0x2 => !fin || length >= self.threshold as u64,
            0x0 => self.fragmented == Some(true),
            _ => false,
        }
    }

    /// True when `chunk` holds only whole frames that go out unchanged.
    fn passes_unchanged(&self, chunk: &[u8]) -> bool {
        if !self.partial.is_empty() || self.fragmented.is_some() {
            return false;
        }
        let mut at = 0;
        while at < chunk.len() {
            let (used, header) = HeaderReader::default().feed(&chunk[at..]);
            let Some(header) = header else {
                return false;
            };
            if self.compresses(header.opcode(), header.fin(), header.length) || !header.fin() {
                return false;
            }
            at += used;
            let Some(end) = usize::try_from(header.length)
                .ok()
                .and_then(|length| at.checked_add(length))
                .filter(|end| *end <= chunk.len())
            else {
                return false;
            };
            at = end;
        }
        true
    }

    /// The frames of `chunk` as they go on the wire.
    pub fn rewrite(&mut self, chunk: Bytes) -> Result<Bytes, flate2::CompressError> {
        if self.passes_unchanged(&chunk) {
            return Ok(chunk);
        }
        let input = if self.partial.is_empty() {
            chunk
        } else {
            self.partial.extend_from_slice(&chunk);
            self.partial.split().freeze()
        };
        let mut out = BytesMut::with_capacity(input.len());
        let mut at = 0;
        while at < input.len() {
            let (used, header) = HeaderReader::default().feed(&input[at..]);
            let frame_end = header.and_then(|h| {
                usize::try_from(h.length)
                    .ok()
                    .and_then(|length| (at + used).checked_add(length))
                    .filter(|end| *end <= input.len())
            });
            let (Some(header), Some(frame_end)) = (header, frame_end) else {
                // An incomplete frame: kept for the next chunk.
                self.partial.extend_from_slice(&input[at..]);
                break;
            };
            let payload = &input[at + used..frame_end];
            let (opcode, fin) = (header.opcode(), header.fin());
            if !self.compresses(opcode, fin, header.length) {
                out.extend_from_slice(&input[at..frame_end]);
                if opcode <= 0x2 {
                    self.fragmented = (!fin).then_some(false);
                }
            } else {
                match header.mask {
                    None => self.compress_payload(payload, fin)?,
                    Some(key) => {
                        let mut unmasked = std::mem::take(&mut self.unmasked);
                        unmasked.clear();
                        unmasked.extend_from_slice(payload);
                        apply_mask(&mut unmasked, key, 0);
                        let compressed = self.compress_payload(&unmasked, fin);
                        self.unmasked = unmasked;
                        compressed?;
                        apply_mask(&mut self.compressed, key, 0);
                    }
                }
                // RSV1 marks the first frame of a compressed message only (RFC 7692 §6).
                let rsv1 = if opcode == 0x0 { 0 } else { 0x40 };
                write_frame_header(
                    &mut out,
                    header.first_byte | rsv1,
                    self.compressed.len(),
                    header.mask,
                );
                out.extend_from_slice(&self.compressed);
                self.fragmented = (!fin).then_some(true);
                if fin && self.reset_each_message {
                    self.compress.reset();
                }
            }
            at = frame_end;
        }
        Ok(out.freeze())
    }

    /// Compresses one frame's payload into `self.compressed`, sync-flushed; the last frame of a
    /// message loses the deflate tail.
    fn compress_payload(
        &mut self,
        payload: &[u8],
        last: bool,
    ) -> Result<(), flate2::CompressError> {
        self.compressed.clear();
        let mut fed = 0;
        loop {
            // Sync-flushed deflate output is at most a little larger than its input.
            self.compressed.reserve(payload.len() - fed + 64);
            let before = self.compress.total_in();
            self.compress.compress_vec(
                &payload[fed..],
                &mut self.compressed,
                FlushCompress::Sync,
            )?;
            fed += (self.compress.total_in() - before) as usize;
            // Room left over means the flush is complete.
            if fed == payload.len() && self.compressed.len() < self.compressed.capacity() {
                break;
            }
        }
        if last && self.compressed.ends_with(&DEFLATE_TAIL) {
            self.compressed
                .truncate(self.compressed.len() - DEFLATE_TAIL.len());
        }
        Ok(())
    }
}

/// The upgrade response body with [`MessageDeflater`] behind actix-ws's encoder.
pub struct DeflatingBody {
    inner: BoxBody,
    deflater: MessageDeflater,
}

impl MessageBody for DeflatingBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
            Some(Ok(chunk)) => Poll::Ready(Some(
                this.deflater
                    .rewrite(chunk)
                    .map_err(|error| Box::new(error) as Self::Error),
            )),
            other => Poll::Ready(other),
        }
    }
}

/// Puts the deflater behind the body of an accepted upgrade.
pub fn deflating_response(
    response: actix_web::HttpResponse,
    agreement: &Agreement,
) -> actix_web::HttpResponse {
    let deflater = MessageDeflater::new(agreement, Role::Server);
    response
        .map_body(|_, inner| DeflatingBody { inner, deflater })
        .map_into_boxed_body()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    fn agreement(server_no_context_takeover: bool, threshold: usize) -> Agreement {
        Agreement {
            response: "permessage-deflate".into(),
            server_no_context_takeover,
            client_no_context_takeover: false,
            server_window_bits: 10,
            client_window_bits: 15,
            threshold,
        }
    }

    /// An unmasked server frame.
    fn frame(first_byte: u8, payload: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        write_frame_header(&mut out, first_byte, payload.len(), None);
        out.extend_from_slice(payload);
        out.freeze()
    }

    /// Splits a server frame stream into (first byte, payload).
    fn frames(stream: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < stream.len() {
            let (used, header) = HeaderReader::default().feed(&stream[at..]);
            let header = header.unwrap();
            assert!(header.mask.is_none());
            at += used;
            out.push((
                header.first_byte,
                stream[at..at + header.length as usize].to_vec(),
            ));
            at += header.length as usize;
        }
        out
    }

    /// Inflates one message the way a client does: tail appended, a 10-bit window.
    fn inflate(decompress: &mut Decompress, payload: &[u8]) -> Vec<u8> {
        let mut input = payload.to_vec();
        input.extend_from_slice(&DEFLATE_TAIL);
        let mut out = Vec::with_capacity(1 << 20);
        decompress
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }

    #[test]
    fn small_messages_and_control_frames_pass_without_a_copy() {
        let mut deflater = MessageDeflater::new(&agreement(false, 64), Role::Server);
        let mut chunk = BytesMut::new();
        chunk.extend_from_slice(&frame(0x81, b"{\"ack\":1}"));
        chunk.extend_from_slice(&frame(0x89, b"ping"));
        chunk.extend_from_slice(&frame(0x88, &[0x03, 0xe8]));
        let chunk = chunk.freeze();
        let out = deflater.rewrite(chunk.clone()).unwrap();
        assert_eq!(out, chunk);
        assert_eq!(out.as_ptr(), chunk.as_ptr(), "passed on as it was");
    }

    #[test]
    fn messages_from_the_threshold_on_are_compressed_and_inflate_back() {
        let mut deflater = MessageDeflater::new(&agreement(false, 64), Role::Server);
        let text = "{\"deviceId\":\"sensor-1\",\"status\":\"accepted\"}".repeat(40);
        let mut decompress = Decompress::new_with_window_bits(false, 10);
        // Two messages in one chunk, the second cut across two chunks, a ping between.
        let mut stream = BytesMut::new();
        stream.extend_from_slice(&frame(0x81, text.as_bytes()));
        stream.extend_from_slice(&frame(0x8a, b""));
        stream.extend_from_slice(&frame(0x82, text.as_bytes()));
        let cut = stream.len() - 100;
        let mut out = deflater
            .rewrite(stream.clone().freeze().slice(..cut))
            .unwrap()
            .to_vec();
        out.extend_from_slice(&deflater.rewrite(stream.freeze().slice(cut..)).unwrap());
        let frames = frames(&out);
        assert_eq!(
            frames.iter().map(|f| f.0).collect::<Vec<_>>(),
            [0xc1, 0x8a, 0xc2]
        );
        assert!(frames[0].1.len() < text.len() / 4);
        assert_eq!(inflate(&mut decompress, &frames[0].1), text.as_bytes());
        // The second message reuses the window: it is far smaller still.
        assert!(frames[2].1.len() < frames[0].1.len());
        assert_eq!(inflate(&mut decompress, &frames[2].1), text.as_bytes());
    }

    #[test]
    fn no_context_takeover_compresses_every_message_alone() {
        let mut deflater = MessageDeflater::new(&agreement(true, 0), Role::Server);
        let text = "abcdefgh".repeat(100);
        let first = deflater.rewrite(frame(0x81, text.as_bytes())).unwrap();
        let second = deflater.rewrite(frame(0x81, text.as_bytes())).unwrap();
        assert_eq!(first, second);
        // Each inflates with a fresh inflater.
        let payload = &frames(&second)[0].1;
        let mut decompress = Decompress::new_with_window_bits(false, 10);
        assert_eq!(inflate(&mut decompress, payload), text.as_bytes());
    }

    #[test]
    fn fragmented_messages_set_rsv1_on_the_first_frame_only() {
        let mut deflater = MessageDeflater::new(&agreement(false, 1000), Role::Server);
        let mut stream = BytesMut::new();
        stream.extend_from_slice(&frame(0x01, b"hello "));
        stream.extend_from_slice(&frame(0x89, b""));
        stream.extend_from_slice(&frame(0x80, b"world"));
        let out = deflater.rewrite(stream.freeze()).unwrap();
        let frames = frames(&out);
        assert_eq!(
            frames.iter().map(|f| f.0).collect::<Vec<_>>(),
            [0x41, 0x89, 0x80]
        );
        let mut whole = frames[0].1.clone();
        whole.extend_from_slice(&frames[2].1);
        let mut decompress = Decompress::new_with_window_bits(false, 10);
        assert_eq!(inflate(&mut decompress, &whole), b"hello world");
    }
}
