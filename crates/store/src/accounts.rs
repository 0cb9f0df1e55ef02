//! Admin accounts: users with a role and an Argon2id password hash, browser sessions and long-lived
//! API tokens. Only digests of session and API tokens are stored; roles are plain text
//! (`admin`, `operator`, `viewer`) checked by the layer above.
//!
//! "The last admin cannot be removed or demoted" is enforced here, inside the one statement that
//! removes or demotes, so two concurrent requests cannot each leave the other as the last admin
//! and then both succeed.

use crate::changes::ChangedRow;
use crate::engine::{on_pool, Columns};
use crate::{is_unique_violation, Store, StoreError};

/// A user, without the password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub user_name: String,
    pub role: String,
    pub created_at: String,
}

impl UserRecord {
    fn from_row(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(Self {
            user_name: row.col("user_name")?,
            role: row.col("role")?,
            created_at: row.col("created_at")?,
        })
    }
}

/// A valid-looking session: its user, the user's current role, and when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub user_name: String,
    pub role: String,
    pub expires_at: String,
}

/// An API token as listed (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenRecord {
    pub id: String,
    pub name: String,
    pub user_name: String,
    pub role: String,
    pub created_at: String,
    pub expires_at: String,
    pub last_used_at: Option<String>,
}

impl ApiTokenRecord {
    fn from_row(row: &impl Columns) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.col("id")?,
            name: row.col("name")?,
            user_name: row.col("user_name")?,
            role: row.col("role")?,
            created_at: row.col("created_at")?,
            expires_at: row.col("expires_at")?,
            last_used_at: row.col("last_used_at")?,
        })
    }
}

/// An API token found by its digest, with its owner's current role (a token never acts above it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub token: ApiTokenRecord,
    pub owner_role: String,
}

/// Why a user change was refused by the last-admin rule.
const LAST_ADMIN: &str = "the last admin";

const TOKEN_SELECT: &str =
    "SELECT id, name, user_name, role, created_at, expires_at, last_used_at FROM api_tokens";

impl Store {
    // ----- users -----

    pub async fn count_users(&self) -> Result<i64, StoreError> {
        Ok(
            on_pool!(self, pool => sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(pool)
            .await?
            .col_at(0)?),
        )
    }

