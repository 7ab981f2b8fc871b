//! The head note: what a cluster node publishes after an append so that every other node moves
//! its [`Heads`](super::Heads) watch of the stream. One format for every cluster engine:
//!
//! ```text
//! <epoch> <head> <stream>
//! ```
//!
//! one line of UTF-8 text, single spaces, no line end: the epoch as `Epoch` prints it, the
//! head offset in decimal, the stream name last (a stream name holds no whitespace, so the
//! fields cannot run into each other). Redis's append script writes it with `PUBLISH` on
//! `<prefix>:heads`; NATS nodes publish it on the core subject `<prefix>.heads`.
//!
//! A note is only a wake-up. Anything that does not decode is ignored by the receiver, which
//! then learns the head from its next read or resync (see [`ClusterNode`](super::ClusterNode)),
//! so a note of another format (a node of another version during a rolling upgrade) delays a
//! wake-up, never a delivery.

use bytes::Bytes;
use spool_core::{Epoch, Offset, Position, StreamName};

/// A stream's head, as one node tells the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadNote {
    pub stream: StreamName,
    pub head: Position,
}

impl HeadNote {
    pub fn new(stream: StreamName, head: Position) -> Self {
        Self { stream, head }
    }

    /// The note's wire form, `<epoch> <head> <stream>`.
    pub fn encode(&self) -> Bytes {
        Bytes::from(format!(
            "{} {} {}",
            self.head.epoch.as_str(),
            self.head.offset.get(),
            self.stream.as_str()
        ))
    }

    /// A note from its wire form; `None` for anything else (a receiver ignores those).
    pub fn decode(payload: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut parts = text.splitn(3, ' ');
        let epoch = Epoch::parse(parts.next()?).ok()?;
        let head = parts.next()?;
        // `u64::from_str` takes a leading `+`; the format has digits only.
        if !head.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let head = head.parse().ok()?;
        let stream = StreamName::new(parts.next()?).ok()?;
        Some(Self::new(stream, Position::new(epoch, Offset(head))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_parse_defensively() {
        let note = HeadNote::decode(b"abc 42 chat:room/1").unwrap();
        assert_eq!(note.stream.as_str(), "chat:room/1");
        assert_eq!(note.head.to_string(), "abc:42");
        assert_eq!(note.encode(), "abc 42 chat:room/1");
        let fresh = HeadNote::new(
            StreamName::new("a/b").unwrap(),
            Position::new(Epoch::generate(), Offset(u64::MAX)),
        );
        assert_eq!(HeadNote::decode(&fresh.encode()), Some(fresh));
        for bad in [
            &b""[..],
            b"abc",
            b"abc 42",
            b"abc x s",
            b"a:b 1 s",
            b"abc -1 s",
            b"abc +1 s",
            b"abc 1 two words",
            b"abc 18446744073709551616 s",
            b"\xff 1 s",
            // The JSON notes NATS nodes sent before this format.
            br#"{"s":"a","e":"abc","h":1}"#,
        ] {
            assert!(
                HeadNote::decode(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
