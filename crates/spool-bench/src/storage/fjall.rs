//! The `fjall` candidate: Spool's group-commit design on an LSM tree. Each drained batch is
//! one write batch into one keyspace, persisted with `PersistMode::SyncAll` (fjall writes the
//! batch to its journal, then fsyncs the journal) before the acks. Keys are stream ‖ offset,
//! both big-endian, so a stream's records sort in offset order.

use std::path::Path;

use anyhow::Result;
use async_trait::async_trait;
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{
    Store,
    group::{Backend, GroupCommit, Record},
};

pub struct FjallStore {
    writer: GroupCommit,
    keyspace: Keyspace,
}

struct FjallBackend {
    db: Database,
    keyspace: Keyspace,
}

impl Backend for FjallBackend {
    fn commit(&mut self, records: &[Record]) -> Result<()> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for r in records {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&r.stream.to_be_bytes());
            key[8..].copy_from_slice(&r.offset.to_be_bytes());
            batch.insert(&self.keyspace, &key[..], r.payload.as_ref());
        }
        batch.commit()?;
        Ok(())
    }
}

impl FjallStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = Database::builder(dir.join("fjall")).open()?;
        let keyspace = db.keyspace("messages", KeyspaceCreateOptions::default)?;
        let writer = GroupCommit::start(
            "fjall",
            FjallBackend {
                db,
                keyspace: keyspace.clone(),
            },
        )?;
        Ok(Self { writer, keyspace })
    }
}

#[async_trait]
impl Store for FjallStore {
    async fn append(&self, stream: usize, payload: Bytes) -> Result<()> {
        self.writer.append(stream, payload).await.map(drop)
    }

    async fn stored(&self) -> Result<u64> {
        Ok(self.keyspace.len()? as u64)
    }

    fn commits(&self) -> Option<u64> {
        Some(self.writer.commits())
    }
}
