//! `iotgate send`: talks to a listener the way a device does, so a first user (or an operator
//! checking a listener) needs no WebSocket library. It connects to a `ws://` or `wss://` URL,
//! sends each message as one text frame, prints every frame the server answers with on standard
//! output, and exits non-zero when the upgrade is refused, an `{"error": ...}` frame comes back,
//! or the server closes the connection with anything but 1000.
//!
//! Answers are read while messages are being sent (a reader task), so an error frame or a close
//! in the middle of a long standard-input stream is seen at once rather than after it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

/// The environment variable holding the password (or access key) sent with `--user`.
pub const DEVICE_PASSWORD_ENV: &str = "IOTGATE_DEVICE_PASSWORD";
/// How long the TCP connect, TLS and upgrade may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the server has to answer our close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Send messages to a listener as a device, and print what the server answers
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Connects to a listener as a device would, sends each message as one text frame, and prints every frame the server answers with on standard output (accepted messages usually get no answer; a rejected one gets an {\"error\": ...} frame).",
    after_help = "Environment: IOTGATE_DEVICE_PASSWORD holds the password (or access key) sent with --user.\n\nExit status: 0 when every message was sent and no error came back; 1 when the connection or the upgrade failed, an {\"error\": ...} frame came back, or the server closed the connection with a code other than 1000."
)]
pub struct SendArgs {
    /// ws:// or wss:// address of a listener, e.g. ws://127.0.0.1:8080/devices.
    #[arg(value_parser = parse_websocket_url)]
    pub url: url::Url,
    /// Messages, each sent as one text frame. Without any, each non-empty line of standard input
    /// is one message.
    #[arg(value_name = "MESSAGE")]
    pub messages: Vec<String>,
    /// Header for the upgrade request, as 'Name: value'; repeatable.
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// Sends Basic credentials with the upgrade: this user name (or device id) and the password
    /// (or access key) in IOTGATE_DEVICE_PASSWORD.
    #[arg(long)]
    pub user: Option<String>,
    /// WebSocket sub-protocol to ask for.
    #[arg(long)]
    pub protocol: Option<String>,
    /// Milliseconds to wait for answers after the last message.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub wait_ms: u64,
    /// Extra PEM CA certificates to trust for a wss:// listener on a private PKI.
    #[arg(long, env = "IOTGATE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

fn parse_websocket_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
    match url.scheme() {
        "ws" | "wss" => Ok(url),
        other => Err(format!(
            "a listener is reached with ws:// or wss://, not {other}://"
        )),
    }
}

fn upgrade_request(args: &SendArgs) -> anyhow::Result<tungstenite::handshake::client::Request> {
    let mut request = args.url.as_str().into_client_request()?;
    let headers = request.headers_mut();
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("--header {header:?} is not 'Name: value'"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .with_context(|| format!("--header {header:?}: invalid header name"))?;
        let value = HeaderValue::from_str(value.trim())
            .with_context(|| format!("--header {name}: invalid header value"))?;
        headers.append(name, value);
    }
    if let Some(user) = &args.user {
        let password = std::env::var(DEVICE_PASSWORD_ENV).map_err(|_| {
            anyhow::anyhow!("--user needs the password (or access key) in {DEVICE_PASSWORD_ENV}")
        })?;
        let credential =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!("Basic {credential}"))?,
        );
    }
    if let Some(protocol) = &args.protocol {
        headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(protocol).context("--protocol: invalid header value")?,
        );
    }
    Ok(request)
}

/// What came back from the server.
#[derive(Debug, Default)]
struct Answers {
    frames: usize,
    errors: usize,
    /// Set when the server started the closing handshake (not an answer to ours).
    closed_by_server: Option<Option<CloseFrame>>,
    /// The connection broke without a closing handshake.
    broken: Option<String>,
}

type Stream = futures_util::stream::SplitStream<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
>;

