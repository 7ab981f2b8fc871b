//! `spool-bench retained`: the disk engine's memory with much retained history (issue 14
//! item 4), and a subscriber resuming far behind, against JetStream file storage.
//!
//! 1. Spool (disk engine, `--durability memory` to load fast; the engine's memory does not
//!    depend on it) is loaded with `--retained` bytes of messages of `--size` bytes over
//!    `--streams` streams, published in batches that mix streams (so every WAL segment
//!    interleaves many streams), plus one stream `resume` of `--behind` + 1,000 messages.
//!    Retention is set so that everything is kept.
//! 2. RSS (`VmRSS`) live, and the peak (`VmHWM`).
//! 3. A reader resumes `--behind` messages behind the head of `resume` with long-polls
//!    (`after=<position>`, `limit=1000`) until it has them all, every offset checked: served
//!    from the segment files, the tail cache holding only the newest messages.
//! 4. Spool is killed and started again on the same data directory: the time to ready, RSS
//!    after recovery and its peak, then the same resume again (cold: no cached message).
//! 5. JetStream (`nats-server -js`, file storage) holds the same `resume` stream; an
//!    ephemeral pull consumer from the same start sequence fetches the same count, 1,000 at a
//!    time, every sequence checked.
//!
//! The goal (issue 14): RSS live and after a restart ≤ the cache budget + 64 MiB.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use clap::Args;
use futures::{StreamExt, future::try_join_all};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    SpoolBinArgs,
    publish::Verdict,
    spool_process::SpoolProcess,
    targets::{nats::jetstream_args, process::PeerProcess},
    ws::measure::rss_kib,
};

#[derive(Args, Debug, Clone)]
pub struct RetainedArgs {
    #[command(flatten)]
    pub spool: SpoolBinArgs,
    /// Streams the retained history is spread over.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub streams: usize,
    /// Bytes of payload retained over those streams (MiB).
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub retained_mib: u64,
    /// Payload size of every message, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 1024)]
    pub size: usize,
    /// How far behind the resuming reader starts, in messages.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub behind: u64,
    /// `--cache-size` for Spool, e.g. 64MiB; unset: the server's default.
    #[arg(long, value_name = "BYTES")]
    pub cache_size: Option<String>,
    /// Publish requests in flight while loading.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub concurrency: usize,
    /// Skip the JetStream half.
    #[arg(long)]
    pub no_jetstream: bool,
}

/// Messages per publish request while loading.
const BATCH: usize = 200;
/// The stream the reader resumes on.
const RESUME: &str = "resume";
/// Messages per long-poll and per JetStream fetch.
const READ_LIMIT: u64 = 1000;
/// Longest wait for a restarted server to be ready.
const RESTART_TIMEOUT: Duration = Duration::from_secs(600);

fn peak_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmHWM in /proc/{pid}/status"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn payload(size: usize, n: u64) -> String {
    let mut s = format!("{n:012}-");
    while s.len() < size {
        s.push((b'a' + (s.len() % 26) as u8) as char);
    }
    s.truncate(size);
    s
}

struct Resume {
    messages: u64,
    seconds: f64,
}

impl Resume {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds.max(1e-9)
    }
}

