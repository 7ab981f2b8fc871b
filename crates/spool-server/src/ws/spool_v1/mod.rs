//! `spool.v1.json` (docs/protocol.md; frame types in `spool_protocol::ws`): one JSON object per
//! text frame. Decodes client frames into core commands and encodes core events into frames;
//! message frames are the delivery layer's shared encoding, built once per message for every
//! subscriber.

use std::sync::Arc;

use axum::extract::ws::Message as WsMessage;
use spool_protocol::ws::{self as proto, ClientFrame, ServerFrame, close};

use super::core::{
    CloseReason, Command, DecodeError, Event, Protocol, SubscribeOptions, SubscribedTo,
    consume::{ConsumeCommand, ConsumeEvent, SettleOp},
};
use crate::delivery::{
    encode::Encodings,
    publish::{Payload, ToAppend},
};

/// The `spool.v1.json` protocol of one connection.
pub struct SpoolV1 {
    encodings: Arc<Encodings>,
}

impl SpoolV1 {
    pub fn new(encodings: Arc<Encodings>) -> Self {
        Self { encodings }
    }
}

impl Protocol for SpoolV1 {
    const NAME: &'static str = proto::SUBPROTOCOL;

    fn decode(&mut self, text: &str) -> Result<Command, DecodeError> {
        // A consumer sends a settle frame per message (or per batch): read straight into its
        // fields, so it pays neither the publish reader's refusal (an error message built
        // per frame) nor serde's buffering of the tagged frame enum.
        if let Some(command) = fast_settle(text) {
            return Ok(command);
        }
        // The frame a publisher sends most, read straight into its fields; anything else (or
        // anything it does not read) takes the general path below, with its errors.
        if let Some(frame) = proto::Publish::from_frame(text) {
            return Ok(publish(frame));
        }
        let frame = serde_json::from_str::<ClientFrame>(text).map_err(|e| DecodeError {
            id: lenient_id(text),
            message: format!("not a frame of spool.v1.json: {e}"),
        })?;
        Ok(match frame {
            ClientFrame::Connect(c) => Command::Connect {
                token: c.token,
                session: c.session,
                positions: c.positions,
                fresh_if_not_restored: false,
                anonymous: None,
                hold_restored: false,
            },
            ClientFrame::Subscribe(s) => Command::Subscribe {
                id: s.id,
                stream: s.stream,
                after: s.after,
                options: SubscribeOptions::default(),
            },
            ClientFrame::Unsubscribe(u) => Command::Unsubscribe {
                id: u.id,
                stream: u.stream,
            },
            ClientFrame::Publish(p) => publish(p),
            ClientFrame::Refresh(r) => Command::Refresh {
                id: r.id,
                token: r.token,
            },
            ClientFrame::Consume(c) => Command::Consume(ConsumeCommand::Start {
                id: c.id,
                stream: c.stream,
                group: c.group,
                consumer: c.consumer,
                credit: c.credit,
                visibility_timeout: c.visibility_timeout.map(|d| d.0),
            }),
            ClientFrame::Credit(c) => Command::Consume(ConsumeCommand::Credit {
                id: c.id,
                stream: c.stream,
                group: c.group,
                credit: c.credit,
            }),
            ClientFrame::Ack(s) => settle(SettleOp::Ack, s),
            ClientFrame::Nack(s) => settle(SettleOp::Nack, s),
            ClientFrame::Extend(s) => settle(SettleOp::Extend, s),
            ClientFrame::Terminate(s) => settle(SettleOp::Terminate, s),
            ClientFrame::StopConsuming(s) => Command::Consume(ConsumeCommand::Stop {
                id: s.id,
                stream: s.stream,
                group: s.group,
            }),
            ClientFrame::Ping(_) => Command::Ping,
            ClientFrame::Pong(_) => Command::Pong,
        })
    }

