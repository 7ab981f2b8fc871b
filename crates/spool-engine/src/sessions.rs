//! Session records (SPEC §3): opaque bytes under an unguessable id, kept until they expire.
//!
//! The server decides what a session holds (identity, subscriptions, positions: cursors, never
//! messages) and when to save it (batched, not once per message); an engine only keeps the
//! records. [`SessionTable`] is the in-memory keeper of the memory engine; [`SessionFile`]
//! keeps them in a `redb` database beside the disk engine's log, so they survive a restart.

use std::{collections::HashMap, path::Path};

use bytes::Bytes;
use parking_lot::Mutex;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};

use crate::EngineError;

/// One session to save.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub data: Bytes,
    /// When the record may be forgotten, in ms since the Unix epoch.
    pub expires_at: u64,
}

/// The default of the most sessions an engine keeps (`--max-sessions`).
pub const MAX_SESSIONS: usize = 1_000_000;

/// What a save at the limit answers: every session already stored was saved, the new ones
/// past the limit were not (their clients get `session_not_restored` if they try to resume).
fn refused(max: usize, refused: usize) -> EngineError {
    EngineError::Limit(format!(
        "{max} sessions are stored (--max-sessions): {refused} new sessions were not saved \
         (sessions already stored were)"
    ))
}

/// Sessions in memory.
pub struct SessionTable {
    records: Mutex<HashMap<String, (u64, Bytes)>>,
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

    /// Saves `sessions`. At the limit (once expired records are purged) only new sessions
    /// are refused — the rest of the batch is saved — and the answer is `Limit`.
    pub fn save(&self, sessions: Vec<SessionRecord>, now: u64) -> Result<(), EngineError> {
        let mut records = self.records.lock();
        let mut purged = false;
        let mut refused_new = 0;
        for s in sessions {
            if !records.contains_key(&s.id) && records.len() >= self.max {
                if !purged {
                    records.retain(|_, (expires_at, _)| *expires_at > now);
                    purged = true;
                }
                if records.len() >= self.max {
                    refused_new += 1;
                    continue;
                }
            }
            records.insert(s.id, (s.expires_at, s.data));
        }
        match refused_new {
            0 => Ok(()),
            n => Err(refused(self.max, n)),
        }
    }

    pub fn load(&self, id: &str, now: u64) -> Option<Bytes> {
        let records = self.records.lock();
        match records.get(id) {
            Some((expires_at, data)) if *expires_at > now => Some(data.clone()),
            _ => None,
        }
    }

    pub fn delete(&self, id: &str) {
        self.records.lock().remove(id);
    }

    pub fn expire(&self, now: u64) {
        self.records
            .lock()
            .retain(|_, (expires_at, _)| *expires_at > now);
    }
}

/// Table of the session file: id → 8 bytes of expiry (big-endian ms) then the record.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// Sessions in a `redb` file. Every save is one transaction with an fsync; the server batches
/// its saves (one per second or so), so this costs little.
pub struct SessionFile {
    db: Database,
    max: usize,
}

impl SessionFile {
    /// Opens (or creates) the file. Every page's checksum is verified first, so a file damaged
    /// outside redb fails here with an error (`spool repair` moves it aside) instead of
    /// panicking later; the check reads the whole file once.
    /// Keeps at most `max` sessions.
    pub fn open(path: &Path, max: usize) -> Result<Self, redb::Error> {
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(SESSIONS)?;
        txn.commit()?;
        Ok(Self { db, max })
    }

    /// Whether the file at `path` opens and every record reads back: `Ok(Err(why))` when it
    /// is damaged, `Err` when it cannot be read at all (permissions, a failing disk).
    /// Opening commits (redb's integrity check), so run it on a copy to change nothing.
    pub fn check(path: &Path) -> std::io::Result<Result<(), String>> {
        let run = || -> Result<(), redb::Error> {
            let file = Self::open(path, MAX_SESSIONS)?;
            let txn = file.db.begin_read()?;
            let table = txn.open_table(SESSIONS)?;
            for entry in table.iter()? {
                entry?;
            }
            Ok(())
        };
        match std::panic::catch_unwind(run) {
            Ok(Ok(())) => Ok(Ok(())),
            Ok(Err(e)) => damage(e).map(Err),
            Err(_) => Ok(Err("reading it crashed redb".into())),
        }
    }

