//! The Redis group store: the group-store conformance suite, two nodes racing commits to one
//! group, the `--max-groups` bound, an outage, and (ignored, run by hand) commit throughput.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use spool_core::{
    Epoch, NewMessage, Offset, StreamName, StreamState,
    group::{Change, Counters, GroupConfig, GroupName, GroupState, MemberName, ReceiveRequest},
};
use spool_engine::{Committed, EngineError, GroupStore, Limit, group_conformance};
use spool_redis::{RedisConfig, RedisEngine};
use spool_testkit::engines::{Backend, OwnServer};

use common::Prefix;

async fn connect(config: RedisConfig) -> Arc<RedisEngine> {
    Arc::new(
        RedisEngine::connect(config)
            .await
            .expect("connect to the test Redis"),
    )
}

fn stream_state(head: u64) -> StreamState {
    StreamState {
        epoch: Epoch::parse("e1").expect("epoch"),
        oldest: Offset(1),
        head: Offset(head),
    }
}

fn new_group(stream: &str, group: &str, head: u64) -> GroupState {
    GroupState::new(
        StreamName::new(stream).unwrap(),
        GroupName::new(group).unwrap(),
        GroupConfig {
            start: spool_core::Start::Oldest,
            ..GroupConfig::default()
        },
        &stream_state(head),
        1_000,
    )
    .expect("a valid group")
}

fn messages(from: u64, to: u64) -> Vec<spool_core::Message> {
    (from..=to)
        .map(|i| {
            NewMessage {
                payload: bytes::Bytes::from(format!("m{i}")),
                ..Default::default()
            }
            .stamp(Offset(i), 1_000)
            .0
        })
        .collect()
}

fn rebuild(stored: spool_engine::StoredGroup) -> GroupState {
    let mut state = GroupState::from_snapshot(stored.snapshot).expect("a stored snapshot loads");
    for change in &stored.changes {
        state.apply(change);
    }
    state
}

/// One member's receive of up to 2 messages on its own copy of the group: the changes to
/// commit, and the state they lead to.
fn receive(state: &mut GroupState, member: &str, head: u64, now: u64) -> Vec<Change> {
    let want = state.want(2, now);
    let fetched = messages(
        want.after.get() + 1,
        head.min(want.after.get() + want.limit as u64),
    );
    let request = ReceiveRequest {
        member: MemberName::new(member).unwrap(),
        max: 2,
        visibility_timeout: None,
    };
    state
        .receive(&request, &stream_state(head), &fetched, now)
        .expect("a receive")
        .changes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_group_store_conforms() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let engine = connect(prefix.config()).await;
    tokio::time::timeout(Duration::from_secs(60), group_conformance::run(&*engine))
        .await
        .expect("the group conformance suite finishes within a minute");
}

