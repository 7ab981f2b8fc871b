//! A reader's live view of one stream: replay from a start, then follow live, with the
//! continuity rule applied to every read.
//!
//! There is no per-subscriber queue. A subscription holds a cursor (the position of the last
//! event it produced) and a watch on the stream's head; it reads the history after its cursor
//! whenever the head moves. Replay and live delivery are therefore the same loop, so a message
//! published while a replay runs is simply read in turn: no gap, no reorder, no duplicate.
//! A reader that stops pulling stops reading — the log is the buffer (SPEC §8).

use std::sync::Arc;
use std::time::Duration;

use spool_core::{
    Epoch, Message, Offset, Position, ResetReason, Start, StreamName, StreamState,
    continuity::{Decision, decide},
};
use spool_engine::{Engine, EngineError, HeadWatch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a subscription produces.
#[derive(Clone, Debug)]
pub enum Event {
    Message {
        epoch: Epoch,
        message: Arc<Message>,
    },
    Reset {
        reason: ResetReason,
        head: Position,
    },
    /// Conflation left out `count` of the offsets in `(after, through]`, each superseded by a
    /// newer message with the same key; the rest were delivered just before this event.
    Skipped {
        epoch: Epoch,
        after: Offset,
        through: Offset,
        count: u64,
    },
}

/// How much one read may produce: the room left in a connection's outbound buffer.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Most messages (at least one is always produced when one is available).
    pub messages: usize,
    /// Most bytes of payload and metadata (one message may exceed it alone).
    pub bytes: usize,
    /// Keep only the newest message per key among what was read (SPEC §8).
    pub conflate: bool,
}

impl Budget {
    /// No limit beyond the subscription's batch size.
    pub const UNLIMITED: Budget = Budget {
        messages: usize::MAX,
        bytes: usize::MAX,
        conflate: false,
    };
}

/// How far a conflating read looks ahead for newer messages with the same key.
const CONFLATE_WINDOW: usize = 1024;

/// Why [`Subscription::next_batch`] came back empty-handed.
#[derive(Debug, PartialEq, Eq)]
pub enum Idle {
    /// The wait deadline passed.
    Timeout,
    /// The server is shutting down.
    Shutdown,
}

pub struct Subscription {
    engine: Arc<dyn Engine>,
    stream: StreamName,
    /// Set until the first read resolves it against the stream.
    start: Option<Start>,
    cursor: Option<Position>,
    head: Option<StreamState>,
    watch: HeadWatch,
    batch: usize,
    /// The cursor is at offset 0 of a placeholder epoch: the engine held no stream when it was
    /// set (nothing was ever published), so there is no history in it to lose. If the stream
    /// is then created in another epoch (a cluster engine: by another node), the reader follows
    /// that epoch from its start — offset 1 — instead of getting a reset.
    unborn: bool,
}

impl Subscription {
    /// Opens a subscription; takes the head watch at once so nothing published from now on can
    /// be missed.
    pub async fn open(
        engine: Arc<dyn Engine>,
        stream: StreamName,
        start: Start,
        batch: usize,
    ) -> Result<Self, EngineError> {
        let watch = engine.watch(&stream).await?;
        let cursor = match &start {
            Start::After(p) => Some(p.clone()),
            _ => None,
        };
        Ok(Self {
            engine,
            stream,
            start: Some(start),
            cursor,
            head: None,
            watch,
            batch: batch.max(1),
            unborn: false,
        })
    }

    pub fn stream(&self) -> &StreamName {
        &self.stream
    }

    /// The position of the last event produced (or resolved start), if any yet.
    pub fn position(&self) -> Option<&Position> {
        self.cursor.as_ref()
    }

    /// The stream's bounds as of the last read.
    pub fn last_state(&self) -> Option<&StreamState> {
        self.head.as_ref()
    }

    /// Resolves the start against the stream without producing events, so `position()` is set.
    /// Also records the stream's bounds, for `last_state()`.
    pub async fn resolve(&mut self) -> Result<(), EngineError> {
        let (state, known) = self.state().await?;
        if self.cursor.is_none() {
            self.resolve_keyword(&state);
            self.unborn = !known;
        }
        self.head = Some(state);
        Ok(())
    }

    /// The stream's bounds, and whether the engine holds the stream. One nothing was published
    /// to is not created by reading it: its bounds are head 0 of the epoch the watch shows (a
    /// placeholder the first publish adopts on the memory and disk engines).
    async fn state(&self) -> Result<(StreamState, bool), EngineError> {
        Ok(match self.engine.state(&self.stream).await? {
            Some(state) => (state, true),
            None => (StreamState::empty(self.watch.borrow().epoch.clone()), false),
        })
    }

