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

impl ApiError {
    /// `404 group_not_found`.
    pub fn group_not_found(stream: &str, group: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::GroupNotFound,
            format!(
                "stream {stream:?} has no consumer group {group:?}; create it with PUT \
                 /v1/streams/{{stream}}/groups/{{group}}"
            ),
        )
    }

    /// `400 invalid_group_name`.
    pub fn invalid_group_name(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidGroupName,
            message,
        )
    }

    /// `501 groups_unavailable`: the engine has no group store (yet).
    pub fn groups_unavailable(engine: &str) -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            ErrorCode::GroupsUnavailable,
            format!(
                "consumer groups are not available on the {engine} engine of this server yet; \
                 run spool serve with --engine memory or an engine that keeps groups \
                 (see docs/http-api.md, Consumer groups)"
            ),
        )
    }

    /// `503 group_busy`: commits kept conflicting with other writers.
    pub fn group_busy(tries: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::GroupBusy,
            format!(
                "the group changed under this request {tries} times in a row (other nodes are \
                 committing to it); nothing of this request was stored: retry"
            ),
        )
    }
}

impl From<crate::delivery::groups::GroupError> for ApiError {
    fn from(e: crate::delivery::groups::GroupError) -> Self {
        use crate::delivery::groups::GroupError as G;
        match e {
            G::NotFound { stream, group } => Self::group_not_found(stream.as_str(), group.as_str()),
            G::Config(e) => Self::bad_body(e.to_string()),
            G::Op(e) => Self::bad_body(e.to_string()),
            G::Reason(e) => Self::bad_body(format!("reason: {e}")),
            G::Reserved => Self::invalid_group_name(e.to_string()),
            G::Busy(tries) => Self::group_busy(tries),
            G::Snapshot(_) => {
                tracing::error!(error = %e, "a stored consumer group cannot be read");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Internal,
                    e.to_string(),
                )
            }
            G::Engine(e) => e.into(),
        }
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
