//! A fresh PostgreSQL database per test, dropped when the test ends.
//!
//! The server is the machine's PostgreSQL (127.0.0.1:5432, trust auth), or the one
//! `IOTGATE_TEST_POSTGRES_URL` names (a URL of a database the user may `CREATE DATABASE` from).
//! In `tests/on_postgres.rs`, and in any test binary run with `IOTGATE_TEST_ENGINE=postgres`, every
//! [`TestServer`](super::TestServer) runs on its own PostgreSQL database instead of SQLite, so the
//! store-facing suites run on both engines.
//! A PostgreSQL that cannot be reached fails the test with how to start it; it never skips.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

/// The database the tests connect to for creating and dropping theirs.
pub fn admin_url() -> String {
    std::env::var("IOTGATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// True when every test server of this binary gets a PostgreSQL database: in the
/// `tests/on_postgres.rs` binary (which holds the store-facing suites a second time, so that
/// `cargo test` runs them on both engines), or in any binary with `IOTGATE_TEST_ENGINE=postgres`.
pub fn engine_is_postgres() -> bool {
    std::env::var("IOTGATE_TEST_ENGINE").is_ok_and(|engine| engine == "postgres")
        || is_the_postgres_binary()
}

/// The suites are compiled into `on_postgres` as modules, each with its own copy of `common`, so
/// the binary's name (cargo calls it `on_postgres-<hash>`) is what they can all see.
fn is_the_postgres_binary() -> bool {
    std::env::current_exe().is_ok_and(|exe| {
        exe.file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with("on_postgres-"))
    })
}

/// The admin URL with another database name.
fn url_of(database: &str) -> String {
    let admin = admin_url();
    let (base, query) = match admin.split_once('?') {
        Some((base, query)) => (base.to_owned(), format!("?{query}")),
        None => (admin.clone(), String::new()),
    };
    let (server, _) = base.rsplit_once('/').expect("the URL names a database");
    format!("{server}/{database}{query}")
}

async fn admin_connection() -> PgConnection {
    let url = admin_url();
    match tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&url)).await {
        Ok(Ok(connection)) => connection,
        outcome => panic!(
            "PostgreSQL is not reachable at {url} ({}). These tests need it: start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start` (trust \
             auth on 127.0.0.1:5432), or set IOTGATE_TEST_POSTGRES_URL to a database on a server \
             where the user may CREATE DATABASE.",
            match outcome {
                Ok(Err(error)) => error.to_string(),
                _ => "no answer within 10 s".to_owned(),
            }
        ),
    }
}

/// A database of its own for one test; dropped (with its connections) on drop.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let name = format!("iotgate_test_{}", uuid::Uuid::now_v7().simple());
        let mut admin = admin_connection().await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let _ = admin.close().await;
        Self {
            url: url_of(&name),
            name,
        }
    }

    /// Runs one statement as the admin user (e.g. to refuse or end the test database's
    /// connections).
    pub async fn admin(&self, statement: &str) {
        let mut admin = admin_connection().await;
        sqlx::query(statement)
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
        let _ = admin.close().await;
    }

    /// Runs a statement in the test database and returns the first column of every row as text.
    pub async fn query_text(&self, statement: &str) -> Vec<String> {
        let mut connection = PgConnection::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.name));
        let rows: Vec<(String,)> = sqlx::query_as(statement)
            .fetch_all(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
        let _ = connection.close().await;
        rows.into_iter().map(|(text,)| text).collect()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run inside a runtime: drop the database from a thread with one of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok(Ok(mut admin)) = tokio::time::timeout(
                    Duration::from_secs(10),
                    PgConnection::connect(&admin_url()),
                )
                .await
                {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                    let _ = admin.close().await;
                }
            });
        })
        .join();
    }
}

/// A TCP relay in front of PostgreSQL whose plug can be pulled: [`cut`](Self::cut) ends every
/// relayed connection and closes each new one at once (what a database host that goes away looks
/// like to iotgate: connections reset, new ones fail), [`restore`](Self::restore) relays again.
/// The port stays bound throughout, so no other socket can take it meanwhile.
pub struct TcpProxy {
    pub port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Cancels the relayed connections of the current generation.
    generation: std::sync::Arc<std::sync::Mutex<tokio_util::sync::CancellationToken>>,
    stop: tokio_util::sync::CancellationToken,
}

impl TcpProxy {
    /// Relays `127.0.0.1:<port>` to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            port: listener.local_addr().unwrap().port(),
            cut: Default::default(),
            generation: Default::default(),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        let (cut, generation, stop) = (
            proxy.cut.clone(),
            proxy.generation.clone(),
            proxy.stop.clone(),
        );
        let target = target.to_owned();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if cut.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let ended = generation.lock().unwrap().clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = ended.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        proxy
    }

    /// The URL of `database` through this proxy.
    pub fn url_of(&self, database: &TestDatabase) -> String {
        let (user, rest) = database.url.split_once('@').expect("a user in the URL");
        let (_, path) = rest.split_once('/').expect("a database in the URL");
        format!("{user}@127.0.0.1:{}/{path}", self.port)
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut generation = self.generation.lock().unwrap();
        generation.cancel();
        *generation = tokio_util::sync::CancellationToken::new();
    }

    pub async fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A direct connection to a test server's database, whichever engine it runs on, for tests that
/// read or write tables behind the server's back. Statements use `$1`-style parameters, which
/// both engines take.
pub enum DirectConnection {
    Sqlite(sqlx::SqliteConnection),
    Postgres(PgConnection),
}

macro_rules! on_connection {
    ($self:expr, $conn:ident => $body:expr) => {
        match $self {
            DirectConnection::Sqlite($conn) => $body,
            DirectConnection::Postgres($conn) => $body,
        }
    };
}

impl DirectConnection {
    pub async fn connect(url: &str) -> Self {
        if url.starts_with("sqlite:") {
            DirectConnection::Sqlite(
                sqlx::SqliteConnection::connect(url)
                    .await
                    .unwrap_or_else(|e| panic!("open {url}: {e}")),
            )
        } else {
            DirectConnection::Postgres(
                PgConnection::connect(url)
                    .await
                    .unwrap_or_else(|e| panic!("connect to {url}: {e}")),
            )
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, DirectConnection::Postgres(_))
    }

    /// Runs a statement with text parameters.
    pub async fn execute(&mut self, statement: &str, params: &[&str]) {
        on_connection!(self, conn => {
            let mut query = sqlx::query(statement);
            for param in params {
                query = query.bind(*param);
            }
            query
                .execute(&mut *conn)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
        })
    }

    /// The integers of a one-row query (`COUNT(*)`, sums cast to BIGINT).
    pub async fn integers<const N: usize>(&mut self, statement: &str) -> [i64; N] {
        on_connection!(self, conn => {
            let row = sqlx::query(statement)
                .fetch_one(&mut *conn)
                .await
                .unwrap_or_else(|e| panic!("{statement}: {e}"));
            std::array::from_fn(|i| {
                sqlx::Row::try_get::<i64, _>(&row, i).unwrap_or_else(|e| panic!("{statement}: {e}"))
            })
        })
    }

    /// Two optional text columns of every row.
    pub async fn text_pairs(&mut self, statement: &str) -> Vec<(Option<String>, Option<String>)> {
        on_connection!(self, conn => sqlx::query_as(statement)
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}")))
    }

    pub async fn close(self) {
        on_connection!(self, conn => { let _ = conn.close().await; })
    }
}
