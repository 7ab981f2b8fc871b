//! `spool-bench ws-idle`: what an idle connection with one subscription costs the server in
//! resident memory.
//!
//! For each target in turn: start the server, read its `VmRSS`, then open N connections in
//! three stages and read `VmRSS` after each, so the cost splits into what the transport costs
//! and what the protocol's state adds:
//!
//! 1. **open**: the transport (Spool, socket.io: the WebSocket handshake, and engine.io's open
//!    packet; NATS: TCP and the server's `INFO`);
//! 2. **hello**: the protocol's handshake (Spool `connect`, which creates a session; socket.io
//!    `CONNECT` to `/`; NATS `CONNECT` + `PING`);
//! 3. **subscribe**: one subscription each, to `idle-{i % streams}`.
//!
//! Before each reading the server settles for `--settle` (socket.io's Node first runs a full
//! garbage collection). Finally every connection is closed and the memory read once more.
//! Spool closes a connection that has not sent `connect` within 10 s, so stage 1 must not last
//! longer than that (10,000 connections take about a second here).

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{ServerArgs, WsTarget, measure, server::Server, stream_name, wire::Conn};
use crate::{JsonArgs, publish::Verdict, spool_process::SpoolEngine};

/// Options of `spool-bench ws-idle`.
#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub servers: ServerArgs,
    /// What to measure, in this order.
    #[arg(
        long,
        value_name = "T,T,…",
        value_delimiter = ',',
        default_value = "spool,socketio,nats"
    )]
    pub targets: Vec<WsTarget>,
    /// Idle connections to open.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub connections: usize,
    /// Streams the connections subscribe to (connection `i` to stream `i % streams`).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub streams: usize,
    /// Pause before each memory reading.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Connections being set up at once (kept well below any listen backlog).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Open and close the connections this many times on the same server (a leak shows as
    /// memory that keeps growing from round to round; an allocator that keeps freed memory
    /// shows as a second round that costs little).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub rounds: usize,
    #[command(flatten)]
    pub out: JsonArgs,
}

/// One target's readings, in KiB.
struct Readings {
    target: WsTarget,
    /// 1 for the first round on a fresh server.
    round: usize,
    command_line: String,
    /// How many connections made it through every stage.
    connections: usize,
    base: u64,
    open: u64,
    hello: u64,
    subscribed: u64,
    closed: u64,
    /// Seconds from the first connection opened to the last `hello` answered.
    open_to_hello_secs: f64,
    failures: Vec<String>,
}

impl Readings {
    fn per_conn(&self, from: u64, to: u64) -> f64 {
        (to as f64 - from as f64) / self.connections.max(1) as f64
    }
}

pub async fn run(args: IdleArgs) -> Result<Verdict> {
    if args.connections == 0 || args.streams == 0 {
        bail!("--connections and --streams must be at least 1");
    }
    let limit = measure::raise_nofile(args.connections as u64 + 1000)?;
    eprintln!("open-files limit: {limit}");
    let machine = super::machine_line();
    let mut all = Vec::new();
    for &target in &args.targets {
        eprintln!(
            "== ws-idle {}: {} connections",
            target.name(),
            args.connections
        );
        let rounds = measure_target(&args, target)
            .await
            .with_context(|| format!("ws-idle {} failed", target.name()))?;
        for r in &rounds {
            eprintln!(
                "{} round {}: {:.2} KiB per connection ({} connections)",
                target.name(),
                r.round,
                r.per_conn(r.base, r.subscribed),
                r.connections
            );
        }
        all.extend(rounds);
    }
    println!("{}", markdown(&args, &machine, &all));
    args.out.write(&to_json(&args, &all))?;
    Ok(
        if all
            .iter()
            .all(|r| r.failures.is_empty() && r.connections == args.connections)
        {
            Verdict::Clean
        } else {
            Verdict::Failed
        },
    )
}

async fn measure_target(args: &IdleArgs, target: WsTarget) -> Result<Vec<Readings>> {
    let server = Server::start(target, &args.servers, SpoolEngine::Memory).await?;
    eprintln!("started {}", server.command_line);
    server.settle(args.settle).await;
    let mut base = server.rss_kib()?;
    let mut all = Vec::new();
    for round in 1..=args.rounds.max(1) {
        let r = one_round(args, &server, round, base).await?;
        base = r.closed;
        all.push(r);
    }
    Ok(all)
}

