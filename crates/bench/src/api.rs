//! The admin REST API as the bench uses it: login, definitions, devices, listener status and the
//! Prometheus text at `/metrics`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::server::ADMIN_PASSWORD;

/// How many device registrations run at once (each is a REST call with a database insert).
const REGISTER_CONCURRENCY: usize = 8;

/// An authenticated API client.
pub struct Api {
    /// Pooled HTTP client with a request timeout, so no call can hang the bench.
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT`.
    base: String,
    /// The admin bearer token from login; also used by WebSocket subscribers (`?token=`).
    pub token: String,
}

/// One registered device and the access key the bench sends in every message.
#[derive(Clone)]
pub struct DeviceKey {
    pub device_id: String,
    pub access_key: String,
}

impl Api {
    /// Logs in as `admin` with the bench password.
    pub async fn login(base: String) -> Result<Api> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()?;
        let resp = http
            .post(format!("{base}/api/v1/auth/login"))
            .json(&json!({"userName": "admin", "password": ADMIN_PASSWORD}))
            .send()
            .await
            .context("POST /api/v1/auth/login")?;
        let body = checked_json(resp, "POST /api/v1/auth/login").await?;
        let token = body["token"]
            .as_str()
            .context("the login response has no `token`")?
            .to_owned();
        Ok(Api { http, base, token })
    }

    /// `POST /api/v1/{path}` with a JSON body; any non-2xx status is an error carrying the body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let what = format!("POST /api/v1/{path}");
        let resp = self
            .http
            .post(format!("{}/api/v1/{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .with_context(|| what.clone())?;
        checked_json(resp, &what).await
    }

    /// `GET /api/v1/{path}`.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let what = format!("GET /api/v1/{path}");
        let resp = self
            .http
            .get(format!("{}/api/v1/{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| what.clone())?;
        checked_json(resp, &what).await
    }

    /// Creates a definition of `kind` (`listeners`, `sentinels`, `routes`, `downstreams`).
    pub async fn create(&self, kind: &str, definition: Value) -> Result<Value> {
        self.post(kind, &definition).await
    }

    /// Polls `GET /api/v1/listeners/{key}/status` until `state` is `running` (at most 15 s).
    pub async fn wait_listener_running(&self, key: &str) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status = self.listener_status(key).await;
            match status {
                Ok(s) if s["state"] == "running" => return Ok(s),
                Ok(s) if Instant::now() >= deadline => {
                    bail!("listener {key} is not running after 15 s: {s}")
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `GET /api/v1/listeners/{key}/status`.
    pub async fn listener_status(&self, key: &str) -> Result<Value> {
        self.get(&format!("listeners/{key}/status")).await
    }

    /// Registers `bench-0..n` (deviceType `bench`) and returns their primary access keys in order.
    pub async fn register_devices(&self, n: usize) -> Result<Vec<DeviceKey>> {
        let results: Vec<Result<DeviceKey>> = futures_util::stream::iter(0..n)
            .map(|i| async move {
                let device_id = format!("bench-{i}");
                let body = json!({"deviceId": device_id, "name": device_id, "deviceType": "bench"});
                let created = self.post("devices", &body).await?;
                let access_key = created["primaryAccessKey"]
                    .as_str()
                    .with_context(|| format!("no primaryAccessKey for {device_id}: {created}"))?
                    .to_owned();
                Ok(DeviceKey {
                    device_id,
                    access_key,
                })
            })
            .buffered(REGISTER_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// The Prometheus text from `GET /metrics` (with the admin token: it is not public by
    /// default).
    pub async fn metrics(&self) -> Result<String> {
        let resp = self
            .http
            .get(format!("{}/metrics", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .context("GET /metrics")?;
        let status = resp.status();
        let text = resp.text().await.context("reading /metrics")?;
        if !status.is_success() {
            bail!("GET /metrics answered {status}: {text}");
        }
        Ok(text)
    }
}

/// Turns a response into its JSON body, or an error naming the call, the status and the body.
async fn checked_json(resp: reqwest::Response, what: &str) -> Result<Value> {
    let status = resp.status();
    let text = resp
        .text()
        .await
        .with_context(|| format!("{what}: reading the body"))?;
    if !status.is_success() {
        bail!("{what} answered {status}: {text}");
    }
    if text.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&text).with_context(|| format!("{what}: the body is not JSON: {text}"))
}

/// Sums the samples of metric `name` whose label set contains `label` (e.g. `downstream="x"`;
/// empty matches every sample). `None` when no sample matches.
///
/// Accepts both `name{labels} value` and `name value`, and ignores timestamps and exemplars
/// after the value.
pub fn metric_sum(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value_part) = if let Some(after) = rest.strip_prefix('{') {
            let Some(close) = after.find('}') else {
                continue;
            };
            (&after[..close], &after[close + 1..])
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            // A longer metric name that merely starts with `name`.
            continue;
        };
        if !label.is_empty() && !labels.split(',').any(|l| l.trim() == label) {
            continue;
        }
        let Some(value) = value_part.split_whitespace().next() else {
            continue;
        };
        if let Ok(v) = value.parse::<f64>() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::metric_sum;

    #[test]
    fn parses_labelled_and_plain_samples() {
        let text = "# TYPE iotgate_messages_delivered_total counter\n\
            iotgate_messages_delivered_total{downstream=\"bench-store\"} 120\n\
            iotgate_messages_delivered_total{module=\"store\",downstream=\"bench-store\"} 3 1700000000\n\
            iotgate_messages_delivered_total{downstream=\"bench-store-2\"} 999\n\
            iotgate_messages_delivered_total_created{downstream=\"bench-store\"} 1.7e9\n\
            iotgate_subscriber_dropped_total 7\n";
        assert_eq!(
            metric_sum(
                text,
                "iotgate_messages_delivered_total",
                "downstream=\"bench-store\""
            ),
            Some(123.0)
        );
        assert_eq!(
            metric_sum(text, "iotgate_subscriber_dropped_total", ""),
            Some(7.0)
        );
        assert_eq!(metric_sum(text, "iotgate_missing_total", ""), None);
    }
}
