//! `spool serve` configuration: flags > `SPOOL_*` environment > TOML file > defaults.
//!
//! Every setting is one field of [`Settings`], which is both the clap arguments (flag and
//! `SPOOL_*` variable) and the TOML file (key): clap reads flags and environment into it (unset
//! stays `None`), the file is read into another, [`Layer::or`] lets the file fill what is
//! still unset, and [`resolve`] validates and applies the defaults; [`Resolved`] is the
//! outcome. docs/configuration.md lists every setting; a test checks that each flag has its
//! variable, its key and its row there.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;
use spool_core::{
    Retention, RetentionPolicy, RetentionRule,
    retention::{de_opt_bytes, de_opt_duration, parse_bytes, parse_duration},
};
use spool_disk::Durability;
use spool_nats::NatsDurability;
use spool_redis::RedisDurability;
use spool_server::{
    ServerConfig,
    auth::{AuthConfigError, Authenticator},
    config::{AuthConfig, HttpConfig, WsConfig},
};

/// The AnyCable endpoint's settings (`--anycable-*`).
fn anycable(s: &Settings) -> anyhow::Result<spool_server::ws::actioncable::AnycableConfig> {
    let defaults = spool_server::ws::actioncable::AnycableConfig::default();
    let path = s.anycable_path.clone().unwrap_or(defaults.path);
    if !path.starts_with('/') || path.len() < 2 || path.starts_with("/v1/") || path.contains('{') {
        bail!("--anycable-path must be a path of its own such as /cable, got {path:?}");
    }
    let config = spool_server::ws::actioncable::AnycableConfig {
        path,
        secret: non_empty("AnyCable secret", s.anycable_secret.clone())?,
        streams_secret: non_empty("AnyCable streams secret", s.anycable_streams_secret.clone())?,
        jwt_secret: non_empty("AnyCable JWT secret", s.anycable_jwt_secret.clone())?,
        jwt_param: s.anycable_jwt_param.clone().unwrap_or(defaults.jwt_param),
        enforce_jwt: s.anycable_enforce_jwt,
        public_streams: s.anycable_public_streams,
        broadcast_key: non_empty("AnyCable broadcast key", s.anycable_broadcast_key.clone())?,
        ping_interval: positive(
            "AnyCable ping interval (--anycable-ping-interval / anycable_ping_interval)",
            s.anycable_ping_interval,
            defaults.ping_interval,
        )?,
        whisper: s.anycable_whisper,
        whisper_limits: spool_server::delivery::transient::TransientLimits {
            inbox: at_least_one(
                "AnyCable whisper buffer (--anycable-whisper-buffer / anycable_whisper_buffer)",
                s.anycable_whisper_buffer,
                defaults.whisper_limits.inbox,
            )?,
            max_bytes: match s.anycable_whisper_max_bytes {
                None => defaults.whisper_limits.max_bytes,
                Some(0) => bail!("--anycable-whisper-max-bytes must be at least 1 byte"),
                Some(n) => usize::try_from(n)?,
            },
        },
        pong_timeout: match s.anycable_pong_timeout {
            None => None,
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
        },
    };
    if config.enforce_jwt && config.jwt_secret().is_none() {
        bail!("--anycable-enforce-jwt needs --anycable-jwt-secret or --anycable-secret");
    }
    Ok(config)
}

/// One layer of settings over another: what `self` sets wins, `lower` fills the rest.
pub trait Layer {
    fn or(self, lower: Self) -> Self;
}

impl<T> Layer for Option<T> {
    fn or(self, lower: Self) -> Self {
        Option::or(self, lower)
    }
}

/// A repeatable flag's list replaces the file's list whole.
impl<T> Layer for Vec<T> {
    fn or(self, lower: Self) -> Self {
        if self.is_empty() { lower } else { self }
    }
}

/// A switch (`--allow-anonymous`): on in either layer is on.
impl Layer for bool {
    fn or(self, lower: Self) -> Self {
        self || lower
    }
}

