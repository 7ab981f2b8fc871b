//! Spool's WebSocket protocol, `spool.v1.json` (docs/protocol.md is the user's guide).
//!
//! Every frame is one JSON object in one WebSocket text message, with a `type` field naming
//! the frame. The client speaks first with `connect`; everything else is defined by the frame
//! types below. Requests a client wants answered individually carry an `id` (any number the
//! client chooses) that the answer (or the error) repeats.
//!
//! Client frames are parsed strictly: an unknown field is an error, so a typo never silently
//! changes what a frame means. The version lives in the subprotocol name, so a v2 can change
//! anything without confusing a v1 peer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;

/// The WebSocket subprotocol of this version of the protocol.
pub const SUBPROTOCOL: &str = "spool.v1.json";

/// What a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Connect(Connect),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Publish(Publish),
    Refresh(Refresh),
    Consume(Consume),
    Credit(Credit),
    Ack(Settle),
    Nack(Settle),
    Extend(Settle),
    Terminate(Settle),
    StopConsuming(StopConsuming),
    Ping(Ping),
    Pong(Ping),
}

impl ClientFrame {
    /// The `id` the answer (or the error) repeats, for the frames that carry one.
    pub fn id(&self) -> Option<u64> {
        match self {
            ClientFrame::Subscribe(f) => f.id,
            ClientFrame::Unsubscribe(f) => f.id,
            ClientFrame::Publish(f) => f.id,
            ClientFrame::Refresh(f) => f.id,
            ClientFrame::Consume(f) => f.id,
            ClientFrame::Credit(f) => f.id,
            ClientFrame::Ack(f)
            | ClientFrame::Nack(f)
            | ClientFrame::Extend(f)
            | ClientFrame::Terminate(f) => f.id,
            ClientFrame::StopConsuming(f) => f.id,
            ClientFrame::Connect(_) | ClientFrame::Ping(_) | ClientFrame::Pong(_) => None,
        }
    }
}

/// The first frame of a connection: credentials, a session to resume, or both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connect {
    /// An API key or a JWT. May be left out when the upgrade request carried one
    /// (`Authorization` header or `?token=`), or when resuming a session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A session id from an earlier `connected`, to get its identity and subscriptions back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// When resuming: the last position the client *processed* per stream
    /// (`{"chat:1": "EPOCH:OFFSET"}`). These win over the positions the server recorded as
    /// delivered, so frames lost in flight when the connection dropped are sent again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub positions: BTreeMap<String, String>,
}

/// Subscribe to one stream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    /// Where to start: `EPOCH:OFFSET` (deliver what follows it), `oldest` (every retained
    /// message), `latest` (the newest message, then live: current state on connect) or `now`
    /// (only what is published from now on; the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unsubscribe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
}

with_payload! {
    /// Publish one message. Exactly one of `data` (text) and `data_base64` (bytes) is given.
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Publish {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub id: Option<u64>,
        pub stream: String,
    }
    then {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub idempotency_key: Option<String>,
    }
    frame "publish"
}

/// Replace the connection's token with a fresh one of the same identity, before it expires.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub token: String,
}

/// Most credit one consume may grant: unsettled leases pushed at once.
pub const MAX_CREDIT: u32 = 1000;

/// Join a consumer group (SPEC §7) as `consumer`: the server pushes `leased` frames while the
/// member holds fewer unsettled leases than `credit`. One consume per (stream, group) per
/// connection; a consume is not part of the session (see docs/protocol.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Consume {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    pub group: String,
    /// The member (same rules as a stream name).
    pub consumer: String,
    /// The window: most unsettled leases pushed at once, 0–[`MAX_CREDIT`] (0: paused).
    pub credit: u32,
    /// The lease length of this member's messages (default: the group's), `"30s"` or seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility_timeout: Option<crate::groups::DurationText>,
}

/// Sets a consume's window to `credit` (0–[`MAX_CREDIT`]); leases already pushed stay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    pub group: String,
    pub credit: u32,
}

