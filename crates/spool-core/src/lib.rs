//! Spool's model, free of I/O: what a stream is, how positions in it are named, how long it
//! keeps history, and the continuity rule that decides whether a reader can resume where it
//! left off or must be told plainly that it cannot.
//!
//! Every engine and every transport speaks in these types, so the guarantees of SPEC §1–§2 are
//! decided in one place ([`continuity`]) and proven once by property tests.

pub mod clock;
pub mod continuity;
pub mod group;
pub mod message;
pub mod name;
pub mod pattern;
pub mod position;
pub mod retention;

pub use clock::{Clock, ManualClock};
pub use continuity::{Decision, ResetReason, Start, StreamState};
pub use group::{
    GroupConfig, GroupConfigError, GroupName, GroupState, GroupStats, MemberName, Receipt,
    ReceiptResult,
};
pub use message::{Message, NewMessage};
pub use name::{InvalidStreamName, StreamName};
pub use pattern::Pattern;
pub use position::{Epoch, InvalidPosition, Offset, Position};
pub use retention::{Retention, RetentionPolicy, RetentionRule};

/// Milliseconds since the Unix epoch, the unit of every timestamp Spool stores or sends.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
