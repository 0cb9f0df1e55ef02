//! Several nodes on one PostgreSQL database: change notifications and the node heartbeat.
//!
//! Every write of a definition or a device sends a notification on [`CHANNEL`] naming what
//! changed and which node changed it (PostgreSQL `NOTIFY`; nothing on SQLite, which has one node).
//! Other nodes re-read that one row and apply it, so a change runs everywhere within a round trip;
//! a periodic full comparison catches whatever a lost listening connection missed. Nodes write a
//! heartbeat row; `GET /api/v1/nodes` lists those seen recently.

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;

use crate::engine::{on_pool, Columns, Pool};
use crate::{Store, StoreError};

/// The PostgreSQL channel changes go out on.
pub const CHANNEL: &str = "iotgate_changes";

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ChangedRow {
    /// A definition of `kind` (its schema name) was created, changed or deleted.
    Definition { kind: String, key: String },
    /// A device was registered, changed, re-keyed or deleted.
    Device {
        #[serde(rename = "deviceId")]
        device_id: String,
    },
    /// A session or API token (by the digest of its token) was ended or revoked.
    Credential { digest: String },
    /// A user changed (role) or lost credentials: cached ones are read again, and with `revoke`
    /// every one but `keep` (a token digest) stops working.
    User {
        #[serde(rename = "userName")]
        user_name: String,
        revoke: bool,
        keep: Option<String>,
    },
}

/// One notification: the row, and the node whose write it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub node: String,
    #[serde(flatten)]
    pub row: ChangedRow,
}

/// A node's heartbeat row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub node_id: String,
    /// The node's main address (`--bind`, as bound).
    pub address: String,
    pub started_at: String,
    pub last_seen: String,
    /// The node's listener statuses at its last heartbeat, as a JSON array.
    pub listeners: String,
}

impl NodeRecord {
    fn from_row(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(Self {
            node_id: row.col("node_id")?,
            address: row.col("address")?,
            started_at: row.col("started_at")?,
            last_seen: row.col("last_seen")?,
            listeners: row.col("listeners")?,
        })
    }
}

/// Receives the notifications of other nodes (PostgreSQL only).
pub struct ChangeListener {
    listener: PgListener,
    node: String,
}

/// What [`ChangeListener::next`] got.
#[derive(Debug)]
pub enum Received {
    /// Another node changed a row.
    Change(ChangedRow),
    /// The listening connection was lost and has been opened again: notifications sent
    /// meanwhile are lost, so everything should be compared.
    Reconnected,
}

impl ChangeListener {
    /// The next change made by another node (own changes and malformed payloads are skipped).
    pub async fn next(&mut self) -> Result<Received, StoreError> {
        loop {
            let Some(notification) = self.listener.try_recv().await? else {
                return Ok(Received::Reconnected);
            };
            match serde_json::from_str::<Change>(notification.payload()) {
                Ok(change) if change.node == self.node => continue,
                Ok(change) => return Ok(Received::Change(change.row)),
                Err(error) => {
                    tracing::warn!(error = %error, "ignoring a malformed change notification");
                }
            }
        }
    }
}

impl Store {
    /// This process's node id (a UUIDv7 made at connect).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Tells the other nodes that a row changed (PostgreSQL; nothing to tell on SQLite). A
    /// notification that cannot be sent is logged: the periodic comparison will carry the change.
    pub(crate) async fn notify_change(&self, row: ChangedRow) {
        let Pool::Postgres(pool) = &self.pool else {
            return;
        };
        let payload = serde_json::to_string(&Change {
            node: self.node_id.to_string(),
            row,
        })
        .expect("a change serializes");
        if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(&payload)
            .execute(pool)
            .await
        {
            tracing::warn!(error = %error, "change notification not sent; the periodic comparison will carry it");
        }
    }

    /// Starts listening to other nodes' changes; `None` on SQLite (one node only).
    pub async fn listen_changes(&self) -> Result<Option<ChangeListener>, StoreError> {
        let Pool::Postgres(pool) = &self.pool else {
            return Ok(None);
        };
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(ChangeListener {
            listener,
            node: self.node_id.to_string(),
        }))
    }

    /// Writes (or refreshes) this node's heartbeat row, with its listener statuses (a JSON
    /// array), and deletes rows not refreshed since `stale_before`.
    pub async fn heartbeat(
        &self,
        address: &str,
        started_at: &str,
        now: &str,
        stale_before: &str,
        listeners: &str,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO nodes (node_id, address, started_at, last_seen, listeners) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (node_id) DO UPDATE SET address = excluded.address, last_seen = excluded.last_seen, listeners = excluded.listeners",
            )
            .bind(&*self.node_id)
            .bind(address)
            .bind(started_at)
            .bind(now)
            .bind(listeners)
            .execute(pool)
            .await?;
            sqlx::query("DELETE FROM nodes WHERE last_seen < $1")
                .bind(stale_before)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Removes this node's heartbeat row (at shutdown).
    pub async fn leave(&self) -> Result<(), StoreError> {
        on_pool!(self, pool => sqlx::query("DELETE FROM nodes WHERE node_id = $1")
            .bind(&*self.node_id)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Nodes seen at or after `since`, by node id.
    pub async fn live_nodes(&self, since: &str) -> Result<Vec<NodeRecord>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT node_id, address, started_at, last_seen, listeners FROM nodes WHERE last_seen >= $1 ORDER BY started_at, node_id",
            )
            .bind(since)
            .fetch_all(pool)
            .await?;
            rows.iter().map(NodeRecord::from_row).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_travel_as_small_json_objects() {
        let change = Change {
            node: "n1".into(),
            row: ChangedRow::Device {
                device_id: "d1".into(),
            },
        };
        let text = serde_json::to_string(&change).unwrap();
        assert_eq!(text, r#"{"node":"n1","type":"device","deviceId":"d1"}"#);
        assert_eq!(serde_json::from_str::<Change>(&text).unwrap(), change);
        let definition = r#"{"node":"n2","type":"definition","kind":"listener","key":"a"}"#;
        assert_eq!(
            serde_json::from_str::<Change>(definition).unwrap().row,
            ChangedRow::Definition {
                kind: "listener".into(),
                key: "a".into()
            }
        );
    }
}
