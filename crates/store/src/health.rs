//! Whether the database answers, as seen by a watcher that pings it: what `/healthz` and the
//! `iotgate_database_up` gauge report. A lost connection does not crash anything: the pool opens
//! new connections as queries need them, callers retry (telemetry batches) or answer 503 (the
//! API), and the watcher notices the database is back, with backoff while it is not.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::on_pool;
use crate::Store;

/// Pause between pings while the database answers.
const PING_INTERVAL: Duration = Duration::from_secs(2);
/// First pause after a failed ping; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A ping that takes longer than this counts as failed.
const PING_TIMEOUT: Duration = Duration::from_secs(4);

/// The database's last known state.
#[derive(Debug)]
pub struct DatabaseHealth {
    up: AtomicBool,
    /// Why the last ping failed, while it is down.
    reason: Mutex<Option<String>>,
    /// Times the database came back after being down.
    recoveries: AtomicU64,
}

impl DatabaseHealth {
    pub(crate) fn new() -> Self {
        Self {
            up: AtomicBool::new(true),
            reason: Mutex::new(None),
            recoveries: AtomicU64::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Why the database is down (`None` while it is up).
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().expect("health lock").clone()
    }

    pub fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::Relaxed)
    }

    /// Records a ping outcome; true when the state changed.
    fn record(&self, outcome: Result<(), String>) -> bool {
        let mut reason = self.reason.lock().expect("health lock");
        let was_up = self.up.load(Ordering::Relaxed);
        match outcome {
            Ok(()) => {
                *reason = None;
                self.up.store(true, Ordering::Relaxed);
                if !was_up {
                    self.recoveries.fetch_add(1, Ordering::Relaxed);
                }
                !was_up
            }
            Err(why) => {
                *reason = Some(why);
                self.up.store(false, Ordering::Relaxed);
                was_up
            }
        }
    }
}

impl Store {
    /// The database's last known state, kept by [`Store::watch_health`].
    pub fn health(&self) -> &DatabaseHealth {
        &self.health
    }

    /// One round trip to the database.
    pub async fn ping(&self) -> Result<(), String> {
        let ping = async {
            on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))
        };
        match tokio::time::timeout(PING_TIMEOUT, ping).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(describe(&error)),
            Err(_) => Err(format!("no answer within {} s", PING_TIMEOUT.as_secs_f32())),
        }
    }

    /// Pings the database until `stop`: every [`PING_INTERVAL`] while it answers, with backoff
    /// while it does not. `on_change(up)` runs on every change of state (metrics), and each
    /// change is logged once.
    pub async fn watch_health(&self, stop: CancellationToken, on_change: impl Fn(bool)) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let outcome = self.ping().await;
            let up = outcome.is_ok();
            if let Err(why) = &outcome {
                if self.health.is_up() {
                    tracing::error!(engine = self.engine().name(), reason = %why, "database unreachable; retrying with backoff");
                }
            }
            if self.health.record(outcome) {
                on_change(up);
                if up {
                    tracing::info!(engine = self.engine().name(), "database reachable again");
                }
            }
            let pause = if up {
                backoff = FIRST_BACKOFF;
                PING_INTERVAL
            } else {
                let pause = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                pause
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// A short reason for an operator: the driver's message, with its causes.
fn describe(error: &sqlx::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
