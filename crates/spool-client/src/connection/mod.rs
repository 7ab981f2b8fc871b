//! The background task that owns the socket.
//!
//! One task owns everything mutable: the WebSocket, the session id, every subscription's
//! [`Cursor`], the publishes awaiting their ack. The [`Client`](crate::Client) handles talk
//! to it over two bounded channels: [`Command`]s in, [`Event`]s out. Emitting an event waits
//! for room, and while it waits the task reads nothing from the socket, so an application
//! that stops reading events slows the server down (its flow control) instead of growing a
//! queue here.
//!
//! The life of the task: [`Connection::establish`] (dial, `connect`, `connected`, then put
//! every subscription and unacknowledged publish back), [`Connection::serve`] until the
//! connection ends, then — if the close code allows it — wait a backoff delay (still taking
//! commands) and establish again, resuming the session with the positions the application
//! processed. [`handshake`] opens connections; [`frames`] handles what the server sends.

mod frames;
mod handshake;

use std::{collections::BTreeMap, time::Duration};

use futures::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use spool_core::{Start, StreamName};
use spool_protocol::ws::{self, ClientFrame, SettleOp};
use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot},
    time::{Instant, timeout},
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        Message as WsMessage,
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};
use tokio_util::sync::CancellationToken;

use self::frames::subscription;
use spool_protocol::groups::ReceiptOutcome;

use crate::{Ack, Config, Error, Event, Subscription, backoff::Backoff, cursor::Cursor};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sink = SplitSink<Ws, WsMessage>;
/// The read half of an established connection.
pub(crate) type Source = SplitStream<Ws>;

/// Where a request's answer goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// How long a graceful close waits for the server's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How many queued commands are handled before the socket gets a turn again.
const COMMAND_BATCH: usize = 64;

/// What the application asks of the task.
pub(crate) enum Command {
    Subscribe {
        stream: String,
        start: Start,
        reply: Reply<Subscription>,
    },
    Unsubscribe {
        stream: String,
        reply: Reply<()>,
    },
    Publish {
        frame: ws::Publish,
        reply: Reply<Ack>,
    },
    Refresh {
        token: String,
        reply: Reply<Option<u64>>,
    },
    /// Consumer groups (docs/protocol.md "Consumer groups").
    Consume {
        frame: ws::Consume,
        reply: Reply<()>,
    },
    Credit {
        stream: String,
        group: String,
        credit: u32,
        reply: Reply<()>,
    },
    Settle {
        op: SettleOp,
        frame: ws::Settle,
        reply: Reply<Vec<ReceiptOutcome>>,
    },
    StopConsuming {
        stream: String,
        group: String,
        reply: Reply<()>,
    },
}

/// A consume, kept across connections: sent again after a reconnect (the server gave its
/// leases back when the connection ended).
struct Consuming {
    frame: ws::Consume,
    /// The id of the `consume` sent on this connection and not answered yet.
    pending: Option<u64>,
    /// The application's `consume` call, until the first `consuming`.
    waiter: Option<Reply<()>>,
}

/// A consumer-group request waiting for its answer on this connection.
enum GroupAnswer {
    /// `credit` and `stop_consuming`.
    Done(Reply<()>),
    Settled(Reply<Vec<ReceiptOutcome>>),
}

/// Why a connection (or the whole task) ended.
pub(crate) enum End {
    /// The application closed the client or dropped every handle.
    Stopped,
    /// The connection broke in a way a reconnect may fix.
    Lost(Error),
    /// Reconnecting would not help.
    Fatal(Error),
}

/// One subscription, kept across connections.
struct Sub {
    start: Start,
    cursor: Cursor,
    /// The id of the `subscribe` sent on this connection and not answered yet.
    pending: Option<u64>,
    /// The server confirmed it on this connection.
    active: bool,
    /// The application's `subscribe` call, until the first confirmation.
    waiter: Option<Reply<Subscription>>,
}

struct PendingPublish {
    /// With its id and idempotency key: resent as it is after a reconnect.
    frame: ws::Publish,
    reply: Reply<Ack>,
}

struct PendingRefresh {
    token: String,
    reply: Reply<Option<u64>>,
}

