//! The byte stream under tungstenite on a client-mode connection whose listener enables
//! compression. tungstenite knows no extensions, so this stream carries permessage-deflate:
//!
//! - during the opening handshake it passes bytes unchanged, but never hands tungstenite a byte
//!   past the end of the server's HTTP response, so a compressed frame the server sends right
//!   after its 101 is not read before compression is switched on;
//! - [`CompressingStream::start`] then switches it on (with the agreement checked by
//!   [`super::client_offer`]) or leaves the connection plain when the server declined;
//! - reading, [`MessageInflater`] turns compressed server messages into plain frames, so
//!   tungstenite's frame and message caps and its UTF-8 check apply to the inflated bytes; a
//!   compression bomb stops at the cap, and a violation surfaces as an I/O error carrying
//!   [`InflateFailure`], from which the listener picks the close code (1009 or 1002);
//! - writing, [`MessageDeflater`] compresses the masked data frames tungstenite writes.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::deflate_body::MessageDeflater;
use super::inflate::MessageInflater;
use super::{Agreement, Role};
use crate::frame_guard::Violation;

/// Bytes read from the connection at a time.
const READ_CHUNK: usize = 8 * 1024;
/// The blank line that ends an HTTP response head.
const HEAD_END: &[u8; 4] = b"\r\n\r\n";

/// Why reading a compressed message failed: the server's violation, carried in an I/O error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflateFailure(pub Violation);

impl std::fmt::Display for InflateFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Violation::TooBig => {
                "a compressed message inflates past the listener's frame or message cap"
            }
            Violation::InvalidUtf8 => "a compressed text message is not valid UTF-8",
            Violation::Protocol => {
                "a compressed message breaks permessage-deflate (RFC 7692): invalid deflate data"
            }
        })
    }
}

impl std::error::Error for InflateFailure {}

/// Where the connection is.
enum Phase {
    /// The opening handshake: bytes pass up to the end of the HTTP response.
    Handshake { head_matched: usize },
    /// Bytes pass unchanged: from the end of the response head until
    /// [`CompressingStream::start`] (nothing reads then), and for good when the server declined
    /// compression.
    Plain,
    /// Compressed messages are inflated and iotgate's are compressed.
    Compressed {
        inflater: Box<MessageInflater>,
        deflater: Box<MessageDeflater>,
    },
    /// The server broke permessage-deflate: every read fails with this.
    Failed(Violation),
}

/// A client connection's byte stream with permessage-deflate around it.
pub struct CompressingStream<S> {
    inner: S,
    phase: Phase,
    /// Bytes read from the connection and not yet used, from `at` on.
    input: Vec<u8>,
    at: usize,
    /// Inflated frames not yet handed to the reader.
    output: BytesMut,
    /// Compressed frames not yet written to the connection.
    unwritten: Bytes,
}

impl<S> CompressingStream<S> {
    /// Wraps a connection before its opening handshake.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            phase: Phase::Handshake { head_matched: 0 },
            input: Vec::with_capacity(READ_CHUNK),
            at: 0,
            output: BytesMut::new(),
            unwritten: Bytes::new(),
        }
    }

    /// After the opening handshake: compression on with `agreement`, or the connection plain
    /// when the server declined (`None`).
    pub fn start(
        &mut self,
        agreement: Option<&Agreement>,
        max_frame_bytes: usize,
        max_message_bytes: usize,
    ) {
        self.phase = match agreement {
            None => Phase::Plain,
            Some(agreement) => Phase::Compressed {
                inflater: Box::new(MessageInflater::new(
                    agreement,
                    Role::Client,
                    max_frame_bytes,
                    max_message_bytes,
                )),
                deflater: Box::new(MessageDeflater::new(agreement, Role::Client)),
            },
        };
    }

    /// Moves what is ready for the reader into `buf`: handshake bytes up to the end of the
    /// response head, plain bytes, or inflated frames. `Some` when the read is answered.
    fn answer_from_buffers(&mut self, buf: &mut ReadBuf<'_>) -> Option<io::Result<()>> {
        if !self.output.is_empty() {
            let take = self.output.len().min(buf.remaining());
            buf.put_slice(&self.output[..take]);
            self.output.advance(take);
            return Some(Ok(()));
        }
        if self.at == self.input.len() {
            return None;
        }
        let available = &self.input[self.at..];
        match &mut self.phase {
            Phase::Handshake { head_matched } => {
                let mut take = 0;
                for &byte in available.iter().take(buf.remaining()) {
                    take += 1;
                    *head_matched = match byte {
                        _ if byte == HEAD_END[*head_matched] => *head_matched + 1,
                        b'\r' => 1,
                        _ => 0,
                    };
                    if *head_matched == HEAD_END.len() {
                        self.phase = Phase::Plain;
                        break;
                    }
                }
                buf.put_slice(&available[..take]);
                self.at += take;
                Some(Ok(()))
            }
            Phase::Plain => {
                let take = available.len().min(buf.remaining());
                buf.put_slice(&available[..take]);
                self.at += take;
                Some(Ok(()))
            }
            Phase::Compressed { inflater, .. } => {
                match inflater.process(&self.input, &mut self.at, &mut self.output) {
                    Ok(_) => None,
                    Err(violation) => {
                        self.phase = Phase::Failed(violation);
                        Some(Err(failure(violation)))
                    }
                }
            }
            Phase::Failed(violation) => Some(Err(failure(*violation))),
        }
    }
}

