//! Property tests of the consumer group state machine (SPEC §7): several members receive, ack,
//! nack, extend and terminate at random while time moves and messages with random keys are
//! published. A model kept beside the group checks, at every step:
//!
//! - a receipt settles (`ok`) exactly when it names the message's latest lease, that lease has
//!   not run out and was not released — so a stale or expired receipt never acks;
//! - a message is never leased while another lease of it is live;
//! - under key ordering, a message is leased only when every earlier message of its key is
//!   finished (so one key is never leased twice at once, and finishes in offset order);
//! - leases ≤ `max_in_flight`, entries ≤ the look-ahead bound;
//! - delivery counts count deliveries; dead letters come exactly at `max_deliveries`, on
//!   terminate, or on a last-delivery nack, with the right reason;
//! - a redelivery never comes before its nack delay or its backoff;
//! - every message ends acked or dead-lettered exactly once (nothing lost, nothing twice);
//! - the Change records, through JSON, replay to the live state from the start and from a
//!   snapshot taken midway.
//!
//! A second property adds retention and epoch changes: losses are counted, never silent.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proptest::prelude::*;
use spool_core::group::{
    Change, DeadLetter, GroupConfig, GroupName, GroupSnapshot, GroupState, MemberName, Ordering,
    Outcome, ReceiptResult, ReceiveRequest,
};
use spool_core::{Epoch, Message, Offset, StreamName, StreamState};

#[derive(Clone, Debug)]
enum Op {
    Publish(Vec<Option<u8>>),
    Receive {
        member: u8,
        max: u8,
        vis: Option<u16>,
    },
    Ack(Vec<usize>),
    Nack {
        pick: usize,
        delay: u16,
        reason: bool,
    },
    Extend {
        pick: usize,
        vis: u16,
    },
    Terminate(usize),
    Advance(u16),
    /// Time moves to exactly the end of a held lease (boundaries are where off-by-ones hide).
    ToLeaseEnd(usize),
    Expire,
    Snapshot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => prop::collection::vec(prop::option::weighted(0.7, 0u8..4), 1..6).prop_map(Op::Publish),
        5 => (0u8..3, 1u8..5, prop::option::of(50u16..2000))
            .prop_map(|(member, max, vis)| Op::Receive { member, max, vis }),
        4 => prop::collection::vec(any::<usize>(), 1..4).prop_map(Op::Ack),
        2 => (any::<usize>(), 0u16..1500, any::<bool>())
            .prop_map(|(pick, delay, reason)| Op::Nack { pick, delay, reason }),
        1 => (any::<usize>(), 1u16..2000).prop_map(|(pick, vis)| Op::Extend { pick, vis }),
        1 => any::<usize>().prop_map(Op::Terminate),
        4 => (0u16..2500).prop_map(Op::Advance),
        2 => any::<usize>().prop_map(Op::ToLeaseEnd),
        1 => Just(Op::Expire),
        1 => Just(Op::Snapshot),
    ]
}

fn config() -> impl Strategy<Value = GroupConfig> {
    (
        100u64..2000,
        1u32..5,
        prop::collection::vec(0u64..1500, 0..3),
        1u32..6,
        any::<bool>(),
    )
        .prop_map(
            |(vis, max_deliveries, backoff, max_in_flight, key)| GroupConfig {
                visibility_timeout: Duration::from_millis(vis),
                max_deliveries,
                backoff: backoff.into_iter().map(Duration::from_millis).collect(),
                max_in_flight,
                ordering: if key { Ordering::Key } else { Ordering::None },
                ..GroupConfig::default()
            },
        )
}

/// One receipt handed out, as the member holding it sees it.
struct Held {
    receipt: String,
    offset: u64,
    deliveries: u32,
    until: u64,
    /// Settled by its holder (ack, nack, terminate), with the time a nack makes it visible.
    released: Option<Option<u64>>,
}

#[derive(Debug, PartialEq)]
enum Finish {
    Acked,
    Dead(String),
}

