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

/// The most sessions an engine keeps; past it, saving a new session fails (`Limit`).
pub const MAX_SESSIONS: usize = 1_000_000;

/// Sessions in memory.
#[derive(Default)]
pub struct SessionTable {
    records: Mutex<HashMap<String, (u64, Bytes)>>,
}

impl SessionTable {
    pub fn save(&self, sessions: Vec<SessionRecord>, now: u64) -> Result<(), EngineError> {
        let mut records = self.records.lock();
        let new = sessions
            .iter()
            .filter(|s| !records.contains_key(&s.id))
            .count();
        if records.len() + new > MAX_SESSIONS {
            records.retain(|_, (expires_at, _)| *expires_at > now);
            if records.len() + new > MAX_SESSIONS {
                return Err(EngineError::Limit(format!(
                    "{MAX_SESSIONS} sessions are stored; no room for {new} more"
                )));
            }
        }
        for s in sessions {
            records.insert(s.id, (s.expires_at, s.data));
        }
        Ok(())
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
}

impl SessionFile {
    /// Opens (or creates) the file. Every page's checksum is verified first, so a file damaged
    /// outside redb fails here with an error (`spool repair` moves it aside) instead of
    /// panicking later; the check reads the whole file once.
    pub fn open(path: &Path) -> Result<Self, redb::Error> {
        let db = Database::builder()
            .set_check_integrity_on_open(true)
            .create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(SESSIONS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    /// Whether the file at `path` opens and every record reads back: `Ok(Err(why))` when it
    /// is damaged, `Err` when it cannot be read at all (permissions, a failing disk).
    /// Opening commits (redb's integrity check), so run it on a copy to change nothing.
    pub fn check(path: &Path) -> std::io::Result<Result<(), String>> {
        let run = || -> Result<(), redb::Error> {
            let file = Self::open(path)?;
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

    pub fn save(&self, sessions: &[SessionRecord]) -> Result<(), EngineError> {
        let run = || -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            {
                let mut table = txn.open_table(SESSIONS)?;
                let mut value = Vec::new();
                for s in sessions {
                    value.clear();
                    value.extend_from_slice(&s.expires_at.to_be_bytes());
                    value.extend_from_slice(&s.data);
                    table.insert(s.id.as_str(), value.as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        };
        run().map_err(|e| EngineError::Unavailable(format!("cannot save sessions: {e}")))
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
            let f = SessionFile::open(&path).unwrap();
            f.save(&[record("a", 100), record("b", 200)]).unwrap();
            f.save(&[record("a", 300)]).unwrap();
        }
        let f = SessionFile::open(&path).unwrap();
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
        SessionFile::open(&path)
            .unwrap()
            .save(&[record("a", u64::MAX)])
            .unwrap();
        assert_eq!(SessionFile::check(&path).unwrap(), Ok(()));
        std::fs::write(&path, b"not a database at all").unwrap();
        assert!(SessionFile::check(&path).unwrap().is_err());
        assert!(damage(SessionFile::open(&path).err().unwrap()).is_ok());
    }
}
