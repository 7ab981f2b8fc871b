//! `spool serve` configuration: flags > `SPOOL_*` environment > TOML file > defaults.
//!
//! clap reads flags and environment into `Option`s (unset stays `None`), the file fills what is
//! still unset, and defaults fill the rest; [`Resolved`] is the outcome.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use serde::Deserialize;
use spool_core::{
    Retention, RetentionPolicy, RetentionRule,
    retention::{de_opt_bytes, de_opt_duration},
};
use spool_disk::Durability;
use spool_server::{
    ServerConfig,
    auth::{AuthConfigError, Authenticator},
    config::{AuthConfig, HttpConfig, WsConfig},
};

use crate::serve::ServeArgs;

/// The TOML file. Every key is optional; see docs/configuration.md.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<SocketAddr>,
    engine: Option<String>,
    data_dir: Option<PathBuf>,
    durability: Option<String>,
    #[serde(default, deserialize_with = "de_opt_bytes")]
    segment_size: Option<u64>,
    redis_url: Option<String>,
    redis_prefix: Option<String>,
    redis_replicas: Option<u32>,
    nats_url: Option<String>,
    nats_prefix: Option<String>,
    nats_replicas: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    engine_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_bytes")]
    max_payload: Option<u64>,
    api_keys: Option<Vec<String>>,
    jwt_secret: Option<String>,
    jwt_public_keys: Option<Vec<PathBuf>>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    allow_anonymous: Option<bool>,
    cors_origins: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    dedup_window: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    heartbeat: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    shutdown_timeout: Option<Duration>,
    log_format: Option<String>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    session_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    ws_ping_interval: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    ws_ping_timeout: Option<Duration>,
    ws_outbound_messages: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_bytes")]
    ws_outbound_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    stuck_timeout: Option<Duration>,
    conflate: Option<Vec<String>>,
    ws_max_inflight_publishes: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_bytes")]
    ws_max_inflight_publish_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_bytes")]
    max_read_bytes: Option<u64>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    header_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    body_timeout: Option<Duration>,
    max_streams: Option<usize>,
    max_unpublished_streams: Option<usize>,
    max_new_streams_per_minute: Option<u32>,
    max_idempotency_keys: Option<usize>,
    max_sessions: Option<usize>,
    #[serde(default)]
    retention: FileRetention,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetention {
    max_messages: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_bytes")]
    max_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    max_age: Option<Duration>,
    #[serde(default)]
    rules: Vec<RetentionRule>,
}

impl FileConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// Engines `spool serve` can run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Memory,
    Disk {
        dir: PathBuf,
        durability: Durability,
        segment_size: u64,
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

/// When a publish on the Redis engine is acked (docs/operations.md says what each holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisDurability {
    /// Redis applied it (in its memory; on disk as its own persistence settings say).
    Memory,
    /// Redis applied it and is configured to fsync every write (`appendfsync always`).
    Fsync,
    /// Redis applied it and this many replicas acknowledged it (`WAIT`).
    Replicated { replicas: u32 },
}

/// When a publish on the NATS JetStream engine is acked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatsDurability {
    /// Stored by JetStream in memory storage (lost when the NATS servers restart).
    Memory,
    /// Stored by JetStream in file storage on a quorum of the stream's replicas.
    Replicated,
}

/// Everything `spool serve` needs, resolved.
#[derive(Debug)]
pub struct Resolved {
    pub listen: SocketAddr,
    pub engine: EngineKind,
    pub retention: RetentionPolicy,
    pub dedup_window: Duration,
    pub shutdown_timeout: Duration,
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
}

