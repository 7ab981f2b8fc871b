//! Scenario tests of the group state machine against a fake stream, with time given by hand.

use std::time::Duration;

use super::{receive::MAX_RECEIPTS, *};
use crate::{
    continuity::{ResetReason, Start, StreamState},
    message::Message,
    name::StreamName,
    position::{Epoch, Offset, Position},
};

/// A stream as an engine holds it: one epoch, retained messages `oldest..=head`.
struct FakeStream {
    epoch: Epoch,
    messages: Vec<Message>,
    oldest: u64,
}

impl FakeStream {
    fn new() -> Self {
        FakeStream {
            epoch: Epoch::parse("e1").unwrap(),
            messages: Vec::new(),
            oldest: 1,
        }
    }

    fn publish(&mut self, key: Option<&str>, time_ms: u64) -> Offset {
        let offset = Offset(self.messages.len() as u64 + 1);
        self.messages.push(Message {
            offset,
            time_ms,
            payload: Default::default(),
            content_type: None,
            key: key.map(str::to_owned),
            headers: Vec::new(),
        });
        offset
    }

    fn state(&self) -> StreamState {
        StreamState {
            epoch: self.epoch.clone(),
            head: Offset(self.messages.len() as u64),
            oldest: Offset(self.oldest),
        }
    }

    fn read(&self, after: Offset, limit: usize) -> Vec<Message> {
        if after.0 + 1 < self.oldest {
            return Vec::new();
        }
        self.messages
            .iter()
            .skip(after.0 as usize)
            .take(limit)
            .cloned()
            .collect()
    }
}

fn member(name: &str) -> MemberName {
    MemberName::new(name).unwrap()
}

fn group(config: GroupConfig, stream: &FakeStream) -> GroupState {
    GroupState::new(
        StreamName::new("orders").unwrap(),
        GroupName::new("billing").unwrap(),
        config,
        &stream.state(),
        0,
    )
    .unwrap()
}

/// A whole receive, as the delivery layer will do it; checks that the changes replay.
fn receive(g: &mut GroupState, s: &FakeStream, who: &str, max: u32, now: u64) -> Outcome<Received> {
    let before = g.clone();
    let want = g.want(max, now);
    let fetched = s.read(want.after, want.limit);
    let request = ReceiveRequest {
        member: member(who),
        max,
        visibility_timeout: None,
    };
    let mut out = g.receive(&request, &s.state(), &fetched, now).unwrap();
    assert_replays(&before, &out.changes, g);
    if out.value.read_again {
        let rest = max - out.value.deliveries.len() as u32;
        let more = receive(g, s, who, rest, now);
        assert!(!more.value.read_again);
        out.value.deliveries.extend(more.value.deliveries);
        out.changes.extend(more.changes);
        out.dead_letters.extend(more.dead_letters);
    }
    out
}

fn assert_replays(before: &GroupState, changes: &[Change], after: &GroupState) {
    let mut replay = GroupState::from_snapshot(before.snapshot()).unwrap();
    for c in changes {
        let json = serde_json::to_string(c).unwrap();
        replay.apply(&serde_json::from_str(&json).unwrap());
    }
    assert_eq!(&replay, after);
}

fn offsets(out: &Outcome<Received>) -> Vec<u64> {
    out.value.deliveries.iter().map(|d| d.offset.0).collect()
}

fn receipts(out: &Outcome<Received>) -> Vec<String> {
    out.value
        .deliveries
        .iter()
        .map(|d| d.receipt.encode())
        .collect()
}

fn config(json: &str) -> GroupConfig {
    GroupConfig::from_spec(&serde_json::from_str(json).unwrap()).unwrap()
}

use ReceiptResult::{Expired, Ok as Done, Unknown};

