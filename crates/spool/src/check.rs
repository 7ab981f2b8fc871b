//! `spool check`: prove "no silent gap" (SPEC §2) under random faults. Runs a workload of
//! publishers and subscribers on every transport against servers it starts itself
//! (`--engine`, `--nodes`) or a running deployment (`--url`), injects faults on a schedule
//! drawn from `--seed`, records the history and checks it (the crate `spool-check`). Exits
//! non-zero when it finds a violation.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use spool_check::{Engine, Options, Target};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    Disk,
    Memory,
    Redis,
    Nats,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The engine of the servers the check starts itself.
    #[arg(long, value_enum, default_value_t = EngineArg::Disk, conflicts_with = "url")]
    pub engine: EngineArg,
    /// Nodes to start (Redis and NATS; the disk and memory engines run one). Default: 3 on
    /// Redis and NATS.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=16), conflicts_with = "url")]
    pub nodes: Option<u64>,
    /// A running Redis / NATS to put the nodes on (under a key prefix of the run's own), instead
    /// of a redis-server / nats-server the check starts on a spare port; it is then not
    /// restarted.
    #[arg(long, value_name = "URL", conflicts_with = "url")]
    pub engine_url: Option<String>,
    /// Check a running deployment instead: the http:// URL of each node (repeat). Its clients
    /// go through fault proxies on 127.0.0.1; nodes and engine are not restarted.
    #[arg(long, value_name = "URL")]
    pub url: Vec<String>,
    /// API key for `--url` (or a JWT that may publish and subscribe to `spool-check-*`).
    #[arg(
        long,
        env = "SPOOL_TOKEN",
        hide_env_values = true,
        visible_alias = "api-key"
    )]
    pub token: Option<String>,
    /// Seed of the fault schedule and the workload's choices; the same seed gives the same
    /// schedule. Default: from the clock (printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// How long the workload runs (faults stop a little before the end).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Most publish operations; the run ends when they are done (or at --duration).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub ops: Option<u64>,
    /// Publishers (HTTP, idempotency keys, retries across nodes).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub publishers: u64,
    /// Subscribers, on ws, sse and poll in turn, spread over the nodes.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub subscribers: u64,
    /// Streams with the default retention (a stream with a small history limit is added when
    /// the check starts the servers).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=50))]
    pub streams: u64,
    /// Publish operations per second, all publishers together.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub rate: u64,
    /// History limit of the tight-retention stream (retention pressure).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..))]
    pub tight_limit: u64,
    /// Run the workload without faults.
    #[arg(long)]
    pub no_faults: bool,
    /// Longest wait for every subscriber to catch up after the workload.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Most history entries kept in memory (the run stops early, and fails, past it).
    #[arg(long, default_value_t = 5_000_000)]
    pub max_history: usize,
    /// Write the whole history to FILE (JSON, one entry per line), to re-check it with
    /// `--check-history` or read it.
    #[arg(long, value_name = "FILE")]
    pub history: Option<PathBuf>,
    /// Only check a history written by `--history` (no run).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["url", "history"])]
    pub check_history: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: CheckArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.check_history {
        return check_file(path, args.json);
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_000)
            .unwrap_or(1)
    });
    let target = if args.url.is_empty() {
        let engine = match args.engine {
            EngineArg::Disk => Engine::Disk,
            EngineArg::Memory => Engine::Memory,
            EngineArg::Redis => Engine::Redis,
            EngineArg::Nats => Engine::Nats,
        };
        if args.engine_url.is_some() && !matches!(engine, Engine::Redis | Engine::Nats) {
            bail!("--engine-url is for --engine redis or nats");
        }
        let clustered = matches!(engine, Engine::Redis | Engine::Nats);
        Target::Start {
            engine,
            nodes: args.nodes.unwrap_or(if clustered { 3 } else { 1 }) as usize,
            spool_bin: std::env::current_exe().context("the path of this spool binary")?,
            engine_url: args.engine_url.clone(),
        }
    } else {
        Target::Remote {
            urls: args.url.clone(),
            token: args.token.clone(),
        }
    };
    let mut opts = Options::new(target);
    opts.seed = seed;
    opts.duration = args.duration;
    opts.ops = args.ops;
    opts.publishers = args.publishers as usize;
    opts.subscribers = args.subscribers as usize;
    opts.streams = args.streams as usize;
    opts.rate = args.rate;
    opts.tight_limit = args.tight_limit;
    opts.faults = !args.no_faults;
    opts.settle = args.settle;
    opts.max_history = args.max_history.max(1000);
    opts.progress = !args.json;

    let result = spool_check::run(opts).await?;
    if let Some(path) = &args.history {
        write_history(path, &result.entries)?;
    } else if !result.passed() {
        // A failed run keeps its whole history for a closer look (`--check-history` reads it).
        let path = std::env::temp_dir().join(format!(
            "spool-check-{seed}-{}.history.jsonl",
            std::process::id()
        ));
        match write_history(&path, &result.entries) {
            Ok(()) => eprintln!("spool check: the whole history is in {}", path.display()),
            Err(e) => eprintln!("spool check: could not keep the history: {e:#}"),
        }
    }
    let reproduce = reproduce(&args, seed);
    if args.json {
        println!("{}", result.render_json(&reproduce));
    } else {
        print!("{}", result.render_text(&reproduce));
    }
    if !result.passed() {
        bail!(
            "check failed (seed {seed}): {} violations{}",
            result.report.violation_count(),
            if result.harness_errors.is_empty() {
                String::new()
            } else {
                format!(", {} harness errors", result.harness_errors.len())
            }
        );
    }
    Ok(())
}

