//! Receiving: taking messages from the stream into the group and leasing them to a member,
//! and the time-driven side of leases (expiry, backoff, dead-lettering at `max_deliveries`) and
//! of continuity (resets).
//!
//! A receive is two steps around one engine read, because the state machine does no I/O:
//!
//! ```text
//! let want = group.want(max, now);                        // read what, from where
//! let batch = engine.read(stream, want.after, want.limit); // (state alone if limit is 0)
//! let out = group.receive(&request, &batch.state, &batch.messages, now)?;
//! // store out's dead letters and changes, then, if out.value.read_again, once more from
//! // `want` (the rest of the answer), then answer with every delivery
//! ```
//!
//! `receive` accepts whatever the read returned, as long as the messages come with the stream
//! state of the same snapshot (an engine's `ReadBatch`): it first settles continuity against
//! that state, then takes only messages that continue its cursor without a gap. So a read that
//! raced a reset, or returned more or fewer than asked, is harmless — the group takes what
//! fits and the next receive reads the rest.

use std::{borrow::Borrow, collections::BTreeSet, time::Duration};

use crate::{
    continuity::{Decision, ResetReason, Start, StreamState, decide},
    group::{
        change::{Change, Outcome},
        config::{MAX_DURATION, Ordering, check_visibility},
        dead::{DeadLetter, REASON_MAX_DELIVERIES},
        entry::{Entry, EntryState},
        name::MemberName,
        receipt::{LeaseId, Receipt},
        state::{Counters, GroupReset, GroupState, LAST_SEEN_RESOLUTION_MS, MAX_MEMBERS},
    },
    message::Message,
    position::{Epoch, Offset, Position},
};

/// The most messages one receive may ask for.
pub const MAX_RECEIVE: u32 = 1000;
/// The most receipts one ack, nack, extend or terminate may carry.
pub const MAX_RECEIPTS: usize = 1000;

/// Why an operation was refused as a whole (a `400`): its arguments, never its receipts —
/// a bad receipt is an `unknown` answer for that receipt alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("max must be from 1 to {MAX_RECEIVE}; got {0}")]
    Max(u32),
    #[error("visibility_timeout must be more than 0s and at most 12h; got {}", crate::group::config::fmt_duration(*.0))]
    VisibilityTimeout(Duration),
    #[error("delay must be at most 12h; got {}", crate::group::config::fmt_duration(*.0))]
    Delay(Duration),
    #[error("at most {MAX_RECEIPTS} receipts per call; got {0}")]
    TooManyReceipts(usize),
}

/// A member's receive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveRequest {
    pub member: MemberName,
    /// At most this many messages (1–[`MAX_RECEIVE`]).
    pub max: u32,
    /// The lease's length; the group's `visibility_timeout` when `None`.
    pub visibility_timeout: Option<Duration>,
}

impl ReceiveRequest {
    pub fn validate(&self) -> Result<(), OpError> {
        if !(1..=MAX_RECEIVE).contains(&self.max) {
            return Err(OpError::Max(self.max));
        }
        if let Some(v) = self.visibility_timeout {
            check_visibility(v).map_err(|_| OpError::VisibilityTimeout(v))?;
        }
        Ok(())
    }
}

/// What a receive would like read from the stream: up to `limit` messages after `after`.
/// `limit` is 0 when the group needs nothing new (it is full, or has enough to redeliver);
/// the receive still needs the stream's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    pub after: Offset,
    pub limit: usize,
}

/// One message leased to the member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub epoch: Epoch,
    pub offset: Offset,
    /// 1 on the first delivery.
    pub deliveries: u32,
    pub receipt: Receipt,
    /// The lease runs out at this time (ms since the Unix epoch).
    pub until_ms: u64,
    pub key: Option<String>,
}

