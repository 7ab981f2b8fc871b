//! Cross-node fan-out: how a publish on one Spool node wakes the subscribers on the others.
//!
//! After its acks, an append publishes a head note on the core-NATS subject `<prefix>.heads`,
//! in the format every cluster engine uses ([`HeadNote`]: `<epoch> <head> <stream>`); every
//! node listens there and moves its [`Heads`] watch, and its subscribers then read the new
//! messages from JetStream (or the tail cache). A note is only a wake-up — core NATS may drop
//! it (a node dies between its ack and its note, a connection blips) — so each node re-reads
//! every watched stream once its subscription is back after a reconnect (the client puts its
//! subscriptions on the new connection before anything the re-reads send), as the Redis
//! engine does, and, since a
//! note is sent apart from the append it announces, every few seconds too. A lost note thus
//! delays a live message by at most that period; it never loses one, since subscribers read
//! from the durable stream.
//!
//! [`Heads`]: spool_engine::cluster::Heads

use std::{sync::Arc, time::Duration};

use async_nats::Subscriber;
use futures::StreamExt;
use serde::Deserialize;
use spool_core::{Epoch, Offset, Position, StreamName};
use spool_engine::cluster::HeadNote;

use crate::engine::Inner;

/// How often every watched stream's state is re-read, as a safety net for lost notes.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// A head note as nodes before the shared format sent it, JSON `{"s": stream, "e": epoch,
/// "h": head}`: still understood, so that during a rolling upgrade the old nodes' appends wake
/// the new nodes at once. (Old nodes ignore the new notes and catch up by their refresh.)
#[derive(Deserialize)]
struct LegacyNote {
    s: String,
    e: String,
    h: u64,
}

fn parse(payload: &[u8]) -> Option<HeadNote> {
    HeadNote::decode(payload).or_else(|| {
        let note: LegacyNote = serde_json::from_slice(payload).ok()?;
        let stream = StreamName::new(&note.s).ok()?;
        let epoch = Epoch::parse(&note.e).ok()?;
        Some(HeadNote::new(stream, Position::new(epoch, Offset(note.h))))
    })
}

/// Moves heads as notes arrive, until the subscription ends (the client closed).
pub(crate) async fn listen(inner: Arc<Inner>, mut notes: Subscriber) {
    while let Some(message) = notes.next().await {
        // Transient notes share the subject (`spool_engine::cluster::TransientLink`).
        if inner.node.transient().heard(&message.payload) {
            continue;
        }
        // So do the stream-admin notes (a truncate: drop the cached tail).
        if inner.node.heard_admin(&message.payload) {
            continue;
        }
        match parse(&message.payload) {
            Some(note) => inner.heard(&note.stream, note.head),
            None => tracing::debug!(subject = %message.subject, "ignoring a malformed head note"),
        }
    }
}

/// Publishes this node's transient notes on the notes subject. A note that cannot be
/// published now (NATS away, the client's queue full) is dropped: it is worth sending only now.
pub(crate) async fn send_transient(inner: Arc<Inner>) {
    while let Some(note) = inner.node.transient().next_outgoing().await {
        if !inner.connected() {
            continue;
        }
        inner.publish_note(note).await;
    }
}

/// Resyncs the node after each reconnect (dropping its tail cache, as NATS may have come back
/// without its data) and every [`REFRESH_EVERY`].
pub(crate) async fn refresh(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reconnected = tokio::select! {
            _ = tick.tick() => false,
            _ = inner.reconnected.notified() => true,
        };
        if !inner.connected() {
            continue;
        }
        let store = &*inner;
        let resynced = if reconnected {
            inner.node.resubscribed(store).await
        } else {
            inner.node.resync(store).await
        };
        if let Err(e) = resynced {
            tracing::debug!(error = %e, "cannot re-read the watched streams; retrying later");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_of_the_shared_format_and_of_older_nodes_are_understood() {
        let epoch = Epoch::generate();
        let head = Position::new(epoch.clone(), Offset(7));
        let s = StreamName::new("a/b").unwrap();
        let note = HeadNote::new(s.clone(), head.clone());
        assert_eq!(parse(&note.encode()), Some(note.clone()));
        let legacy = format!(r#"{{"s":"a/b","e":"{}","h":7}}"#, epoch.as_str());
        assert_eq!(parse(legacy.as_bytes()), Some(note));
        for bad in [&br#"{"s":"a b","e":"x","h":1}"#[..], b"{}", b"x 1"] {
            assert!(parse(bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
