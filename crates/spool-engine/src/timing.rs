//! Latency histograms an engine fills from inside (where the server cannot time a step: the
//! disk engine's fsync), read by the server's `/metrics`. Process-wide, fixed buckets, lock
//! free: one atomic add per observation.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Upper bounds of the buckets, in seconds (the last bucket, `+Inf`, is implicit).
pub const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
];

/// One latency histogram: counts per bucket (not cumulative), and the sum.
pub struct Timing {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Timing {
    pub const fn new() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; BUCKETS.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// `(sum in seconds, count, [(upper bound, count in that bucket)])`, `+Inf` last.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            count += n;
            buckets.push((BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self::new()
    }
}

/// The disk engine's WAL fsyncs (`fdatasync` of a group commit), every disk engine of the
/// process.
pub static WAL_FSYNC: Timing = Timing::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket() {
        let t = Timing::new();
        t.observe(Duration::from_micros(50));
        t.observe(Duration::from_millis(3));
        t.observe(Duration::from_secs(5));
        let (sum, count, buckets) = t.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 5.00305).abs() < 1e-6);
        assert_eq!(buckets[0], (0.0001, 1));
        assert_eq!(buckets[5], (0.005, 1));
        assert_eq!(buckets[12].1, 1);
        assert!(buckets[12].0.is_infinite());
    }
}
