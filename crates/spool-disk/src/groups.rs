//! Consumer groups on disk (SPEC §7): the disk engine's [`GroupStore`].
//!
//! A group operation is a WAL record (`record.rs`, kinds 3–8) written by the writer thread in
//! the same batches as messages, so it shares their group commit: a commit is answered once
//! its record is fsynced (or, with `--durability memory`, written to the OS), exactly like an
//! append, and many commits and appends share one fsync.
//!
//! Two views of the groups:
//!
//! - **order** (`Groups::order`, an async mutex): what the log will hold once everything
//!   queued is written — each group's version, incarnation and stored size. A create, commit,
//!   compaction or delete checks it (`Conflict`, `--max-groups`), updates it and queues its
//!   record while holding it, so a group's records are in the WAL in version order. It is
//!   held only to check and queue, never across the fsync.
//! - **table** (a [`GroupTable`]): what is durable. The writer applies each operation after its
//!   record is durable and before answering, so `load_group` after an answered commit sees
//!   it; `load_group` while one of the group's operations is still on its way waits for it.
//!
//! Old segments are never needed for groups: every segment starts with a `GroupPut` of every
//! group (snapshot and changes as the table holds them, `Shared::snapshot_records`), written
//! from the durable table when the segment is started. So a segment is deleted when its
//! messages are (group records are not counted as live), and recovery rebuilds each group from
//! the newest segment's snapshot and the commits after it. A group's stored form (snapshot and
//! changes since) is capped at [`MAX_GROUP_BYTES`] so that this record is always readable; the
//! server compacts long before that.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use spool_core::{
    StreamName,
    group::{Change, GroupId, GroupName, GroupSnapshot},
};
use spool_engine::{
    EngineError, Limit,
    groups::GroupTable,
    store::{Committed, GroupStore, QueuedCommit, StoredGroup},
};

use crate::{DiskEngine, record};

pub(crate) type Key = (StreamName, GroupName);

/// The most bytes one group's stored form (its snapshot JSON and the binary changes committed since)
/// may take: it is restated as one record at the start of every segment, which must stay well
/// under `record::MAX_RECORD`. A commit past it is refused until the group is compacted.
pub const MAX_GROUP_BYTES: usize = 32 * 1024 * 1024;

/// What the log will hold of a group once everything queued is written.
#[derive(Clone, Copy, Debug)]
struct Reserved {
    version: u64,
    id: GroupId,
    /// Bytes of its stored form: snapshot JSON plus each commit's binary changes.
    bytes: usize,
}

/// The disk engine's groups (module docs).
pub(crate) struct Groups {
    order: tokio::sync::Mutex<HashMap<Key, Reserved>>,
    pub(crate) table: GroupTable,
    max: usize,
}

/// An operation to apply to the durable table once its record is durable.
pub(crate) enum GroupApply {
    Put(Box<StoredGroup>),
    Commit {
        stream: StreamName,
        group: GroupName,
        expected: u64,
        changes: Vec<Change>,
    },
    Delete {
        stream: StreamName,
        group: GroupName,
    },
}

impl Groups {
    /// The groups recovery rebuilt, at most `max` new ones (`--max-groups`; recovered groups
    /// are kept whatever the bound).
    pub(crate) fn new(max: usize, recovered: Vec<StoredGroup>) -> Result<Self, serde_json::Error> {
        let table = GroupTable::new(max);
        let mut order = HashMap::with_capacity(recovered.len());
        for group in recovered {
            let bytes = stored_bytes(&group)?;
            order.insert(
                (group.snapshot.stream.clone(), group.snapshot.group.clone()),
                Reserved {
                    version: group.version,
                    id: group.snapshot.id,
                    bytes,
                },
            );
            table.restore(group);
        }
        Ok(Self {
            order: tokio::sync::Mutex::new(order),
            table,
            max,
        })
    }

    /// Applies a durable operation (the writer thread, in WAL order).
    pub(crate) fn apply(&self, op: GroupApply) {
        match op {
            GroupApply::Put(group) => self.table.restore(*group),
            GroupApply::Commit {
                stream,
                group,
                expected,
                changes,
            } => {
                if self.table.commit(&stream, &group, expected, &changes) == Committed::Conflict {
                    // Cannot happen: `order` admitted it in version order.
                    tracing::error!(%stream, %group, expected, "a durable group commit does not follow the group's version");
                }
            }
            GroupApply::Delete { stream, group } => {
                self.table.delete(&stream, &group);
            }
        }
    }

    /// A `GroupPut` record of every durable group, for the start of a segment.
    pub(crate) fn snapshot_records(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        for (stream, group) in self.table.list(None) {
            if let Some(g) = self.table.load(&stream, &group) {
                let snapshot = record::snapshot_json(&g.snapshot)?;
                let changes = record::changes_bin(&g.changes)?;
                record::encode_group_put(out, g.version, &snapshot, &changes);
            }
        }
        Ok(())
    }
}

fn stored_bytes(group: &StoredGroup) -> Result<usize, serde_json::Error> {
    Ok(record::snapshot_json(&group.snapshot)?.len() + record::changes_bin(&group.changes)?.len())
}