fn failure(violation: Violation) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, InflateFailure(violation))
}

/// Writes `unwritten` to `inner` until none is left.
fn poll_write_all<S: AsyncWrite + Unpin>(
    inner: &mut S,
    unwritten: &mut Bytes,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while !unwritten.is_empty() {
        let written = ready!(Pin::new(&mut *inner).poll_write(cx, unwritten))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        unwritten.advance(written);
    }
    Poll::Ready(Ok(()))
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for CompressingStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Phase::Failed(violation) = this.phase {
                return Poll::Ready(Err(failure(violation)));
            }
            if let Some(answer) = this.answer_from_buffers(buf) {
                return Poll::Ready(answer);
            }
            if this.at < this.input.len() || !this.output.is_empty() {
                // The inflater used some input or wrote a frame: answer from the buffers again.
                continue;
            }
            this.input.resize(READ_CHUNK, 0);
            this.at = 0;
            let mut read = ReadBuf::new(&mut this.input);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut read);
            let filled = read.filled().len();
            this.input.truncate(filled);
            ready!(polled)?;
            if filled == 0 {
                // The end of the connection: tungstenite sees it as such.
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for CompressingStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Phase::Compressed { deflater, .. } = &mut this.phase else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        // One chunk in hand at a time: the next is taken once this one is written, so
        // tungstenite's own buffer is what backs up when the connection is slow.
        ready!(poll_write_all(&mut this.inner, &mut this.unwritten, cx))?;
        this.unwritten = deflater
            .rewrite(Bytes::copy_from_slice(buf))
            .map_err(|error| {
                io::Error::other(format!("permessage-deflate compression failed: {error}"))
            })?;
        // Start writing now; what is left goes out on the next write or flush.
        if let Poll::Ready(Err(error)) = poll_write_all(&mut this.inner, &mut this.unwritten, cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(poll_write_all(&mut this.inner, &mut this.unwritten, cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(poll_write_all(&mut this.inner, &mut this.unwritten, cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deflate::{write_frame_header, HeaderReader, DEFLATE_TAIL};
    use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";

    fn agreement() -> Agreement {
        Agreement {
            response: "permessage-deflate".into(),
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_window_bits: 15,
            client_window_bits: 15,
            threshold: 16,
        }
    }

    /// One compressed message as a server sends it: RSV1, unmasked, the tail stripped.
    fn compressed_frame(message: &[u8]) -> BytesMut {
        let mut compress = Compress::new(Compression::default(), false);
        let mut payload = Vec::with_capacity(message.len() + 64);
        compress
            .compress_vec(message, &mut payload, FlushCompress::Sync)
            .unwrap();
        assert!(payload.ends_with(&DEFLATE_TAIL));
        payload.truncate(payload.len() - DEFLATE_TAIL.len());
        let mut frame = BytesMut::new();
        write_frame_header(&mut frame, 0xc1, payload.len(), None);
        frame.extend_from_slice(&payload);
        frame
    }

    /// Reads the response head the way a handshake does, then switches compression on.
    async fn through_the_handshake<S>(stream: &mut CompressingStream<S>, max_message_bytes: usize)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended inside the head");
            head.extend_from_slice(&buf[..n]);
        }
        assert_eq!(
            head, HEAD,
            "nothing past the head is read during the handshake"
        );
        stream.start(Some(&agreement()), max_message_bytes, max_message_bytes);
    }

    #[tokio::test]
    async fn a_compressed_frame_sent_with_the_response_head_is_inflated() {
        let (ours, mut server) = tokio::io::duplex(1 << 16);
        let mut stream = CompressingStream::new(ours);
        let message = "{\"reading\":1,\"sensor\":\"t1\"}".repeat(20);
        // The head and the first frame in one write, as a server may send them.
        let mut wire = HEAD.to_vec();
        wire.extend_from_slice(&compressed_frame(message.as_bytes()));
        server.write_all(&wire).await.unwrap();
        through_the_handshake(&mut stream, 1 << 20).await;
        let mut frame = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0);
            frame.extend_from_slice(&buf[..n]);
            if let (used, Some(header)) = HeaderReader::default().feed(&frame) {
                if frame.len() as u64 == used as u64 + header.length {
                    assert_eq!(header.first_byte, 0x81, "a plain, final text frame");
                    assert!(header.mask.is_none(), "server frames stay unmasked");
                    assert_eq!(&frame[used..], message.as_bytes());
                    break;
                }
            }
        }
    }

    #[tokio::test]
    async fn written_frames_are_compressed_and_masked_with_their_key() {
        let (ours, mut server) = tokio::io::duplex(1 << 16);
        let mut stream = CompressingStream::new(ours);
        server.write_all(HEAD).await.unwrap();
        through_the_handshake(&mut stream, 1 << 20).await;
        let message = "{\"echo\":true,\"sensor\":\"t1\"}".repeat(20);
        let key = [0x11, 0x22, 0x33, 0x44];
        let masked: Vec<u8> = message
            .bytes()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        let mut frame = BytesMut::new();
        write_frame_header(&mut frame, 0x81, masked.len(), Some(key));
        frame.extend_from_slice(&masked);
        // A short message and a ping pass unchanged.
        let mut small = BytesMut::new();
        write_frame_header(&mut small, 0x89, 0, Some(key));
        stream.write_all(&frame).await.unwrap();
        stream.write_all(&small).await.unwrap();
        stream.flush().await.unwrap();
        drop(stream);
        let mut wire = Vec::new();
        server.read_to_end(&mut wire).await.unwrap();
        let (used, header) = HeaderReader::default().feed(&wire);
        let header = header.unwrap();
        assert_eq!(header.first_byte, 0xc1, "RSV1 on the compressed message");
        assert_eq!(header.mask, Some(key));
        let end = used + header.length as usize;
        assert!(header.length < message.len() as u64 / 4);
        let mut payload: Vec<u8> = wire[used..end]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        payload.extend_from_slice(&DEFLATE_TAIL);
        let mut inflated = Vec::with_capacity(4096);
        Decompress::new(false)
            .decompress_vec(&payload, &mut inflated, FlushDecompress::Sync)
            .unwrap();
        assert_eq!(inflated, message.as_bytes());
        assert_eq!(&wire[end..], &small[..]);
    }

    #[tokio::test]
    async fn a_compression_bomb_fails_the_read_at_the_cap() {
        let (ours, mut server) = tokio::io::duplex(1 << 16);
        let mut stream = CompressingStream::new(ours);
        let bomb = compressed_frame(&vec![b'0'; 4 << 20]);
        assert!(bomb.len() < 64 * 1024);
        let mut wire = HEAD.to_vec();
        wire.extend_from_slice(&bomb);
        server.write_all(&wire).await.unwrap();
        through_the_handshake(&mut stream, 1 << 20).await;
        let mut read = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        let error = loop {
            match stream.read(&mut buf).await {
                Ok(n) => {
                    assert!(n > 0, "the stream ended instead of failing");
                    read += n;
                }
                Err(error) => break error,
            }
        };
        assert!(
            read <= (1 << 20) + 64 * 1024,
            "read {read} bytes past the cap"
        );
        let failure = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<InflateFailure>())
            .copied();
        assert_eq!(failure, Some(InflateFailure(Violation::TooBig)));
        // And it stays failed.
        assert!(stream.read(&mut buf).await.is_err());
    }
}
