//! The run's summary, as text for people and as JSON for scripts.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    checker::{self, Stats, Violation},
    history::Entry,
    scenario::RunResult,
};

/// Violations printed with their subscriber's history.
const DETAILED: usize = 10;
/// Entries of the subscriber shown either side of a violation.
const RADIUS: usize = 8;

impl RunResult {
    /// The summary for people. `reproduce` is the command line that replays the run.
    pub fn render_text(&self, reproduce: &str) -> String {
        let s = &self.report.stats;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "spool check: engine {}, {} node(s), seed {}, {:.1} s",
            self.engine,
            self.nodes,
            self.seed,
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "operations: {} publishes ({} acked, {} retries answered duplicate), {} attempts ({} without an answer, {} refused)",
            s.publish_ops,
            s.acked_ops,
            s.duplicate_acks,
            s.publish_attempts,
            s.indeterminate_attempts,
            s.refused_attempts
        );
        let _ = writeln!(
            out,
            "faults injected: {}{}",
            self.faults_applied,
            list(&s.faults)
        );
        let _ = writeln!(
            out,
            "subscribers: {} (ws, sse, poll); deliveries checked: {}; resets: {}{}; ws reconnects: {} ({} resumed)",
            s.subscribers,
            s.deliveries_checked,
            s.resets.values().sum::<u64>(),
            list(&s.resets),
            s.reconnects,
            s.resumed
        );
        let _ = writeln!(
            out,
            "acked messages checked: {} (message, subscriber) pairs delivered or covered by a reset; {} present in the final read of {} messages",
            s.acked_deliveries_checked, s.acked_in_final_read, s.final_read_messages
        );
        for e in &self.harness_errors {
            let _ = writeln!(out, "harness error (not a verdict on Spool): {e}");
        }
        if self.dropped_entries > 0 {
            let _ = writeln!(
                out,
                "history incomplete: {} entries did not fit (raise --max-history or shorten the run); violations below may only be what is missing from it",
                self.dropped_entries
            );
        }
        let count = self.report.violation_count();
        let _ = writeln!(out, "violations: {count}{}", list(&self.report.by_kind()));
        for (n, v) in self.report.violations.iter().take(DETAILED).enumerate() {
            let _ = writeln!(
                out,
                "\nVIOLATION {}/{count} [{}] {}",
                n + 1,
                v.kind.name(),
                v.message
            );
            for (i, e) in context_of(&self.entries, v) {
                let _ = writeln!(
                    out,
                    "  {}#{i} +{:.3}s {}",
                    if Some(i) == v.entry { "> " } else { "  " },
                    e.at_ms as f64 / 1000.0,
                    serde_json::to_string(&e.event).unwrap_or_default()
                );
            }
        }
        if count as usize > DETAILED {
            let _ = writeln!(out, "\n… and {} more violations", count as usize - DETAILED);
        }
        if !self.passed() {
            let _ = writeln!(
                out,
                "\nseed {}; reproduce the fault schedule with:\n  {reproduce}",
                self.seed
            );
        }
        out
    }

    /// The summary as one JSON object.
    pub fn render_json(&self, reproduce: &str) -> String {
        #[derive(Serialize)]
        struct Detailed<'a> {
            #[serde(flatten)]
            violation: &'a Violation,
            history: Vec<(usize, &'a Entry)>,
        }
        #[derive(Serialize)]
        struct Summary<'a> {
            passed: bool,
            seed: u64,
            engine: &'a str,
            nodes: usize,
            elapsed_s: f64,
            faults_scheduled: usize,
            faults_injected: u64,
            /// The fault schedule drawn from the seed (the same seed gives the same one).
            schedule: &'a [crate::nemesis::Planned],
            stats: &'a Stats,
            violation_count: u64,
            violations: Vec<Detailed<'a>>,
            harness_errors: &'a [String],
            dropped_entries: u64,
            history_entries: usize,
            reproduce: &'a str,
        }
        let summary = Summary {
            passed: self.passed(),
            seed: self.seed,
            engine: &self.engine,
            nodes: self.nodes,
            elapsed_s: self.elapsed.as_secs_f64(),
            faults_scheduled: self.schedule.len(),
            faults_injected: self.faults_applied,
            schedule: &self.schedule,
            stats: &self.report.stats,
            violation_count: self.report.violation_count(),
            violations: self
                .report
                .violations
                .iter()
                .map(|v| Detailed {
                    violation: v,
                    history: context_of(&self.entries, v),
                })
                .collect(),
            harness_errors: &self.harness_errors,
            dropped_entries: self.dropped_entries,
            history_entries: self.entries.len(),
            reproduce,
        };
        serde_json::to_string_pretty(&summary).unwrap_or_default()
    }
}

fn context_of<'a>(entries: &'a [Entry], v: &Violation) -> Vec<(usize, &'a Entry)> {
    match (&v.sub, v.entry) {
        (Some(sub), Some(i)) => checker::context(entries, sub, i, RADIUS),
        (None, Some(i)) => entries.get(i).map(|e| vec![(i, e)]).unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn list<K: std::fmt::Display, V: std::fmt::Display>(
    m: &std::collections::BTreeMap<K, V>,
) -> String {
    if m.is_empty() {
        return String::new();
    }
    let items: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!(" ({})", items.join(", "))
}
