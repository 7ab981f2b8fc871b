//! `spool-bench ws-publish`: durable publishes over WebSocket with many in flight per
//! connection, against Redis `XADD` with `appendfsync always`, pipelined as deep.
//!
//! Each of C connections keeps `--window` publishes in flight: it sends until the window is
//! full, then sends one more for every answer. Spool gets `publish` frames on `/v1/ws` and
//! answers `ack` (with `--durability fsync`: after the WAL's fsync; the server appends a
//! connection's waiting publishes in one engine call, and the disk engine commits many
//! connections' appends per fsync). Redis gets `XADD bench-0 * d PAYLOAD` over RESP and
//! answers after its AOF fsync (`appendfsync always`; it fsyncs once per event-loop
//! iteration, so it also groups).
//!
//! Every run: `--warmup` untimed, then `--duration` timed (answers received in that window,
//! and their latency from send to answer), then the in-flight publishes drain.

use std::{collections::VecDeque, fmt::Write as _, sync::Arc, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BytesMut};
use clap::{Args, ValueEnum};
use futures::{FutureExt, SinkExt, StreamExt, future::try_join_all};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};
use tokio_tungstenite::tungstenite::Message;

use super::{
    ServerArgs, WsTarget,
    measure::{self, Quantiles, now_us},
    server::Server,
    wire::Conn,
};
use crate::{
    JsonArgs,
    publish::Verdict,
    spool_process::SpoolEngine,
    targets::{process::PeerProcess, redis::start_aof_always},
    workload::Workload,
};

/// Longest wait for one answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What `ws-publish` can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PubTarget {
    /// `spool serve --engine disk --durability fsync`: ack after fsync.
    SpoolFsync,
    /// `spool serve --engine disk --durability memory`: ack once written to the OS.
    SpoolNosync,
    /// `spool serve --engine memory`.
    Spool,
    /// `redis-server --appendonly yes --appendfsync always`, `XADD` pipelined.
    Redis,
}

impl PubTarget {
    fn name(self) -> &'static str {
        match self {
            PubTarget::SpoolFsync => "spool-fsync",
            PubTarget::SpoolNosync => "spool-nosync",
            PubTarget::Spool => "spool-memory",
            PubTarget::Redis => "redis-aof-always",
        }
    }
}

/// Options of `spool-bench ws-publish`.
#[derive(Args, Debug, Clone)]
pub struct WsPublishArgs {
    #[command(flatten)]
    pub servers: ServerArgs,
    /// What to measure, in this order at each concurrency.
    #[arg(
        long,
        value_name = "T,T,…",
        value_delimiter = ',',
        default_value = "spool-fsync,redis,spool-nosync"
    )]
    pub targets: Vec<PubTarget>,
    /// Connections; one run per value.
    #[arg(
        long,
        value_name = "N,N,…",
        value_delimiter = ',',
        default_value = "1,8,32"
    )]
    pub clients: Vec<usize>,
    /// Publishes in flight per connection (Redis: pipeline depth).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub window: usize,
    /// Payload bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub size: usize,
    /// Streams (Redis keys) published to, round-robin per connection.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub streams: u16,
    /// Timed window of each run.
    #[arg(long, value_name = "DURATION", default_value = "4s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Untimed start of each run.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    #[command(flatten)]
    pub out: JsonArgs,
}

/// A started target.
enum Running {
    Spool(Server),
    Redis(PeerProcess),
}

impl Running {
    fn addr(&self) -> std::net::SocketAddr {
        match self {
            Running::Spool(s) => s.addr,
            Running::Redis(p) => p.addr,
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Running::Spool(s) => s.pid,
            Running::Redis(p) => p.pid(),
        }
    }

    fn command_line(&self) -> String {
        match self {
            Running::Spool(s) => s.command_line.clone(),
            Running::Redis(p) => p.command_line.clone(),
        }
    }

    fn check_alive(&self) -> Result<()> {
        match self {
            Running::Spool(s) => s.check_alive(),
            Running::Redis(p) => p.check_alive(),
        }
    }
}

/// One client's counts.
struct Tally {
    answered: u64,
    errors: u64,
    latency: Histogram<u64>,
    error_sample: Option<String>,
}

