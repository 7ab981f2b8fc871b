//! One WebSocket connection, whatever its protocol: a task that reads client frames (decoded
//! by the [`Protocol`] into commands), delivers every subscription's events through the
//! bounded outbound buffer, pipelines publishes, and watches heartbeats, token expiry, session
//! take-over and shutdown. The same task writes to the socket (see [`super::outbound`]: no
//! writer task, no split socket); each subscription's deliveries come from
//! [`super::deliveries`].

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    future::poll_fn,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::Poll,
    time::Duration,
};

use axum::extract::ws::{Message as WsMessage, WebSocket};
use futures::{FutureExt, StreamExt, future::BoxFuture};
use spool_core::{NewMessage, Position, Start, StreamName, now_ms};
use spool_engine::{Appended, EngineError};
use spool_protocol::ErrorCode;
use tokio::{
    sync::mpsc,
    time::{Instant, Sleep},
};
use tokio_stream::StreamMap;

use super::{
    CloseReason, Command, Event, Protocol, SubscribeOptions, SubscribedTo,
    consume::{Consumes, TaskEvent},
    deliveries::{Deliveries, deliveries},
    outbound::{Close, Frame, Gone, Outbound, Taken},
};
use crate::{
    AppState,
    auth::{Action, Principal, Proof},
    delivery::publish::{self as delivery, ToAppend, Validated},
    delivery::{
        budget::Identity,
        session::{LiveSession, NotRestored, Sessions},
        subscription::{self, Subscription, position_after},
        transient::Transient,
    },
    error::ApiError,
    metrics::Transport,
    query::parse_start,
};

/// Messages read per engine call for one subscription.
const READ_BATCH: usize = 256;
/// Malformed frames tolerated on one connection before it is closed.
const MAX_BAD_FRAMES: u32 = 64;
/// How long the connection's end gets to write what is queued and the close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Pings (WebSocket control pings and `ping` frames) one connection may send per
/// [`PING_WINDOW`]; each costs a reply the client may never read, so a peer that floods them
/// is closed (`1008`) instead of being answered without end.
const MAX_PINGS: u32 = 100;
const PING_WINDOW: Duration = Duration::from_secs(10);
/// Longest a restored subscription waits for the client to say where it is
/// ([`Command::Connect`]'s `hold_restored`) before it delivers from the session's position.
const HOLD_RESTORED: Duration = Duration::from_secs(5);

/// A publish waiting for its ack.
struct Pending {
    id: Option<u64>,
    stream: StreamName,
    message: NewMessage,
}

type Cancelled = tokio_util::sync::WaitForCancellationFutureOwned;

type Round = BoxFuture<'static, Vec<(Option<u64>, StreamName, Result<Appended, ApiError>)>>;