/// The command line that replays this run's schedule.
fn reproduce(args: &CheckArgs, seed: u64) -> String {
    let mut cmd = vec!["spool check".to_owned()];
    if args.url.is_empty() {
        cmd.push(format!(
            "--engine {}",
            args.engine
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default()
        ));
        if let Some(n) = args.nodes {
            cmd.push(format!("--nodes {n}"));
        }
        if let Some(u) = &args.engine_url {
            cmd.push(format!("--engine-url {u}"));
        }
    } else {
        for u in &args.url {
            cmd.push(format!("--url {u}"));
        }
    }
    cmd.push(format!("--seed {seed}"));
    cmd.push(format!(
        "--duration {}",
        humantime::format_duration(args.duration)
    ));
    if let Some(ops) = args.ops {
        cmd.push(format!("--ops {ops}"));
    }
    for (flag, value, default) in [
        ("--publishers", args.publishers, 3),
        ("--subscribers", args.subscribers, 6),
        ("--streams", args.streams, 2),
        ("--rate", args.rate, 100),
        ("--tight-limit", args.tight_limit, 40),
    ] {
        if value != default {
            cmd.push(format!("{flag} {value}"));
        }
    }
    if args.no_faults {
        cmd.push("--no-faults".into());
    }
    cmd.join(" ")
}

fn write_history(path: &PathBuf, entries: &[spool_check::Entry]) -> anyhow::Result<()> {
    use std::io::Write;
    let file =
        std::fs::File::create(path).with_context(|| format!("--history {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for e in entries {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Checks a saved history and prints the violations.
fn check_file(path: &PathBuf, json: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--check-history {}", path.display()))?;
    let mut entries = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        entries.push(
            serde_json::from_str::<spool_check::Entry>(line)
                .with_context(|| format!("{}:{}: not a history entry", path.display(), n + 1))?,
        );
    }
    let report = spool_check::check(&entries);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} entries; deliveries checked: {}; violations: {}",
            entries.len(),
            report.stats.deliveries_checked,
            report.violation_count()
        );
        for v in &report.violations {
            println!("[{}] {}", v.kind.name(), v.message);
        }
    }
    if report.violation_count() > 0 {
        bail!("{} violations", report.violation_count());
    }
    Ok(())
}
