//! AnyCable's client protocols on `/cable` (docs/anycable.md): `actioncable-v1-json` and
//! `actioncable-v1-ext-json` (session id in `welcome`, restore, `history`, broadcasts with
//! `stream_id`/`epoch`/`offset`), over the same connection core as `spool.v1.json`.
//!
//! The server speaks first: the upgrade request is the handshake (identity from a JWT, a
//! session to restore from `?sid=` or `X-ANYCABLE-RESTORE-SID`), so [`Protocol::opening`]
//! connects at once. A channel identifier names one stream (`channel.rs`, the `$pubsub`
//! channel); the identifier is kept as the subscription's label in the session, so a restore
//! can list `restored_ids`. AnyCable's `history` is Spool's position or time start with a
//! caught-up report (`confirm_history`); a Spool reset is `reject_history`.

pub mod channel;
pub mod config;
pub mod identity;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use axum::extract::ws::Message as WsMessage;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use spool_core::{Epoch, Message, StreamName, now_ms};
use tokio::time::Instant;

pub use self::config::AnycableConfig;
use super::core::{
    CloseReason, Command, DecodeError, Event, Protocol, SubscribeOptions, TransientInbox,
};
use crate::delivery::{
    encode::Encodings,
    transient::{Listener, Transient, Transients},
};

/// The base protocol's subprotocol name.
pub const BASE: &str = "actioncable-v1-json";
/// The extended protocol's subprotocol name.
pub const EXT: &str = "actioncable-v1-ext-json";
/// The header naming a session to restore (it wins over `?sid=`).
pub const RESTORE_HEADER: &str = "x-anycable-restore-sid";
/// A message header naming a session whose connection must not get the message
/// (`/_broadcast`'s `meta.exclude_socket`).
pub const EXCLUDE_HEADER: &str = "anycable-exclude-socket";
/// Longest channel identifier accepted.
const MAX_IDENTIFIER: usize = 4096;
/// Most subscribe/history requests waiting for an answer on one connection.
const MAX_PENDING: usize = 1024;

/// How the upgrade request opened the connection.
#[derive(Debug)]
pub enum Opening {
    /// Connect with the upgrade's credential (or anonymously), restoring `restore` if given.
    Connect { restore: Option<String> },
    /// Refuse: `unauthorized`.
    Unauthorized,
    /// Refuse: `token_expired`.
    TokenExpired,
}

/// One connection speaking `actioncable-v1-json` or, if `ext`, `actioncable-v1-ext-json`.
pub struct ActionCable {
    ext: bool,
    config: Arc<AnycableConfig>,
    encodings: Arc<Encodings>,
    opening: Option<Opening>,
    ping_interval: Duration,
    /// Why the connection is being refused, once known (names the `disconnect` reason).
    refused: Option<&'static str>,
    state: Mutex<Subscriptions>,
    /// Whispers for this connection, until the core takes them.
    inbox: Option<TransientInbox>,
    /// When the client last sent `{"command":"pong"}` (or connected), for
    /// `--anycable-pong-timeout`.
    last_pong: Instant,
}

/// Which identifier names which stream on this connection, and requests in flight.
#[derive(Default)]
struct Subscriptions {
    next_id: u64,
    /// Request id → (identifier, stream, is a history request).
    pending: HashMap<u64, (Arc<str>, Arc<str>, bool)>,
    by_identifier: HashMap<Arc<str>, Arc<str>>,
    by_stream: HashMap<Arc<str>, Arc<str>>,
    /// The connection's session id, once connected.
    session: Option<Arc<str>>,
    /// Where whispers come in: joined to every subscribed stream (when whispers may be sent
    /// at all: `--anycable-whisper` or `--anycable-public-streams`).
    listener: Option<Listener>,
}

impl Subscriptions {
    fn subscribed(&mut self, identifier: Arc<str>, stream: Arc<str>) {
        if let (Some(listener), Ok(name)) = (self.listener.as_mut(), StreamName::new(&stream)) {
            listener.join(&name);
        }
        self.by_identifier
            .insert(identifier.clone(), stream.clone());
        self.by_stream.insert(stream, identifier);
    }