/// Runs one connection speaking `protocol` until it ends, then saves its session.
pub async fn run<P: Protocol>(
    socket: WebSocket,
    state: AppState,
    upgrade_principal: Option<(Principal, Proof)>,
    client: Option<std::net::IpAddr>,
    protocol: P,
) {
    let ws = state.config.ws.clone();
    let out = Outbound::new(
        socket,
        ws.outbound_messages,
        ws.outbound_bytes,
        ws.stuck_timeout,
        state.shutdown.clone(),
    );
    // Consumer groups: the channel of their tasks' events is made by the first consume.
    let mut consumed: Option<mpsc::Receiver<TaskEvent>> = None;

    let mut conn = Connection {
        protocol,
        sessions: state.sessions.clone(),
        state,
        out,
        session: None,
        principal: None,
        identity: None,
        exists: None,
        upgrade_principal,
        client,
        generation: 0,
        generations: HashMap::new(),
        pending: VecDeque::new(),
        pending_bytes: 0,
        round_bytes: 0,
        pings: 0,
        pings_since: Instant::now(),
        bad_frames: 0,
        close: None,
        ending: OnceLock::new(),
        history: HashMap::new(),
        not_before: HashMap::new(),
        held: HashMap::new(),
        consumes: None,
        consumed: None,
    };
    let mut transient = conn.protocol.transient_inbox();
    let mut subs: StreamMap<Arc<str>, Deliveries> = StreamMap::new();
    let mut round: Option<Round> = None;
    let mut expiry: Option<Pin<Box<Sleep>>> = None;
    let opened = Instant::now();
    let ping_interval = conn.protocol.ping_interval(ws.ping_interval);
    // A protocol whose handshake is the upgrade itself connects before reading anything.
    let mut first = match conn.protocol.opening() {
        Some(command) => Box::pin(conn.command(command, &mut subs, &mut expiry))
            .await
            .err(),
        None => None,
    };
    // Heartbeats run on their own clock, not on the coarse tick: a ping every `ping_interval`
    // exactly, and, from the first ping not yet answered, `ping_timeout` for any frame from
    // the client to arrive. One timer serves the three (a `Sleep` each cost every connection
    // ~100 B): it is due at the earliest of them.
    let tick_every = (ws.stuck_timeout / 4)
        .min(ws.connect_timeout / 4)
        .min(ping_interval)
        .max(Duration::from_millis(100));
    let now = Instant::now();
    let mut clock = Clock {
        ping_at: now + ping_interval,
        answer_by: None,
        tick_at: now + tick_every,
    };
    let mut timer = Box::pin(tokio::time::sleep_until(clock.next()));
    // What ends the connection from outside, each waited for by one future made once (a
    // `cancelled()` made on every turn of the loop registered with, and left, each token's
    // notifier, and cloning a token locks it: ~800 instructions per turn for the three).
    let mut shutdown = Box::pin(conn.state.shutdown.clone().cancelled_owned());
    let mut taken_over: Option<Pin<Box<Cancelled>>> = None;
    let mut disconnected: Option<Pin<Box<Cancelled>>> = None;

    loop {
        if let Some(end) = first.take() {
            conn.end(end);
            break;
        }
        if taken_over.is_none()
            && let Some(session) = &conn.session
        {
            taken_over = Some(Box::pin(session.taken_over.clone().cancelled_owned()));
            disconnected = Some(Box::pin(session.disconnected.clone().cancelled_owned()));
        }
        // What the last turn queued goes to the socket now, whichever branch is ready first.
        poll_fn(|cx| {
            let _ = conn.out.poll_write(cx);
            Poll::Ready(())
        })
        .await;
        // Publishes waiting for their ack are bounded in count and in bytes: at either bound,
        // client frames are not read until acks drain (backpressure through TCP).
        let reading = conn.pending.len() < ws.max_inflight_publishes
            && conn.pending_bytes + conn.round_bytes < ws.max_inflight_publish_bytes
            && conn.consumes.as_ref().is_none_or(Consumes::accepting);
        if !reading {
            // While the server does not read, the client's answer cannot be seen: the next
            // ping starts the wait again.
            clock.answer_by = None;
        }
        let result: Result<(), End> = tokio::select! {
            // `end` queues the `reconnect` frame without waiting for room.
            _ = shutdown.as_mut() => Err(End::Close(CloseReason::ShuttingDown)),
            _ = async { taken_over.as_mut().expect("guarded").as_mut().await }, if taken_over.is_some() => {
                Err(End::Close(CloseReason::TakenOver))
            }
            _ = async { disconnected.as_mut().expect("guarded").as_mut().await }, if disconnected.is_some() => {
                Err(End::Close(CloseReason::Disconnected))
            }
            _ = async { expiry.as_mut().expect("guarded").await }, if expiry.is_some() => {
                conn.error(None, ErrorCode::TokenExpired, "the token expired; refresh it before it does").await;
                Err(End::Close(CloseReason::TokenExpired))
            }
            done = async { round.as_mut().expect("guarded").await }, if round.is_some() => {
                round = None;
                conn.round_bytes = 0;
                conn.acks(done).await
            }
            // Also writes what is queued, as the socket takes it.
            frame = conn.out.next_inbound(reading) => {
                clock.answer_by = None;
                match frame {
                    None => Err(End::Gone),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "websocket read failed");
                        Err(End::Close(CloseReason::Unreadable))
                    }
                    Some(Ok(message)) => {
                        conn.inbound(message, &mut subs, &mut expiry).await
                    }
                }
            }
            Some((stream, batch)) = subs.next(), if !subs.is_empty() => {
                conn.deliver(&stream, batch).await
            }
            Some(message) = async { transient.as_mut().expect("guarded").recv().await }, if transient.is_some() => {
                conn.transient(&message)
            }
            Some(event) = async { consumed.as_mut().expect("guarded").recv().await }, if consumed.is_some() => {
                match (conn.consumes.as_mut(), consumed.as_mut()) {
                    (Some(consumes), Some(events)) => {
                        Box::pin(consumes.on_events(event, events, &conn.protocol, &conn.out))
                            .await
                            .map_err(End::from)
                    }
                    _ => Ok(()),
                }
            }
            _ = timer.as_mut() => {
                let now = Instant::now();
                let mut result = Ok(());
                if clock.ping_at <= now {
                    // The next ping is due one interval after this one was: no drift.
                    let next = clock.ping_at + ping_interval;
                    clock.ping_at = if next > now { next } else { now + ping_interval };
                    if clock.answer_by.is_none() {
                        clock.answer_by = Some(now + ws.ping_timeout);
                    }
                    result = conn.ping();
                }
                if result.is_ok() && clock.answer_by.is_some_and(|at| at <= now) {
                    if conn.out.waiting() {
                        // The ping may still be queued behind frames the client has not read
                        // yet: that is the slow-consumer check's business, not a dead peer.
                        clock.answer_by = Some(now + ws.ping_timeout);
                    } else {
                        result = Err(End::Close(CloseReason::PingTimeout));
                    }
                }
                if result.is_ok() && clock.tick_at <= now {
                    clock.tick_at = now + tick_every;
                    result = match conn.protocol.overdue() {
                        Some(why) => Err(End::Close(why)),
                        None => conn.tick(opened, &mut subs),
                    };
                }
                timer.as_mut().reset(clock.next());
                result
            }
        };
        let result = match (result, conn.ending.get()) {
            (Ok(()), Some(why)) => Err(End::Close(*why)),
            (other, _) => other,
        };
        if let Err(end) = result {
            conn.end(end);
            break;
        }
        if round.is_none() && !conn.pending.is_empty() {
            round = Some(conn.start_round());
        }
        if let Some(events) = conn.consumed.take() {
            consumed = Some(events);
        }
    }

    // Let pending acks finish when the socket still works: they are durable, tell the client.
    // Queued, that is, as far as the client makes room within the close's grace: one that
    // reads nothing must not hold the connection's end up (a shutdown, a take-over or a
    // disconnection ends the wait for room at once).
    if let Some(round) = round.take()
        && conn.close.is_some()
    {
        let done = round.await;
        let _ = tokio::time::timeout(CLOSE_GRACE, conn.acks(done)).await;
    }
    drop(subs);
    let close = conn.close.take();
    let session = conn.session.take();
    let sessions = conn.sessions.clone();
    let out = conn.into_out();
    Box::pin(out.finish(close, CLOSE_GRACE)).await;
    if let Some(session) = session {
        sessions.release(&session).await;
    }
}