/// Declares a settings struct as written and implements [`Layer`] for it, field by field, so
/// a new setting is one new field.
macro_rules! layered {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_attr:meta])*
                pub $field:ident: $ty:ty,
            )*
        }
    ) => {
        $(#[$attr])*
        pub struct $name {
            $(
                $(#[$field_attr])*
                pub $field: $ty,
            )*
        }

        impl Layer for $name {
            fn or(self, lower: Self) -> Self {
                Self {
                    $($field: Layer::or(self.$field, lower.$field),)*
                }
            }
        }
    };
}

layered! {
    /// Every setting of `spool serve`: its flag and `SPOOL_*` variable (clap) and its TOML key
    /// (serde; every key is optional, unknown keys are an error). See docs/configuration.md.
    #[derive(Args, Clone, Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct Settings {
        /// Address to listen on.
        #[arg(long, env = "SPOOL_LISTEN", value_name = "ADDR")]
        pub listen: Option<SocketAddr>,
        /// PEM certificate chain to serve HTTPS and WSS with, the server's certificate first
        /// (needs --tls-key; read again on SIGHUP). Default: plain HTTP.
        #[arg(long, env = "SPOOL_TLS_CERT", value_name = "FILE")]
        pub tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert (PKCS#8, RSA or EC; read again on SIGHUP).
        #[arg(long, env = "SPOOL_TLS_KEY", value_name = "FILE")]
        pub tls_key: Option<PathBuf>,
        /// Storage engine: disk (durable, the default), memory, redis or nats (cluster engines:
        /// several nodes sharing one Redis or NATS JetStream).
        #[arg(long, env = "SPOOL_ENGINE")]
        pub engine: Option<String>,
        /// Data directory of the disk engine (default ./spool-data).
        #[arg(long, env = "SPOOL_DATA_DIR", value_name = "DIR")]
        pub data_dir: Option<PathBuf>,
        /// When a publish is acked: fsync (on disk; the disk engine's default), memory (written
        /// to the OS / Redis' memory; the redis engine's default) or replicated (acknowledged by
        /// the cluster engine's replicas; the nats engine's default). See docs/operations.md.
        #[arg(long, env = "SPOOL_DURABILITY")]
        pub durability: Option<String>,
        /// Redis to use with --engine redis (default redis://127.0.0.1:6379).
        #[arg(
            long,
            env = "SPOOL_REDIS_URL",
            value_name = "URL",
            hide_env_values = true
        )]
        pub redis_url: Option<String>,
        /// Prefix of every Redis key this cluster uses (default spool).
        #[arg(long, env = "SPOOL_REDIS_PREFIX", value_name = "PREFIX")]
        pub redis_prefix: Option<String>,
        /// Replicas that must acknowledge a publish with --durability replicated (default 1).
        #[arg(long, env = "SPOOL_REDIS_REPLICAS", value_name = "N")]
        pub redis_replicas: Option<u32>,
        /// NATS server(s) to use with --engine nats (default nats://127.0.0.1:4222; comma-separated for several).
        #[arg(
            long,
            env = "SPOOL_NATS_URL",
            value_name = "URL",
            hide_env_values = true
        )]
        pub nats_url: Option<String>,
        /// Prefix of every JetStream stream, subject and bucket this cluster uses (default spool).
        #[arg(long, env = "SPOOL_NATS_PREFIX", value_name = "PREFIX")]
        pub nats_prefix: Option<String>,
        /// Copies JetStream keeps of each stream, 1 to 5 (default 1; 3 for a quorum that survives a server).
        #[arg(long, env = "SPOOL_NATS_REPLICAS", value_name = "N")]
        pub nats_replicas: Option<usize>,
        /// Longest wait for one call to Redis or NATS before the request fails with 503 (default 2s).
        #[arg(long, env = "SPOOL_ENGINE_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub engine_timeout: Option<Duration>,
        /// Size at which the disk engine starts a new WAL segment (default 64MiB).
        #[arg(long, env = "SPOOL_SEGMENT_SIZE", value_name = "BYTES", value_parser = parse_bytes)]
        #[serde(deserialize_with = "de_opt_bytes")]
        pub segment_size: Option<u64>,
        /// Most bytes the disk engine keeps of the newest messages of all streams in memory;
        /// older history is read from the WAL segments (default 64MiB).
        #[arg(long, env = "SPOOL_CACHE_SIZE", value_name = "BYTES", value_parser = parse_bytes)]
        #[serde(deserialize_with = "de_opt_bytes")]
        pub cache_size: Option<u64>,
        /// `--history-*` flags; `[retention]` table of the file.
        #[command(flatten)]
        pub retention: RetentionSettings,
        /// Largest payload of one message (default 1MiB).
        #[arg(long, env = "SPOOL_MAX_PAYLOAD", value_name = "BYTES", value_parser = parse_bytes)]
        #[serde(deserialize_with = "de_opt_bytes")]
        pub max_payload: Option<u64>,
        /// API key for server-side publishing and reading (repeatable; env: comma-separated).
        #[arg(
            long,
            env = "SPOOL_API_KEY",
            value_name = "KEY",
            value_delimiter = ',',
            hide_env_values = true
        )]
        #[serde(rename = "api_keys")]
        pub api_key: Vec<String>,
        /// Secret for HS256 client tokens.
        #[arg(
            long,
            env = "SPOOL_JWT_SECRET",
            value_name = "SECRET",
            hide_env_values = true
        )]
        pub jwt_secret: Option<String>,
        /// PEM file of an RSA or EC P-256 public key for RS256 / ES256 client tokens (repeatable;
        /// env: comma-separated paths).
        #[arg(
            long,
            env = "SPOOL_JWT_PUBLIC_KEY",
            value_name = "PATH",
            value_delimiter = ','
        )]
        #[serde(rename = "jwt_public_keys")]
        pub jwt_public_key: Vec<PathBuf>,
        /// When set, client tokens must carry this `iss`.
        #[arg(long, env = "SPOOL_JWT_ISSUER", value_name = "ISS")]
        pub jwt_issuer: Option<String>,
        /// When set, client tokens must list this `aud`.
        #[arg(long, env = "SPOOL_JWT_AUDIENCE", value_name = "AUD")]
        pub jwt_audience: Option<String>,
        /// DEVELOPMENT ONLY: let requests without credentials publish and read everything.
        #[arg(long, env = "SPOOL_ALLOW_ANONYMOUS")]
        pub allow_anonymous: bool,
        /// Origin allowed to call the API from a browser (repeatable, or `*`; env: comma-separated).
        #[arg(
            long,
            env = "SPOOL_CORS_ORIGIN",
            value_name = "ORIGIN",
            value_delimiter = ','
        )]
        #[serde(rename = "cors_origins")]
        pub cors_origin: Vec<String>,
        /// How long an idempotency key is remembered (default 2m).
        #[arg(long, env = "SPOOL_DEDUP_WINDOW", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub dedup_window: Option<Duration>,
        /// Interval of SSE heartbeat comments (default 15s).
        #[arg(long, env = "SPOOL_HEARTBEAT", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub heartbeat: Option<Duration>,
        /// How long a WebSocket session outlives its connection (default 5m).
        #[arg(long, env = "SPOOL_SESSION_TTL", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub session_ttl: Option<Duration>,
        /// The server pings a quiet WebSocket connection this often (default 25s).
        #[arg(long, env = "SPOOL_WS_PING_INTERVAL", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub ws_ping_interval: Option<Duration>,
        /// A WebSocket connection silent this long after a ping is closed (default 20s).
        #[arg(long, env = "SPOOL_WS_PING_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub ws_ping_timeout: Option<Duration>,
        /// Most frames waiting to be written to one WebSocket connection (default 1024).
        #[arg(long, env = "SPOOL_WS_OUTBOUND_MESSAGES", value_name = "N")]
        pub ws_outbound_messages: Option<usize>,
        /// Most bytes waiting to be written to one WebSocket connection (default 1MiB).
        #[arg(long, env = "SPOOL_WS_OUTBOUND_BYTES", value_name = "BYTES", value_parser = parse_bytes)]
        #[serde(deserialize_with = "de_opt_bytes")]
        pub ws_outbound_bytes: Option<u64>,
        /// A connection whose outbound buffer makes no progress this long is closed (default 60s).
        #[arg(long, env = "SPOOL_STUCK_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub stuck_timeout: Option<Duration>,
        /// Streams whose slow subscribers get only the newest message per key (repeatable;
        /// env: comma-separated).
        #[arg(
            long,
            env = "SPOOL_CONFLATE",
            value_name = "PATTERN",
            value_delimiter = ','
        )]
        pub conflate: Vec<String>,
        /// Most publishes of one WebSocket connection waiting for their ack (default 1024).
        #[arg(long, env = "SPOOL_WS_MAX_INFLIGHT_PUBLISHES", value_name = "N")]
        pub ws_max_inflight_publishes: Option<usize>,
        /// Most bytes of publishes of one WebSocket connection waiting for their ack; at the bound
        /// the connection stops reading until acks drain (default 16MiB).
        #[arg(long, env = "SPOOL_WS_MAX_INFLIGHT_PUBLISH_BYTES", value_name = "BYTES", value_parser = parse_bytes)]
        #[serde(deserialize_with = "de_opt_bytes")]
        pub ws_max_inflight_publish_bytes: Option<u64>,
        /// Most bytes of messages in one long-poll answer or SSE batch (default 1MiB).
        #[arg(long, env = "SPOOL_MAX_READ_BYTES", value_name = "BYTES", value_parser = parse_bytes)]
        #[serde(deserialize_with = "de_opt_bytes")]
        pub max_read_bytes: Option<u64>,
        /// Most open connections in all: HTTP, SSE and WebSocket (default 25000).
        #[arg(long, env = "SPOOL_MAX_CONNECTIONS", value_name = "N")]
        pub max_connections: Option<usize>,
        /// Most open connections from one client address; 0 for no bound (default 0).
        #[arg(long, env = "SPOOL_MAX_CONNECTIONS_PER_IP", value_name = "N")]
        pub max_connections_per_ip: Option<usize>,
        /// Longest wait for a request's headers, and for the next request on a kept-alive
        /// connection (default 10s).
        #[arg(long, env = "SPOOL_HEADER_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub header_timeout: Option<Duration>,
        /// A connection that moves no byte while no request is answered is closed (default 2m).
        #[arg(long, env = "SPOOL_IDLE_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub idle_timeout: Option<Duration>,
        /// Longest time to receive a publish body (default 30s).
        #[arg(long, env = "SPOOL_BODY_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub body_timeout: Option<Duration>,
        /// Most streams the memory and disk engines create; past it, publishes that would create
        /// a stream get 507 stream_limit and existing streams work on (default 1000000).
        #[arg(long, env = "SPOOL_MAX_STREAMS", value_name = "N")]
        pub max_streams: Option<usize>,
        /// Most streams readers may wait on before anything is published to them, held in
        /// memory only (default 100000).
        #[arg(long, env = "SPOOL_MAX_UNPUBLISHED_STREAMS", value_name = "N")]
        pub max_unpublished_streams: Option<usize>,
        /// Most idempotency keys the memory and disk engines remember across all streams; past
        /// it the oldest are forgotten before their dedup window ends (default 1000000).
        #[arg(long, env = "SPOOL_MAX_IDEMPOTENCY_KEYS", value_name = "N")]
        pub max_idempotency_keys: Option<usize>,
        /// Most WebSocket sessions the memory and disk engines keep; past it new sessions are not
        /// saved, stored ones still are (default 1000000).
        #[arg(long, env = "SPOOL_MAX_SESSIONS", value_name = "N")]
        pub max_sessions: Option<usize>,
        /// Most consumer groups the engine keeps; past it creating a group gets 503 limit_reached,
        /// existing groups work on. Also the most groups whose live state a node caches
        /// (default 10000).
        #[arg(long, env = "SPOOL_MAX_GROUPS", value_name = "N")]
        pub max_groups: Option<usize>,
        /// Most bytes of messages the consumer groups' read-aheads keep together on this node
        /// (each group's at most --max-read-bytes and 256 messages); 0 turns read-ahead off
        /// (default 32MiB).
        #[arg(long, env = "SPOOL_GROUP_READ_AHEAD", value_name = "BYTES", value_parser = parse_bytes)]
        #[serde(deserialize_with = "de_opt_bytes")]
        pub group_read_ahead: Option<u64>,
        /// Most new streams one identity (token sub, API key, anonymous client IP) may create per
        /// minute; 0 for no budget (default 1000).
        #[arg(long, env = "SPOOL_MAX_NEW_STREAMS_PER_MINUTE", value_name = "N")]
        pub max_new_streams_per_minute: Option<u32>,
        /// Longest wait for open requests on shutdown (default 10s).
        #[arg(long, env = "SPOOL_SHUTDOWN_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub shutdown_timeout: Option<Duration>,
        /// On SIGTERM, how long /readyz answers 503 while everything else still works, before
        /// the listener closes: time for a load balancer to take the node out (default 5s; a
        /// second signal ends it early).
        #[arg(long, env = "SPOOL_SHUTDOWN_DRAIN", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub shutdown_drain: Option<Duration>,
        /// Also serve /metrics (and /healthz, /readyz) on this internal address.
        #[arg(long, env = "SPOOL_METRICS_LISTEN", value_name = "ADDR")]
        pub metrics_listen: Option<SocketAddr>,
        /// Path of the AnyCable-compatible WebSocket endpoint (default /cable).
        #[arg(long, env = "SPOOL_ANYCABLE_PATH", value_name = "PATH")]
        pub anycable_path: Option<String>,
        /// AnyCable's application secret: the default streams secret, JWT secret and (as hex
        /// HMAC-SHA256(secret, "broadcast-cable")) broadcast key.
        #[arg(long, env = "SPOOL_ANYCABLE_SECRET", value_name = "S")]
        pub anycable_secret: Option<String>,
        /// Secret that signed stream names are verified with (default: --anycable-secret).
        #[arg(long, env = "SPOOL_ANYCABLE_STREAMS_SECRET", value_name = "S")]
        pub anycable_streams_secret: Option<String>,
        /// HS256 secret of AnyCable identification tokens (default: --anycable-secret).
        #[arg(long, env = "SPOOL_ANYCABLE_JWT_SECRET", value_name = "S")]
        pub anycable_jwt_secret: Option<String>,
        /// Query parameter of the identification token; its header is X-<param> (default jid).
        #[arg(long, env = "SPOOL_ANYCABLE_JWT_PARAM", value_name = "NAME")]
        pub anycable_jwt_param: Option<String>,
        /// Refuse /cable connections without an identification token.
        #[arg(long, env = "SPOOL_ANYCABLE_ENFORCE_JWT")]
        pub anycable_enforce_jwt: bool,
        /// Allow $pubsub subscriptions to unsigned stream names (stream_name).
        #[arg(long, env = "SPOOL_ANYCABLE_PUBLIC_STREAMS")]
        pub anycable_public_streams: bool,
        /// Bearer key of POST /_broadcast (default: derived from --anycable-secret).
        #[arg(long, env = "SPOOL_ANYCABLE_BROADCAST_KEY", value_name = "KEY")]
        pub anycable_broadcast_key: Option<String>,
        /// How often /cable connections get a ping; a client's ?pi= overrides it (default 3s).
        #[arg(long, env = "SPOOL_ANYCABLE_PING_INTERVAL", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub anycable_ping_interval: Option<Duration>,
        /// Allow whisper (transient client broadcasts) on signed streams; public streams always
        /// allow it (AnyCable's --streams_whisper).
        #[arg(long, env = "SPOOL_ANYCABLE_WHISPER")]
        pub anycable_whisper: bool,
        /// Whispers waiting for one /cable connection; more are dropped (default 32).
        #[arg(long, env = "SPOOL_ANYCABLE_WHISPER_BUFFER", value_name = "N")]
        pub anycable_whisper_buffer: Option<usize>,
        /// Largest whisper data accepted, as JSON (default 8KiB).
        #[arg(long, env = "SPOOL_ANYCABLE_WHISPER_MAX_BYTES", value_name = "BYTES", value_parser = parse_bytes)]
        #[serde(deserialize_with = "de_opt_bytes")]
        pub anycable_whisper_max_bytes: Option<u64>,
        /// Close actioncable-v1-ext-json connections that send no {"command":"pong"} for this
        /// long: disconnect no_pong (AnyCable's --pong_timeout; default off).
        #[arg(long, env = "SPOOL_ANYCABLE_PONG_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub anycable_pong_timeout: Option<Duration>,
        /// Log format: text or json.
        #[arg(long, env = "SPOOL_LOG_FORMAT")]
        pub log_format: Option<String>,
        /// TOML configuration file.
        #[arg(long, env = "SPOOL_CONFIG", value_name = "FILE")]
        #[serde(skip)]
        pub config: Option<PathBuf>,
    }
}

