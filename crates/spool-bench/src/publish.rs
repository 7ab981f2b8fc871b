//! `spool-bench publish`: start every target, run each concurrency against each target in
//! turn (Spool then its peer, close together in time, so a noisy machine affects both alike),
//! read Spool back to check every ack, then print the report.

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::{
    PublishArgs,
    report::{Report, Settings, TargetInfo},
    runner::{self, RunConfig},
    targets::{self, SpoolOptions, TargetKind},
    workload::Workload,
};

/// Whether the benchmark's numbers can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every request acked and everything acked read back.
    Clean,
    /// Errors or a failed read-back: the report says which.
    Failed,
}

pub async fn run(args: PublishArgs) -> Result<Verdict> {
    let workload = Arc::new(Workload::new(args.streams, args.load.size));
    let spool = SpoolOptions {
        bin: args.spool.spool_bin.clone(),
        extra_args: args.spool.server_args.clone(),
    };
    let mut kinds: Vec<TargetKind> = Vec::new();
    for kind in &args.targets {
        if !kinds.contains(kind) {
            kinds.push(*kind);
        }
    }

    let mut targets = Vec::with_capacity(kinds.len());
    for kind in kinds {
        let target = targets::start(kind, &spool, workload.clone())
            .await
            .with_context(|| format!("cannot start target {kind:?}"))?;
        eprintln!("started {}: {}", target.name(), target.description());
        targets.push(target);
    }

    let mut runs = Vec::new();
    for &clients in &args.load.clients {
        for target in &targets {
            eprint!("{} with {clients} clients: ", target.name());
            let config = RunConfig {
                clients: usize::from(clients),
                messages: args.load.messages,
                warmup: args.load.warmup,
            };
            let result = runner::run(target.as_ref(), config)
                .await
                .with_context(|| format!("{} with {clients} clients failed", target.name()))?;
            eprintln!(
                "{:.0} msgs/s, {} errors",
                result.msgs_per_sec(),
                result.all_errors()
            );
            runs.push(result);
        }
    }

    let mut read_backs = Vec::new();
    for target in &targets {
        if let Some(found) = target
            .read_back()
            .await
            .with_context(|| format!("reading {} back failed", target.name()))?
        {
            read_backs.extend(found);
        }
    }

    let report = Report {
        settings: Settings {
            size: workload.payload_size(),
            streams: args.streams,
            messages: args.load.messages,
            warmup: args.load.warmup,
            clients: args.load.clients.clone(),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            targets: targets
                .iter()
                .map(|t| TargetInfo {
                    name: t.name().to_owned(),
                    description: t.description(),
                })
                .collect(),
            baseline: args.baseline.clone(),
        },
        runs,
        read_backs,
    };
    // The servers are no longer needed; stop them before writing anything out.
    drop(targets);

    print!("{}", report.markdown());
    args.out.write(&report.json())?;
    Ok(if report.clean() {
        Verdict::Clean
    } else {
        Verdict::Failed
    })
}