struct RunResult {
    target: PubTarget,
    clients: usize,
    msgs_per_sec: f64,
    latency: Quantiles,
    errors: u64,
    server_cpu: f64,
    server_us_per_msg: f64,
    error_sample: Option<String>,
}

pub async fn run(args: WsPublishArgs) -> Result<Verdict> {
    if args.clients.contains(&0) || args.window == 0 {
        bail!("--clients and --window must be at least 1");
    }
    let machine = super::machine_line();
    let workload = Arc::new(Workload::new(args.streams, args.size));
    let mut running = Vec::new();
    for &t in &args.targets {
        let r = match t {
            PubTarget::Redis => Running::Redis(start_aof_always().await?),
            _ => {
                let engine = match t {
                    PubTarget::SpoolFsync => SpoolEngine::DiskFsync,
                    PubTarget::SpoolNosync => SpoolEngine::DiskNosync,
                    _ => SpoolEngine::Memory,
                };
                Running::Spool(Server::start(WsTarget::Spool, &args.servers, engine).await?)
            }
        };
        eprintln!("started {}: {}", t.name(), r.command_line());
        running.push((t, r));
    }
    let mut results = Vec::new();
    for &clients in &args.clients {
        for (t, r) in &running {
            let result = one_run(&args, *t, r, clients, &workload)
                .await
                .with_context(|| format!("{} with {clients} connections failed", t.name()))?;
            eprintln!(
                "{} × {clients}: {:.0} msgs/s, p50 {:.2} ms, p99 {:.2} ms, errors {}",
                t.name(),
                result.msgs_per_sec,
                result.latency.p50,
                result.latency.p99,
                result.errors
            );
            r.check_alive()?;
            results.push(result);
        }
    }
    let descriptions: Vec<(PubTarget, String)> = running
        .iter()
        .map(|(t, r)| (*t, r.command_line()))
        .collect();
    println!("{}", markdown(&args, &machine, &descriptions, &results));
    args.out.write(&to_json(&args, &results))?;
    Ok(if results.iter().all(|r| r.errors == 0) {
        Verdict::Clean
    } else {
        Verdict::Failed
    })
}

async fn one_run(
    args: &WsPublishArgs,
    target: PubTarget,
    running: &Running,
    clients: usize,
    workload: &Arc<Workload>,
) -> Result<RunResult> {
    let addr = running.addr();
    let begin = Instant::now();
    let timed_from = begin + args.warmup;
    let end = timed_from + args.duration;
    let timed_from_us = now_us() + args.warmup.as_micros() as u64;
    let end_us = timed_from_us + args.duration.as_micros() as u64;
    let window = Window {
        depth: args.window,
        timed_from_us,
        end_us,
        end,
    };
    let cpu_at = async {
        tokio::time::sleep_until(timed_from).await;
        measure::CpuMark::now(running.pid())
    };
    let clients_fut = try_join_all((0..clients).map(|i| {
        let workload = workload.clone();
        async move {
            let handle = tokio::spawn(async move {
                match target {
                    PubTarget::Redis => redis_client(addr, i, workload, window).await,
                    _ => spool_client(addr, i, workload, window).await,
                }
            });
            handle.await.context("a client task panicked")?
        }
    }));
    let (mark, tallies) = tokio::join!(cpu_at, clients_fut);
    let mark = mark?;
    let tallies = tallies?;
    let (server_cpu, wall) = mark.since()?;
    let mut latency = measure::histogram()?;
    let mut answered = 0;
    let mut errors = 0;
    let mut error_sample = None;
    for t in tallies {
        answered += t.answered;
        errors += t.errors;
        let _ = latency.add(&t.latency);
        error_sample = error_sample.or(t.error_sample);
    }
    let _ = wall;
    let secs = args.duration.as_secs_f64();
    Ok(RunResult {
        target,
        clients,
        msgs_per_sec: answered as f64 / secs,
        latency: Quantiles::of(&latency),
        errors,
        // CPU over the timed window and the drain; close enough (the drain is short).
        server_cpu: server_cpu.as_secs_f64() / wall.as_secs_f64(),
        server_us_per_msg: if answered > 0 {
            server_cpu.as_secs_f64() * 1e6 / answered as f64
        } else {
            0.0
        },
        error_sample,
    })
}

