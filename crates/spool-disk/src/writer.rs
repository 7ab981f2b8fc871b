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
    collections::VecDeque,
    fs::{self, File},
    io::{self, Write},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use parking_lot::{Mutex, MutexGuard};
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

/// Requests queued for the writer at most (beyond it an appender waits for the writer).
pub const WRITE_QUEUE: usize = 4096;

/// How requests reach the writer.
pub enum Sink {
    /// A thread of its own (`--durability fsync`).
    Thread(mpsc::Sender<WriteRequest>),
    /// No thread: appenders take turns writing (`--durability memory`).
    Inline(Arc<Inline>),
}

impl Sink {
    /// Hands `request` to the writer. With [`Sink::Inline`] it is only queued, in order:
    /// whoever waits for it (or drops the wait) writes what is queued, once its locks are let
    /// go.
    pub async fn send(
        &self,
        frames: Vec<u8>,
        publish: Vec<Publish>,
        group: Option<super::groups::GroupApply>,
    ) -> Result<Durable, EngineError> {
        let (done, rx) = oneshot::channel();
        let request = WriteRequest {
            frames,
            publish,
            group,
            done,
        };
        let inline = match self {
            Sink::Thread(tx) => {
                tx.send(request)
                    .await
                    .map_err(|_| EngineError::unavailable("the WAL writer has stopped"))?;
                None
            }
            Sink::Inline(inline) => {
                inline.submit(request);
                Some(inline.clone())
            }
        };
        Ok(Durable { rx, inline })
    }
}

/// A request handed to the writer: [`Durable::wait`] answers once it is durable.
pub struct Durable {
    rx: oneshot::Receiver<Result<(), EngineError>>,
    /// With the inline writer: the request may still be queued, for the waiter to write.
    inline: Option<Arc<Inline>>,
}

impl Durable {
    pub async fn wait(mut self) -> Result<(), EngineError> {
        if let Some(inline) = self.inline.clone() {
            // One turn of the runtime first: the tasks ready now (other members of the group,
            // other appenders) queue their requests behind this one and share its write, as
            // they did while the thread woke up. Without it, HTTP members acking 32 at a time
            // on one group wrote alone, more often and on the worker: 32 × 32 210–240k acks/s
            // against the thread's 254–265k; with it 258–282k (docs/benchmarks.md).
            tokio::task::yield_now().await;
            self.inline = None;
            inline.flush();
        }
        (&mut self.rx)
            .await
            .map_err(|_| EngineError::unavailable("the WAL writer has stopped"))?
    }
}

impl Drop for Durable {
    /// A wait given up before it began (its caller was cancelled) still writes what it
    /// queued: nothing queued waits for a next appender that may never come.
    fn drop(&mut self) {
        if let Some(inline) = self.inline.take() {
            inline.flush();
        }
    }
}

/// The writer without a thread, for `--durability memory`, where a commit is a `write` into
/// the page cache and no fsync. An appender queues its request (under its stream's or group's
/// lock: the queue's order is the WAL's); once it has let go of its locks and waits for the
/// request, it writes everything queued — its own and whatever others queued meanwhile — as
/// one batch, as the thread would, unless another waiter is writing: that one then takes it
/// before it lets the writer go, so nothing queued is left without a writer. What this saves
/// is the hand-off: the writer thread's sleep and wake-up per commit, and the wake-up of the
/// appender's task from outside the runtime (at one message per commit on this 2-core machine,
/// about a fifth of the server's CPU per message: docs/benchmarks.md). Writing only after the
/// caller's locks are let go keeps a group's lock as short as with the thread (members of one
/// group queue their commits behind each other and share the write).
pub struct Inline {
    pub(crate) queue: Mutex<VecDeque<WriteRequest>>,
    pub(crate) writer: Mutex<Writer>,
    /// A task is on its way to write what an appender left queued at the end of its turn.
    handed_over: AtomicBool,
}

/// Batches one appender writes in a turn. It runs on a tokio worker, whose other tasks wait
/// meanwhile: past its turn, what is still queued goes to a task of its own.
const TURN: usize = 4;