    fn unsubscribed_stream(&mut self, stream: &str) -> Option<Arc<str>> {
        let identifier = self.by_stream.remove(stream)?;
        self.by_identifier.remove(&identifier);
        if let (Some(listener), Ok(name)) = (self.listener.as_mut(), StreamName::new(stream)) {
            listener.leave(&name);
        }
        Some(identifier)
    }
}

impl ActionCable {
    pub fn new(
        ext: bool,
        config: Arc<AnycableConfig>,
        encodings: Arc<Encodings>,
        opening: Opening,
        ping_interval: Option<Duration>,
        transients: &Arc<Transients>,
    ) -> Self {
        let (listener, inbox) = if config.whisper || config.public_streams {
            let (listener, inbox) = transients.listener();
            (Some(listener), Some(inbox))
        } else {
            (None, None)
        };
        Self {
            ext,
            ping_interval: ping_interval.unwrap_or(config.ping_interval),
            config,
            encodings,
            opening: Some(opening),
            refused: None,
            state: Mutex::new(Subscriptions {
                listener,
                ..Subscriptions::default()
            }),
            inbox,
            last_pong: Instant::now(),
        }
    }

    /// A whisper: `data` (any JSON) to the other subscribers of the stream `identifier`
    /// names on this connection, on every node, not stored. As AnyCable does, it is ignored
    /// unless the connection is subscribed through `identifier` and the identifier allows
    /// whispers: a public stream always, a signed one with `--anycable-whisper`.
    fn whisper(&self, identifier: &str, data: Option<serde_json::Value>) {
        let Some(data) = data else {
            tracing::debug!("whisper without data ignored");
            return;
        };
        if !channel::whisper_allowed(identifier, &self.config) {
            tracing::debug!("whisper not allowed on this identifier");
            return;
        }
        let state = self.state.lock();
        let (Some(stream), Some(listener)) =
            (state.by_identifier.get(identifier), state.listener.as_ref())
        else {
            tracing::debug!("whisper on an identifier not subscribed");
            return;
        };
        let Ok(stream) = StreamName::new(stream) else {
            return;
        };
        let payload = serde_json::to_vec(&data).unwrap_or_default();
        if listener.publish(&stream, payload.into()).is_err() {
            tracing::debug!(%stream, "whisper too large; dropped");
        }
    }

    fn subscribe(&mut self, identifier: String, history: Option<History>) -> Command {
        if identifier.len() > MAX_IDENTIFIER {
            return Command::Answer(Some(typed("reject_subscription", &identifier)));
        }
        let stream = match channel::stream_of(&identifier, &self.config) {
            Ok(stream) => stream,
            Err(why) => {
                tracing::debug!(?why, "anycable subscription refused");
                return Command::Answer(Some(typed("reject_subscription", &identifier)));
            }
        };
        let history = if self.ext { history } else { None };
        self.request(identifier, stream, history, false)
    }

    fn history(&mut self, identifier: String, history: Option<History>) -> Command {
        let stream = self
            .state
            .lock()
            .by_identifier
            .get(identifier.as_str())
            .cloned();
        match (stream, history) {
            (Some(stream), Some(history)) if self.ext => {
                self.request(identifier, stream.to_string(), Some(history), true)
            }
            _ => Command::Answer(Some(typed("reject_history", &identifier))),
        }
    }