/// `ack`, `nack`, `extend` and `terminate` of leases of a consume on this connection, by
/// receipt (up to 1000). `delay` and `reason` are for `nack`, `reason` for `terminate`,
/// `visibility_timeout` for `extend`; any other combination is refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    pub group: String,
    pub receipts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<crate::groups::DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility_timeout: Option<crate::groups::DurationText>,
}

/// The settle operations of a consumed group's leases: the frames `ack`, `nack`, `extend`
/// and `terminate`, each a [`Settle`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleOp {
    Ack,
    Nack,
    Extend,
    Terminate,
}

impl SettleOp {
    /// The frame's `type`, which `settled` repeats as its `op`.
    pub fn as_str(self) -> &'static str {
        match self {
            SettleOp::Ack => "ack",
            SettleOp::Nack => "nack",
            SettleOp::Extend => "extend",
            SettleOp::Terminate => "terminate",
        }
    }

    /// The client frame asking for this operation on `settle`'s receipts.
    pub fn frame(self, settle: Settle) -> ClientFrame {
        match self {
            SettleOp::Ack => ClientFrame::Ack(settle),
            SettleOp::Nack => ClientFrame::Nack(settle),
            SettleOp::Extend => ClientFrame::Extend(settle),
            SettleOp::Terminate => ClientFrame::Terminate(settle),
        }
    }
}

/// Leave a consumer group: the leases still held are given back at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopConsuming {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    pub group: String,
}

/// A heartbeat; either side sends `ping`, the other answers `pong`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ping {}

/// What the server sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Connected(Connected),
    Subscribed(Subscribed),
    Unsubscribed(Unsubscribed),
    Message(Delivery),
    Reset(Reset),
    Skipped(Skipped),
    Ack(Ack),
    Refreshed(Refreshed),
    Consuming(Consuming),
    Leased(Leased),
    Settled(Settled),
    GroupReset(GroupReset),
    Stopped(Stopped),
    Error(ErrorFrame),
    Ping(Ping),
    Pong(Ping),
    Reconnect(Reconnect),
}

/// The answer to `connect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    /// The session id: give it to a later `connect` to resume. Secret: it stands for the
    /// identity that created it.
    pub session: String,
    /// True when an existing session was restored (its subscriptions follow in
    /// `subscriptions`); false for a new session.
    pub resumed: bool,
    /// Why a session given in `connect` was not restored (a new one was started instead):
    /// `unknown_session` (expired, unknown or forged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_restored: Option<String>,
    /// When resuming: why the server ended the session's previous connection, if it did
    /// (`slow_consumer`, `ping_timeout`, `token_expired`, …) — the reason a client that was
    /// cut off could not read in the close frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_close: Option<String>,
    /// The identity (the token's `sub`), when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The restored subscriptions, each with the position delivery continues after.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<Subscribed>,
    /// How long the session outlives its connection, in ms.
    pub session_ttl_ms: u64,
    /// The server pings this often, in ms; a client that hears nothing for twice as long
    /// should consider the connection dead.
    pub ping_interval_ms: u64,
    /// When the credential expires (ms since the Unix epoch); `refresh` before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// A subscription is active: delivery continues after `position`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    /// `EPOCH:OFFSET`: messages after it follow.
    pub position: String,
    /// `EPOCH:OFFSET` of the stream's head when the subscription started.
    pub head: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsubscribed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    /// Why the server ended it, when the client did not ask: `forbidden` (a refresh, or a
    /// resume with a new token, no longer allows the stream) or `engine_unavailable` (a
    /// restored subscription could not be reopened; subscribe again later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

delivered! {
    /// A delivered message.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Delivery {
        pub stream: String,
    }
}

/// Continuity was lost (SPEC §2): delivery continues live after `position`, the head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reset {
    pub stream: String,
    /// `epoch_changed`, `history_expired` or `unknown_stream`.
    pub reason: String,
    pub position: String,
}

