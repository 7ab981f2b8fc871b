//! Consumer groups (SPEC §7) for every transport: the driver between the pure state machine
//! (`spool_core::group::GroupState`), the stream history (`Engine`) and the group's durable
//! home (`GroupStore`).
//!
//! # One live entry per group
//!
//! Each (stream, group) this node works with has a [`Live`] entry: the loaded `GroupState` and
//! the store version it was loaded or last committed at, behind a tokio mutex, so operations on
//! one group run one at a time on this node. Entries sit in a map bounded by `--max-groups`;
//! past it an idle entry (nobody holds it) is evicted, the least recently used first. An
//! entry's state is dropped (and loaded again on next use) whenever a store call fails.
//!
//! # Every operation
//!
//! Lock → compute with the state machine at the [`Clock`]'s `now` → per the `Outcome` contract:
//! append the dead letters to their streams (`Engine::append`, each with its idempotency key,
//! so a redo appends nothing twice) → `queue_group_commit(version, changes)` → unlock → wait
//! until that commit is durable → answer. The lock is not held across the engine's fsync: the
//! next operation on the group computes on the state with this one applied and queues its
//! commit behind it, so many members' receives and acks share one group commit of the disk
//! engine. What an answer was computed from is durable before it is given — an operation with
//! nothing to store waits for the group's latest queued commit — and a commit that fails
//! drops the state (loaded again from the store), so nothing unstored is ever answered. The
//! cluster engines' stores commit at once (the default `queue_group_commit`): there the
//! store is authoritative, and a commit computed on top of one not yet accepted could be
//! accepted after another node's. A commit that answers `Conflict` (another node committed
//! first, or the group is gone) drops the state, loads it again and redoes the operation on
//! what the store holds — at most [`MAX_TRIES`] times, then `503 group_busy`. Every
//! [`COMPACT_EVERY`] commits the group's snapshot replaces its changes in the store.
//!
//! # Receive
//!
//! `want` (under the lock) → `Engine::read` (without it) → `receive` (under it) → the payloads
//! of redeliveries read by offset (without it) → answer once the leases are durable. A read
//! another operation overtook is harmless: `receive` takes only messages that continue its
//! cursor. A round that got nothing although its read or `want` promised messages was
//! overtaken, and the next rounds read under the lock (want → read → receive in one hold), so
//! a receive under contention is not answered empty while the group has messages to hand out.
//! A read for new messages reads ahead, and a round the group's read-ahead can answer takes
//! from it under the lock instead of reading (`ReadAhead`, below: why that is correct, and its
//! bounds). Long-poll waits, holding no lock, for the stream's head watch, a change of the
//! group on this node (a nack, an expiry), the group's next lease end or visibility
//! (`next_wakeup`), the deadline, or shutdown.
//!
//! # Sweeper
//!
//! One task for all groups ([`Groups::run_sweeper`]): once a second it runs `expire` on every
//! cached group whose next lease end or visibility is due, so dead-lettering after
//! `max_deliveries` and stats do not wait for a receive; every 30 s it loads groups of the
//! store it does not hold yet (after a restart, or created on another node), up to the bound.
//!
//! # Redrive
//!
//! An internal consumer of the dead-letter stream: the group `spool:redrive:<hash of the source
//! stream>` on the dead-letter stream (names starting with `spool:` are reserved), created on
//! first use from the oldest message. Redrive receives from it, appends each message whose
//! `spool-dead-stream` header names the source stream to the source stream — payload, key,
//! content type and headers as they were, without the `spool-dead-*` headers (a redriven
//! message is a new message, delivered afresh) — and acks; dead letters of other streams (a
//! shared dead-letter stream) are acked and counted as skipped. The appends carry idempotency
//! keys, so a redrive retried after a failure does not publish twice within the dedup window.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures::future::{FutureExt, Shared};
use spool_core::{
    Clock, Message, NewMessage, Offset, Position, StreamName, StreamState,
    group::{
        Change, DeadLetter, Delivery, GroupConfig, GroupConfigError, GroupConfigSpec, GroupName,
        GroupReset, GroupState, GroupStats, InvalidReason, MemberName, OpError, Outcome, Reason,
        ReceiptResult, ReceiveRequest, Received, SnapshotError, Want, dead::HEADER_STREAM,
    },
};
use spool_engine::{
    Committed, Engine, EngineError, GroupDurable, GroupStore, HeadWatch, QueuedCommit, ReadBatch,
};
use tokio::{
    sync::{Mutex, MutexGuard, Notify},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

/// Commits tried per operation before giving up with `group_busy`.
pub const MAX_TRIES: usize = 16;
/// Commits between two compactions of a group's stored changes into a snapshot.
pub const COMPACT_EVERY: u64 = 256;
/// Receive rounds (want → read → receive) one receive makes before answering or waiting.
const MAX_ROUNDS: usize = 8;
/// Group names starting with this are the server's own (redrive), refused for users.
pub const RESERVED_PREFIX: &str = "spool:";
/// The prefix of every dead letter's header; a redriven message goes back without them.
const DEAD_HEADER_PREFIX: &str = "spool-dead-";
/// Messages one redrive call moves at most; `more` says when it stopped there.
pub const REDRIVE_MAX: u64 = 10_000;
/// How often the sweeper looks for groups it does not hold yet.
const DISCOVER_EVERY: Duration = Duration::from_secs(30);
/// Most messages one read-ahead takes from the stream (see [`ReadAhead`]).
pub const READ_AHEAD_MESSAGES: usize = 256;
/// How long after its read a read-ahead may be served (by the group clock); later receives
/// read the stream again.
pub const READ_AHEAD_TTL_MS: u64 = 1_000;
/// What one message kept in a read-ahead is charged beyond its retained bytes: its `Arc`
/// allocation and slot (payloads read from the disk engine's segments are copies of their own).
pub const READ_AHEAD_OVERHEAD: usize = 128;
/// The default node-wide bound of read-ahead memory (`--group-read-ahead`).
pub const DEFAULT_READ_AHEAD_BYTES: usize = 32 * 1024 * 1024;

/// Why a group operation failed as a whole. Per-receipt problems are never errors: they are
/// `unknown` / `expired` answers.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("stream {stream:?} has no consumer group {group:?}")]
    NotFound {
        stream: StreamName,
        group: GroupName,
    },
    #[error("{0}")]
    Config(#[from] GroupConfigError),
    #[error("{0}")]
    Op(#[from] OpError),
    #[error("{0}")]
    Reason(#[from] InvalidReason),
    #[error("group names starting with {RESERVED_PREFIX:?} are reserved for the server")]
    Reserved,
    #[error("the group changed under this request {0} times in a row; retry")]
    Busy(usize),
    #[error("the stored group cannot be read: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What the driver is told at start.
#[derive(Clone, Debug)]
pub struct GroupsConfig {
    /// Most live entries cached (`--max-groups`).
    pub max_cached: usize,
    /// The publish limit dead letters and redriven messages must fit (`--max-payload`).
    pub max_payload: usize,
    /// Most bytes of new messages one receive answer takes (`--max-read-bytes`), and one
    /// group's read-ahead keeps.
    pub max_read_bytes: usize,
    /// Most bytes all groups' read-aheads of this node keep together (`--group-read-ahead`;
    /// 0: no read-ahead, every receive reads the stream for its own room).
    pub read_ahead_bytes: usize,
    pub clock: Clock,
}

type Key = (StreamName, GroupName);

/// One group's live entry on this node.
struct Live {
    state: Mutex<Option<Loaded>>,
    /// Woken after every change this node commits and every sweep of the group: a waiting
    /// receive looks again.
    changed: Notify,
    /// When the entry was last used (the clock's ms), for eviction.
    used_ms: AtomicU64,
    /// The group's `next_wakeup` after its last operation (`u64::MAX`: none), for the sweeper.
    due_ms: AtomicU64,
    /// Messages read from the stream beyond what the receive that read them could take, for
    /// the group's next receives on this node. Used under `state`'s lock only, so what it
    /// serves is decided against the cursor it is served to.
    ahead: parking_lot::Mutex<Ahead>,
    /// Held by the one receive round of this node reading ahead for the group.
    fill: Mutex<()>,
}

struct Loaded {
    state: GroupState,
    version: u64,
    /// Changes stored since the snapshot.
    since_compact: u64,
    /// The latest commit queued from this state: an answer computed from the state is given
    /// once it is durable (commits of one group become durable in the order queued).
    tail: Option<Tail>,
}

impl Loaded {
    /// The latest queued commit, unless it is durable already.
    fn pending(&self) -> Option<Tail> {
        self.tail.as_ref().filter(|t| t.peek().is_none()).cloned()
    }
}

/// Resolves once a queued commit is durable; shared by every answer computed after it.
type Tail = Shared<GroupDurable>;

/// A read a receive round makes under the group's lock (after `want`).
#[derive(Clone, Copy)]
struct LockedRead {
    room: u32,
    /// Bytes of new messages the receive has taken so far, and its bound.
    bytes: usize,
    max_bytes: usize,
}

/// What a receive round read: the `want` it read for and the batch, cut to the receive's
/// byte bound (`--max-read-bytes`; one larger message still goes alone).
#[derive(Clone)]
struct Fetched {
    want: Want,
    batch: ReadBatch,
    /// Bytes of new messages taken with this batch's.
    bytes: usize,
    /// Served from the group's read-ahead with fewer messages than wanted: it ran out, and the
    /// stream may hold more (the next round reads it).
    ahead_short: bool,
}

impl Fetched {
    /// Whether the stream held messages past what this read returned.
    fn stream_has_more(&self) -> bool {
        let last = self
            .batch
            .messages
            .last()
            .map_or(self.want.after, |m| m.offset);
        self.batch.state.head > last
    }

    fn new(want: Want, mut batch: ReadBatch, mut bytes: usize, max_bytes: usize) -> Self {
        let mut keep = 0;
        for m in &batch.messages {
            let size = m.retained_bytes() as usize;
            if (keep > 0 || bytes > 0) && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            keep += 1;
        }
        batch.messages.truncate(keep);
        Self {
            want,
            batch,
            bytes,
            ahead_short: false,
        }
    }
}

// ---- read-ahead ----
//
// A group drained by many members with small receives would read the stream once per receive,
// for as few as one message each — on the disk engine, a history read older than the tail
// cache is a trip to a blocking thread and a `pread` per call; on Redis and NATS, a round trip
// to the store. So a receive round that reads the stream for new messages reads up to
// [`READ_AHEAD_MESSAGES`] (within `--max-read-bytes` and the node's `--group-read-ahead`
// budget), and what it could not take stays in the group's live entry, served to the next
// receives of any member on this node without an engine read.
//
// Why it is correct. A read-ahead holds stream messages only — never group state (leases,
// entries, the cursor stay in `GroupState`, decided under the group's lock as ever). A message
// at an offset of an epoch never changes once written, on every engine (memory and disk: the
// log; Redis: a new epoch whenever the stream's data could have been lost; NATS: a JetStream
// stream made again is made in a new epoch). So serving one is exactly what an engine read
// made at the read-ahead's time would have answered, as long as:
//
// - the stream is still in that epoch: the stream's head watch (taken by the first fill, kept
//   with the read-ahead) shows every epoch change — a delete, a re-creation, Redis or NATS
//   losing the stream (a cluster node's watch moves with every read and head note) — and a
//   closed watch (the engine dropped the stream) counts as a change; either drops it;
// - the group's cursor is in that epoch and the read-ahead holds the message right after it
//   (served from the cursor on, so what other members, an earlier version of the group or
//   another node took is never served again; a group reset moves the cursor to another epoch
//   or past it). This holds whatever the group's store version: on a cluster a conflict
//   reloads the group from the store, and the read-ahead then serves from the reloaded cursor;
// - it is younger than [`READ_AHEAD_TTL_MS`]: retention and truncation are not on the watch,
//   so a read-ahead answers with the stream bounds of its read (as a read that long ago would:
//   the group learns of what retention dropped meanwhile at its next engine read, counted
//   `expired` as ever), never for longer than that.
//
// Deleting the group drops its read-ahead; every engine read of a receive updates its bounds
// (or drops it on another epoch). Memory: per group at most `--max-read-bytes` (and
// [`READ_AHEAD_MESSAGES`]); all groups of the node together at most `--group-read-ahead`
// bytes (charged per message: retained bytes + [`READ_AHEAD_OVERHEAD`]), and the cached groups
// are bounded by `--max-groups` with it.

/// The node-wide bound of read-ahead memory (`--group-read-ahead`).
struct AheadBudget {
    cap: usize,
    used: AtomicUsize,
}

impl AheadBudget {
    fn available(&self) -> usize {
        self.cap
            .saturating_sub(self.used.load(AtomicOrdering::Relaxed))
    }

    /// Takes `n` bytes of the budget, if it has them.
    fn reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(AtomicOrdering::AcqRel, AtomicOrdering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.cap)
            })
            .is_ok()
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, AtomicOrdering::AcqRel);
    }
}

