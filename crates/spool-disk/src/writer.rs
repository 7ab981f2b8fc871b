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
//! Consumer group operations (`groups.rs`) are requests like appends: their records go into
//! the same batches and share the same fsync, and each is applied to the groups' durable
//! table, in channel order, after the fsync and before its caller is answered.
//!
//! If a write or fsync fails the engine stops accepting appends for good: after a failed
//! fsync the kernel may have dropped the dirty pages, so nothing written since the last good
//! fsync can be vouched for (PostgreSQL's "fsyncgate"). Restarting recovers what is on disk.
//! Failing to *start* the next segment (no file descriptor left, a full directory) is not
//! like that: nothing was written to it, so the writer removes what it began, keeps appending
//! to the current segment, and tries the roll again at the next commit.

use std::{
    fs::{self, File},
    io::{self, Write},
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
};

use spool_core::{Message, Offset};
use tokio::sync::{mpsc, oneshot};

use super::{
    Shared,
    history::{Eviction, Slot},
    record, segment,
};
use spool_engine::EngineError;

/// Most bytes written per group commit.
pub const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// A message to make visible once its frame is durable.
pub struct Publish {
    pub stream: Arc<super::DiskStream>,
    pub message: Arc<Message>,
    /// Where the message's frame starts in its request's `frames`, and its length: the index
    /// entry says where it lies in the segment.
    pub at: usize,
    pub len: usize,
}

pub struct WriteRequest {
    /// Encoded frames, in order. Empty for a barrier (answered once everything sent before it
    /// is durable).
    pub frames: Vec<u8>,
    pub publish: Vec<Publish>,
    /// A consumer group operation to apply once durable.
    pub group: Option<super::groups::GroupApply>,
    pub done: oneshot::Sender<Result<(), EngineError>>,
}

pub struct Writer {
    pub shared: Arc<Shared>,
    pub dir: PathBuf,
    pub file: File,
    pub segment_id: u64,
    pub segment_len: u64,
    /// Where the active segment's snapshot ends: `segment_max` bounds what is written after
    /// it, so a snapshot larger than `segment_max` (many groups) does not roll every commit.
    pub segment_start: u64,
    pub segment_max: u64,
    pub fsync: bool,
    /// Failed attempts to start the next segment since the last roll (0: none).
    pub roll_failures: u64,
    /// The order messages entered the tail caches, for eviction over `--cache-size`.
    pub eviction: Eviction<super::DiskStream>,
}

