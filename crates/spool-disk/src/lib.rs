//! The embedded durable engine: one write-ahead log shared by every stream, with group
//! commit; each stream's retained history is an index into that log plus a bounded hot tail
//! of its newest messages in memory.
//!
//! Why this shape (see docs/benchmarks.md for the numbers): a file per stream does not scale
//! to many small streams (one fd and one fsync each); a shared log turns every concurrent
//! publish on every stream into one sequential write and one fsync. Reads of the newest
//! messages (live subscribers) come from the tail cache (`--cache-size`, one budget for every
//! stream); reads of older history come from the segment files, through the page cache
//! (`history.rs`). At startup the log is read once to rebuild every stream's epoch, head,
//! index of retained messages (where each lies, its time and size) and idempotency keys — not
//! the payloads. Memory therefore holds the cache budget plus 24 bytes per retained message,
//! and the disk holds the history.
//!
//! - `record.rs`: the checksummed frame format.
//! - `segment.rs`: segment files, scanning, torn-tail detection.
//! - `writer.rs`: the writer thread (group commit, segment roll, tail-cache eviction).
//! - `history.rs`: a stream's index, tail cache and reads from the segments.
//! - `repair.rs`: `spool repair` (cut damage out, new epochs for the streams it touched).
//! - `sessions.rs`: the WebSocket session records, in `sessions.redb`.
//! - `groups.rs`: consumer groups (the `GroupStore`), as WAL records beside the messages.
//! - here: the engine, the append path, recovery and segment reclamation.
//!
//! The in-memory side (each stream's index of retained messages and head watch, idempotency
//! keys, the capped registry of streams) is shared with the memory engine:
//! `spool_engine::{log, dedup, registry}`.
//!
//! Publishing to a stream: under the stream's append lock, check idempotency keys, reserve
//! offsets, encode frames, and hand them to the writer (the lock is held until the request is
//! queued, so the WAL order of a stream's records is its offset order). The writer makes them
//! durable and only then visible to readers, in WAL order, so no reader ever sees a message
//! that a crash could take back.

pub mod groups;
mod history;
mod record;
mod repair;
mod segment;
pub mod sessions;
mod writer;

pub use history::{DEFAULT_CACHE_SIZE, MAX_DISK_READ_BYTES};
pub use repair::{Cut, Damage, EPOCHS_FILE, GroupRollback, RepairReport, repair};

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use parking_lot::Mutex;
use spool_core::{
    Clock, Epoch, NewMessage, Offset, Position, Retention, RetentionPolicy, StreamName, StreamState,
};
use tokio::sync::mpsc;

use history::{DiskLog, SegmentFiles, Slot, TailCache};
use record::Record;
use sessions::SessionFile;
use spool_engine::{
    Appended, Engine, EngineError, HeadWatch, ReadBatch, SessionRecord, SessionStore, StreamCounts,
    dedup::{DedupBudget, DedupWindow},
    registry::{Registry, Watched},
};
use writer::{Durable, Inline, Publish, Sink, WRITE_QUEUE, Writer};

/// What the ack of a publish waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Written to the OS (survives a crash of Spool, not of the machine).
    Memory,
    /// Written and fsynced (survives power loss).
    Fsync,
}

/// Settings of the disk engine.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub dir: PathBuf,
    pub durability: Durability,
    pub retention: RetentionPolicy,
    pub dedup_window: Duration,
    /// The most idempotency keys remembered across all streams; past it the oldest are
    /// forgotten early (`dedup.rs`).
    pub max_idempotency_keys: usize,
    /// The most WebSocket sessions kept; past it new sessions are not saved.
    pub max_sessions: usize,
    /// A segment is closed and a new one started past this size.
    pub segment_size: u64,
    /// The most bytes the newest messages of all streams may take in memory (the tail
    /// caches, `--cache-size`); older history is read from the segment files.
    pub cache_size: u64,
    /// The most streams the engine will create (streams something was published to).
    pub max_streams: usize,
    /// The most streams readers may wait on before anything is published to them (in memory
    /// only, never written; see `registry.rs`).
    pub max_unpublished_streams: usize,
    /// The most consumer groups kept (`--max-groups`); past it only creation is refused.
    pub max_groups: usize,
    /// What every expiry here is decided by: retention's age, idempotency keys, sessions,
    /// placeholders. The system clock but in tests.
    pub clock: Clock,
}

impl DiskConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            durability: Durability::Fsync,
            retention: RetentionPolicy::default(),
            dedup_window: Duration::from_secs(120),
            max_idempotency_keys: spool_engine::dedup::DEFAULT_MAX_KEYS,
            max_sessions: spool_engine::sessions::MAX_SESSIONS,
            segment_size: 64 * 1024 * 1024,
            cache_size: DEFAULT_CACHE_SIZE,
            max_streams: 1_000_000,
            max_unpublished_streams: 100_000,
            max_groups: spool_engine::groups::MAX_GROUPS,
            clock: Clock::system(),
        }
    }
}