pub fn resolve(args: &ServeArgs) -> anyhow::Result<Resolved> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let durability = args.durability.as_deref().or(file.durability.as_deref());
    let engine = match args
        .engine
        .as_deref()
        .or(file.engine.as_deref())
        .unwrap_or("disk")
    {
        "memory" if durability == Some("fsync") => {
            bail!("--durability fsync needs the disk engine (or redis)")
        }
        "memory" | "disk" if durability == Some("replicated") => {
            bail!("--durability replicated needs a cluster engine: --engine redis or --engine nats")
        }
        "memory" => EngineKind::Memory,
        "disk" => EngineKind::Disk {
            dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("spool-data")),
            durability: match durability.unwrap_or("fsync") {
                "fsync" => Durability::Fsync,
                "memory" => Durability::Memory,
                other => bail!("durability must be fsync or memory, got {other:?}"),
            },
            segment_size: args
                .segment_size
                .or(file.segment_size)
                .unwrap_or(64 * 1024 * 1024)
                .max(4096),
        },
        "redis" => EngineKind::Redis {
            url: args
                .redis_url
                .clone()
                .or(file.redis_url)
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            prefix: prefix("Redis", args.redis_prefix.clone().or(file.redis_prefix))?,
            durability: match durability.unwrap_or("memory") {
                "memory" => RedisDurability::Memory,
                "fsync" => RedisDurability::Fsync,
                "replicated" => RedisDurability::Replicated {
                    replicas: match args.redis_replicas.or(file.redis_replicas).unwrap_or(1) {
                        0 => bail!("--redis-replicas must be at least 1"),
                        n => n,
                    },
                },
                other => bail!(
                    "the redis engine's durability must be memory, fsync or replicated, got {other:?}"
                ),
            },
            timeout: engine_timeout(args, file.engine_timeout)?,
        },
        "nats" => EngineKind::Nats {
            url: args
                .nats_url
                .clone()
                .or(file.nats_url)
                .unwrap_or_else(|| "nats://127.0.0.1:4222".into()),
            prefix: prefix("NATS", args.nats_prefix.clone().or(file.nats_prefix))?,
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
            replicas: match args.nats_replicas.or(file.nats_replicas).unwrap_or(1) {
                n @ 1..=5 => n,
                n => bail!("--nats-replicas must be 1 to 5 (JetStream's limit), got {n}"),
            },
            timeout: engine_timeout(args, file.engine_timeout)?,
        },
        other => bail!("unknown engine {other:?}; available: disk, memory, redis, nats"),
    };
    let defaults = Retention::default();
    let retention = RetentionPolicy {
        default: Retention {
            max_messages: args
                .history_limit
                .or(file.retention.max_messages)
                .unwrap_or(defaults.max_messages),
            max_bytes: args
                .history_max_bytes
                .or(file.retention.max_bytes)
                .unwrap_or(defaults.max_bytes),
            max_age: args
                .history_ttl
                .or(file.retention.max_age)
                .unwrap_or(defaults.max_age),
        },
        rules: file.retention.rules,
    };
    let log_format = args
        .log_format
        .as_deref()
        .or(file.log_format.as_deref())
        .unwrap_or("text");
    let json_logs = match log_format {
        "text" => false,
        "json" => true,
        other => bail!("log format must be text or json, got {other:?}"),
    };
    let defaults_server = ServerConfig::default();
    let max_payload = args
        .max_payload
        .or(file.max_payload)
        .unwrap_or(defaults_server.max_payload as u64);
    let max_payload = usize::try_from(max_payload).context("max payload does not fit in memory")?;
    if max_payload == 0 {
        bail!("max payload must be at least 1 byte");
    }
    let api_keys = if args.api_key.is_empty() {
        file.api_keys.unwrap_or_default()
    } else {
        args.api_key.clone()
    };
    if api_keys.iter().any(|k| k.trim().is_empty()) {
        bail!("an API key must not be empty");
    }
    let key_paths = if args.jwt_public_key.is_empty() {
        file.jwt_public_keys.unwrap_or_default()
    } else {
        args.jwt_public_key.clone()
    };
    let auth = AuthConfig {
        api_keys,
        jwt_secret: args.jwt_secret.clone().or(file.jwt_secret),
        jwt_public_keys: key_paths
            .iter()
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read JWT public key {}", path.display()))
            })
            .collect::<anyhow::Result<_>>()?,
        jwt_issuer: non_empty("JWT issuer", args.jwt_issuer.clone().or(file.jwt_issuer))?,
        jwt_audience: non_empty(
            "JWT audience",
            args.jwt_audience.clone().or(file.jwt_audience),
        )?,
        allow_anonymous: args.allow_anonymous || file.allow_anonymous.unwrap_or(false),
    };
    // The server would only log and skip an unusable key; refuse to start instead.
    match Authenticator::try_new(&auth) {
        Ok(_) => {}
        Err(AuthConfigError::PublicKey { index, reason }) => {
            bail!("JWT public key {} {reason}", key_paths[index].display())
        }
        Err(e) => bail!("{e}"),
    }
    let ws_defaults = WsConfig::default();
    let ws_outbound_bytes = args
        .ws_outbound_bytes
        .or(file.ws_outbound_bytes)
        .map_or(Ok(ws_defaults.outbound_bytes), usize::try_from)
        .context("WebSocket outbound bytes do not fit in memory")?;
    if ws_outbound_bytes < 4096 {
        bail!(
            "WebSocket outbound bytes (--ws-outbound-bytes / ws_outbound_bytes) must be at least 4KiB, got {ws_outbound_bytes}"
        );
    }
    let ws_max_inflight_publish_bytes = args
        .ws_max_inflight_publish_bytes
        .or(file.ws_max_inflight_publish_bytes)
        .map_or(Ok(ws_defaults.max_inflight_publish_bytes), usize::try_from)
        .context("WebSocket in-flight publish bytes do not fit in memory")?;
    if ws_max_inflight_publish_bytes == 0 {
        bail!(
            "WebSocket in-flight publish bytes (--ws-max-inflight-publish-bytes / ws_max_inflight_publish_bytes) must be at least 1"
        );
    }
    let conflate = if args.conflate.is_empty() {
        file.conflate.unwrap_or_default()
    } else {
        args.conflate.clone()
    };
    if conflate.iter().any(|p| p.trim().is_empty()) {
        bail!("a conflate pattern must not be empty");
    }
    let ws = WsConfig {
        session_ttl: positive(
            "session TTL (--session-ttl / session_ttl)",
            args.session_ttl.or(file.session_ttl),
            ws_defaults.session_ttl,
        )?,
        ping_interval: positive(
            "WebSocket ping interval (--ws-ping-interval / ws_ping_interval)",
            args.ws_ping_interval.or(file.ws_ping_interval),
            ws_defaults.ping_interval,
        )?,
        ping_timeout: positive(
            "WebSocket ping timeout (--ws-ping-timeout / ws_ping_timeout)",
            args.ws_ping_timeout.or(file.ws_ping_timeout),
            ws_defaults.ping_timeout,
        )?,
        outbound_messages: at_least_one(
            "WebSocket outbound messages (--ws-outbound-messages / ws_outbound_messages)",
            args.ws_outbound_messages.or(file.ws_outbound_messages),
            ws_defaults.outbound_messages,
        )?,
        outbound_bytes: ws_outbound_bytes,
        stuck_timeout: positive(
            "stuck timeout (--stuck-timeout / stuck_timeout)",
            args.stuck_timeout.or(file.stuck_timeout),
            ws_defaults.stuck_timeout,
        )?,
        conflate: conflate
            .iter()
            .map(|p| spool_core::Pattern::new(p))
            .collect(),
        max_inflight_publishes: at_least_one(
            "WebSocket in-flight publishes (--ws-max-inflight-publishes / ws_max_inflight_publishes)",
            args.ws_max_inflight_publishes
                .or(file.ws_max_inflight_publishes),
            ws_defaults.max_inflight_publishes,
        )?,
        max_inflight_publish_bytes: ws_max_inflight_publish_bytes,
        ..ws_defaults
    };
    let http_defaults = HttpConfig::default();
    let http = HttpConfig {
        max_connections: at_least_one(
            "connection limit (--max-connections / max_connections)",
            args.max_connections.or(file.max_connections),
            http_defaults.max_connections,
        )?,
        max_connections_per_ip: args
            .max_connections_per_ip
            .or(file.max_connections_per_ip)
            .unwrap_or(http_defaults.max_connections_per_ip),
        header_timeout: positive(
            "header timeout (--header-timeout / header_timeout)",
            args.header_timeout.or(file.header_timeout),
            http_defaults.header_timeout,
        )?,
        idle_timeout: positive(
            "idle timeout (--idle-timeout / idle_timeout)",
            args.idle_timeout.or(file.idle_timeout),
            http_defaults.idle_timeout,
        )?,
        body_timeout: positive(
            "body timeout (--body-timeout / body_timeout)",
            args.body_timeout.or(file.body_timeout),
            http_defaults.body_timeout,
        )?,
    };
    let max_read_bytes = args
        .max_read_bytes
        .or(file.max_read_bytes)
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
        heartbeat: args
            .heartbeat
            .or(file.heartbeat)
            .unwrap_or(defaults_server.heartbeat),
        cors_origins: if args.cors_origin.is_empty() {
            file.cors_origins.unwrap_or_default()
        } else {
            args.cors_origin.clone()
        },
        auth,
        ws,
        http,
        max_new_streams_per_minute: args
            .max_new_streams_per_minute
            .or(file.max_new_streams_per_minute)
            .unwrap_or(defaults_server.max_new_streams_per_minute),
        ..defaults_server
    };
    if server.heartbeat.is_zero() {
        bail!("heartbeat must be longer than zero");
    }
    Ok(Resolved {
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7070))),
        engine,
        retention,
        dedup_window: args
            .dedup_window
            .or(file.dedup_window)
            .unwrap_or(Duration::from_secs(120)),
        shutdown_timeout: args
            .shutdown_timeout
            .or(file.shutdown_timeout)
            .unwrap_or(Duration::from_secs(10)),
        json_logs,
        server,
        max_streams: at_least_one(
            "stream limit (--max-streams / max_streams)",
            args.max_streams.or(file.max_streams),
            spool_engine::memory::MemoryConfig::default().max_streams,
        )?,
        max_unpublished_streams: at_least_one(
            "unpublished stream limit (--max-unpublished-streams / max_unpublished_streams)",
            args.max_unpublished_streams
                .or(file.max_unpublished_streams),
            spool_engine::memory::MemoryConfig::default().max_unpublished_streams,
        )?,
        max_idempotency_keys: at_least_one(
            "idempotency key limit (--max-idempotency-keys / max_idempotency_keys)",
            args.max_idempotency_keys.or(file.max_idempotency_keys),
            spool_engine::memory::MemoryConfig::default().max_idempotency_keys,
        )?,
        max_sessions: at_least_one(
            "session limit (--max-sessions / max_sessions)",
            args.max_sessions.or(file.max_sessions),
            spool_engine::memory::MemoryConfig::default().max_sessions,
        )?,
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

fn engine_timeout(args: &ServeArgs, file: Option<Duration>) -> anyhow::Result<Duration> {
    positive(
        "engine timeout (--engine-timeout / engine_timeout)",
        args.engine_timeout.or(file),
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
        serve: ServeArgs,
    }

    fn args(argv: &[&str]) -> ServeArgs {
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
}