    /// A subscribe (or, `reposition`, a history request on a subscription) to `stream`.
    fn request(
        &mut self,
        identifier: String,
        stream: String,
        history: Option<History>,
        reposition: bool,
    ) -> Command {
        let mut state = self.state.lock();
        if state.pending.len() >= MAX_PENDING {
            let kind = if reposition {
                "reject_history"
            } else {
                "reject_subscription"
            };
            return Command::Answer(Some(typed(kind, &identifier)));
        }
        state.next_id += 1;
        let id = state.next_id;
        let identifier: Arc<str> = Arc::from(identifier);
        state.pending.insert(
            id,
            (identifier.clone(), Arc::from(stream.as_str()), reposition),
        );
        let (after, not_before_ms) = match &history {
            None => (None, None),
            Some(h) => match h.streams.get(&stream) {
                Some(p) => (Some(format!("{}:{}", p.epoch, p.offset)), None),
                None => match h.since {
                    Some(since) if since > 0.0 => {
                        (Some("oldest".to_owned()), Some((since * 1000.0) as u64))
                    }
                    _ => (None, None),
                },
            },
        };
        Command::Subscribe {
            id: Some(id),
            stream,
            after,
            options: SubscribeOptions {
                label: Some(identifier.to_string()),
                report_caught_up: history.is_some(),
                not_before_ms,
                reposition,
            },
        }
    }

    fn identifier_of(&self, stream: &str) -> Option<Arc<str>> {
        self.state.lock().by_stream.get(stream).cloned()
    }

    fn broadcast(&self, stream: &str, epoch: &Epoch, message: &Arc<Message>) -> Option<WsMessage> {
        let identifier = self.identifier_of(stream)?;
        if let Some(excluded) = message
            .headers
            .iter()
            .find(|(k, _)| k == EXCLUDE_HEADER)
            .map(|(_, v)| v.as_str())
            && self.state.lock().session.as_deref() == Some(excluded)
        {
            return None;
        }
        let ext = self.ext;
        Some(WsMessage::Text(self.encodings.cable_frame(
            stream,
            epoch,
            message,
            &identifier,
            ext,
            || broadcast_frame(&identifier, stream, epoch, message, ext),
        )))
    }
}

/// AnyCable's broadcast frame: the payload as the `message` value when it is JSON, else as a
/// JSON string; with the position when `positioned`.
pub fn broadcast_frame(
    identifier: &str,
    stream: &str,
    epoch: &Epoch,
    message: &Message,
    positioned: bool,
) -> String {
    let payload = std::str::from_utf8(&message.payload).ok();
    let json = payload.filter(|p| serde_json::from_str::<serde::de::IgnoredAny>(p).is_ok());
    let text;
    let value: &str = match (json, payload) {
        (Some(json), _) => json.trim(),
        (None, Some(p)) => {
            text = serde_json::to_string(p).unwrap_or_default();
            &text
        }
        (None, None) => {
            use base64::Engine as _;
            text = serde_json::to_string(
                &base64::engine::general_purpose::STANDARD.encode(&message.payload),
            )
            .unwrap_or_default();
            &text
        }
    };
    let identifier = serde_json::to_string(identifier).unwrap_or_default();
    if positioned {
        let stream = serde_json::to_string(stream).unwrap_or_default();
        let epoch = serde_json::to_string(epoch.as_str()).unwrap_or_default();
        format!(
            r#"{{"identifier":{identifier},"message":{value},"stream_id":{stream},"epoch":{epoch},"offset":{}}}"#,
            message.offset.get()
        )
    } else {
        format!(r#"{{"identifier":{identifier},"message":{value}}}"#)
    }
}

/// A client command.
#[derive(Deserialize)]
struct ClientCommand {
    command: String,
    #[serde(default)]
    identifier: Option<String>,
    #[serde(default)]
    history: Option<History>,
    /// A whisper's data (any JSON).
    #[serde(default)]
    data: Option<serde_json::Value>,
}

/// A history request: positions per stream, else messages since a time (Unix seconds).
#[derive(Deserialize)]
struct History {
    #[serde(default)]
    since: Option<f64>,
    #[serde(default)]
    streams: BTreeMap<String, StreamPosition>,
}

#[derive(Deserialize)]
struct StreamPosition {
    epoch: String,
    offset: u64,
}

#[derive(Serialize)]
struct Typed<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    identifier: &'a str,
}

fn typed(kind: &str, identifier: &str) -> WsMessage {
    text(&Typed { kind, identifier })
}

