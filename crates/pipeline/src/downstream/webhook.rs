//! The `webhook` downstream: HTTP POST of each envelope with bounded concurrency and retries
//! with exponential backoff and jitter.
//!
//! An envelope nobody waits on is retried `maxRetries` times and then dead-lettered with the last
//! error. An envelope a device waits on (`acknowledge: stored`) gets its attempts within
//! `timeoutMs` of being queued; if none answered 2xx by then, the device is refused with
//! `downstream_unavailable` and a retry hint (it is the device's retry that delivers it, so it is
//! not dead-lettered). Every request carries `X-Iotgate-Envelope-Id`, and, when the device named
//! the message, `Idempotency-Key: <deviceId>/<messageId>` so a receiver can drop a redelivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use iotgate_core::definition::DownstreamDefinition;
use iotgate_core::Envelope;
use rand::Rng;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::{Delivery, DownstreamContext};
use crate::metrics::DownstreamCounters;

/// Webhook requests in flight per module.
const WEBHOOK_CONCURRENCY: usize = 16;

pub(crate) async fn run_webhook(
    definition: DownstreamDefinition,
    context: DownstreamContext,
    mut receiver: mpsc::Receiver<Delivery>,
    counters: DownstreamCounters,
) {
    let definition = Arc::new(definition);
    let permits = Arc::new(Semaphore::new(WEBHOOK_CONCURRENCY));
    let mut in_flight = JoinSet::new();
    while let Some(delivery) = receiver.recv().await {
        counters.queue_depth.dec();
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let definition = definition.clone();
        let context = context.clone();
        let counters = counters.clone();
        in_flight.spawn(async move {
            deliver_webhook(&definition, &context, &counters, delivery).await;
            drop(permit);
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
    tracing::debug!(downstream = %definition.key, "webhook downstream drained and stopped");
}

/// Backoff before attempt `attempt` (1-based retries): 200 ms doubling, with up to 50% jitter,
/// at most 10 s.
fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << (attempt.saturating_sub(1)).min(6));
    let jitter = rand::thread_rng().gen_range(0..=base / 2);
    Duration::from_millis((base + jitter).min(10_000))
}

async fn deliver_webhook(
    definition: &DownstreamDefinition,
    context: &DownstreamContext,
    counters: &DownstreamCounters,
    delivery: Delivery,
) {
    let Delivery {
        envelope,
        receipt,
        queued_at,
    } = delivery;
    let url = definition.url.as_deref().unwrap_or_default();
    let body = match serde_json::to_vec(&*envelope) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(error = %error, "envelope could not be serialized");
            return;
        }
    };
    let timeout = Duration::from_millis(definition.timeout_ms);
    // A device waits on this message: every attempt must end within its budget.
    let deadline = receipt.as_ref().map(|_| queued_at + timeout);
    let idempotency_key = idempotency_key(&envelope);
    let mut last_error = String::new();
    let mut attempt = 0;
    loop {
        let request_timeout = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                left.min(timeout)
            }
            None => timeout,
        };
        let mut request = context
            .http
            .post(url)
            .timeout(request_timeout)
            .header("content-type", "application/json")
            .header("x-iotgate-envelope-id", envelope.id.to_string())
            .body(body.clone());
        if let Some(key) = &idempotency_key {
            request = request.header("idempotency-key", key);
        }
        for (name, value) in &definition.headers {
            request = request.header(name, value);
        }
        let started = Instant::now();
        match request.send().await {
            Ok(response) if response.status().is_success() => {
                counters.delivered.inc();
                context
                    .metrics
                    .latency
                    .observe(envelope.received_instant.elapsed().as_secs_f64());
                tracing::trace!(downstream = %definition.key, elapsed_ms = started.elapsed().as_millis() as u64, "webhook delivered");
                if let Some(receipt) = receipt {
                    receipt.stored(false);
                }
                return;
            }
            Ok(response) => {
                let status = response.status();
                last_error = format!("the webhook answered {status}");
                // A 4xx other than 408/429 will not get better by retrying.
                if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
                    break;
                }
            }
            Err(error) => {
                // Without the URL: its query string or user info may hold a credential.
                last_error = format!("the webhook request failed: {}", error.without_url());
            }
        }
        counters.failed.inc();
        tracing::debug!(downstream = %definition.key, attempt, error = %last_error, "webhook delivery failed");
        attempt += 1;
        if attempt > definition.max_retries {
            break;
        }
        let wait = backoff(attempt);
        if deadline.is_some_and(|deadline| Instant::now() + wait >= deadline) {
            break;
        }
        tokio::time::sleep(wait).await;
    }
    match receipt {
        Some(receipt) => {
            tracing::debug!(downstream = %definition.key, envelope = %envelope.id, error = %last_error, "webhook did not take an acknowledged message; the device is told to retry");
            receipt.refused(
                format!("the webhook did not take the message: {last_error}"),
                backoff(attempt.max(1)).max(Duration::from_secs(1)),
            );
        }
        None => {
            tracing::warn!(downstream = %definition.key, envelope = %envelope.id, error = %last_error, "webhook gave up; envelope dead-lettered");
            context
                .dead_letters
                .record(&envelope, &definition.key, "webhook_failed", &last_error)
                .await;
        }
    }
}

/// `<deviceId>/<messageId>` for messages the device named, so a redelivery can be recognised;
/// both parts percent-encoded, since ids may hold characters a header value cannot.
fn idempotency_key(envelope: &Envelope) -> Option<String> {
    let device = envelope.device_id.as_deref()?;
    let id = envelope.message_id.as_ref()?.dedup_key()?;
    Some(format!(
        "{}/{}",
        percent_encode(device),
        percent_encode(&id)
    ))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_valid_header_values() {
        assert_eq!(percent_encode("m-17_a.b~"), "m-17_a.b~");
        assert_eq!(percent_encode("a/b c\né"), "a%2Fb%20c%0A%C3%A9");
        assert!(reqwest::header::HeaderValue::from_str(&percent_encode("\u{7f}\r\n x")).is_ok());
    }
}
