//! The JSON error contract: `{"error":{"code","message","field"?}}` with a 4xx status
//! for anything the client got wrong; causes of 5xx go to the log, never to the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::writer::WriteError;

/// An error answered to an API client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable, machine-readable code.
    pub code: &'static str,
    /// A sentence for the developer reading it. Never PHI.
    pub message: String,
    /// The request field at fault, when there is one.
    pub field: Option<String>,
    /// Seconds for the `Retry-After` header, when the client should retry later.
    pub retry_after: Option<u32>,
}

/// The `Retry-After` of a `storage_unavailable` answer, in seconds: about when the
/// writer's next probe write has been tried ([`crate::writer::PROBE_RETRY`]).
pub const STORAGE_RETRY_AFTER: u32 = 2;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code, e.g. `access_restricted`.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// The field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// Asks the client to retry after `seconds` (the `Retry-After` header).
    pub fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// Names the field at fault.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Replaces the code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }

    /// 422: a field's value is not acceptable.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message).field(field)
    }

    /// 404 `not_found`: unknown, deleted, or of another practice.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("No such {what}."),
        )
    }

    /// 409 with a code.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    /// 403 with a code.
    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// 401: no or unknown credential.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "A valid bearer token is required (Authorization: Bearer <token>).",
        )
    }

    /// 500: a fault of ours. The cause is logged here and not shown to the client.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "A request failed on the server side.");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "The server failed; see its log.",
        )
    }

    /// 503 `storage_unavailable` with `Retry-After`: the database cannot store or
    /// read now (a full disk, an I/O error, a lock held too long, no connection).
    /// Nothing was changed; the same request may be retried. The cause is logged.
    pub fn storage_unavailable(cause: &dyn std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "A request failed: the database is unavailable.");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            "The database cannot store or read data now; nothing was changed. Retry later.",
        )
        .retry_after(STORAGE_RETRY_AFTER)
    }

    /// 503 `storage_outcome_unknown` with `Retry-After`: the connection to the
    /// database broke during the commit, so the change may or may not be stored.
    pub fn storage_outcome_unknown(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "A request's commit broke off; its outcome is unknown.");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_outcome_unknown",
            "The database connection broke during the commit: the change may or may not be \
             stored. Retry with the same client_txn_id, or read it back.",
        )
        .retry_after(STORAGE_RETRY_AFTER)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                field: self.field,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(err: sea_orm::DbErr) -> Self {
        if crate::db::fault(&err).is_some() {
            Self::storage_unavailable(&err)
        } else {
            Self::internal(&err)
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(err: WriteError) -> Self {
        match err {
            WriteError::Closed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "The daemon is shutting down; try again.",
            ),
            WriteError::Unavailable(_) => Self::storage_unavailable(&err),
            WriteError::OutcomeUnknown(_) => Self::storage_outcome_unknown(&err),
            other => Self::internal(&other),
        }
    }
}

/// The result of a handler.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_faults_answer_503_with_retry_after_never_500() {
        for (err, code) in [
            (
                WriteError::Unavailable("disk full".into()),
                "storage_unavailable",
            ),
            (
                WriteError::OutcomeUnknown("connection reset".into()),
                "storage_outcome_unknown",
            ),
        ] {
            let response = ApiError::from(err).into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                response.headers().get(header::RETRY_AFTER),
                Some(&HeaderValue::from(STORAGE_RETRY_AFTER)),
                "{code}"
            );
        }
        let busy = sea_orm::DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::Timeout);
        assert_eq!(ApiError::from(busy).code, "storage_unavailable");
        let bug = ApiError::from(WriteError::Database("syntax error".into()));
        assert_eq!(
            (bug.status, bug.code),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
    }
}
