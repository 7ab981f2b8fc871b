//! `spool-bench groups`: consumer-group receive + ack against a JetStream pull consumer with
//! explicit acks and Redis Streams `XREADGROUP` + `XACK`, in the same run.
//!
//! Every target is a server process of its own, started here on a free 127.0.0.1 port with its
//! own data directory: Spool on the disk engine with `--durability fsync` (`spool-fsync`) and,
//! with `--targets spool-write`, with `--durability memory` (answered once written to the WAL
//! file, not fsynced: the level of nats-server 2.9, which never fsyncs per write), both with
//! members over HTTP (one `/ack` per receive or, with `--http-ack on-receive`, the acks in the
//! next receive's `ack` field: `spool.rs`) or, as `spool-ws` and `spool-ws-write`, over the
//! WebSocket protocol
//! (`consume` with credit = batch, one `ack` frame per receive's leases or, with
//! `--ws-ack per-message`, per message: `ws.rs`),
//! `redis-server` with `appendfsync always`, `nats-server -js` with a file-storage stream. Each
//! target is preloaded once with `--backlog` messages; then, for each cell (members × batch),
//! Spool and the peers run one after the other:
//!
//! - **backlog**: a new group starting at the oldest message, drained by M members for
//!   `--duration` (or until it is empty). Each member loops: receive up to B, ack them all, and
//!   records the time from sending the receive to the ack's answer for every message acked.
//! - **steady**: a new group starting at the latest message, while `--publishers` connections
//!   publish `--rate` messages per second in total, each stamped with its send time; members
//!   long-poll, ack, and record publish → ack answered (end to end) for every message.
//!
//! `--drain N` instead measures Spool alone: N messages preloaded, one group drained by the
//! members, the server's `VmRSS` sampled all along (start, peak, end of the drain).

mod drain;
mod peers;
mod spool;
mod ws;

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use async_trait::async_trait;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::time::Instant;

use self::{
    spool::{HttpAck, Transport},
    ws::WsAck,
};
use crate::{
    JsonArgs, SpoolBinArgs,
    publish::Verdict,
    ws::measure::{CpuMark, Quantiles, histogram, now_us},
};

/// Options of `spool-bench groups`.
#[derive(Args, Debug, Clone)]
pub struct GroupsArgs {
    #[command(flatten)]
    pub spool: SpoolBinArgs,
    /// Members receiving and acking at once (one connection each); one cell per value.
    #[arg(long, value_name = "N,N,…", value_delimiter = ',', default_value = "1,8,32",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub members: Vec<u16>,
    /// Messages asked for per receive (and acked per ack); one cell per value.
    #[arg(long, value_name = "N,N,…", value_delimiter = ',', default_value = "1,32",
          value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub batch: Vec<u16>,
    /// Which workloads to run.
    #[arg(
        long,
        value_name = "M,M",
        value_delimiter = ',',
        default_value = "backlog,steady"
    )]
    pub modes: Vec<Mode>,
    /// The systems to measure, in this order in each cell: `spool` (`spool-fsync`, disk engine,
    /// `--durability fsync`), `spool-write` (disk engine, `--durability memory`: written to the
    /// WAL file, not fsynced) — both with members over HTTP —, `spool-ws` and `spool-ws-write`
    /// (the same two servers, members on a WebSocket each: `consume` with credit = batch,
    /// acking as `--ws-ack` says), `nats`, `redis`. `--drain` uses the first Spool one.
    #[arg(
        long,
        value_name = "T,T,…",
        value_delimiter = ',',
        default_value = "spool,nats,redis"
    )]
    pub targets: Vec<Kind>,
    /// How the WebSocket members (`spool-ws`, `spool-ws-write`) ack: `per-batch`, one `ack`
    /// frame with the receipts of every lease a receive took (as Redis's one `XACK` per batch
    /// and the HTTP member's one ack request), or `per-message`, one `ack` frame per leased
    /// message, pipelined.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = WsAck::PerBatch)]
    pub ws_ack: WsAck,
    /// How the HTTP members (`spool`, `spool-write`) ack: `separate`, one `POST …/ack` per
    /// receive's leases, or `on-receive`, the receipts in the `ack` field of the member's next
    /// receive (one request and one commit for the acks and the next lease round; a plain ack
    /// at the end of the cell).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = HttpAck::Separate)]
    pub http_ack: HttpAck,
    /// Payload size in bytes (at least 24: the first 20 hold the send time).
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub size: usize,
    /// Messages published to each target before the backlog cells (every backlog cell drains
    /// a new group from the oldest of them).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub backlog: u64,
    /// Timed length of each cell.
    #[arg(long, value_name = "DURATION", default_value = "4s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Steady cells: messages per second published, in total.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub rate: u32,
    /// Steady cells: publishing connections sharing `--rate`.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub publishers: u32,
    /// Measure only a drain of N preloaded messages by Spool (with the first `--members` and
    /// `--batch` values), sampling the server's resident memory.
    #[arg(long, value_name = "N")]
    pub drain: Option<u64>,
    /// Longest time the `--drain` may take before it is cut short.
    #[arg(long, value_name = "DURATION", default_value = "240s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    #[command(flatten)]
    pub out: JsonArgs,
}

