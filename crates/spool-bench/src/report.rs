//! The results: a markdown report for people (stdout, pasted into docs/benchmarks.md) and
//! the raw numbers as JSON for tools.
//!
//! The last column divides a row's throughput by the baseline target's (`--baseline`) at the same
//! concurrency (e.g. against `peer`: the share of bare-HTTP throughput Spool keeps; against
//! `spool-nosync`: what fsync-before-ack costs).

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::{readback::ReadBack, runner::RunResult};

/// Quantiles reported, with their column names.
const QUANTILES: [(f64, &str); 3] = [(0.50, "p50"), (0.99, "p99"), (0.999, "p999")];

/// What was run.
#[derive(Debug)]
pub struct Settings {
    /// Payload bytes.
    pub size: usize,
    pub streams: u16,
    /// Timed messages per run.
    pub messages: u64,
    /// Warm-up messages per run.
    pub warmup: u64,
    pub clients: Vec<u16>,
    /// CPUs this process may use.
    pub cpus: usize,
    pub targets: Vec<TargetInfo>,
    /// The target the ratio column divides by.
    pub baseline: String,
}

/// One target and how it was set up.
#[derive(Debug)]
pub struct TargetInfo {
    pub name: String,
    pub description: String,
}

/// Everything a benchmark found.
#[derive(Debug)]
pub struct Report {
    pub settings: Settings,
    pub runs: Vec<RunResult>,
    pub read_backs: Vec<ReadBack>,
}

impl Report {
    /// True when every request was acked and every read-back matched.
    pub fn clean(&self) -> bool {
        self.runs.iter().all(|r| r.all_errors() == 0) && self.read_backs.iter().all(ReadBack::ok)
    }

    /// Throughput of a row over the baseline's at the same concurrency.
    fn ratio(&self, run: &RunResult) -> Option<f64> {
        let baseline = &self.settings.baseline;
        if &run.target == baseline {
            return None;
        }
        let base = self
            .runs
            .iter()
            .find(|p| &p.target == baseline && p.clients == run.clients)?
            .msgs_per_sec();
        (base > 0.0).then(|| run.msgs_per_sec() / base)
    }

    pub fn markdown(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let _ = writeln!(out, "## spool-bench publish\n");
        let _ = writeln!(
            out,
            "{} B payloads, {} stream(s), {} timed messages per run after {} warm-up, \
             each client on its own keep-alive HTTP/1.1 connection, {} CPUs.\n",
            s.size, s.streams, s.messages, s.warmup, s.cpus
        );
        for t in &s.targets {
            let _ = writeln!(out, "- `{}`: {}", t.name, t.description);
        }
        let _ = writeln!(
            out,
            "\n| target | clients | msgs/s | p50 ms | p99 ms | p999 ms | server µs/msg | errors | ÷ {} |",
            s.baseline
        );
        let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|");
        for run in &self.runs {
            let latencies: Vec<String> = QUANTILES
                .iter()
                .map(|(q, _)| {
                    run.latency_ms(*q)
                        .map_or("—".into(), |ms| format!("{ms:.3}"))
                })
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} |",
                run.target,
                run.clients,
                run.msgs_per_sec(),
                latencies[0],
                latencies[1],
                latencies[2],
                run.server_us_per_msg()
                    .map_or("—".into(), |us| format!("{us:.1}")),
                run.all_errors(),
                self.ratio(run).map_or("—".into(), |r| format!("{r:.2}")),
            );
        }

        if !self.read_backs.is_empty() {
            let _ = writeln!(
                out,
                "\n| read-back | stream | acked | read | read msgs/s | result |"
            );
            let _ = writeln!(out, "|---|---|--:|--:|--:|---|");
            for r in &self.read_backs {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {:.0} | {} |",
                    r.target,
                    r.stream,
                    r.acked,
                    r.read,
                    r.msgs_per_sec(),
                    if r.ok() { "ok" } else { "MISMATCH" }
                );
            }
        }

        let _ = writeln!(out);
        for r in &self.read_backs {
            if r.ok() {
                let _ = writeln!(
                    out,
                    "read-back OK: {} {}: read {} messages = {} acked{}",
                    r.target,
                    r.stream,
                    r.read,
                    r.acked,
                    if r.read > 0 {
                        format!(", offsets 1..={} in one epoch, no reset", r.read)
                    } else {
                        String::new()
                    }
                );
            } else {
                let _ = writeln!(
                    out,
                    "READ-BACK FAILED: {} {}: read {} messages but {} were acked{}",
                    r.target,
                    r.stream,
                    r.read,
                    r.acked,
                    if r.problems.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", r.problems.join("; "))
                    }
                );
            }
        }
        for run in self.runs.iter().filter(|r| r.all_errors() > 0) {
            let _ = writeln!(
                out,
                "ERRORS: {} with {} clients: {} not acked ({} in the warm-up); e.g. {}",
                run.target,
                run.clients,
                run.all_errors(),
                run.warmup_errors,
                run.error_samples.join(" | ")
            );
        }
        out
    }

    pub fn json(&self) -> Value {
        let s = &self.settings;
        json!({
            "benchmark": "publish",
            "settings": {
                "size": s.size,
                "streams": s.streams,
                "messages": s.messages,
                "warmup": s.warmup,
                "clients": s.clients,
                "cpus": s.cpus,
                "targets": s.targets.iter()
                    .map(|t| json!({"name": t.name, "description": t.description}))
                    .collect::<Vec<_>>(),
            },
            "runs": self.runs.iter().map(|r| {
                let mut latency = serde_json::Map::new();
                for (q, name) in QUANTILES {
                    latency.insert(format!("{name}_ms"), json!(r.latency_ms(q)));
                }
                latency.insert("max_ms".into(), json!(r.latency_ms(1.0)));
                latency.insert("mean_ms".into(), json!(
                    (!r.latency_us.is_empty()).then(|| r.latency_us.mean() / 1000.0)
                ));
                json!({
                    "target": r.target,
                    "clients": r.clients,
                    "messages": r.messages,
                    "acked": r.acked,
                    "errors": r.errors,
                    "warmup_errors": r.warmup_errors,
                    "elapsed_s": r.elapsed.as_secs_f64(),
                    "msgs_per_sec": r.msgs_per_sec(),
                    "server_cpu_s": r.server_cpu.map(|c| c.as_secs_f64()),
                    "server_us_per_msg": r.server_us_per_msg(),
                    "latency": latency,
                    "over_baseline": self.ratio(r),
                    "error_samples": r.error_samples,
                })
            }).collect::<Vec<_>>(),
            "read_back": self.read_backs.iter().map(|r| json!({
                "target": r.target,
                "stream": r.stream,
                "acked": r.acked,
                "read": r.read,
                "elapsed_s": r.elapsed.as_secs_f64(),
                "msgs_per_sec": r.msgs_per_sec(),
                "ok": r.ok(),
                "problems": r.problems,
            })).collect::<Vec<_>>(),
            "clean": self.clean(),
        })
    }
}
