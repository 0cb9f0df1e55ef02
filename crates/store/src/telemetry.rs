//! The telemetry table: batched inserts with de-duplication by message id, retention deletes, and
//! reads keyset-paged newest first.
//!
//! The bulk insert is the one statement the engines write differently. SQLite takes multi-row
//! `VALUES` statements (each costs a round trip to its worker thread, so few, with a few distinct
//! texts that stay prepared). PostgreSQL takes the whole batch as one `INSERT ... SELECT FROM
//! UNNEST(arrays)`: one statement, one round trip, fifteen array parameters whatever the batch
//! size, and the payload and metadata become `jsonb` in the server. Everything around it (which
//! rows were skipped, settling a message-id conflict) is the same SQL on both.

use std::collections::HashSet;

use base64::Engine as _;
use sqlx::postgres::Postgres;
use sqlx::sqlite::Sqlite;
use sqlx::{QueryBuilder, Transaction};

use crate::engine::{on_pool, Columns};
use crate::{Store, StoreError, TelemetryRow};

const TELEMETRY_COLUMNS: &str = "id, listener_key, device_id, device_type, connection_id, source_address, received_at, content_type, payload, metadata, downstream_key, message_id, authenticated, claimed_device_id, message_type";

/// The columns read back: JSON columns as their text on either engine.
const TELEMETRY_SELECT: &str = "SELECT id, listener_key, device_id, device_type, connection_id, source_address, received_at, content_type, CAST(payload AS TEXT) AS payload, CAST(metadata AS TEXT) AS metadata, downstream_key, message_id, authenticated, claimed_device_id, message_type FROM telemetry";

/// A position in the newest-first order of telemetry: the `(received_at, id)` of the last row of
/// a page. The next page holds rows strictly before it, so rows stored meanwhile (newer) never
/// shift a page, and a row is never on two pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryCursor {
    pub received_at: String,
    pub id: String,
}

impl TelemetryCursor {
    /// The opaque text handed to clients as `nextCursor`: base64url (no padding) of a JSON pair,
    /// so any characters in either part survive.
    pub fn encode(&self) -> String {
        let pair = serde_json::json!([self.received_at, self.id]).to_string();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair)
    }

    /// Reads a cursor made by [`encode`](Self::encode); `None` for anything else.
    pub fn decode(text: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        let (received_at, id): (String, String) = serde_json::from_slice(&bytes).ok()?;
        Some(Self { received_at, id })
    }
}

/// Which telemetry rows a page holds: `from <= received_at < to`, of one device and/or listener,
/// strictly older than `before`; at most `limit`, newest first.
#[derive(Debug, Clone, Default)]
pub struct TelemetryQuery {
    pub device_id: Option<String>,
    pub listener_key: Option<String>,
    /// Fixed-width RFC 3339 UTC, like `received_at`.
    pub from: Option<String>,
    pub to: Option<String>,
    pub before: Option<TelemetryCursor>,
    pub limit: i64,
}

impl Store {
    /// Inserts a batch of telemetry rows in one transaction and says, per row, whether it was a
    /// duplicate (not stored because the same downstream already holds that device's message id
    /// from within the row's de-duplication window; see [`TelemetryRow::duplicate_if_stored_since`]).
    ///
    /// A row that conflicts is skipped by the statement itself; only those rows (retries, rare)
    /// cost a look-up afterwards.
    pub async fn insert_telemetry(&self, rows: &[TelemetryRow]) -> Result<Vec<bool>, StoreError> {
        let mut duplicates = vec![false; rows.len()];
        on_pool!(pool &self.telemetry_pool, pool => {
            let mut tx = pool.begin().await?;
            let mut offset = 0;
            while offset < rows.len() {
                let take = tx.rows_per_statement(rows.len() - offset);
                let chunk = &rows[offset..offset + take];
                // A batch retried after a failed commit must not fail on rows that already
                // landed, and a retried message must not fail on its first copy.
                let inserted = tx.insert_rows(chunk).await?;
                // Only when rows were skipped (retries: rare) is it worth finding out which.
                if inserted < chunk.len() as u64 && chunk.iter().any(TelemetryRow::deduplicates) {
                    let present = tx.present_ids(chunk).await?;
                    for (index, row) in chunk.iter().enumerate() {
                        if row.deduplicates() && !present.contains(row.id.as_str()) {
                            duplicates[offset + index] = tx.settle_message_id_conflict(row).await?;
                        }
                    }
                }
                offset += take;
            }
            tx.commit().await?;
        });
        Ok(duplicates)
    }

