//! Persistence for iotgate, with sqlx: definitions, the device registry, admin accounts (users,
//! sessions, API tokens), the audit log,
//! the telemetry store, dead letters and messages queued for offline devices, plus the server secret kept beside the database.
//!
//! Two engines sit behind one [`Store`]: SQLite, the embedded default, and PostgreSQL, for
//! several nodes sharing one database. The URL's scheme picks the engine; each has its own
//! migrations folder (`migrations/sqlite`, `migrations/postgres`, same versions) and the queries
//! are written once for both (see [`engine`]). Nothing here runs on the per-message hot path: the
//! pipeline writes telemetry and dead letters in batches and keeps the registry in memory.

mod accounts;
mod audit;
pub mod changes;
mod checkpoints;
mod downlinks;
pub mod engine;
mod health;
mod records;
mod secret;
mod telemetry;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::types::Json;

pub use accounts::{ApiTokenRecord, SessionRecord, TokenRecord, UserRecord};
pub use audit::{AuditQuery, AuditRow};
use changes::ChangedRow;
pub use changes::{ChangeListener, NodeRecord, Received};
pub use downlinks::QueuedDownlink;
pub use engine::Engine;
use engine::{on_pool, Columns, Pool};
pub use health::DatabaseHealth;
pub use records::*;
pub use secret::{SecretCheck, SecretError, ServerSecret};
pub use telemetry::{TelemetryCursor, TelemetryQuery};

/// Errors of the persistence layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored JSON is corrupt")]
    Corrupt(#[from] serde_json::Error),
    /// The database named by the URL could not be reached (or refused us) at start-up. Only the
    /// host, port and database name are shown: the rest of a URL may hold a password.
    #[error("cannot connect to the {engine} database `{database}` at {host}")]
    Unreachable {
        engine: &'static str,
        host: String,
        database: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("the database URL scheme is not sqlite: or postgres:")]
    UnsupportedUrl,
}

impl StoreError {
    /// True when the database could not be reached (connection refused or lost, no pooled
    /// connection in time, the server shutting down): worth retrying later, not a bug.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } => true,
            StoreError::Database(error) => match error {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // PostgreSQL: connection exceptions (08xxx), and the server or an operator
                // ending the session (57P01-57P03).
                sqlx::Error::Database(db) => db
                    .code()
                    .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
                _ => false,
            },
            _ => false,
        }
    }
}

/// Handle on the database; cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    /// Where telemetry batches are written: on SQLite a pool of one connection of its own (see
    /// `connect_sqlite`), on PostgreSQL the store's pool.
    telemetry_pool: Pool,
    health: Arc<DatabaseHealth>,
    /// This process among the nodes sharing the database.
    node_id: Arc<str>,
}

pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// The page cache of the SQLite telemetry writer, in KiB (SQLite's negative `cache_size`): room
/// for the pages the telemetry table and its indexes touch between batches. It fills only as
/// pages are read.
const TELEMETRY_WRITER_CACHE: &str = "-65536";

/// How long a query waits for a pooled PostgreSQL connection. While the database is away, this is
/// how fast callers learn it (a batch is retried, an API call answers 503) instead of hanging.
const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

