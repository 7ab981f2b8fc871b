//! One run: N client tasks, each on its own connection, publish a fixed number of messages
//! sequentially (send, wait for the ack, send the next) against one [`Target`].
//!
//! A warm-up phase on the same connections comes first and is not timed. Each task records
//! its ack latencies in its own histogram (no shared state on the hot path); the histograms
//! are merged when the tasks end. Throughput is acked messages over the wall time from the
//! start of the timed phase to the end of its slowest client; when the target is a server
//! process, its CPU time (user + system, from `/proc`) over the same phase is read too.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures::future::try_join_all;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::{
    targets::{Publisher, Target},
    ws::measure::CpuMark,
};

/// Highest latency the histograms track exactly (60 s, in µs); slower ones are clamped.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Significant decimal digits of the histograms.
const LATENCY_PRECISION: u8 = 3;
/// Distinct error messages kept per run to explain an error count.
const MAX_ERROR_SAMPLES: usize = 5;

/// What one run does.
#[derive(Clone, Copy, Debug)]
pub struct RunConfig {
    /// Concurrent client tasks, one connection each.
    pub clients: usize,
    /// Messages of the timed phase, split across the clients.
    pub messages: u64,
    /// Messages of the warm-up phase, split the same way.
    pub warmup: u64,
}

/// What one run measured.
#[derive(Debug)]
pub struct RunResult {
    pub target: String,
    pub clients: usize,
    /// Messages attempted in the timed phase.
    pub messages: u64,
    /// Messages acked in the timed phase.
    pub acked: u64,
    /// Messages not acked in the timed phase.
    pub errors: u64,
    /// Messages not acked during the warm-up (not timed, but reported).
    pub warmup_errors: u64,
    /// Wall time of the timed phase.
    pub elapsed: Duration,
    /// CPU time (user + system) the server process used in the timed phase, when the target
    /// is one.
    pub server_cpu: Option<Duration>,
    /// Ack latency of every acked message of the timed phase, in µs.
    pub latency_us: Histogram<u64>,
    /// A few of the errors, for the report.
    pub error_samples: Vec<String>,
}

impl RunResult {
    /// Acked messages per second of the timed phase.
    pub fn msgs_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.acked as f64 / secs
        } else {
            0.0
        }
    }

    /// Ack latency at quantile `q` (0..=1) in ms; `None` when nothing was acked.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        (!self.latency_us.is_empty()).then(|| self.latency_us.value_at_quantile(q) as f64 / 1000.0)
    }

    /// Server CPU per acked message of the timed phase, in µs.
    pub fn server_us_per_msg(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.acked > 0).then(|| cpu.as_secs_f64() * 1e6 / self.acked as f64)
    }

    /// Every error of the run, warm-up included.
    pub fn all_errors(&self) -> u64 {
        self.errors + self.warmup_errors
    }
}

/// Runs `config` against `target`.
pub async fn run(target: &dyn Target, config: RunConfig) -> Result<RunResult> {
    let publishers = try_join_all((0..config.clients).map(|i| target.connect(i)))
        .await
        .with_context(|| format!("cannot connect to {}", target.name()))?;
    let (publishers, warmup) = phase(publishers, config.warmup).await?;
    let cpu = target.server_pid().map(CpuMark::now).transpose()?;
    let started = Instant::now();
    let (_publishers, timed) = phase(publishers, config.messages).await?;
    let elapsed = started.elapsed();
    let server_cpu = cpu
        .map(|mark| mark.since().map(|(cpu, _)| cpu))
        .transpose()?;
    target.check_alive()?;

    // Warm-up errors first (they usually explain the rest); each distinct error once.
    let mut error_samples: Vec<String> = warmup
        .error_samples
        .iter()
        .map(|e| format!("warm-up: {e}"))
        .collect();
    error_samples.extend(
        timed
            .error_samples
            .into_iter()
            .filter(|e| !warmup.error_samples.contains(e)),
    );
    error_samples.truncate(MAX_ERROR_SAMPLES);
    Ok(RunResult {
        target: target.name().to_owned(),
        clients: config.clients,
        messages: config.messages,
        acked: timed.acked,
        errors: timed.errors,
        warmup_errors: warmup.errors,
        elapsed,
        server_cpu,
        latency_us: timed.latency_us,
        error_samples,
    })
}

/// Publishes `total` messages from every publisher at once and hands the publishers back.
/// Client `i` of `n` publishes sequence numbers `i, i+n, i+2n…`, so streams and payloads are
/// spread the same way whatever the concurrency.
async fn phase(
    publishers: Vec<Box<dyn Publisher>>,
    total: u64,
) -> Result<(Vec<Box<dyn Publisher>>, Tally)> {
    let clients = publishers.len() as u64;
    let tasks: Vec<_> = publishers
        .into_iter()
        .zip(0u64..)
        .map(|(mut publisher, i)| {
            let share = total / clients + u64::from(i < total % clients);
            tokio::spawn(async move {
                let mut tally = Tally::new()?;
                for k in 0..share {
                    let sent = Instant::now();
                    let outcome = publisher.publish_one(k * clients + i).await;
                    tally.record(outcome, sent.elapsed());
                }
                Ok::<_, anyhow::Error>((publisher, tally))
            })
        })
        .collect();
    let mut publishers = Vec::with_capacity(tasks.len());
    let mut total = Tally::new()?;
    for task in tasks {
        let (publisher, tally) = task.await.context("a client task panicked")??;
        total.merge(tally)?;
        publishers.push(publisher);
    }
    Ok((publishers, total))
}

/// Outcomes counted by one client (then merged).
struct Tally {
    acked: u64,
    errors: u64,
    latency_us: Histogram<u64>,
    error_samples: Vec<String>,
}

impl Tally {
    fn new() -> Result<Self> {
        Ok(Self {
            acked: 0,
            errors: 0,
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, LATENCY_PRECISION)
                .map_err(|e| anyhow!("cannot create a latency histogram: {e:?}"))?,
            error_samples: Vec::new(),
        })
    }

    fn record(&mut self, outcome: Result<()>, latency: Duration) {
        match outcome {
            Ok(()) => {
                self.acked += 1;
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                self.latency_us.saturating_record(us.max(1));
            }
            Err(e) => {
                self.errors += 1;
                self.sample(format!("{e:#}"));
            }
        }
    }

    fn sample(&mut self, error: String) {
        if self.error_samples.len() < MAX_ERROR_SAMPLES && !self.error_samples.contains(&error) {
            self.error_samples.push(error);
        }
    }

    fn merge(&mut self, other: Tally) -> Result<()> {
        self.acked += other.acked;
        self.errors += other.errors;
        self.latency_us
            .add(&other.latency_us)
            .map_err(|e| anyhow!("cannot merge latency histograms: {e:?}"))?;
        for e in other.error_samples {
            self.sample(e);
        }
        Ok(())
    }
}