/// Why the engine could not open its data directory.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is locked by another running spool process (only one may use a data directory)"
    )]
    Locked { path: PathBuf },
    #[error(
        "corrupt data in {file} at byte {offset}: {why}. Spool refuses to start rather than lose data silently. \
         To see what a repair would do: spool repair --dry-run --data-dir {dir}; to cut the damage out and \
         start anyway: spool repair --data-dir {dir} (the messages from the damaged byte to the end of that \
         segment are lost; only streams that had messages there start a new epoch, so their clients get a reset)"
    )]
    Corrupt {
        file: PathBuf,
        offset: u64,
        why: &'static str,
        dir: PathBuf,
    },
    #[error(
        "the session file {file} is damaged: {why}. To move it aside and start anyway, run: \
         spool repair --data-dir {dir} (WebSocket clients then cannot resume their sessions and \
         connect fresh; no message is lost)"
    )]
    SessionsDamaged {
        file: PathBuf,
        why: String,
        dir: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The sessions of the WebSocket protocol, beside the log.
const SESSIONS_FILE: &str = "sessions.redb";

/// Expired sessions are purged this often, in ms.
const SESSION_SWEEP_MS: u64 = 60_000;

/// Marker left by `spool repair` of earlier versions: on the next start every stream gets a
/// new epoch (today's repair gives new epochs only to the streams it cut: `repair.rs`).
const EPOCH_RESET_MARKER: &str = "EPOCH_RESET";
const QUARANTINE_DIR: &str = "quarantine";
const LOCK_FILE: &str = "LOCK";
#[cfg(test)]
mod group_tests;
#[cfg(test)]
mod tests;

/// One stream of the disk engine.
pub struct DiskStream {
    name: StreamName,
    /// Held while reserving offsets and queueing frames, so WAL order = offset order.
    append: tokio::sync::Mutex<AppendState>,
    /// What readers see: only durable messages (their index, and the newest cached).
    log: Mutex<DiskLog>,
    /// Set (under the append lock) once an operator deleted the stream: an append that was
    /// waiting for the lock goes to the stream's next incarnation instead.
    deleted: std::sync::atomic::AtomicBool,
    /// An operator's truncation (the admin API): messages before it are gone; restated in
    /// every snapshot (0: none).
    floor: AtomicU64,
}

impl history::HasLog for DiskStream {
    fn with_log<R>(&self, f: impl FnOnce(&mut DiskLog) -> R) -> R {
        f(&mut self.log.lock())
    }
}

struct AppendState {
    /// The last offset handed out (durable or on its way).
    reserved: Offset,
    dedup: DedupWindow,
    /// Whether the stream's epoch is in the WAL (a stream only read so far is not).
    persisted: bool,
}

/// State shared by the engine, the writer thread and the sweeper.
pub struct Shared {
    streams: Registry<DiskStream>,
    /// Live (retained) messages per segment id.
    segments: Mutex<HashMap<u64, u64>>,
    active_segment: AtomicU64,
    dir: PathBuf,
    failure: Mutex<Option<String>>,
    clock: Clock,
    groups: groups::Groups,
    wal: WalCounters,
    /// The tail caches' global budget.
    cache: TailCache,
    /// Read handles on segments, for reads of history.
    files: SegmentFiles,
}

/// What the tail caches hold ([`DiskEngine::cache_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Bytes charged: each cached message's retained bytes plus a fixed overhead.
    pub bytes: u64,
    /// Messages cached, across streams.
    pub messages: u64,
    /// The budget (`--cache-size`); `bytes` exceeds it only between a commit and its eviction.
    pub budget: u64,
}

/// What the writer has done since the engine opened ([`DiskEngine::wal_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Group commits: one write (and with `Durability::Fsync` one fsync) each.
    pub batches: u64,
    /// Requests written: appends and group operations (barriers not counted).
    pub requests: u64,
    /// Of those, group operations (create, commit, compact, delete).
    pub group_requests: u64,
    /// Batches that carried both messages and group operations: they shared one fsync.
    pub mixed_batches: u64,
}

#[derive(Default)]
struct WalCounters {
    batches: AtomicU64,
    requests: AtomicU64,
    group_requests: AtomicU64,
    mixed_batches: AtomicU64,
}

impl Shared {
    fn fail(&self, reason: String) {
        self.failure.lock().get_or_insert(reason);
    }

    /// `Unavailable` once a write or fsync failed (see [`Shared::fail`]): the engine takes no
    /// more writes until restart.
    fn usable(&self) -> Result<(), EngineError> {
        match self.failure.lock().as_ref() {
            Some(reason) => Err(EngineError::unavailable(format!(
                "the disk engine has failed: {reason}"
            ))),
            None => Ok(()),
        }
    }