impl Inline {
    pub fn new(writer: Writer) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(VecDeque::new()),
            writer: Mutex::new(writer),
            handed_over: AtomicBool::new(false),
        })
    }

    /// Queues `request`, in order, for [`Durable::wait`] (or its drop) to write: after its
    /// caller let go of its locks (a stream's append lock, a group's), so that what others
    /// queue meanwhile shares the write, as with the thread.
    fn submit(self: &Arc<Self>, request: WriteRequest) {
        let full = {
            let mut queue = self.queue.lock();
            queue.push_back(request);
            queue.len() > WRITE_QUEUE
        };
        if full {
            // Appenders outrun the writer: this one waits for it (the thread's full channel
            // made it wait too), then writes.
            let writer = self.writer.lock();
            self.turn(writer);
        }
    }

    /// Writes what is queued unless another appender is writing: that one then writes it
    /// before it lets the writer go.
    fn flush(self: &Arc<Self>) {
        if let Some(writer) = self.writer.try_lock() {
            self.turn(writer);
        }
    }

    /// Writes what is queued, batch after batch, for at most [`TURN`] batches; then lets the
    /// writer go, leaving nothing queued without a writer.
    pub(crate) fn turn<'a>(self: &'a Arc<Self>, mut writer: MutexGuard<'a, Writer>) {
        let mut batch = Vec::new();
        let mut turns = 0;
        let _stop = StopOnPanic(writer.shared.clone());
        loop {
            if turns == TURN && tokio::runtime::Handle::try_current().is_ok() {
                drop(writer);
                self.hand_over();
                return;
            }
            fill(&mut batch, || self.queue.lock().pop_front());
            if batch.is_empty() {
                drop(writer);
                // A request queued after the take found the writer held and left it to us.
                if self.queue.lock().is_empty() {
                    return;
                }
                match self.writer.try_lock() {
                    Some(again) => writer = again,
                    // Whoever holds it now checks the queue as it lets go.
                    None => return,
                }
                continue;
            }
            let bytes = batch.iter().map(|r| r.frames.len()).sum();
            if writer.rolls_before(bytes) && multi_thread() {
                // The roll fsyncs the full segment and starts the next: off the worker.
                tokio::task::block_in_place(|| writer.process(&mut batch));
            } else {
                writer.process(&mut batch);
            }
            turns += 1;
        }
    }

    /// Leaves what is queued to a task of its own, which runs after the tasks waiting for
    /// this worker.
    fn hand_over(self: &Arc<Self>) {
        if self.queue.lock().is_empty() || self.handed_over.swap(true, Ordering::AcqRel) {
            return;
        }
        let inline = self.clone();
        tokio::spawn(async move {
            inline.handed_over.store(false, Ordering::Release);
            if let Some(writer) = inline.writer.try_lock() {
                inline.turn(writer);
            }
        });
    }
}

/// Stops the engine if a batch panics half-way (a bug): its appenders' waits end with the
/// writer stopped (their answers are dropped), and the engine takes no more writes, as when
/// the writer was a thread and died with it, instead of writing on from a state half-applied.
struct StopOnPanic(Arc<Shared>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                "the WAL writer panicked; the disk engine stops accepting writes until restarted"
            );
            self.0.fail("the WAL writer panicked".to_owned());
        }
    }
}

/// Adds the requests `next` gives to `batch` while its frames are under [`MAX_BATCH_BYTES`]:
/// one batch of the thread (from its channel) or of an inline turn (from the queue).
fn fill(batch: &mut Vec<WriteRequest>, mut next: impl FnMut() -> Option<WriteRequest>) {
    let mut bytes: usize = batch.iter().map(|r| r.frames.len()).sum();
    while bytes < MAX_BATCH_BYTES {
        let Some(request) = next() else {
            break;
        };
        bytes += request.frames.len();
        batch.push(request);
    }
}

fn multi_thread() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

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
    /// The batch's frames, written at once, and each request's position in the segment.
    pub buf: Vec<u8>,
    pub bases: Vec<u64>,
    /// Tests: the next batch panics.
    #[cfg(test)]
    pub panic_next: bool,
}

impl Writer {
    /// The writer's own thread (`--durability fsync`): takes requests as they come, each
    /// batch everything waiting (an fsync blocks the thread, never a tokio worker).
    pub fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>) {
        let mut batch: Vec<WriteRequest> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            fill(&mut batch, || rx.try_recv().ok());
            self.process(&mut batch);
        }
    }

    /// Writes a batch (one write, and one fsync with `fsync`), then makes its messages visible
    /// and applies its group operations in order, then answers every request (and empties
    /// `batch`).
    fn process(&mut self, batch: &mut Vec<WriteRequest>) {
        #[cfg(test)]
        if std::mem::take(&mut self.panic_next) {
            panic!("a panic injected into the WAL writer");
        }
        let result = self.commit(batch);
        if let Err(e) = &result {
            tracing::error!(error = %e, "WAL write failed; the disk engine stops accepting publishes until restarted");
            self.shared.fail(e.to_string());
        }
        if result.is_ok() {
            self.count(batch);
            for (request, &base) in batch.iter_mut().zip(&self.bases) {
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

    /// Whether writing `bytes` more starts the next segment first (a roll fsyncs).
    fn rolls_before(&self, bytes: usize) -> bool {
        let written = self.segment_len - self.segment_start;
        bytes > 0 && written > 0 && written + bytes as u64 > self.segment_max
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
    fn commit(&mut self, batch: &[WriteRequest]) -> Result<(), EngineError> {
        self.bases.clear();
        self.bases.resize(batch.len(), 0);
        self.shared.usable()?;
        let bytes: usize = batch.iter().map(|r| r.frames.len()).sum();
        if bytes == 0 {
            return Ok(());
        }
        if self.rolls_before(bytes) {
            self.roll()?;
        }
        let buf = &mut self.buf;
        buf.clear();
        for (request, base) in batch.iter().zip(self.bases.iter_mut()) {
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
        if self.buf.capacity() > MAX_BATCH_BYTES * 2 {
            self.buf = Vec::new();
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
