//! The checker must be able to fail: histories with a hole, a reordering, a wrong reset
//! reason, a lost ack, a duplicate append (and the other rules) are each reported — and the
//! same histories without the fault pass.

use spool_check::{
    Entry, Event, Kind, check,
    history::{FaultKind, Outcome, Transport},
};

const S: &str = "st";

/// A history being written: entries one millisecond apart.
struct H(Vec<Entry>);

impl H {
    /// A run on `engine` (durable unless memory) with stream `st` retaining `limit` messages.
    fn new(engine: &str, limit: u64) -> H {
        let mut h = H(Vec::new());
        h.push(Event::Setup {
            engine: engine.into(),
            nodes: 1,
            seed: 1,
            durable: engine != "memory",
        });
        h.push(Event::Stream {
            stream: S.into(),
            max_messages: Some(limit),
            max_bytes: Some(64 << 20),
            max_age_ms: Some(86_400_000),
        });
        h
    }

    fn push(&mut self, event: Event) -> &mut Self {
        let at_ms = self.0.len() as u64;
        self.0.push(Entry { at_ms, event });
        self
    }

    /// Operation `op` acked at `epoch:offset` (payload `p{op}`).
    fn ack(&mut self, op: u64, epoch: &str, offset: u64) -> &mut Self {
        self.attempt(
            op,
            Outcome::Acked {
                epoch: epoch.into(),
                offset,
                duplicate: false,
            },
        )
    }

    fn attempt(&mut self, op: u64, outcome: Outcome) -> &mut Self {
        self.push(Event::Publish {
            op,
            publisher: 0,
            attempt: 0,
            node: 0,
            stream: S.into(),
            key: format!("k{op}"),
            payload: format!("p{op}"),
            outcome,
        })
    }

    fn subscribe(&mut self, sub: &str, position: &str) -> &mut Self {
        self.push(Event::Subscribe {
            sub: sub.into(),
            transport: Transport::Sse,
            node: 0,
            stream: S.into(),
            position: position.into(),
        })
    }

    /// `sub` gets `epoch:offset` carrying the payload of op `op`.
    fn deliver(&mut self, sub: &str, epoch: &str, offset: u64, op: u64) -> &mut Self {
        self.push(Event::Deliver {
            sub: sub.into(),
            stream: S.into(),
            epoch: epoch.into(),
            offset,
            payload: format!("p{op}"),
        })
    }

    fn reset(&mut self, sub: &str, reason: &str, position: &str) -> &mut Self {
        self.push(Event::Reset {
            sub: sub.into(),
            stream: S.into(),
            reason: reason.into(),
            position: position.into(),
        })
    }

    fn fault(&mut self, kind: FaultKind, lossy: bool) -> &mut Self {
        self.push(Event::Fault {
            kind,
            node: Some(0),
            lossy,
            detail: String::new(),
        })
    }

    /// The stream read whole: offsets `oldest..=head` of `epoch`, payload of op = offset.
    fn final_read(&mut self, epoch: &str, oldest: u64, head: u64) -> &mut Self {
        let messages = (oldest..=head).map(|o| (o, format!("p{o}"))).collect();
        self.push(Event::FinalRead {
            stream: S.into(),
            epoch: epoch.into(),
            oldest,
            head,
            messages,
        })
    }

    /// The kinds of violation the checker reports, sorted.
    fn kinds(&self) -> Vec<Kind> {
        let report = check(&self.0);
        for v in &report.violations {
            eprintln!("{:?}: {}", v.kind, v.message);
        }
        let mut kinds: Vec<Kind> = report.violations.iter().map(|v| v.kind).collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }
}

/// Ops 1..=n acked at E:1..=n (op i at offset i).
fn acked(h: &mut H, n: u64) {
    for i in 1..=n {
        h.ack(i, "E", i);
    }
}