    fn encode(&self, event: &Event<'_>) -> Option<WsMessage> {
        let frame = match event {
            // The whole frame carries nothing per subscriber: encoded once, shared.
            Event::Message {
                stream,
                epoch,
                message,
            } => {
                return Some(WsMessage::Text(
                    self.encodings.ws_message(stream, epoch, message),
                ));
            }
            // Never asked for by this protocol's subscribe.
            Event::CaughtUp { .. } => return None,
            Event::Connected {
                session,
                resumed,
                not_restored,
                last_close,
                subject,
                subscriptions,
                session_ttl_ms,
                ping_interval_ms,
                expires_at,
            } => ServerFrame::Connected(proto::Connected {
                session: (*session).to_owned(),
                resumed: *resumed,
                not_restored: not_restored.map(str::to_owned),
                last_close: last_close.clone(),
                subject: subject.map(str::to_owned),
                subscriptions: subscriptions.iter().map(subscribed).collect(),
                session_ttl_ms: *session_ttl_ms,
                ping_interval_ms: *ping_interval_ms,
                expires_at: *expires_at,
            }),
            Event::Subscribed(s) => ServerFrame::Subscribed(subscribed(s)),
            Event::Unsubscribed { id, stream, reason } => {
                ServerFrame::Unsubscribed(proto::Unsubscribed {
                    id: *id,
                    stream: (*stream).to_owned(),
                    reason: reason.map(str::to_owned),
                })
            }
            Event::Reset {
                stream,
                reason,
                head,
            } => ServerFrame::Reset(proto::Reset {
                stream: (*stream).to_owned(),
                reason: reason.to_string(),
                position: head.to_string(),
            }),
            Event::Skipped {
                stream,
                epoch,
                after,
                through,
                count,
            } => ServerFrame::Skipped(proto::Skipped {
                stream: (*stream).to_owned(),
                epoch: epoch.to_string(),
                after: *after,
                through: *through,
                count: *count,
            }),
            // The frame answering every publish, written directly: the same bytes as
            // `ServerFrame::Ack` through serde (a test checks), without its two `String`s.
            Event::Ack {
                id,
                stream,
                appended,
            } => {
                return Some(WsMessage::Text(
                    ack_frame(*id, stream.as_str(), appended).into(),
                ));
            }
            Event::Refreshed { id, expires_at } => ServerFrame::Refreshed(proto::Refreshed {
                id: *id,
                expires_at: *expires_at,
            }),
            Event::Error { id, code, message } => ServerFrame::Error(proto::ErrorFrame {
                id: *id,
                code: *code,
                message: (*message).to_owned(),
            }),
            Event::Ping => ServerFrame::Ping(proto::Ping {}),
            Event::Pong => ServerFrame::Pong(proto::Ping {}),
            Event::Reconnect { reason } => ServerFrame::Reconnect(proto::Reconnect {
                reason: (*reason).to_owned(),
            }),
        };
        Some(WsMessage::Text(encode(&frame).into()))
    }