impl From<Gone> for End {
    fn from(gone: Gone) -> Self {
        match gone {
            Gone::Closed => End::Gone,
            Gone::Stuck => End::Close(CloseReason::SlowConsumer),
            Gone::Ended(why) => End::Close(why),
        }
    }
}

/// When the connection's timer is next due for each of its jobs.
struct Clock {
    /// The next ping.
    ping_at: Instant,
    /// The end of the wait for any frame from the client after a ping not yet answered.
    answer_by: Option<Instant>,
    /// The next coarse tick ([`Connection::tick`], [`Protocol::overdue`]).
    tick_at: Instant,
}

impl Clock {
    fn next(&self) -> Instant {
        let next = self.ping_at.min(self.tick_at);
        self.answer_by.map_or(next, |at| at.min(next))
    }
}

/// Why the connection loop ends.
enum End {
    /// The socket is gone: nothing more can be sent.
    Gone,
    /// Close for this reason (the protocol names the code).
    Close(CloseReason),
}

struct Connection<P> {
    protocol: P,
    state: AppState,
    sessions: Arc<Sessions>,
    out: Outbound,
    session: Option<Arc<LiveSession>>,
    principal: Option<Principal>,
    /// `principal`'s identity for the stream budget, hashed by the first publish (cleared
    /// whenever `principal` is set).
    identity: Option<Identity>,
    /// The stream this connection's last round appended to: it exists, so a round publishing
    /// only to it has no stream to create and skips the stream budget.
    exists: Option<StreamName>,
    /// A credential checked on the upgrade request, used when `connect` carries none.
    upgrade_principal: Option<(Principal, Proof)>,
    /// The client's address, when the listener recorded it: an anonymous caller's identity
    /// for the stream budget.
    client: Option<std::net::IpAddr>,
    /// Generation of the latest subscription per stream (see `LiveSession::delivered`).
    generation: u64,
    generations: HashMap<Arc<str>, u64>,
    pending: VecDeque<Pending>,
    /// Bytes of the publishes in `pending`, and of those in the append round under way.
    pending_bytes: usize,
    round_bytes: usize,
    /// Pings received since `pings_since` (see [`MAX_PINGS`]).
    pings: u32,
    pings_since: Instant,
    bad_frames: u32,
    close: Option<Close>,
    /// A reply whose failure its caller does not pass on (an error reply) found no room
    /// within the stuck timeout (the client reads nothing while it keeps sending requests),
    /// or the connection had to end while it waited: the connection closes for that reason
    /// once the request is handled.
    ending: OnceLock<CloseReason>,
    /// Subscriptions that asked to be told when their history is delivered
    /// ([`SubscribeOptions::report_caught_up`]): the request id and the head to reach.
    history: HashMap<Arc<str>, (Option<u64>, Position)>,
    /// Subscriptions skipping messages older than a time ([`SubscribeOptions::not_before_ms`]).
    not_before: HashMap<Arc<str>, u64>,
    /// Restored subscriptions not delivering yet (`hold_restored`), since when.
    held: HashMap<Arc<str>, (Opened, Instant)>,
    /// Consumer groups consumed on this connection (`super::consume`), from the first consume.
    consumes: Option<Consumes>,
    /// The receiving end of a [`Consumes`] just made, for the connection loop to take.
    consumed: Option<mpsc::Receiver<TaskEvent>>,
}

impl<P: Protocol> Connection<P> {
    /// The socket, everything else dropped (consumes stopped, the protocol's listeners gone).
    fn into_out(self) -> Outbound {
        self.out
    }

    /// The connection ends: for a close, the session notes why, a shutdown says `reconnect`,
    /// the protocol may say why in a frame of its own, and the writer is told the close code.
    /// Those last frames are queued without waiting for room (beyond a full queue, by a frame
    /// or two): nothing waits here for a client that reads nothing.
    fn end(&mut self, end: End) {
        let End::Close(why) = end else {
            return;
        };
        if let (Some(session), Some(note)) = (&self.session, why.session_note()) {
            session.set_last_close(note);
        }
        if matches!(why, CloseReason::SlowConsumer) {
            self.state.metrics.slow_consumer("closed");
        }
        if why == CloseReason::ShuttingDown
            && let Some(reconnect) = self.protocol.encode(&Event::Reconnect {
                reason: "server_shutdown",
            })
        {
            let _ = self.out.send_last(reconnect);
        }
        if let Some(farewell) = self.protocol.farewell(why) {
            let _ = self.out.send_last(farewell);
        }
        let (code, reason) = self.protocol.close(why);
        tracing::debug!(code, reason, "closing a websocket connection");
        self.close = Some(Close { code, reason });
    }

    /// A transient message: sent if the outbound buffer has a slot now, else dropped.
    fn transient(&self, message: &Transient) -> Result<(), End> {
        match self.protocol.encode_transient(message) {
            Some(frame) => self.out.try_send(frame).map_err(End::from),
            None => Ok(()),
        }
    }

    async fn reply(&self, event: &Event<'_>) -> Result<(), End> {
        let Some(message) = self.protocol.encode(event) else {
            return Ok(());
        };
        self.send(message).await
    }