#[test]
fn a_clean_history_passes_and_is_counted() {
    let mut h = H::new("disk", 100);
    acked(&mut h, 5);
    h.subscribe("a", "E:1");
    for o in 2..=5 {
        h.deliver("a", "E", o, o);
    }
    h.final_read("E", 1, 5);
    assert_eq!(h.kinds(), []);
    let report = check(&h.0);
    assert_eq!(report.stats.deliveries_checked, 4);
    assert_eq!(report.stats.acked_deliveries_checked, 4);
    assert_eq!(report.stats.acked_in_final_read, 5);
    assert_eq!(report.stats.acked_ops, 5);
}

#[test]
fn a_hole_is_reported() {
    let mut h = H::new("disk", 100);
    acked(&mut h, 5);
    h.subscribe("a", "E:1");
    h.deliver("a", "E", 2, 2)
        .deliver("a", "E", 4, 4)
        .deliver("a", "E", 5, 5);
    h.final_read("E", 1, 5);
    assert_eq!(h.kinds(), [Kind::Hole]);
    let report = check(&h.0);
    assert!(
        report.violations[0].message.contains("3..=3"),
        "{:?}",
        report.violations
    );
    assert_eq!(report.violations[0].sub.as_deref(), Some("a"));
}

#[test]
fn a_hole_right_after_the_anchor_is_reported() {
    let mut h = H::new("disk", 100);
    acked(&mut h, 3);
    h.subscribe("a", "E:1").deliver("a", "E", 3, 3);
    assert_eq!(h.kinds(), [Kind::Hole]);
}

#[test]
fn a_reordering_is_reported() {
    let mut h = H::new("disk", 100);
    acked(&mut h, 4);
    h.subscribe("a", "E:1");
    h.deliver("a", "E", 2, 2)
        .deliver("a", "E", 3, 3)
        .deliver("a", "E", 2, 2)
        .deliver("a", "E", 4, 4);
    assert_eq!(h.kinds(), [Kind::Reorder]);
}

#[test]
fn history_expired_while_the_history_was_retained_is_a_wrong_reason() {
    // Retention keeps 10; the subscriber at 2 is told history_expired with the head at 8.
    let mut h = H::new("disk", 10);
    acked(&mut h, 8);
    h.subscribe("a", "E:1")
        .deliver("a", "E", 2, 2)
        .reset("a", "history_expired", "E:8");
    assert_eq!(h.kinds(), [Kind::WrongResetReason]);

    // The same reset with the head 20 past it (the stream keeps 10) is right.
    let mut h = H::new("disk", 10);
    acked(&mut h, 22);
    h.subscribe("a", "E:1")
        .deliver("a", "E", 2, 2)
        .reset("a", "history_expired", "E:22");
    assert_eq!(h.kinds(), []);
}

#[test]
fn history_expired_into_another_epoch_is_a_wrong_reason() {
    let mut h = H::new("memory", 10);
    h.ack(1, "E", 1).ack(2, "E", 2);
    h.subscribe("a", "E:1").deliver("a", "E", 2, 2);
    h.fault(FaultKind::Kill, true);
    h.ack(3, "F", 1);
    h.reset("a", "history_expired", "F:0")
        .deliver("a", "F", 1, 3);
    assert_eq!(h.kinds(), [Kind::WrongResetReason]);
}

#[test]
fn epoch_changed_on_a_durable_engine_is_reported() {
    let mut h = H::new("disk", 100);
    acked(&mut h, 3);
    h.subscribe("a", "E:1").deliver("a", "E", 2, 2);
    h.fault(FaultKind::Kill, false);
    h.reset("a", "epoch_changed", "F:0");
    assert_eq!(h.kinds(), [Kind::UnjustifiedReset]);

    let mut h = H::new("disk", 100);
    acked(&mut h, 3);
    h.subscribe("a", "E:1")
        .deliver("a", "E", 2, 2)
        .reset("a", "unknown_stream", "F:0");
    assert_eq!(h.kinds(), [Kind::UnjustifiedReset]);
}