layered! {
    /// The default retention of every stream: `--history-*` flags, the `[retention]` table of
    /// the file, whose `[[retention.rules]]` (file only) override it per stream pattern.
    #[derive(Args, Clone, Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    pub struct RetentionSettings {
        /// Messages kept per stream (default 10000).
        #[arg(long = "history-limit", env = "SPOOL_HISTORY_LIMIT", value_name = "N")]
        pub max_messages: Option<u64>,
        /// Longest a message is kept, e.g. 24h, 90m (default 24h).
        #[arg(long = "history-ttl", env = "SPOOL_HISTORY_TTL", value_name = "DUR", value_parser = parse_duration)]
        #[serde(deserialize_with = "de_opt_duration")]
        pub max_age: Option<Duration>,
        /// Bytes kept per stream, e.g. 64MiB (default 64MiB).
        #[arg(long = "history-max-bytes", env = "SPOOL_HISTORY_MAX_BYTES", value_name = "BYTES", value_parser = parse_bytes)]
        #[serde(deserialize_with = "de_opt_bytes")]
        pub max_bytes: Option<u64>,
        /// `[[retention.rules]]`, in the file only: the first rule whose pattern matches a
        /// stream overrides these defaults for it.
        #[arg(skip)]
        pub rules: Vec<RetentionRule>,
    }
}