    /// Creates a user; `Conflict` when the name is taken.
    pub async fn insert_user(
        &self,
        user_name: &str,
        password_hash: &str,
        role: &str,
        created_at: &str,
    ) -> Result<(), StoreError> {
        let result = on_pool!(self, pool => sqlx::query(
            "INSERT INTO users (user_name, password_hash, role, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(user_name)
        .bind(password_hash)
        .bind(role)
        .bind(created_at)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()));
        match result {
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::Conflict(format!("user {user_name}")))
            }
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub async fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query("SELECT user_name, role, created_at FROM users ORDER BY user_name")
                .fetch_all(pool)
                .await?;
            rows.iter().map(UserRecord::from_row).collect()
        })
    }

    pub async fn get_user(&self, user_name: &str) -> Result<Option<UserRecord>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query("SELECT user_name, role, created_at FROM users WHERE user_name = $1")
                .bind(user_name)
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(UserRecord::from_row).transpose()
        })
    }

    /// The password hash and role of a user, for a login.
    pub async fn user_credentials(
        &self,
        user_name: &str,
    ) -> Result<Option<(String, String)>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query("SELECT password_hash, role FROM users WHERE user_name = $1")
                .bind(user_name)
                .fetch_optional(pool)
                .await?;
            Ok(row
                .map(|r| Ok::<_, sqlx::Error>((r.col_at(0)?, r.col_at(1)?)))
                .transpose()?)
        })
    }

    pub async fn set_user_password(
        &self,
        user_name: &str,
        password_hash: &str,
    ) -> Result<(), StoreError> {
        let affected = on_pool!(self, pool => sqlx::query("UPDATE users SET password_hash = $1 WHERE user_name = $2")
            .bind(password_hash)
            .bind(user_name)
            .execute(pool)
            .await?
            .rows_affected());
        if affected == 0 {
            return Err(StoreError::NotFound(format!("user {user_name}")));
        }
        Ok(())
    }

    /// Changes a user's role. Demoting the only admin is refused (`Conflict`).
    ///
    /// The count of admins is read under a lock on the users table (PostgreSQL; SQLite runs one
    /// writer at a time anyway), so two concurrent demotions cannot both see the other admin.
    pub async fn set_user_role(&self, user_name: &str, role: &str) -> Result<(), StoreError> {
        let affected = on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            lock_users(&mut tx).await?;
            let affected = sqlx::query(
                "UPDATE users SET role = $1 WHERE user_name = $2 AND (role <> 'admin' OR $1 = 'admin' \
                 OR (SELECT COUNT(*) FROM users WHERE role = 'admin') > 1)",
            )
            .bind(role)
            .bind(user_name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            affected
        });
        if affected == 0 {
            return Err(self.why_unchanged(user_name).await);
        }
        self.notify_user(user_name, false, None).await;
        Ok(())
    }

    /// Tells other nodes to read a user's cached credentials again (and, with `revoke`, to drop
    /// all but `keep`).
    async fn notify_user(&self, user_name: &str, revoke: bool, keep: Option<&str>) {
        self.notify_change(ChangedRow::User {
            user_name: user_name.to_owned(),
            revoke,
            keep: keep.map(str::to_owned),
        })
        .await;
    }

    /// Deletes a user (their sessions and tokens go with them). Deleting the only admin is
    /// refused (`Conflict`).
    pub async fn delete_user(&self, user_name: &str) -> Result<(), StoreError> {
        let affected = on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            lock_users(&mut tx).await?;
            let affected = sqlx::query(
                "DELETE FROM users WHERE user_name = $1 AND (role <> 'admin' \
                 OR (SELECT COUNT(*) FROM users WHERE role = 'admin') > 1)",
            )
            .bind(user_name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            affected
        });
        if affected == 0 {
            return Err(self.why_unchanged(user_name).await);
        }
        self.notify_user(user_name, true, None).await;
        Ok(())
    }

    /// After a guarded statement changed nothing: the user does not exist, or is the last admin.
    async fn why_unchanged(&self, user_name: &str) -> StoreError {
        match self.get_user(user_name).await {
            Ok(Some(_)) => StoreError::Conflict(LAST_ADMIN.to_owned()),
            Ok(None) => StoreError::NotFound(format!("user {user_name}")),
            Err(error) => error,
        }
    }

    // ----- sessions -----

    pub async fn insert_session(
        &self,
        token_digest: &str,
        user_name: &str,
        expires_at: &str,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => sqlx::query("INSERT INTO sessions (token_digest, user_name, expires_at) VALUES ($1, $2, $3)")
            .bind(token_digest)
            .bind(user_name)
            .bind(expires_at)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// The session's user, the user's role and the expiry, if the token digest is known.
    pub async fn find_session(
        &self,
        token_digest: &str,
    ) -> Result<Option<SessionRecord>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT s.user_name, u.role, s.expires_at FROM sessions s \
                 JOIN users u ON u.user_name = s.user_name WHERE s.token_digest = $1",
            )
            .bind(token_digest)
            .fetch_optional(pool)
            .await?;
            Ok(row
                .map(|r| {
                    Ok::<_, sqlx::Error>(SessionRecord {
                        user_name: r.col_at(0)?,
                        role: r.col_at(1)?,
                        expires_at: r.col_at(2)?,
                    })
                })
                .transpose()?)
        })
    }

    pub async fn delete_session(&self, token_digest: &str) -> Result<(), StoreError> {
        on_pool!(self, pool => sqlx::query("DELETE FROM sessions WHERE token_digest = $1")
            .bind(token_digest)
            .execute(pool)
            .await
            .map(|_| ()))?;
        self.notify_change(ChangedRow::Credential {
            digest: token_digest.to_owned(),
        })
        .await;
        Ok(())
    }

    /// Ends every session of a user except `keep` (the one that changed the password).
    pub async fn delete_sessions_of_user(
        &self,
        user_name: &str,
        keep: Option<&str>,
    ) -> Result<u64, StoreError> {
        let deleted = on_pool!(self, pool => sqlx::query(
            "DELETE FROM sessions WHERE user_name = $1 AND (CAST($2 AS TEXT) IS NULL OR token_digest <> $2)",
        )
        .bind(user_name)
        .bind(keep)
        .execute(pool)
        .await?
        .rows_affected());
        self.notify_user(user_name, true, keep).await;
        Ok(deleted)
    }

    pub async fn delete_expired_sessions(&self, now: &str) -> Result<u64, StoreError> {
        Ok(
            on_pool!(self, pool => sqlx::query("DELETE FROM sessions WHERE expires_at < $1")
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected()),
        )
    }

    // ----- API tokens -----

    pub async fn insert_api_token(
        &self,
        token: &ApiTokenRecord,
        token_digest: &str,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => sqlx::query(
            "INSERT INTO api_tokens (id, name, token_digest, user_name, role, created_at, expires_at, last_used_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)",
        )
        .bind(&token.id)
        .bind(&token.name)
        .bind(token_digest)
        .bind(&token.user_name)
        .bind(&token.role)
        .bind(&token.created_at)
        .bind(&token.expires_at)
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// The token with this digest and its owner's current role.
    pub async fn find_api_token(
        &self,
        token_digest: &str,
    ) -> Result<Option<TokenRecord>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT t.id, t.name, t.user_name, t.role, t.created_at, t.expires_at, t.last_used_at, \
                 u.role AS owner_role FROM api_tokens t JOIN users u ON u.user_name = t.user_name \
                 WHERE t.token_digest = $1",
            )
            .bind(token_digest)
            .fetch_optional(pool)
            .await?;
            row.map(|r| {
                Ok(TokenRecord {
                    token: ApiTokenRecord::from_row(&r)?,
                    owner_role: r.col("owner_role")?,
                })
            })
            .transpose()
        })
    }

    /// Tokens of one user, or of everyone; newest first.
    pub async fn list_api_tokens(
        &self,
        user_name: Option<&str>,
    ) -> Result<Vec<ApiTokenRecord>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(&format!(
                "{TOKEN_SELECT} WHERE (CAST($1 AS TEXT) IS NULL OR user_name = $1) ORDER BY created_at DESC, id DESC"
            ))
            .bind(user_name)
            .fetch_all(pool)
            .await?;
            rows.iter().map(ApiTokenRecord::from_row).collect()
        })
    }

    pub async fn get_api_token(&self, id: &str) -> Result<Option<ApiTokenRecord>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query(&format!("{TOKEN_SELECT} WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(ApiTokenRecord::from_row).transpose()
        })
    }

    /// Revokes a token; returns its digest so the caller can drop it from any cache.
    pub async fn delete_api_token(&self, id: &str) -> Result<String, StoreError> {
        let digest: Option<String> = on_pool!(self, pool => {
            let row = sqlx::query("DELETE FROM api_tokens WHERE id = $1 RETURNING token_digest")
                .bind(id)
                .fetch_optional(pool)
                .await?;
            row.map(|row| row.col_at(0)).transpose()?
        });
        let digest = digest.ok_or_else(|| StoreError::NotFound(format!("token {id}")))?;
        self.notify_change(ChangedRow::Credential {
            digest: digest.clone(),
        })
        .await;
        Ok(digest)
    }

    /// Records when tokens were last used (batched by the caller, once a minute).
    pub async fn touch_api_tokens(&self, uses: &[(String, String)]) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for (id, at) in uses {
                sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE id = $2")
                    .bind(at)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }
}

/// Serializes the last-admin checks: on PostgreSQL, two transactions that each demote a
/// different admin would otherwise both count two admins (READ COMMITTED). SQLite holds one
/// writer at a time, so there it needs nothing.
trait LockUsers {
    async fn lock(&mut self) -> Result<(), sqlx::Error>;
}

impl LockUsers for sqlx::Transaction<'_, sqlx::Sqlite> {
    async fn lock(&mut self) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

impl LockUsers for sqlx::Transaction<'_, sqlx::Postgres> {
    async fn lock(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut **self)
            .await
            .map(|_| ())
    }
}

async fn lock_users(tx: &mut impl LockUsers) -> Result<(), sqlx::Error> {
    tx.lock().await
}
