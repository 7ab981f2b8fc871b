//! The [`GroupStore`] conformance suite: what every engine's group store must do, run by each
//! engine's tests against a fresh store (`run(&store)`; stream names are made unique per run,
//! so a shared Redis or NATS server needs no cleaning).
//!
//! It checks the store's contract, not the state machine (`spool_core::group` has its own
//! property tests): creation once per name, versioned commits that refuse a stale writer,
//! compaction, listing, deletion, and that what is loaded rebuilds the state that was committed.

use spool_core::{
    Epoch, NewMessage, Offset, StreamName, StreamState,
    group::{GroupConfig, GroupName, GroupState, MemberName, ReceiveRequest},
};

use crate::{Committed, GroupStore, QueuedCommit};

fn unique(prefix: &str) -> StreamName {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    StreamName::new(&format!("{prefix}-{}-{nanos}-{n}", std::process::id()))
        .expect("a valid stream name")
}

fn group(name: &str) -> GroupName {
    GroupName::new(name).expect("a valid group name")
}

/// Runs every case against `store`.
pub async fn run(store: &dyn GroupStore) {
    create_load_list_delete(store).await;
    commits_are_versioned(store).await;
    compaction_keeps_the_state(store).await;
    queued_commits_keep_their_order(store).await;
}

fn state_at(stream: &StreamName, name: &GroupName, head: u64) -> (GroupState, StreamState) {
    let stream_state = StreamState {
        epoch: Epoch::parse("e1").expect("epoch"),
        oldest: Offset(1),
        head: Offset(head),
    };
    let config = GroupConfig {
        start: spool_core::Start::Oldest,
        ..GroupConfig::default()
    };
    let state = GroupState::new(stream.clone(), name.clone(), config, &stream_state, 1_000)
        .expect("a valid group");
    (state, stream_state)
}

