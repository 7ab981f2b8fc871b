//! `spool-bench ws-fanout`: one publisher, N subscribers, each on its own connection.
//!
//! For each stream layout (`--streams 1,1000`: N subscribers on one stream, or spread evenly
//! over 1000 streams) and each target in turn, the benchmark starts the server, connects the
//! subscribers (`--connect-concurrency` handshakes at a time), then runs these phases on the
//! same connections, each a warm-up followed by a timed window:
//!
//! - **max**: the publisher keeps `--window` messages per stream "in flight" (published and
//!   not yet delivered to every subscriber) and publishes more as deliveries arrive; this finds
//!   the deliveries/s the server sustains (closed loop, so no target is pushed into unbounded
//!   buffering);
//! - **rate R** (`--rates`): the publisher offers R deliveries/s (R ÷ subscribers-per-stream
//!   messages/s) on a fixed schedule, whatever the server manages; latency is measured from
//!   the *scheduled* send time, so a server (or publisher) that falls behind shows it.
//!
//! Every payload starts with `SEQ:STAMP_US:` (the scheduled or actual send time on this
//! process's clock); subscribers count every delivery and record latencies of the messages
//! published in the timed window, including the ones that arrive after it (the phase drains
//! before the next one starts). Throughput counts deliveries that arrived in the window.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};

use super::{
    Errors, ServerArgs, WsTarget,
    measure::{self, Latencies, Quantiles, now_us},
    server::Server,
    stream_name,
    wire::{Conn, Delivery, Publisher},
};
use crate::{JsonArgs, publish::Verdict, spool_process::SpoolEngine};

/// Longest wait for every published message to reach every subscriber after a phase.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for all subscribers to connect.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Most messages the publisher writes at once.
const MAX_BATCH: usize = 2000;
/// How often the publisher looks at its schedule and the deliveries.
const TICK: Duration = Duration::from_millis(1);

/// Options of `spool-bench ws-fanout`.
#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub servers: ServerArgs,
    /// What to measure, in this order for each stream layout.
    #[arg(
        long,
        value_name = "T,T,…",
        value_delimiter = ',',
        default_value = "spool,socketio,nats"
    )]
    pub targets: Vec<WsTarget>,
    /// Subscribers, each on its own connection with one subscription.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub subscribers: usize,
    /// Stream layouts: the subscribers are spread evenly over this many streams (one run each).
    #[arg(
        long,
        value_name = "N,N,…",
        value_delimiter = ',',
        default_value = "1,1000"
    )]
    pub streams: Vec<usize>,
    /// Payload bytes (`SEQ:STAMP:` then padding).
    #[arg(long, value_name = "BYTES", default_value_t = 128)]
    pub size: usize,
    /// Timed window of each phase.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Untimed start of each phase.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// The max phase keeps this many messages per stream not yet delivered to everyone.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub window: u64,
    /// Offered loads of the fixed-rate phases, in deliveries per second (0: none).
    #[arg(
        long,
        value_name = "R,R,…",
        value_delimiter = ',',
        default_value = "100000,250000,500000"
    )]
    pub rates: Vec<u64>,
    /// Connections being set up at once while connecting the subscribers (kept well below any
    /// listen backlog, so the setup does not wait on SYN retransmits).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub connect_concurrency: usize,
    #[command(flatten)]
    pub out: JsonArgs,
}

/// What every subscriber task shares.
struct Shared {
    delivered: AtomicU64,
    /// Latencies of messages with `rec_from <= seq <= rec_to` are recorded.
    rec_from: AtomicU64,
    rec_to: AtomicU64,
    latencies: Latencies,
    ready: AtomicUsize,
    malformed: AtomicU64,
    errors: Arc<Errors>,
}

