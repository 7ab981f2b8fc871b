//! The idempotency window of one stream: which keys were published recently, and where.

use std::collections::{HashMap, VecDeque};

use spool_core::{Position, StreamName};

/// Past this many live keys in one stream the oldest are forgotten early, so a flood of
/// unique keys cannot grow memory without bound. Logged when it happens.
pub const MAX_KEYS_PER_STREAM: usize = 1_000_000;

#[derive(Default, Debug)]
pub struct DedupWindow {
    positions: HashMap<String, Position>,
    /// Keys in publish order with the time they expire (ms since the Unix epoch).
    expiry: VecDeque<(u64, String)>,
}

impl DedupWindow {
    pub fn get(&mut self, key: &str, now_ms: u64) -> Option<&Position> {
        self.expire(now_ms);
        self.positions.get(key)
    }

    /// Records `key` as published at `position` until `expires_ms`. Returns true when the
    /// window was full and an older key had to be forgotten early.
    pub fn insert(&mut self, key: String, position: Position, expires_ms: u64) -> bool {
        let mut evicted = false;
        while self.expiry.len() >= MAX_KEYS_PER_STREAM {
            if let Some((_, old)) = self.expiry.pop_front() {
                self.positions.remove(&old);
                evicted = true;
            }
        }
        self.expiry.push_back((expires_ms, key.clone()));
        self.positions.insert(key, position);
        evicted
    }

    /// Records `key`, if any, for a message just appended at `position`.
    pub fn remember(
        &mut self,
        stream: &StreamName,
        key: Option<String>,
        position: &Position,
        until_ms: u64,
    ) {
        if let Some(key) = key
            && self.insert(key, position.clone(), until_ms)
        {
            tracing::warn!(%stream, "idempotency window full; oldest keys forgotten early");
        }
    }

    pub fn expire(&mut self, now_ms: u64) {
        while let Some((expires, _)) = self.expiry.front() {
            if *expires > now_ms {
                break;
            }
            if let Some((_, key)) = self.expiry.pop_front() {
                self.positions.remove(&key);
            }
        }
    }
}