#[test]
fn epoch_changed_after_the_memory_engine_restarted_is_right() {
    let mut h = H::new("memory", 100);
    acked(&mut h, 3);
    h.subscribe("a", "E:1").deliver("a", "E", 2, 2);
    h.fault(FaultKind::Term, true);
    h.ack(4, "F", 1);
    h.reset("a", "epoch_changed", "F:0").deliver("a", "F", 1, 4);
    // The stream read whole holds op 4 at F:1; op 1..=3 went with epoch E.
    h.push(Event::FinalRead {
        stream: S.into(),
        epoch: "F".into(),
        oldest: 1,
        head: 1,
        messages: vec![(1, "p4".into())],
    });
    assert_eq!(h.kinds(), []);
}

#[test]
fn an_epoch_change_without_a_reset_is_reported() {
    let mut h = H::new("memory", 100);
    acked(&mut h, 2);
    h.subscribe("a", "E:1").deliver("a", "E", 2, 2);
    h.fault(FaultKind::Kill, true);
    h.ack(3, "F", 1);
    h.deliver("a", "F", 1, 3);
    assert_eq!(h.kinds(), [Kind::SilentEpochChange]);
}

#[test]
fn an_acked_message_never_delivered_is_a_lost_delivery() {
    // The subscriber stops at 3; 4 and 5 were acked and never reached it, with no reset.
    let mut h = H::new("disk", 100);
    acked(&mut h, 5);
    h.subscribe("a", "E:1")
        .deliver("a", "E", 2, 2)
        .deliver("a", "E", 3, 3);
    h.subscribe("b", "E:1");
    for o in 2..=5 {
        h.deliver("b", "E", o, o);
    }
    h.final_read("E", 1, 5);
    assert_eq!(h.kinds(), [Kind::LostDelivery]);
    let report = check(&h.0);
    assert_eq!(
        report.violations.len(),
        1,
        "one range: {:?}",
        report.violations
    );
    assert!(report.violations[0].message.contains("E:4..=5"));
    assert_eq!(report.violations[0].sub.as_deref(), Some("a"));
}

#[test]
fn a_reset_covers_what_it_jumped_over() {
    let mut h = H::new("disk", 3);
    acked(&mut h, 9);
    h.subscribe("a", "E:1")
        .deliver("a", "E", 2, 2)
        .reset("a", "history_expired", "E:7");
    h.deliver("a", "E", 8, 8).deliver("a", "E", 9, 9);
    h.final_read("E", 7, 9);
    assert_eq!(h.kinds(), []);
}

#[test]
fn retention_that_removed_more_than_its_limit_is_reported() {
    // Keeps 5; after 9 publishes only 7..=9 are left.
    let mut h = H::new("disk", 5);
    acked(&mut h, 9);
    h.final_read("E", 7, 9);
    assert_eq!(h.kinds(), [Kind::OverTrimmed]);
    // 5..=9 is right.
    let mut h = H::new("disk", 5);
    acked(&mut h, 9);
    h.final_read("E", 5, 9);
    assert_eq!(h.kinds(), []);
    // With an age limit shorter than the run, it may have removed more.
    let mut h = H::new("disk", 5);
    h.0[1].event = Event::Stream {
        stream: S.into(),
        max_messages: Some(5),
        max_bytes: Some(64 << 20),
        max_age_ms: Some(1),
    };
    acked(&mut h, 9);
    h.final_read("E", 7, 9);
    assert_eq!(h.kinds(), []);
}

#[test]
fn an_acked_message_missing_after_the_run_is_a_lost_ack() {
    // Acked at E:1..=5, but the stream read whole ends at 4 (kill -9 lost an acked write).
    let mut h = H::new("disk", 100);
    acked(&mut h, 5);
    h.fault(FaultKind::Kill, false);
    h.final_read("E", 1, 4);
    assert_eq!(h.kinds(), [Kind::LostAck]);

    // Or the stream came back in another epoch.
    let mut h = H::new("disk", 100);
    acked(&mut h, 2);
    h.fault(FaultKind::Kill, false);
    h.push(Event::FinalRead {
        stream: S.into(),
        epoch: "F".into(),
        oldest: 1,
        head: 0,
        messages: vec![],
    });
    assert_eq!(h.kinds(), [Kind::LostAck]);

    // A hole inside the retained range is lost too.
    let mut h = H::new("disk", 100);
    acked(&mut h, 3);
    h.push(Event::FinalRead {
        stream: S.into(),
        epoch: "E".into(),
        oldest: 1,
        head: 3,
        messages: vec![(1, "p1".into()), (3, "p3".into())],
    });
    assert_eq!(h.kinds(), [Kind::LostAck, Kind::FinalReadHole]);
}

