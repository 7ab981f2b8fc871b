//! The `file-per-stream` candidate: every stream is its own append-only file; an append
//! writes one length-prefixed record and fdatasyncs that file, under the stream's mutex (so a
//! stream's records stay in order), on tokio's blocking pool. No group commit: concurrent
//! appends to one stream queue on its mutex, appends to different streams fsync different
//! files.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;

use super::Store;

/// Bytes of a record's length prefix.
const PREFIX: usize = 4;

pub struct FileStore {
    files: Vec<Arc<Mutex<File>>>,
    paths: Vec<PathBuf>,
    syncs: Arc<AtomicU64>,
}

impl FileStore {
    pub fn open(dir: &Path, streams: u16) -> Result<Self> {
        let mut files = Vec::new();
        let mut paths = Vec::new();
        for i in 0..streams {
            let path = dir.join(format!("stream-{i}.log"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            files.push(Arc::new(Mutex::new(file)));
            paths.push(path);
        }
        // Make the new files' directory entries durable (not timed).
        File::open(dir)?.sync_all()?;
        Ok(Self {
            files,
            paths,
            syncs: Arc::new(AtomicU64::new(0)),
        })
    }
}

#[async_trait]
impl Store for FileStore {
    async fn append(&self, stream: usize, payload: Bytes) -> Result<()> {
        let file = self.files[stream].clone();
        let syncs = self.syncs.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut record = Vec::with_capacity(PREFIX + payload.len());
            record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            record.extend_from_slice(&payload);
            let mut file = file.lock();
            file.write_all(&record)?;
            file.sync_data()?;
            syncs.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .await??;
        Ok(())
    }

    /// Walks every file's length prefixes.
    async fn stored(&self) -> Result<u64> {
        let mut total = 0;
        for path in &self.paths {
            let data = std::fs::read(path)?;
            let mut at = 0;
            while at < data.len() {
                let Some(prefix) = data.get(at..at + PREFIX) else {
                    bail!("{}: torn length prefix at {at}", path.display());
                };
                let len = u32::from_le_bytes(prefix.try_into()?) as usize;
                at += PREFIX + len;
                if at > data.len() {
                    bail!("{}: torn record before {at}", path.display());
                }
                total += 1;
            }
        }
        Ok(total)
    }

    fn commits(&self) -> Option<u64> {
        Some(self.syncs.load(Ordering::Relaxed))
    }
}
