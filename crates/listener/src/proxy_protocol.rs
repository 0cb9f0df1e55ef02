//! The PROXY protocol (HAProxy's, versions 1 and 2) on listeners with their own port.
//!
//! A TCP load balancer cannot add HTTP headers, so it opens each connection with one line (v1) or
//! one binary block (v2) naming the client's address, and then relays the client's bytes. Only a
//! peer in `--trusted-proxies` may speak it: on a `proxyProtocol` port any other peer, or a
//! missing or malformed header, closes the connection before a byte of HTTP is read. Parsing is
//! `ppp`'s; this module reads just enough bytes for it and hands the rest on untouched.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use ppp::{v1, v2, HeaderResult, PartialResult as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

/// The largest header accepted. A v1 line is at most 107 bytes; v2 may carry TLVs, and HAProxy's
/// stay well under this.
const MAX_HEADER: usize = 1024;

/// What the header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxiedPeer {
    /// The client's address.
    Client(SocketAddr),
    /// The balancer's own connection (a v2 `LOCAL` health check, or v1 `UNKNOWN`): no client.
    Local,
}

/// Reads and parses the PROXY header at the start of `stream`, within `limit`. Returns what it
/// said and the bytes read past it (the start of the client's own data).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> io::Result<(ProxiedPeer, Vec<u8>)> {
    tokio::time::timeout(limit, read_header_now(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no PROXY header in time"))?
}

async fn read_header_now<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> io::Result<(ProxiedPeer, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before its PROXY header ended",
            ));
        }
        buffer.extend_from_slice(&chunk[..read]);
        let parsed = HeaderResult::parse(&buffer);
        if parsed.is_incomplete() {
            if buffer.len() >= MAX_HEADER {
                return Err(invalid("the PROXY header is too long"));
            }
            continue;
        }
        let (peer, length) = match parsed {
            HeaderResult::V1(Ok(header)) => (
                match header.addresses {
                    v1::Addresses::Tcp4(a) => {
                        ProxiedPeer::Client(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    v1::Addresses::Tcp6(a) => {
                        ProxiedPeer::Client(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    v1::Addresses::Unknown => ProxiedPeer::Local,
                },
                header.header.len(),
            ),
            HeaderResult::V2(Ok(header)) => (
                match (header.command, header.addresses) {
                    (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                        ProxiedPeer::Client(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                        ProxiedPeer::Client(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    _ => ProxiedPeer::Local,
                },
                header.len(),
            ),
            HeaderResult::V1(Err(error)) => {
                return Err(invalid(&format!("bad PROXY v1 header: {error}")))
            }
            HeaderResult::V2(Err(error)) => {
                return Err(invalid(&format!("bad PROXY v2 header: {error}")))
            }
        };
        let rest = buffer.split_off(length.min(buffer.len()));
        return Ok((peer, rest));
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

pin_project_lite::pin_project! {
    /// A stream that first yields bytes already read from it (past the PROXY header), then reads
    /// on; writes go straight through.
    pub struct Rewound<S> {
        buffered: Vec<u8>,
        position: usize,
        #[pin]
        inner: S,
    }
}

impl<S> Rewound<S> {
    pub fn new(inner: S, buffered: Vec<u8>) -> Self {
        Self {
            buffered,
            position: 0,
            inner,
        }
    }
}

impl<S: AsyncRead> AsyncRead for Rewound<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if *this.position < this.buffered.len() {
            let rest = &this.buffered[*this.position..];
            let take = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..take]);
            *this.position += take;
            if *this.position == this.buffered.len() {
                *this.buffered = Vec::new();
                *this.position = 0;
            }
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for Rewound<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> io::Result<(ProxiedPeer, Vec<u8>)> {
        let mut reader: &[u8] = bytes;
        read_header(&mut reader, Duration::from_secs(1)).await
    }

    #[tokio::test]
    async fn v1_names_the_client_and_keeps_what_follows() {
        let (peer, rest) =
            parse(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n")
                .await
                .unwrap();
        assert_eq!(
            peer,
            ProxiedPeer::Client("203.0.113.7:51234".parse().unwrap())
        );
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let (peer, _) = parse(b"PROXY UNKNOWN\r\n").await.unwrap();
        assert_eq!(peer, ProxiedPeer::Local);
    }

    #[tokio::test]
    async fn v2_names_the_client() {
        let header = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (
                "[2001:db8::7]:4711".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:443".parse::<SocketAddr>().unwrap(),
            ),
        )
        .build()
        .unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"hello");
        let (peer, rest) = parse(&bytes).await.unwrap();
        assert_eq!(
            peer,
            ProxiedPeer::Client("[2001:db8::7]:4711".parse().unwrap())
        );
        assert_eq!(rest, b"hello");
    }

    #[tokio::test]
    async fn plain_http_or_garbage_is_refused() {
        assert!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.is_err());
        assert!(parse(b"PROXY TCP4 nonsense\r\n").await.is_err());
        assert!(
            parse(b"PROXY TCP4 1.2.3.4").await.is_err(),
            "ends before the line does"
        );
    }

    #[tokio::test]
    async fn rewound_replays_then_reads_on() {
        let inner: &[u8] = b" world";
        let mut stream = Rewound::new(inner, b"hello".to_vec());
        let mut all = String::new();
        stream.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }
}
