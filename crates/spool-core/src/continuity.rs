//! The continuity rule (SPEC §2), in one pure function.
//!
//! A reader says where it wants to start ([`Start`]); the engine gives a consistent snapshot
//! of the stream ([`StreamState`]); [`decide`] answers either "deliver everything after offset
//! n" or "reset: here is why, and here is the head to continue from". Every transport — SSE,
//! long-poll, WebSocket, the CLI — and every re-check during a live subscription goes through
//! this function, so "no silent gap" is decided in exactly one place.

use std::{fmt, str::FromStr};

use crate::position::{Epoch, InvalidPosition, Offset, Position};

/// Where a reader asks to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// After a position the reader has processed.
    After(Position),
    /// From the oldest message the stream still retains.
    Oldest,
    /// From the newest message only (current state), then live.
    Latest,
    /// From the head: only messages published from now on.
    Now,
}

/// The text form every transport and the CLI use: `EPOCH:OFFSET`, `oldest`, `latest` or
/// `now`. [`FromStr`] reads it back.
impl fmt::Display for Start {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Start::After(p) => fmt::Display::fmt(p, f),
            Start::Oldest => f.write_str("oldest"),
            Start::Latest => f.write_str("latest"),
            Start::Now => f.write_str("now"),
        }
    }
}

/// Reads `oldest`, `latest`, `now` or a position `EPOCH:OFFSET`; the error says what is wrong
/// with the text as a position (callers add that the keywords are accepted too).
impl FromStr for Start {
    type Err = InvalidPosition;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "oldest" => Ok(Start::Oldest),
            "latest" => Ok(Start::Latest),
            "now" => Ok(Start::Now),
            _ => s.parse().map(Start::After),
        }
    }
}

/// A consistent snapshot of a stream's bounds, taken by an engine in one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamState {
    pub epoch: Epoch,
    /// The offset of the newest message (0 when the epoch has no message yet).
    pub head: Offset,
    /// The offset of the oldest retained message; `head + 1` when nothing is retained.
    pub oldest: Offset,
}

impl StreamState {
    /// A fresh stream with no messages.
    pub fn empty(epoch: Epoch) -> Self {
        Self {
            epoch,
            head: Offset::ZERO,
            oldest: Offset(1),
        }
    }

    pub fn head_position(&self) -> Position {
        Position::new(self.epoch.clone(), self.head)
    }

    /// Whether every message after `offset` is still retained.
    pub fn retains_after(&self, offset: Offset) -> bool {
        offset.0.saturating_add(1) >= self.oldest.0
    }
}

/// Why a reader cannot continue from where it asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResetReason {
    /// The stream's history is not the one the position was taken from: the epoch differs, or
    /// the position lies beyond the head of its epoch (the histories diverged).
    EpochChanged,
    /// Messages after the position have already been removed by retention.
    HistoryExpired,
    /// The server has no history at all for the stream (e.g. it never existed here, or a
    /// non-durable engine restarted).
    UnknownStream,
}

impl ResetReason {
    pub const ALL: [ResetReason; 3] = [
        ResetReason::EpochChanged,
        ResetReason::HistoryExpired,
        ResetReason::UnknownStream,
    ];

    /// The stable wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::EpochChanged => "epoch_changed",
            ResetReason::HistoryExpired => "history_expired",
            ResetReason::UnknownStream => "unknown_stream",
        }
    }
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Deliver every message after this offset, in order, then continue live.
    Deliver { after: Offset },
    /// Tell the reader it lost continuity, then continue live from `head`.
    Reset { reason: ResetReason, head: Position },
}

