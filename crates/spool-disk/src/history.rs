//! A stream's retained history on the disk engine: an index of where each retained message
//! lies in the WAL, a bounded hot tail of the newest messages in memory, and reads of older
//! history from the segment files.
//!
//! Memory per stream is the index (one [`Slot`], 24 bytes, per retained message) plus its
//! share of the tail cache; the tail caches of all streams together stay within one global
//! budget (`--cache-size`, [`TailCache`]), the oldest-published messages evicted first. A read
//! takes, under the stream's lock and atomically with the stream's state, the slots it needs
//! and a handle on each segment file they lie in ([`SegmentFiles`]); it then reads those
//! frames from the files (the page cache, in runs of nearby frames: bounded read-ahead)
//! without the lock. A segment that retention deletes meanwhile stays readable through the
//! handle (an unlinked file lives while open), so a read racing retention answers exactly
//! the messages that were retained when it started — never a partial or wrong answer. Every
//! frame read is checked (CRC, stream name, offset); a mismatch is an error, never a message.
//!
//! Recovery rebuilds the index from the segments (positions, times and sizes), not payloads:
//! after a restart the tail cache is empty and fills as messages are published.

use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    io,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;
use spool_core::{Epoch, Message, Offset, Retention, StreamName, StreamState};
use spool_engine::{EngineError, HeadWatch, log::Retained, log::StreamLog};

use crate::{
    record::{Frame, Record, decode_frame},
    segment,
};

/// Default global budget of the tail caches (`--cache-size`).
pub const DEFAULT_CACHE_SIZE: u64 = 64 * 1024 * 1024;

/// What one cached message is charged beyond its retained bytes: the `Arc<Message>`
/// allocation, its strings' and headers' allocations, and its entry in the eviction queue.
const CACHED_OVERHEAD: u64 = 192;

/// Most frame bytes one read takes from the segment files (at least one message is always
/// read): a read answers fewer messages than its limit past it, as `ReadBatch` allows.
pub const MAX_DISK_READ_BYTES: u64 = 4 * 1024 * 1024;

/// Frames of one stream are read together when the gap between them (other streams' frames)
/// is at most this, and the run at most [`MAX_RUN`]: bounded read-ahead.
const MAX_GAP: u64 = 64 * 1024;
const MAX_RUN: u64 = 1024 * 1024;

/// Open segment handles kept past this are closed once no read holds them.
const MAX_OPEN_SEGMENTS: usize = 256;

/// Where one retained message lies in the WAL, and what retention needs of it. 24 bytes (its
/// offset is its place in the index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    time_ms: u64,
    /// `segment << 40 | byte position` of the message's frame.
    loc: u64,
    /// The frame's length (header included).
    len: u32,
    /// [`Message::retained_bytes`].
    bytes: u32,
}

const POS_BITS: u32 = 40;

impl Slot {
    pub fn new(segment: u64, pos: u64, len: usize, message: &Message) -> Self {
        debug_assert!(segment < 1 << (64 - POS_BITS) && pos < 1 << POS_BITS);
        Self {
            time_ms: message.time_ms,
            loc: (segment << POS_BITS) | (pos & ((1 << POS_BITS) - 1)),
            len: len as u32,
            bytes: message.retained_bytes().min(u64::from(u32::MAX)) as u32,
        }
    }

    /// The WAL segment holding the frame.
    pub fn segment(&self) -> u64 {
        self.loc >> POS_BITS
    }

    fn pos(&self) -> u64 {
        self.loc & ((1 << POS_BITS) - 1)
    }
}

const _: () = assert!(std::mem::size_of::<Slot>() == 24);

impl Retained for Slot {
    fn time_ms(&self) -> u64 {
        self.time_ms
    }
    fn retained_bytes(&self) -> u64 {
        u64::from(self.bytes)
    }
}

/// One stream's visible history: the index of retained messages (with epoch, head, retention
/// and head watch) and the tail cache, a contiguous run of the newest retained messages.
pub struct DiskLog {
    pub index: StreamLog<Slot>,
    /// The newest retained messages, oldest first; the last is the head.
    tail: VecDeque<Arc<Message>>,
}

/// What a read takes under the stream's lock: the state, the messages to read from the
/// segments (oldest first, with a handle on each segment file), then the cached ones.
pub struct ReadPlan {
    pub state: StreamState,
    pub disk: Vec<(Offset, Slot)>,
    pub files: HashMap<u64, Arc<File>>,
    pub cached: Vec<Arc<Message>>,
}

impl DiskLog {
    pub fn new(epoch: Epoch, head: Offset, retention: Retention) -> Self {
        Self {
            index: StreamLog::new(epoch, head, retention),
            tail: VecDeque::new(),
        }
    }

    pub fn epoch(&self) -> &Epoch {
        self.index.epoch()
    }

    pub fn head(&self) -> Offset {
        self.index.head()
    }

    pub fn state(&self) -> StreamState {
        self.index.state()
    }

