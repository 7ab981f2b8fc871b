//! Session records (SPEC §3): opaque bytes under an unguessable id, kept until they expire.
//!
//! The server decides what a session holds (identity, subscriptions, positions: cursors, never
//! messages) and when to save it (batched, not once per message); an engine only keeps the
//! records, each with the **holder** that wrote it last (one connection's hold of the
//! session), so that a connection whose session was taken over — on this node or another —
//! cannot overwrite the record its successor saved: a save names its holder and is refused
//! when another holder wrote the record since (see [`SessionRecord`]). [`SessionTable`] is the
//! in-memory keeper of the memory engine; the disk engine keeps them in a `redb` file beside
//! its log (`spool_disk::sessions::SessionFile`), with the same bound ([`MAX_SESSIONS`]) and
//! the same answer at it ([`refused`]).

use std::collections::HashMap;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::EngineError;

/// One session to save.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub data: Bytes,
    /// When the record may be forgotten, in ms since the Unix epoch.
    pub expires_at: u64,
    /// Who writes it: one hold of the session by a connection (random, chosen by the server
    /// when the connection creates or resumes the session).
    pub holder: u64,
    /// The hold starts here (a resume taking the session over): the record is replaced
    /// whoever wrote it. Otherwise the save is refused, and nothing written, when the stored
    /// record (unexpired) was written by another holder: the session was taken over since, and
    /// this writer's state is older than the record's.
    pub take_over: bool,
}

impl SessionRecord {
    /// Whether this record may replace a stored one written by `stored_holder`.
    pub fn may_replace(&self, stored_holder: u64) -> bool {
        self.take_over || stored_holder == self.holder
    }
}

/// The default of the most sessions an engine keeps (`--max-sessions`).
pub const MAX_SESSIONS: usize = 1_000_000;

/// What a save at the limit answers: every session already stored was saved, the new ones
/// past the limit were not (their clients get `session_not_restored` if they try to resume).
/// `max` is the limit, `refused` how many new sessions of the batch were not saved.
pub fn refused(max: usize, refused: usize) -> EngineError {
    EngineError::Limit(crate::Limit::Sessions { max, refused })
}

/// Sessions in memory.
pub struct SessionTable {
    /// Id → (expiry, holder, data).
    records: Mutex<HashMap<String, (u64, u64, Bytes)>>,
    max: usize,
}

impl Default for SessionTable {
    fn default() -> Self {
        Self::new(MAX_SESSIONS)
    }
}

impl SessionTable {
    /// Keeps at most `max` sessions.
    pub fn new(max: usize) -> Self {
        Self {
            records: Mutex::new(HashMap::new()),
            max,
        }
    }

    /// Saves `sessions`; answers the ids of those refused because another holder wrote them
    /// since ([`SessionRecord::take_over`]). At the limit (once expired records are purged)
    /// only new sessions are refused — the rest of the batch is saved — and the answer is
    /// `Limit`.
    pub fn save(&self, sessions: Vec<SessionRecord>, now: u64) -> Result<Vec<String>, EngineError> {
        let mut records = self.records.lock();
        let mut purged = false;
        let mut refused_new = 0;
        let mut superseded = Vec::new();
        for s in sessions {
            if let Some((expires_at, holder, _)) = records.get(&s.id)
                && *expires_at > now
                && !s.may_replace(*holder)
            {
                superseded.push(s.id);
                continue;
            }
            if !records.contains_key(&s.id) && records.len() >= self.max {
                if !purged {
                    records.retain(|_, (expires_at, _, _)| *expires_at > now);
                    purged = true;
                }
                if records.len() >= self.max {
                    refused_new += 1;
                    continue;
                }
            }
            records.insert(s.id, (s.expires_at, s.holder, s.data));
        }
        match refused_new {
            0 => Ok(superseded),
            n => Err(refused(self.max, n)),
        }
    }

    /// The record of session `id`, unless it is unknown or expired at `now`.
    pub fn load(&self, id: &str, now: u64) -> Option<Bytes> {
        let records = self.records.lock();
        match records.get(id) {
            Some((expires_at, _, data)) if *expires_at > now => Some(data.clone()),
            _ => None,
        }
    }

    /// Forgets session `id`.
    pub fn delete(&self, id: &str) {
        self.records.lock().remove(id);
    }

    /// Forgets every record expired at `now`.
    pub fn expire(&self, now: u64) {
        self.records
            .lock()
            .retain(|_, (expires_at, _, _)| *expires_at > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::session_record as record;

    #[test]
    fn table_keeps_until_expiry() {
        let t = SessionTable::default();
        t.save(vec![record("a", 100), record("b", 200)], 0).unwrap();
        assert_eq!(t.load("a", 50).unwrap(), "data of a");
        assert!(t.load("a", 100).is_none());
        t.expire(150);
        assert!(t.load("b", 150).is_some());
        t.delete("b");
        assert!(t.load("b", 150).is_none());
    }

    #[test]
    fn a_record_taken_over_refuses_its_old_holder() {
        let t = SessionTable::default();
        let held = |holder, take_over, data: &'static str| SessionRecord {
            holder,
            take_over,
            data: Bytes::from_static(data.as_bytes()),
            ..record("a", 100)
        };
        assert!(t.save(vec![held(1, false, "1")], 0).unwrap().is_empty());
        assert!(t.save(vec![held(2, true, "2")], 0).unwrap().is_empty());
        assert_eq!(t.save(vec![held(1, false, "old")], 0).unwrap(), ["a"]);
        assert_eq!(t.load("a", 0).unwrap(), "2");
        assert!(t.save(vec![held(2, false, "3")], 0).unwrap().is_empty());
        assert_eq!(t.load("a", 0).unwrap(), "3");
        // An expired record is no one's.
        assert!(t.save(vec![held(1, false, "4")], 100).unwrap().is_empty());
    }
}