fn encode_error(e: serde_json::Error) -> EngineError {
    EngineError::internal_from("encoding a consumer group for the WAL", e)
}

fn too_large(stream: &StreamName, group: &GroupName, bytes: usize) -> EngineError {
    EngineError::Limit(Limit::Store {
        what: format!(
            "consumer group {group} of stream {stream} would take {bytes} bytes on disk, more \
             than the disk engine keeps for one group ({MAX_GROUP_BYTES}); compact it"
        ),
        source: None,
    })
}

/// Groups as WAL records beside the messages (module docs): every write is answered once
/// durable, like an append.
#[async_trait]
impl GroupStore for DiskEngine {
    async fn create_group(&self, snapshot: &GroupSnapshot) -> Result<bool, EngineError> {
        self.shared.usable()?;
        let json = record::snapshot_json(snapshot).map_err(encode_error)?;
        if json.len() > MAX_GROUP_BYTES {
            return Err(too_large(&snapshot.stream, &snapshot.group, json.len()));
        }
        let mut frames = Vec::with_capacity(json.len() + 32);
        record::encode_group_put(&mut frames, 0, &json, record::NO_CHANGES);
        let key = (snapshot.stream.clone(), snapshot.group.clone());
        let groups = &self.shared.groups;
        let mut order = groups.order.lock().await;
        if order.contains_key(&key) {
            return Ok(false);
        }
        if order.len() >= groups.max {
            return Err(Limit::Groups { max: groups.max }.into());
        }
        let apply = GroupApply::Put(Box::new(StoredGroup {
            snapshot: snapshot.clone(),
            changes: Vec::new(),
            version: 0,
        }));
        let done = self.write(frames, Vec::new(), Some(apply)).await;
        if done.is_ok() {
            order.insert(
                key,
                Reserved {
                    version: 0,
                    id: snapshot.id,
                    bytes: json.len(),
                },
            );
        }
        drop(order);
        done?.wait().await?;
        Ok(true)
    }

    async fn load_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Option<StoredGroup>, EngineError> {
        let key = (stream.clone(), group.clone());
        let reserved = self.shared.groups.order.lock().await.get(&key).copied();
        let durable = self.shared.groups.table.load(stream, group);
        let settled = match (&reserved, &durable) {
            (None, None) => true,
            (Some(r), Some(d)) => r.version == d.version && r.id == d.snapshot.id,
            _ => false,
        };
        if settled {
            return Ok(durable);
        }
        // One of its operations is on its way to disk: a barrier behind it, then what is
        // durable includes it (a later one may have been queued meanwhile; that is a race
        // any reader has).
        self.write(Vec::new(), Vec::new(), None)
            .await?
            .wait()
            .await?;
        Ok(self.shared.groups.table.load(stream, group))
    }

    async fn list_groups(
        &self,
        stream: Option<&StreamName>,
    ) -> Result<Vec<(StreamName, GroupName)>, EngineError> {
        Ok(self.shared.groups.table.list(stream))
    }

