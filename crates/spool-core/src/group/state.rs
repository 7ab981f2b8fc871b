//! [`GroupState`]: the durable state of one consumer group on one stream, and how it is
//! stored — a [`GroupSnapshot`] plus the [`Change`]s since, replayed by [`GroupState::apply`].
//!
//! The operations (receive, ack, nack, extend, terminate, expire) are in `receive.rs` and
//! `settle.rs`; every mutation they make goes through `apply`, so the live state and a state
//! rebuilt from the store cannot drift apart.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    continuity::{Decision, ResetReason, StreamState, decide},
    group::{
        change::{Change, offset_serde},
        config::{GroupConfig, GroupConfigError},
        entry::{Entry, EntryState},
        name::{GroupName, MemberName, stream_name_serde},
        receipt::GroupId,
    },
    name::StreamName,
    position::{Offset, Position},
};

/// The most members a group remembers stats for. A new member beyond it makes the group
/// forget the least recently seen one (its leases stay valid; only its stats go).
pub const MAX_MEMBERS: usize = 1024;

/// A member's last-seen time is stored at most this often (ms), so members polling an idle
/// group do not each cost a write per poll.
pub const LAST_SEEN_RESOLUTION_MS: u64 = 1000;

/// The group's totals since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Counters {
    /// Messages acked.
    pub acked: u64,
    /// Deliveries after the first (a message delivered 3 times counts 2).
    pub redelivered: u64,
    /// Messages sent to the dead-letter stream.
    pub dead_lettered: u64,
    /// Messages lost before the group finished them: removed by retention, or gone with an
    /// epoch change.
    pub expired: u64,
    /// Resets recorded.
    pub resets: u64,
}

/// What the group keeps about one member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Its latest receive (to [`LAST_SEEN_RESOLUTION_MS`]).
    pub last_seen_ms: u64,
    /// Messages it nacked.
    pub nacks: u64,
    /// Leases it let run out.
    pub timeouts: u64,
}

/// A loss of continuity the group recorded (SPEC §7: never silent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReset {
    #[serde(with = "reason_serde")]
    pub reason: ResetReason,
    /// Messages lost: unfinished ones the group held, plus those it knew existed beyond its
    /// cursor. After an epoch change this is a lower bound: the group cannot know how many
    /// messages the lost history had grown to since it last looked.
    pub lost: u64,
    pub at_ms: u64,
    /// The cursor before and after.
    pub from: Position,
    pub to: Position,
}

/// The durable state of one group on one stream. See the module docs of [`crate::group`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupState {
    pub(crate) id: GroupId,
    pub(crate) stream: StreamName,
    pub(crate) name: GroupName,
    pub(crate) config: GroupConfig,
    pub(crate) dead_letter: StreamName,
    pub(crate) created_ms: u64,
    pub(crate) cursor: Position,
    pub(crate) head_seen: Offset,
    pub(crate) entries: BTreeMap<Offset, Entry>,
    pub(crate) counters: Counters,
    pub(crate) members: BTreeMap<MemberName, MemberRecord>,
    pub(crate) last_reset: Option<GroupReset>,
    pub(crate) index: Index,
}

/// Derived from `entries`, never stored: what receive and expiry look up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Index {
    /// Entries not leased (waiting or visible now or later), in offset order.
    pub unleased: BTreeSet<Offset>,
    /// Leased entries by the end of their lease.
    pub deadlines: BTreeSet<(u64, Offset)>,
    /// Unfinished entries per key, in offset order: the first is the only one that may be
    /// leased under key ordering.
    pub keys: HashMap<String, BTreeSet<Offset>>,
}

impl Index {
    fn insert(&mut self, offset: Offset, entry: &Entry) {
        match &entry.state {
            EntryState::Leased { until_ms, .. } => {
                self.deadlines.insert((*until_ms, offset));
            }
            _ => {
                self.unleased.insert(offset);
            }
        }
        if let Some(key) = &entry.key {
            self.keys.entry(key.clone()).or_default().insert(offset);
        }
    }

    fn remove(&mut self, offset: Offset, entry: &Entry) {
        match &entry.state {
            EntryState::Leased { until_ms, .. } => {
                self.deadlines.remove(&(*until_ms, offset));
            }
            _ => {
                self.unleased.remove(&offset);
            }
        }
        if let Some(key) = &entry.key
            && let Some(set) = self.keys.get_mut(key)
        {
            set.remove(&offset);
            if set.is_empty() {
                self.keys.remove(key);
            }
        }
    }
}