    pub fn watch(&self) -> HeadWatch {
        self.index.watch()
    }

    pub fn watchers(&self) -> usize {
        self.index.watchers()
    }

    pub fn notify(&self) {
        self.index.notify();
    }

    /// The offset of the oldest cached message (`head + 1` when none is).
    fn tail_start(&self) -> Offset {
        Offset(self.head().get() + 1 - self.tail.len() as u64)
    }

    /// Appends the next message: its slot to the index and the message to the tail cache
    /// (charged to `cache`; the caller queues it for eviction).
    pub fn push(&mut self, message: Arc<Message>, slot: Slot, cache: &TailCache) {
        self.index.push_entry(message.offset, slot);
        cache.charge(&message);
        self.tail.push_back(message);
    }

    /// Appends the next message's slot only (recovery: nothing is cached).
    pub fn push_slot(&mut self, offset: Offset, slot: Slot) {
        debug_assert!(self.tail.is_empty());
        self.index.push_entry(offset, slot);
    }

    /// Removes what retention no longer allows; `dropped` sees the segment of each removed
    /// message. Cached messages go with their slots.
    pub fn trim(&mut self, now_ms: u64, cache: &TailCache, dropped: impl FnMut(u64)) {
        let mut dropped = dropped;
        self.index.trim(now_ms, |slot| dropped(slot.segment()));
        self.drop_uncovered(cache);
    }

    /// Forgets every retained message and moves the head (see [`StreamLog::skip_to`]).
    pub fn skip_to(&mut self, head: Offset, cache: &TailCache, mut dropped: impl FnMut(u64)) {
        self.index.skip_to(head, |slot| dropped(slot.segment()));
        for m in self.tail.drain(..) {
            cache.discharge(&m);
        }
    }

    /// Drops retained messages before `before` (an admin's truncate; see
    /// [`StreamLog::drop_before`]), cached ones with them.
    pub fn drop_before(&mut self, before: Offset, cache: &TailCache, mut dropped: impl FnMut(u64)) {
        self.index
            .drop_before(before, |slot| dropped(slot.segment()));
        self.drop_uncovered(cache);
    }

    /// Drops cached messages that are no longer retained.
    fn drop_uncovered(&mut self, cache: &TailCache) {
        let oldest = self.index.oldest();
        while self.tail.front().is_some_and(|m| m.offset < oldest) {
            if let Some(m) = self.tail.pop_front() {
                cache.discharge(&m);
            }
        }
    }

    /// Evicts cached messages up to `offset` (the eviction queue's oldest entry for this
    /// stream). False if none was cached (the entry was stale: retention took it first).
    fn evict_through(&mut self, offset: Offset, cache: &TailCache) -> bool {
        let mut evicted = false;
        while self.tail.front().is_some_and(|m| m.offset <= offset) {
            if let Some(m) = self.tail.pop_front() {
                cache.discharge(&m);
                evicted = true;
            }
        }
        evicted
    }

    /// Whether `offset` is still in the tail cache.
    pub fn caches(&self, offset: Offset) -> bool {
        offset >= self.tail_start() && offset <= self.head() && !self.tail.is_empty()
    }

    /// What a read of up to `limit` messages after `after` takes: cached messages as they
    /// are, older ones as slots, with a handle on each segment file (taken now, under the
    /// stream's lock, while those segments surely exist). The frames to read are bounded by
    /// [`MAX_DISK_READ_BYTES`] (at least one message).
    pub fn plan(
        &self,
        after: Offset,
        limit: usize,
        files: &SegmentFiles,
    ) -> Result<ReadPlan, EngineError> {
        let tail_start = self.tail_start();
        let mut plan = ReadPlan {
            state: self.state(),
            disk: Vec::new(),
            files: HashMap::new(),
            cached: Vec::new(),
        };
        let mut disk_bytes = 0u64;
        for (i, slot) in self.index.entries_after(after, limit).enumerate() {
            let offset = Offset(after.get() + 1 + i as u64);
            if offset >= tail_start {
                let i = (offset.get() - tail_start.get()) as usize;
                match self.tail.get(i) {
                    Some(m) => plan.cached.push(m.clone()),
                    None => break,
                }
                continue;
            }
            if !plan.disk.is_empty() && disk_bytes + u64::from(slot.len) > MAX_DISK_READ_BYTES {
                break;
            }
            disk_bytes += u64::from(slot.len);
            let segment = slot.segment();
            if let std::collections::hash_map::Entry::Vacant(v) = plan.files.entry(segment) {
                let file = files.get(segment).map_err(|e| {
                    EngineError::internal_from("opening a WAL segment to read history", e)
                })?;
                v.insert(file);
            }
            plan.disk.push((offset, *slot));
        }
        Ok(plan)
    }
}

