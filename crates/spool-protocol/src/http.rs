//! JSON bodies of the HTTP API (publish, batch publish, stream info, long-poll) and of the
//! JSON-format SSE events.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The answer to a publish: where the message landed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResponse {
    pub stream: String,
    pub epoch: String,
    pub offset: u64,
    /// True when this was a retry with an idempotency key already seen: nothing was appended
    /// and the position is the original one.
    pub duplicate: bool,
}

/// `POST /v1/publish`: many messages, possibly to many streams.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub messages: Vec<BatchMessage>,
}

with_payload! {
    /// One message of a batch. Exactly one of `data` (text) and `data_base64` (bytes) is given.
    #[derive(Clone, Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct BatchMessage {
        pub stream: String,
    }
    then {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub idempotency_key: Option<String>,
    }
}

/// The answer to a batch: one result per message, in the order sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    pub results: Vec<PublishResponse>,
}

delivered! {
    /// A delivered message.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MessageBody {
        /// Present where several streams share one channel (multi-stream SSE).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub stream: Option<String>,
    }
}

/// Joins the `data` / `data_base64` pair of the wire format back into the payload bytes.
pub fn decode_payload(
    data: Option<&str>,
    data_base64: Option<&str>,
) -> Result<Vec<u8>, base64::DecodeError> {
    match (data, data_base64) {
        (Some(text), _) => Ok(text.as_bytes().to_vec()),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD.decode(b64),
        (None, None) => Ok(Vec::new()),
    }
}

/// Splits a payload into the `data` / `data_base64` pair of the wire format.
pub fn encode_payload(payload: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(payload) {
        Ok(text) => (Some(text.to_owned()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(payload)),
        ),
    }
}

/// A lost continuity (SPEC §2): why, and the head position to continue from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// `epoch_changed`, `history_expired` or `unknown_stream`.
    pub reason: String,
    /// `EPOCH:OFFSET` of the stream's head.
    pub position: String,
}

/// The answer of the long-poll read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagesResponse {
    pub messages: Vec<MessageBody>,
    /// Where to continue: pass it as `after` on the next request.
    pub position: String,
    /// The stream's head when this answer was made.
    pub head: String,
    pub reset: Option<ResetBody>,
}

/// Retention in force for a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionBody {
    pub max_messages: u64,
    pub max_bytes: u64,
    pub max_age_ms: u64,
}

/// `GET /v1/streams/{stream}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfoResponse {
    pub stream: String,
    pub epoch: String,
    /// Offset of the newest message (0: none yet).
    pub head: u64,
    /// Offset of the oldest retained message (`head + 1` when none is retained).
    pub oldest: u64,
    /// `EPOCH:OFFSET` of the head.
    pub position: String,
    pub retention: RetentionBody,
}

/// A stream as the admin API shows it (each stream of `GET /v1/streams`, and
/// `GET /v1/streams/{stream}` for a caller with the `admin` right on it): the stream info and
/// its figures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamAdminBody {
    #[serde(flatten)]
    pub info: StreamInfoResponse,
    /// Messages retained now, and what they count against `max_bytes`.
    pub retained_messages: u64,
    pub retained_bytes: u64,
    /// When the newest retained message was published (ms since the Unix epoch); null when
    /// none is retained.
    pub last_publish_ms: Option<u64>,
    /// Subscriptions reading the stream on this node.
    pub subscribers: u64,
}

/// `GET /v1/streams?prefix=&limit=&cursor=`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamListResponse {
    pub streams: Vec<StreamAdminBody>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// `POST /v1/streams/{stream}/truncate`: drop retained messages with offsets before `before`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TruncateRequest {
    pub before: u64,
}

/// The last event an SSE stream sends when the server shuts down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectBody {
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn payloads_round_trip_as_text_or_base64() {
        for payload in [&b"hello"[..], &[0xff, 0x00, 0x80][..], &b""[..]] {
            let (data, data_base64) = encode_payload(payload);
            let body = MessageBody {
                stream: None,
                epoch: "e".into(),
                offset: 1,
                time: 0,
                data,
                data_base64,
                content_type: None,
                key: None,
                headers: BTreeMap::new(),
            };
            assert_eq!(body.payload().unwrap(), payload);
        }
    }

    /// Every body and frame that carries a message writes its fields in one order, leaving
    /// out what is absent: read from the bytes clients and `encode.rs` agree on, each type
    /// writes them back unchanged (serde writes fields in declaration order).
    #[test]
    fn message_fields_keep_their_wire_bytes() {
        use crate::{groups::GroupMessage, ws};
        fn same<T: Serialize + serde::de::DeserializeOwned>(wire: &str) {
            let value: T = serde_json::from_str(wire).unwrap_or_else(|e| panic!("{wire}: {e}"));
            assert_eq!(serde_json::to_string(&value).unwrap(), wire);
        }
        let at = r#""epoch":"e","offset":1,"time":2"#;
        let full = r#""data":"x","content_type":"t","key":"k","headers":{"h":"v"}"#;
        let bin = r#""data_base64":"/w==""#;
        same::<MessageBody>(&format!(r#"{{"stream":"s",{at},{full}}}"#));
        same::<MessageBody>(&format!(r#"{{{at},{bin}}}"#));
        same::<ws::ServerFrame>(&format!(r#"{{"type":"message","stream":"s",{at},{full}}}"#));
        same::<ws::ServerFrame>(&format!(
            r#"{{"type":"leased","stream":"s","group":"g","receipt":"r","deliveries":3,{at},{full}}}"#
        ));
        same::<GroupMessage>(&format!(r#"{{"receipt":"r","deliveries":3,{at},{bin}}}"#));
        same::<ws::ClientFrame>(&format!(
            r#"{{"type":"publish","id":4,"stream":"s",{full},"idempotency_key":"i"}}"#
        ));
        same::<BatchMessage>(&format!(r#"{{"stream":"s",{full},"idempotency_key":"i"}}"#));
        same::<BatchMessage>(r#"{"stream":"s"}"#);
    }

    #[test]
    fn batch_rejects_unknown_fields() {
        let err =
            serde_json::from_str::<BatchRequest>(r#"{"messages":[{"stream":"a","dat":"x"}]}"#);
        assert!(err.is_err());
    }
}