impl GroupState {
    /// A new group on `stream`, starting per `config.start` against the stream as it is now
    /// (`StreamState::empty` of the engine's placeholder epoch for a stream never published
    /// to). A start position the stream cannot honour (another epoch, expired history) is
    /// taken as given: the first receive records the reset, as for any later loss.
    ///
    /// The caller stores [`snapshot`](Self::snapshot) as the group's first record.
    pub fn new(
        stream: StreamName,
        name: GroupName,
        config: GroupConfig,
        at: &StreamState,
        now_ms: u64,
    ) -> Result<Self, GroupConfigError> {
        config.validate()?;
        let dead_letter = config.dead_letter_for(&stream, &name)?;
        let cursor = match decide(&config.start, at) {
            Decision::Deliver { after } => Position::new(at.epoch.clone(), after),
            // Only a position can be reset; keep it for the first receive to judge.
            Decision::Reset { .. } => match &config.start {
                crate::continuity::Start::After(p) => p.clone(),
                _ => Position::new(at.epoch.clone(), at.head),
            },
        };
        Ok(GroupState {
            id: GroupId::generate(),
            stream,
            name,
            config,
            dead_letter,
            created_ms: now_ms,
            cursor,
            head_seen: at.head,
            entries: BTreeMap::new(),
            counters: Counters::default(),
            members: BTreeMap::new(),
            last_reset: None,
            index: Index::default(),
        })
    }

    pub fn id(&self) -> GroupId {
        self.id
    }

    pub fn stream(&self) -> &StreamName {
        &self.stream
    }

    pub fn name(&self) -> &GroupName {
        &self.name
    }

    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    /// The dead-letter stream.
    pub fn dead_letter(&self) -> &StreamName {
        &self.dead_letter
    }

    pub fn created_ms(&self) -> u64 {
        self.created_ms
    }

    /// Every message up to here has been taken into the group.
    pub fn cursor(&self) -> &Position {
        &self.cursor
    }

    /// The unfinished messages, in offset order.
    pub fn entries(&self) -> impl Iterator<Item = (Offset, &Entry)> {
        self.entries.iter().map(|(o, e)| (*o, e))
    }

    pub fn entry(&self, offset: Offset) -> Option<&Entry> {
        self.entries.get(&offset)
    }

