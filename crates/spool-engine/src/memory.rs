//! The in-memory engine: history lives in this process and is gone when it exits, so every
//! start gives every stream a new epoch (readers holding old positions get a reset, never a
//! silent gap).
//!
//! Each stream is a `VecDeque` of shared messages behind its own mutex. The critical sections
//! are a few pointer moves with no I/O or await inside, so a lock per stream is both simpler
//! and faster here than a task per stream; the disk engine, whose appends wait on fsync, uses
//! a writer task instead.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use parking_lot::Mutex;
use spool_core::{
    Clock, Epoch, NewMessage, Offset, Position, Retention, RetentionPolicy, StreamName, StreamState,
};

use spool_core::group::{Change, GroupName, GroupSnapshot};

use crate::{
    Appended, Committed, Engine, EngineError, GroupStore, HeadWatch, ReadBatch, SessionRecord,
    SessionStore, StoredGroup, StreamAdmin, StreamCounts, StreamSummary,
    dedup::{DedupBudget, DedupWindow},
    groups::GroupTable,
    registry::{Registry, Watched},
    sessions::SessionTable,
};

/// Settings of the memory engine.
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    pub retention: RetentionPolicy,
    /// How long an idempotency key is remembered.
    pub dedup_window: Duration,
    /// The most idempotency keys remembered across all streams; past it the oldest are
    /// forgotten early (`dedup.rs`).
    pub max_idempotency_keys: usize,
    /// The most WebSocket sessions kept; past it new sessions are not saved.
    pub max_sessions: usize,
    /// The most streams the engine will create (streams something was published to).
    pub max_streams: usize,
    /// The most streams readers may wait on before anything is published to them (held in
    /// memory while watched, never counted in `max_streams`).
    pub max_unpublished_streams: usize,
    /// The most consumer groups kept (`--max-groups`).
    pub max_groups: usize,
    /// What every expiry here is decided by: retention's age, idempotency keys, sessions,
    /// placeholders. The system clock but in tests.
    pub clock: Clock,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            retention: RetentionPolicy::default(),
            dedup_window: Duration::from_secs(120),
            max_idempotency_keys: crate::dedup::DEFAULT_MAX_KEYS,
            max_sessions: crate::sessions::MAX_SESSIONS,
            max_streams: 1_000_000,
            max_unpublished_streams: 100_000,
            max_groups: crate::groups::MAX_GROUPS,
            clock: Clock::system(),
        }
    }
}

/// History in memory; see the module docs.
pub struct MemoryEngine {
    config: MemoryConfig,
    streams: Registry<Mutex<StreamLog>>,
    sessions: SessionTable,
    groups: GroupTable,
    keys: DedupBudget,
}

struct StreamLog {
    log: crate::log::StreamLog,
    dedup: DedupWindow,
}

impl StreamLog {
    fn new(retention: Retention) -> Self {
        Self {
            log: crate::log::StreamLog::new(Epoch::generate(), Offset::ZERO, retention),
            dedup: DedupWindow::default(),
        }
    }
}

impl Watched for Mutex<StreamLog> {
    fn watchers(&self) -> usize {
        self.lock().log.watchers()
    }
}

impl MemoryEngine {
    pub fn new(config: MemoryConfig) -> Self {
        Self {
            streams: Registry::new(
                "memory",
                config.max_streams,
                config.max_unpublished_streams,
                config.clock.clone(),
            ),
            keys: DedupBudget::new(config.max_idempotency_keys),
            sessions: SessionTable::new(config.max_sessions),
            groups: GroupTable::new(config.max_groups),
            config,
        }
    }

    fn now_ms(&self) -> u64 {
        self.config.clock.now_ms()
    }

    fn new_stream(&self, name: &StreamName) -> Mutex<StreamLog> {
        Mutex::new(StreamLog::new(self.retention(name)))
    }
}

