//! The `spool-wal` candidate: Spool's own disk engine through its `Engine` trait, acking
//! after fsync (`Durability::Fsync`).

use std::path::Path;

use anyhow::Result;
use async_trait::async_trait;
use bytes::Bytes;
use spool_core::{NewMessage, StreamName};
use spool_disk::{DiskConfig, DiskEngine, Durability};
use spool_engine::Engine;

use super::Store;

pub struct WalStore {
    engine: DiskEngine,
    names: Vec<StreamName>,
}

impl WalStore {
    pub fn open(dir: &Path, streams: u16) -> Result<Self> {
        let engine = DiskEngine::open(DiskConfig {
            durability: Durability::Fsync,
            ..DiskConfig::new(dir)
        })?;
        let names = (0..streams)
            .map(|i| StreamName::new(&format!("bench-{i}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { engine, names })
    }
}

#[async_trait]
impl Store for WalStore {
    async fn append(&self, stream: usize, payload: Bytes) -> Result<()> {
        let message = NewMessage {
            payload,
            ..Default::default()
        };
        self.engine
            .append(&self.names[stream], vec![message])
            .await?;
        Ok(())
    }

    /// The head offset of every stream: offsets run 1, 2, 3… and only durable messages count.
    async fn stored(&self) -> Result<u64> {
        let mut total = 0;
        for name in &self.names {
            if let Some(state) = self.engine.state(name).await? {
                total += state.head.get();
            }
        }
        Ok(total)
    }
}
