//! Transient delivery: messages for the live subscribers of a stream, on this node and on the
//! other nodes of a cluster, that are never stored — no offset, no history, no catch-up.
//! AnyCable's `whisper` is one (typing indicators, cursors); any transport can use it.
//!
//! [`Transients`] is the node's registry: which [`Listener`] (one per connection) listens to
//! which stream. [`Transients::publish`] hands a message to every local listener of the stream
//! but the sender, and to the engine's [`TransientLink`] for the other nodes; what other nodes
//! send comes back through [`Transients::run_remote`].
//!
//! Bounds: a listener's inbox holds at most `inbox` messages of at most `max_bytes` each; a
//! message that finds it full is dropped for that listener and counted (a transient message is
//! worth delivering only now, so a slow subscriber loses it rather than queueing it). The
//! streams a listener listens to are the subscriptions of its connection, which have their own
//! bound. The cluster link's queues are bounded the same way (drop and count).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::metrics::TransientMetrics;

use bytes::Bytes;
use parking_lot::RwLock;
use spool_core::StreamName;
use spool_engine::{Engine, cluster::TransientLink};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A transient message, as every local listener of its stream receives it.
#[derive(Debug)]
pub struct Transient {
    pub stream: StreamName,
    /// The message as the sender gave it (a protocol decides what it means).
    pub payload: Bytes,
}

/// The bounds of transient delivery.
#[derive(Clone, Copy, Debug)]
pub struct TransientLimits {
    /// Messages waiting in one listener's inbox; more are dropped.
    pub inbox: usize,
    /// Largest payload accepted.
    pub max_bytes: usize,
}

impl Default for TransientLimits {
    fn default() -> Self {
        Self {
            inbox: 32,
            max_bytes: 8 * 1024,
        }
    }
}

/// What transient delivery counted since the server started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransientStats {
    /// Messages published on this node.
    pub published: u64,
    /// Messages refused: larger than `max_bytes`.
    pub refused: u64,
    /// Messages put in a listener's inbox (one per listener).
    pub delivered: u64,
    /// Messages dropped for a listener whose inbox was full.
    pub dropped: u64,
}

/// Why a publish was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    TooLarge,
}

type Inbox = mpsc::Sender<Arc<Transient>>;

/// The node's listeners per stream.
pub struct Transients {
    streams: RwLock<HashMap<StreamName, Vec<(u64, Inbox)>>>,
    next: AtomicU64,
    limits: TransientLimits,
    engine: Arc<dyn Engine>,
    counts: TransientMetrics,
}