/// A workload of a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Drain a preloaded backlog.
    Backlog,
    /// Keep up with a steady publisher.
    Steady,
}

/// The systems `groups` can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// `spool serve --engine disk --durability fsync`, over HTTP (`spool-fsync`).
    Spool,
    /// `spool serve --engine disk --durability memory`, over HTTP: answered once written to
    /// the WAL file, without waiting for an fsync (JetStream 2.9's durability).
    SpoolWrite,
    /// `spool serve --engine disk --durability fsync`, members over WebSocket (`spool-ws`).
    SpoolWs,
    /// `spool serve --engine disk --durability memory`, members over WebSocket
    /// (`spool-ws-write`).
    SpoolWsWrite,
    /// A JetStream pull consumer with explicit acks (`double_ack`), file storage.
    Nats,
    /// Redis Streams `XREADGROUP` + `XACK`, `appendfsync always`.
    Redis,
}

/// The stream (Spool, Redis) or subject (NATS) every target uses.
pub const STREAM: &str = "bench-groups";
/// Width of the send-time stamp at the start of each payload.
const STAMP_DIGITS: usize = 20;
/// How long a steady-mode receive waits for a message.
const POLL_WAIT: Duration = Duration::from_millis(500);
/// How long a backlog-mode receive waits before the backlog counts as drained. Not 0: with
/// many members, Spool may answer a receive with `wait` 0 empty while messages are pending
/// (other members took what its read found), so an empty answer only counts after a wait.
const DRAIN_WAIT: Duration = Duration::from_millis(200);
/// Error messages kept per run.
const MAX_ERROR_SAMPLES: usize = 5;

/// A payload of `size` bytes: the send time in µs (zero-padded decimal; 0 for preloaded
/// messages), a space, then filler.
pub fn payload(stamp_us: u64, size: usize) -> Bytes {
    let mut text = format!("{stamp_us:0STAMP_DIGITS$} ");
    let filler = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut i = 0;
    while text.len() < size {
        text.push(char::from(filler[i % filler.len()]));
        i += 1;
    }
    text.truncate(size.max(STAMP_DIGITS + 1));
    Bytes::from(text)
}