    /// Queues a reply, waiting for room if need be; a close it ran into (stuck, or the
    /// connection ending meanwhile) is also kept in `ending`, for callers that drop the error.
    async fn send(&self, message: WsMessage) -> Result<(), End> {
        let sent = self
            .out
            .send(Frame {
                message,
                room: Taken::default(),
                delivered: None,
            })
            .await
            .map_err(End::from);
        if let Err(End::Close(why)) = &sent {
            let _ = self.ending.set(*why);
        }
        sent
    }

    async fn error(&self, id: Option<u64>, code: ErrorCode, message: impl AsRef<str>) {
        // A close it runs into is kept in `ending` (see `send`).
        let _ = self
            .reply(&Event::Error {
                id,
                code,
                message: message.as_ref(),
            })
            .await;
    }

    async fn api_error(&self, id: Option<u64>, e: ApiError) {
        self.error(id, e.code, e.message).await;
    }

    async fn inbound(
        &mut self,
        message: WsMessage,
        subs: &mut StreamMap<Arc<str>, Deliveries>,
        expiry: &mut Option<Pin<Box<Sleep>>>,
    ) -> Result<(), End> {
        let text = match message {
            WsMessage::Text(text) => text,
            WsMessage::Binary(_) => {
                self.error(
                    None,
                    ErrorCode::BadFrame,
                    format!(
                        "binary frames are not part of {}; send JSON text frames",
                        P::NAME
                    ),
                )
                .await;
                return Err(End::Close(CloseReason::Binary));
            }
            WsMessage::Close(_) => return Err(End::Gone),
            // The WebSocket layer answers a control ping by itself; count it.
            WsMessage::Ping(_) => return self.count_ping().await,
            WsMessage::Pong(_) => return Ok(()),
        };
        let command = match self.protocol.decode(text.as_str()) {
            Ok(command) => command,
            Err(e) => {
                self.bad_frames += 1;
                self.error(e.id, ErrorCode::BadFrame, e.message).await;
                if self.bad_frames >= MAX_BAD_FRAMES {
                    return Err(End::Close(CloseReason::TooManyBadFrames));
                }
                return Ok(());
            }
        };
        match command {
            // The frequent command, handled here; the others (connect, subscribe, consume…)
            // run boxed, so their large futures are not part of every idle connection's.
            Command::Publish { id, message } if self.principal.is_some() => {
                self.queue_publish(id, message).await;
                Ok(())
            }
            command => Box::pin(self.command(command, subs, expiry)).await,
        }
    }

    /// Validates a publish and queues it for the next append round.
    async fn queue_publish(&mut self, id: Option<u64>, message: ToAppend) {
        match self.publish(id, message) {
            Ok(pending) => {
                self.pending_bytes += publish_bytes(&pending.message);
                self.pending.push_back(pending);
            }
            Err(e) => self.api_error(id, e).await,
        }
    }

    async fn command(
        &mut self,
        command: Command,
        subs: &mut StreamMap<Arc<str>, Deliveries>,
        expiry: &mut Option<Pin<Box<Sleep>>>,
    ) -> Result<(), End> {
        match command {
            Command::Answer(Some(frame)) => self.send(frame).await,
            Command::Answer(None) => Ok(()),
            Command::Ping => {
                self.count_ping().await?;
                self.reply(&Event::Pong).await
            }
            Command::Pong => Ok(()),
            Command::Connect {
                token,
                session,
                positions,
                fresh_if_not_restored,
                anonymous,
                hold_restored,
            } => {
                let how = ConnectHow {
                    fresh_if_not_restored,
                    anonymous,
                    hold_restored,
                };
                self.connect(token, session, positions, how, subs, expiry)
                    .await
            }
            _ if self.principal.is_none() => {
                self.error(
                    command.id(),
                    ErrorCode::NotConnected,
                    "send a connect frame first",
                )
                .await;
                Ok(())
            }
            Command::Subscribe {
                id,
                stream,
                after,
                options,
            } => {
                if let Err(e) = self
                    .subscribe(id, &stream, after.as_deref(), options, subs)
                    .await
                {
                    self.api_error(id, e).await;
                }
                Ok(())
            }
            Command::Unsubscribe { id, stream } => {
                self.end_subscription(subs, &stream, id, None).await
            }
            Command::Publish { id, message } => {
                self.queue_publish(id, message).await;
                Ok(())
            }
            Command::Refresh { id, token } => self.refresh(id, &token, subs, expiry).await,
            Command::Consume(command) => {
                let Some(principal) = self.principal.as_ref() else {
                    return Ok(());
                };
                let consumes = match &mut self.consumes {
                    Some(consumes) => consumes,
                    None => {
                        let (consumes, events) = Consumes::new(&self.state, self.out.room.clone());
                        self.consumed = Some(events);
                        self.consumes.insert(consumes)
                    }
                };
                consumes
                    .command(command, principal, &self.state, &self.protocol, &self.out)
                    .await
                    .map_err(End::from)
            }
        }
    }

