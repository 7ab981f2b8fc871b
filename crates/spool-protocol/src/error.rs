//! The error body every failed HTTP request carries: `{"error":{"code","message"}}`.
//!
//! `code` is stable and machine-readable; `message` says what was wrong and what to do.

use serde::{Deserialize, Serialize};

/// Stable error codes. Clients match on these, so existing ones never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The stream name is not valid (400).
    InvalidStreamName,
    /// A position (`after`, `Last-Event-ID`) could not be parsed (400).
    InvalidPosition,
    /// A query parameter or header is malformed (400).
    InvalidParameter,
    /// The request body is not the JSON the endpoint expects (400).
    InvalidBody,
    /// The payload (or the whole request) is larger than allowed (413).
    PayloadTooLarge,
    /// No credentials were given (401).
    Unauthorized,
    /// The credentials are invalid or expired (401).
    InvalidToken,
    /// The credentials are valid but do not allow this (403).
    Forbidden,
    /// The stream or route does not exist (404).
    NotFound,
    /// The method is not allowed on this route (405).
    MethodNotAllowed,
    /// The engine cannot serve requests right now; retry later (503).
    EngineUnavailable,
    /// A server limit was hit (e.g. too many streams or connections) (503).
    LimitReached,
    /// The server is shutting down; retry on another node or later (503).
    ShuttingDown,
    /// A bug or corrupted data; the message has details (500).
    Internal,
    /// WebSocket: a frame that is not valid JSON or not a known frame of the protocol.
    BadFrame,
    /// WebSocket: a frame that needs a `connect` first, or a second `connect`.
    NotConnected,
    /// WebSocket: the session id given is unknown, expired, or belongs to another identity.
    SessionNotRestored,
    /// WebSocket: the connection's token expired; the connection closes.
    TokenExpired,
    /// WebSocket: the client stayed behind too long; the connection closes.
    SlowConsumer,
    /// WebSocket: no frame from the client in time; the connection closes.
    PingTimeout,
    /// An `Origin` not in the allowed list (403).
    OriginNotAllowed,
    /// The caller created more new streams than its budget allows
    /// (`--max-new-streams-per-minute`); nothing was published (429).
    StreamBudgetExceeded,
    /// The engine holds its maximum of streams (`--max-streams`): new streams cannot be
    /// created, existing ones work (507).
    StreamLimit,
    /// The request body did not arrive in time (408).
    RequestTimeout,
    /// The connection limit was reached; the connection is closed (503).
    TooManyConnections,
    /// The consumer group does not exist on that stream (404).
    GroupNotFound,
    /// A consumer group name is not valid, or is reserved (400).
    InvalidGroupName,
    /// This server's engine keeps no consumer groups yet (501).
    GroupsUnavailable,
    /// Other nodes kept changing the group while this request tried to; retry (503).
    GroupBusy,
    /// This server's engine cannot do what was asked (stream administration) (501).
    NotSupported,
    /// A plain-HTTP request on a port that speaks HTTPS (`--tls-cert`); the connection is
    /// closed (400).
    TlsRequired,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidStreamName => "invalid_stream_name",
            ErrorCode::InvalidPosition => "invalid_position",
            ErrorCode::InvalidParameter => "invalid_parameter",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::EngineUnavailable => "engine_unavailable",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::NotConnected => "not_connected",
            ErrorCode::SessionNotRestored => "session_not_restored",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::PingTimeout => "ping_timeout",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::StreamBudgetExceeded => "stream_budget_exceeded",
            ErrorCode::StreamLimit => "stream_limit",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::GroupNotFound => "group_not_found",
            ErrorCode::InvalidGroupName => "invalid_group_name",
            ErrorCode::GroupsUnavailable => "groups_unavailable",
            ErrorCode::GroupBusy => "group_busy",
            ErrorCode::NotSupported => "not_supported",
            ErrorCode::TlsRequired => "tls_required",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code,
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_stable_names() {
        for code in [
            ErrorCode::InvalidStreamName,
            ErrorCode::PayloadTooLarge,
            ErrorCode::EngineUnavailable,
            ErrorCode::Internal,
            ErrorCode::SessionNotRestored,
            ErrorCode::OriginNotAllowed,
            ErrorCode::GroupNotFound,
            ErrorCode::InvalidGroupName,
            ErrorCode::GroupsUnavailable,
            ErrorCode::GroupBusy,
            ErrorCode::TlsRequired,
        ] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
