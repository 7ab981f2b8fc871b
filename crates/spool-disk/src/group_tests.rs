//! Consumer groups on disk (`groups.rs`) against the engine's own files: reopen, torn tails,
//! segment rolls and deletion, repair, the `--max-groups` bound, commits sharing the
//! writer's fsyncs with appends, and a property test of random group operations among
//! appends, rolls, tears and reopens against a model. The store's contract itself is the conformance suite's
//! (`tests/conformance.rs`).

use std::sync::Arc;

use bytes::Bytes;
use spool_core::{
    Epoch, Message, NewMessage, Offset, Start, StreamName, StreamState,
    group::{GroupConfig, GroupName, GroupState, MemberName, ReceiveRequest},
};
use spool_engine::{Committed, Engine, EngineError, GroupStore, Limit, StoredGroup};

use super::*;

fn stream(s: &str) -> StreamName {
    StreamName::new(s).unwrap()
}

fn gname(s: &str) -> GroupName {
    GroupName::new(s).unwrap()
}

fn key(s: &str, g: &str) -> (StreamName, GroupName) {
    (stream(s), gname(g))
}

/// A stream of 10,000 messages the groups read from (the state machine needs only their
/// offsets, times and keys; nothing is appended for them).
const HEAD: u64 = 10_000;

fn stream_state() -> StreamState {
    StreamState {
        epoch: Epoch::parse("e1").unwrap(),
        oldest: Offset(1),
        head: Offset(HEAD),
    }
}

fn fetched(after: Offset, limit: usize) -> Vec<Message> {
    (after.get() + 1..=(after.get() + limit as u64).min(HEAD))
        .map(|i| {
            NewMessage {
                payload: Bytes::from(format!("m{i}")),
                ..Default::default()
            }
            .stamp(Offset(i), 1_000)
            .0
        })
        .collect()
}

/// A group as the delivery layer would hold it: the live state and the store's version.
struct Live {
    state: GroupState,
    version: u64,
    /// Receipts handed out and not acked yet.
    receipts: Vec<String>,
}

impl Live {
    async fn create(engine: &DiskEngine, s: &str, g: &str) -> Live {
        let config = GroupConfig {
            start: Start::Oldest,
            ..GroupConfig::default()
        };
        let state = GroupState::new(stream(s), gname(g), config, &stream_state(), 1_000).unwrap();
        assert!(engine.create_group(&state.snapshot()).await.unwrap());
        Live {
            state,
            version: 0,
            receipts: Vec::new(),
        }
    }

    /// Receives `max` messages as member `w1` and commits it.
    async fn receive(&mut self, engine: &DiskEngine, max: u32, now: u64) {
        let want = self.state.want(max, now);
        let request = ReceiveRequest {
            member: MemberName::new("w1").unwrap(),
            max,
            visibility_timeout: None,
        };
        let out = self
            .state
            .receive(
                &request,
                &stream_state(),
                &fetched(want.after, want.limit),
                now,
            )
            .unwrap();
        self.commit(engine, &out.changes).await;
        self.receipts
            .extend(out.value.deliveries.iter().map(|d| d.receipt.encode()));
    }

    /// Acks the `n` oldest receipts held and commits it.
    async fn ack(&mut self, engine: &DiskEngine, n: usize, now: u64) {
        let n = n.min(self.receipts.len());
        let receipts: Vec<String> = self.receipts.drain(..n).collect();
        let out = self.state.ack(&receipts, now).unwrap();
        self.commit(engine, &out.changes).await;
    }

    async fn commit(&mut self, engine: &DiskEngine, changes: &[spool_core::group::Change]) {
        let s = self.state.snapshot();
        let done = engine
            .commit_group(&s.stream, &s.group, self.version, changes)
            .await
            .unwrap();
        assert_eq!(
            done,
            Committed::Done {
                version: self.version + 1
            }
        );
        self.version += 1;
    }

