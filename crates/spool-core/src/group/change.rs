//! The durability contract: every mutating operation returns an [`Outcome`] — its answer, the
//! [`Change`] records that bring a stored copy of the group to the new state, and the dead
//! letters to publish. The engine stores the changes (appends them to its log, runs them as one
//! script, writes them to KV) atomically, and only then answers; replaying them with
//! [`GroupState::apply`](crate::group::GroupState::apply) over the snapshot they followed
//! rebuilds exactly the live state.
//!
//! Changes carry absolute values (an entry's whole state, the counters' new totals), never
//! deltas, so applying one twice is harmless: an engine that cannot tell whether a change made
//! it to disk before a crash may replay it again.

use serde::{Deserialize, Serialize};

use crate::{
    group::{
        config::GroupConfig,
        dead::DeadLetter,
        entry::Entry,
        name::{MemberName, stream_name_serde},
        state::{Counters, GroupReset, MemberRecord},
    },
    name::StreamName,
    position::{Offset, Position},
};

/// One step of a group's durable state. Serialized as JSON objects tagged by `change`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// Every message up to `cursor` has been taken into the group; `head` is the stream's head
    /// as seen then.
    CursorMoved {
        cursor: Position,
        #[serde(with = "offset_serde")]
        head: Offset,
    },
    /// An unfinished message's entry, whole (created or replaced).
    EntryPut {
        #[serde(with = "offset_serde")]
        offset: Offset,
        entry: Entry,
    },
    /// A message finished (acked, dead-lettered) or lost to a reset.
    EntryRemoved {
        #[serde(with = "offset_serde")]
        offset: Offset,
    },
    /// The counters' new totals.
    CountersSet { counters: Counters },
    /// A member's record, whole.
    MemberPut {
        member: MemberName,
        record: MemberRecord,
    },
    /// A member forgotten (the least recently seen one, when the member table is full).
    MemberRemoved { member: MemberName },
    /// The latest reset of the group.
    ResetRecorded { reset: GroupReset },
    /// New settings and the dead-letter stream they resolve to.
    ConfigSet {
        config: GroupConfig,
        #[serde(with = "stream_name_serde")]
        dead_letter: StreamName,
    },
}

/// What a mutating operation returns. `#[must_use]`: dropping the changes would answer a client
/// with a state the store does not have.
///
/// The caller, in this order:
/// 1. appends [`dead_letters`](Self::dead_letters) to their streams (each with its idempotency
///    key, so doing it again after a crash appends nothing twice);
/// 2. stores [`changes`](Self::changes) atomically (nothing to store when empty);
/// 3. answers with [`value`](Self::value).
///
/// If step 1 or 2 fails, the operation's effect on the in-memory state must not survive: the
/// caller drops this `GroupState` and loads it again from its store (snapshot and changes).
/// A message is never lost that way: at worst it is delivered or dead-lettered again
/// (at-least-once).
#[must_use]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome<T> {
    pub value: T,
    pub changes: Vec<Change>,
    pub dead_letters: Vec<DeadLetter>,
}

impl<T> Outcome<T> {
    /// Whether the store has nothing to do.
    pub fn is_noop(&self) -> bool {
        self.changes.is_empty() && self.dead_letters.is_empty()
    }
}

pub(crate) mod offset_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::position::Offset;

    pub fn serialize<S: Serializer>(o: &Offset, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(o.0)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Offset, D::Error> {
        u64::deserialize(d).map(Offset)
    }
}
