//! A connection's socket and its outbound buffer (SPEC §8): bounded in frames and bytes,
//! written by the connection's own task.
//!
//! Deliveries must first take [`Room`] (a count and a byte budget), so at most
//! `outbound_messages` deliveries and `outbound_bytes` bytes wait for a client at any time; a
//! subscription that finds no room simply does not read, and reads its history later — the log
//! is the buffer. Replies (acks, errors, pongs) take no room but share the bounded queue, so
//! a client that sends requests without reading answers is slowed down, not buffered for.
//!
//! There is no writer task: the connection's loop hands what is queued to the socket on every
//! turn and whenever the socket can take more ([`Outbound::next_inbound`] reads the client's
//! frames and writes at once), and a sender that finds the queue full writes to make room
//! itself ([`Outbound::send`]). So the socket is not split (no lock between two halves) and an
//! idle connection is one task. What is queued while the connection handles one thing — a
//! round's acks, a subscription's batch of deliveries — goes out together, fed to the socket
//! without a flush and then flushed once: one write (tungstenite writes earlier only past its
//! `write_buffer`).
//!
//! The queue is a `VecDeque` allocated when a frame is queued and released whenever it has
//! been written: an idle connection holds no queue storage.
//!
//! What has been written and flushed is recorded (once per flushed burst) as what a session
//! remembers as delivered, and when the socket last took a frame is how a stuck client is
//! detected.
//!
//! A sender waiting for a slot is the connection's task itself, so nothing else of the
//! connection runs meanwhile: the wait ends (besides a slot) when the socket has taken nothing
//! for the stuck timeout, and as soon as the connection must end from outside — the server
//! shutting down, its session taken over by another connection or disconnected by an operator
//! ([`Gone::Ended`]). A client that asks without reading can then hold neither a shutdown nor
//! a take-over up; the connection ends with its last frames queued beyond the bound
//! ([`Outbound::send_last`]) for whoever still reads.

use std::{
    collections::VecDeque,
    future::poll_fn,
    pin::{Pin, pin},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket};
use futures::{SinkExt, Stream, StreamExt};
use parking_lot::Mutex;
use spool_core::Position;
use tokio::{sync::Semaphore, time::Instant};
use tokio_util::sync::CancellationToken;

use super::CloseReason;
use crate::delivery::session::LiveSession;

/// Frames beyond the delivery budget that may wait: replies to requests.
const REPLY_SLOTS: usize = 256;
/// Frames beyond the full queue for the connection's last words ([`Outbound::send_last`]): a
/// shutdown's `reconnect` and a protocol's farewell.
const LAST_SLOTS: usize = 2;