#[test]
fn a_retry_that_appended_twice_is_a_duplicate_append() {
    // Op 2 is retried after a timeout; the retry is acked at a new offset.
    let mut h = H::new("disk", 100);
    h.ack(1, "E", 1);
    h.attempt(
        2,
        Outcome::Indeterminate {
            why: "timeout".into(),
        },
    );
    h.ack(2, "E", 3);
    h.ack(3, "E", 4);
    h.push(Event::FinalRead {
        stream: S.into(),
        epoch: "E".into(),
        oldest: 1,
        head: 4,
        messages: vec![
            (1, "p1".into()),
            (2, "p2".into()),
            (3, "p2".into()),
            (4, "p3".into()),
        ],
    });
    assert_eq!(h.kinds(), [Kind::DuplicateAppend]);

    // Two acks of one key at two offsets.
    let mut h = H::new("disk", 100);
    h.ack(1, "E", 1).ack(1, "E", 2);
    assert_eq!(h.kinds(), [Kind::DuplicateAppend]);

    // A subscriber seeing one payload at two offsets.
    let mut h = H::new("disk", 100);
    h.ack(1, "E", 1).ack(2, "E", 2);
    h.subscribe("a", "E:0")
        .deliver("a", "E", 1, 1)
        .deliver("a", "E", 2, 1);
    assert!(h.kinds().contains(&Kind::DuplicateAppend));
}

#[test]
fn a_duplicate_ack_of_the_same_position_is_fine() {
    let mut h = H::new("disk", 100);
    h.ack(1, "E", 1);
    h.attempt(2, Outcome::Indeterminate { why: "cut".into() });
    h.attempt(
        2,
        Outcome::Acked {
            epoch: "E".into(),
            offset: 2,
            duplicate: true,
        },
    );
    h.final_read("E", 1, 2);
    assert_eq!(h.kinds(), []);
}

#[test]
fn a_payload_nobody_published_or_a_wrong_one_is_reported() {
    let mut h = H::new("disk", 100);
    acked(&mut h, 2);
    h.subscribe("a", "E:0").deliver("a", "E", 1, 1);
    h.push(Event::Deliver {
        sub: "a".into(),
        stream: S.into(),
        epoch: "E".into(),
        offset: 2,
        payload: "forged".into(),
    });
    assert_eq!(h.kinds(), [Kind::WrongPayload]);

    let mut h = H::new("disk", 100);
    acked(&mut h, 2);
    h.subscribe("a", "E:0").deliver("a", "E", 1, 2);
    assert!(h.kinds().contains(&Kind::WrongPayload));
}

#[test]
fn a_session_not_resumed_without_data_loss_is_reported() {
    let connected = |h: &mut H, resumed| {
        h.push(Event::Connected {
            sub: "ws-0".into(),
            resumed,
        });
    };
    let mut h = H::new("disk", 100);
    connected(&mut h, false);
    h.fault(FaultKind::Cut, false);
    connected(&mut h, true);
    h.fault(FaultKind::Kill, false);
    connected(&mut h, false);
    assert_eq!(h.kinds(), [Kind::NotResumed]);

    let mut h = H::new("memory", 100);
    connected(&mut h, false);
    h.fault(FaultKind::Kill, true);
    connected(&mut h, false);
    assert_eq!(h.kinds(), []);

    // A node shutting down still serves for a while: a client may resume on it after the
    // SIGTERM began; the session is lost when the node exits, before it is back (healed).
    let mut h = H::new("memory", 100);
    connected(&mut h, false);
    h.fault(FaultKind::Term, true);
    connected(&mut h, true);
    h.push(Event::Healed {
        kind: FaultKind::Term,
        node: Some(0),
    });
    connected(&mut h, false);
    assert_eq!(h.kinds(), []);
    // Once the node is back, a lost session is not excused by that restart.
    connected(&mut h, false);
    assert_eq!(h.kinds(), [Kind::NotResumed]);
}

