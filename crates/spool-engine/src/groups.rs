//! Consumer groups kept in memory: the [`GroupStore`] of the memory engine, and the index the
//! disk engine keeps of what its files hold.
//!
//! A group is its snapshot and the changes committed since ([`StoredGroup`]); a commit names
//! the version it was computed against and is refused (`Conflict`) otherwise, as every
//! engine's store does. The table holds at most `max` groups (`--max-groups`); what one group
//! holds is bounded by its state machine (`spool_core::group`: entries and members) and by the
//! server compacting its changes into a new snapshot.

use std::collections::BTreeMap;

use parking_lot::Mutex;
use spool_core::{
    StreamName,
    group::{Change, GroupName, GroupSnapshot},
};

use crate::{
    EngineError, Limit,
    store::{Committed, StoredGroup},
};

/// The default of the most groups an engine keeps (`--max-groups`).
pub const MAX_GROUPS: usize = 10_000;

/// `Internal` unless `snapshot` is of `group` on `stream`: a store's check before it compacts
/// the group with it (a mix-up is a bug in the caller, refused before anything is written).
pub fn check_compaction(
    stream: &StreamName,
    group: &GroupName,
    snapshot: &GroupSnapshot,
) -> Result<(), EngineError> {
    if (&snapshot.stream, &snapshot.group) != (stream, group) {
        return Err(EngineError::internal(format!(
            "a snapshot of group {:?} on {:?} was given to compact group {group:?} on \
             {stream:?}",
            snapshot.group, snapshot.stream
        )));
    }
    Ok(())
}

/// Groups in memory, by stream then name.
pub struct GroupTable {
    groups: Mutex<BTreeMap<(StreamName, GroupName), StoredGroup>>,
    max: usize,
}

impl Default for GroupTable {
    fn default() -> Self {
        Self::new(MAX_GROUPS)
    }
}

impl GroupTable {
    /// Keeps at most `max` groups.
    pub fn new(max: usize) -> Self {
        Self {
            groups: Mutex::new(BTreeMap::new()),
            max,
        }
    }

    pub fn len(&self) -> usize {
        self.groups.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `create` would be refused for the bound (the group does not exist and the table
    /// is full). The disk engine asks before it writes a creation.
    pub fn full_for(&self, stream: &StreamName, group: &GroupName) -> bool {
        let groups = self.groups.lock();
        groups.len() >= self.max && !groups.contains_key(&(stream.clone(), group.clone()))
    }

    pub fn create(&self, snapshot: &GroupSnapshot) -> Result<bool, EngineError> {
        let mut groups = self.groups.lock();
        let key = (snapshot.stream.clone(), snapshot.group.clone());
        if groups.contains_key(&key) {
            return Ok(false);
        }
        if groups.len() >= self.max {
            return Err(EngineError::Limit(Limit::Groups { max: self.max }));
        }
        groups.insert(
            key,
            StoredGroup {
                snapshot: snapshot.clone(),
                changes: Vec::new(),
                version: 0,
            },
        );
        Ok(true)
    }

    /// Puts a group as recovered from disk, whatever the bound (it was within it when written).
    pub fn restore(&self, group: StoredGroup) {
        let key = (group.snapshot.stream.clone(), group.snapshot.group.clone());
        self.groups.lock().insert(key, group);
    }

    pub fn load(&self, stream: &StreamName, group: &GroupName) -> Option<StoredGroup> {
        self.groups
            .lock()
            .get(&(stream.clone(), group.clone()))
            .cloned()
    }

    /// The version the group is at, if it exists.
    pub fn version(&self, stream: &StreamName, group: &GroupName) -> Option<u64> {
        self.groups
            .lock()
            .get(&(stream.clone(), group.clone()))
            .map(|g| g.version)
    }

    pub fn list(&self, stream: Option<&StreamName>) -> Vec<(StreamName, GroupName)> {
        self.groups
            .lock()
            .keys()
            .filter(|(s, _)| stream.is_none_or(|want| want == s))
            .cloned()
            .collect()
    }

    pub fn commit(
        &self,
        stream: &StreamName,
        group: &GroupName,
        expected: u64,
        changes: &[Change],
    ) -> Committed {
        let mut groups = self.groups.lock();
        match groups.get_mut(&(stream.clone(), group.clone())) {
            Some(g) if g.version == expected => {
                g.changes.extend_from_slice(changes);
                g.version += 1;
                Committed::Done { version: g.version }
            }
            _ => Committed::Conflict,
        }
    }

    pub fn compact(
        &self,
        stream: &StreamName,
        group: &GroupName,
        version: u64,
        snapshot: &GroupSnapshot,
    ) -> Committed {
        let mut groups = self.groups.lock();
        match groups.get_mut(&(stream.clone(), group.clone())) {
            Some(g) if g.version == version && g.snapshot.id == snapshot.id => {
                g.snapshot = snapshot.clone();
                g.changes.clear();
                Committed::Done { version }
            }
            _ => Committed::Conflict,
        }
    }

    pub fn delete(&self, stream: &StreamName, group: &GroupName) -> bool {
        self.groups
            .lock()
            .remove(&(stream.clone(), group.clone()))
            .is_some()
    }
}