/// Reads the planned frames from the segment files, in runs of nearby frames, and checks that
/// each is the message the index names.
pub fn read_disk(
    stream: &StreamName,
    disk: &[(Offset, Slot)],
    files: &HashMap<u64, Arc<File>>,
) -> Result<Vec<Arc<Message>>, EngineError> {
    let mut out = Vec::with_capacity(disk.len());
    let mut buf = Vec::new();
    let mut i = 0;
    while i < disk.len() {
        let first = disk[i].1;
        let start = first.pos();
        let mut end = start + u64::from(first.len);
        let mut j = i + 1;
        while j < disk.len() {
            let s = disk[j].1;
            let s_end = s.pos() + u64::from(s.len);
            if s.segment() != first.segment()
                || s.pos() < end
                || s.pos() - end > MAX_GAP
                || s_end - start > MAX_RUN
            {
                break;
            }
            end = s_end;
            j += 1;
        }
        let file = files
            .get(&first.segment())
            .ok_or_else(|| EngineError::internal("a read planned without its segment file"))?;
        buf.clear();
        buf.resize((end - start) as usize, 0);
        file.read_exact_at(&mut buf, start)
            .map_err(|e| EngineError::internal_from("reading history from a WAL segment", e))?;
        for &(offset, slot) in &disk[i..j] {
            let at = (slot.pos() - start) as usize;
            let frame = &buf[at..at + slot.len as usize];
            match decode_frame(frame) {
                Frame::Record(
                    Record::Message {
                        name, message: m, ..
                    },
                    len,
                ) if len == frame.len() && name == *stream && m.offset == offset => {
                    out.push(Arc::new(m))
                }
                _ => {
                    return Err(EngineError::internal(format!(
                        "the WAL does not hold message {offset} of {stream} where the index says \
                         (segment {}, byte {})",
                        slot.segment(),
                        slot.pos()
                    )));
                }
            }
        }
        i = j;
    }
    Ok(out)
}

/// Read handles on segment files, shared by readers: a handle taken stays valid after
/// retention deletes the file.
pub struct SegmentFiles {
    wal: PathBuf,
    open: Mutex<HashMap<u64, Arc<File>>>,
}

impl SegmentFiles {
    pub fn new(wal: PathBuf) -> Self {
        Self {
            wal,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A read handle on segment `id`, opened on first use.
    pub fn get(&self, id: u64) -> io::Result<Arc<File>> {
        let mut open = self.open.lock();
        if let Some(f) = open.get(&id) {
            return Ok(f.clone());
        }
        if open.len() >= MAX_OPEN_SEGMENTS {
            open.retain(|_, f| Arc::strong_count(f) > 1);
        }
        let file = Arc::new(File::open(segment::path(&self.wal, id))?);
        open.insert(id, file.clone());
        Ok(file)
    }

    /// Closes the handle on a deleted segment (reads holding it keep it until they end).
    pub fn forget(&self, id: u64) {
        self.open.lock().remove(&id);
    }
}

/// The global budget of the tail caches: bytes charged by every cached message.
pub struct TailCache {
    budget: u64,
    used: AtomicU64,
    count: AtomicU64,
}

impl TailCache {
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            used: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn cost(m: &Message) -> u64 {
        m.retained_bytes() + CACHED_OVERHEAD
    }

    fn charge(&self, m: &Message) {
        self.used.fetch_add(Self::cost(m), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn discharge(&self, m: &Message) {
        self.used.fetch_sub(Self::cost(m), Ordering::Relaxed);
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Messages cached now.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }
}

/// What eviction needs of a stream: its log, under its lock.
pub trait HasLog: Send + Sync {
    fn with_log<R>(&self, f: impl FnOnce(&mut DiskLog) -> R) -> R;
}

/// The order cached messages were published in, across streams, owned by the WAL writer (the
/// only one that caches): over budget, the oldest go first. Entries of messages retention
/// took first are stale and skipped; the queue is compacted when they outnumber the live.
pub struct Eviction<S> {
    queue: VecDeque<(Weak<S>, Offset)>,
}

impl<S: HasLog> Eviction<S> {
    pub fn new() -> Self {
        Self {
            queue: VecDeque::new(),
        }
    }

    pub fn push(&mut self, stream: &Arc<S>, offset: Offset) {
        self.queue.push_back((Arc::downgrade(stream), offset));
    }

    /// Evicts the oldest cached messages until the caches are within budget.
    pub fn enforce(&mut self, cache: &TailCache) {
        while cache.used() > cache.budget() {
            let Some((stream, offset)) = self.queue.pop_front() else {
                break;
            };
            if let Some(s) = stream.upgrade() {
                s.with_log(|log| log.evict_through(offset, cache));
            }
        }
        let live = cache.count() as usize;
        if self.queue.len() > 2 * live + 1024 {
            self.queue.retain(|(stream, offset)| {
                stream
                    .upgrade()
                    .is_some_and(|s| s.with_log(|log| log.caches(*offset)))
            });
            if self.queue.capacity() > 4 * self.queue.len() + 1024 {
                self.queue.shrink_to_fit();
            }
        }
    }
}