    fn resolve_keyword(&mut self, state: &StreamState) {
        let start = self.start.clone().unwrap_or(Start::Now);
        let after = match decide(&start, state) {
            Decision::Deliver { after } => after,
            Decision::Reset { head, .. } => head.offset,
        };
        self.cursor = Some(Position::new(state.epoch.clone(), after));
    }

    /// One read: the events available now (possibly none).
    pub async fn poll_batch(&mut self) -> Result<Vec<Event>, EngineError> {
        self.poll_within(Budget::UNLIMITED).await
    }

    /// Whether the head has moved since the last read (a read may have something new).
    pub fn has_news(&self) -> bool {
        self.watch.has_changed().unwrap_or(true)
    }

    /// Waits until the stream's head moves (or its watch must be taken anew).
    pub async fn changed(&mut self) -> Result<(), EngineError> {
        if self.watch.changed().await.is_err() {
            // The engine dropped the stream's watch (stream removed); take a new one.
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.watch = self.engine.watch(&self.stream).await?;
        }
        Ok(())
    }

    /// One read that produces no more than `budget` allows (possibly nothing).
    pub async fn poll_within(&mut self, budget: Budget) -> Result<Vec<Event>, EngineError> {
        // Mark the current head as seen *before* reading, so a publish racing this read
        // wakes the next wait instead of being lost.
        self.watch.borrow_and_update();
        loop {
            let cursor = match &self.cursor {
                Some(c) => c.clone(),
                None => {
                    let (state, known) = self.state().await?;
                    self.resolve_keyword(&state);
                    self.unborn = !known;
                    continue;
                }
            };
            let limit = if budget.conflate {
                CONFLATE_WINDOW
            } else {
                self.batch.min(budget.messages.max(1))
            };
            let batch = self.engine.read(&self.stream, cursor.offset, limit).await?;
            let cursor = if self.unborn
                && cursor.offset == Offset::ZERO
                && batch.state.epoch != cursor.epoch
            {
                let adopted = Position::new(batch.state.epoch.clone(), Offset::ZERO);
                self.cursor = Some(adopted.clone());
                adopted
            } else {
                cursor
            };
            let decision = decide(&Start::After(cursor.clone()), &batch.state);
            self.head = Some(batch.state.clone());
            match decision {
                Decision::Deliver { .. } => {
                    self.start = None;
                    let epoch = batch.state.epoch;
                    let (messages, through) = select(batch.messages, budget);
                    let Some(through) = through else {
                        return Ok(Vec::new());
                    };
                    self.cursor = Some(Position::new(epoch.clone(), through));
                    self.unborn = false;
                    let skipped = through.get() - cursor.offset.get() - messages.len() as u64;
                    let metrics = &*crate::metrics::SUBSCRIPTIONS;
                    metrics
                        .lag
                        .observe(batch.state.head.get().saturating_sub(through.get()) as f64);
                    if skipped > 0 {
                        metrics.conflation_skipped.inc_by(skipped);
                    }
                    let mut events: Vec<Event> = messages
                        .into_iter()
                        .map(|message| Event::Message {
                            epoch: epoch.clone(),
                            message,
                        })
                        .collect();
                    if skipped > 0 {
                        events.push(Event::Skipped {
                            epoch,
                            after: cursor.offset,
                            through,
                            count: skipped,
                        });
                    }
                    return Ok(events);
                }
                // A start given as a keyword never resets: retention moved between resolving
                // it and reading, so resolve it again.
                Decision::Reset { .. }
                    if matches!(self.start, Some(Start::Oldest | Start::Latest | Start::Now)) =>
                {
                    self.resolve_keyword(&batch.state);
                }
                Decision::Reset { reason, head } => {
                    self.start = None;
                    self.cursor = Some(head.clone());
                    // Reset to head 0 of a stream the engine did not hold: a placeholder.
                    // Asked after the read, so the stream may have been created since (by a
                    // publish on another node): then it holds another epoch than the one read,
                    // and the head read was still the placeholder's.
                    self.unborn = head.offset == Offset::ZERO
                        && self
                            .engine
                            .state(&self.stream)
                            .await?
                            .is_none_or(|now| now.epoch != head.epoch);
                    return Ok(vec![Event::Reset { reason, head }]);
                }
            }
        }
    }

