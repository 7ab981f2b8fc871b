//! A connection's outbound buffer (SPEC §8): bounded in frames and bytes, drained by a writer
//! task that owns the socket's sending half.
//!
//! Deliveries must first take [`Room`] (a count and a byte budget), so at most
//! `outbound_messages` deliveries and `outbound_bytes` bytes wait for a client at any time; a
//! subscription that finds no room simply does not read, and reads its history later — the log
//! is the buffer. Replies (acks, errors, pongs) take no room but share the bounded queue, so
//! a client that sends requests without reading answers is slowed down, not buffered for.
//!
//! The queue is a `VecDeque` behind a lock, allocated when a frame is queued and released
//! whenever the writer has drained it and waits: an idle connection holds no queue storage (a
//! channel would hold its first block of slots for as long as the connection lives). The
//! writer takes everything queued at once, feeds it to the socket and flushes once, so a burst
//! — a round's acks, a batch of deliveries — goes out in one write. The connection can hold
//! the writer back while it queues a burst ([`Outbound::hold`]).
//!
//! The writer records what it has written to the socket (once per flushed burst), which is
//! what a session remembers as delivered, and when it last made progress, which is how a
//! stuck client is detected.

use std::{
    collections::VecDeque,
    future::poll_fn,
    pin::pin,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Poll, Waker},
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use futures::{SinkExt, stream::SplitSink};
use parking_lot::Mutex;
use spool_core::Position;
use tokio::{
    sync::{Notify, Semaphore, oneshot},
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

    /// Whether a delivery would have to wait for room now (the client reads slower than its
    /// subscriptions could deliver).
    pub fn is_full(&self) -> bool {
        self.messages.available_permits() == 0 || self.bytes.available_permits() == 0
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
    shared: Arc<Shared>,
    pub room: Arc<Room>,
    /// Longest wait for a slot in the queue before the client counts as stuck.
    stuck: Duration,
    /// While set, queued frames do not wake the writer (see [`Outbound::hold`]).
    held: AtomicBool,
    /// A frame was queued while held.
    queued_while_held: AtomicBool,
}

/// What the connection and its writer share.
struct Shared {
    queue: Mutex<Queue>,
    /// Most frames queued or being written at once.
    capacity: usize,
    /// Frames queued and not yet handed to the socket (including those the writer holds).
    pending: AtomicUsize,
    /// Signalled when the writer has handed frames to the socket or is gone: room for
    /// senders waiting for a slot.
    space: Notify,
    started: Instant,
    /// When the writer last handed a frame to the socket, in ms since `started`.
    last_ms: AtomicU64,
}

struct Queue {
    frames: VecDeque<Frame>,
    /// The writer, when it waits for frames.
    writer: Option<Waker>,
    /// The writer is gone (the socket failed or was closed): nothing more can be sent.
    closed: bool,
    /// The [`Outbound`] is gone: the writer ends once the queue is empty.
    finished: bool,
}

impl Outbound {
    /// Starts the writer for `sink`. The writer ends when the [`Outbound`] is dropped (after
    /// writing what is queued) or when the socket fails.
    pub fn start(
        sink: SplitSink<WebSocket, WsMessage>,
        messages: usize,
        bytes: usize,
        stuck: Duration,
        session: Arc<OnceLock<Arc<LiveSession>>>,
    ) -> (Self, Writer) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                frames: VecDeque::new(),
                writer: None,
                closed: false,
                finished: false,
            }),
            capacity: messages + REPLY_SLOTS,
            pending: AtomicUsize::new(0),
            space: Notify::new(),
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
        });
        let room = Arc::new(Room::new(messages, bytes));
        let writer = Writer {
            sink,
            shared: shared.clone(),
            batch: VecDeque::new(),
            room: room.clone(),
            session,
            written: Vec::new(),
        };
        (
            Self {
                shared,
                room,
                stuck,
                held: AtomicBool::new(false),
                queued_while_held: AtomicBool::new(false),
            },
            writer,
        )
    }

    /// Queues a frame, waiting for a slot if the queue is full. Fails when the writer is gone
    /// (the socket failed), or when no slot frees up within the stuck timeout (the client
    /// reads nothing while it keeps sending requests).
    pub async fn send(&self, frame: Frame) -> Result<(), Gone> {
        let mut frame = Some(frame);
        if self.push(&mut frame)? {
            return Ok(());
        }
        // Rare (the client reads slower than it asks): boxed, so the wait's timer and
        // registration are not part of every caller's future.
        Box::pin(self.wait_for_slot(frame)).await
    }

    async fn wait_for_slot(&self, mut frame: Option<Frame>) -> Result<(), Gone> {
        let deadline = Instant::now() + self.stuck;
        loop {
            // Registered before the check: a slot freed after it still ends this wait.
            let mut space = pin!(self.shared.space.notified());
            space.as_mut().enable();
            if self.push(&mut frame)? {
                return Ok(());
            }
            // Full: whatever is held back must go out to make room.
            self.wake_writer();
            if tokio::time::timeout_at(deadline, space).await.is_err() {
                return Err(Gone::Stuck);
            }
        }
    }

    /// Queues a reply, or drops it if the queue is full (for pings, which can wait).
    pub fn try_send(&self, message: WsMessage) -> Result<(), Gone> {
        let mut frame = Some(Frame {
            message,
            room: Taken::default(),
            delivered: None,
        });
        self.push(&mut frame).map(|_| ())
    }

    /// Queues `frame` if there is a slot (true; the frame is taken), else leaves it (false).
    fn push(&self, frame: &mut Option<Frame>) -> Result<bool, Gone> {
        let waker = {
            let mut queue = self.shared.queue.lock();
            if queue.closed {
                return Err(Gone::Closed);
            }
            if self.shared.pending.load(Ordering::Acquire) >= self.shared.capacity {
                return Ok(false);
            }
            let Some(frame) = frame.take() else {
                return Ok(true);
            };
            queue.frames.push_back(frame);
            self.shared.pending.fetch_add(1, Ordering::AcqRel);
            if self.held.load(Ordering::Relaxed) {
                self.queued_while_held.store(true, Ordering::Relaxed);
                None
            } else {
                queue.writer.take()
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(true)
    }

    /// Holds the writer back: frames queued until [`Outbound::release`] are written together
    /// (one flush), not one by one as the writer would take them. A full queue still wakes it.
    pub fn hold(&self) {
        self.held.store(true, Ordering::Relaxed);
    }

    /// Ends [`Outbound::hold`]: the writer takes what was queued meanwhile.
    pub fn release(&self) {
        self.held.store(false, Ordering::Relaxed);
        if self.queued_while_held.swap(false, Ordering::Relaxed) {
            self.wake_writer();
        }
    }

    fn wake_writer(&self) {
        let waker = self.shared.queue.lock().writer.take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Whether frames are queued that the writer has not handed to the socket yet.
    pub fn waiting(&self) -> bool {
        self.shared.pending.load(Ordering::Relaxed) > 0
    }

    /// How long frames have been waiting without the writer making progress (zero when
    /// nothing waits).
    pub fn stalled_for(&self) -> Duration {
        if self.shared.pending.load(Ordering::Relaxed) == 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.shared.last_ms.load(Ordering::Relaxed));
        self.shared.started.elapsed().saturating_sub(last)
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        let waker = {
            let mut queue = self.shared.queue.lock();
            queue.finished = true;
            queue.writer.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
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
    shared: Arc<Shared>,
    /// The frames taken from the queue, being written.
    batch: VecDeque<Frame>,
    room: Arc<Room>,
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
    /// Writes frames until the [`Outbound`] is dropped and the queue is empty, then sends the
    /// close frame set in `close` (if any) and ends. Everything queued is taken at once and
    /// fed without a flush, then flushed: a burst goes out in one write (tungstenite writes
    /// earlier only past its `write_buffer`).
    pub async fn run(mut self, mut close: oneshot::Receiver<Close>) {
        while self.take().await {
            while let Some(frame) = self.batch.pop_front() {
                if self.write(frame).await.is_err() {
                    return;
                }
            }
            if self.sink.flush().await.is_err() {
                return;
            }
            self.mark_progress();
            // Room for senders waiting for a slot.
            self.shared.space.notify_waiters();
            if let Some(session) = self.session.get() {
                session.delivered(&mut self.written);
            }
            self.written.clear();
        }
        let close = close.try_recv().ok();
        self.finish(close).await;
    }

    /// Waits for queued frames and moves them into `batch` (whose drained storage becomes the
    /// queue's); false once the queue is empty and the [`Outbound`] gone. Before it waits, the
    /// storage of both is released: a quiet connection keeps none.
    async fn take(&mut self) -> bool {
        poll_fn(|cx| {
            let mut queue = self.shared.queue.lock();
            if !queue.frames.is_empty() {
                std::mem::swap(&mut queue.frames, &mut self.batch);
                return Poll::Ready(true);
            }
            if queue.finished {
                return Poll::Ready(false);
            }
            match &mut queue.writer {
                Some(waker) => waker.clone_from(cx.waker()),
                None => queue.writer = Some(cx.waker().clone()),
            }
            let storage = std::mem::take(&mut queue.frames);
            drop(queue);
            drop(storage);
            self.batch = VecDeque::new();
            Poll::Pending
        })
        .await
    }

    async fn write(&mut self, frame: Frame) -> Result<(), axum::Error> {
        let result = self.sink.feed(frame.message).await;
        self.shared.pending.fetch_sub(1, Ordering::AcqRel);
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
        let ms = self.shared.started.elapsed().as_millis() as u64;
        self.shared.last_ms.store(ms, Ordering::Relaxed);
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

impl Drop for Writer {
    /// The socket is gone or closed: senders learn it, and whatever is still queued gives its
    /// room back.
    fn drop(&mut self) {
        let frames = {
            let mut queue = self.shared.queue.lock();
            queue.closed = true;
            std::mem::take(&mut queue.frames)
        };
        for frame in frames.into_iter().chain(self.batch.drain(..)) {
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
            self.room.give_back(frame.room);
        }
        self.shared.space.notify_waiters();
    }
}
