//! The visible history of one stream, shared by the memory and disk engines: one entry per
//! retained message (oldest first), their byte total, retention, and the head watch.
//!
//! What an entry is depends on the engine ([`Retained`]): the memory engine keeps the message
//! itself ([`Entry`]); the disk engine keeps only where the message lies in its WAL, with what
//! retention needs to know (its time and size), and reads the message from there (or from its
//! tail cache) — so its memory does not grow with retained history.

use std::{collections::VecDeque, sync::Arc};

use spool_core::{Epoch, Message, Offset, Position, Retention, StreamState};
use tokio::sync::watch;

use crate::HeadWatch;

/// The fewest entries a stream's log grows by at once.
const MIN_GROWTH: usize = 16;

/// What retention needs of one retained message's entry: its time and size. (Its offset is
/// its place: entries are contiguous.)
pub trait Retained {
    /// Publish time, ms since the Unix epoch.
    fn time_ms(&self) -> u64;
    /// What the message counts against `max_bytes` ([`Message::retained_bytes`]).
    fn retained_bytes(&self) -> u64;
}

/// One retained message and the owning engine's tag for it.
pub struct Entry {
    pub message: Arc<Message>,
    /// What the owning engine needs to know about where the message lives (the disk engine:
    /// its WAL segment); the memory engine uses 0.
    pub tag: u64,
}

impl Retained for Entry {
    fn time_ms(&self) -> u64 {
        self.message.time_ms
    }
    fn retained_bytes(&self) -> u64 {
        self.message.retained_bytes()
    }
}

/// One stream's epoch, head, retained messages' entries (oldest first, within retention) and
/// head watch. The owning engine serialises changes (it holds the log under its stream lock).
/// Entries are contiguous: the i-th is offset `oldest + i`.
pub struct StreamLog<E = Entry> {
    epoch: Epoch,
    head: Offset,
    entries: VecDeque<E>,
    bytes: u64,
    retention: Retention,
    head_tx: watch::Sender<Position>,
}

impl<E: Retained> StreamLog<E> {
    /// An empty log of `epoch` at `head` (0 for a new stream, more for a recovered one whose
    /// messages all expired).
    pub fn new(epoch: Epoch, head: Offset, retention: Retention) -> Self {
        let (head_tx, _) = watch::channel(Position::new(epoch.clone(), head));
        Self {
            epoch,
            head,
            entries: VecDeque::new(),
            bytes: 0,
            retention,
            head_tx,
        }
    }

    /// The stream's epoch.
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The offset of the newest message (0 before the first).
    pub fn head(&self) -> Offset {
        self.head
    }

    /// The offset of the oldest retained message (`head + 1` when none is retained).
    pub fn oldest(&self) -> Offset {
        Offset(self.head.get() + 1 - self.entries.len() as u64)
    }

    /// The stream's bounds.
    pub fn state(&self) -> StreamState {
        StreamState {
            epoch: self.epoch.clone(),
            head: self.head,
            oldest: self.oldest(),
        }
    }

    /// A watch on the head (see [`crate::Engine::watch`]).
    pub fn watch(&self) -> HeadWatch {
        self.head_tx.subscribe()
    }

    /// How many head watches are out.
    pub fn watchers(&self) -> usize {
        self.head_tx.receiver_count()
    }

    /// Appends the entry of the next message, `offset` (the caller guarantees
    /// `offset == head + 1`).
    pub fn push_entry(&mut self, offset: Offset, entry: E) {
        debug_assert_eq!(offset, self.head.next());
        self.head = offset;
        self.bytes += entry.retained_bytes();
        if self.entries.len() == self.entries.capacity() {
            // Grow by an eighth, not double: a stream's entries are its memory cost, and
            // doubling would leave up to as much again unused for good (retention keeps the
            // length steady). Amortised O(1) all the same.
            let more = (self.entries.len() / 8).max(MIN_GROWTH);
            self.entries.reserve_exact(more);
        }
        self.entries.push_back(entry);
    }

    /// How many messages are retained.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no message is retained.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes retained messages count against `max_bytes`.
    pub fn retained_bytes(&self) -> u64 {
        self.bytes
    }

    /// Up to `limit` entries after `after`, oldest first; none when `after + 1` is not
    /// retained (see [`StreamLog::read`]).
    pub fn entries_after(&self, after: Offset, limit: usize) -> impl Iterator<Item = &E> {
        let oldest = self.oldest();
        let start = if after.0.saturating_add(1) < oldest.0 || after >= self.head {
            self.entries.len()
        } else {
            (after.0 + 1 - oldest.0) as usize
        };
        self.entries.range(start..).take(limit)
    }

