//! Account management: users and their roles, password changes, API tokens. The rules live here,
//! apart from HTTP: names and passwords valid, the last admin kept, a token never above its
//! creator's role, a changed password or a deleted user cutting the credentials that relied on it.
//! Errors are [`AccountError`]; the API maps them to statuses in one place (`crate::error`).

use std::sync::Arc;

use iotgate_core::envelope::format_timestamp;
use iotgate_core::{Problem, SchemaRegistry};
use iotgate_store::{ApiTokenRecord, Store, StoreError, UserRecord};
use serde_json::Value;
use time::OffsetDateTime;

use crate::auth::{
    hash_password_async, password_problem, random_token, token_digest, AdminAuth, LoginError,
    Principal, Role, API_TOKEN_PREFIX,
};

/// The longest an API token may live.
pub const MAX_TOKEN_LIFETIME: time::Duration = time::Duration::days(3 * 366);

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the request has {} problem(s)", .0.len())]
    Invalid(Vec<Problem>),
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Login(#[from] LoginError),
    #[error("account storage failed")]
    Store(#[source] StoreError),
    #[error("account change failed")]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for AccountError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(what) => AccountError::NotFound(what),
            StoreError::Conflict(what) if what == "the last admin" => AccountError::Conflict(
                "the last admin cannot be removed or demoted; make another user admin first".into(),
            ),
            StoreError::Conflict(what) => AccountError::Conflict(format!("{what} already exists")),
            other => AccountError::Store(other),
        }
    }
}

fn invalid(pointer: &str, message: impl Into<String>) -> AccountError {
    AccountError::Invalid(vec![Problem::new(pointer, message)])
}

/// A user change as the audit log records it.
#[derive(Debug, Clone)]
pub struct UserChange {
    pub before: UserRecord,
    pub after: UserRecord,
    pub password_changed: bool,
}

pub struct Accounts {
    store: Store,
    auth: Arc<AdminAuth>,
    schemas: Arc<SchemaRegistry>,
    /// Serializes role changes and deletions, so "the last admin" is decided on a settled count
    /// (the store's guarded statements are the second line).
    changes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Accounts")
    }
}

impl Accounts {
    pub fn new(store: Store, auth: Arc<AdminAuth>, schemas: Arc<SchemaRegistry>) -> Self {
        Self {
            store,
            auth,
            schemas,
            changes: tokio::sync::Mutex::new(()),
        }
    }

