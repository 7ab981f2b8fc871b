//! What the client tells the application, in the order it happened.

use std::collections::BTreeMap;

use bytes::Bytes;
use spool_core::{Epoch, Offset, Position};

use crate::Error;

/// One thing that happened on the connection; read them with
/// [`Client::next_event`](crate::Client::next_event).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A connection was established (after [`Client::connect`](crate::Client::connect) or
    /// a reconnect). `resumed` is true when the server restored the session; either way the
    /// client keeps every subscription going from where the application left off.
    Connected { session: String, resumed: bool },
    /// The server confirmed a subscription (again, after a reconnect).
    Subscribed(Subscription),
    /// A message, never one the application already got (dedup by offset).
    Message(Message),
    /// Continuity was lost (SPEC §2): messages may be missing before `position`, the stream's
    /// head, after which delivery continues. `reason`: `epoch_changed`, `history_expired` or
    /// `unknown_stream`.
    Reset {
        stream: String,
        reason: String,
        position: Position,
    },
    /// On a conflated stream, of the offsets in `(after, through]` the `count` that were not
    /// delivered were superseded by newer messages with the same key.
    Skipped {
        stream: String,
        epoch: Epoch,
        after: Offset,
        through: Offset,
        count: u64,
    },
    /// The server ended a subscription the application did not unsubscribe (`reason`:
    /// e.g. `forbidden` after a refresh that no longer allows the stream).
    Unsubscribed {
        stream: String,
        reason: Option<String>,
    },
    /// A message leased to this client's member of a consumed group
    /// ([`Client::consume`](crate::Client::consume)): settle it by its `receipt`.
    Leased(spool_protocol::ws::Leased),
    /// A consumed group recorded a loss of continuity (SPEC §7).
    GroupReset(spool_protocol::ws::GroupReset),
    /// The server ended a consume the application did not stop (`reason`:
    /// `group_not_found`, `forbidden`, or the refusal of the consume sent again after a
    /// reconnect).
    ConsumeStopped {
        stream: String,
        group: String,
        reason: Option<String>,
    },
    /// The connection was lost; the client reconnects with backoff and resumes.
    Disconnected { reason: String },
    /// Something went wrong. When `terminal`, the client has stopped: no events follow.
    Error { error: Error, terminal: bool },
}

/// A subscription the server confirmed: delivery continues after `position`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The stream subscribed to.
    pub stream: String,
    /// Messages after this position follow.
    pub position: Position,
    /// The stream's head when the subscription started.
    pub head: Position,
}

/// A delivered message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The stream it belongs to.
    pub stream: String,
    /// `EPOCH:OFFSET`: store it to resume after this message.
    pub position: Position,
    /// Publish time, ms since the Unix epoch.
    pub time: u64,
    /// The payload bytes (decoded from base64 when it was sent as binary).
    pub payload: Bytes,
    /// The media type the publisher gave, if any.
    pub content_type: Option<String>,
    /// The conflation key, if the publisher gave one.
    pub key: Option<String>,
    /// The headers the publisher gave.
    pub headers: BTreeMap<String, String>,
}

impl Message {
    /// The payload as text, when it is UTF-8.
    pub fn text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }
}