    /// Snapshot records of every persisted stream, then of every consumer group (as durable
    /// now: `groups.rs`). Fails only if a group cannot be encoded (a bug).
    fn snapshot_records(&self) -> std::io::Result<Vec<u8>> {
        let streams = self.streams.all();
        let mut out = Vec::new();
        for s in streams {
            let persisted = s.append.try_lock().map_or(true, |st| st.persisted);
            if persisted {
                writer::snapshot_record(&mut out, &s);
            }
        }
        self.groups
            .snapshot_records(&mut out)
            .map_err(std::io::Error::other)?;
        record::encode_snapshot_end(&mut out);
        Ok(out)
    }

    /// One message per tag left the retained set.
    fn release(&self, tags: &[u64]) {
        if tags.is_empty() {
            return;
        }
        let mut dead = Vec::new();
        {
            let mut segments = self.segments.lock();
            for tag in tags {
                if let Some(live) = segments.get_mut(tag) {
                    *live = live.saturating_sub(1);
                    if *live == 0 {
                        dead.push(*tag);
                    }
                }
            }
        }
        for id in dead {
            self.release_if_dead(id);
        }
    }

    /// Deletes a segment with no retained message, unless it is the one being written.
    fn release_if_dead(&self, id: u64) {
        if id >= self.active_segment.load(Ordering::Acquire) {
            return;
        }
        {
            let mut segments = self.segments.lock();
            if segments.get(&id).is_some_and(|live| *live > 0) {
                return;
            }
            segments.remove(&id);
        }
        self.files.forget(id);
        let path = segment::path(&self.dir.join("wal"), id);
        match fs::remove_file(&path) {
            Ok(()) => tracing::debug!(path = %path.display(), "deleted an expired WAL segment"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not delete an expired WAL segment")
            }
        }
    }
}

/// The embedded durable engine.
pub struct DiskEngine {
    shared: Arc<Shared>,
    config: DiskConfig,
    sink: Sink,
    sessions: Arc<SessionFile>,
    /// When expired sessions were last purged (ms since the Unix epoch).
    sessions_swept: AtomicU64,
    /// The bound on idempotency keys across streams.
    keys: DedupBudget,
    _lock: fs::File,
}

impl DiskEngine {
    /// Opens (or creates) the data directory, recovers every stream from the WAL, and starts
    /// the writer. Fails closed on corruption.
    pub fn open(config: DiskConfig) -> Result<Self, OpenError> {
        let dir = config.dir.clone();
        let wal = dir.join("wal");
        fs::create_dir_all(&wal).map_err(io_err(&wal))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(OpenError::Locked { path: lock_path }),
            Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
        }

        let sessions_path = dir.join(SESSIONS_FILE);
        let sessions = SessionFile::open(&sessions_path, config.max_sessions).map_err(|e| {
            match crate::sessions::damage(e) {
                Ok(why) => OpenError::SessionsDamaged {
                    file: sessions_path.clone(),
                    why,
                    dir: dir.clone(),
                },
                Err(source) => OpenError::Io {
                    path: sessions_path.clone(),
                    source,
                },
            }
        })?;

        let ids = segment::list(&wal).map_err(io_err(&wal))?;
        let mut epochs = repair::EpochMap::load(&dir)?;
        let keys = DedupBudget::new(config.max_idempotency_keys);
        let mut recovery = Recovery::new(&config, &keys);
        let mut progress = RecoveryProgress::start(&wal, &ids);
        for (i, &id) in ids.iter().enumerate() {
            let path = segment::path(&wal, id);
            let is_last = i + 1 == ids.len();
            // Records are applied as they are read: index entries are kept, payloads are not.
            // The first record that cannot be applied fails the open.
            let mut bad: Option<&'static str> = None;
            let mut records = 0;
            let tail = segment::scan_each(&path, is_last, |pos, len, mut record| {
                records += 1;
                if bad.is_some() {
                    return;
                }
                epochs.apply(id, &mut record);
                if let Err(why) = recovery.apply(id, pos, len, record) {
                    bad = Some(why);
                }
            })
            .map_err(io_err(&path))?;
            progress.segment(i, &path, records, recovery.streams.len());
            if let Some(why) = bad {
                return Err(OpenError::Corrupt {
                    file: path,
                    offset: 0,
                    why,
                    dir,
                });
            }
            match tail {
                segment::Tail::Clean => {}
                segment::Tail::Torn { at: 0 } => {
                    tracing::warn!(path = %path.display(), "removing a segment whose header was torn by a crash");
                    fs::remove_file(&path).map_err(io_err(&path))?;
                    continue;
                }
                segment::Tail::Torn { at } => {
                    let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(at);
                    tracing::warn!(
                        path = %path.display(), at, cut = len.saturating_sub(at),
                        "cutting a torn write off the end of the log (an unacknowledged publish interrupted by a crash)"
                    );
                    segment::truncate(&path, at).map_err(io_err(&path))?;
                }
                segment::Tail::Corrupt { at, why } => {
                    return Err(OpenError::Corrupt {
                        file: path,
                        offset: at,
                        why,
                        dir,
                    });
                }
            }
        }
        let reset_marker = dir.join(EPOCH_RESET_MARKER);
        let reset_epochs = reset_marker.exists();
        progress.done(recovery.streams.len());
        let (streams, live, recovered_groups) = recovery.finish(reset_epochs);
        let recovered = streams.len();
        let group_count = recovered_groups.len();
        let groups = groups::Groups::new(config.max_groups, recovered_groups).map_err(|e| {
            OpenError::Io {
                path: wal.clone(),
                source: std::io::Error::other(e),
            }
        })?;
        let shared = Arc::new(Shared {
            streams: Registry::new(
                "disk",
                config.max_streams,
                config.max_unpublished_streams,
                config.clock.clone(),
            ),
            segments: Mutex::new(live),
            active_segment: AtomicU64::new(u64::MAX),
            dir: dir.clone(),
            failure: Mutex::new(None),
            clock: config.clock.clone(),
            groups,
            wal: WalCounters::default(),
            cache: TailCache::new(config.cache_size),
            files: SegmentFiles::new(wal.clone()),
        });
        shared.streams.replace_all(streams);

