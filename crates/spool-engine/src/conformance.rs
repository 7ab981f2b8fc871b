//! The engine conformance suite: the contract of [`Engine`] and of the stores beside it
//! ([`SessionStore`]; SPEC §2–§4 at the storage layer) as one set of checks that every engine
//! runs from the same code — memory here, the disk, Redis and NATS JetStream engines in their
//! own crates' tests.
//!
//! An engine's test supplies a [`Backend`]: a way to make a fresh, isolated namespace (a temp
//! dir, a key prefix, a stream-name prefix) and to open nodes on it. For a cluster engine every
//! [`Namespace::node`] (or [`Namespace::session_store`]) call is a new engine instance sharing
//! the namespace's data, as a second Spool node would; for a single-node engine it is the same
//! instance again. The suite then checks what holds for every engine, and the cross-node cases
//! where nodes share data. The session cases use only [`Namespace::session_store`], so they
//! check the store through its own trait, as the server holds it.
//!
//! Enabled with the `conformance` feature (for dev-dependencies only).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use spool_core::{NewMessage, Offset, RetentionPolicy, StreamName};

use crate::{Engine, SessionRecord, SessionStore};

/// Settings a case asks its namespace's engines to run with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub retention: RetentionPolicy,
    pub dedup_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            retention: RetentionPolicy::default(),
            dedup_window: Duration::from_secs(120),
        }
    }
}

/// A session record for a test: `data of <id>`, expiring at `expires_at`.
pub fn session_record(id: &str, expires_at: u64) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        data: Bytes::from(format!("data of {id}")),
        expires_at,
        holder: 0,
        take_over: false,
    }
}

/// How an engine under test is opened.
#[async_trait]
pub trait Backend: Send + Sync {
    /// A fresh namespace no other case (or test run) uses.
    async fn namespace(&self, settings: Settings) -> Box<dyn Namespace>;
}

/// One isolated place to keep streams, and the nodes on it.
#[async_trait]
pub trait Namespace: Send + Sync {
    /// An engine on this namespace: a new instance sharing its data for a cluster engine, the
    /// same instance again for a single-node one.
    async fn node(&self) -> Arc<dyn Engine>;

    /// The session store of a node on this namespace: a new instance sharing its data for a
    /// cluster engine (as [`Namespace::node`]), the same one again for a single-node engine.
    async fn session_store(&self) -> Arc<dyn SessionStore>;

    /// Whether [`Namespace::node`] gives distinct instances that share data (a cluster).
    fn clustered(&self) -> bool;
}

/// The namespace of a single-node engine: every node is the same instance, its log and its
/// session store. `keep` is held until the namespace drops (e.g. the temp dir the engine lives
/// in).
pub struct SingleNode {
    engine: Arc<dyn Engine>,
    sessions: Arc<dyn SessionStore>,
    _keep: Box<dyn std::any::Any + Send + Sync>,
}

impl SingleNode {
    /// A namespace of `engine` (the log and the session store), keeping `keep` alive as long
    /// as it.
    pub fn new<E: Engine + SessionStore>(
        engine: Arc<E>,
        keep: impl std::any::Any + Send + Sync,
    ) -> Self {
        Self {
            sessions: engine.clone(),
            engine,
            _keep: Box::new(keep),
        }
    }
}

#[async_trait]
impl Namespace for SingleNode {
    async fn node(&self) -> Arc<dyn Engine> {
        self.engine.clone()
    }
    async fn session_store(&self) -> Arc<dyn SessionStore> {
        self.sessions.clone()
    }
    fn clustered(&self) -> bool {
        false
    }
}

/// Runs every case; panics (with the case's name) at the first broken guarantee.
pub async fn run(backend: &dyn Backend) {
    offsets_are_gap_free_and_reads_are_ranges(backend).await;
    a_watched_unknown_stream_keeps_its_epoch_for_the_first_publish(backend).await;
    retention_keeps_the_newest_by_count(backend).await;
    idempotency_keys_answer_the_original_position(backend).await;
    watchers_see_the_head_move(backend).await;
    a_watch_set_up_while_another_node_publishes_misses_nothing(backend).await;
    sessions_are_kept_until_they_expire(backend).await;
    a_session_taken_over_refuses_its_old_holder(backend).await;
    concurrent_appends_from_every_node_get_unique_gap_free_offsets(backend).await;
    reads_never_see_holes_while_appends_run(backend).await;
}