async fn one_round(args: &IdleArgs, server: &Server, round: usize, base: u64) -> Result<Readings> {
    let target = server.target;
    let mut failures = Vec::new();
    let concurrency = args.connect_concurrency.max(1);

    let started = Instant::now();
    let opened: Vec<Result<Conn>> = stream::iter(0..args.connections)
        .map(|_| Conn::open(target, server.addr))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let conns = keep_ok(opened, "open", &mut failures);
    eprintln!(
        "opened {} in {:.1} s",
        conns.len(),
        started.elapsed().as_secs_f64()
    );
    server.settle(args.settle).await;
    let open = server.rss_kib()?;

    let helloed: Vec<Result<Conn>> = stream::iter(conns)
        .map(|mut c| async move {
            c.hello(None).await?;
            Ok(c)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let conns = keep_ok(helloed, "hello", &mut failures);
    let open_to_hello_secs = started.elapsed().as_secs_f64();
    server.settle(args.settle).await;
    let hello = server.rss_kib()?;

    let streams = args.streams;
    let subscribed: Vec<Result<Conn>> = stream::iter(conns.into_iter().enumerate())
        .map(|(i, mut c)| async move {
            c.subscribe(&stream_name("idle", i % streams)).await?;
            Ok(c)
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let conns = keep_ok(subscribed, "subscribe", &mut failures);
    server.settle(args.settle).await;
    let subscribed = server.rss_kib()?;
    server.check_alive()?;
    let connections = conns.len();

    drop(conns);
    server
        .wait_connections(0, Duration::from_secs(20))
        .await
        .ok();
    server.settle(args.settle * 2).await;
    let closed = server.rss_kib()?;
    Ok(Readings {
        target,
        round,
        command_line: server.command_line.clone(),
        connections,
        base,
        open,
        hello,
        subscribed,
        closed,
        open_to_hello_secs,
        failures,
    })
}

/// The connections that made it; a few of the errors are kept for the report.
fn keep_ok(results: Vec<Result<Conn>>, stage: &str, failures: &mut Vec<String>) -> Vec<Conn> {
    let mut ok = Vec::with_capacity(results.len());
    let mut failed = 0;
    let mut sample = None;
    for r in results {
        match r {
            Ok(c) => ok.push(c),
            Err(e) => {
                failed += 1;
                sample.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    if failed > 0 {
        failures.push(format!(
            "{stage}: {failed} failed, e.g. {}",
            sample.unwrap_or_default()
        ));
    }
    ok
}

fn markdown(args: &IdleArgs, machine: &str, all: &[Readings]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## spool-bench ws-idle\n");
    let _ = writeln!(
        out,
        "{} connections, one subscription each over {} streams; server `VmRSS` read {:?} after \
         each stage; {machine}.\n",
        args.connections, args.streams, args.settle
    );
    for r in all.iter().filter(|r| r.round == 1) {
        let _ = writeln!(out, "- `{}`: `{}`", r.target.name(), r.command_line);
    }
    let _ = writeln!(
        out,
        "\n| target | round | connections | RSS before (MiB) | open KiB/conn | + hello KiB/conn | + subscribe KiB/conn | **total KiB/conn** | ÷ socketio | ÷ nats | RSS after closing all (MiB) |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let total = |r: &Readings| r.per_conn(r.base, r.subscribed);
    for r in all {
        let ratio = |t: WsTarget| {
            all.iter()
                .find(|o| o.target == t && o.round == r.round && r.target != t)
                .map_or("—".into(), |o| format!("{:.2}", total(r) / total(o)))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | **{:.2}** | {} | {} | {:.1} |",
            r.target.name(),
            r.round,
            r.connections,
            r.base as f64 / 1024.0,
            r.per_conn(r.base, r.open),
            r.per_conn(r.open, r.hello),
            r.per_conn(r.hello, r.subscribed),
            total(r),
            ratio(WsTarget::Socketio),
            ratio(WsTarget::Nats),
            r.closed as f64 / 1024.0,
        );
    }
    for r in all {
        if r.open_to_hello_secs > 8.0 && r.target == WsTarget::Spool {
            let _ = writeln!(
                out,
                "\nwarning: {}: {:.1} s from the first open to the last `connect` (Spool drops a \
                 connection without `connect` after 10 s)",
                r.target.name(),
                r.open_to_hello_secs
            );
        }
        for f in &r.failures {
            let _ = writeln!(out, "\n{}: {f}", r.target.name());
        }
    }
    out
}

fn to_json(args: &IdleArgs, all: &[Readings]) -> Value {
    json!({
        "benchmark": "ws-idle",
        "settings": {"connections": args.connections, "streams": args.streams,
                     "settle_s": args.settle.as_secs_f64()},
        "targets": all.iter().map(|r| json!({
            "target": r.target.name(), "round": r.round, "command_line": r.command_line,
            "connections": r.connections,
            "rss_kib": {"before": r.base, "open": r.open, "hello": r.hello,
                        "subscribed": r.subscribed, "closed": r.closed},
            "kib_per_connection": {
                "open": r.per_conn(r.base, r.open), "hello": r.per_conn(r.open, r.hello),
                "subscribe": r.per_conn(r.hello, r.subscribed),
                "total": r.per_conn(r.base, r.subscribed),
            },
            "open_to_hello_s": r.open_to_hello_secs,
            "failures": r.failures,
        })).collect::<Vec<_>>(),
    })
}
