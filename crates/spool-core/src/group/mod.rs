//! Durable consumer groups (SPEC §7) as a pure state machine: no I/O, no clock of its own
//! (every operation takes `now_ms`), no payloads.
//!
//! # The model
//!
//! A [`GroupState`] is one group on one stream. Its **cursor** is the position up to which
//! every message of the stream has been *taken* into the group. A taken message that is not
//! finished has an [`Entry`]: its delivery count, key, publish time, and whether it is
//! waiting (never handed out: blocked behind its key), leased (to a member, until a time, under
//! a random [`LeaseId`]) or visible again at a time (after a nack's delay or the backoff).
//! A message is finished when it is acked or dead-lettered (or lost to a reset, counted in
//! `expired`), and its entry goes. So at any moment each message of the stream is exactly one
//! of: beyond the cursor (pending, still in the stream), an entry, or finished. (SPEC §7 calls
//! the cursor the position up to which everything was handed out; here a message blocked
//! behind its key may be taken before it is handed out, and still counts as `pending`.)
//!
//! Receive ([`GroupState::want`], then [`GroupState::receive`] with what the engine read)
//! reclaims run-out leases, checks continuity, leases due entries oldest first and then takes
//! new messages after the cursor. ack / nack / extend / terminate answer per receipt
//! `ok` / `expired` / `unknown` ([`ReceiptResult`]); a [`Receipt`] names one lease of one
//! message of one group incarnation ([`GroupId`]), so a stale or foreign one never settles
//! anything. A lease whose `until_ms <= now` is over: the message is visible again after the
//! backoff for its delivery count, or, after `max_deliveries` deliveries, dead-lettered
//! ([`DeadLetter`]: what to append to the dead-letter stream, and its documented headers).
//! Under `ordering: "key"` only the first unfinished entry of a key may be leased, so one key
//! is never leased twice at once and finishes in offset order. Continuity
//! ([`GroupState::reconcile`], through `continuity::decide`): an epoch change or history that
//! retention removed before the group finished it is counted in `expired` and recorded as a
//! [`GroupReset`], and the group continues from the oldest retained message — never silently.
//!
//! # Bounds
//!
//! Leased entries ≤ `max_in_flight` (receive returns fewer). All entries ≤
//! [`GroupState::max_entries`] = 2 × `max_in_flight`: the look-ahead beyond the leases holds
//! messages waiting behind their key or for a delay; the group takes nothing new from the
//! stream when it is full (so under key ordering, a window filled by one slow key holds the
//! other keys back until it moves: the price of bounded memory). With `max_in_flight` ≤ [`config::MAX_IN_FLIGHT_CAP`] and members ≤
//! [`state::MAX_MEMBERS`], a group's memory and snapshot are bounded whatever the backlog:
//! a backlog of a million messages lives in the stream, beyond the cursor.
//!
//! # Durability
//!
//! Every mutating operation returns an [`Outcome`]: its answer, the [`Change`] records to store
//! and the dead letters to publish; see [`Outcome`] for the order (dead letters, then changes,
//! then the answer — so an ack is answered only once its removal is durable). Every mutation
//! of the live state is made by [`GroupState::apply`] on those same changes, so
//! `from_snapshot(snapshot) + apply(changes since)` is exactly the live state; an engine stores
//! a [`GroupSnapshot`] at creation and whenever it compacts, and the changes in between.
//! Leases are stored with their `until_ms`: after a restart they simply run out (members that
//! survived the restart can still ack what they hold, rather than having every lease revoked),
//! and every message not acked is delivered again — at-least-once. An acked message's entry is
//! gone and the cursor is past it, so it is never delivered again.
//!
//! Time is the caller's: leases compare `until_ms` with the `now_ms` given, so on a cluster
//! nodes' clocks should agree to well within a visibility timeout.
//!
//! # How an engine and the delivery layer use it
//!
//! One owner at a time operates on a group (a task or lock per group on one node; on a cluster
//! engine, a compare-and-set on the engine's own revision of the group's record):
//!
//! - create: [`GroupConfig::from_spec`] (a `400` on error), [`GroupState::new`] against the
//!   stream's state now, store [`GroupState::snapshot`]; update:
//!   [`GroupState::update_config`].
//! - receive: [`GroupState::want`] → `Engine::read(stream, want.after, want.limit)` →
//!   [`GroupState::receive`] with the read's `StreamState` and messages → store the outcome →
//!   if `read_again`, once more for the rest → read the payloads of redeliveries by offset →
//!   answer. Long-poll: with nothing delivered, wait for the stream's head watch or until
//!   [`GroupState::next_wakeup`], then receive again.
//! - ack / nack / extend / terminate: the receipts' texts as the client sent them, one
//!   [`ReceiptResult`] each; validate `Reason`s and durations first ([`OpError`] is a `400`).
//! - a timer at [`GroupState::next_wakeup`] runs [`GroupState::expire`] (dead letters and
//!   stats without waiting for a receive).
//! - stats: [`GroupState::stats`] with the stream's state (and the publish time of the message
//!   after the cursor, if at hand); metrics are the same numbers.
//! - load: [`GroupState::from_snapshot`], then [`GroupState::apply`] each stored change in
//!   order; compact by storing a new snapshot and dropping the changes before it.
//!
//! Deleting a group is the engine's (drop its records; a group created again has a new
//! [`GroupId`], so old receipts are `unknown`). Redrive is an engine read of the dead-letter
//! stream and a publish into the source stream: new messages, new offsets.

pub mod change;
pub mod config;
pub mod dead;
pub mod entry;
pub mod name;
pub mod receipt;
pub mod receive;
mod settle;
pub mod state;
pub mod stats;

pub use change::{Change, Outcome};
pub use config::{GroupConfig, GroupConfigError, GroupConfigSpec, Ordering};
pub use dead::{DeadLetter, InvalidReason, Reason};
pub use entry::{Entry, EntryState};
pub use name::{GroupName, InvalidName, MemberName};
pub use receipt::{GroupId, InvalidReceipt, LeaseId, Receipt, ReceiptResult};
pub use receive::{Delivery, OpError, ReceiveRequest, Received, Want};
pub use state::{Counters, GroupReset, GroupSnapshot, GroupState, MemberRecord, SnapshotError};
pub use stats::{GroupStats, MemberStats};

#[cfg(test)]
mod tests;
