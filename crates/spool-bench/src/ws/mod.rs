//! The WebSocket benchmarks: Spool's `/v1/ws` (`spool.v1.json`) against socket.io 4.8 with
//! connection state recovery and NATS core pub/sub, each server a child process started by the
//! benchmark on a free 127.0.0.1 port, measured one after the other in the same run.
//!
//! - [`fanout`] (`ws-fanout`): one publisher, N subscribers (one stream, or many streams):
//!   deliveries per second and end-to-end latency, at saturation and at a fixed offered rate.
//! - [`idle`] (`ws-idle`): the server's resident memory per idle connection, stage by stage.
//! - [`resume`] (`ws-resume`): N sessions disconnect, fall behind, and all come back at once.
//! - [`publish`] (`ws-publish`): pipelined WebSocket publishes against Spool's fsync'd disk
//!   engine, and Redis `XADD` with `appendfsync always` pipelined as deep.
//!
//! [`wire`] holds the clients (one per protocol, written alike), [`server`] the servers,
//! [`measure`] the clock, histograms and `/proc` readings.

pub mod fanout;
pub mod idle;
pub(crate) mod measure;
pub mod publish;
pub mod resume;
mod server;
pub(crate) mod wire;

use std::{path::PathBuf, sync::Arc};

use clap::{Args, ValueEnum};
use parking_lot::Mutex;

/// A system a WebSocket benchmark can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WsTarget {
    /// `spool serve --engine memory --allow-anonymous`, `/v1/ws`, `spool.v1.json`.
    Spool,
    /// `node bench/socketio-server.js`: socket.io 4.8, connection state recovery on.
    Socketio,
    /// `nats-server` (core pub/sub, no JetStream), plain TCP.
    Nats,
}

impl WsTarget {
    pub fn name(self) -> &'static str {
        match self {
            WsTarget::Spool => "spool",
            WsTarget::Socketio => "socketio",
            WsTarget::Nats => "nats",
        }
    }
}

/// How to start the servers.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The spool binary to benchmark.
    #[arg(long, value_name = "PATH", default_value = "target/release/spool")]
    pub spool_bin: PathBuf,
    /// Extra argument for `spool serve` (repeatable), e.g. `--server-arg=--ws-outbound-messages=64`.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// The Node.js binary that runs the socket.io peer.
    #[arg(long, value_name = "PATH", default_value = "node")]
    pub node: String,
    /// The socket.io peer (its directory needs `npm ci`).
    #[arg(long, value_name = "PATH", default_value = "bench/socketio-server.js")]
    pub socketio_script: PathBuf,
    /// Extra argument for the socket.io peer (repeatable), e.g. `--socketio-arg=--backlog=4096`.
    #[arg(long = "socketio-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub socketio_args: Vec<String>,
    /// The nats-server binary.
    #[arg(long, value_name = "PATH", default_value = "nats-server")]
    pub nats_server: String,
}

/// The first few errors of many client tasks, and how many there were.
#[derive(Default)]
pub struct Errors {
    count: std::sync::atomic::AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Errors {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn record(&self, e: &anyhow::Error) {
        self.count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let text = format!("{e:#}");
        let mut samples = self.samples.lock();
        if samples.len() < 3 && !samples.contains(&text) {
            samples.push(text);
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn samples(&self) -> Vec<String> {
        self.samples.lock().clone()
    }
}

/// Stream `i` of a benchmark (a Spool stream, a socket.io room, a NATS subject).
pub fn stream_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i}")
}

/// Writes a JSON report when asked to.
pub fn write_json(path: Option<&PathBuf>, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(path, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Facts about the machine for the reports.
pub fn machine_line() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| {
            l.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
                .into()
        })
        .unwrap_or_default();
    format!(
        "{cpus} CPUs shared by the servers and the load generator; load average before the run: {load}"
    )
}
