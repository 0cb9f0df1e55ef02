//! Several iotgate nodes on one PostgreSQL database: each follows the others' changes and keeps a
//! heartbeat row.
//!
//! A definition or device written on any node is announced on a PostgreSQL channel (see
//! `iotgate_store::changes`). Here every node listens, re-reads the row named and applies it: the
//! supervisor starts, replaces or stops the module; the registry replaces or removes the device
//! (closing connections that a disable, delete or re-key ends); a logout, a revoked token or a
//! changed user drops the cached admin credentials. Its own writes come back as
//! no-ops. Every [`RESYNC_INTERVAL`], and whenever the listening connection had to be opened
//! again, everything is compared with the database, so a missed notification is late, never lost.
//! On SQLite there is one node: nothing to follow, only the heartbeat row.

use std::sync::Arc;
use std::time::Duration;

use iotgate_core::definition::DefinitionKind;
use iotgate_core::envelope::format_timestamp;
use iotgate_pipeline::DeviceRegistry;
use iotgate_store::changes::ChangedRow;
use iotgate_store::{Received, Store, StoreError};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::auth::AdminAuth;
use crate::supervisor::Supervisor;

/// How often a node refreshes its heartbeat row.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// A node whose row is older than this is gone (from `GET /api/v1/nodes`, and its row deleted).
pub const NODE_TIMEOUT: Duration = Duration::from_secs(15);
/// The full comparison with the database, the safety net for missed notifications.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(30);
/// First pause before listening again after the listening connection failed; doubled up to 5 s.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub struct Cluster {
    pub store: Store,
    pub supervisor: Arc<Supervisor>,
    pub registry: Arc<DeviceRegistry>,
    /// Cached admin credentials: a logout, revoked token or changed user on another node
    /// drops them here too.
    pub auth: Arc<AdminAuth>,
    /// The node's main address, as its heartbeat row shows it.
    pub address: String,
    pub started_at: String,
}

/// The instant `ago` before now, as stored timestamps are written.
pub fn timestamp_ago(ago: Duration) -> String {
    format_timestamp(OffsetDateTime::now_utc() - ago)
}

impl Cluster {
    /// Runs the heartbeat and, on PostgreSQL, follows other nodes' changes until `stop`; then
    /// removes this node's heartbeat row.
    pub fn spawn(self: Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            tokio::join!(
                self.heartbeats(stop.clone()),
                self.follow_changes(stop.clone()),
                self.resync_periodically(stop.clone()),
            );
            if let Err(error) = self.store.leave().await {
                tracing::warn!(error = %error, "could not remove this node's heartbeat row");
            }
        })
    }

    async fn heartbeats(&self, stop: CancellationToken) {
        loop {
            let now = timestamp_ago(Duration::ZERO);
            let stale = timestamp_ago(NODE_TIMEOUT);
            let listeners = serde_json::to_string(&self.supervisor.listener_statuses())
                .unwrap_or_else(|_| "[]".to_owned());
            if let Err(error) = self
                .store
                .heartbeat(&self.address, &self.started_at, &now, &stale, &listeners)
                .await
            {
                tracing::debug!(error = %error, "heartbeat not written");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            }
        }
    }

    async fn follow_changes(&self, stop: CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let listening = tokio::select! {
                _ = stop.cancelled() => return,
                listening = self.store.listen_changes() => listening,
            };
            let mut listener = match listening {
                Ok(Some(listener)) => listener,
                // SQLite: one node, nothing to follow.
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(error = %error, "cannot listen to other nodes' changes; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = FIRST_BACKOFF;
            // Whatever changed while nobody listened.
            self.resync().await;
            loop {
                let received = tokio::select! {
                    _ = stop.cancelled() => return,
                    received = listener.next() => received,
                };
                match received {
                    Ok(Received::Change(row)) => self.apply(row).await,
                    Ok(Received::Reconnected) => self.resync().await,
                    Err(error) => {
                        tracing::warn!(error = %error, "lost the change notifications; listening again");
                        break;
                    }
                }
            }
        }
    }

    async fn resync_periodically(&self, stop: CancellationToken) {
        if self.store.engine() != iotgate_store::Engine::Postgres {
            return;
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RESYNC_INTERVAL) => self.resync().await,
            }
        }
    }

    /// Applies one change another node made.
    async fn apply(&self, row: ChangedRow) {
        let outcome = match &row {
            ChangedRow::Definition { kind, key } => {
                let Some(kind) = DefinitionKind::ALL
                    .into_iter()
                    .find(|k| k.schema_name() == kind)
                else {
                    tracing::warn!(kind = %kind, "change notification for an unknown definition kind");
                    return;
                };
                self.supervisor.sync_definition(kind, key).await.map(|_| ())
            }
            ChangedRow::Device { device_id } => self.sync_device(device_id).await,
            ChangedRow::Credential { digest } => {
                self.auth.forget_credential(digest);
                Ok(())
            }
            ChangedRow::User {
                user_name,
                revoke,
                keep,
            } => {
                self.auth.forget_user(user_name, *revoke, keep.as_deref());
                Ok(())
            }
        };
        if let Err(error) = outcome {
            tracing::warn!(error = %error, change = ?row, "could not apply another node's change; the next comparison will");
        }
    }

    async fn sync_device(&self, device_id: &str) -> Result<(), StoreError> {
        match self.store.get_device(device_id).await? {
            Some(record) => {
                if !self
                    .registry
                    .get(device_id)
                    .is_some_and(|device| device.matches(&record))
                {
                    self.registry.upsert(&record);
                    tracing::info!(device = %device_id, "device changed on another node");
                }
            }
            None => {
                if self.registry.get(device_id).is_some() {
                    self.registry.remove(device_id);
                    tracing::info!(device = %device_id, "device deleted on another node");
                }
            }
        }
        Ok(())
    }

    /// Compares every definition and device with the database and applies the differences.
    async fn resync(&self) {
        let definitions = self.supervisor.resync().await;
        let devices = self
            .store
            .all_devices()
            .await
            .map(|records| self.registry.reconcile(&records));
        match (definitions, devices) {
            (Ok(0), Ok(0)) => {}
            (Ok(definitions), Ok(devices)) => {
                tracing::info!(
                    definitions,
                    devices,
                    "caught up with changes made on other nodes"
                )
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::warn!(error = %error, "could not compare with the database; retrying later")
            }
        }
    }
}