fn text(value: &impl Serialize) -> WsMessage {
    WsMessage::Text(serde_json::to_string(value).unwrap_or_default().into())
}

fn disconnect(reason: &str, reconnect: bool) -> WsMessage {
    text(&serde_json::json!({"type": "disconnect", "reason": reason, "reconnect": reconnect}))
}

impl Protocol for ActionCable {
    const NAME: &'static str = BASE;

    fn decode(&mut self, text: &str) -> Result<Command, DecodeError> {
        let command = serde_json::from_str::<ClientCommand>(text).map_err(|e| DecodeError {
            id: None,
            message: format!("not an Action Cable command: {e}"),
        })?;
        let identifier = || {
            command.identifier.clone().ok_or_else(|| DecodeError {
                id: None,
                message: format!("{} needs an identifier", command.command),
            })
        };
        Ok(match command.command.as_str() {
            "subscribe" => {
                let identifier = identifier()?;
                self.subscribe(identifier, command.history)
            }
            "history" => {
                let identifier = identifier()?;
                self.history(identifier, command.history)
            }
            "unsubscribe" => {
                let identifier = identifier()?;
                let mut state = self.state.lock();
                match state.by_identifier.get(identifier.as_str()).cloned() {
                    Some(stream) => {
                        state.unsubscribed_stream(&stream);
                        Command::Unsubscribe {
                            id: None,
                            stream: stream.to_string(),
                        }
                    }
                    None => Command::Answer(None),
                }
            }
            "ping" => Command::Ping,
            "pong" => {
                self.last_pong = Instant::now();
                Command::Pong
            }
            "whisper" => {
                let identifier = identifier()?;
                self.whisper(&identifier, command.data);
                Command::Answer(None)
            }
            // `$pubsub` has no actions; presence is not served (docs/anycable.md).
            "message" | "join" | "leave" | "presence" => {
                identifier()?;
                Command::Answer(None)
            }
            other => {
                return Err(DecodeError {
                    id: None,
                    message: format!("unknown command {other:?}"),
                });
            }
        })
    }

    fn encode(&self, event: &Event<'_>) -> Option<WsMessage> {
        match event {
            Event::Message {
                stream,
                epoch,
                message,
            } => self.broadcast(stream, epoch, message),
            Event::Connected {
                session,
                resumed,
                subscriptions,
                ..
            } => {
                let mut state = self.state.lock();
                state.session = Some(Arc::from(*session));
                let mut restored_ids = Vec::new();
                for s in subscriptions {
                    if let Some(label) = s.label {
                        state.subscribed(Arc::from(label), Arc::from(s.stream));
                        restored_ids.push(label);
                    }
                }
                Some(if !self.ext {
                    text(&serde_json::json!({"type": "welcome"}))
                } else if *resumed {
                    text(&serde_json::json!({
                        "type": "welcome", "sid": session, "restored": true,
                        "restored_ids": restored_ids,
                    }))
                } else {
                    text(&serde_json::json!({"type": "welcome", "sid": session}))
                })
            }
            Event::Subscribed(s) => {
                let mut state = self.state.lock();
                let (identifier, _, _) = s.id.and_then(|id| state.pending.remove(&id))?;
                state.subscribed(identifier.clone(), Arc::from(s.stream));
                Some(typed("confirm_subscription", &identifier))
            }
            Event::Error { id, .. } => {
                let mut state = self.state.lock();
                let (identifier, _, history) = id.and_then(|id| state.pending.remove(&id))?;
                let kind = if history {
                    "reject_history"
                } else {
                    "reject_subscription"
                };
                Some(typed(kind, &identifier))
            }
            Event::CaughtUp { id, stream } => {
                let mut state = self.state.lock();
                if let Some(id) = id {
                    state.pending.remove(id);
                }
                let identifier = state.by_stream.get(*stream)?;
                Some(typed("confirm_history", identifier))
            }
            Event::Reset { stream, .. } if self.ext => {
                let mut state = self.state.lock();
                let identifier = state.by_stream.get(*stream)?.clone();
                state.pending.retain(|_, (i, _, _)| *i != identifier);
                Some(typed("reject_history", &identifier))
            }
            // The server ended a subscription (its rights or the engine): refused now.
            Event::Unsubscribed {
                stream,
                reason: Some(_),
                ..
            } => {
                let identifier = self.state.lock().unsubscribed_stream(stream)?;
                Some(typed("reject_subscription", &identifier))
            }
            Event::Ping => Some(text(&serde_json::json!({
                "type": "ping", "message": now_ms() / 1000,
            }))),
            Event::Pong => Some(text(&serde_json::json!({"type": "pong"}))),
            // Said by `farewell`, or nothing AnyCable has a frame for.
            Event::Reset { .. }
            | Event::Unsubscribed { .. }
            | Event::Skipped { .. }
            | Event::Ack { .. }
            | Event::Refreshed { .. }
            | Event::Reconnect { .. } => None,
        }
    }

