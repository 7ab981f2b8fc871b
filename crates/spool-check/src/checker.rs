//! The checker: SPEC §2 (and §3, §4) verified from a [`History`](crate::history) alone.
//!
//! What it verifies:
//!
//! - **continuity**, per subscriber and stream: from its anchor, each delivery is the next
//!   offset of the same epoch — a higher one is a **hole**, a lower or equal one a
//!   **reordering**, another epoch without a reset a **silent epoch change**;
//! - **resets have the right reason**: `history_expired` only in the same epoch and only when
//!   retention really dropped a message after the subscriber's position (the head is more than
//!   the stream's `max_messages` past it); `epoch_changed` / `unknown_stream` only after a fault
//!   that may lose data (never on a durable engine);
//! - **every acked message reaches every subscriber** that was in its epoch before its offset,
//!   unless a reset jumped over it;
//! - **no acked message is lost**: after the run each stream is read whole; on a durable engine
//!   every acked message is still there (unless retention removed it), with its payload, in the
//!   epoch it was acked in; and retention removed no more than its message limit allows;
//! - **an idempotent retry never appends twice**: all acks of one operation name one position,
//!   and no payload appears at two offsets of one epoch (deliveries, final reads, acks);
//!   every delivered payload is one that was published, and one position holds one payload;
//! - **sessions resume**: a WebSocket subscriber that reconnects gets its session back
//!   (`resumed`) unless a fault lost data since its previous connection.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::history::{Entry, Event, FaultKind, Outcome, split_position};

/// What kind of rule a violation breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A subscriber got offset n+k (k > 1) right after n, with no reset between.
    Hole,
    /// A subscriber got an offset at or below one it already had.
    Reorder,
    /// A subscriber's deliveries moved to another epoch without a reset.
    SilentEpochChange,
    /// A reset whose reason does not match what happened (e.g. `history_expired` while the
    /// history was still retained, or in another epoch).
    WrongResetReason,
    /// `epoch_changed` / `unknown_stream` although no fault could have lost data.
    UnjustifiedReset,
    /// An acked message never reached a subscriber that was subscribed across it.
    LostDelivery,
    /// An acked message is missing from the stream after the run (or its epoch is gone) on an
    /// engine that must keep it.
    LostAck,
    /// One operation appended twice (an idempotent retry that was not deduplicated).
    DuplicateAppend,
    /// One position holds two different payloads, or a payload nobody published.
    WrongPayload,
    /// A WebSocket session was not resumed although nothing was lost.
    NotResumed,
    /// A subscriber never caught up with the stream's head after the faults ended.
    Lagging,
    /// The stream read after the run has a hole.
    FinalReadHole,
    /// The stream read after the run retains fewer messages than its retention keeps.
    OverTrimmed,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hole => "hole",
            Kind::Reorder => "reorder",
            Kind::SilentEpochChange => "silent_epoch_change",
            Kind::WrongResetReason => "wrong_reset_reason",
            Kind::UnjustifiedReset => "unjustified_reset",
            Kind::LostDelivery => "lost_delivery",
            Kind::LostAck => "lost_ack",
            Kind::DuplicateAppend => "duplicate_append",
            Kind::WrongPayload => "wrong_payload",
            Kind::NotResumed => "not_resumed",
            Kind::Lagging => "lagging",
            Kind::FinalReadHole => "final_read_hole",
            Kind::OverTrimmed => "over_trimmed",
        }
    }
}

/// One broken rule.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub kind: Kind,
    /// The subscriber whose history shows it, if one does.
    pub sub: Option<String>,
    pub stream: Option<String>,
    pub message: String,
    /// The index of the entry that shows it, in the history.
    pub entry: Option<usize>,
}

/// What the checker looked at.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub publish_ops: u64,
    pub publish_attempts: u64,
    pub acked_ops: u64,
    pub duplicate_acks: u64,
    pub indeterminate_attempts: u64,
    pub refused_attempts: u64,
    pub subscribers: u64,
    pub deliveries_checked: u64,
    pub resets: BTreeMap<String, u64>,
    pub reconnects: u64,
    pub resumed: u64,
    pub faults: BTreeMap<String, u64>,
    /// (acked message, subscriber) pairs verified delivered or covered by a reset.
    pub acked_deliveries_checked: u64,
    /// Acked messages verified present in the final read.
    pub acked_in_final_read: u64,
    pub final_read_messages: u64,
}

