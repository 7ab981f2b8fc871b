//! Cross-node fan-out: how a publish on one Spool node wakes the subscribers on the others.
//!
//! After its acks, an append publishes a head note `(stream, epoch, head)` on the core-NATS
//! subject `<prefix>.heads`; every node listens there and moves its [`Heads`] watch, and its
//! subscribers then read the new messages from JetStream (or the tail cache). A note is only a
//! wake-up — core NATS may drop it (a node dies between its ack and its note, a connection
//! blips) — so each node also re-reads the state of every watched stream after each reconnect
//! and every few seconds. A lost note thus delays a live message by at most that period;
//! it never loses one, since subscribers read from the durable stream.
//!
//! [`Heads`]: spool_engine::cluster::Heads

use std::{sync::Arc, time::Duration};

use async_nats::Subscriber;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use spool_core::{Epoch, Offset, Position, StreamName};

use crate::engine::Inner;

/// How often every watched stream's state is re-read, as a safety net for lost notes.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// How many of those re-reads run at once.
const REFRESH_CONCURRENCY: usize = 16;

/// A head note, as JSON: `{"s": stream, "e": epoch, "h": head}`.
#[derive(Serialize, Deserialize)]
struct Note {
    s: String,
    e: String,
    h: u64,
}

pub(crate) fn note(stream: &StreamName, head: &Position) -> Option<Bytes> {
    serde_json::to_vec(&Note {
        s: stream.as_str().to_owned(),
        e: head.epoch.as_str().to_owned(),
        h: head.offset.get(),
    })
    .ok()
    .map(Bytes::from)
}

fn parse(payload: &[u8]) -> Option<(StreamName, Position)> {
    let note: Note = serde_json::from_slice(payload).ok()?;
    let stream = StreamName::new(&note.s).ok()?;
    let epoch = Epoch::parse(&note.e).ok()?;
    Some((stream, Position::new(epoch, Offset(note.h))))
}

/// Moves heads as notes arrive, until the subscription ends (the client closed).
pub(crate) async fn listen(inner: Arc<Inner>, mut notes: Subscriber) {
    while let Some(message) = notes.next().await {
        match parse(&message.payload) {
            Some((stream, head)) => inner.heard(&stream, head),
            None => tracing::debug!(subject = %message.subject, "ignoring a malformed head note"),
        }
    }
}

/// Re-reads every watched stream after each reconnect and every [`REFRESH_EVERY`].
pub(crate) async fn refresh(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = inner.reconnected.notified() => {}
        }
        if !inner.connected() {
            continue;
        }
        futures::stream::iter(inner.heads.watched())
            .for_each_concurrent(REFRESH_CONCURRENCY, |stream| {
                let inner = &inner;
                async move {
                    // Creating nothing: a watched stream JetStream lost moves its watchers
                    // to a placeholder, so they are told.
                    if let Err(e) = inner.state_or_placeholder(&stream).await {
                        tracing::debug!(%stream, error = %e, "cannot refresh a watched stream");
                    }
                }
            })
            .await;
    }
}
