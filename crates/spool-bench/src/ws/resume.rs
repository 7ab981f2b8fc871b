//! `spool-bench ws-resume`: a reconnect storm. N clients with sessions, each subscribed to one
//! of S streams, all lose their connections; `--behind` messages per stream are published while
//! they are away; then all of them reconnect at once with their session and catch up.
//!
//! 1. N clients connect (a session each: Spool's `session`, socket.io's `pid`) and subscribe
//!    to `resume-{i % S}`.
//! 2. One message per stream (the primer) is published; each client disconnects (drops its
//!    TCP connection, no close frame — like a network loss) as soon as it has it. socket.io's
//!    recovery needs the offset of a packet the client received, and Spool gets the same start.
//! 3. Once the server counts no subscriber connection, `--behind` messages per stream are
//!    published and acked.
//! 4. The storm: all N clients reconnect at once (`--connect-concurrency` 0 = no limit) and
//!    resume (Spool `connect` with `session`; socket.io `CONNECT` with `pid` and `offset`).
//!    Each records when its session was answered and when it had all `--behind` messages.
//!
//! The report gives the time until *all* caught up (the goal), per-client quantiles, clients
//! whose session was not restored, messages out of order, and the kernel's `ListenOverflows`
//! (SYNs dropped because the accept queue was full) during the storm. NATS core keeps no
//! state for a disconnected client, so it has no place here.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};

use super::{
    Errors, ServerArgs, WsTarget,
    measure::{self, Quantiles, now_us},
    server::Server,
    stream_name,
    wire::{Conn, Delivery, Publisher, Resume},
};
use crate::{JsonArgs, publish::Verdict, spool_process::SpoolEngine};

/// Longest wait for the setup (connect, primer) and for the storm.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Messages per publisher write.
const PUBLISH_BATCH: usize = 500;

/// Options of `spool-bench ws-resume`.
#[derive(Args, Debug, Clone)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub servers: ServerArgs,
    /// What to measure, in this order for each stream layout (NATS core has no sessions).
    #[arg(
        long,
        value_name = "T,T,…",
        value_delimiter = ',',
        default_value = "spool,socketio"
    )]
    pub targets: Vec<WsTarget>,
    /// Clients, each with a session and one subscription.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub clients: usize,
    /// Stream layouts: the clients are spread evenly over this many streams (one run each).
    #[arg(
        long,
        value_name = "N,N,…",
        value_delimiter = ',',
        default_value = "1,100"
    )]
    pub streams: Vec<usize>,
    /// Messages per stream published while the clients are away.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub behind: u64,
    /// Payload bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 128)]
    pub size: usize,
    /// Reconnects in progress at once during the storm (0: all at once).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub connect_concurrency: usize,
    /// Connections being set up at once before the storm (kept well below any listen backlog).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub setup_concurrency: usize,
    /// Longest the storm may take.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub out: JsonArgs,
}

/// A client's state between its two connections.
struct Away {
    index: usize,
    session: String,
    offset: Option<String>,
}

/// One client's storm.
struct Outcome {
    connected_us: u64,
    done_us: Option<u64>,
    resumed: bool,
    /// Deliveries of a message older than the previous one (duplicates included).
    out_of_order: u64,
    /// Deliveries of messages received before the disconnect.
    resent: u64,
}

struct Result1 {
    target: WsTarget,
    streams: usize,
    command_line: String,
    clients: usize,
    all_connected_ms: f64,
    all_caught_up_ms: Option<f64>,
    connected: Quantiles,
    caught_up: Quantiles,
    not_resumed: u64,
    incomplete: u64,
    out_of_order: u64,
    resent: u64,
    deliveries: u64,
    server_cpu_secs: f64,
    listen_overflows: Option<u64>,
    errors: u64,
    error_samples: Vec<String>,
}

