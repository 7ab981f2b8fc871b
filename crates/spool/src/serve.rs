//! `spool serve`: resolve the configuration, build the engine, serve until SIGTERM/SIGINT.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use spool_disk::{DiskConfig, DiskEngine};
use spool_engine::{Engine, GroupStore, MemoryEngine, SessionStore, memory::MemoryConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{self, EngineKind, Settings};

pub async fn run(args: Settings) -> anyhow::Result<()> {
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

    // Every engine keeps the sessions too: the same instance is the log and the session store,
    // and, for engines whose group store is written (`stores_with_groups`), the group store.
    let (engine, session_store, group_store) = match resolved.engine {
        EngineKind::Memory => {
            tracing::warn!(
                "memory engine: history is lost on restart and every stream gets a new epoch"
            );
            stores_with_groups(MemoryEngine::new(MemoryConfig {
                retention: resolved.retention.clone(),
                dedup_window: resolved.dedup_window,
                max_streams: resolved.max_streams,
                max_unpublished_streams: resolved.max_unpublished_streams,
                max_idempotency_keys: resolved.max_idempotency_keys,
                max_sessions: resolved.max_sessions,
                max_groups: resolved.max_groups,
                ..MemoryConfig::default()
            }))
        }
        EngineKind::Disk {
            dir,
            durability,
            segment_size,
            cache_size,
        } => {
            let config = DiskConfig {
                durability,
                cache_size,
                retention: resolved.retention.clone(),
                dedup_window: resolved.dedup_window,
                segment_size,
                max_streams: resolved.max_streams,
                max_unpublished_streams: resolved.max_unpublished_streams,
                max_idempotency_keys: resolved.max_idempotency_keys,
                max_sessions: resolved.max_sessions,
                max_groups: resolved.max_groups,
                ..DiskConfig::new(dir)
            };
            tracing::info!(dir = %config.dir.display(), ?durability, "opening the disk engine");
            let engine = tokio::task::spawn_blocking(move || DiskEngine::open(config))
                .await
                .context("the disk engine's recovery panicked")??;
            stores_with_groups(engine)
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
                durability,
                retention: resolved.retention.clone(),
                dedup_window: resolved.dedup_window,
                timeout,
                max_groups: resolved.max_groups,
                ..spool_redis::RedisConfig::new(url)
            };
            stores_with_groups(
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
                durability,
                replicas,
                retention: resolved.retention.clone(),
                dedup_window: resolved.dedup_window,
                session_max_age: resolved.server.ws.session_ttl.max(Duration::from_secs(60)),
                timeout,
                max_unpublished_streams: resolved.max_unpublished_streams,
                max_groups: resolved.max_groups,
                ..spool_nats::NatsConfig::new(url)
            };
            // Every server of the comma-separated list, each checked, before connecting.
            let servers = config.servers().map_err(|e| {
                let why = match e {
                    spool_engine::EngineError::Internal { what, .. } => what,
                    other => other.to_string(),
                };
                anyhow::anyhow!("invalid --nats-url (SPOOL_NATS_URL, nats_url): {why}")
            })?;
            tracing::info!(servers = servers.len(), "NATS servers to connect to");
            stores_with_groups(
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
        session_store,
        group_store,
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

/// The stores `spool serve` hands the server: the log, the session store and the group store.
type Stores = (
    Arc<dyn Engine>,
    Arc<dyn SessionStore>,
    Option<Arc<dyn GroupStore>>,
);

/// `engine` as the server's log, session store and group store.
fn stores_with_groups<E: Engine + SessionStore + GroupStore>(engine: E) -> Stores {
    let engine = Arc::new(engine);
    (engine.clone(), engine.clone(), Some(engine))
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