    fn validate(&self, schema: &str, body: &Value) -> Result<(), AccountError> {
        let problems = self.schemas.problems(schema, body);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(AccountError::Invalid(problems))
        }
    }

    pub async fn list_users(&self) -> Result<Vec<UserRecord>, AccountError> {
        Ok(self.store.list_users().await?)
    }

    pub async fn get_user(&self, user_name: &str) -> Result<UserRecord, AccountError> {
        self.store
            .get_user(user_name)
            .await?
            .ok_or_else(|| AccountError::NotFound(format!("user {user_name}")))
    }

    pub async fn create_user(&self, body: &Value) -> Result<UserRecord, AccountError> {
        self.validate("user", body)?;
        let user_name = body["userName"].as_str().unwrap_or_default().to_owned();
        if user_name == "me" {
            return Err(invalid(
                "/userName",
                "me is reserved: /users/me stands for the signed-in user",
            ));
        }
        let password = body["password"].as_str().unwrap_or_default();
        if let Some(problem) = password_problem(password) {
            return Err(invalid("/password", problem));
        }
        let role = body["role"].as_str().unwrap_or_default().to_owned();
        let hash = hash_password_async(password.to_owned()).await?;
        let record = UserRecord {
            user_name,
            role,
            created_at: format_timestamp(OffsetDateTime::now_utc()),
        };
        self.store
            .insert_user(&record.user_name, &hash, &record.role, &record.created_at)
            .await?;
        Ok(record)
    }

    /// An admin changes a user's role and/or sets a new password for them.
    pub async fn update_user(
        &self,
        user_name: &str,
        body: &Value,
    ) -> Result<UserChange, AccountError> {
        self.validate("user-patch", body)?;
        let new_password = body.get("password").and_then(Value::as_str);
        if let Some(problem) = new_password.and_then(password_problem) {
            return Err(invalid("/password", problem));
        }
        let _serial = self.changes.lock().await;
        let before = self.get_user(user_name).await?;
        let mut after = before.clone();
        if let Some(role) = body.get("role").and_then(Value::as_str) {
            if role != before.role {
                self.store.set_user_role(user_name, role).await?;
                after.role = role.to_owned();
            }
        }
        if let Some(password) = new_password {
            let hash = hash_password_async(password.to_owned()).await?;
            self.store.set_user_password(user_name, &hash).await?;
            // Whoever knew the old password is out: every session of the user ends.
            self.store.delete_sessions_of_user(user_name, None).await?;
        }
        // Cached credentials pick up the new role; a password reset revokes them all.
        self.auth
            .forget_user(user_name, new_password.is_some(), None);
        Ok(UserChange {
            before,
            after,
            password_changed: new_password.is_some(),
        })
    }

    pub async fn delete_user(&self, user_name: &str) -> Result<UserRecord, AccountError> {
        let _serial = self.changes.lock().await;
        let before = self.get_user(user_name).await?;
        self.store.delete_user(user_name).await?;
        self.auth.forget_user(user_name, true, None);
        Ok(before)
    }

    /// The signed-in user changes their own password, proving the current one (throttled like a
    /// login). Other sessions of the user end; this one stays.
    pub async fn change_own_password(
        &self,
        principal: &Principal,
        body: &Value,
    ) -> Result<(), AccountError> {
        self.validate("password-change", body)?;
        let current = body["currentPassword"].as_str().unwrap_or_default();
        let new = body["newPassword"].as_str().unwrap_or_default();
        if let Some(problem) = password_problem(new) {
            return Err(invalid("/newPassword", problem));
        }
        match self
            .auth
            .verify_password(principal.client.ip(), &principal.user_name, current)
            .await
        {
            Ok(_) => {}
            Err(LoginError::WrongCredentials) => {
                return Err(invalid("/currentPassword", "the current password is wrong"))
            }
            Err(other) => return Err(other.into()),
        }
        let hash = hash_password_async(new.to_owned()).await?;
        self.store
            .set_user_password(&principal.user_name, &hash)
            .await?;
        let keep = matches!(principal.kind, crate::auth::CredentialKind::Session)
            .then_some(principal.digest.as_str());
        self.store
            .delete_sessions_of_user(&principal.user_name, keep)
            .await?;
        self.auth.forget_user(&principal.user_name, true, keep);
        Ok(())
    }

    /// Creates an API token for the signed-in user; returns it with the token (shown once).
    pub async fn create_token(
        &self,
        principal: &Principal,
        body: &Value,
    ) -> Result<(ApiTokenRecord, String), AccountError> {
        self.validate("api-token", body)?;
        let role = body["role"]
            .as_str()
            .and_then(Role::parse)
            .ok_or_else(|| invalid("/role", "role must be viewer, operator or admin"))?;
        if role > principal.role {
            return Err(AccountError::Forbidden(format!(
                "a token cannot have more rights than its creator: {} has the {} role",
                principal.user_name, principal.role
            )));
        }
        let now = OffsetDateTime::now_utc();
        let expires_at = body["expiresAt"]
            .as_str()
            .and_then(|t| {
                OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .ok_or_else(|| {
                invalid(
                    "/expiresAt",
                    "expiresAt must be an RFC 3339 date-time, e.g. 2027-06-30T00:00:00Z",
                )
            })?;
        if expires_at <= now {
            return Err(invalid("/expiresAt", "expiresAt must be in the future"));
        }
        if expires_at > now + MAX_TOKEN_LIFETIME {
            return Err(invalid(
                "/expiresAt",
                "an API token can live at most three years",
            ));
        }
        let token = format!("{API_TOKEN_PREFIX}{}", random_token());
        let record = ApiTokenRecord {
            id: uuid::Uuid::now_v7().to_string(),
            name: body["name"].as_str().unwrap_or_default().to_owned(),
            user_name: principal.user_name.clone(),
            role: role.as_str().to_owned(),
            created_at: format_timestamp(now),
            expires_at: format_timestamp(expires_at),
            last_used_at: None,
        };
        self.store
            .insert_api_token(&record, &token_digest(&token))
            .await?;
        Ok((record, token))
    }

    /// The signed-in user's tokens; an admin sees everyone's.
    pub async fn list_tokens(
        &self,
        principal: &Principal,
    ) -> Result<Vec<ApiTokenRecord>, AccountError> {
        let owner = (principal.role < Role::Admin).then_some(principal.user_name.as_str());
        Ok(self.store.list_api_tokens(owner).await?)
    }

    /// Revokes a token: one's own, or (admin) anyone's. It stops working at once.
    pub async fn revoke_token(
        &self,
        principal: &Principal,
        id: &str,
    ) -> Result<ApiTokenRecord, AccountError> {
        let token = self
            .store
            .get_api_token(id)
            .await?
            .filter(|t| principal.role == Role::Admin || t.user_name == principal.user_name)
            .ok_or_else(|| AccountError::NotFound(format!("token {id}")))?;
        let digest = self.store.delete_api_token(id).await?;
        self.auth.forget_credential(&digest);
        Ok(token)
    }
}