/// What a message kept in a read-ahead is charged.
fn ahead_cost(m: &Message) -> usize {
    (m.retained_bytes() as usize).saturating_add(READ_AHEAD_OVERHEAD)
}

/// Messages of one engine read kept for later receives: a contiguous run of the stream in the
/// epoch of `state`, the stream's bounds at that read.
struct ReadAhead {
    state: StreamState,
    messages: VecDeque<Arc<Message>>,
    /// When it was read (the group clock's ms).
    read_ms: u64,
    /// Bytes charged to the budget for `messages`.
    charged: usize,
    budget: Arc<AheadBudget>,
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.budget.release(self.charged);
    }
}

impl ReadAhead {
    fn last(&self) -> Option<Offset> {
        self.messages.back().map(|m| m.offset)
    }

    /// Drops the messages at or before `cursor` (the group has taken them).
    fn pop_through(&mut self, cursor: Offset) {
        while let Some(m) = self.messages.front() {
            if m.offset > cursor {
                break;
            }
            let cost = ahead_cost(m);
            self.messages.pop_front();
            self.charged -= cost;
            self.budget.release(cost);
        }
    }

    /// The message at `offset`, if kept.
    fn get(&self, offset: Offset) -> Option<&Arc<Message>> {
        let first = self.messages.front()?.offset;
        let i = usize::try_from(offset.get().checked_sub(first.get())?).ok()?;
        self.messages.get(i).filter(|m| m.offset == offset)
    }
}

/// A group's read-ahead on this node, with what decides whether it may be served.
#[derive(Default)]
struct Ahead {
    buffer: Option<ReadAhead>,
    /// The stream's head watch, taken before the first fill: an epoch change shows there
    /// without a read.
    watch: Option<HeadWatch>,
    /// The largest charge of one message in the group's last read with messages (0: none yet,
    /// or since an epoch change): how many messages a fill may ask for within its bytes.
    size_hint: usize,
    /// The group's last read stopped before the stream's head: it is behind, and members
    /// that miss the read-ahead wait for one fill (at the head each reads what is new).
    behind: bool,
}

impl Ahead {
    /// The watch's position, unless it is closed.
    fn watched(&self) -> Option<Position> {
        let w = self.watch.as_ref()?;
        w.has_changed().ok()?;
        Some(w.borrow().clone())
    }

    /// A batch of up to `limit` messages after `cursor`, as an engine read made when the
    /// read-ahead was would answer it; `None` when the read-ahead cannot (see the module
    /// notes above). Drops it when it can never serve again.
    fn serve(&mut self, cursor: &Position, limit: usize, now: u64) -> Option<ReadBatch> {
        let watched = self.watched();
        let buffer = self.buffer.as_mut()?;
        let Some(watched) = watched.filter(|w| w.epoch == buffer.state.epoch) else {
            // The stream's epoch moved (or its watch closed): nothing here is served again.
            self.buffer = None;
            self.watch = None;
            self.size_hint = 0;
            return None;
        };
        if now.abs_diff(buffer.read_ms) > READ_AHEAD_TTL_MS || buffer.state.epoch != cursor.epoch {
            self.buffer = None;
            return None;
        }
        buffer.pop_through(cursor.offset);
        let Some(first) = buffer.messages.front().map(|m| m.offset) else {
            self.buffer = None;
            return None;
        };
        if first != cursor.offset.next() {
            return None;
        }
        let head = watched.offset.max(buffer.state.head);
        Some(ReadBatch {
            state: StreamState {
                epoch: buffer.state.epoch.clone(),
                head,
                oldest: buffer.state.oldest,
            },
            messages: buffer.messages.iter().take(limit).cloned().collect(),
        })
    }

    /// Whether [`serve`](Self::serve) would answer for `cursor` now (dropping nothing).
    fn serves(&self, cursor: &Position, now: u64) -> bool {
        let Some(buffer) = self.buffer.as_ref() else {
            return false;
        };
        self.watched()
            .is_some_and(|w| w.epoch == buffer.state.epoch)
            && buffer.state.epoch == cursor.epoch
            && now.abs_diff(buffer.read_ms) <= READ_AHEAD_TTL_MS
            && buffer.get(cursor.offset.next()).is_some()
    }

    /// Takes in an engine read of the group's receive (`wanted`: what the receive itself asked
    /// for): its bounds refresh the read-ahead's (another epoch drops it), its messages size
    /// the next fills, and messages beyond `wanted` become the read-ahead unless the one held
    /// reaches as far — within `max_bytes` and the node's budget.
    fn absorb(
        &mut self,
        batch: &ReadBatch,
        wanted: usize,
        now: u64,
        budget: &Arc<AheadBudget>,
        max_bytes: usize,
    ) {
        if let Some(hint) = batch.messages.iter().map(|m| ahead_cost(m)).max() {
            self.size_hint = hint;
        }
        self.behind = batch
            .messages
            .last()
            .is_some_and(|m| m.offset < batch.state.head);
        if let Some(buffer) = self.buffer.as_mut() {
            if buffer.state.epoch != batch.state.epoch {
                self.buffer = None;
            } else {
                buffer.state.head = buffer.state.head.max(batch.state.head);
                buffer.state.oldest = buffer.state.oldest.max(batch.state.oldest);
            }
        }
        if batch.messages.len() <= wanted || self.watch.is_none() {
            return;
        }
        let newest = batch.messages.last().map(|m| m.offset);
        if let Some(buffer) = self.buffer.as_ref()
            && now.abs_diff(buffer.read_ms) <= READ_AHEAD_TTL_MS
            && buffer.last() >= newest
        {
            return;
        }
        self.buffer = None;
        let allowed = max_bytes.min(budget.available());
        let mut charged = 0usize;
        let mut keep = 0;
        for m in &batch.messages {
            let cost = ahead_cost(m);
            if charged + cost > allowed {
                break;
            }
            charged += cost;
            keep += 1;
        }
        if keep <= wanted || !budget.reserve(charged) {
            return;
        }
        self.buffer = Some(ReadAhead {
            state: batch.state.clone(),
            messages: batch.messages[..keep].iter().cloned().collect(),
            read_ms: now,
            charged,
            budget: budget.clone(),
        });
    }

    /// Forgets everything (the group is gone).
    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// A leased message with its payload.
#[derive(Clone, Debug)]
pub struct Leased {
    pub delivery: Delivery,
    pub message: Arc<Message>,
}

/// The answer of a receive.
#[derive(Clone, Debug, Default)]
pub struct ReceiveAnswer {
    pub messages: Vec<Leased>,
    pub reset: Option<GroupReset>,
    /// The stream held messages past the last read of this receive: the group has a backlog
    /// (a hint, not a promise — other members may take it first).
    pub more: bool,
}

/// A group's description.
#[derive(Clone, Debug)]
pub struct GroupView {
    pub config: GroupConfig,
    pub dead_letter: StreamName,
    pub created_ms: u64,
    pub stats: GroupStats,
}

/// What a redrive did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redriven {
    pub dead_letter: Option<StreamName>,
    pub moved: u64,
    pub skipped: u64,
    pub more: bool,
}

/// The settle operations, with their arguments.
#[derive(Clone, Debug)]
pub enum Settle {
    Ack,
    Nack {
        delay: Duration,
        reason: Option<Reason>,
    },
    Extend {
        visibility_timeout: Option<Duration>,
    },
    Terminate {
        reason: Option<Reason>,
    },
}

/// Consumer groups over one engine and one group store.
pub struct Groups {
    engine: Arc<dyn Engine>,
    store: Arc<dyn GroupStore>,
    config: GroupsConfig,
    cache: parking_lot::Mutex<HashMap<Key, Arc<Live>>>,
    /// Serializes metric observations (they reset and refill the families).
    observing: parking_lot::Mutex<()>,
    /// Receive rounds made since the start (for tests and measurements).
    rounds: AtomicU64,
    /// What all groups' read-aheads hold together (`--group-read-ahead`).
    ahead_budget: Arc<AheadBudget>,
    /// Tests: ms a receive round sleeps after its read outside the lock (a slow engine).
    #[cfg(test)]
    read_pause_ms: AtomicU64,
}

impl Groups {
    pub fn new(
        engine: Arc<dyn Engine>,
        store: Arc<dyn GroupStore>,
        config: GroupsConfig,
    ) -> Arc<Self> {
        let ahead_budget = Arc::new(AheadBudget {
            cap: config.read_ahead_bytes,
            used: AtomicUsize::new(0),
        });
        Arc::new(Self {
            engine,
            store,
            config,
            cache: parking_lot::Mutex::new(HashMap::new()),
            observing: parking_lot::Mutex::new(()),
            rounds: AtomicU64::new(0),
            ahead_budget,
            #[cfg(test)]
            read_pause_ms: AtomicU64::new(0),
        })
    }

    fn now(&self) -> u64 {
        self.config.clock.now_ms()
    }

    /// Refuses the server's own group names.
    pub fn check_user_name(group: &GroupName) -> Result<(), GroupError> {
        if group.as_str().starts_with(RESERVED_PREFIX) {
            return Err(GroupError::Reserved);
        }
        Ok(())
    }

    // ---- the cache ----

    /// The live entry of a group, cached unless the cache is full of entries in use (then a
    /// private one: the store's versions still keep its commits in order).
    fn live(&self, key: &Key) -> Arc<Live> {
        let now = self.now();
        let mut cache = self.cache.lock();
        if let Some(live) = cache.get(key) {
            live.used_ms.store(now, AtomicOrdering::Relaxed);
            return live.clone();
        }
        let live = Arc::new(Live {
            state: Mutex::new(None),
            changed: Notify::new(),
            used_ms: AtomicU64::new(now),
            due_ms: AtomicU64::new(u64::MAX),
            ahead: parking_lot::Mutex::new(Ahead::default()),
            fill: Mutex::new(()),
        });
        if cache.len() >= self.config.max_cached.max(1) {
            let idle = cache
                .iter()
                .filter(|(_, l)| Arc::strong_count(l) == 1)
                .min_by_key(|(_, l)| l.used_ms.load(AtomicOrdering::Relaxed))
                .map(|(k, _)| k.clone());
            match idle {
                Some(old) => {
                    cache.remove(&old);
                }
                None => return live,
            }
        }
        cache.insert(key.clone(), live.clone());
        live
    }

