//! A connection's outbound buffer (SPEC §8): bounded in frames and bytes, drained by a writer
//! task that owns the socket's sending half.
//!
//! Deliveries must first take [`Room`] (a count and a byte budget), so at most
//! `outbound_messages` deliveries and `outbound_bytes` bytes wait for a client at any time; a
//! subscription that finds no room simply does not read, and reads its history later — the log
//! is the buffer. Replies (acks, errors, pongs) take no room but share the bounded channel, so
//! a client that sends requests without reading answers is slowed down, not buffered for.
//!
//! The writer records what it has written to the socket (once per flushed burst), which is
//! what a session remembers as delivered, and when it last made progress, which is how a
//! stuck client is detected.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use futures::{SinkExt, stream::SplitSink};
use spool_core::Position;
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::Instant,
};

use crate::delivery::session::LiveSession;

/// Frames beyond the delivery budget that may wait: replies to requests.
const REPLY_SLOTS: usize = 256;

/// One frame for the writer.
pub struct Frame {
    pub message: WsMessage,
    /// Room taken by this frame, given back once it is written.
    pub room: Taken,
    /// For a delivery: the subscription's stream, generation and position, recorded in the
    /// session once the frame is written.
    pub delivered: Option<(Arc<str>, u64, Position)>,
}

/// Room taken from the budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub messages: usize,
    pub bytes: usize,
}

/// The delivery budget of one connection.
pub struct Room {
    messages: Semaphore,
    bytes: Semaphore,
}

impl Room {
    fn new(messages: usize, bytes: usize) -> Self {
        Self {
            messages: Semaphore::new(messages),
            bytes: Semaphore::new(bytes),
        }
    }

    /// Waits until there is room for at least one delivery, then takes all the room there is.
    pub async fn take(&self) -> Taken {
        let mut taken = Taken::default();
        // The semaphores are never closed, so acquiring cannot fail.
        if let Ok(p) = self.messages.acquire().await {
            p.forget();
            taken.messages = 1;
        }
        if let Ok(p) = self.bytes.acquire().await {
            p.forget();
            taken.bytes = 1;
        }
        let more = self.messages.available_permits();
        if more > 0
            && let Ok(p) = self.messages.try_acquire_many(more as u32)
        {
            p.forget();
            taken.messages += more;
        }
        let more = self.bytes.available_permits();
        if more > 0
            && let Ok(p) = self
                .bytes
                .try_acquire_many(more.min(u32::MAX as usize) as u32)
        {
            p.forget();
            taken.bytes += more;
        }
        taken
    }

    pub fn give_back(&self, taken: Taken) {
        if taken.messages > 0 {
            self.messages.add_permits(taken.messages);
        }
        if taken.bytes > 0 {
            self.bytes.add_permits(taken.bytes);
        }
    }
}

/// The producing side, held by the connection task.
pub struct Outbound {
    tx: mpsc::Sender<Frame>,
    pub room: Arc<Room>,
    progress: Arc<Progress>,
    /// Longest wait for a slot in the channel before the client counts as stuck.
    stuck: Duration,
}

/// What the writer reports.
struct Progress {
    started: Instant,
    /// Frames queued and not yet handed to the socket.
    pending: AtomicUsize,
    /// When the writer last handed a frame to the socket, in ms since `started`.
    last_ms: AtomicU64,
}

impl Outbound {
    /// Starts the writer for `sink`. The writer ends when every [`Outbound`] is dropped (after
    /// writing what is queued) or when the socket fails.
    pub fn start(
        sink: SplitSink<WebSocket, WsMessage>,
        messages: usize,
        bytes: usize,
        stuck: Duration,
        session: Arc<OnceLock<Arc<LiveSession>>>,
    ) -> (Self, Writer) {
        let (tx, rx) = mpsc::channel(messages + REPLY_SLOTS);
        let room = Arc::new(Room::new(messages, bytes));
        let progress = Arc::new(Progress {
            started: Instant::now(),
            pending: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        });
        let writer = Writer {
            sink,
            rx,
            room: room.clone(),
            progress: progress.clone(),
            session,
            written: Vec::new(),
        };
        (
            Self {
                tx,
                room,
                progress,
                stuck,
            },
            writer,
        )
    }