/// The state the background task owns.
pub(crate) struct Connection {
    config: Config,
    /// The credential for the next `connect`; replaced by a successful refresh.
    token: Option<String>,
    session: Option<String>,
    subs: BTreeMap<String, Sub>,
    /// By request id, so a resend after a reconnect keeps the application's order.
    publishes: BTreeMap<u64, PendingPublish>,
    /// Refreshes sent on this connection.
    refreshes: BTreeMap<u64, PendingRefresh>,
    /// Refreshes answered by the next `connected` (its token is already in `token`).
    refreshes_after_connect: Vec<Reply<Option<u64>>>,
    /// Consumes by (stream, group), and their requests waiting for an answer by id.
    consumes: BTreeMap<(String, String), Consuming>,
    group_answers: BTreeMap<u64, GroupAnswer>,
    next_id: u64,
    /// The write half of the current connection, if there is one.
    sink: Option<Sink>,
    /// The reason of a `reconnect` frame, reported when the close follows.
    going_away: Option<String>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
    backoff: Backoff,
}

impl Connection {
    pub(crate) fn new(
        config: Config,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            token: config.token.clone(),
            backoff: Backoff::new(config.backoff_min, config.backoff_max),
            config,
            session: None,
            subs: BTreeMap::new(),
            publishes: BTreeMap::new(),
            refreshes: BTreeMap::new(),
            refreshes_after_connect: Vec::new(),
            consumes: BTreeMap::new(),
            group_answers: BTreeMap::new(),
            next_id: 1,
            sink: None,
            going_away: None,
            commands,
            events,
            cancel,
        }
    }

    /// The task: serve connections until the application closes or a terminal error.
    pub(crate) async fn run(mut self, mut established: Option<(Source, u64)>) {
        let terminal = loop {
            let (source, ping_interval_ms) = match established.take() {
                Some(connection) => connection,
                None => {
                    let delay = self.backoff.next_delay();
                    tracing::debug!(?delay, "reconnecting after a delay");
                    if let Err(End::Stopped) = self.wait(delay).await {
                        break None;
                    }
                    match self.establish().await {
                        Ok(connection) => connection,
                        Err(End::Stopped) => break None,
                        Err(End::Fatal(error)) => break Some(error),
                        Err(End::Lost(error)) => {
                            tracing::debug!(%error, "reconnect failed");
                            self.disconnected();
                            continue;
                        }
                    }
                }
            };
            match self.serve(source, ping_interval_ms).await {
                End::Stopped => break None,
                End::Fatal(error) => break Some(error),
                End::Lost(error) => {
                    tracing::debug!(%error, "connection lost");
                    self.disconnected();
                    let reason = match self.going_away.take() {
                        Some(why) => format!("the server is going away ({why})"),
                        None => error.to_string(),
                    };
                    if self.emit(Event::Disconnected { reason }).await.is_err() {
                        break None;
                    }
                }
            }
        };
        self.shutdown(terminal).await;
    }

    /// Dials, exchanges `connect`/`connected` and puts the subscriptions and unacknowledged
    /// publishes back. Returns the read half and the server's ping interval.
    pub(crate) async fn establish(&mut self) -> Result<(Source, u64), End> {
        let cancel = self.cancel.clone();
        let opened = tokio::select! {
            _ = cancel.cancelled() => return Err(End::Stopped),
            opened = self.open() => opened,
        };
        let (ws, connected) = opened.map_err(|f| match f.retry {
            true => End::Lost(f.error),
            false => End::Fatal(f.error),
        })?;
        let ping_interval_ms = connected.ping_interval_ms;
        let (sink, source) = ws.split();
        self.sink = Some(sink);
        self.on_connected(connected).await?;
        Ok((source, ping_interval_ms))
    }

    /// A connection is up: answer waiting refreshes, adopt restored subscriptions,
    /// (re)subscribe the rest after their cursors, resend unacknowledged publishes.
    async fn on_connected(&mut self, connected: ws::Connected) -> Result<(), End> {
        self.backoff.reset();
        self.session = Some(connected.session.clone());
        for reply in self.refreshes_after_connect.drain(..) {
            let _ = reply.send(Ok(connected.expires_at));
        }
        self.emit(Event::Connected {
            session: connected.session,
            resumed: connected.resumed,
        })
        .await?;

        let mut confirmed = Vec::new();
        let mut stale = Vec::new();
        if connected.resumed {
            for restored in connected.subscriptions {
                if !self.subs.contains_key(&restored.stream) {
                    // Unsubscribed while the connection was down.
                    stale.push(restored.stream);
                    continue;
                }
                match subscription(&restored) {
                    Ok(info) => confirmed.push(info),
                    Err(error) => self.warn(error).await?,
                }
            }
        }
        for info in confirmed {
            self.confirm(info).await?;
        }
        for stream in stale {
            let id = self.take_id();
            self.feed(ClientFrame::Unsubscribe(ws::Unsubscribe {
                id: Some(id),
                stream,
            }))
            .await?;
        }
        let inactive: Vec<String> = self
            .subs
            .iter()
            .filter(|(_, sub)| !sub.active)
            .map(|(stream, _)| stream.clone())
            .collect();
        for stream in inactive {
            self.send_subscribe(stream).await?;
        }
        let frames: Vec<ws::Publish> = self.publishes.values().map(|p| p.frame.clone()).collect();
        for frame in frames {
            self.feed(ClientFrame::Publish(frame)).await?;
        }
        let consumes: Vec<(String, String)> = self.consumes.keys().cloned().collect();
        for key in consumes {
            self.send_consume(&key).await?;
        }
        self.flush().await
    }

    /// The connection is gone: every subscription must be confirmed again, and refreshes
    /// in flight are answered by the next `connected` (their token is used for it).
    fn disconnected(&mut self) {
        self.sink = None;
        for sub in self.subs.values_mut() {
            sub.active = false;
            sub.pending = None;
        }
        for (_, refresh) in std::mem::take(&mut self.refreshes) {
            self.token = Some(refresh.token);
            self.refreshes_after_connect.push(refresh.reply);
        }
        // Consumes are sent again on the next connection (with the credit asked for last);
        // the leases they held were given back, so their settles cannot be answered.
        for consume in self.consumes.values_mut() {
            consume.pending = None;
        }
        for (_, answer) in std::mem::take(&mut self.group_answers) {
            match answer {
                GroupAnswer::Done(reply) => drop(reply.send(Ok(()))),
                GroupAnswer::Settled(reply) => drop(
                    reply.send(Err(Error::ConnectionLost(
                        "the connection was lost before the settle was answered; the leases \
                     were given back"
                            .into(),
                    ))),
                ),
            }
        }
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, mut source: Source, ping_interval_ms: u64) -> End {
        // The server pings a quiet connection every `ping_interval_ms`; twice that without
        // a frame means the peer (or the path to it) is dead.
        let dead_after = (ping_interval_ms > 0)
            .then(|| Duration::from_millis(ping_interval_ms.saturating_mul(2)));
        let mut last_heard = Instant::now();
        let cancel = self.cancel.clone();
        loop {
            let deadline = dead_after.map(|d| last_heard + d);
            let room = self.publishes.len() < self.config.max_pending_publishes;
            let step = tokio::select! {
                biased;
                _ = cancel.cancelled() => Err(End::Stopped),
                incoming = source.next() => {
                    let step = self.incoming(incoming).await;
                    // Time spent waiting for the application to take events is not the
                    // server's silence.
                    last_heard = Instant::now();
                    step
                }
                command = self.commands.recv(), if room => match command {
                    Some(command) => self.commands_batch(command).await,
                    None => Err(End::Stopped),
                },
                _ = sleep_until(deadline), if deadline.is_some() => Err(End::Lost(
                    Error::ConnectionLost(format!(
                        "nothing heard from the server for {} ms",
                        ping_interval_ms.saturating_mul(2)
                    )),
                )),
            };
            let step = match step {
                Ok(()) => self.flush().await,
                Err(end) => Err(end),
            };
            match step {
                Ok(()) => {}
                Err(End::Stopped) => {
                    self.goodbye(&mut source).await;
                    return End::Stopped;
                }
                Err(end) => return end,
            }
        }
    }

    /// Handles `first` and whatever other commands are already queued (up to a batch), so
    /// their frames go out in one flush.
    async fn commands_batch(&mut self, first: Command) -> Result<(), End> {
        self.command(first).await?;
        for _ in 1..COMMAND_BATCH {
            if self.publishes.len() >= self.config.max_pending_publishes {
                break;
            }
            match self.commands.try_recv() {
                Ok(command) => self.command(command).await?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    /// Waits out a backoff delay while taking commands (they are sent once connected).
    async fn wait(&mut self, delay: Duration) -> Result<(), End> {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        let cancel = self.cancel.clone();
        loop {
            let room = self.publishes.len() < self.config.max_pending_publishes;
            tokio::select! {
                _ = cancel.cancelled() => return Err(End::Stopped),
                _ = &mut sleep => return Ok(()),
                command = self.commands.recv(), if room => match command {
                    Some(command) => self.command(command).await?,
                    None => return Err(End::Stopped),
                },
            }
        }
    }

    /// Closes the WebSocket properly: our close frame, then the server's (briefly).
    async fn goodbye(&mut self, source: &mut Source) {
        let Some(mut sink) = self.sink.take() else {
            return;
        };
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = timeout(CLOSE_GRACE, sink.send(WsMessage::Close(Some(frame)))).await;
        let _ = timeout(CLOSE_GRACE, async {
            while let Some(Ok(message)) = source.next().await {
                if message.is_close() {
                    break;
                }
            }
        })
        .await;
    }

    /// The task ends: fail every request still waiting, report a terminal error.
    async fn shutdown(mut self, terminal: Option<Error>) {
        if let Some(mut sink) = self.sink.take() {
            let _ = timeout(CLOSE_GRACE, sink.close()).await;
        }
        let error = terminal.clone().unwrap_or(Error::ClientClosed);
        for (_, publish) in std::mem::take(&mut self.publishes) {
            let _ = publish.reply.send(Err(error.clone()));
        }
        for (_, refresh) in std::mem::take(&mut self.refreshes) {
            let _ = refresh.reply.send(Err(error.clone()));
        }
        for reply in self.refreshes_after_connect.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
        for (_, sub) in std::mem::take(&mut self.subs) {
            if let Some(waiter) = sub.waiter {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        for (_, consume) in std::mem::take(&mut self.consumes) {
            if let Some(waiter) = consume.waiter {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        for (_, answer) in std::mem::take(&mut self.group_answers) {
            match answer {
                GroupAnswer::Done(reply) => drop(reply.send(Err(error.clone()))),
                GroupAnswer::Settled(reply) => drop(reply.send(Err(error.clone()))),
            }
        }
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            command.fail(error.clone());
        }
        if let Some(error) = terminal {
            let _ = self
                .emit(Event::Error {
                    error,
                    terminal: true,
                })
                .await;
        }
    }

    async fn command(&mut self, command: Command) -> Result<(), End> {
        match command {
            Command::Subscribe {
                stream,
                start,
                reply,
            } => {
                if StreamName::new(&stream).is_err() {
                    let _ = reply.send(Err(Error::InvalidStreamName(stream)));
                    return Ok(());
                }
                if self.subs.contains_key(&stream) {
                    let _ = reply.send(Err(Error::AlreadySubscribed(stream)));
                    return Ok(());
                }
                let sub = Sub {
                    cursor: Cursor::starting(&start),
                    start,
                    pending: None,
                    active: false,
                    waiter: Some(reply),
                };
                self.subs.insert(stream.clone(), sub);
                if self.sink.is_some() {
                    self.send_subscribe(stream).await?;
                }
            }
            Command::Unsubscribe { stream, reply } => {
                if self.subs.remove(&stream).is_some() && self.sink.is_some() {
                    let id = self.take_id();
                    self.feed(ClientFrame::Unsubscribe(ws::Unsubscribe {
                        id: Some(id),
                        stream,
                    }))
                    .await?;
                }
                let _ = reply.send(Ok(()));
            }
            Command::Consume { frame, reply } => {
                let key = (frame.stream.clone(), frame.group.clone());
                if self.consumes.contains_key(&key) {
                    let _ = reply.send(Err(Error::Protocol(format!(
                        "already consuming group {:?} of stream {:?}; use credit",
                        key.1, key.0
                    ))));
                    return Ok(());
                }
                self.consumes.insert(
                    key.clone(),
                    Consuming {
                        frame,
                        pending: None,
                        waiter: Some(reply),
                    },
                );
                if self.sink.is_some() {
                    self.send_consume(&key).await?;
                }
            }
            Command::Credit {
                stream,
                group,
                credit,
                reply,
            } => {
                let Some(consume) = self.consumes.get_mut(&(stream.clone(), group.clone())) else {
                    let _ = reply.send(Err(Error::Protocol(format!(
                        "not consuming group {group:?} of stream {stream:?}"
                    ))));
                    return Ok(());
                };
                consume.frame.credit = credit;
                if self.sink.is_none() {
                    // Sent with the consume on the next connection.
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                let id = self.take_id();
                self.group_answers.insert(id, GroupAnswer::Done(reply));
                self.feed(ClientFrame::Credit(ws::Credit {
                    id: Some(id),
                    stream,
                    group,
                    credit,
                }))
                .await?;
            }
            Command::Settle {
                op,
                mut frame,
                reply,
            } => {
                if self.sink.is_none() {
                    let _ = reply.send(Err(Error::ConnectionLost(
                        "not connected: the leases were given back when the connection ended"
                            .into(),
                    )));
                    return Ok(());
                }
                let id = self.take_id();
                frame.id = Some(id);
                self.group_answers.insert(id, GroupAnswer::Settled(reply));
                self.feed(op.frame(frame)).await?;
            }
            Command::StopConsuming {
                stream,
                group,
                reply,
            } => {
                let was = self.consumes.remove(&(stream.clone(), group.clone()));
                if was.is_none() || self.sink.is_none() {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                let id = self.take_id();
                self.group_answers.insert(id, GroupAnswer::Done(reply));
                self.feed(ClientFrame::StopConsuming(ws::StopConsuming {
                    id: Some(id),
                    stream,
                    group,
                }))
                .await?;
            }
            Command::Publish { mut frame, reply } => {
                let id = self.take_id();
                frame.id = Some(id);
                if self.sink.is_some() {
                    self.feed(ClientFrame::Publish(frame.clone())).await?;
                }
                self.publishes.insert(id, PendingPublish { frame, reply });
            }
            Command::Refresh { token, reply } => {
                if self.sink.is_some() {
                    let id = self.take_id();
                    self.feed(ClientFrame::Refresh(ws::Refresh {
                        id: Some(id),
                        token: token.clone(),
                    }))
                    .await?;
                    self.refreshes.insert(id, PendingRefresh { token, reply });
                } else {
                    self.token = Some(token);
                    self.refreshes_after_connect.push(reply);
                }
            }
        }
        Ok(())
    }

    /// The server confirmed a subscription (a `subscribed`, or restored on resume).
    async fn confirm(&mut self, info: Subscription) -> Result<(), End> {
        let Some(sub) = self.subs.get_mut(&info.stream) else {
            return Ok(());
        };
        sub.pending = None;
        sub.active = true;
        sub.cursor.continue_after(info.position.clone());
        if let Some(waiter) = sub.waiter.take() {
            let _ = waiter.send(Ok(info.clone()));
        }
        self.emit(Event::Subscribed(info)).await
    }

    async fn send_subscribe(&mut self, stream: String) -> Result<(), End> {
        let id = self.take_id();
        let Some(sub) = self.subs.get_mut(&stream) else {
            return Ok(());
        };
        sub.pending = Some(id);
        let after = sub.cursor.after(&sub.start);
        self.feed(ClientFrame::Subscribe(ws::Subscribe {
            id: Some(id),
            stream,
            after: Some(after),
        }))
        .await
    }

    /// Sends the `consume` of `key` on this connection.
    async fn send_consume(&mut self, key: &(String, String)) -> Result<(), End> {
        let id = self.take_id();
        let Some(consume) = self.consumes.get_mut(key) else {
            return Ok(());
        };
        consume.pending = Some(id);
        let mut frame = consume.frame.clone();
        frame.id = Some(id);
        self.feed(ClientFrame::Consume(frame)).await
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Hands an event to the application, waiting for room (this is the backpressure).
    async fn emit(&self, event: Event) -> Result<(), End> {
        tokio::select! {
            sent = self.events.send(event) => sent.map_err(|_| End::Stopped),
            _ = self.cancel.cancelled() => Err(End::Stopped),
        }
    }

    /// A problem that does not end the connection.
    async fn warn(&self, error: Error) -> Result<(), End> {
        tracing::warn!(%error, "spool client");
        self.emit(Event::Error {
            error,
            terminal: false,
        })
        .await
    }

    /// Queues a frame on the socket; [`Connection::flush`] sends it.
    async fn feed(&mut self, frame: ClientFrame) -> Result<(), End> {
        match &mut self.sink {
            Some(sink) => sink
                .feed(encode(&frame))
                .await
                .map_err(|e| End::Lost(Error::ConnectionLost(e.to_string()))),
            None => Ok(()),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        match &mut self.sink {
            Some(sink) => sink
                .flush()
                .await
                .map_err(|e| End::Lost(Error::ConnectionLost(e.to_string()))),
            None => Ok(()),
        }
    }
}

impl Command {
    fn fail(self, error: Error) {
        match self {
            Command::Subscribe { reply, .. } => drop(reply.send(Err(error))),
            Command::Unsubscribe { reply, .. } => drop(reply.send(Err(error))),
            Command::Publish { reply, .. } => drop(reply.send(Err(error))),
            Command::Refresh { reply, .. } => drop(reply.send(Err(error))),
            Command::Consume { reply, .. }
            | Command::Credit { reply, .. }
            | Command::StopConsuming { reply, .. } => drop(reply.send(Err(error))),
            Command::Settle { reply, .. } => drop(reply.send(Err(error))),
        }
    }
}

fn encode(frame: &ClientFrame) -> WsMessage {
    // Client frames are plain data: serializing them cannot fail.
    WsMessage::text(serde_json::to_string(frame).expect("client frames serialize"))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
