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
    Epoch, Message, Position, ResetReason, Start, StreamName, StreamState,
    continuity::{Decision, decide},
};
use spool_engine::{Engine, EngineError, HeadWatch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a subscription produces.
#[derive(Clone, Debug)]
pub enum Event {
    Message { epoch: Epoch, message: Arc<Message> },
    Reset { reason: ResetReason, head: Position },
}

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
    pub async fn resolve(&mut self) -> Result<(), EngineError> {
        if self.cursor.is_none() {
            let state = self.state().await?;
            self.resolve_keyword(&state);
        }
        Ok(())
    }

    async fn state(&self) -> Result<StreamState, EngineError> {
        // The watch registered the stream, so the engine knows it; fall back to the watch's
        // head should an engine forget it in between.
        Ok(match self.engine.state(&self.stream).await? {
            Some(state) => state,
            None => StreamState::empty(self.watch.borrow().epoch.clone()),
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
        // Mark the current head as seen *before* reading, so a publish racing this read
        // wakes the next wait instead of being lost.
        self.watch.borrow_and_update();
        loop {
            let cursor = match &self.cursor {
                Some(c) => c.clone(),
                None => {
                    let state = self.state().await?;
                    self.resolve_keyword(&state);
                    continue;
                }
            };
            let batch = self
                .engine
                .read(&self.stream, cursor.offset, self.batch)
                .await?;
            let decision = decide(&Start::After(cursor.clone()), &batch.state);
            self.head = Some(batch.state.clone());
            match decision {
                Decision::Deliver { .. } => {
                    self.start = None;
                    let Some(last) = batch.messages.last() else {
                        return Ok(Vec::new());
                    };
                    self.cursor = Some(Position::new(batch.state.epoch.clone(), last.offset));
                    let epoch = batch.state.epoch;
                    return Ok(batch
                        .messages
                        .into_iter()
                        .map(|message| Event::Message {
                            epoch: epoch.clone(),
                            message,
                        })
                        .collect());
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
        loop {
            let events = self.poll_batch().await?;
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
                changed = self.watch.changed() => {
                    if changed.is_err() {
                        // The engine dropped the stream's watch (stream removed); take a new one.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        self.watch = self.engine.watch(&self.stream).await?;
                    }
                }
                _ = sleep => return Ok(Err(Idle::Timeout)),
                _ = shutdown.cancelled() => return Ok(Err(Idle::Shutdown)),
            }
        }
    }
}

/// The position right after an event, for cursors kept outside the subscription.
pub fn position_after(event: &Event) -> Position {
    match event {
        Event::Message { epoch, message } => Position::new(epoch.clone(), message.offset),
        Event::Reset { head, .. } => head.clone(),
    }
}
