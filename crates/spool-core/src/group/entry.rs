//! One message the group has taken from its stream and not finished: how often it was
//! delivered, its key (for key ordering), its publish time (for `oldest_age_ms`), and where it
//! stands — waiting for its first delivery, leased to a member, or due to be visible again.

use serde::{Deserialize, Serialize};

use crate::group::{name::MemberName, receipt::LeaseId};

/// An unfinished message of the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Deliveries so far (0 until its first lease).
    pub deliveries: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The message's publish time, ms since the Unix epoch.
    pub time_ms: u64,
    pub state: EntryState,
}

/// Where an unfinished message stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "is", rename_all = "snake_case")]
pub enum EntryState {
    /// Taken but never handed out: with `ordering: "key"`, blocked behind an earlier message
    /// of its key.
    Waiting,
    /// Handed to `member` until `until_ms`; only the receipt naming `lease` settles it.
    Leased {
        lease: LeaseId,
        member: MemberName,
        until_ms: u64,
    },
    /// Delivered before and handed back (nack, or a lease that ran out): visible again from
    /// `at_ms` (after a nack's delay or the group's backoff).
    Visible { at_ms: u64 },
}

impl Entry {
    /// The lease, if the entry is leased.
    pub fn lease(&self) -> Option<(LeaseId, &MemberName, u64)> {
        match &self.state {
            EntryState::Leased {
                lease,
                member,
                until_ms,
            } => Some((*lease, member, *until_ms)),
            _ => None,
        }
    }

    /// Whether the entry may be handed out at `now_ms`, its key aside.
    pub fn is_visible(&self, now_ms: u64) -> bool {
        match self.state {
            EntryState::Waiting => true,
            EntryState::Visible { at_ms } => at_ms <= now_ms,
            EntryState::Leased { .. } => false,
        }
    }
}
