//! The control plane's one error type: a closed set of codes, each with
//! its HTTP status, serialized as `{"code", "message"}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// What went wrong, in words a script can match on. Closed: new kinds of
/// failure map onto one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum ErrorCode {
    /// The request is malformed: not JSON, wrong type, unknown field.
    InvalidRequest,
    /// No token, or a token Wharf does not know.
    Unauthorized,
    /// The token is known but its role does not allow this.
    AccessDenied,
    /// The named resource does not exist.
    NotFound,
    /// The request conflicts with the current state (exists already, in use).
    Conflict,
    /// Well-formed, but a field's value is not acceptable.
    InvalidParameter,
    /// Wharf failed; the detail is in the server's log.
    Internal,
    /// The server cannot answer now (another replica it needs is away);
    /// retrying shortly may succeed.
    Unavailable,
}

impl ErrorCode {
    /// The status code this error is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::AccessDenied => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::InvalidParameter => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// An error answer of the `/v1/` API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The kind of error.
    pub code: ErrorCode,
    /// What went wrong, for a person.
    pub message: String,
}

/// Result with the control plane's [`ApiError`].
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

impl ApiError {
    /// An error of `code` saying `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// `InvalidParameter` naming the field.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        ApiError::new(ErrorCode::InvalidParameter, format!("{field}: {message}"))
    }

    /// `NotFound` for `what`.
    pub fn not_found(what: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::NotFound, what)
    }

    /// `Conflict` saying why.
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Conflict, message)
    }

    /// A failure of Wharf itself: the detail is logged once here and the
    /// client is told only that it was internal.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(detail = %detail, "internal error");
        ApiError::new(ErrorCode::Internal, "internal error")
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        ApiError::internal(format_args!("state store: {error}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code.status(), Json(self)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_statuses() {
        let check = |code: ErrorCode, status: u16| assert_eq!(code.status().as_u16(), status);
        check(ErrorCode::InvalidRequest, 400);
        check(ErrorCode::Unauthorized, 401);
        check(ErrorCode::AccessDenied, 403);
        check(ErrorCode::NotFound, 404);
        check(ErrorCode::Conflict, 409);
        check(ErrorCode::InvalidParameter, 422);
        check(ErrorCode::Internal, 500);
    }

    #[test]
    fn serializes_as_code_and_message() {
        let json = serde_json::to_value(ApiError::invalid("limits.memory", "too large")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"code": "InvalidParameter", "message": "limits.memory: too large"})
        );
    }
}
