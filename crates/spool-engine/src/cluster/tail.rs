//! [`TailCache`]: the newest messages of each watched stream, so that the thousands of
//! subscribers of one stream on one node woken by one publish cost one engine read, not one
//! each. Bounded: at most a fixed number of messages and bytes per stream, for at most the
//! streams the node's [`Heads`] hold.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use parking_lot::Mutex;
use spool_core::{Epoch, Message, Offset, Position, StreamName, StreamState};

use super::Heads;
use crate::{EngineError, ReadBatch};

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
    /// One engine read at a time per stream near its tail (see [`TailCache::read_through`]).
    gates: Mutex<HashMap<StreamName, Arc<Gate>>>,
}

/// Held while a node reads a stream's tail from the engine. It remembers the last failure for
/// a moment, so the readers queued behind a read that failed (the engine is down) fail at
/// once instead of each waiting out the timeout in turn.
type Gate = tokio::sync::Mutex<Option<(std::time::Instant, EngineError)>>;

/// How long a failed tail read answers for the readers queued behind it.
const FAILURE_SHARED_FOR: std::time::Duration = std::time::Duration::from_millis(250);

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
            gates: Mutex::new(HashMap::new()),
        }
    }

    /// A read of a cluster engine through this cache: from the cache when it can answer (see
    /// [`TailCache::read`]), else `fetch()` (the engine's own read, not even made unless
    /// needed), whose answer then extends the cache.
    ///
    /// When one publish wakes the thousands of subscribers a stream has on this node, they all
    /// miss the cache at once. So a read at the stream's tail (at or after the first cached
    /// message, or with nothing cached) waits for the stream's gate: the first reader fetches
    /// and fills the cache, the others find it there — one engine read per publish per node
    /// instead of one per subscriber. Readers further behind (a catch-up) fetch in parallel.
    pub async fn read_through<F>(
        &self,
        heads: &Heads,
        stream: &StreamName,
        after: Offset,
        limit: usize,
        fetch: impl FnOnce() -> F,
    ) -> Result<ReadBatch, EngineError>
    where
        F: Future<Output = Result<ReadBatch, EngineError>>,
    {
        let Some(known) = heads.current(stream) else {
            return fetch().await;
        };
        if let Some(hit) = self.read(stream, after, limit, &known) {
            return Ok(hit);
        }
        let gate = self.near_tail(stream, after).then(|| self.gate(stream));
        let mut held = match &gate {
            Some(gate) => Some(gate.lock().await),
            None => None,
        };
        if let Some(held) = &held {
            if let Some((at, error)) = held.as_ref()
                && at.elapsed() < FAILURE_SHARED_FOR
            {
                return Err(error.clone());
            }
            if let Some(known) = heads.current(stream)
                && let Some(hit) = self.read(stream, after, limit, &known)
            {
                return Ok(hit);
            }
        }
        let result = fetch().await;
        match &result {
            Ok(batch) => self.absorb(stream, after, batch, heads),
            Err(error) => {
                if let Some(held) = held.as_mut() {
                    **held = Some((std::time::Instant::now(), error.clone()));
                }
            }
        }
        result
    }

    /// Whether a read after `after` is one the cache would serve once filled: nothing is cached
    /// for the stream yet, or `after` is at or past the run's first message.
    fn near_tail(&self, stream: &StreamName, after: Offset) -> bool {
        self.streams
            .lock()
            .get(stream)
            .is_none_or(|tail| after.get().saturating_add(1) >= tail.first().get())
    }

    fn gate(&self, stream: &StreamName) -> Arc<Gate> {
        self.gates
            .lock()
            .entry(stream.clone())
            .or_insert_with(|| Arc::new(Gate::new(None)))
            .clone()
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
        let mut gates = self.gates.lock();
        for s in streams {
            map.remove(s);
            gates.remove(s);
        }
    }

    /// Forgets the read gates of streams `heads` no longer holds: one made by a read that
    /// raced the prune of its stream (the read saw the stream watched, the prune forgot it,
    /// then the read made its gate) would otherwise stay for good.
    pub fn prune_gates(&self, heads: &Heads) {
        self.gates
            .lock()
            .retain(|stream, _| heads.current(stream).is_some());
    }

    /// Read gates held (for tests and the bound's check).
    pub fn gates(&self) -> usize {
        self.gates.lock().len()
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

    #[tokio::test]
    async fn a_herd_of_readers_at_the_tail_costs_one_engine_read() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let heads = Heads::default();
        let cache = TailCache::default();
        let s = name("herd");
        let e = Epoch::generate();
        let _watch = heads.watch(&s, Position::new(e.clone(), Offset(3)));
        let fetches = AtomicUsize::new(0);
        let read = |after: u64| {
            let (heads, cache, s, e, fetches) = (&heads, &cache, &s, &e, &fetches);
            async move {
                let fetch = async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    Ok(batch(e, 1, 3, after + 1..4))
                };
                cache
                    .read_through(heads, s, Offset(after), 10, || fetch)
                    .await
            }
        };
        let all = futures_join((0..100).map(|_| read(0)).collect::<Vec<_>>()).await;
        assert!(
            all.iter()
                .all(|b| offsets(b.as_ref().unwrap()) == [1, 2, 3])
        );
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            1,
            "one engine read for the herd"
        );

        // A failure is shared with the readers queued behind it for a moment.
        heads.advance(&s, Position::new(e.clone(), Offset(4)));
        let failing = |_: ()| async {
            let fetch = async {
                fetches.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                Err(EngineError::unavailable("down"))
            };
            cache
                .read_through(&heads, &s, Offset(3), 10, || fetch)
                .await
        };
        let before = fetches.load(Ordering::SeqCst);
        let all = futures_join((0..50).map(|_| failing(())).collect::<Vec<_>>()).await;
        assert!(
            all.iter()
                .all(|r| matches!(r, Err(EngineError::Unavailable { .. })))
        );
        assert_eq!(fetches.load(Ordering::SeqCst) - before, 1);
    }

    /// Polls every future to completion on this task (they share borrowed state).
    async fn futures_join<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
        let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
        let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
                if slot.is_none() {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => *slot = Some(v),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        out.into_iter()
            .map(|v| v.expect("every future finished"))
            .collect()
    }
}
