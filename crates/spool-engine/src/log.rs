//! The visible history of one stream, shared by every engine that keeps retained messages in
//! memory (the memory engine, and the disk engine whose log on disk is for durability): the
//! retained messages, their byte total, retention, and the head watch.
//!
//! Each entry carries a `tag` the owning engine uses as it likes (the disk engine: which WAL
//! segment holds the message, so that trimming it can free the segment).

use std::{collections::VecDeque, sync::Arc};

use spool_core::{Epoch, Message, Offset, Position, Retention, StreamState};
use tokio::sync::watch;

use crate::HeadWatch;

/// One retained message and the owning engine's tag for it.
pub struct Entry {
    pub message: Arc<Message>,
    /// What the owning engine needs to know about where the message lives (the disk engine:
    /// its WAL segment); the memory engine uses 0.
    pub tag: u64,
}

/// One stream's epoch, head, retained messages (oldest first, within retention) and head
/// watch. The owning engine serialises changes (it holds the log under its stream lock).
pub struct StreamLog {
    epoch: Epoch,
    head: Offset,
    entries: VecDeque<Entry>,
    bytes: u64,
    retention: Retention,
    head_tx: watch::Sender<Position>,
}

impl StreamLog {
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
        self.entries
            .front()
            .map_or(self.head.next(), |e| e.message.offset)
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

    /// Appends the next message. The caller guarantees `message.offset == head + 1`.
    pub fn push(&mut self, message: Arc<Message>, tag: u64) {
        debug_assert_eq!(message.offset, self.head.next());
        self.head = message.offset;
        self.bytes += message.retained_bytes();
        self.entries.push_back(Entry { message, tag });
    }

    /// Forgets every retained message and moves the head, as after a hole in recovered data:
    /// readers before `head` get `history_expired`, never a silent gap.
    pub fn skip_to(&mut self, head: Offset, mut dropped: impl FnMut(&Entry)) {
        for e in self.entries.drain(..) {
            dropped(&e);
        }
        self.bytes = 0;
        self.head = head;
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

    /// Removes what retention no longer allows; `dropped` sees each removed entry.
    pub fn trim(&mut self, now_ms: u64, mut dropped: impl FnMut(&Entry)) {
        while let Some(front) = self.entries.front() {
            let count = self.entries.len() as u64;
            if !self
                .retention
                .must_trim(count, self.bytes, front.message.time_ms, now_ms)
            {
                break;
            }
            self.bytes -= front.message.retained_bytes();
            if let Some(e) = self.entries.pop_front() {
                dropped(&e);
            }
        }
    }

    /// Up to `limit` retained messages after `after`; empty when `after + 1` is not retained.
    pub fn read(&self, after: Offset, limit: usize) -> Vec<Arc<Message>> {
        let oldest = self.oldest();
        if after.0.saturating_add(1) < oldest.0 || after >= self.head {
            return Vec::new();
        }
        let start = (after.0 + 1 - oldest.0) as usize;
        self.entries
            .range(start..)
            .take(limit)
            .map(|e| e.message.clone())
            .collect()
    }
}
