//! The servers of the WebSocket benchmarks, each a child process on a free 127.0.0.1 port,
//! stopped when its guard drops: `spool serve`, the socket.io peer (`node
//! bench/socketio-server.js`) and `nats-server` (core pub/sub, no JetStream).

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result, bail};

use super::{ServerArgs, WsTarget, measure};
use crate::{
    spool_process::{SpoolEngine, SpoolProcess},
    targets::process::PeerProcess,
};

enum Guard {
    Spool(SpoolProcess),
    Peer(PeerProcess),
}

/// A running server.
pub struct Server {
    pub target: WsTarget,
    pub addr: SocketAddr,
    pub pid: u32,
    /// How it was started, for the report.
    pub command_line: String,
    guard: Guard,
    http: reqwest::Client,
}

impl Server {
    /// Starts `target`; `engine` matters for Spool only.
    pub async fn start(target: WsTarget, args: &ServerArgs, engine: SpoolEngine) -> Result<Self> {
        let (guard, addr, pid, command_line) = match target {
            WsTarget::Spool | WsTarget::Cable => {
                let mut server_args = vec![
                    "--allow-anonymous".to_owned(),
                    "--anycable-public-streams".to_owned(),
                ];
                server_args.extend(args.spool.server_args.iter().cloned());
                let process =
                    SpoolProcess::start_on(&args.spool.spool_bin, engine, &server_args).await?;
                let (addr, pid) = (process.addr(), process.pid());
                let line = process.command_line().to_owned();
                (Guard::Spool(process), addr, pid, line)
            }
            WsTarget::Socketio => {
                let script = &args.socketio_script;
                check_socketio(script)?;
                let script = script.display().to_string();
                let process = PeerProcess::start(&args.node, |port, _dir| {
                    let mut argv = vec![
                        "--expose-gc".into(),
                        script.clone(),
                        "--port".into(),
                        port.to_string(),
                    ];
                    argv.extend(args.socketio_args.iter().cloned());
                    argv
                })
                .await?;
                let (addr, pid, line) = (process.addr, process.pid(), process.command_line.clone());
                (Guard::Peer(process), addr, pid, line)
            }
            WsTarget::Nats => {
                let process = PeerProcess::start(&args.nats_server, |port, _dir| {
                    vec![
                        "-a".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        port.to_string(),
                    ]
                })
                .await?;
                let (addr, pid, line) = (process.addr, process.pid(), process.command_line.clone());
                (Guard::Peer(process), addr, pid, line)
            }
        };
        Ok(Self {
            target,
            addr,
            pid,
            command_line,
            guard,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .context("cannot build an HTTP client")?,
        })
    }

    /// The name in reports.
    pub fn name(&self) -> &'static str {
        self.target.name()
    }

    pub fn rss_kib(&self) -> Result<u64> {
        measure::rss_kib(self.pid)
    }

    pub fn cpu_mark(&self) -> Result<measure::CpuMark> {
        measure::CpuMark::now(self.pid)
    }

    /// Lets the server settle before a memory reading: socket.io's Node runs a full garbage
    /// collection (Spool and NATS free memory as they go).
    pub async fn settle(&self, pause: Duration) {
        if self.target == WsTarget::Socketio {
            let _ = self
                .http
                .get(format!("http://{}/gc", self.addr))
                .send()
                .await;
        }
        tokio::time::sleep(pause).await;
    }

    /// Open client connections as the server counts them (Spool: the `ws` connection gauge of
    /// `/metrics`; socket.io: engine.io's client count); `None` for NATS.
    pub async fn connections(&self) -> Result<Option<u64>> {
        match self.target {
            WsTarget::Spool | WsTarget::Cable => {
                let text = self
                    .http
                    .get(format!("http://{}/metrics", self.addr))
                    .send()
                    .await?
                    .text()
                    .await?;
                Ok(text
                    .lines()
                    .find(|l| l.starts_with(r#"spool_connections{transport="ws"}"#))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|n| n.parse::<f64>().ok())
                    .map(|n| n as u64)
                    .or(Some(0)))
            }
            WsTarget::Socketio => {
                let stats: serde_json::Value = self
                    .http
                    .get(format!("http://{}/stats", self.addr))
                    .send()
                    .await?
                    .json()
                    .await?;
                Ok(stats["clients"].as_u64())
            }
            WsTarget::Nats => Ok(None),
        }
    }

    /// Waits (at most `timeout`) until the server counts at most `n` connections.
    pub async fn wait_connections(&self, n: u64, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.connections().await? {
                None => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    return Ok(());
                }
                Some(open) if open <= n => return Ok(()),
                Some(open) if tokio::time::Instant::now() > deadline => {
                    bail!(
                        "{} still counts {open} connections after {timeout:?}",
                        self.name()
                    )
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Fails when the server has exited.
    pub fn check_alive(&self) -> Result<()> {
        match &self.guard {
            Guard::Spool(process) => process.check_alive(),
            Guard::Peer(process) => process.check_alive(),
        }
    }
}

/// The socket.io peer needs its script and `npm ci` in its directory.
fn check_socketio(script: &Path) -> Result<()> {
    if !script.is_file() {
        bail!(
            "{} not found: run from the repository root or pass --socketio-script",
            script.display()
        );
    }
    let modules = script
        .parent()
        .unwrap_or(Path::new("."))
        .join("node_modules/socket.io");
    if !modules.is_dir() {
        bail!(
            "{} is missing: run `npm ci --prefix {}` first",
            modules.display(),
            script.parent().unwrap_or(Path::new(".")).display()
        );
    }
    Ok(())
}
