//! A PostgreSQL database of the bench's own for one run, on a server the user names.

use anyhow::{Context, Result};
use sqlx::{Connection, PgConnection};

pub struct BenchDatabase {
    admin_url: String,
    name: String,
    /// The URL the server under test is given.
    pub url: String,
}

impl BenchDatabase {
    /// Creates `iotgate_bench_<pid>` on the server of `admin_url`.
    pub async fn create(admin_url: &str) -> Result<Self> {
        let name = format!("iotgate_bench_{}", std::process::id());
        let mut admin = PgConnection::connect(admin_url)
            .await
            .context("connecting to --postgres-url (is PostgreSQL running?)")?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        admin.close().await?;
        let (base, query) = match admin_url.split_once('?') {
            Some((base, query)) => (base, format!("?{query}")),
            None => (admin_url, String::new()),
        };
        let (server, _) = base
            .rsplit_once('/')
            .context("--postgres-url names no database")?;
        Ok(Self {
            admin_url: admin_url.to_owned(),
            url: format!("{server}/{name}{query}"),
            name,
        })
    }

    pub async fn drop_database(self) -> Result<()> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        admin.close().await?;
        Ok(())
    }
}
