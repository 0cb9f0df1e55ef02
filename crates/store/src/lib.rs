//! Persistence for iotgate, with sqlx: definitions, the device registry, admin users and sessions,
//! the telemetry store and dead letters, plus the server secret kept beside the database.
//!
//! SQLite is the embedded default. The SQL sticks to types and statements PostgreSQL also accepts
//! (TEXT, BIGINT, BOOLEAN, BLOB→BYTEA aside), so a PostgreSQL backend is a second migrations
//! folder and pool type, not a rewrite. Nothing here runs on the per-message hot path: the
//! pipeline writes telemetry and dead letters in batches and keeps the registry in memory.

mod records;
mod secret;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqlitePool};

pub use records::*;
pub use secret::{SecretError, ServerSecret};

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
}

/// Handle on the database; cheap to clone (the pool is shared).
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

impl Store {
    /// Opens (creating if missing) the database at `url` and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            // WAL lets the admin API read while the telemetry batcher writes.
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL in WAL mode is durable across process crashes; only power loss can lose
            // the last transactions, which is the usual trade for ingest throughput.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("../../migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    /// The default database URL for a data directory.
    pub fn default_url(data_dir: &Path) -> String {
        format!("sqlite://{}", data_dir.join("iotgate.db").display())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ----- definitions -----

    pub async fn list_definitions(&self, kind: &str) -> Result<Vec<StoredDefinition>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, key, document, secret, created_at, updated_at FROM definitions WHERE kind = ? ORDER BY key",
        )
        .bind(kind)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(StoredDefinition::from_row).collect()
    }

    pub async fn insert_definition(&self, definition: &StoredDefinition) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO definitions (kind, key, document, secret, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&definition.kind)
        .bind(&definition.key)
        .bind(definition.document.to_string())
        .bind(&definition.secret)
        .bind(&definition.created_at)
        .bind(&definition.updated_at)
        .execute(&self.pool)
        .await;
        match result {
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "{} {}",
                definition.kind, definition.key
            ))),
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub async fn update_definition(&self, definition: &StoredDefinition) -> Result<(), StoreError> {
        let result = sqlx::query(
            "UPDATE definitions SET document = ?, secret = ?, updated_at = ? WHERE kind = ? AND key = ?",
        )
        .bind(definition.document.to_string())
        .bind(&definition.secret)
        .bind(&definition.updated_at)
        .bind(&definition.kind)
        .bind(&definition.key)
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "{} {}",
                definition.kind, definition.key
            )));
        }
        Ok(())
    }

    pub async fn delete_definition(&self, kind: &str, key: &str) -> Result<(), StoreError> {
        let result = sqlx::query("DELETE FROM definitions WHERE kind = ? AND key = ?")
            .bind(kind)
            .bind(key)
            .execute(&self.pool)
            .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("{kind} {key}")));
        }
        Ok(())
    }

    // ----- devices -----

    pub async fn insert_device(&self, device: &DeviceRecord) -> Result<(), StoreError> {
        let result = sqlx::query(
            "INSERT INTO devices (device_id, name, device_type, enabled, properties, primary_key_digest, secondary_key_digest, created_at, last_contact, message_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, 0)",
        )
        .bind(&device.device_id)
        .bind(&device.name)
        .bind(&device.device_type)
        .bind(device.enabled)
        .bind(device.properties.to_string())
        .bind(&device.primary_key_digest[..])
        .bind(&device.secondary_key_digest[..])
        .bind(&device.created_at)
        .execute(&self.pool)
        .await;
        match result {
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::Conflict(format!("device {}", device.device_id)))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    /// Every device, for filling the in-memory registry at start-up.
    pub async fn all_devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let rows = sqlx::query(&format!("{DEVICE_SELECT} ORDER BY device_id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(DeviceRecord::from_row).collect()
    }

    pub async fn get_device(&self, device_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let row = sqlx::query(&format!("{DEVICE_SELECT} WHERE device_id = ?"))
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(DeviceRecord::from_row).transpose()
    }

    /// One page of devices, optionally filtered by a substring of id, name or type.
    pub async fn list_devices(
        &self,
        search: Option<&str>,
        offset: i64,
        limit: i64,
    ) -> Result<(Vec<DeviceRecord>, i64), StoreError> {
        let pattern = search.map(|s| {
            let escaped = s
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{escaped}%")
        });
        let filter = "WHERE (? IS NULL OR device_id LIKE ? ESCAPE '\\' OR name LIKE ? ESCAPE '\\' OR device_type LIKE ? ESCAPE '\\')";
        let total: i64 = sqlx::query(&format!("SELECT COUNT(*) FROM devices {filter}"))
            .bind(&pattern)
            .bind(&pattern)
            .bind(&pattern)
            .bind(&pattern)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        let rows = sqlx::query(&format!(
            "{DEVICE_SELECT} {filter} ORDER BY device_id LIMIT ? OFFSET ?"
        ))
        .bind(&pattern)
        .bind(&pattern)
        .bind(&pattern)
        .bind(&pattern)
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        let devices = rows
            .iter()
            .map(DeviceRecord::from_row)
            .collect::<Result<_, _>>()?;
        Ok((devices, total))
    }

    pub async fn update_device(&self, device: &DeviceRecord) -> Result<(), StoreError> {
        let result = sqlx::query(
            "UPDATE devices SET name = ?, device_type = ?, enabled = ?, properties = ?, primary_key_digest = ?, secondary_key_digest = ? WHERE device_id = ?",
        )
        .bind(&device.name)
        .bind(&device.device_type)
        .bind(device.enabled)
        .bind(device.properties.to_string())
        .bind(&device.primary_key_digest[..])
        .bind(&device.secondary_key_digest[..])
        .bind(&device.device_id)
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("device {}", device.device_id)));
        }
        Ok(())
    }

    pub async fn delete_device(&self, device_id: &str) -> Result<(), StoreError> {
        let result = sqlx::query("DELETE FROM devices WHERE device_id = ?")
            .bind(device_id)
            .execute(&self.pool)
            .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("device {device_id}")));
        }
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
        let mut tx = self.pool.begin().await?;
        for contact in contacts {
            sqlx::query(
                "UPDATE devices SET last_contact = ?, message_count = message_count + ? WHERE device_id = ?",
            )
            .bind(&contact.last_contact)
            .bind(contact.messages)
            .bind(&contact.device_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // ----- users and sessions -----

    pub async fn count_users(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    pub async fn insert_user(
        &self,
        user_name: &str,
        password_hash: &str,
        created_at: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO users (user_name, password_hash, created_at) VALUES (?, ?, ?)")
            .bind(user_name)
            .bind(password_hash)
            .bind(created_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn user_password_hash(&self, user_name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT password_hash FROM users WHERE user_name = ?")
            .bind(user_name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    pub async fn insert_session(
        &self,
        token_digest: &str,
        user_name: &str,
        expires_at: &str,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO sessions (token_digest, user_name, expires_at) VALUES (?, ?, ?)")
            .bind(token_digest)
            .bind(user_name)
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The session's user and expiry, if the token digest is known.
    pub async fn find_session(
        &self,
        token_digest: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query("SELECT user_name, expires_at FROM sessions WHERE token_digest = ?")
            .bind(token_digest)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .map(|r| Ok::<_, sqlx::Error>((r.try_get(0)?, r.try_get(1)?)))
            .transpose()?)
    }

    pub async fn delete_session(&self, token_digest: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sessions WHERE token_digest = ?")
            .bind(token_digest)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn delete_expired_sessions(&self, now: &str) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM sessions WHERE expires_at < ?")
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    // ----- telemetry -----

    /// Inserts a batch of telemetry rows in one transaction, in multi-row statements whose row
    /// counts are powers of two (at most 512). Each statement costs a round trip to SQLite's
    /// worker thread, so statements must be few; and with only ten distinct SQL texts, every one
    /// stays prepared (a text per batch size would be prepared again and again).
    pub async fn insert_telemetry(&self, rows: &[TelemetryRow]) -> Result<(), StoreError> {
        // 11 parameters per row; 512 rows stay far below SQLite's 32766 parameter limit.
        const MAX_ROWS_PER_STATEMENT: usize = 512;
        let mut tx = self.pool.begin().await?;
        let mut rest = rows;
        while !rest.is_empty() {
            let take = largest_power_of_two_at_most(rest.len().min(MAX_ROWS_PER_STATEMENT));
            let (chunk, remainder) = rest.split_at(take);
            rest = remainder;
            let mut builder = QueryBuilder::new(TELEMETRY_INSERT);
            builder.push_values(chunk, |mut b, row| {
                b.push_bind(&row.id)
                    .push_bind(&row.listener_key)
                    .push_bind(&row.device_id)
                    .push_bind(&row.device_type)
                    .push_bind(row.connection_id)
                    .push_bind(&row.source_address)
                    .push_bind(&row.received_at)
                    .push_bind(&row.content_type)
                    .push_bind(&row.payload)
                    .push_bind(&row.metadata)
                    .push_bind(&row.downstream_key);
            });
            // A batch retried after a failure must not fail on rows that already landed.
            builder.push(" ON CONFLICT (id) DO NOTHING");
            builder.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn query_telemetry(
        &self,
        device_id: Option<&str>,
        listener_key: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TelemetryRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, listener_key, device_id, device_type, connection_id, source_address, received_at, content_type, payload, metadata, downstream_key FROM telemetry WHERE (? IS NULL OR device_id = ?) AND (? IS NULL OR listener_key = ?) ORDER BY received_at DESC, id DESC LIMIT ?",
        )
        .bind(device_id)
        .bind(device_id)
        .bind(listener_key)
        .bind(listener_key)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(TelemetryRow::from_row).collect()
    }

    // ----- dead letters -----

    pub async fn insert_dead_letters(&self, rows: &[DeadLetterRow]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(500) {
            let mut builder = QueryBuilder::new(
                "INSERT INTO dead_letters (id, listener_key, device_id, module, reason, message, received_at, content_type, payload) ",
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
                    .push_bind(&row.payload);
            });
            builder.push(" ON CONFLICT (id) DO NOTHING");
            builder.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn query_dead_letters(&self, limit: i64) -> Result<Vec<DeadLetterRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, listener_key, device_id, module, reason, message, received_at, content_type, payload FROM dead_letters ORDER BY received_at DESC, id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(DeadLetterRow::from_row).collect()
    }
}

const TELEMETRY_INSERT: &str = "INSERT INTO telemetry (id, listener_key, device_id, device_type, connection_id, source_address, received_at, content_type, payload, metadata, downstream_key) ";

fn largest_power_of_two_at_most(n: usize) -> usize {
    debug_assert!(n > 0);
    1 << (usize::BITS - 1 - n.leading_zeros())
}

const DEVICE_SELECT: &str = "SELECT device_id, name, device_type, enabled, properties, primary_key_digest, secondary_key_digest, created_at, last_contact, message_count FROM devices";
