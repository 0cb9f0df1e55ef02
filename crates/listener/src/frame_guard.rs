//! A guard in front of the WebSocket codec that enforces `maxMessageBytes` from frame headers.
//!
//! actix-http's frame parser compares a frame's declared length with the limit only once the
//! whole frame has arrived, so a header announcing 2^63 bytes would make the connection buffer
//! whatever follows. This guard reads the byte stream as it arrives, parses each frame header
//! (2 to 14 bytes; the payload is skipped, never buffered), and trips as soon as a data frame,
//! or a message's running total over its continuation frames, declares more than the limit.
//! The connection then closes with 1009 at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::error::PayloadError;
use actix_web::web::Bytes;

/// Parses frame headers out of a client byte stream, tracking message sizes.
#[derive(Debug)]
pub struct FrameGuard {
    max_message_bytes: u64,
    header: [u8; 14],
    header_len: usize,
    payload_left: u64,
    message_bytes: u64,
    tripped: Arc<AtomicBool>,
}

impl FrameGuard {
    pub fn new(max_message_bytes: usize, tripped: Arc<AtomicBool>) -> Self {
        Self {
            max_message_bytes: max_message_bytes as u64,
            header: [0; 14],
            header_len: 0,
            payload_left: 0,
            message_bytes: 0,
            tripped,
        }
    }

    /// Header bytes needed once the first two are known.
    fn header_size(&self) -> usize {
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    fn declared_length(&self) -> u64 {
        match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        }
    }

    /// Inspects the next chunk of the stream; false once a size limit is exceeded.
    pub fn inspect(&mut self, mut chunk: &[u8]) -> bool {
        while !chunk.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(chunk.len() as u64);
                self.payload_left -= skip;
                chunk = &chunk[skip as usize..];
                continue;
            }
            let needed = if self.header_len < 2 {
                2
            } else {
                self.header_size()
            };
            let take = (needed - self.header_len).min(chunk.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&chunk[..take]);
            self.header_len += take;
            chunk = &chunk[take..];
            if self.header_len < 2 || self.header_len < self.header_size() {
                continue;
            }
            let length = self.declared_length();
            let opcode = self.header[0] & 0x0f;
            match opcode {
                // Text or binary starts a message; continuation adds to it.
                0x1 | 0x2 => self.message_bytes = length,
                0x0 => self.message_bytes = self.message_bytes.saturating_add(length),
                // Control frames (and unknown opcodes, which the codec rejects) do not count.
                _ => {}
            }
            let data = matches!(opcode, 0x0..=0x2);
            if data
                && (length > self.max_message_bytes || self.message_bytes > self.max_message_bytes)
            {
                self.tripped.store(true, Ordering::Relaxed);
                return false;
            }
            self.payload_left = length;
            self.header_len = 0;
        }
        true
    }
}

/// Wraps a request payload so the guard sees every chunk before the codec does.
pub fn guard_payload(
    payload: actix_web::dev::Payload,
    max_message_bytes: usize,
    tripped: Arc<AtomicBool>,
) -> actix_web::dev::Payload {
    use futures_util::StreamExt as _;
    let mut guard = FrameGuard::new(max_message_bytes, tripped);
    let mut stopped = false;
    let guarded = payload.map(move |item: Result<Bytes, PayloadError>| {
        if stopped {
            return Err(PayloadError::Overflow);
        }
        let bytes = item?;
        if guard.inspect(&bytes) {
            Ok(bytes)
        } else {
            stopped = true;
            Err(PayloadError::Overflow)
        }
    });
    actix_web::dev::Payload::from(Box::pin(guarded) as actix_http::BoxedPayloadStream)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out
    }

    fn guard(max: usize) -> (FrameGuard, Arc<AtomicBool>) {
        let tripped = Arc::new(AtomicBool::new(false));
        (FrameGuard::new(max, tripped.clone()), tripped)
    }

    #[test]
    fn huge_declared_length_trips_at_the_header() {
        let (mut g, tripped) = guard(4096);
        let header = frame(0x2, true, (1 << 63) - 1, true);
        // Delivered a byte at a time, the guard still trips once the length is known.
        let mut ok = true;
        for byte in &header {
            ok = g.inspect(std::slice::from_ref(byte));
            if !ok {
                break;
            }
        }
        assert!(!ok);
        assert!(tripped.load(Ordering::Relaxed));
    }

    #[test]
    fn frames_within_the_limit_pass_across_chunk_boundaries() {
        let (mut g, tripped) = guard(300);
        let mut stream = frame(0x1, true, 200, true);
        stream.extend(vec![b'a'; 200]);
        stream.extend(frame(0x9, true, 4, true));
        stream.extend([0; 4]);
        stream.extend(frame(0x2, true, 300, true));
        stream.extend(vec![0; 300]);
        for piece in stream.chunks(7) {
            assert!(g.inspect(piece));
        }
        assert!(!tripped.load(Ordering::Relaxed));
    }

    #[test]
    fn continuations_count_towards_the_message() {
        let (mut g, _) = guard(10);
        let mut stream = frame(0x1, false, 4, true);
        stream.extend([0; 4]);
        assert!(g.inspect(&stream));
        let mut next = frame(0x0, false, 4, true);
        next.extend([0; 4]);
        assert!(g.inspect(&next));
        // A control frame in between does not count.
        let mut ping = frame(0x9, true, 5, true);
        ping.extend([0; 5]);
        assert!(g.inspect(&ping));
        assert!(!g.inspect(&frame(0x0, true, 3, true)));
    }
}
