//! SQLite WAL checkpoints kept off the commit path.
//!
//! In WAL mode every commit appends to the write-ahead log, and a checkpoint copies the log back
//! into the database file (and, with `synchronous = NORMAL`, fsyncs it). By default the
//! connection whose commit takes the log past 1,000 pages runs that checkpoint before its commit
//! returns: at 20,000 telemetry rows/s that is several times a second, and each time the batch
//! being committed, and every device waiting for its `stored` ack, waits for the copy and the
//! fsync.
//!
//! Here a background task checkpoints every [`CHECKPOINT_INTERVAL`] in `PASSIVE` mode, which
//! never blocks the writer (it copies what was committed when it started, while new commits go
//! on appending). Commits still checkpoint themselves, but only past [`COMMIT_CHECKPOINT_PAGES`]:
//! by then the background task has copied nearly everything, so that checkpoint finds little to
//! do, and completing it lets the log start over from its beginning, which keeps the file small.

use std::time::Duration;

use sqlx::sqlite::SqlitePool;

/// How often the background task checkpoints.
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);

/// The log size (in 4 KiB pages) from which a commit checkpoints by itself: 64 MiB.
pub(crate) const COMMIT_CHECKPOINT_PAGES: u32 = 16_384;

/// Starts the background checkpoints of `pool`'s database; they stop when the pool is closed.
pub(crate) fn spawn_checkpoints(pool: SqlitePool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                break;
            }
            if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                if pool.is_closed() {
                    break;
                }
                // A busy database or a full disk: commits checkpoint by themselves past the
                // larger limit, so nothing grows without bound meanwhile.
                tracing::debug!(%error, "background WAL checkpoint failed; retrying on the next tick");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Store, TelemetryRow};

    fn row(i: usize) -> TelemetryRow {
        TelemetryRow {
            id: format!("row-{i:08}"),
            listener_key: "field".into(),
            device_id: Some(format!("d{}", i % 100)),
            device_type: None,
            connection_id: 1,
            source_address: None,
            received_at: format!("2026-11-30T12:00:00.{i:06}Z"),
            content_type: "json".into(),
            payload: format!("{{\"reading\":{i},\"note\":\"{}\"}}", "x".repeat(400)),
            metadata: "{}".into(),
            downstream_key: "store".into(),
            message_id: None,
            authenticated: true,
            claimed_device_id: None,
            message_type: None,
            duplicate_if_stored_since: None,
        }
    }

    /// Rows committed far below the commit-side limit still reach the database file: the
    /// background task copied them, no commit did.
    #[tokio::test]
    async fn the_background_task_copies_the_log_into_the_database() {
        let dir =
            std::env::temp_dir().join(format!("iotgate-checkpoints-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::connect(&Store::default_url(&dir)).await.unwrap();
        let database = dir.join("iotgate.db");
        let size = || std::fs::metadata(&database).map(|m| m.len()).unwrap_or(0);
        // Let the first ticks copy what the migrations wrote.
        tokio::time::sleep(CHECKPOINT_INTERVAL * 3).await;
        let before = size();
        let rows: Vec<TelemetryRow> = (0..2000).map(row).collect();
        store.insert_telemetry(&rows).await.unwrap();
        let log = std::fs::metadata(dir.join("iotgate.db-wal")).unwrap().len();
        assert!(
            log < u64::from(COMMIT_CHECKPOINT_PAGES) * 4096,
            "the commit stayed below its own checkpoint limit ({log} bytes of log)"
        );
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while size() < before + 900_000 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the database file stayed at {} bytes (before: {before}, log: {log})",
                size()
            );
            tokio::time::sleep(CHECKPOINT_INTERVAL).await;
        }
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