    async fn compact(&mut self, engine: &DiskEngine) {
        let s = self.state.snapshot();
        let done = engine
            .compact_group(&s.stream, &s.group, self.version, &s)
            .await
            .unwrap();
        assert_eq!(
            done,
            Committed::Done {
                version: self.version
            }
        );
    }
}

/// Every group the engine holds, loaded.
async fn all_groups(engine: &DiskEngine) -> Vec<StoredGroup> {
    let mut out = Vec::new();
    for (s, g) in engine.list_groups(None).await.unwrap() {
        out.push(engine.load_group(&s, &g).await.unwrap().unwrap());
    }
    out
}

/// The live state a stored group rebuilds.
fn rebuilt(stored: &StoredGroup) -> spool_core::group::GroupSnapshot {
    let mut state = GroupState::from_snapshot(stored.snapshot.clone()).unwrap();
    for change in &stored.changes {
        state.apply(change);
    }
    state.snapshot()
}

/// The bytes of a group record's binary `CountersSet` change with `acked` acks and no other
/// count (`record.rs`), to find that record in a segment file.
fn acked_needle(acked: u64) -> Vec<u8> {
    let changes = [spool_core::group::Change::CountersSet {
        counters: spool_core::group::Counters {
            acked,
            ..Default::default()
        },
    }];
    // Past the change count.
    record::changes_bin(&changes).unwrap()[4..].to_vec()
}

fn wal_ids(dir: &Path) -> Vec<u64> {
    segment::list(&dir.join("wal")).unwrap()
}

#[tokio::test]
async fn reopen_restores_every_group_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DiskConfig::new(dir.path());
    let before = {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let mut a = Live::create(&engine, "orders", "billing").await;
        let mut b = Live::create(&engine, "orders", "audit").await;
        let mut c = Live::create(&engine, "events", "billing").await;
        let _gone = Live::create(&engine, "events", "gone").await;
        a.receive(&engine, 5, 2_000).await;
        a.ack(&engine, 3, 2_100).await;
        b.receive(&engine, 2, 2_000).await;
        b.compact(&engine).await;
        b.ack(&engine, 1, 2_200).await;
        c.receive(&engine, 1, 2_000).await;
        assert!(
            engine
                .delete_group(&stream("events"), &gname("gone"))
                .await
                .unwrap()
        );
        // Messages in the same log do not disturb them.
        engine
            .append(&stream("orders"), vec![NewMessage::default()])
            .await
            .unwrap();
        for live in [&a, &b, &c] {
            let s = live.state.snapshot();
            let stored = engine
                .load_group(&s.stream, &s.group)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                rebuilt(&stored),
                s,
                "what is stored rebuilds the live state"
            );
            assert_eq!(stored.version, live.version);
        }
        all_groups(&engine).await
    };
    assert_eq!(before.len(), 3);
    for reopen in 0..3 {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        assert_eq!(
            all_groups(&engine).await,
            before,
            "reopen {reopen}: the same versions, snapshots and changes"
        );
        assert_eq!(
            engine.list_groups(Some(&stream("orders"))).await.unwrap(),
            vec![key("orders", "audit"), key("orders", "billing")]
        );
        assert!(
            engine
                .load_group(&stream("events"), &gname("gone"))
                .await
                .unwrap()
                .is_none(),
            "a deleted group stays deleted"
        );
    }
    // And commits go on from the restored version.
    let engine = DiskEngine::open(cfg).unwrap();
    let stored = engine
        .load_group(&stream("orders"), &gname("billing"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        engine
            .commit_group(
                &stream("orders"),
                &gname("billing"),
                stored.version,
                &stored.changes[..1]
            )
            .await
            .unwrap(),
        Committed::Done {
            version: stored.version + 1
        }
    );
}