/// The stream administration contract ([`crate::StreamAdmin`]), for engines that support it:
/// listing by prefix in name order with cursor pages and each stream's figures, truncation
/// (readers behind get `history_expired`, the epoch stays), deletion (watchers learn it, the
/// next append starts a new epoch at offset 1; on a cluster every node sees it).
pub async fn run_stream_admin(backend: &dyn Backend) {
    let ns = backend.namespace(Settings::default()).await;
    let engine = ns.node().await;
    let admin = engine
        .admin()
        .expect("stream admin: the engine supports it");
    let names = ["admin/a1", "admin/a2", "admin/a3", "admin/b1"];
    for name in names {
        engine
            .append(&stream(name), vec![msg("x"), msg("yy"), msg("zzz")])
            .await
            .expect("append");
    }

    // Listing: prefix, name order, pages.
    let listed = admin.list_streams("admin/a", None, 10).await.unwrap();
    let got: Vec<&str> = listed.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        got,
        ["admin/a1", "admin/a2", "admin/a3"],
        "stream admin: list"
    );
    let a1 = &listed[0];
    assert_eq!((a1.state.oldest, a1.state.head), (Offset(1), Offset(3)));
    assert_eq!(a1.retained_messages, 3, "stream admin: retained count");
    assert!(a1.retained_bytes >= 6, "stream admin: retained bytes");
    assert!(a1.last_publish_ms.is_some_and(|t| t > 0));
    let first = admin.list_streams("admin/", None, 2).await.unwrap();
    let next = admin
        .list_streams("admin/", Some(&first[1].name), 2)
        .await
        .unwrap();
    let paged: Vec<&str> = first.iter().chain(&next).map(|s| s.name.as_str()).collect();
    assert_eq!(paged, names, "stream admin: pages");
    assert!(
        admin
            .list_streams("admin/", Some(&stream("admin/b1")), 2)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        admin
            .describe_stream(&stream("admin/none"))
            .await
            .unwrap()
            .is_none()
    );

    // Truncation: the front goes, epoch and head stay.
    let a1 = stream("admin/a1");
    let after = admin
        .truncate_stream(&a1, Offset(3))
        .await
        .unwrap()
        .expect("known");
    assert_eq!((after.oldest, after.head), (Offset(3), Offset(3)));
    assert_eq!(after.epoch, listed[0].state.epoch);
    let read = engine.read(&a1, Offset(0), 10).await.unwrap();
    assert!(read.messages.is_empty(), "stream admin: truncated history");
    assert_eq!(
        spool_core::continuity::decide(
            &spool_core::Start::After(spool_core::Position::new(after.epoch.clone(), Offset(1))),
            &read.state
        ),
        spool_core::continuity::Decision::Reset {
            reason: spool_core::ResetReason::HistoryExpired,
            head: read.state.head_position(),
        }
    );
    let tail = engine.read(&a1, Offset(2), 10).await.unwrap();
    assert_eq!(tail.messages.len(), 1);
    assert_eq!(tail.messages[0].payload, "zzz");
    let summary = admin.describe_stream(&a1).await.unwrap().expect("known");
    assert_eq!(summary.retained_messages, 1);
    assert!(
        admin
            .truncate_stream(&stream("admin/none"), Offset(2))
            .await
            .unwrap()
            .is_none()
    );

    // Deletion: a watcher learns it, the next append starts a new epoch at offset 1.
    let a2 = stream("admin/a2");
    let old_epoch = engine.state(&a2).await.unwrap().expect("known").epoch;
    let mut watch = engine.watch(&a2).await.unwrap();
    watch.borrow_and_update();
    assert!(
        admin.delete_stream(&a2).await.unwrap(),
        "stream admin: delete"
    );
    assert!(!admin.delete_stream(&a2).await.unwrap(), "deleted once");
    assert!(engine.state(&a2).await.unwrap().is_none());
    within(
        async {
            // Either the watch moves to another epoch or it ends (the engine dropped it).
            while let Ok(()) = watch.changed().await {
                if watch.borrow().epoch != old_epoch {
                    break;
                }
            }
        },
        "stream admin: the watcher of a deleted stream learns it",
    )
    .await;
    let listed: Vec<String> = admin
        .list_streams("admin/", None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(listed, ["admin/a1", "admin/a3", "admin/b1"]);
    if ns.clustered() {
        let other = ns.node().await;
        assert!(other.state(&a2).await.unwrap().is_none(), "every node");
    }
    let again = engine.append(&a2, vec![msg("new")]).await.unwrap();
    assert_eq!(again[0].position.offset, Offset(1));
    assert_ne!(again[0].position.epoch, old_epoch, "a new epoch");
    let read = engine.read(&a2, Offset(0), 10).await.unwrap();
    assert_eq!(read.messages.len(), 1);
    assert_eq!(read.messages[0].payload, "new");
}