    /// Deletes up to `limit` of a downstream's rows received before `before`, oldest first.
    /// Returns how many went.
    pub async fn delete_telemetry_before(
        &self,
        downstream_key: &str,
        before: &str,
        limit: i64,
    ) -> Result<u64, StoreError> {
        Ok(on_pool!(self, pool => sqlx::query(
            "DELETE FROM telemetry WHERE id IN (SELECT id FROM telemetry WHERE downstream_key = $1 AND received_at < $2 ORDER BY received_at LIMIT $3)",
        )
        .bind(downstream_key)
        .bind(before)
        .bind(limit)
        .execute(pool)
        .await?
        .rows_affected()))
    }

    /// Deletes up to `limit` of a downstream's oldest rows. Returns how many went.
    pub async fn delete_oldest_telemetry(
        &self,
        downstream_key: &str,
        limit: i64,
    ) -> Result<u64, StoreError> {
        Ok(on_pool!(self, pool => sqlx::query(
            "DELETE FROM telemetry WHERE id IN (SELECT id FROM telemetry WHERE downstream_key = $1 ORDER BY received_at LIMIT $2)",
        )
        .bind(downstream_key)
        .bind(limit)
        .execute(pool)
        .await?
        .rows_affected()))
    }

    /// Rows a downstream holds (an index scan; retention calls it every few seconds at most).
    pub async fn count_telemetry(&self, downstream_key: &str) -> Result<i64, StoreError> {
        Ok(
            on_pool!(self, pool => sqlx::query("SELECT COUNT(*) FROM telemetry WHERE downstream_key = $1")
            .bind(downstream_key)
            .fetch_one(pool)
            .await?
            .col_at(0)?),
        )
    }

    /// The newest rows of a device and/or listener (no paging).
    pub async fn query_telemetry(
        &self,
        device_id: Option<&str>,
        listener_key: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TelemetryRow>, StoreError> {
        self.telemetry_page(&TelemetryQuery {
            device_id: device_id.map(str::to_owned),
            listener_key: listener_key.map(str::to_owned),
            limit,
            ..TelemetryQuery::default()
        })
        .await
    }

    /// One page of telemetry, newest first (see [`TelemetryQuery`]). Served by the
    /// `(device_id | listener_key, received_at, id)` and `(received_at, id)` indexes.
    pub async fn telemetry_page(
        &self,
        query: &TelemetryQuery,
    ) -> Result<Vec<TelemetryRow>, StoreError> {
        on_pool!(self, pool => {
            let mut builder = QueryBuilder::new(TELEMETRY_SELECT);
            builder.push(" WHERE 1 = 1");
            if let Some(device_id) = &query.device_id {
                builder.push(" AND device_id = ").push_bind(device_id);
            }
            if let Some(listener_key) = &query.listener_key {
                builder.push(" AND listener_key = ").push_bind(listener_key);
            }
            if let Some(from) = &query.from {
                builder.push(" AND received_at >= ").push_bind(from);
            }
            if let Some(to) = &query.to {
                builder.push(" AND received_at < ").push_bind(to);
            }
            if let Some(before) = &query.before {
                builder
                    .push(" AND (received_at, id) < (")
                    .push_bind(&before.received_at)
                    .push(", ")
                    .push_bind(&before.id)
                    .push(")");
            }
            builder
                .push(" ORDER BY received_at DESC, id DESC LIMIT ")
                .push_bind(query.limit);
            let rows = builder.build().fetch_all(pool).await?;
            rows.iter().map(TelemetryRow::from_row).collect()
        })
    }
}

impl TelemetryRow {
    /// True when this row takes part in de-duplication by message id.
    fn deduplicates(&self) -> bool {
        self.message_id.is_some() && self.device_id.is_some()
    }
}

/// The telemetry writes inside one transaction, per engine.
pub(crate) trait TelemetryWriter {
    /// How many of `remaining` rows go in the next statement.
    fn rows_per_statement(&self, remaining: usize) -> usize;

