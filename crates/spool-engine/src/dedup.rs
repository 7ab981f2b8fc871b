//! Idempotency keys: each stream's window of recently published keys ([`DedupWindow`]), and
//! the bound on them across every stream of an engine ([`DedupBudget`]).
//!
//! A key is remembered for the dedup window (default 2 min) so that a retry appends nothing.
//! Keys cost memory (a key of up to 256 bytes, its position, two index entries: ~350 bytes
//! with the longest keys), and anyone allowed to publish can make them, so the engine holds at
//! most `max_idempotency_keys` of them in all. Past that, the **oldest keys, whatever their
//! stream, are forgotten early**: the window shrinks under pressure, and a retry of a
//! forgotten key is appended again, as after the window. Refusing keyed publishes instead would
//! let one publisher stop every other publisher's keyed publishes for a whole window; shrinking
//! the window only costs the retries that come later than the flood allows, and it is logged.
//!
//! Every key gets a sequence number from the budget; the budget keeps only the expiry times of
//! the live keys (8 bytes each) and a floor: keys numbered below it are forgotten. A stream
//! drops its forgotten keys when it is next used or swept (once a second), so memory follows
//! within a second.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;
use spool_core::Position;

/// The default of `max_idempotency_keys`.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;

/// Forgetting keys early is logged at most this often, in ms.
const WARN_EVERY_MS: u64 = 10_000;

/// The bound on the idempotency keys of every stream of one engine.
pub struct DedupBudget {
    max: usize,
    keys: Mutex<Live>,
    /// Keys numbered below this are forgotten (expired, or forgotten early).
    floor: AtomicU64,
    /// Keys forgotten early since the engine started.
    evicted: AtomicU64,
    warned_ms: AtomicU64,
}

struct Live {
    /// The number the next key gets.
    next: u64,
    /// Expiry (ms since the Unix epoch) of the live keys, by number: the last is `next - 1`.
    expiries: VecDeque<u64>,
}

impl DedupBudget {
    /// At most `max` keys (at least 1).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            keys: Mutex::new(Live {
                next: 0,
                expiries: VecDeque::new(),
            }),
            floor: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            warned_ms: AtomicU64::new(0),
        }
    }

    fn floor(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }

    /// Keys forgotten before their window ended because the bound was reached.
    #[cfg(test)]
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Numbers a new key expiring at `expires_ms`, forgetting the oldest keys past the bound.
    fn admit(&self, expires_ms: u64, now_ms: u64) -> u64 {
        let mut live = self.keys.lock();
        while live.expiries.front().is_some_and(|&e| e <= now_ms) {
            live.expiries.pop_front();
        }
        let mut evicted = 0;
        while live.expiries.len() >= self.max {
            live.expiries.pop_front();
            evicted += 1;
        }
        let number = live.next;
        live.next += 1;
        live.expiries.push_back(expires_ms);
        self.floor
            .store(live.next - live.expiries.len() as u64, Ordering::Release);
        drop(live);
        if evicted > 0 {
            let total = self.evicted.fetch_add(evicted, Ordering::Relaxed) + evicted;
            let last = self.warned_ms.load(Ordering::Relaxed);
            if now_ms.saturating_sub(last) >= WARN_EVERY_MS
                && self
                    .warned_ms
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    max = self.max,
                    forgotten_early = total,
                    "idempotency keys at their bound (--max-idempotency-keys): the oldest are forgotten before their window ends, so their retries are appended again"
                );
            }
        }
        number
    }
}

impl Default for DedupBudget {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_KEYS)
    }
}

/// The keys of one stream, in publish order.
#[derive(Default, Debug)]
pub struct DedupWindow {
    positions: HashMap<Arc<str>, (u64, Position)>,
    /// `(expires_ms, number, key)`, oldest first (numbers only grow within a stream).
    expiry: VecDeque<(u64, u64, Arc<str>)>,
}

impl DedupWindow {
    /// Where `key` was published, if it is still remembered.
    pub fn get(&mut self, key: &str, now_ms: u64, budget: &DedupBudget) -> Option<&Position> {
        self.expire(now_ms, budget);
        self.positions.get(key).map(|(_, position)| position)
    }