fn stream(name: &str) -> StreamName {
    StreamName::new(name).expect("valid stream name")
}

fn msg(payload: impl Into<Bytes>) -> NewMessage {
    NewMessage {
        payload: payload.into(),
        ..Default::default()
    }
}

fn keyed(payload: &'static str, key: &str) -> NewMessage {
    NewMessage {
        idempotency_key: Some(key.into()),
        ..msg(payload)
    }
}

async fn offsets_are_gap_free_and_reads_are_ranges(backend: &dyn Backend) {
    let ns = backend.namespace(Settings::default()).await;
    let engine = ns.node().await;
    let s = stream("conformance/ranges");
    let out = engine
        .append(
            &s,
            vec![
                NewMessage {
                    content_type: Some("text/plain".into()),
                    key: Some("k".into()),
                    headers: vec![("h".into(), "v".into())],
                    ..msg("1")
                },
                msg("2"),
                msg("3"),
            ],
        )
        .await
        .expect("append");
    let offsets: Vec<u64> = out.iter().map(|a| a.position.offset.get()).collect();
    assert_eq!(offsets, [1, 2, 3], "ranges: first offsets are 1, 2, 3");
    assert!(out.iter().all(|a| !a.duplicate));
    let epoch = out[0].position.epoch.clone();
    assert!(out.iter().all(|a| a.position.epoch == epoch));

    let all = engine.read(&s, Offset(0), 10).await.expect("read");
    assert_eq!(all.state.epoch, epoch);
    assert_eq!((all.state.oldest, all.state.head), (Offset(1), Offset(3)));
    let first = &all.messages[0];
    assert_eq!(first.payload, "1");
    assert_eq!(first.content_type.as_deref(), Some("text/plain"));
    assert_eq!(first.key.as_deref(), Some("k"));
    assert_eq!(first.headers, [("h".to_string(), "v".to_string())]);
    assert!(first.time_ms > 0, "ranges: publish time is stamped");

    let tail = engine.read(&s, Offset(1), 10).await.expect("read");
    let got: Vec<u64> = tail.messages.iter().map(|m| m.offset.get()).collect();
    assert_eq!(got, [2, 3], "ranges: read after 1");
    let limited = engine.read(&s, Offset(0), 2).await.expect("read");
    assert_eq!(limited.messages.len(), 2, "ranges: limit");
    assert!(
        engine
            .read(&s, Offset(3), 10)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    assert!(
        engine
            .read(&s, Offset(99), 10)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    let state = engine.state(&s).await.unwrap().expect("known stream");
    assert_eq!((state.epoch, state.head), (epoch, Offset(3)));
}

/// A reader of a stream nothing was published to learns an epoch at head 0 (a placeholder every
/// engine holds in memory only; a cluster engine per node); while the reader watches, the first
/// publish (on a cluster: through the reader's node) lands in that epoch, so the reader sees
/// offset 1 with no reset.
async fn a_watched_unknown_stream_keeps_its_epoch_for_the_first_publish(backend: &dyn Backend) {
    let ns = backend.namespace(Settings::default()).await;
    let engine = ns.node().await;
    let s = stream("conformance/unknown");
    assert!(
        engine.state(&s).await.unwrap().is_none(),
        "unknown: no state"
    );
    assert!(!engine.exists(&s).await.unwrap(), "unknown: does not exist");
    let watch = engine.watch(&s).await.expect("watch");
    let batch = engine.read(&s, Offset(0), 10).await.expect("read");
    assert!(batch.messages.is_empty());
    assert_eq!(batch.state.head, Offset(0));
    assert_eq!(
        watch.borrow().epoch,
        batch.state.epoch,
        "unknown: the watch and the read agree on the epoch"
    );
    if let Some(state) = engine.state(&s).await.unwrap() {
        assert_eq!(state.epoch, batch.state.epoch, "unknown: the epoch sticks");
    }
    // The epoch a reader learned is the one the first publish lands in.
    let out = engine.append(&s, vec![msg("x")]).await.unwrap();
    assert_eq!(out[0].position.epoch, batch.state.epoch);
    assert_eq!(out[0].position.offset, Offset(1));
    assert!(engine.exists(&s).await.unwrap(), "published: exists");
    drop(watch);
    if ns.clustered() {
        let other = ns.node().await;
        let seen = other.state(&s).await.unwrap().expect("known on every node");
        assert_eq!(
            seen.epoch, batch.state.epoch,
            "unknown: one epoch cluster-wide"
        );
    }
}

async fn retention_keeps_the_newest_by_count(backend: &dyn Backend) {
    let mut settings = Settings::default();
    settings.retention.default.max_messages = 3;
    let ns = backend.namespace(settings).await;
    let engine = ns.node().await;
    let s = stream("conformance/retention");
    for i in 1..=5 {
        engine.append(&s, vec![msg(format!("{i}"))]).await.unwrap();
    }
    let state = engine.state(&s).await.unwrap().unwrap();
    assert_eq!(
        (state.oldest, state.head),
        (Offset(3), Offset(5)),
        "retention: newest 3 of 5 kept"
    );
    assert!(
        engine
            .read(&s, Offset(1), 10)
            .await
            .unwrap()
            .messages
            .is_empty(),
        "retention: a read before the oldest returns nothing (the caller resets)"
    );
    let kept = engine.read(&s, Offset(2), 10).await.unwrap();
    let got: Vec<u64> = kept.messages.iter().map(|m| m.offset.get()).collect();
    assert_eq!(got, [3, 4, 5]);
}

async fn idempotency_keys_answer_the_original_position(backend: &dyn Backend) {
    let ns = backend.namespace(Settings::default()).await;
    let engine = ns.node().await;
    let s = stream("conformance/idempotency");
    let first = engine.append(&s, vec![keyed("x", "k1")]).await.unwrap();
    let again = engine
        .append(&s, vec![keyed("x", "k1"), keyed("y", "k2")])
        .await
        .unwrap();
    assert!(!first[0].duplicate);
    assert!(
        again[0].duplicate,
        "idempotency: a repeated key is a duplicate"
    );
    assert_eq!(again[0].position, first[0].position);
    assert!(!again[1].duplicate);
    assert_eq!(again[1].position.offset, Offset(2));
    assert_eq!(engine.state(&s).await.unwrap().unwrap().head, Offset(2));
    // The same key on another stream is another message.
    let other = engine
        .append(&stream("conformance/idempotency-2"), vec![keyed("x", "k1")])
        .await
        .unwrap();
    assert!(!other[0].duplicate);
    if ns.clustered() {
        let node = ns.node().await;
        let retry = node.append(&s, vec![keyed("x", "k2")]).await.unwrap();
        assert!(retry[0].duplicate, "idempotency: keys are cluster-wide");
        assert_eq!(retry[0].position, again[1].position);
    }
}

async fn watchers_see_the_head_move(backend: &dyn Backend) {
    let ns = backend.namespace(Settings::default()).await;
    let engine = ns.node().await;
    let s = stream("conformance/watch");
    let mut watch = engine.watch(&s).await.expect("watch");
    assert_eq!(watch.borrow_and_update().offset, Offset(0));
    engine.append(&s, vec![msg("1")]).await.unwrap();
    within(watch.changed(), "watch: own append").await.unwrap();
    assert_eq!(watch.borrow_and_update().offset, Offset(1));
    if ns.clustered() {
        // A publish on another node reaches this node's watchers: live fan-out.
        let other = ns.node().await;
        other.append(&s, vec![msg("2")]).await.unwrap();
        within(watch.changed(), "watch: another node's append")
            .await
            .unwrap();
        assert_eq!(watch.borrow_and_update().offset, Offset(2));
        let batch = engine.read(&s, Offset(1), 10).await.unwrap();
        assert_eq!(batch.messages.len(), 1, "watch: the woken node reads it");
        assert_eq!(batch.messages[0].payload, "2");
    }
}

/// A watch taken while another node publishes to the stream sees that publish at once. On a
/// cluster engine a node ignores notes about streams it does not watch, so a note that lands
/// between the watch's first read of the head and the watch's creation would be lost if the
/// watch did not read again (`cluster::ClusterNode::watch`): its subscribers would wait for a
/// periodic refresh (NATS: 5 s) or forever (Redis). Streams that exist and streams the publish
/// creates, many at once to hit that moment.
async fn a_watch_set_up_while_another_node_publishes_misses_nothing(backend: &dyn Backend) {
    /// Well under any periodic refresh; a note takes milliseconds.
    const PROMPTLY: Duration = Duration::from_secs(3);
    let ns = backend.namespace(Settings::default()).await;
    let (watcher, publisher) = (ns.node().await, ns.node().await);
    let names: Vec<StreamName> = (0..32)
        .map(|i| stream(&format!("conformance/gap-{i}")))
        .collect();
    for s in names.iter().step_by(2) {
        publisher.append(s, vec![msg("1")]).await.unwrap();
    }
    let raced = names.iter().map(|s| {
        let (watcher, publisher) = (watcher.clone(), publisher.clone());
        async move {
            let (watch, appended) =
                tokio::join!(watcher.watch(s), publisher.append(s, vec![msg("next")]));
            (
                watch.expect("watch"),
                appended.expect("append")[0].position.clone(),
            )
        }
    });
    for (s, (mut watch, appended)) in names.iter().zip(futures::future::join_all(raced).await) {
        let seen = matches!(
            tokio::time::timeout(
                PROMPTLY,
                watch.wait_for(|head| {
                    head.epoch == appended.epoch && head.offset >= appended.offset
                }),
            )
            .await,
            Ok(Ok(_))
        );
        assert!(
            seen,
            "{s}: the watch stayed at {} after another node's publish at {appended}",
            *watch.borrow()
        );
    }
}

async fn sessions_are_kept_until_they_expire(backend: &dyn Backend) {
    let ns = backend.namespace(Settings::default()).await;
    let store = ns.session_store().await;
    let now = spool_core::now_ms();
    let record = |id: &str, data: &'static str, expires_at| SessionRecord {
        id: id.into(),
        data: Bytes::from_static(data.as_bytes()),
        expires_at,
        holder: 0,
        take_over: false,
    };
    let id = format!("conformance-session-{now}");
    let gone = format!("conformance-expired-{now}");
    store
        .save_sessions(vec![
            record(&id, "one", now + 60_000),
            record(&gone, "old", now.saturating_sub(1)),
        ])
        .await
        .expect("save");
    assert_eq!(store.load_session(&id).await.unwrap().unwrap(), "one");
    assert!(
        store.load_session(&gone).await.unwrap().is_none(),
        "sessions: an expired record is not loaded"
    );
    store
        .save_sessions(vec![record(&id, "two", now + 60_000)])
        .await
        .unwrap();
    assert_eq!(store.load_session(&id).await.unwrap().unwrap(), "two");
    if ns.clustered() {
        let other = ns.session_store().await;
        assert_eq!(
            other.load_session(&id).await.unwrap().unwrap(),
            "two",
            "sessions: a session saved on one node resumes on another"
        );
    }
    store.delete_session(&id).await.unwrap();
    assert!(store.load_session(&id).await.unwrap().is_none());
    assert!(store.load_session("never-saved").await.unwrap().is_none());
}

/// A connection whose session was taken over (here or on another node) cannot overwrite the
/// record its successor saved: its saves are refused and named, atomically with the take-over
/// even while they race it.
async fn a_session_taken_over_refuses_its_old_holder(backend: &dyn Backend) {
    let ns = backend.namespace(Settings::default()).await;
    let old_node = ns.session_store().await;
    let new_node = if ns.clustered() {
        ns.session_store().await
    } else {
        old_node.clone()
    };
    let now = spool_core::now_ms();
    let id = format!("conformance-takeover-{now}");
    let other = format!("conformance-takeover-other-{now}");
    let record = |id: &str, holder, take_over, data: String| SessionRecord {
        id: id.into(),
        data: Bytes::from(data),
        expires_at: now + 60_000,
        holder,
        take_over,
    };
    let saved = old_node
        .save_sessions(vec![record(&id, 1, false, "old 1".into())])
        .await
        .expect("save");
    assert!(saved.is_empty(), "sessions: a first save is no one else's");
    let saved = new_node
        .save_sessions(vec![record(&id, 2, true, "new 1".into())])
        .await
        .unwrap();
    assert!(
        saved.is_empty(),
        "sessions: a take-over replaces any holder"
    );
    let refused = old_node
        .save_sessions(vec![
            record(&id, 1, false, "old 2".into()),
            record(&other, 1, false, "other".into()),
        ])
        .await
        .unwrap();
    assert_eq!(
        refused,
        std::slice::from_ref(&id),
        "sessions: the old holder's save is refused, the rest of its batch saved"
    );
    assert_eq!(old_node.load_session(&id).await.unwrap().unwrap(), "new 1");
    assert_eq!(
        old_node.load_session(&other).await.unwrap().unwrap(),
        "other"
    );
    let saved = new_node
        .save_sessions(vec![record(&id, 2, false, "new 2".into())])
        .await
        .unwrap();
    assert!(
        saved.is_empty(),
        "sessions: the holder saves its own record"
    );
    assert_eq!(new_node.load_session(&id).await.unwrap().unwrap(), "new 2");

    // The old holder saving in a loop while the session is taken over: once the take-over
    // has returned, nothing of the old holder's lands, whatever was in flight.
    for round in 0..5u64 {
        let holder = 10 + 2 * round;
        old_node
            .save_sessions(vec![record(&id, holder, true, "racing 0".into())])
            .await
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let racer = {
            let (store, id, stop) = (old_node.clone(), id.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let r = SessionRecord {
                        id: id.clone(),
                        data: Bytes::from(format!("racing {n}")),
                        expires_at: now + 60_000,
                        holder,
                        take_over: false,
                    };
                    let _ = store.save_sessions(vec![r]).await;
                    // An in-memory store answers without yielding: let the take-over run.
                    tokio::task::yield_now().await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        new_node
            .save_sessions(vec![record(
                &id,
                holder + 1,
                true,
                format!("taken {round}"),
            )])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        racer.await.unwrap();
        assert_eq!(
            new_node.load_session(&id).await.unwrap().unwrap(),
            format!("taken {round}"),
            "sessions: an old holder's save landed after the take-over (round {round})"
        );
    }
    old_node.delete_session(&id).await.unwrap();
    old_node.delete_session(&other).await.unwrap();
}

async fn concurrent_appends_from_every_node_get_unique_gap_free_offsets(backend: &dyn Backend) {
    const WRITERS: usize = 6;
    const ROUNDS: usize = 40;
    let ns = backend.namespace(Settings::default()).await;
    let s = stream("conformance/concurrent");
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(ns.node().await);
    }
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let engine = nodes[w % nodes.len()].clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for r in 0..ROUNDS {
                let batch = (0..1 + r % 3)
                    .map(|i| msg(format!("{w}/{r}/{i}")))
                    .collect();
                let out = engine.append(&s, batch).await.expect("append");
                let offsets: Vec<u64> = out.iter().map(|a| a.position.offset.get()).collect();
                assert!(
                    offsets.windows(2).all(|p| p[0] < p[1]),
                    "concurrent: one append's offsets ascend"
                );
                got.extend(offsets);
            }
            got
        }));
    }
    let mut all = BTreeSet::new();
    let mut total = 0;
    for t in tasks {
        let got = t.await.expect("writer task");
        total += got.len();
        all.extend(got);
    }
    assert_eq!(all.len(), total, "concurrent: offsets are unique");
    let expected: BTreeSet<u64> = (1..=total as u64).collect();
    assert_eq!(all, expected, "concurrent: offsets are 1..=N with no hole");
    let state = nodes[0].state(&s).await.unwrap().unwrap();
    assert_eq!(state.head.get(), total as u64);
    // Every message is stored at the offset its ack named.
    let mut after = Offset(0);
    let mut seen = 0;
    loop {
        let batch = nodes[1].read(&s, after, 100).await.unwrap();
        let Some(last) = batch.messages.last() else {
            break;
        };
        for m in &batch.messages {
            assert_eq!(m.offset, after.next(), "concurrent: read has no hole");
            after = m.offset;
            seen += 1;
        }
        assert_eq!(after, last.offset);
    }
    assert_eq!(seen, total);
}