/// The checker's verdict.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub stats: Stats,
    pub violations: Vec<Violation>,
    /// Violations beyond the first [`MAX_VIOLATIONS`] are only counted here.
    pub more_violations: u64,
}

/// Most violations kept with their details.
pub const MAX_VIOLATIONS: usize = 200;

impl Report {
    fn violate(
        &mut self,
        kind: Kind,
        sub: Option<&str>,
        stream: Option<&str>,
        entry: Option<usize>,
        message: String,
    ) {
        if self.violations.len() >= MAX_VIOLATIONS {
            self.more_violations += 1;
            return;
        }
        self.violations.push(Violation {
            kind,
            sub: sub.map(str::to_owned),
            stream: stream.map(str::to_owned),
            message,
            entry,
        });
    }

    /// How many violations in all.
    pub fn violation_count(&self) -> u64 {
        self.violations.len() as u64 + self.more_violations
    }

    /// Violations counted by kind.
    pub fn by_kind(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for v in &self.violations {
            *out.entry(v.kind.name()).or_default() += 1;
        }
        out
    }
}

/// An operation's acks and payload.
struct Op {
    stream: String,
    key: String,
    payload: String,
    /// `(epoch, offset, entry index)` of each ack.
    acks: Vec<(String, u64, usize)>,
}

/// Where one subscriber stands on one stream, and what it has seen.
#[derive(Default)]
struct Track {
    cursor: Option<(String, u64)>,
    delivered: HashSet<(String, u64)>,
    /// Ranges a reset jumped over or a reported hole skipped: `(epoch, after, through)`;
    /// `through` None: everything after `after` in that epoch.
    jumps: Vec<(String, u64, Option<u64>)>,
    /// The lowest position the subscriber held in each epoch: it was subscribed across every
    /// offset above it.
    entered: HashMap<String, u64>,
    lagging: bool,
}

impl Track {
    fn hold(&mut self, epoch: &str, offset: u64) {
        let e = self.entered.entry(epoch.to_owned()).or_insert(offset);
        *e = (*e).min(offset);
        self.cursor = Some((epoch.to_owned(), offset));
    }

    fn covers(&self, epoch: &str, offset: u64) -> bool {
        self.delivered.contains(&(epoch.to_owned(), offset))
            || self.jumps.iter().any(|(e, after, through)| {
                e == epoch && *after < offset && through.is_none_or(|t| offset <= t)
            })
    }
}

