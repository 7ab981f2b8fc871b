//! What every cluster engine (Redis, NATS JetStream) needs on each node, whatever its backend:
//!
//! - [`Heads`]: the head watches of the streams this node's subscribers follow, moved by the
//!   engine's cross-node notifications (a publish on any node) and by this node's own appends.
//!   A head here is only a wake-up: a subscriber always reads the truth from the engine (or the
//!   [`TailCache`]), so a late or repeated notification costs a read, never a wrong delivery.
//! - [`TailCache`]: the newest messages of each watched stream, so that the thousands of
//!   subscribers of one stream on one node woken by one publish cost one engine read, not one
//!   each.
//!
//! Both are bounded: `Heads` holds only streams with a live watcher after [`Heads::prune`], and
//! the cache holds at most a fixed number of messages and bytes per stream for at most the
//! streams `Heads` holds.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use parking_lot::Mutex;
use spool_core::{Epoch, Message, Offset, Position, StreamName, StreamState};
use tokio::sync::watch;

use crate::{HeadWatch, ReadBatch};

/// The head watches of one node.
#[derive(Default)]
pub struct Heads {
    streams: Mutex<HashMap<StreamName, Head>>,
}

/// Epochs a stream left that a node still remembers, so that a late note or read of an old
/// history cannot move its head back to it (subscribers would then wait in the old epoch
/// without their reset).
const RETIRED_EPOCHS: usize = 4;

struct Head {
    tx: watch::Sender<Position>,
    retired: Vec<Epoch>,
}

impl Head {
    /// Moves to `head` if that is news: a later offset in the same epoch, or an epoch the
    /// stream has not left before.
    fn advance(&mut self, head: Position) -> bool {
        if self.retired.contains(&head.epoch) {
            return false;
        }
        let mut left = None;
        let moved = self.tx.send_if_modified(|current| {
            let news = current.epoch != head.epoch || head.offset > current.offset;
            if news {
                if current.epoch != head.epoch {
                    left = Some(current.epoch.clone());
                }
                *current = head;
            }
            news
        });
        if let Some(old) = left {
            if self.retired.len() == RETIRED_EPOCHS {
                self.retired.remove(0);
            }
            self.retired.push(old);
        }
        moved
    }
}

impl Heads {
    /// A watch on `stream`, created at `current` when this node has none yet (otherwise
    /// `current` only moves the existing head forward, as [`Heads::advance`] does).
    pub fn watch(&self, stream: &StreamName, current: Position) -> HeadWatch {
        let mut streams = self.streams.lock();
        match streams.get_mut(stream) {
            Some(head) => {
                head.advance(current);
                head.tx.subscribe()
            }
            None => {
                let (tx, rx) = watch::channel(current);
                let retired = Vec::new();
                streams.insert(stream.clone(), Head { tx, retired });
                rx
            }
        }
    }

    /// Moves a watched stream's head to `head` if that is news: a later offset in the same
    /// epoch, or another epoch — but never back to an epoch the stream left. Streams nobody on
    /// this node watches are ignored, so a node holds nothing for the streams of other nodes'
    /// subscribers. Returns whether it moved.
    pub fn advance(&self, stream: &StreamName, head: Position) -> bool {
        self.streams
            .lock()
            .get_mut(stream)
            .is_some_and(|h| h.advance(head))
    }

    /// The head this node knows for a watched stream.
    pub fn current(&self, stream: &StreamName) -> Option<Position> {
        self.streams
            .lock()
            .get(stream)
            .map(|h| h.tx.borrow().clone())
    }

    /// Every watched stream, to re-read after the notification channel was down (a
    /// notification lost then would otherwise leave subscribers waiting).
    pub fn watched(&self) -> Vec<StreamName> {
        self.streams.lock().keys().cloned().collect()
    }

    /// Forgets streams without a live watcher; returns them, so caches can drop them too.
    pub fn prune(&self) -> Vec<StreamName> {
        let mut gone = Vec::new();
        self.streams.lock().retain(|name, h| {
            let keep = h.tx.receiver_count() > 0;
            if !keep {
                gone.push(name.clone());
            }
            keep
        });
        gone
    }