pub async fn run(args: ResumeArgs) -> Result<Verdict> {
    if args.clients == 0 || args.streams.contains(&0) || args.behind == 0 {
        bail!("--clients, --streams and --behind must be at least 1");
    }
    let limit = measure::raise_nofile(args.clients as u64 + 1000)?;
    eprintln!("open-files limit: {limit}");
    let machine = super::machine_line();
    let mut results = Vec::new();
    for &streams in &args.streams {
        for &target in &args.targets {
            if target == WsTarget::Nats {
                eprintln!("ws-resume: skipping nats (core NATS keeps no session state)");
                continue;
            }
            eprintln!(
                "== ws-resume {}: {} clients on {streams} stream(s), {} behind",
                target.name(),
                args.clients,
                args.behind
            );
            let r = storm(&args, target, streams)
                .await
                .with_context(|| format!("ws-resume {} failed", target.name()))?;
            eprintln!(
                "{}: all connected after {:.0} ms, all caught up after {}; not resumed {}, incomplete {}",
                target.name(),
                r.all_connected_ms,
                r.all_caught_up_ms
                    .map_or("—".into(), |ms| format!("{ms:.0} ms")),
                r.not_resumed,
                r.incomplete
            );
            results.push(r);
        }
    }
    println!("{}", markdown(&args, &machine, &results));
    args.out.write(&to_json(&args, &results))?;
    Ok(
        if results
            .iter()
            .all(|r| r.incomplete == 0 && r.not_resumed == 0 && r.errors == 0)
        {
            Verdict::Clean
        } else {
            Verdict::Failed
        },
    )
}