impl Shared {
    fn on_delivery(&self, shard: usize, d: Delivery<'_>) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        match measure::parse_stamp(d.payload) {
            Some((seq, stamp)) => {
                if seq >= self.rec_from.load(Ordering::Relaxed)
                    && seq <= self.rec_to.load(Ordering::Relaxed)
                {
                    self.latencies.record(shard, now_us().saturating_sub(stamp));
                }
            }
            None => {
                self.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// How a phase drives the publisher.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Closed loop: at most this many deliveries outstanding.
    Max { window_deliveries: u64 },
    /// Open loop: this many deliveries per second offered.
    Rate { deliveries_per_sec: u64 },
}

impl Mode {
    fn label(&self) -> String {
        match self {
            Mode::Max { .. } => "max".into(),
            Mode::Rate { deliveries_per_sec } => format!("rate {}k/s", deliveries_per_sec / 1000),
        }
    }
}

/// What one phase measured.
struct PhaseResult {
    mode: Mode,
    /// Messages published in the timed window.
    published: u64,
    /// Deliveries that arrived in the timed window, per second.
    deliveries_per_sec: f64,
    latency: Quantiles,
    server_cpu: f64,
    server_us_per_delivery: f64,
    bench_us_per_delivery: f64,
    /// Deliveries still missing after the drain (cumulative over the scenario).
    missing: u64,
    /// The rate phase could not keep up: under 95 % of the offered rate delivered, or more
    /// than a second of deliveries behind.
    throttled: bool,
    publish_refused: u64,
}

/// One target with one stream layout.
struct Scenario {
    target: WsTarget,
    streams: usize,
    subscribers: usize,
    command_line: String,
    setup_secs: f64,
    rss_before_kib: u64,
    rss_connected_kib: u64,
    phases: Vec<PhaseResult>,
    failed: u64,
    error_samples: Vec<String>,
    malformed: u64,
}

pub async fn run(args: FanoutArgs) -> Result<Verdict> {
    if args.subscribers == 0 || args.streams.contains(&0) {
        bail!("--subscribers and --streams must be at least 1");
    }
    let limit = measure::raise_nofile(args.subscribers as u64 + 1000)?;
    eprintln!("open-files limit: {limit}");
    let machine = super::machine_line();
    let mut scenarios = Vec::new();
    for &streams in &args.streams {
        for &target in &args.targets {
            eprintln!(
                "== ws-fanout {} — {} subscribers on {streams} stream(s)",
                target.name(),
                args.subscribers
            );
            let scenario = scenario(&args, target, streams)
                .await
                .with_context(|| format!("ws-fanout {} failed", target.name()))?;
            scenarios.push(scenario);
        }
    }
    let report = markdown(&args, &machine, &scenarios);
    println!("{report}");
    args.out.write(&to_json(&args, &scenarios))?;
    let clean = scenarios
        .iter()
        .all(|s| s.failed == 0 && s.phases.iter().all(|p| p.missing == 0));
    Ok(if clean {
        Verdict::Clean
    } else {
        Verdict::Failed
    })
}

async fn scenario(args: &FanoutArgs, target: WsTarget, streams: usize) -> Result<Scenario> {
    let server = Server::start(target, &args.servers, SpoolEngine::Memory).await?;
    eprintln!("started {}", server.command_line);
    server.settle(Duration::from_millis(300)).await;
    let rss_before_kib = server.rss_kib()?;
    let names: Vec<String> = (0..streams).map(|i| stream_name("fan", i)).collect();
    let shared = Arc::new(Shared {
        delivered: AtomicU64::new(0),
        rec_from: AtomicU64::new(u64::MAX),
        rec_to: AtomicU64::new(u64::MAX),
        latencies: Latencies::new()?,
        ready: AtomicUsize::new(0),
        malformed: AtomicU64::new(0),
        errors: Errors::new(),
    });

    // Subscribers: one task and one connection each.
    let started = Instant::now();
    let setup = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..args.subscribers {
        let (shared, setup, addr) = (shared.clone(), setup.clone(), server.addr);
        let stream = names[i % streams].clone();
        tasks.spawn(async move {
            let opened = Conn::subscriber(target, addr, &stream, &setup).await;
            let mut conn = match opened {
                Ok((conn, _)) => conn,
                Err(e) => return shared.errors.record(&e.context("subscriber setup")),
            };
            shared.ready.fetch_add(1, Ordering::Relaxed);
            let mut on = |d: Delivery<'_>| shared.on_delivery(i, d);
            loop {
                if let Err(e) = conn.read(&mut on).await {
                    return shared.errors.record(&e);
                }
            }
        });
    }
    super::wait_for_subscribers(
        args.subscribers,
        &shared.ready,
        &shared.errors,
        "connected",
        SETUP_TIMEOUT,
        || server.check_alive(),
    )
    .await?;
    let setup_secs = started.elapsed().as_secs_f64();
    if shared.errors.count() > 0 {
        bail!(
            "{} subscribers could not connect, e.g. {}",
            shared.errors.count(),
            shared.errors.samples().join(" | ")
        );
    }
    eprintln!(
        "{} subscribers connected in {setup_secs:.1} s",
        args.subscribers
    );
    server.settle(Duration::from_millis(500)).await;
    let rss_connected_kib = server.rss_kib()?;

    let publisher = Publisher::open(target, server.addr).await?;
    let mut subs_per_stream = vec![(args.subscribers / streams) as u64; streams];
    for s in subs_per_stream.iter_mut().take(args.subscribers % streams) {
        *s += 1;
    }
    let mut driver = Driver {
        publisher,
        names,
        subs_per_stream,
        seq: 0,
        expected: 0,
        size: args.size,
        shared: shared.clone(),
    };
    let mut modes = vec![Mode::Max {
        window_deliveries: args.window * args.subscribers as u64,
    }];
    modes.extend(args.rates.iter().filter(|&&r| r > 0).map(|&r| Mode::Rate {
        deliveries_per_sec: r,
    }));
    let mut phases = Vec::new();
    for mode in modes {
        let result = driver.phase(&server, mode, args).await?;
        eprintln!(
            "{} {}: {:.0} deliveries/s, p50 {:.1} ms, p99 {:.1} ms, server CPU {:.0} %, missing {}{}",
            target.name(),
            mode.label(),
            result.deliveries_per_sec,
            result.latency.p50,
            result.latency.p99,
            result.server_cpu * 100.0,
            result.missing,
            if result.throttled {
                " (fell behind)"
            } else {
                ""
            }
        );
        phases.push(result);
        server.check_alive()?;
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(Scenario {
        target,
        streams,
        subscribers: args.subscribers,
        command_line: server.command_line.clone(),
        setup_secs,
        rss_before_kib,
        rss_connected_kib,
        phases,
        failed: shared.errors.count(),
        error_samples: shared.errors.samples(),
        malformed: shared.malformed.load(Ordering::Relaxed),
    })
}

/// The publisher and what it has published.
struct Driver {
    publisher: Publisher,
    names: Vec<String>,
    subs_per_stream: Vec<u64>,
    /// Next message's sequence number (messages go round-robin over the streams).
    seq: u64,
    /// Deliveries owed for everything published so far.
    expected: u64,
    size: usize,
    shared: Arc<Shared>,
}

impl Driver {
    fn outstanding(&self) -> u64 {
        self.expected
            .saturating_sub(self.shared.delivered.load(Ordering::Relaxed))
    }

    /// Publishes `n` messages; message `k` of them carries `stamp(k)`.
    async fn publish(&mut self, n: usize, stamp: impl Fn(usize) -> u64) -> Result<()> {
        let streams = self.names.len();
        let batch: Vec<(&str, String)> = (0..n)
            .map(|k| {
                let seq = self.seq + k as u64;
                let s = (seq % streams as u64) as usize;
                (
                    self.names[s].as_str(),
                    measure::stamped_payload(seq, stamp(k), self.size),
                )
            })
            .collect();
        for k in 0..n as u64 {
            self.expected += self.subs_per_stream[((self.seq + k) % streams as u64) as usize];
        }
        self.seq += n as u64;
        self.publisher.publish(&batch).await
    }

    async fn phase(
        &mut self,
        server: &Server,
        mode: Mode,
        args: &FanoutArgs,
    ) -> Result<PhaseResult> {
        let fanout = (self.subs_per_stream.iter().sum::<u64>() / self.names.len() as u64).max(1);
        let begin = Instant::now();
        let begin_us = now_us();
        let timed_at = begin + args.warmup;
        let end = timed_at + args.duration;
        let mut sent_in_phase = 0u64;
        let mut throttled = false;
        let mut mark = None;
        let refused_before = self.publisher.refused.load(Ordering::Relaxed);
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if mark.is_none() && now >= timed_at {
                self.shared.latencies.reset();
                self.shared.rec_to.store(u64::MAX, Ordering::Relaxed);
                self.shared.rec_from.store(self.seq, Ordering::Relaxed);
                mark = Some((
                    self.seq,
                    self.shared.delivered.load(Ordering::Relaxed),
                    server.cpu_mark()?,
                    measure::CpuMark::now(std::process::id())?,
                ));
            }
            match mode {
                Mode::Max { window_deliveries } => {
                    let room = window_deliveries.saturating_sub(self.outstanding());
                    let n = ((room / fanout) as usize).min(MAX_BATCH);
                    if n > 0 {
                        self.publish(n, |_| now_us()).await?;
                    }
                }
                Mode::Rate { deliveries_per_sec } => {
                    let msgs_per_sec = (deliveries_per_sec as f64 / fanout as f64).max(1.0);
                    let due = (now.duration_since(begin).as_secs_f64() * msgs_per_sec) as u64;
                    if self.outstanding() > deliveries_per_sec {
                        // More than a second behind: stop adding to the pile (the schedule's
                        // stamps keep counting, so the latency shows it).
                        throttled = true;
                    } else if due > sent_in_phase {
                        let n = ((due - sent_in_phase) as usize).min(MAX_BATCH);
                        let first = sent_in_phase;
                        self.publish(n, |k| {
                            begin_us + ((first + k as u64) as f64 * 1e6 / msgs_per_sec) as u64
                        })
                        .await?;
                        sent_in_phase += n as u64;
                    }
                }
            }
            tokio::time::sleep(TICK).await;
        }
        let (first_seq, delivered0, server_mark, own_mark) =
            mark.context("the timed window never started")?;
        let delivered1 = self.shared.delivered.load(Ordering::Relaxed);
        let (server_cpu, wall) = server_mark.since()?;
        let (own_cpu, _) = own_mark.since()?;
        self.shared
            .rec_to
            .store(self.seq.saturating_sub(1), Ordering::Relaxed);

        // Drain: every published message to every subscriber.
        let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.outstanding() > 0 && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Late duplicates or stragglers: a moment more, then read the histograms.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.shared.rec_from.store(u64::MAX, Ordering::Relaxed);
        let latency = Quantiles::of(&self.shared.latencies.merged());
        let deliveries = delivered1 - delivered0;
        let deliveries_per_sec = deliveries as f64 / wall.as_secs_f64();
        if let Mode::Rate {
            deliveries_per_sec: offered,
        } = mode
            && deliveries_per_sec < 0.95 * offered as f64
        {
            throttled = true;
        }
        let per = |cpu: Duration| {
            if deliveries > 0 {
                cpu.as_secs_f64() * 1e6 / deliveries as f64
            } else {
                0.0
            }
        };
        Ok(PhaseResult {
            mode,
            published: self.seq - first_seq,
            deliveries_per_sec,
            latency,
            server_cpu: server_cpu.as_secs_f64() / wall.as_secs_f64(),
            server_us_per_delivery: per(server_cpu),
            bench_us_per_delivery: per(own_cpu),
            missing: self.outstanding(),
            throttled,
            publish_refused: self.publisher.refused.load(Ordering::Relaxed) - refused_before,
        })
    }
}

fn markdown(args: &FanoutArgs, machine: &str, scenarios: &[Scenario]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## spool-bench ws-fanout\n");
    let _ = writeln!(
        out,
        "{} subscribers, each its own connection with one subscription; 1 publisher \
         connection; {} B payloads; phases of {:?} warm-up + {:?} timed; max = closed loop \
         with {} messages per stream in flight; {machine}.\n",
        args.subscribers, args.size, args.warmup, args.duration, args.window
    );
    let mut seen = Vec::new();
    for s in scenarios {
        if !seen.contains(&s.target) {
            seen.push(s.target);
            let _ = writeln!(out, "- `{}`: `{}`", s.target.name(), s.command_line);
        }
    }
    let _ = writeln!(
        out,
        "\n| streams × subs | target | load | deliveries/s | ÷ socketio | ÷ nats | p50 ms | p99 ms | p999 ms | max ms | server CPU | server µs/deliv | bench µs/deliv | missing |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    for s in scenarios {
        for (i, p) in s.phases.iter().enumerate() {
            let peer = |t: WsTarget| {
                scenarios
                    .iter()
                    .find(|o| o.target == t && o.streams == s.streams)
                    .and_then(|o| o.phases.get(i))
                    .filter(|_| s.target != t)
                    .map_or("—".into(), |o| {
                        format!(
                            "{:.2}",
                            p.deliveries_per_sec / o.deliveries_per_sec.max(1.0)
                        )
                    })
            };
            let q = &p.latency;
            let _ = writeln!(
                out,
                "| {} × {} | {} | {}{} | {:.0} | {} | {} | {} | {} | {} | {} | {:.0} % | {:.2} | {:.2} | {} |",
                s.streams,
                s.subscribers / s.streams,
                s.target.name(),
                p.mode.label(),
                if p.throttled { " (fell behind)" } else { "" },
                p.deliveries_per_sec,
                peer(WsTarget::Socketio),
                peer(WsTarget::Nats),
                measure::ms(q.p50, q.count),
                measure::ms(q.p99, q.count),
                measure::ms(q.p999, q.count),
                measure::ms(q.max, q.count),
                p.server_cpu * 100.0,
                p.server_us_per_delivery,
                p.bench_us_per_delivery,
                p.missing,
            );
        }
    }
    let _ = writeln!(
        out,
        "\n| streams × subs | target | connect all (s) | server RSS before → with subscribers (MiB) | failed | malformed | refused publishes |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|");
    for s in scenarios {
        let _ = writeln!(
            out,
            "| {} × {} | {} | {:.1} | {:.0} → {:.0} | {} | {} | {} |",
            s.streams,
            s.subscribers / s.streams,
            s.target.name(),
            s.setup_secs,
            s.rss_before_kib as f64 / 1024.0,
            s.rss_connected_kib as f64 / 1024.0,
            s.failed,
            s.malformed,
            s.phases.iter().map(|p| p.publish_refused).sum::<u64>(),
        );
        for e in &s.error_samples {
            let _ = writeln!(out, "\n{}: {e}", s.target.name());
        }
    }
    out
}

fn to_json(args: &FanoutArgs, scenarios: &[Scenario]) -> Value {
    json!({
        "benchmark": "ws-fanout",
        "settings": {
            "subscribers": args.subscribers, "size": args.size,
            "duration_s": args.duration.as_secs_f64(), "warmup_s": args.warmup.as_secs_f64(),
            "window": args.window, "rates": args.rates,
        },
        "scenarios": scenarios.iter().map(|s| json!({
            "target": s.target.name(), "streams": s.streams, "subscribers": s.subscribers,
            "command_line": s.command_line, "setup_s": s.setup_secs,
            "rss_before_kib": s.rss_before_kib, "rss_connected_kib": s.rss_connected_kib,
            "failed": s.failed, "errors": s.error_samples, "malformed": s.malformed,
            "phases": s.phases.iter().map(|p| json!({
                "mode": p.mode.label(), "published": p.published,
                "deliveries_per_sec": p.deliveries_per_sec, "latency": p.latency.json(),
                "server_cpu": p.server_cpu, "server_us_per_delivery": p.server_us_per_delivery,
                "bench_us_per_delivery": p.bench_us_per_delivery, "missing": p.missing,
                "fell_behind": p.throttled, "publish_refused": p.publish_refused,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
