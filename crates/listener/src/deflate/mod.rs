//! permessage-deflate (RFC 7692). Neither actix-ws (server mode) nor tungstenite (client mode)
//! has WebSocket extensions, so the extension lives around them, on the byte streams:
//!
//! - [`negotiation`]: server mode picks the first acceptable offer of the upgrade request's
//!   `Sec-WebSocket-Extensions` and words the answer;
//! - [`client_offer`]: client mode words the offer and checks the server's answer;
//! - [`inflate`]: turns each compressed message of the peer back into ordinary frames, in front
//!   of the frame guard (server mode) or of tungstenite (client mode), so their caps and UTF-8
//!   checks see the inflated message;
//! - [`deflate_body`]: compresses the data messages iotgate writes, behind actix-ws's encoder or
//!   tungstenite's;
//! - [`client_stream`]: the client-mode byte stream that carries both.
//!
//! Listeners without compression, and connections that did not negotiate it, never reach this
//! module: their streams are not wrapped.

pub mod client_offer;
pub mod client_stream;
pub mod deflate_body;
pub mod inflate;
pub mod negotiation;

pub use negotiation::{negotiate, Agreement, Direction, Role};

/// The four bytes every sync-flushed deflate block ends with; RFC 7692 §7.2.1 strips them from
/// each message on the wire and §7.2.2 appends them again before inflating.
pub(crate) const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// XORs `bytes` with the mask `key` (RFC 6455 §5.3); `offset` is the position of `bytes[0]` in
/// the frame's payload. Masking and unmasking are the same operation.
pub(crate) fn apply_mask(bytes: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte ^= key[(offset + i) % 4];
    }
}

/// Writes an RFC 6455 frame header into `out`: `first_byte` (FIN, RSV, opcode), the payload
/// length in its shortest encoding, and the mask key when given.
pub(crate) fn write_frame_header(
    out: &mut bytes::BytesMut,
    first_byte: u8,
    length: usize,
    mask: Option<[u8; 4]>,
) {
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.extend_from_slice(&[first_byte]);
    match length {
        0..=125 => out.extend_from_slice(&[mask_bit | length as u8]),
        126..=0xffff => {
            out.extend_from_slice(&[mask_bit | 126]);
            out.extend_from_slice(&(length as u16).to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&[mask_bit | 127]);
            out.extend_from_slice(&(length as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// An RFC 6455 frame header read out of a byte stream, possibly across reads.
#[derive(Debug, Default)]
pub(crate) struct HeaderReader {
    bytes: [u8; 14],
    len: usize,
}

/// A complete frame header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameHeader {
    /// The header as it came, to pass an untouched frame on.
    pub raw: [u8; 14],
    pub first_byte: u8,
    pub length: u64,
    pub mask: Option<[u8; 4]>,
    /// Bytes the header took on the wire.
    pub size: usize,
}

impl FrameHeader {
    pub fn fin(&self) -> bool {
        self.first_byte & 0x80 != 0
    }
    pub fn rsv1(&self) -> bool {
        self.first_byte & 0x40 != 0
    }
    /// RSV2 or RSV3: no extension here defines them.
    pub fn other_reserved_bits(&self) -> bool {
        self.first_byte & 0x30 != 0
    }
    pub fn opcode(&self) -> u8 {
        self.first_byte & 0x0f
    }
    /// The header bytes as they came.
    pub fn raw_bytes(&self) -> &[u8] {
        &self.raw[..self.size]
    }
}

impl HeaderReader {
    fn needed(&self) -> usize {
        if self.len < 2 {
            return 2;
        }
        crate::frame_guard::header_size(self.bytes[1])
    }

    /// Takes header bytes from `input`; returns how many it used and the header once complete
    /// (the reader is then empty again).
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<FrameHeader>) {
        let mut used = 0;
        loop {
            let needed = self.needed();
            let take = (needed - self.len).min(input.len() - used);
            self.bytes[self.len..self.len + take].copy_from_slice(&input[used..used + take]);
            self.len += take;
            used += take;
            if self.len < needed {
                return (used, None);
            }
            // Two bytes may announce an extended length or a mask: read on.
            if needed == self.needed() {
                break;
            }
        }
        let b = &self.bytes;
        let length = crate::frame_guard::declared_length(b);
        let size = self.len;
        let mask = (b[1] & 0x80 != 0).then(|| b[size - 4..size].try_into().expect("4 bytes"));
        let header = FrameHeader {
            raw: *b,
            first_byte: b[0],
            length,
            mask,
            size,
        };
        self.len = 0;
        (used, Some(header))
    }
}