    async fn connect(
        &mut self,
        token: Option<String>,
        session: Option<String>,
        positions: BTreeMap<String, String>,
        how: ConnectHow,
        subs: &mut StreamMap<Arc<str>, Deliveries>,
        expiry: &mut Option<Pin<Box<Sleep>>>,
    ) -> Result<(), End> {
        if self.principal.is_some() {
            self.error(
                None,
                ErrorCode::NotConnected,
                "already connected; connect is the first frame only",
            )
            .await;
            return Ok(());
        }
        let credential = match token.as_deref().filter(|t| !t.is_empty()) {
            Some(token) => match self.state.auth.verify_with_proof(token) {
                Ok(p) => Some(p),
                Err(e) => {
                    self.api_error(None, e).await;
                    return Err(End::Close(CloseReason::InvalidCredentials));
                }
            },
            None => self.upgrade_principal.clone(),
        };
        let mut not_restored = None;
        let (session, principal, resumed) = match session.as_deref() {
            Some(id) => match self
                .sessions
                .restore(
                    id,
                    credential.as_ref().map(|(p, proof)| (p, proof)),
                    &self.state.auth,
                )
                .await
            {
                Err(e) => {
                    self.api_error(None, e.into()).await;
                    return Ok(());
                }
                Ok(Ok(restored)) => (restored.session, restored.principal, true),
                Ok(Err(why))
                    if credential.is_some()
                        && (why == NotRestored::Unknown || how.fresh_if_not_restored) =>
                {
                    not_restored = Some(
                        match why {
                            NotRestored::Unknown => "unknown_session",
                            NotRestored::OtherIdentity => "other_identity",
                            NotRestored::CredentialExpired => "credential_expired",
                            NotRestored::CredentialRevoked => "credential_revoked",
                        }
                        .to_owned(),
                    );
                    let (principal, proof) =
                        credential.unwrap_or((Principal::Anonymous, Proof::Anonymous));
                    (
                        self.sessions.create(principal.clone(), proof),
                        principal,
                        false,
                    )
                }
                Ok(Err(why)) => {
                    self.error(None, ErrorCode::SessionNotRestored, why.message())
                        .await;
                    return Ok(());
                }
            },
            None => {
                let (principal, proof) = match credential {
                    Some(credential) => credential,
                    None if how
                        .anonymous
                        .unwrap_or(self.state.config.auth.allow_anonymous) =>
                    {
                        (Principal::Anonymous, Proof::Anonymous)
                    }
                    None => {
                        self.error(
                            None,
                            ErrorCode::Unauthorized,
                            "credentials required: a token in connect, or Authorization / ?token= on the upgrade",
                        )
                        .await;
                        return Err(End::Close(CloseReason::CredentialsRequired));
                    }
                };
                (
                    self.sessions.create(principal.clone(), proof),
                    principal,
                    false,
                )
            }
        };
        self.out.set_session(session.clone());
        self.session = Some(session.clone());
        self.principal = Some(principal.clone());
        self.identity = None;
        *expiry = deadline(&principal);

        // Restored subscriptions continue after the client's own positions where it sent them
        // (frames in flight when it dropped are sent again), else after what was delivered.
        let mut restored = Vec::new();
        let mut dropped = Vec::new();
        for (stream, delivered, label) in session.labelled_subscriptions() {
            let position = positions
                .get(stream.as_ref())
                .and_then(|p| p.parse::<Position>().ok())
                .unwrap_or(delivered);
            let Ok(name) = StreamName::new(&stream) else {
                continue;
            };
            if !principal.may(Action::Subscribe, &name) {
                dropped.push((stream, "forbidden"));
                continue;
            }
            match self.open(name, Start::After(position)).await {
                Ok(mut opened) => {
                    opened.label = label;
                    restored.push(opened)
                }
                Err(e) => {
                    tracing::warn!(error = %e, stream = %stream, "could not restore a subscription");
                    dropped.push((stream, "engine_unavailable"));
                }
            }
        }
        let connected = Event::Connected {
            session: &session.id,
            resumed,
            not_restored: not_restored.as_deref(),
            last_close: if resumed {
                session.take_last_close()
            } else {
                None
            },
            subject: principal.subject(),
            subscriptions: restored
                .iter()
                .map(|o| SubscribedTo {
                    id: None,
                    stream: &o.stream,
                    label: o.label.as_deref(),
                    position: &o.position,
                    head: &o.head,
                })
                .collect(),
            session_ttl_ms: self.sessions.ttl().as_millis() as u64,
            ping_interval_ms: self.state.config.ws.ping_interval.as_millis() as u64,
            expires_at: principal.expires_at(),
        };
        self.reply(&connected).await?;
        for (stream, reason) in dropped {
            self.end_subscription(subs, &stream, None, Some(reason))
                .await?;
        }
        for opened in restored {
            if how.hold_restored {
                self.held
                    .insert(opened.stream.clone(), (opened, Instant::now()));
            } else {
                self.activate(opened, subs);
            }
        }
        Ok(())
    }