        // Always continue in a fresh segment that starts with a snapshot of every stream.
        let active = ids.last().map_or(1, |last| last + 1);
        let mut file = segment::create(&wal, active).map_err(io_err(&wal))?;
        let snapshot = shared.snapshot_records().map_err(io_err(&wal))?;
        std::io::Write::write_all(&mut file, &snapshot).map_err(io_err(&wal))?;
        file.sync_data().map_err(io_err(&wal))?;
        shared.active_segment.store(active, Ordering::Release);
        shared.segments.lock().insert(active, 0);
        if reset_epochs {
            fs::remove_file(&reset_marker).map_err(io_err(&reset_marker))?;
            tracing::warn!("every stream started a new epoch after a repair");
        }
        for id in ids {
            shared.release_if_dead(id);
        }
        let oldest = segment::list(&wal).map_err(io_err(&wal))?;
        epochs
            .prune(&dir, oldest.first().copied().unwrap_or(active))
            .map_err(io_err(&dir))?;
        tracing::info!(dir = %dir.display(), streams = recovered, groups = group_count, segment = active, "disk engine opened");

        let writer = Writer {
            shared: shared.clone(),
            dir: wal,
            file,
            segment_id: active,
            segment_len: segment::HEADER_LEN + snapshot.len() as u64,
            segment_start: segment::HEADER_LEN + snapshot.len() as u64,
            segment_max: config.segment_size.max(segment::HEADER_LEN + 1),
            fsync: config.durability == Durability::Fsync,
            roll_failures: 0,
            eviction: history::Eviction::new(),
            buf: Vec::new(),
            bases: Vec::new(),
            #[cfg(test)]
            panic_next: false,
        };
        // An fsync blocks for as long as the disk takes: a thread of its own waits for it.
        // Without one, a commit is a copy into the page cache, written by the appenders.
        let sink = match config.durability {
            Durability::Fsync => {
                let (tx, rx) = mpsc::channel(WRITE_QUEUE);
                std::thread::Builder::new()
                    .name("spool-wal-writer".into())
                    .spawn(move || writer.run(rx))
                    .map_err(io_err(&dir))?;
                Sink::Thread(tx)
            }
            Durability::Memory => Sink::Inline(Inline::new(writer)),
        };
        Ok(Self {
            shared,
            sessions_swept: AtomicU64::new(config.clock.now_ms()),
            config,
            sink,
            sessions: Arc::new(sessions),
            keys,
            _lock: lock,
        })
    }

    /// What the writer has done since the engine opened: how many writes (group commits) it
    /// made and how many requests shared them.
    pub fn wal_stats(&self) -> WalStats {
        let c = &self.shared.wal;
        WalStats {
            batches: c.batches.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            group_requests: c.group_requests.load(Ordering::Relaxed),
            mixed_batches: c.mixed_batches.load(Ordering::Relaxed),
        }
    }

    /// What the tail caches hold now, against their budget (`--cache-size`).
    pub fn cache_stats(&self) -> CacheStats {
        let c = &self.shared.cache;
        CacheStats {
            bytes: c.used(),
            messages: c.count(),
            budget: c.budget(),
        }
    }

    /// A stream not in the WAL yet: the first append writes its epoch record.
    fn new_stream(&self, name: &StreamName) -> DiskStream {
        DiskStream::new(
            name.clone(),
            Epoch::generate(),
            Offset::ZERO,
            self.retention(name),
            false,
        )
    }

    /// Queues frames for the writer; `group` is applied to the groups' durable table once
    /// they are durable. No frames: a barrier, answered once everything before it is durable.
    async fn write(
        &self,
        frames: Vec<u8>,
        publish: Vec<Publish>,
        group: Option<groups::GroupApply>,
    ) -> Result<Durable, EngineError> {
        self.sink.send(frames, publish, group).await
    }
}

