//! The disk engine's session records (SPEC §3) in a `redb` file beside its log, so they
//! survive a restart. The in-memory keeper, the default bound and the answer at the bound are
//! the memory engine's (`spool_engine::sessions`), so both engines behave alike.

use std::path::Path;

use bytes::Bytes;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use spool_engine::{
    EngineError, SessionRecord,
    sessions::{MAX_SESSIONS, refused},
};

/// Table of the session file: id → 8 bytes of expiry (big-endian ms), 8 of the holder that
/// wrote it (`SessionRecord::holder`, big-endian), then the record.
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions.held");
/// The table before records named their holder: id → expiry then the record. Its records move
/// to [`SESSIONS`] (holder 0: no connection holds them) when the file is opened.
const LEGACY: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

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
        {
            let mut table = txn.open_table(SESSIONS)?;
            let legacy = txn.open_table(LEGACY)?;
            let mut value = Vec::new();
            for entry in legacy.iter()? {
                let (id, old) = entry?;
                let Some((head, data)) = old.value().split_first_chunk::<8>() else {
                    continue;
                };
                value.clear();
                value.extend_from_slice(head);
                value.extend_from_slice(&0u64.to_be_bytes());
                value.extend_from_slice(data);
                table.insert(id.value(), value.as_slice())?;
            }
        }
        txn.delete_table(LEGACY)?;
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

    /// Saves `sessions` in one transaction (write transactions are serialized: each record's
    /// holder is checked and written in one step); answers the ids refused because another
    /// holder wrote them since (`SessionRecord::take_over`). At the limit (once expired
    /// records are purged) only new sessions are refused — the rest of the batch is saved —
    /// and the answer is `Limit`.
    pub fn save(&self, sessions: &[SessionRecord], now: u64) -> Result<Vec<String>, EngineError> {
        let max = self.max as u64;
        let run = || -> Result<(usize, Vec<String>), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::Immediate)?;
            let mut refused_new = 0;
            let mut superseded = Vec::new();
            {
                let mut table = txn.open_table(SESSIONS)?;
                let mut stored = table.len()?;
                let mut purged = false;
                let mut value = Vec::new();
                for s in sessions {
                    let existing = table
                        .get(s.id.as_str())?
                        .map(|v| split(v.value()).map(|(exp, holder, _)| (exp, holder)));
                    if let Some(Some((expires_at, holder))) = existing
                        && expires_at > now
                        && !s.may_replace(holder)
                    {
                        superseded.push(s.id.clone());
                        continue;
                    }
                    if existing.is_none() {
                        if stored >= max && !purged {
                            table.retain(|_, v| split(v).is_some_and(|(exp, _, _)| exp > now))?;
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
                    value.extend_from_slice(&s.holder.to_be_bytes());
                    value.extend_from_slice(&s.data);
                    table.insert(s.id.as_str(), value.as_slice())?;
                }
            }
            txn.commit()?;
            Ok((refused_new, superseded))
        };
        match run() {
            Ok((0, superseded)) => Ok(superseded),
            Ok((n, _)) => Err(refused(self.max, n)),
            Err(e) => Err(EngineError::unavailable_from("cannot save sessions", e)),
        }
    }

    pub fn load(&self, id: &str, now: u64) -> Result<Option<Bytes>, EngineError> {
        let run = || -> Result<Option<Bytes>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(SESSIONS)?;
            let Some(value) = table.get(id)? else {
                return Ok(None);
            };
            Ok(split(value.value()).and_then(|(expires_at, _, data)| {
                (expires_at > now).then(|| Bytes::copy_from_slice(data))
            }))
        };
        run().map_err(|e| EngineError::unavailable_from("cannot load a session", e))
    }

    pub fn delete(&self, id: &str) -> Result<(), EngineError> {
        let run = || -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            txn.open_table(SESSIONS)?.remove(id)?;
            txn.commit()?;
            Ok(())
        };
        run().map_err(|e| EngineError::unavailable_from("cannot delete a session", e))
    }

    /// Deletes expired records; returns how many.
    pub fn expire(&self, now: u64) -> Result<usize, EngineError> {
        let run = || -> Result<usize, redb::Error> {
            let txn = self.db.begin_write()?;
            let removed;
            {
                let mut table = txn.open_table(SESSIONS)?;
                let before = table.len()?;
                table.retain(|_, value| split(value).is_some_and(|(exp, _, _)| exp > now))?;
                removed = before - table.len()?;
            }
            txn.commit()?;
            Ok(removed as usize)
        };
        run().map_err(|e| EngineError::unavailable_from("cannot expire sessions", e))
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

/// A stored value: (expiry, holder, record).
fn split(value: &[u8]) -> Option<(u64, u64, &[u8])> {
    let (expires_at, rest) = value.split_first_chunk::<8>()?;
    let (holder, data) = rest.split_first_chunk::<8>()?;
    Some((
        u64::from_be_bytes(*expires_at),
        u64::from_be_bytes(*holder),
        data,
    ))
}

#[cfg(test)]
mod tests {
    use spool_engine::{conformance::session_record as record, sessions::SessionTable};

    use super::*;

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

    /// A file written before records named their holder opens with its records (no one's).
    #[test]
    fn records_of_the_older_layout_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(LEGACY).unwrap();
                let mut value = 500u64.to_be_bytes().to_vec();
                value.extend_from_slice(b"old");
                table.insert("a", value.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let f = SessionFile::open(&path, 10).unwrap();
        assert_eq!(f.load("a", 0).unwrap().unwrap(), "old");
        assert!(f.load("a", 500).unwrap().is_none());
        let taken = SessionRecord {
            holder: 7,
            take_over: true,
            ..record("a", 600)
        };
        assert!(f.save(&[taken], 0).unwrap().is_empty());
        let stale = SessionRecord {
            holder: 0,
            ..record("a", 600)
        };
        assert_eq!(f.save(&[stale], 0).unwrap(), ["a"]);
        drop(f);
        let f = SessionFile::open(&path, 10).unwrap();
        assert_eq!(f.load("a", 0).unwrap().unwrap(), "data of a");
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
        assert!(
            matches!(
                a,
                Err(EngineError::Limit(spool_engine::Limit::Sessions { .. }))
            ),
            "{a:?}"
        );
        assert!(
            matches!(
                b,
                Err(EngineError::Limit(spool_engine::Limit::Sessions { .. }))
            ),
            "{b:?}"
        );
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
