//! Queued messages to devices: what `POST /devices/{id}/messages?queue=true` keeps for a device
//! that has no open connection, until its next connection takes it or it expires.
//!
//! The table is small by construction (a bounded number per device, see the API), so the reads
//! are plain: one device's messages oldest first when it connects, and the expired ones in
//! batches for the sweep that dead-letters them.

use crate::engine::{on_pool, Columns};
use crate::{Store, StoreError};

/// One queued message to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedDownlink {
    pub id: String,
    pub device_id: String,
    /// Only connections of this listener take it.
    pub listener_key: Option<String>,
    /// `json`, `text` or `binary`.
    pub body_kind: String,
    /// JSON text, the text, or base64 of the bytes.
    pub body: String,
    pub queued_at: String,
    pub expires_at: String,
}

impl QueuedDownlink {
    fn from_row(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.col("id")?,
            device_id: row.col("device_id")?,
            listener_key: row.col("listener_key")?,
            body_kind: row.col("body_kind")?,
            body: row.col("body")?,
            queued_at: row.col("queued_at")?,
            expires_at: row.col("expires_at")?,
        })
    }
}

const SELECT: &str = "SELECT id, device_id, listener_key, body_kind, body, queued_at, expires_at FROM queued_downlinks";

impl Store {
    /// Queues `message` unless its device already holds `limit` unexpired messages (as of `now`);
    /// returns whether it was queued. Counting and inserting are one transaction.
    pub async fn queue_downlink(
        &self,
        message: &QueuedDownlink,
        now: &str,
        limit: i64,
    ) -> Result<bool, StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let row = sqlx::query(
                "SELECT COUNT(*) FROM queued_downlinks WHERE device_id = $1 AND expires_at > $2",
            )
            .bind(&message.device_id)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let held: i64 = row.col_at(0)?;
            if held >= limit {
                return Ok(false);
            }
            let inserted = sqlx::query(
                "INSERT INTO queued_downlinks (id, device_id, listener_key, body_kind, body, queued_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&message.id)
            .bind(&message.device_id)
            .bind(&message.listener_key)
            .bind(&message.body_kind)
            .bind(&message.body)
            .bind(&message.queued_at)
            .bind(&message.expires_at)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => {}
                // The device was deleted meanwhile (the foreign key).
                Err(sqlx::Error::Database(db)) if db.is_foreign_key_violation() => {
                    return Err(StoreError::NotFound(format!("device {}", message.device_id)));
                }
                Err(error) => return Err(error.into()),
            }
            tx.commit().await?;
        });
        Ok(true)
    }

    /// The unexpired messages queued for `device_id`, oldest first.
    pub async fn queued_downlinks(
        &self,
        device_id: &str,
        now: &str,
    ) -> Result<Vec<QueuedDownlink>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(&format!(
                "{SELECT} WHERE device_id = $1 AND expires_at > $2 ORDER BY queued_at, id"
            ))
            .bind(device_id)
            .bind(now)
            .fetch_all(pool)
            .await?;
            rows.iter().map(QueuedDownlink::from_row).collect()
        })
    }

    /// Removes a queued message once a connection took it; false when it was already gone (another
    /// connection of the device, possibly on another node, took it first).
    pub async fn remove_queued_downlink(&self, id: &str) -> Result<bool, StoreError> {
        let affected = on_pool!(self, pool => sqlx::query("DELETE FROM queued_downlinks WHERE id = $1")
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(affected > 0)
    }

    /// Removes and returns up to `limit` messages that expired before `now`.
    pub async fn take_expired_downlinks(
        &self,
        now: &str,
        limit: i64,
    ) -> Result<Vec<QueuedDownlink>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "DELETE FROM queued_downlinks WHERE id IN (SELECT id FROM queued_downlinks WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2) RETURNING id, device_id, listener_key, body_kind, body, queued_at, expires_at",
            )
            .bind(now)
            .bind(limit)
            .fetch_all(pool)
            .await?;
            rows.iter().map(QueuedDownlink::from_row).collect()
        })
    }
}
