//! The OCI Distribution error codes — a closed set, as the spec lists them —
//! and the one error type of the HTTP surface, serialized as
//! `{"errors":[{"code","message","detail"}]}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The spec's error codes; no others are ever sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Blob upload invalid.
    BlobUploadInvalid,
    /// Blob upload unknown to registry.
    BlobUploadUnknown,
    /// Provided digest did not match uploaded content.
    DigestInvalid,
    /// Manifest references a manifest or blob unknown to registry.
    ManifestBlobUnknown,
    /// Manifest invalid.
    ManifestInvalid,
    /// Manifest unknown to registry.
    ManifestUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Repository name not known to registry.
    NameUnknown,
    /// Provided length did not match content length.
    SizeInvalid,
    /// Authentication required.
    Unauthorized,
    /// Requested access to the resource is denied.
    Denied,
    /// The operation is unsupported.
    Unsupported,
    /// Too many requests.
    TooManyRequests,
}

impl ErrorCode {
    /// The code as the spec spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => StatusCode::NOT_FOUND,
            ErrorCode::BlobUploadInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

/// An error answered to a registry client.
#[derive(Debug)]
pub enum RegistryError {
    /// A client-visible error with a spec code.
    Client {
        /// The spec code.
        code: ErrorCode,
        /// What went wrong, for a person.
        message: String,
        /// A status other than the code's usual one (416, 409, 413, ...).
        status: Option<StatusCode>,
    },
    /// Our fault: logged once, answered as "internal error".
    Internal(String),
}

impl RegistryError {
    /// A client error with the code's usual status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RegistryError::Client {
            code,
            message: message.into(),
            status: None,
        }
    }

    /// A client error with a specific status.
    pub fn with_status(code: ErrorCode, status: StatusCode, message: impl Into<String>) -> Self {
        RegistryError::Client {
            code,
            message: message.into(),
            status: Some(status),
        }
    }

    /// The spec code, if a client error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RegistryError::Client { code, .. } => Some(*code),
            RegistryError::Internal(_) => None,
        }
    }
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Client { code, message, .. } => {
                write!(f, "{}: {message}", code.as_str())
            }
            RegistryError::Internal(message) => write!(f, "internal error: {message}"),
        }
    }
}

impl std::error::Error for RegistryError {}

impl From<std::io::Error> for RegistryError {
    fn from(e: std::io::Error) -> Self {
        RegistryError::Internal(format!("storage: {e}"))
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            RegistryError::Client {
                code,
                message,
                status,
            } => (status.unwrap_or(code.status()), code, message),
            RegistryError::Internal(detail) => {
                tracing::error!(%detail, "registry internal error");
                // The spec has no code for server faults; UNSUPPORTED is the
                // least wrong and the status says what happened.
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Unsupported,
                    "internal error".to_owned(),
                )
            }
        };
        let body = serde_json::json!({
            "errors": [{ "code": code.as_str(), "message": message, "detail": null }]
        });
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"wharf\", charset=\"UTF-8\""),
            );
        }
        response
    }
}

/// Result of the registry's operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