#[test]
fn receive_then_ack_finishes_a_message_once() {
    let mut s = FakeStream::new();
    for t in 0..5 {
        s.publish(None, 100 + t);
    }
    let mut g = group(GroupConfig::default(), &s);
    let out = receive(&mut g, &s, "w1", 3, 1_000);
    assert_eq!(offsets(&out), [1, 2, 3]);
    let d = &out.value.deliveries[0];
    assert_eq!(d.deliveries, 1);
    assert_eq!(d.until_ms, 31_000);
    assert_eq!(d.epoch.as_str(), "e1");
    assert_eq!(g.cursor().offset, Offset(3));
    let stats = g.stats(&s.state(), Some(103), 1_000);
    assert_eq!((stats.pending, stats.in_flight), (2, 3));
    assert_eq!(stats.oldest_age_ms, 900);
    assert_eq!(stats.members[0].in_flight, 3);
    assert_eq!(stats.members[0].last_seen_ms, 1_000);

    let r = receipts(&out);
    let acked = g.ack(&[&r[0], &r[0], &r[1]], 2_000).unwrap();
    assert_eq!(acked.value, [Done, Expired, Done]);
    assert!(acked.dead_letters.is_empty());
    assert_eq!(g.counters().acked, 2);
    // The rest, then nothing.
    let out = receive(&mut g, &s, "w2", 10, 3_000);
    assert_eq!(offsets(&out), [4, 5]);
    assert!(
        receive(&mut g, &s, "w2", 10, 3_000)
            .value
            .deliveries
            .is_empty()
    );
    // Idle receives within the last-seen resolution store nothing.
    assert!(receive(&mut g, &s, "w2", 10, 3_500).is_noop());
}