    /// Saves `sessions` in one transaction. At the limit (once expired records are purged)
    /// only new sessions are refused — the rest of the batch is saved — and the answer is
    /// `Limit`.
    pub fn save(&self, sessions: &[SessionRecord], now: u64) -> Result<(), EngineError> {
        let max = self.max as u64;
        let run = || -> Result<usize, redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            let mut refused_new = 0;
            {
                let mut table = txn.open_table(SESSIONS)?;
                let mut stored = table.len()?;
                let mut purged = false;
                let mut value = Vec::new();
                for s in sessions {
                    if table.get(s.id.as_str())?.is_none() {
                        if stored >= max && !purged {
                            table.retain(|_, v| split(v).is_some_and(|(exp, _)| exp > now))?;
                            stored = table.len()?;
                            purged = true;
                        }
                        if stored >= max {
                            refused_new += 1;
                            continue;
                        }
                        stored += 1;
                    }
                    value.clear();
                    value.extend_from_slice(&s.expires_at.to_be_bytes());
                    value.extend_from_slice(&s.data);
                    table.insert(s.id.as_str(), value.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(refused_new)
        };
        match run() {
            Ok(0) => Ok(()),
            Ok(n) => Err(refused(self.max, n)),
            Err(e) => Err(EngineError::Unavailable(format!(
                "cannot save sessions: {e}"
            ))),
        }
    }

    pub fn load(&self, id: &str, now: u64) -> Result<Option<Bytes>, EngineError> {
        let run = || -> Result<Option<Bytes>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(SESSIONS)?;
            let Some(value) = table.get(id)? else {
                return Ok(None);
            };
            Ok(split(value.value()).and_then(|(expires_at, data)| {
                (expires_at > now).then(|| Bytes::copy_from_slice(data))
            }))
        };
        run().map_err(|e| EngineError::Unavailable(format!("cannot load a session: {e}")))
    }

    pub fn delete(&self, id: &str) -> Result<(), EngineError> {
        let run = || -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            txn.open_table(SESSIONS)?.remove(id)?;
            txn.commit()?;
            Ok(())
        };
        run().map_err(|e| EngineError::Unavailable(format!("cannot delete a session: {e}")))
    }

    /// Deletes expired records; returns how many.
    pub fn expire(&self, now: u64) -> Result<usize, EngineError> {
        let run = || -> Result<usize, redb::Error> {
            let txn = self.db.begin_write()?;
            let removed;
            {
                let mut table = txn.open_table(SESSIONS)?;
                let before = table.len()?;
                table.retain(|_, value| split(value).is_some_and(|(exp, _)| exp > now))?;
                removed = before - table.len()?;
            }
            txn.commit()?;
            Ok(removed as usize)
        };
        run().map_err(|e| EngineError::Unavailable(format!("cannot expire sessions: {e}")))
    }
}

/// What is wrong with a session file that redb refused: `Ok(why)` when the file is damaged
/// (redb reports a file that is not a database as `InvalidData`), `Err` for I/O trouble.
pub fn damage(e: redb::Error) -> std::io::Result<String> {
    match e {
        redb::Error::Io(io) if io.kind() != std::io::ErrorKind::InvalidData => Err(io),
        e => Ok(e.to_string()),
    }
}

fn split(value: &[u8]) -> Option<(u64, &[u8])> {
    let (head, data) = value.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*head), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, expires_at: u64) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            data: Bytes::from(format!("data of {id}")),
            expires_at,
        }
    }

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
    fn file_survives_reopen_and_expires() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        {
            let f = SessionFile::open(&path, 10).unwrap();
            f.save(&[record("a", 100), record("b", 200)], 0).unwrap();
            f.save(&[record("a", 300)], 0).unwrap();
        }
        let f = SessionFile::open(&path, 10).unwrap();
        assert_eq!(f.load("a", 250).unwrap().unwrap(), "data of a");
        assert_eq!(f.expire(250).unwrap(), 1);
        assert!(f.load("b", 0).unwrap().is_none());
        f.delete("a").unwrap();
        assert!(f.load("a", 0).unwrap().is_none());
    }

    #[test]
    fn a_damaged_file_is_reported_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        SessionFile::open(&path, 10)
            .unwrap()
            .save(&[record("a", u64::MAX)], 0)
            .unwrap();
        assert_eq!(SessionFile::check(&path).unwrap(), Ok(()));
        std::fs::write(&path, b"not a database at all").unwrap();
        assert!(SessionFile::check(&path).unwrap().is_err());
        assert!(damage(SessionFile::open(&path, 10).err().unwrap()).is_ok());
    }

    /// At the limit only new sessions are refused: the stored ones in the same batch are
    /// saved, and room made by expiry is used.
    #[test]
    fn the_limit_refuses_only_new_sessions() {
        let dir = tempfile::tempdir().unwrap();
        let file = SessionFile::open(&dir.path().join("sessions.redb"), 2).unwrap();
        let table = SessionTable::new(2);
        let save = |records: Vec<SessionRecord>, now| {
            (table.save(records.clone(), now), file.save(&records, now))
        };
        let (a, b) = save(vec![record("a", 100), record("b", 1000)], 0);
        assert!(a.is_ok() && b.is_ok());
        let updated = SessionRecord {
            data: Bytes::from("a again"),
            ..record("a", 100)
        };
        let (a, b) = save(vec![record("new", 1000), updated.clone()], 0);
        assert!(matches!(a, Err(EngineError::Limit(_))), "{a:?}");
        assert!(matches!(b, Err(EngineError::Limit(_))), "{b:?}");
        assert_eq!(table.load("a", 0).unwrap(), "a again");
        assert_eq!(file.load("a", 0).unwrap().unwrap(), "a again");
        assert!(table.load("new", 0).is_none());
        assert!(file.load("new", 0).unwrap().is_none());
        // "a" has expired by 150: its room goes to the new session.
        let (a, b) = save(vec![record("new", 1000)], 150);
        assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
        assert!(table.load("new", 150).is_some());
        assert!(file.load("new", 150).unwrap().is_some());
    }
}