/// Prints every answer as it arrives and keeps count in `answers` (shared, so what was counted
/// survives when the task is stopped because the server never answered our close); cancels
/// `ended` when the connection is over.
async fn read_answers(
    mut stream: Stream,
    answers: Arc<Mutex<Answers>>,
    we_closed: Arc<AtomicBool>,
    ended: CancellationToken,
) {
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(Message::Text(text)) => {
                let is_error = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .is_some_and(|value| value.get("error").is_some());
                println!("{text}");
                let mut answers = answers.lock().expect("answers lock");
                answers.frames += 1;
                answers.errors += usize::from(is_error);
            }
            Ok(Message::Binary(bytes)) => {
                eprintln!(
                    "iotgate send: the server answered with a binary frame of {} bytes",
                    bytes.len()
                );
                answers.lock().expect("answers lock").frames += 1;
            }
            Ok(Message::Close(frame)) => {
                if !we_closed.load(Ordering::SeqCst) {
                    answers.lock().expect("answers lock").closed_by_server = Some(frame);
                }
                break;
            }
            Ok(_) => {}
            Err(error) => {
                answers.lock().expect("answers lock").broken = Some(error.to_string());
                break;
            }
        }
    }
    ended.cancel();
}

fn plural(count: usize, word: &str) -> String {
    if count == 1 {
        format!("1 {word}")
    } else {
        format!("{count} {word}s")
    }
}

pub async fn run(args: SendArgs) -> anyhow::Result<ExitCode> {
    let request = upgrade_request(&args)?;
    let connector =
        tokio_tungstenite::Connector::Rustls(super::tls::client_config(args.ca_file.as_deref())?);
    let connecting =
        tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector));
    let socket = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => anyhow::bail!(
            "{} did not complete the WebSocket upgrade within {} s",
            args.url,
            CONNECT_TIMEOUT.as_secs()
        ),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            anyhow::bail!(
                "{} refused the WebSocket upgrade: {} {}",
                args.url,
                response.status(),
                body.trim()
            )
        }
        Ok(Err(error)) => {
            return Err(error).with_context(|| format!("cannot connect to {}", args.url))
        }
        Ok(Ok((socket, _response))) => socket,
    };

    let (mut sink, stream) = socket.split();
    let we_closed = Arc::new(AtomicBool::new(false));
    let ended = CancellationToken::new();
    let answers = Arc::new(Mutex::new(Answers::default()));
    let reader = tokio::spawn(read_answers(
        stream,
        answers.clone(),
        we_closed.clone(),
        ended.clone(),
    ));

    let mut sent = 0;
    let mut send_failed = None;
    if args.messages.is_empty() {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            let line = tokio::select! {
                line = lines.next_line() => line.context("cannot read standard input")?,
                _ = ended.cancelled() => break,
            };
            let Some(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            if let Err(error) = sink.send(Message::text(line)).await {
                send_failed = Some(error);
                break;
            }
            sent += 1;
        }
    } else {
        for message in &args.messages {
            if let Err(error) = sink.send(Message::text(message.as_str())).await {
                send_failed = Some(error);
                break;
            }
            sent += 1;
        }
    }

    // Answers to the last messages may still be on their way.
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(args.wait_ms)) => {}
        _ = ended.cancelled() => {}
    }
    if !ended.is_cancelled() {
        we_closed.store(true, Ordering::SeqCst);
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ended.cancelled()).await;
    }
    // Still running only when the server never answered our close.
    reader.abort();
    let _ = reader.await;
    let answers = std::mem::take(&mut *answers.lock().expect("answers lock"));

    let mut summary = format!("{} sent to {}", plural(sent, "message"), args.url);
    summary.push_str(&match (answers.frames, answers.errors) {
        (0, _) => format!("; no answer within {} ms", args.wait_ms),
        (frames, 0) => format!("; {}", plural(frames, "answer")),
        (frames, errors) => format!(
            "; {} ({})",
            plural(frames, "answer"),
            plural(errors, "error")
        ),
    });
    let mut failed = answers.errors > 0;
    if let Some(close) = &answers.closed_by_server {
        match close {
            Some(frame) => summary.push_str(&format!(
                "; the server closed the connection: {} {}",
                u16::from(frame.code),
                frame.reason
            )),
            None => summary.push_str("; the server closed the connection without a code"),
        }
        failed |= close
            .as_ref()
            .is_none_or(|frame| frame.code != CloseCode::Normal);
    }
    if let Some(error) = &answers.broken {
        summary.push_str(&format!("; the connection broke: {error}"));
        failed = true;
    }
    if let Some(error) = send_failed {
        summary.push_str(&format!("; sending stopped: {error}"));
        failed = true;
    }
    eprintln!("iotgate send: {summary}");
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
