//! The `redb` candidate: Spool's group-commit design on a copy-on-write B-tree. Each drained
//! batch is one write transaction with `Durability::Immediate` (redb's default one-phase
//! commit with checksums), keyed by (stream, offset).

use std::{path::Path, sync::Arc};

use anyhow::Result;
use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTableMetadata, TableDefinition};

use super::{
    Store,
    group::{Backend, GroupCommit, Record},
};

const MESSAGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("messages");

pub struct RedbStore {
    // Dropped (joined) before `db`'s last handle goes.
    writer: GroupCommit,
    db: Arc<Database>,
}

struct RedbBackend {
    db: Arc<Database>,
}

impl Backend for RedbBackend {
    fn commit(&mut self, records: &[Record]) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        {
            let mut table = txn.open_table(MESSAGES)?;
            for r in records {
                table.insert((r.stream, r.offset), r.payload.as_ref())?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

impl RedbStore {
    pub fn open(dir: &Path) -> Result<Self> {
        let db = Arc::new(Database::create(dir.join("spool.redb"))?);
        // Create the table up front, so counting works on an empty store.
        let txn = db.begin_write()?;
        txn.open_table(MESSAGES)?;
        txn.commit()?;
        let writer = GroupCommit::start("redb", RedbBackend { db: db.clone() })?;
        Ok(Self { writer, db })
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn append(&self, stream: usize, payload: Bytes) -> Result<()> {
        self.writer.append(stream, payload).await.map(drop)
    }

    async fn stored(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(MESSAGES)?.len()?)
    }

    fn commits(&self) -> Option<u64> {
        Some(self.writer.commits())
    }
}
