//! What can go wrong, as one enum the application matches on.

use spool_protocol::ErrorCode;

/// An error from the client or the server.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered a request (or the connection) with an `error` frame. `code` is
    /// stable: match on it.
    #[error("the server answered {code}: {message}", code = code.as_str())]
    Server { code: ErrorCode, message: String },
    /// The server closed the connection with `code` (`spool_protocol::ws::close`). Terminal
    /// when reconnecting would not help: e.g. 4001, bad credentials; 4007, the session was
    /// taken over by another connection.
    #[error("the server closed the connection with code {code} ({reason})")]
    Closed { code: u16, reason: String },
    /// The connection broke (a transport error, or the server went silent).
    #[error("the connection was lost: {0}")]
    ConnectionLost(String),
    /// The server could not be reached, or the WebSocket handshake failed.
    #[error("could not connect to the server: {0}")]
    Connect(String),
    /// The server did not answer `connect` in time.
    #[error("the server did not answer in time")]
    Timeout,
    /// The server sent something this client does not understand.
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    /// The URL is not a `ws://` URL the client can use.
    #[error("invalid server URL: {0}")]
    InvalidUrl(String),
    /// A stream name the server would refuse.
    #[error("invalid stream name {0:?}")]
    InvalidStreamName(String),
    /// `subscribe` to a stream this client is already subscribed to.
    #[error("already subscribed to {0:?}; unsubscribe first to start elsewhere")]
    AlreadySubscribed(String),
    /// The client was closed (by [`Client::close`](crate::Client::close) or a terminal
    /// error) before the request was answered.
    #[error("the client is closed")]
    ClientClosed,
}

impl Error {
    /// The server's error code, when the server sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn server(code: ErrorCode, message: impl Into<String>) -> Self {
        Error::Server {
            code,
            message: message.into(),
        }
    }
}
