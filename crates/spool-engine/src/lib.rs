//! The storage interfaces of Spool, and the in-memory engine.
//!
//! An [`Engine`] owns stream history: it appends messages and gives each its offset, reads a
//! range after an offset together with a consistent snapshot of the stream's bounds, enforces
//! retention, remembers idempotency keys, and tells watchers when a stream's head moves. What
//! the server keeps besides history has its own traits in [`store`]: [`SessionStore`] for
//! WebSocket sessions and [`GroupStore`] for consumer groups. The memory engine lives
//! here; the disk (`spool-disk`), Redis (`spool-redis`) and NATS JetStream (`spool-nats`)
//! engines implement the same traits, and the server never knows which one it talks to.
//!
//! Besides the traits, this crate holds the parts engines share: [`log`], [`dedup`] and
//! [`registry`] (the in-memory side of the memory and disk engines), [`sessions`] (session
//! records and their bound), [`cluster`] (the per-node state of the cluster engines) and the
//! conformance suite every engine runs (feature `conformance`).

pub mod cluster;
#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod dedup;
mod error;
#[cfg(any(test, feature = "conformance"))]
pub mod group_conformance;
pub mod groups;
pub mod log;
pub mod memory;
pub mod registry;
pub mod sessions;
pub mod store;
pub mod timing;

use std::sync::Arc;

use async_trait::async_trait;
use spool_core::{Message, NewMessage, Offset, Position, Retention, StreamName, StreamState};
use tokio::sync::watch;

pub use error::{Cause, EngineError, Limit, StreamLimit};
pub use memory::MemoryEngine;
pub use sessions::SessionRecord;
pub use store::{
    Committed, GroupDurable, GroupStore, HasGroupStore, QueuedCommit, SessionStore, StoredGroup,
};
pub use store::{StreamAdmin, StreamSummary};

/// The result of appending one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub position: Position,
    /// True when an earlier publish with the same idempotency key already appended it; the
    /// position is the original one.
    pub duplicate: bool,
}

/// A range of a stream together with the snapshot of its bounds it was read under.
#[derive(Clone, Debug)]
pub struct ReadBatch {
    pub state: StreamState,
    /// Retained messages with offsets after the requested one, in order, at most `limit`.
    /// Empty when the message right after the requested offset is no longer retained: the
    /// caller sees that in `state` and resets.
    pub messages: Vec<Arc<Message>>,
}

/// How many streams an engine holds, for `/metrics` and `/readyz`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCounts {
    /// Streams something was published to.
    pub streams: u64,
    /// The most `streams` the engine will create (`--max-streams`), if it has a limit.
    pub limit: Option<u64>,
    /// Streams readers wait on that nothing was published to: held in memory only, while
    /// watched (and briefly after).
    pub unpublished: u64,
    /// Stream creations refused at `limit` since the engine started.
    pub refused: u64,
}

/// A stream's head, sent to watchers whenever it moves or the epoch changes.
pub type HeadWatch = watch::Receiver<Position>;

/// One storage engine. All methods are safe to call concurrently; appends to one stream are
/// serialized by the engine, which is what makes offsets gap-free.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// A short name for logs and metrics (`memory`, `disk`, `redis`, `nats`).
    fn name(&self) -> &'static str;

    /// Appends `messages` to `stream` in order, creating the stream if needed, and returns
    /// only once they are as durable as the engine is configured to make them.
    async fn append(
        &self,
        stream: &StreamName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, EngineError>;

    /// Reads up to `limit` messages after `after`. An unknown stream reads as empty, at head 0
    /// of an epoch; reading never creates a stream: the epoch belongs to an in-memory
    /// placeholder that the first append adopts while a reader watches it (memory and disk:
    /// `registry.rs`; Redis and NATS: per node, in its `cluster::Heads`), and nothing is
    /// written.
    async fn read(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<ReadBatch, EngineError>;

    /// The stream's bounds, or `None` when nothing was ever published to it (as far as the
    /// engine knows: it may have been read or watched).
    async fn state(&self, stream: &StreamName) -> Result<Option<StreamState>, EngineError>;

    /// Whether something was published to the stream, i.e. whether an append would create it.
    /// The server asks this before spending a publisher's stream budget; it should be cheap.
    async fn exists(&self, stream: &StreamName) -> Result<bool, EngineError> {
        Ok(self.state(stream).await?.is_some())
    }

    /// How many streams the engine holds, if it counts them (the memory and disk engines do).
    fn stream_counts(&self) -> Option<StreamCounts> {
        None
    }

    /// A watch on the stream's head. Like [`Engine::read`], watching an unknown stream does not
    /// create it. Take the watch *before* reading, so that a publish landing between the read
    /// and the wait is never missed.
    async fn watch(&self, stream: &StreamName) -> Result<HeadWatch, EngineError>;

    /// The retention in force for a stream.
    fn retention(&self, stream: &StreamName) -> Retention;

    /// Enforces age-based retention on streams nobody is publishing to. Called periodically.
    async fn sweep(&self) -> Result<(), EngineError> {
        Ok(())
    }

    /// Whether the engine can serve requests right now (for `/readyz`).
    async fn ready(&self) -> Result<(), EngineError> {
        Ok(())
    }

    /// Listing, deleting and truncating streams ([`StreamAdmin`]), if the engine supports it.
    fn admin(&self) -> Option<&dyn StreamAdmin> {
        None
    }

    /// How transient messages (never stored) reach the subscribers on the other nodes of a
    /// cluster: the cluster engines' [`cluster::TransientLink`] over their notes channel.
    /// `None` (the default): there are no other nodes.
    fn transient(&self) -> Option<&cluster::TransientLink> {
        None
    }
}
