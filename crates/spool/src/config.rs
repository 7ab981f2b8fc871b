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
use spool_engine::disk::Durability;
use spool_server::{ServerConfig, config::AuthConfig};

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
    #[serde(default, deserialize_with = "de_opt_bytes")]
    max_payload: Option<u64>,
    api_keys: Option<Vec<String>>,
    jwt_secret: Option<String>,
    allow_anonymous: Option<bool>,
    cors_origins: Option<Vec<String>>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    dedup_window: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    heartbeat: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    shutdown_timeout: Option<Duration>,
    log_format: Option<String>,
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
            bail!("--durability fsync needs the disk engine")
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
        other => bail!("unknown engine {other:?}; available: disk, memory"),
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
    let server = ServerConfig {
        max_payload,
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
        auth: AuthConfig {
            api_keys,
            jwt_secret: args.jwt_secret.clone().or(file.jwt_secret),
            jwt_public_keys: Vec::new(),
            jwt_issuer: None,
            jwt_audience: None,
            allow_anonymous: args.allow_anonymous || file.allow_anonymous.unwrap_or(false),
        },
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
    })
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
}
