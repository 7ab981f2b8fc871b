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
    /// Most bytes of messages (payload, headers, key) one long-poll answer or SSE read
    /// carries; one message larger than this still goes alone.
    pub max_read_bytes: usize,
    /// Most streams on one multi-stream SSE connection.
    pub max_streams_per_connection: usize,
    /// Most new streams one identity may create per minute (`budget.rs`); 0: no budget.
    pub max_new_streams_per_minute: u32,
    /// Origins allowed by CORS and on the WebSocket upgrade; `*` allows any.
    pub cors_origins: Vec<String>,
    pub auth: AuthConfig,
    pub ws: WsConfig,
    pub http: HttpConfig,
    /// The AnyCable-compatible endpoint (`/cable`, `/_broadcast`).
    pub anycable: crate::ws::actioncable::AnycableConfig,
    /// Most consumer groups whose live state this server caches (`--max-groups`, the same
    /// bound the engine keeps on stored groups); idle ones are evicted past it.
    pub max_groups: usize,
    /// Most bytes of messages all consumer groups' read-aheads of this server keep together
    /// (`--group-read-ahead`; `delivery/groups.rs`); 0: no read-ahead.
    pub group_read_ahead: usize,
    /// The clock consumer-group leases are decided by: the system clock, or a test's
    /// `ManualClock`.
    pub clock: spool_core::Clock,
    /// Cancelled when shutdown begins (SIGTERM): `/readyz` answers `503 draining` from then
    /// on while everything else still works, until the shutdown token closes the listener.
    pub draining: tokio_util::sync::CancellationToken,
}

/// What one TCP connection and one request may hold (see `listener.rs`).
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// Most open connections (HTTP, SSE and WebSocket together); more are refused with `503`.
    pub max_connections: usize,
    /// Most open connections from one client address; 0: no per-address bound.
    pub max_connections_per_ip: usize,
    /// Longest wait for a request head (also the keep-alive wait for the next request).
    pub header_timeout: Duration,
    /// A connection that moves no byte while no request is answered is closed after this.
    pub idle_timeout: Duration,
    /// Longest time to receive a publish body once its head was accepted (`408` after).
    pub body_timeout: Duration,
    /// Serve HTTPS with this certificate and key (`tls.rs`; reloaded on SIGHUP); `None`:
    /// plain HTTP.
    pub tls: Option<std::sync::Arc<crate::tls::Tls>>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_connections: 25_000,
            max_connections_per_ip: 0,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            body_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Settings of the WebSocket protocol (`/v1/ws`).
#[derive(Clone, Debug)]
pub struct WsConfig {
    /// How long a session outlives its connection.
    pub session_ttl: Duration,
    /// The server pings a quiet connection this often.
    pub ping_interval: Duration,
    /// A connection that sends nothing (not even a pong) for this long after a ping is closed.
    pub ping_timeout: Duration,
    /// How long a new connection has to send `connect`.
    pub connect_timeout: Duration,
    /// Most frames waiting to be written to one connection.
    pub outbound_messages: usize,
    /// Most bytes waiting to be written to one connection.
    pub outbound_bytes: usize,
    /// A connection whose outbound buffer makes no progress for this long is closed
    /// (`slow_consumer`); until then it is caught up from history.
    pub stuck_timeout: Duration,
    /// Streams whose slow subscribers get only the newest message per `key`.
    pub conflate: Vec<spool_core::Pattern>,
    /// Most publishes of one connection waiting for their ack.
    pub max_inflight_publishes: usize,
    /// Most bytes of publishes of one connection waiting for their ack; at the bound the
    /// connection stops reading client frames until acks drain.
    pub max_inflight_publish_bytes: usize,
    /// Socket read buffer of the WebSocket codec, per connection: allocated at the upgrade and
    /// kept for the connection's life (tungstenite has no way to release it), zeroed before
    /// every read, and the most one `recv` takes (a larger frame is read in as many).
    pub read_buffer: usize,
    /// Socket write buffer of the WebSocket codec, per connection.
    pub write_buffer: usize,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(300),
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            outbound_messages: 1024,
            outbound_bytes: 1024 * 1024,
            stuck_timeout: Duration::from_secs(60),
            conflate: Vec::new(),
            max_inflight_publishes: 1024,
            max_inflight_publish_bytes: 16 * 1024 * 1024,
            // 1 KiB: an idle connection holds ~3 KiB less than with 4 KiB, and a publish costs
            // fewer instructions (less zeroing per read; docs/benchmarks.md, issue 14).
            read_buffer: 1024,
            write_buffer: 4 * 1024,
        }
    }
}

/// Who may do what.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// Keys that may publish and read everything (`Authorization: Bearer KEY`).
    pub api_keys: Vec<String>,
    /// Secret for HS256 client tokens.
    pub jwt_secret: Option<String>,
    /// Public keys (PEM) for RS256 / ES256 client tokens; the key type picks the algorithm.
    pub jwt_public_keys: Vec<String>,
    /// When set, tokens must carry this `iss`.
    pub jwt_issuer: Option<String>,
    /// When set, tokens must list this `aud`.
    pub jwt_audience: Option<String>,
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
            max_read_bytes: 1024 * 1024,
            max_streams_per_connection: 100,
            max_new_streams_per_minute: 1000,
            cors_origins: Vec::new(),
            auth: AuthConfig::default(),
            ws: WsConfig::default(),
            http: HttpConfig::default(),
            anycable: Default::default(),
            max_groups: spool_engine::groups::MAX_GROUPS,
            group_read_ahead: crate::delivery::groups::DEFAULT_READ_AHEAD_BYTES,
            clock: spool_core::Clock::system(),
            draining: tokio_util::sync::CancellationToken::new(),
        }
    }
}
