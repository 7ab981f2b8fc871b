//! Measuring tools of the WebSocket benchmarks: a process-wide microsecond clock, sharded
//! latency histograms, readings of a process's memory and CPU time from `/proc`, and the
//! open-files limit.
//!
//! Publisher and subscribers live in this one process, so a send stamp taken from [`now_us`]
//! and carried in the payload gives the end-to-end latency without any clock skew.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// Highest latency tracked exactly (120 s, in µs); slower ones are clamped.
const MAX_LATENCY_US: u64 = 120_000_000;
/// Histograms shared by the recording tasks; task `i` records into shard `i % SHARDS`.
const SHARDS: usize = 64;

/// Microseconds since the first call in this process (monotonic).
pub fn now_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    u64::try_from(BASE.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// A new latency histogram (µs, 3 significant digits).
pub fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .map_err(|e| anyhow!("cannot create a latency histogram: {e:?}"))
}

/// Latencies recorded by many tasks at once: a few mutex-guarded histograms, so thousands of
/// subscriber tasks neither own a histogram each (≈ 40 KiB apiece) nor contend on one.
pub struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latencies {
    pub fn new() -> Result<Self> {
        Ok(Self {
            shards: (0..SHARDS)
                .map(|_| histogram().map(Mutex::new))
                .collect::<Result<_>>()?,
        })
    }

    pub fn record(&self, shard: usize, us: u64) {
        self.shards[shard % SHARDS]
            .lock()
            .saturating_record(us.max(1));
    }

    /// Everything recorded so far, merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram().expect("fixed bounds are valid");
        for shard in &self.shards {
            let _ = all.add(&*shard.lock());
        }
        all
    }

    pub fn reset(&self) {
        for shard in &self.shards {
            shard.lock().reset();
        }
    }
}

/// The quantiles the reports show, in ms.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quantiles {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Quantiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(0.5),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }

    pub fn json(&self) -> Value {
        json!({"count": self.count, "p50_ms": self.p50, "p99_ms": self.p99,
               "p999_ms": self.p999, "max_ms": self.max})
    }
}

/// Formats a latency in ms for a table ("—" when nothing was measured).
pub fn ms(value: f64, count: u64) -> String {
    if count == 0 {
        "—".into()
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// Resident memory of process `pid` (`VmRSS` of `/proc/PID/status`), in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// CPU time (user + system, every thread) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) of proc(5); `rest` starts at field 3.
    let ticks: u64 = [11, 12]
        .iter()
        .map(|&i| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_sec = if per_sec > 0 { per_sec as u64 } else { 100 };
    Ok(Duration::from_micros(ticks * 1_000_000 / per_sec))
}

/// CPU used by a process over a span of wall time.
#[derive(Clone, Copy, Debug)]
pub struct CpuMark {
    pid: u32,
    cpu: Duration,
    at: Instant,
}

impl CpuMark {
    pub fn now(pid: u32) -> Result<Self> {
        Ok(Self {
            pid,
            cpu: cpu_time(pid)?,
            at: Instant::now(),
        })
    }

    /// CPU time used since the mark, and the wall time elapsed.
    pub fn since(&self) -> Result<(Duration, Duration)> {
        Ok((
            cpu_time(self.pid)?.saturating_sub(self.cpu),
            self.at.elapsed(),
        ))
    }
}

/// Raises this process's soft open-files limit to its hard limit (children inherit it) and
/// returns the new soft limit; fails when it stays below `needed`, saying how to raise it.
pub fn raise_nofile(needed: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!(
            "cannot read the open-files limit: {}",
            std::io::Error::last_os_error()
        );
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    let soft: u64 = limit.rlim_cur;
    if soft < needed {
        bail!(
            "this benchmark needs about {needed} open files in this process (and as many in the \
             server) but the limit is {soft} (hard {}): raise it with `ulimit -n {needed}` (as \
             root, or via /etc/security/limits.conf) or use fewer connections",
            limit.rlim_max
        );
    }
    Ok(soft)
}

/// Where a stamped payload's fields sit: `SEQ:STAMP_US:` and padding.
pub fn stamped_payload(seq: u64, stamp_us: u64, size: usize) -> String {
    let mut s = format!("{seq}:{stamp_us}:");
    while s.len() < size {
        s.push('x');
    }
    s
}

/// Reads `SEQ:STAMP_US:` from the start of a payload.
pub fn parse_stamp(payload: &[u8]) -> Option<(u64, u64)> {
    let (seq, rest) = parse_number(payload)?;
    let rest = rest.strip_prefix(b":")?;
    let (stamp, rest) = parse_number(rest)?;
    rest.starts_with(b":").then_some((seq, stamp))
}

fn parse_number(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let mut n = 0u64;
    for &b in &bytes[..digits] {
        n = n * 10 + u64::from(b - b'0');
    }
    Some((n, &bytes[digits..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let p = stamped_payload(42, 1_234_567, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(parse_stamp(p.as_bytes()), Some((42, 1_234_567)));
        assert_eq!(parse_stamp(b"42:"), None);
        assert_eq!(parse_stamp(b"x:1:"), None);
    }

    #[test]
    fn own_process_readings() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        cpu_time(std::process::id()).unwrap();
    }
}