/// Flags whose TOML key is not the flag's name with `_` for `-` (docs/configuration.md).
pub const RENAMED: &[(&str, &str)] = &[
    ("api-key", "api_keys"),
    ("jwt-public-key", "jwt_public_keys"),
    ("cors-origin", "cors_origins"),
    ("history-limit", "retention.max_messages"),
    ("history-ttl", "retention.max_age"),
    ("history-max-bytes", "retention.max_bytes"),
];

impl Settings {
    /// Reads the TOML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// Engines `spool serve` can run on, with the engines' own durability levels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Memory,
    Disk {
        dir: PathBuf,
        durability: Durability,
        segment_size: u64,
        cache_size: u64,
    },
    Redis {
        url: String,
        prefix: String,
        durability: RedisDurability,
        timeout: Duration,
    },
    Nats {
        url: String,
        prefix: String,
        durability: NatsDurability,
        replicas: usize,
        timeout: Duration,
    },
}

/// Everything `spool serve` needs, resolved.
#[derive(Debug)]
pub struct Resolved {
    pub listen: SocketAddr,
    pub engine: EngineKind,
    pub retention: RetentionPolicy,
    pub dedup_window: Duration,
    pub shutdown_timeout: Duration,
    /// How long /readyz answers 503 on SIGTERM before the listener closes (`--shutdown-drain`).
    pub shutdown_drain: Duration,
    /// Where /metrics is also served (`--metrics-listen`).
    pub metrics_listen: Option<SocketAddr>,
    pub json_logs: bool,
    pub server: ServerConfig,
    /// Most streams the memory and disk engines create (`--max-streams`).
    pub max_streams: usize,
    /// Most streams readers may wait on before a first publish (`--max-unpublished-streams`).
    pub max_unpublished_streams: usize,
    /// Most idempotency keys the memory and disk engines remember (`--max-idempotency-keys`).
    pub max_idempotency_keys: usize,
    /// Most sessions the memory and disk engines keep (`--max-sessions`).
    pub max_sessions: usize,
    /// Most consumer groups the engine keeps and a node caches (`--max-groups`).
    pub max_groups: usize,
}

