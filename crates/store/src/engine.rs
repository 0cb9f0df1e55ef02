//! The two database engines behind one [`Store`](crate::Store): SQLite (embedded default) and
//! PostgreSQL (several nodes sharing one database).
//!
//! The SQL is written once for both wherever the engines agree, which is almost everywhere:
//! statements use numbered parameters (`$1`, which SQLite accepts too), `CAST(x AS TEXT)` to read
//! JSON columns (a no-op on SQLite's TEXT, the JSON text of PostgreSQL's `jsonb`) and
//! `sqlx::types::Json` to write them (TEXT on SQLite, `jsonb` on PostgreSQL). A query runs on
//! either pool through [`on_pool!`], which expands the same body once per engine, so each copy is
//! type-checked against its own driver and nothing is decided per row at run time. Only what the
//! engines really do differently has two implementations: the bulk telemetry insert (multi-row
//! `VALUES` on SQLite, `UNNEST` of arrays on PostgreSQL) and the pool's connect options.

use sqlx::postgres::{PgPool, PgRow, Postgres};
use sqlx::sqlite::{Sqlite, SqlitePool, SqliteRow};
use sqlx::{Decode, Row, Type};

/// Which engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    /// The engine a database URL names by its scheme, if it is one this build can open.
    pub fn from_url(url: &str) -> Option<Self> {
        let (scheme, _) = url.split_once(':')?;
        match scheme {
            "sqlite" => Some(Engine::Sqlite),
            "postgres" | "postgresql" => Some(Engine::Postgres),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "SQLite",
            Engine::Postgres => "PostgreSQL",
        }
    }
}

/// The connection pool of one engine.
#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the store's pool, whichever engine it is. The body is
/// expanded once per engine; write it with SQL both engines accept.
macro_rules! on_pool {
    // A pool of the caller's choosing instead of the store's.
    (pool $chosen:expr, $pool:ident => $body:expr) => {
        match $chosen {
            $crate::engine::Pool::Sqlite($pool) => $body,
            $crate::engine::Pool::Postgres($pool) => $body,
        }
    };
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            $crate::engine::Pool::Sqlite($pool) => $body,
            $crate::engine::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// A value both engines can decode from a column (strings, integers, booleans, bytes, options).
pub(crate) trait Column:
    for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}
impl<T> Column for T where
    T: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

/// A result row of either engine, read by column name or position. Row types convert from it,
/// so each has one `from_row` for both engines.
pub(crate) trait Columns {
    fn col<T: Column>(&self, name: &str) -> Result<T, sqlx::Error>;
    fn col_at<T: Column>(&self, index: usize) -> Result<T, sqlx::Error>;
}

impl Columns for SqliteRow {
    fn col<T: Column>(&self, name: &str) -> Result<T, sqlx::Error> {
        self.try_get(name)
    }
    fn col_at<T: Column>(&self, index: usize) -> Result<T, sqlx::Error> {
        self.try_get(index)
    }
}

impl Columns for PgRow {
    fn col<T: Column>(&self, name: &str) -> Result<T, sqlx::Error> {
        self.try_get(name)
    }
    fn col_at<T: Column>(&self, index: usize) -> Result<T, sqlx::Error> {
        self.try_get(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_are_told_apart_by_scheme() {
        assert_eq!(Engine::from_url("sqlite::memory:"), Some(Engine::Sqlite));
        assert_eq!(Engine::from_url("sqlite://./x.db"), Some(Engine::Sqlite));
        assert_eq!(
            Engine::from_url("postgres://u@127.0.0.1/db"),
            Some(Engine::Postgres)
        );
        assert_eq!(
            Engine::from_url("postgresql://u@h/db"),
            Some(Engine::Postgres)
        );
        assert_eq!(Engine::from_url("mysql://h/db"), None);
        assert_eq!(Engine::from_url("no-scheme"), None);
    }
}
