//! The stores the server keeps beside the log: state that is not stream history.
//!
//! [`Engine`](crate::Engine) is the log (append, read, watch, retention). What else the server
//! persists has its own trait here, so that it can be kept apart from the log, tested on its
//! own through the conformance suite, and given to the server separately (`spool_server::serve`
//! takes an `Arc<dyn Engine>` and an `Arc<dyn SessionStore>`):
//!
//! - [`SessionStore`]: WebSocket session records (SPEC §3), opaque bytes under an id until
//!   they expire. The records themselves and their bound are in [`crate::sessions`].
//! - `GroupStore` (consumer groups, not written yet) will sit here beside it: the groups'
//!   members, leases and committed positions, one more trait every engine implements from its
//!   own storage and the server holds as one more `Arc<dyn …>`.
//!
//! Every engine of this workspace implements its stores on the same struct as its log (one
//! connection, one file set, one `--max-sessions`), so `spool serve` hands the same engine to
//! the server once per trait. Nothing requires that: a store may live anywhere.

use async_trait::async_trait;
use bytes::Bytes;

use crate::{EngineError, SessionRecord};

/// Where WebSocket sessions are kept between connections. All methods are safe to call
/// concurrently. Errors are an engine's: `Unavailable` while the backing store cannot be
/// reached (the server retries a failed save), `Limit` when a record cannot be kept
/// (`--max-sessions`: [`crate::sessions::refused`]; the server does not retry those).
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Saves session records (SPEC §3), replacing any with the same id. The server batches
    /// these: one call carries every session that changed since the last one. An engine that
    /// bounds its sessions (`--max-sessions`) saves, at the bound, every session it already
    /// holds and refuses only the new ones, answering `Limit`.
    async fn save_sessions(&self, sessions: Vec<SessionRecord>) -> Result<(), EngineError>;

    /// A session record, unless it is unknown or expired.
    async fn load_session(&self, id: &str) -> Result<Option<Bytes>, EngineError>;

    /// Forgets a session.
    async fn delete_session(&self, id: &str) -> Result<(), EngineError>;
}
