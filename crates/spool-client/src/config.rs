//! How to reach the server and how patient to be.

use std::time::Duration;

/// Client settings: built with [`Config::new`] and its chained setters.
///
/// ```
/// use std::time::Duration;
/// let config = spool_client::Config::new("ws://127.0.0.1:7070/v1/ws")
///     .token("my-api-key")
///     .backoff(Duration::from_millis(50), Duration::from_secs(5))
///     .event_capacity(256);
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) url: String,
    pub(crate) token: Option<String>,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) event_capacity: usize,
    pub(crate) command_capacity: usize,
    pub(crate) max_pending_publishes: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) tls: Option<crate::Tls>,
}

impl Config {
    /// Settings for the server at `url`, e.g. `ws://127.0.0.1:7070/v1/ws` (or `wss://`), with defaults:
    /// no token, backoff 100 ms to 10 s, 1,024 buffered events, 1,024 unacknowledged
    /// publishes, 10 s to connect.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            token: None,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            event_capacity: 1024,
            command_capacity: 64,
            max_pending_publishes: 1024,
            connect_timeout: Duration::from_secs(10),
            tls: None,
        }
    }

    /// The API key or JWT sent in `connect`. Replace it later with
    /// [`Client::refresh`](crate::Client::refresh).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Reconnect delays: attempt `n` waits a random time up to `min(max, min × 2ⁿ)`.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// How many events wait for [`Client::next_event`](crate::Client::next_event) (at
    /// least 1). When they are all unread the client stops reading the socket, so the
    /// server's flow control applies instead of memory growing.
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// How many publishes may await their ack (at least 1); further `publish` calls wait
    /// for room.
    pub fn max_pending_publishes(mut self, max: usize) -> Self {
        self.max_pending_publishes = max.max(1);
        self
    }

    /// Whom a `wss://` connection trusts (default: the system's certificate store, read at
    /// the first connection).
    pub fn tls(mut self, tls: crate::Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How long opening the socket and the `connect`/`connected` exchange may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}
