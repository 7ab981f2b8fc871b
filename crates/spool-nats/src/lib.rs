//! The NATS JetStream engine of Spool (SPEC §6): history in JetStream streams, sessions in a
//! JetStream KV bucket, live fan-out across Spool nodes over core NATS. Several Spool nodes
//! pointed at one NATS (with one [`NatsConfig::prefix`]) form a cluster: publish on any node,
//! subscribers on every node get the message, a client resumes on any node.
//!
//! # One JetStream stream per Spool stream
//!
//! Each Spool stream is its own JetStream stream (`<prefix>_<encoded name>`, one subject
//! `<prefix>.s.<encoded name>`; see `names`), so **a Spool offset is the JetStream
//! sequence**. JetStream assigns sequences one at a time per stream, so publishes from any
//! number of nodes get unique, gap-free offsets without any compare-and-set or retry, and a
//! read by offset is a get by sequence. The alternative, one shared JetStream stream with
//! Spool's own per-subject offsets kept by `Nats-Expected-Last-Subject-Sequence`, makes
//! concurrent publishers to one stream retry on every conflict and needs an index from offset
//! to sequence to read. The cost of our choice: JetStream holds one stream (with its own
//! state, and for R3 its own Raft group) per Spool stream. That is fine for thousands of
//! streams, not for millions; JetStream's account limits (`max_streams`) then answer
//! [`EngineError::Limit`](spool_engine::EngineError::Limit).
//!
//! A stream is created by its first append, with this node's retention as JetStream limits
//! (`max_msgs`, `max_bytes`, `max_age`, discarding the oldest). Creating is idempotent in
//! JetStream: a node that finds the stream made by another (in another epoch) takes it as it is,
//! which settles two nodes creating one stream at once. (JetStream counts a message's bytes with
//! its subject and headers, so `max_bytes` bites a little earlier than on the other engines.)
//!
//! # Reads create nothing
//!
//! A read, a watch or a state of a stream JetStream does not hold makes no JetStream stream
//! (one per name read would cost JetStream a stream, and for R3 a Raft group, for every name
//! any reader ever tried). It answers head 0 of a placeholder epoch the node keeps in memory
//! while someone watches the stream (and 30 s after, so a reader that comes back finds the
//! same epoch), capped by [`NatsConfig::max_unpublished_streams`]. This node's first append
//! makes the JetStream stream in that epoch, so its waiting readers get offset 1 with no reset;
//! a reader on another node follows the epoch the stream is made in from its start
//! (`subscription.rs` knows its position was a placeholder). Watchers of a stream JetStream
//! lost (deleted, or NATS came back without its data) move to a fresh placeholder when the node
//! next reads it or re-reads its watched streams, so they get a reset instead of waiting in
//! the lost history.
//!
//! # Epochs
//!
//! A stream's epoch is chosen by the node that makes it — its placeholder, or a fresh one — and
//! kept in the JetStream stream's description next to the Spool name (a stream made by an
//! earlier version of Spool has only the name there, and its epoch is its JetStream creation
//! time, in hex). The JetStream stream, with its last sequence, outlives the expiry of all
//! its messages, so an idle stream keeps its epoch and its offsets go on where they were. When
//! the stream is deleted, or the NATS server loses its data, the next append makes it again in
//! another epoch, offsets from 1 — and readers holding positions of the old history get a
//! reset, never a silent gap. A description is never changed once made (nodes of an earlier
//! version would refuse a stream described so: upgrade every node of a cluster together).