    /// Inserts rows, skipping those that conflict (same id, or same device, message id and
    /// downstream). Returns how many went in.
    async fn insert_rows(&mut self, rows: &[TelemetryRow]) -> Result<u64, sqlx::Error>;

    /// Which of the chunk's rows (with message ids) are in the table under their own id: inserted
    /// just now, or by an earlier commit of the same batch.
    async fn present_ids(&mut self, chunk: &[TelemetryRow]) -> Result<HashSet<String>, StoreError>;

    /// A row with a message id was not inserted. Either its own id is already stored (a batch
    /// retried after a commit whose outcome was unknown: stored, not a duplicate), or the
    /// downstream holds the same device's message id: a duplicate when that copy is recent
    /// enough, otherwise the old copy gives the id up (a device may reuse ids after the window)
    /// and this row goes in. Returns whether it was a duplicate.
    async fn settle_message_id_conflict(&mut self, row: &TelemetryRow) -> Result<bool, StoreError>;
}

/// The parts of [`TelemetryWriter`] whose SQL both engines share, expanded into each impl.
macro_rules! shared_telemetry_writes {
    () => {
        async fn present_ids(
            &mut self,
            chunk: &[TelemetryRow],
        ) -> Result<HashSet<String>, StoreError> {
            let mut present = HashSet::new();
            let candidates: Vec<&TelemetryRow> =
                chunk.iter().filter(|r| r.deduplicates()).collect();
            for part in candidates.chunks(500) {
                let mut builder = QueryBuilder::new("SELECT id FROM telemetry WHERE id IN (");
                let mut separated = builder.separated(", ");
                for row in part {
                    separated.push_bind(row.id.as_str());
                }
                builder.push(")");
                for found in builder.build().fetch_all(&mut **self).await? {
                    present.insert(found.col_at::<String>(0)?);
                }
            }
            Ok(present)
        }

        async fn settle_message_id_conflict(
            &mut self,
            row: &TelemetryRow,
        ) -> Result<bool, StoreError> {
            let existing: Option<String> = sqlx::query(
                "SELECT received_at FROM telemetry WHERE device_id = $1 AND message_id = $2 AND downstream_key = $3",
            )
            .bind(&row.device_id)
            .bind(&row.message_id)
            .bind(&row.downstream_key)
            .fetch_optional(&mut **self)
            .await?
            .map(|r| r.col_at(0))
            .transpose()?;
            let Some(existing_received_at) = existing else {
                return Ok(false);
            };
            match &row.duplicate_if_stored_since {
                Some(since) if existing_received_at >= *since => Ok(true),
                _ => {
                    sqlx::query(
                        "UPDATE telemetry SET message_id = NULL WHERE device_id = $1 AND message_id = $2 AND downstream_key = $3",
                    )
                    .bind(&row.device_id)
                    .bind(&row.message_id)
                    .bind(&row.downstream_key)
                    .execute(&mut **self)
                    .await?;
                    self.insert_rows(std::slice::from_ref(row)).await?;
                    Ok(false)
                }
            }
        }
    };
}

impl TelemetryWriter for Transaction<'_, Sqlite> {
    /// Powers of two, at most 512 rows: 15 parameters per row stay far below SQLite's limit of
    /// 32766, and only ten distinct statement texts exist, so every one stays prepared (a text
    /// per batch size would be prepared again and again).
    fn rows_per_statement(&self, remaining: usize) -> usize {
        const MAX_ROWS_PER_STATEMENT: usize = 512;
        largest_power_of_two_at_most(remaining.min(MAX_ROWS_PER_STATEMENT))
    }