/// The send time a payload carries (0: none).
pub fn stamp_of(payload: &[u8]) -> u64 {
    payload
        .get(..STAMP_DIGITS)
        .and_then(|d| std::str::from_utf8(d).ok())
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// A system under test.
#[async_trait]
pub trait GroupTarget: Send + Sync {
    fn name(&self) -> &str;
    fn description(&self) -> String;
    fn server_pid(&self) -> u32;
    fn check_alive(&self) -> Result<()>;
    /// Publishes `count` payloads of `size` bytes (stamp 0) and waits until all are durable.
    async fn preload(&self, count: u64, size: usize) -> Result<()>;
    /// Creates group `group` starting at the oldest message (`from_oldest`) or the latest.
    async fn create_group(&self, group: &str, from_oldest: bool) -> Result<()>;
    /// Opens member `idx` of `group` on its own connection, for receives of up to `batch`.
    async fn member(&self, group: &str, idx: usize, batch: usize) -> Result<Box<dyn Member>>;
    /// Opens a publishing connection for the steady cells.
    async fn publisher(&self) -> Result<Box<dyn StampPublisher>>;
    /// WebSocket members: `ack` frames sent and receipts they carried since the last call.
    fn ack_frames(&self) -> Option<(u64, u64)> {
        None
    }
}

/// One member of a group, on its own connection.
#[async_trait]
pub trait Member: Send {
    /// Receives up to `max` messages (long-polling up to `wait` when given) and returns the
    /// send stamps of their payloads; keeps what the ack needs.
    async fn receive(&mut self, max: usize, wait: Option<Duration>) -> Result<Vec<u64>>;
    /// When the last receive's messages started to count for receive → ack, if earlier than
    /// the receive call (messages pushed before it was made); `None`: the call.
    fn since(&self) -> Option<Instant> {
        None
    }
    /// Acks everything the last receive returned; the number acked `ok`.
    async fn ack(&mut self) -> Result<usize>;
    /// At the end of the member's loop: settles what it still holds (not counted).
    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One publishing connection of the steady cells.
#[async_trait]
pub trait StampPublisher: Send {
    /// Publishes `payload` and waits for the ack.
    async fn publish(&mut self, payload: Bytes) -> Result<()>;
}

/// What one cell measured on one target.
pub struct CellResult {
    pub target: String,
    pub mode: Mode,
    pub members: usize,
    pub batch: usize,
    pub received: u64,
    pub acked: u64,
    pub published: u64,
    pub errors: u64,
    pub error_samples: Vec<String>,
    pub elapsed: Duration,
    /// Whether a backlog ran out before the time was up.
    pub drained: bool,
    pub server_cpu: Duration,
    /// CPU time of this load generator (members and publishers) over the cell.
    pub client_cpu: Duration,
    /// Receive sent → ack answered, per acked message, µs.
    pub ack_latency: Histogram<u64>,
    /// Publish sent → ack answered, per acked message that carried a stamp, µs.
    pub e2e_latency: Histogram<u64>,
    /// WebSocket members: `ack` frames sent and the receipts they carried.
    pub ack_frames: Option<(u64, u64)>,
}

impl CellResult {
    pub fn acks_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.acked as f64 / secs
        } else {
            0.0
        }
    }

    pub fn server_us_per_ack(&self) -> Option<f64> {
        (self.acked > 0).then(|| self.server_cpu.as_secs_f64() * 1e6 / self.acked as f64)
    }

    pub fn client_us_per_ack(&self) -> Option<f64> {
        (self.acked > 0).then(|| self.client_cpu.as_secs_f64() * 1e6 / self.acked as f64)
    }

    fn json(&self) -> Value {
        json!({
            "target": self.target, "mode": format!("{:?}", self.mode).to_lowercase(),
            "members": self.members, "batch": self.batch, "received": self.received,
            "acked": self.acked, "published": self.published, "errors": self.errors,
            "error_samples": self.error_samples, "elapsed_s": self.elapsed.as_secs_f64(),
            "drained": self.drained, "acks_per_sec": self.acks_per_sec(),
            "server_us_per_ack": self.server_us_per_ack(),
            "client_us_per_ack": self.client_us_per_ack(),
            "receive_to_ack": Quantiles::of(&self.ack_latency).json(),
            "publish_to_ack": Quantiles::of(&self.e2e_latency).json(),
            "ack_frames": self.ack_frames.map(|(f, _)| f),
            "ack_frame_receipts": self.ack_frames.map(|(_, r)| r),
        })
    }
}

/// What one member counted.
struct Tally {
    received: u64,
    acked: u64,
    errors: u64,
    samples: Vec<String>,
    ack_latency: Histogram<u64>,
    e2e_latency: Histogram<u64>,
    drained: bool,
    ended: Instant,
}

impl Tally {
    fn sample(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        let text = format!("{e:#}");
        if self.samples.len() < MAX_ERROR_SAMPLES && !self.samples.contains(&text) {
            self.samples.push(text);
        }
    }
}

