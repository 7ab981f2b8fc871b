//! `spool-bench storage`: candidate storage engines for Spool's durable engine, measured
//! in-process (no HTTP), so the design choice rests on numbers.
//!
//! Every candidate does the same thing: C client tasks each append their share of the
//! messages, one 256-byte record at a time, and wait until the record is durable (fsynced)
//! before appending the next. Each (candidate, concurrency) run gets a fresh directory under
//! `--dir`, so every candidate writes to the same filesystem and starts empty.
//!
//! - `spool-wal` ([`wal`]): Spool's own disk engine (shared WAL, group commit).
//! - `redb` ([`redb`]) and `fjall` ([`fjall`]): the same group-commit design ([`group`]: one
//!   writer thread drains a bounded channel, one durable commit per drained batch, then acks
//!   every appender) on top of a B-tree store and an LSM store.
//! - `file-per-stream` ([`files`]): one append-only file per stream, write + fdatasync per
//!   append under the stream's mutex.
//!
//! The timing loop is the publish benchmark's ([`crate::runner`]): each candidate is a
//! [`Target`] whose publishers call [`Store::append`]. After each run the records the store
//! holds are counted and compared with what was acked.

mod files;
mod fjall;
mod group;
mod redb;
mod wal;

use std::{fmt::Write as _, path::PathBuf, str::FromStr, sync::Arc};

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use tempfile::TempDir;

use crate::{
    publish::Verdict,
    runner::{self, RunConfig, RunResult},
    targets::{Publisher, Target},
    workload::Workload,
};

/// Options of `spool-bench storage`.
#[derive(Args, Debug, Clone)]
pub struct StorageArgs {
    #[command(flatten)]
    pub load: crate::LoadArgs,
    /// Streams appended to, round-robin; `clients` gives every run as many streams as
    /// appenders (each appender then owns one stream).
    #[arg(long, value_name = "N|clients", default_value = "1")]
    pub streams: StreamCount,
    /// Candidates, in this order at each concurrency.
    #[arg(
        long,
        value_name = "C,C,…",
        value_delimiter = ',',
        default_value = "spool-wal,redb,fjall,file-per-stream"
    )]
    pub candidates: Vec<Candidate>,
    /// Where the runs' fresh directories are made (default: the system temp directory).
    #[arg(long, value_name = "PATH")]
    pub dir: Option<PathBuf>,
}

/// How many streams a run appends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamCount {
    Fixed(u16),
    /// As many as the run has clients.
    PerClient,
}

impl StreamCount {
    fn resolve(self, clients: u16) -> u16 {
        match self {
            Self::Fixed(n) => n,
            Self::PerClient => clients,
        }
    }
}

impl FromStr for StreamCount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "clients" {
            return Ok(Self::PerClient);
        }
        match s.parse::<u16>() {
            Ok(n) if n > 0 => Ok(Self::Fixed(n)),
            _ => Err(format!(
                "expected a stream count from 1 to {} or `clients`",
                u16::MAX
            )),
        }
    }
}

/// The storage engines that can be measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Candidate {
    /// Spool's disk engine: shared WAL, group commit, fdatasync (`Durability::Fsync`).
    SpoolWal,
    /// redb behind a group-commit writer thread: one `Durability::Immediate` write
    /// transaction per drained batch.
    Redb,
    /// fjall behind a group-commit writer thread: one write batch per drained batch, persisted
    /// with `PersistMode::SyncAll`.
    Fjall,
    /// One append-only file per stream: write + fdatasync per append, under the stream's lock.
    FilePerStream,
}

impl Candidate {
    fn name(self) -> &'static str {
        match self {
            Self::SpoolWal => "spool-wal",
            Self::Redb => "redb",
            Self::Fjall => "fjall",
            Self::FilePerStream => "file-per-stream",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Self::SpoolWal => {
                "spool_disk::DiskEngine, Durability::Fsync (one write + one fdatasync per drained batch)"
            }
            Self::Redb => {
                "redb 4: writer thread, one write transaction (Durability::Immediate) per drained batch, key (stream, offset)"
            }
            Self::Fjall => {
                "fjall 3: writer thread, one write batch per drained batch, PersistMode::SyncAll, key stream ‖ offset (big-endian)"
            }
            Self::FilePerStream => {
                "one file per stream: length-prefixed record, write + fdatasync under the stream's mutex, on the blocking pool"
            }
        }
    }

    /// Opens a fresh store of this kind in `dir`.
    async fn open(self, dir: &std::path::Path, streams: u16) -> Result<Arc<dyn Store>> {
        Ok(match self {
            Self::SpoolWal => Arc::new(wal::WalStore::open(dir, streams)?),
            Self::Redb => Arc::new(redb::RedbStore::open(dir)?),
            Self::Fjall => Arc::new(fjall::FjallStore::open(dir)?),
            Self::FilePerStream => Arc::new(files::FileStore::open(dir, streams)?),
        })
    }
}

/// A storage engine as the benchmark drives it.
#[async_trait]
pub trait Store: Send + Sync {
    /// Appends one record to stream `stream` (an index, `0..streams`) and returns once it is
    /// durable.
    async fn append(&self, stream: usize, payload: Bytes) -> Result<()>;

    /// Records the store holds, counted from the store itself.
    async fn stored(&self) -> Result<u64>;

    /// Durable commits (fsync rounds) so far, when the store knows.
    fn commits(&self) -> Option<u64> {
        None
    }
}

/// One candidate in its own fresh directory, as a [`Target`] for the runner.
struct StoreTarget {
    candidate: Candidate,
    // Dropped before the directory.
    store: Arc<dyn Store>,
    workload: Arc<Workload>,
    _dir: TempDir,
}

