//! The stores the server keeps beside the log: state that is not stream history.
//!
//! [`Engine`](crate::Engine) is the log (append, read, watch, retention). What else the server
//! persists has its own trait here, so that it can be kept apart from the log, tested on its
//! own through the conformance suite, and given to the server separately (`spool_server::serve`
//! takes an `Arc<dyn Engine>` and an `Arc<dyn SessionStore>`):
//!
//! - [`SessionStore`]: WebSocket session records (SPEC §3), opaque bytes under an id until
//!   they expire. The records themselves and their bound are in [`crate::sessions`].
//! - [`GroupStore`]: consumer groups (SPEC §7). A group's state machine is pure code
//!   (`spool_core::group`); the store keeps what it needs to rebuild it — a snapshot and the
//!   changes committed since — and decides, by a version compared on every commit, which of
//!   several writers (nodes of a cluster) commits first. The in-memory keeper is
//!   [`crate::groups::GroupTable`].
//!
//! Every engine of this workspace implements its stores on the same struct as its log (one
//! connection, one file set, one `--max-sessions`), so `spool serve` hands the same engine to
//! the server once per trait. Nothing requires that: a store may live anywhere.

use async_trait::async_trait;
use bytes::Bytes;
use spool_core::{
    StreamName,
    group::{Change, GroupName, GroupSnapshot},
};

use crate::{EngineError, SessionRecord};
use spool_core::{Offset, StreamState};

/// Where WebSocket sessions are kept between connections. All methods are safe to call
/// concurrently. Errors are an engine's: `Unavailable` while the backing store cannot be
/// reached (the server retries a failed save), `Limit` when a record cannot be kept
/// (`--max-sessions`: [`crate::sessions::refused`]; the server does not retry those).
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Saves session records (SPEC §3), replacing any with the same id — unless the stored
    /// record (unexpired) was written by another holder and the record does not take the
    /// session over ([`SessionRecord::take_over`]): that one is refused, nothing written, and
    /// its id is in the answer. The check and the write are one atomic step per record, on
    /// every node sharing the store (a stale holder's save racing a take-over elsewhere
    /// cannot land after it). The server batches these: one call carries every session that
    /// changed since the last one. An engine that bounds its sessions (`--max-sessions`)
    /// saves, at the bound, every session it already holds and refuses only the new ones,
    /// answering `Limit` (then the ids refused as taken over are not named).
    async fn save_sessions(&self, sessions: Vec<SessionRecord>)
    -> Result<Vec<String>, EngineError>;

    /// A session record, unless it is unknown or expired.
    async fn load_session(&self, id: &str) -> Result<Option<Bytes>, EngineError>;

    /// Forgets a session.
    async fn delete_session(&self, id: &str) -> Result<(), EngineError>;
}

/// A consumer group as its store holds it: the snapshot it was created or last compacted
/// with, every change committed since, in commit order, and the version the next commit must
/// name. `GroupState::from_snapshot(snapshot)` then `apply` of each change rebuilds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredGroup {
    pub snapshot: GroupSnapshot,
    pub changes: Vec<Change>,
    /// How many commits the group has had since it was created (compaction does not count).
    pub version: u64,
}

/// The answer to a versioned write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Written and durable; the group is now at `version`.
    Done { version: u64 },
    /// The group is no longer at the version named (another writer committed first) or is
    /// gone: nothing was written. Load it again and redo the operation on what it is now.
    Conflict,
}

/// Resolves once a queued group commit is durable (or fails: then the commit and every one
/// queued after it for that group are not stored).
pub type GroupDurable = futures::future::BoxFuture<'static, Result<(), EngineError>>;

/// The answer to [`GroupStore::queue_group_commit`].
pub enum QueuedCommit {
    /// The commit has its place in the store's order: the group will be at `version` once
    /// `durable` resolves `Ok`.
    Queued { version: u64, durable: GroupDurable },
    /// As [`Committed::Conflict`]: nothing was written.
    Conflict,
}

