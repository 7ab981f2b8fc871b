//! What any WebSocket protocol needs, whatever its frames look like: the connection loop
//! ([`connection`]: sessions restored and taken over, flow-controlled subscriptions, publish
//! rounds, heartbeats, token expiry, shutdown), the socket and its bounded outbound buffer,
//! written by the connection's own task ([`outbound`]), and the per-subscription delivery
//! streams ([`deliveries`]).
//!
//! A protocol plugs in through [`Protocol`]: it decodes a client frame into a [`Command`] and
//! encodes an [`Event`] into a frame, and names the close code and reason of each
//! [`CloseReason`]. The core never names a frame type of any protocol; `super::spool_v1` and
//! `super::actioncable` are the protocols over it, each a folder implementing [`Protocol`],
//! picked by subprotocol in `super::upgrade`.

mod connection;
pub mod consume;
mod deliveries;
mod outbound;

use std::collections::BTreeMap;

use axum::extract::ws::Message as WsMessage;
use spool_core::{Epoch, Message, Position, ResetReason, StreamName};
use spool_engine::Appended;
use spool_protocol::ErrorCode;

pub use connection::run;

use crate::delivery::{publish::ToAppend, transient::Transient};

/// A WebSocket protocol: its subprotocol name, how a client frame becomes a [`Command`], and
/// how an [`Event`] becomes a frame. Kept small on purpose: everything else is the core's.
pub trait Protocol: Send + 'static {
    /// The subprotocol name negotiated on the upgrade.
    const NAME: &'static str;

    /// A client text frame as a command, or why it is not one.
    fn decode(&mut self, text: &str) -> Result<Command, DecodeError>;

    /// An event as the frame to send, or `None` when the protocol has no frame for it (the
    /// event is then not sent). A message delivery should reuse the delivery layer's shared
    /// encoding (`delivery::encode::Encodings`), not encode per subscriber.
    fn encode(&self, event: &Event<'_>) -> Option<WsMessage>;

    /// The close code and reason sent when the connection ends for `why`.
    fn close(&self, why: CloseReason) -> (u16, &'static str);

    /// A command the core runs as soon as the socket is open, before reading any frame: for
    /// protocols whose handshake is the upgrade request itself (the server speaks first).
    fn opening(&mut self) -> Option<Command> {
        None
    }

    /// A last frame sent before the close frame when the connection ends for `why`, for
    /// protocols that say why in a frame of their own.
    fn farewell(&self, _why: CloseReason) -> Option<WsMessage> {
        None
    }

    /// A consumer-group event as the frame to send, for protocols that decode consume
    /// commands ([`Command::Consume`]); `None`: the protocol has no frame for it.
    fn encode_consume(&self, _event: &consume::ConsumeEvent<'_>) -> Option<WsMessage> {
        None
    }

    /// How often this connection is pinged, given the server's setting.
    fn ping_interval(&self, configured: std::time::Duration) -> std::time::Duration {
        configured
    }

    /// The inbox of transient messages (`delivery::transient`) for this connection, taken
    /// once by the core as the connection starts; `None` (the default): the protocol has none.
    fn transient_inbox(&mut self) -> Option<TransientInbox> {
        None
    }

    /// A transient message as the frame to send, or `None`. The core drops the frame, rather
    /// than wait, when the outbound buffer is full.
    fn encode_transient(&self, _message: &Transient) -> Option<WsMessage> {
        None
    }

    /// Asked on the connection's tick: a reason to close it now, for a protocol with a
    /// deadline of its own (an application-level heartbeat); `None` (the default): none.
    fn overdue(&mut self) -> Option<CloseReason> {
        None
    }
}

/// A connection's inbox of transient messages ([`Protocol::transient_inbox`]).
pub type TransientInbox = tokio::sync::mpsc::Receiver<std::sync::Arc<Transient>>;

/// A client frame the protocol could not decode.
#[derive(Debug)]
pub struct DecodeError {
    /// The request id, if the frame has a readable one, so the error can repeat it.
    pub id: Option<u64>,
    pub message: String,
}

/// What a client asks for.
#[derive(Debug)]
pub enum Command {
    /// Opens the connection: a credential (or none: the upgrade's, or anonymous), a session
    /// to resume, and the client's own positions per stream (`EPOCH:OFFSET`) for it.
    Connect {
        token: Option<String>,
        session: Option<String>,
        positions: BTreeMap<String, String>,
        /// A session that cannot be restored, for any reason, is replaced by a new one for the
        /// credential (the client is told in `Connected`), instead of an error.
        fresh_if_not_restored: bool,
        /// `Some(false)`: no credential means no connection, whatever `--allow-anonymous`
        /// says (the protocol has its own rule); `None`: the server's setting.
        anonymous: Option<bool>,
        /// Restored subscriptions wait for the client to say where it is (a subscribe with
        /// [`SubscribeOptions::reposition`]) before delivering — for protocols whose client
        /// asks for its history right after a restore, so nothing is sent twice or out of
        /// order — or for a few seconds at most.
        hold_restored: bool,
    },
    Subscribe {
        id: Option<u64>,
        stream: String,
        after: Option<String>,
        options: SubscribeOptions,
    },
    Unsubscribe {
        id: Option<u64>,
        stream: String,
    },
    Publish {
        id: Option<u64>,
        message: ToAppend,
    },
    /// A new token for the same identity.
    Refresh {
        id: Option<u64>,
        token: String,
    },
    /// The client's heartbeat, answered with [`Event::Pong`].
    Ping,
    /// The client's answer to [`Event::Ping`].
    Pong,
    /// Consumer groups: consume, credit, ack / nack / extend / terminate, stop
    /// ([`consume`]).
    Consume(consume::ConsumeCommand),
    /// A frame the protocol answered by itself (a refusal it decides alone, or something it
    /// ignores): the core sends this frame, if any, and does nothing else.
    Answer(Option<WsMessage>),
}

/// What a protocol may add to a subscribe.
#[derive(Debug, Default)]
pub struct SubscribeOptions {
    /// The protocol's own name for the subscription, kept in the session beside it and
    /// reported with it when the session is restored.
    pub label: Option<String>,
    /// Send [`Event::CaughtUp`] once the stream's history up to its head at subscribe time
    /// has been delivered (immediately when there is none); a reset instead means the history
    /// could not be delivered.
    pub report_caught_up: bool,
    /// Skip messages published before this time (ms since the Unix epoch) until the first
    /// one that is not; with `after: "oldest"`, replays history since a time.
    pub not_before_ms: Option<u64>,
    /// If already subscribed to the stream: continue from `after` instead (unless that is
    /// where the subscription already is), without a new `Subscribed`.
    pub reposition: bool,
}

impl Command {
    /// The request id the answer repeats.
    pub fn id(&self) -> Option<u64> {
        match self {
            Command::Subscribe { id, .. }
            | Command::Unsubscribe { id, .. }
            | Command::Publish { id, .. }
            | Command::Refresh { id, .. } => *id,
            Command::Consume(c) => c.id(),
            Command::Connect { .. } | Command::Ping | Command::Pong | Command::Answer(_) => None,
        }
    }
}

/// A subscription as reported to the client: where it starts and the stream's head.
#[derive(Debug)]
pub struct SubscribedTo<'a> {
    pub id: Option<u64>,
    pub stream: &'a str,
    /// The protocol's name for it ([`SubscribeOptions::label`]), if it gave one.
    pub label: Option<&'a str>,
    pub position: &'a Position,
    pub head: &'a Position,
}

