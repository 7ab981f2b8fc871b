//! Reconnect delays: capped exponential backoff with full jitter.
//!
//! Attempt `n` waits a uniformly random time in `[0, min(max, min_delay × 2ⁿ)]` ("full
//! jitter"), so thousands of clients dropped by one server restart do not come back in
//! lockstep. A successful connect resets the attempt count.
//!
//! The WebSocket [`Client`](crate::Client) uses it for its reconnects; the HTTP readers and
//! `spool tail` use the same one.
//!
//! ```no_run
//! use std::time::Duration;
//! use spool_client::Backoff;
//!
//! # async fn try_once() -> Result<(), ()> { Ok(()) }
//! # async fn demo() {
//! let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
//! while try_once().await.is_err() {
//!     eprintln!("failed; retrying in at most {:?}", backoff.ceiling());
//!     backoff.wait().await;
//! }
//! backoff.reset();
//! # }
//! ```

use std::time::Duration;

use rand::RngExt;

/// The delay before each reconnect attempt.
#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// `min` is the ceiling of the first delay, `max` the ceiling of every delay.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The longest the next delay may be.
    pub fn ceiling(&self) -> Duration {
        // 2^31 × anything useful is past any sensible max, so the shift never overflows.
        let factor = 1u32 << self.attempt.min(31);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt (random, at most [`Backoff::ceiling`]); counts it.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// Sleeps for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Forgets past failures: the next delay is short again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_from_min_up_to_max() {
        let mut b = Backoff::new(100 * MS, 10_000 * MS);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay();
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), 10_000 * MS, "no overflow after many attempts");
        b.reset();
        assert_eq!(b.ceiling(), 100 * MS);
    }

    #[test]
    fn every_delay_is_within_zero_and_its_ceiling() {
        let mut b = Backoff::new(100 * MS, 2_000 * MS);
        for _ in 0..1_000 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(d <= ceiling, "{d:?} > {ceiling:?}");
        }
    }

    #[test]
    fn delays_are_jittered_across_the_whole_range() {
        // Full jitter: at a 1 s ceiling, 1,000 samples cover both the low and the high part.
        let samples: Vec<Duration> = (0..1_000)
            .map(|_| Backoff::new(1_000 * MS, 1_000 * MS).next_delay())
            .collect();
        assert!(samples.iter().any(|d| *d < 250 * MS));
        assert!(samples.iter().any(|d| *d > 750 * MS));
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(
            distinct.len() > 900,
            "delays should differ: {}",
            distinct.len()
        );
    }

    #[test]
    fn max_below_min_is_raised_to_min() {
        let b = Backoff::new(500 * MS, 100 * MS);
        assert_eq!(b.ceiling(), 500 * MS);
    }
}