/// Two nodes load the same version and commit different operations at once: exactly one
/// commit wins each round, the loser reloads, and both nodes load the same state — the
/// winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_racing_on_one_group_commit_one_at_a_time() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let (a, b) = (
        connect(prefix.config()).await,
        connect(prefix.config()).await,
    );
    let head = 200;
    let created = new_group("race", "workers", head);
    assert!(a.create_group(&created.snapshot()).await.unwrap());
    let (s, g) = (
        StreamName::new("race").unwrap(),
        GroupName::new("workers").unwrap(),
    );
    for round in 0..25u64 {
        let now = 2_000 + round;
        let from_a = a.load_group(&s, &g).await.unwrap().expect("on node a");
        let from_b = b.load_group(&s, &g).await.unwrap().expect("on node b");
        assert_eq!(from_a, from_b, "round {round}: both nodes load one state");
        assert_eq!(from_a.version, round);
        let version = from_a.version;
        let (mut state_a, mut state_b) = (rebuild(from_a), rebuild(from_b));
        let changes_a = receive(&mut state_a, "on-a", head, now);
        let changes_b = receive(&mut state_b, "on-b", head, now);
        let (ra, rb) = tokio::join!(
            a.commit_group(&s, &g, version, &changes_a),
            b.commit_group(&s, &g, version, &changes_b)
        );
        let winner = match (ra.unwrap(), rb.unwrap()) {
            (Committed::Done { version: v }, Committed::Conflict) => {
                assert_eq!(v, version + 1);
                state_a
            }
            (Committed::Conflict, Committed::Done { version: v }) => {
                assert_eq!(v, version + 1);
                state_b
            }
            other => panic!("round {round}: exactly one commit must win, got {other:?}"),
        };
        let after_a = a.load_group(&s, &g).await.unwrap().unwrap();
        let after_b = b.load_group(&s, &g).await.unwrap().unwrap();
        assert_eq!(after_a, after_b);
        assert_eq!(after_a.version, version + 1);
        assert_eq!(
            rebuild(after_a).snapshot(),
            winner.snapshot(),
            "round {round}: the store holds the winner's state"
        );
        if round == 12 {
            // A compaction by one node does not disturb the other's next commit at that
            // version, and a stale one is refused.
            let current = b.load_group(&s, &g).await.unwrap().unwrap();
            let v = current.version;
            let snapshot = rebuild(current).snapshot();
            assert_eq!(
                a.compact_group(&s, &g, v - 1, &snapshot).await.unwrap(),
                Committed::Conflict
            );
            assert_eq!(
                a.compact_group(&s, &g, v, &snapshot).await.unwrap(),
                Committed::Done { version: v }
            );
            let compacted = b.load_group(&s, &g).await.unwrap().unwrap();
            assert!(compacted.changes.is_empty());
            assert_eq!(compacted.version, v);
        }
    }
    assert!(b.delete_group(&s, &g).await.unwrap());
    assert!(a.load_group(&s, &g).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_groups_bounds_creation_only() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let config = RedisConfig {
        max_groups: 2,
        ..prefix.config()
    };
    let (a, b) = (connect(config.clone()).await, connect(config).await);
    assert!(
        a.create_group(&new_group("s1", "g1", 0).snapshot())
            .await
            .unwrap()
    );
    assert!(
        b.create_group(&new_group("s2", "g1", 0).snapshot())
            .await
            .unwrap()
    );
    let third = new_group("s1", "g2", 0);
    match b.create_group(&third.snapshot()).await {
        Err(EngineError::Limit(Limit::Groups { max: 2 })) => {}
        other => panic!("a third group past --max-groups 2: {other:?}"),
    }
    // An existing name is still answered "exists", and groups that exist still commit.
    assert!(
        !a.create_group(&new_group("s1", "g1", 0).snapshot())
            .await
            .unwrap()
    );
    let s1 = StreamName::new("s1").unwrap();
    let g1 = GroupName::new("g1").unwrap();
    let counters = Change::CountersSet {
        counters: Counters::default(),
    };
    assert_eq!(
        b.commit_group(&s1, &g1, 0, &[counters]).await.unwrap(),
        Committed::Done { version: 1 }
    );
    assert_eq!(a.list_groups(None).await.unwrap().len(), 2);
    assert!(a.delete_group(&s1, &g1).await.unwrap());
    assert!(b.create_group(&third.snapshot()).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_unavailable_and_then_over() {
    let Some(mut server) = OwnServer::start(Backend::Redis) else {
        return;
    };
    let timeout = Duration::from_secs(1);
    let engine = connect(RedisConfig {
        timeout,
        ..RedisConfig::new(server.url())
    })
    .await;
    let state = new_group("down", "g", 0);
    let (s, g) = (
        StreamName::new("down").unwrap(),
        GroupName::new("g").unwrap(),
    );
    assert!(engine.create_group(&state.snapshot()).await.unwrap());
    server.kill();
    let started = Instant::now();
    let errors = [
        engine.load_group(&s, &g).await.map(|_| ()),
        engine.commit_group(&s, &g, 0, &[]).await.map(|_| ()),
        engine.list_groups(None).await.map(|_| ()),
        engine.create_group(&state.snapshot()).await.map(|_| ()),
        engine.delete_group(&s, &g).await.map(|_| ()),
    ];
    for e in errors {
        let e = e.expect_err("Redis is down");
        assert!(e.is_unavailable(), "{e}");
    }
    assert!(started.elapsed() < 5 * (timeout + Duration::from_secs(1)));
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match engine.list_groups(None).await {
            Ok(_) => break,
            Err(e) => {
                assert!(e.is_unavailable(), "{e}");
                assert!(Instant::now() < deadline, "Redis is back: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

const COMPACT_EVERY: u64 = 64;

/// Successful commits per second on one group: `committers` tasks over two nodes, each
/// committing an ack-sized change at the version it knows, reloading on `Conflict` and
/// compacting every [`COMPACT_EVERY`] versions.
async fn throughput(nodes: &[Arc<RedisEngine>], committers: usize, run: Duration) -> (u64, u64) {
    let state = new_group("bench", "g", 0);
    let (s, g) = (
        StreamName::new("bench").unwrap(),
        GroupName::new(&format!("g{committers}")).unwrap(),
    );
    let mut snapshot = state.snapshot();
    snapshot.group = g.clone();
    assert!(nodes[0].create_group(&snapshot).await.unwrap());
    let until = Instant::now() + run;
    let tasks: Vec<_> = (0..committers)
        .map(|i| {
            let node = nodes[i % nodes.len()].clone();
            let (s, g, snapshot) = (s.clone(), g.clone(), snapshot.clone());
            tokio::spawn(async move {
                let (mut done, mut conflicts) = (0u64, 0u64);
                let mut version = 0;
                let changes = [
                    Change::EntryRemoved {
                        offset: Offset(i as u64),
                    },
                    Change::CountersSet {
                        counters: Counters::default(),
                    },
                ];
                while Instant::now() < until {
                    match node.commit_group(&s, &g, version, &changes).await.unwrap() {
                        Committed::Done { version: v } => {
                            version = v;
                            done += 1;
                            // As the server does every so many commits: the store stays small.
                            if v % COMPACT_EVERY == 0 {
                                node.compact_group(&s, &g, v, &snapshot).await.unwrap();
                            }
                        }
                        Committed::Conflict => {
                            conflicts += 1;
                            version = node.load_group(&s, &g).await.unwrap().unwrap().version;
                        }
                    }
                }
                (done, conflicts)
            })
        })
        .collect();
    let (mut done, mut conflicts) = (0, 0);
    for t in tasks {
        let (d, c) = t.await.unwrap();
        done += d;
        conflicts += c;
    }
    let stored = nodes[0].load_group(&s, &g).await.unwrap().unwrap();
    assert_eq!(stored.version, done, "every Done is one version, no more");
    (done, conflicts)
}

/// `cargo test -p spool-redis --test groups -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, run by hand"]
async fn commit_throughput() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let nodes = [
        connect(prefix.config()).await,
        connect(prefix.config()).await,
    ];
    let run = Duration::from_secs(3);
    for committers in [1, 8] {
        let (done, conflicts) = throughput(&nodes, committers, run).await;
        println!(
            "redis: {committers} committer(s) on one group over 2 nodes: {:.0} commits/s \
             ({conflicts} conflicts, each a reload)",
            done as f64 / run.as_secs_f64()
        );
    }
    // A load of a group 256 commits after its snapshot (the server compacts every 256).
    let state = new_group("bench", "loaded", 0);
    let (s, g) = (
        StreamName::new("bench").unwrap(),
        GroupName::new("loaded").unwrap(),
    );
    assert!(nodes[0].create_group(&state.snapshot()).await.unwrap());
    let changes = [Change::CountersSet {
        counters: Counters::default(),
    }];
    for v in 0..256 {
        nodes[0].commit_group(&s, &g, v, &changes).await.unwrap();
    }
    let started = Instant::now();
    assert_eq!(
        nodes[1].load_group(&s, &g).await.unwrap().unwrap().version,
        256
    );
    let first = started.elapsed();
    // Then, as a node does after a Conflict: another node committed once since its last load.
    let rounds = 20u64;
    let mut again = Duration::ZERO;
    for v in 256..256 + rounds {
        nodes[0].commit_group(&s, &g, v, &changes).await.unwrap();
        let started = Instant::now();
        let loaded = nodes[1].load_group(&s, &g).await.unwrap().unwrap();
        again += started.elapsed();
        assert_eq!(
            (loaded.version, loaded.changes.len() as u64),
            (v + 1, v + 1)
        );
    }
    println!(
        "redis: loading a group 256 commits after its snapshot takes {first:?}; loading it \
         again after one more commit by another node {:?}",
        again / rounds as u32
    );
}

/// Group writes are as durable as appends: `fsync` works against a Redis with `appendfsync
/// always`; `replicated` waits for the replicas, and with too few says so (`Unavailable`) —
/// the write may be stored, which the caller learns by loading the group again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_writes_follow_the_engines_durability() {
    let Some(server) = OwnServer::start_with(
        Backend::Redis,
        &["--appendonly", "yes", "--appendfsync", "always"],
    ) else {
        return;
    };
    let timeout = Duration::from_secs(1);
    let config = |durability| RedisConfig {
        durability,
        timeout,
        ..RedisConfig::new(server.url())
    };
    let fsync = connect(config(spool_redis::RedisDurability::Fsync)).await;
    let state = new_group("durable", "g", 0);
    let (s, g) = (
        StreamName::new("durable").unwrap(),
        GroupName::new("g").unwrap(),
    );
    assert!(fsync.create_group(&state.snapshot()).await.unwrap());
    let counters = [Change::CountersSet {
        counters: Counters::default(),
    }];
    assert_eq!(
        fsync.commit_group(&s, &g, 0, &counters).await.unwrap(),
        Committed::Done { version: 1 }
    );

    // No replica is connected: a replicated commit is refused after the WAIT, though stored.
    let replicated = connect(config(spool_redis::RedisDurability::Replicated {
        replicas: 1,
    }))
    .await;
    let started = Instant::now();
    let e = replicated
        .commit_group(&s, &g, 1, &counters)
        .await
        .expect_err("no replica acknowledged");
    assert!(
        e.is_unavailable() && e.to_string().contains("0 of 1"),
        "{e}"
    );
    assert!(started.elapsed() < timeout + Duration::from_secs(2));
    assert_eq!(
        replicated
            .load_group(&s, &g)
            .await
            .unwrap()
            .unwrap()
            .version,
        2,
        "the write itself was applied; reloading shows it"
    );
    // A stale commit is refused without waiting for anything.
    assert_eq!(
        replicated.commit_group(&s, &g, 1, &counters).await.unwrap(),
        Committed::Conflict
    );
}
