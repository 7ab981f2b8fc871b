//! `spool serve`: resolve the configuration, build the engine, serve until SIGTERM/SIGINT.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Args;
use spool_core::retention::{parse_bytes, parse_duration};
use spool_disk::{DiskConfig, DiskEngine};
use spool_engine::{Engine, MemoryEngine, memory::MemoryConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{self, EngineKind};

#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "SPOOL_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
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
    pub engine_timeout: Option<Duration>,
    /// Size at which the disk engine starts a new WAL segment (default 64MiB).
    #[arg(long, env = "SPOOL_SEGMENT_SIZE", value_name = "BYTES", value_parser = parse_bytes)]
    pub segment_size: Option<u64>,
    /// Messages kept per stream (default 10000).
    #[arg(long, env = "SPOOL_HISTORY_LIMIT", value_name = "N")]
    pub history_limit: Option<u64>,
    /// Longest a message is kept, e.g. 24h, 90m (default 24h).
    #[arg(long, env = "SPOOL_HISTORY_TTL", value_name = "DUR", value_parser = parse_duration)]
    pub history_ttl: Option<Duration>,
    /// Bytes kept per stream, e.g. 64MiB (default 64MiB).
    #[arg(long, env = "SPOOL_HISTORY_MAX_BYTES", value_name = "BYTES", value_parser = parse_bytes)]
    pub history_max_bytes: Option<u64>,
    /// Largest payload of one message (default 1MiB).
    #[arg(long, env = "SPOOL_MAX_PAYLOAD", value_name = "BYTES", value_parser = parse_bytes)]
    pub max_payload: Option<u64>,
    /// API key for server-side publishing and reading (repeatable; env: comma-separated).
    #[arg(
        long,
        env = "SPOOL_API_KEY",
        value_name = "KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
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
    pub cors_origin: Vec<String>,
    /// How long an idempotency key is remembered (default 2m).
    #[arg(long, env = "SPOOL_DEDUP_WINDOW", value_name = "DUR", value_parser = parse_duration)]
    pub dedup_window: Option<Duration>,
    /// Interval of SSE heartbeat comments (default 15s).
    #[arg(long, env = "SPOOL_HEARTBEAT", value_name = "DUR", value_parser = parse_duration)]
    pub heartbeat: Option<Duration>,
    /// How long a WebSocket session outlives its connection (default 5m).
    #[arg(long, env = "SPOOL_SESSION_TTL", value_name = "DUR", value_parser = parse_duration)]
    pub session_ttl: Option<Duration>,
    /// The server pings a quiet WebSocket connection this often (default 25s).
    #[arg(long, env = "SPOOL_WS_PING_INTERVAL", value_name = "DUR", value_parser = parse_duration)]
    pub ws_ping_interval: Option<Duration>,
    /// A WebSocket connection silent this long after a ping is closed (default 20s).
    #[arg(long, env = "SPOOL_WS_PING_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
    pub ws_ping_timeout: Option<Duration>,
    /// Most frames waiting to be written to one WebSocket connection (default 1024).
    #[arg(long, env = "SPOOL_WS_OUTBOUND_MESSAGES", value_name = "N")]
    pub ws_outbound_messages: Option<usize>,
    /// Most bytes waiting to be written to one WebSocket connection (default 1MiB).
    #[arg(long, env = "SPOOL_WS_OUTBOUND_BYTES", value_name = "BYTES", value_parser = parse_bytes)]
    pub ws_outbound_bytes: Option<u64>,
    /// A connection whose outbound buffer makes no progress this long is closed (default 60s).
    #[arg(long, env = "SPOOL_STUCK_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
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
    pub ws_max_inflight_publish_bytes: Option<u64>,
    /// Most bytes of messages in one long-poll answer or SSE batch (default 1MiB).
    #[arg(long, env = "SPOOL_MAX_READ_BYTES", value_name = "BYTES", value_parser = parse_bytes)]
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
    pub header_timeout: Option<Duration>,
    /// A connection that moves no byte while no request is answered is closed (default 2m).
    #[arg(long, env = "SPOOL_IDLE_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Longest time to receive a publish body (default 30s).
    #[arg(long, env = "SPOOL_BODY_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
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
    /// Most new streams one identity (token sub, API key, anonymous client IP) may create per
    /// minute; 0 for no budget (default 1000).
    #[arg(long, env = "SPOOL_MAX_NEW_STREAMS_PER_MINUTE", value_name = "N")]
    pub max_new_streams_per_minute: Option<u32>,
    /// Longest wait for open requests on shutdown (default 10s).
    #[arg(long, env = "SPOOL_SHUTDOWN_TIMEOUT", value_name = "DUR", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Log format: text or json.
    #[arg(long, env = "SPOOL_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// TOML configuration file.
    #[arg(long, env = "SPOOL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let resolved = config::resolve(&args)?;
    init_logging(resolved.json_logs);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting spool");
    let auth = &resolved.server.auth;
    if auth.allow_anonymous {
        tracing::warn!(
            "!!! ANONYMOUS ACCESS IS ON: anyone who can reach this server may publish to and read every stream. \
             Use --allow-anonymous for development only !!!"
        );
    } else if auth.api_keys.is_empty()
        && auth.jwt_secret.is_none()
        && auth.jwt_public_keys.is_empty()
    {
        tracing::warn!(
            "no --api-key, --jwt-secret or --jwt-public-key: every request will be refused (deny by default)"
        );
    }

    let engine: Arc<dyn Engine> = match resolved.engine {
        EngineKind::Memory => {
            tracing::warn!(
                "memory engine: history is lost on restart and every stream gets a new epoch"
            );
            Arc::new(MemoryEngine::new(MemoryConfig {
                retention: resolved.retention.clone(),
                dedup_window: resolved.dedup_window,
                max_streams: resolved.max_streams,
                max_unpublished_streams: resolved.max_unpublished_streams,
                max_idempotency_keys: resolved.max_idempotency_keys,
                max_sessions: resolved.max_sessions,
            }))
        }
        EngineKind::Disk {
            dir,
            durability,
            segment_size,
        } => {
            let config = DiskConfig {
                durability,
                retention: resolved.retention.clone(),
                dedup_window: resolved.dedup_window,
                segment_size,
                max_streams: resolved.max_streams,
                max_unpublished_streams: resolved.max_unpublished_streams,
                max_idempotency_keys: resolved.max_idempotency_keys,
                max_sessions: resolved.max_sessions,
                ..DiskConfig::new(dir)
            };
            tracing::info!(dir = %config.dir.display(), ?durability, "opening the disk engine");
            let engine = tokio::task::spawn_blocking(move || DiskEngine::open(config))
                .await
                .context("the disk engine's recovery panicked")??;
            Arc::new(engine)
        }
        EngineKind::Redis {
            url,
            prefix,
            durability,
            timeout,
        } => {
            tracing::info!(%prefix, ?durability, "connecting to Redis");
            let config = spool_redis::RedisConfig {
                prefix,
                durability: match durability {
                    config::RedisDurability::Memory => spool_redis::RedisDurability::Memory,
                    config::RedisDurability::Fsync => spool_redis::RedisDurability::Fsync,
                    config::RedisDurability::Replicated { replicas } => {
                        spool_redis::RedisDurability::Replicated { replicas }
                    }
                },
                retention: resolved.retention.clone(),
                dedup_window: resolved.dedup_window,
                timeout,
                ..spool_redis::RedisConfig::new(url)
            };
            Arc::new(
                spool_redis::RedisEngine::connect(config)
                    .await
                    .context("cannot start the redis engine")?,
            )
        }
        EngineKind::Nats {
            url,
            prefix,
            durability,
            replicas,
            timeout,
        } => {
            tracing::info!(%prefix, ?durability, replicas, "connecting to NATS JetStream");
            let config = spool_nats::NatsConfig {
                prefix,
                durability: match durability {
                    config::NatsDurability::Memory => spool_nats::NatsDurability::Memory,
                    config::NatsDurability::Replicated => spool_nats::NatsDurability::Replicated,
                },
                replicas,
                retention: resolved.retention.clone(),
                dedup_window: resolved.dedup_window,
                session_max_age: resolved.server.ws.session_ttl.max(Duration::from_secs(60)),
                timeout,
                max_unpublished_streams: resolved.max_unpublished_streams,
                ..spool_nats::NatsConfig::new(url)
            };
            // Every server of the comma-separated list, each checked, before connecting.
            let servers = config.servers().map_err(|e| {
                let why = match e {
                    spool_engine::EngineError::Internal(why) => why,
                    other => other.to_string(),
                };
                anyhow::anyhow!("invalid --nats-url (SPOOL_NATS_URL, nats_url): {why}")
            })?;
            tracing::info!(servers = servers.len(), "NATS servers to connect to");
            Arc::new(
                spool_nats::NatsEngine::connect(config)
                    .await
                    .context("cannot start the nats engine")?,
            )
        }
    };

    let shutdown = CancellationToken::new();
    let signals = signal_shutdown(shutdown.clone())?;
    let listener =
        listen(resolved.listen).with_context(|| format!("cannot listen on {}", resolved.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, engine = engine.name(), "listening");

    tokio::spawn(signals);
    let server = tokio::spawn(spool_server::serve(
        listener,
        engine,
        resolved.server,
        shutdown.clone(),
    ));

    shutdown.cancelled().await;
    tracing::info!(timeout = ?resolved.shutdown_timeout, "shutting down: finishing open requests");
    match tokio::time::timeout(resolved.shutdown_timeout, server).await {
        Ok(Ok(result)) => result.context("server failed")?,
        Ok(Err(e)) => return Err(e).context("server task failed"),
        Err(_) => tracing::warn!("shutdown timeout: closing the remaining connections"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Registers SIGTERM and SIGINT handlers now — before the server reports that it listens, so
/// a signal that arrives at any time after that is a graceful shutdown, never the default
/// kill — and returns the future that cancels `shutdown` on the first of them.
#[cfg(unix)]
fn signal_shutdown(shutdown: CancellationToken) -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        shutdown.cancel();
    })
}

#[cfg(not(unix))]
fn signal_shutdown(shutdown: CancellationToken) -> anyhow::Result<impl Future<Output = ()>> {
    Ok(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
    })
}

pub fn init_logging(json: bool) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("SPOOL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Connections waiting to be accepted. Tokio's default (1024) overflows when thousands of
/// clients reconnect at once (a resume storm after a restart): the kernel drops their SYNs and
/// they retry after 1 s, 3 s, 7 s. The kernel caps it at `net.core.somaxconn`.
const ACCEPT_BACKLOG: u32 = 16_384;

fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}
