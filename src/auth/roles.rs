//! Roles and who is asking.
//!
//! | role | may |
//! | --- | --- |
//! | `viewer` | read everything but users and the audit log; watch the live view |
//! | `operator` | what a viewer may, and change devices and their keys |
//! | `admin` | everything: definitions, users, the audit log |
//!
//! Roles are ordered, so "at least operator" is a comparison.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the credential of a request came from. Only a cookie is sent by a browser on its own,
/// so only a cookie-borne request needs the same-origin checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    /// `Authorization: Bearer <token>`.
    Header,
    /// `?token=` (WebSocket subscribers only: browsers cannot set headers on a WebSocket).
    Query,
    /// The `iotgate_session` cookie.
    Cookie,
}

/// What kind of credential it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialKind {
    /// A browser or API login session (12 hours).
    Session,
    /// A long-lived API token.
    ApiToken { id: String, name: String },
}

impl CredentialKind {
    /// How the audit log names it: `session` or `token:<id>`.
    pub fn audit_name(&self) -> String {
        match self {
            CredentialKind::Session => "session".to_owned(),
            CredentialKind::ApiToken { id, .. } => format!("token:{id}"),
        }
    }
}

/// An authenticated request's user.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_name: String,
    /// The effective role: a token's own role, never above its owner's current role.
    pub role: Role,
    pub kind: CredentialKind,
    /// SHA-256 of the token (the key of the session or token in the database and caches).
    pub digest: String,
    pub expires_at: time::OffsetDateTime,
    pub source: CredentialSource,
    pub client: iotgate_listener::ClientInfo,
}

impl Principal {
    /// The client address as the audit log writes it.
    pub fn address(&self) -> Option<String> {
        self.client.address.map(|a| a.ip().to_string())
    }
}