/// On a conflated stream, a subscriber that fell behind got only the newest message per
/// `key`: of the offsets in `(after, through]`, `count` were left out because a newer message
/// with the same key follows. Every offset in that range is either delivered or skipped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub stream: String,
    pub epoch: String,
    pub after: u64,
    pub through: u64,
    pub count: u64,
}

/// A publish is durable at `position`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    pub epoch: String,
    pub offset: u64,
    /// True when a retry with an idempotency key already seen: nothing was appended.
    pub duplicate: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refreshed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// A consume is active (the answer to `consume` and to `credit`), with its window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consuming {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    pub group: String,
    pub consumer: String,
    pub credit: u32,
}

delivered! {
    /// A message leased to this connection's member of `group`: settle it by `receipt`.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Leased {
        pub stream: String,
        pub group: String,
        /// Settles this lease (ack, nack, extend, terminate); valid for this delivery only.
        pub receipt: String,
        /// 1 on the first delivery.
        pub deliveries: u32,
    }
}

/// The answer of `ack`, `nack`, `extend` and `terminate`: one result per receipt, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settled {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    pub group: String,
    /// `ack`, `nack`, `extend` or `terminate`.
    pub op: String,
    pub results: Vec<crate::groups::ReceiptOutcome>,
}

/// The group recorded a loss of continuity while this member consumed (never silent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReset {
    pub stream: String,
    pub group: String,
    /// The reset as a group's stats show it (`reason`, `lost`, `at`, `from`, `to`), its fields
    /// inline in the frame.
    #[serde(flatten)]
    pub reset: crate::groups::GroupResetBody,
}

/// A consume ended: asked for (`stop_consuming`), or by the server with `reason`
/// (`group_not_found`: the group was deleted; `forbidden`: a refresh took the right away).
/// The leases it held have been given back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub stream: String,
    pub group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A request failed, or the connection is about to close (then a close frame follows).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The `id` of the request that failed, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

/// The server is going away: reconnect (to another node, or after a moment).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reconnect {
    pub reason: String,
}

/// WebSocket close codes the server uses, and whether a client should reconnect after each.
pub mod close {
    /// The client closed, or the server ended the connection normally.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down: reconnect, with the session.
    pub const GOING_AWAY: u16 = 1001;
    /// A binary frame: this protocol is text only. Fix the client.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// The client broke a rule of the connection (it sent pings faster than the server
    /// answers them). Fix the client.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame larger than the server accepts. Reconnecting is safe; resending it is not.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// A server failure: reconnect after a backoff.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// No valid `connect` (missing, bad or forbidden credentials). Get a new token first.
    pub const UNAUTHORIZED: u16 = 4001;
    /// The token expired without a `refresh`. Get a new token, then reconnect (the session
    /// resumes if it is still alive).
    pub const TOKEN_EXPIRED: u16 = 4002;
    /// No `connect` frame arrived in time. Reconnect.
    pub const CONNECT_TIMEOUT: u16 = 4004;
    /// The client answered no ping in time. Reconnect, with the session.
    pub const PING_TIMEOUT: u16 = 4005;
    /// The client read nothing for too long while frames were waiting. Reconnect, with the
    /// session: delivery resumes from history.
    pub const SLOW_CONSUMER: u16 = 4006;
    /// Another connection resumed this session. Do not reconnect with it.
    pub const SESSION_TAKEN_OVER: u16 = 4007;
    /// Too many malformed frames. Fix the client.
    pub const TOO_MANY_ERRORS: u16 = 4008;
    /// An operator disconnected the session or its identity (the admin API); the session is
    /// gone. Do not reconnect on your own.
    pub const DISCONNECTED: u16 = 4009;