async fn reads_never_see_holes_while_appends_run(backend: &dyn Backend) {
    let ns = backend.namespace(Settings::default()).await;
    let s = stream("conformance/live");
    let writer = ns.node().await;
    let reader = ns.node().await;
    let mut watch = reader.watch(&s).await.unwrap();
    const TOTAL: u64 = 300;
    let w = {
        let s = s.clone();
        tokio::spawn(async move {
            for i in 0..TOTAL / 3 {
                let batch = (0..3).map(|j| msg(format!("{}", i * 3 + j + 1))).collect();
                writer.append(&s, batch).await.expect("append");
            }
        })
    };
    let mut after = Offset(0);
    while after.get() < TOTAL {
        watch.borrow_and_update();
        let batch = reader.read(&s, after, 64).await.expect("read");
        assert!(batch.state.head >= after, "live: the head never goes back");
        for m in &batch.messages {
            assert_eq!(m.offset, after.next(), "live: no hole");
            assert_eq!(m.payload, m.offset.get().to_string(), "live: right message");
            after = m.offset;
        }
        if batch.messages.is_empty() && after.get() < TOTAL {
            within(watch.changed(), "live: wake-up for the next publish")
                .await
                .unwrap();
        }
    }
    w.await.unwrap();
}

/// Whether a test of an engine backed by an outside server may run: true when `addr` accepts a
/// TCP connection. When it does not, the test is skipped with a message on a developer's
/// machine, and fails under CI (`CI` set), where `.ci/run` starts the server first.
pub fn service_reachable(what: &str, addr: &str) -> bool {
    use std::net::{TcpStream, ToSocketAddrs};
    let reachable = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if !reachable {
        if std::env::var_os("CI").is_some() {
            panic!(
                "{what} at {addr} is unreachable; under CI this is a failure, not a skip (.ci/run starts it)"
            );
        }
        eprintln!("SKIPPED: {what} at {addr} is unreachable (start it to run this test)");
    }
    reachable
}

async fn within<F: Future>(f: F, what: &str) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within 10 s"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemoryEngine, memory::MemoryConfig};

    /// The memory engine. (The disk engine runs this suite in `spool-disk`'s tests.)
    struct Memory;

    #[async_trait]
    impl Backend for Memory {
        async fn namespace(&self, settings: Settings) -> Box<dyn Namespace> {
            let engine = MemoryEngine::new(MemoryConfig {
                retention: settings.retention,
                dedup_window: settings.dedup_window,
                ..MemoryConfig::default()
            });
            Box::new(SingleNode::new(Arc::new(engine), ()))
        }
    }

    #[tokio::test]
    async fn memory_engine_conforms() {
        run(&Memory).await;
    }

    #[tokio::test]
    async fn memory_engine_administers_streams() {
        run_stream_admin(&Memory).await;
    }
}