/// Where consumer groups are kept (SPEC §7). All methods are safe to call concurrently, from
/// any number of servers sharing the store; commits are atomic and ordered by the version, so
/// two writers never both commit against the same state. A call that returns is durable as the
/// engine makes messages durable (the disk engine: fsynced before it returns).
#[async_trait]
pub trait GroupStore: Send + Sync + 'static {
    /// Creates a group from its first snapshot, at version 0. False, and nothing written, when
    /// the stream already has a group of that name. `Limit` past the engine's `--max-groups`.
    async fn create_group(&self, snapshot: &GroupSnapshot) -> Result<bool, EngineError>;

    /// A group, unless there is none of that name on that stream.
    async fn load_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Option<StoredGroup>, EngineError>;

    /// The groups of `stream`, or of every stream, in name order.
    async fn list_groups(
        &self,
        stream: Option<&StreamName>,
    ) -> Result<Vec<(StreamName, GroupName)>, EngineError>;

    /// Appends `changes` to the group if it is still at version `expected`.
    async fn commit_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        expected: u64,
        changes: &[Change],
    ) -> Result<Committed, EngineError>;

    /// [`commit_group`](Self::commit_group) in two steps: answers once the commit is ordered
    /// (its version taken), with a future that resolves once it is durable. A caller may queue
    /// the group's next commit (at the returned version) before that, so commits of one group
    /// share the engine's group commit; they become durable in the order queued, and a failed
    /// one fails every later one of the group. Only a store with a single writer per group may
    /// answer before the commit is durable (the disk engine); the default commits at once.
    async fn queue_group_commit(
        &self,
        stream: &StreamName,
        group: &GroupName,
        expected: u64,
        changes: Vec<Change>,
    ) -> Result<QueuedCommit, EngineError> {
        Ok(
            match self.commit_group(stream, group, expected, &changes).await? {
                Committed::Done { version } => QueuedCommit::Queued {
                    version,
                    durable: Box::pin(std::future::ready(Ok(()))),
                },
                Committed::Conflict => QueuedCommit::Conflict,
            },
        )
    }

    /// Replaces the group's snapshot and changes with `snapshot` (the state at version
    /// `version`), if it is still at that version: the store stays as small as the state.
    async fn compact_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        version: u64,
        snapshot: &GroupSnapshot,
    ) -> Result<Committed, EngineError>;

    /// Whether other servers may commit to the same groups (the cluster engines). The server
    /// then loads a group again before it answers from a state it holds without storing
    /// anything (a commit would have caught a stale state as `Conflict`; a read does not).
    fn shared(&self) -> bool {
        false
    }

    /// Forgets a group (not its stream, nor its dead-letter stream). False if there was none.
    async fn delete_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<bool, EngineError>;
}

/// A struct whose [`GroupStore`] is one of its parts: implementing this gives it `GroupStore`,
/// every call forwarded to [`group_store`](Self::group_store). The Redis and NATS engines keep
/// their groups in a store of their own beside the log (`groups.rs` in each) and hand it out
/// this way, so the forwarding is written once.
pub trait HasGroupStore: Send + Sync + 'static {
    /// The store every [`GroupStore`] call on `self` goes to.
    fn group_store(&self) -> &dyn GroupStore;
}

#[async_trait]
impl<T: HasGroupStore> GroupStore for T {
    async fn create_group(&self, snapshot: &GroupSnapshot) -> Result<bool, EngineError> {
        self.group_store().create_group(snapshot).await
    }

    async fn load_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Option<StoredGroup>, EngineError> {
        self.group_store().load_group(stream, group).await
    }

    async fn list_groups(
        &self,
        stream: Option<&StreamName>,
    ) -> Result<Vec<(StreamName, GroupName)>, EngineError> {
        self.group_store().list_groups(stream).await
    }