#[async_trait]
impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn append(
        &self,
        stream: &StreamName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, EngineError> {
        let (log, _) = self
            .streams
            .get_or_create(stream, || self.new_stream(stream))?;
        let now = self.now_ms();
        let dedup_until = now + self.config.dedup_window.as_millis() as u64;
        let mut guard = log.lock();
        let StreamLog { log, dedup } = &mut *guard;
        let mut out = Vec::with_capacity(messages.len());
        for new in messages {
            if let Some(key) = &new.idempotency_key
                && let Some(original) = dedup.get(key, now, &self.keys)
            {
                out.push(Appended {
                    position: original.clone(),
                    duplicate: true,
                });
                continue;
            }
            let offset = log.head().next();
            let (message, key) = new.stamp(offset, now);
            log.push(Arc::new(message), 0);
            let position = Position::new(log.epoch().clone(), offset);
            dedup.remember(key, &position, dedup_until, now, &self.keys);
            out.push(Appended {
                position,
                duplicate: false,
            });
        }
        log.trim(now, |_| {});
        log.notify();
        Ok(out)
    }

    async fn read(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<ReadBatch, EngineError> {
        self.streams.with_for_reader(
            stream,
            || self.new_stream(stream),
            |log| {
                let mut guard = log.lock();
                guard.log.trim(self.now_ms(), |_| {});
                ReadBatch {
                    state: guard.log.state(),
                    messages: guard.log.read(after, limit),
                }
            },
        )
    }

    async fn state(&self, stream: &StreamName) -> Result<Option<StreamState>, EngineError> {
        let Some(log) = self.streams.get(stream) else {
            return Ok(None);
        };
        let mut guard = log.lock();
        guard.log.trim(self.now_ms(), |_| {});
        Ok(Some(guard.log.state()))
    }

    async fn watch(&self, stream: &StreamName) -> Result<HeadWatch, EngineError> {
        self.streams
            .with_for_reader(stream, || self.new_stream(stream), |s| s.lock().log.watch())
    }

    fn retention(&self, stream: &StreamName) -> Retention {
        self.config.retention.for_stream(stream)
    }

    async fn sweep(&self) -> Result<(), EngineError> {
        let logs = self.streams.all();
        let now = self.now_ms();
        for log in logs {
            let mut guard = log.lock();
            guard.log.trim(now, |_| {});
            guard.dedup.expire(now, &self.keys);
        }
        self.streams.prune_unpublished();
        self.sessions.expire(now);
        Ok(())
    }

    async fn exists(&self, stream: &StreamName) -> Result<bool, EngineError> {
        Ok(self.streams.get(stream).is_some())
    }

    fn stream_counts(&self) -> Option<StreamCounts> {
        Some(self.streams.counts())
    }

    fn admin(&self) -> Option<&dyn StreamAdmin> {
        Some(self)
    }
}

impl MemoryEngine {
    fn summary(&self, name: StreamName, log: &Mutex<StreamLog>) -> StreamSummary {
        let mut guard = log.lock();
        guard.log.trim(self.now_ms(), |_| {});
        let (retained_messages, retained_bytes, last_publish_ms) = guard.log.retained_summary();
        StreamSummary {
            name,
            state: guard.log.state(),
            retained_messages,
            retained_bytes,
            last_publish_ms,
            watchers: guard.log.watchers() as u64,
        }
    }
}

/// Streams in the registry: a delete removes the entry (its watchers find the stream unknown
/// and the next append makes it in a new epoch), a truncate drops the log's front.
#[async_trait]
impl StreamAdmin for MemoryEngine {
    async fn list_streams(
        &self,
        prefix: &str,
        after: Option<&StreamName>,
        limit: usize,
    ) -> Result<Vec<StreamSummary>, EngineError> {
        Ok(self
            .streams
            .page(prefix, after, limit)
            .into_iter()
            .map(|(name, log)| self.summary(name, &log))
            .collect())
    }

    async fn describe_stream(
        &self,
        stream: &StreamName,
    ) -> Result<Option<StreamSummary>, EngineError> {
        Ok(self
            .streams
            .get(stream)
            .map(|log| self.summary(stream.clone(), &log)))
    }

    async fn delete_stream(&self, stream: &StreamName) -> Result<bool, EngineError> {
        Ok(self.streams.remove(stream).is_some())
    }

    async fn truncate_stream(
        &self,
        stream: &StreamName,
        before: Offset,
    ) -> Result<Option<StreamState>, EngineError> {
        let Some(log) = self.streams.get(stream) else {
            return Ok(None);
        };
        let mut guard = log.lock();
        guard.log.truncate_before(before, |_| {});
        Ok(Some(guard.log.state()))
    }
}

/// Sessions in a [`SessionTable`] beside the streams; `sweep` forgets the expired ones.
#[async_trait]
impl SessionStore for MemoryEngine {
    async fn save_sessions(
        &self,
        sessions: Vec<SessionRecord>,
    ) -> Result<Vec<String>, EngineError> {
        self.sessions.save(sessions, self.now_ms())
    }

    async fn load_session(&self, id: &str) -> Result<Option<bytes::Bytes>, EngineError> {
        Ok(self.sessions.load(id, self.now_ms()))
    }

    async fn delete_session(&self, id: &str) -> Result<(), EngineError> {
        self.sessions.delete(id);
        Ok(())
    }
}

// Offsets, reads, idempotency and watches are checked for every engine by
// `crate::conformance`; these are the memory engine's own limits.
#[async_trait]
impl GroupStore for MemoryEngine {
    async fn create_group(&self, snapshot: &GroupSnapshot) -> Result<bool, EngineError> {
        self.groups.create(snapshot)
    }

    async fn load_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Option<StoredGroup>, EngineError> {
        Ok(self.groups.load(stream, group))
    }

    async fn list_groups(
        &self,
        stream: Option<&StreamName>,
    ) -> Result<Vec<(StreamName, GroupName)>, EngineError> {
        Ok(self.groups.list(stream))
    }

    async fn commit_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        expected: u64,
        changes: &[Change],
    ) -> Result<Committed, EngineError> {
        Ok(self.groups.commit(stream, group, expected, changes))
    }

    async fn compact_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        version: u64,
        snapshot: &GroupSnapshot,
    ) -> Result<Committed, EngineError> {
        Ok(self.groups.compact(stream, group, version, snapshot))
    }

    async fn delete_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<bool, EngineError> {
        Ok(self.groups.delete(stream, group))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn name(s: &str) -> StreamName {
        StreamName::new(s).unwrap()
    }

    fn msg(s: &'static str) -> NewMessage {
        NewMessage {
            payload: Bytes::from_static(s.as_bytes()),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn retention_by_count_and_bytes() {
        let mut config = MemoryConfig::default();
        config.retention.default.max_messages = 2;
        let engine = MemoryEngine::new(config);
        let s = name("a");
        engine
            .append(&s, vec![msg("1"), msg("2"), msg("3")])
            .await
            .unwrap();
        let state = engine.state(&s).await.unwrap().unwrap();
        assert_eq!((state.oldest, state.head), (Offset(2), Offset(3)));
        assert!(
            engine
                .read(&s, Offset(0), 10)
                .await
                .unwrap()
                .messages
                .is_empty()
        );

        let mut config = MemoryConfig::default();
        config.retention.default.max_bytes = 5;
        let engine = MemoryEngine::new(config);
        engine
            .append(&s, vec![msg("abc"), msg("def")])
            .await
            .unwrap();
        let state = engine.state(&s).await.unwrap().unwrap();
        assert_eq!((state.oldest, state.head), (Offset(2), Offset(2)));
    }

    /// `--max-sessions` through the store as the server holds it: a new session past the bound
    /// is refused with `Limit`, a stored one is still saved in the same batch.
    #[tokio::test]
    async fn session_limit_through_the_session_store() {
        let store: Arc<dyn SessionStore> = Arc::new(MemoryEngine::new(MemoryConfig {
            max_sessions: 1,
            ..MemoryConfig::default()
        }));
        let record = |id: &str, data: &'static str| SessionRecord {
            id: id.into(),
            data: Bytes::from_static(data.as_bytes()),
            expires_at: spool_core::now_ms() + 60_000,
            holder: 0,
            take_over: false,
        };
        store.save_sessions(vec![record("a", "1")]).await.unwrap();
        let err = store
            .save_sessions(vec![record("b", "1"), record("a", "2")])
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::Limit(crate::Limit::Sessions { max: 1, refused: 1 })
            ),
            "{err:?}"
        );
        assert_eq!(store.load_session("a").await.unwrap().unwrap(), "2");
        assert!(store.load_session("b").await.unwrap().is_none());
        store.delete_session("a").await.unwrap();
        store.save_sessions(vec![record("b", "1")]).await.unwrap();
        assert_eq!(store.load_session("b").await.unwrap().unwrap(), "1");
    }

    #[tokio::test]
    async fn stream_limit_is_an_error_not_a_crash() {
        let engine = MemoryEngine::new(MemoryConfig {
            max_streams: 1,
            ..MemoryConfig::default()
        });
        engine.append(&name("a"), vec![msg("1")]).await.unwrap();
        let err = engine.append(&name("b"), vec![msg("1")]).await.unwrap_err();
        assert!(matches!(
            err,
            EngineError::StreamLimit(crate::StreamLimit::Streams { max: 1, .. })
        ));
        assert!(engine.state(&name("b")).await.unwrap().is_none());
        // The stream that exists goes on; reads of others still work.
        engine.append(&name("a"), vec![msg("2")]).await.unwrap();
        assert!(engine.read(&name("c"), Offset(0), 10).await.is_ok());
        assert_eq!(engine.stream_counts().unwrap().refused, 1);
    }

    #[tokio::test]
    async fn group_store_conforms() {
        crate::group_conformance::run(&MemoryEngine::new(MemoryConfig::default())).await;
    }

    #[tokio::test]
    async fn groups_are_bounded() {
        let engine = MemoryEngine::new(MemoryConfig {
            max_groups: 1,
            ..MemoryConfig::default()
        });
        let at = StreamState::empty(Epoch::generate());
        let make = |g: &str| {
            spool_core::group::GroupState::new(
                name("s"),
                spool_core::group::GroupName::new(g).unwrap(),
                spool_core::group::GroupConfig::default(),
                &at,
                0,
            )
            .unwrap()
            .snapshot()
        };
        assert!(engine.create_group(&make("a")).await.unwrap());
        let err = engine.create_group(&make("b")).await.unwrap_err();
        assert!(
            matches!(err, EngineError::Limit(crate::Limit::Groups { max: 1 })),
            "{err:?}"
        );
        // The one that exists is still "already there", not a limit.
        assert!(!engine.create_group(&make("a")).await.unwrap());
    }

    /// Every expiry the memory engine decides — retention's age, idempotency keys, sessions —
    /// follows its clock: moved by the test, never slept through.
    #[tokio::test]
    async fn expiry_follows_the_engine_clock() {
        let time = spool_core::ManualClock::new(1_000_000);
        let mut config = MemoryConfig {
            dedup_window: Duration::from_secs(120),
            clock: time.clock(),
            ..MemoryConfig::default()
        };
        config.retention.default.max_age = Duration::from_secs(3600);
        let engine = MemoryEngine::new(config);
        let s = name("aging");
        let keyed = |key: &str| NewMessage {
            idempotency_key: Some(key.into()),
            ..msg("k")
        };

        let first = engine.append(&s, vec![keyed("once")]).await.unwrap();
        assert_eq!(first[0].position.offset, Offset(1));
        let batch = engine.read(&s, Offset(0), 10).await.unwrap();
        assert_eq!(batch.messages[0].time_ms, 1_000_000, "stamped by the clock");

        // Inside the idempotency window a retry is a duplicate; past it, a new message.
        time.advance(Duration::from_secs(119));
        let retry = engine.append(&s, vec![keyed("once")]).await.unwrap();
        assert!(retry[0].duplicate);
        time.advance(Duration::from_secs(2));
        engine.sweep().await.unwrap();
        let later = engine.append(&s, vec![keyed("once")]).await.unwrap();
        assert_eq!(
            (later[0].duplicate, later[0].position.offset),
            (false, Offset(2))
        );

        // Retention by age: offset 1 (t0) goes once it is older than an hour; 2 (t0+121s) stays.
        time.advance(Duration::from_secs(3600 - 121));
        engine.sweep().await.unwrap();
        assert_eq!(engine.state(&s).await.unwrap().unwrap().oldest, Offset(1));
        time.advance(Duration::from_millis(1));
        engine.sweep().await.unwrap();
        let state = engine.state(&s).await.unwrap().unwrap();
        assert_eq!((state.oldest, state.head), (Offset(2), Offset(2)));

        // A session lives until its expiry and not a millisecond more.
        let expires_at = time.now_ms() + 60_000;
        engine
            .save_sessions(vec![SessionRecord {
                id: "s1".into(),
                data: Bytes::from_static(b"cursor"),
                expires_at,
                holder: 0,
                take_over: false,
            }])
            .await
            .unwrap();
        time.set(expires_at - 1);
        assert!(engine.load_session("s1").await.unwrap().is_some());
        time.set(expires_at);
        assert!(engine.load_session("s1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn reads_and_watches_create_no_stream() {
        let time = spool_core::ManualClock::new(1_000_000);
        let engine = MemoryEngine::new(MemoryConfig {
            clock: time.clock(),
            ..MemoryConfig::default()
        });
        let s = name("never-published");
        let watch = engine.watch(&s).await.unwrap();
        let read = engine.read(&s, Offset(0), 10).await.unwrap();
        assert_eq!(
            read.state.epoch,
            watch.borrow().epoch,
            "one placeholder epoch"
        );
        assert!(engine.state(&s).await.unwrap().is_none());
        assert!(!engine.exists(&s).await.unwrap());
        let counts = engine.stream_counts().unwrap();
        assert_eq!((counts.streams, counts.unpublished), (0, 1));
        // The first append adopts the epoch the reader waits in.
        let out = engine.append(&s, vec![msg("1")]).await.unwrap();
        assert_eq!(out[0].position, Position::new(read.state.epoch, Offset(1)));
        assert_eq!(watch.borrow().offset, Offset(1));
        let counts = engine.stream_counts().unwrap();
        assert_eq!((counts.streams, counts.unpublished), (1, 0));

        // A placeholder nobody watches is dropped after its linger; a reader coming back with
        // its position then gets a reset (another epoch at head 0: `unknown_stream`).
        let other = name("read-once");
        let gone = engine.watch(&other).await.unwrap().borrow().clone();
        engine.streams.prune_unpublished();
        assert_eq!(engine.stream_counts().unwrap().unpublished, 1, "lingers");
        time.advance(Duration::from_millis(crate::registry::LINGER_MS));
        engine.streams.prune_unpublished();
        assert_eq!(engine.stream_counts().unwrap().unpublished, 0);
        let again = engine.read(&other, Offset(0), 10).await.unwrap().state;
        assert_ne!(again.epoch, gone.epoch);
        assert_eq!(
            spool_core::continuity::decide(&spool_core::Start::After(gone), &again),
            spool_core::continuity::Decision::Reset {
                reason: spool_core::ResetReason::UnknownStream,
                head: again.head_position(),
            }
        );
    }
}