/// The timing every client of a run shares.
#[derive(Clone, Copy)]
struct Window {
    depth: usize,
    timed_from_us: u64,
    end_us: u64,
    end: Instant,
}

impl Window {
    fn record(&self, tally: &mut Tally, sent_us: u64) {
        let now = now_us();
        if now >= self.timed_from_us && now < self.end_us {
            tally.answered += 1;
            tally.latency.saturating_record((now - sent_us).max(1));
        }
    }
}

fn new_tally() -> Result<Tally> {
    Ok(Tally {
        answered: 0,
        errors: 0,
        latency: measure::histogram()?,
        error_sample: None,
    })
}

/// One Spool WebSocket connection publishing with `window.depth` in flight.
async fn spool_client(
    addr: std::net::SocketAddr,
    index: usize,
    workload: Arc<Workload>,
    window: Window,
) -> Result<Tally> {
    let mut conn = Conn::open(WsTarget::Spool, addr).await?;
    conn.hello(None).await?;
    let Conn::Spool(mut ws) = conn else {
        unreachable!("a Spool connection")
    };
    let mut tally = new_tally()?;
    let mut in_flight: VecDeque<(u64, u64)> = VecDeque::with_capacity(window.depth);
    let mut seq = index as u64;
    let mut id = 0u64;
    loop {
        let mut fed = false;
        while in_flight.len() < window.depth && Instant::now() < window.end {
            id += 1;
            let stream = &workload.streams()[workload.stream_index(seq)];
            let payload = workload.payload(seq);
            let payload = std::str::from_utf8(&payload).unwrap_or_default();
            seq += 1;
            ws.feed(Message::text(format!(
                r#"{{"type":"publish","id":{id},"stream":"{stream}","data":"{payload}"}}"#
            )))
            .await?;
            in_flight.push_back((id, now_us()));
            fed = true;
        }
        if fed {
            ws.flush().await?;
        }
        if in_flight.is_empty() {
            return Ok(tally);
        }
        let first = tokio::time::timeout(ANSWER_TIMEOUT, ws.next())
            .await
            .context("no answer in time")?;
        let mut next = first;
        loop {
            match next {
                None => bail!("the server closed the connection"),
                Some(Err(e)) => return Err(anyhow!(e).context("WebSocket read failed")),
                Some(Ok(Message::Text(text))) => {
                    let ack = text.starts_with(r#"{"type":"ack""#);
                    if ack || text.starts_with(r#"{"type":"error""#) {
                        let answered = frame_id(text.as_bytes());
                        let pos = in_flight
                            .iter()
                            .position(|(i, _)| Some(*i) == answered)
                            .unwrap_or(0);
                        if let Some((_, sent)) = in_flight.remove(pos) {
                            if ack {
                                window.record(&mut tally, sent);
                            } else {
                                tally.errors += 1;
                                tally.error_sample.get_or_insert_with(|| text.to_string());
                            }
                        }
                    } else if text.as_str() == r#"{"type":"ping"}"# {
                        ws.feed(Message::text(r#"{"type":"pong"}"#)).await?;
                    }
                }
                Some(Ok(_)) => {}
            }
            // Whatever else is already buffered, without waiting.
            match ws.next().now_or_never() {
                Some(more) => next = more,
                None => break,
            }
        }
    }
}

/// The `"id":N` of a frame.
fn frame_id(frame: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(frame, br#""id":"#)? + 5;
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// One Redis connection publishing `XADD`s pipelined `window.depth` deep.
async fn redis_client(
    addr: std::net::SocketAddr,
    index: usize,
    workload: Arc<Workload>,
    window: Window,
) -> Result<Tally> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let mut tally = new_tally()?;
    let mut in_flight: VecDeque<u64> = VecDeque::with_capacity(window.depth);
    let mut out = Vec::with_capacity(window.depth * (workload.payload_size() + 64));
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut seq = index as u64;
    loop {
        out.clear();
        while in_flight.len() < window.depth && Instant::now() < window.end {
            let stream = &workload.streams()[workload.stream_index(seq)];
            let payload = workload.payload(seq);
            seq += 1;
            let _ = write!(
                Bytes(&mut out),
                "*5\r\n$4\r\nXADD\r\n${}\r\n{stream}\r\n$1\r\n*\r\n$1\r\nd\r\n${}\r\n",
                stream.len(),
                payload.len()
            );
            out.extend_from_slice(&payload);
            out.extend_from_slice(b"\r\n");
            in_flight.push_back(now_us());
        }
        if !out.is_empty() {
            tcp.write_all(&out).await?;
        }
        if in_flight.is_empty() {
            return Ok(tally);
        }
        let n = tokio::time::timeout(ANSWER_TIMEOUT, tcp.read_buf(&mut buf))
            .await
            .context("no answer in time")??;
        if n == 0 {
            bail!("redis-server closed the connection");
        }
        // Replies: `$N\r\n<id>\r\n`, or `-ERR …\r\n`.
        while let Some(end) = memchr::memmem::find(&buf, b"\r\n") {
            let consumed = match buf.first() {
                Some(b'$') => {
                    let len: usize = std::str::from_utf8(&buf[1..end])
                        .ok()
                        .and_then(|n| n.parse().ok())
                        .context("malformed bulk reply")?;
                    let total = end + 2 + len + 2;
                    if buf.len() < total {
                        break;
                    }
                    if let Some(sent) = in_flight.pop_front() {
                        window.record(&mut tally, sent);
                    }
                    total
                }
                _ => {
                    in_flight.pop_front();
                    tally.errors += 1;
                    tally
                        .error_sample
                        .get_or_insert_with(|| String::from_utf8_lossy(&buf[..end]).into_owned());
                    end + 2
                }
            };
            buf.advance(consumed);
        }
    }
}

/// `fmt::Write` into a byte vector.
struct Bytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Bytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn markdown(
    args: &WsPublishArgs,
    machine: &str,
    descriptions: &[(PubTarget, String)],
    results: &[RunResult],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## spool-bench ws-publish\n");
    let _ = writeln!(
        out,
        "{} B payloads to {} stream(s), {} publishes in flight per connection, {:?} warm-up + \
         {:?} timed per run; {machine}.\n",
        args.size, args.streams, args.window, args.warmup, args.duration
    );
    for (t, line) in descriptions {
        let _ = writeln!(out, "- `{}`: `{line}`", t.name());
    }
    let _ = writeln!(
        out,
        "\n| connections × in flight | target | msgs/s | ÷ redis | p50 ms | p99 ms | p999 ms | server CPU | server µs/msg | errors |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in results {
        let ratio = results
            .iter()
            .find(|o| {
                o.target == PubTarget::Redis && o.clients == r.clients && r.target != o.target
            })
            .map_or("—".into(), |o| {
                format!("{:.2}", r.msgs_per_sec / o.msgs_per_sec.max(1.0))
            });
        let q = &r.latency;
        let _ = writeln!(
            out,
            "| {} × {} | {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.0} % | {:.1} | {} |",
            r.clients,
            args.window,
            r.target.name(),
            r.msgs_per_sec,
            ratio,
            q.p50,
            q.p99,
            q.p999,
            r.server_cpu * 100.0,
            r.server_us_per_msg,
            r.errors
        );
    }
    for r in results {
        if let Some(e) = &r.error_sample {
            let _ = writeln!(
                out,
                "\n{} × {}: {} errors, e.g. {e}",
                r.target.name(),
                r.clients,
                r.errors
            );
        }
    }
    out
}

fn to_json(args: &WsPublishArgs, results: &[RunResult]) -> Value {
    json!({
        "benchmark": "ws-publish",
        "settings": {"window": args.window, "size": args.size, "streams": args.streams,
                     "duration_s": args.duration.as_secs_f64(), "warmup_s": args.warmup.as_secs_f64()},
        "runs": results.iter().map(|r| json!({
            "target": r.target.name(), "clients": r.clients, "msgs_per_sec": r.msgs_per_sec,
            "latency": r.latency.json(), "errors": r.errors, "server_cpu": r.server_cpu,
            "server_us_per_msg": r.server_us_per_msg, "error_sample": r.error_sample,
        })).collect::<Vec<_>>(),
    })
}