/// The answer of a receive: the leased messages in offset order (the caller adds their
/// payloads: those after the `Want`'s `after` are in the batch it read, earlier ones are
/// redeliveries to read by offset), and the reset this receive recorded, if any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub deliveries: Vec<Delivery>,
    pub reset: Option<GroupReset>,
    /// A reset moved the cursor, so the batch read for this receive was of no use, and the
    /// member could take more: the caller should receive again at once (a fresh `want` and
    /// read) for the rest of `max`, rather than wait for a publish.
    pub read_again: bool,
}

/// The changes and dead letters an operation is collecting. Every mutation goes through
/// [`Tx::commit`] (entries, cursor, resets) or is summed up by [`Tx::finish`] (counters and
/// member records, written once per operation), so the changes always replay to this state.
pub(crate) struct Tx {
    changes: Vec<Change>,
    dead: Vec<DeadLetter>,
    counters: Counters,
    members: BTreeSet<MemberName>,
}

impl Tx {
    /// A member record changed: write it when the operation finishes.
    pub(crate) fn touch(&mut self, member: MemberName) {
        self.members.insert(member);
    }
}

impl GroupState {
    pub(crate) fn begin(&self) -> Tx {
        Tx {
            changes: Vec::new(),
            dead: Vec::new(),
            counters: self.counters,
            members: BTreeSet::new(),
        }
    }

    pub(crate) fn commit(&mut self, tx: &mut Tx, change: Change) {
        self.apply(&change);
        tx.changes.push(change);
    }

    pub(crate) fn finish<T>(&mut self, mut tx: Tx, value: T) -> Outcome<T> {
        if self.counters != tx.counters {
            let counters = self.counters;
            self.commit(&mut tx, Change::CountersSet { counters });
        }
        for member in std::mem::take(&mut tx.members) {
            if let Some(record) = self.members.get(&member).cloned() {
                self.commit(&mut tx, Change::MemberPut { member, record });
            }
        }
        Outcome {
            value,
            changes: tx.changes,
            dead_letters: tx.dead,
        }
    }

    /// The member's record, created if new (forgetting the least recently seen member when the
    /// table is full). `seen`: this is a receive of that member at that time.
    pub(crate) fn member(
        &mut self,
        tx: &mut Tx,
        member: &MemberName,
        seen: Option<u64>,
    ) -> &mut crate::group::state::MemberRecord {
        if !self.members.contains_key(member) {
            if self.members.len() >= MAX_MEMBERS
                && let Some(oldest) = self
                    .members
                    .iter()
                    .min_by_key(|(_, r)| r.last_seen_ms)
                    .map(|(m, _)| m.clone())
            {
                tx.members.remove(&oldest);
                self.commit(tx, Change::MemberRemoved { member: oldest });
            }
            self.members.insert(member.clone(), Default::default());
            tx.members.insert(member.clone());
        }
        let record = self.members.get_mut(member).expect("inserted above");
        if let Some(now) = seen
            && (record.last_seen_ms == 0
                || now >= record.last_seen_ms.saturating_add(LAST_SEEN_RESOLUTION_MS))
        {
            record.last_seen_ms = now;
            tx.members.insert(member.clone());
        }
        record
    }

    /// Whether the entry at `offset` may be leased now: not leased, visible, and under key
    /// ordering the first unfinished message of its key.
    pub(crate) fn eligible(&self, offset: Offset, entry: &Entry, now_ms: u64) -> bool {
        if !entry.is_visible(now_ms) {
            return false;
        }
        match (&self.config.ordering, &entry.key) {
            (Ordering::Key, Some(key)) => self
                .index
                .keys
                .get(key)
                .and_then(|set| set.first())
                .is_none_or(|first| *first == offset),
            _ => true,
        }
    }

    /// Leases that have not run out at `now_ms`.
    fn live_leases(&self, now_ms: u64) -> usize {
        self.index
            .deadlines
            .range((now_ms.saturating_add(1), Offset::ZERO)..)
            .count()
    }

