//! [`Heads`]: the head watches of the streams this node's subscribers follow, moved by the
//! engine's cross-node notifications (a publish on any node) and by this node's own appends.
//! A head here is only a wake-up: a subscriber always reads the truth from the engine (or the
//! [`TailCache`](super::TailCache)), so a late or repeated notification costs a read, never a
//! wrong delivery. Bounded: after [`Heads::prune`] it holds only streams with a live watcher.

use std::collections::HashMap;

use parking_lot::Mutex;
use spool_core::{Epoch, Position, StreamName};
use tokio::sync::watch;

use crate::HeadWatch;

/// The head watches of one node.
#[derive(Default)]
pub struct Heads {
    streams: Mutex<HashMap<StreamName, Head>>,
}

/// Epochs a stream left that a node still remembers, so that a late note or read of an old
/// history cannot move its head back to it (subscribers would then wait in the old epoch
/// without their reset).
const RETIRED_EPOCHS: usize = 4;

struct Head {
    tx: watch::Sender<Position>,
    retired: Vec<Epoch>,
}

impl Head {
    /// Moves to `head` if that is news: a later offset in the same epoch, or an epoch the
    /// stream has not left before.
    fn advance(&mut self, head: Position) -> bool {
        if self.retired.contains(&head.epoch) {
            return false;
        }
        let mut left = None;
        let moved = self.tx.send_if_modified(|current| {
            let news = current.epoch != head.epoch || head.offset > current.offset;
            if news {
                if current.epoch != head.epoch {
                    left = Some(current.epoch.clone());
                }
                *current = head;
            }
            news
        });
        if let Some(old) = left {
            if self.retired.len() == RETIRED_EPOCHS {
                self.retired.remove(0);
            }
            self.retired.push(old);
        }
        moved
    }
}

impl Heads {
    /// A watch on `stream`, created at `current` when this node has none yet (otherwise
    /// `current` only moves the existing head forward, as [`Heads::advance`] does).
    pub fn watch(&self, stream: &StreamName, current: Position) -> HeadWatch {
        let mut streams = self.streams.lock();
        match streams.get_mut(stream) {
            Some(head) => {
                head.advance(current);
                head.tx.subscribe()
            }
            None => {
                let (tx, rx) = watch::channel(current);
                let retired = Vec::new();
                streams.insert(stream.clone(), Head { tx, retired });
                rx
            }
        }
    }

    /// Moves a watched stream's head to `head` if that is news: a later offset in the same
    /// epoch, or another epoch — but never back to an epoch the stream left. Streams nobody on
    /// this node watches are ignored, so a node holds nothing for the streams of other nodes'
    /// subscribers. Returns whether it moved.
    pub fn advance(&self, stream: &StreamName, head: Position) -> bool {
        self.streams
            .lock()
            .get_mut(stream)
            .is_some_and(|h| h.advance(head))
    }

    /// Moves a watched stream's head to `head` (as [`Heads::advance`] would) only while it is
    /// still `expected`: what an engine read that found no stream started from, so a
    /// notification that arrived during that read is never undone. Returns whether it moved.
    pub fn replace_if(&self, stream: &StreamName, expected: &Position, head: Position) -> bool {
        let mut streams = self.streams.lock();
        match streams.get_mut(stream) {
            Some(h) if *h.tx.borrow() == *expected => h.advance(head),
            _ => false,
        }
    }

    /// Like [`Heads::replace_if`], but the epoch left is not retired: for an engine whose "no
    /// such stream" may be wrong for a moment (a NATS member still recovering the stream answers
    /// so), moving watchers to a placeholder must not keep the stream's real history — if
    /// reported again — from moving them back. Returns whether it moved.
    pub fn park_if(&self, stream: &StreamName, expected: &Position, placeholder: Position) -> bool {
        let mut streams = self.streams.lock();
        match streams.get_mut(stream) {
            Some(h) if *h.tx.borrow() == *expected && placeholder != *expected => {
                if h.retired.contains(&placeholder.epoch) {
                    return false;
                }
                h.tx.send_replace(placeholder);
                true
            }
            _ => false,
        }
    }

    /// The head this node knows for a watched stream.
    pub fn current(&self, stream: &StreamName) -> Option<Position> {
        self.streams
            .lock()
            .get(stream)
            .map(|h| h.tx.borrow().clone())
    }

    /// How many watches of `stream` are out on this node (0 when it holds none).
    pub fn watchers(&self, stream: &StreamName) -> u64 {
        self.streams
            .lock()
            .get(stream)
            .map_or(0, |h| h.tx.receiver_count() as u64)
    }

    /// Every watched stream, to re-read after the notification channel was down (a
    /// notification lost then would otherwise leave subscribers waiting).
    pub fn watched(&self) -> Vec<StreamName> {
        self.streams.lock().keys().cloned().collect()
    }

    /// Forgets streams without a live watcher; returns them, so caches can drop them too.
    pub fn prune(&self) -> Vec<StreamName> {
        let mut gone = Vec::new();
        self.streams.lock().retain(|name, h| {
            let keep = h.tx.receiver_count() > 0;
            if !keep {
                gone.push(name.clone());
            }
            keep
        });
        gone
    }

    pub fn len(&self) -> usize {
        self.streams.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use spool_core::Offset;

    use super::*;

    fn name(s: &str) -> StreamName {
        StreamName::new(s).unwrap()
    }

    #[test]
    fn heads_move_forward_or_to_another_epoch_only() {
        let heads = Heads::default();
        let s = name("a");
        let e1 = Epoch::generate();
        let mut rx = heads.watch(&s, Position::new(e1.clone(), Offset(5)));
        rx.borrow_and_update();
        assert!(!heads.advance(&s, Position::new(e1.clone(), Offset(4))));
        assert!(!heads.advance(&s, Position::new(e1.clone(), Offset(5))));
        assert!(!rx.has_changed().unwrap());
        assert!(heads.advance(&s, Position::new(e1.clone(), Offset(6))));
        assert_eq!(rx.borrow_and_update().offset, Offset(6));
        let e2 = Epoch::generate();
        assert!(heads.advance(&s, Position::new(e2.clone(), Offset(0))));
        assert_eq!(rx.borrow_and_update().epoch, e2);
        // A late note of the history the stream left does not take it back there.
        assert!(!heads.advance(&s, Position::new(e1.clone(), Offset(9))));
        assert!(!heads.advance(&name("a"), Position::new(e1.clone(), Offset(10))));
        assert_eq!(heads.current(&s).unwrap().epoch, e2);
        // Unwatched streams hold nothing.
        assert!(!heads.advance(&name("b"), Position::new(e1.clone(), Offset(1))));
        // Parked on a placeholder, a watch can still go back to the epoch it left.
        let e3 = Epoch::generate();
        let at_e2 = heads.current(&s).unwrap();
        let parked = Position::new(e3.clone(), Offset(0));
        assert!(!heads.park_if(&s, &Position::new(e1.clone(), Offset(1)), parked.clone()));
        assert!(heads.park_if(&s, &at_e2, parked.clone()));
        assert_eq!(rx.borrow_and_update().epoch, e3);
        assert!(heads.advance(&s, Position::new(at_e2.epoch.clone(), Offset(1))));
        assert_eq!(rx.borrow_and_update().epoch, at_e2.epoch);
        assert!(
            !heads.advance(&s, Position::new(e1, Offset(11))),
            "still retired"
        );
        assert_eq!(heads.watched(), vec![s.clone()]);
        drop(rx);
        assert_eq!(heads.prune(), vec![s]);
        assert!(heads.is_empty());
    }
}