pub async fn run(args: RetainedArgs) -> Result<Verdict> {
    if args.size < 16 || args.streams == 0 {
        bail!("--size must be at least 16 and --streams at least 1");
    }
    let data = tempfile::tempdir().context("cannot create a data directory")?;
    let per_stream = (args.retained_mib * 1024 * 1024 / args.size as u64) / args.streams as u64;
    let resume_count = args.behind + READ_LIMIT;
    let history_limit = per_stream.max(resume_count) + 1;
    let history_bytes = (history_limit * args.size as u64 * 2).max(64 * 1024 * 1024);
    let mut server_args: Vec<String> = vec![
        "--engine".into(),
        "disk".into(),
        "--data-dir".into(),
        data.path().display().to_string(),
        "--durability".into(),
        "memory".into(),
        "--allow-anonymous".into(),
        format!("--history-limit={history_limit}"),
        format!("--history-max-bytes={history_bytes}"),
        "--history-ttl=48h".into(),
        "--max-new-streams-per-minute=0".into(),
    ];
    if let Some(cache) = &args.cache_size {
        server_args.push(format!("--cache-size={cache}"));
    }
    server_args.extend(args.spool.server_args.iter().cloned());
    let spool = SpoolProcess::start(&args.spool.spool_bin, &server_args).await?;
    let base = format!("http://{}", spool.addr());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    let idle = rss_kib(spool.pid())?;
    eprintln!("started: {}", spool.command_line());

    // 1. Load.
    let t = Instant::now();
    let epoch = load(&http, &base, &args, per_stream, resume_count).await?;
    let load_s = t.elapsed().as_secs_f64();
    let total_messages = per_stream * args.streams as u64 + resume_count;
    let retained_mib = (total_messages * args.size as u64) as f64 / 1048576.0;
    eprintln!(
        "loaded {total_messages} messages ({retained_mib:.0} MiB of payload) in {load_s:.1}s"
    );
    for s in [format!("s{}", args.streams - 1), RESUME.to_owned()] {
        let info: Value = http
            .get(format!("{base}/v1/streams/{s}"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        eprintln!("{s}: {info}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let live = rss_kib(spool.pid())?;
    let live_peak = peak_kib(spool.pid())?;

    // 2. Resume, live.
    let head = resume_count;
    let after = head - args.behind;
    let live_resume = resume_spool(&http, &base, &epoch, after, head, args.size)
        .await
        .map_err(|e| died(&spool, e))?;
    let live_after_resume = rss_kib(spool.pid())?;
    let command = spool.command_line().to_owned();
    spool.check_alive()?;

    // 3. Restart (kill -9, then the same data directory).
    drop(spool);
    let t = Instant::now();
    let spool = tokio::time::timeout(
        RESTART_TIMEOUT,
        SpoolProcess::start(&args.spool.spool_bin, &server_args),
    )
    .await
    .map_err(|_| anyhow!("the restarted server was not ready within {RESTART_TIMEOUT:?}"))??;
    let recovery_s = t.elapsed().as_secs_f64();
    let base = format!("http://{}", spool.addr());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = rss_kib(spool.pid())?;
    let restarted_peak = peak_kib(spool.pid())?;
    let cold_resume = resume_spool(&http, &base, &epoch, after, head, args.size)
        .await
        .map_err(|e| died(&spool, e))?;
    let restarted_after_resume = rss_kib(spool.pid())?;
    let restarted_final_peak = peak_kib(spool.pid())?;
    spool.check_alive()?;
    drop(spool);

    // 4. JetStream.
    let js = if args.no_jetstream {
        None
    } else {
        Some(jetstream_resume(&args, resume_count, after).await?)
    };

    println!("\n## spool-bench retained\n");
    println!("- `spool`: `{command}`");
    println!(
        "- {} streams × {per_stream} messages + `{RESUME}` × {resume_count}, {} B payloads: \
         {total_messages} messages, {retained_mib:.0} MiB of payload retained; loaded in \
         {load_s:.1}s ({BATCH} messages per HTTP batch, {} in flight)",
        args.streams, args.size, args.concurrency
    );
    println!(
        "- cache budget: {}",
        args.cache_size.as_deref().unwrap_or("the default (64MiB)")
    );
    println!();
    println!("| spool, disk engine | RSS | peak (VmHWM) |\n|---|--:|--:|");
    println!("| idle, before loading | {:.1} MiB | |", mib(idle));
    println!(
        "| live, everything loaded | {:.1} MiB | {:.1} MiB |",
        mib(live),
        mib(live_peak)
    );
    println!(
        "| live, after the resume | {:.1} MiB | |",
        mib(live_after_resume)
    );
    println!(
        "| restarted (ready in {recovery_s:.1}s) | {:.1} MiB | {:.1} MiB |",
        mib(restarted),
        mib(restarted_peak)
    );
    println!(
        "| restarted, after the resume | {:.1} MiB | {:.1} MiB |",
        mib(restarted_after_resume),
        mib(restarted_final_peak)
    );
    println!();
    println!(
        "| resume {} messages behind (`limit={READ_LIMIT}` per read) | msg/s | s |\n|---|--:|--:|",
        args.behind
    );
    println!(
        "| spool, live (long-poll) | {:.0} | {:.2} |",
        live_resume.rate(),
        live_resume.seconds
    );
    println!(
        "| spool, after a restart (long-poll, nothing cached) | {:.0} | {:.2} |",
        cold_resume.rate(),
        cold_resume.seconds
    );
    if let Some((js, description, js_rss)) = &js {
        println!(
            "| JetStream file storage (pull consumer, fetch {READ_LIMIT}) | {:.0} | {:.2} |",
            js.rate(),
            js.seconds
        );
        println!();
        println!(
            "- `nats-js`: `{description}`; its RSS holding the `{RESUME}` stream only, after \
             the resume: {:.1} MiB",
            mib(*js_rss)
        );
        println!(
            "- spool / JetStream resume rate: live {:.2}×, after a restart {:.2}×",
            live_resume.rate() / js.rate(),
            cold_resume.rate() / js.rate()
        );
    }
    Ok(Verdict::Clean)
}

/// `e`, with the server's last log lines if it has exited.
fn died(spool: &SpoolProcess, e: anyhow::Error) -> anyhow::Error {
    match spool.check_alive() {
        Ok(()) => e,
        Err(dead) => e.context(format!("{dead:#}")),
    }
}

/// Publishes everything; answers the epoch of `resume`.
async fn load(
    http: &reqwest::Client,
    base: &str,
    args: &RetainedArgs,
    per_stream: u64,
    resume_count: u64,
) -> Result<String> {
    // Jobs: (stream index or None for `resume`, first n, count), interleaving streams.
    let next = Arc::new(AtomicU64::new(0));
    let streams = args.streams as u64;
    let total = per_stream * streams;
    let jobs = (total / BATCH as u64) + 1;
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (http, base, next) = (http.clone(), base.to_owned(), next.clone());
        let size = args.size;
        tasks.push(tokio::spawn(async move {
            loop {
                let job = next.fetch_add(1, Ordering::Relaxed);
                if job >= jobs {
                    return Ok::<(), anyhow::Error>(());
                }
                // Message k (of all) goes to stream k % streams: a batch holds BATCH
                // consecutive ks, so BATCH different streams.
                let first = job * BATCH as u64;
                let last = (first + BATCH as u64).min(total);
                if first >= last {
                    continue;
                }
                let messages: Vec<Value> = (first..last)
                    .map(|k| json!({"stream": format!("s{}", k % streams), "data": payload(size, k / streams + 1)}))
                    .collect();
                publish(&http, &base, messages).await?;
            }
        }));
    }
    for t in tasks {
        t.await.context("a load task panicked")??;
    }
    let mut epoch = String::new();
    let mut n = 0;
    while n < resume_count {
        let count = (resume_count - n).min(BATCH as u64 * 4);
        let messages: Vec<Value> = (n..n + count)
            .map(|i| json!({"stream": RESUME, "data": payload(args.size, i + 1)}))
            .collect();
        let answer = publish(http, base, messages).await?;
        epoch = answer["results"][0]["epoch"]
            .as_str()
            .ok_or_else(|| anyhow!("no epoch in {answer}"))?
            .to_owned();
        n += count;
    }
    Ok(epoch)
}

async fn publish(http: &reqwest::Client, base: &str, messages: Vec<Value>) -> Result<Value> {
    let response = http
        .post(format!("{base}/v1/publish"))
        .json(&json!({ "messages": messages }))
        .send()
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    if !status.is_success() {
        bail!("publish failed: {status} {body}");
    }
    Ok(body)
}

/// Long-polls `resume` from `after` to `head`, checking every offset and payload.
async fn resume_spool(
    http: &reqwest::Client,
    base: &str,
    epoch: &str,
    after: u64,
    head: u64,
    size: usize,
) -> Result<Resume> {
    let t = Instant::now();
    let mut position = format!("{epoch}:{after}");
    let mut expect = after + 1;
    while expect <= head {
        let answer: Value = http
            .get(format!("{base}/v1/streams/{RESUME}/messages"))
            .query(&[
                ("after", position.as_str()),
                ("limit", &READ_LIMIT.to_string()),
                ("wait", "0"),
            ])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if !answer["reset"].is_null() {
            bail!("the resume was reset: {}", answer["reset"]);
        }
        let messages = answer["messages"]
            .as_array()
            .ok_or_else(|| anyhow!("no messages in the answer"))?;
        if messages.is_empty() {
            bail!("an empty answer at {expect} of {head}");
        }
        for m in messages {
            let offset = m["offset"].as_u64().unwrap_or(0);
            if offset != expect || m["data"].as_str() != Some(payload(size, offset).as_str()) {
                bail!("expected message {expect}, got {offset}");
            }
            expect += 1;
        }
        position = answer["position"]
            .as_str()
            .ok_or_else(|| anyhow!("no position"))?
            .to_owned();
    }
    Ok(Resume {
        messages: head - after,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// The same `resume` stream on JetStream, and the same resume: the time, the server's
/// command line and its RSS after.
async fn jetstream_resume(
    args: &RetainedArgs,
    count: u64,
    after: u64,
) -> Result<(Resume, String, u64)> {
    let process = PeerProcess::start("nats-server", jetstream_args).await?;
    let client = async_nats::connect(format!("nats://{}", process.addr))
        .await
        .context("cannot connect to nats-server")?;
    let js = jetstream::new(client);
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: "RETAINED".into(),
            subjects: vec![RESUME.into()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("cannot create the JetStream stream: {e}"))?;
    let mut sent = 0;
    while sent < count {
        let n = 1000.min(count - sent);
        let mut acks = Vec::with_capacity(n as usize);
        for i in sent..sent + n {
            acks.push(
                js.publish(RESUME, Bytes::from(payload(args.size, i + 1)))
                    .await
                    .map_err(|e| anyhow!("publish: {e}"))?,
            );
        }
        try_join_all(
            acks.into_iter()
                .map(|a| async move { a.await.map_err(|e| anyhow!("no JetStream ack: {e}")) }),
        )
        .await?;
        sent += n;
    }
    let t = Instant::now();
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("create consumer: {e}"))?;
    let mut expect = after + 1;
    while expect <= count {
        let mut batch = consumer
            .fetch()
            .max_messages(READ_LIMIT as usize)
            .messages()
            .await
            .map_err(|e| anyhow!("fetch: {e}"))?;
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow!("fetch: {e}"))?;
            let seq = m.info().map_err(|e| anyhow!("info: {e}"))?.stream_sequence;
            if seq != expect || m.payload != payload(args.size, seq).as_bytes() {
                bail!("JetStream: expected message {expect}, got {seq}");
            }
            expect += 1;
            got += 1;
        }
        if got == 0 {
            bail!("JetStream: an empty fetch at {expect} of {count}");
        }
    }
    let resume = Resume {
        messages: count - after,
        seconds: t.elapsed().as_secs_f64(),
    };
    let rss = rss_kib(process.pid())?;
    Ok((resume, process.command_line.clone(), rss))
}