    async fn subscribe(
        &mut self,
        id: Option<u64>,
        stream: &str,
        after: Option<&str>,
        options: SubscribeOptions,
        subs: &mut StreamMap<Arc<str>, Deliveries>,
    ) -> Result<(), ApiError> {
        let name = StreamName::new(stream).map_err(|e| ApiError::invalid_name(stream, e))?;
        if let Some(principal) = &self.principal {
            principal.check(Action::Subscribe, &name)?;
        }
        let start = parse_start("after", after.unwrap_or("now"))?;
        if options.reposition
            && let Some((held, _)) = self.held.remove(stream)
        {
            // A held restored subscription starts where the client says it is.
            let mut opened = match &start {
                Start::After(p) if *p == held.position => held,
                _ => self.open(name, start).await?,
            };
            opened.label = options.label.clone().map(Arc::from).or(opened.label);
            self.watch_history(id, &opened, &options).await;
            self.activate(opened, subs);
            return Ok(());
        }
        if options.reposition {
            if !subs.contains_key(stream) {
                return Err(ApiError::bad_param(format!("not subscribed to {stream:?}")));
            }
            // Where the subscription already is (what it delivered last), the history asked
            // for is what it delivers next: reopening would send some messages twice.
            let at = self
                .session
                .as_ref()
                .and_then(|s| s.position(stream))
                .filter(|at| matches!(&start, Start::After(p) if p == at));
            let Some(at) = at else {
                let mut opened = self.open(name, start).await?;
                opened.label = options.label.clone().map(Arc::from);
                self.watch_history(id, &opened, &options).await;
                subs.remove(stream);
                self.activate(opened, subs);
                return Ok(());
            };
            if options.report_caught_up {
                let head = self.open(name, Start::Now).await?.head;
                let stream: Arc<str> = Arc::from(stream);
                if at.epoch == head.epoch && at.offset >= head.offset {
                    let _ = self
                        .reply(&Event::CaughtUp {
                            id,
                            stream: &stream,
                        })
                        .await;
                } else {
                    self.history.insert(stream, (id, head));
                }
            }
            return Ok(());
        }
        if subs.contains_key(stream) {
            return Err(ApiError::bad_param(format!(
                "already subscribed to {stream:?}; unsubscribe first to start over"
            )));
        }
        let max = self.state.config.max_streams_per_connection;
        if subs.len() >= max {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::LimitReached,
                format!("at most {max} subscriptions per connection"),
            ));
        }
        let mut opened = self.open(name, start).await?;
        opened.label = options.label.clone().map(Arc::from);
        self.reply(&Event::Subscribed(SubscribedTo {
            id,
            stream,
            label: opened.label.as_deref(),
            position: &opened.position,
            head: &opened.head,
        }))
        .await
        .map_err(|_| ApiError::bad_param("connection closed"))?;
        self.watch_history(id, &opened, &options).await;
        self.activate(opened, subs);
        Ok(())
    }

    /// Sets up what [`SubscribeOptions`] asks of a subscription about to deliver: the time
    /// filter, and the caught-up report (now, when there is no history to deliver).
    async fn watch_history(
        &mut self,
        id: Option<u64>,
        opened: &Opened,
        options: &SubscribeOptions,
    ) {
        let stream = opened.stream.clone();
        self.history.remove(&stream);
        self.not_before.remove(&stream);
        if let Some(ms) = options.not_before_ms {
            self.not_before.insert(stream.clone(), ms);
        }
        if !options.report_caught_up {
            return;
        }
        let (at, head) = (&opened.position, &opened.head);
        if at.epoch == head.epoch && at.offset >= head.offset {
            let _ = self
                .reply(&Event::CaughtUp {
                    id,
                    stream: &stream,
                })
                .await;
        } else {
            self.history.insert(stream, (id, head.clone()));
        }
    }

    /// Opens a subscription and resolves where it starts.
    async fn open(&mut self, name: StreamName, start: Start) -> Result<Opened, EngineError> {
        let mut sub =
            Subscription::open(self.state.engine.clone(), name.clone(), start, READ_BATCH).await?;
        sub.resolve().await?;
        let position = sub.position().cloned().unwrap_or_else(|| {
            Position::new(
                sub.last_state()
                    .map(|s| s.epoch.clone())
                    .unwrap_or_else(spool_core::Epoch::generate),
                spool_core::Offset::ZERO,
            )
        });
        let head = sub
            .last_state()
            .map(|s| s.head_position())
            .unwrap_or_else(|| position.clone());
        Ok(Opened {
            stream: Arc::from(name.as_str()),
            sub,
            position,
            head,
            label: None,
        })
    }

    /// Starts delivering an opened subscription and records it in the session.
    fn activate(&mut self, opened: Opened, subs: &mut StreamMap<Arc<str>, Deliveries>) {
        self.generation += 1;
        let generation = self.generation;
        if let Some(session) = &self.session {
            session.subscribe(
                opened.stream.clone(),
                generation,
                opened.position.clone(),
                opened.label.clone(),
            );
        }
        self.generations.insert(opened.stream.clone(), generation);
        let conflate = self
            .state
            .config
            .ws
            .conflate
            .iter()
            .any(|p| p.matches(&opened.stream));
        subs.insert(
            opened.stream,
            deliveries(
                opened.sub,
                self.out.room.clone(),
                conflate,
                self.state.metrics.clone(),
            ),
        );
    }

    fn publish(&self, id: Option<u64>, message: ToAppend) -> Result<Pending, ApiError> {
        let principal = self
            .principal
            .as_ref()
            .ok_or_else(|| ApiError::bad_param("not connected"))?;
        let Validated { stream, message } =
            delivery::validate(&self.state.config, principal, message)?;
        Ok(Pending {
            id,
            stream,
            message,
        })
    }

    /// Appends every waiting publish: one engine call per stream (keeping each stream's order),
    /// all streams at once.
    fn start_round(&mut self) -> Round {
        self.round_bytes = std::mem::take(&mut self.pending_bytes);
        let engine = self.state.engine.clone();
        // New streams spend the identity's budget (budget.rs); an anonymous caller's identity
        // is its address, as over HTTP.
        let budget = self.state.budget.clone();
        if self.identity.is_none() {
            self.identity = self
                .principal
                .as_ref()
                .map(|p| budget.identity(p, self.client));
        }
        // A round that only appends to the stream the last one appended to creates no stream.
        let known = self
            .exists
            .as_ref()
            .is_some_and(|known| self.pending.iter().all(|p| p.stream == *known));
        let who = if known { None } else { self.identity };
        let (ids, messages): (Vec<Option<u64>>, Vec<Validated>) = self
            .pending
            .drain(..)
            .map(|p| {
                (
                    p.id,
                    Validated {
                        stream: p.stream,
                        message: p.message,
                    },
                )
            })
            .unzip();
        async move {
            let budget = who.map(|who| (budget, who));
            let results = delivery::append_grouped(engine, budget, messages).await;
            ids.into_iter()
                .zip(results)
                .map(|(id, (stream, result))| (id, stream, result))
                .collect()
        }
        .boxed()
    }

    /// Answers a round: its acks (and errors) are queued together and go out in one write.
    async fn acks(
        &mut self,
        done: Vec<(Option<u64>, StreamName, Result<Appended, ApiError>)>,
    ) -> Result<(), End> {
        self.answer_round(done).await
    }

    async fn answer_round(
        &mut self,
        done: Vec<(Option<u64>, StreamName, Result<Appended, ApiError>)>,
    ) -> Result<(), End> {
        for (id, stream, result) in done {
            match result {
                Ok(appended) => {
                    if self.exists.as_ref() != Some(&stream) {
                        self.exists = Some(stream.clone());
                    }
                    if !appended.duplicate {
                        self.state.metrics.publish(crate::metrics::PublishVia::ws);
                    }
                    self.reply(&Event::Ack {
                        id,
                        stream: &stream,
                        appended: &appended,
                    })
                    .await?;
                }
                Err(e) => self.api_error(id, e).await,
            }
        }
        Ok(())
    }

    async fn refresh(
        &mut self,
        id: Option<u64>,
        token: &str,
        subs: &mut StreamMap<Arc<str>, Deliveries>,
        expiry: &mut Option<Pin<Box<Sleep>>>,
    ) -> Result<(), End> {
        let (principal, proof) = match self.state.auth.verify_with_proof(token) {
            Ok(p) => p,
            Err(e) => {
                self.api_error(id, e).await;
                return Ok(());
            }
        };
        if !self
            .principal
            .as_ref()
            .is_some_and(|current| current.same_identity(&principal))
        {
            self.error(
                id,
                ErrorCode::Forbidden,
                "a refresh must keep the identity (same sub); connect anew for another one",
            )
            .await;
            return Ok(());
        }
        *expiry = deadline(&principal);
        if let Some(session) = &self.session {
            session.set_principal(principal.clone(), proof);
        }
        // Rights may have shrunk: end subscriptions the new token no longer allows.
        let lost: Vec<Arc<str>> = subs
            .keys()
            .filter(|s| {
                StreamName::new(s).map_or(true, |name| !principal.may(Action::Subscribe, &name))
            })
            .cloned()
            .collect();
        self.principal = Some(principal.clone());
        self.identity = None;
        if let Some(consumes) = &mut self.consumes {
            consumes.retain_allowed(&principal);
        }
        self.reply(&Event::Refreshed {
            id,
            expires_at: principal.expires_at(),
        })
        .await?;
        for stream in lost {
            self.end_subscription(subs, &stream, None, Some("forbidden"))
                .await?;
        }
        Ok(())
    }

    /// Ends a subscription (asked for by the client, or with the server's `reason`): no more
    /// deliveries, out of the session, and `unsubscribed` (also when it was not subscribed).
    async fn end_subscription(
        &mut self,
        subs: &mut StreamMap<Arc<str>, Deliveries>,
        stream: &str,
        id: Option<u64>,
        reason: Option<&str>,
    ) -> Result<(), End> {
        subs.remove(stream);
        self.held.remove(stream);
        self.generations.remove(stream);
        self.history.remove(stream);
        self.not_before.remove(stream);
        if let Some(session) = &self.session {
            session.unsubscribe(stream);
        }
        self.reply(&Event::Unsubscribed { id, stream, reason })
            .await
    }

    /// Delivers a subscription's batch: its frames are queued together and go out in one
    /// write.
    async fn deliver(
        &mut self,
        stream: &Arc<str>,
        batch: Vec<(subscription::Event, Taken)>,
    ) -> Result<(), End> {
        self.deliver_batch(stream, batch).await
    }

    async fn deliver_batch(
        &mut self,
        stream: &Arc<str>,
        batch: Vec<(subscription::Event, Taken)>,
    ) -> Result<(), End> {
        let generation = self.generations.get(stream).copied().unwrap_or(0);
        let mut delivered = 0;
        for (event, room) in batch {
            let position = position_after(&event);
            // The history asked for is delivered with this message (or a reset says it
            // cannot be).
            let caught_up = match &event {
                subscription::Event::Message { message, epoch } => self
                    .history
                    .get(stream)
                    .is_some_and(|(_, head)| &head.epoch == epoch && message.offset >= head.offset),
                subscription::Event::Reset { .. } => {
                    self.history.remove(stream);
                    self.not_before.remove(stream);
                    false
                }
                subscription::Event::Skipped { .. } => false,
            };
            let message = match &event {
                subscription::Event::Message { message, .. }
                    if self
                        .not_before
                        .get(stream)
                        .is_some_and(|t| message.time_ms < *t) =>
                {
                    None
                }
                subscription::Event::Message { epoch, message } => {
                    self.not_before.remove(stream);
                    delivered += 1;
                    self.protocol.encode(&Event::Message {
                        stream,
                        epoch,
                        message,
                    })
                }
                subscription::Event::Reset { reason, head } => {
                    self.state.metrics.reset(*reason);
                    self.protocol.encode(&Event::Reset {
                        stream,
                        reason: *reason,
                        head,
                    })
                }
                subscription::Event::Skipped {
                    epoch,
                    after,
                    through,
                    count,
                } => self.protocol.encode(&Event::Skipped {
                    stream,
                    epoch,
                    after: after.get(),
                    through: through.get(),
                    count: *count,
                }),
            };
            match message {
                Some(message) => self
                    .out
                    .send(Frame {
                        message,
                        room,
                        delivered: Some((stream.clone(), generation, position)),
                    })
                    .await
                    .map_err(End::from)?,
                None => self.out.room.give_back(room),
            }
            if caught_up && let Some((id, _)) = self.history.remove(stream) {
                self.reply(&Event::CaughtUp { id, stream }).await?;
            }
        }
        self.state.metrics.delivered(Transport::ws, delivered);
        Ok(())
    }

    /// A ping is due: the protocol's ping (for clients that watch for silence) and a WebSocket
    /// control ping (which any WebSocket library answers by itself). Dropped, not waited for,
    /// when the outbound queue is full.
    fn ping(&self) -> Result<(), End> {
        if let Some(ping) = self.protocol.encode(&Event::Ping) {
            self.out.try_send(ping).map_err(End::from)?;
        }
        if self.principal.is_none() {
            // Before `connect` only the protocol's own ping counts: a WebSocket library
            // answers control pings by itself, which would keep a peer that never speaks
            // the protocol open until the connect timeout.
            return Ok(());
        }
        self.out
            .try_send(WsMessage::Ping(Default::default()))
            .map_err(End::from)
    }

    /// Counts a ping from the client; too many in a window close the connection.
    async fn count_ping(&mut self) -> Result<(), End> {
        if self.pings_since.elapsed() >= PING_WINDOW {
            self.pings_since = Instant::now();
            self.pings = 0;
        }
        self.pings += 1;
        if self.pings <= MAX_PINGS {
            return Ok(());
        }
        let message = format!("more than {MAX_PINGS} pings in {} s", PING_WINDOW.as_secs());
        if let Some(error) = self.protocol.encode(&Event::Error {
            id: None,
            code: ErrorCode::LimitReached,
            message: &message,
        }) {
            let _ = self.out.try_send(error);
        }
        Err(End::Close(CloseReason::TooManyPings))
    }
    fn tick(
        &mut self,
        opened: Instant,
        subs: &mut StreamMap<Arc<str>, Deliveries>,
    ) -> Result<(), End> {
        let due: Vec<Arc<str>> = self
            .held
            .iter()
            .filter(|(_, (_, since))| since.elapsed() >= HOLD_RESTORED)
            .map(|(stream, _)| stream.clone())
            .collect();
        for stream in due {
            if let Some((opened, _)) = self.held.remove(&stream) {
                self.activate(opened, subs);
            }
        }
        let ws = &self.state.config.ws;
        if self.principal.is_none() && opened.elapsed() >= ws.connect_timeout {
            return Err(End::Close(CloseReason::ConnectTimeout));
        }
        if self.out.stalled_for() >= ws.stuck_timeout {
            if let Some(error) = self.protocol.encode(&Event::Error {
                id: None,
                code: ErrorCode::SlowConsumer,
                message: "the client read nothing for too long; reconnect with the session to resume from history",
            }) {
                let _ = self.out.try_send(error);
            }
            return Err(End::Close(CloseReason::SlowConsumer));
        }
        Ok(())
    }
}