/// Flags and environment (`args`) over the TOML file (`--config`), validated, with defaults for
/// what neither sets.
pub fn resolve(args: &Settings) -> anyhow::Result<Resolved> {
    let file = match &args.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    let s = args.clone().or(file);
    let anycable = anycable(&s)?;
    let durability = s.durability.as_deref();
    let engine = match s.engine.as_deref().unwrap_or("disk") {
        "memory" if durability == Some("fsync") => {
            bail!("--durability fsync needs the disk engine (or redis)")
        }
        "memory" | "disk" if durability == Some("replicated") => {
            bail!("--durability replicated needs a cluster engine: --engine redis or --engine nats")
        }
        "memory" => EngineKind::Memory,
        "disk" => EngineKind::Disk {
            dir: s
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("spool-data")),
            durability: match durability.unwrap_or("fsync") {
                "fsync" => Durability::Fsync,
                "memory" => Durability::Memory,
                other => bail!("durability must be fsync or memory, got {other:?}"),
            },
            segment_size: s.segment_size.unwrap_or(64 * 1024 * 1024).max(4096),
            cache_size: s.cache_size.unwrap_or(spool_disk::DEFAULT_CACHE_SIZE),
        },
        "redis" => EngineKind::Redis {
            url: s
                .redis_url
                .clone()
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            prefix: prefix("Redis", s.redis_prefix.clone())?,
            durability: match durability.unwrap_or("memory") {
                "memory" => RedisDurability::Memory,
                "fsync" => RedisDurability::Fsync,
                "replicated" => RedisDurability::Replicated {
                    replicas: match s.redis_replicas.unwrap_or(1) {
                        0 => bail!("--redis-replicas must be at least 1"),
                        n => n,
                    },
                },
                other => bail!(
                    "the redis engine's durability must be memory, fsync or replicated, got {other:?}"
                ),
            },
            timeout: engine_timeout(s.engine_timeout)?,
        },
        "nats" => EngineKind::Nats {
            url: s
                .nats_url
                .clone()
                .unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
            prefix: prefix("NATS", s.nats_prefix.clone())?,
            durability: match durability.unwrap_or("replicated") {
                "replicated" => NatsDurability::Replicated,
                "memory" => NatsDurability::Memory,
                "fsync" => bail!(
                    "the nats engine cannot promise fsync per publish: JetStream acks once a message is written on a quorum \
                     of its replicas, and fsyncs on the server's own sync interval. Use --durability replicated \
                     (with --nats-replicas 3 for a quorum of three servers)"
                ),
                other => bail!(
                    "the nats engine's durability must be replicated or memory, got {other:?}"
                ),
            },
            replicas: match s.nats_replicas.unwrap_or(1) {
                n @ 1..=5 => n,
                n => bail!("--nats-replicas must be 1 to 5 (JetStream's limit), got {n}"),
            },
            timeout: engine_timeout(s.engine_timeout)?,
        },
        other => bail!("unknown engine {other:?}; available: disk, memory, redis, nats"),
    };
    let defaults = Retention::default();
    let retention = RetentionPolicy {
        default: Retention {
            max_messages: s.retention.max_messages.unwrap_or(defaults.max_messages),
            max_bytes: s.retention.max_bytes.unwrap_or(defaults.max_bytes),
            max_age: s.retention.max_age.unwrap_or(defaults.max_age),
        },
        rules: s.retention.rules,
    };
    let json_logs = match s.log_format.as_deref().unwrap_or("text") {
        "text" => false,
        "json" => true,
        other => bail!("log format must be text or json, got {other:?}"),
    };
    let defaults_server = ServerConfig::default();
    let max_payload = s.max_payload.unwrap_or(defaults_server.max_payload as u64);
    let max_payload = usize::try_from(max_payload).context("max payload does not fit in memory")?;
    if max_payload == 0 {
        bail!("max payload must be at least 1 byte");
    }
    let api_keys = s.api_key;
    if api_keys.iter().any(|k| k.trim().is_empty()) {
        bail!("an API key must not be empty");
    }
    let (auth, _) = authenticator(
        AuthConfig {
            api_keys,
            jwt_secret: s.jwt_secret,
            jwt_public_keys: Vec::new(),
            jwt_issuer: non_empty("JWT issuer", s.jwt_issuer)?,
            jwt_audience: non_empty("JWT audience", s.jwt_audience)?,
            allow_anonymous: s.allow_anonymous,
        },
        &s.jwt_public_key,
    )?;
    let ws_defaults = WsConfig::default();
    let ws_outbound_bytes = s
        .ws_outbound_bytes
        .map_or(Ok(ws_defaults.outbound_bytes), usize::try_from)
        .context("WebSocket outbound bytes do not fit in memory")?;
    if ws_outbound_bytes < 4096 {
        bail!(
            "WebSocket outbound bytes (--ws-outbound-bytes / ws_outbound_bytes) must be at least 4KiB, got {ws_outbound_bytes}"
        );
    }
    let ws_max_inflight_publish_bytes = s
        .ws_max_inflight_publish_bytes
        .map_or(Ok(ws_defaults.max_inflight_publish_bytes), usize::try_from)
        .context("WebSocket in-flight publish bytes do not fit in memory")?;
    if ws_max_inflight_publish_bytes == 0 {
        bail!(
            "WebSocket in-flight publish bytes (--ws-max-inflight-publish-bytes / ws_max_inflight_publish_bytes) must be at least 1"
        );
    }
    let conflate = s.conflate;
    if conflate.iter().any(|p| p.trim().is_empty()) {
        bail!("a conflate pattern must not be empty");
    }
    let ws = WsConfig {
        session_ttl: positive(
            "session TTL (--session-ttl / session_ttl)",
            s.session_ttl,
            ws_defaults.session_ttl,
        )?,
        ping_interval: positive(
            "WebSocket ping interval (--ws-ping-interval / ws_ping_interval)",
            s.ws_ping_interval,
            ws_defaults.ping_interval,
        )?,
        ping_timeout: positive(
            "WebSocket ping timeout (--ws-ping-timeout / ws_ping_timeout)",
            s.ws_ping_timeout,
            ws_defaults.ping_timeout,
        )?,
        outbound_messages: at_least_one(
            "WebSocket outbound messages (--ws-outbound-messages / ws_outbound_messages)",
            s.ws_outbound_messages,
            ws_defaults.outbound_messages,
        )?,
        outbound_bytes: ws_outbound_bytes,
        stuck_timeout: positive(
            "stuck timeout (--stuck-timeout / stuck_timeout)",
            s.stuck_timeout,
            ws_defaults.stuck_timeout,
        )?,
        conflate: conflate
            .iter()
            .map(|p| spool_core::Pattern::new(p))
            .collect(),
        max_inflight_publishes: at_least_one(
            "WebSocket in-flight publishes (--ws-max-inflight-publishes / ws_max_inflight_publishes)",
            s.ws_max_inflight_publishes,
            ws_defaults.max_inflight_publishes,
        )?,
        max_inflight_publish_bytes: ws_max_inflight_publish_bytes,
        ..ws_defaults
    };
    let http_defaults = HttpConfig::default();
    let http = HttpConfig {
        tls: tls(s.tls_cert.as_deref(), s.tls_key.as_deref())?,
        max_connections: at_least_one(
            "connection limit (--max-connections / max_connections)",
            s.max_connections,
            http_defaults.max_connections,
        )?,
        max_connections_per_ip: s
            .max_connections_per_ip
            .unwrap_or(http_defaults.max_connections_per_ip),
        header_timeout: positive(
            "header timeout (--header-timeout / header_timeout)",
            s.header_timeout,
            http_defaults.header_timeout,
        )?,
        idle_timeout: positive(
            "idle timeout (--idle-timeout / idle_timeout)",
            s.idle_timeout,
            http_defaults.idle_timeout,
        )?,
        body_timeout: positive(
            "body timeout (--body-timeout / body_timeout)",
            s.body_timeout,
            http_defaults.body_timeout,
        )?,
    };
    let max_read_bytes = s
        .max_read_bytes
        .map_or(defaults_server.max_read_bytes, |b| {
            usize::try_from(b).unwrap_or(usize::MAX)
        });
    if max_read_bytes < 1024 {
        bail!("max read bytes (--max-read-bytes / max_read_bytes) must be at least 1KiB");
    }
    let server = ServerConfig {
        max_payload,
        max_read_bytes,
        max_batch_bytes: defaults_server
            .max_batch_bytes
            .max(max_payload.saturating_mul(2)),
        heartbeat: s.heartbeat.unwrap_or(defaults_server.heartbeat),
        cors_origins: s.cors_origin,
        auth,
        ws,
        http,
        max_new_streams_per_minute: s
            .max_new_streams_per_minute
            .unwrap_or(defaults_server.max_new_streams_per_minute),
        anycable,
        ..defaults_server
    };
    if server.heartbeat.is_zero() {
        bail!("heartbeat must be longer than zero");
    }
    let engine_defaults = spool_engine::memory::MemoryConfig::default();
    let max_groups = at_least_one(
        "group limit (--max-groups / max_groups)",
        s.max_groups,
        spool_engine::groups::MAX_GROUPS,
    )?;
    let server = ServerConfig {
        max_groups,
        group_read_ahead: s.group_read_ahead.map_or(server.group_read_ahead, |b| {
            usize::try_from(b).unwrap_or(usize::MAX)
        }),
        ..server
    };
    Ok(Resolved {
        listen: s
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070))),
        engine,
        retention,
        dedup_window: s.dedup_window.unwrap_or(Duration::from_secs(120)),
        shutdown_timeout: s.shutdown_timeout.unwrap_or(Duration::from_secs(10)),
        shutdown_drain: s.shutdown_drain.unwrap_or(Duration::from_secs(5)),
        metrics_listen: s.metrics_listen,
        json_logs,
        server,
        max_streams: at_least_one(
            "stream limit (--max-streams / max_streams)",
            s.max_streams,
            engine_defaults.max_streams,
        )?,
        max_unpublished_streams: at_least_one(
            "unpublished stream limit (--max-unpublished-streams / max_unpublished_streams)",
            s.max_unpublished_streams,
            engine_defaults.max_unpublished_streams,
        )?,
        max_idempotency_keys: at_least_one(
            "idempotency key limit (--max-idempotency-keys / max_idempotency_keys)",
            s.max_idempotency_keys,
            engine_defaults.max_idempotency_keys,
        )?,
        max_sessions: at_least_one(
            "session limit (--max-sessions / max_sessions)",
            s.max_sessions,
            engine_defaults.max_sessions,
        )?,
        max_groups,
    })
}

/// A key/stream prefix for a cluster engine: what separates one Spool cluster (or test) from
/// another on a shared Redis or NATS.
/// NATS prefixes may not hold `_`: the engine joins prefix and encoded stream name with one,
/// and `a` + `b_x` must not meet `a_b` + `x`.
fn prefix(engine: &str, value: Option<String>) -> anyhow::Result<String> {
    let prefix = value.unwrap_or_else(|| "spool".into());
    let underscore = engine == "Redis";
    if prefix.is_empty()
        || prefix.len() > 32
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || (underscore && c == '_'))
    {
        let chars = if underscore {
            "[A-Za-z0-9_-]"
        } else {
            "[A-Za-z0-9-]"
        };
        bail!("the {engine} prefix must be 1 to 32 characters of {chars}, got {prefix:?}");
    }
    Ok(prefix)
}

