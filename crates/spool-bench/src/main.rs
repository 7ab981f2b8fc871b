//! `spool-bench`: Spool's load generator.
//!
//! Every benchmark starts its own servers on free 127.0.0.1 ports and measures Spool next to a
//! peer in the same run, so a noisy machine shifts both and the ratio stays meaningful. This
//! file is only the command line; [`publish`] drives the publish benchmark, [`runner`] times
//! one target at one concurrency, [`targets`] holds what can be measured, [`report`] prints it;
//! [`storage`] compares storage engines in-process, and [`ws`] holds the WebSocket benchmarks
//! (`ws-fanout`, `ws-idle`, `ws-resume`, `ws-publish`) against socket.io, NATS and Redis;
//! [`cluster`] measures the cluster engines (Redis, NATS) on one and three nodes; [`groups`]
//! measures consumer groups (receive + ack) against JetStream and Redis Streams.

mod cluster;
mod groups;
mod publish;
mod readback;
mod report;
mod retained;
mod runner;
mod spool_process;
mod storage;
mod targets;
mod workload;
mod ws;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::targets::TargetKind;

#[derive(Parser)]
#[command(
    name = "spool-bench",
    version,
    about = "Load generator for Spool: throughput and latency against a peer in the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish throughput and ack latency (HTTP), then read everything back to check it.
    Publish(PublishArgs),
    /// Storage-engine candidates for the durable engine, in-process: durable appends per second
    /// and append latency.
    Storage(storage::StorageArgs),
    /// WebSocket fan-out: one publisher, N subscribers (one stream or many); deliveries/s and
    /// end-to-end latency against socket.io and NATS.
    WsFanout(ws::fanout::FanoutArgs),
    /// Server memory per idle WebSocket connection with one subscription, against socket.io
    /// and NATS.
    WsIdle(ws::idle::IdleArgs),
    /// Server memory per idle Server-Sent Events connection on one stream (the SSE
    /// counterpart of ws-idle).
    SseIdle(ws::sse_idle::SseIdleArgs),
    /// Reconnect storm: N sessions come back at once, each behind, and catch up; against
    /// socket.io's connection state recovery.
    WsResume(ws::resume::ResumeArgs),
    /// Pipelined WebSocket publishes (disk engine, fsync) against Redis XADD with
    /// `appendfsync always`, pipelined as deep.
    WsPublish(ws::publish::WsPublishArgs),
    /// The cluster engines (Redis, NATS JetStream) on 1 and 3 nodes against the disk engine:
    /// HTTP publish throughput and WebSocket fan-out across nodes.
    Cluster(cluster::ClusterArgs),
    /// Consumer groups (disk engine, fsync): receive + ack throughput and latency against a
    /// JetStream pull consumer and Redis XREADGROUP + XACK; `--drain N` samples memory.
    Groups(groups::GroupsArgs),
    /// Disk engine memory with much retained history (live and after a restart), and a
    /// subscriber resuming far behind against JetStream file storage.
    Retained(retained::RetainedArgs),
}

/// The load shape shared by every benchmark: how many clients, how big, how long.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Concurrent clients (each with its own connection or task); one run per value.
    #[arg(long, value_name = "N,N,…", value_delimiter = ',', default_value = "1,16,64",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub clients: Vec<u16>,
    /// Payload size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub size: usize,
    /// Messages per run (split across the clients), after the warm-up.
    #[arg(long, value_name = "N", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,
    /// Messages per run sent before timing starts (opens connections, creates streams).
    #[arg(long, value_name = "N", default_value_t = 500)]
    pub warmup: u64,
}

/// The spool binary under test, for every benchmark that starts Spool.
#[derive(Args, Debug, Clone)]
pub struct SpoolBinArgs {
    /// The spool binary to benchmark.
    #[arg(long, value_name = "PATH", default_value = "target/release/spool")]
    pub spool_bin: PathBuf,
    /// Extra argument for `spool serve` (repeatable; for every node in `cluster`), e.g.
    /// `--server-arg=--dedup-window=1m`.
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
}

/// Where the raw results go, for every benchmark.
#[derive(Args, Debug, Clone)]
pub struct JsonArgs {
    /// Also write the raw results as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
}

impl JsonArgs {
    /// Writes `value` to `--json`'s file, when one was given.
    pub fn write(&self, value: &serde_json::Value) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let Some(path) = &self.json else {
            return Ok(());
        };
        let text =
            serde_json::to_string_pretty(value).context("cannot encode the results as JSON")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        Ok(())
    }
}

/// Options of `spool-bench publish`.
#[derive(Args, Debug, Clone)]
pub struct PublishArgs {
    #[command(flatten)]
    pub spool: SpoolBinArgs,
    #[command(flatten)]
    pub load: LoadArgs,
    /// Streams to publish to, round-robin (`bench-0`, `bench-1`, …).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub streams: u16,
    /// What to measure, in this order at each concurrency.
    #[arg(
        long,
        value_name = "T,T,…",
        value_delimiter = ',',
        default_value = "spool,peer"
    )]
    pub targets: Vec<TargetKind>,
    /// The target whose throughput the ratio column divides by.
    #[arg(long, value_name = "TARGET", default_value = "peer")]
    pub baseline: String,
    #[command(flatten)]
    pub out: JsonArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = tokio::select! {
        outcome = async {
            match cli.command {
                Command::Publish(args) => publish::run(args).await,
                Command::Storage(args) => storage::run(args).await,
                Command::WsFanout(args) => ws::fanout::run(args).await,
                Command::WsIdle(args) => ws::idle::run(args).await,
                Command::SseIdle(args) => ws::sse_idle::run(args).await,
                Command::WsResume(args) => ws::resume::run(args).await,
                Command::WsPublish(args) => ws::publish::run(args).await,
                Command::Cluster(args) => cluster::run(args).await,
                Command::Groups(args) => groups::run(args).await,
                Command::Retained(args) => retained::run(args).await,
            }
        } => outcome,
        // Dropping the benchmark future drops the server guards, which stop the servers.
        e = interrupted() => Err(e),
    };
    match outcome {
        Ok(publish::Verdict::Clean) => ExitCode::SUCCESS,
        Ok(publish::Verdict::Failed) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("spool-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C; never, if the signal cannot be watched.
async fn interrupted() -> anyhow::Error {
    match tokio::signal::ctrl_c().await {
        Ok(()) => anyhow::anyhow!("interrupted"),
        Err(_) => std::future::pending().await,
    }
}
