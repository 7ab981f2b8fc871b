//! Consumer groups over a WebSocket connection (SPEC §7, docs/protocol.md "Consumer groups"):
//! a member joins a group with a **credit** (a window), and the server pushes leased messages
//! while the member holds fewer unsettled leases than its credit. An ack, nack or terminate of
//! one of them — and a lease that ran out — returns its credit; an extend does not.
//!
//! # One task per consume
//!
//! [`Consumes`] is the connection's side: at most [`MAX_CONSUMES`] consumes, one per
//! (stream, group), each a task (spawned on the server's task tracker, so shutdown waits for
//! it) with two halves:
//!
//! - the **pusher** long-polls `Groups::receive` for as many messages as the window has room
//!   for (never holding the connection loop), hands a receive's leased messages to the
//!   connection as one event through a bounded channel (one wake-up of the connection and one
//!   burst on the socket per window, so a member acking per window gets its window whole),
//!   and waits when the window is full: for a settle, a new credit, or the end of its
//!   earliest lease. Before each receive it waits for room in the connection's outbound
//!   buffer when that is full, and each leased frame takes its share of that room as a
//!   subscription's delivery does, so a member that does not read is a slow consumer like
//!   any other (its buffer fills, the connection is closed after `--stuck-timeout`).
//! - the **settler** runs the member's ack / nack / extend / terminate frames one after
//!   another (consecutive acks as one group commit, their answers as one event), so answers
//!   come in the order sent, and returns credit for what they finished. While the consume has
//!   a backlog (its last receive filled its room or saw more of the stream) and the pusher is
//!   not receiving, an ack also leases for the credit it frees, in the same group operation
//!   (`Groups::settle_and_receive`: one commit, one durability wait, where an ack and the
//!   pusher's next receive took two of each); its `settled` answer and the new leases go to
//!   the connection together. The two halves take turns through `Shared::leasing`, so they
//!   never lease for the same credit; the pusher then looks at the window again.
//!
//! # Not part of the session
//!
//! A consume ends with its connection (or `stop_consuming`): the leases it still holds are
//! given back at once with a nack (best effort, bounded by [`GIVE_BACK_WITHIN`]; a lease not
//! given back runs out as usual), so another member gets them without waiting for the
//! visibility timeout. A reconnecting client consumes again.
//!
//! # Bounds
//!
//! Credit ≤ [`MAX_CREDIT`] per consume; consumes per connection ≤ [`MAX_CONSUMES`]; settle
//! frames queued per connection ≤ [`MAX_QUEUED_SETTLES`] and [`MAX_QUEUED_SETTLE_BYTES`] (at
//! either bound the connection stops reading frames until they drain, as for publishes); the
//! channel from the tasks to the connection holds [`EVENTS`] events.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use spool_core::{
    Clock, Epoch, Message, StreamName,
    group::{
        GroupName, GroupReset, MemberName, ReceiptResult, ReceiveRequest, receive::MAX_RECEIPTS,
    },
};
use spool_protocol::{ErrorCode, ws::MAX_CREDIT};
use tokio::{
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::{
    Event, Protocol,
    outbound::{Frame, Gone, Outbound, Room, Taken},
};
use crate::{
    AppState,
    auth::{Action, Principal},
    delivery::groups::{GroupError, Groups, Leased, ReceiveAnswer, Settle},
    error::ApiError,
};

/// Consumes one connection may hold at once.
pub const MAX_CONSUMES: usize = 16;
/// Settle frames one connection may have waiting for their task, and their receipts' bytes.
pub const MAX_QUEUED_SETTLES: usize = 64;
pub const MAX_QUEUED_SETTLE_BYTES: usize = 4 * 1024 * 1024;
/// Events the consume tasks of one connection may have waiting for it.
pub const EVENTS: usize = 64;
/// How long one receive waits (long-poll) before it starts again.
const POLL: Duration = Duration::from_secs(20);
/// How long an ending consume tries to give its leases back.
pub const GIVE_BACK_WITHIN: Duration = Duration::from_secs(5);
/// Longest wait between retries of a consume whose receives fail.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Consume tasks running on this node (every connection's), a hint for the settler's yield.
static CONSUMING: AtomicUsize = AtomicUsize::new(0);

/// One consume task counted in [`CONSUMING`] while it lives.
struct Consuming;

impl Consuming {
    fn start() -> Self {
        CONSUMING.fetch_add(1, Ordering::Relaxed);
        Consuming
    }
}

impl Drop for Consuming {
    fn drop(&mut self) {
        CONSUMING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a client asks of its consumes (one protocol frame each).
#[derive(Debug)]
pub enum ConsumeCommand {
    Start {
        id: Option<u64>,
        stream: String,
        group: String,
        consumer: String,
        credit: u32,
        visibility_timeout: Option<Duration>,
    },
    /// The window becomes `credit`.
    Credit {
        id: Option<u64>,
        stream: String,
        group: String,
        credit: u32,
    },
    Settle {
        id: Option<u64>,
        stream: String,
        group: String,
        op: SettleOp,
        receipts: Vec<String>,
        /// For `nack`.
        delay: Option<Duration>,
        /// For `nack` and `terminate`.
        reason: Option<String>,
        /// For `extend`.
        visibility_timeout: Option<Duration>,
    },
    Stop {
        id: Option<u64>,
        stream: String,
        group: String,
    },
}

impl ConsumeCommand {
    pub fn id(&self) -> Option<u64> {
        match self {
            ConsumeCommand::Start { id, .. }
            | ConsumeCommand::Credit { id, .. }
            | ConsumeCommand::Settle { id, .. }
            | ConsumeCommand::Stop { id, .. } => *id,
        }
    }
}

/// The settle operations, as the protocol crate names them (`as_str` is the frame's `type`).
pub use spool_protocol::ws::SettleOp;

/// Whether an `ok` (or any answer: the lease is over either way) returns the credit: every
/// settle but `extend`.
fn ends_lease(op: SettleOp) -> bool {
    op != SettleOp::Extend
}

/// What the server tells a consuming client; a protocol encodes it with
/// [`Protocol::encode_consume`].
#[derive(Debug)]
pub enum ConsumeEvent<'a> {
    /// The consume is active with this window (the answer to a start and to a credit).
    Consuming {
        id: Option<u64>,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        credit: u32,
    },
    Leased {
        stream: &'a str,
        group: &'a str,
        receipt: &'a str,
        deliveries: u32,
        epoch: &'a Epoch,
        message: &'a Arc<Message>,
    },
    /// One result per receipt, in the order sent.
    Settled {
        id: Option<u64>,
        stream: &'a str,
        group: &'a str,
        op: SettleOp,
        receipts: &'a [String],
        results: &'a [ReceiptResult],
    },
    GroupReset {
        stream: &'a str,
        group: &'a str,
        reset: &'a GroupReset,
    },
    /// The consume ended (asked for, or the server's `reason`); its leases were given back.
    Stopped {
        id: Option<u64>,
        stream: &'a str,
        group: &'a str,
        reason: Option<&'a str>,
    },
}

type Key = (Arc<str>, Arc<str>);

/// What a consume task tells its connection.
pub struct TaskEvent {
    key: Key,
    generation: u64,
    kind: Kind,
}

enum Kind {
    /// The leases of one receive that found room in the outbound buffer (all of them, unless
    /// the buffer filled up): one event, one wake-up of the connection, and one burst of
    /// frames on the socket, for a window.
    Leased(Vec<Lease>),
    Reset(GroupReset),
    /// The answers of one settle operation, one per settle frame it covered, in order.
    Settled(Vec<Answer>),
    Stopped {
        id: Option<u64>,
        reason: Option<&'static str>,
    },
}

/// A leased message for the connection: its receipt, and the outbound room it took.
struct Lease {
    leased: Leased,
    receipt: String,
    room: Taken,
}

/// The answer to one settle frame.
struct Answer {
    id: Option<u64>,
    op: SettleOp,
    receipts: Vec<String>,
    results: Result<Vec<ReceiptResult>, ApiError>,
}

/// Shared by a consume's task and its connection.
struct Shared {
    /// The window.
    credit: AtomicU32,
    /// Leases pushed and not settled: receipt → when it runs out (the clock's ms).
    held: parking_lot::Mutex<HashMap<String, u64>>,
    /// Woken when the window or the leases held change.
    wake: Notify,
    /// The receive under way, cancelled when the window shrinks under it.
    round: parking_lot::Mutex<Option<CancellationToken>>,
    /// Why the task is being stopped: the request id and the server's reason.
    stop: parking_lot::Mutex<Option<(Option<u64>, Option<&'static str>)>>,
    /// Held by whichever half is leasing for the window: the pusher for a receive, or the
    /// settler for an ack with its next receive (`Groups::settle_and_receive`), so the two
    /// never lease for the same credit.
    leasing: tokio::sync::Mutex<()>,
    /// The consume's last receive filled the room it asked for, or saw more of the stream than
    /// it read: the group likely has more, and an ack that frees credit asks for the next
    /// messages in the same group operation. Cleared by a receive that found the group caught
    /// up (an ack then only acks, without a read of the stream under the group's lock).
    backlog: AtomicBool,
}

impl Shared {
    /// Room in the window now, after dropping leases that ran out; and the earliest lease end.
    fn room(&self, now: u64) -> (u32, Option<u64>) {
        let mut held = self.held.lock();
        held.retain(|_, until| *until > now);
        let room = (self.credit.load(Ordering::Relaxed) as usize).saturating_sub(held.len());
        (room as u32, held.values().min().copied())
    }

    /// Takes the leases `receipts` end out of the window (an ack ends each, whatever its
    /// answer): the room left then, and what was taken, to put back if the settle fails as a
    /// whole. A receipt sent twice ends one lease (the second finds nothing).
    fn end_leases(&self, receipts: &[String], now: u64) -> (u32, Vec<(String, u64)>) {
        let mut held = self.held.lock();
        held.retain(|_, until| *until > now);
        let ended: Vec<(String, u64)> = receipts
            .iter()
            .filter_map(|r| held.remove_entry(r))
            .collect();
        let room = (self.credit.load(Ordering::Relaxed) as usize).saturating_sub(held.len());
        (room as u32, ended)
    }
}

/// A settle frame waiting for its consume's settler.
struct SettleJob {
    id: Option<u64>,
    op: SettleOp,
    receipts: Vec<String>,
    how: Settle,
    /// For `extend`: the lease length to track.
    extend_by: Duration,
    bytes: usize,
}

struct Handle {
    generation: u64,
    stream: StreamName,
    consumer: Arc<str>,
    shared: Arc<Shared>,
    settles: mpsc::Sender<SettleJob>,
    cancel: CancellationToken,
    /// The group's visibility timeout when the consume started (what an extend without one
    /// renews a lease for).
    visibility: Duration,
}

/// Settle frames waiting in any of a connection's consumes.
#[derive(Default)]
struct Queued {
    jobs: AtomicUsize,
    bytes: AtomicUsize,
}

/// A connection's consumes.
pub struct Consumes {
    handles: HashMap<Key, Handle>,
    generation: u64,
    events: mpsc::Sender<TaskEvent>,
    queued: Arc<Queued>,
    room: Arc<Room>,
    /// Parent of every consume's token; cancelled when the connection ends.
    cancel: CancellationToken,
}

impl Drop for Consumes {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Consumes {
    /// A connection's consumes, and the receiving end of their events (for its loop).
    pub fn new(state: &AppState, room: Arc<Room>) -> (Self, mpsc::Receiver<TaskEvent>) {
        let (events, rx) = mpsc::channel(EVENTS);
        (
            Self {
                handles: HashMap::new(),
                generation: 0,
                events,
                queued: Arc::default(),
                room,
                cancel: state.shutdown.child_token(),
            },
            rx,
        )
    }

    /// Whether the connection may read another frame (settles waiting are under the bounds).
    pub fn accepting(&self) -> bool {
        self.queued.jobs.load(Ordering::Relaxed) < MAX_QUEUED_SETTLES
            && self.queued.bytes.load(Ordering::Relaxed) < MAX_QUEUED_SETTLE_BYTES
    }

    /// Runs a client's consume command, answering it through `out`.
    pub async fn command<P: Protocol>(
        &mut self,
        command: ConsumeCommand,
        principal: &Principal,
        state: &AppState,
        protocol: &P,
        out: &Outbound,
    ) -> Result<(), Gone> {
        let id = command.id();
        match self.run(command, principal, state, protocol, out).await {
            Ok(()) => Ok(()),
            Err(e) => reply_error(protocol, out, id, &e).await,
        }
    }

    async fn run<P: Protocol>(
        &mut self,
        command: ConsumeCommand,
        principal: &Principal,
        state: &AppState,
        protocol: &P,
        out: &Outbound,
    ) -> Result<(), ApiError> {
        match command {
            ConsumeCommand::Start {
                id,
                stream,
                group,
                consumer,
                credit,
                visibility_timeout,
            } => {
                self.start(
                    id,
                    &stream,
                    &group,
                    &consumer,
                    credit,
                    visibility_timeout,
                    principal,
                    state,
                )
                .await?;
                let handle = self.handles.get(&key(&stream, &group));
                let consumer = handle.map(|h| h.consumer.clone()).unwrap_or_default();
                consuming(protocol, out, id, &stream, &group, &consumer, credit).await
            }
            ConsumeCommand::Credit {
                id,
                stream,
                group,
                credit,
            } => {
                check_credit(credit)?;
                let handle = self.handle(&stream, &group)?;
                let before = handle.shared.credit.swap(credit, Ordering::Relaxed);
                if credit < before
                    && let Some(round) = handle.shared.round.lock().as_ref()
                {
                    // A receive under way asked for the old window: end it now.
                    round.cancel();
                }
                handle.shared.wake.notify_one();
                let consumer = handle.consumer.clone();
                consuming(protocol, out, id, &stream, &group, &consumer, credit).await
            }
            ConsumeCommand::Settle {
                id,
                stream,
                group,
                op,
                receipts,
                delay,
                reason,
                visibility_timeout,
            } => {
                // The consume's own name when it exists (no copy of the frame's per frame);
                // the same checks, in the same order, either way.
                let found = self.find(&stream, &group);
                let made;
                let name = match found {
                    Some(handle) => &handle.stream,
                    None => {
                        made = StreamName::new(&stream)
                            .map_err(|e| ApiError::invalid_name(&stream, e))?;
                        &made
                    }
                };
                // Rights may have changed since the consume started (a refresh).
                principal.check(Action::Consume, name)?;
                if receipts.len() > MAX_RECEIPTS {
                    return Err(ApiError::bad_param(format!(
                        "at most {MAX_RECEIPTS} receipts per frame; got {}",
                        receipts.len()
                    )));
                }
                let only = |given: bool, field: &str, ops: &str| {
                    if given {
                        Err(ApiError::bad_param(format!(
                            "{field} is a field of {ops} only, not of {}",
                            op.as_str()
                        )))
                    } else {
                        Ok(())
                    }
                };
                only(delay.is_some() && op != SettleOp::Nack, "delay", "nack")?;
                only(
                    reason.is_some() && !matches!(op, SettleOp::Nack | SettleOp::Terminate),
                    "reason",
                    "nack and terminate",
                )?;
                only(
                    visibility_timeout.is_some() && op != SettleOp::Extend,
                    "visibility_timeout",
                    "extend",
                )?;
                let reason = Groups::reason(reason.as_deref())
                    .map_err(|e| ApiError::bad_param(format!("reason: {e}")))?;
                let handle = found.ok_or_else(|| not_consuming(&stream, &group))?;
                let how = match op {
                    SettleOp::Ack => Settle::Ack,
                    SettleOp::Nack => Settle::Nack {
                        delay: delay.unwrap_or(Duration::ZERO),
                        reason,
                    },
                    SettleOp::Extend => Settle::Extend { visibility_timeout },
                    SettleOp::Terminate => Settle::Terminate { reason },
                };
                let bytes = receipts.iter().map(|r| r.len() + 24).sum::<usize>() + 64;
                let job = SettleJob {
                    id,
                    op,
                    receipts,
                    how,
                    extend_by: visibility_timeout.unwrap_or(handle.visibility),
                    bytes,
                };
                self.queued.jobs.fetch_add(1, Ordering::Relaxed);
                self.queued.bytes.fetch_add(bytes, Ordering::Relaxed);
                if handle.settles.try_send(job).is_err() {
                    self.queued.jobs.fetch_sub(1, Ordering::Relaxed);
                    self.queued.bytes.fetch_sub(bytes, Ordering::Relaxed);
                    return Err(ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::LimitReached,
                        format!(
                            "more than {MAX_QUEUED_SETTLES} settle frames waiting; read the answers"
                        ),
                    ));
                }
                Ok(())
            }
            ConsumeCommand::Stop { id, stream, group } => {
                match self.handles.remove(&key(&stream, &group)) {
                    // The task gives the leases back, then says `stopped`.
                    Some(handle) => handle.stop(id, None),
                    None => send_event(
                        protocol,
                        out,
                        &ConsumeEvent::Stopped {
                            id,
                            stream: &stream,
                            group: &group,
                            reason: None,
                        },
                    )
                    .await
                    .map_err(|_| ApiError::bad_param("connection closed"))?,
                }
                Ok(())
            }
        }
    }

    fn handle(&self, stream: &str, group: &str) -> Result<&Handle, ApiError> {
        self.find(stream, group)
            .ok_or_else(|| not_consuming(stream, group))
    }

    /// The consume of (`stream`, `group`): a look at each of at most [`MAX_CONSUMES`], which
    /// costs less than hashing the names (and making the key's two `Arc`s) for every frame.
    fn find(&self, stream: &str, group: &str) -> Option<&Handle> {
        self.handles
            .iter()
            .find(|((s, g), _)| **s == *stream && **g == *group)
            .map(|(_, handle)| handle)
    }

    #[allow(clippy::too_many_arguments)]
    async fn start(
        &mut self,
        id: Option<u64>,
        stream: &str,
        group: &str,
        consumer: &str,
        credit: u32,
        visibility_timeout: Option<Duration>,
        principal: &Principal,
        state: &AppState,
    ) -> Result<(), ApiError> {
        let _ = id;
        let name = StreamName::new(stream).map_err(|e| ApiError::invalid_name(stream, e))?;
        let group_name = GroupName::new(group).map_err(|e| {
            let shown: String = group.chars().take(64).collect();
            ApiError::invalid_group_name(format!("invalid group name {shown:?}: {e}"))
        })?;
        Groups::check_user_name(&group_name)
            .map_err(|e| ApiError::invalid_group_name(format!("{group:?}: {e}")))?;
        principal.check(Action::Consume, &name)?;
        let member = MemberName::new(consumer)
            .map_err(|e| ApiError::bad_param(format!("invalid consumer name: {e}")))?;
        check_credit(credit)?;
        let request = ReceiveRequest {
            member,
            max: 1,
            visibility_timeout,
        };
        request
            .validate()
            .map_err(|e| ApiError::bad_param(e.to_string()))?;
        let groups = state
            .groups
            .clone()
            .ok_or_else(|| ApiError::groups_unavailable(state.engine.name()))?;
        let key = key(stream, group);
        if self.handles.contains_key(&key) {
            return Err(ApiError::bad_param(format!(
                "already consuming group {group:?} of stream {stream:?} on this connection; \
                 stop_consuming first, or send credit to change the window"
            )));
        }
        if self.handles.len() >= MAX_CONSUMES {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::LimitReached,
                format!("at most {MAX_CONSUMES} consumes per connection"),
            ));
        }
        // The group must exist now (a clear `group_not_found`), and its visibility timeout is
        // what an extend without one renews a lease for.
        let view = groups.describe(&name, &group_name).await?;
        self.generation += 1;
        let shared = Arc::new(Shared {
            credit: AtomicU32::new(credit),
            held: parking_lot::Mutex::new(HashMap::new()),
            wake: Notify::new(),
            round: parking_lot::Mutex::new(None),
            stop: parking_lot::Mutex::new(None),
            leasing: tokio::sync::Mutex::new(()),
            backlog: AtomicBool::new(false),
        });
        let (settles, jobs) = mpsc::channel(MAX_QUEUED_SETTLES);
        let cancel = self.cancel.child_token();
        let task = Task {
            key: key.clone(),
            generation: self.generation,
            stream: name.clone(),
            group: group_name,
            request,
            groups,
            shared: shared.clone(),
            events: self.events.clone(),
            room: self.room.clone(),
            clock: state.config.clock.clone(),
            cancel: cancel.clone(),
            queued: self.queued.clone(),
        };
        state.tasks.spawn(task.run(jobs));
        self.handles.insert(
            key,
            Handle {
                generation: self.generation,
                stream: name,
                consumer: Arc::from(consumer),
                shared,
                settles,
                cancel,
                visibility: view.config.visibility_timeout,
            },
        );
        Ok(())
    }

    /// `event`, then the events already waiting behind it (at most [`EVENTS`]): their frames
    /// are queued in one turn of the connection, so they go to the socket in one write. An
    /// ack's `settled` answer and the leases of the receive it ran with come as two events;
    /// taken one per turn, each was a write (and a wake-up of the member) of its own.
    pub async fn on_events<P: Protocol>(
        &mut self,
        event: TaskEvent,
        events: &mut mpsc::Receiver<TaskEvent>,
        protocol: &P,
        out: &Outbound,
    ) -> Result<(), Gone> {
        self.on_event(event, protocol, out).await?;
        for _ in 1..EVENTS {
            match events.try_recv() {
                Ok(event) => self.on_event(event, protocol, out).await?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// A consume task's event: sent to the client as a frame (a leased message with the
    /// outbound room it took). A message leased by a consume stopped since is not sent (the
    /// task gives it back).
    async fn on_event<P: Protocol>(
        &mut self,
        event: TaskEvent,
        protocol: &P,
        out: &Outbound,
    ) -> Result<(), Gone> {
        let TaskEvent {
            key,
            generation,
            kind,
        } = event;
        // The generation names one consume of this connection (a look at each of at most
        // [`MAX_CONSUMES`], not a hash of the names).
        let current = self.handles.values().any(|h| h.generation == generation);
        let (stream, group) = (&*key.0, &*key.1);
        match kind {
            Kind::Leased(leases) => {
                let mut leases = leases.into_iter();
                while let Some(Lease {
                    leased,
                    receipt,
                    room,
                }) = leases.next()
                {
                    let message = current
                        .then(|| {
                            protocol.encode_consume(&ConsumeEvent::Leased {
                                stream,
                                group,
                                receipt: &receipt,
                                deliveries: leased.delivery.deliveries,
                                epoch: &leased.delivery.epoch,
                                message: &leased.message,
                            })
                        })
                        .flatten();
                    match message {
                        Some(message) => {
                            let sent = out
                                .send(Frame {
                                    message,
                                    room,
                                    delivered: None,
                                })
                                .await;
                            if sent.is_err() {
                                for lease in leases {
                                    self.room.give_back(lease.room);
                                }
                                return sent;
                            }
                        }
                        None => self.room.give_back(room),
                    }
                }
                Ok(())
            }
            Kind::Reset(reset) if current => {
                send_event(
                    protocol,
                    out,
                    &ConsumeEvent::GroupReset {
                        stream,
                        group,
                        reset: &reset,
                    },
                )
                .await
            }
            Kind::Reset(_) => Ok(()),
            Kind::Settled(answers) => {
                for Answer {
                    id,
                    op,
                    receipts,
                    results,
                } in answers
                {
                    match results {
                        Ok(results) => {
                            send_event(
                                protocol,
                                out,
                                &ConsumeEvent::Settled {
                                    id,
                                    stream,
                                    group,
                                    op,
                                    receipts: &receipts,
                                    results: &results,
                                },
                            )
                            .await?
                        }
                        Err(e) => reply_error(protocol, out, id, &e).await?,
                    }
                }
                Ok(())
            }
            Kind::Stopped { id, reason } => {
                if current {
                    self.handles.remove(&key);
                }
                send_event(
                    protocol,
                    out,
                    &ConsumeEvent::Stopped {
                        id,
                        stream,
                        group,
                        reason,
                    },
                )
                .await
            }
        }
    }

    /// After a refresh: ends the consumes the new credential no longer allows (`stopped` with
    /// reason `forbidden`, once their leases are given back).
    pub fn retain_allowed(&mut self, principal: &Principal) {
        let lost: Vec<Key> = self
            .handles
            .keys()
            .filter(|(stream, _)| {
                StreamName::new(stream).map_or(true, |name| !principal.may(Action::Consume, &name))
            })
            .cloned()
            .collect();
        for key in lost {
            if let Some(handle) = self.handles.remove(&key) {
                handle.stop(None, Some("forbidden"));
            }
        }
    }
}

impl Handle {
    /// Ends the consume: the pusher stops, the settler finishes what is queued (dropping
    /// this handle closes its queue), the leases are given back, then `stopped` is sent.
    fn stop(self, id: Option<u64>, reason: Option<&'static str>) {
        *self.shared.stop.lock() = Some((id, reason));
        self.cancel.cancel();
    }
}

fn key(stream: &str, group: &str) -> Key {
    (Arc::from(stream), Arc::from(group))
}

/// The elements of `v` from `at` on, taken off it (all of it without a copy when `at` is 0).
fn tail<T>(v: &mut Vec<T>, at: usize) -> Vec<T> {
    if at == 0 {
        std::mem::take(v)
    } else {
        v.split_off(at)
    }
}

fn not_consuming(stream: &str, group: &str) -> ApiError {
    ApiError::bad_param(format!(
        "not consuming group {group:?} of stream {stream:?} on this connection; \
         send consume first (a consume's leases are given back when it stops)"
    ))
}

fn check_credit(credit: u32) -> Result<(), ApiError> {
    if credit > MAX_CREDIT {
        return Err(ApiError::bad_param(format!(
            "credit must be from 0 to {MAX_CREDIT}; got {credit}"
        )));
    }
    Ok(())
}

/// An `error` event answering request `id`. Values in frames are parameters, not bodies, so
/// `invalid_body` is said as `invalid_parameter`.
async fn reply_error<P: Protocol>(
    protocol: &P,
    out: &Outbound,
    id: Option<u64>,
    e: &ApiError,
) -> Result<(), Gone> {
    let code = match e.code {
        ErrorCode::InvalidBody => ErrorCode::InvalidParameter,
        code => code,
    };
    reply(
        protocol,
        out,
        &Event::Error {
            id,
            code,
            message: &e.message,
        },
    )
    .await
}

async fn reply<P: Protocol>(protocol: &P, out: &Outbound, event: &Event<'_>) -> Result<(), Gone> {
    match protocol.encode(event) {
        Some(message) => {
            out.send(Frame {
                message,
                room: Taken::default(),
                delivered: None,
            })
            .await
        }
        None => Ok(()),
    }
}

async fn send_event<P: Protocol>(
    protocol: &P,
    out: &Outbound,
    event: &ConsumeEvent<'_>,
) -> Result<(), Gone> {
    match protocol.encode_consume(event) {
        Some(message) => {
            out.send(Frame {
                message,
                room: Taken::default(),
                delivered: None,
            })
            .await
        }
        None => Ok(()),
    }
}

/// Answers a consume or credit frame: the consume's window as it is now.
async fn consuming<P: Protocol>(
    protocol: &P,
    out: &Outbound,
    id: Option<u64>,
    stream: &str,
    group: &str,
    consumer: &str,
    credit: u32,
) -> Result<(), ApiError> {
    let event = ConsumeEvent::Consuming {
        id,
        stream,
        group,
        consumer,
        credit,
    };
    send_event(protocol, out, &event)
        .await
        .map_err(|_| ApiError::bad_param("connection closed"))
}

/// One consume's task.
struct Task {
    key: Key,
    generation: u64,
    stream: StreamName,
    group: GroupName,
    request: ReceiveRequest,
    groups: Arc<Groups>,
    shared: Arc<Shared>,
    events: mpsc::Sender<TaskEvent>,
    room: Arc<Room>,
    clock: Clock,
    cancel: CancellationToken,
    queued: Arc<Queued>,
}

impl Task {
    async fn run(self, jobs: mpsc::Receiver<SettleJob>) {
        let _consuming = Consuming::start();
        tokio::join!(self.push(), self.settle(jobs));
        self.give_back().await;
        let stop = self.shared.stop.lock().take();
        if let Some((id, reason)) = stop {
            self.emit(Kind::Stopped { id, reason }).await;
        }
    }

    async fn emit(&self, kind: Kind) -> bool {
        self.events
            .send(TaskEvent {
                key: self.key.clone(),
                generation: self.generation,
                kind,
            })
            .await
            .is_ok()
    }

    /// The pusher: receive while the window has room, until cancelled.
    async fn push(&self) {
        let mut retry = Duration::from_millis(100);
        let mut request = self.request.clone();
        // The receive under way ends when the window shrinks under it (a `credit` cancels
        // this token): one token for every receive, made again only once cancelled, rather
        // than a child token (an allocation and two locks of the parent) per receive.
        let mut round = self.round();
        // One timer for the waits of a full window, moved to each wait's end: a later end
        // only moves its deadline (tokio re-registers a timer only for an earlier one), where
        // a new `sleep` per wait registered and removed a timer per message at credit 1.
        let idle = tokio::time::sleep(POLL);
        tokio::pin!(idle);
        while !self.cancel.is_cancelled() {
            let woken = self.shared.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // The settler may be leasing for the window (an ack with its next receive).
            let leasing = tokio::select! {
                held = self.shared.leasing.lock() => held,
                _ = self.cancel.cancelled() => return,
            };
            let now = self.clock.now_ms();
            let (room, next_end) = self.shared.room(now);
            if room == 0 {
                drop(leasing);
                let until = next_end.map_or(POLL, |end| Duration::from_millis(end - now));
                idle.as_mut().reset(Instant::now() + until);
                tokio::select! {
                    _ = &mut woken => {}
                    _ = &mut idle => {}
                    _ = self.cancel.cancelled() => return,
                }
                continue;
            }
            // Lease nothing while the client's outbound buffer is full: it reads slowly, and
            // a lease waiting behind it would only run out.
            if self.room.is_full() {
                tokio::select! {
                    taken = self.room.take() => self.room.give_back(taken),
                    _ = self.cancel.cancelled() => return,
                }
            }
            if round.is_cancelled() {
                round = self.round();
            }
            request.max = room;
            let answer = self
                .groups
                .receive(
                    &self.stream,
                    &self.group,
                    &request,
                    Some(Instant::now() + POLL),
                    &round,
                )
                .await;
            let answer = match answer {
                Ok(answer) => {
                    retry = Duration::from_millis(100);
                    answer
                }
                Err(GroupError::NotFound { .. }) => {
                    self.emit(Kind::Stopped {
                        id: None,
                        reason: Some("group_not_found"),
                    })
                    .await;
                    return;
                }
                Err(e) => {
                    drop(leasing);
                    tracing::warn!(error = %e, stream = %self.stream, group = %self.group, "a consume's receive failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        _ = self.cancel.cancelled() => return,
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
            };
            self.shared.backlog.store(
                answer.more || answer.messages.len() >= room as usize,
                Ordering::Relaxed,
            );
            self.deliver(answer).await;
            drop(leasing);
        }
    }

    /// Hands a receive's answer to the connection: its reset, then its leases, held from now
    /// on (settled by the member, or given back on the way out).
    async fn deliver(&self, answer: ReceiveAnswer) {
        if let Some(reset) = answer.reset {
            self.emit(Kind::Reset(reset)).await;
        }
        if answer.messages.is_empty() {
            return;
        }
        let leases: Vec<Lease> = {
            let mut held = self.shared.held.lock();
            answer
                .messages
                .into_iter()
                .map(|leased| {
                    let receipt = leased.delivery.receipt.encode();
                    held.insert(receipt.clone(), leased.delivery.until_ms);
                    Lease {
                        leased,
                        receipt,
                        room: Taken::default(),
                    }
                })
                .collect()
        };
        self.send_leases(leases).await;
    }

    /// A new token for the receives, the one a `credit` cancels.
    fn round(&self) -> CancellationToken {
        let round = self.cancel.child_token();
        *self.shared.round.lock() = Some(round.clone());
        round
    }

    /// Hands a receive's leases to the connection, each with its share of the outbound
    /// buffer as a subscription's delivery takes: as many as there is room for in one event,
    /// then (the buffer full) the rest as room comes back.
    async fn send_leases(&self, leases: Vec<Lease>) {
        let mut leases = leases.into_iter().peekable();
        while leases.peek().is_some() {
            if self.cancel.is_cancelled() {
                return;
            }
            let mut left = tokio::select! {
                taken = self.room.take() => taken,
                _ = self.cancel.cancelled() => return,
            };
            let mut run = Vec::with_capacity(left.messages.min(leases.len()));
            let mut taken = Taken::default();
            // Each lease takes one message and at least one byte, as a `take` of its own did.
            while left.messages > 0 && (run.is_empty() || left.bytes > 0) {
                let Some(mut lease) = leases.next() else {
                    break;
                };
                let bytes = (lease.leased.message.retained_bytes() as usize).min(left.bytes);
                lease.room = Taken { messages: 1, bytes };
                left.messages -= 1;
                left.bytes -= bytes;
                taken.messages += 1;
                taken.bytes += bytes;
                run.push(lease);
            }
            self.room.give_back(left);
            let sent = tokio::select! {
                sent = self.emit(Kind::Leased(run)) => sent,
                _ = self.cancel.cancelled() => false,
            };
            if !sent {
                self.room.give_back(taken);
                return;
            }
        }
    }

    /// The settler: the member's settle frames in order, until its queue closes.
    async fn settle(&self, mut jobs: mpsc::Receiver<SettleJob>) {
        let mut carry: Option<SettleJob> = None;
        loop {
            let job = match carry.take() {
                Some(job) => job,
                None => match jobs.recv().await {
                    Some(job) => {
                        let job = self.dequeued(job);
                        if job.op == SettleOp::Ack
                            && jobs.is_empty()
                            && (self.shared.held.lock().len() > job.receipts.len()
                                || CONSUMING.load(Ordering::Relaxed) > 1)
                        {
                            // A member acking a window of leases writes its ack frames
                            // together; the connection is likely still decoding the rest of
                            // them. Let it run first, so they share this settle (one group
                            // commit) instead of one commit, and one receive, each. With other
                            // consumes on this node (members of a group on connections of
                            // their own), the turn lets their connections decode their acks
                            // too, and the WAL writer takes more commits in one batch (8
                            // members at credit 1: 10–17k acks/s with the turn, 11–12k
                            // without). Not for a lone consume whose ack covers every lease
                            // it holds (a window of one, or one frame for its window): no
                            // other ack can be coming, and the turn (tokio polls the I/O
                            // driver before it) only delays this one.
                            tokio::task::yield_now().await;
                        }
                        job
                    }
                    None => return,
                },
            };
            // Consecutive acks go as one operation (one group commit).
            let mut batch = vec![job];
            if batch[0].op == SettleOp::Ack {
                let mut receipts = batch[0].receipts.len();
                while let Ok(next) = jobs.try_recv() {
                    let next = self.dequeued(next);
                    if next.op == SettleOp::Ack && receipts + next.receipts.len() <= MAX_RECEIPTS {
                        receipts += next.receipts.len();
                        batch.push(next);
                    } else {
                        carry = Some(next);
                        break;
                    }
                }
            }
            // The receipts of every frame in one list, moved, not copied (split again below).
            let counts: Vec<usize> = batch.iter().map(|j| j.receipts.len()).collect();
            let mut receipts = std::mem::take(&mut batch[0].receipts);
            for job in &mut batch[1..] {
                receipts.append(&mut job.receipts);
            }
            // An ack while the group has a backlog and the pusher is not receiving: the ack and
            // the receive for the credit it frees go as one group operation (one commit, one
            // durability wait), and its answer and the next leases reach the connection
            // together. The pusher waits meanwhile, then looks at the window again.
            let mut next = None;
            let leasing = if batch[0].op == SettleOp::Ack
                && self.shared.backlog.load(Ordering::Relaxed)
                && !self.cancel.is_cancelled()
            {
                self.shared.leasing.try_lock().ok()
            } else {
                None
            };
            let (room, ended) = match &leasing {
                Some(_) => self.shared.end_leases(&receipts, self.clock.now_ms()),
                None => (0, Vec::new()),
            };
            let results = if room > 0 {
                let request = ReceiveRequest {
                    max: room,
                    ..self.request.clone()
                };
                self.groups
                    .settle_and_receive(
                        &self.stream,
                        &self.group,
                        &receipts,
                        &batch[0].how,
                        &request,
                    )
                    .await
                    .map(|(results, answer)| {
                        next = Some((answer, room));
                        results
                    })
            } else {
                self.groups
                    .settle(&self.stream, &self.group, &receipts, &batch[0].how)
                    .await
            };
            match &results {
                Ok(results) => self.settled(&batch[0], &receipts, results),
                // Nothing was settled: the leases are held as before.
                Err(_) => self.shared.held.lock().extend(ended),
            }
            let mut answers: Vec<Answer> = Vec::with_capacity(batch.len());
            let mut results = results.map_err(ApiError::from);
            // From the last frame back, each takes its receipts (and results) off the end.
            for (job, n) in batch.iter().zip(&counts).rev() {
                let at = receipts.len() - n;
                let answer = match &mut results {
                    Ok(all) => Ok(tail(all, at.min(all.len()))),
                    Err(e) => Err(ApiError::new(e.status, e.code, e.message.clone())),
                };
                answers.push(Answer {
                    id: job.id,
                    op: job.op,
                    receipts: tail(&mut receipts, at),
                    results: answer,
                });
            }
            answers.reverse();
            self.emit(Kind::Settled(answers)).await;
            if let Some((answer, room)) = next {
                self.shared.backlog.store(
                    answer.more || answer.messages.len() >= room as usize,
                    Ordering::Relaxed,
                );
                self.deliver(answer).await;
            }
            if leasing.is_some() {
                drop(leasing);
                // The pusher looks at the window again (it may have room left).
                self.shared.wake.notify_one();
            }
        }
    }

    fn dequeued(&self, job: SettleJob) -> SettleJob {
        self.queued.jobs.fetch_sub(1, Ordering::Relaxed);
        self.queued.bytes.fetch_sub(job.bytes, Ordering::Relaxed);
        job
    }

    /// Credit returns for the leases a settle ended; an extend moves their end.
    fn settled(&self, job: &SettleJob, receipts: &[String], results: &[ReceiptResult]) {
        let mut held = self.shared.held.lock();
        let mut freed = false;
        if ends_lease(job.op) {
            for receipt in receipts {
                freed |= held.remove(receipt).is_some();
            }
        } else {
            let until = self
                .clock
                .now_ms()
                .saturating_add(job.extend_by.as_millis() as u64);
            for (receipt, result) in receipts.iter().zip(results) {
                match result {
                    ReceiptResult::Ok => {
                        if let Some(end) = held.get_mut(receipt) {
                            *end = until;
                        }
                    }
                    // Over: the credit is back.
                    _ => freed |= held.remove(receipt).is_some(),
                }
            }
        }
        drop(held);
        if freed {
            self.shared.wake.notify_one();
        }
    }

    /// Nacks every lease still held, so other members get them at once.
    async fn give_back(&self) {
        let receipts: Vec<String> = self.shared.held.lock().drain().map(|(r, _)| r).collect();
        if receipts.is_empty() {
            return;
        }
        let how = Settle::Nack {
            delay: Duration::ZERO,
            reason: None,
        };
        let all = async {
            for chunk in receipts.chunks(MAX_RECEIPTS) {
                if let Err(e) = self
                    .groups
                    .settle(&self.stream, &self.group, chunk, &how)
                    .await
                {
                    tracing::debug!(error = %e, stream = %self.stream, group = %self.group, "giving leases back failed; they run out instead");
                    return;
                }
            }
        };
        if tokio::time::timeout(GIVE_BACK_WITHIN, all).await.is_err() {
            tracing::debug!(stream = %self.stream, group = %self.group, "giving leases back took too long; they run out instead");
        }
    }
}
