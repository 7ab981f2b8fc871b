//! What every cluster engine (Redis, NATS JetStream) does on each node, whatever its backend:
//!
//! - [`ClusterNode`] (`node.rs`): the node's watches, cache and the rules over them — a first
//!   watch reads again, a (re)subscription to notes resyncs, reads go through the cache's gate —
//!   over a [`Store`], the backend's reads, which is all an engine supplies;
//! - [`Heads`] (`heads.rs`): the head watches of the streams this node's subscribers follow,
//!   moved by notes and reads;
//! - [`TailCache`] (`tail.rs`): the newest messages of watched streams, one store read per
//!   publish per node instead of one per subscriber;
//! - [`HeadNote`] (`note.rs`): the one wire format of the notes nodes send each other after an
//!   append, `<epoch> <head> <stream>`;
//! - [`TransientLink`] (`transient.rs`): transient notes (`~<origin> <stream> <payload>`) on the
//!   same channel, for messages that reach live subscribers on every node without being stored.
//!
//! All of it is bounded: `Heads` holds only streams with a live watcher after a prune, and the
//! cache a fixed number of messages and bytes per stream for at most those streams.

mod heads;
mod node;
mod note;
mod tail;
mod transient;

pub use heads::Heads;
pub use node::{ClusterNode, Store, truncate_note};
pub use note::HeadNote;
pub use tail::{TailCache, TailLimits};
pub use transient::{TRANSIENT_PREFIX, TransientCounts, TransientLink, TransientNote};