#[async_trait]
impl Target for StoreTarget {
    fn name(&self) -> &str {
        self.candidate.name()
    }

    fn description(&self) -> String {
        self.candidate.description().to_owned()
    }

    async fn connect(&self, _client_idx: usize) -> Result<Box<dyn Publisher>> {
        Ok(Box::new(StorePublisher {
            store: self.store.clone(),
            workload: self.workload.clone(),
        }))
    }
}

struct StorePublisher {
    store: Arc<dyn Store>,
    workload: Arc<Workload>,
}

#[async_trait]
impl Publisher for StorePublisher {
    async fn publish_one(&mut self, seq: u64) -> Result<()> {
        self.store
            .append(self.workload.stream_index(seq), self.workload.payload(seq))
            .await
    }
}

/// One row of the report.
struct Row {
    streams: u16,
    run: RunResult,
    /// Records acked, warm-up included.
    acked_total: u64,
    stored: Result<u64, String>,
    commits: Option<u64>,
}

impl Row {
    fn clean(&self) -> bool {
        self.run.all_errors() == 0 && self.stored.as_ref().is_ok_and(|n| *n == self.acked_total)
    }
}

/// Runs every candidate at every concurrency and prints the report.
pub async fn run(args: StorageArgs) -> Result<Verdict> {
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let mut rows = Vec::new();
    for &clients in &args.load.clients {
        let streams = args.streams.resolve(clients);
        let workload = Arc::new(Workload::new(streams, args.load.size));
        for &candidate in &args.candidates {
            let dir = tempfile::Builder::new()
                .prefix(&format!("spool-storage-{}-", candidate.name()))
                .tempdir_in(&base)
                .with_context(|| format!("cannot create a directory in {}", base.display()))?;
            let store = candidate
                .open(dir.path(), streams)
                .await
                .with_context(|| format!("cannot open {}", candidate.name()))?;
            let target = StoreTarget {
                candidate,
                store: store.clone(),
                workload: workload.clone(),
                _dir: dir,
            };
            eprintln!(
                "spool-bench storage: {} streams={streams} clients={clients} …",
                candidate.name()
            );
            let config = RunConfig {
                clients: usize::from(clients),
                messages: args.load.messages,
                warmup: args.load.warmup,
            };
            let run = runner::run(&target, config).await?;
            let acked_total = args.load.warmup - run.warmup_errors + run.acked;
            let stored = store.stored().await.map_err(|e| format!("{e:#}"));
            let commits = store.commits();
            drop(store);
            drop(target);
            rows.push(Row {
                streams,
                run,
                acked_total,
                stored,
                commits,
            });
        }
    }
    print!("{}", render(&args, &base, &rows));
    Ok(if rows.iter().all(Row::clean) {
        Verdict::Clean
    } else {
        Verdict::Failed
    })
}

/// The markdown report.
fn render(args: &StorageArgs, base: &std::path::Path, rows: &[Row]) -> String {
    let mut out = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let _ = writeln!(
        out,
        "## Storage candidates: durable appends ({} B records, {} per run after {} warm-up, \
         each waits for its fsync; {cpus} CPUs; directories in {})\n",
        args.load.size,
        args.load.messages,
        args.load.warmup,
        base.display()
    );
    let _ = writeln!(
        out,
        "| candidate | streams | clients | msgs/s | p50 ms | p99 ms | vs spool-wal | records/fsync |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let r = &row.run;
        let baseline = rows
            .iter()
            .find(|b| {
                b.run.target == Candidate::SpoolWal.name()
                    && b.run.clients == r.clients
                    && b.streams == row.streams
            })
            .filter(|b| b.run.target != r.target);
        let ratio = baseline
            .map(|b| b.run.msgs_per_sec())
            .filter(|b| *b > 0.0)
            .map_or_else(
                || "—".to_owned(),
                |b| format!("{:.2}×", r.msgs_per_sec() / b),
            );
        let ms = |q| {
            r.latency_ms(q)
                .map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"))
        };
        let per_commit = row.commits.filter(|c| *c > 0).map_or_else(
            || "—".to_owned(),
            |c| format!("{:.1}", row.acked_total as f64 / c as f64),
        );
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} | {ratio} | {per_commit} |",
            r.target,
            row.streams,
            r.clients,
            r.msgs_per_sec(),
            ms(0.50),
            ms(0.99),
        );
    }
    let _ = writeln!(
        out,
        "\nvs spool-wal: msgs/s over spool-wal's at the same streams and clients. \
         records/fsync: records (warm-up included) per durable commit, where the store counts them."
    );
    let _ = writeln!(out, "\nCandidates:\n");
    for c in &args.candidates {
        let _ = writeln!(out, "- `{}`: {}", c.name(), c.description());
    }
    let mut problems = String::new();
    for row in rows.iter().filter(|r| !r.clean()) {
        let r = &row.run;
        let stored = match &row.stored {
            Ok(n) => n.to_string(),
            Err(e) => format!("cannot count ({e})"),
        };
        let _ = writeln!(
            problems,
            "- {} streams={} clients={}: {} errors, {} acked, {stored} stored{}",
            r.target,
            row.streams,
            r.clients,
            r.all_errors(),
            row.acked_total,
            r.error_samples
                .iter()
                .map(|e| format!("; {e}"))
                .collect::<String>()
        );
    }
    if problems.is_empty() {
        let _ = writeln!(
            out,
            "\nCheck: every append acked, and every store holds exactly what was acked."
        );
    } else {
        let _ = writeln!(out, "\nProblems:\n\n{problems}");
    }
    out
}
