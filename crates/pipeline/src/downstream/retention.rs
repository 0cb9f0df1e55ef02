//! Telemetry retention: a store downstream's rows older than `retentionHours`, or beyond its
//! newest `maxRows`, are deleted in the background so the disk cannot fill.
//!
//! Deletes run in small batches with a pause between them: SQLite has one writer, and a long
//! delete would hold back the ingest transactions behind it. Ingest never waits on retention
//! for more than one small batch.

use std::sync::Arc;
use std::time::Duration;

use iotgate_core::envelope::format_timestamp;
use iotgate_store::Store;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// Rows one delete statement removes at most.
const DELETE_BATCH: i64 = 2_000;
/// Pause between two delete statements, so ingest commits get the writer in between.
const BETWEEN_BATCHES: Duration = Duration::from_millis(25);
/// How often retention looks at the table.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default)]
pub(crate) struct RetentionPolicy {
    pub max_age: Option<Duration>,
    pub max_rows: Option<u64>,
}

impl RetentionPolicy {
    pub fn is_active(&self) -> bool {
        self.max_age.is_some() || self.max_rows.is_some()
    }
}

/// Sweeps once right away, then every [`SWEEP_EVERY`], until `stop` is cancelled.
pub(crate) async fn run_retention(
    store: Store,
    downstream: Arc<str>,
    policy: RetentionPolicy,
    stop: CancellationToken,
) {
    loop {
        match sweep(&store, &downstream, &policy, &stop).await {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::info!(downstream = %downstream, deleted, "telemetry retention deleted old rows")
            }
            Err(error) => {
                tracing::warn!(downstream = %downstream, error = %error, "telemetry retention failed; will try again")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}

/// One pass: by age, then by count. Returns the rows deleted.
async fn sweep(
    store: &Store,
    downstream: &str,
    policy: &RetentionPolicy,
    stop: &CancellationToken,
) -> Result<u64, iotgate_store::StoreError> {
    let mut deleted = 0;
    if let Some(max_age) = policy.max_age {
        let before = format_timestamp(OffsetDateTime::now_utc() - max_age);
        loop {
            let n = store
                .delete_telemetry_before(downstream, &before, DELETE_BATCH)
                .await?;
            deleted += n;
            if n < DELETE_BATCH as u64 || pause(stop).await {
                break;
            }
        }
    }
    if let Some(max_rows) = policy.max_rows {
        let mut excess = store
            .count_telemetry(downstream)
            .await?
            .saturating_sub(i64::try_from(max_rows).unwrap_or(i64::MAX));
        while excess > 0 {
            let n = store
                .delete_oldest_telemetry(downstream, excess.min(DELETE_BATCH))
                .await?;
            deleted += n;
            excess -= n as i64;
            if n == 0 || pause(stop).await {
                break;
            }
        }
    }
    Ok(deleted)
}

/// Waits between batches; true when retention should stop.
async fn pause(stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(BETWEEN_BATCHES) => false,
    }
}