/// A crash in the middle of writing a group commit: the half-written record is cut, and the
/// group is exactly at the last commit that was answered.
#[tokio::test]
async fn a_torn_group_commit_loses_only_the_unanswered_commit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DiskConfig::new(dir.path());
    let (answered, torn) = {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let mut live = Live::create(&engine, "t", "g").await;
        live.receive(&engine, 4, 2_000).await;
        live.ack(&engine, 2, 2_100).await;
        let answered = engine
            .load_group(&stream("t"), &gname("g"))
            .await
            .unwrap()
            .unwrap();
        // The next commit, as the writer would have framed it, but only half on disk.
        let receipts: Vec<String> = live.receipts.drain(..).collect();
        let out = live.state.ack(&receipts, 2_200).unwrap();
        let mut frame = Vec::new();
        record::encode_group_commit(
            &mut frame,
            &stream("t"),
            &gname("g"),
            answered.snapshot.id,
            answered.version + 1,
            &record::changes_bin(&out.changes).unwrap(),
        );
        (answered, frame)
    };
    let wal = dir.path().join("wal");
    let last = segment::path(&wal, *wal_ids(dir.path()).last().unwrap());
    let mut file = fs::OpenOptions::new().append(true).open(&last).unwrap();
    std::io::Write::write_all(&mut file, &torn[..torn.len() - 3]).unwrap();
    drop(file);

    let engine = DiskEngine::open(cfg.clone()).unwrap();
    let stored = engine
        .load_group(&stream("t"), &gname("g"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, answered);
    assert_eq!(stored.version, 2);
    // The whole frame, had it been written, would have been replayed: the cut was the tear.
    drop(engine);
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(segment::path(&wal, *wal_ids(dir.path()).last().unwrap()))
        .unwrap();
    std::io::Write::write_all(&mut file, &torn).unwrap();
    drop(file);
    let engine = DiskEngine::open(cfg).unwrap();
    let stored = engine
        .load_group(&stream("t"), &gname("g"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.version, 3, "a whole commit record is replayed");
    assert!(rebuilt(&stored).entries.is_empty(), "every message acked");
}

/// Many segment rolls while groups commit and compact, with retention deleting old segments:
/// every group survives (each segment restates them all), including one created in a segment
/// long gone, and a group deleted in a segment that is gone stays deleted even though an
/// older segment that holds its creation is still there.
/// Appends `n` messages of 300 bytes to "busy".
async fn busy(engine: &DiskEngine, n: usize) {
    for _ in 0..n {
        engine
            .append(
                &stream("busy"),
                vec![NewMessage {
                    payload: Bytes::from(vec![b'p'; 300]),
                    ..Default::default()
                }],
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn groups_survive_segment_rolls_and_deleted_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DiskConfig::new(dir.path());
    cfg.segment_size = 2048;
    cfg.retention.default.max_messages = 1;
    cfg.durability = Durability::Memory;
    let expected = {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let mut idle = Live::create(&engine, "s", "idle").await;
        idle.receive(&engine, 3, 2_000).await;
        // "anchor" keeps the first segment alive: its only message is its newest.
        engine
            .append(&stream("anchor"), vec![NewMessage::default()])
            .await
            .unwrap();
        let _doomed = Live::create(&engine, "s", "doomed").await;
        let first = wal_ids(dir.path())[0];
        busy(&engine, 10).await;
        assert!(
            engine
                .delete_group(&stream("s"), &gname("doomed"))
                .await
                .unwrap()
        );
        let mut active = Live::create(&engine, "s", "active").await;
        for round in 0..30 {
            active.receive(&engine, 2, 3_000 + round).await;
            active.ack(&engine, 1, 3_000 + round).await;
            if round % 7 == 6 {
                active.compact(&engine).await;
            }
            busy(&engine, 3).await;
        }
        busy(&engine, 10).await;
        let ids = wal_ids(dir.path());
        assert_eq!(ids[0], first, "the anchor's segment is kept");
        assert!(ids.len() < 6, "old segments were deleted: {ids:?}");
        assert!(
            *ids.last().unwrap() > first + 10,
            "the log rolled many times"
        );
        let deleted_in: Vec<u64> = (first + 1..first + 4).collect();
        assert!(
            deleted_in.iter().all(|id| !ids.contains(id)),
            "the segments after the first, where 'doomed' was deleted, are gone: {ids:?}"
        );
        all_groups(&engine).await
    };
    assert_eq!(
        expected
            .iter()
            .map(|g| g.snapshot.group.as_str())
            .collect::<Vec<_>>(),
        ["active", "idle"]
    );
    for _ in 0..2 {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        assert_eq!(all_groups(&engine).await, expected);
    }
}

/// A flipped bit in a group commit record with valid records after it: the engine refuses to
/// start; repair cuts it, and the group comes back as it was before that record — an older
/// version, whole, named in the report — never with part of what followed.
#[tokio::test]
async fn repair_of_a_damaged_group_record_rolls_the_group_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DiskConfig::new(dir.path());
    let (at_v1, other) = {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let mut live = Live::create(&engine, "r", "g").await;
        let mut other = Live::create(&engine, "r", "other").await;
        other.receive(&engine, 1, 2_000).await;
        live.receive(&engine, 3, 2_000).await;
        let at_v1 = engine
            .load_group(&stream("r"), &gname("g"))
            .await
            .unwrap()
            .unwrap();
        live.ack(&engine, 1, 2_100).await; // version 2: the record to damage
        live.ack(&engine, 1, 2_200).await; // version 3, after it
        let other = engine
            .load_group(&stream("r"), &gname("other"))
            .await
            .unwrap()
            .unwrap();
        (at_v1, other)
    };
    // The version-2 commit is the second-to-last record: find it by its framing.
    let last = segment::path(
        &dir.path().join("wal"),
        *wal_ids(dir.path()).last().unwrap(),
    );
    let mut bytes = fs::read(&last).unwrap();
    let scan = segment::scan(&last, true).unwrap();
    let commits = scan
        .records
        .iter()
        .filter(|r| matches!(r, Record::GroupCommit { .. }))
        .count();
    assert_eq!(commits, 4);
    let needle = acked_needle(1);
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + 2] ^= 0x20;
    fs::write(&last, &bytes).unwrap();

    let err = DiskEngine::open(cfg.clone())
        .err()
        .expect("a damaged group record stops startup");
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");

    let report = repair(dir.path(), false).unwrap();
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(
        report
            .groups_rolled_back
            .iter()
            .map(|g| (g.group.as_str(), g.version))
            .collect::<Vec<_>>(),
        [("g", 1), ("other", 1)],
        "every group known at the damage is named, at the version it comes back at"
    );
    let engine = DiskEngine::open(cfg.clone()).unwrap();
    let g = engine
        .load_group(&stream("r"), &gname("g"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g, at_v1, "back at version 1, whole");
    assert_eq!(
        engine
            .load_group(&stream("r"), &gname("other"))
            .await
            .unwrap()
            .unwrap(),
        other
    );
    // It goes on from there.
    assert_eq!(
        engine
            .commit_group(&stream("r"), &gname("g"), 1, &[])
            .await
            .unwrap(),
        Committed::Done { version: 2 }
    );
    drop(engine);
    let engine = DiskEngine::open(cfg).unwrap();
    assert_eq!(
        engine
            .load_group(&stream("r"), &gname("g"))
            .await
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

/// Damage in an older segment: the next segment's snapshot restates every group as it was,
/// so repair rolls no group back.
#[tokio::test]
async fn damage_before_a_later_snapshot_loses_no_group_state() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DiskConfig::new(dir.path());
    let before = {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let mut live = Live::create(&engine, "r", "g").await;
        live.receive(&engine, 3, 2_000).await;
        live.ack(&engine, 1, 2_100).await;
        live.ack(&engine, 1, 2_200).await;
        // A retained message keeps this segment when the next one starts.
        engine
            .append(&stream("r"), vec![NewMessage::default()])
            .await
            .unwrap();
        all_groups(&engine).await
    };
    // A restart starts a new segment with a snapshot of every group.
    drop(DiskEngine::open(cfg.clone()).unwrap());
    let ids = wal_ids(dir.path());
    assert!(ids.len() >= 2, "{ids:?}");
    let first = segment::path(&dir.path().join("wal"), ids[0]);
    let mut bytes = fs::read(&first).unwrap();
    let needle = acked_needle(1);
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + 2] ^= 0x20;
    fs::write(&first, &bytes).unwrap();
    assert!(DiskEngine::open(cfg.clone()).is_err());
    let report = repair(dir.path(), false).unwrap();
    assert_eq!(report.damaged.len(), 1);
    assert!(report.groups_rolled_back.is_empty());
    let engine = DiskEngine::open(cfg).unwrap();
    assert_eq!(all_groups(&engine).await, before);
}

#[tokio::test]
async fn max_groups_bounds_creation_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DiskConfig::new(dir.path());
    cfg.max_groups = 2;
    {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let mut a = Live::create(&engine, "m", "a").await;
        let _b = Live::create(&engine, "m", "b").await;
        let third = GroupState::new(
            stream("m"),
            gname("c"),
            GroupConfig::default(),
            &stream_state(),
            1_000,
        )
        .unwrap();
        let err = engine.create_group(&third.snapshot()).await.unwrap_err();
        assert!(
            matches!(err, EngineError::Limit(Limit::Groups { max: 2 })),
            "{err}"
        );
        // A group that exists answers as before, and commits go on.
        assert!(!engine.create_group(&a.state.snapshot()).await.unwrap());
        a.receive(&engine, 1, 2_000).await;
        assert!(
            engine
                .delete_group(&stream("m"), &gname("b"))
                .await
                .unwrap()
        );
        assert!(engine.create_group(&third.snapshot()).await.unwrap());
    }
    let engine = DiskEngine::open(cfg).unwrap();
    assert_eq!(engine.list_groups(None).await.unwrap().len(), 2);
    let fourth = GroupState::new(
        stream("m"),
        gname("d"),
        GroupConfig::default(),
        &stream_state(),
        1_000,
    )
    .unwrap();
    assert!(matches!(
        engine.create_group(&fourth.snapshot()).await,
        Err(EngineError::Limit(Limit::Groups { max: 2 }))
    ));
}

/// Group commits go through the writer like appends: concurrent ones share writes (and
/// fsyncs) with each other and with messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commits_share_fsyncs_with_appends() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(DiskEngine::open(DiskConfig::new(dir.path())).unwrap());
    let mut groups = Vec::new();
    for g in 0..16 {
        groups.push(Live::create(&engine, "shared", &format!("g{g}")).await);
    }
    let start = engine.wal_stats();
    let mut tasks = Vec::new();
    for mut live in groups {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                live.receive(&engine, 1, 2_000 + i).await;
                live.ack(&engine, 1, 2_000 + i).await;
            }
            live
        }));
    }
    let mut appenders = Vec::new();
    for t in 0..16 {
        let engine = engine.clone();
        appenders.push(tokio::spawn(async move {
            for i in 0..40 {
                engine
                    .append(
                        &stream("shared"),
                        vec![NewMessage {
                            payload: Bytes::from(format!("{t}-{i}")),
                            ..Default::default()
                        }],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    let mut lives = Vec::new();
    for task in tasks {
        lives.push(task.await.unwrap());
    }
    for task in appenders {
        task.await.unwrap();
    }
    let end = engine.wal_stats();
    let (batches, requests, groups, mixed) = (
        end.batches - start.batches,
        end.requests - start.requests,
        end.group_requests - start.group_requests,
        end.mixed_batches - start.mixed_batches,
    );
    assert_eq!((requests, groups), (1280, 640));
    assert!(
        batches < requests,
        "{requests} requests took {batches} writes: none shared"
    );
    assert!(
        mixed > 0,
        "no write carried both a group commit and a message"
    );
    for live in &lives {
        let s = live.state.snapshot();
        let stored = engine
            .load_group(&s.stream, &s.group)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((stored.version, rebuilt(&stored)), (40, s));
    }
    drop(lives);
    let engine = match Arc::try_unwrap(engine) {
        Ok(engine) => engine,
        Err(_) => panic!("engine still shared"),
    };
    drop(engine);
    let engine = DiskEngine::open(DiskConfig::new(dir.path())).unwrap();
    assert_eq!(engine.list_groups(None).await.unwrap().len(), 16);
    assert_eq!(
        engine.state(&stream("shared")).await.unwrap().unwrap().head,
        Offset(640)
    );
}

mod random_ops {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use spool_core::group::{Change, Counters};

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Create(u8),
        Commit(u8, u8),
        Compact(u8),
        Delete(u8),
        Append(u8),
        Reopen,
        TearTail(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (0u8..4).prop_map(Op::Create),
            6 => (0u8..4, 1u8..4).prop_map(|(g, n)| Op::Commit(g, n)),
            1 => (0u8..4).prop_map(Op::Compact),
            1 => (0u8..4).prop_map(Op::Delete),
            3 => (1u8..6).prop_map(Op::Append),
            1 => Just(Op::Reopen),
            1 => (1u8..40).prop_map(Op::TearTail),
        ]
    }

    fn counters(n: u64) -> Counters {
        Counters {
            acked: n,
            ..Counters::default()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Random group operations among appends, with segments so small that the log rolls
        /// and retention deletes old segments all the time, reopened at random and with
        /// garbage on the tail (a torn write): what the store holds is always exactly what
        /// was answered — every group, version, snapshot and change, and no deleted group.
        #[test]
        fn groups_survive_random_rolls_tears_and_reopens(ops in prop::collection::vec(op(), 1..50)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let mut cfg = DiskConfig::new(dir.path());
                cfg.retention.default.max_messages = 3;
                cfg.segment_size = 700;
                cfg.durability = Durability::Memory;
                let mut engine = Some(DiskEngine::open(cfg.clone()).unwrap());
                let mut model: BTreeMap<(StreamName, GroupName), StoredGroup> = BTreeMap::new();
                let mut n = 0u64;
                for op in ops {
                    let e = engine.as_ref().unwrap();
                    n += 1;
                    match op {
                        Op::Create(g) => {
                            let name = format!("g{g}");
                            let state = GroupState::new(
                                stream("p"), gname(&name), GroupConfig::default(), &stream_state(), n,
                            ).unwrap();
                            let created = e.create_group(&state.snapshot()).await.unwrap();
                            let k = key("p", &name);
                            assert_eq!(created, !model.contains_key(&k));
                            model.entry(k).or_insert(StoredGroup {
                                snapshot: state.snapshot(),
                                changes: Vec::new(),
                                version: 0,
                            });
                        }
                        Op::Commit(g, count) => {
                            let k = key("p", &format!("g{g}"));
                            let changes: Vec<Change> = (0..count as u64)
                                .map(|i| Change::CountersSet { counters: counters(n * 10 + i) })
                                .collect();
                            let version = model.get(&k).map_or(0, |m| m.version);
                            let done = e.commit_group(&k.0, &k.1, version, &changes).await.unwrap();
                            match model.get_mut(&k) {
                                Some(m) => {
                                    assert_eq!(done, Committed::Done { version: version + 1 });
                                    m.changes.extend(changes);
                                    m.version += 1;
                                }
                                None => assert_eq!(done, Committed::Conflict),
                            }
                            // A stale version never commits.
                            if version > 0 {
                                assert_eq!(
                                    e.commit_group(&k.0, &k.1, version - 1, &[]).await.unwrap(),
                                    Committed::Conflict
                                );
                            }
                        }
                        Op::Compact(g) => {
                            let k = key("p", &format!("g{g}"));
                            if let Some(m) = model.get_mut(&k) {
                                let mut snapshot = m.snapshot.clone();
                                snapshot.counters = counters(n);
                                let done = e.compact_group(&k.0, &k.1, m.version, &snapshot).await.unwrap();
                                assert_eq!(done, Committed::Done { version: m.version });
                                m.snapshot = snapshot;
                                m.changes.clear();
                            }
                        }
                        Op::Delete(g) => {
                            let k = key("p", &format!("g{g}"));
                            let deleted = e.delete_group(&k.0, &k.1).await.unwrap();
                            assert_eq!(deleted, model.remove(&k).is_some());
                        }
                        Op::Append(count) => {
                            for _ in 0..count {
                                e.append(&stream("fill"), vec![NewMessage {
                                    payload: Bytes::from(vec![b'f'; 200]),
                                    ..Default::default()
                                }]).await.unwrap();
                            }
                        }
                        Op::Reopen => {
                            drop(engine.take());
                            engine = Some(DiskEngine::open(cfg.clone()).unwrap());
                        }
                        Op::TearTail(len) => {
                            drop(engine.take());
                            let wal = dir.path().join("wal");
                            let last = segment::path(&wal, *wal_ids(dir.path()).last().unwrap());
                            let mut f = fs::OpenOptions::new().append(true).open(&last).unwrap();
                            std::io::Write::write_all(&mut f, &vec![0xA5; len as usize]).unwrap();
                            drop(f);
                            engine = Some(DiskEngine::open(cfg.clone()).unwrap());
                        }
                    }
                    let e = engine.as_ref().unwrap();
                    let held = all_groups(e).await;
                    let want: Vec<StoredGroup> = model.values().cloned().collect();
                    assert_eq!(held, want);
                }
                // The log was rolled and old segments deleted along the way (when it grew).
                let ids = wal_ids(dir.path());
                assert!(ids.len() <= 6, "old segments are deleted: {ids:?}");
            });
        }
    }
}

/// Commits of one group queued back to back (`queue_group_commit`, as the server pipelines
/// them) are ordered by version before any is durable, share the writer's writes, and all
/// come back after a reopen; a stale version still conflicts and writes nothing. With
/// `--durability memory` (no writer thread) nothing is written until the first wait, and that
/// one write takes all 32.
#[tokio::test]
async fn queued_commits_of_one_group_share_writes_and_keep_their_order() {
    queued_commits_share_writes(Durability::Fsync).await;
}

#[tokio::test]
async fn queued_commits_of_one_group_share_writes_and_keep_their_order_without_a_writer_thread() {
    queued_commits_share_writes(Durability::Memory).await;
}

async fn queued_commits_share_writes(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let config = DiskConfig {
        durability,
        ..DiskConfig::new(dir.path())
    };
    let engine = DiskEngine::open(config.clone()).unwrap();
    let mut live = Live::create(&engine, "q", "g").await;
    let start = engine.wal_stats();
    let (s, g) = (stream("q"), gname("g"));
    let mut durable = Vec::new();
    for i in 0..32u64 {
        let want = live.state.want(1, 2_000 + i);
        let request = ReceiveRequest {
            member: MemberName::new("w1").unwrap(),
            max: 1,
            visibility_timeout: None,
        };
        let out = live
            .state
            .receive(
                &request,
                &stream_state(),
                &fetched(want.after, want.limit),
                2_000 + i,
            )
            .unwrap();
        match engine
            .queue_group_commit(&s, &g, live.version, out.changes)
            .await
            .unwrap()
        {
            spool_engine::QueuedCommit::Queued {
                version,
                durable: d,
            } => {
                assert_eq!(version, live.version + 1);
                live.version = version;
                durable.push(d);
            }
            spool_engine::QueuedCommit::Conflict => panic!("commit {i} conflicted"),
        }
    }
    assert!(matches!(
        engine
            .queue_group_commit(&s, &g, live.version - 1, Vec::new())
            .await
            .unwrap(),
        spool_engine::QueuedCommit::Conflict
    ));
    for d in durable {
        d.await.unwrap();
    }
    let end = engine.wal_stats();
    assert_eq!(end.group_requests - start.group_requests, 32);
    assert!(
        end.batches - start.batches < 32,
        "32 queued commits took {} writes: none shared",
        end.batches - start.batches
    );
    if durability == Durability::Memory {
        assert_eq!(
            end.batches - start.batches,
            1,
            "the first wait wrote all 32"
        );
    }
    let stored = engine.load_group(&s, &g).await.unwrap().unwrap();
    assert_eq!(
        (stored.version, rebuilt(&stored)),
        (32, live.state.snapshot())
    );
    drop(engine);
    let engine = DiskEngine::open(config).unwrap();
    let stored = engine.load_group(&s, &g).await.unwrap().unwrap();
    assert_eq!(
        (stored.version, rebuilt(&stored)),
        (32, live.state.snapshot())
    );
}

/// A WAL written before group changes were binary (kinds 3 and 4, JSON) is read: a group
/// restated and committed in JSON comes back, and goes on with binary commits.
#[tokio::test]
async fn json_group_records_of_older_versions_are_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DiskConfig::new(dir.path());
    let (mut live, json) = {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let mut live = Live::create(&engine, "old", "g").await;
        live.receive(&engine, 3, 2_000).await;
        let stored = engine
            .load_group(&stream("old"), &gname("g"))
            .await
            .unwrap()
            .unwrap();
        // As an older version would have written the group whole, then one more commit.
        let mut json = Vec::new();
        record::tests::encode_group_put_json(
            &mut json,
            stored.version,
            &stored.snapshot,
            &stored.changes,
        );
        let receipts: Vec<String> = live.receipts.drain(..2).collect();
        let out = live.state.ack(&receipts, 2_100).unwrap();
        record::tests::encode_group_commit_json(
            &mut json,
            &stream("old"),
            &gname("g"),
            stored.snapshot.id,
            stored.version + 1,
            &out.changes,
        );
        live.version = stored.version + 1;
        (live, json)
    };
    let wal = dir.path().join("wal");
    let last = segment::path(&wal, *wal_ids(dir.path()).last().unwrap());
    let mut file = fs::OpenOptions::new().append(true).open(&last).unwrap();
    std::io::Write::write_all(&mut file, &json).unwrap();
    drop(file);
    let engine = DiskEngine::open(cfg.clone()).unwrap();
    let stored = engine
        .load_group(&stream("old"), &gname("g"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.version, rebuilt(&stored)),
        (2, live.state.snapshot())
    );
    live.ack(&engine, 1, 2_200).await;
    drop(engine);
    let engine = DiskEngine::open(cfg).unwrap();
    let stored = engine
        .load_group(&stream("old"), &gname("g"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (stored.version, rebuilt(&stored)),
        (3, live.state.snapshot())
    );
}

/// Without a writer thread a commit is only queued until its durability is waited for: a
/// wait given up before it began (the caller was cancelled: a client gone mid-request) still
/// writes it, so nothing queued waits for a next operation that may never come.
#[tokio::test]
async fn a_commit_whose_wait_is_dropped_is_still_written_without_a_writer_thread() {
    let dir = tempfile::tempdir().unwrap();
    let config = DiskConfig {
        durability: Durability::Memory,
        ..DiskConfig::new(dir.path())
    };
    let engine = DiskEngine::open(config.clone()).unwrap();
    let live = Live::create(&engine, "d", "g").await;
    let (s, g) = (stream("d"), gname("g"));
    let changes = vec![spool_core::group::Change::CountersSet {
        counters: Default::default(),
    }];
    let queued = engine
        .queue_group_commit(&s, &g, live.version, changes)
        .await
        .unwrap();
    let spool_engine::QueuedCommit::Queued { version, durable } = queued else {
        panic!("the commit conflicted");
    };
    let batches = engine.wal_stats().batches;
    drop(durable);
    assert_eq!(
        engine.wal_stats().batches,
        batches + 1,
        "dropping the wait wrote it"
    );
    let stored = engine.shared.groups.table.load(&s, &g).unwrap();
    assert_eq!(stored.version, version, "applied to the durable table");
    drop(engine);
    let engine = DiskEngine::open(config).unwrap();
    assert_eq!(
        engine.load_group(&s, &g).await.unwrap().unwrap().version,
        version
    );
}