/// The server's TLS (`--tls-cert` and `--tls-key`, both or neither), read and checked now so
/// that a missing or bad file stops the start with an error naming its flag.
fn tls(
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<Option<std::sync::Arc<spool_server::tls::Tls>>> {
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => bail!("--tls-cert (SPOOL_TLS_CERT, tls_cert) needs --tls-key"),
        (None, Some(_)) => bail!("--tls-key (SPOOL_TLS_KEY, tls_key) needs --tls-cert"),
    };
    match spool_server::tls::Tls::load(cert, key) {
        Ok(tls) => Ok(Some(std::sync::Arc::new(tls))),
        Err(e @ spool_server::tls::TlsError::Mismatch { .. }) => {
            bail!("--tls-key and --tls-cert: {e}")
        }
        Err(e) if e.is_cert() => bail!("--tls-cert (SPOOL_TLS_CERT, tls_cert): {e}"),
        Err(e) => bail!("--tls-key (SPOOL_TLS_KEY, tls_key): {e}"),
    }
}

fn engine_timeout(value: Option<Duration>) -> anyhow::Result<Duration> {
    positive(
        "engine timeout (--engine-timeout / engine_timeout)",
        value,
        Duration::from_secs(2),
    )
}

fn positive(what: &str, value: Option<Duration>, default: Duration) -> anyhow::Result<Duration> {
    match value {
        Some(d) if d.is_zero() => bail!("{what} must be longer than zero"),
        Some(d) => Ok(d),
        None => Ok(default),
    }
}

