//! API errors and their one mapping to HTTP: `{"error":{"code","message","details"?}}`.
//!
//! Domain errors (definitions, accounts, logins, the audit log) are enums of their own layers;
//! the `From` impls here are the one place they become statuses.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use iotgate_core::Problem;
use iotgate_store::StoreError;

use crate::accounts::AccountError;
use crate::audit::AuditQueryError;
use crate::auth::LoginError;
use crate::supervisor::{DefinitionError, TokenIssueError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("authentication required")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A conflict with a code of its own (e.g. `device_offline`), so a client can tell it apart.
    #[error("{message}")]
    ConflictWith { code: &'static str, message: String },
    #[error("the body exceeds {0} bytes")]
    PayloadTooLarge(usize),
    #[error("the document has {} problem(s)", .0.len())]
    Validation(Vec<Problem>),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("too many failed attempts; retry in {0} s")]
    TooManyRequests(u64),
    /// The database did not answer (lost connection, pool exhausted while it is away).
    #[error("the database is unavailable; retry shortly")]
    DatabaseUnavailable(#[source] StoreError),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(what) => ApiError::Conflict(format!("{what} already exists")),
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            other if other.is_unavailable() => ApiError::DatabaseUnavailable(other),
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<DefinitionError> for ApiError {
    fn from(error: DefinitionError) -> Self {
        match error {
            DefinitionError::NotFound { .. } => ApiError::NotFound(error.to_string()),
            DefinitionError::Conflict(message) => ApiError::Conflict(message),
            DefinitionError::Invalid(problems) => ApiError::Validation(problems),
            DefinitionError::Store(store) => store.into(),
            DefinitionError::Hashing(source) => ApiError::Internal(source),
        }
    }
}

impl From<TokenIssueError> for ApiError {
    fn from(error: TokenIssueError) -> Self {
        match error {
            // The request's listener field is what is wrong: a problem at its pointer.
            TokenIssueError::UnknownListener(_)
            | TokenIssueError::NotServer(_)
            | TokenIssueError::NotBehindTokenSentinel(_) => {
                ApiError::Validation(vec![Problem::new("/listener", error.to_string())])
            }
            TokenIssueError::SecretUnreadable(_) => ApiError::Conflict(error.to_string()),
        }
    }
}

impl From<LoginError> for ApiError {
    fn from(error: LoginError) -> Self {
        match error {
            LoginError::Throttled(seconds) => ApiError::TooManyRequests(seconds),
            LoginError::WrongCredentials => ApiError::Unauthorized,
            LoginError::Internal(source) => ApiError::Internal(source),
        }
    }
}

impl From<AccountError> for ApiError {
    fn from(error: AccountError) -> Self {
        match error {
            AccountError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            AccountError::Conflict(message) => ApiError::Conflict(message),
            AccountError::Invalid(problems) => ApiError::Validation(problems),
            AccountError::Forbidden(message) => ApiError::Forbidden(message),
            AccountError::Login(login) => login.into(),
            AccountError::Store(store) => store.into(),
            AccountError::Internal(source) => ApiError::Internal(source),
        }
    }
}

impl From<AuditQueryError> for ApiError {
    fn from(error: AuditQueryError) -> Self {
        match error {
            AuditQueryError::BadParameter(message) => ApiError::BadRequest(message),
            AuditQueryError::Store(store) => store.into(),
        }
    }
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::ConflictWith { code, .. } => code,
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Validation(_) => "validation_failed",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::TooManyRequests(_) => "too_many_requests",
            ApiError::DatabaseUnavailable(_) => "database_unavailable",
            ApiError::Internal(_) => "internal_error",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) | ApiError::ConflictWith { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::DatabaseUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        if let ApiError::Internal(source) = self {
            tracing::error!(error = ?source, "request failed");
        }
        let mut body =
            serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}});
        if let ApiError::Validation(problems) = self {
            body["error"]["details"] = serde_json::to_value(problems).unwrap_or_default();
        }
        let mut response = HttpResponse::build(self.status_code());
        if let ApiError::TooManyRequests(seconds) = self {
            response.insert_header(("Retry-After", seconds.to_string()));
        }
        if let ApiError::DatabaseUnavailable(source) = self {
            tracing::warn!(error = ?source, "request refused: the database is unavailable");
            response.insert_header(("Retry-After", "2"));
        }
        if matches!(self, ApiError::Unauthorized) {
            response.insert_header(("WWW-Authenticate", "Bearer realm=\"iotgate\""));
        }
        response.json(body)
    }
}

/// Parses a request body as JSON with a precise error (line and column) when it is not.
pub fn parse_json(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::MalformedJson(format!("the body is not valid JSON: {e}")))
}