    /// Waits until there are events, `deadline` passes, or `shutdown` fires.
    pub async fn next_batch(
        &mut self,
        deadline: Option<Instant>,
        shutdown: &CancellationToken,
    ) -> Result<Result<Vec<Event>, Idle>, EngineError> {
        self.next_batch_within(deadline, shutdown, Budget::UNLIMITED)
            .await
    }

    /// [`Self::next_batch`], producing no more than `budget` allows.
    pub async fn next_batch_within(
        &mut self,
        deadline: Option<Instant>,
        shutdown: &CancellationToken,
        budget: Budget,
    ) -> Result<Result<Vec<Event>, Idle>, EngineError> {
        loop {
            let events = self.poll_within(budget).await?;
            if !events.is_empty() {
                return Ok(Ok(events));
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.changed() => changed?,
                _ = sleep => return Ok(Err(Idle::Timeout)),
                _ = shutdown.cancelled() => return Ok(Err(Idle::Shutdown)),
            }
        }
    }
}

/// Picks what to deliver of a read: the messages that fit the budget (conflated to the newest
/// per key when asked), and the offset the read is consumed through — the last delivered one.
/// Every offset up to it is either delivered or superseded by a delivered message.
fn select(read: Vec<Arc<Message>>, budget: Budget) -> (Vec<Arc<Message>>, Option<Offset>) {
    let keep: Vec<Arc<Message>> = if budget.conflate && read.len() > 1 {
        let mut seen = std::collections::HashSet::new();
        let mut kept: Vec<Arc<Message>> = read
            .iter()
            .rev()
            .filter(|m| match &m.key {
                Some(key) => seen.insert(key.as_str()),
                None => true,
            })
            .cloned()
            .collect();
        kept.reverse();
        kept
    } else {
        read
    };
    let mut out = Vec::with_capacity(keep.len().min(budget.messages.max(1)));
    let mut bytes = 0usize;
    for message in keep {
        let size = message.retained_bytes() as usize;
        if !out.is_empty() && (out.len() >= budget.messages || bytes + size > budget.bytes) {
            break;
        }
        bytes += size;
        out.push(message);
    }
    let through = out.last().map(|m| m.offset);
    (out, through)
}

/// The position right after an event, for cursors kept outside the subscription.
pub fn position_after(event: &Event) -> Position {
    match event {
        Event::Message { epoch, message } => Position::new(epoch.clone(), message.offset),
        Event::Reset { head, .. } => head.clone(),
        Event::Skipped { epoch, through, .. } => Position::new(epoch.clone(), *through),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msgs(keys: &[Option<&str>]) -> Vec<Arc<Message>> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| {
                Arc::new(Message {
                    offset: Offset(i as u64 + 1),
                    time_ms: 0,
                    payload: Bytes::from_static(b"0123456789"),
                    content_type: None,
                    key: k.map(str::to_owned),
                    headers: Vec::new(),
                })
            })
            .collect()
    }

    fn offsets(m: &[Arc<Message>]) -> Vec<u64> {
        m.iter().map(|m| m.offset.get()).collect()
    }

    #[test]
    fn budget_limits_count_and_bytes_but_always_gives_one() {
        let read = msgs(&[None; 5]);
        let b = |messages, bytes| Budget {
            messages,
            bytes,
            conflate: false,
        };
        let (out, through) = select(read.clone(), b(3, usize::MAX));
        assert_eq!((offsets(&out), through), (vec![1, 2, 3], Some(Offset(3))));
        let (out, _) = select(read.clone(), b(10, 25));
        assert_eq!(offsets(&out), [1, 2]);
        let (out, _) = select(read, b(10, 1));
        assert_eq!(offsets(&out), [1]);
        assert_eq!(select(Vec::new(), b(1, 1)).1, None);
    }

    #[test]
    fn conflation_keeps_the_newest_per_key_and_every_unkeyed() {
        let read = msgs(&[Some("a"), Some("b"), None, Some("a"), Some("b"), Some("c")]);
        let budget = Budget {
            messages: 10,
            bytes: usize::MAX,
            conflate: true,
        };
        let (out, through) = select(read.clone(), budget);
        assert_eq!(offsets(&out), [3, 4, 5, 6]);
        assert_eq!(through, Some(Offset(6)));
        // Out of room after two: consumed through the second kept one, 2 skipped before it.
        let (out, through) = select(
            read,
            Budget {
                messages: 2,
                ..budget
            },
        );
        assert_eq!(offsets(&out), [3, 4]);
        assert_eq!(through, Some(Offset(4)));
    }
}