    /// Queues a frame, waiting for a slot if the channel is full. Fails when the writer is
    /// gone (the socket failed), or when no slot frees up within the stuck timeout (the
    /// client reads nothing while it keeps sending requests).
    pub async fn send(&self, frame: Frame) -> Result<(), Gone> {
        match self.tx.send_timeout(frame, self.stuck).await {
            Ok(()) => {
                self.progress.pending.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(Gone::Stuck),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(Gone::Closed),
        }
    }

    /// Queues a reply, or drops it if the channel is full (for pings, which can wait).
    pub fn try_send(&self, message: WsMessage) -> Result<(), Gone> {
        match self.tx.try_send(Frame {
            message,
            room: Taken::default(),
            delivered: None,
        }) {
            Ok(()) => {
                self.progress.pending.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Gone::Closed),
        }
    }

    /// Whether frames are queued that the writer has not handed to the socket yet.
    pub fn waiting(&self) -> bool {
        self.progress.pending.load(Ordering::Relaxed) > 0
    }

    /// How long frames have been waiting without the writer making progress (zero when
    /// nothing waits).
    pub fn stalled_for(&self) -> Duration {
        if self.progress.pending.load(Ordering::Relaxed) == 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.progress.last_ms.load(Ordering::Relaxed));
        self.progress.started.elapsed().saturating_sub(last)
    }
}

/// A frame could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Gone {
    /// The writer is gone: the socket failed or was closed.
    Closed,
    /// The client has read nothing for the stuck timeout.
    Stuck,
}

/// The consuming side: owns the socket's sending half.
pub struct Writer {
    sink: SplitSink<WebSocket, WsMessage>,
    rx: mpsc::Receiver<Frame>,
    room: Arc<Room>,
    progress: Arc<Progress>,
    /// The session whose positions the writer records, once `connect` made one.
    session: Arc<OnceLock<Arc<LiveSession>>>,
    /// The newest position per subscription written in the current burst, recorded in the
    /// session (one lock) once the burst is flushed.
    written: Vec<(Arc<str>, u64, Position)>,
}

/// How a connection ends, as sent in the close frame.
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
}

impl Writer {
    /// Writes frames until every [`Outbound`] is dropped and the queue is empty, then sends the
    /// close frame set in `close` (if any) and ends. Frames are fed without a flush while more
    /// are queued, so a burst goes out in few syscalls.
    pub async fn run(mut self, mut close: oneshot::Receiver<Close>) {
        loop {
            let Some(frame) = self.rx.recv().await else {
                let close = close.try_recv().ok();
                self.finish(close).await;
                return;
            };
            if self.write(frame).await.is_err() {
                return;
            }
            while let Ok(frame) = self.rx.try_recv() {
                if self.write(frame).await.is_err() {
                    return;
                }
            }
            if self.sink.flush().await.is_err() {
                return;
            }
            self.mark_progress();
            if let Some(session) = self.session.get() {
                session.delivered(&mut self.written);
            }
            self.written.clear();
        }
    }

    async fn write(&mut self, frame: Frame) -> Result<(), axum::Error> {
        let result = self.sink.feed(frame.message).await;
        self.progress.pending.fetch_sub(1, Ordering::Relaxed);
        self.room.give_back(frame.room);
        self.mark_progress();
        result?;
        if let Some((stream, generation, position)) = frame.delivered {
            match self
                .written
                .iter_mut()
                .find(|(s, g, _)| *g == generation && *s == stream)
            {
                Some(entry) => entry.2 = position,
                None => self.written.push((stream, generation, position)),
            }
        }
        Ok(())
    }

    fn mark_progress(&self) {
        let ms = self.progress.started.elapsed().as_millis() as u64;
        self.progress.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Sends the close frame, giving up after a moment: a client that reads nothing will not
    /// read it either.
    async fn finish(&mut self, close: Option<Close>) {
        let frame = close.map(|c| CloseFrame {
            code: c.code,
            reason: c.reason.into(),
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.sink.send(WsMessage::Close(frame)).await;
            let _ = self.sink.close().await;
        })
        .await;
    }
}
