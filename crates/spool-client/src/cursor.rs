//! Where one subscription stands, and the dedup rule (SPEC §2).
//!
//! A [`Cursor`] holds the last position the client handed to the application for a stream:
//! a message, the end of a skipped range, a reset's head, or the position the server said a
//! subscription starts after. Delivery is at-least-once across reconnects; the cursor turns
//! it into exactly-once for the application by dropping any message at or before it in the
//! same epoch. On reconnect the cursor is what the client tells the server it processed.

use spool_core::{Epoch, Offset, Position, Start};

/// The last position of a stream the application has been given (or chose to start after).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Cursor(Option<Position>);

impl Cursor {
    /// A cursor for a new subscription: known only when it starts after a position.
    pub(crate) fn starting(start: &Start) -> Self {
        match start {
            Start::After(p) => Cursor(Some(p.clone())),
            _ => Cursor(None),
        }
    }

    pub(crate) fn position(&self) -> Option<&Position> {
        self.0.as_ref()
    }

    /// Whether a message at `(epoch, offset)` is new; if so the cursor moves to it.
    /// A message is a duplicate when its epoch is the cursor's and its offset is not past it.
    pub(crate) fn admit(&mut self, epoch: &Epoch, offset: Offset) -> bool {
        if is_duplicate(self.0.as_ref(), epoch, offset) {
            return false;
        }
        self.0 = Some(Position::new(epoch.clone(), offset));
        true
    }

    /// The server says delivery continues after `position` (`subscribed`, or a restored
    /// subscription). Within the cursor's epoch it only moves forward: a server that restarts
    /// delivery earlier replays what the application already has, and [`Cursor::admit`]
    /// drops it. A different epoch replaces the cursor (the server sends a reset for it).
    pub(crate) fn continue_after(&mut self, position: Position) {
        match &self.0 {
            Some(p) if p.epoch == position.epoch && p.offset >= position.offset => {}
            _ => self.0 = Some(position),
        }
    }

    /// Continuity was lost: delivery continues after `position`, whatever came before.
    pub(crate) fn reset(&mut self, position: Position) {
        self.0 = Some(position);
    }

    /// Offsets up to `through` were superseded on a conflated stream. Returns whether that
    /// moved the cursor (false for a range the application already got past).
    pub(crate) fn skip(&mut self, epoch: &Epoch, through: Offset) -> bool {
        if is_duplicate(self.0.as_ref(), epoch, through) {
            return false;
        }
        self.0 = Some(Position::new(epoch.clone(), through));
        true
    }

    /// The `after` of a `subscribe` frame that re-creates this subscription: the cursor if
    /// known, else what the application originally asked for.
    pub(crate) fn after(&self, start: &Start) -> String {
        match &self.0 {
            Some(p) => p.to_string(),
            None => start.to_string(),
        }
    }
}

/// The dedup rule: a message is a duplicate when its epoch equals the tracked epoch and its
/// offset is at or before the tracked offset. Another epoch is never a duplicate.
pub(crate) fn is_duplicate(tracked: Option<&Position>, epoch: &Epoch, offset: Offset) -> bool {
    tracked.is_some_and(|p| p.epoch == *epoch && offset <= p.offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(s: &str) -> Position {
        s.parse().unwrap()
    }

    fn epoch(s: &str) -> Epoch {
        Epoch::parse(s).unwrap()
    }

    #[test]
    fn dedup_drops_what_is_at_or_before_the_cursor_in_its_epoch() {
        let tracked = pos("e1:5");
        assert!(is_duplicate(Some(&tracked), &epoch("e1"), Offset(4)));
        assert!(is_duplicate(Some(&tracked), &epoch("e1"), Offset(5)));
        assert!(!is_duplicate(Some(&tracked), &epoch("e1"), Offset(6)));
        assert!(!is_duplicate(Some(&tracked), &epoch("e2"), Offset(1)));
        assert!(!is_duplicate(Some(&tracked), &epoch("e2"), Offset(5)));
        assert!(!is_duplicate(None, &epoch("e1"), Offset(1)));
    }

    #[test]
    fn admit_moves_the_cursor_and_drops_replays() {
        let mut c = Cursor::starting(&Start::Now);
        assert_eq!(c.position(), None);
        assert!(c.admit(&epoch("e1"), Offset(1)));
        assert!(c.admit(&epoch("e1"), Offset(2)));
        // A reconnect replays 1 and 2, then continues.
        assert!(!c.admit(&epoch("e1"), Offset(1)));
        assert!(!c.admit(&epoch("e1"), Offset(2)));
        assert!(c.admit(&epoch("e1"), Offset(3)));
        assert_eq!(c.position(), Some(&pos("e1:3")));
        // A new epoch is a new history.
        assert!(c.admit(&epoch("e2"), Offset(1)));
        assert_eq!(c.position(), Some(&pos("e2:1")));
    }

    #[test]
    fn a_subscription_after_a_position_starts_there() {
        let mut c = Cursor::starting(&Start::After(pos("e1:7")));
        assert_eq!(c.position(), Some(&pos("e1:7")));
        assert!(!c.admit(&epoch("e1"), Offset(7)));
        assert!(c.admit(&epoch("e1"), Offset(8)));
    }

    #[test]
    fn continue_after_only_moves_forward_within_an_epoch() {
        let mut c = Cursor::default();
        c.continue_after(pos("e1:3"));
        assert_eq!(c.position(), Some(&pos("e1:3")));
        c.continue_after(pos("e1:2"));
        assert_eq!(
            c.position(),
            Some(&pos("e1:3")),
            "an earlier restart is deduped"
        );
        c.continue_after(pos("e1:9"));
        assert_eq!(c.position(), Some(&pos("e1:9")));
        c.continue_after(pos("e2:0"));
        assert_eq!(c.position(), Some(&pos("e2:0")));
    }

    #[test]
    fn reset_replaces_the_cursor_even_backwards() {
        let mut c = Cursor::default();
        assert!(c.admit(&epoch("e1"), Offset(40)));
        c.reset(pos("e1:10"));
        assert_eq!(c.position(), Some(&pos("e1:10")));
        assert!(c.admit(&epoch("e1"), Offset(11)));
    }

    #[test]
    fn skipped_advances_the_cursor_once() {
        let mut c = Cursor::default();
        assert!(c.admit(&epoch("e1"), Offset(2)));
        assert!(c.skip(&epoch("e1"), Offset(6)));
        assert_eq!(c.position(), Some(&pos("e1:6")));
        assert!(
            !c.skip(&epoch("e1"), Offset(6)),
            "a replayed skip is not news"
        );
        assert!(
            !c.admit(&epoch("e1"), Offset(5)),
            "a skipped offset is never delivered"
        );
        assert!(c.admit(&epoch("e1"), Offset(7)));
    }

    #[test]
    fn after_names_the_cursor_or_the_original_start() {
        let start = Start::Oldest;
        let mut c = Cursor::starting(&start);
        assert_eq!(c.after(&start), "oldest");
        assert_eq!(Cursor::default().after(&Start::Latest), "latest");
        assert_eq!(Cursor::default().after(&Start::Now), "now");
        assert!(c.admit(&epoch("e1"), Offset(4)));
        assert_eq!(c.after(&start), "e1:4");
        let start = Start::After(pos("e9:1"));
        assert_eq!(Cursor::default().after(&start), "e9:1");
    }
}