struct Model {
    config: GroupConfig,
    now: u64,
    stream: Vec<Message>,
    epoch: Epoch,
    held: Vec<Held>,
    latest: HashMap<u64, usize>,
    finished: BTreeMap<u64, Finish>,
    /// Changes since the start, through JSON, and snapshots to replay them onto.
    log: Vec<Change>,
    first: GroupSnapshot,
    midway: Option<(GroupSnapshot, usize)>,
}

impl Model {
    fn state(&self) -> StreamState {
        StreamState {
            epoch: self.epoch.clone(),
            head: Offset(self.stream.len() as u64),
            oldest: Offset(1),
        }
    }

    fn key(&self, offset: u64) -> Option<&String> {
        self.stream[offset as usize - 1].key.as_ref()
    }

    /// Whether the lease of `held[i]` is live now.
    fn live(&self, i: usize) -> bool {
        let h = &self.held[i];
        self.latest.get(&h.offset) == Some(&i)
            && h.released.is_none()
            && h.until > self.now
            && !self.finished.contains_key(&h.offset)
    }

    fn record<T>(&mut self, out: &Outcome<T>) -> Result<(), TestCaseError> {
        for c in &out.changes {
            let json = serde_json::to_string(c).unwrap();
            self.log.push(serde_json::from_str(&json).unwrap());
        }
        for d in &out.dead_letters {
            self.dead(d)?;
        }
        Ok(())
    }

    fn dead(&mut self, d: &DeadLetter) -> Result<(), TestCaseError> {
        let o = d.offset.0;
        let delivered = self.latest.get(&o).map_or(0, |&i| self.held[i].deliveries);
        prop_assert_eq!(d.deliveries, delivered, "dead letter's delivery count");
        if d.reason == "max_deliveries" {
            prop_assert_eq!(d.deliveries, self.config.max_deliveries);
        }
        prop_assert_eq!(&d.epoch, &self.epoch);
        self.finish(o, Finish::Dead(d.reason.clone()))
    }

    fn finish(&mut self, offset: u64, how: Finish) -> Result<(), TestCaseError> {
        if self.config.ordering == Ordering::Key
            && let Some(key) = self.key(offset).cloned()
        {
            for earlier in 1..offset {
                if self.key(earlier) == Some(&key) {
                    prop_assert!(
                        self.finished.contains_key(&earlier),
                        "offset {} of key {} finished before {}",
                        offset,
                        key,
                        earlier
                    );
                }
            }
        }
        let previous = self.finished.insert(offset, how);
        prop_assert!(previous.is_none(), "offset {} finished twice", offset);
        Ok(())
    }

    fn receive(
        &mut self,
        g: &mut GroupState,
        member: u8,
        max: u32,
        vis: Option<u64>,
    ) -> Result<usize, TestCaseError> {
        let want = g.want(max, self.now);
        prop_assert!(want.limit <= g.max_entries());
        let fetched: Vec<Message> = self
            .stream
            .iter()
            .skip(want.after.0 as usize)
            .take(want.limit)
            .cloned()
            .collect();
        let request = ReceiveRequest {
            member: MemberName::new(&format!("worker-{member}")).unwrap(),
            max,
            visibility_timeout: vis.map(Duration::from_millis),
        };
        let out = g
            .receive(&request, &self.state(), &fetched, self.now)
            .unwrap();
        self.record(&out)?;
        prop_assert!(out.value.reset.is_none());
        prop_assert!(out.value.deliveries.len() <= max as usize);
        let visibility = vis.unwrap_or(self.config.visibility_timeout.as_millis() as u64);
        let mut last = 0;
        for d in &out.value.deliveries {
            let o = d.offset.0;
            prop_assert!(o > last, "deliveries in offset order");
            last = o;
            prop_assert!(
                !self.finished.contains_key(&o),
                "finished offset {} delivered",
                o
            );
            let previous = self.latest.get(&o).copied();
            let delivered = previous.map_or(0, |i| self.held[i].deliveries);
            prop_assert_eq!(d.deliveries, delivered + 1, "delivery count of {}", o);
            if let Some(i) = previous {
                let p = &self.held[i];
                match p.released {
                    // Nacked: visible at the nack's delay.
                    Some(Some(at)) => {
                        prop_assert!(self.now >= at, "redelivered before its nack delay")
                    }
                    Some(None) => prop_assert!(false, "settled message {} redelivered", o),
                    // Ran out: never while live, and not before the backoff.
                    None => {
                        prop_assert!(p.until <= self.now, "two live leases of {}", o);
                        let backoff = self.config.backoff_after(p.deliveries).as_millis() as u64;
                        prop_assert!(
                            self.now >= p.until + backoff,
                            "redelivered before its backoff"
                        );
                    }
                }
            }
            if self.config.ordering == Ordering::Key
                && let Some(key) = self.key(o).cloned()
            {
                for earlier in 1..o {
                    if self.key(earlier) == Some(&key) {
                        prop_assert!(
                            self.finished.contains_key(&earlier),
                            "{} of key {} leased before {} finished",
                            o,
                            key,
                            earlier
                        );
                    }
                }
            }
            prop_assert_eq!(d.until_ms, self.now + visibility);
            prop_assert_eq!(d.key.as_ref(), self.key(o));
            self.held.push(Held {
                receipt: d.receipt.encode(),
                offset: o,
                deliveries: d.deliveries,
                until: d.until_ms,
                released: None,
            });
            self.latest.insert(o, self.held.len() - 1);
        }
        Ok(out.value.deliveries.len())
    }