    async fn commit_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        expected: u64,
        changes: &[Change],
    ) -> Result<Committed, EngineError> {
        match self
            .queue_group_commit(stream, group, expected, changes.to_vec())
            .await?
        {
            QueuedCommit::Queued { version, durable } => {
                durable.await?;
                Ok(Committed::Done { version })
            }
            QueuedCommit::Conflict => Ok(Committed::Conflict),
        }
    }

    /// Orders the commit under `order` and queues its record to the writer; the answer does
    /// not wait for the fsync (the returned future does), so a group's next commit can be
    /// queued behind it and both share one fsync. The writer answers in queue order and stops
    /// for good at its first failure, so a commit that became durable implies every earlier
    /// one did.
    async fn queue_group_commit(
        &self,
        stream: &StreamName,
        group: &GroupName,
        expected: u64,
        changes: Vec<Change>,
    ) -> Result<QueuedCommit, EngineError> {
        self.shared.usable()?;
        let json = record::changes_bin(&changes).map_err(encode_error)?;
        let key = (stream.clone(), group.clone());
        let mut order = self.shared.groups.order.lock().await;
        let Some(reserved) = order.get_mut(&key) else {
            return Ok(QueuedCommit::Conflict);
        };
        if reserved.version != expected {
            return Ok(QueuedCommit::Conflict);
        }
        let bytes = reserved.bytes + json.len();
        if bytes > MAX_GROUP_BYTES {
            return Err(too_large(stream, group, bytes));
        }
        let version = expected + 1;
        let mut frames = Vec::with_capacity(json.len() + 64);
        record::encode_group_commit(&mut frames, stream, group, reserved.id, version, &json);
        let apply = GroupApply::Commit {
            stream: stream.clone(),
            group: group.clone(),
            expected,
            changes,
        };
        let done = self.write(frames, Vec::new(), Some(apply)).await;
        if done.is_ok() {
            reserved.version = version;
            reserved.bytes = bytes;
        }
        drop(order);
        let done = done?;
        Ok(QueuedCommit::Queued {
            version,
            durable: Box::pin(done.wait()),
        })
    }

    async fn compact_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        version: u64,
        snapshot: &GroupSnapshot,
    ) -> Result<Committed, EngineError> {
        self.shared.usable()?;
        if snapshot.stream != *stream || snapshot.group != *group {
            return Err(EngineError::internal(format!(
                "a compaction of group {group} of stream {stream} carries the snapshot of group {} of stream {}",
                snapshot.group, snapshot.stream
            )));
        }
        let json = record::snapshot_json(snapshot).map_err(encode_error)?;
        if json.len() > MAX_GROUP_BYTES {
            return Err(too_large(stream, group, json.len()));
        }
        let mut frames = Vec::with_capacity(json.len() + 32);
        record::encode_group_put(&mut frames, version, &json, record::NO_CHANGES);
        let key = (stream.clone(), group.clone());
        let mut order = self.shared.groups.order.lock().await;
        let Some(reserved) = order.get_mut(&key) else {
            return Ok(Committed::Conflict);
        };
        if reserved.version != version || reserved.id != snapshot.id {
            return Ok(Committed::Conflict);
        }
        let apply = GroupApply::Put(Box::new(StoredGroup {
            snapshot: snapshot.clone(),
            changes: Vec::new(),
            version,
        }));
        let done = self.write(frames, Vec::new(), Some(apply)).await;
        if done.is_ok() {
            reserved.bytes = json.len();
        }
        drop(order);
        done?.wait().await?;
        Ok(Committed::Done { version })
    }

    async fn delete_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<bool, EngineError> {
        self.shared.usable()?;
        let key = (stream.clone(), group.clone());
        let mut order = self.shared.groups.order.lock().await;
        if !order.contains_key(&key) {
            return Ok(false);
        }
        let mut frames = Vec::new();
        record::encode_group_deleted(&mut frames, stream, group);
        let apply = GroupApply::Delete {
            stream: stream.clone(),
            group: group.clone(),
        };
        let done = self.write(frames, Vec::new(), Some(apply)).await;
        if done.is_ok() {
            order.remove(&key);
        }
        drop(order);
        done?.wait().await?;
        Ok(true)
    }
}

/// Rebuilds groups from their records, in WAL order.
#[derive(Default)]
pub(crate) struct GroupRecovery {
    groups: HashMap<Key, StoredGroup>,
    /// Commits that did not follow their group's version (never written so by this engine;
    /// possible only if records were lost): skipped, and so is every later one of that group
    /// until a `GroupPut` restates it. The group comes back at the version before the gap.
    skipped: Vec<(Key, u64)>,
    /// The segment being read, and the groups put in it so far (before its `SnapshotEnd`:
    /// the groups its snapshot restates).
    segment: u64,
    put: HashSet<Key>,
}

impl GroupRecovery {
    fn enter(&mut self, segment: u64) {
        if segment != self.segment {
            self.segment = segment;
            self.put.clear();
        }
    }

    pub(crate) fn put(
        &mut self,
        segment: u64,
        version: u64,
        snapshot: Box<GroupSnapshot>,
        changes: Vec<Change>,
    ) {
        let snapshot = *snapshot;
        self.enter(segment);
        let key = (snapshot.stream.clone(), snapshot.group.clone());
        self.put.insert(key.clone());
        self.groups.insert(
            key,
            StoredGroup {
                snapshot,
                changes,
                version,
            },
        );
    }

    pub(crate) fn commit(
        &mut self,
        stream: StreamName,
        group: GroupName,
        id: GroupId,
        version: u64,
        changes: Vec<Change>,
    ) {
        let key = (stream, group);
        match self.groups.get_mut(&key) {
            Some(g) if g.snapshot.id == id && version == g.version + 1 => {
                g.changes.extend(changes);
                g.version = version;
            }
            // Already in the group's snapshot.
            Some(g) if g.snapshot.id == id && version <= g.version => {}
            _ => self.skipped.push((key, version)),
        }
    }

    pub(crate) fn delete(&mut self, stream: StreamName, group: GroupName) {
        self.groups.remove(&(stream, group));
    }

    /// A segment's snapshot is complete: the groups are exactly those it restated (one
    /// deleted in a segment that is gone since is dropped here).
    pub(crate) fn snapshot_end(&mut self, segment: u64) {
        self.enter(segment);
        let put = std::mem::take(&mut self.put);
        self.groups.retain(|key, _| put.contains(key));
    }

    /// The groups rebuilt; a commit that could not be applied is logged (a group never comes
    /// back half-applied: at worst at an older version, whose unacked messages are delivered
    /// again).
    pub(crate) fn finish(self) -> Vec<StoredGroup> {
        for ((stream, group), version) in &self.skipped {
            let at = self
                .groups
                .get(&(stream.clone(), group.clone()))
                .map(|g| g.version);
            tracing::warn!(
                %stream, %group, commit = version, recovered_at = ?at,
                "a consumer group commit in the WAL does not follow its group's version (records were lost); the group comes back as it was before it"
            );
        }
        self.groups.into_values().collect()
    }
}