//! # Durability ([`NatsDurability`])
//!
//! - `Memory`: JetStream memory storage. An ack means the message is in the memory of the
//!   stream's replicas; restarting them loses it (and the stream: a new epoch).
//! - `Replicated`: JetStream file storage on [`NatsConfig::replicas`] servers. JetStream acks
//!   once a majority of the replicas (R1: the one server; R3: two of three) has written the
//!   message to its files. Written means handed to the operating system: JetStream 2.9 fsyncs
//!   on its own schedule (`sync_interval`, 2 minutes by default), not per message. So R1
//!   survives a NATS process crash but not a machine crash between syncs; R3 survives the loss
//!   of any one machine because two others hold every acked message. This is the `replicated`
//!   level of SPEC §4; for fsync-per-ack, the disk engine is the one to use.
//!
//! # Idempotency
//!
//! An idempotency key is the message's `Nats-Msg-Id`, so JetStream's own duplicate window
//! (the configured dedup window, at most the stream's `max_age`) drops a retry, and its ack
//! names the original sequence with `duplicate: true`. The record is kept by JetStream with
//! the stream, as durably as the messages. (After a NATS restart JetStream rebuilds the window
//! from the messages it still holds, so a key whose message retention already dropped is
//! forgotten then.)
//!
//! # Reads and fan-out
//!
//! A read takes the stream's info (the snapshot bounds), then gets the messages by sequence
//! from the leader, many requests in flight; one that vanished under it (retention) ends the
//! batch there, so a read never has a hole. Streams watched on this node are also served from
//! a [`TailCache`](spool_engine::cluster::TailCache), so one publish wakes thousands of local
//! subscribers for one JetStream read. After an append's acks a note on `<prefix>.heads`
//! wakes the other nodes' watchers (see `fanout`).
//!
//! # Outages
//!
//! The engine connects at start and fails clearly if NATS is not there. After that the client
//! reconnects for as long as the engine lives. Meanwhile every call answers
//! [`EngineError::Unavailable`](spool_engine::EngineError::Unavailable) within
//! [`NatsConfig::timeout`] and `ready()` fails; when NATS is back everything resumes, with the
//! same epochs if NATS kept its data and new ones if it did not. A publish whose ack timed out
//! may still have been stored (it was on its way when the connection dropped): the client's
//! retry with the same idempotency key is then answered as a duplicate at the original
//! position, which is exactly right; a retry without a key may store the message twice.
//!
//! [`NatsConfig::url`] may name several servers (comma-separated); the client connects to one
//! and moves to another when it goes away. When the server leading a replicated stream dies,
//! the stream takes no publishes until its other replicas elect a leader (seconds): a publish
//! then meets "no responders", which is not a lost stream — it is retried until the engine
//! timeout and then answers `Unavailable`; only JetStream's own "stream not found" makes the
//! stream again (a new epoch). Meanwhile other replicas may answer for the stream with a state
//! that lacks acked messages; the engine takes a stream's state only from its leader, and
//! treats a head behind one it already knew as not caught up yet (`Unavailable`) for a while,
//! so readers never get a reset for history that is safe.

//!
//! # Limits and caveats
//!
//! - NATS refuses a message (payload plus Spool's headers) over the server's `max_payload`,
//!   1 MiB by default; such an append answers `Limit`. Raise `max_payload` on the NATS
//!   servers above Spool's own payload limit plus a few KiB of headers.
//! - Head notes go to every node on one subject, whichever streams they watch; that is one
//!   small message per append per node, fine for a handful of nodes.
//! - Streams are created with JetStream 2.9 features only. Reads ask the leader
//!   (`STREAM.MSG.GET`), not replicas, so `allow_direct` is left off (see `jetstream`).
//! - The sessions bucket is a JetStream KV bucket made and used through the plain JetStream
//!   API (see `sessions`), so NATS tools (`nats kv`) can inspect it.
//! - Consumer groups live in one more JetStream stream, `<prefix>__groups`, a subject per
//!   group, every write version-checked with `Nats-Expected-Last-Subject-Sequence` (see
//!   `groups`). A request made while the client is disconnected is sent once it is back, so a
//!   group call answered `Unavailable` may still take effect then (a commit only at the
//!   version it named, so never against a state it did not see).

mod codec;
mod config;
mod engine;
mod fanout;
mod groups;
mod jetstream;
mod names;
mod sessions;

pub use config::{NatsConfig, NatsDurability};
pub use engine::NatsEngine;