    fn close(&self, why: CloseReason) -> (u16, &'static str) {
        match why {
            CloseReason::ShuttingDown => (1001, "server restart"),
            CloseReason::Unreadable => (1009, "unreadable or oversized frame"),
            CloseReason::Binary => (1003, "binary frames are not supported"),
            CloseReason::TooManyBadFrames | CloseReason::TooManyPings => (1008, "policy violation"),
            _ => (1000, "bye"),
        }
    }

    fn opening(&mut self) -> Option<Command> {
        let (session, refused) = match self.opening.take()? {
            Opening::Connect { restore } => (restore.filter(|_| self.ext), None),
            Opening::Unauthorized => (None, Some("unauthorized")),
            Opening::TokenExpired => (None, Some("token_expired")),
        };
        self.refused = refused;
        Some(Command::Connect {
            token: None,
            session,
            positions: BTreeMap::new(),
            fresh_if_not_restored: true,
            // The upgrade decided: a credential (a token, or anonymous) is given unless the
            // connection is refused.
            anonymous: Some(false),
            // The extended client sends `history` for every restored id at once.
            hold_restored: true,
        })
    }

    fn farewell(&self, why: CloseReason) -> Option<WsMessage> {
        Some(match why {
            CloseReason::ShuttingDown => disconnect("server_restart", true),
            CloseReason::TokenExpired => disconnect("token_expired", false),
            CloseReason::SlowConsumer => disconnect("too_slow", true),
            CloseReason::PingTimeout => disconnect("no_pong", true),
            CloseReason::TakenOver | CloseReason::Disconnected => disconnect("remote", false),
            CloseReason::InvalidCredentials | CloseReason::CredentialsRequired => {
                disconnect(self.refused.unwrap_or("unauthorized"), false)
            }
            _ => return None,
        })
    }

    fn ping_interval(&self, _configured: Duration) -> Duration {
        self.ping_interval
    }

    fn transient_inbox(&mut self) -> Option<TransientInbox> {
        self.inbox.take()
    }

    /// A whisper as AnyCable delivers it: a broadcast without a position.
    fn encode_transient(&self, message: &Transient) -> Option<WsMessage> {
        let identifier = self.identifier_of(message.stream.as_str())?;
        let payload = std::str::from_utf8(&message.payload).ok()?;
        // Payloads from other nodes are checked too: a frame is always JSON.
        serde_json::from_str::<serde::de::IgnoredAny>(payload).ok()?;
        let identifier = serde_json::to_string(&*identifier).unwrap_or_default();
        Some(WsMessage::Text(
            format!(
                r#"{{"identifier":{identifier},"message":{}}}"#,
                payload.trim()
            )
            .into(),
        ))
    }

    /// `no_pong` (AnyCable's `--pong_timeout`, extended protocol only): no `pong` command
    /// within the timeout since the last one (or since the connection opened).
    fn overdue(&mut self) -> Option<CloseReason> {
        let timeout = self.config.pong_timeout.filter(|_| self.ext)?;
        (self.last_pong.elapsed() > timeout).then_some(CloseReason::PingTimeout)
    }
}