fn at_least_one(what: &str, value: Option<usize>, default: usize) -> anyhow::Result<usize> {
    match value {
        Some(0) => bail!("{what} must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

/// `auth` with the JWT public keys read from `key_paths`, and the authenticator it makes. A key
/// that cannot verify is refused, naming its file: the server would only log and skip it.
pub fn authenticator(
    mut auth: AuthConfig,
    key_paths: &[PathBuf],
) -> anyhow::Result<(AuthConfig, Authenticator)> {
    auth.jwt_public_keys = key_paths
        .iter()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read JWT public key {}", path.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    match Authenticator::try_new(&auth) {
        Ok(authenticator) => Ok((auth, authenticator)),
        Err(AuthConfigError::PublicKey { index, reason }) => {
            bail!("JWT public key {} {reason}", key_paths[index].display())
        }
        Err(e) => bail!("{e}"),
    }
}

/// `spool serve`'s JWT flags (`--jwt-secret`, `--jwt-public-key`, `--jwt-issuer`,
/// `--jwt-audience`, with their `SPOOL_*` variables) for another command (`spool token`):
/// [`Settings`]' own definitions, so the two cannot drift, read into a `Settings` that sets
/// only them.
#[derive(Clone, Debug, Default)]
pub struct JwtFlags(pub Settings);

impl JwtFlags {
    const IDS: [&str; 4] = ["jwt_secret", "jwt_public_key", "jwt_issuer", "jwt_audience"];
}

impl Args for JwtFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let serve = Settings::augment_args(clap::Command::new("serve"));
        serve
            .get_arguments()
            .filter(|arg| Self::IDS.contains(&arg.get_id().as_str()))
            // Listed where the command flattens them, not where `spool serve` lists them.
            .map(|arg| arg.clone().display_order(None))
            .fold(cmd, clap::Command::arg)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for JwtFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(JwtFlags(Settings {
            jwt_secret: m.get_one::<String>("jwt_secret").cloned(),
            jwt_public_key: m
                .get_many::<PathBuf>("jwt_public_key")
                .into_iter()
                .flatten()
                .cloned()
                .collect(),
            jwt_issuer: m.get_one::<String>("jwt_issuer").cloned(),
            jwt_audience: m.get_one::<String>("jwt_audience").cloned(),
            ..Settings::default()
        }))
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

fn non_empty(what: &str, value: Option<String>) -> anyhow::Result<Option<String>> {
    match value {
        Some(v) if v.trim().is_empty() => bail!("the {what} must not be empty"),
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        serve: Settings,
    }

    fn args(argv: &[&str]) -> Settings {
        Wrapper::parse_from(std::iter::once("spool").chain(argv.iter().copied())).serve
    }

    #[test]
    fn file_fills_what_flags_leave_unset() {
        let dir = std::env::temp_dir().join(format!("spool-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spool.toml");
        std::fs::write(
            &path,
            r#"
listen = "127.0.0.1:9000"
max_payload = "2MiB"
[retention]
max_messages = 50
max_age = "2h"
[[retention.rules]]
pattern = "chat:*"
max_messages = 1000
max_age = "1h"
"#,
        )
        .unwrap();
        let r = resolve(&args(&[
            "--config",
            path.to_str().unwrap(),
            "--history-limit",
            "7",
        ]))
        .unwrap();
        assert_eq!(r.listen.port(), 9000);
        assert_eq!(r.server.max_payload, 2 * 1024 * 1024);
        assert_eq!(
            r.retention.default.max_messages, 7,
            "the flag wins over the file"
        );
        assert_eq!(r.retention.default.max_age, Duration::from_secs(7200));
        let chat = r
            .retention
            .for_stream(&spool_core::StreamName::new("chat:x").unwrap());
        assert_eq!(
            (chat.max_messages, chat.max_age),
            (1000, Duration::from_secs(3600))
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    fn fixture(name: &str) -> String {
        format!(
            "{}/../spool-server/tests/fixtures/jwt/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    #[test]
    fn jwt_and_websocket_settings_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.toml");
        std::fs::write(
            &path,
            format!(
                r#"
jwt_public_keys = [{rsa:?}, {ec:?}]
jwt_issuer = "https://id.example"
jwt_audience = "spool"
session_ttl = "10m"
ws_ping_interval = "30s"
ws_ping_timeout = "15s"
ws_outbound_messages = 64
ws_outbound_bytes = "256KiB"
stuck_timeout = "2m"
conflate = ["prices/*", "cursors:*"]
ws_max_inflight_publishes = 16
ws_max_inflight_publish_bytes = "4MiB"
"#,
                rsa = fixture("rsa_public.pem"),
                ec = fixture("ec_public.pem"),
            ),
        )
        .unwrap();
        let r = resolve(&args(&["--config", path.to_str().unwrap()])).unwrap();
        let (auth, ws) = (&r.server.auth, &r.server.ws);
        assert_eq!(auth.jwt_public_keys.len(), 2);
        assert!(auth.jwt_public_keys[0].starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(auth.jwt_issuer.as_deref(), Some("https://id.example"));
        assert_eq!(auth.jwt_audience.as_deref(), Some("spool"));
        assert_eq!(ws.session_ttl, Duration::from_secs(600));
        assert_eq!(ws.ping_interval, Duration::from_secs(30));
        assert_eq!(ws.ping_timeout, Duration::from_secs(15));
        assert_eq!(ws.outbound_messages, 64);
        assert_eq!(ws.outbound_bytes, 256 * 1024);
        assert_eq!(ws.stuck_timeout, Duration::from_secs(120));
        let conflate: Vec<&str> = ws.conflate.iter().map(|p| p.as_str()).collect();
        assert_eq!(conflate, ["prices/*", "cursors:*"]);
        assert_eq!(ws.max_inflight_publishes, 16);
        assert_eq!(ws.max_inflight_publish_bytes, 4 * 1024 * 1024);

        // Flags win, repeatable flags replace the file's list.
        let r = resolve(&args(&[
            "--config",
            path.to_str().unwrap(),
            "--jwt-public-key",
            &fixture("ec_public.pem"),
            "--jwt-audience",
            "other",
            "--session-ttl",
            "1m",
            "--conflate",
            "ticks/*",
            "--ws-outbound-bytes",
            "4KiB",
        ]))
        .unwrap();
        assert_eq!(r.server.auth.jwt_public_keys.len(), 1);
        assert_eq!(r.server.auth.jwt_audience.as_deref(), Some("other"));
        assert_eq!(r.server.ws.session_ttl, Duration::from_secs(60));
        assert_eq!(r.server.ws.conflate.len(), 1);
        assert_eq!(r.server.ws.outbound_bytes, 4096);
        assert_eq!(r.server.ws.ping_interval, Duration::from_secs(30));

        // Defaults.
        let ws = resolve(&args(&[])).unwrap().server.ws;
        let d = WsConfig::default();
        assert_eq!(
            (
                ws.session_ttl,
                ws.ping_interval,
                ws.ping_timeout,
                ws.stuck_timeout
            ),
            (
                d.session_ttl,
                d.ping_interval,
                d.ping_timeout,
                d.stuck_timeout
            )
        );
        assert_eq!(
            (
                ws.outbound_messages,
                ws.outbound_bytes,
                ws.max_inflight_publishes
            ),
            (1024, 1024 * 1024, 1024)
        );
    }

    #[test]
    fn bad_jwt_and_websocket_settings_are_clear_errors() {
        let private = fixture("rsa_private.pem");
        for (argv, needle) in [
            (
                vec!["--jwt-public-key", "/nonexistent/key.pem"],
                "cannot read JWT public key /nonexistent/key.pem",
            ),
            (
                vec!["--jwt-public-key", private.as_str()],
                "rsa_private.pem is a private key",
            ),
            (vec!["--jwt-secret", ""], "the JWT secret is empty"),
            (
                vec!["--jwt-issuer", " "],
                "the JWT issuer must not be empty",
            ),
            (
                vec!["--session-ttl", "0s"],
                "session TTL (--session-ttl / session_ttl) must be longer than zero",
            ),
            (vec!["--ws-ping-interval", "0s"], "must be longer than zero"),
            (vec!["--ws-ping-timeout", "0s"], "must be longer than zero"),
            (vec!["--stuck-timeout", "0s"], "must be longer than zero"),
            (vec!["--ws-outbound-messages", "0"], "must be at least 1"),
            (
                vec!["--ws-max-inflight-publishes", "0"],
                "must be at least 1",
            ),
            (
                vec!["--ws-outbound-bytes", "4095"],
                "must be at least 4KiB, got 4095",
            ),
            (
                vec!["--conflate", ""],
                "a conflate pattern must not be empty",
            ),
        ] {
            let err = resolve(&args(&argv)).unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{argv:?}: {err:#}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        for (toml, needle) in [
            ("ws_outbound_messages = 0", "must be at least 1"),
            ("stuck_timeout = \"soon\"", "invalid config file"),
            ("jwt_public_key = \"x.pem\"", "invalid config file"),
        ] {
            std::fs::write(&path, toml).unwrap();
            let err = resolve(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{toml}: {err:#}");
        }
    }

    #[test]
    fn bad_files_and_values_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("spool-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "listen = 5\nunknown_key = true\n").unwrap();
        let err = resolve(&args(&["--config", path.to_str().unwrap()])).unwrap_err();
        assert!(
            format!("{err:#}").contains("invalid config file"),
            "{err:#}"
        );
        let err = resolve(&args(&["--config", "/nonexistent/spool.toml"])).unwrap_err();
        assert!(format!("{err:#}").contains("cannot read config file"));
        let err = resolve(&args(&["--engine", "floppy"])).unwrap_err();
        assert!(err.to_string().contains("unknown engine"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn cluster_engines_take_their_flags_and_refuse_what_they_cannot_promise() {
        let r = resolve(&args(&["--engine", "redis"])).unwrap();
        assert_eq!(
            r.engine,
            EngineKind::Redis {
                url: "redis://127.0.0.1:6379".into(),
                prefix: "spool".into(),
                durability: RedisDurability::Memory,
                timeout: Duration::from_secs(2),
            }
        );
        let r = resolve(&args(&[
            "--engine",
            "redis",
            "--redis-url",
            "redis://10.0.0.5:6380/2",
            "--redis-prefix",
            "eu-1",
            "--durability",
            "replicated",
            "--redis-replicas",
            "2",
            "--engine-timeout",
            "500ms",
        ]))
        .unwrap();
        assert_eq!(
            r.engine,
            EngineKind::Redis {
                url: "redis://10.0.0.5:6380/2".into(),
                prefix: "eu-1".into(),
                durability: RedisDurability::Replicated { replicas: 2 },
                timeout: Duration::from_millis(500),
            }
        );
        let r = resolve(&args(&["--engine", "nats", "--nats-replicas", "3"])).unwrap();
        assert_eq!(
            r.engine,
            EngineKind::Nats {
                url: "nats://127.0.0.1:4222".into(),
                prefix: "spool".into(),
                durability: NatsDurability::Replicated,
                replicas: 3,
                timeout: Duration::from_secs(2),
            }
        );
        for (argv, needle) in [
            (
                &["--engine", "nats", "--durability", "fsync"][..],
                "cannot promise fsync",
            ),
            (&["--engine", "nats", "--nats-replicas", "7"][..], "1 to 5"),
            (
                &["--engine", "redis", "--durability", "quorum"][..],
                "memory, fsync or replicated",
            ),
            (
                &[
                    "--engine",
                    "redis",
                    "--durability",
                    "replicated",
                    "--redis-replicas",
                    "0",
                ][..],
                "at least 1",
            ),
            (
                &["--engine", "redis", "--redis-prefix", "a:b"][..],
                "prefix must be",
            ),
            (
                &["--engine", "nats", "--nats-prefix", ""][..],
                "prefix must be",
            ),
            (
                &["--engine", "redis", "--engine-timeout", "0s"][..],
                "longer than zero",
            ),
            (
                &["--engine", "disk", "--durability", "replicated"][..],
                "needs a cluster engine",
            ),
            (
                &["--engine", "memory", "--durability", "replicated"][..],
                "needs a cluster engine",
            ),
        ] {
            let err = resolve(&args(argv)).unwrap_err();
            assert!(format!("{err:#}").contains(needle), "{argv:?}: {err:#}");
        }
    }

    #[test]
    fn stream_limits_resolve_from_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.toml");
        std::fs::write(
            &path,
            "max_streams = 500\nmax_unpublished_streams = 50\nmax_new_streams_per_minute = 7\n",
        )
        .unwrap();
        let r = resolve(&args(&["--config", path.to_str().unwrap()])).unwrap();
        assert_eq!((r.max_streams, r.max_unpublished_streams), (500, 50));
        assert_eq!(r.server.max_new_streams_per_minute, 7);
        let r = resolve(&args(&[
            "--max-streams",
            "9",
            "--max-new-streams-per-minute",
            "0",
        ]))
        .unwrap();
        assert_eq!(r.max_streams, 9);
        assert_eq!(r.server.max_new_streams_per_minute, 0, "0: no budget");
        let r = resolve(&args(&[])).unwrap();
        assert_eq!(
            (
                r.max_streams,
                r.max_unpublished_streams,
                r.server.max_new_streams_per_minute
            ),
            (1_000_000, 100_000, 1000)
        );
        for flag in ["--max-streams", "--max-unpublished-streams"] {
            let err = resolve(&args(&[flag, "0"])).unwrap_err();
            assert!(format!("{err:#}").contains("must be at least 1"), "{err:#}");
        }
    }

    #[test]
    fn key_and_session_limits_resolve_from_flags_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.toml");
        std::fs::write(&path, "max_idempotency_keys = 500\nmax_sessions = 50\n").unwrap();
        let file = path.to_str().unwrap();
        let r = resolve(&args(&["--config", file])).unwrap();
        assert_eq!((r.max_idempotency_keys, r.max_sessions), (500, 50));
        let r = resolve(&args(&["--config", file, "--max-sessions", "7"])).unwrap();
        assert_eq!((r.max_idempotency_keys, r.max_sessions), (500, 7));
        let r = resolve(&args(&[])).unwrap();
        assert_eq!(
            (r.max_idempotency_keys, r.max_sessions),
            (1_000_000, 1_000_000)
        );
        for flag in ["--max-idempotency-keys", "--max-sessions"] {
            let err = resolve(&args(&[flag, "0"])).unwrap_err();
            assert!(format!("{err:#}").contains("must be at least 1"), "{err:#}");
        }
    }

    #[test]
    fn group_read_ahead_resolves_from_flags_and_file() {
        let r = resolve(&args(&[])).unwrap();
        assert_eq!(r.server.group_read_ahead, 32 * 1024 * 1024);
        let r = resolve(&args(&["--group-read-ahead", "0"])).unwrap();
        assert_eq!(r.server.group_read_ahead, 0, "0: no read-ahead");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.toml");
        std::fs::write(&path, "group_read_ahead = \"4MiB\"\n").unwrap();
        let file = path.to_str().unwrap();
        let r = resolve(&args(&["--config", file])).unwrap();
        assert_eq!(r.server.group_read_ahead, 4 * 1024 * 1024);
        let r = resolve(&args(&["--config", file, "--group-read-ahead", "1MiB"])).unwrap();
        assert_eq!(r.server.group_read_ahead, 1024 * 1024, "the flag wins");
    }

    /// The keys a `Deserialize` struct accepts, as serde names them (renames applied).
    fn toml_keys<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
        use serde::de::{self, Visitor};
        struct Keys<'a>(&'a mut &'static [&'static str]);
        impl<'de> de::Deserializer<'de> for Keys<'_> {
            type Error = de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = fields;
                Err(de::Error::custom("only the keys were wanted"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
                enum identifier ignored_any
            }
        }
        let mut keys: &'static [&'static str] = &[];
        let _ = T::deserialize(Keys(&mut keys));
        keys
    }

    /// Every flag of `spool serve` has its `SPOOL_*` variable, its TOML key, which sets the
    /// same setting as the flag, and its row in docs/configuration.md naming all three; every
    /// key of the file is a flag's. The three (four) cannot drift apart.
    #[test]
    fn every_flag_has_its_env_var_toml_key_and_docs_row() {
        use clap::CommandFactory;
        let docs = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/configuration.md"
        ))
        .unwrap()
        .replace("\\|", "/");
        let cli = crate::Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        let mut flag_keys = Vec::new();
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            if long == "help" {
                continue;
            }
            let env = format!("SPOOL_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(env.as_str()),
                "--{long}"
            );
            let key = match RENAMED.iter().find(|(flag, _)| *flag == long) {
                Some((_, key)) => key.to_string(),
                None if long == "config" => "—".to_string(),
                None => long.replace('-', "_"),
            };
            let row = docs
                .lines()
                .map(|line| line.split('|').map(str::trim).collect::<Vec<_>>())
                .find(|cells| {
                    cells.len() > 4
                        && (cells[1] == format!("`--{long}`")
                            || cells[1].starts_with(&format!("`--{long} ")))
                })
                .unwrap_or_else(|| panic!("no row for --{long} in docs/configuration.md"));
            assert!(
                row[2] == format!("`{env}`") || row[2].starts_with(&format!("`{env}")),
                "--{long}: docs say {}",
                row[2]
            );
            if long == "config" {
                assert_eq!(row[3], "—");
                continue;
            }
            assert!(
                row[3].starts_with(&format!("`{key}`")),
                "--{long}: docs say {}",
                row[3]
            );

            // The key sets what the flag sets.
            let (value, toml_value) = match arg.get_value_names().and_then(|v| v.first()) {
                _ if matches!(arg.get_action(), clap::ArgAction::SetTrue) => {
                    (None, "true".to_string())
                }
                Some(name) if name == "N" => (Some("3"), "3".to_string()),
                Some(name) if name == "ADDR" => (Some("127.0.0.1:9"), "\"127.0.0.1:9\"".into()),
                Some(name) if name == "DUR" => (Some("3s"), "\"3s\"".into()),
                Some(name) if name == "BYTES" => (Some("5KiB"), "\"5KiB\"".into()),
                _ => (Some("x"), "\"x\"".into()),
            };
            let toml_value = match arg.get_action() {
                clap::ArgAction::Append => format!("[{toml_value}]"),
                _ => toml_value,
            };
            let flag = format!("--{long}");
            let argv = std::iter::once(flag.as_str()).chain(value);
            let from_flag = args(&argv.collect::<Vec<_>>());
            let toml = match key.split_once('.') {
                Some((table, key)) => format!("[{table}]\n{key} = {toml_value}\n"),
                None => format!("{key} = {toml_value}\n"),
            };
            let from_file: Settings = toml::from_str(&toml)
                .unwrap_or_else(|e| panic!("--{long}: the file has no key {key}: {e}"));
            assert_eq!(
                format!("{from_flag:?}"),
                format!("{from_file:?}"),
                "--{long} and {key}"
            );
            assert_ne!(
                format!("{from_flag:?}"),
                format!("{:?}", Settings::default()),
                "--{long} sets something"
            );
            flag_keys.push(key);
        }
        let mut file_keys: Vec<String> = toml_keys::<Settings>()
            .iter()
            .filter(|key| **key != "retention")
            .map(|key| key.to_string())
            .chain(
                toml_keys::<RetentionSettings>()
                    .iter()
                    .filter(|key| **key != "rules")
                    .map(|key| format!("retention.{key}")),
            )
            .collect();
        assert!(file_keys.len() > 40, "{file_keys:?}");
        file_keys.sort();
        flag_keys.sort();
        assert_eq!(file_keys, flag_keys, "every key of the file is a flag's");
    }
}