    /// Records `key` as published at `position` until `expires_ms`.
    pub fn insert(
        &mut self,
        key: String,
        position: Position,
        expires_ms: u64,
        now_ms: u64,
        budget: &DedupBudget,
    ) {
        let number = budget.admit(expires_ms, now_ms);
        let key: Arc<str> = key.into();
        self.expiry.push_back((expires_ms, number, key.clone()));
        if let Some((old, _)) = self.positions.insert(key, (number, position)) {
            // The key was forgotten by the budget but still here: drop its older entry now,
            // or it would take the new one with it when it leaves the queue.
            self.expiry.retain(|(_, n, _)| *n != old);
        }
        self.expire(now_ms, budget);
    }

    /// Records `key`, if any, for a message just appended at `position`.
    pub fn remember(
        &mut self,
        key: Option<String>,
        position: &Position,
        until_ms: u64,
        now_ms: u64,
        budget: &DedupBudget,
    ) {
        if let Some(key) = key {
            self.insert(key, position.clone(), until_ms, now_ms, budget);
        }
    }

    /// Drops expired keys and keys the budget has forgotten.
    pub fn expire(&mut self, now_ms: u64, budget: &DedupBudget) {
        let floor = budget.floor();
        while let Some((expires, number, _)) = self.expiry.front() {
            if *expires > now_ms && *number >= floor {
                break;
            }
            if let Some((_, number, key)) = self.expiry.pop_front()
                && self.positions.get(&key).is_some_and(|(n, _)| *n == number)
            {
                self.positions.remove(&key);
            }
        }
        if self.positions.is_empty() && self.positions.capacity() > 64 {
            self.positions = HashMap::new();
            self.expiry = VecDeque::new();
        }
    }

    /// How many keys the stream holds (forgotten ones included until dropped).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.positions.len()
    }
}

#[cfg(test)]
mod tests {
    use spool_core::{Epoch, Offset};

    use super::*;

    fn at(offset: u64) -> Position {
        Position::new(Epoch::parse("e").unwrap(), Offset(offset))
    }

    #[test]
    fn keys_expire_with_their_window() {
        let budget = DedupBudget::new(10);
        let mut w = DedupWindow::default();
        w.insert("a".into(), at(1), 100, 0, &budget);
        assert_eq!(w.get("a", 99, &budget), Some(&at(1)));
        assert_eq!(w.get("a", 100, &budget), None);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn the_oldest_keys_of_every_stream_are_forgotten_past_the_bound() {
        let budget = DedupBudget::new(3);
        let (mut a, mut b) = (DedupWindow::default(), DedupWindow::default());
        a.insert("a1".into(), at(1), 1000, 0, &budget);
        b.insert("b1".into(), at(1), 1000, 0, &budget);
        a.insert("a2".into(), at(2), 1000, 0, &budget);
        b.insert("b2".into(), at(2), 1000, 0, &budget);
        assert_eq!(budget.evicted(), 1);
        assert_eq!(
            a.get("a1", 1, &budget),
            None,
            "the oldest of all is forgotten"
        );
        assert_eq!(b.get("b1", 1, &budget), Some(&at(1)));
        assert_eq!(a.get("a2", 1, &budget), Some(&at(2)));
        assert_eq!(b.get("b2", 1, &budget), Some(&at(2)));
        b.insert("b3".into(), at(3), 1000, 0, &budget);
        assert_eq!(b.get("b1", 1, &budget), None);
        assert_eq!(b.len(), 2, "forgotten keys leave the stream's memory");
    }

    #[test]
    fn a_key_published_again_after_it_was_forgotten_is_remembered_anew() {
        let budget = DedupBudget::new(1);
        let mut w = DedupWindow::default();
        w.insert("k".into(), at(1), 1000, 0, &budget);
        w.insert("other".into(), at(2), 1000, 0, &budget);
        assert_eq!(w.get("k", 1, &budget), None);
        w.insert("k".into(), at(3), 1000, 0, &budget);
        assert_eq!(w.get("k", 1, &budget), Some(&at(3)));
    }
}