/// Applies the continuity rule to a start request and a snapshot of the stream.
pub fn decide(start: &Start, state: &StreamState) -> Decision {
    let deliver = |after: Offset| Decision::Deliver { after };
    let reset = |reason| Decision::Reset {
        reason,
        head: state.head_position(),
    };
    match start {
        Start::Now => deliver(state.head),
        Start::Oldest => deliver(Offset(state.oldest.0.saturating_sub(1))),
        Start::Latest => deliver(Offset(
            state
                .head
                .0
                .saturating_sub(1)
                .max(state.oldest.0.saturating_sub(1)),
        )),
        Start::After(pos) if pos.epoch != state.epoch => {
            if state.head == Offset::ZERO {
                reset(ResetReason::UnknownStream)
            } else {
                reset(ResetReason::EpochChanged)
            }
        }
        // Same epoch, but the reader claims messages the stream never had: its history and
        // ours diverged, which is what an epoch change means.
        Start::After(pos) if pos.offset > state.head => reset(ResetReason::EpochChanged),
        Start::After(pos) if !state.retains_after(pos.offset) => reset(ResetReason::HistoryExpired),
        Start::After(pos) => deliver(pos.offset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_text_round_trips() {
        for text in [
            "oldest",
            "latest",
            "now",
            "e1:0",
            "e1:42",
            "aB9-_x:18446744073709551615",
        ] {
            let start: Start = text.parse().unwrap();
            assert_eq!(start.to_string(), text);
        }
        assert_eq!("oldest".parse::<Start>().unwrap(), Start::Oldest);
        assert_eq!("latest".parse::<Start>().unwrap(), Start::Latest);
        assert_eq!("now".parse::<Start>().unwrap(), Start::Now);
        assert_eq!(
            "e1:7".parse::<Start>().unwrap(),
            Start::After(Position::new(Epoch::parse("e1").unwrap(), Offset(7)))
        );
    }

    #[test]
    fn bad_start_text_is_a_position_error() {
        for bad in ["", "garbage", "Oldest", "NOW", "e1:", "e1:x", ":3", "e1:-1"] {
            let err = bad.parse::<Start>().unwrap_err();
            assert_eq!(Some(err), bad.parse::<Position>().err(), "{bad:?}");
        }
    }

    fn state(head: u64, oldest: u64) -> StreamState {
        StreamState {
            epoch: Epoch::parse("e1").unwrap(),
            head: Offset(head),
            oldest: Offset(oldest),
        }
    }

    fn after(epoch: &str, offset: u64) -> Start {
        Start::After(Position::new(Epoch::parse(epoch).unwrap(), Offset(offset)))
    }

    #[test]
    fn every_kind_of_position() {
        let s = state(10, 5);
        let head = s.head_position();
        assert_eq!(
            decide(&after("e1", 7), &s),
            Decision::Deliver { after: Offset(7) }
        );
        assert_eq!(
            decide(&after("e1", 4), &s),
            Decision::Deliver { after: Offset(4) }
        );
        assert_eq!(
            decide(&after("e1", 10), &s),
            Decision::Deliver { after: Offset(10) }
        );
        assert_eq!(
            decide(&after("e1", 3), &s),
            Decision::Reset {
                reason: ResetReason::HistoryExpired,
                head: head.clone()
            }
        );
        assert_eq!(
            decide(&after("e1", 11), &s),
            Decision::Reset {
                reason: ResetReason::EpochChanged,
                head: head.clone()
            }
        );
        assert_eq!(
            decide(&after("old", 7), &s),
            Decision::Reset {
                reason: ResetReason::EpochChanged,
                head
            }
        );
        assert_eq!(
            decide(&Start::Oldest, &s),
            Decision::Deliver { after: Offset(4) }
        );
        assert_eq!(
            decide(&Start::Now, &s),
            Decision::Deliver { after: Offset(10) }
        );
        assert_eq!(
            decide(&Start::Latest, &s),
            Decision::Deliver { after: Offset(9) }
        );
    }

    #[test]
    fn empty_streams() {
        let fresh = state(0, 1);
        assert_eq!(
            decide(&after("e1", 0), &fresh),
            Decision::Deliver { after: Offset(0) }
        );
        assert_eq!(
            decide(&Start::Oldest, &fresh),
            Decision::Deliver { after: Offset(0) }
        );
        assert_eq!(
            decide(&Start::Latest, &fresh),
            Decision::Deliver { after: Offset(0) }
        );
        assert!(matches!(
            decide(&after("gone", 12), &fresh),
            Decision::Reset {
                reason: ResetReason::UnknownStream,
                ..
            }
        ));
        // Everything expired: the head is kept, nothing is retained.
        let drained = state(10, 11);
        assert_eq!(
            decide(&after("e1", 10), &drained),
            Decision::Deliver { after: Offset(10) }
        );
        assert!(matches!(
            decide(&after("e1", 9), &drained),
            Decision::Reset {
                reason: ResetReason::HistoryExpired,
                ..
            }
        ));
        assert_eq!(
            decide(&Start::Latest, &drained),
            Decision::Deliver { after: Offset(10) }
        );
    }
}