/// Checks a history; see the module documentation for the rules.
pub fn check(entries: &[Entry]) -> Report {
    let mut report = Report::default();
    let mut durable = false;
    let mut retention: HashMap<String, Option<u64>> = HashMap::new();
    let mut limits: HashMap<String, (Option<u64>, Option<u64>)> = HashMap::new();
    // When a fault that may lose data began and healed (a node's restart): the loss itself
    // happens at some moment between (e.g. when a node that was shutting down, and still
    // serving, finally exits).
    let mut lossy: Vec<(u64, u64, FaultKind, Option<usize>)> = Vec::new();

    // Pass 1: setup, streams, faults, publishes.
    let mut ops: BTreeMap<u64, Op> = BTreeMap::new();
    let mut payload_op: HashMap<String, u64> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        match &entry.event {
            Event::Setup { durable: d, .. } => durable = *d,
            Event::Stream {
                stream,
                max_messages,
                max_bytes,
                max_age_ms,
            } => {
                retention.insert(stream.clone(), *max_messages);
                limits.insert(stream.clone(), (*max_bytes, *max_age_ms));
            }
            Event::Fault {
                kind,
                lossy: may_lose,
                node,
                ..
            } => {
                *report
                    .stats
                    .faults
                    .entry(kind.name().to_owned())
                    .or_default() += 1;
                if *may_lose {
                    lossy.push((entry.at_ms, u64::MAX, *kind, *node));
                }
            }
            Event::Healed { kind, node } => {
                if let Some(w) = lossy
                    .iter_mut()
                    .rev()
                    .find(|w| w.1 == u64::MAX && w.2 == *kind && w.3 == *node)
                {
                    w.1 = entry.at_ms;
                }
            }
            Event::Publish {
                op,
                stream,
                key,
                payload,
                outcome,
                ..
            } => {
                report.stats.publish_attempts += 1;
                let o = ops.entry(*op).or_insert_with(|| Op {
                    stream: stream.clone(),
                    key: key.clone(),
                    payload: payload.clone(),
                    acks: Vec::new(),
                });
                payload_op.insert(payload.clone(), *op);
                match outcome {
                    Outcome::Acked {
                        epoch,
                        offset,
                        duplicate,
                    } => {
                        report.stats.duplicate_acks += u64::from(*duplicate);
                        o.acks.push((epoch.clone(), *offset, i));
                    }
                    Outcome::Refused { .. } => report.stats.refused_attempts += 1,
                    Outcome::Indeterminate { .. } => report.stats.indeterminate_attempts += 1,
                }
            }
            _ => {}
        }
    }
    report.stats.publish_ops = ops.len() as u64;
    report.stats.acked_ops = ops.values().filter(|o| !o.acks.is_empty()).count() as u64;
    // Whether data may have been lost between `from` and `to`: a lossy fault's window overlaps.
    let lossy_between = |from: u64, to: u64| {
        lossy
            .iter()
            .any(|&(start, healed, _, _)| start <= to && healed >= from)
    };
    let any_lossy_before = |to: u64| lossy.iter().any(|&(start, ..)| start <= to);

    // Each operation's acks name one position (per epoch; across epochs only after a lossy
    // fault, which may have lost the first append and its dedup record).
    // Observations of which payload sits where: `(stream, epoch, offset)` → payload, and
    // `(stream, epoch, payload)` → offset.
    let mut at_position: HashMap<(String, String, u64), (String, usize)> = HashMap::new();
    let mut position_of: HashMap<(String, String, String), (u64, usize)> = HashMap::new();
    let mut observe = |report: &mut Report,
                       stream: &str,
                       epoch: &str,
                       offset: u64,
                       payload: &str,
                       i: usize,
                       sub: Option<&str>| {
        let key = (stream.to_owned(), epoch.to_owned(), offset);
        match at_position.get(&key) {
            Some((p, first)) if p != payload => report.violate(
                Kind::WrongPayload,
                sub,
                Some(stream),
                Some(i),
                format!(
                    "{stream} {epoch}:{offset} holds {payload:?} here but {p:?} in entry #{first}"
                ),
            ),
            Some(_) => {}
            None => {
                at_position.insert(key, (payload.to_owned(), i));
            }
        }
        let key = (stream.to_owned(), epoch.to_owned(), payload.to_owned());
        match position_of.get(&key) {
            Some((o, first)) if *o != offset => report.violate(
                Kind::DuplicateAppend,
                sub,
                Some(stream),
                Some(i),
                format!(
                    "{payload:?} is at {epoch}:{offset} here but at {epoch}:{o} in entry #{first}: one publish appended twice"
                ),
            ),
            Some(_) => {}
            None => {
                position_of.insert(key, (offset, i));
            }
        }
    };
    for op in ops.values() {
        let Some((e0, o0, i0)) = op.acks.first() else {
            continue;
        };
        for (e, o, i) in &op.acks[1..] {
            if e == e0 && o != o0 {
                report.violate(
                    Kind::DuplicateAppend,
                    None,
                    Some(&op.stream),
                    Some(*i),
                    format!(
                        "idempotency key {:?} acked at {e0}:{o0} (entry #{i0}) and again at {e}:{o}: a retry appended twice",
                        op.key
                    ),
                );
            } else if e != e0 && !lossy_between(entries[*i0].at_ms, entries[*i].at_ms) {
                report.violate(
                    Kind::DuplicateAppend,
                    None,
                    Some(&op.stream),
                    Some(*i),
                    format!(
                        "idempotency key {:?} acked in epoch {e0} (entry #{i0}) and again in {e} with no fault that could lose data between",
                        op.key
                    ),
                );
            }
        }
        for (e, o, i) in &op.acks {
            observe(&mut report, &op.stream, e, *o, &op.payload, *i, None);
        }
    }

    // Pass 2: subscribers.
    let mut tracks: BTreeMap<(String, String), Track> = BTreeMap::new();
    let mut subs: HashSet<String> = HashSet::new();
    let mut last_connected: HashMap<String, u64> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = entry.at_ms;
        match &entry.event {
            Event::Subscribe {
                sub,
                stream,
                position,
                ..
            } => {
                subs.insert(sub.clone());
                let track = tracks.entry((sub.clone(), stream.clone())).or_default();
                if let Some((e, o)) = split_position(position) {
                    track.hold(e, o);
                }
            }
            Event::Deliver {
                sub,
                stream,
                epoch,
                offset,
                payload,
            } => {
                report.stats.deliveries_checked += 1;
                if !payload_op.contains_key(payload) {
                    report.violate(
                        Kind::WrongPayload,
                        Some(sub),
                        Some(stream),
                        Some(i),
                        format!("{epoch}:{offset} carries {payload:?}, which nobody published"),
                    );
                }
                observe(&mut report, stream, epoch, *offset, payload, i, Some(sub));
                let track = tracks.entry((sub.clone(), stream.clone())).or_default();
                match track.cursor.clone() {
                    None => {}
                    Some((ce, co)) if ce == *epoch => {
                        if *offset <= co {
                            report.violate(
                                Kind::Reorder,
                                Some(sub),
                                Some(stream),
                                Some(i),
                                format!("{sub} got {epoch}:{offset} after {ce}:{co}"),
                            );
                        } else if *offset > co + 1 {
                            report.violate(
                                Kind::Hole,
                                Some(sub),
                                Some(stream),
                                Some(i),
                                format!(
                                    "{sub} got {epoch}:{offset} right after {ce}:{co} with no reset: offsets {}..={} missing",
                                    co + 1,
                                    offset - 1
                                ),
                            );
                            track.jumps.push((ce.clone(), co, Some(offset - 1)));
                        }
                    }
                    Some((ce, co)) => {
                        report.violate(
                            Kind::SilentEpochChange,
                            Some(sub),
                            Some(stream),
                            Some(i),
                            format!(
                                "{sub} got {epoch}:{offset} after {ce}:{co} with no reset: the epoch changed silently"
                            ),
                        );
                        track.jumps.push((ce.clone(), co, None));
                    }
                }
                track.delivered.insert((epoch.clone(), *offset));
                // After a reordering the cursor stays where it was.
                if track
                    .cursor
                    .as_ref()
                    .is_none_or(|(ce, co)| ce != epoch || offset > co)
                {
                    track.hold(epoch, *offset);
                }
            }
            Event::Reset {
                sub,
                stream,
                reason,
                position,
            } => {
                *report.stats.resets.entry(reason.clone()).or_default() += 1;
                let Some((e2, h)) = split_position(position) else {
                    report.violate(
                        Kind::WrongResetReason,
                        Some(sub),
                        Some(stream),
                        Some(i),
                        format!("reset to an unreadable position {position:?}"),
                    );
                    continue;
                };
                let track = tracks.entry((sub.clone(), stream.clone())).or_default();
                if let Some((ce, co)) = track.cursor.clone() {
                    let limit = retention.get(stream).copied().flatten();
                    match reason.as_str() {
                        "history_expired" => {
                            if e2 != ce {
                                report.violate(
                                    Kind::WrongResetReason,
                                    Some(sub),
                                    Some(stream),
                                    Some(i),
                                    format!(
                                        "history_expired from {ce}:{co} to {position}: the epoch changed, so the reason must be epoch_changed"
                                    ),
                                );
                            } else if let Some(limit) = limit
                                && h.saturating_sub(co) <= limit
                            {
                                report.violate(
                                    Kind::WrongResetReason,
                                    Some(sub),
                                    Some(stream),
                                    Some(i),
                                    format!(
                                        "history_expired from {ce}:{co} with the head at {h}: retention keeps {limit} messages, so offset {} was still retained",
                                        co + 1
                                    ),
                                );
                            }
                        }
                        "epoch_changed" | "unknown_stream" => {
                            if !any_lossy_before(at) {
                                report.violate(
                                    Kind::UnjustifiedReset,
                                    Some(sub),
                                    Some(stream),
                                    Some(i),
                                    format!(
                                        "{reason} from {ce}:{co} to {position}, but no fault that could lose data happened{}",
                                        if durable { " (the engine is durable)" } else { "" }
                                    ),
                                );
                            } else if reason == "epoch_changed" && e2 == ce && h >= co {
                                report.violate(
                                    Kind::WrongResetReason,
                                    Some(sub),
                                    Some(stream),
                                    Some(i),
                                    format!(
                                        "epoch_changed from {ce}:{co} to {position}: same epoch, not behind the head"
                                    ),
                                );
                            }
                        }
                        other => report.violate(
                            Kind::WrongResetReason,
                            Some(sub),
                            Some(stream),
                            Some(i),
                            format!("unknown reset reason {other:?}"),
                        ),
                    }
                    let through = (e2 == ce && h >= co).then_some(h);
                    track.jumps.push((ce, co, through));
                }
                track.hold(e2, h);
            }
            Event::Connected { sub, resumed } => {
                if let Some(previous) = last_connected.insert(sub.clone(), at) {
                    report.stats.reconnects += 1;
                    if *resumed {
                        report.stats.resumed += 1;
                    } else if !lossy_between(previous, at) {
                        report.violate(
                            Kind::NotResumed,
                            Some(sub),
                            None,
                            Some(i),
                            format!(
                                "{sub} reconnected without its session although no fault that could lose data happened since its last connection"
                            ),
                        );
                    }
                }
            }
            Event::Lagging {
                sub,
                stream,
                position,
                head,
            } => {
                report.violate(
                    Kind::Lagging,
                    Some(sub),
                    Some(stream),
                    Some(i),
                    format!(
                        "{sub} stayed at {position} on {stream}; the head is {head} (it never caught up after the faults ended)"
                    ),
                );
                if let Some(t) = tracks.get_mut(&(sub.clone(), stream.clone())) {
                    t.lagging = true;
                }
            }
            _ => {}
        }
    }
    report.stats.subscribers = subs.len() as u64;

    // Every acked message reached every subscriber subscribed across it.
    for ((sub, stream), track) in &tracks {
        let mut missing: Vec<(String, u64, usize)> = Vec::new();
        for op in ops.values().filter(|o| &o.stream == stream) {
            let Some((epoch, offset, i)) = op.acks.first() else {
                continue;
            };
            let Some(entered) = track.entered.get(epoch) else {
                continue; // never in that epoch
            };
            if *offset <= *entered {
                continue; // before the subscriber started there
            }
            if track.lagging
                && track
                    .cursor
                    .as_ref()
                    .is_some_and(|(ce, co)| ce == epoch && offset > co)
            {
                continue; // reported as lagging
            }
            if track.covers(epoch, *offset) {
                report.stats.acked_deliveries_checked += 1;
            } else {
                missing.push((epoch.clone(), *offset, *i));
            }
        }
        missing.sort();
        // Consecutive offsets are reported as one range.
        let mut k = 0;
        while k < missing.len() {
            let (epoch, first, i) = missing[k].clone();
            let mut last = first;
            while k + 1 < missing.len() && missing[k + 1].0 == epoch && missing[k + 1].1 == last + 1
            {
                k += 1;
                last = missing[k].1;
            }
            k += 1;
            let cursor = track
                .cursor
                .as_ref()
                .map(|(e, o)| format!("{e}:{o}"))
                .unwrap_or_default();
            report.violate(
                Kind::LostDelivery,
                Some(sub),
                Some(stream),
                Some(i),
                format!(
                    "acked {epoch}:{first}..={last} never reached {sub} (no delivery, no reset covering it; it ended at {cursor})"
                ),
            );
        }
    }

    // The streams read after the run: contiguous, and every acked message still there.
    for (i, entry) in entries.iter().enumerate() {
        let Event::FinalRead {
            stream,
            epoch,
            oldest,
            head,
            messages,
        } = &entry.event
        else {
            continue;
        };
        report.stats.final_read_messages += messages.len() as u64;
        let mut expect = *oldest;
        for (offset, payload) in messages {
            if *offset != expect {
                report.violate(
                    Kind::FinalReadHole,
                    None,
                    Some(stream),
                    Some(i),
                    format!(
                        "reading {stream} whole after the run: {epoch}:{offset} came where {epoch}:{expect} was expected"
                    ),
                );
            }
            expect = offset + 1;
            observe(&mut report, stream, epoch, *offset, payload, i, None);
        }
        if expect != head + 1 && !messages.is_empty() {
            report.violate(
                Kind::FinalReadHole,
                None,
                Some(stream),
                Some(i),
                format!(
                    "reading {stream} whole after the run ended at {epoch}:{} but the head is {head}",
                    expect - 1
                ),
            );
        }
        // Retention keeps the newest `max_messages`: fewer retained means it removed messages
        // it had to keep (judged only when the byte and age limits cannot have removed any).
        let retained = (head + 1).saturating_sub(*oldest);
        let bytes: u64 = messages.iter().map(|(_, p)| p.len() as u64).sum();
        let (max_bytes, max_age_ms) = limits.get(stream).copied().unwrap_or((None, None));
        if let Some(limit) = retention.get(stream).copied().flatten()
            && retained < limit.min(*head)
            && max_bytes.is_some_and(|b| b >= bytes.saturating_mul(16).max(1 << 20))
            && max_age_ms.is_some_and(|a| a > entry.at_ms)
        {
            report.violate(
                Kind::OverTrimmed,
                None,
                Some(stream),
                Some(i),
                format!(
                    "{stream} retains {epoch}:{oldest}..={head}, {retained} messages, but its retention keeps {limit}: messages were removed early"
                ),
            );
        }
        let present: HashMap<u64, &str> = messages.iter().map(|(o, p)| (*o, p.as_str())).collect();
        for op in ops.values().filter(|o| &o.stream == stream) {
            let Some((e, o, ai)) = op.acks.first() else {
                continue;
            };
            if e != epoch {
                if !any_lossy_before(entry.at_ms) {
                    report.violate(
                        Kind::LostAck,
                        None,
                        Some(stream),
                        Some(*ai),
                        format!(
                            "{:?} was acked at {e}:{o} but {stream} is now in epoch {epoch}: the acked history is gone, with no fault that could lose data",
                            op.key
                        ),
                    );
                }
                continue;
            }
            if *o > *head {
                report.violate(
                    Kind::LostAck,
                    None,
                    Some(stream),
                    Some(*ai),
                    format!(
                        "{:?} was acked at {e}:{o} but the head of {stream} is {epoch}:{head} after the run",
                        op.key
                    ),
                );
            } else if *o >= *oldest {
                match present.get(o) {
                    Some(p) if *p == op.payload => report.stats.acked_in_final_read += 1,
                    // A different payload there is reported by `observe`.
                    Some(_) => {}
                    None => report.violate(
                        Kind::LostAck,
                        None,
                        Some(stream),
                        Some(*ai),
                        format!(
                            "{:?} was acked at {e}:{o} but is missing from {stream} read whole after the run",
                            op.key
                        ),
                    ),
                }
            }
        }
    }
    report
}

