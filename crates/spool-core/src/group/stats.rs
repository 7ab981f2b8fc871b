//! A group's stats (SPEC §7): how much is waiting, how much is out, how old the oldest
//! unfinished message is, the totals, and per member what it holds and how it fails.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    continuity::StreamState,
    group::{
        entry::EntryState,
        name::MemberName,
        state::{GroupReset, GroupState},
    },
    position::Position,
};

/// One group's stats at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupStats {
    /// Messages not handed out yet: in the stream beyond the cursor, plus those taken but
    /// never delivered (waiting behind their key).
    pub pending: u64,
    /// Messages leased now.
    pub in_flight: u64,
    /// The age of the oldest message not yet finished (pending, leased or due again); 0 when
    /// there is none.
    pub oldest_age_ms: u64,
    pub acked: u64,
    pub redelivered: u64,
    pub dead_lettered: u64,
    pub expired: u64,
    pub resets: u64,
    pub cursor: Position,
    pub last_reset: Option<GroupReset>,
    pub members: Vec<MemberStats>,
}

/// One member's stats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemberStats {
    pub consumer: MemberName,
    /// Its latest receive, ms since the Unix epoch (0: not known — forgotten, or only seen
    /// holding a lease).
    pub last_seen_ms: u64,
    pub in_flight: u64,
    pub nacks: u64,
    /// Leases it let run out.
    pub timeouts: u64,
}

impl GroupState {
    /// The stats against `stream`'s current state. `next_time_ms` is the publish time of the
    /// first message after the cursor, if the caller has it (for `oldest_age_ms` when the
    /// oldest unfinished message is still in the stream).
    pub fn stats(
        &self,
        stream: &StreamState,
        next_time_ms: Option<u64>,
        now_ms: u64,
    ) -> GroupStats {
        let retained_from = stream.oldest.0.saturating_sub(1);
        let beyond = if stream.epoch == self.cursor.epoch {
            stream
                .head
                .0
                .saturating_sub(self.cursor.offset.0.max(retained_from))
        } else {
            // The next receive resets to the oldest retained message.
            stream.head.0.saturating_sub(retained_from)
        };
        let waiting = self.entries.values().filter(|e| e.deliveries == 0).count() as u64;
        let mut members: BTreeMap<MemberName, MemberStats> = self
            .members
            .iter()
            .map(|(name, r)| {
                let stats = MemberStats {
                    consumer: name.clone(),
                    last_seen_ms: r.last_seen_ms,
                    in_flight: 0,
                    nacks: r.nacks,
                    timeouts: r.timeouts,
                };
                (name.clone(), stats)
            })
            .collect();
        let mut in_flight = 0;
        for entry in self.entries.values() {
            if let EntryState::Leased {
                member, until_ms, ..
            } = &entry.state
                && *until_ms > now_ms
            {
                in_flight += 1;
                members
                    .entry(member.clone())
                    .or_insert_with(|| MemberStats {
                        consumer: member.clone(),
                        last_seen_ms: 0,
                        in_flight: 0,
                        nacks: 0,
                        timeouts: 0,
                    })
                    .in_flight += 1;
            }
        }
        let oldest_in_group = self.entries.values().map(|e| e.time_ms).min();
        let oldest_in_stream = next_time_ms.filter(|_| beyond > 0);
        let oldest = oldest_in_group.into_iter().chain(oldest_in_stream).min();
        GroupStats {
            pending: beyond + waiting,
            in_flight,
            oldest_age_ms: oldest.map_or(0, |t| now_ms.saturating_sub(t)),
            acked: self.counters.acked,
            redelivered: self.counters.redelivered,
            dead_lettered: self.counters.dead_lettered,
            expired: self.counters.expired,
            resets: self.counters.resets,
            cursor: self.cursor.clone(),
            last_reset: self.last_reset.clone(),
            members: members.into_values().collect(),
        }
    }
}
