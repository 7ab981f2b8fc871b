//! [`ClusterNode`]: what a cluster engine does on each node the same way whatever its backend
//! — head watches, the tail cache and its read gate, watch-then-read, resync — written once
//! over a [`Store`], the backend's reads.
//!
//! The rules it keeps, for Redis and NATS alike:
//!
//! - **A first watch reads again.** Notes about a stream this node does not watch are ignored
//!   ([`Heads::advance`]), so one sent between a watch's head read and the watch's creation
//!   would be lost. The first watch of a stream therefore reads the head once more after the
//!   watch exists: an append in that gap wakes it at once, not at some later refresh.
//! - **After (re)subscribing to notes, resync.** Notes are at-most-once and none arrive while
//!   the subscription is down, so once it is back ([`ClusterNode::resubscribed`]) the node
//!   drops its tail cache (the store may have come back without its data) and re-reads every
//!   watched stream. The subscription comes first, the reads after: a note sent after a read
//!   is heard, one sent before it is in what the read returns.
//! - **Reads go through the tail cache's gate** ([`TailCache::read_through`]).
//! - **Own appends move the cache first, then the watch**, so the woken readers find the
//!   messages in the cache.

use std::{future::Future, sync::Arc};

use futures::StreamExt as _;
use parking_lot::Mutex;
use spool_core::{Epoch, Message, Offset, Position, StreamName, StreamState};

use super::{Heads, TailCache, TransientLink};
use crate::{EngineError, HeadWatch, ReadBatch};

/// How many watched streams a resync re-reads at once.
const RESYNC_CONCURRENCY: usize = 32;

/// How a truncate note starts: `!truncated <stream>`, sent on the notes channel after an
/// operator dropped the front of a stream's history. (`!` starts no head note, whose first
/// field is an epoch, nor a transient one.)
const TRUNCATED: &str = "!truncated ";

/// The note that tells the other nodes `stream` was truncated ([`ClusterNode::heard_admin`]).
pub fn truncate_note(stream: &StreamName) -> bytes::Bytes {
    bytes::Bytes::from(format!("{TRUNCATED}{}", stream.as_str()))
}

/// A cluster engine's reads of its backing store, all straight from the store (the node's
/// cache is the [`ClusterNode`]'s business). Each read that finds a stream moves this node's
/// watch of it ([`Heads::advance`] on [`ClusterNode::heads`]): a read may be the first to see
/// another node's append or a new epoch.
pub trait Store: Send + Sync {
    /// The stream's bounds for a reader, and whether the store holds the stream. A stream it
    /// does not hold reads as head 0 of a placeholder epoch — the one this node's watchers of
    /// it already wait in, if any — and nothing is created. When this node's watchers wait in
    /// a history the store no longer holds, the store moves them to a fresh placeholder (so
    /// they get a reset).
    fn read_head(
        &self,
        stream: &StreamName,
    ) -> impl Future<Output = Result<(StreamState, bool), EngineError>> + Send;

    /// Up to `limit` messages after `after` and the snapshot they were read under (for a
    /// stream the store does not hold, none at head 0 of the placeholder, as `read_head`).
    fn read_range(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> impl Future<Output = Result<ReadBatch, EngineError>> + Send;

    /// The stream's bounds, or `None` when the store does not hold it.
    fn state(
        &self,
        stream: &StreamName,
    ) -> impl Future<Output = Result<Option<StreamState>, EngineError>> + Send;

    /// The placeholder epoch the first watch of a stream the store does not hold shows, given
    /// the one `read_head` answered; an engine that keeps (and caps) its placeholders records
    /// it here, or refuses with [`EngineError::StreamLimit`]. Called under the node's watch
    /// lock, so it must not block.
    fn keep_placeholder(&self, _stream: &StreamName, epoch: Epoch) -> Result<Epoch, EngineError> {
        Ok(epoch)
    }
}

/// One node of a cluster engine: its [`Heads`], its [`TailCache`], and the rules of the module
/// docs over a [`Store`].
#[derive(Default)]
pub struct ClusterNode {
    heads: Heads,
    cache: TailCache,
    /// Makes "is the stream watched?" and creating its watch one step, against pruning.
    watching: Mutex<()>,
    /// Transient notes to and from the other nodes (`transient.rs`).
    transient: TransientLink,
}

impl ClusterNode {
    pub fn new(cache: TailCache) -> Self {
        Self {
            heads: Heads::default(),
            cache,
            watching: Mutex::new(()),
            transient: TransientLink::default(),
        }
    }

    /// This node's end of the transient notes: the engine publishes what
    /// [`TransientLink::next_outgoing`] gives on its notes channel and hands what it hears
    /// there to [`TransientLink::heard`] first.
    pub fn transient(&self) -> &TransientLink {
        &self.transient
    }