    /// Forgets a cached entry, if it is still `live`.
    fn forget(&self, key: &Key, live: &Arc<Live>) {
        let mut cache = self.cache.lock();
        if cache.get(key).is_some_and(|l| Arc::ptr_eq(l, live)) {
            cache.remove(key);
        }
    }

    fn cached(&self) -> Vec<(Key, Arc<Live>)> {
        self.cache
            .lock()
            .iter()
            .map(|(k, l)| (k.clone(), l.clone()))
            .collect()
    }

    /// Loads the group into `slot` unless it is there.
    async fn ensure_loaded<'a>(
        &self,
        key: &Key,
        slot: &'a mut Option<Loaded>,
    ) -> Result<&'a mut Loaded, GroupError> {
        if slot.is_none() {
            let Some(stored) = self.store.load_group(&key.0, &key.1).await? else {
                return Err(GroupError::NotFound {
                    stream: key.0.clone(),
                    group: key.1.clone(),
                });
            };
            let mut state = GroupState::from_snapshot(stored.snapshot)?;
            for change in &stored.changes {
                state.apply(change);
            }
            *slot = Some(Loaded {
                state,
                version: stored.version,
                since_compact: stored.changes.len() as u64,
                tail: None,
            });
        }
        // Just filled when it was empty.
        slot.as_mut().ok_or_else(|| {
            GroupError::Engine(EngineError::internal("group state vanished while loading"))
        })
    }

    /// Runs `op` on the group under its lock and queues its outcome to the store (dead
    /// letters, then changes), redoing it on a reloaded state after a `Conflict`; then, without
    /// the lock, waits until what the answer was computed from is durable. With `wake`,
    /// receives waiting on the group look again when something was stored (an ack, a nack, an
    /// expiry may have made messages available); a receive's own commits never wake anyone,
    /// so a waiting receive does not wake itself.
    async fn run<T>(
        &self,
        key: &Key,
        live: &Arc<Live>,
        wake: bool,
        mut op: impl FnMut(&mut GroupState, u64) -> Result<Outcome<T>, GroupError>,
    ) -> Result<T, GroupError> {
        let (((), value), durable) = self
            .run_queued(key, live, wake, nothing, None, |state, now, _| {
                op(state, now)
            })
            .await?;
        self.settled(live, durable).await?;
        Ok(value)
    }

    /// The locked part of [`run`](Self::run): compute and queue, answering with the values and
    /// what to wait for before they may be given to a client. `pre` runs first (a settle that
    /// goes with a receive; [`nothing`] otherwise); with `read`, the stream is then read under
    /// the lock for a receive of up to that many messages (`want` on the state `pre` left), so
    /// no other operation of this node can take the messages read before `op` sees them. The
    /// outcomes of `pre` and `op` are stored as one commit, and a failure between them drops
    /// the state (nothing of `pre` is kept unstored).
    async fn run_queued<A, T>(
        &self,
        key: &Key,
        live: &Arc<Live>,
        wake: bool,
        mut pre: impl FnMut(&mut GroupState, u64) -> Result<Outcome<A>, GroupError>,
        read: Option<LockedRead>,
        mut op: impl FnMut(&mut GroupState, u64, Option<&Fetched>) -> Result<Outcome<T>, GroupError>,
    ) -> Result<((A, T), Option<Tail>), GroupError> {
        // On a store other servers commit to, a state held here may be behind: a commit
        // catches that (`Conflict`), but an operation with nothing to store commits nothing —
        // an ack of a receipt another node leased would answer `unknown` from a stale state.
        // Such an answer is given only from a state loaded for this very call.
        let shared = self.store.shared();
        for attempt in 0..MAX_TRIES {
            if attempt > 0 {
                // Nodes racing one group: spread the retries out (full jitter, up to 64 ms).
                let cap = 1u64 << attempt.min(6);
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..=cap))).await;
            }
            let mut guard = live.state.lock().await;
            let cached = guard.is_some();
            let loaded = match self.ensure_loaded(key, &mut guard).await {
                Ok(loaded) => loaded,
                Err(e) => {
                    if matches!(e, GroupError::NotFound { .. }) {
                        drop(guard);
                        self.forget(key, live);
                    }
                    return Err(e);
                }
            };
            // State operations check their input before they change anything: an error here
            // leaves the state as it was.
            let first = pre(&mut loaded.state, self.now())?;
            let kept = first.is_noop();
            let fetched = match read {
                Some(r) => {
                    let now = self.now();
                    let want = loaded.state.want(r.room, now);
                    let served = live
                        .ahead
                        .lock()
                        .serve(loaded.state.cursor(), want.limit, now);
                    match served {
                        Some(batch) => {
                            let short = batch.messages.len() < want.limit;
                            let mut f = Fetched::new(want, batch, r.bytes, r.max_bytes);
                            f.ahead_short = short;
                            Some(f)
                        }
                        None => match self.read_for(key, live, want, true).await {
                            Ok(batch) => Some(Fetched::new(want, batch, r.bytes, r.max_bytes)),
                            Err(e) => {
                                if !kept {
                                    // `pre` changed the state and will not be stored.
                                    *guard = None;
                                }
                                return Err(e);
                            }
                        },
                    }
                }
                None => None,
            };
            // The read above awaited: a state dropped meanwhile cannot be (the lock is held).
            let Some(loaded) = guard.as_mut() else {
                continue;
            };
            let now = self.now();
            let outcome = match op(&mut loaded.state, now, fetched.as_ref()) {
                Ok(outcome) => outcome,
                Err(e) => {
                    if !kept {
                        *guard = None;
                    }
                    return Err(e);
                }
            };
            if shared && cached && first.is_noop() && outcome.is_noop() {
                // Load it again and redo (the next try starts from the store).
                *guard = None;
                continue;
            }
            let mut changes = first.changes;
            changes.extend(outcome.changes);
            let mut dead_letters = first.dead_letters;
            dead_letters.extend(outcome.dead_letters);
            let stored = !changes.is_empty();
            match self.persist(key, &mut guard, changes, dead_letters).await {
                Ok(durable) => {
                    if let Some(loaded) = guard.as_ref() {
                        let due = loaded.state.next_wakeup(now).unwrap_or(u64::MAX);
                        live.due_ms.store(due, AtomicOrdering::Relaxed);
                    }
                    drop(guard);
                    if wake && stored {
                        live.changed.notify_waiters();
                    }
                    return Ok(((first.value, outcome.value), durable));
                }
                Err(None) => continue,
                Err(Some(e)) => return Err(e),
            }
        }
        Err(GroupError::Busy(MAX_TRIES))
    }

    /// `want` for a receive round of up to `room` messages, or `None` when the group's
    /// read-ahead can answer the round now (then it runs under the lock).
    async fn want_unless_ahead(
        &self,
        key: &Key,
        live: &Arc<Live>,
        room: usize,
    ) -> Result<Option<Want>, GroupError> {
        let mut guard = live.state.lock().await;
        match self.ensure_loaded(key, &mut guard).await {
            Ok(loaded) => {
                let now = self.now();
                if live.ahead.lock().serves(loaded.state.cursor(), now) {
                    Ok(None)
                } else {
                    Ok(Some(loaded.state.want(room as u32, now)))
                }
            }
            Err(e) => {
                drop(guard);
                if matches!(e, GroupError::NotFound { .. }) {
                    self.forget(key, live);
                }
                Err(e)
            }
        }
    }

    /// The engine read of a receive round for `want`, reading ahead when the group may keep a
    /// read-ahead (see [`ReadAhead`]): what the round did not ask for is kept in the group's
    /// live entry, and the batch answered is cut to `want.limit`.
    async fn read_for(
        &self,
        key: &Key,
        live: &Live,
        want: Want,
        ahead: bool,
    ) -> Result<ReadBatch, GroupError> {
        let limit = if ahead {
            self.ahead_limit(live, want.limit)
        } else {
            want.limit
        };
        let mut batch = self.engine.read(&key.0, want.after, limit).await?;
        live.ahead.lock().absorb(
            &batch,
            want.limit,
            self.now(),
            &self.ahead_budget,
            self.config.max_read_bytes,
        );
        batch.messages.truncate(want.limit);
        Ok(batch)
    }

    /// How many messages a round that wants `wanted` new ones reads: more, up to
    /// [`READ_AHEAD_MESSAGES`], when the group has a head watch and the last read's largest
    /// message says how many fit `--max-read-bytes` and what the node's budget has left.
    fn ahead_limit(&self, live: &Live, wanted: usize) -> usize {
        if wanted == 0 {
            return 0;
        }
        let ahead = live.ahead.lock();
        if ahead.watch.is_none() || ahead.size_hint == 0 {
            return wanted;
        }
        let bytes = self
            .config
            .max_read_bytes
            .min(self.ahead_budget.available());
        wanted.max((bytes / ahead.size_hint).min(READ_AHEAD_MESSAGES))
    }

    /// Takes the stream's head watch a read-ahead needs, once the group has read messages (so
    /// the stream exists) and while the node's budget allows read-ahead at all. A failure only
    /// means no read-ahead.
    async fn watch_for_ahead(&self, stream: &StreamName, live: &Live) {
        if self.ahead_budget.cap == 0 {
            return;
        }
        {
            let mut ahead = live.ahead.lock();
            if ahead.size_hint == 0 {
                return;
            }
            if ahead.watched().is_some() {
                return;
            }
            ahead.watch = None;
        }
        if let Ok(w) = self.engine.watch(stream).await {
            let mut ahead = live.ahead.lock();
            if ahead.watch.is_none() {
                ahead.watch = Some(w);
            }
        }
    }

    /// Waits until the commits an answer was computed from are durable. A failure means the
    /// state held here has changes the store does not: it is dropped (loaded again on next
    /// use), and the caller answers the error, never the value.
    async fn settled(&self, live: &Live, durable: Option<Tail>) -> Result<(), GroupError> {
        let Some(durable) = durable else {
            return Ok(());
        };
        if let Err(e) = durable.await {
            *live.state.lock().await = None;
            return Err(e.into());
        }
        Ok(())
    }

    /// Stores an outcome: dead letters first (durable before the changes that drop their
    /// messages are queued), then the changes queued with the store, then (now and then) a
    /// compaction. Answers what to wait for before answering a client: this commit, or — for
    /// an outcome with nothing to store — the group's latest queued commit, since the answer
    /// was computed from a state that includes it. `Err(None)` is a conflict (the state was
    /// dropped: reload and redo); `Err(Some(e))` a failure (the state was dropped too).
    async fn persist(
        &self,
        key: &Key,
        guard: &mut MutexGuard<'_, Option<Loaded>>,
        changes: Vec<Change>,
        dead_letters: Vec<DeadLetter>,
    ) -> Result<Option<Tail>, Option<GroupError>> {
        if !dead_letters.is_empty()
            && let Err(e) = self.publish_dead_letters(&dead_letters).await
        {
            **guard = None;
            return Err(Some(e));
        }
        let Some(loaded) = guard.as_mut() else {
            return Err(None);
        };
        if changes.is_empty() {
            return Ok(loaded.pending());
        }
        match self
            .store
            .queue_group_commit(&key.0, &key.1, loaded.version, changes)
            .await
        {
            Ok(QueuedCommit::Queued { version, durable }) => {
                loaded.version = version;
                loaded.since_compact += 1;
                loaded.tail = Some(durable.shared());
            }
            Ok(QueuedCommit::Conflict) => {
                **guard = None;
                return Err(None);
            }
            Err(e) => {
                **guard = None;
                return Err(Some(e.into()));
            }
        }
        let tail = loaded.tail.clone();
        if loaded.since_compact >= COMPACT_EVERY {
            let snapshot = loaded.state.snapshot();
            match self
                .store
                .compact_group(&key.0, &key.1, loaded.version, &snapshot)
                .await
            {
                Ok(Committed::Done { .. }) => loaded.since_compact = 0,
                // Committed and answered all the same; the next load sees what is stored.
                Ok(Committed::Conflict) => **guard = None,
                Err(e) => {
                    tracing::warn!(stream = %key.0, group = %key.1, error = %e, "compacting a consumer group failed");
                    **guard = None;
                }
            }
        }
        Ok(tail)
    }

    /// Appends dead letters to their streams: each the source message as it is (payload, key,
    /// content type, headers without older `spool-dead-*` ones) plus the dead-letter headers,
    /// with the dead letter's idempotency key. A source message retention removed goes as an
    /// empty payload with the headers; one that would exceed `--max-payload` with the headers
    /// goes without its payload and says so in `spool-dead-payload`.
    async fn publish_dead_letters(&self, dead: &[DeadLetter]) -> Result<(), GroupError> {
        let mut per_stream: Vec<(StreamName, Vec<NewMessage>)> = Vec::new();
        for d in dead {
            let source = self
                .engine
                .read(&d.source, Offset(d.offset.get().saturating_sub(1)), 1)
                .await?;
            let original = source
                .messages
                .first()
                .filter(|m| m.offset == d.offset && source.state.epoch == d.epoch);
            let mut headers: Vec<(String, String)> = original
                .map(|m| {
                    m.headers
                        .iter()
                        .filter(|(k, _)| !k.starts_with(DEAD_HEADER_PREFIX))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            headers.extend(d.headers());
            let mut message = NewMessage {
                payload: original.map(|m| m.payload.clone()).unwrap_or_default(),
                content_type: original.and_then(|m| m.content_type.clone()),
                key: d
                    .key
                    .clone()
                    .or_else(|| original.and_then(|m| m.key.clone())),
                headers,
                idempotency_key: Some(d.idempotency_key.clone()),
            };
            let size = stored_size(&message);
            if size > self.config.max_payload {
                message.payload = Bytes::new();
                message.headers.push((
                    "spool-dead-payload".to_owned(),
                    format!(
                        "dropped: {size} bytes with the dead-letter headers exceed --max-payload ({})",
                        self.config.max_payload
                    ),
                ));
            }
            message.headers.sort();
            match per_stream.iter_mut().find(|(s, _)| *s == d.to) {
                Some((_, list)) => list.push(message),
                None => per_stream.push((d.to.clone(), vec![message])),
            }
        }
        for (stream, messages) in per_stream {
            self.engine.append(&stream, messages).await?;
        }
        Ok(())
    }

    // ---- management ----

    /// Creates the group, or updates it when it exists. True when created.
    pub async fn put(
        &self,
        stream: &StreamName,
        group: &GroupName,
        spec: &GroupConfigSpec,
    ) -> Result<bool, GroupError> {
        let config = GroupConfig::from_spec(spec)?;
        config.dead_letter_for(stream, group)?;
        let key = (stream.clone(), group.clone());
        // The stream's state now, for the start (a stream nothing was published to reads as
        // head 0 of a placeholder epoch; reading creates nothing).
        let at = self.engine.read(stream, Offset::ZERO, 0).await?.state;
        let live = self.live(&key);
        for _ in 0..MAX_TRIES {
            let exists = {
                let mut guard = live.state.lock().await;
                match self.ensure_loaded(&key, &mut guard).await {
                    Ok(_) => true,
                    Err(GroupError::NotFound { .. }) => {
                        let state = GroupState::new(
                            stream.clone(),
                            group.clone(),
                            config.clone(),
                            &at,
                            self.now(),
                        )?;
                        if self.store.create_group(&state.snapshot()).await? {
                            *guard = Some(Loaded {
                                state,
                                version: 0,
                                since_compact: 0,
                                tail: None,
                            });
                            return Ok(true);
                        }
                        // Created meanwhile by someone else: update it.
                        true
                    }
                    Err(e) => return Err(e),
                }
            };
            if exists {
                let result = self
                    .run(&key, &live, true, |state, _| {
                        let new = state.config().updated(spec)?;
                        Ok(state.update_config(new)?)
                    })
                    .await;
                match result {
                    Ok(()) => return Ok(false),
                    // Deleted between: create it.
                    Err(GroupError::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        Err(GroupError::Busy(MAX_TRIES))
    }

    /// The group's settings and stats.
    pub async fn describe(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<GroupView, GroupError> {
        let key = (stream.clone(), group.clone());
        let live = self.live(&key);
        let cursor = {
            let mut guard = live.state.lock().await;
            if self.store.shared() {
                // Other servers commit to this group too: describe what the store holds.
                *guard = None;
            }
            match self.ensure_loaded(&key, &mut guard).await {
                Ok(loaded) => loaded.state.cursor().clone(),
                Err(e) => {
                    drop(guard);
                    if matches!(e, GroupError::NotFound { .. }) {
                        self.forget(&key, &live);
                    }
                    return Err(e);
                }
            }
        };
        let next = self.engine.read(stream, cursor.offset, 1).await?;
        let mut guard = live.state.lock().await;
        let loaded = self.ensure_loaded(&key, &mut guard).await?;
        Ok(view(&loaded.state, &next.state, &next.messages, self.now()))
    }

    /// The user groups of a stream, in name order.
    pub async fn list(&self, stream: &StreamName) -> Result<Vec<GroupName>, GroupError> {
        Ok(self
            .store
            .list_groups(Some(stream))
            .await?
            .into_iter()
            .map(|(_, g)| g)
            .filter(|g| !g.as_str().starts_with(RESERVED_PREFIX))
            .collect())
    }

    /// Deletes the group (not its stream, nor its dead-letter stream). False if there was
    /// none. Its receipts are `unknown` from now on, also to a group created again.
    pub async fn delete(&self, stream: &StreamName, group: &GroupName) -> Result<bool, GroupError> {
        let key = (stream.clone(), group.clone());
        let live = self.live(&key);
        let mut guard = live.state.lock().await;
        *guard = None;
        live.ahead.lock().clear();
        let deleted = self.store.delete_group(stream, group).await?;
        drop(guard);
        self.forget(&key, &live);
        live.changed.notify_waiters();
        Ok(deleted)
    }

    // ---- receive ----

    /// Leases up to `request.max` messages to `request.member`, waiting (long-poll) until
    /// `deadline` when there are none, or until `shutdown`.
    pub async fn receive(
        &self,
        stream: &StreamName,
        group: &GroupName,
        request: &ReceiveRequest,
        deadline: Option<Instant>,
        shutdown: &CancellationToken,
    ) -> Result<ReceiveAnswer, GroupError> {
        request.validate()?;
        let key = (stream.clone(), group.clone());
        let live = self.live(&key);
        let mut watch = None;
        loop {
            let changed = live.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(w) = watch.as_mut() {
                let _ = spool_engine::HeadWatch::borrow_and_update(w);
            }
            let (answer, wakeup) = self.receive_rounds(&key, &live, request).await?;
            let waiting = deadline.is_some_and(|d| d > Instant::now());
            if !answer.messages.is_empty() || answer.reset.is_some() || !waiting {
                return Ok(answer);
            }
            let Some(deadline) = deadline else {
                return Ok(answer);
            };
            // Take the stream's watch before the next round reads, so nothing published
            // after that read is missed; the first wait only takes it.
            let w = match watch.as_mut() {
                Some(w) => w,
                None => {
                    watch = Some(self.engine.watch(stream).await?);
                    continue;
                }
            };
            let mut until = deadline;
            if let Some(at) = wakeup {
                let now = self.now();
                let lease_end = Instant::now() + Duration::from_millis(at.saturating_sub(now));
                until = until.min(lease_end);
            }
            if shutdown.is_cancelled() {
                return Ok(answer);
            }
            tokio::select! {
                r = w.changed() => {
                    if r.is_err() {
                        // The engine dropped the stream's watch: take a new one.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        watch = Some(self.engine.watch(stream).await?);
                    }
                }
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(until) => {}
                _ = shutdown.cancelled() => return Ok(answer),
            }
        }
    }

    /// One receive without waiting: rounds of want → read → receive until `max` is reached or
    /// nothing more can be had; also the group's next wake-up. A round first reads outside the
    /// group's lock; when another operation took what it read (or the messages its `want`
    /// counted on) before it got the lock back, the next rounds read under the lock, so a
    /// receive under contention is not answered empty while the group has messages to hand
    /// out. Answers once its leases are durable.
    async fn receive_rounds(
        &self,
        key: &Key,
        live: &Arc<Live>,
        request: &ReceiveRequest,
    ) -> Result<(ReceiveAnswer, Option<u64>), GroupError> {
        let mut answer = ReceiveAnswer::default();
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut fetched: HashMap<Offset, Arc<Message>> = HashMap::new();
        let mut fetched_epoch = None;
        let mut durable: Vec<Tail> = Vec::new();
        // New messages taken per answer are bounded by `--max-read-bytes`, as a long-poll
        // read is (one larger message still goes alone).
        let mut bytes = 0usize;
        let mut locked = false;
        self.watch_for_ahead(&key.0, live).await;
        for _ in 0..MAX_ROUNDS {
            self.rounds.fetch_add(1, AtomicOrdering::Relaxed);
            let room = request.max as usize - deliveries.len();
            if room == 0 || bytes >= self.config.max_read_bytes {
                break;
            }
            let round = ReceiveRequest {
                max: room as u32,
                ..request.clone()
            };
            let read = LockedRead {
                room: room as u32,
                bytes,
                max_bytes: self.config.max_read_bytes,
            };
            let receive = |state: &mut GroupState, now: u64, f: &Fetched| {
                receive_fetched(state, &round, now, f)
            };
            // Under the lock: `want`, and whether the group's read-ahead can answer it. A
            // round the read-ahead answers runs want → take → receive in one hold of the lock
            // (no I/O in it), so no other member takes the same messages in between. While the
            // group is behind the stream's head, only the round holding the group's fill gate
            // reads ahead, so members that find the read-ahead empty at once make one large
            // read, not one each; the others read their own room meanwhile (as without
            // read-ahead) rather than wait for that read — a member waiting there stalled
            // batches of 32 with 8 members.
            let mut gate = None;
            let mut alone = false;
            let unlocked_want = if locked {
                None
            } else {
                match self.want_unless_ahead(key, live, room).await? {
                    Some(want)
                        if live.ahead.lock().behind
                            && self.ahead_limit(live, want.limit) > want.limit =>
                    {
                        match live.fill.try_lock() {
                            Ok(held) => {
                                gate = Some(held);
                                let again = self.want_unless_ahead(key, live, room).await?;
                                if again.is_none() {
                                    // Filled meanwhile: served under the lock.
                                    gate = None;
                                }
                                again
                            }
                            // Another round is filling it: read this round's own room, as
                            // without read-ahead, rather than wait for that read.
                            Err(_) => {
                                alone = true;
                                Some(want)
                            }
                        }
                    }
                    want => want,
                }
            };
            let via_lock = unlocked_want.is_none();
            let (received, stale, f, tail) = match unlocked_want {
                None => {
                    let (((), ((received, stale), f)), tail) = self
                        .run_queued(key, live, false, nothing, Some(read), |state, now, f| {
                            let f = f.ok_or_else(missing_read)?;
                            let out = receive(state, now, f)?;
                            Ok(Outcome {
                                value: (out.value, f.clone()),
                                changes: out.changes,
                                dead_letters: out.dead_letters,
                            })
                        })
                        .await?;
                    (received, stale, f, tail)
                }
                Some(want) => {
                    let batch = self.read_for(key, live, want, !alone).await?;
                    drop(gate);
                    #[cfg(test)]
                    {
                        let pause = self.read_pause_ms.load(AtomicOrdering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                    let f = Fetched::new(want, batch, bytes, self.config.max_read_bytes);
                    let (((), (received, stale)), tail) = self
                        .run_queued(key, live, false, nothing, None, |state, now, _| {
                            receive(state, now, &f)
                        })
                        .await?;
                    (received, stale, f, tail)
                }
            };
            durable.extend(tail);
            let got = received.deliveries.len();
            // What this round counted on (messages it read, or ones due again that `want`
            // left out of the read) went to another operation first.
            let overtaken = stale
                || (!via_lock && got == 0 && (!f.batch.messages.is_empty() || f.want.limit < room));
            // A full read, or a read-ahead that ran out before the round's room: the stream may
            // have more.
            let full_read =
                f.want.limit > 0 && (f.batch.messages.len() >= f.want.limit || f.ahead_short);
            bytes = f.bytes;
            answer.more = f.stream_has_more();
            fetched_epoch = Some(f.batch.state.epoch.clone());
            for m in f.batch.messages {
                fetched.insert(m.offset, m);
            }
            if received.reset.is_some() {
                answer.reset = received.reset;
            }
            deliveries.extend(received.deliveries);
            if overtaken {
                locked = true;
                continue;
            }
            if !(received.read_again || (got > 0 && full_read)) {
                break;
            }
        }
        for tail in durable {
            self.settled(live, Some(tail)).await?;
        }
        let wakeup = {
            let guard = live.state.lock().await;
            guard.as_ref().and_then(|l| l.state.next_wakeup(self.now()))
        };
        answer.messages = self
            .attach_payloads(&key.0, live, deliveries, fetched, fetched_epoch)
            .await?;
        Ok((answer, wakeup))
    }

    /// Pairs each delivery with its message: from what the rounds read, else from the group's
    /// read-ahead (in the deliveries' epoch), else read by offset (redeliveries). A message
    /// retention removed in between is left out of the answer; its lease runs out and the
    /// group counts it expired.
    ///
    /// A redelivery is rarely in the read-ahead: that holds messages after the cursor and
    /// drops them once taken, and a message is redelivered after its lease or a nack, by then
    /// usually behind the cursor. Keeping taken messages for redeliveries would hold up to
    /// 2 × `max_in_flight` payloads per group; they are read by offset instead, one read per
    /// run of consecutive offsets.
    async fn attach_payloads(
        &self,
        stream: &StreamName,
        live: &Live,
        deliveries: Vec<Delivery>,
        mut fetched: HashMap<Offset, Arc<Message>>,
        fetched_epoch: Option<spool_core::Epoch>,
    ) -> Result<Vec<Leased>, GroupError> {
        if fetched_epoch.is_some_and(|e| deliveries.first().is_some_and(|d| d.epoch != e)) {
            fetched.clear();
        }
        if let Some(first) = deliveries.first() {
            let ahead = live.ahead.lock();
            if let Some(buffer) = ahead
                .buffer
                .as_ref()
                .filter(|b| b.state.epoch == first.epoch)
            {
                for d in &deliveries {
                    if !fetched.contains_key(&d.offset)
                        && let Some(m) = buffer.get(d.offset)
                    {
                        fetched.insert(d.offset, m.clone());
                    }
                }
            }
        }
        let missing: Vec<Offset> = deliveries
            .iter()
            .map(|d| d.offset)
            .filter(|o| !fetched.contains_key(o))
            .collect();
        // One read per run of consecutive offsets.
        let mut i = 0;
        while i < missing.len() {
            let mut j = i + 1;
            while j < missing.len() && missing[j].get() == missing[j - 1].get() + 1 {
                j += 1;
            }
            let first = missing[i];
            let read = self
                .engine
                .read(stream, Offset(first.get() - 1), j - i)
                .await?;
            let epoch_ok = deliveries
                .first()
                .is_none_or(|d| d.epoch == read.state.epoch);
            if epoch_ok {
                for m in read.messages {
                    fetched.insert(m.offset, m);
                }
            }
            i = j;
        }
        let mut sorted = deliveries;
        sorted.sort_by_key(|d| d.offset);
        Ok(sorted
            .into_iter()
            .filter_map(|delivery| {
                let message = fetched.get(&delivery.offset)?.clone();
                Some(Leased { delivery, message })
            })
            .collect())
    }

    // ---- settling ----

    /// Ack, nack, extend or terminate: one result per receipt, in order.
    pub async fn settle(
        &self,
        stream: &StreamName,
        group: &GroupName,
        receipts: &[String],
        how: &Settle,
    ) -> Result<Vec<ReceiptResult>, GroupError> {
        let key = (stream.clone(), group.clone());
        let live = self.live(&key);
        self.run(&key, &live, true, |state, now| {
            apply_settle(state, receipts, how, now)
        })
        .await
    }

    /// Settles `receipts`, then leases up to `next.max` more messages to `next.member` without
    /// waiting — in one hold of the group's lock, stored as **one** commit, answered once that
    /// is durable. For a member whose settle returns credit (an ack of its window, then a
    /// receive for the room it freed) this is one group operation, one commit and one
    /// durability wait instead of two of each. The receive is one locked round (want on the
    /// state the settle left → the read-ahead or an engine read → receive): it may lease fewer
    /// than `next.max` although more are there (a caller with room left receives as usual),
    /// and it never answers a message twice or out of turn, exactly as a receive would not.
    ///
    /// A failure of the whole call (an error, not a per-receipt result) stores nothing of
    /// either part.
    pub async fn settle_and_receive(
        &self,
        stream: &StreamName,
        group: &GroupName,
        receipts: &[String],
        how: &Settle,
        next: &ReceiveRequest,
    ) -> Result<(Vec<ReceiptResult>, ReceiveAnswer), GroupError> {
        next.validate()?;
        let key = (stream.clone(), group.clone());
        let live = self.live(&key);
        self.watch_for_ahead(&key.0, &live).await;
        self.rounds.fetch_add(1, AtomicOrdering::Relaxed);
        let read = LockedRead {
            room: next.max,
            bytes: 0,
            max_bytes: self.config.max_read_bytes,
        };
        let ((results, (received, f)), tail) = self
            .run_queued(
                &key,
                &live,
                true,
                |state, now| apply_settle(state, receipts, how, now),
                Some(read),
                |state, now, f| {
                    let f = f.ok_or_else(missing_read)?;
                    let out = receive_fetched(state, next, now, f)?;
                    Ok(Outcome {
                        value: (out.value.0, f.clone()),
                        changes: out.changes,
                        dead_letters: out.dead_letters,
                    })
                },
            )
            .await?;
        self.settled(&live, tail).await?;
        let more = f.stream_has_more();
        let epoch = f.batch.state.epoch.clone();
        let fetched = f
            .batch
            .messages
            .into_iter()
            .map(|m| (m.offset, m))
            .collect();
        let messages = self
            .attach_payloads(&key.0, &live, received.deliveries, fetched, Some(epoch))
            .await?;
        Ok((
            results,
            ReceiveAnswer {
                messages,
                reset: received.reset,
                more,
            },
        ))
    }

    /// A reason as a client gave it.
    pub fn reason(text: Option<&str>) -> Result<Option<Reason>, GroupError> {
        Ok(text.map(Reason::new).transpose()?)
    }

    // ---- redrive ----

    /// Moves the dead-letter stream's messages of `stream` back into `stream` (see the module
    /// docs), at most [`REDRIVE_MAX`] per call.
    pub async fn redrive(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Redriven, GroupError> {
        let dead_letter = {
            let key = (stream.clone(), group.clone());
            let live = self.live(&key);
            let mut guard = live.state.lock().await;
            match self.ensure_loaded(&key, &mut guard).await {
                Ok(loaded) => loaded.state.dead_letter().clone(),
                Err(e) => {
                    drop(guard);
                    if matches!(e, GroupError::NotFound { .. }) {
                        self.forget(&key, &live);
                    }
                    return Err(e);
                }
            }
        };
        let internal = redrive_group(stream);
        let spec = GroupConfigSpec {
            start: Some("oldest".into()),
            visibility_timeout: Some(spool_core::group::config::DurationText(
                Duration::from_secs(60),
            )),
            max_deliveries: Some(spool_core::group::config::MAX_DELIVERIES_CAP),
            // Never used in practice (every message is acked at once); named so that the
            // default `{dead letter}.{group}.dead` cannot be too long a name. A message this
            // group ever dead-lettered would land where redrive sends it anyway.
            dead_letter: Some(stream.to_string()),
            ..GroupConfigSpec::default()
        };
        let key = (dead_letter.clone(), internal.clone());
        match self.live_exists(&key).await? {
            true => {}
            false => {
                self.put(&dead_letter, &internal, &spec).await?;
            }
        }
        let member = MemberName::new("redrive").map_err(|e| {
            GroupError::Engine(EngineError::internal(format!("redrive member name: {e}")))
        })?;
        let mut done = Redriven {
            dead_letter: Some(dead_letter.clone()),
            ..Redriven::default()
        };
        let never = CancellationToken::new();
        while done.moved + done.skipped < REDRIVE_MAX {
            let request = ReceiveRequest {
                member: member.clone(),
                max: 100,
                visibility_timeout: None,
            };
            let answer = self
                .receive(&dead_letter, &internal, &request, None, &never)
                .await?;
            if answer.messages.is_empty() {
                return Ok(done);
            }
            let mut back = Vec::new();
            let mut receipts = Vec::new();
            for leased in &answer.messages {
                receipts.push(leased.delivery.receipt.encode());
                let m = &leased.message;
                let source = m
                    .headers
                    .iter()
                    .find(|(k, _)| k == HEADER_STREAM)
                    .map(|(_, v)| v.as_str());
                if source != Some(stream.as_str()) {
                    done.skipped += 1;
                    continue;
                }
                back.push(NewMessage {
                    payload: m.payload.clone(),
                    content_type: m.content_type.clone(),
                    key: m.key.clone(),
                    headers: m
                        .headers
                        .iter()
                        .filter(|(k, _)| !k.starts_with(DEAD_HEADER_PREFIX))
                        .cloned()
                        .collect(),
                    // The internal group's incarnation and the dead letter's position: the
                    // same for every attempt to move this dead letter, and short.
                    idempotency_key: Some(format!(
                        "spool-redrive:{}:{}:{}",
                        leased.delivery.receipt.group,
                        leased.delivery.epoch,
                        leased.delivery.offset
                    )),
                });
            }
            let n = back.len() as u64;
            if !back.is_empty() {
                self.engine.append(stream, back).await?;
            }
            done.moved += n;
            self.settle(&dead_letter, &internal, &receipts, &Settle::Ack)
                .await?;
        }
        done.more = true;
        Ok(done)
    }

    /// Whether a group exists (loading it).
    async fn live_exists(&self, key: &Key) -> Result<bool, GroupError> {
        let live = self.live(key);
        let mut guard = live.state.lock().await;
        match self.ensure_loaded(key, &mut guard).await {
            Ok(_) => Ok(true),
            Err(GroupError::NotFound { .. }) => {
                drop(guard);
                self.forget(key, &live);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    // ---- the sweeper ----

    /// Runs `expire` for every cached group with a due lease end or visibility, once a second,
    /// and loads the store's groups it does not hold every [`DISCOVER_EVERY`], until
    /// `shutdown`.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut discovered: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if discovered.is_none_or(|at| at.elapsed() >= DISCOVER_EVERY) {
                discovered = Some(Instant::now());
                self.discover().await;
            }
            self.sweep_once().await;
        }
    }

    /// Expires what is due in every cached group.
    pub async fn sweep_once(&self) {
        let now = self.now();
        for (key, live) in self.cached() {
            if live.due_ms.load(AtomicOrdering::Relaxed) > now {
                continue;
            }
            match self
                .run(&key, &live, false, |state, now| Ok(state.expire(now)))
                .await
            {
                Ok(()) => live.changed.notify_waiters(),
                Err(GroupError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(stream = %key.0, group = %key.1, error = %e, "expiring a consumer group's leases failed");
                }
            }
        }
    }

    /// Loads groups of the store this node does not hold yet, while the cache has room.
    async fn discover(&self) {
        let all = match self.store.list_groups(None).await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "listing consumer groups failed");
                return;
            }
        };
        for key in all {
            {
                let cache = self.cache.lock();
                if cache.contains_key(&key) {
                    continue;
                }
                if cache.len() >= self.config.max_cached {
                    return;
                }
            }
            let live = self.live(&key);
            let mut guard = live.state.lock().await;
            match self.ensure_loaded(&key, &mut guard).await {
                Ok(loaded) => {
                    let due = loaded.state.next_wakeup(self.now()).unwrap_or(u64::MAX);
                    live.due_ms.store(due, AtomicOrdering::Relaxed);
                }
                Err(e) => {
                    drop(guard);
                    self.forget(&key, &live);
                    tracing::debug!(stream = %key.0, group = %key.1, error = %e, "loading a consumer group failed");
                }
            }
        }
    }

    // ---- metrics ----

    /// Every cached group's stats, for `/metrics`: (stream, group, stats). Groups busy right
    /// now are left out of this observation.
    pub async fn observe(&self) -> Vec<(StreamName, GroupName, GroupStats)> {
        let mut out = Vec::new();
        for (key, live) in self.cached() {
            if key.1.as_str().starts_with(RESERVED_PREFIX) {
                continue;
            }
            let cursor = match live.state.try_lock() {
                Ok(guard) => match guard.as_ref() {
                    Some(l) => l.state.cursor().offset,
                    None => continue,
                },
                Err(_) => continue,
            };
            let Ok(next) = self.engine.read(&key.0, cursor, 1).await else {
                continue;
            };
            let Ok(guard) = live.state.try_lock() else {
                continue;
            };
            let Some(loaded) = guard.as_ref() else {
                continue;
            };
            let stats = view(&loaded.state, &next.state, &next.messages, self.now()).stats;
            out.push((key.0, key.1, stats));
        }
        out
    }

    /// Serializes `/metrics` observations.
    pub fn observing(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.observing.lock()
    }
}

/// Whether `read` is older than the group's cursor: in the cursor's epoch, with a head before
/// it (a read made before another receive moved the cursor past it). Given to `receive`, it
/// would look like a diverged history and reset the group.
/// An operation that does nothing, for [`Groups::run_queued`]'s `pre`.
fn nothing(_: &mut GroupState, _: u64) -> Result<Outcome<()>, GroupError> {
    Ok(Outcome {
        value: (),
        changes: Vec::new(),
        dead_letters: Vec::new(),
    })
}

fn missing_read() -> GroupError {
    GroupError::Engine(EngineError::internal("a locked read went missing"))
}

/// A settle on the group's state: one result per receipt.
fn apply_settle(
    state: &mut GroupState,
    receipts: &[String],
    how: &Settle,
    now: u64,
) -> Result<Outcome<Vec<ReceiptResult>>, GroupError> {
    Ok(match how {
        Settle::Ack => state.ack(receipts, now)?,
        Settle::Nack { delay, reason } => state.nack(receipts, *delay, reason.as_ref(), now)?,
        Settle::Extend { visibility_timeout } => {
            let v = visibility_timeout.unwrap_or(state.config().visibility_timeout);
            state.extend(receipts, v, now)?
        }
        Settle::Terminate { reason } => state.terminate(receipts, reason.as_ref(), now)?,
    })
}

/// A receive round's lease of what it read (`f`), and whether the read was stale.
fn receive_fetched(
    state: &mut GroupState,
    round: &ReceiveRequest,
    now: u64,
    f: &Fetched,
) -> Result<Outcome<(Received, bool)>, GroupError> {
    if stale_read(state, &f.batch) {
        // Another receive moved the cursor past this read's head meanwhile: the read is old,
        // not the stream diverged — `receive` would take it for an epoch change and reset the
        // group. Nothing is taken from it.
        return Ok(Outcome {
            value: (Received::default(), true),
            changes: Vec::new(),
            dead_letters: Vec::new(),
        });
    }
    let out = state.receive(round, &f.batch.state, &f.batch.messages, now)?;
    Ok(Outcome {
        value: (out.value, false),
        changes: out.changes,
        dead_letters: out.dead_letters,
    })
}

fn stale_read(state: &GroupState, read: &ReadBatch) -> bool {
    let cursor = state.cursor();
    read.state.epoch == cursor.epoch && read.state.head < cursor.offset
}

/// The group's description against a read of one message after its cursor.
fn view(state: &GroupState, at: &StreamState, next: &[Arc<Message>], now: u64) -> GroupView {
    let next_time = next
        .first()
        .filter(|m| m.offset == state.cursor().offset.next() && at.epoch == state.cursor().epoch)
        .map(|m| m.time_ms);
    GroupView {
        config: state.config().clone(),
        dead_letter: state.dead_letter().clone(),
        created_ms: state.created_ms(),
        stats: state.stats(at, next_time, now),
    }
}

/// What a message stores, as publish counts it against `--max-payload`.
fn stored_size(m: &NewMessage) -> usize {
    m.payload.len()
        + m.key.as_ref().map_or(0, String::len)
        + m.content_type.as_ref().map_or(0, String::len)
        + m.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

/// The internal group that redrives `stream`'s dead letters: `spool:redrive:` and a 64-bit
/// FNV-1a hash of the stream name (names may be 255 bytes, group names too).
fn redrive_group(stream: &StreamName) -> GroupName {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in stream.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Always a valid name: ASCII without whitespace, 30 bytes.
    GroupName::new(&format!("{RESERVED_PREFIX}redrive:{h:016x}"))
        .unwrap_or_else(|_| unreachable!("a fixed ASCII name is valid"))
}

#[cfg(test)]
mod tests {
    use spool_core::{ManualClock, group::GroupConfigSpec};
    use spool_engine::{MemoryEngine, memory::MemoryConfig};

    use super::*;

    fn setup() -> (Arc<Groups>, Arc<MemoryEngine>, ManualClock) {
        let time = ManualClock::new(1_000_000);
        let engine = Arc::new(MemoryEngine::new(MemoryConfig {
            clock: time.clock(),
            ..MemoryConfig::default()
        }));
        let groups = Groups::new(
            engine.clone(),
            engine.clone(),
            GroupsConfig {
                max_cached: 16,
                max_payload: 1024 * 1024,
                max_read_bytes: 1024 * 1024,
                read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
                clock: time.clock(),
            },
        );
        (groups, engine, time)
    }

    fn name(s: &str) -> StreamName {
        StreamName::new(s).unwrap()
    }

    fn group(s: &str) -> GroupName {
        GroupName::new(s).unwrap()
    }

    fn request(member: &str, max: u32) -> ReceiveRequest {
        ReceiveRequest {
            member: MemberName::new(member).unwrap(),
            max,
            visibility_timeout: None,
        }
    }

    async fn publish(engine: &MemoryEngine, stream: &str, n: usize) {
        let messages = (0..n)
            .map(|i| NewMessage {
                payload: Bytes::from(format!("m{i}")),
                ..NewMessage::default()
            })
            .collect();
        engine.append(&name(stream), messages).await.unwrap();
    }

    #[tokio::test]
    async fn a_lease_runs_out_by_the_clock_and_the_sweeper_dead_letters() {
        let (groups, engine, time) = setup();
        let (s, g) = (name("s"), group("g"));
        let spec: GroupConfigSpec =
            serde_json::from_str(r#"{"visibility_timeout":"1s","max_deliveries":2}"#).unwrap();
        assert!(groups.put(&s, &g, &spec).await.unwrap());
        assert!(!groups.put(&s, &g, &spec).await.unwrap());
        publish(&engine, "s", 1).await;
        let never = CancellationToken::new();
        for round in 1..=2 {
            let a = groups
                .receive(&s, &g, &request("w", 10), None, &never)
                .await
                .unwrap();
            assert_eq!(a.messages.len(), 1);
            assert_eq!(a.messages[0].delivery.deliveries, round);
            assert_eq!(&a.messages[0].message.payload[..], b"m0");
            time.advance(Duration::from_millis(1001));
        }
        groups.sweep_once().await;
        let dead = engine.read(&name("s.g.dead"), Offset(0), 10).await.unwrap();
        assert_eq!(dead.messages.len(), 1);
        assert_eq!(&dead.messages[0].payload[..], b"m0");
        let view = groups.describe(&s, &g).await.unwrap();
        assert_eq!(view.stats.dead_lettered, 1);
        assert_eq!(view.stats.members[0].timeouts, 2);
        // Redrive puts it back as a new message; a second redrive moves nothing.
        let r = groups.redrive(&s, &g).await.unwrap();
        assert_eq!((r.moved, r.skipped, r.more), (1, 0, false));
        assert_eq!(engine.state(&s).await.unwrap().unwrap().head, Offset(2));
        assert_eq!(groups.redrive(&s, &g).await.unwrap().moved, 0);
        assert!(groups.list(&name("s.g.dead")).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_stale_cache_conflicts_reloads_and_redoes() {
        let (a, engine, time) = setup();
        // A second driver over the same store: another node.
        let b = Groups::new(
            engine.clone(),
            engine.clone(),
            GroupsConfig {
                max_cached: 16,
                max_payload: 1024,
                max_read_bytes: 1024 * 1024,
                read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
                clock: time.clock(),
            },
        );
        let (s, g) = (name("s"), group("g"));
        a.put(&s, &g, &GroupConfigSpec::default()).await.unwrap();
        publish(&engine, "s", 4).await;
        let never = CancellationToken::new();
        let x = a
            .receive(&s, &g, &request("a", 2), None, &never)
            .await
            .unwrap();
        let y = b
            .receive(&s, &g, &request("b", 2), None, &never)
            .await
            .unwrap();
        // `a` is now stale; its next receive conflicts, reloads, and gets what is left.
        let z = a
            .receive(&s, &g, &request("a", 2), None, &never)
            .await
            .unwrap();
        let mut offsets: Vec<u64> = [&x, &y, &z]
            .iter()
            .flat_map(|r| r.messages.iter().map(|m| m.delivery.offset.get()))
            .collect();
        offsets.sort();
        assert_eq!(offsets, [1, 2, 3, 4], "disjoint leases across nodes");
        let receipts: Vec<String> = x
            .messages
            .iter()
            .map(|m| m.delivery.receipt.encode())
            .collect();
        let results = b.settle(&s, &g, &receipts, &Settle::Ack).await.unwrap();
        assert_eq!(results, [ReceiptResult::Ok, ReceiptResult::Ok]);
    }

    #[tokio::test]
    async fn settle_and_receive_is_one_commit_and_hands_out_each_message_once() {
        let (groups, engine, _time) = setup();
        let (s, g) = (name("s"), group("g"));
        groups
            .put(&s, &g, &GroupConfigSpec::default())
            .await
            .unwrap();
        publish(&engine, "s", 5).await;
        let never = CancellationToken::new();
        let first = groups
            .receive(&s, &g, &request("w", 1), None, &never)
            .await
            .unwrap();
        assert!(first.more, "4 more in the stream");
        let before = engine.load_group(&s, &g).await.unwrap().unwrap().version;
        let mut receipt = first.messages[0].delivery.receipt.encode();
        let mut seen = vec![first.messages[0].delivery.offset.get()];
        for _ in 0..4 {
            let (results, next) = groups
                .settle_and_receive(&s, &g, &[receipt.clone()], &Settle::Ack, &request("w", 1))
                .await
                .unwrap();
            assert_eq!(results, [ReceiptResult::Ok]);
            assert_eq!(next.messages.len(), 1);
            let m = &next.messages[0];
            assert_eq!(
                next.more,
                m.delivery.offset.get() < 5,
                "a backlog until the last"
            );
            assert_eq!(m.delivery.deliveries, 1);
            assert_eq!(
                &m.message.payload[..],
                format!("m{}", m.delivery.offset.get() - 1).as_bytes()
            );
            seen.push(m.delivery.offset.get());
            receipt = m.delivery.receipt.encode();
        }
        assert_eq!(seen, [1, 2, 3, 4, 5], "in order, each once");
        let after = engine.load_group(&s, &g).await.unwrap().unwrap().version;
        assert_eq!(after - before, 4, "one commit per ack with its next lease");
        // The last ack finds nothing more: acked, and an empty answer.
        let (results, next) = groups
            .settle_and_receive(&s, &g, &[receipt.clone()], &Settle::Ack, &request("w", 1))
            .await
            .unwrap();
        assert_eq!(results, [ReceiptResult::Ok]);
        assert!(next.messages.is_empty());
        // Per-receipt answers as for a settle: the same receipt again, and garbage.
        let (results, _) = groups
            .settle_and_receive(
                &s,
                &g,
                &[receipt, "nonsense".to_owned()],
                &Settle::Ack,
                &request("w", 1),
            )
            .await
            .unwrap();
        assert_eq!(results, [ReceiptResult::Expired, ReceiptResult::Unknown]);
        let stats = groups.describe(&s, &g).await.unwrap().stats;
        assert_eq!((stats.acked, stats.in_flight, stats.pending), (5, 0, 0));
        // A bad request fails whole and stores nothing.
        let bad = groups
            .settle_and_receive(&s, &g, &[], &Settle::Ack, &request("w", 0))
            .await;
        assert!(matches!(bad, Err(GroupError::Op(_))), "{bad:?}");
        let missing = groups
            .settle_and_receive(&s, &group("nope"), &[], &Settle::Ack, &request("w", 1))
            .await;
        assert!(matches!(missing, Err(GroupError::NotFound { .. })));
    }

    #[tokio::test]
    async fn settle_and_receive_takes_the_room_its_nack_frees() {
        let (groups, engine, _time) = setup();
        let (s, g) = (name("s"), group("g"));
        let spec: GroupConfigSpec = serde_json::from_str(r#"{"max_in_flight":1}"#).unwrap();
        groups.put(&s, &g, &spec).await.unwrap();
        publish(&engine, "s", 2).await;
        let never = CancellationToken::new();
        let a = groups
            .receive(&s, &g, &request("w", 1), None, &never)
            .await
            .unwrap();
        // max_in_flight 1 is reached: only the settle frees room, and the receive after it in
        // the same hold takes it (want is computed on the state the settle left).
        let nack = Settle::Nack {
            delay: Duration::ZERO,
            reason: None,
        };
        let receipt = a.messages[0].delivery.receipt.encode();
        let (results, next) = groups
            .settle_and_receive(&s, &g, &[receipt], &nack, &request("w", 1))
            .await
            .unwrap();
        assert_eq!(results, [ReceiptResult::Ok]);
        assert_eq!(next.messages.len(), 1);
        assert_eq!(
            next.messages[0].delivery.offset.get(),
            1,
            "the nacked one again"
        );
        assert_eq!(next.messages[0].delivery.deliveries, 2);
        assert_eq!(&next.messages[0].message.payload[..], b"m0");
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_evicts_idle_entries() {
        let (groups, _engine, _time) = setup();
        let s = name("s");
        for i in 0..40 {
            groups
                .put(&s, &group(&format!("g{i}")), &GroupConfigSpec::default())
                .await
                .unwrap();
            assert!(groups.cache.lock().len() <= 16);
        }
        assert_eq!(groups.list(&s).await.unwrap().len(), 40);
        // An evicted group loads again.
        assert!(groups.describe(&s, &group("g0")).await.is_ok());
    }

    #[tokio::test]
    async fn the_store_is_compacted_every_so_many_commits() {
        let (groups, engine, _time) = setup();
        let (s, g) = (name("s"), group("g"));
        groups
            .put(&s, &g, &GroupConfigSpec::default())
            .await
            .unwrap();
        publish(&engine, "s", 300).await;
        let never = CancellationToken::new();
        for _ in 0..300 {
            let a = groups
                .receive(&s, &g, &request("w", 1), None, &never)
                .await
                .unwrap();
            let receipts = [a.messages[0].delivery.receipt.encode()];
            let r = groups
                .settle(&s, &g, &receipts, &Settle::Ack)
                .await
                .unwrap();
            assert_eq!(r, [ReceiptResult::Ok]);
        }
        let stored = engine.load_group(&s, &g).await.unwrap().unwrap();
        assert_eq!(stored.version, 600, "one commit per receive and per ack");
        assert!(
            stored.changes.len() < COMPACT_EVERY as usize,
            "{} changes kept",
            stored.changes.len()
        );
        assert_eq!(groups.describe(&s, &g).await.unwrap().stats.acked, 300);
    }

    #[tokio::test]
    async fn a_receive_answer_is_bounded_by_max_read_bytes() {
        let time = ManualClock::new(1_000_000);
        let engine = Arc::new(MemoryEngine::new(MemoryConfig {
            clock: time.clock(),
            ..MemoryConfig::default()
        }));
        let groups = Groups::new(
            engine.clone(),
            engine.clone(),
            GroupsConfig {
                max_cached: 4,
                max_payload: 1024 * 1024,
                max_read_bytes: 1000,
                read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
                clock: time.clock(),
            },
        );
        let (s, g) = (name("s"), group("g"));
        groups
            .put(&s, &g, &GroupConfigSpec::default())
            .await
            .unwrap();
        let big = (0..10)
            .map(|_| NewMessage {
                payload: Bytes::from(vec![b'x'; 300]),
                ..NewMessage::default()
            })
            .collect();
        engine.append(&s, big).await.unwrap();
        let never = CancellationToken::new();
        let a = groups
            .receive(&s, &g, &request("w", 10), None, &never)
            .await
            .unwrap();
        assert_eq!(a.messages.len(), 3, "3 × 300 bytes fit 1000");
        let b = groups
            .receive(&s, &g, &request("w", 10), None, &never)
            .await
            .unwrap();
        assert_eq!(
            b.messages[0].delivery.offset,
            Offset(4),
            "the rest stays pending"
        );
    }

    #[tokio::test]
    async fn a_waiting_receive_does_not_spin() {
        let (groups, _engine, _time) = setup();
        let (s, g) = (name("s"), group("g"));
        groups
            .put(&s, &g, &GroupConfigSpec::default())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_millis(300);
        let never = CancellationToken::new();
        let a = groups
            .receive(&s, &g, &request("w", 1), Some(deadline), &never)
            .await
            .unwrap();
        assert!(a.messages.is_empty());
        let rounds = groups.rounds.load(AtomicOrdering::Relaxed);
        assert!(
            rounds <= 4,
            "{rounds} rounds while waiting 300 ms on an idle group"
        );
    }

    /// Many members receiving at once from one backlog, each stopping at its first empty
    /// answer (no wait): together they take it all, so none was answered empty while
    /// messages were pending (a round overtaken by another member reads again under the
    /// lock). The acks go through the same lock, so receives and acks interleave.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_racing_for_a_backlog_are_not_answered_empty_before_its_end() {
        let (groups, engine, _time) = setup();
        // Reads outside the lock are slow, so other members take what one read meanwhile.
        groups.read_pause_ms.store(2, AtomicOrdering::Relaxed);
        let (s, g) = (name("s"), group("g"));
        groups
            .put(&s, &g, &GroupConfigSpec::default())
            .await
            .unwrap();
        publish(&engine, "s", 600).await;
        // Messages the members were answered with so far: at an empty answer, at most one
        // answer of each other member (15 × 4) may not be counted yet.
        let handed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for m in 0..16 {
            let (groups, s, g) = (groups.clone(), s.clone(), g.clone());
            let handed = handed.clone();
            tasks.push(tokio::spawn(async move {
                let never = CancellationToken::new();
                let mut got = Vec::new();
                loop {
                    let a = groups
                        .receive(&s, &g, &request(&format!("m{m}"), 4), None, &never)
                        .await
                        .unwrap();
                    if a.messages.is_empty() {
                        let seen = handed.load(AtomicOrdering::SeqCst);
                        assert!(
                            seen + 15 * 4 >= 600,
                            "member m{m} was answered empty with {seen} of 600 handed out"
                        );
                        return got;
                    }
                    handed.fetch_add(a.messages.len() as u64, AtomicOrdering::SeqCst);
                    let receipts: Vec<String> = a
                        .messages
                        .iter()
                        .map(|l| l.delivery.receipt.encode())
                        .collect();
                    let r = groups
                        .settle(&s, &g, &receipts, &Settle::Ack)
                        .await
                        .unwrap();
                    assert!(r.iter().all(|r| *r == ReceiptResult::Ok));
                    got.extend(a.messages.iter().map(|l| l.delivery.offset.get()));
                    tokio::task::yield_now().await;
                }
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (1..=600).collect::<Vec<u64>>());
    }

    /// A group from `latest` on a stream with history, members receiving while messages are
    /// published: a receive whose read is older than the cursor another receive moved
    /// meanwhile takes nothing from it — it is not a diverged stream, so no reset, and no
    /// message from before the group's start is handed out (spool-bench's steady cells saw
    /// both).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_older_than_the_cursor_resets_nothing() {
        let (groups, engine, _time) = setup();
        groups.read_pause_ms.store(2, AtomicOrdering::Relaxed);
        let (s, g) = (name("s"), group("g"));
        publish(&engine, "s", 100).await;
        let spec: GroupConfigSpec = serde_json::from_str(r#"{"start":"latest"}"#).unwrap();
        groups.put(&s, &g, &spec).await.unwrap();
        let done = CancellationToken::new();
        let publisher = {
            let (engine, done) = (engine.clone(), done.clone());
            tokio::spawn(async move {
                for _ in 0..300 {
                    publish(&engine, "s", 1).await;
                    tokio::time::sleep(Duration::from_micros(300)).await;
                }
                done.cancel();
            })
        };
        let mut tasks = Vec::new();
        for m in 0..8 {
            let (groups, s, g, done) = (groups.clone(), s.clone(), g.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let never = CancellationToken::new();
                let mut got = Vec::new();
                let mut empty_after_done = 0;
                while empty_after_done < 2 {
                    let a = groups
                        .receive(&s, &g, &request(&format!("m{m}"), 8), None, &never)
                        .await
                        .unwrap();
                    assert_eq!(a.reset, None, "a reset recorded");
                    if a.messages.is_empty() {
                        if done.is_cancelled() {
                            empty_after_done += 1;
                        }
                        tokio::task::yield_now().await;
                        continue;
                    }
                    let receipts: Vec<String> = a
                        .messages
                        .iter()
                        .map(|l| l.delivery.receipt.encode())
                        .collect();
                    let r = groups
                        .settle(&s, &g, &receipts, &Settle::Ack)
                        .await
                        .unwrap();
                    assert!(r.iter().all(|r| *r == ReceiptResult::Ok), "{r:?}");
                    got.extend(a.messages.iter().map(|l| l.delivery.offset.get()));
                }
                got
            }));
        }
        publisher.await.unwrap();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        // `latest` starts with the newest message there was (100), as it does for a reader.
        assert_eq!(all, (100..=400).collect::<Vec<u64>>());
        let stats = groups.describe(&s, &g).await.unwrap().stats;
        assert_eq!((stats.resets, stats.acked), (0, 301));
    }

    /// The memory engine, counting the reads that ask for messages (`limit` > 0).
    struct Counting {
        inner: Arc<MemoryEngine>,
        reads: AtomicU64,
    }

    #[async_trait::async_trait]
    impl Engine for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        async fn append(
            &self,
            stream: &StreamName,
            messages: Vec<NewMessage>,
        ) -> Result<Vec<spool_engine::Appended>, EngineError> {
            self.inner.append(stream, messages).await
        }
        async fn read(
            &self,
            stream: &StreamName,
            after: Offset,
            limit: usize,
        ) -> Result<ReadBatch, EngineError> {
            if limit > 0 {
                self.reads.fetch_add(1, AtomicOrdering::Relaxed);
            }
            self.inner.read(stream, after, limit).await
        }
        async fn state(&self, stream: &StreamName) -> Result<Option<StreamState>, EngineError> {
            self.inner.state(stream).await
        }
        async fn watch(&self, stream: &StreamName) -> Result<HeadWatch, EngineError> {
            self.inner.watch(stream).await
        }
        fn retention(&self, stream: &StreamName) -> spool_core::Retention {
            self.inner.retention(stream)
        }
    }

    /// Groups over a counting memory engine, with `read_ahead` bytes of read-ahead.
    fn counting_setup(
        read_ahead: usize,
    ) -> (Arc<Groups>, Arc<Counting>, Arc<MemoryEngine>, ManualClock) {
        let time = ManualClock::new(1_000_000);
        let engine = Arc::new(MemoryEngine::new(MemoryConfig {
            clock: time.clock(),
            ..MemoryConfig::default()
        }));
        let counting = Arc::new(Counting {
            inner: engine.clone(),
            reads: AtomicU64::new(0),
        });
        let groups = Groups::new(
            counting.clone(),
            engine.clone(),
            GroupsConfig {
                max_cached: 16,
                max_payload: 1024 * 1024,
                max_read_bytes: 1024 * 1024,
                read_ahead_bytes: read_ahead,
                clock: time.clock(),
            },
        );
        (groups, counting, engine, time)
    }

    /// Receives `max` and acks what came; the offsets.
    async fn take(groups: &Groups, s: &StreamName, g: &GroupName, max: u32) -> Vec<u64> {
        let never = CancellationToken::new();
        let a = groups
            .receive(s, g, &request("w", max), None, &never)
            .await
            .unwrap();
        let receipts: Vec<String> = a
            .messages
            .iter()
            .map(|l| l.delivery.receipt.encode())
            .collect();
        if !receipts.is_empty() {
            let r = groups.settle(s, g, &receipts, &Settle::Ack).await.unwrap();
            assert!(r.iter().all(|r| *r == ReceiptResult::Ok), "{r:?}");
        }
        a.messages.iter().map(|l| l.delivery.offset.get()).collect()
    }

    /// Receives of one message each drain a backlog with one engine read per read-ahead
    /// (256 messages), not one per receive; with `--group-read-ahead 0`, one per receive.
    #[tokio::test]
    async fn a_backlog_drained_one_by_one_is_read_ahead() {
        for (budget, most, least) in [(DEFAULT_READ_AHEAD_BYTES, 8, 0), (0, u64::MAX, 600)] {
            let (groups, counting, engine, _time) = counting_setup(budget);
            let (s, g) = (name("s"), group("g"));
            groups
                .put(&s, &g, &GroupConfigSpec::default())
                .await
                .unwrap();
            publish(&engine, "s", 600).await;
            let mut all = Vec::new();
            for _ in 0..600 {
                all.extend(take(&groups, &s, &g, 1).await);
            }
            assert_eq!(all, (1..=600).collect::<Vec<u64>>());
            let reads = counting.reads.load(AtomicOrdering::Relaxed);
            assert!(
                (least..=most).contains(&reads),
                "{reads} engine reads for 600 receives with a budget of {budget}"
            );
            if budget > 0 {
                assert!(groups.ahead_budget.used.load(AtomicOrdering::Relaxed) <= budget);
            }
        }
    }

    /// Members racing for a backlog with receives of one message: about one engine read per
    /// read-ahead (members that find it empty while another fills it read their own one).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_racing_share_one_read_ahead() {
        let (groups, counting, engine, _time) = counting_setup(DEFAULT_READ_AHEAD_BYTES);
        let (s, g) = (name("s"), group("g"));
        groups
            .put(&s, &g, &GroupConfigSpec::default())
            .await
            .unwrap();
        publish(&engine, "s", 2000).await;
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (groups, s, g) = (groups.clone(), s.clone(), g.clone());
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let offsets = take(&groups, &s, &g, 1).await;
                    if offsets.is_empty() {
                        return got;
                    }
                    got.extend(offsets);
                }
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(all, (1..=2000).collect::<Vec<u64>>());
        let reads = counting.reads.load(AtomicOrdering::Relaxed);
        assert!(
            reads <= 60,
            "{reads} engine reads for 2000 receives of 16 members"
        );
    }

    /// A stream deleted and published to again (a new epoch) while the group holds a
    /// read-ahead of the old one: nothing of the old epoch is served; the group resets and
    /// takes the new epoch's messages.
    #[tokio::test]
    async fn a_read_ahead_of_an_old_epoch_is_not_served() {
        let (groups, _counting, engine, _time) = counting_setup(DEFAULT_READ_AHEAD_BYTES);
        let (s, g) = (name("s"), group("g"));
        groups
            .put(&s, &g, &GroupConfigSpec::default())
            .await
            .unwrap();
        publish(&engine, "s", 20).await;
        assert_eq!(take(&groups, &s, &g, 1).await, [1]);
        assert_eq!(take(&groups, &s, &g, 1).await, [2]);
        assert!(
            groups
                .cached()
                .iter()
                .any(|(_, l)| l.ahead.lock().buffer.is_some())
        );
        let old = engine.state(&s).await.unwrap().unwrap().epoch;
        assert!(
            spool_engine::StreamAdmin::delete_stream(&*engine, &s)
                .await
                .unwrap()
        );
        let messages = (0..3)
            .map(|i| NewMessage {
                payload: Bytes::from(format!("new{i}")),
                ..NewMessage::default()
            })
            .collect();
        engine.append(&s, messages).await.unwrap();
        let new = engine.state(&s).await.unwrap().unwrap().epoch;
        assert_ne!(old, new);
        let never = CancellationToken::new();
        let a = groups
            .receive(&s, &g, &request("w", 10), None, &never)
            .await
            .unwrap();
        assert!(a.reset.is_some(), "the epoch change is a reset");
        let got: Vec<(spool_core::Epoch, Vec<u8>)> = a
            .messages
            .iter()
            .map(|l| (l.delivery.epoch.clone(), l.message.payload.to_vec()))
            .collect();
        assert_eq!(
            got,
            (0..3)
                .map(|i| (new.clone(), format!("new{i}").into_bytes()))
                .collect::<Vec<_>>()
        );
    }

    /// A truncate (like retention) is not on the head watch: a read-ahead answers with its
    /// read's bounds for at most `READ_AHEAD_TTL_MS`, then the group reads again, counts what
    /// was dropped as expired and continues after it.
    #[tokio::test]
    async fn a_read_ahead_outlives_a_truncate_by_its_ttl_at_most() {
        let (groups, counting, engine, time) = counting_setup(DEFAULT_READ_AHEAD_BYTES);
        let (s, g) = (name("s"), group("g"));
        groups
            .put(&s, &g, &GroupConfigSpec::default())
            .await
            .unwrap();
        publish(&engine, "s", 20).await;
        assert_eq!(take(&groups, &s, &g, 1).await, [1]);
        assert_eq!(take(&groups, &s, &g, 1).await, [2]);
        spool_engine::StreamAdmin::truncate_stream(&*engine, &s, Offset(10))
            .await
            .unwrap();
        let reads = counting.reads.load(AtomicOrdering::Relaxed);
        // Within the TTL: what a read made then would have answered.
        assert_eq!(take(&groups, &s, &g, 1).await, [3]);
        assert_eq!(counting.reads.load(AtomicOrdering::Relaxed), reads);
        time.advance(Duration::from_millis(READ_AHEAD_TTL_MS + 1));
        let never = CancellationToken::new();
        let a = groups
            .receive(&s, &g, &request("w", 1), None, &never)
            .await
            .unwrap();
        let reset = a.reset.expect("the truncated messages are a reset");
        assert_eq!(reset.lost, 6, "offsets 4 to 9");
        assert_eq!(a.messages[0].delivery.offset, Offset(10));
        assert_eq!(&a.messages[0].message.payload[..], b"m9");
    }

    /// A group deleted and created again from `latest` while it held a read-ahead: the new
    /// group starts where it says, and another node's receives (which moved the cursor past
    /// what this node read ahead) are never served again here.
    #[tokio::test]
    async fn a_read_ahead_serves_only_from_the_cursor_of_the_group_as_stored() {
        let (a, _counting, engine, time) = counting_setup(DEFAULT_READ_AHEAD_BYTES);
        let (s, g) = (name("s"), group("g"));
        a.put(&s, &g, &GroupConfigSpec::default()).await.unwrap();
        publish(&engine, "s", 20).await;
        assert_eq!(take(&a, &s, &g, 1).await, [1]);
        assert_eq!(take(&a, &s, &g, 1).await, [2]);
        // Another node over the same store takes 3 to 7.
        let b = Groups::new(
            engine.clone(),
            engine.clone(),
            GroupsConfig {
                max_cached: 16,
                max_payload: 1024 * 1024,
                max_read_bytes: 1024 * 1024,
                read_ahead_bytes: DEFAULT_READ_AHEAD_BYTES,
                clock: time.clock(),
            },
        );
        assert_eq!(take(&b, &s, &g, 5).await, [3, 4, 5, 6, 7]);
        // `a` is stale: its receive conflicts, reloads, and its read-ahead serves from 8.
        assert_eq!(take(&a, &s, &g, 2).await, [8, 9]);
        assert_eq!(take(&b, &s, &g, 2).await, [10, 11]);
        assert_eq!(take(&a, &s, &g, 1).await, [12]);
        // Deleted and created again from the newest message.
        assert!(a.delete(&s, &g).await.unwrap());
        let spec: GroupConfigSpec = serde_json::from_str(r#"{"start":"latest"}"#).unwrap();
        assert!(a.put(&s, &g, &spec).await.unwrap());
        publish(&engine, "s", 1).await;
        assert_eq!(take(&a, &s, &g, 10).await, [20, 21]);
    }

    #[test]
    fn redrive_groups_are_reserved_names() {
        let g = redrive_group(&name(&"x".repeat(255)));
        assert!(Groups::check_user_name(&g).is_err());
        assert!(Groups::check_user_name(&group("billing")).is_ok());
    }
}
