//! A tiny real HTTP/1.1 server for webhook downstreams: it records every request and answers
//! each with a status (and after a delay) that the test chooses per request number.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request the hook server received.
#[derive(Clone, Debug)]
pub struct HookRequest {
    pub head: String,
    pub body: Vec<u8>,
}

impl HookRequest {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// The answer to request number `n` (0-based): status and delay before answering.
pub type HookAnswer = Arc<dyn Fn(usize) -> (u16, Duration) + Send + Sync>;

pub struct HookServer {
    pub url: String,
    /// Every request received, in arrival order.
    pub requests: Arc<Mutex<Vec<HookRequest>>>,
    /// The requests answered 2xx, in answer order.
    pub accepted: Arc<Mutex<Vec<HookRequest>>>,
    /// Every request received, whatever its answer.
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers every request with `status`, at once.
pub async fn start_hook(status: u16) -> HookServer {
    start_hook_with(Arc::new(move |_| (status, Duration::ZERO))).await
}

/// Answers every request with 200 after `delay`.
pub async fn start_slow_hook(delay: Duration) -> HookServer {
    start_hook_with(Arc::new(move |_| (200, delay))).await
}

/// Answers every request with `status` and extra response headers (e.g. a `location` for a
/// redirect).
pub async fn start_hook_answering(status: u16, headers: Vec<(String, String)>) -> HookServer {
    serve(Arc::new(move |_| (status, Duration::ZERO)), headers).await
}

pub async fn start_hook_with(answer: HookAnswer) -> HookServer {
    serve(answer, Vec::new()).await
}

async fn serve(answer: HookAnswer, headers: Vec<(String, String)>) -> HookServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let hits = Arc::new(AtomicUsize::new(0));
    let (req2, acc2, hits2) = (requests.clone(), accepted.clone(), hits.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (reqs, acc, hits, answer, headers) = (
                req2.clone(),
                acc2.clone(),
                hits2.clone(),
                answer.clone(),
                headers.clone(),
            );
            tokio::spawn(async move {
                let Some(req) = read_http_request(&mut sock).await else {
                    return;
                };
                let (status, delay) = answer(hits.load(Ordering::SeqCst));
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                hits.fetch_add(1, Ordering::SeqCst);
                if (200..300).contains(&status) {
                    acc.lock().unwrap().push(req.clone());
                }
                reqs.lock().unwrap().push(req);
                let reason = match status {
                    200..=299 => "OK",
                    300..=399 => "Found",
                    _ => "Error",
                };
                let extra: String = headers
                    .iter()
                    .map(|(name, value)| format!("{name}: {value}\r\n"))
                    .collect();
                let resp = format!(
                    "HTTP/1.1 {status} {reason}\r\n{extra}content-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    HookServer {
        url: format!("http://127.0.0.1:{port}/hook"),
        requests,
        accepted,
        hits,
        task,
    }
}

async fn read_http_request(sock: &mut tokio::net::TcpStream) -> Option<HookRequest> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let lower = head.to_ascii_lowercase();
    let mut rest = buf[head_end..].to_vec();
    let header = |name: &str| {
        lower.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
    };
    let body = if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < len {
            let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        // Minimal chunked decoding: read until the terminating 0-length chunk.
        loop {
            if rest.windows(5).any(|w| w == b"0\r\n\r\n") {
                break;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut chunk))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(p) = rest[i..].windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[i..i + p]).trim(), 16).ok()?;
            if size == 0 {
                break;
            }
            let start = i + p + 2;
            out.extend_from_slice(rest.get(start..start + size)?);
            i = start + size + 2;
        }
        out
    } else {
        Vec::new()
    };
    Some(HookRequest { head, body })
}

pub fn envelope_id_header(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("x-iotgate-envelope-id")
            .then(|| value.trim().to_string())
    })
}