    /// The node's head watches (a store's reads move them; a note moves them).
    pub fn heads(&self) -> &Heads {
        &self.heads
    }

    /// A watch on `stream`'s head; see the module docs. Creates nothing in the store.
    pub async fn watch<S: Store>(
        &self,
        store: &S,
        stream: &StreamName,
    ) -> Result<HeadWatch, EngineError> {
        let (state, found) = store.read_head(stream).await?;
        let (watch, first) = {
            let _guard = self.watching.lock();
            match self.heads.current(stream) {
                // Joined as it is when the store does not hold the stream: a placeholder
                // stays (one epoch per stream per node, so waiting readers get no reset), and
                // a watch is never moved back to one here (`read_head` does that when the
                // store lost the stream).
                Some(existing) if !found => (self.heads.watch(stream, existing), false),
                Some(_) => (self.heads.watch(stream, state.head_position()), false),
                None if found => (self.heads.watch(stream, state.head_position()), true),
                None => {
                    let epoch = store.keep_placeholder(stream, state.epoch)?;
                    let placeholder = Position::new(epoch, Offset::ZERO);
                    (self.heads.watch(stream, placeholder), true)
                }
            }
        };
        if first {
            store.read_head(stream).await?;
        }
        Ok(watch)
    }

    /// A read for a subscriber: from the tail cache when it can answer, else from the store
    /// through the stream's gate.
    pub async fn read<S: Store>(
        &self,
        store: &S,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<ReadBatch, EngineError> {
        self.cache
            .read_through(&self.heads, stream, after, limit, || {
                store.read_range(stream, after, limit)
            })
            .await
    }

    /// Whether something was published to `stream`: cheap for a stream this node watches and
    /// has seen a message of (the store never holds a stream at head 0), else one state read.
    pub async fn exists<S: Store>(
        &self,
        store: &S,
        stream: &StreamName,
    ) -> Result<bool, EngineError> {
        if self
            .heads
            .current(stream)
            .is_some_and(|head| head.offset > Offset::ZERO)
        {
            return Ok(true);
        }
        Ok(store.state(stream).await?.is_some())
    }

    /// Takes in this node's own append to `stream`, whose head is now `head`: `fresh` (the
    /// messages it appended, offsets ascending, duplicates left out) into the cache first, then
    /// the watch, so the readers woken find them there.
    pub fn appended(&self, stream: &StreamName, head: Position, fresh: &[Arc<Message>]) {
        self.cache.appended(stream, &head.epoch, fresh);
        self.heads.advance(stream, head);
    }

    /// Re-reads every watched stream, so that a note lost while this node was not listening
    /// costs a read instead of a subscriber left waiting. Fails at the first read that finds the
    /// store unavailable (the caller tries again later); a stream that cannot be read for
    /// another reason (corrupt data) is logged and skipped, as failing would hold up every
    /// other stream's resync for it, again on every retry.
    pub async fn resync<S: Store>(&self, store: &S) -> Result<(), EngineError> {
        let watched = self.heads.watched();
        if watched.is_empty() {
            return Ok(());
        }
        tracing::debug!(streams = watched.len(), "re-reading watched streams");
        let mut reads = futures::stream::iter(watched)
            .map(|stream| async move {
                let read = store.read_head(&stream).await;
                (stream, read)
            })
            .buffer_unordered(RESYNC_CONCURRENCY);
        while let Some((stream, read)) = reads.next().await {
            match read {
                Ok(_) => {}
                Err(e @ EngineError::Unavailable { .. }) => return Err(e),
                Err(e) => tracing::warn!(%stream, error = %e, "cannot re-read a watched stream"),
            }
        }
        Ok(())
    }

    /// Call once the subscription to notes is (re-)established: drops the tail cache (the store
    /// may have come back without its data) and resyncs.
    pub async fn resubscribed<S: Store>(&self, store: &S) -> Result<(), EngineError> {
        self.cache.clear();
        tracing::info!(
            streams = self.heads.len(),
            "notes heard again: re-reading the watched streams"
        );
        self.resync(store).await
    }

    /// A stream was deleted (by an operator, on this node or another): its cached tail goes
    /// and this node's watchers move to head 0 of `epoch`, a placeholder, so they read again,
    /// find the stream gone and get a reset. Other nodes learn it from the head note
    /// `<epoch> 0 <stream>` the deleting node sends (a head note at 0 only ever announces a
    /// new, empty history; [`Heads::advance`] takes it as an epoch change).
    pub fn deleted(&self, stream: &StreamName, epoch: Epoch) {
        self.cache.forget(std::slice::from_ref(stream));
        self.heads
            .advance(stream, Position::new(epoch, Offset::ZERO));
    }

    /// A stream's older history was dropped (an operator's truncate): its cached tail goes, so
    /// no reader behind the new oldest message is served from it; the next read refills it
    /// from the store. Other nodes hear [`truncate_note`] and do the same.
    pub fn truncated(&self, stream: &StreamName) {
        self.cache.forget(std::slice::from_ref(stream));
    }

    /// Takes in a stream-admin note heard on the notes channel ([`truncate_note`]); false if
    /// `payload` is none (a head note or a transient one).
    pub fn heard_admin(&self, payload: &[u8]) -> bool {
        let Some(rest) = payload.strip_prefix(TRUNCATED.as_bytes()) else {
            return false;
        };
        match std::str::from_utf8(rest)
            .ok()
            .and_then(|name| StreamName::new(name).ok())
        {
            Some(stream) => self.truncated(&stream),
            None => tracing::debug!("ignored a malformed truncate note"),
        }
        true
    }

    /// Forgets the heads and cached tails of streams nobody on this node watches any more;
    /// returns them.
    pub fn prune(&self) -> Vec<StreamName> {
        let gone = {
            let _guard = self.watching.lock();
            self.heads.prune()
        };
        self.cache.forget(&gone);
        self.cache.prune_gates(&self.heads);
        gone
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    fn name(s: &str) -> StreamName {
        StreamName::new(s).unwrap()
    }

    /// A store of heads only (no messages), shared by the "nodes" of a test. `on_read` runs
    /// after the store answered a head read and before the answer reaches the node: what
    /// another node does in that moment.
    struct FakeStore {
        node: Arc<ClusterNode>,
        heads: Arc<Mutex<HashMap<StreamName, Position>>>,
        reads: AtomicUsize,
        on_read: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl FakeStore {
        fn new(node: Arc<ClusterNode>) -> Self {
            Self {
                node,
                heads: Arc::default(),
                reads: AtomicUsize::new(0),
                on_read: Mutex::new(None),
            }
        }

        fn head(&self, stream: &StreamName) -> Option<Position> {
            self.heads.lock().get(stream).cloned()
        }
    }

    impl Store for FakeStore {
        async fn read_head(&self, stream: &StreamName) -> Result<(StreamState, bool), EngineError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let answer = self.head(stream);
            if let Some(f) = self.on_read.lock().take() {
                f();
            }
            Ok(match answer {
                Some(head) => {
                    self.node.heads().advance(stream, head.clone());
                    (
                        StreamState {
                            epoch: head.epoch,
                            head: head.offset,
                            oldest: Offset(1),
                        },
                        true,
                    )
                }
                None => (StreamState::empty(Epoch::generate()), false),
            })
        }

        async fn read_range(
            &self,
            stream: &StreamName,
            _after: Offset,
            _limit: usize,
        ) -> Result<ReadBatch, EngineError> {
            let (state, _) = self.read_head(stream).await?;
            Ok(ReadBatch {
                state,
                messages: Vec::new(),
            })
        }

        async fn state(&self, stream: &StreamName) -> Result<Option<StreamState>, EngineError> {
            let (state, found) = self.read_head(stream).await?;
            Ok(found.then_some(state))
        }
    }

    /// The drift Redis and NATS had: a note sent between a first watch's head read and the
    /// watch's creation is ignored (nobody watched), so the watch must read again — not wait
    /// for a periodic refresh.
    #[tokio::test]
    async fn a_first_watch_sees_an_append_made_while_it_was_being_set_up() {
        let node = Arc::new(ClusterNode::default());
        let store = FakeStore::new(node.clone());
        let s = name("gap");
        let epoch = Epoch::generate();
        store
            .heads
            .lock()
            .insert(s.clone(), Position::new(epoch.clone(), Offset(1)));
        let (heads, other) = (store.heads.clone(), s.clone());
        let (node2, epoch2) = (node.clone(), epoch.clone());
        *store.on_read.lock() = Some(Box::new(move || {
            // Another node appends offset 2 and sends its note: this node watches nothing yet.
            let head = Position::new(epoch2, Offset(2));
            heads.lock().insert(other.clone(), head.clone());
            assert!(!node2.heads().advance(&other, head), "the note is ignored");
        }));
        let watch = node.watch(&store, &s).await.unwrap();
        assert_eq!(*watch.borrow(), Position::new(epoch, Offset(2)));
        assert_eq!(store.reads.load(Ordering::SeqCst), 2, "read again once");

        // Later watches of the stream join the watch without reading twice.
        let before = store.reads.load(Ordering::SeqCst);
        let _again = node.watch(&store, &s).await.unwrap();
        assert_eq!(store.reads.load(Ordering::SeqCst) - before, 1);
    }

    #[tokio::test]
    async fn a_resubscribed_node_catches_up_on_the_notes_it_missed() {
        let node = Arc::new(ClusterNode::default());
        let store = FakeStore::new(node.clone());
        let s = name("missed");
        let epoch = Epoch::generate();
        store
            .heads
            .lock()
            .insert(s.clone(), Position::new(epoch.clone(), Offset(1)));
        let mut watch = node.watch(&store, &s).await.unwrap();
        watch.borrow_and_update();
        // Appends while the note subscription was down: no note reached the node.
        store
            .heads
            .lock()
            .insert(s.clone(), Position::new(epoch.clone(), Offset(5)));
        node.resubscribed(&store).await.unwrap();
        assert!(watch.has_changed().unwrap());
        assert_eq!(watch.borrow_and_update().offset, Offset(5));
    }

    /// Reads of many streams, watched a moment each, leave no read gate behind a prune.
    #[tokio::test]
    async fn read_gates_go_with_their_streams() {
        let node = Arc::new(ClusterNode::default());
        let store = FakeStore::new(node.clone());
        for i in 0..100 {
            let s = name(&format!("ghost/{i}"));
            let watch = node.watch(&store, &s).await.unwrap();
            node.read(&store, &s, Offset::ZERO, 10).await.unwrap();
            drop(watch);
            // Unwatched: read straight from the store, no gate.
            node.read(&store, &s, Offset::ZERO, 10).await.unwrap();
        }
        assert!(node.cache.gates() > 0, "reads of watched streams are gated");
        assert_eq!(node.prune().len(), 100);
        assert_eq!(node.cache.gates(), 0);
        assert!(node.heads().is_empty());
    }

    #[tokio::test]
    async fn a_delete_moves_watchers_to_a_placeholder_and_admin_notes_are_told_apart() {
        let node = Arc::new(ClusterNode::default());
        let store = FakeStore::new(node.clone());
        let s = name("gone");
        let epoch = Epoch::generate();
        store
            .heads
            .lock()
            .insert(s.clone(), Position::new(epoch.clone(), Offset(3)));
        let mut watch = node.watch(&store, &s).await.unwrap();
        watch.borrow_and_update();
        assert_eq!(node.heads().watchers(&s), 1);
        store.heads.lock().remove(&s);
        let placeholder = Epoch::generate();
        node.deleted(&s, placeholder.clone());
        assert!(watch.has_changed().unwrap());
        assert_eq!(
            *watch.borrow_and_update(),
            Position::new(placeholder, Offset::ZERO)
        );
        // A late note of the deleted history does not take the watch back.
        assert!(!node.heads().advance(&s, Position::new(epoch, Offset(4))));
        assert!(node.heard_admin(&truncate_note(&s)));
        assert!(
            node.heard_admin(b"!truncated not a name"),
            "malformed: still not a head note"
        );
        assert!(!node.heard_admin(b"abc 1 gone"));
        assert!(!node.heard_admin(b"~node gone x"));
    }

    #[tokio::test]
    async fn watches_of_an_unknown_stream_share_one_kept_placeholder() {
        struct Capped(FakeStore, Mutex<Vec<Epoch>>);
        impl Store for Capped {
            async fn read_head(
                &self,
                stream: &StreamName,
            ) -> Result<(StreamState, bool), EngineError> {
                self.0.read_head(stream).await
            }
            async fn read_range(
                &self,
                stream: &StreamName,
                after: Offset,
                limit: usize,
            ) -> Result<ReadBatch, EngineError> {
                self.0.read_range(stream, after, limit).await
            }
            async fn state(&self, stream: &StreamName) -> Result<Option<StreamState>, EngineError> {
                self.0.state(stream).await
            }
            fn keep_placeholder(
                &self,
                _stream: &StreamName,
                epoch: Epoch,
            ) -> Result<Epoch, EngineError> {
                let mut kept = self.1.lock();
                if kept.len() == 1 {
                    return Err(crate::StreamLimit::Unpublished {
                        engine: None,
                        max: 1,
                    }
                    .into());
                }
                kept.push(epoch.clone());
                Ok(epoch)
            }
        }
        let node = Arc::new(ClusterNode::default());
        let store = Capped(FakeStore::new(node.clone()), Mutex::default());
        let a = node.watch(&store, &name("a")).await.unwrap();
        let again = node.watch(&store, &name("a")).await.unwrap();
        assert_eq!(*a.borrow(), *again.borrow(), "one placeholder per stream");
        assert_eq!(a.borrow().offset, Offset::ZERO);
        assert_eq!(store.1.lock().as_slice(), [a.borrow().epoch.clone()]);
        let refused = node.watch(&store, &name("b")).await.unwrap_err();
        assert!(matches!(refused, EngineError::StreamLimit(_)), "{refused}");
        assert!(!node.exists(&store, &name("a")).await.unwrap());
        drop((a, again));
        assert_eq!(node.prune(), vec![name("a")]);
    }
}