    async fn commit_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        expected: u64,
        changes: &[Change],
    ) -> Result<Committed, EngineError> {
        self.group_store()
            .commit_group(stream, group, expected, changes)
            .await
    }

    async fn queue_group_commit(
        &self,
        stream: &StreamName,
        group: &GroupName,
        expected: u64,
        changes: Vec<Change>,
    ) -> Result<QueuedCommit, EngineError> {
        self.group_store()
            .queue_group_commit(stream, group, expected, changes)
            .await
    }

    async fn compact_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        version: u64,
        snapshot: &GroupSnapshot,
    ) -> Result<Committed, EngineError> {
        self.group_store()
            .compact_group(stream, group, version, snapshot)
            .await
    }

    fn shared(&self) -> bool {
        self.group_store().shared()
    }

    async fn delete_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<bool, EngineError> {
        self.group_store().delete_group(stream, group).await
    }
}

/// A stream as the admin API shows it (docs/http-api.md, "Stream administration").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSummary {
    pub name: StreamName,
    /// Epoch, head and oldest retained offset.
    pub state: StreamState,
    /// Messages retained now, and what they count against `max_bytes`.
    pub retained_messages: u64,
    pub retained_bytes: u64,
    /// When the newest retained message was published (ms since the Unix epoch); `None` when
    /// none is retained.
    pub last_publish_ms: Option<u64>,
    /// Head watches out on this node: the subscriptions reading the stream here.
    pub watchers: u64,
}

/// The most streams one [`StreamAdmin::list_streams`] call returns.
pub const MAX_LIST_STREAMS: usize = 1000;

/// What an operator may do to streams as a whole: list and inspect them, delete one, drop the
/// older part of one's history. An engine that supports it returns itself from
/// [`crate::Engine::admin`]. Every engine that does runs `conformance::stream_admin`.
#[async_trait]
pub trait StreamAdmin: Send + Sync + 'static {
    /// Streams something was published to whose names start with `prefix`, in name order,
    /// after `after` (exclusive), at most `limit` (capped at [`MAX_LIST_STREAMS`]).
    async fn list_streams(
        &self,
        prefix: &str,
        after: Option<&StreamName>,
        limit: usize,
    ) -> Result<Vec<StreamSummary>, EngineError>;

    /// One stream, unless nothing was published to it.
    async fn describe_stream(
        &self,
        stream: &StreamName,
    ) -> Result<Option<StreamSummary>, EngineError>;

    /// Deletes a stream: its history, its epoch and its idempotency keys. Its readers get a
    /// reset (`unknown_stream` or `epoch_changed`); the next append starts it again in a new
    /// epoch at offset 1. False if nothing was published to it. Consumer groups of the stream
    /// are not deleted (they reset as on any epoch change).
    async fn delete_stream(&self, stream: &StreamName) -> Result<bool, EngineError>;

    /// Drops the stream's retained messages with offsets before `before`, as retention would:
    /// readers behind get `history_expired`. The epoch and head stay; `before` past the head
    /// drops everything. The stream's bounds after, or `None` if nothing was published to it.
    async fn truncate_stream(
        &self,
        stream: &StreamName,
        before: Offset,
    ) -> Result<Option<StreamState>, EngineError>;
}

/// Picks the page [`StreamAdmin::list_streams`] answers from every stream name an engine
/// holds: the `limit` first in name order after `after` that start with `prefix`, sorted. One
/// pass with a bounded heap, so a page costs O(streams · log limit), never a sort of all.
pub fn page_of_names<'a>(
    names: impl Iterator<Item = &'a StreamName>,
    prefix: &str,
    after: Option<&StreamName>,
    limit: usize,
) -> Vec<StreamName> {
    let limit = limit.min(MAX_LIST_STREAMS);
    let mut heap = std::collections::BinaryHeap::with_capacity(limit + 1);
    if limit == 0 {
        return Vec::new();
    }
    for name in names {
        if !name.as_str().starts_with(prefix) || after.is_some_and(|a| name <= a) {
            continue;
        }
        if heap.len() < limit {
            heap.push(name);
        } else if heap.peek().is_some_and(|top| name < *top) {
            heap.pop();
            heap.push(name);
        }
    }
    let mut page: Vec<StreamName> = heap.into_iter().cloned().collect();
    page.sort();
    page
}
