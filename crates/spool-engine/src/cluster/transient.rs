//! Transient notes: messages for the live subscribers of a stream on every node of a cluster,
//! never stored (no offset, no history) — AnyCable's `whisper`. They travel on the channel the
//! head notes use (Redis `<prefix>:heads`, NATS `<prefix>.heads`), in a format of their own:
//!
//! ```text
//! ~<origin> <stream> <payload>
//! ```
//!
//! `~` first (no epoch starts with it, so a node that only knows [`HeadNote`]s ignores these),
//! the sending node's id in 16 hex digits, the stream name (no whitespace), one space, then the
//! payload's bytes as they are. A node ignores its own notes (pub/sub echoes them).
//!
//! [`TransientLink`] is a node's end: bounded queues both ways, and what does not fit is
//! dropped and counted, never queued — a transient message is worth sending only now.
//!
//! [`HeadNote`]: super::HeadNote

use std::{
    hash::{BuildHasher, Hasher},
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use spool_core::StreamName;
use tokio::sync::mpsc;

/// The first byte of a transient note.
pub const TRANSIENT_PREFIX: u8 = b'~';
/// Notes waiting to be sent to the other nodes; more are dropped.
const OUTGOING: usize = 1024;
/// Notes from other nodes waiting to be delivered on this one; more are dropped.
const INCOMING: usize = 1024;

/// A transient message for the subscribers of `stream` on the other nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransientNote {
    /// The node that sent it.
    pub origin: u64,
    pub stream: StreamName,
    pub payload: Bytes,
}

impl TransientNote {
    /// The note's wire form, `~<origin> <stream> <payload>`.
    pub fn encode(&self) -> Bytes {
        let stream = self.stream.as_str();
        let mut out = BytesMut::with_capacity(19 + stream.len() + self.payload.len());
        out.put_u8(TRANSIENT_PREFIX);
        out.put_slice(format!("{:016x} ", self.origin).as_bytes());
        out.put_slice(stream.as_bytes());
        out.put_u8(b' ');
        out.put_slice(&self.payload);
        out.freeze()
    }

    /// A note from its wire form; `None` for anything else.
    pub fn decode(wire: &[u8]) -> Option<Self> {
        let rest = wire.strip_prefix(&[TRANSIENT_PREFIX])?;
        let origin = rest.get(..16)?;
        if rest.get(16) != Some(&b' ') || !origin.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let origin = u64::from_str_radix(std::str::from_utf8(origin).ok()?, 16).ok()?;
        let rest = &rest[17..];
        let end = rest.iter().position(|b| *b == b' ')?;
        let stream = StreamName::new(std::str::from_utf8(&rest[..end]).ok()?).ok()?;
        Some(Self {
            origin,
            stream,
            payload: Bytes::copy_from_slice(&rest[end + 1..]),
        })
    }
}

/// One node's end of the transient notes: what it sends goes to the engine's sender task
/// ([`TransientLink::next_outgoing`]), what other nodes sent comes in through
/// [`TransientLink::heard`] and out to the server ([`TransientLink::take_incoming`]).
pub struct TransientLink {
    origin: u64,
    out_tx: mpsc::Sender<Bytes>,
    out_rx: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    in_tx: mpsc::Sender<TransientNote>,
    in_rx: Mutex<Option<mpsc::Receiver<TransientNote>>>,
    sent: AtomicU64,
    dropped_out: AtomicU64,
    received: AtomicU64,
    dropped_in: AtomicU64,
}

/// What a [`TransientLink`] counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransientCounts {
    /// Notes handed to the sender task.
    pub sent: u64,
    /// Notes not sent: the outgoing queue was full.
    pub dropped_out: u64,
    /// Notes from other nodes handed to the server.
    pub received: u64,
    /// Notes from other nodes dropped: the server did not take them fast enough (or did not
    /// take them at all).
    pub dropped_in: u64,
}

impl Default for TransientLink {
    fn default() -> Self {
        let (out_tx, out_rx) = mpsc::channel(OUTGOING);
        let (in_tx, in_rx) = mpsc::channel(INCOMING);
        // A random id per node (the hasher's keys are random per process).
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        Self {
            origin: h.finish(),
            out_tx,
            out_rx: tokio::sync::Mutex::new(out_rx),
            in_tx,
            in_rx: Mutex::new(Some(in_rx)),
            sent: AtomicU64::new(0),
            dropped_out: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped_in: AtomicU64::new(0),
        }
    }
}