/// One frame for the socket.
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
    /// Cancel-safe: dropped while it waits, it has taken nothing.
    pub async fn take(&self) -> Taken {
        let mut taken = Taken::default();
        // The semaphores are never closed, so acquiring cannot fail. Both permits are kept
        // until both are held: one forgotten before the other's wait would be lost if this
        // future were dropped in that wait.
        let message = self.messages.acquire().await.ok();
        let byte = self.bytes.acquire().await.ok();
        if let Some(p) = message {
            p.forget();
            taken.messages = 1;
        }
        if let Some(p) = byte {
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
        let more = self.bytes.available_permits().min(u32::MAX as usize);
        if more > 0
            && let Ok(p) = self.bytes.try_acquire_many(more as u32)
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

/// The socket and what waits to be written to it, held by the connection task.
pub struct Outbound {
    pub room: Arc<Room>,
    /// Longest wait for a slot in the queue before the client counts as stuck.
    stuck: Duration,
    /// Most frames queued at once.
    capacity: usize,
    /// The server's shutdown, which ends a wait for a slot.
    shutdown: CancellationToken,
    /// The session whose positions are recorded as frames are written, once `connect` made
    /// one (its take-over and disconnection end a wait for a slot).
    session: OnceLock<Arc<LiveSession>>,
    /// Only the connection's task locks it, never across an `await`: it is never contended
    /// (a `Mutex` rather than a `RefCell` so that `&Outbound` can be held across the
    /// connection's awaits).
    io: Mutex<Io>,
}

struct Io {
    socket: Woken<WebSocket>,
    /// Frames not yet handed to the socket.
    frames: VecDeque<Frame>,
    /// Frames were handed to the socket since it was last flushed.
    unflushed: bool,
    /// The socket failed or was closed: nothing more can be sent.
    closed: bool,
    started: Instant,
    /// When the socket last took a frame, since `started`.
    last: Duration,
    /// The newest position per subscription written in the current burst, recorded in the
    /// session (one lock) once the burst is flushed.
    written: Vec<(Arc<str>, u64, Position)>,
}

impl Outbound {
    /// The connection's socket with an empty outbound queue; `shutdown` is the server's.
    pub fn new(
        socket: WebSocket,
        messages: usize,
        bytes: usize,
        stuck: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            room: Arc::new(Room::new(messages, bytes)),
            stuck,
            capacity: messages + REPLY_SLOTS,
            shutdown,
            session: OnceLock::new(),
            io: Mutex::new(Io {
                socket: Woken::new(socket),
                frames: VecDeque::new(),
                unflushed: false,
                closed: false,
                started: Instant::now(),
                last: Duration::ZERO,
                written: Vec::new(),
            }),
        }
    }

    /// The session written frames are recorded in from now on.
    pub fn set_session(&self, session: Arc<LiveSession>) {
        let _ = self.session.set(session);
    }

    /// Queues a frame, writing to the socket to make room if the queue is full. Fails when the
    /// socket failed, when the socket has taken nothing for the stuck timeout while the queue
    /// stays full (the client reads nothing while it keeps sending requests), or when the
    /// connection must end meanwhile (shutdown, take-over, disconnection: [`Gone::Ended`]).
    pub async fn send(&self, frame: Frame) -> Result<(), Gone> {
        let mut frame = Some(frame);
        if self.push(&mut frame)? {
            return Ok(());
        }
        // Rare (the client reads slower than it asks): boxed, so the wait's timer is not part
        // of every caller's future.
        Box::pin(self.wait_for_slot(frame)).await
    }

    async fn wait_for_slot(&self, mut frame: Option<Frame>) -> Result<(), Gone> {
        // Stuck counts from when the socket last took a frame, not from this wait: the queue
        // may have been still for a while before it filled up.
        let mut deadline = pin!(tokio::time::sleep(
            self.stuck.saturating_sub(self.stalled_for())
        ));
        // What ends the connection from outside: the connection's loop, which watches for it,
        // does not run while its task waits here.
        let session = self.session.get();
        let mut ended = pin!(async {
            let taken_over = async {
                match session {
                    Some(s) => s.taken_over.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            let disconnected = async {
                match session {
                    Some(s) => s.disconnected.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => CloseReason::ShuttingDown,
                _ = taken_over => CloseReason::TakenOver,
                _ = disconnected => CloseReason::Disconnected,
            }
        });
        poll_fn(|cx| {
            // Full: write what is queued to make room (the socket wakes this task when it
            // can take more).
            let _ = self.poll_write(cx);
            if self.push(&mut frame)? {
                return Poll::Ready(Ok(()));
            }
            if let Poll::Ready(why) = ended.as_mut().poll(cx) {
                return Poll::Ready(Err(Gone::Ended(why)));
            }
            while deadline.as_mut().poll(cx).is_ready() {
                let stalled = self.stalled_for();
                if stalled >= self.stuck {
                    return Poll::Ready(Err(Gone::Stuck));
                }
                deadline
                    .as_mut()
                    .reset(Instant::now() + (self.stuck - stalled));
            }
            Poll::Pending
        })
        .await
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

    /// Queues one of the connection's last frames as it ends (a shutdown's `reconnect`, a
    /// protocol's farewell), even when the queue is full: the connection writes nothing more
    /// after them, so a client that still reads gets them before the close frame. At most
    /// [`LAST_SLOTS`] beyond the queue's bound; past that the frame is dropped.
    pub fn send_last(&self, message: WsMessage) -> Result<(), Gone> {
        let mut io = self.io.lock();
        if io.closed {
            return Err(Gone::Closed);
        }
        if io.frames.len() < self.capacity + LAST_SLOTS {
            io.frames.push_back(Frame {
                message,
                room: Taken::default(),
                delivered: None,
            });
        }
        Ok(())
    }

    /// Queues `frame` if there is a slot (true; the frame is taken), else leaves it (false).
    fn push(&self, frame: &mut Option<Frame>) -> Result<bool, Gone> {
        let mut io = self.io.lock();
        if io.closed {
            return Err(Gone::Closed);
        }
        if io.frames.len() >= self.capacity {
            return Ok(false);
        }
        if let Some(frame) = frame.take() {
            io.frames.push_back(frame);
        }
        Ok(true)
    }

    /// Waits for the client's next frame (when `reading`), writing what is queued meanwhile.
    /// `None`: the socket is closed or failed (reading or writing).
    pub fn next_inbound(
        &self,
        reading: bool,
    ) -> impl Future<Output = Option<Result<WsMessage, axum::Error>>> + '_ {
        poll_fn(move |cx| {
            let mut io = self.io.lock();
            if let Poll::Ready(Err(())) = io.poll_write(cx, &self.room, &self.session) {
                return Poll::Ready(None);
            }
            if !reading {
                return Poll::Pending;
            }
            io.socket.poll_next_unpin(cx)
        })
    }

    /// Hands what is queued to the socket and flushes it, as far as the socket takes it now
    /// (when it cannot, this task is woken once it can). Ready(Err) once the socket failed.
    pub fn poll_write(&self, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        self.io.lock().poll_write(cx, &self.room, &self.session)
    }

    /// Whether frames are queued that have not been handed to the socket yet.
    pub fn waiting(&self) -> bool {
        !self.io.lock().frames.is_empty()
    }

    /// How long frames have been waiting without the socket taking any (zero when nothing
    /// waits).
    pub fn stalled_for(&self) -> Duration {
        let io = self.io.lock();
        if io.frames.is_empty() {
            return Duration::ZERO;
        }
        io.started.elapsed().saturating_sub(io.last)
    }

    /// Writes what is queued, then the close frame (if any), and closes the socket, giving
    /// up after `within`: a client that reads nothing will not read it either.
    pub async fn finish(self, close: Option<Close>, within: Duration) {
        let Self {
            room, session, io, ..
        } = self;
        let mut io = io.into_inner();
        let _ = tokio::time::timeout(within, async {
            if poll_fn(|cx| io.poll_write(cx, &room, &session))
                .await
                .is_err()
            {
                return;
            }
            let frame = close.map(|c| CloseFrame {
                code: c.code,
                reason: c.reason.into(),
            });
            let _ = io.socket.inner.send(WsMessage::Close(frame)).await;
            let _ = io.socket.inner.close().await;
        })
        .await;
    }
}

impl Io {
    /// Everything queued is fed to the socket without a flush, then flushed: a burst goes out
    /// in one write. Ready(Ok) once all is written and flushed (the queue's storage is then
    /// released: a quiet connection keeps none); Pending while the socket takes no more.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        room: &Room,
        session: &OnceLock<Arc<LiveSession>>,
    ) -> Poll<Result<(), ()>> {
        if self.closed {
            return Poll::Ready(Err(()));
        }
        while !self.frames.is_empty() {
            if ready!(self.socket.inner.poll_ready_unpin(cx)).is_err() {
                return self.fail(room);
            }
            let Some(frame) = self.frames.pop_front() else {
                break;
            };
            let sent = self.socket.inner.start_send_unpin(frame.message);
            room.give_back(frame.room);
            self.last = self.started.elapsed();
            if sent.is_err() {
                return self.fail(room);
            }
            self.unflushed = true;
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
        }
        if self.frames.capacity() > 0 {
            self.frames = VecDeque::new();
        }
        if self.unflushed {
            if ready!(self.socket.inner.poll_flush_unpin(cx)).is_err() {
                return self.fail(room);
            }
            self.unflushed = false;
            self.last = self.started.elapsed();
            if !self.written.is_empty() {
                if let Some(session) = session.get() {
                    session.delivered(&mut self.written);
                }
                self.written.clear();
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The socket failed: nothing more can be sent, and whatever is still queued gives its
    /// room back.
    fn fail(&mut self, room: &Room) -> Poll<Result<(), ()>> {
        self.closed = true;
        for frame in std::mem::take(&mut self.frames) {
            room.give_back(frame.room);
        }
        Poll::Ready(Err(()))
    }
}

/// A frame could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Gone {
    /// The socket failed or was closed.
    Closed,
    /// The client has read nothing for the stuck timeout.
    Stuck,
    /// The connection must end for this reason (the server shuts down, the session was taken
    /// over or disconnected) while the frame waited for a slot: it is not queued.
    Ended(CloseReason),
}

/// How a connection ends, as sent in the close frame.
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
}

/// The socket, read only when its waker has fired since it last answered `Pending`. The
/// connection's `select!` polls every branch on each turn of its loop, and each poll of a
/// WebSocket stream makes tungstenite zero its read buffer (`read_buffer`) before it tries the
/// socket: a subscriber that sends nothing paid that for every delivery. Writes go to `inner`
/// directly.
struct Woken<S> {
    inner: S,
    wake: Arc<WakeFlag>,
    waker: Waker,
}

#[derive(Default)]
struct WakeFlag {
    /// Set when the inner stream's waker fires or when it last gave an item (it may hold more).
    ready: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<S> Woken<S> {
    fn new(inner: S) -> Self {
        let wake = Arc::new(WakeFlag {
            ready: AtomicBool::new(true),
            task: Default::default(),
        });
        let waker = Waker::from(wake.clone());
        Self { inner, wake, waker }
    }
}

impl<S: Stream + Unpin> Stream for Woken<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = &mut *self;
        this.wake.task.register(cx.waker());
        // Cleared before the inner poll: a wake-up during it sets it again.
        if !this.wake.ready.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let polled = this
            .inner
            .poll_next_unpin(&mut Context::from_waker(&this.waker));
        if polled.is_ready() {
            this.wake.ready.store(true, Ordering::Release);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A take dropped while it waits for bytes (messages were free) has taken nothing.
    #[tokio::test]
    async fn a_take_dropped_while_waiting_takes_nothing() {
        let room = Room::new(4, 8);
        let all = room.take().await;
        assert_eq!(
            all,
            Taken {
                messages: 4,
                bytes: 8
            }
        );
        room.give_back(Taken {
            messages: 4,
            bytes: 0,
        });
        let waiting = tokio::time::timeout(Duration::from_millis(20), room.take()).await;
        assert!(waiting.is_err(), "no bytes: the take waits");
        room.give_back(Taken {
            messages: 0,
            bytes: 8,
        });
        assert_eq!(
            room.take().await,
            Taken {
                messages: 4,
                bytes: 8
            }
        );
    }
}