    fn check_invariants(&self, g: &GroupState) -> Result<(), TestCaseError> {
        prop_assert!(g.leased() <= self.config.max_in_flight as usize);
        prop_assert!(g.entries().count() <= g.max_entries());
        let live = (0..self.held.len()).filter(|&i| self.live(i)).count();
        prop_assert!(live <= self.config.max_in_flight as usize);
        // The group and the model agree on what is finished: no entry for a finished offset.
        for (o, _) in g.entries() {
            prop_assert!(!self.finished.contains_key(&o.0));
        }
        Ok(())
    }

    fn check_replay(&self, g: &GroupState) -> Result<(), TestCaseError> {
        let mut from_start = GroupState::from_snapshot(self.first.clone()).unwrap();
        for c in &self.log {
            from_start.apply(c);
        }
        prop_assert_eq!(&from_start, g, "replay from the start");
        if let Some((snap, at)) = &self.midway {
            let json = serde_json::to_string(snap).unwrap();
            let mut from_mid =
                GroupState::from_snapshot(serde_json::from_str(&json).unwrap()).unwrap();
            for c in &self.log[*at..] {
                from_mid.apply(c);
            }
            prop_assert_eq!(&from_mid, g, "replay from the snapshot");
        }
        Ok(())
    }
}

fn new_group(config: &GroupConfig, state: &StreamState) -> GroupState {
    GroupState::new(
        StreamName::new("jobs").unwrap(),
        GroupName::new("workers").unwrap(),
        config.clone(),
        state,
        0,
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]
    #[test]
    fn every_message_is_finished_exactly_once(
        config in config(),
        initial in prop::collection::vec(prop::option::weighted(0.7, 0u8..4), 0..12),
        ops in prop::collection::vec(op(), 1..160),
    ) {
        let epoch = Epoch::parse("e1").unwrap();
        let empty = StreamState::empty(epoch.clone());
        let mut g = new_group(&config, &empty);
        let mut m = Model {
            config: config.clone(),
            now: 1_000_000,
            stream: Vec::new(),
            epoch,
            held: Vec::new(),
            latest: HashMap::new(),
            finished: BTreeMap::new(),
            log: Vec::new(),
            first: g.snapshot(),
            midway: None,
        };
        let publish = |m: &mut Model, keys: &[Option<u8>]| {
            for k in keys {
                let offset = Offset(m.stream.len() as u64 + 1);
                m.stream.push(Message {
                    offset,
                    time_ms: m.now,
                    payload: Default::default(),
                    content_type: None,
                    key: k.map(|k| format!("k{k}")),
                    headers: Vec::new(),
                });
            }
        };
        publish(&mut m, &initial);
        let pick = |m: &Model, p: usize| (!m.held.is_empty()).then(|| p % m.held.len());
        for op in ops {
            match op {
                Op::Publish(keys) => publish(&mut m, &keys),
                Op::Receive { member, max, vis } => {
                    m.receive(&mut g, member, u32::from(max), vis.map(u64::from))?;
                }
                Op::Ack(picks) => {
                    let idx: Vec<usize> = picks.iter().filter_map(|&p| pick(&m, p)).collect();
                    let texts: Vec<&str> = idx.iter().map(|&i| m.held[i].receipt.as_str()).collect();
                    let out = g.ack(&texts, m.now).unwrap();
                    m.record(&out)?;
                    for (&i, result) in idx.iter().zip(&out.value) {
                        // A receipt repeated in one call settles once.
                        let expect = if m.live(i) { ReceiptResult::Ok } else { ReceiptResult::Expired };
                        prop_assert_eq!(*result, expect, "ack of receipt {}", i);
                        if expect == ReceiptResult::Ok {
                            m.held[i].released = Some(None);
                            m.finish(m.held[i].offset, Finish::Acked)?;
                        }
                    }
                }
                Op::Nack { pick: p, delay, reason } => {
                    let Some(i) = pick(&m, p) else { continue };
                    let expect = if m.live(i) { ReceiptResult::Ok } else { ReceiptResult::Expired };
                    let why = spool_core::group::Reason::new("bad input").unwrap();
                    let delay = Duration::from_millis(u64::from(delay));
                    let out = g
                        .nack(&[&m.held[i].receipt], delay, reason.then_some(&why), m.now)
                        .unwrap();
                    prop_assert_eq!(&out.value, &[expect]);
                    if expect == ReceiptResult::Ok {
                        let last = m.held[i].deliveries >= config.max_deliveries;
                        prop_assert_eq!(out.dead_letters.len(), usize::from(last));
                        if let Some(d) = out.dead_letters.first() {
                            let want = if reason { "bad input" } else { "max_deliveries" };
                            prop_assert_eq!(d.reason.as_str(), want);
                        }
                        m.held[i].released = Some(Some(m.now + delay.as_millis() as u64));
                    }
                    m.record(&out)?;
                }
                Op::Extend { pick: p, vis } => {
                    let Some(i) = pick(&m, p) else { continue };
                    let expect = if m.live(i) { ReceiptResult::Ok } else { ReceiptResult::Expired };
                    let vis = Duration::from_millis(u64::from(vis));
                    let out = g.extend(&[&m.held[i].receipt], vis, m.now).unwrap();
                    m.record(&out)?;
                    prop_assert_eq!(&out.value, &[expect]);
                    if expect == ReceiptResult::Ok {
                        m.held[i].until = m.now + vis.as_millis() as u64;
                    }
                }
                Op::Terminate(p) => {
                    let Some(i) = pick(&m, p) else { continue };
                    let expect = if m.live(i) { ReceiptResult::Ok } else { ReceiptResult::Expired };
                    let out = g.terminate(&[&m.held[i].receipt], None, m.now).unwrap();
                    prop_assert_eq!(&out.value, &[expect]);
                    if expect == ReceiptResult::Ok {
                        prop_assert_eq!(out.dead_letters.len(), 1);
                        prop_assert_eq!(out.dead_letters[0].reason.as_str(), "terminated");
                        m.held[i].released = Some(None);
                    } else {
                        prop_assert!(out.is_noop());
                    }
                    m.record(&out)?;
                }
                Op::Advance(ms) => m.now += u64::from(ms),
                Op::ToLeaseEnd(p) => {
                    if let Some(i) = pick(&m, p) {
                        m.now = m.now.max(m.held[i].until);
                    }
                }
                Op::Expire => {
                    let out = g.expire(m.now);
                    m.record(&out)?;
                }
                Op::Snapshot => {
                    if m.midway.is_none() {
                        m.midway = Some((g.snapshot(), m.log.len()));
                    }
                }
            }
            m.check_invariants(&g)?;
        }
        m.check_replay(&g)?;

        // Drain: well past every lease, delay and backoff, one member takes and acks all.
        let head = m.stream.len() as u64;
        let mut rounds = 0;
        while (m.finished.len() as u64) < head {
            rounds += 1;
            prop_assert!(rounds <= 10 * head + 10, "the group stopped handing out messages");
            m.now += 20_000;
            let got = m.receive(&mut g, 9, 8, None)?;
            let fresh: Vec<usize> = (m.held.len() - got..m.held.len()).collect();
            let texts: Vec<&str> = fresh.iter().map(|&i| m.held[i].receipt.as_str()).collect();
            let out = g.ack(&texts, m.now).unwrap();
            m.record(&out)?;
            for (&i, r) in fresh.iter().zip(&out.value) {
                prop_assert_eq!(*r, ReceiptResult::Ok);
                m.held[i].released = Some(None);
                m.finish(m.held[i].offset, Finish::Acked)?;
            }
            m.check_invariants(&g)?;
        }
        prop_assert_eq!(m.finished.keys().copied().collect::<Vec<_>>(), (1..=head).collect::<Vec<_>>());
        let c = g.counters();
        let acked = m.finished.values().filter(|f| **f == Finish::Acked).count() as u64;
        prop_assert_eq!(c.acked, acked);
        prop_assert_eq!(c.acked + c.dead_lettered, head);
        prop_assert_eq!(c.expired, 0);
        let redelivered: u64 = m.held.iter().filter(|h| h.deliveries > 1).count() as u64;
        prop_assert_eq!(c.redelivered, redelivered);
        prop_assert_eq!(g.entries().count(), 0);
        let stats = g.stats(&m.state(), None, m.now);
        prop_assert_eq!((stats.pending, stats.in_flight, stats.oldest_age_ms), (0, 0, 0));
        m.check_replay(&g)?;
    }
}

