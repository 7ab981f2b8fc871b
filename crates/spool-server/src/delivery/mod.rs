//! The delivery layer: what every transport (HTTP, SSE, long-poll, WebSocket, and the ones to
//! come) does the same way, written once. Transports are thin adapters: they decode their wire
//! format into the types here, call in, and write the answers back in their own format. No
//! transport imports another.
//!
//! - [`publish`]: a message to append, its validation against the server's limits and the
//!   caller's rights, the stream-creation budget ([`budget`]), and the grouped append (one
//!   engine call per stream, all streams at once, one result per message in input order).
//! - [`encode`]: a delivered message's wire forms, encoded once and shared as bytes by every
//!   subscriber that receives it in the same form.
//!
//! - [`groups`]: consumer groups (SPEC §7) — the driver between the group state machine, the
//!   engine and the group store: receive with long-poll, settle, dead letters, redrive, the
//!   sweeper.
//! - [`transient`]: messages for the live subscribers of a stream on every node, never
//!   stored (AnyCable's `whisper`), bounded and dropped rather than queued.

pub mod budget;
pub mod encode;
pub mod groups;
pub mod publish;
pub mod session;
pub mod subscription;
pub mod transient;
