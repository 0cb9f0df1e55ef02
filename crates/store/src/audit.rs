//! The audit log table: append, page newest first by keyset, purge past the retention.
//!
//! Pages are keyset-paged on `(occurred_at, id)` rather than by offset, so a page is as cheap at
//! the millionth row as at the first and rows written while someone pages never shift the pages.

use sqlx::QueryBuilder;

use crate::engine::{on_pool, Columns};
use crate::{Store, StoreError};

/// One audit row. `details` is a JSON object as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub id: String,
    pub occurred_at: String,
    pub actor: Option<String>,
    pub credential: Option<String>,
    pub source_address: Option<String>,
    pub action: String,
    pub target_kind: Option<String>,
    pub target_key: Option<String>,
    pub outcome: String,
    pub details: String,
}

impl AuditRow {
    fn from_row(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.col("id")?,
            occurred_at: row.col("occurred_at")?,
            actor: row.col("actor")?,
            credential: row.col("credential")?,
            source_address: row.col("source_address")?,
            action: row.col("action")?,
            target_kind: row.col("target_kind")?,
            target_key: row.col("target_key")?,
            outcome: row.col("outcome")?,
            details: row.col("details")?,
        })
    }
}

/// A page request: rows with `from <= occurred_at < to`, of one actor, strictly older than the
/// `before` keyset position; at most `limit`, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub from: Option<String>,
    pub to: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    /// `(occurred_at, id)` of the last row of the previous page.
    pub before: Option<(String, String)>,
    pub limit: i64,
}

impl Store {
    pub async fn insert_audit(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for chunk in rows.chunks(500) {
                let mut builder = QueryBuilder::new(
                    "INSERT INTO audit_log (id, occurred_at, actor, credential, source_address, action, target_kind, target_key, outcome, details) ",
                );
                builder.push_values(chunk, |mut b, row| {
                    b.push_bind(&row.id)
                        .push_bind(&row.occurred_at)
                        .push_bind(&row.actor)
                        .push_bind(&row.credential)
                        .push_bind(&row.source_address)
                        .push_bind(&row.action)
                        .push_bind(&row.target_kind)
                        .push_bind(&row.target_key)
                        .push_bind(&row.outcome)
                        .push_bind(&row.details);
                });
                builder.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    pub async fn query_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRow>, StoreError> {
        on_pool!(self, pool => {
            let mut builder = QueryBuilder::new(
                "SELECT id, occurred_at, actor, credential, source_address, action, target_kind, target_key, outcome, details FROM audit_log WHERE 1 = 1",
            );
            if let Some(from) = &query.from {
                builder.push(" AND occurred_at >= ").push_bind(from);
            }
            if let Some(to) = &query.to {
                builder.push(" AND occurred_at < ").push_bind(to);
            }
            if let Some(actor) = &query.actor {
                builder.push(" AND actor = ").push_bind(actor);
            }
            if let Some(action) = &query.action {
                builder.push(" AND action = ").push_bind(action);
            }
            if let Some((at, id)) = &query.before {
                builder
                    .push(" AND (occurred_at, id) < (")
                    .push_bind(at)
                    .push(", ")
                    .push_bind(id)
                    .push(")");
            }
            builder
                .push(" ORDER BY occurred_at DESC, id DESC LIMIT ")
                .push_bind(query.limit);
            let rows = builder.build().fetch_all(pool).await?;
            rows.iter().map(AuditRow::from_row).collect()
        })
    }

    /// Deletes rows older than `before`; returns how many went.
    pub async fn delete_audit_before(&self, before: &str) -> Result<u64, StoreError> {
        Ok(
            on_pool!(self, pool => sqlx::query("DELETE FROM audit_log WHERE occurred_at < $1")
            .bind(before)
            .execute(pool)
            .await?
            .rows_affected()),
        )
    }
}