    /// How many messages are leased (live or run out but not yet reclaimed).
    pub fn leased(&self) -> usize {
        self.index.deadlines.len()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn members(&self) -> impl Iterator<Item = (&MemberName, &MemberRecord)> {
        self.members.iter()
    }

    pub fn last_reset(&self) -> Option<&GroupReset> {
        self.last_reset.as_ref()
    }

    /// The most entries the group holds: `max_in_flight` leased plus as many again of
    /// look-ahead (messages waiting behind their key, or for a nack delay or backoff).
    pub fn max_entries(&self) -> usize {
        2 * self.config.max_in_flight as usize
    }

    /// New settings. `start` only matters at creation, so the stored one is kept. Lowering
    /// `max_in_flight` revokes no lease: the group just leases nothing more until it is below
    /// the new bound; a new `ordering` applies to leases from now on.
    pub fn update_config(
        &mut self,
        mut config: GroupConfig,
    ) -> Result<crate::group::Outcome<()>, GroupConfigError> {
        config.validate()?;
        let dead_letter = config.dead_letter_for(&self.stream, &self.name)?;
        config.start = self.config.start.clone();
        let mut changes = Vec::new();
        if config != self.config || dead_letter != self.dead_letter {
            let change = Change::ConfigSet {
                config,
                dead_letter,
            };
            self.apply(&change);
            changes.push(change);
        }
        Ok(crate::group::Outcome {
            value: (),
            changes,
            dead_letters: Vec::new(),
        })
    }

    /// Applies one stored change. Idempotent, and never fails: a change the state does not
    /// expect (e.g. removing an entry already gone) is simply applied as far as it goes.
    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::CursorMoved { cursor, head } => {
                self.cursor = cursor.clone();
                self.head_seen = *head;
            }
            Change::EntryPut { offset, entry } => {
                if let Some(old) = self.entries.remove(offset) {
                    self.index.remove(*offset, &old);
                }
                self.index.insert(*offset, entry);
                self.entries.insert(*offset, entry.clone());
            }
            Change::EntryRemoved { offset } => {
                if let Some(old) = self.entries.remove(offset) {
                    self.index.remove(*offset, &old);
                }
            }
            Change::CountersSet { counters } => self.counters = *counters,
            Change::MemberPut { member, record } => {
                self.members.insert(member.clone(), record.clone());
            }
            Change::MemberRemoved { member } => {
                self.members.remove(member);
            }
            Change::ResetRecorded { reset } => self.last_reset = Some(reset.clone()),
            Change::ConfigSet {
                config,
                dead_letter,
            } => {
                self.config = config.clone();
                self.dead_letter = dead_letter.clone();
            }
        }
    }

    /// The whole durable state, to store as a base for later changes.
    pub fn snapshot(&self) -> GroupSnapshot {
        GroupSnapshot {
            version: SNAPSHOT_VERSION,
            id: self.id,
            stream: self.stream.clone(),
            group: self.name.clone(),
            config: self.config.clone(),
            dead_letter: self.dead_letter.clone(),
            created_ms: self.created_ms,
            cursor: self.cursor.clone(),
            head_seen: self.head_seen,
            entries: self
                .entries
                .iter()
                .map(|(o, e)| SnapshotEntry {
                    offset: *o,
                    entry: e.clone(),
                })
                .collect(),
            counters: self.counters,
            members: self.members.clone(),
            last_reset: self.last_reset.clone(),
        }
    }

    /// The state a snapshot holds. Leases come back with their `until_ms`: after a restart they
    /// run out on their own, so members that outlived the restart can still ack what they hold,
    /// and every message nobody acks is delivered again (at-least-once).
    pub fn from_snapshot(snapshot: GroupSnapshot) -> Result<Self, SnapshotError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(snapshot.version));
        }
        let mut entries = BTreeMap::new();
        let mut index = Index::default();
        for SnapshotEntry { offset, entry } in snapshot.entries {
            if offset == Offset::ZERO || offset > snapshot.cursor.offset {
                return Err(SnapshotError::EntryBeyondCursor(offset));
            }
            index.insert(offset, &entry);
            if entries.insert(offset, entry).is_some() {
                return Err(SnapshotError::DuplicateEntry(offset));
            }
        }
        Ok(GroupState {
            id: snapshot.id,
            stream: snapshot.stream,
            name: snapshot.group,
            config: snapshot.config,
            dead_letter: snapshot.dead_letter,
            created_ms: snapshot.created_ms,
            cursor: snapshot.cursor,
            head_seen: snapshot.head_seen,
            entries,
            counters: snapshot.counters,
            members: snapshot.members,
            last_reset: snapshot.last_reset,
            index,
        })
    }
}

const SNAPSHOT_VERSION: u32 = 1;

/// The stored form of a whole [`GroupState`]. Bounded: at most
/// [`GroupState::max_entries`] entries and [`MAX_MEMBERS`] members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSnapshot {
    pub version: u32,
    pub id: GroupId,
    #[serde(with = "stream_name_serde")]
    pub stream: StreamName,
    pub group: GroupName,
    pub config: GroupConfig,
    #[serde(with = "stream_name_serde")]
    pub dead_letter: StreamName,
    pub created_ms: u64,
    pub cursor: Position,
    #[serde(with = "offset_serde")]
    pub head_seen: Offset,
    pub entries: Vec<SnapshotEntry>,
    pub counters: Counters,
    pub members: BTreeMap<MemberName, MemberRecord>,
    pub last_reset: Option<GroupReset>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    #[serde(with = "offset_serde")]
    pub offset: Offset,
    #[serde(flatten)]
    pub entry: Entry,
}

/// Why a stored snapshot cannot be loaded: the store holds something this version did not
/// write. Loading fails closed rather than guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("group snapshot version {0} is not one this server reads (1)")]
    Version(u32),
    #[error("group snapshot holds an entry at offset {0}, beyond its cursor")]
    EntryBeyondCursor(Offset),
    #[error("group snapshot holds offset {0} twice")]
    DuplicateEntry(Offset),
}

mod reason_serde {
    use super::*;

    pub fn serialize<S: Serializer>(r: &ResetReason, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ResetReason, D::Error> {
        let s = String::deserialize(d)?;
        ResetReason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown reset reason {s:?}")))
    }
}