    /// What to read from the stream for a receive of up to `max` messages at `now_ms`.
    pub fn want(&self, max: u32, now_ms: u64) -> Want {
        let in_flight_room =
            (self.config.max_in_flight as usize).saturating_sub(self.live_leases(now_ms));
        let room = (max as usize).min(in_flight_room);
        let ready = self
            .index
            .unleased
            .iter()
            .filter(|o| self.eligible(**o, &self.entries[o], now_ms))
            .take(room)
            .count();
        let needed = room - ready;
        // Under key ordering some of what is read may wait behind its key: read ahead a little.
        let wanted = match self.config.ordering {
            Ordering::None => needed,
            Ordering::Key => needed.saturating_mul(4),
        };
        let window = self.max_entries().saturating_sub(self.entries.len());
        Want {
            after: self.cursor.offset,
            limit: wanted.min(window),
        }
    }

    /// Leases up to `request.max` messages to `request.member`: first messages due again
    /// (oldest first), then new ones from `fetched` — messages read from the stream after the
    /// [`Want`]'s offset, with `stream`, the stream's state of the same snapshot. Expired
    /// leases are reclaimed first and continuity is checked against `stream` (see
    /// [`reconcile`](Self::reconcile)).
    pub fn receive<M: Borrow<Message>>(
        &mut self,
        request: &ReceiveRequest,
        stream: &StreamState,
        fetched: &[M],
        now_ms: u64,
    ) -> Result<Outcome<Received>, OpError> {
        request.validate()?;
        let mut tx = self.begin();
        self.member(&mut tx, &request.member, Some(now_ms));
        self.expire_due(&mut tx, now_ms);
        let reset = self.reconcile_in(&mut tx, stream, now_ms);
        let visibility = request
            .visibility_timeout
            .unwrap_or(self.config.visibility_timeout);
        let until_ms = now_ms.saturating_add(visibility.as_millis() as u64);
        let room = (request.max as usize)
            .min((self.config.max_in_flight as usize).saturating_sub(self.leased()));
        let mut deliveries = Vec::new();

        // Messages already in the group, due for (re)delivery.
        let ready: Vec<Offset> = self
            .index
            .unleased
            .iter()
            .copied()
            .filter(|o| self.eligible(*o, &self.entries[o], now_ms))
            .take(room)
            .collect();
        for offset in ready {
            if deliveries.len() >= room {
                break;
            }
            let entry = self.entries[&offset].clone();
            if entry.deliveries >= self.config.max_deliveries {
                // Only after max_deliveries was lowered: its last delivery already happened.
                self.send_to_dead_letter(&mut tx, offset, REASON_MAX_DELIVERIES.into(), None);
            } else {
                deliveries.push(self.lease(&mut tx, offset, entry, &request.member, until_ms));
            }
        }

        // New messages, continuing the cursor without a gap.
        let mut took = false;
        if stream.epoch == self.cursor.epoch {
            let mut last = self.cursor.offset;
            for message in fetched {
                let message = message.borrow();
                if message.offset <= last {
                    continue;
                }
                if message.offset != last.next()
                    || message.offset > stream.head
                    || deliveries.len() >= room
                    || self.entries.len() >= self.max_entries()
                {
                    break;
                }
                last = message.offset;
                let entry = Entry {
                    deliveries: 0,
                    key: message.key.clone(),
                    time_ms: message.time_ms,
                    state: EntryState::Waiting,
                };
                let blocked = self.config.ordering == Ordering::Key
                    && entry
                        .key
                        .as_ref()
                        .is_some_and(|k| self.index.keys.contains_key(k));
                if blocked {
                    let offset = message.offset;
                    self.commit(&mut tx, Change::EntryPut { offset, entry });
                } else {
                    let d = self.lease(&mut tx, message.offset, entry, &request.member, until_ms);
                    deliveries.push(d);
                }
            }
            if last != self.cursor.offset {
                took = true;
                let cursor = Position::new(self.cursor.epoch.clone(), last);
                let head = stream.head.max(last);
                self.commit(&mut tx, Change::CursorMoved { cursor, head });
            }
        }
        // The batch was read after the cursor as it was before a reset moved it: read again.
        let read_again = reset.as_ref().is_some_and(|r| r.to != r.from)
            && !took
            && deliveries.len() < room
            && self.entries.len() < self.max_entries()
            && stream.head > self.cursor.offset;
        let received = Received {
            deliveries,
            reset,
            read_again,
        };
        Ok(self.finish(tx, received))
    }