#[test]
fn a_subscriber_that_never_caught_up_is_reported_once() {
    let mut h = H::new("disk", 100);
    acked(&mut h, 5);
    h.subscribe("a", "E:1").deliver("a", "E", 2, 2);
    h.push(Event::Lagging {
        sub: "a".into(),
        stream: S.into(),
        position: "E:2".into(),
        head: "E:5".into(),
    });
    assert_eq!(h.kinds(), [Kind::Lagging]);
}

#[test]
fn the_context_of_a_violation_is_the_subscribers_own_history() {
    let mut h = H::new("disk", 100);
    acked(&mut h, 30);
    h.subscribe("a", "E:1").subscribe("b", "E:1");
    for o in 2..=30 {
        if o != 15 {
            h.deliver("a", "E", o, o);
        }
        h.deliver("b", "E", o, o);
    }
    let report = check(&h.0);
    let v = &report.violations[0];
    assert_eq!(v.kind, Kind::Hole);
    let around = spool_check::checker::context(&h.0, "a", v.entry.unwrap(), 3);
    assert_eq!(around.len(), 7);
    assert!(around.iter().all(|(_, e)| e.event.sub() == Some("a")));
    assert!(around.iter().any(|(i, _)| Some(*i) == v.entry));
}

#[test]
fn a_history_round_trips_through_json() {
    let mut h = H::new("disk", 100);
    acked(&mut h, 2);
    h.subscribe("a", "E:0")
        .deliver("a", "E", 1, 1)
        .deliver("a", "E", 2, 2);
    h.fault(FaultKind::Stall, false);
    h.final_read("E", 1, 2);
    let text: Vec<String> =
        h.0.iter()
            .map(|e| serde_json::to_string(e).unwrap())
            .collect();
    let back: Vec<Entry> = text
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, h.0);
}

#[test]
fn a_failed_run_prints_the_seed_the_violation_and_the_subscribers_history() {
    let mut h = H::new("disk", 100);
    acked(&mut h, 6);
    h.subscribe("poll-2", "E:1").subscribe("ws-0", "E:1");
    for o in 2..=6 {
        if o != 4 {
            h.deliver("poll-2", "E", o, o);
        }
        h.deliver("ws-0", "E", o, o);
    }
    h.final_read("E", 1, 6);
    let report = check(&h.0);
    let result = spool_check::RunResult {
        seed: 4242,
        engine: "disk".into(),
        nodes: 1,
        elapsed: std::time::Duration::from_secs(3),
        schedule: Vec::new(),
        faults_applied: 0,
        entries: h.0.clone(),
        report,
        dropped_entries: 0,
        harness_errors: Vec::new(),
    };
    assert!(!result.passed());
    let text = result.render_text("spool check --engine disk --seed 4242");
    eprintln!("{text}");
    assert!(text.contains("violations: 1 (hole 1)"), "{text}");
    assert!(text.contains("VIOLATION 1/1 [hole]"), "{text}");
    assert!(text.contains("seed 4242"), "{text}");
    assert!(
        text.contains("spool check --engine disk --seed 4242"),
        "{text}"
    );
    // The failing subscriber's own entries, the violating one marked.
    let marked: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("> #"))
        .collect();
    assert_eq!(marked.len(), 1, "{text}");
    assert!(
        marked[0].contains("\"offset\":5") && marked[0].contains("poll-2"),
        "{text}"
    );
    assert!(
        !text.lines().any(|l| l.contains("\"sub\":\"ws-0\"")),
        "only poll-2's history: {text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&result.render_json("spool check --seed 4242")).unwrap();
    assert_eq!(json["passed"], false);
    assert_eq!(json["violation_count"], 1);
    assert_eq!(json["violations"][0]["kind"], "hole");
    assert!(json["violations"][0]["history"].as_array().unwrap().len() >= 3);
}