/// The entries of subscriber `sub` around entry `index` (up to `radius` of its own entries
/// either side), with their indexes, for a violation report.
pub fn context<'a>(
    entries: &'a [Entry],
    sub: &str,
    index: usize,
    radius: usize,
) -> Vec<(usize, &'a Entry)> {
    let own: Vec<(usize, &Entry)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event.sub() == Some(sub))
        .collect();
    let at = own.partition_point(|(i, _)| *i < index);
    let from = at.saturating_sub(radius);
    let to = (at + radius + 1).min(own.len());
    let mut out = own[from..to].to_vec();
    // The faults that happened in that window, for reading it.
    if let (Some(first), Some(last)) = (out.first().map(|x| x.0), out.last().map(|x| x.0)) {
        out.extend(
            entries
                .iter()
                .enumerate()
                .filter(|(i, e)| {
                    *i >= first
                        && *i <= last
                        && matches!(e.event, Event::Fault { .. } | Event::Healed { .. })
                })
                .collect::<Vec<_>>(),
        );
        out.sort_by_key(|(i, _)| *i);
    }
    out
}

/// Whether a fault kind loses data on `engine` (the memory engine forgets everything when
/// its node stops).
pub fn lossy(engine: &str, kind: FaultKind) -> bool {
    engine == "memory" && matches!(kind, FaultKind::Term | FaultKind::Kill)
}