    fn lease(
        &mut self,
        tx: &mut Tx,
        offset: Offset,
        mut entry: Entry,
        member: &MemberName,
        until_ms: u64,
    ) -> Delivery {
        entry.deliveries += 1;
        if entry.deliveries > 1 {
            self.counters.redelivered += 1;
        }
        let lease = LeaseId::generate();
        entry.state = EntryState::Leased {
            lease,
            member: member.clone(),
            until_ms,
        };
        let delivery = Delivery {
            epoch: self.cursor.epoch.clone(),
            offset,
            deliveries: entry.deliveries,
            receipt: Receipt {
                group: self.id,
                epoch: self.cursor.epoch.clone(),
                offset,
                lease,
            },
            until_ms,
            key: entry.key.clone(),
        };
        self.commit(tx, Change::EntryPut { offset, entry });
        delivery
    }

    /// Removes an unfinished message and hands it to the dead-letter stream.
    pub(crate) fn send_to_dead_letter(
        &mut self,
        tx: &mut Tx,
        offset: Offset,
        reason: String,
        detail: Option<String>,
    ) {
        let Some(entry) = self.entries.get(&offset).cloned() else {
            return;
        };
        self.counters.dead_lettered += 1;
        let epoch = self.cursor.epoch.clone();
        tx.dead.push(DeadLetter {
            to: self.dead_letter.clone(),
            source: self.stream.clone(),
            group: self.name.clone(),
            idempotency_key: format!("spool-dead:{}:{}:{}", self.id, epoch, offset),
            epoch,
            offset,
            deliveries: entry.deliveries,
            reason,
            detail,
            key: entry.key,
        });
        self.commit(tx, Change::EntryRemoved { offset });
    }

    /// Reclaims every lease that has run out at `now_ms`: the message is visible again after
    /// the backoff for its delivery count (counted from the lease's end, not from when this
    /// runs), or dead-lettered when it has had `max_deliveries` deliveries.
    ///
    /// `receive` does this itself; an engine also calls it on a timer (at
    /// [`next_wakeup`](Self::next_wakeup)) so dead letters and stats do not wait for the next
    /// receive.
    pub fn expire(&mut self, now_ms: u64) -> Outcome<()> {
        let mut tx = self.begin();
        self.expire_due(&mut tx, now_ms);
        self.finish(tx, ())
    }

    fn expire_due(&mut self, tx: &mut Tx, now_ms: u64) {
        let due: Vec<(u64, Offset)> = self
            .index
            .deadlines
            .range(..=(now_ms, Offset(u64::MAX)))
            .copied()
            .collect();
        for (until_ms, offset) in due {
            let mut entry = self.entries[&offset].clone();
            if let Some((_, member, _)) = entry.lease() {
                let member = member.clone();
                self.member(tx, &member, None).timeouts += 1;
                tx.touch(member);
            }
            if entry.deliveries >= self.config.max_deliveries {
                self.send_to_dead_letter(tx, offset, REASON_MAX_DELIVERIES.into(), None);
            } else {
                let backoff = self.config.backoff_after(entry.deliveries).as_millis() as u64;
                entry.state = EntryState::Visible {
                    at_ms: until_ms.saturating_add(backoff),
                };
                self.commit(tx, Change::EntryPut { offset, entry });
            }
        }
    }

    /// When something may change without a publish: the earliest lease end or future
    /// visibility (nack delay, backoff). An engine wakes its long-polls and runs
    /// [`expire`](Self::expire) then.
    pub fn next_wakeup(&self, now_ms: u64) -> Option<u64> {
        let lease = self.index.deadlines.first().map(|(until, _)| *until);
        let visible = self
            .index
            .unleased
            .iter()
            .filter_map(|o| match self.entries[o].state {
                EntryState::Visible { at_ms } if at_ms > now_ms => Some(at_ms),
                _ => None,
            })
            .min();
        lease.into_iter().chain(visible).min()
    }