/// What the server tells a client.
#[derive(Debug)]
pub enum Event<'a> {
    Connected {
        session: &'a str,
        resumed: bool,
        /// Why the session asked for could not be resumed (a new one was made instead).
        not_restored: Option<&'a str>,
        /// Why the server ended the session's previous connection.
        last_close: Option<String>,
        subject: Option<&'a str>,
        /// Subscriptions restored with the session.
        subscriptions: Vec<SubscribedTo<'a>>,
        session_ttl_ms: u64,
        ping_interval_ms: u64,
        expires_at: Option<u64>,
    },
    Subscribed(SubscribedTo<'a>),
    Unsubscribed {
        id: Option<u64>,
        stream: &'a str,
        /// Why the server ended it; none when the client asked.
        reason: Option<&'a str>,
    },
    Message {
        stream: &'a str,
        epoch: &'a Epoch,
        message: &'a std::sync::Arc<Message>,
    },
    Reset {
        stream: &'a str,
        reason: ResetReason,
        head: &'a Position,
    },
    Skipped {
        stream: &'a str,
        epoch: &'a Epoch,
        after: u64,
        through: u64,
        count: u64,
    },
    Ack {
        id: Option<u64>,
        stream: &'a StreamName,
        appended: &'a Appended,
    },
    Refreshed {
        id: Option<u64>,
        expires_at: Option<u64>,
    },
    Error {
        id: Option<u64>,
        code: ErrorCode,
        message: &'a str,
    },
    /// A subscription asked for [`SubscribeOptions::report_caught_up`] has delivered the
    /// history it asked for.
    CaughtUp {
        id: Option<u64>,
        stream: &'a str,
    },
    /// The server's heartbeat (a WebSocket control ping is sent beside it by the core).
    Ping,
    Pong,
    /// Reconnect elsewhere or later, with the session.
    Reconnect {
        reason: &'a str,
    },
}

/// Why the server ends a connection; the protocol names the close code and reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    ShuttingDown,
    TakenOver,
    /// An operator disconnected the session or its identity (the admin API).
    Disconnected,
    TokenExpired,
    /// A frame the WebSocket layer could not read, or one too large.
    Unreadable,
    PingTimeout,
    SlowConsumer,
    InvalidCredentials,
    CredentialsRequired,
    /// A binary frame to a text protocol.
    Binary,
    TooManyBadFrames,
    TooManyPings,
    ConnectTimeout,
}

impl CloseReason {
    /// The reason kept in a session when the server ends its connection for something the
    /// client should learn on resume (it may not have been able to read the close frame).
    pub fn session_note(self) -> Option<&'static str> {
        match self {
            CloseReason::SlowConsumer => Some("slow_consumer"),
            CloseReason::PingTimeout => Some("ping_timeout"),
            CloseReason::TokenExpired => Some("token_expired"),
            CloseReason::ShuttingDown => Some("server_shutdown"),
            _ => None,
        }
    }
}
