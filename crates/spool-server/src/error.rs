//! API errors: a status, a stable code and a message saying what to do, rendered as
//! `{"error":{"code","message"}}` (see `spool_protocol::error`).

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use spool_core::{InvalidPosition, InvalidStreamName};
use spool_engine::EngineError;
use spool_protocol::{ErrorBody, ErrorCode};

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_param(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidParameter,
            message,
        )
    }

    pub fn bad_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidBody, message)
    }

    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            message,
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    pub fn invalid_position(what: &str, e: InvalidPosition) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidPosition,
            format!("{what}: {e}; or one of \"oldest\", \"latest\", \"now\""),
        )
    }

    pub fn invalid_name(name: &str, e: InvalidStreamName) -> Self {
        let shown: String = name.chars().take(64).collect();
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidStreamName,
            format!("invalid stream name {shown:?}: {e}"),
        )
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let (status, code) = match &e {
            EngineError::Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::EngineUnavailable,
            ),
            EngineError::Limit(_) => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::LimitReached),
            EngineError::StreamLimit(_) => {
                (StatusCode::INSUFFICIENT_STORAGE, ErrorCode::StreamLimit)
            }
            EngineError::Internal { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal)
            }
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "engine failure");
        }
        Self::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, Json(ErrorBody::new(self.code, self.message))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