/// One member's loop until `deadline` (or, draining a backlog, until a receive comes back
/// empty).
async fn member_loop(
    mut member: Box<dyn Member>,
    batch: usize,
    mode: Mode,
    deadline: Instant,
) -> Result<Tally> {
    let mut tally = Tally {
        received: 0,
        acked: 0,
        errors: 0,
        samples: Vec::new(),
        ack_latency: histogram()?,
        e2e_latency: histogram()?,
        drained: false,
        ended: Instant::now(),
    };
    let wait = match mode {
        Mode::Steady => POLL_WAIT,
        Mode::Backlog => DRAIN_WAIT,
    };
    while Instant::now() < deadline {
        let sent = Instant::now();
        let stamps = match member.receive(batch, Some(wait)).await {
            Ok(stamps) => stamps,
            Err(e) => {
                tally.sample(&e.context("receive"));
                continue;
            }
        };
        if stamps.is_empty() {
            if mode == Mode::Backlog {
                tally.drained = true;
                break;
            }
            continue;
        }
        tally.received += stamps.len() as u64;
        match member.ack().await {
            Ok(n) => {
                // A drained backlog's last empty wait is not part of the drain.
                tally.ended = Instant::now();
                let done = now_us();
                let since = member.since().map_or(sent, |s| s.min(sent));
                let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
                tally.acked += n as u64;
                let _ = tally.ack_latency.record_n(us.max(1), n as u64);
                for stamp in stamps.into_iter().filter(|&s| s > 0).take(n) {
                    tally
                        .e2e_latency
                        .saturating_record(done.saturating_sub(stamp).max(1));
                }
            }
            Err(e) => tally.sample(&e.context("ack")),
        }
    }
    if mode == Mode::Steady {
        tally.ended = Instant::now();
    }
    if let Err(e) = member.finish().await {
        tally.sample(&e.context("final ack"));
    }
    Ok(tally)
}

/// Runs one cell on one target.
async fn run_cell(
    target: &dyn GroupTarget,
    args: &GroupsArgs,
    group: &str,
    mode: Mode,
    members: usize,
    batch: usize,
) -> Result<CellResult> {
    target
        .create_group(group, mode == Mode::Backlog)
        .await
        .with_context(|| format!("cannot create group {group}"))?;
    let mut opened = Vec::with_capacity(members);
    for i in 0..members {
        opened.push(target.member(group, i, batch).await?);
    }
    let mut publishers = Vec::new();
    if mode == Mode::Steady {
        for _ in 0..args.publishers.max(1) {
            publishers.push(target.publisher().await?);
        }
    }
    // Counted from here on.
    let _ = target.ack_frames();
    let cpu = CpuMark::now(target.server_pid())?;
    let own_cpu = CpuMark::now(std::process::id())?;
    let started = Instant::now();
    let deadline = started + args.duration;
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|m| tokio::spawn(member_loop(m, batch, mode, deadline)))
        .collect();
    // Steady publishers: each sends at its share of the rate, on schedule (catching up at once
    // when behind), stamping each payload with its send time.
    let per_publisher = f64::from(args.rate.max(1)) / publishers.len().max(1) as f64;
    let size = args.size;
    let pub_tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(i, mut p)| {
            tokio::spawn(async move {
                let interval = Duration::from_secs_f64(1.0 / per_publisher);
                // Spread the publishers' schedules over one interval.
                let offset = interval.mul_f64(i as f64 / 4.0);
                let mut sent = 0u64;
                let mut errors = 0u64;
                let mut sample = None;
                loop {
                    let at = started + offset + interval.mul_f64(sent as f64);
                    if at >= deadline {
                        break;
                    }
                    tokio::time::sleep_until(at).await;
                    match p.publish(payload(now_us(), size)).await {
                        Ok(()) => {}
                        Err(e) => {
                            errors += 1;
                            sample.get_or_insert_with(|| format!("publish: {e:#}"));
                        }
                    }
                    sent += 1;
                }
                (sent, errors, sample)
            })
        })
        .collect();
    let mut result = CellResult {
        target: target.name().to_owned(),
        mode,
        members,
        batch,
        received: 0,
        acked: 0,
        published: 0,
        errors: 0,
        error_samples: Vec::new(),
        elapsed: Duration::ZERO,
        drained: false,
        server_cpu: Duration::ZERO,
        client_cpu: Duration::ZERO,
        ack_latency: histogram()?,
        e2e_latency: histogram()?,
        ack_frames: None,
    };
    let mut last_end = started;
    for task in tasks {
        let tally = task.await.context("a member task panicked")??;
        result.received += tally.received;
        result.acked += tally.acked;
        result.errors += tally.errors;
        result.drained |= tally.drained;
        for s in tally.samples {
            if result.error_samples.len() < MAX_ERROR_SAMPLES {
                result.error_samples.push(s);
            }
        }
        result
            .ack_latency
            .add(&tally.ack_latency)
            .map_err(|e| anyhow!("{e:?}"))?;
        result
            .e2e_latency
            .add(&tally.e2e_latency)
            .map_err(|e| anyhow!("{e:?}"))?;
        last_end = last_end.max(tally.ended);
    }
    // Steady cells offer a fixed rate: their throughput is over the publishing window (the
    // members' last long-polls end after it).
    result.elapsed = match mode {
        Mode::Backlog => last_end - started,
        Mode::Steady => args.duration,
    };
    result.server_cpu = cpu.since()?.0;
    result.client_cpu = own_cpu.since()?.0;
    result.ack_frames = target.ack_frames();
    for task in pub_tasks {
        let (sent, errors, sample) = task.await.context("a publisher task panicked")?;
        result.published += sent;
        result.errors += errors;
        if let Some(s) = sample
            && result.error_samples.len() < MAX_ERROR_SAMPLES
        {
            result.error_samples.push(s);
        }
    }
    target.check_alive()?;
    Ok(result)
}

