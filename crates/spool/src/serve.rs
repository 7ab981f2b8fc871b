//! `spool serve`: resolve the configuration, build the engine, serve until SIGTERM/SIGINT.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use spool_disk::{DiskConfig, DiskEngine};
use spool_engine::{Engine, GroupStore, MemoryEngine, SessionStore, memory::MemoryConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{self, EngineKind, Settings};

/// A fatal error already written to the log (as JSON, with `--log-format json`): `main` exits
/// with a failure without printing it again.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reported")
    }
}

impl std::error::Error for Reported {}

pub async fn run(args: Settings) -> anyhow::Result<()> {
    let json = wants_json(&args);
    match serve(args).await {
        Ok(()) => Ok(()),
        Err(e) if json => {
            init_logging(true);
            tracing::error!(error = %crate::error_chain(&e), "spool serve failed");
            Err(Reported.into())
        }
        Err(e) => Err(e),
    }
}

/// Whether fatal errors are to be logged as JSON: `--log-format json` (or `SPOOL_LOG_FORMAT`),
/// or `log_format = "json"` in the configuration file, even when the rest of the
/// configuration does not resolve.
fn wants_json(args: &Settings) -> bool {
    let format = args.log_format.clone().or_else(|| {
        let path = args.config.as_ref()?;
        Settings::load(path).ok()?.log_format
    });
    format.as_deref() == Some("json")
}