    async fn insert_rows(&mut self, rows: &[TelemetryRow]) -> Result<u64, sqlx::Error> {
        // `OR IGNORE` rather than `ON CONFLICT DO NOTHING`: both skip a row that conflicts, but
        // with `OR IGNORE` no constraint of this statement can abort it half-way (the NOT NULL
        // columns are never null here: they are Rust `String`s), so SQLite writes no statement
        // journal. With `DO NOTHING` it copied every page the batch touched into that journal
        // first, about a fifth of the writer thread's time under acknowledged load.
        let mut builder = QueryBuilder::new(format!(
            "INSERT OR IGNORE INTO telemetry ({TELEMETRY_COLUMNS}) "
        ));
        builder.push_values(rows, |mut b, row| {
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
                .push_bind(&row.downstream_key)
                .push_bind(&row.message_id)
                .push_bind(row.authenticated)
                .push_bind(&row.claimed_device_id)
                .push_bind(&row.message_type);
        });
        Ok(builder.build().execute(&mut **self).await?.rows_affected())
    }

    shared_telemetry_writes!();
}

impl TelemetryWriter for Transaction<'_, Postgres> {
    /// The whole batch: arrays have no parameter limit, and the statement text never changes.
    fn rows_per_statement(&self, remaining: usize) -> usize {
        remaining
    }

    async fn insert_rows(&mut self, rows: &[TelemetryRow]) -> Result<u64, sqlx::Error> {
        let column = |f: fn(&TelemetryRow) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
        let optional = |f: fn(&TelemetryRow) -> Option<&str>| {
            rows.iter().map(f).collect::<Vec<Option<&str>>>()
        };
        let result = sqlx::query(
            "INSERT INTO telemetry (id, listener_key, device_id, device_type, connection_id, source_address, received_at, content_type, payload, metadata, downstream_key, message_id, authenticated, claimed_device_id, message_type) \
             SELECT id, listener_key, device_id, device_type, connection_id, source_address, received_at, content_type, payload::jsonb, metadata::jsonb, downstream_key, message_id, authenticated, claimed_device_id, message_type \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bool[], $14::text[], $15::text[]) \
             AS t(id, listener_key, device_id, device_type, connection_id, source_address, received_at, content_type, payload, metadata, downstream_key, message_id, authenticated, claimed_device_id, message_type) \
             ON CONFLICT DO NOTHING",
        )
        .bind(column(|r| &r.id))
        .bind(column(|r| &r.listener_key))
        .bind(optional(|r| r.device_id.as_deref()))
        .bind(optional(|r| r.device_type.as_deref()))
        .bind(rows.iter().map(|r| r.connection_id).collect::<Vec<i64>>())
        .bind(optional(|r| r.source_address.as_deref()))
        .bind(column(|r| &r.received_at))
        .bind(column(|r| &r.content_type))
        .bind(column(|r| &r.payload))
        .bind(column(|r| &r.metadata))
        .bind(column(|r| &r.downstream_key))
        .bind(optional(|r| r.message_id.as_deref()))
        .bind(rows.iter().map(|r| r.authenticated).collect::<Vec<bool>>())
        .bind(optional(|r| r.claimed_device_id.as_deref()))
        .bind(optional(|r| r.message_type.as_deref()))
        .execute(&mut **self)
        .await?;
        Ok(result.rows_affected())
    }

    shared_telemetry_writes!();
}

