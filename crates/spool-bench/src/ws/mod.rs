//! The WebSocket benchmarks: Spool's `/v1/ws` (`spool.v1.json`) against socket.io 4.8 with
//! connection state recovery and NATS core pub/sub, each server a child process started by the
//! benchmark on a free 127.0.0.1 port, measured one after the other in the same run.
//!
//! - [`fanout`] (`ws-fanout`): one publisher, N subscribers (one stream, or many streams):
//!   deliveries per second and end-to-end latency, at saturation and at a fixed offered rate.
//! - [`idle`] (`ws-idle`): the server's resident memory per idle connection, stage by stage;
//!   [`sse_idle`] (`sse-idle`): the same for Server-Sent Events connections.
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
pub mod sse_idle;
pub(crate) mod wire;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::{Args, ValueEnum};
use parking_lot::Mutex;

/// How often [`wait_until`] looks.
const SETUP_POLL: Duration = Duration::from_millis(20);

/// A system a WebSocket benchmark can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WsTarget {
    /// `spool serve --engine memory --allow-anonymous`, `/v1/ws`, `spool.v1.json`.
    Spool,
    /// `node bench/socketio-server.js`: socket.io 4.8, connection state recovery on.
    Socketio,
    /// `nats-server` (core pub/sub, no JetStream), plain TCP.
    Nats,
    /// `spool serve --engine memory --anycable-public-streams`, `/cable`,
    /// `actioncable-v1-ext-json`, `$pubsub` public streams (published to over `/v1/ws`).
    Cable,
}

impl WsTarget {
    pub fn name(self) -> &'static str {
        match self {
            WsTarget::Spool => "spool",
            WsTarget::Socketio => "socketio",
            WsTarget::Nats => "nats",
            WsTarget::Cable => "cable",
        }
    }
}

/// How to start the servers.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    #[command(flatten)]
    pub spool: crate::SpoolBinArgs,
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
    count: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Errors {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn record(&self, e: &anyhow::Error) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let text = format!("{e:#}");
        let mut samples = self.samples.lock();
        if samples.len() < 3 && !samples.contains(&text) {
            samples.push(text);
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn samples(&self) -> Vec<String> {
        self.samples.lock().clone()
    }
}

/// Polls `done` until it says yes (`Ok(true)`), checking `alive` (the server) between looks;
/// `Ok(false)` when `timeout` passed first.
pub async fn wait_until(
    timeout: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
    alive: impl Fn() -> anyhow::Result<()>,
) -> anyhow::Result<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !done()? {
        if tokio::time::Instant::now() > deadline {
            return Ok(false);
        }
        alive()?;
        tokio::time::sleep(SETUP_POLL).await;
    }
    Ok(true)
}

/// Waits until every one of `n` subscriber tasks is `ready` or has failed (`errors`),
/// checking `alive` (the servers) between looks; after `timeout`, fails with "only R of N
/// subscribers DONE within T".
pub async fn wait_for_subscribers(
    n: usize,
    ready: &AtomicUsize,
    errors: &Errors,
    done: &str,
    timeout: Duration,
    alive: impl Fn() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let all_set = || Ok(ready.load(Ordering::Relaxed) + errors.count() as usize >= n);
    if !wait_until(timeout, all_set, alive).await? {
        anyhow::bail!(
            "only {} of {n} subscribers {done} within {timeout:?}",
            ready.load(Ordering::Relaxed)
        );
    }
    Ok(())
}

/// Stream `i` of a benchmark (a Spool stream, a socket.io room, a NATS subject).
pub fn stream_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i}")
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
