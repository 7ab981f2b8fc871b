//! The wall clock every expiry is decided by: retention's `max_age`, how long an idempotency
//! key or a session is remembered, how long an unpublished stream lingers, and (next) a
//! consumer group's leases.
//!
//! A [`Clock`] is the system clock unless a test made it from a [`ManualClock`], which stands
//! still until the test moves it: time-based behaviour is tested by moving the clock, never by
//! sleeping. A clock is a cheap handle (`Clone`), and reading the system clock through it costs
//! one predictable branch more than calling [`crate::now_ms`].

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Milliseconds since the Unix epoch, from the system clock or from a [`ManualClock`].
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// Now, in ms since the Unix epoch.
    #[inline]
    pub fn now_ms(&self) -> u64 {
        match &self.manual {
            None => crate::now_ms(),
            Some(now) => now.load(Ordering::Acquire),
        }
    }

    /// Whether this clock is a test's [`ManualClock`].
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::system"),
            Some(now) => write!(f, "Clock::manual({})", now.load(Ordering::Relaxed)),
        }
    }
}

/// A clock that moves only when told to; every [`Clock`] made from it reads the same time.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self {
            now: Arc::new(AtomicU64::new(now_ms)),
        }
    }

    /// A clock standing at the system clock's present time.
    pub fn starting_now() -> Self {
        Self::new(crate::now_ms())
    }

    /// The handle to give to what decides expiry.
    pub fn clock(&self) -> Clock {
        Clock {
            manual: Some(self.now.clone()),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.now.load(Ordering::Acquire)
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_add(ms))
            })
            .ok();
    }

    /// Sets the clock to `now_ms` (backwards too: a wall clock can be stepped back).
    pub fn set(&self, now_ms: u64) {
        self.now.store(now_ms, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_follows_the_wall() {
        let clock = Clock::system();
        let before = crate::now_ms();
        let read = clock.now_ms();
        assert!(read >= before && read <= crate::now_ms());
        assert!(!clock.is_manual());
    }

    #[test]
    fn a_manual_clock_moves_only_when_told_and_all_handles_agree() {
        let manual = ManualClock::new(1_000);
        let a = manual.clock();
        let b = a.clone();
        assert_eq!((a.now_ms(), b.now_ms()), (1_000, 1_000));
        manual.advance(Duration::from_millis(250));
        assert_eq!((a.now_ms(), b.now_ms()), (1_250, 1_250));
        manual.set(10);
        assert_eq!(b.now_ms(), 10, "a wall clock may be stepped back");
        manual.advance(Duration::MAX);
        assert_eq!(a.now_ms(), u64::MAX, "saturates, never wraps");
        assert!(a.is_manual());
        assert_eq!(format!("{a:?}"), format!("Clock::manual({})", u64::MAX));
    }
}