impl Transients {
    /// The node's registry; it counts in `counts` (the server's `/metrics` counters).
    pub fn new(
        engine: Arc<dyn Engine>,
        limits: TransientLimits,
        counts: TransientMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            streams: RwLock::default(),
            next: AtomicU64::new(1),
            limits: TransientLimits {
                inbox: limits.inbox.max(1),
                ..limits
            },
            engine,
            counts,
        })
    }

    pub fn limits(&self) -> TransientLimits {
        self.limits
    }

    /// A new listener (for one connection) and its inbox.
    pub fn listener(self: &Arc<Self>) -> (Listener, mpsc::Receiver<Arc<Transient>>) {
        let (tx, rx) = mpsc::channel(self.limits.inbox);
        let listener = Listener {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            hub: self.clone(),
            inbox: tx,
            streams: HashSet::new(),
        };
        (listener, rx)
    }

    /// Sends `payload` to the live listeners of `stream`: every local one but `from`, and
    /// those of the other nodes through the engine.
    pub fn publish(
        &self,
        stream: &StreamName,
        payload: Bytes,
        from: Option<u64>,
    ) -> Result<(), Refused> {
        if payload.len() > self.limits.max_bytes {
            self.counts.refused.inc();
            return Err(Refused::TooLarge);
        }
        self.counts.published.inc();
        if let Some(link) = self.engine.transient() {
            link.send(stream, payload.clone());
        }
        self.deliver(
            Arc::new(Transient {
                stream: stream.clone(),
                payload,
            }),
            from,
        );
        Ok(())
    }

    fn deliver(&self, message: Arc<Transient>, from: Option<u64>) {
        let streams = self.streams.read();
        let Some(listeners) = streams.get(&message.stream) else {
            return;
        };
        let (mut delivered, mut dropped) = (0, 0);
        for (id, inbox) in listeners {
            if Some(*id) == from {
                continue;
            }
            match inbox.try_send(message.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                // The connection is ending; its listener leaves in a moment.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        self.counts.delivered.inc_by(delivered);
        self.counts.dropped.inc_by(dropped);
    }

    /// Delivers what the other nodes send, until `shutdown`. Returns at once for an engine
    /// without other nodes.
    pub async fn run_remote(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(mut incoming) = self
            .engine
            .transient()
            .and_then(TransientLink::take_incoming)
        else {
            return;
        };
        loop {
            let note = tokio::select! {
                _ = shutdown.cancelled() => return,
                note = incoming.recv() => note,
            };
            let Some(note) = note else { return };
            if note.payload.len() > self.limits.max_bytes {
                self.counts.refused.inc();
                continue;
            }
            self.deliver(
                Arc::new(Transient {
                    stream: note.stream,
                    payload: note.payload,
                }),
                None,
            );
        }
    }

    pub fn stats(&self) -> TransientStats {
        TransientStats {
            published: self.counts.published.get(),
            refused: self.counts.refused.get(),
            delivered: self.counts.delivered.get(),
            dropped: self.counts.dropped.get(),
        }
    }

    /// Streams with at least one local listener.
    pub fn streams(&self) -> usize {
        self.streams.read().len()
    }
}

/// One connection's place in [`Transients`]: the streams it listens to, left when it is
/// dropped.
pub struct Listener {
    id: u64,
    hub: Arc<Transients>,
    inbox: Inbox,
    streams: HashSet<StreamName>,
}

impl Listener {
    /// This listener's id: what [`Transients::publish`] excludes as the sender.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Receives the transient messages of `stream` from now on.
    pub fn join(&mut self, stream: &StreamName) {
        if !self.streams.insert(stream.clone()) {
            return;
        }
        self.hub
            .streams
            .write()
            .entry(stream.clone())
            .or_default()
            .push((self.id, self.inbox.clone()));
    }

    /// Stops receiving `stream`'s transient messages.
    pub fn leave(&mut self, stream: &StreamName) {
        if self.streams.remove(stream) {
            remove(&self.hub, self.id, stream);
        }
    }

    /// Whether this listener receives `stream`'s transient messages.
    pub fn listens(&self, stream: &StreamName) -> bool {
        self.streams.contains(stream)
    }

    /// Publishes to `stream`'s other listeners (this one excluded).
    pub fn publish(&self, stream: &StreamName, payload: Bytes) -> Result<(), Refused> {
        self.hub.publish(stream, payload, Some(self.id))
    }
}

fn remove(hub: &Transients, id: u64, stream: &StreamName) {
    let mut streams = hub.streams.write();
    if let Some(listeners) = streams.get_mut(stream) {
        listeners.retain(|(i, _)| *i != id);
        if listeners.is_empty() {
            streams.remove(stream);
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        for stream in self.streams.drain() {
            remove(&self.hub, self.id, &stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use spool_engine::MemoryEngine;

    use super::*;

    fn hub(inbox: usize) -> Arc<Transients> {
        Transients::new(
            Arc::new(MemoryEngine::new(Default::default())),
            TransientLimits {
                inbox,
                max_bytes: 16,
            },
            TransientMetrics::default(),
        )
    }

    fn name(s: &str) -> StreamName {
        StreamName::new(s).unwrap()
    }

    #[tokio::test]
    async fn delivers_to_the_stream_listeners_but_the_sender_and_drops_when_full() {
        let hub = hub(2);
        let (mut a, mut a_rx) = hub.listener();
        let (mut b, mut b_rx) = hub.listener();
        let (mut c, mut c_rx) = hub.listener();
        a.join(&name("s"));
        b.join(&name("s"));
        c.join(&name("other"));
        a.publish(&name("s"), Bytes::from_static(b"1")).unwrap();
        assert_eq!(b_rx.recv().await.unwrap().payload, "1");
        assert!(a_rx.try_recv().is_err(), "the sender is excluded");
        assert!(c_rx.try_recv().is_err(), "another stream");
        // b reads nothing: two fit, the rest are dropped and counted.
        for i in 0..5u8 {
            a.publish(&name("s"), Bytes::from(vec![b'0' + i])).unwrap();
        }
        assert_eq!(b_rx.recv().await.unwrap().payload, "0");
        assert_eq!(b_rx.recv().await.unwrap().payload, "1");
        assert!(b_rx.try_recv().is_err());
        let stats = hub.stats();
        assert_eq!((stats.published, stats.delivered, stats.dropped), (6, 3, 3));
        assert_eq!(
            a.publish(&name("s"), Bytes::from(vec![0; 17])),
            Err(Refused::TooLarge)
        );
        assert_eq!(hub.stats().refused, 1);

        b.leave(&name("s"));
        c.publish(&name("s"), Bytes::from_static(b"x")).unwrap();
        assert_eq!(a_rx.recv().await.unwrap().payload, "x");
        assert!(b_rx.try_recv().is_err(), "left");
        drop(a);
        assert_eq!(hub.streams(), 1, "only c's stream is left");
        drop(c);
        assert_eq!(hub.streams(), 0);
        drop(b);
    }
}
