//! What the modules that connect out (nats, mqtt, websocket-client) share: their connection
//! status, the jittered reconnect backoff, subject/topic templates, and the probe report of the
//! "test connection" endpoint.

use std::sync::Mutex;
use std::time::Duration;

use iotgate_core::definition::{parse_template, TemplatePart};
use iotgate_core::Envelope;
use rand::Rng;
use serde::Serialize;
use time::OffsetDateTime;

/// The connection state of a downstream that connects out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Connecting,
    Connected,
    /// Lost; reconnecting with backoff.
    Disconnected,
    /// The broker refused the credentials or the configuration; still retrying, slowly.
    Error,
}

/// What `GET /api/v1/downstreams/{key}/status` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatusView {
    pub key: String,
    pub state: LinkState,
    /// The last problem (connection refused, authorization violation, ...), if any.
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    pub reconnects: u64,
}

#[derive(Debug)]
pub struct LinkStatus {
    key: String,
    inner: Mutex<(LinkState, Option<String>, OffsetDateTime, u64)>,
}

impl LinkStatus {
    pub fn new(key: &str) -> Self {
        Self {
            key: key.to_owned(),
            inner: Mutex::new((LinkState::Connecting, None, OffsetDateTime::now_utc(), 0)),
        }
    }

    pub fn state(&self) -> LinkState {
        self.inner.lock().expect("status lock").0
    }

    /// Records a new state (the time only changes with the state) and keeps the last error
    /// unless one is given.
    pub fn set(&self, state: LinkState, error: Option<String>) {
        let mut inner = self.inner.lock().expect("status lock");
        if inner.0 != state {
            inner.2 = OffsetDateTime::now_utc();
        }
        inner.0 = state;
        if error.is_some() {
            inner.1 = error;
        }
    }

    pub fn reconnected(&self) {
        self.inner.lock().expect("status lock").3 += 1;
    }

    pub fn view(&self) -> LinkStatusView {
        let inner = self.inner.lock().expect("status lock");
        LinkStatusView {
            key: self.key.clone(),
            state: inner.0,
            last_error: inner.1.clone(),
            since: inner.2,
            reconnects: inner.3,
        }
    }
}

/// Wait before reconnect attempt `attempt` (1-based): 250 ms doubling up to 15 s, each drawn
/// between half and all of that (jitter, so many gateways do not reconnect in step).
pub fn reconnect_delay(attempt: usize) -> Duration {
    let ceiling = 250u64
        .saturating_mul(1 << attempt.saturating_sub(1).min(6))
        .min(15_000);
    Duration::from_millis(rand::thread_rng().gen_range(ceiling / 2..=ceiling))
}

/// Wait before re-publishing after a refused attempt `attempt` (1-based): 200 ms doubling up
/// to 10 s, with up to 50% added jitter.
pub fn retry_delay(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.saturating_sub(1).min(6));
    let jitter = rand::thread_rng().gen_range(0..=base / 2);
    Duration::from_millis((base + jitter).min(10_000))
}

/// A parsed subject or topic template; placeholders take the envelope's listener key, device id
/// (authenticated, else claimed, else `unknown`) and device type (else `unknown`), with the
/// characters the address cannot hold replaced by `_`.
#[derive(Debug, Clone)]
pub struct AddressTemplate {
    parts: Vec<TemplatePart>,
    forbidden: fn(char) -> bool,
}

/// What a placeholder stands for when the envelope has no such value.
pub const UNKNOWN: &str = "unknown";

impl AddressTemplate {
    /// A NATS subject: whitespace, control characters, `.`, `*` and `>` are replaced.
    pub fn nats(template: &str) -> Result<Self, String> {
        Ok(Self {
            parts: parse_template(template)?,
            forbidden: |c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>'),
        })
    }

    /// An MQTT topic: `/`, `+`, `#` and NUL are replaced.
    pub fn mqtt(template: &str) -> Result<Self, String> {
        Ok(Self {
            parts: parse_template(template)?,
            forbidden: |c| matches!(c, '/' | '+' | '#' | '\0'),
        })
    }