impl TransientLink {
    /// This node's id in its notes.
    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// Queues `payload` for the subscribers of `stream` on the other nodes; false when the
    /// queue is full (the note is dropped and counted).
    pub fn send(&self, stream: &StreamName, payload: Bytes) -> bool {
        let note = TransientNote {
            origin: self.origin,
            stream: stream.clone(),
            payload,
        };
        match self.out_tx.try_send(note.encode()) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.dropped_out.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// The next note to publish, for the engine's sender task (one task at a time).
    pub async fn next_outgoing(&self) -> Option<Bytes> {
        self.out_rx.lock().await.recv().await
    }

    /// Takes in something heard on the notes channel: true when it is a transient note (the
    /// caller is done with it; this node's own and malformed ones are ignored), false when it
    /// is not one (a head note, say).
    pub fn heard(&self, wire: &[u8]) -> bool {
        if wire.first() != Some(&TRANSIENT_PREFIX) {
            return false;
        }
        match TransientNote::decode(wire) {
            Some(note) if note.origin != self.origin => match self.in_tx.try_send(note) {
                Ok(()) => {
                    self.received.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    self.dropped_in.fetch_add(1, Ordering::Relaxed);
                }
            },
            Some(_) => {}
            None => tracing::debug!("ignored a malformed transient note"),
        }
        true
    }

    /// The notes other nodes sent, for the server to deliver (once: later calls get `None`).
    pub fn take_incoming(&self) -> Option<mpsc::Receiver<TransientNote>> {
        self.in_rx.lock().take()
    }

    pub fn counts(&self) -> TransientCounts {
        TransientCounts {
            sent: self.sent.load(Ordering::Relaxed),
            dropped_out: self.dropped_out.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            dropped_in: self.dropped_in.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::HeadNote;

    #[test]
    fn notes_round_trip_and_are_not_head_notes() {
        let note = TransientNote {
            origin: 0xdead_beef,
            stream: StreamName::new("chat/1").unwrap(),
            payload: Bytes::from_static(b"{\"event\":\"typing\", \"x\": 1}"),
        };
        let wire = note.encode();
        assert_eq!(
            wire,
            "~00000000deadbeef chat/1 {\"event\":\"typing\", \"x\": 1}"
        );
        assert_eq!(TransientNote::decode(&wire), Some(note.clone()));
        assert!(HeadNote::decode(&wire).is_none());
        let empty = TransientNote {
            payload: Bytes::new(),
            ..note
        };
        assert_eq!(TransientNote::decode(&empty.encode()), Some(empty));
        for bad in [
            &b""[..],
            b"~",
            b"~00000000deadbeef",
            b"~00000000deadbeef chat/1",
            b"~0000000xdeadbeef chat/1 x",
            b"~00000000deadbeefchat/1 x",
            b"~00000000deadbeef bad\x01name x",
            b"abc 1 chat/1",
        ] {
            assert!(
                TransientNote::decode(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn links_drop_their_own_notes_and_bound_both_queues() {
        let a = TransientLink::default();
        let b = TransientLink::default();
        assert_ne!(a.origin(), b.origin());
        let stream = StreamName::new("s").unwrap();
        assert!(a.send(&stream, Bytes::from_static(b"hi")));
        let wire = a.next_outgoing().await.unwrap();
        // Echoed back to the sender: ignored; heard by another node: delivered.
        assert!(a.heard(&wire));
        assert!(b.heard(&wire));
        assert!(!b.heard(b"abc 1 s"), "a head note is not for the link");
        let mut incoming = b.take_incoming().unwrap();
        assert!(b.take_incoming().is_none());
        assert_eq!(incoming.recv().await.unwrap().payload, "hi");
        assert!(a.take_incoming().unwrap().try_recv().is_err());

        // Full queues drop, and count what they drop.
        for _ in 0..OUTGOING + 10 {
            a.send(&stream, Bytes::from_static(b"x"));
        }
        for _ in 0..INCOMING + 5 {
            b.heard(&wire);
        }
        let (ca, cb) = (a.counts(), b.counts());
        assert_eq!((ca.sent, ca.dropped_out), (OUTGOING as u64 + 1, 10));
        assert_eq!((cb.received, cb.dropped_in), (INCOMING as u64 + 1, 5));
    }
}