    /// Whether a client should reconnect (with backoff) after the server closed with `code`.
    /// Unknown codes are treated as transient.
    pub fn should_reconnect(code: u16) -> bool {
        !matches!(
            code,
            NORMAL
                | UNSUPPORTED_DATA
                | POLICY_VIOLATION
                | UNAUTHORIZED
                | SESSION_TAKEN_OVER
                | TOO_MANY_ERRORS
                | DISCONNECTED
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_parse_with_their_type_tag() {
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"subscribe","id":3,"stream":"chat:1","after":"oldest"}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFrame::Subscribe(Subscribe {
                id: Some(3),
                stream: "chat:1".into(),
                after: Some("oldest".into()),
            })
        );
        let f: ClientFrame = serde_json::from_str(r#"{"type":"ping"}"#).unwrap();
        assert_eq!(f, ClientFrame::Ping(Ping {}));
    }

    #[test]
    fn client_frames_reject_unknown_fields_and_types() {
        for bad in [
            r#"{"type":"subscribe","stream":"a","from":"oldest"}"#,
            r#"{"type":"subscrbe","stream":"a"}"#,
            r#"{"stream":"a"}"#,
            r#"{"type":"publish"}"#,
            r#"[1,2]"#,
        ] {
            assert!(serde_json::from_str::<ClientFrame>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn consume_frames_parse() {
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"consume","id":1,"stream":"jobs","group":"g","consumer":"w1","credit":10,"visibility_timeout":"30s"}"#,
        )
        .unwrap();
        let ClientFrame::Consume(c) = f else {
            panic!("not a consume: {f:?}")
        };
        assert_eq!(
            (c.credit, c.visibility_timeout.unwrap().0.as_secs()),
            (10, 30)
        );
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"nack","id":2,"stream":"jobs","group":"g","receipts":["a"],"delay":"1s"}"#,
        )
        .unwrap();
        assert!(matches!(f, ClientFrame::Nack(ref s) if s.receipts == ["a"]));
        assert_eq!(f.id(), Some(2));
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"stop_consuming","stream":"jobs","group":"g"}"#)
                .unwrap();
        assert!(matches!(f, ClientFrame::StopConsuming(_)));
        for bad in [
            r#"{"type":"consume","stream":"a","group":"g","consumer":"w"}"#,
            r#"{"type":"credit","stream":"a","group":"g","credit":-1}"#,
            r#"{"type":"ack","stream":"a","group":"g","receipts":[],"max":1}"#,
        ] {
            assert!(serde_json::from_str::<ClientFrame>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = [
            ServerFrame::Ack(Ack {
                id: Some(1),
                stream: "s".into(),
                epoch: "e".into(),
                offset: 4,
                duplicate: false,
            }),
            ServerFrame::Error(ErrorFrame {
                id: None,
                code: ErrorCode::BadFrame,
                message: "x".into(),
            }),
            ServerFrame::Ping(Ping {}),
            ServerFrame::Settled(Settled {
                id: Some(2),
                stream: "s".into(),
                group: "g".into(),
                op: "ack".into(),
                results: vec![crate::groups::ReceiptOutcome {
                    receipt: "r".into(),
                    result: crate::groups::ReceiptResult::Ok,
                }],
            }),
            ServerFrame::GroupReset(GroupReset {
                stream: "s".into(),
                group: "g".into(),
                reset: crate::groups::GroupResetBody {
                    reason: "epoch_changed".into(),
                    lost: 2,
                    at: 3,
                    from: "a:1".into(),
                    to: "b:0".into(),
                },
            }),
            ServerFrame::Stopped(Stopped {
                id: None,
                stream: "s".into(),
                group: "g".into(),
                reason: Some("group_not_found".into()),
            }),
        ];
        for f in frames {
            let text = serde_json::to_string(&f).unwrap();
            if let ServerFrame::GroupReset(_) = f {
                assert_eq!(
                    text,
                    r#"{"type":"group_reset","stream":"s","group":"g","reason":"epoch_changed","lost":2,"at":3,"from":"a:1","to":"b:0"}"#
                );
            }
            assert_eq!(serde_json::from_str::<ServerFrame>(&text).unwrap(), f);
        }
    }
}