impl Store {
    /// Opens the database at `url` (SQLite: creating the file if missing) and applies the
    /// engine's migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        match Engine::from_url(url) {
            Some(Engine::Sqlite) => Self::connect_sqlite(url).await,
            Some(Engine::Postgres) => Self::connect_postgres(url).await,
            None => Err(StoreError::UnsupportedUrl),
        }
    }

    async fn connect_sqlite(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            // WAL lets the admin API read while the telemetry batcher writes.
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode is durable across process crashes; only power loss can lose
            // the last transactions, which is the usual trade for ingest throughput.
            .synchronous(SqliteSynchronous::Normal)
            // A writer waits this long for another to finish before its attempt fails; failed
            // telemetry batches are retried (or refused to waiting devices) by the store module.
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true)
            // Checkpoints run in the background (see `checkpoints`); a commit only checkpoints
            // by itself once the log is this large.
            .pragma(
                "wal_autocheckpoint",
                checkpoints::COMMIT_CHECKPOINT_PAGES.to_string(),
            );
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("../../migrations/sqlite").run(&pool).await?;
        checkpoints::spawn_checkpoints(pool.clone());
        // Telemetry batches always go through one connection of their own. SQLite throws a
        // connection's page cache away whenever another connection wrote, so batches spread over
        // the pool would start every transaction cold and read the indexes' pages back from the
        // OS; on one connection the pages they touch stay cached between batches.
        let telemetry_writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.pragma("cache_size", TELEMETRY_WRITER_CACHE))
            .await?;
        Ok(Self {
            pool: Pool::Sqlite(pool),
            telemetry_pool: Pool::Sqlite(telemetry_writer),
            health: Arc::new(DatabaseHealth::new()),
            node_id: Arc::from(uuid::Uuid::now_v7().to_string()),
        })
    }

    async fn connect_postgres(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?
            .application_name("iotgate")
            // Like SQLite's busy timeout: a writer blocked by a lock gives up after 5 s, and the
            // store module retries (or refuses waiting devices) instead of hanging.
            .options([("lock_timeout", "5s")]);
        let host = format!("{}:{}", options.get_host(), options.get_port());
        let database = options.get_database().unwrap_or("(default)").to_owned();
        let pool = PgPoolOptions::new()
            // Telemetry batches, dead letters, retention, the API and the health check; the
            // server's own processes are the limit on a small machine, not connections.
            .max_connections(10)
            .acquire_timeout(PG_ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Unreachable {
                engine: Engine::Postgres.name(),
                host,
                database,
                source,
            })?;
        sqlx::migrate!("../../migrations/postgres")
            .run(&pool)
            .await?;
        Ok(Self {
            telemetry_pool: Pool::Postgres(pool.clone()),
            pool: Pool::Postgres(pool),
            health: Arc::new(DatabaseHealth::new()),
            node_id: Arc::from(uuid::Uuid::now_v7().to_string()),
        })
    }

    /// The engine this store runs on.
    pub fn engine(&self) -> Engine {
        match self.pool {
            Pool::Sqlite(_) => Engine::Sqlite,
            Pool::Postgres(_) => Engine::Postgres,
        }
    }

    /// The default database URL for a data directory.
    pub fn default_url(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("iotgate.db").display())
    }

    pub async fn close(&self) {
        on_pool!(pool &self.telemetry_pool, pool => pool.close().await);
        on_pool!(self, pool => pool.close().await)
    }

    // ----- definitions -----

    pub async fn list_definitions(&self, kind: &str) -> Result<Vec<StoredDefinition>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT kind, key, CAST(document AS TEXT) AS document, secret, created_at, updated_at FROM definitions WHERE kind = $1 ORDER BY key",
            )
            .bind(kind)
            .fetch_all(pool)
            .await?;
            rows.iter().map(StoredDefinition::from_row).collect()
        })
    }

    pub async fn insert_definition(&self, definition: &StoredDefinition) -> Result<(), StoreError> {
        let result = on_pool!(self, pool => sqlx::query(
            "INSERT INTO definitions (kind, key, document, secret, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&definition.kind)
        .bind(&definition.key)
        .bind(Json(&definition.document))
        .bind(&definition.secret)
        .bind(&definition.created_at)
        .bind(&definition.updated_at)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()));
        match result {
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "{} {}",
                definition.kind, definition.key
            ))),
            Err(e) => Err(e.into()),
            Ok(_) => {
                self.notify_definition(&definition.kind, &definition.key)
                    .await;
                Ok(())
            }
        }
    }

    async fn notify_definition(&self, kind: &str, key: &str) {
        self.notify_change(ChangedRow::Definition {
            kind: kind.to_owned(),
            key: key.to_owned(),
        })
        .await;
    }

    async fn notify_device(&self, device_id: &str) {
        self.notify_change(ChangedRow::Device {
            device_id: device_id.to_owned(),
        })
        .await;
    }

    /// One stored definition, if it exists.
    pub async fn get_definition(
        &self,
        kind: &str,
        key: &str,
    ) -> Result<Option<StoredDefinition>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT kind, key, CAST(document AS TEXT) AS document, secret, created_at, updated_at FROM definitions WHERE kind = $1 AND key = $2",
            )
            .bind(kind)
            .bind(key)
            .fetch_optional(pool)
            .await?;
            row.as_ref().map(StoredDefinition::from_row).transpose()
        })
    }

    pub async fn update_definition(&self, definition: &StoredDefinition) -> Result<(), StoreError> {
        let affected = on_pool!(self, pool => sqlx::query(
            "UPDATE definitions SET document = $1, secret = $2, updated_at = $3 WHERE kind = $4 AND key = $5",
        )
        .bind(Json(&definition.document))
        .bind(&definition.secret)
        .bind(&definition.updated_at)
        .bind(&definition.kind)
        .bind(&definition.key)
        .execute(pool)
        .await?
        .rows_affected());
        if affected == 0 {
            return Err(StoreError::NotFound(format!(
                "{} {}",
                definition.kind, definition.key
            )));
        }
        self.notify_definition(&definition.kind, &definition.key)
            .await;
        Ok(())
    }

    pub async fn delete_definition(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        let affected = on_pool!(self, pool => sqlx::query("DELETE FROM definitions WHERE kind = $1 AND key = $2")
            .bind(kind)
            .bind(key)
            .execute(pool)
            .await?
            .rows_affected());
        if affected == 0 {
            return Err(StoreError::NotFound(format!("{kind} {key}")));
        }
        self.notify_definition(kind, key).await;
        Ok(())
    }

    // ----- devices -----

    pub async fn insert_device(&self, device: &DeviceRecord) -> Result<(), StoreError> {
        let result = on_pool!(self, pool => sqlx::query(
            "INSERT INTO devices (device_id, name, device_type, enabled, properties, primary_key_digest, secondary_key_digest, primary_key_sealed, secondary_key_sealed, created_at, last_contact, message_count) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, 0)",
        )
        .bind(&device.device_id)
        .bind(&device.name)
        .bind(&device.device_type)
        .bind(device.enabled)
        .bind(Json(&device.properties))
        .bind(&device.primary_key_digest[..])
        .bind(&device.secondary_key_digest[..])
        .bind(&device.primary_key_sealed)
        .bind(&device.secondary_key_sealed)
        .bind(&device.created_at)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()));
        match result {
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::Conflict(format!("device {}", device.device_id)))
            }
            Err(e) => Err(e.into()),
            Ok(_) => {
                self.notify_device(&device.device_id).await;
                Ok(())
            }
        }
    }

    /// Every device, for filling the in-memory registry at start-up.
    pub async fn all_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(&format!("{DEVICE_SELECT} ORDER BY device_id"))
                .fetch_all(pool)
                .await?;
            rows.iter().map(DeviceRecord::from_row).collect()
        })
    }

    pub async fn get_device(&self, device_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query(&format!("{DEVICE_SELECT} WHERE device_id = $1"))
                .bind(device_id)
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(DeviceRecord::from_row).transpose()
        })
    }

    /// One page of devices, optionally filtered by a substring of id, name or type (ASCII letters
    /// match in either case, on both engines).
    pub async fn list_devices(
        &self,
        search: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<DeviceRecord>, i64), StoreError> {
        let pattern = search.map(|s| {
            let escaped = s
                .to_ascii_lowercase()
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{escaped}%")
        });
        let filter = "WHERE (CAST($1 AS TEXT) IS NULL OR LOWER(device_id) LIKE $1 ESCAPE '\\' OR LOWER(name) LIKE $1 ESCAPE '\\' OR LOWER(device_type) LIKE $1 ESCAPE '\\')";
        on_pool!(self, pool => {
            let total: i64 = sqlx::query(&format!("SELECT COUNT(*) FROM devices {filter}"))
                .bind(&pattern)
                .fetch_one(pool)
                .await?
                .col_at(0)?;
            let rows = sqlx::query(&format!(
                "{DEVICE_SELECT} {filter} ORDER BY device_id LIMIT $2 OFFSET $3"
            ))
            .bind(&pattern)
            .bind(limit)
            .bind(offset)
            .fetch_all(pool)
            .await?;
            let devices = rows
                .iter()
                .map(DeviceRecord::from_row)
                .collect::<Result<_, _>>()?;
            Ok((devices, total))
        })
    }

    pub async fn update_device(&self, device: &DeviceRecord) -> Result<(), StoreError> {
        let affected = on_pool!(self, pool => sqlx::query(
            "UPDATE devices SET name = $1, device_type = $2, enabled = $3, properties = $4, primary_key_digest = $5, secondary_key_digest = $6, primary_key_sealed = $7, secondary_key_sealed = $8 WHERE device_id = $9",
        )
        .bind(&device.name)
        .bind(&device.device_type)
        .bind(device.enabled)
        .bind(Json(&device.properties))
        .bind(&device.primary_key_digest[..])
        .bind(&device.secondary_key_digest[..])
        .bind(&device.primary_key_sealed)
        .bind(&device.secondary_key_sealed)
        .bind(&device.device_id)
        .execute(pool)
        .await?
        .rows_affected());
        if affected == 0 {
            return Err(StoreError::NotFound(format!("device {}", device.device_id)));
        }
        self.notify_device(&device.device_id).await;
        Ok(())
    }

    pub async fn delete_device(&self, device_id: &str) -> Result<(), StoreError> {
        let affected = on_pool!(self, pool => sqlx::query("DELETE FROM devices WHERE device_id = $1")
            .bind(device_id)
            .execute(pool)
            .await?
            .rows_affected());
        if affected == 0 {
            return Err(StoreError::NotFound(format!("device {device_id}")));
        }
        self.notify_device(device_id).await;
        Ok(())
    }

    /// Applies accumulated last-contact times and message counts in one transaction.
    pub async fn record_device_contacts(
        &self,
        contacts: &[DeviceContact],
    ) -> Result<(), StoreError> {
        if contacts.is_empty() {
            return Ok(());
        }
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for contact in contacts {
                sqlx::query(
                    "UPDATE devices SET last_contact = $1, message_count = message_count + $2 WHERE device_id = $3",
                )
                .bind(&contact.last_contact)
                .bind(contact.messages)
                .bind(&contact.device_id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    // ----- dead letters -----

    pub async fn insert_dead_letters(&self, rows: &[DeadLetterRow]) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for chunk in rows.chunks(500) {
                let mut builder = sqlx::QueryBuilder::new(
                    "INSERT INTO dead_letters (id, listener_key, device_id, module, reason, message, received_at, content_type, payload, payload_truncated) ",
                );
                builder.push_values(chunk, |mut b, row| {
                    b.push_bind(&row.id)
                        .push_bind(&row.listener_key)
                        .push_bind(&row.device_id)
                        .push_bind(&row.module)
                        .push_bind(&row.reason)
                        .push_bind(&row.message)
                        .push_bind(&row.received_at)
                        .push_bind(&row.content_type)
                        .push_bind(&row.payload)
                        .push_bind(row.payload_truncated);
                });
                builder.push(" ON CONFLICT (id) DO NOTHING");
                builder.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Rows and the approximate size (payload and message text) the dead-letter table holds.
    pub async fn dead_letter_totals(&self) -> Result<(u64, u64), StoreError> {
        let (count, bytes): (i64, i64) = on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT COUNT(*), CAST(COALESCE(SUM(COALESCE(LENGTH(payload), 0) + LENGTH(message)), 0) AS BIGINT) FROM dead_letters",
            )
            .fetch_one(pool)
            .await?;
            (row.col_at(0)?, row.col_at(1)?)
        });
        Ok((count.max(0) as u64, bytes.max(0) as u64))
    }

    /// Deletes up to `limit` of the oldest dead letters. Returns how many went and their
    /// approximate size.
    pub async fn delete_oldest_dead_letters(&self, limit: i64) -> Result<(u64, u64), StoreError> {
        let sizes: Vec<i64> = on_pool!(self, pool => {
            let rows = sqlx::query(
                "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters ORDER BY received_at, id LIMIT $1) RETURNING CAST(COALESCE(LENGTH(payload), 0) + LENGTH(message) AS BIGINT)",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?;
            rows.iter().map(|row| row.col_at(0)).collect::<Result<_, _>>()?
        });
        let bytes = sizes.iter().map(|size| (*size).max(0) as u64).sum();
        Ok((sizes.len() as u64, bytes))
    }

    pub async fn query_dead_letters(&self, limit: i64) -> Result<Vec<DeadLetterRow>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT id, listener_key, device_id, module, reason, message, received_at, content_type, payload, payload_truncated FROM dead_letters ORDER BY received_at DESC, id DESC LIMIT $1",
            )
            .bind(limit)
            .fetch_all(pool)
            .await?;
            rows.iter().map(DeadLetterRow::from_row).collect()
        })
    }
}

const DEVICE_SELECT: &str = "SELECT device_id, name, device_type, enabled, CAST(properties AS TEXT) AS properties, primary_key_digest, secondary_key_digest, primary_key_sealed, secondary_key_sealed, created_at, last_contact, message_count FROM devices";