async fn serve(args: Settings) -> anyhow::Result<()> {
    let resolved = config::resolve(&args)?;
    init_logging(resolved.json_logs);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting spool");

    // The listen address is bound before the engine opens, so a port in use fails at once,
    // not after the disk engine's recovery; until the engine is ready, the port answers every
    // request with 503 (and /healthz with 200) from `answer_while_starting`.
    let listener = listen(resolved.listen).with_context(|| {
        format!(
            "cannot listen on {} (--listen / SPOOL_LISTEN / listen)",
            resolved.listen
        )
    })?;
    let addr = listener.local_addr()?;
    let metrics_listener = match resolved.metrics_listen {
        Some(at) => Some(listen(at).with_context(|| {
            format!(
                "cannot listen on {at} (--metrics-listen / SPOOL_METRICS_LISTEN / metrics_listen)"
            )
        })?),
        None => None,
    };
    if let Some(m) = &metrics_listener {
        tracing::info!(addr = %m.local_addr()?, "serving /metrics on the internal address");
    }
    tracing::info!(%addr, "bound the listen address; opening the engine (requests get 503 until it is ready)");

    let draining = resolved.server.draining.clone();
    let shutdown = CancellationToken::new();
    let signals = signal_shutdown(draining, shutdown.clone(), resolved.shutdown_drain)?;
    tokio::spawn(signals);
    #[cfg(unix)]
    tokio::spawn(sighup_logged(resolved.server.http.tls.is_some())?);

    // Every engine keeps the sessions too: the same instance is the log and the session store,
    // and, for engines whose group store is written (`stores_with_groups`), the group store.
    let opening = open_engine(&resolved);
    let (engine, session_store, group_store) = tokio::select! {
        opened = opening => opened?,
        never = answer_while_starting(&listener) => match never {},
    };
    tracing::info!(%addr, engine = engine.name(), "listening");
    let server = tokio::spawn(spool_server::serve(
        listener,
        spool_server::Extras {
            metrics: metrics_listener,
        },
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

/// Registers a SIGHUP handler now, whatever the configuration: SIGHUP's default action ends
/// the process, and `systemctl reload` (deploy/spool.service: ExecReload sends SIGHUP) must
/// never stop a server. With TLS the listener reloads its certificate on SIGHUP (and logs it,
/// `spool_server::tls`); without, there is nothing to reload, and that is logged.
#[cfg(unix)]
fn sighup_logged(tls: bool) -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?;
    Ok(async move {
        while hangups.recv().await.is_some() {
            if !tls {
                tracing::info!("SIGHUP: nothing to reload (no --tls-cert); still serving");
            }
        }
    })
}

/// Registers SIGTERM and SIGINT handlers now — before the server reports that it listens, so
/// a signal that arrives at any time after that is a graceful shutdown, never the default
/// kill — and returns the future that, on the first of them, cancels `draining` (`/readyz`
/// answers 503 while everything else works on), then `shutdown` once `drain` has passed or at
/// a second signal.
#[cfg(unix)]
fn signal_shutdown(
    draining: CancellationToken,
    shutdown: CancellationToken,
    drain: Duration,
) -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        draining.cancel();
        if !drain.is_zero() {
            tracing::info!(
                ?drain,
                "shutting down: /readyz answers 503 for the drain window, then the listener closes (a second signal ends the wait)"
            );
            tokio::select! {
                _ = tokio::time::sleep(drain) => {}
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        shutdown.cancel();
    })
}

#[cfg(not(unix))]
fn signal_shutdown(
    draining: CancellationToken,
    shutdown: CancellationToken,
    drain: Duration,
) -> anyhow::Result<impl Future<Output = ()>> {
    Ok(async move {
        let _ = tokio::signal::ctrl_c().await;
        draining.cancel();
        tokio::select! {
            _ = tokio::time::sleep(drain) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        shutdown.cancel();
    })
}

/// Most connections answered at once while the engine opens; more are closed unanswered.
const STARTING_CONNECTIONS: usize = 256;

/// While the engine opens (the disk engine's recovery), answers every connection on the bound
/// listen address: `/healthz` 200 (the process is alive), `/readyz` 503 `starting`, anything
/// else 503 `engine_unavailable` with `Retry-After: 1`. Each connection is bounded in time
/// (5 s), in what it may send (8 KiB of request head) and in number. Runs until dropped.
async fn answer_while_starting(listener: &tokio::net::TcpListener) -> std::convert::Infallible {
    let slots = Arc::new(tokio::sync::Semaphore::new(STARTING_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                if let Ok(slot) = slots.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), answer_starting(tcp))
                            .await;
                        drop(slot);
                    });
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn answer_starting(mut tcp: tokio::net::TcpStream) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let path = line
        .split(|&b| b == b' ')
        .nth(1)
        .and_then(|p| p.split(|&b| b == b'?').next())
        .unwrap_or_default();
    let (status, body) = match path {
        b"/healthz" => ("200 OK", r#"{"status":"ok","phase":"starting"}"#),
        b"/readyz" => (
            "503 Service Unavailable",
            r#"{"status":"starting","message":"the engine is opening (the disk engine reads its log; a cluster engine connects)"}"#,
        ),
        _ => (
            "503 Service Unavailable",
            r#"{"error":{"code":"engine_unavailable","message":"the server is starting: the engine is opening (the disk engine reads its log; a cluster engine connects); retry shortly"}}"#,
        ),
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(answer.as_bytes()).await?;
    tcp.shutdown().await
}

pub fn init_logging(json: bool) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_env("SPOOL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A failed write of a log line (stderr's reader gone: a supervisor or pipe that ended)
    // loses that line, nothing more: with internal errors logged, tracing-subscriber reports
    // the failure with `eprintln!`, which panics on the same broken stderr — in whichever task
    // logged, e.g. the one that turns SIGTERM into a shutdown, leaving a server that no signal
    // stops.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .log_internal_errors(false);
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

/// Builds the engine `resolved` names: for the disk engine, its recovery.
async fn open_engine(resolved: &config::Resolved) -> anyhow::Result<Stores> {
    Ok(match resolved.engine.clone() {
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
            let shown = config.dir.display().to_string();
            let engine = tokio::task::spawn_blocking(move || DiskEngine::open(config))
                .await
                .context("the disk engine's recovery panicked")?
                .with_context(|| {
                    format!(
                        "cannot open the disk engine's data directory {shown} (--data-dir / SPOOL_DATA_DIR / data_dir)"
                    )
                })?;
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
                max_unpublished_streams: resolved.max_unpublished_streams,
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
    })
}