#[test]
fn a_lease_that_runs_out_comes_back_and_its_receipt_is_expired() {
    let mut s = FakeStream::new();
    s.publish(None, 0);
    let mut g = group(config(r#"{"visibility_timeout": "10s"}"#), &s);
    let first = receive(&mut g, &s, "w1", 1, 0);
    let old = receipts(&first);
    // Hidden from everyone while leased.
    assert!(
        receive(&mut g, &s, "w2", 1, 9_999)
            .value
            .deliveries
            .is_empty()
    );
    // At until_ms the lease is over: its receipt no longer acks.
    assert_eq!(g.ack(&old, 10_000).unwrap().value, [Expired]);
    let second = receive(&mut g, &s, "w2", 1, 10_000);
    assert_eq!(offsets(&second), [1]);
    assert_eq!(second.value.deliveries[0].deliveries, 2);
    assert_ne!(receipts(&second), old);
    assert_eq!(g.ack(&old, 10_001).unwrap().value, [Expired]);
    assert_eq!(g.ack(&receipts(&second), 10_001).unwrap().value, [Done]);
    let c = g.counters();
    assert_eq!((c.acked, c.redelivered), (1, 1));
    let stats = g.stats(&s.state(), None, 10_001);
    let w1 = stats.members.iter().find(|m| m.consumer.as_str() == "w1");
    assert_eq!(w1.unwrap().timeouts, 1);
}

#[test]
fn backoff_delays_redelivery_per_delivery_count_and_repeats_its_last_step() {
    let mut s = FakeStream::new();
    s.publish(None, 0);
    let mut g = group(
        config(r#"{"visibility_timeout": "1s", "backoff": ["2s", "5s"], "max_deliveries": 10}"#),
        &s,
    );
    let mut now = 0;
    let steps = [2_000, 5_000, 5_000, 5_000];
    for (i, step) in steps.into_iter().enumerate() {
        let out = receive(&mut g, &s, "w", 1, now);
        assert_eq!(out.value.deliveries.len(), 1, "delivery {}", i + 1);
        assert_eq!(out.value.deliveries[0].deliveries, i as u32 + 1);
        let until = now + 1_000;
        assert_eq!(g.next_wakeup(now), Some(until));
        // Run out, then invisible for exactly the step.
        assert!(g.expire(until).dead_letters.is_empty());
        assert_eq!(g.next_wakeup(until), Some(until + step));
        assert!(
            receive(&mut g, &s, "w", 1, until + step - 1)
                .value
                .deliveries
                .is_empty()
        );
        now = until + step;
    }
}

#[test]
fn max_deliveries_dead_letters_with_the_documented_headers() {
    let mut s = FakeStream::new();
    s.publish(Some("k"), 0);
    let mut g = group(
        config(r#"{"visibility_timeout": "1s", "max_deliveries": 2}"#),
        &s,
    );
    assert_eq!(offsets(&receive(&mut g, &s, "w", 1, 0)), [1]);
    assert_eq!(offsets(&receive(&mut g, &s, "w", 1, 1_000)), [1]);
    let out = g.expire(2_000);
    assert_eq!(out.dead_letters.len(), 1);
    let d = &out.dead_letters[0];
    assert_eq!(d.to.as_str(), "orders.billing.dead");
    assert_eq!(d.key.as_deref(), Some("k"));
    let headers = d.headers();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).unwrap().1.clone();
    assert_eq!(get("spool-dead-stream"), "orders");
    assert_eq!(get("spool-dead-epoch"), "e1");
    assert_eq!(get("spool-dead-offset"), "1");
    assert_eq!(get("spool-dead-deliveries"), "2");
    assert_eq!(get("spool-dead-reason"), "max_deliveries");
    assert!(g.entry(Offset(1)).is_none());
    assert_eq!(g.counters().dead_lettered, 1);
    assert!(
        receive(&mut g, &s, "w", 1, 10_000)
            .value
            .deliveries
            .is_empty()
    );
}

#[test]
fn nack_delays_and_its_reason_names_the_dead_letter() {
    let mut s = FakeStream::new();
    s.publish(None, 0);
    let mut g = group(config(r#"{"max_deliveries": 2}"#), &s);
    let r = receipts(&receive(&mut g, &s, "w", 1, 0));
    let out = g.nack(&r, Duration::from_secs(5), None, 100).unwrap();
    assert_eq!(out.value, [Done]);
    assert!(out.dead_letters.is_empty());
    assert!(
        receive(&mut g, &s, "w", 1, 5_099)
            .value
            .deliveries
            .is_empty()
    );
    let r = receipts(&receive(&mut g, &s, "w", 1, 5_100));
    let reason = Reason::new("bad json").unwrap();
    let out = g.nack(&r, Duration::ZERO, Some(&reason), 5_200).unwrap();
    assert_eq!(out.dead_letters.len(), 1);
    assert_eq!(out.dead_letters[0].reason, "bad json");
    assert_eq!(out.dead_letters[0].deliveries, 2);
    let stats = g.stats(&s.state(), None, 6_000);
    assert_eq!(stats.members[0].nacks, 2);
    assert_eq!(stats.dead_lettered, 1);
    assert!(matches!(
        g.nack(&r, Duration::from_secs(13 * 3600), None, 0),
        Err(OpError::Delay(_))
    ));
}

#[test]
fn terminate_dead_letters_at_once_and_extend_keeps_the_lease() {
    let mut s = FakeStream::new();
    s.publish(None, 0);
    s.publish(None, 0);
    let mut g = group(config(r#"{"visibility_timeout": "10s"}"#), &s);
    let r = receipts(&receive(&mut g, &s, "w", 2, 0));
    let out = g.extend(&r[..1], Duration::from_secs(60), 9_000).unwrap();
    assert_eq!(out.value, [Done]);
    assert_eq!(g.next_wakeup(9_000), Some(10_000));
    // The second ran out at 10s; the first lives until 69s with the same receipt.
    assert_eq!(g.ack(&r[1..], 10_000).unwrap().value, [Expired]);
    let detail = Reason::new("schema v1").unwrap();
    let out = g.terminate(&r[..1], Some(&detail), 68_999).unwrap();
    assert_eq!(out.value, [Done]);
    let d = &out.dead_letters[0];
    assert_eq!(
        (d.reason.as_str(), d.detail.as_deref()),
        ("terminated", Some("schema v1"))
    );
    assert_eq!(d.deliveries, 1);
    assert!(matches!(
        g.extend(&r, Duration::ZERO, 0),
        Err(OpError::VisibilityTimeout(_))
    ));
}

#[test]
fn key_ordering_leases_one_message_per_key_in_offset_order() {
    let mut s = FakeStream::new();
    for key in ["a", "a", "b", "a", "c"] {
        s.publish(Some(key), 0);
    }
    s.publish(None, 0);
    let mut g = group(config(r#"{"ordering": "key"}"#), &s);
    let first = receive(&mut g, &s, "w1", 10, 0);
    assert_eq!(offsets(&first), [1, 3, 5, 6]);
    // 2 and 4 wait behind 1; another member gets nothing of key a.
    assert!(receive(&mut g, &s, "w2", 10, 1).value.deliveries.is_empty());
    assert_eq!(g.stats(&s.state(), None, 1).pending, 2);
    let r = receipts(&first);
    assert_eq!(g.ack(&r[..1], 2).unwrap().value, [Done]);
    let second = receive(&mut g, &s, "w2", 10, 3);
    assert_eq!(offsets(&second), [2]);
    // A nacked message of key a keeps its place: 4 still waits behind it, and it comes back
    // before 4.
    let nacked = g.nack(&receipts(&second), Duration::ZERO, None, 4).unwrap();
    assert_eq!(nacked.value, [Done]);
    let again = receive(&mut g, &s, "w1", 10, 5);
    assert_eq!(offsets(&again), [2]);
    assert_eq!(again.value.deliveries[0].deliveries, 2);
    assert_eq!(g.ack(&receipts(&again), 6).unwrap().value, [Done]);
    assert_eq!(offsets(&receive(&mut g, &s, "w1", 10, 7)), [4]);
}

#[test]
fn max_in_flight_bounds_leases() {
    let mut s = FakeStream::new();
    for _ in 0..10 {
        s.publish(None, 0);
    }
    let mut g = group(config(r#"{"max_in_flight": 3}"#), &s);
    let out = receive(&mut g, &s, "w1", 10, 0);
    assert_eq!(offsets(&out), [1, 2, 3]);
    assert_eq!(g.want(10, 0).limit, 0);
    assert!(receive(&mut g, &s, "w2", 10, 0).value.deliveries.is_empty());
    assert_eq!(g.ack(&receipts(&out)[..1], 1).unwrap().value, [Done]);
    assert_eq!(offsets(&receive(&mut g, &s, "w2", 10, 2)), [4]);
}

#[test]
fn receipts_of_other_groups_malformed_or_never_delivered_are_unknown() {
    let mut s = FakeStream::new();
    s.publish(None, 0);
    let mut g = group(GroupConfig::default(), &s);
    let mut other = group(GroupConfig::default(), &s);
    let mine = receipts(&receive(&mut g, &s, "w", 1, 0));
    let theirs = receipts(&receive(&mut other, &s, "w", 1, 0));
    let mut forged = Receipt::decode(&mine[0]).unwrap();
    forged.offset = Offset(2);
    let mut other_epoch = Receipt::decode(&mine[0]).unwrap();
    other_epoch.epoch = Epoch::parse("e0").unwrap();
    let mut other_lease = Receipt::decode(&mine[0]).unwrap();
    other_lease.lease = LeaseId(other_lease.lease.0 ^ 1);
    let texts = [
        theirs[0].clone(),
        "".into(),
        "not a receipt".into(),
        mine[0][..mine[0].len() - 3].to_owned(),
        "A".repeat(1 << 20),
        forged.encode(),
        other_epoch.encode(),
        other_lease.encode(),
    ];
    let out = g.ack(&texts, 1).unwrap();
    assert_eq!(
        out.value,
        [
            Unknown, Unknown, Unknown, Unknown, Unknown, Unknown, Expired, Expired
        ]
    );
    assert!(out.is_noop());
    assert_eq!(g.ack(&mine, 1).unwrap().value, [Done]);
    let many = vec![mine[0].clone(); MAX_RECEIPTS + 1];
    assert_eq!(
        g.ack(&many, 1).unwrap_err(),
        OpError::TooManyReceipts(MAX_RECEIPTS + 1)
    );
}

#[test]
fn receive_arguments_out_of_range_are_refused() {
    let s = FakeStream::new();
    let mut g = group(GroupConfig::default(), &s);
    let req = |max, vis| ReceiveRequest {
        member: member("w"),
        max,
        visibility_timeout: vis,
    };
    let empty: &[Message] = &[];
    for (r, e) in [
        (req(0, None), OpError::Max(0)),
        (req(1001, None), OpError::Max(1001)),
        (
            req(1, Some(Duration::ZERO)),
            OpError::VisibilityTimeout(Duration::ZERO),
        ),
        (
            req(1, Some(Duration::from_secs(43_201))),
            OpError::VisibilityTimeout(Duration::from_secs(43_201)),
        ),
    ] {
        assert_eq!(g.receive(&r, &s.state(), empty, 0).unwrap_err(), e);
    }
    assert_eq!(
        OpError::Max(0).to_string(),
        "max must be from 1 to 1000; got 0"
    );
}

#[test]
fn an_epoch_change_is_a_reset_that_counts_what_was_lost() {
    let mut s = FakeStream::new();
    for _ in 0..10 {
        s.publish(None, 0);
    }
    let mut g = group(GroupConfig::default(), &s);
    let held = receipts(&receive(&mut g, &s, "w", 4, 0));
    // The stream restarts in a new epoch (e.g. the memory engine) with 3 messages.
    let mut s2 = FakeStream::new();
    s2.epoch = Epoch::parse("e2").unwrap();
    for _ in 0..3 {
        s2.publish(None, 0);
    }
    let out = receive(&mut g, &s2, "w", 10, 1);
    let reset = out.value.reset.clone().unwrap();
    assert_eq!(reset.reason, ResetReason::EpochChanged);
    // 4 leased + 6 it knew were beyond its cursor.
    assert_eq!(reset.lost, 10);
    assert_eq!(reset.to, Position::new(s2.epoch.clone(), Offset(0)));
    assert_eq!(offsets(&out), [1, 2, 3]);
    assert!(out.value.deliveries.iter().all(|d| d.epoch == s2.epoch));
    assert_eq!(g.counters().expired, 10);
    assert_eq!(g.counters().resets, 1);
    // Receipts of the old history are over.
    assert_eq!(g.ack(&held, 2).unwrap().value, [Expired; 4]);
    assert_eq!(g.last_reset(), Some(&reset));
}

#[test]
fn history_removed_by_retention_is_counted_expired() {
    let mut s = FakeStream::new();
    for _ in 0..20 {
        s.publish(None, 0);
    }
    let mut g = group(config(r#"{"visibility_timeout": "1s"}"#), &s);
    let held = receipts(&receive(&mut g, &s, "w", 2, 0));
    // Offset 1's lease runs out; retention then drops 1..=9.
    assert_eq!(g.ack(&held[1..], 10).unwrap().value, [Done]);
    s.oldest = 10;
    let out = receive(&mut g, &s, "w", 1, 2_000);
    let reset = out.value.reset.clone().unwrap();
    assert_eq!(reset.reason, ResetReason::HistoryExpired);
    // 3..=9 never taken, plus 1, visible again but gone.
    assert_eq!(reset.lost, 8);
    assert_eq!(offsets(&out), [10]);
    assert_eq!(g.counters().expired, 8);
    // A leased message that retention removed stays until its lease ends.
    s.oldest = 12;
    let out = receive(&mut g, &s, "w", 1, 2_001);
    assert_eq!(out.value.reset.as_ref().unwrap().lost, 1);
    assert_eq!(offsets(&out), [12]);
    assert!(g.entry(Offset(10)).is_some());
    let stats = g.stats(&s.state(), None, 2_001);
    assert_eq!(stats.pending, 8);
    assert_eq!(stats.expired, 9);
}

#[test]
fn a_group_that_took_nothing_adopts_a_new_epoch_silently() {
    // Created on a stream nobody published to yet (the engine's placeholder epoch).
    let placeholder = FakeStream::new();
    let mut g = group(config(r#"{"start": "latest"}"#), &placeholder);
    let mut s = FakeStream::new();
    s.epoch = Epoch::parse("e9").unwrap();
    s.publish(None, 0);
    let out = receive(&mut g, &s, "w", 5, 0);
    assert!(out.value.reset.is_none());
    assert_eq!(offsets(&out), [1]);
    assert_eq!(g.counters().resets, 0);
}

#[test]
fn starts_are_resolved_against_the_stream() {
    let mut s = FakeStream::new();
    for _ in 0..10 {
        s.publish(None, 0);
    }
    s.oldest = 4;
    let at = |start: &str| {
        let g = group(config(&format!(r#"{{"start": "{start}"}}"#)), &s);
        g.cursor().offset.0
    };
    assert_eq!(at("oldest"), 3);
    assert_eq!(at("latest"), 9);
    assert_eq!(at("now"), 10);
    assert_eq!(at("e1:6"), 6);
    // A position the stream cannot honour is kept, and the first receive says so.
    let mut g = group(config(r#"{"start": "e1:1"}"#), &s);
    let out = receive(&mut g, &s, "w", 1, 0);
    assert_eq!(
        out.value.reset.as_ref().map(|r| (r.reason, r.lost)),
        Some((ResetReason::HistoryExpired, 2))
    );
    assert_eq!(offsets(&out), [4]);
}

#[test]
fn a_million_message_backlog_does_not_grow_the_group() {
    // The stream is only asked for what the group wants: simulate a huge head cheaply.
    let epoch = Epoch::parse("e1").unwrap();
    let state = StreamState {
        epoch: epoch.clone(),
        head: Offset(1_000_000),
        oldest: Offset(1),
    };
    let mut g = GroupState::new(
        StreamName::new("orders").unwrap(),
        GroupName::new("billing").unwrap(),
        config(r#"{"max_in_flight": 100, "ordering": "key"}"#),
        &state,
        0,
    )
    .unwrap();
    let message = |o: u64| Message {
        offset: Offset(o),
        time_ms: o,
        payload: Default::default(),
        content_type: None,
        key: Some(format!("k{}", o % 7)),
        headers: Vec::new(),
    };
    let mut largest_snapshot = 0;
    for round in 0..300u64 {
        let want = g.want(100, round);
        assert!(want.limit <= g.max_entries());
        let fetched: Vec<Message> = (want.after.0 + 1..=want.after.0 + want.limit as u64)
            .map(message)
            .collect();
        let req = ReceiveRequest {
            member: member("w"),
            max: 100,
            visibility_timeout: None,
        };
        let out = g.receive(&req, &state, &fetched, round).unwrap();
        assert!(g.leased() <= 100);
        assert!(g.entries().count() <= g.max_entries());
        let r = receipts(&out);
        assert!(g.ack(&r, round).unwrap().value.iter().all(|r| *r == Done));
        largest_snapshot = largest_snapshot.max(serde_json::to_vec(&g.snapshot()).unwrap().len());
    }
    assert!(g.counters().acked >= 300 * 7);
    assert!(largest_snapshot < 64 * 1024, "{largest_snapshot}");
    let stats = g.stats(&state, Some(0), 300);
    assert_eq!(
        stats.pending,
        1_000_000 - g.cursor().offset.0
            + g.entries().filter(|(_, e)| e.deliveries == 0).count() as u64
    );
}

#[test]
fn the_member_table_is_bounded() {
    let mut s = FakeStream::new();
    s.publish(None, 0);
    let mut g = group(GroupConfig::default(), &s);
    for i in 0..(state::MAX_MEMBERS + 10) {
        let out = receive(&mut g, &s, &format!("w{i}"), 1, 1 + i as u64);
        assert_eq!(out.value.deliveries.len(), usize::from(i == 0));
    }
    assert_eq!(g.members().count(), state::MAX_MEMBERS);
    assert!(g.members().all(|(m, _)| m.as_str() != "w1"));
    // The lease of a forgotten member still shows in the stats.
    let stats = g.stats(&s.state(), None, 2);
    assert!(
        stats
            .members
            .iter()
            .any(|m| m.consumer.as_str() == "w0" && m.in_flight == 1)
    );
}

#[test]
fn snapshots_and_changes_round_trip_through_json() {
    let mut s = FakeStream::new();
    for key in ["a", "a", "b"] {
        s.publish(Some(key), 5);
    }
    let mut g = group(config(r#"{"ordering": "key", "backoff": ["1s"]}"#), &s);
    let out = receive(&mut g, &s, "w", 3, 0);
    let nacked = g.nack(&receipts(&out)[..1], Duration::from_secs(3), None, 1);
    assert_eq!(nacked.unwrap().value, [Done]);
    let json = serde_json::to_string(&g.snapshot()).unwrap();
    let back = GroupState::from_snapshot(serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(back, g);
    // A snapshot from a newer version, or inconsistent, is refused.
    let mut snap = g.snapshot();
    snap.version = 2;
    assert_eq!(
        GroupState::from_snapshot(snap),
        Err(SnapshotError::Version(2))
    );
    let mut snap = g.snapshot();
    snap.entries[0].offset = Offset(99);
    assert_eq!(
        GroupState::from_snapshot(snap).unwrap_err(),
        SnapshotError::EntryBeyondCursor(Offset(99))
    );
    // Config updates are changes too, and keep the start.
    let before = g.clone();
    let update = g
        .update_config(config(r#"{"start": "latest", "max_in_flight": 5}"#))
        .unwrap();
    assert_eq!(g.config().start, Start::Oldest);
    assert_eq!(g.config().max_in_flight, 5);
    assert_replays(&before, &update.changes, &g);
}

#[test]
fn after_a_crash_everything_not_acked_comes_back_and_nothing_acked_does() {
    let mut s = FakeStream::new();
    for _ in 0..6 {
        s.publish(None, 0);
    }
    let mut g = group(config(r#"{"visibility_timeout": "5s"}"#), &s);
    // The store: the creation snapshot, then each outcome's changes once "durable".
    let snapshot = g.snapshot();
    let mut stored: Vec<Change> = Vec::new();
    let out = receive(&mut g, &s, "w", 4, 0);
    stored.extend(out.changes.clone());
    let r = receipts(&out);
    let acked = g.ack(&r[..2], 100).unwrap();
    stored.extend(acked.changes);
    // This ack's changes never reached the store: the process died before answering it.
    let lost = g.ack(&r[2..3], 200).unwrap();
    assert_eq!(lost.value, [Done]);

    let mut g = GroupState::from_snapshot(snapshot).unwrap();
    for c in &stored {
        g.apply(c);
    }
    // A member that outlived the restart still holds a valid lease on 4.
    assert_eq!(g.ack(&r[3..], 300).unwrap().value, [Done]);
    // The unanswered ack of 3 is undone: 3 comes back once its lease ends.
    assert_eq!(offsets(&receive(&mut g, &s, "w", 1, 4_999)), [5]);
    let again = receive(&mut g, &s, "w", 10, 5_000);
    assert_eq!(offsets(&again), [3, 6]);
    assert_eq!(again.value.deliveries[0].deliveries, 2);
    // 1 and 2 (acked and stored) never come back.
    assert!(g.entry(Offset(1)).is_none() && g.entry(Offset(2)).is_none());
    assert_eq!(g.counters().acked, 3);
}
