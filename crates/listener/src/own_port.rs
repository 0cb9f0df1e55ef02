//! Own-port serving of a server-mode listener: an HTTP server on the listener's `hostName:port`
//! that serves only its path, optionally over TLS, optionally behind the PROXY protocol.
//!
//! Without `proxyProtocol` this is actix-web's `HttpServer`. With it, the connection's first bytes
//! are the load balancer's PROXY header, which `HttpServer` cannot read, so the server is built
//! one level down: an actix-server accepts, [`crate::proxy_protocol`] reads the header (from a
//! trusted peer only), TLS is accepted after it when the listener is secure, and actix-http's
//! `HttpService` serves the rest with the client's address as the peer address. Either way the
//! client's address then goes through [`crate::client_address`] like on the main port.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::{HttpService, Protocol};
use actix_service::{fn_service, map_config, ServiceFactoryExt as _};
use actix_web::body::MessageBody;
use actix_web::dev::{AppConfig, ServerHandle, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::client_address::{self, TrustedProxies};
use crate::proxy_protocol::{self, ProxiedPeer, Rewound};
use crate::server::ServerListener;

/// What every own-port server shares.
#[derive(Debug, Clone)]
pub struct OwnPortSettings {
    /// Time a client has to send its PROXY header, finish TLS and send its request head, unless
    /// the listener sets its own (`websocket.openHandshakeTimeoutMs`).
    pub handshake_timeout: Duration,
    /// `--port-offset`: added to the listener's port unless it is 0 (any free port).
    pub port_offset: u16,
    pub trusted_proxies: Arc<TrustedProxies>,
    pub runtime: tokio::runtime::Handle,
}

/// A running own-port server.
#[derive(Debug)]
pub struct OwnPortServer {
    pub address: SocketAddr,
    pub handle: ServerHandle,
    pub task: JoinHandle<()>,
}

/// The app of one listener: the client address first, then the upgrade at the listener's path.
fn listener_app(
    served: Arc<ServerListener>,
    proxies: Arc<TrustedProxies>,
    tls: bool,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .wrap_fn(move |request, service| {
            client_address::attach(&request, &proxies, tls);
            actix_service::Service::call(service, request)
        })
        .default_service(web::to(move |request: HttpRequest, body: web::Payload| {
            let served = served.clone();
            async move {
                if request.path() == served.definition.path {
                    served.handle_upgrade(request, body).await
                } else {
                    HttpResponse::NotFound().json(serde_json::json!({"error": {"code": "not_found", "message": "no listener at this path"}}))
                }
            }
        }))
}

/// Binds and starts the listener's own server.
pub fn serve(
    listener: &Arc<ServerListener>,
    settings: &OwnPortSettings,
) -> Result<OwnPortServer, String> {
    let definition = &listener.definition;
    let host = definition
        .host_name
        .clone()
        .unwrap_or_else(|| "0.0.0.0".to_owned());
    let port = match definition.port {
        None | Some(0) => 0,
        Some(port) => port.checked_add(settings.port_offset).ok_or_else(|| {
            format!(
                "port {port} plus the node's --port-offset {} passes 65535",
                settings.port_offset
            )
        })?,
    };
    let tls = if definition.secure {
        Some(Arc::new(load_server_tls(
            definition.tls_cert_file.as_deref().unwrap_or_default(),
            definition.tls_key_file.as_deref().unwrap_or_default(),
        )?))
    } else {
        None
    };
    let (address, server) = if definition.proxy_protocol {
        if settings.trusted_proxies.is_empty() {
            return Err(
                "proxyProtocol needs --trusted-proxies: no peer may send a PROXY header otherwise"
                    .into(),
            );
        }
        serve_behind_proxy_protocol(listener, settings, &host, port, tls)?
    } else {
        serve_plain(listener, settings, &host, port, tls)?
    };
    let handle = server.handle();
    let task = settings.runtime.spawn(async move {
        if let Err(error) = server.await {
            tracing::error!(error = %error, "own-port listener server failed");
        }
    });
    Ok(OwnPortServer {
        address,
        handle,
        task,
    })
}

fn serve_plain(
    listener: &Arc<ServerListener>,
    settings: &OwnPortSettings,
    host: &str,
    port: u16,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(SocketAddr, actix_web::dev::Server), String> {
    let served = listener.clone();
    let proxies = settings.trusted_proxies.clone();
    let secure = tls.is_some();
    let handshake_timeout = open_handshake_timeout(listener, settings);
    let server = HttpServer::new(move || listener_app(served.clone(), proxies.clone(), secure))
        .workers(2)
        .disable_signals()
        .shutdown_timeout(2)
        .backlog(4096)
        .client_request_timeout(handshake_timeout)
        .client_disconnect_timeout(Duration::ZERO)
        // Small frames (acks, refusals) go out at once, as on the main port.
        .tcp_nodelay(true)
        .tls_handshake_timeout(handshake_timeout);
    let server = match tls {
        Some(config) => server.bind_rustls_0_23((host, port), rustls::ServerConfig::clone(&config)),
        None => server.bind((host, port)),
    }
    .map_err(|e| format!("could not bind {host}:{port}: {e}"))?;
    let address = *server.addrs().first().ok_or("no address bound")?;
    Ok((address, server.run()))
}

fn serve_behind_proxy_protocol(
    listener: &Arc<ServerListener>,
    settings: &OwnPortSettings,
    host: &str,
    port: u16,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(SocketAddr, actix_web::dev::Server), String> {
    let socket = std::net::TcpListener::bind((host, port))
        .map_err(|e| format!("could not bind {host}:{port}: {e}"))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("could not bind {host}:{port}: {e}"))?;
    let address = socket
        .local_addr()
        .map_err(|e| format!("could not bind {host}:{port}: {e}"))?;
    let served = listener.clone();
    let proxies = settings.trusted_proxies.clone();
    let timeout = open_handshake_timeout(listener, settings);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let server = actix_server::Server::build()
        .workers(2)
        .disable_signals()
        .shutdown_timeout(2)
        .listen("iotgate-listener", socket, move || {
            let secure = acceptor.is_some();
            let http = HttpService::build()
                .client_request_timeout(timeout)
                .client_disconnect_timeout(Duration::ZERO)
                .finish(map_config(
                    listener_app(served.clone(), proxies.clone(), secure),
                    |_| AppConfig::default(),
                ));
            let proxies = proxies.clone();
            let acceptor = acceptor.clone();
            fn_service(move |stream: TcpStream| {
                let proxies = proxies.clone();
                let acceptor = acceptor.clone();
                async move {
                    accept_proxied(stream, &proxies, acceptor, timeout)
                        .await
                        .map_err(actix_http::error::DispatchError::Io)
                }
            })
            .and_then(http)
        })
        .map_err(|e| format!("could not serve {host}:{port}: {e}"))?
        .run();
    Ok((address, server))
}

/// The listener's `websocket.openHandshakeTimeoutMs`, else the server-wide
/// `--handshake-timeout-ms`. actix applies it per server (time to the request head, and to the
/// end of TLS), which is why only own-port listeners can have their own.
fn open_handshake_timeout(listener: &ServerListener, settings: &OwnPortSettings) -> Duration {
    listener
        .websocket
        .open_handshake_timeout
        .unwrap_or(settings.handshake_timeout)
}

/// Reads the PROXY header of a trusted peer, then TLS if the listener is secure.
async fn accept_proxied(
    mut stream: TcpStream,
    proxies: &TrustedProxies,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    timeout: Duration,
) -> io::Result<(ListenerIo, Protocol, Option<SocketAddr>)> {
    let peer = stream.peer_addr()?;
    if !proxies.contains(peer.ip()) {
        tracing::info!(peer = %peer, "refused a connection on a PROXY protocol port: the peer is not a trusted proxy");
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "peer is not a trusted proxy",
        ));
    }
    let (said, rest) = match proxy_protocol::read_header(&mut stream, timeout).await {
        Ok(parsed) => parsed,
        Err(error) => {
            tracing::info!(peer = %peer, error = %error, "refused a connection without a valid PROXY header");
            return Err(error);
        }
    };
    let client = match said {
        ProxiedPeer::Client(address) => address,
        ProxiedPeer::Local => peer,
    };
    let stream = Rewound::new(stream, rest);
    let io = match acceptor {
        Some(acceptor) => {
            let accepted = tokio::time::timeout(timeout, acceptor.accept(stream))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            ListenerIo::Tls(Box::new(accepted))
        }
        None => ListenerIo::Plain(stream),
    };
    Ok((io, Protocol::Http1, Some(client)))
}

/// One accepted connection, plain or TLS, after its PROXY header.
enum ListenerIo {
    Plain(Rewound<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<Rewound<TcpStream>>>),
}

impl AsyncRead for ListenerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ListenerIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ListenerIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ListenerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ListenerIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ListenerIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ListenerIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ListenerIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ListenerIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ListenerIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Reads a PEM certificate chain and private key into a rustls server configuration.
pub fn load_server_tls(cert_file: &str, key_file: &str) -> Result<rustls::ServerConfig, String> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert_file)
            .map_err(|e| format!("cannot open tlsCertFile {cert_file}: {e}"))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| format!("tlsCertFile {cert_file} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("tlsCertFile {cert_file} holds no certificate"));
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key_file)
            .map_err(|e| format!("cannot open tlsKeyFile {key_file}: {e}"))?,
    ))
    .map_err(|e| format!("tlsKeyFile {key_file} is not PEM: {e}"))?
    .ok_or_else(|| format!("tlsKeyFile {key_file} holds no private key"))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the TLS certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