/// A subscription opened and resolved, not yet delivering.
struct Opened {
    stream: Arc<str>,
    sub: Subscription,
    position: Position,
    head: Position,
    /// The protocol's name for it ([`SubscribeOptions::label`]).
    label: Option<Arc<str>>,
}

/// How a `connect` treats a session it cannot restore and a missing credential.
struct ConnectHow {
    fresh_if_not_restored: bool,
    anonymous: Option<bool>,
    hold_restored: bool,
}

/// When a credential expiring at `expires_at` (ms) must close the connection.
fn deadline(principal: &Principal) -> Option<Pin<Box<Sleep>>> {
    let expires_at = principal.expires_at()?;
    let left = Duration::from_millis(expires_at.saturating_sub(now_ms()));
    Some(Box::pin(tokio::time::sleep(left)))
}

/// What a publish waiting for its ack holds in memory, roughly.
fn publish_bytes(m: &NewMessage) -> usize {
    m.payload.len()
        + m.content_type.as_ref().map_or(0, String::len)
        + m.key.as_ref().map_or(0, String::len)
        + m.idempotency_key.as_ref().map_or(0, String::len)
        + m.headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + 128
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn of five arguments returns.
    fn future_size<A, B, C, D, E, F: std::future::Future>(_: impl Fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle connection holds its task's future: the connection loop's state with every
    /// branch it may be awaiting. Commands other than publish run boxed, so this stays small;
    /// memory per connection itself is measured by `spool-bench ws-idle` (docs/benchmarks.md).
    #[test]
    fn the_connection_future_holds_no_cold_branch() {
        let spool = future_size(run::<crate::ws::spool_v1::SpoolV1>);
        let cable = future_size(run::<crate::ws::actioncable::ActionCable>);
        eprintln!(
            "connection future: spool.v1.json {spool} B, actioncable {cable} B (the connection's \
             own state: {} B)",
            std::mem::size_of::<Connection<crate::ws::spool_v1::SpoolV1>>(),
        );
        // Debug builds (tests) lay futures out larger than release builds: 4,192 and 4,880 B
        // here when this was last changed (the socket itself is part of the connection's state
        // since there is no writer task and no split socket: it was in the split's heap
        // allocation before); a command's future inlined again would add kilobytes.
        assert!(
            spool <= 4608,
            "spool.v1.json connection future is {spool} B"
        );
        assert!(cable <= 5120, "actioncable connection future is {cable} B");
    }
}
