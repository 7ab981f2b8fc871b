//! What any WebSocket protocol needs, whatever its frames look like: the connection loop
//! ([`connection`]: sessions restored and taken over, flow-controlled subscriptions, publish
//! rounds, heartbeats, token expiry, shutdown), the bounded outbound buffer and its writer
//! ([`outbound`]), and the per-subscription delivery streams ([`deliveries`]).
//!
//! A protocol plugs in through [`Protocol`]: it decodes a client frame into a [`Command`] and
//! encodes an [`Event`] into a frame, and names the close code and reason of each
//! [`CloseReason`]. The core never names a frame type of any protocol; `super::spool_v1` is
//! the one protocol today. A second one is a new folder beside it implementing [`Protocol`],
//! and a line in `super::upgrade` that picks it by subprotocol.

mod connection;
mod deliveries;
mod outbound;

use std::collections::BTreeMap;

use axum::extract::ws::Message as WsMessage;
use spool_core::{Epoch, Message, Position, ResetReason, StreamName};
use spool_engine::Appended;
use spool_protocol::ErrorCode;

pub use connection::run;

use crate::delivery::publish::ToAppend;

/// A WebSocket protocol: its subprotocol name, how a client frame becomes a [`Command`], and
/// how an [`Event`] becomes a frame. Kept small on purpose: everything else is the core's.
pub trait Protocol: Send + 'static {
    /// The subprotocol name negotiated on the upgrade.
    const NAME: &'static str;

    /// A client text frame as a command, or why it is not one.
    fn decode(&mut self, text: &str) -> Result<Command, DecodeError>;

    /// An event as the frame to send. A message delivery should reuse the delivery layer's
    /// shared encoding (`delivery::encode::Encodings`), not encode per subscriber.
    fn encode(&self, event: &Event<'_>) -> WsMessage;

    /// The close code and reason sent when the connection ends for `why`.
    fn close(&self, why: CloseReason) -> (u16, &'static str);
}

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
    },
    Subscribe {
        id: Option<u64>,
        stream: String,
        after: Option<String>,
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
}

impl Command {
    /// The request id the answer repeats.
    pub fn id(&self) -> Option<u64> {
        match self {
            Command::Subscribe { id, .. }
            | Command::Unsubscribe { id, .. }
            | Command::Publish { id, .. }
            | Command::Refresh { id, .. } => *id,
            Command::Connect { .. } | Command::Ping | Command::Pong => None,
        }
    }
}

/// A subscription as reported to the client: where it starts and the stream's head.
#[derive(Debug)]
pub struct SubscribedTo<'a> {
    pub id: Option<u64>,
    pub stream: &'a str,
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