impl DiskStream {
    /// The truncation floor (0: never truncated).
    pub(crate) fn floor(&self) -> Offset {
        Offset(self.floor.load(Ordering::Acquire))
    }
}

impl Watched for DiskStream {
    fn watchers(&self) -> usize {
        self.log.lock().watchers()
    }
}

impl DiskStream {
    fn new(
        name: StreamName,
        epoch: Epoch,
        head: Offset,
        retention: Retention,
        persisted: bool,
    ) -> Self {
        Self {
            append: tokio::sync::Mutex::new(AppendState {
                reserved: head,
                dedup: DedupWindow::default(),
                persisted,
            }),
            log: Mutex::new(DiskLog::new(epoch, head, retention)),
            name,
            deleted: Default::default(),
            floor: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl Engine for DiskEngine {
    fn name(&self) -> &'static str {
        "disk"
    }

    async fn append(
        &self,
        name: &StreamName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, EngineError> {
        self.shared.usable()?;
        let (stream, _) = self
            .shared
            .streams
            .get_or_create(name, || self.new_stream(name))?;
        let now = self.config.clock.now_ms();
        let dedup_until = now + self.config.dedup_window.as_millis() as u64;
        let mut state = stream.append.lock().await;
        if stream.deleted.load(Ordering::Acquire) {
            // Deleted while this append waited for the lock: append to what the name is now.
            drop(state);
            return Box::pin(self.append(name, messages)).await;
        }
        let epoch = stream.log.lock().epoch().clone();
        let mut frames = Vec::new();
        if !state.persisted {
            record::encode_stream(&mut frames, name, &epoch, state.reserved);
        }
        let mut out = Vec::with_capacity(messages.len());
        let mut publish = Vec::with_capacity(messages.len());
        let mut newest_duplicate = Offset::ZERO;
        for new in messages {
            if let Some(key) = &new.idempotency_key
                && let Some(original) = state.dedup.get(key, now, &self.keys)
            {
                newest_duplicate = newest_duplicate.max(original.offset);
                out.push(Appended {
                    position: original.clone(),
                    duplicate: true,
                });
                continue;
            }
            let offset = state.reserved.next();
            let (message, key) = new.stamp(offset, now);
            let at = frames.len();
            record::encode_message(&mut frames, name, &message, key.as_deref());
            let len = frames.len() - at;
            state.reserved = offset;
            let position = Position::new(epoch.clone(), offset);
            state
                .dedup
                .remember(key, &position, dedup_until, now, &self.keys);
            publish.push(Publish {
                stream: stream.clone(),
                message: Arc::new(message),
                at,
                len,
            });
            out.push(Appended {
                position,
                duplicate: false,
            });
        }
        // A duplicate's original may still be on its way to disk: then wait for it too (a
        // barrier behind it in the writer's queue), so no ack ever precedes durability.
        let original_pending = newest_duplicate > stream.log.lock().head();
        if frames.is_empty() && !original_pending {
            return Ok(out);
        }
        state.persisted = true;
        let done = self.write(frames, publish, None).await;
        drop(state);
        done?.wait().await?;
        Ok(out)
    }

    async fn read(
        &self,
        name: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<ReadBatch, EngineError> {
        let mut dropped = Vec::new();
        let shared = &self.shared;
        let plan = shared.streams.with_for_reader(
            name,
            || self.new_stream(name),
            |stream| {
                let mut log = stream.log.lock();
                log.trim(self.config.clock.now_ms(), &shared.cache, |s| {
                    dropped.push(s)
                });
                log.plan(after, limit, &shared.files)
            },
        )?;
        shared.release(&dropped);
        let plan = plan?;
        if plan.disk.is_empty() {
            return Ok(ReadBatch {
                state: plan.state,
                messages: plan.cached,
            });
        }
        // Older history from the segments, off the async threads; the handles in the plan
        // keep every segment readable even if retention deletes it meanwhile.
        let stream = name.clone();
        let history::ReadPlan {
            state,
            disk,
            files,
            cached,
        } = plan;
        let mut messages = blocking(move || history::read_disk(&stream, &disk, &files)).await?;
        messages.extend(cached);
        Ok(ReadBatch { state, messages })
    }

    async fn state(&self, name: &StreamName) -> Result<Option<StreamState>, EngineError> {
        let Some(stream) = self.shared.streams.get(name) else {
            return Ok(None);
        };
        let mut log = stream.log.lock();
        let mut dropped = Vec::new();
        log.trim(self.config.clock.now_ms(), &self.shared.cache, |s| {
            dropped.push(s)
        });
        let state = log.state();
        drop(log);
        self.shared.release(&dropped);
        Ok(Some(state))
    }

    async fn watch(&self, name: &StreamName) -> Result<HeadWatch, EngineError> {
        self.shared.streams.with_for_reader(
            name,
            || self.new_stream(name),
            |stream| stream.log.lock().watch(),
        )
    }

    fn retention(&self, name: &StreamName) -> Retention {
        self.config.retention.for_stream(name)
    }

    async fn sweep(&self) -> Result<(), EngineError> {
        let streams = self.shared.streams.all();
        let now = self.config.clock.now_ms();
        let mut dropped = Vec::new();
        for s in streams {
            s.log
                .lock()
                .trim(now, &self.shared.cache, |seg| dropped.push(seg));
            if let Ok(mut state) = s.append.try_lock() {
                state.dedup.expire(now, &self.keys);
            }
        }
        self.shared.release(&dropped);
        self.shared.streams.prune_unpublished();
        let last = self.sessions_swept.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= SESSION_SWEEP_MS {
            self.sessions_swept.store(now, Ordering::Relaxed);
            let sessions = self.sessions.clone();
            blocking(move || sessions.expire(now)).await?;
        }
        Ok(())
    }

    async fn exists(&self, name: &StreamName) -> Result<bool, EngineError> {
        Ok(self.shared.streams.get(name).is_some())
    }

    fn stream_counts(&self) -> Option<StreamCounts> {
        Some(self.shared.streams.counts())
    }

    fn admin(&self) -> Option<&dyn spool_engine::StreamAdmin> {
        Some(self)
    }

    async fn ready(&self) -> Result<(), EngineError> {
        self.shared.usable()
    }
}

/// Sessions in `sessions.redb` beside the log ([`SessionFile`]); `sweep` forgets the expired
/// ones once a minute.
#[async_trait]
impl SessionStore for DiskEngine {
    async fn save_sessions(&self, records: Vec<SessionRecord>) -> Result<Vec<String>, EngineError> {
        let sessions = self.sessions.clone();
        let now = self.config.clock.now_ms();
        blocking(move || sessions.save(&records, now)).await
    }

    async fn load_session(&self, id: &str) -> Result<Option<bytes::Bytes>, EngineError> {
        let sessions = self.sessions.clone();
        let id = id.to_owned();
        let now = self.config.clock.now_ms();
        blocking(move || sessions.load(&id, now)).await
    }

    async fn delete_session(&self, id: &str) -> Result<(), EngineError> {
        let sessions = self.sessions.clone();
        let id = id.to_owned();
        blocking(move || sessions.delete(&id)).await
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::internal_from("a blocking task failed", e))?
}

/// Recovery's progress in the log: where it starts, at most one line a second while it reads
/// segments (streams, records and bytes so far), and what it recovered.
struct RecoveryProgress {
    started: std::time::Instant,
    logged: std::time::Instant,
    segments: usize,
    total_bytes: u64,
    records: u64,
    bytes: u64,
}

impl RecoveryProgress {
    fn start(wal: &Path, ids: &[u64]) -> Self {
        let total_bytes = ids
            .iter()
            .filter_map(|&id| fs::metadata(segment::path(wal, id)).ok())
            .map(|m| m.len())
            .sum();
        tracing::info!(
            segments = ids.len(),
            bytes = total_bytes,
            "recovering: reading the WAL"
        );
        let now = std::time::Instant::now();
        Self {
            started: now,
            logged: now,
            segments: ids.len(),
            total_bytes,
            records: 0,
            bytes: 0,
        }
    }

    fn segment(&mut self, index: usize, path: &Path, records: usize, streams: usize) {
        self.records += records as u64;
        self.bytes += fs::metadata(path).map_or(0, |m| m.len());
        if self.logged.elapsed() >= std::time::Duration::from_secs(1) {
            self.logged = std::time::Instant::now();
            tracing::info!(
                segment = index + 1,
                of = self.segments,
                streams,
                records = self.records,
                bytes = self.bytes,
                total_bytes = self.total_bytes,
                "recovering"
            );
        }
    }

    fn done(&self, streams: usize) {
        tracing::info!(
            streams,
            records = self.records,
            bytes = self.bytes,
            segments = self.segments,
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "recovered"
        );
    }
}

/// Rebuilds streams from records, in WAL order.
struct Recovery<'a> {
    config: &'a DiskConfig,
    keys: &'a DedupBudget,
    streams: HashMap<StreamName, Rebuilt>,
    live: HashMap<u64, u64>,
    now: u64,
    groups: groups::GroupRecovery,
    /// Recovery caches nothing: only an empty budget to pass around.
    cache: TailCache,
    /// The streams the snapshot of segment `.0` restated so far: at its `SnapshotEnd` they are
    /// every stream there is (one deleted in a segment that is gone stays deleted).
    restated: (u64, std::collections::HashSet<StreamName>),
}

struct Rebuilt {
    log: DiskLog,
    dedup: DedupWindow,
    /// An operator's truncation floor (`StreamTruncated`), restated by later snapshots.
    floor: Offset,
}

impl<'a> Recovery<'a> {
    fn new(config: &'a DiskConfig, keys: &'a DedupBudget) -> Self {
        Self {
            config,
            keys,
            streams: HashMap::new(),
            live: HashMap::new(),
            now: config.clock.now_ms(),
            groups: groups::GroupRecovery::default(),
            cache: TailCache::new(0),
            restated: (u64::MAX, Default::default()),
        }
    }

    /// Applies the record whose frame is `len` bytes at byte `pos` of `segment`.
    fn apply(
        &mut self,
        segment: u64,
        pos: u64,
        len: usize,
        record: Record,
    ) -> Result<(), &'static str> {
        let Recovery {
            config,
            keys,
            streams,
            live,
            now,
            groups,
            cache,
            restated,
        } = self;
        if let Record::Stream { name, .. } = &record {
            if restated.0 != segment {
                *restated = (segment, Default::default());
            }
            restated.1.insert(name.clone());
        }
        let new_log = |name: &StreamName, epoch, head| {
            DiskLog::new(epoch, head, config.retention.for_stream(name))
        };
        match record {
            Record::Stream { name, epoch, head } => match streams.get_mut(&name) {
                Some(s) if *s.log.epoch() == epoch => {
                    if head > s.log.head() {
                        // Messages up to `head` existed but went with deleted segments.
                        s.log.skip_to(head, cache, |seg| release(live, seg));
                    }
                }
                Some(s) => {
                    s.log.skip_to(Offset::ZERO, cache, |seg| release(live, seg));
                    *s = Rebuilt {
                        log: new_log(&name, epoch, head),
                        dedup: DedupWindow::default(),
                        floor: Offset::ZERO,
                    };
                }
                None => {
                    let log = new_log(&name, epoch, head);
                    streams.insert(
                        name,
                        Rebuilt {
                            log,
                            dedup: DedupWindow::default(),
                            floor: Offset::ZERO,
                        },
                    );
                }
            },
            Record::Message {
                name,
                message,
                idempotency_key,
            } => {
                let Some(s) = streams.get_mut(&name) else {
                    return Err("a message for a stream whose epoch record is missing");
                };
                if message.offset <= s.log.head() {
                    return Ok(());
                }
                if message.offset > s.log.head().next() {
                    s.log
                        .skip_to(Offset(message.offset.get() - 1), cache, |seg| {
                            release(live, seg)
                        });
                }
                let window = config.dedup_window.as_millis() as u64;
                if let Some(key) = idempotency_key
                    && message.time_ms + window > *now
                {
                    let position = Position::new(s.log.epoch().clone(), message.offset);
                    s.dedup
                        .insert(key, position, message.time_ms + window, *now, keys);
                }
                s.log
                    .push_slot(message.offset, Slot::new(segment, pos, len, &message));
                *live.entry(segment).or_insert(0) += 1;
            }
            Record::GroupPut {
                version,
                snapshot,
                changes,
            } => groups.put(segment, version, snapshot, changes),
            Record::GroupCommit {
                stream,
                group,
                id,
                version,
                changes,
            } => groups.commit(stream, group, id, version, changes),
            Record::GroupDeleted { stream, group } => groups.delete(stream, group),
            Record::SnapshotEnd => {
                groups.snapshot_end(segment);
                let names = if restated.0 == segment {
                    std::mem::take(&mut restated.1)
                } else {
                    Default::default()
                };
                streams.retain(|name, s| {
                    let keep = names.contains(name);
                    if !keep {
                        s.log.skip_to(Offset::ZERO, cache, |seg| release(live, seg));
                    }
                    keep
                });
            }
            Record::StreamDeleted { name, epoch } => {
                if let Some(mut s) = streams.remove(&name) {
                    if *s.log.epoch() == epoch {
                        s.log.skip_to(Offset::ZERO, cache, |seg| release(live, seg));
                    } else {
                        streams.insert(name, s);
                    }
                }
            }
            Record::StreamTruncated {
                name,
                epoch,
                before,
            } => {
                if let Some(s) = streams.get_mut(&name)
                    && *s.log.epoch() == epoch
                {
                    s.log.drop_before(before, cache, |seg| release(live, seg));
                    s.floor = s.floor.max(before);
                }
            }
        }
        Ok(())
    }

    /// Applies retention and builds the engine's streams; with `reset_epochs`, every stream
    /// starts a new, empty history.
    #[allow(clippy::type_complexity)]
    fn finish(
        self,
        reset_epochs: bool,
    ) -> (
        HashMap<StreamName, Arc<DiskStream>>,
        HashMap<u64, u64>,
        Vec<spool_engine::store::StoredGroup>,
    ) {
        let Recovery {
            config,
            streams: rebuilt,
            mut live,
            now,
            groups,
            cache,
            ..
        } = self;
        let mut streams = HashMap::with_capacity(rebuilt.len());
        for (name, mut r) in rebuilt {
            if reset_epochs {
                r.log
                    .skip_to(Offset::ZERO, &cache, |seg| release(&mut live, seg));
                r.log = DiskLog::new(
                    Epoch::generate(),
                    Offset::ZERO,
                    config.retention.for_stream(&name),
                );
                r.dedup = DedupWindow::default();
                r.floor = Offset::ZERO;
            }
            r.log.trim(now, &cache, |seg| release(&mut live, seg));
            let head = r.log.head();
            let stream = DiskStream {
                append: tokio::sync::Mutex::new(AppendState {
                    reserved: head,
                    dedup: r.dedup,
                    persisted: true,
                }),
                log: Mutex::new(r.log),
                name: name.clone(),
                deleted: Default::default(),
                floor: AtomicU64::new(r.floor.get()),
            };
            streams.insert(name, Arc::new(stream));
        }
        (streams, live, groups.finish())
    }
}

fn release(live: &mut HashMap<u64, u64>, tag: u64) {
    if let Some(n) = live.get_mut(&tag) {
        *n = n.saturating_sub(1);
    }
}

/// Stream administration on disk: a delete is a `StreamDeleted` record and a truncate a
/// `StreamTruncated` record, each written through the writer (durable like a publish) under
/// the stream's append lock before memory changes, and replayed by recovery; a snapshot
/// restates what survives (`SnapshotEnd` drops streams it does not name, `StreamTruncated`
/// follows a truncated stream's record), so an older segment never brings either back.
#[async_trait]
impl spool_engine::StreamAdmin for DiskEngine {
    async fn list_streams(
        &self,
        prefix: &str,
        after: Option<&StreamName>,
        limit: usize,
    ) -> Result<Vec<spool_engine::StreamSummary>, EngineError> {
        Ok(self
            .shared
            .streams
            .page(prefix, after, limit)
            .into_iter()
            .map(|(name, s)| self.summary(name, &s))
            .collect())
    }

    async fn describe_stream(
        &self,
        stream: &StreamName,
    ) -> Result<Option<spool_engine::StreamSummary>, EngineError> {
        Ok(self
            .shared
            .streams
            .get(stream)
            .map(|s| self.summary(stream.clone(), &s)))
    }

    async fn delete_stream(&self, name: &StreamName) -> Result<bool, EngineError> {
        self.shared.usable()?;
        let Some(stream) = self.shared.streams.get(name) else {
            return Ok(false);
        };
        let state = stream.append.lock().await;
        if stream.deleted.load(Ordering::Acquire) {
            return Ok(false);
        }
        if state.persisted {
            let epoch = stream.log.lock().epoch().clone();
            let mut frames = Vec::new();
            record::encode_stream_deleted(&mut frames, name, &epoch);
            let done = self.write(frames, Vec::new(), None).await;
            done?.wait().await?;
        }
        stream.deleted.store(true, Ordering::Release);
        self.shared.streams.remove(name);
        drop(state);
        let mut dropped = Vec::new();
        stream
            .log
            .lock()
            .skip_to(Offset::ZERO, &self.shared.cache, |seg| dropped.push(seg));
        self.shared.release(&dropped);
        Ok(true)
    }

    async fn truncate_stream(
        &self,
        name: &StreamName,
        before: Offset,
    ) -> Result<Option<StreamState>, EngineError> {
        self.shared.usable()?;
        let Some(stream) = self.shared.streams.get(name) else {
            return Ok(None);
        };
        let state = stream.append.lock().await;
        if stream.deleted.load(Ordering::Acquire) {
            return Ok(None);
        }
        // Everything reserved is on its way: wait for it so the floor is below nothing new.
        let epoch = stream.log.lock().epoch().clone();
        let before = before.min(state.reserved.next());
        if state.persisted && before > stream.floor() {
            // The floor first: a segment rolled from now on restates it.
            stream.floor.fetch_max(before.get(), Ordering::AcqRel);
            let mut frames = Vec::new();
            record::encode_stream_truncated(&mut frames, name, &epoch, before);
            let done = self.write(frames, Vec::new(), None).await;
            done?.wait().await?;
        }
        drop(state);
        let mut dropped = Vec::new();
        let mut log = stream.log.lock();
        log.drop_before(before, &self.shared.cache, |seg| dropped.push(seg));
        let after = log.state();
        drop(log);
        self.shared.release(&dropped);
        Ok(Some(after))
    }
}

impl DiskEngine {
    fn summary(&self, name: StreamName, stream: &DiskStream) -> spool_engine::StreamSummary {
        let mut dropped = Vec::new();
        let mut log = stream.log.lock();
        log.trim(self.config.clock.now_ms(), &self.shared.cache, |seg| {
            dropped.push(seg)
        });
        let summary = spool_engine::StreamSummary {
            name,
            state: log.state(),
            retained_messages: log.index.len() as u64,
            retained_bytes: log.index.retained_bytes(),
            last_publish_ms: log.index.newest().map(spool_engine::log::Retained::time_ms),
            watchers: log.watchers() as u64,
        };
        drop(log);
        self.shared.release(&dropped);
        summary
    }
}