#[derive(Clone, Debug)]
enum LossOp {
    Publish(u8),
    Trim(u8),
    Restart,
    Receive(u8),
    AckAll,
    Advance(u16),
}

fn loss_op() -> impl Strategy<Value = LossOp> {
    prop_oneof![
        4 => (1u8..8).prop_map(LossOp::Publish),
        2 => (1u8..6).prop_map(LossOp::Trim),
        1 => Just(LossOp::Restart),
        4 => (1u8..5).prop_map(LossOp::Receive),
        3 => Just(LossOp::AckAll),
        2 => (0u16..3000).prop_map(LossOp::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Retention and epoch changes under a group: with retention alone every message is
    /// accounted for exactly (acked, dead-lettered or expired); with epoch changes each loss is
    /// a recorded reset, receipts of the lost history are `expired`, and the group goes on
    /// with the new history in full.
    #[test]
    fn losses_are_counted_and_never_silent(
        config in config(),
        ops in prop::collection::vec(loss_op(), 1..120),
    ) {
        let mut epochs = 0u32;
        let mut new_epoch = || { epochs += 1; Epoch::parse(&format!("e{epochs}")).unwrap() };
        let mut state = StreamState::empty(new_epoch());
        let mut g = new_group(&config, &state);
        let mut now = 0u64;
        let mut held: Vec<(String, Epoch)> = Vec::new();
        let mut restarted = false;
        let mut finished: BTreeMap<(Epoch, u64), ()> = BTreeMap::new();
        let message = |o: u64| Message {
            offset: Offset(o),
            time_ms: o,
            payload: Default::default(),
            content_type: None,
            key: Some(format!("k{}", o % 3)),
            headers: Vec::new(),
        };
        let receive = |g: &mut GroupState, state: &StreamState, max: u32, now: u64,
                           held: &mut Vec<(String, Epoch)>,
                           finished: &mut BTreeMap<(Epoch, u64), ()>| -> Result<(), TestCaseError> {
            loop {
                let before = g.cursor().clone();
                let had_taken = before.offset.0 > 0 || g.entries().count() > 0;
                let want = g.want(max, now);
                // As an engine reads: nothing when the next message is no longer retained, and
                // from whatever epoch the stream is in now.
                let after = want.after.0;
                let fetched: Vec<Message> = if after + 1 < state.oldest.0 {
                    Vec::new()
                } else {
                    (after + 1..=state.head.0).take(want.limit).map(message).collect()
                };
                let request = ReceiveRequest {
                    member: MemberName::new("w").unwrap(),
                    max,
                    visibility_timeout: None,
                };
                let out = g.receive(&request, state, &fetched, now).unwrap();
                let lost_history = before.epoch != state.epoch
                    || !state.retains_after(before.offset)
                    || before.offset > state.head;
                if lost_history && had_taken {
                    prop_assert!(out.value.reset.is_some(), "a lost history must be a reset");
                }
                for d in &out.dead_letters {
                    prop_assert!(finished.insert((d.epoch.clone(), d.offset.0), ()).is_none());
                }
                for d in &out.value.deliveries {
                    prop_assert_eq!(&d.epoch, &state.epoch);
                    prop_assert!(d.offset >= state.oldest && d.offset <= state.head);
                    held.push((d.receipt.encode(), d.epoch.clone()));
                }
                prop_assert!(g.leased() <= config.max_in_flight as usize);
                prop_assert!(g.entries().count() <= g.max_entries());
                if !out.value.read_again {
                    return Ok(());
                }
            }
        };
        for op in ops {
            match op {
                LossOp::Publish(n) => state.head.0 += u64::from(n),
                LossOp::Trim(n) => {
                    state.oldest.0 = (state.oldest.0 + u64::from(n)).min(state.head.0 + 1);
                }
                LossOp::Restart => {
                    state = StreamState::empty(new_epoch());
                    restarted = true;
                }
                LossOp::Receive(max) => {
                    receive(&mut g, &state, u32::from(max), now, &mut held, &mut finished)?;
                }
                LossOp::AckAll => {
                    let texts: Vec<&str> = held.iter().map(|(r, _)| r.as_str()).collect();
                    let out = g.ack(&texts, now).unwrap();
                    for ((receipt, epoch), r) in held.iter().zip(&out.value) {
                        if *epoch != g.cursor().epoch {
                            prop_assert_ne!(*r, ReceiptResult::Ok, "a receipt of a lost history acked");
                        }
                        if *r == ReceiptResult::Ok {
                            let parsed = spool_core::group::Receipt::decode(receipt).unwrap();
                            prop_assert!(finished.insert((epoch.clone(), parsed.offset.0), ()).is_none());
                        }
                    }
                    held.clear();
                }
                LossOp::Advance(ms) => now += u64::from(ms),
            }
        }
        // Drain what the current history still holds.
        for _ in 0..(state.head.0 * u64::from(config.max_deliveries) + 10) {
            now += 20_000;
            receive(&mut g, &state, 5, now, &mut held, &mut finished)?;
            let texts: Vec<&str> = held.iter().map(|(r, _)| r.as_str()).collect();
            let out = g.ack(&texts, now).unwrap();
            for ((receipt, epoch), r) in held.iter().zip(&out.value) {
                if *r == ReceiptResult::Ok {
                    let parsed = spool_core::group::Receipt::decode(receipt).unwrap();
                    prop_assert!(finished.insert((epoch.clone(), parsed.offset.0), ()).is_none());
                }
            }
            held.clear();
            if g.entries().count() == 0 && g.cursor().offset == state.head && g.cursor().epoch == state.epoch {
                break;
            }
        }
        prop_assert_eq!(g.entries().count(), 0);
        prop_assert_eq!(g.cursor().offset, state.head);
        let c = g.counters();
        prop_assert_eq!(c.acked + c.dead_lettered, finished.len() as u64);
        if !restarted {
            // One history: every offset is acked, dead-lettered or counted expired, once.
            prop_assert_eq!(c.acked + c.dead_lettered + c.expired, state.head.0);
            prop_assert_eq!(c.expired > 0, c.resets > 0);
        }
        let stats = g.stats(&state, None, now);
        prop_assert_eq!(stats.pending, 0);
    }
}