    pub fn render(&self, envelope: &Envelope) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => out.push_str(text),
                TemplatePart::Placeholder(name) => {
                    let value = match *name {
                        "listenerKey" => Some(&*envelope.listener_key),
                        "deviceId" => envelope
                            .device_id
                            .as_deref()
                            .or(envelope.claimed_device_id.as_deref()),
                        _ => envelope.device_type.as_deref(),
                    }
                    .filter(|v| !v.is_empty())
                    .unwrap_or(UNKNOWN);
                    out.extend(
                        value
                            .chars()
                            .map(|c| if (self.forbidden)(c) { '_' } else { c }),
                    );
                }
            }
        }
        out
    }

    /// The subjects a stream needs to capture every rendered subject: each `.`-separated token
    /// holding a placeholder becomes `*`.
    pub fn stream_subject(&self) -> String {
        let mut shape = String::new();
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => shape.push_str(text),
                TemplatePart::Placeholder(_) => shape.push('\u{1}'),
            }
        }
        shape
            .split('.')
            .map(|token| {
                if token.contains('\u{1}') {
                    "*".to_owned()
                } else {
                    token.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// One step of a connection test.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeStep {
    pub step: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// What `POST /api/v1/downstreams/{key}/test` answers.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ProbeReport {
    /// Every step succeeded.
    pub ok: bool,
    pub connected: bool,
    pub authenticated: bool,
    pub published: bool,
    pub steps: Vec<ProbeStep>,
}

impl ProbeReport {
    pub fn step(&mut self, step: &'static str, ok: bool, detail: impl Into<String>) {
        self.steps.push(ProbeStep {
            step,
            ok,
            detail: detail.into(),
        });
    }

    pub fn finish(mut self) -> Self {
        self.ok = !self.steps.is_empty() && self.steps.iter().all(|s| s.ok);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(
        device: Option<&str>,
        claimed: Option<&str>,
        device_type: Option<&str>,
    ) -> Envelope {
        Envelope {
            id: uuid::Uuid::now_v7(),
            listener_key: std::sync::Arc::from("plant.a"),
            connection_id: 1,
            source_address: None,
            received_at: OffsetDateTime::now_utc(),
            received_instant: std::time::Instant::now(),
            content_type: iotgate_core::ContentType::Json,
            size: 0,
            payload: iotgate_core::Payload::Json(serde_json::json!({})),
            device_id: device.map(std::sync::Arc::from),
            device_type: device_type.map(std::sync::Arc::from),
            authenticated: device.is_some(),
            claimed_device_id: claimed.map(std::sync::Arc::from),
            metadata: std::sync::Arc::default(),
            message_id: None,
            dedup_window: None,
            attributes: None,
            message_type: None,
        }
    }

    #[test]
    fn placeholders_take_one_token_or_level_each() {
        let nats = AddressTemplate::nats("t.{listenerKey}.{deviceType}.{deviceId}").unwrap();
        assert_eq!(
            nats.render(&envelope(Some("a b*c>d"), None, Some("x.y"))),
            "t.plant_a.x_y.a_b_c_d"
        );
        // A claimed device stands in for an authenticated one; missing values are "unknown".
        assert_eq!(
            nats.render(&envelope(None, Some("claimed"), None)),
            "t.plant_a.unknown.claimed"
        );
        let mqtt = AddressTemplate::mqtt("t/{listenerKey}/{deviceId}").unwrap();
        assert_eq!(
            mqtt.render(&envelope(Some("a/b+c#d"), None, None)),
            "t/plant.a/a_b_c_d"
        );
        assert!(AddressTemplate::nats("t.{device}").is_err());
    }

    #[test]
    fn stream_subjects_wildcard_every_token_with_a_placeholder() {
        let t = AddressTemplate::nats("iotgate.{listenerKey}.dev-{deviceId}.x").unwrap();
        assert_eq!(t.stream_subject(), "iotgate.*.*.x");
    }

    #[test]
    fn backoff_is_jittered_and_bounded() {
        for attempt in 1..20 {
            let d = reconnect_delay(attempt);
            assert!(d <= Duration::from_secs(15));
            assert!(d >= Duration::from_millis(125));
        }
    }
}

/// How a module that connects out settles what it delivered or gave up on.
#[derive(Debug, Clone)]
pub(crate) struct Settler {
    pub key: std::sync::Arc<str>,
    pub context: super::DownstreamContext,
    pub counters: crate::metrics::DownstreamCounters,
    pub status: std::sync::Arc<LinkStatus>,
    /// A message a device waits on that is not delivered within this is refused.
    pub timeout: Duration,
}

impl Settler {
    pub fn delivered(&self, delivery: super::Delivery, duplicate: bool) {
        self.counters.delivered.inc();
        self.context
            .metrics
            .latency
            .observe(delivery.envelope.received_instant.elapsed().as_secs_f64());
        if let Some(receipt) = delivery.receipt {
            receipt.stored(duplicate);
        }
    }

    /// True when a device waits on this message and its time is up.
    pub fn expired(&self, delivery: &super::Delivery) -> bool {
        delivery.receipt.is_some() && delivery.queued_at.elapsed() >= self.timeout
    }

    /// The message cannot be delivered: a device waiting on it is refused (its retry delivers
    /// it), anything else becomes a dead letter with the reason.
    pub async fn give_up(&self, delivery: super::Delivery, reason: &str, message: &str) {
        match delivery.receipt {
            Some(receipt) => {
                tracing::debug!(downstream = %self.key, envelope = %delivery.envelope.id, error = %message, "acknowledged message not delivered in time; the device is told to retry");
                receipt.refused(
                    format!(
                        "downstream {} did not take the message: {message}",
                        self.key
                    ),
                    Duration::from_secs(2),
                );
            }
            None => {
                tracing::warn!(downstream = %self.key, envelope = %delivery.envelope.id, reason, error = %message, "envelope dead-lettered");
                self.context
                    .dead_letters
                    .record(&delivery.envelope, &self.key, reason, message)
                    .await;
            }
        }
    }

    pub fn connected(&self, first: bool) {
        self.counters.connected.set(1);
        self.status.set(LinkState::Connected, None);
        if !first {
            self.counters.reconnects.inc();
            self.status.reconnected();
        }
    }

    pub fn disconnected(&self, state: LinkState, error: Option<String>) {
        self.counters.connected.set(0);
        self.status.set(state, error);
    }
}

/// A header or metadata value without the line breaks and control characters no header may hold.
pub fn header_safe(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// How long a stopping module keeps trying to deliver what it holds before dead-lettering it.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);