async fn storm(args: &ResumeArgs, target: WsTarget, streams: usize) -> Result<Result1> {
    let server = Server::start(target, &args.servers, SpoolEngine::Memory).await?;
    eprintln!("started {}", server.command_line);
    let names: Vec<String> = (0..streams).map(|i| stream_name("resume", i)).collect();
    let errors = Errors::new();

    // 1–2: connect, subscribe, wait for the primer, drop the connection.
    let setup = Arc::new(Semaphore::new(args.setup_concurrency.max(1)));
    let ready = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for index in 0..args.clients {
        let (setup, ready, addr) = (setup.clone(), ready.clone(), server.addr);
        let stream = names[index % streams].clone();
        tasks.spawn(async move {
            let (mut conn, hello) = Conn::subscriber(target, addr, &stream, &setup).await?;
            ready.fetch_add(1, Ordering::Relaxed);
            let mut offset: Option<String> = None;
            let mut got = false;
            while !got {
                conn.read(&mut |d: Delivery<'_>| {
                    got = true;
                    offset = d.offset.map(str::to_owned);
                })
                .await?;
            }
            // Dropping the connection closes the TCP connection without a close frame.
            drop(conn);
            anyhow::Ok(Away {
                index,
                session: hello.session,
                offset,
            })
        });
    }
    let connected = super::wait_until(
        SETUP_TIMEOUT,
        || {
            // No task ends before the primer is published, unless it failed.
            if let Some(joined) = tasks.try_join_next() {
                joined
                    .context("a client task panicked")?
                    .context("a client could not connect")?;
            }
            Ok(ready.load(Ordering::Relaxed) as usize >= args.clients)
        },
        || server.check_alive(),
    )
    .await?;
    if !connected {
        bail!("the clients did not connect within {SETUP_TIMEOUT:?}");
    }
    eprintln!("{} clients connected and subscribed", args.clients);
    let mut publisher = Publisher::open(target, server.addr).await?;
    let mut seq = 0u64;
    let primer: Vec<(&str, String)> = names
        .iter()
        .map(|n| {
            seq += 1;
            (
                n.as_str(),
                measure::stamped_payload(seq - 1, now_us(), args.size),
            )
        })
        .collect();
    publisher.publish(&primer).await?;
    let mut away: Vec<Away> = Vec::with_capacity(args.clients);
    let collect = async {
        while let Some(joined) = tasks.join_next().await {
            away.push(joined.context("a client task panicked")??);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(SETUP_TIMEOUT, collect)
        .await
        .context("the primer did not reach every client in time")??;
    away.sort_by_key(|a| a.index);

    // 3: the server let go of every subscriber (the publisher stays connected).
    server.wait_connections(1, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first_behind = seq;
    let total = args.behind * streams as u64;
    let mut pending = Vec::with_capacity(PUBLISH_BATCH);
    while seq < first_behind + total {
        pending.clear();
        while pending.len() < PUBLISH_BATCH && seq < first_behind + total {
            let s = (seq % streams as u64) as usize;
            pending.push((
                names[s].as_str(),
                measure::stamped_payload(seq, now_us(), args.size),
            ));
            seq += 1;
        }
        publisher.publish(&pending).await?;
    }
    let acked_target = seq; // primer + behind, one ack each
    let deadline = Instant::now() + Duration::from_secs(30);
    while publisher.acked.load(Ordering::Relaxed) < acked_target {
        if Instant::now() > deadline {
            bail!(
                "only {} of {acked_target} publishes acked",
                publisher.acked.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("{total} messages published while away; storm");

    // 4: the storm.
    let overflows_before = listen_overflows();
    let cpu = server.cpu_mark()?;
    let deliveries = Arc::new(AtomicU64::new(0));
    let limit =
        (args.connect_concurrency > 0).then(|| Arc::new(Semaphore::new(args.connect_concurrency)));
    let t0 = now_us();
    let stop_at = Instant::now() + args.timeout;
    let mut storm = JoinSet::new();
    for a in away {
        let (limit, deliveries, errors, addr) = (
            limit.clone(),
            deliveries.clone(),
            errors.clone(),
            server.addr,
        );
        let behind = args.behind;
        storm.spawn(async move {
            let run = async {
                let (mut conn, hello) = {
                    let _permit = match &limit {
                        Some(l) => Some(l.acquire().await?),
                        None => None,
                    };
                    let mut conn = Conn::open(target, addr).await?;
                    let hello = conn
                        .hello(Some(Resume {
                            session: &a.session,
                            offset: a.offset.as_deref(),
                        }))
                        .await?;
                    (conn, hello)
                };
                let mut tracker = Tracker {
                    first_behind,
                    caught_up: 0,
                    last: None,
                    out_of_order: 0,
                    resent: 0,
                    deliveries: &deliveries,
                };
                let connected_us = now_us() - t0;
                for (payload, _) in &hello.early {
                    tracker.see(payload);
                }
                while tracker.caught_up < behind {
                    conn.read(&mut |d: Delivery<'_>| tracker.see(d.payload))
                        .await?;
                }
                let out = Outcome {
                    connected_us,
                    done_us: Some(now_us() - t0),
                    resumed: hello.resumed,
                    out_of_order: tracker.out_of_order,
                    resent: tracker.resent,
                };
                anyhow::Ok((out, conn))
            };
            match tokio::time::timeout_at(stop_at, run).await {
                Ok(Ok((out, conn))) => Some((out, conn)),
                Ok(Err(e)) => {
                    errors.record(&e);
                    None
                }
                Err(_) => {
                    errors.record(&anyhow::anyhow!("not caught up within the timeout"));
                    None
                }
            }
        });
    }
    let mut outcomes = Vec::with_capacity(args.clients);
    // Connections stay open until every client is done, so none is counted twice.
    let mut keep = Vec::with_capacity(args.clients);
    while let Some(joined) = storm.join_next().await {
        if let Some((out, conn)) = joined.context("a client task panicked")? {
            outcomes.push(out);
            keep.push(conn);
        }
    }
    let (server_cpu, _) = cpu.since()?;
    let overflows = match (overflows_before, listen_overflows()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    drop(keep);
    let mut connected = measure::histogram()?;
    let mut caught_up = measure::histogram()?;
    for o in &outcomes {
        connected.saturating_record(o.connected_us.max(1));
        if let Some(d) = o.done_us {
            caught_up.saturating_record(d.max(1));
        }
    }
    let incomplete = args.clients as u64 - caught_up.len();
    Ok(Result1 {
        target,
        streams,
        command_line: server.command_line.clone(),
        clients: args.clients,
        all_connected_ms: connected.max() as f64 / 1000.0,
        all_caught_up_ms: (incomplete == 0).then(|| caught_up.max() as f64 / 1000.0),
        connected: Quantiles::of(&connected),
        caught_up: Quantiles::of(&caught_up),
        not_resumed: outcomes.iter().filter(|o| !o.resumed).count() as u64,
        incomplete,
        out_of_order: outcomes.iter().map(|o| o.out_of_order).sum(),
        resent: outcomes.iter().map(|o| o.resent).sum(),
        deliveries: deliveries.load(Ordering::Relaxed),
        server_cpu_secs: server_cpu.as_secs_f64(),
        listen_overflows: overflows,
        errors: errors.count(),
        error_samples: errors.samples(),
    })
}

/// What a reconnected client has received.
struct Tracker<'a> {
    first_behind: u64,
    /// Messages published while away, received.
    caught_up: u64,
    last: Option<u64>,
    out_of_order: u64,
    /// Deliveries of messages the client had before it went away.
    resent: u64,
    deliveries: &'a AtomicU64,
}

impl Tracker<'_> {
    fn see(&mut self, payload: &[u8]) {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        if let Some((seq, _)) = measure::parse_stamp(payload) {
            if self.last.is_some_and(|l| seq <= l) {
                self.out_of_order += 1;
            }
            self.last = Some(seq);
            if seq >= self.first_behind {
                self.caught_up += 1;
            } else {
                self.resent += 1;
            }
        }
    }
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in `/proc/net/netstat`, this network namespace).
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if names.starts_with("TcpExt:") {
            let i = names
                .split_whitespace()
                .position(|n| n == "ListenOverflows")?;
            return values.split_whitespace().nth(i)?.parse().ok();
        }
    }
    None
}

fn markdown(args: &ResumeArgs, machine: &str, results: &[Result1]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## spool-bench ws-resume\n");
    let _ = writeln!(
        out,
        "{} clients with sessions reconnect at once{}, each {} messages ({} B) behind; {machine}.\n",
        args.clients,
        if args.connect_concurrency > 0 {
            format!(" ({} at a time)", args.connect_concurrency)
        } else {
            String::new()
        },
        args.behind,
        args.size
    );
    let mut seen = Vec::new();
    for r in results {
        if !seen.contains(&r.target) {
            seen.push(r.target);
            let _ = writeln!(out, "- `{}`: `{}`", r.target.name(), r.command_line);
        }
    }
    let _ = writeln!(
        out,
        "\n| streams × clients | target | **all caught up (ms)** | socketio ÷ this | all sessions answered (ms) | catch-up p50 / p99 (ms) | deliveries | re-sent | not resumed | incomplete | out of order | server CPU (s) | listen overflows |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in results {
        // How many times faster than socket.io this target got everyone back.
        let speedup = results
            .iter()
            .find(|o| {
                o.target == WsTarget::Socketio && o.streams == r.streams && r.target != o.target
            })
            .map_or("—".into(), |o| {
                match (o.all_caught_up_ms, r.all_caught_up_ms) {
                    (Some(theirs), Some(ours)) => format!("{:.2}", theirs / ours.max(1.0)),
                    (None, Some(_)) => format!(
                        "> {:.2}",
                        args.timeout.as_secs_f64() * 1000.0
                            / r.all_caught_up_ms.unwrap_or(1.0).max(1.0)
                    ),
                    _ => "—".into(),
                }
            });
        let _ = writeln!(
            out,
            "| {} × {} | {} | **{}** | {} | {:.0} | {} / {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            r.streams,
            r.clients / r.streams,
            r.target.name(),
            r.all_caught_up_ms.map_or(
                format!(
                    "> {:.0} ({} incomplete)",
                    args.timeout.as_secs_f64() * 1000.0,
                    r.incomplete
                ),
                |ms| format!("{ms:.0}")
            ),
            speedup,
            r.all_connected_ms,
            measure::ms(r.caught_up.p50, r.caught_up.count),
            measure::ms(r.caught_up.p99, r.caught_up.count),
            r.deliveries,
            r.resent,
            r.not_resumed,
            r.incomplete,
            r.out_of_order,
            r.server_cpu_secs,
            r.listen_overflows.map_or("?".into(), |n| n.to_string()),
        );
    }
    for r in results {
        for e in &r.error_samples {
            let _ = writeln!(out, "\n{} ({} errors): {e}", r.target.name(), r.errors);
        }
    }
    out
}

fn to_json(args: &ResumeArgs, results: &[Result1]) -> Value {
    json!({
        "benchmark": "ws-resume",
        "settings": {"clients": args.clients, "behind": args.behind, "size": args.size,
                     "connect_concurrency": args.connect_concurrency},
        "results": results.iter().map(|r| json!({
            "target": r.target.name(), "streams": r.streams, "command_line": r.command_line,
            "all_connected_ms": r.all_connected_ms, "all_caught_up_ms": r.all_caught_up_ms,
            "connected": r.connected.json(), "caught_up": r.caught_up.json(),
            "not_resumed": r.not_resumed, "incomplete": r.incomplete,
            "out_of_order": r.out_of_order, "resent": r.resent, "deliveries": r.deliveries,
            "server_cpu_s": r.server_cpu_secs, "listen_overflows": r.listen_overflows,
            "errors": r.errors, "error_samples": r.error_samples,
        })).collect::<Vec<_>>(),
    })
}
