//! `spool-bench groups --drain N`: Spool alone (the first Spool target of `--targets`; by
//! default `spool`, the disk engine with fsync and HTTP members) preloaded with N messages,
//! then one group drained by the first `--members` value of members receiving the first
//! `--batch` value at a time, while the server's `VmRSS` is sampled every
//! [`SAMPLE_EVERY`]. The group keeps positions and leases only, so its memory should not
//! grow with the backlog: the drain's RSS curve (start, peak, end) says whether it does.
//! (The disk engine keeps an index entry per retained message and a tail cache bounded by
//! `--cache-size`; that part is the RSS after the preload, before the group exists.)

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::json;
use tokio::time::Instant;

use super::{
    GroupTarget, GroupsArgs, Kind, Mode, member_loop,
    spool::{SpoolGroups, Transport},
};
use crate::{
    publish::Verdict,
    ws::measure::{CpuMark, Quantiles, rss_kib},
};

/// How often the server's RSS is read during the drain.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

pub async fn run(args: &GroupsArgs, count: u64) -> Result<Verdict> {
    let members = args.members.first().copied().map_or(32, usize::from);
    let batch = args.batch.first().copied().map_or(32, usize::from);
    // The first Spool target of `--targets` (default `spool`: fsync, HTTP members).
    let kind = args
        .targets
        .iter()
        .copied()
        .find(|k| !matches!(k, Kind::Nats | Kind::Redis))
        .unwrap_or(Kind::Spool);
    let http = Transport::Http(args.http_ack);
    let spool = match kind {
        Kind::SpoolWrite => SpoolGroups::start_write(&args.spool, Some(count), http).await?,
        Kind::SpoolWs => {
            SpoolGroups::start(&args.spool, Some(count), Transport::Ws(args.ws_ack)).await?
        }
        Kind::SpoolWsWrite => {
            SpoolGroups::start_write(&args.spool, Some(count), Transport::Ws(args.ws_ack)).await?
        }
        Kind::Spool | Kind::Nats | Kind::Redis => {
            SpoolGroups::start(&args.spool, Some(count), http).await?
        }
    };
    let pid = spool.pid();
    eprintln!("started {}", spool.description());
    let idle_kib = rss_kib(pid)?;
    let t = Instant::now();
    spool.preload(count, args.size).await.context("preload")?;
    let preload_s = t.elapsed().as_secs_f64();
    let preloaded_kib = rss_kib(pid)?;
    eprintln!(
        "preloaded {count} messages in {preload_s:.1}s; RSS {idle_kib} KiB idle, {preloaded_kib} KiB now"
    );
    spool.create_group("drain", true).await?;
    let mut opened = Vec::with_capacity(members);
    for i in 0..members {
        opened.push(spool.member("drain", i, batch).await?);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(kib) = rss_kib(pid) {
                    samples.push((started.elapsed().as_secs_f64(), kib));
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            if let Ok(kib) = rss_kib(pid) {
                samples.push((started.elapsed().as_secs_f64(), kib));
            }
            samples
        })
    };
    let cpu = CpuMark::now(pid)?;
    let started = Instant::now();
    let deadline = started + args.drain_timeout;
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|m| tokio::spawn(member_loop(m, batch, Mode::Backlog, deadline)))
        .collect();
    let mut acked = 0;
    let mut errors = 0;
    let mut samples_err = Vec::new();
    let mut latency = crate::ws::measure::histogram()?;
    for task in tasks {
        let tally = task.await.context("a member task panicked")??;
        acked += tally.acked;
        errors += tally.errors;
        samples_err.extend(tally.samples);
        let _ = latency.add(&tally.ack_latency);
    }
    let elapsed = started.elapsed();
    let server_cpu = cpu.since()?.0;
    let ack_frames = spool.ack_frames();
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await.context("the sampler panicked")?;
    spool.check_alive()?;

    let start_kib = samples.first().map_or(0, |s| s.1);
    let end_kib = samples.last().map_or(0, |s| s.1);
    let (peak_at, peak_kib) = samples
        .iter()
        .copied()
        .max_by_key(|s| s.1)
        .unwrap_or((0.0, 0));
    let q = Quantiles::of(&latency);
    let rate = acked as f64 / elapsed.as_secs_f64().max(1e-9);
    let us_per_ack = server_cpu.as_secs_f64() * 1e6 / (acked.max(1) as f64);
    let mib = |k: u64| k as f64 / 1024.0;
    println!("\n## spool-bench groups --drain {count}\n");
    println!("- `{}`: {}", spool.name(), spool.description());
    println!(
        "- {count} messages of {} B preloaded in {preload_s:.1}s; drained by {members} members \
         × {batch} per receive",
        args.size
    );
    println!();
    println!("| | value |\n|---|--:|");
    println!(
        "| RSS idle (before the preload) | {:.1} MiB |",
        mib(idle_kib)
    );
    println!(
        "| RSS after the preload (stream held in memory) | {:.1} MiB |",
        mib(preloaded_kib)
    );
    println!("| RSS at the drain's start | {:.1} MiB |", mib(start_kib));
    println!(
        "| RSS peak during the drain | {:.1} MiB (at {peak_at:.1}s) |",
        mib(peak_kib)
    );
    println!("| RSS at the drain's end | {:.1} MiB |", mib(end_kib));
    println!(
        "| acked | {acked} of {count}{} |",
        if acked < count { " (cut short)" } else { "" }
    );
    println!("| drain time | {:.1}s |", elapsed.as_secs_f64());
    println!("| acks/s | {rate:.0} |");
    println!("| recv→ack p50 / p99 | {:.2} / {:.2} ms |", q.p50, q.p99);
    println!("| server CPU per ack | {us_per_ack:.1} µs |");
    if let Some((frames, receipts)) = ack_frames.filter(|&(f, _)| f > 0) {
        println!(
            "| `ack` frames (receipts per frame) | {frames} ({:.1}) |",
            receipts as f64 / frames as f64
        );
    }
    println!("| errors | {errors} |");
    for s in samples_err.iter().take(5) {
        println!("\nerror: {s}");
    }
    println!("\nRSS curve (s, MiB), every ~10th sample:\n");
    let step = (samples.len() / 20).max(1);
    let curve: Vec<String> = samples
        .iter()
        .step_by(step)
        .chain(samples.last())
        .map(|(t, k)| format!("{t:.1}:{:.0}", mib(*k)))
        .collect();
    println!("{}", curve.join(" "));
    args.out.write(&json!({
        "count": count, "size": args.size, "members": members, "batch": batch,
        "preload_s": preload_s, "idle_kib": idle_kib, "preloaded_kib": preloaded_kib,
        "drain_start_kib": start_kib, "drain_peak_kib": peak_kib, "drain_end_kib": end_kib,
        "acked": acked, "elapsed_s": elapsed.as_secs_f64(), "acks_per_sec": rate,
        "server_us_per_ack": us_per_ack, "errors": errors, "receive_to_ack": q.json(),
        "samples": samples,
    }))?;
    Ok(if errors == 0 && acked >= count {
        Verdict::Clean
    } else {
        Verdict::Failed
    })
}