async fn start(kind: Kind, args: &GroupsArgs) -> Result<Box<dyn GroupTarget>> {
    Ok(match kind {
        Kind::Spool => Box::new(
            spool::SpoolGroups::start(&args.spool, None, Transport::Http(args.http_ack)).await?,
        ),
        Kind::SpoolWrite => Box::new(
            spool::SpoolGroups::start_write(&args.spool, None, Transport::Http(args.http_ack))
                .await?,
        ),
        Kind::SpoolWs => Box::new(
            spool::SpoolGroups::start(&args.spool, None, Transport::Ws(args.ws_ack)).await?,
        ),
        Kind::SpoolWsWrite => Box::new(
            spool::SpoolGroups::start_write(&args.spool, None, Transport::Ws(args.ws_ack)).await?,
        ),
        Kind::Nats => Box::new(peers::NatsGroups::start().await?),
        Kind::Redis => Box::new(peers::RedisGroups::start().await?),
    })
}

pub async fn run(args: GroupsArgs) -> Result<Verdict> {
    anyhow::ensure!(
        args.size > STAMP_DIGITS + 1,
        "--size must be more than {}",
        STAMP_DIGITS + 1
    );
    if let Some(count) = args.drain {
        return drain::run(&args, count).await;
    }
    let mut kinds: Vec<Kind> = Vec::new();
    for kind in &args.targets {
        if !kinds.contains(kind) {
            kinds.push(*kind);
        }
    }
    let mut targets = Vec::new();
    for kind in kinds {
        let target = start(kind, &args)
            .await
            .with_context(|| format!("cannot start {kind:?}"))?;
        eprintln!("started {}: {}", target.name(), target.description());
        if args.modes.contains(&Mode::Backlog) {
            let t = Instant::now();
            target
                .preload(args.backlog, args.size)
                .await
                .with_context(|| format!("cannot preload {}", target.name()))?;
            eprintln!(
                "  preloaded {} messages in {:.1}s",
                args.backlog,
                t.elapsed().as_secs_f64()
            );
        }
        targets.push(target);
    }
    let mut cells = Vec::new();
    let mut n = 0;
    for &mode in &args.modes {
        for &members in &args.members {
            for &batch in &args.batch {
                for target in &targets {
                    n += 1;
                    let group = format!("g{n}");
                    let (members, batch) = (usize::from(members), usize::from(batch));
                    eprint!("{} {mode:?} {members} members × {batch}: ", target.name());
                    let cell = run_cell(target.as_ref(), &args, &group, mode, members, batch)
                        .await
                        .with_context(|| format!("{} {mode:?} {members}×{batch}", target.name()))?;
                    eprintln!(
                        "{:.0} acks/s, recv→ack p50 {:.2} ms, e2e p50 {:.2} ms, {} errors{}{}",
                        cell.acks_per_sec(),
                        Quantiles::of(&cell.ack_latency).p50,
                        Quantiles::of(&cell.e2e_latency).p50,
                        cell.errors,
                        if cell.drained { ", drained" } else { "" },
                        cell.ack_frames.filter(|&(f, _)| f > 0).map_or_else(
                            String::new,
                            |(f, r)| format!(", {:.1} receipts per ack frame", r as f64 / f as f64)
                        )
                    );
                    cells.push(cell);
                }
            }
        }
    }
    let descriptions: Vec<(String, String)> = targets
        .iter()
        .map(|t| (t.name().to_owned(), t.description()))
        .collect();
    drop(targets);
    print!("{}", markdown(&args, &descriptions, &cells));
    args.out.write(&json!({
        "targets": descriptions.iter().map(|(n, d)| json!({"name": n, "description": d})).collect::<Vec<_>>(),
        "size": args.size, "backlog": args.backlog, "duration_s": args.duration.as_secs_f64(),
        "rate": args.rate, "publishers": args.publishers,
        "cells": cells.iter().map(CellResult::json).collect::<Vec<_>>(),
    }))?;
    Ok(if cells.iter().any(|c| c.errors > 0) {
        Verdict::Failed
    } else {
        Verdict::Clean
    })
}