fn largest_power_of_two_at_most(n: usize) -> usize {
    debug_assert!(n > 0);
    1 << (usize::BITS - 1 - n.leading_zeros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_cursor_reads_back_as_itself(received_at in any::<String>(), id in any::<String>()) {
            let cursor = TelemetryCursor { received_at, id };
            let text = cursor.encode();
            prop_assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{}", text);
            prop_assert_eq!(TelemetryCursor::decode(&text), Some(cursor));
        }

        #[test]
        fn any_text_decodes_to_a_cursor_or_to_nothing_without_panicking(text in any::<String>()) {
            if let Some(cursor) = TelemetryCursor::decode(&text) {
                // Whatever decodes is a real cursor: its own encoding decodes to it again.
                prop_assert_eq!(TelemetryCursor::decode(&cursor.encode()), Some(cursor));
            }
        }

        #[test]
        fn tampered_cursors_are_refused_or_read_as_another_cursor(
            received_at in "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{15}Z",
            id in "[0-9a-f-]{36}",
            flip in any::<prop::sample::Index>(),
        ) {
            let text = TelemetryCursor { received_at: received_at.clone(), id: id.clone() }.encode();
            let mut bytes = text.into_bytes();
            let at = flip.index(bytes.len());
            bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes).unwrap();
            if let Some(cursor) = TelemetryCursor::decode(&tampered) {
                prop_assert!(cursor.received_at != received_at || cursor.id != id);
            }
        }
    }

    fn row(id: &str, device: &str, message_id: &str, received_at: &str) -> TelemetryRow {
        TelemetryRow {
            id: id.into(),
            listener_key: "field".into(),
            device_id: Some(device.into()),
            device_type: None,
            connection_id: 1,
            source_address: None,
            received_at: received_at.into(),
            content_type: "json".into(),
            payload: format!("{{\"row\":\"{id}\"}}"),
            metadata: "{}".into(),
            downstream_key: "store".into(),
            message_id: Some(message_id.into()),
            authenticated: true,
            claimed_device_id: None,
            message_type: None,
            duplicate_if_stored_since: Some("2026-11-30T11:50:00.000000Z".into()),
        }
    }

    /// One multi-row statement meets every kind of conflict at once (SQLite skips conflicting
    /// rows without a statement journal): the rows around them are stored, a retried batch's row
    /// is not a duplicate, a recent message id is, and an id older than the window is given up
    /// to the new row.
    #[tokio::test]
    async fn one_batch_settles_every_kind_of_conflict_and_stores_the_rest() {
        let dir = std::env::temp_dir().join(format!("iotgate-telemetry-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::connect(&Store::default_url(&dir)).await.unwrap();
        let first = [
            row("a", "d1", "m-1", "2026-11-30T11:55:00.000000Z"),
            row("b", "d1", "m-2", "2026-11-30T11:40:00.000000Z"),
        ];
        assert_eq!(
            store.insert_telemetry(&first).await.unwrap(),
            [false, false]
        );

        let second = [
            row("c", "d2", "m-1", "2026-11-30T12:00:00.000000Z"),
            // The first batch's row again (its commit's outcome was unknown): already stored.
            row("a", "d1", "m-1", "2026-11-30T11:55:00.000000Z"),
            // A retry of a message stored within the window.
            row("d", "d1", "m-1", "2026-11-30T12:00:01.000000Z"),
            // An id last used before the window: stored again.
            row("e", "d1", "m-2", "2026-11-30T12:00:02.000000Z"),
            row("f", "d1", "m-3", "2026-11-30T12:00:03.000000Z"),
        ];
        assert_eq!(
            store.insert_telemetry(&second).await.unwrap(),
            [false, false, true, false, false]
        );

        let mut stored: Vec<(String, Option<String>)> = store
            .query_telemetry(None, None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.id, r.message_id))
            .collect();
        stored.sort();
        let expected = [
            ("a", Some("m-1")),
            ("b", None),
            ("c", Some("m-1")),
            ("e", Some("m-2")),
            ("f", Some("m-3")),
        ]
        .map(|(id, message_id)| (id.to_owned(), message_id.map(str::to_owned)));
        assert_eq!(stored, expected);
        store.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn garbage_is_not_a_cursor() {
        for text in ["", "!!", "bm90IGpzb24", "WyJhIl0", "WzEsMl0", "eyJhIjoxfQ"] {
            assert_eq!(TelemetryCursor::decode(text), None, "{text}");
        }
    }
}