impl Writer {
    pub fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>) {
        let mut batch: Vec<WriteRequest> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let mut bases: Vec<u64> = Vec::new();
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
            let result = self.commit(&batch, &mut buf, &mut bases);
            if let Err(e) = &result {
                tracing::error!(error = %e, "WAL write failed; the disk engine stops accepting publishes until restarted");
                self.shared.fail(e.to_string());
            }
            if result.is_ok() {
                self.count(&batch);
            }
            if result.is_ok() {
                for (request, base) in batch.iter_mut().zip(bases.iter().copied()) {
                    publish(
                        &self.shared,
                        &mut self.eviction,
                        self.segment_id,
                        base,
                        std::mem::take(&mut request.publish),
                    );
                    if let Some(op) = request.group.take() {
                        self.shared.groups.apply(op);
                    }
                }
                // Within the cache budget before anyone is answered.
                self.eviction.enforce(&self.shared.cache);
            }
            for request in batch.drain(..) {
                let _ = request.done.send(result.clone());
            }
        }
    }

    /// Counts a written batch ([`super::WalStats`]).
    fn count(&self, batch: &[WriteRequest]) {
        let written = batch.iter().filter(|r| !r.frames.is_empty());
        let (mut requests, mut groups) = (0, 0);
        for r in written {
            requests += 1;
            groups += u64::from(r.group.is_some());
        }
        if requests == 0 {
            return;
        }
        let wal = &self.shared.wal;
        wal.batches.fetch_add(1, Ordering::Relaxed);
        wal.requests.fetch_add(requests, Ordering::Relaxed);
        wal.group_requests.fetch_add(groups, Ordering::Relaxed);
        if groups > 0 && groups < requests {
            wal.mixed_batches.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes the batch; `bases` gets each request's byte position in the active segment.
    fn commit(
        &mut self,
        batch: &[WriteRequest],
        buf: &mut Vec<u8>,
        bases: &mut Vec<u64>,
    ) -> Result<(), EngineError> {
        bases.clear();
        bases.resize(batch.len(), 0);
        self.shared.usable()?;
        let bytes: usize = batch.iter().map(|r| r.frames.len()).sum();
        if bytes == 0 {
            return Ok(());
        }
        let written = self.segment_len - self.segment_start;
        if written > 0 && written + bytes as u64 > self.segment_max {
            self.roll()?;
        }
        buf.clear();
        for (request, base) in batch.iter().zip(bases.iter_mut()) {
            *base = self.segment_len + buf.len() as u64;
            buf.extend_from_slice(&request.frames);
        }
        self.file
            .write_all(buf)
            .map_err(|e| io_error("writing the WAL", e))?;
        self.segment_len += buf.len() as u64;
        if self.fsync {
            let started = std::time::Instant::now();
            self.file
                .sync_data()
                .map_err(|e| io_error("fsync of the WAL", e))?;
            spool_engine::timing::WAL_FSYNC.observe(started.elapsed());
        }
        if buf.capacity() > MAX_BATCH_BYTES * 2 {
            *buf = Vec::new();
        }
        Ok(())
    }

    /// Closes the active segment and starts the next one with a snapshot record of every
    /// stream (epoch and head) and of every consumer group, so that no older segment is ever
    /// the only place a stream's epoch or a group's state is written: any older segment can be
    /// deleted once its messages are expired.
    ///
    /// Only a failed fsync of the active segment is an error; when the next segment cannot be
    /// started, the active one stays active (it grows past `segment_max` meanwhile) and the
    /// next commit tries again.
    fn roll(&mut self) -> Result<(), EngineError> {
        self.file
            .sync_all()
            .map_err(|e| io_error("fsync of the WAL", e))?;
        let next = self.segment_id + 1;
        let (file, len) = match self.start_segment(next) {
            Ok(started) => started,
            Err(e) => {
                self.roll_failures += 1;
                // The first failure and then every 1000th, not one line per commit.
                if self.roll_failures % 1000 == 1 {
                    tracing::warn!(
                        error = %e, segment = next, attempts = self.roll_failures,
                        "cannot start a new WAL segment; appending to the current one and retrying (out of file descriptors?)"
                    );
                }
                return Ok(());
            }
        };
        if self.roll_failures > 0 {
            tracing::info!(
                segment = next,
                attempts = self.roll_failures,
                "started the new WAL segment after failed attempts"
            );
            self.roll_failures = 0;
        }
        let previous = self.segment_id;
        self.file = file;
        self.segment_id = next;
        self.segment_len = len;
        self.segment_start = len;
        self.shared.active_segment.store(next, Ordering::Release);
        self.shared.segments.lock().entry(next).or_insert(0);
        self.shared.release_if_dead(previous);
        Ok(())
    }

    /// Creates segment `id` with the snapshot, durably; on failure removes what it began (no
    /// other process or thread creates segments while the writer runs, so a file with that id
    /// can only be left from an earlier failed attempt).
    fn start_segment(&self, id: u64) -> io::Result<(File, u64)> {
        let path = segment::path(&self.dir, id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let started = (|| {
            let mut file = segment::create(&self.dir, id)?;
            let snapshot = self.shared.snapshot_records()?;
            file.write_all(&snapshot)?;
            file.sync_data()?;
            Ok((file, segment::HEADER_LEN + snapshot.len() as u64))
        })();
        if started.is_err() {
            let _ = fs::remove_file(&path);
        }
        started
    }
}

/// Makes durable messages visible, in order (indexed where their frames lie: `base` is the
/// request's position in segment `segment_id`, and cached), and applies retention.
fn publish(
    shared: &Shared,
    eviction: &mut Eviction<super::DiskStream>,
    segment_id: u64,
    base: u64,
    publish: Vec<Publish>,
) {
    if publish.is_empty() {
        return;
    }
    *shared.segments.lock().entry(segment_id).or_insert(0) += publish.len() as u64;
    let now = shared.clock.now_ms();
    let mut i = 0;
    while i < publish.len() {
        // Messages of one stream arrive together: take the lock once per run.
        let stream = publish[i].stream.clone();
        let mut log = stream.log.lock();
        let first = i;
        while i < publish.len() && Arc::ptr_eq(&publish[i].stream, &stream) {
            let p = &publish[i];
            let slot = Slot::new(segment_id, base + p.at as u64, p.len, &p.message);
            log.push(p.message.clone(), slot, &shared.cache);
            i += 1;
        }
        let mut dropped = Vec::new();
        log.trim(now, &shared.cache, |seg| dropped.push(seg));
        log.notify();
        drop(log);
        for p in &publish[first..i] {
            eviction.push(&stream, p.message.offset);
        }
        shared.release(&dropped);
    }
}

fn io_error(what: &str, e: std::io::Error) -> EngineError {
    EngineError::unavailable_from(format!("{what} failed"), e)
}

/// Encodes the snapshot record of one stream.
pub fn snapshot_record(out: &mut Vec<u8>, stream: &super::DiskStream) {
    let log = stream.log.lock();
    record::encode_stream(out, &stream.name, log.epoch(), log.head());
    let floor = stream.floor();
    if floor > Offset::ZERO {
        record::encode_stream_truncated(out, &stream.name, log.epoch(), floor);
    }
}