fn messages(n: u64) -> Vec<spool_core::Message> {
    (1..=n)
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

async fn create_load_list_delete(store: &dyn GroupStore) {
    let stream = unique("groups-a");
    let other = unique("groups-b");
    let (state, _) = state_at(&stream, &group("g1"), 0);
    assert!(store.create_group(&state.snapshot()).await.unwrap());
    assert!(
        !store.create_group(&state.snapshot()).await.unwrap(),
        "a second creation of the same name creates nothing"
    );
    let (second, _) = state_at(&stream, &group("g0"), 0);
    assert!(store.create_group(&second.snapshot()).await.unwrap());
    let (elsewhere, _) = state_at(&other, &group("g1"), 0);
    assert!(store.create_group(&elsewhere.snapshot()).await.unwrap());

    let loaded = store.load_group(&stream, &group("g1")).await.unwrap();
    let loaded = loaded.expect("the group just created");
    assert_eq!(
        (
            loaded.snapshot.clone(),
            loaded.changes.len(),
            loaded.version
        ),
        (state.snapshot(), 0, 0)
    );
    assert!(
        store
            .load_group(&stream, &group("nope"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.list_groups(Some(&stream)).await.unwrap(),
        vec![(stream.clone(), group("g0")), (stream.clone(), group("g1"))],
        "a stream's groups, in name order"
    );
    let all = store.list_groups(None).await.unwrap();
    assert!(all.contains(&(other.clone(), group("g1"))));

    assert!(store.delete_group(&stream, &group("g1")).await.unwrap());
    assert!(!store.delete_group(&stream, &group("g1")).await.unwrap());
    assert!(
        store
            .load_group(&stream, &group("g1"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .commit_group(&stream, &group("g1"), 0, &[])
            .await
            .unwrap(),
        Committed::Conflict,
        "a deleted group takes no commit"
    );
    // The name is free again: a new incarnation, with a new id.
    let (again, _) = state_at(&stream, &group("g1"), 0);
    assert!(store.create_group(&again.snapshot()).await.unwrap());
    assert_ne!(again.snapshot().id, state.snapshot().id);
    for (s, g) in [(&stream, "g0"), (&stream, "g1"), (&other, "g1")] {
        store.delete_group(s, &group(g)).await.unwrap();
    }
}

async fn commits_are_versioned(store: &dyn GroupStore) {
    let stream = unique("groups-c");
    let name = group("workers");
    let (mut state, stream_state) = state_at(&stream, &name, 5);
    assert!(store.create_group(&state.snapshot()).await.unwrap());
    let member = MemberName::new("w1").unwrap();
    let want = state.want(3, 2_000);
    assert_eq!(want.after, Offset(0));
    let fetched = messages(5);
    let request = ReceiveRequest {
        member,
        max: 3,
        visibility_timeout: None,
    };
    let received = state
        .receive(
            &request,
            &stream_state,
            &fetched[..want.limit.min(5)],
            2_000,
        )
        .unwrap();
    assert_eq!(received.value.deliveries.len(), 3);
    assert!(!received.changes.is_empty());
    assert_eq!(
        store
            .commit_group(&stream, &name, 0, &received.changes)
            .await
            .unwrap(),
        Committed::Done { version: 1 }
    );
    // A writer that computed against version 0 is too late.
    assert_eq!(
        store
            .commit_group(&stream, &name, 0, &received.changes)
            .await
            .unwrap(),
        Committed::Conflict
    );
    let receipts: Vec<String> = received
        .value
        .deliveries
        .iter()
        .map(|d| d.receipt.encode())
        .collect();
    let acked = state.ack(&receipts[..2], 2_500).unwrap();
    assert_eq!(
        store
            .commit_group(&stream, &name, 1, &acked.changes)
            .await
            .unwrap(),
        Committed::Done { version: 2 }
    );

    let loaded = store.load_group(&stream, &name).await.unwrap().unwrap();
    assert_eq!(loaded.version, 2);
    let mut rebuilt = GroupState::from_snapshot(loaded.snapshot).unwrap();
    for change in &loaded.changes {
        rebuilt.apply(change);
    }
    assert_eq!(
        rebuilt.snapshot(),
        state.snapshot(),
        "what is loaded rebuilds what was committed"
    );
    store.delete_group(&stream, &name).await.unwrap();
}

async fn compaction_keeps_the_state(store: &dyn GroupStore) {
    let stream = unique("groups-d");
    let name = group("compacted");
    let (mut state, stream_state) = state_at(&stream, &name, 2);
    assert!(store.create_group(&state.snapshot()).await.unwrap());
    let request = ReceiveRequest {
        member: MemberName::new("w").unwrap(),
        max: 2,
        visibility_timeout: None,
    };
    let received = state
        .receive(&request, &stream_state, &messages(2), 2_000)
        .unwrap();
    store
        .commit_group(&stream, &name, 0, &received.changes)
        .await
        .unwrap();
    // A compaction computed against another version is refused; at the right one it
    // replaces snapshot and changes, and keeps the version.
    assert_eq!(
        store
            .compact_group(&stream, &name, 0, &state.snapshot())
            .await
            .unwrap(),
        Committed::Conflict
    );
    assert_eq!(
        store
            .compact_group(&stream, &name, 1, &state.snapshot())
            .await
            .unwrap(),
        Committed::Done { version: 1 }
    );
    let loaded = store.load_group(&stream, &name).await.unwrap().unwrap();
    assert_eq!(
        (loaded.snapshot, loaded.changes.len(), loaded.version),
        (state.snapshot(), 0, 1)
    );
    // Commits go on from there.
    let receipt = received.value.deliveries[0].receipt.encode();
    let acked = state.ack(&[receipt], 2_100).unwrap();
    assert_eq!(
        store
            .commit_group(&stream, &name, 1, &acked.changes)
            .await
            .unwrap(),
        Committed::Done { version: 2 }
    );
    store.delete_group(&stream, &name).await.unwrap();
}

/// `queue_group_commit`: each answer names the next version; commits queued one after the
/// other (the next against the version the previous one returned, before it is durable) are
/// all stored once their futures resolve, in order; a stale one conflicts.
async fn queued_commits_keep_their_order(store: &dyn GroupStore) {
    let stream = unique("groups-q");
    let name = group("queued");
    let (mut state, stream_state) = state_at(&stream, &name, 8);
    assert!(store.create_group(&state.snapshot()).await.unwrap());
    let request = ReceiveRequest {
        member: MemberName::new("w").unwrap(),
        max: 1,
        visibility_timeout: None,
    };
    let all = messages(8);
    let mut version = 0;
    let mut durable = Vec::new();
    for i in 0..4u64 {
        let want = state.want(1, 2_000 + i);
        let from = want.after.get() as usize;
        let received = state
            .receive(
                &request,
                &stream_state,
                &all[from..from + want.limit],
                2_000 + i,
            )
            .unwrap();
        assert_eq!(received.value.deliveries.len(), 1);
        match store
            .queue_group_commit(&stream, &name, version, received.changes)
            .await
            .unwrap()
        {
            QueuedCommit::Queued {
                version: v,
                durable: d,
            } => {
                assert_eq!(v, version + 1);
                version = v;
                durable.push(d);
            }
            QueuedCommit::Conflict => panic!("queued commit {i} conflicted"),
        }
    }
    assert!(matches!(
        store
            .queue_group_commit(&stream, &name, 2, Vec::new())
            .await
            .unwrap(),
        QueuedCommit::Conflict
    ));
    for d in durable {
        d.await.unwrap();
    }
    let loaded = store.load_group(&stream, &name).await.unwrap().unwrap();
    assert_eq!(loaded.version, 4);
    let mut rebuilt = GroupState::from_snapshot(loaded.snapshot).unwrap();
    for change in &loaded.changes {
        rebuilt.apply(change);
    }
    assert_eq!(rebuilt.snapshot(), state.snapshot());
    store.delete_group(&stream, &name).await.unwrap();
}