    fn encode_consume(&self, event: &ConsumeEvent<'_>) -> Option<WsMessage> {
        let frame = match event {
            // `{"type":"leased","stream","group","receipt","deliveries",` then the shared
            // long-poll form of the message without its opening brace.
            ConsumeEvent::Leased {
                stream,
                group,
                receipt,
                deliveries,
                epoch,
                message,
            } => {
                let body = self.encodings.body(stream, epoch, message);
                let mut out = String::with_capacity(body.len() + receipt.len() + 128);
                out.push_str(r#"{"type":"leased","stream":"#);
                push_json(&mut out, stream);
                out.push_str(r#","group":"#);
                push_json(&mut out, group);
                out.push_str(r#","receipt":"#);
                push_json(&mut out, receipt);
                out.push_str(r#","deliveries":"#);
                out.push_str(&deliveries.to_string());
                out.push(',');
                out.push_str(&body.as_str()[1..]);
                return Some(WsMessage::Text(out.into()));
            }
            ConsumeEvent::Consuming {
                id,
                stream,
                group,
                consumer,
                credit,
            } => ServerFrame::Consuming(proto::Consuming {
                id: *id,
                stream: (*stream).to_owned(),
                group: (*group).to_owned(),
                consumer: (*consumer).to_owned(),
                credit: *credit,
            }),
            ConsumeEvent::Settled {
                id,
                stream,
                group,
                op,
                receipts,
                results,
            } => {
                // `proto::Settled` as serde writes it, without copying every receipt into one.
                let mut out = String::with_capacity(
                    96 + stream.len()
                        + group.len()
                        + receipts.iter().map(|r| r.len() + 32).sum::<usize>(),
                );
                out.push_str(r#"{"type":"settled","#);
                if let Some(id) = id {
                    out.push_str(r#""id":"#);
                    push_u64(&mut out, *id);
                    out.push(',');
                }
                out.push_str(r#""stream":"#);
                push_json(&mut out, stream);
                out.push_str(r#","group":"#);
                push_json(&mut out, group);
                out.push_str(r#","op":""#);
                out.push_str(op.as_str());
                out.push_str(r#"","results":["#);
                // `Groups::settle` answers one result per receipt, in order.
                debug_assert_eq!(receipts.len(), results.len());
                for (i, (receipt, result)) in receipts.iter().zip(results.iter()).enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(r#"{"receipt":"#);
                    push_json(&mut out, receipt);
                    out.push_str(r#","result":""#);
                    out.push_str(result.as_str());
                    out.push_str(r#""}"#);
                }
                out.push_str("]}");
                return Some(WsMessage::Text(out.into()));
            }
            ConsumeEvent::GroupReset {
                stream,
                group,
                reset,
            } => ServerFrame::GroupReset(proto::GroupReset {
                stream: (*stream).to_owned(),
                group: (*group).to_owned(),
                reset: (*reset).into(),
            }),
            ConsumeEvent::Stopped {
                id,
                stream,
                group,
                reason,
            } => ServerFrame::Stopped(proto::Stopped {
                id: *id,
                stream: (*stream).to_owned(),
                group: (*group).to_owned(),
                reason: reason.map(str::to_owned),
            }),
        };
        Some(WsMessage::Text(encode(&frame).into()))
    }

    fn close(&self, why: CloseReason) -> (u16, &'static str) {
        match why {
            CloseReason::ShuttingDown => (close::GOING_AWAY, "server shutting down"),
            CloseReason::TakenOver => (
                close::SESSION_TAKEN_OVER,
                "session resumed by another connection",
            ),
            CloseReason::TokenExpired => (close::TOKEN_EXPIRED, "token expired"),
            CloseReason::Disconnected => (close::DISCONNECTED, "disconnected by an operator"),
            CloseReason::Unreadable => (close::MESSAGE_TOO_BIG, "unreadable or oversized frame"),
            CloseReason::PingTimeout => (close::PING_TIMEOUT, "no frame from the client in time"),
            CloseReason::SlowConsumer => (close::SLOW_CONSUMER, "slow consumer"),
            CloseReason::InvalidCredentials => (close::UNAUTHORIZED, "invalid credentials"),
            CloseReason::CredentialsRequired => (close::UNAUTHORIZED, "credentials required"),
            CloseReason::Binary => (close::UNSUPPORTED_DATA, "binary frames are not supported"),
            CloseReason::TooManyBadFrames => (close::TOO_MANY_ERRORS, "too many malformed frames"),
            CloseReason::TooManyPings => (close::POLICY_VIOLATION, "too many pings"),
            CloseReason::ConnectTimeout => (close::CONNECT_TIMEOUT, "no connect frame in time"),
        }
    }
}

fn subscribed(s: &SubscribedTo<'_>) -> proto::Subscribed {
    proto::Subscribed {
        id: s.id,
        stream: s.stream.to_owned(),
        position: s.position.to_string(),
        head: s.head.to_string(),
    }
}

/// A settle frame (`ack`, `nack`, `extend`, `terminate`) whose `type` comes first, read
/// straight into its fields as `proto::Settle` reads them; `None` for any other frame, or one
/// this does not read (the frame enum reads it, or says what is wrong with it).
fn fast_settle(text: &str) -> Option<Command> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tagged<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(default)]
        id: Option<u64>,
        stream: String,
        group: String,
        receipts: Vec<String>,
        #[serde(default)]
        delay: Option<spool_protocol::groups::DurationText>,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        visibility_timeout: Option<spool_protocol::groups::DurationText>,
    }
    // `{"type":"ack"` with any whitespace between the tokens (serde checks the rest).
    let rest = text
        .trim_start()
        .strip_prefix('{')?
        .trim_start()
        .strip_prefix(r#""type""#)?
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let tag = &rest[..rest.find('"')?];
    let op = match tag {
        "ack" => SettleOp::Ack,
        "nack" => SettleOp::Nack,
        "extend" => SettleOp::Extend,
        "terminate" => SettleOp::Terminate,
        _ => return None,
    };
    let t = serde_json::from_str::<Tagged<'_>>(text).ok()?;
    (t.kind == tag).then(|| {
        settle(
            op,
            proto::Settle {
                id: t.id,
                stream: t.stream,
                group: t.group,
                receipts: t.receipts,
                delay: t.delay,
                reason: t.reason,
                visibility_timeout: t.visibility_timeout,
            },
        )
    })
}

/// A settle frame as a consume command.
fn settle(op: SettleOp, s: proto::Settle) -> Command {
    Command::Consume(ConsumeCommand::Settle {
        id: s.id,
        stream: s.stream,
        group: s.group,
        op,
        receipts: s.receipts,
        delay: s.delay.map(|d| d.0),
        reason: s.reason,
        visibility_timeout: s.visibility_timeout.map(|d| d.0),
    })
}

/// A `publish` frame as the command it asks for.
fn publish(p: proto::Publish) -> Command {
    Command::Publish {
        id: p.id,
        message: ToAppend {
            stream: p.stream,
            payload: Payload::Json {
                data: p.data,
                data_base64: p.data_base64,
            },
            content_type: p.content_type,
            key: p.key,
            headers: p.headers,
            idempotency_key: p.idempotency_key,
        },
    }
}

/// An `ack` frame: `{"type":"ack","id":…,"stream":…,"epoch":…,"offset":…,"duplicate":…}`.
fn ack_frame(id: Option<u64>, stream: &str, appended: &spool_engine::Appended) -> String {
    let epoch = appended.position.epoch.as_str();
    let mut out = String::with_capacity(96 + stream.len() + epoch.len());
    out.push_str(r#"{"type":"ack","#);
    if let Some(id) = id {
        out.push_str(r#""id":"#);
        push_u64(&mut out, id);
        out.push(',');
    }
    out.push_str(r#""stream":"#);
    push_json(&mut out, stream);
    out.push_str(r#","epoch":"#);
    push_json(&mut out, epoch);
    out.push_str(r#","offset":"#);
    push_u64(&mut out, appended.position.offset.get());
    out.push_str(if appended.duplicate {
        r#","duplicate":true}"#
    } else {
        r#","duplicate":false}"#
    });
    out
}

/// Appends `n` in decimal (without `fmt`'s machinery, which cost an ack ~800 instructions).
fn push_u64(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        out.push(char::from(d));
    }
}

/// Appends `text` as a JSON string.
fn push_json(out: &mut String, text: &str) {
    // Stream names and epochs are printable ASCII: most need no escape at all.
    if !text
        .bytes()
        .any(|b| b < 0x20 || b == b'"' || b == b'\\' || b >= 0x7f)
    {
        out.push('"');
        out.push_str(text);
        out.push('"');
        return;
    }
    // Writing a string to a String cannot fail.
    if let Ok(quoted) = serde_json::to_string(text) {
        out.push_str(&quoted);
    }
}

/// The `id` of a frame that did not parse, if it has a readable one, so that its `error`
/// can repeat it.
fn lenient_id(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Option<serde_json::Value>,
    }
    serde_json::from_str::<IdOnly>(text).ok()?.id?.as_u64()
}

/// A server frame as JSON text.
fn encode(frame: &ServerFrame) -> String {
    serde_json::to_string(frame).unwrap_or_else(|e| {
        format!(r#"{{"type":"error","code":"internal","message":"could not encode a frame: {e}"}}"#)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(message: Option<WsMessage>) -> String {
        match message {
            Some(WsMessage::Text(t)) => t.as_str().to_owned(),
            other => panic!("not a text frame: {other:?}"),
        }
    }

    #[test]
    fn decodes_frames_into_commands() {
        let mut p = SpoolV1::new(Arc::default());
        let publish = p
            .decode(r#"{"type":"publish","id":7,"stream":"a","data":"x","key":"k"}"#)
            .unwrap();
        match publish {
            Command::Publish { id, message } => {
                assert_eq!(id, Some(7));
                assert_eq!(message.stream, "a");
                assert_eq!(message.key.as_deref(), Some("k"));
            }
            other => panic!("not a publish: {other:?}"),
        }
        assert!(matches!(p.decode(r#"{"type":"ping"}"#), Ok(Command::Ping)));
        let bad = p
            .decode(r#"{"type":"subscribe","id":3,"strem":"a"}"#)
            .unwrap_err();
        assert_eq!(bad.id, Some(3));
        assert!(bad.message.starts_with("not a frame of spool.v1.json: "));
    }

    #[test]
    fn reads_publish_frames_as_the_general_decoder_does() {
        let mut p = SpoolV1::new(Arc::default());
        let cases = [
            r#"{"type":"publish","id":7,"stream":"a","data":"x","key":"k"}"#,
            r#"{"stream":"b","data_base64":"eHk=","type":"publish","headers":{"h":"v"},"content_type":"text/plain","idempotency_key":"i"}"#,
            r#"{"type":"publ\u0069sh","id":null,"stream":"c","data":"\"q\""}"#,
        ];
        for text in cases {
            let general = match serde_json::from_str::<ClientFrame>(text).unwrap() {
                ClientFrame::Publish(p) => p,
                other => panic!("{text}: {other:?}"),
            };
            assert_eq!(proto::Publish::from_frame(text), Some(general), "{text}");
            assert!(matches!(p.decode(text), Ok(Command::Publish { .. })));
        }
        // Not publish frames, or not ones it reads: the general path decides, with its errors.
        for text in [
            r#"{"type":"subscribe","id":3,"stream":"a"}"#,
            r#"{"type":"publish","id":3,"stream":"a","dta":"x"}"#,
            r#"{"type":"publish","id":-1,"stream":"a"}"#,
            r#"{"type":"ping"}"#,
            r#"not json"#,
        ] {
            assert!(proto::Publish::from_frame(text).is_none(), "{text}");
        }
        let bad = p
            .decode(r#"{"type":"publish","id":3,"stream":"a","dta":"x"}"#)
            .unwrap_err();
        assert_eq!(bad.id, Some(3));
        assert!(
            bad.message.contains("unknown field `dta`"),
            "{}",
            bad.message
        );
        assert!(matches!(
            p.decode(r#"{"type":"subscribe","id":3,"stream":"a"}"#),
            Ok(Command::Subscribe { id: Some(3), .. })
        ));
    }

    #[test]
    fn writes_acks_as_serde_does() {
        let p = SpoolV1::new(Arc::default());
        for (id, stream, epoch, offset, duplicate) in [
            (Some(7), "a", "Ep0ch", 1, false),
            (Some(0), "a", "Ep0ch", 10, true),
            (Some(1234567890), "a", "Ep0ch", 9_999_999_999, false),
            (None, "orders.eu-1", "x", 0, true),
            (Some(u64::MAX), "q\"uo\\te\u{1}é", "a_b-c", u64::MAX, false),
        ] {
            let appended = spool_engine::Appended {
                position: spool_core::Position::new(
                    spool_core::Epoch::parse(epoch).unwrap(),
                    spool_core::Offset(offset),
                ),
                duplicate,
            };
            let name = spool_core::StreamName::new("a").unwrap();
            let direct = ack_frame(id, stream, &appended);
            let serde = encode(&ServerFrame::Ack(proto::Ack {
                id,
                stream: stream.to_owned(),
                epoch: epoch.to_owned(),
                offset,
                duplicate,
            }));
            assert_eq!(direct, serde);
            if stream == "a" {
                assert_eq!(
                    text(p.encode(&Event::Ack {
                        id,
                        stream: &name,
                        appended: &appended,
                    })),
                    serde
                );
            }
        }
    }

    #[test]
    fn encodes_events_as_frames() {
        let p = SpoolV1::new(Arc::default());
        assert_eq!(text(p.encode(&Event::Ping)), r#"{"type":"ping"}"#);
        assert_eq!(
            text(p.encode(&Event::Unsubscribed {
                id: None,
                stream: "a",
                reason: Some("forbidden"),
            })),
            r#"{"type":"unsubscribed","stream":"a","reason":"forbidden"}"#
        );
        assert_eq!(
            p.close(CloseReason::SlowConsumer),
            (close::SLOW_CONSUMER, "slow consumer")
        );
    }

    #[test]
    fn reads_settle_frames_as_the_general_decoder_does() {
        let mut p = SpoolV1::new(Arc::default());
        let cases = [
            r#"{"type":"ack","id":3,"stream":"s","group":"g","receipts":["AAEC","x\"y"]}"#,
            r#"{"type":"nack","stream":"s","group":"g","receipts":[],"delay":"5s","reason":"r"}"#,
            r#"{"type":"extend","id":null,"stream":"s","group":"g","receipts":["a"],"visibility_timeout":30}"#,
            r#"{"type":"terminate","stream":"s","group":"g","receipts":["a"],"reason":"bad"}"#,
            r#"{ "type" : "ack", "id": 1, "stream": "s", "group": "g", "receipts": ["a"]}"#,
        ];
        for case in cases {
            assert!(fast_settle(case).is_some(), "{case}");
            let fast = format!("{:?}", p.decode(case));
            let general = serde_json::from_str::<ClientFrame>(case).unwrap();
            let general = format!(
                "{:?}",
                Ok::<_, DecodeError>(match general {
                    ClientFrame::Ack(s) => settle(SettleOp::Ack, s),
                    ClientFrame::Nack(s) => settle(SettleOp::Nack, s),
                    ClientFrame::Extend(s) => settle(SettleOp::Extend, s),
                    ClientFrame::Terminate(s) => settle(SettleOp::Terminate, s),
                    other => panic!("not a settle: {other:?}"),
                })
            );
            assert_eq!(fast, general, "{case}");
        }
        // Not read here: the general path answers them (with its errors).
        for case in [
            r#"{"stream":"s","type":"ack","group":"g","receipts":[]}"#,
            r#"{"type":"ack","stream":"s","group":"g","receipts":[],"extra":1}"#,
            r#"{"type":"ack","stream":"s","receipts":[]}"#,
            r#"{"type":"a\u0063k","stream":"s","group":"g","receipts":[]}"#,
            r#"{"type":"publish","stream":"s","data":"x"}"#,
        ] {
            assert!(fast_settle(case).is_none(), "{case}");
        }
        let bad = p
            .decode(r#"{"type":"ack","id":4,"stream":"s","receipts":[]}"#)
            .unwrap_err();
        assert_eq!(bad.id, Some(4));
    }

    #[test]
    fn writes_settled_frames_as_serde_does() {
        let p = SpoolV1::new(Arc::default());
        let receipts = ["AAEC".to_owned(), "x\"y\u{1}".to_owned()];
        let results = [
            spool_core::group::ReceiptResult::Ok,
            spool_core::group::ReceiptResult::Expired,
        ];
        for (id, op) in [(Some(7), SettleOp::Ack), (None, SettleOp::Nack)] {
            let frame = text(p.encode_consume(&ConsumeEvent::Settled {
                id,
                stream: "s\"t",
                group: "g",
                op,
                receipts: &receipts,
                results: &results,
            }));
            let serde = encode(&ServerFrame::Settled(proto::Settled {
                id,
                stream: "s\"t".to_owned(),
                group: "g".to_owned(),
                op: op.as_str().to_owned(),
                results: receipts
                    .iter()
                    .zip(results)
                    .map(|(receipt, result)| spool_protocol::groups::ReceiptOutcome {
                        receipt: receipt.clone(),
                        result,
                    })
                    .collect(),
            }));
            assert_eq!(frame, serde);
        }
    }
}
