//! `spool-bench sse-idle`: what an idle Server-Sent Events connection on one stream costs the
//! server in resident memory — the SSE counterpart of `ws-idle`.
//!
//! Start `spool serve` (memory engine), read its `VmRSS`, open N connections (`GET
//! /v1/streams/idle-{i % streams}/events` over plain TCP, each read up to the first event the
//! server sends, its `retry` comment), let the server settle and read `VmRSS` again; then close
//! them all and read it once more. An SSE connection is its subscription: there is no separate
//! handshake stage. Kernel socket buffers are not in RSS.

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::{StreamExt, stream};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::{ServerArgs, WsTarget, measure, server::Server, stream_name};
use crate::{JsonArgs, publish::Verdict, spool_process::SpoolEngine};

/// Longest wait for one connection's response head and first event.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);

/// Options of `spool-bench sse-idle`.
#[derive(Args, Debug, Clone)]
pub struct SseIdleArgs {
    #[command(flatten)]
    pub servers: ServerArgs,
    /// Idle SSE connections to open.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub connections: usize,
    /// Streams the connections listen to (connection `i` to stream `i % streams`).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub streams: usize,
    /// Pause before each memory reading.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Connections being set up at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub connect_concurrency: usize,
    #[command(flatten)]
    pub out: JsonArgs,
}

pub async fn run(args: SseIdleArgs) -> Result<Verdict> {
    if args.connections == 0 || args.streams == 0 {
        bail!("--connections and --streams must be at least 1");
    }
    let limit = measure::raise_nofile(args.connections as u64 + 1000)?;
    eprintln!("open-files limit: {limit}");
    let machine = super::machine_line();
    let server = Server::start(WsTarget::Spool, &args.servers, SpoolEngine::Memory).await?;
    eprintln!("started {}", server.command_line);
    server.settle(args.settle).await;
    let base = server.rss_kib()?;

    let started = Instant::now();
    let addr = server.addr;
    let streams = args.streams;
    let opened: Vec<Result<TcpStream>> = stream::iter(0..args.connections)
        .map(|i| open(addr, stream_name("idle", i % streams)))
        .buffer_unordered(args.connect_concurrency.max(1))
        .collect()
        .await;
    let mut failures = Vec::new();
    let mut conns = Vec::with_capacity(opened.len());
    for r in opened {
        match r {
            Ok(c) => conns.push(c),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    eprintln!("opened {} in {open_secs:.1} s", conns.len());
    server.settle(args.settle).await;
    let open_rss = server.rss_kib()?;
    server.check_alive()?;
    let connections = conns.len();
    drop(conns);
    server.settle(args.settle * 2).await;
    let closed = server.rss_kib()?;

    let per_conn = (open_rss as f64 - base as f64) / connections.max(1) as f64;
    eprintln!("spool sse: {per_conn:.2} KiB per connection ({connections} connections)");
    let mut md = String::new();
    let _ = writeln!(md, "## spool-bench sse-idle\n");
    let _ = writeln!(
        md,
        "{} SSE connections over {} streams; server `VmRSS` read {:?} after opening them; \
         {machine}.\n\n- `spool`: `{}`\n",
        args.connections, args.streams, args.settle, server.command_line
    );
    let _ = writeln!(
        md,
        "| target | connections | RSS before (MiB) | RSS open (MiB) | **KiB/conn** | open s | RSS after closing all (MiB) |"
    );
    let _ = writeln!(md, "|---|--:|--:|--:|--:|--:|--:|");
    let _ = writeln!(
        md,
        "| spool-sse | {connections} | {:.1} | {:.1} | **{per_conn:.2}** | {open_secs:.1} | {:.1} |",
        base as f64 / 1024.0,
        open_rss as f64 / 1024.0,
        closed as f64 / 1024.0,
    );
    let failed = failures.len();
    if let Some(first) = failures.first() {
        let _ = writeln!(md, "\n{failed} connections failed, e.g. {first}");
    }
    println!("{md}");
    let report: Value = json!({
        "benchmark": "sse-idle",
        "settings": {"connections": args.connections, "streams": args.streams,
                     "settle_s": args.settle.as_secs_f64()},
        "command_line": server.command_line,
        "connections": connections,
        "rss_kib": {"before": base, "open": open_rss, "closed": closed},
        "kib_per_connection": per_conn,
        "open_s": open_secs,
        "failures": failed,
    });
    args.out.write(&report)?;
    Ok(if failed == 0 && connections == args.connections {
        Verdict::Clean
    } else {
        Verdict::Failed
    })
}

/// One SSE connection, read up to the end of the server's first event (`retry` and the
/// `: spool` comment), then left idle.
async fn open(addr: SocketAddr, stream: String) -> Result<TcpStream> {
    tokio::time::timeout(OPEN_TIMEOUT, async {
        let mut tcp = TcpStream::connect(addr).await.context("connect")?;
        tcp.set_nodelay(true)?;
        let request = format!(
            "GET /v1/streams/{stream}/events HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await?;
        let mut got = Vec::with_capacity(512);
        let mut buf = [0u8; 512];
        loop {
            let n = tcp.read(&mut buf).await?;
            if n == 0 {
                bail!(
                    "closed before the first event: {:?}",
                    String::from_utf8_lossy(&got)
                );
            }
            got.extend_from_slice(&buf[..n]);
            if let Some(head_end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                if !got.starts_with(b"HTTP/1.1 200") {
                    bail!("not 200: {:?}", String::from_utf8_lossy(&got[..head_end]));
                }
                // The first event ends with a blank line (chunked: inside the first chunk).
                if got[head_end + 4..].windows(2).any(|w| w == b"\n\n") {
                    return Ok(tcp);
                }
            }
            if got.len() > 64 * 1024 {
                bail!("no first event in 64 KiB");
            }
        }
    })
    .await
    .context("timed out")?
}