    /// Forgets every retained message and moves the head, as after a hole in recovered data:
    /// readers before `head` get `history_expired`, never a silent gap.
    pub fn skip_to(&mut self, head: Offset, mut dropped: impl FnMut(&E)) {
        for e in self.entries.drain(..) {
            dropped(&e);
        }
        self.bytes = 0;
        self.head = head;
        self.shrink_if_sparse();
    }

    /// Tells watchers about the current head (after one or more pushes).
    pub fn notify(&self) {
        let head = Position::new(self.epoch.clone(), self.head);
        self.head_tx.send_if_modified(|current| {
            let changed = *current != head;
            *current = head;
            changed
        });
    }

    /// Drops retained entries with offsets before `before` (an admin's truncate; all of them
    /// past the head); `dropped` sees each. Readers behind get `history_expired`.
    pub fn drop_before(&mut self, before: Offset, mut dropped: impl FnMut(&E)) {
        while !self.entries.is_empty() && self.oldest() < before {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.retained_bytes();
                dropped(&e);
            }
        }
    }

    /// The newest retained entry.
    pub fn newest(&self) -> Option<&E> {
        self.entries.back()
    }

    /// Gives back room that retention left unused (after it shrank a stream's history).
    fn shrink_if_sparse(&mut self) {
        let len = self.entries.len();
        if self.entries.capacity() > 4 * len + MIN_GROWTH {
            self.entries.shrink_to(len + len / 8);
        }
    }

    /// Removes what retention no longer allows; `dropped` sees each removed entry.
    pub fn trim(&mut self, now_ms: u64, mut dropped: impl FnMut(&E)) {
        while let Some(front) = self.entries.front() {
            let count = self.entries.len() as u64;
            if !self
                .retention
                .must_trim(count, self.bytes, front.time_ms(), now_ms)
            {
                break;
            }
            self.bytes -= front.retained_bytes();
            if let Some(e) = self.entries.pop_front() {
                dropped(&e);
            }
        }
        self.shrink_if_sparse();
    }
}

impl StreamLog<Entry> {
    /// Appends the next message. The caller guarantees `message.offset == head + 1`.
    pub fn push(&mut self, message: Arc<Message>, tag: u64) {
        self.push_entry(message.offset, Entry { message, tag });
    }

    /// Up to `limit` retained messages after `after`; empty when `after + 1` is not retained.
    pub fn read(&self, after: Offset, limit: usize) -> Vec<Arc<Message>> {
        self.entries_after(after, limit)
            .map(|e| e.message.clone())
            .collect()
    }
}

/// What the admin API asks of a log whose entries are the messages themselves (the memory
/// engine): written against `StreamLog` with its messages, so it holds for any entry layout.
impl StreamLog {
    /// Retained messages, their bytes, and the newest one's publish time.
    pub fn retained_summary(&self) -> (u64, u64, Option<u64>) {
        (
            self.entries.len() as u64,
            self.bytes,
            self.entries.back().map(|e| e.message.time_ms),
        )
    }

    /// Drops retained messages with offsets before `before` (all of them past the head);
    /// `dropped` sees each. Readers behind get `history_expired`.
    pub fn truncate_before(&mut self, before: Offset, mut dropped: impl FnMut(&Entry)) {
        while let Some(front) = self.entries.front() {
            if front.message.offset >= before {
                break;
            }
            self.bytes -= front.message.retained_bytes();
            if let Some(e) = self.entries.pop_front() {
                dropped(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    struct E(u64);

    impl Retained for E {
        fn time_ms(&self) -> u64 {
            self.0
        }
        fn retained_bytes(&self) -> u64 {
            10
        }
    }

    /// A stream's entries cost what it retains, not up to twice that: the log grows by an
    /// eighth and gives room back once retention shrank it to a quarter.
    #[test]
    fn entries_grow_by_an_eighth_and_shrink_when_sparse() {
        let retention = Retention {
            max_messages: 1048,
            max_bytes: u64::MAX,
            max_age: Duration::from_secs(3600),
        };
        let mut log = StreamLog::new(Epoch::generate(), Offset::ZERO, retention);
        for n in 1..=5000u64 {
            log.push_entry(Offset(n), E(n));
            log.trim(n, |_| {});
            let (len, cap) = (log.len(), log.entries.capacity());
            assert!(cap <= len + len / 8 + MIN_GROWTH + 1, "{cap} for {len}");
        }
        assert_eq!(
            (log.len(), log.oldest(), log.head()),
            (1048, Offset(3953), Offset(5000))
        );
        let kept: Vec<u64> = log.entries_after(Offset(4990), 100).map(|e| e.0).collect();
        assert_eq!(kept, (4991..=5000).collect::<Vec<_>>());
        // Age retention drops most of it: the room goes back.
        log.trim(4901 + 3_600_000, |_| {});
        assert_eq!(log.len(), 100);
        assert!(
            log.entries.capacity() <= 4 * 100 + MIN_GROWTH,
            "{}",
            log.entries.capacity()
        );
    }
}