    /// Checks the group against the stream's current state and records any loss (SPEC §7,
    /// never silent):
    ///
    /// - the stream is in another epoch (or its history diverged from the cursor): every
    ///   unfinished message is lost, and so are those the group knew existed beyond its
    ///   cursor; the group continues from the oldest message of the new epoch. A group that
    ///   had taken nothing yet (cursor at 0) just adopts the new epoch: nothing was lost.
    /// - retention removed messages after the cursor: they are lost, and the group continues
    ///   from the oldest retained message;
    /// - retention removed messages the group holds unleased: they are lost. A leased one
    ///   stays until its lease ends (its member may still ack it).
    ///
    /// Each loss counts in `expired` and records a [`GroupReset`]. `receive` does this itself.
    pub fn reconcile(&mut self, stream: &StreamState, now_ms: u64) -> Outcome<Option<GroupReset>> {
        let mut tx = self.begin();
        let reset = self.reconcile_in(&mut tx, stream, now_ms);
        self.finish(tx, reset)
    }

    /// Removes the entries not leased now whose messages are before `oldest` (retention
    /// dropped them); how many.
    fn remove_unleased_before(&mut self, tx: &mut Tx, oldest: Offset) -> u64 {
        let gone: Vec<Offset> = self.index.unleased.range(..oldest).copied().collect();
        for &offset in &gone {
            self.commit(tx, Change::EntryRemoved { offset });
        }
        gone.len() as u64
    }

    fn reconcile_in(
        &mut self,
        tx: &mut Tx,
        stream: &StreamState,
        now_ms: u64,
    ) -> Option<GroupReset> {
        let from = self.cursor.clone();
        let restart = Position::new(
            stream.epoch.clone(),
            Offset(stream.oldest.0.saturating_sub(1)),
        );
        let (reason, lost, to) = match decide(&Start::After(from.clone()), stream) {
            Decision::Deliver { .. } => {
                let gone = self.remove_unleased_before(tx, stream.oldest);
                if gone == 0 {
                    return None;
                }
                (ResetReason::HistoryExpired, gone, from.clone())
            }
            Decision::Reset {
                reason: ResetReason::HistoryExpired,
                ..
            } => {
                let skipped = stream.oldest.0.saturating_sub(1) - from.offset.0;
                let gone = self.remove_unleased_before(tx, stream.oldest);
                (ResetReason::HistoryExpired, skipped + gone, restart)
            }
            Decision::Reset { reason, .. } => {
                if from.offset == Offset::ZERO && self.entries.is_empty() {
                    let head = stream.head;
                    self.commit(
                        tx,
                        Change::CursorMoved {
                            cursor: restart,
                            head,
                        },
                    );
                    return None;
                }
                let all: Vec<Offset> = self.entries.keys().copied().collect();
                for &offset in &all {
                    self.commit(tx, Change::EntryRemoved { offset });
                }
                let beyond = self.head_seen.0.saturating_sub(from.offset.0);
                (reason, all.len() as u64 + beyond, restart)
            }
        };
        if to != from {
            let head = stream.head;
            self.commit(
                tx,
                Change::CursorMoved {
                    cursor: to.clone(),
                    head,
                },
            );
        }
        self.counters.expired += lost;
        self.counters.resets += 1;
        let reset = GroupReset {
            reason,
            lost,
            at_ms: now_ms,
            from,
            to,
        };
        self.commit(
            tx,
            Change::ResetRecorded {
                reset: reset.clone(),
            },
        );
        Some(reset)
    }
}

/// Checks a nack's delay: at most 12 h.
pub(crate) fn check_delay(d: Duration) -> Result<(), OpError> {
    if d > MAX_DURATION {
        return Err(OpError::Delay(d));
    }
    Ok(())
}