fn ms(v: f64, count: u64) -> String {
    if count == 0 {
        "—".into()
    } else {
        format!("{v:.2}")
    }
}

/// Spool target `spool`'s figure over `cell`'s, as text ("—" when `cell` is that target or
/// either side has none): backlog, throughput (higher is better for Spool); steady, the median
/// publish → ack time (lower is better for Spool).
fn ratio(cells: &[CellResult], cell: &CellResult, spool: &str) -> String {
    let Some(s) = cells.iter().find(|c| {
        c.target == spool
            && c.mode == cell.mode
            && c.members == cell.members
            && c.batch == cell.batch
    }) else {
        return "—".into();
    };
    if cell.target == spool {
        return "—".into();
    }
    match cell.mode {
        Mode::Backlog if cell.acks_per_sec() > 0.0 => {
            format!("{:.2}", s.acks_per_sec() / cell.acks_per_sec())
        }
        Mode::Steady if !cell.e2e_latency.is_empty() && !s.e2e_latency.is_empty() => format!(
            "{:.2}",
            Quantiles::of(&s.e2e_latency).p50 / Quantiles::of(&cell.e2e_latency).p50
        ),
        _ => "—".into(),
    }
}

/// The report: one row per target and cell; each row carries the ratio of each Spool target
/// of the same cell to it.
fn markdown(args: &GroupsArgs, targets: &[(String, String)], cells: &[CellResult]) -> String {
    let mut out = String::new();
    out.push_str("\n## spool-bench groups\n\n");
    for (name, description) in targets {
        out.push_str(&format!("- `{name}`: {description}\n"));
    }
    out.push_str(&format!(
        "\n{} B payloads; backlog cells: a new group from the oldest of {} preloaded messages, \
         {:?} or until empty; steady cells: {} msgs/s over {} publishing connections, {:?}. \
         Last columns, one per Spool target: backlog, that Spool target's acks/s ÷ this target's; steady, its \
         publish → ack p50 ÷ this target's (below 1: Spool is faster).\n\n",
        args.size, args.backlog, args.duration, args.rate, args.publishers, args.duration
    ));
    // A ratio column for each Spool target of the run.
    let spools: Vec<&str> = spool::NAMES
        .into_iter()
        .filter(|n| targets.iter().any(|(t, _)| t == n))
        .collect();
    out.push_str(
        "| mode | members | batch | target | acks/s | recv→ack p50 | p99 | pub→ack p50 | p99 | \
         server µs/ack | client µs/ack | acked / published | errors |",
    );
    for name in &spools {
        out.push_str(&format!(" {name} ÷ this |"));
    }
    out.push_str("\n|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for _ in &spools {
        out.push_str("--:|");
    }
    out.push('\n');
    for cell in cells {
        let ratios: String = spools
            .iter()
            .map(|name| format!(" {} |", ratio(cells, cell, name)))
            .collect();
        let a = Quantiles::of(&cell.ack_latency);
        let e = Quantiles::of(&cell.e2e_latency);
        out.push_str(&format!(
            "| {} | {} | {} | {}{} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |{}\n",
            format!("{:?}", cell.mode).to_lowercase(),
            cell.members,
            cell.batch,
            cell.target,
            if cell.drained { " (drained)" } else { "" },
            cell.acks_per_sec(),
            ms(a.p50, a.count),
            ms(a.p99, a.count),
            ms(e.p50, e.count),
            ms(e.p99, e.count),
            cell.server_us_per_ack()
                .map_or("—".into(), |v| format!("{v:.1}")),
            cell.client_us_per_ack()
                .map_or("—".into(), |v| format!("{v:.1}")),
            match cell.mode {
                Mode::Backlog => "—".into(),
                Mode::Steady => format!("{} / {}", cell.acked, cell.published),
            },
            cell.errors,
            ratios,
        ));
    }
    let errors: Vec<_> = cells
        .iter()
        .flat_map(|c| c.error_samples.iter().map(move |s| (c, s)))
        .take(10)
        .collect();
    if !errors.is_empty() {
        out.push_str("\nErrors:\n");
        for (c, s) in errors {
            out.push_str(&format!(
                "- {} {:?} {}×{}: {s}\n",
                c.target, c.mode, c.members, c.batch
            ));
        }
    }
    out
}