    pub fn len(&self) -> usize {
        self.streams.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How much the tail cache keeps per stream.
#[derive(Clone, Copy, Debug)]
pub struct TailLimits {
    pub messages: usize,
    pub bytes: u64,
}

impl Default for TailLimits {
    fn default() -> Self {
        Self {
            messages: 1024,
            bytes: 4 * 1024 * 1024,
        }
    }
}

/// The newest messages of watched streams; see the module docs.
pub struct TailCache {
    limits: TailLimits,
    streams: Mutex<HashMap<StreamName, Tail>>,
}

/// A contiguous run of one epoch's messages ending at `head`, plus the oldest retained offset
/// the engine reported when the run was last extended.
struct Tail {
    epoch: Epoch,
    oldest: Offset,
    head: Offset,
    messages: VecDeque<Arc<Message>>,
    bytes: u64,
}

impl Tail {
    fn first(&self) -> Offset {
        self.messages.front().map_or(self.head.next(), |m| m.offset)
    }
}

impl TailCache {
    pub fn new(limits: TailLimits) -> Self {
        Self {
            limits,
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// Serves a read from the cache when it can answer exactly what the engine would have a
    /// moment ago: the cache is in `known`'s epoch, reaches at least `known`'s offset, and holds
    /// the message right after `after` (or `after` is its head). `None` means: ask the engine.
    pub fn read(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
        known: &Position,
    ) -> Option<ReadBatch> {
        let streams = self.streams.lock();
        let tail = streams.get(stream)?;
        if tail.epoch != known.epoch || tail.head < known.offset || after > tail.head {
            return None;
        }
        let first = tail.first();
        if after.get().saturating_add(1) < first.get() {
            return None;
        }
        let start = (after.get() + 1 - first.get()) as usize;
        let messages = tail
            .messages
            .range(start.min(tail.messages.len())..)
            .take(limit)
            .cloned()
            .collect();
        Some(ReadBatch {
            state: StreamState {
                epoch: tail.epoch.clone(),
                head: tail.head,
                oldest: tail.oldest,
            },
            messages,
        })
    }

    /// Takes in what an engine read returned, when it extends or replaces the cached run: the
    /// batch is contiguous with the cache's head, or it reaches the stream's head (then it
    /// becomes the run). Only streams `heads` watches are kept, so the cache never holds
    /// streams nobody on this node follows. That is checked here, under the cache's lock: a
    /// stream pruned while the read ran (its [`TailCache::forget`] then comes after the check,
    /// or the check sees it gone) is never left behind in the cache for good.
    pub fn absorb(&self, stream: &StreamName, after: Offset, batch: &ReadBatch, heads: &Heads) {
        let state = &batch.state;
        let reaches_head = batch
            .messages
            .last()
            .map_or(after == state.head, |m| m.offset == state.head);
        let mut streams = self.streams.lock();
        if heads.current(stream).is_none() {
            return;
        }
        match streams.get_mut(stream) {
            Some(tail) if tail.epoch == state.epoch && after == tail.head => {
                tail.oldest = state.oldest;
                self.extend(tail, &batch.messages);
            }
            Some(tail)
                if tail.epoch == state.epoch
                    && tail.head >= state.head
                    && state.oldest > tail.oldest =>
            {
                tail.oldest = state.oldest;
            }
            Some(tail) if tail.epoch == state.epoch && tail.head >= state.head => {}
            _ if reaches_head => {
                let mut tail = Tail {
                    epoch: state.epoch.clone(),
                    oldest: state.oldest,
                    head: after,
                    messages: VecDeque::new(),
                    bytes: 0,
                };
                self.extend(&mut tail, &batch.messages);
                streams.insert(stream.clone(), tail);
            }
            _ => {}
        }
    }

    /// Takes in messages this node just appended at `epoch` (offsets ascending). They extend
    /// the run only where they follow its head; a gap (another node's publish in between)
    /// leaves the run for the next engine read to extend.
    pub fn appended(&self, stream: &StreamName, epoch: &Epoch, messages: &[Arc<Message>]) {
        let mut streams = self.streams.lock();
        let Some(tail) = streams.get_mut(stream) else {
            return;
        };
        if tail.epoch != *epoch {
            return;
        }
        let fresh: Vec<Arc<Message>> = messages
            .iter()
            .filter(|m| m.offset > tail.head)
            .cloned()
            .collect();
        if fresh.first().is_some_and(|m| m.offset == tail.head.next()) {
            self.extend(tail, &fresh);
        }
    }

    fn extend(&self, tail: &mut Tail, messages: &[Arc<Message>]) {
        for m in messages {
            if m.offset != tail.head.next() {
                break;
            }
            tail.head = m.offset;
            tail.bytes += m.retained_bytes();
            tail.messages.push_back(m.clone());
        }
        while tail.messages.len() > self.limits.messages || tail.bytes > self.limits.bytes {
            match tail.messages.pop_front() {
                Some(m) => tail.bytes -= m.retained_bytes(),
                None => break,
            }
        }
    }

    /// Forgets streams (those [`Heads::prune`] dropped).
    pub fn forget(&self, streams: &[StreamName]) {
        let mut map = self.streams.lock();
        for s in streams {
            map.remove(s);
        }
    }

    /// Forgets everything (after the engine's backing store may have lost data).
    pub fn clear(&self) {
        self.streams.lock().clear();
    }
}

impl Default for TailCache {
    fn default() -> Self {
        Self::new(TailLimits::default())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn name(s: &str) -> StreamName {
        StreamName::new(s).unwrap()
    }

    fn msg(offset: u64) -> Arc<Message> {
        Arc::new(Message {
            offset: Offset(offset),
            time_ms: 0,
            payload: Bytes::from(offset.to_string()),
            content_type: None,
            key: None,
            headers: Vec::new(),
        })
    }

    fn batch(epoch: &Epoch, oldest: u64, head: u64, offsets: std::ops::Range<u64>) -> ReadBatch {
        ReadBatch {
            state: StreamState {
                epoch: epoch.clone(),
                head: Offset(head),
                oldest: Offset(oldest),
            },
            messages: offsets.map(msg).collect(),
        }
    }

    fn offsets(b: &ReadBatch) -> Vec<u64> {
        b.messages.iter().map(|m| m.offset.get()).collect()
    }

    #[test]
    fn heads_move_forward_or_to_another_epoch_only() {
        let heads = Heads::default();
        let s = name("a");
        let e1 = Epoch::generate();
        let mut rx = heads.watch(&s, Position::new(e1.clone(), Offset(5)));
        rx.borrow_and_update();
        assert!(!heads.advance(&s, Position::new(e1.clone(), Offset(4))));
        assert!(!heads.advance(&s, Position::new(e1.clone(), Offset(5))));
        assert!(!rx.has_changed().unwrap());
        assert!(heads.advance(&s, Position::new(e1.clone(), Offset(6))));
        assert_eq!(rx.borrow_and_update().offset, Offset(6));
        let e2 = Epoch::generate();
        assert!(heads.advance(&s, Position::new(e2.clone(), Offset(0))));
        assert_eq!(rx.borrow_and_update().epoch, e2);
        // A late note of the history the stream left does not take it back there.
        assert!(!heads.advance(&s, Position::new(e1.clone(), Offset(9))));
        assert!(!heads.advance(&name("a"), Position::new(e1.clone(), Offset(10))));
        assert_eq!(heads.current(&s).unwrap().epoch, e2);
        // Unwatched streams hold nothing.
        assert!(!heads.advance(&name("b"), Position::new(e1, Offset(1))));
        assert_eq!(heads.watched(), vec![s.clone()]);
        drop(rx);
        assert_eq!(heads.prune(), vec![s]);
        assert!(heads.is_empty());
    }

    #[test]
    fn tail_serves_only_what_it_holds_up_to_the_known_head() {
        let cache = TailCache::new(TailLimits {
            messages: 4,
            bytes: u64::MAX,
        });
        let s = name("a");
        let e = Epoch::generate();
        let known = |o| Position::new(e.clone(), Offset(o));
        let heads = Heads::default();
        let _watch = heads.watch(&s, known(0));
        assert!(cache.read(&s, Offset(0), 10, &known(3)).is_none());
        // A read that reaches the head becomes the run.
        cache.absorb(&s, Offset(0), &batch(&e, 1, 3, 1..4), &heads);
        let hit = cache.read(&s, Offset(1), 10, &known(3)).unwrap();
        assert_eq!(offsets(&hit), [2, 3]);
        assert_eq!((hit.state.head, hit.state.oldest), (Offset(3), Offset(1)));
        // At the head: an empty answer, no engine read.
        assert!(
            cache
                .read(&s, Offset(3), 10, &known(3))
                .unwrap()
                .messages
                .is_empty()
        );
        // The node learned of offset 4: the cache is behind and must not answer.
        assert!(cache.read(&s, Offset(3), 10, &known(4)).is_none());
        // An own append that follows the head extends the run; one past a gap does not.
        cache.appended(&s, &e, &[msg(4)]);
        assert_eq!(
            offsets(&cache.read(&s, Offset(3), 10, &known(4)).unwrap()),
            [4]
        );
        cache.appended(&s, &e, &[msg(6)]);
        assert!(cache.read(&s, Offset(4), 10, &known(6)).is_none());
        cache.absorb(&s, Offset(4), &batch(&e, 1, 6, 5..7), &heads);
        // Bounded: 4 messages, so 1 and 2 are gone and a read before them goes to the engine.
        assert_eq!(
            offsets(&cache.read(&s, Offset(2), 10, &known(6)).unwrap()),
            [3, 4, 5, 6]
        );
        assert!(cache.read(&s, Offset(1), 10, &known(6)).is_none());
        // Another epoch: the run is of no use until a read of the new epoch replaces it.
        let e2 = Epoch::generate();
        assert!(
            cache
                .read(&s, Offset(0), 10, &Position::new(e2.clone(), Offset(0)))
                .is_none()
        );
        cache.absorb(&s, Offset(0), &batch(&e2, 1, 0, 1..1), &heads);
        let fresh = cache
            .read(&s, Offset(0), 10, &Position::new(e2, Offset(0)))
            .unwrap();
        assert!(fresh.messages.is_empty());
        cache.forget(std::slice::from_ref(&s));
        assert!(cache.read(&s, Offset(0), 10, &known(6)).is_none());
    }

    #[test]
    fn a_partial_read_far_behind_does_not_replace_the_run() {
        let cache = TailCache::default();
        let s = name("a");
        let e = Epoch::generate();
        let heads = Heads::default();
        let _watch = heads.watch(&s, Position::new(e.clone(), Offset(0)));
        cache.absorb(&s, Offset(0), &batch(&e, 1, 10, 1..4), &heads);
        assert!(
            cache
                .read(&s, Offset(0), 10, &Position::new(e.clone(), Offset(10)))
                .is_none()
        );
        cache.absorb(&s, Offset(5), &batch(&e, 1, 10, 6..11), &heads);
        let hit = cache
            .read(&s, Offset(7), 10, &Position::new(e, Offset(10)))
            .unwrap();
        assert_eq!(offsets(&hit), [8, 9, 10]);
        cache.absorb(
            &name("b"),
            Offset(0),
            &batch(&Epoch::generate(), 1, 0, 1..1),
            &heads,
        );
        assert!(cache.streams.lock().get(&name("b")).is_none());
    }

    #[test]
    fn a_read_that_ends_after_its_stream_was_pruned_leaves_nothing_behind() {
        let cache = TailCache::default();
        let heads = Heads::default();
        let s = name("a");
        let e = Epoch::generate();
        // A read starts while the stream is watched; its last watcher leaves and a sweep
        // prunes it (forgetting its cached tail) before the read's answer is absorbed.
        let watch = heads.watch(&s, Position::new(e.clone(), Offset(0)));
        drop(watch);
        cache.forget(&heads.prune());
        cache.absorb(&s, Offset(0), &batch(&e, 1, 3, 1..4), &heads);
        assert!(
            cache.streams.lock().is_empty(),
            "the cache holds a stream no one watches, and nothing would ever drop it"
        );
    }
}
