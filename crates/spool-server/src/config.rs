//! The server's settings, as resolved by the binary from flags, environment and file.

use std::time::Duration;

/// Settings of the HTTP server (the engine has its own).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest payload of one message, in bytes.
    pub max_payload: usize,
    /// Most messages in one `POST /v1/publish`.
    pub max_batch_messages: usize,
    /// Largest `POST /v1/publish` body, in bytes.
    pub max_batch_bytes: usize,
    /// Interval of SSE heartbeat comments.
    pub heartbeat: Duration,
    /// Longest `wait` a long-poll may ask for.
    pub max_poll_wait: Duration,
    /// Most messages one long-poll answer or SSE read carries.
    pub max_read_limit: usize,
    /// Most streams on one multi-stream SSE connection.
    pub max_streams_per_connection: usize,
    /// Origins allowed by CORS; `*` allows any.
    pub cors_origins: Vec<String>,
    pub auth: AuthConfig,
}

/// Who may do what.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// Keys that may publish and read everything (`Authorization: Bearer KEY`).
    pub api_keys: Vec<String>,
    /// Secret for HS256 client tokens.
    pub jwt_secret: Option<String>,
    /// Development only: requests without credentials may do everything.
    pub allow_anonymous: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_payload: 1024 * 1024,
            max_batch_messages: 10_000,
            max_batch_bytes: 16 * 1024 * 1024,
            heartbeat: Duration::from_secs(15),
            max_poll_wait: Duration::from_secs(60),
            max_read_limit: 1000,
            max_streams_per_connection: 100,
            cors_origins: Vec::new(),
            auth: AuthConfig::default(),
        }
    }
}
