//! The WAL writer: one OS thread owns the active segment file and turns many concurrent
//! appends into one write and one fsync (group commit).
//!
//! Appenders send a [`WriteRequest`] (already-encoded frames plus the messages to publish)
//! over a bounded channel. The writer takes one request, drains every other request already
//! waiting (up to [`MAX_BATCH_BYTES`]), writes them all, fsyncs once, then makes the messages
//! visible to readers in channel order and answers every appender. While it waits on one
//! fsync, the next batch gathers in the channel: the more concurrent publishers, the more
//! messages share each fsync. A blocking thread (not a tokio task) because `write` and
//! `fsync` block.
//!
//! If a write or fsync fails the engine stops accepting appends for good: after a failed
//! fsync the kernel may have dropped the dirty pages, so nothing written since the last good
//! fsync can be vouched for (PostgreSQL's "fsyncgate"). Restarting recovers what is on disk.

use std::{
    fs::File,
    io::Write,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
};

use spool_core::{Message, now_ms};
use tokio::sync::{mpsc, oneshot};

use super::{Shared, record, segment};
use crate::EngineError;

/// Most bytes written per group commit.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// A message to make visible once its frame is durable.
pub struct Publish {
    pub stream: Arc<super::DiskStream>,
    pub message: Arc<Message>,
}

pub struct WriteRequest {
    /// Encoded frames, in order. Empty for a barrier (answered once everything sent before it
    /// is durable).
    pub frames: Vec<u8>,
    pub publish: Vec<Publish>,
    pub done: oneshot::Sender<Result<(), EngineError>>,
}

pub struct Writer {
    pub shared: Arc<Shared>,
    pub dir: PathBuf,
    pub file: File,
    pub segment_id: u64,
    pub segment_len: u64,
    pub segment_max: u64,
    pub fsync: bool,
}

impl Writer {
    pub fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>) {
        let mut batch: Vec<WriteRequest> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.frames.len();
            batch.push(first);
            while bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(next) => {
                        bytes += next.frames.len();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            let result = self.commit(&batch, &mut buf);
            if let Err(e) = &result {
                tracing::error!(error = %e, "WAL write failed; the disk engine stops accepting publishes until restarted");
                self.shared.fail(e.to_string());
            }
            for request in batch.drain(..) {
                if result.is_ok() {
                    publish(&self.shared, self.segment_id, request.publish);
                }
                let _ = request.done.send(result.clone());
            }
        }
    }

    fn commit(&mut self, batch: &[WriteRequest], buf: &mut Vec<u8>) -> Result<(), EngineError> {
        if let Some(reason) = self.shared.failure() {
            return Err(EngineError::Unavailable(format!(
                "the disk engine has failed: {reason}"
            )));
        }
        let bytes: usize = batch.iter().map(|r| r.frames.len()).sum();
        if bytes == 0 {
            return Ok(());
        }
        if self.segment_len > segment::HEADER_LEN
            && self.segment_len + bytes as u64 > self.segment_max
        {
            self.roll()
                .map_err(|e| io_error("rolling to a new segment", e))?;
        }
        buf.clear();
        for request in batch {
            buf.extend_from_slice(&request.frames);
        }
        self.file
            .write_all(buf)
            .map_err(|e| io_error("writing the WAL", e))?;
        self.segment_len += buf.len() as u64;
        if self.fsync {
            self.file
                .sync_data()
                .map_err(|e| io_error("fsync of the WAL", e))?;
        }
        if buf.capacity() > MAX_BATCH_BYTES * 2 {
            *buf = Vec::new();
        }
        Ok(())
    }

    /// Closes the active segment and starts the next one with a snapshot record of every
    /// stream (epoch and head), so that no older segment is ever the only place a stream's
    /// epoch is written: any older segment can be deleted once its messages are expired.
    fn roll(&mut self) -> std::io::Result<()> {
        self.file.sync_all()?;
        let next = self.segment_id + 1;
        let mut file = segment::create(&self.dir, next)?;
        let snapshot = self.shared.snapshot_records();
        file.write_all(&snapshot)?;
        file.sync_data()?;
        let previous = self.segment_id;
        self.file = file;
        self.segment_id = next;
        self.segment_len = segment::HEADER_LEN + snapshot.len() as u64;
        self.shared.active_segment.store(next, Ordering::Release);
        self.shared.segments.lock().entry(next).or_insert(0);
        self.shared.release_if_dead(previous);
        Ok(())
    }
}

/// Makes durable messages visible, in order, and applies retention.
fn publish(shared: &Shared, segment_id: u64, publish: Vec<Publish>) {
    if publish.is_empty() {
        return;
    }
    *shared.segments.lock().entry(segment_id).or_insert(0) += publish.len() as u64;
    let now = now_ms();
    let mut i = 0;
    while i < publish.len() {
        // Messages of one stream arrive together: take the lock once per run.
        let stream = publish[i].stream.clone();
        let mut log = stream.log.lock();
        while i < publish.len() && Arc::ptr_eq(&publish[i].stream, &stream) {
            log.push(publish[i].message.clone(), segment_id);
            i += 1;
        }
        let mut dropped = Vec::new();
        log.trim(now, |e| dropped.push(e.tag));
        log.notify();
        drop(log);
        shared.release(&dropped);
    }
}

fn io_error(what: &str, e: std::io::Error) -> EngineError {
    EngineError::Unavailable(format!("{what} failed: {e}"))
}

/// Encodes the snapshot record of one stream.
pub fn snapshot_record(out: &mut Vec<u8>, stream: &super::DiskStream) {
    let log = stream.log.lock();
    record::encode_stream(out, &stream.name, log.epoch(), log.head());
}
