//! Publishing, whatever the transport: a message to append ([`ToAppend`]), its validation
//! against the server's limits and the caller's rights ([`validate`]), the stream-creation
//! budget ([`admit`], see [`super::budget`]), and the grouped append ([`append_grouped`]): one
//! engine call per stream, all streams at once, each stream's order kept, one result per
//! message in input order.
//!
//! A transport decodes its frames into [`ToAppend`] and answers from the results in its own
//! format: HTTP fails a batch whole on the first error, WebSocket acks or refuses each message.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use base64::Engine as _;
use bytes::Bytes;
use futures::future::join_all;
use spool_core::{NewMessage, StreamName};
use spool_engine::{Appended, Engine, EngineError};

use super::budget::{Identity, StreamBudget};
use crate::{
    ServerConfig,
    auth::{Action, Principal},
    error::{ApiError, ApiResult},
};

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Longest conflation key, in bytes.
pub const MAX_KEY: usize = 1024;
/// Longest content type, in bytes.
pub const MAX_CONTENT_TYPE: usize = 256;
/// Most headers on one message, and the longest header name.
const MAX_HEADERS: usize = 64;
const MAX_HEADER_NAME: usize = 256;

/// A message a client asks to append, as any transport decodes it (not yet checked).
#[derive(Clone, Debug)]
pub struct ToAppend {
    pub stream: String,
    pub payload: Payload,
    pub content_type: Option<String>,
    pub key: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
}

/// A payload as the client sent it.
#[derive(Clone, Debug)]
pub enum Payload {
    /// The JSON wire form shared by HTTP batches and WebSocket `publish` frames: exactly one
    /// of text and base64 must be given.
    Json {
        data: Option<String>,
        data_base64: Option<String>,
    },
    /// Raw bytes (a transport with a binary body).
    Raw(Bytes),
}

/// A message that passed [`validate`]: ready to append.
#[derive(Clone, Debug)]
pub struct Validated {
    pub stream: StreamName,
    pub message: NewMessage,
}

/// Checks one message against the caller's rights and the server's limits, and makes it ready
/// to append.
pub fn validate(config: &ServerConfig, principal: &Principal, m: ToAppend) -> ApiResult<Validated> {
    let stream = StreamName::new(&m.stream).map_err(|e| ApiError::invalid_name(&m.stream, e))?;
    principal.check(Action::Publish, &stream)?;
    let payload = match m.payload {
        Payload::Raw(bytes) => bytes,
        Payload::Json {
            data: Some(text),
            data_base64: None,
        } => Bytes::from(text),
        Payload::Json {
            data: None,
            data_base64: Some(b64),
        } => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map(Bytes::from)
            .map_err(|e| ApiError::bad_body(format!("data_base64 is not base64: {e}")))?,
        Payload::Json { .. } => {
            return Err(ApiError::bad_body(
                "give exactly one of \"data\" and \"data_base64\"",
            ));
        }
    };
    // Everything a message stores counts against the limit, not just its payload: headers,
    // key and content type are kept as long as the payload is.
    let stored = payload.len()
        + m.key.as_ref().map_or(0, String::len)
        + m.content_type.as_ref().map_or(0, String::len)
        + m.headers
            .iter()
            .map(|(name, value)| name.len() + value.len())
            .sum::<usize>();
    if stored > config.max_payload {
        return Err(ApiError::too_large(format!(
            "the message is {stored} bytes (payload {}, plus headers, key and content type); \
             the limit is {}",
            payload.len(),
            config.max_payload
        )));
    }
    check_len(
        "idempotency_key",
        m.idempotency_key.as_deref(),
        MAX_IDEMPOTENCY_KEY,
    )?;
    check_len("key", m.key.as_deref(), MAX_KEY)?;
    check_len("content_type", m.content_type.as_deref(), MAX_CONTENT_TYPE)?;
    if m.headers.len() > MAX_HEADERS {
        return Err(ApiError::bad_body(format!(
            "at most {MAX_HEADERS} headers per message"
        )));
    }
    for name in m.headers.keys() {
        check_len("a header name", Some(name), MAX_HEADER_NAME)?;
    }
    Ok(Validated {
        stream,
        message: NewMessage {
            payload,
            content_type: m.content_type,
            key: m.key,
            headers: m.headers.into_iter().collect(),
            idempotency_key: m.idempotency_key,
        },
    })
}

/// Refuses an empty value or one longer than `max` bytes.
pub fn check_len(what: &str, value: Option<&str>, max: usize) -> ApiResult<()> {
    match value {
        Some("") => Err(ApiError::bad_param(format!("{what} must not be empty"))),
        Some(v) if v.len() > max => Err(ApiError::bad_param(format!(
            "{what} is {} bytes; the limit is {max}",
            v.len()
        ))),
        _ => Ok(()),
    }
}

/// Before a publish by `principal` (from `client`, if known) to `streams`: spends the budget
/// for the streams that do not exist yet, all or nothing (see [`StreamBudget::admit`]).
pub async fn admit<'a>(
    engine: &dyn Engine,
    budget: &StreamBudget,
    principal: &Principal,
    client: Option<IpAddr>,
    streams: impl IntoIterator<Item = &'a StreamName>,
) -> ApiResult<()> {
    let who = budget.identity(principal, client);
    budget.admit(engine, who, streams).await
}

/// Appends validated messages: one engine call per stream (in the order the stream's messages
/// come), all streams at once. Returns one result per message, in input order, with its
/// stream. With `per_stream_budget`, each stream is admitted on its own first (a stream over
/// budget fails its own messages only); without, the caller has admitted them already.
pub async fn append_grouped(
    engine: Arc<dyn Engine>,
    per_stream_budget: Option<(Arc<StreamBudget>, Identity)>,
    messages: Vec<Validated>,
) -> Vec<(StreamName, ApiResult<Appended>)> {
    // Most rounds publish to one stream: one admit and one append, no grouping.
    if let Some(first) = messages.first()
        && messages[1..].iter().all(|m| m.stream == first.stream)
    {
        return append_one_stream(engine, per_stream_budget, messages).await;
    }
    let mut order: Vec<(StreamName, usize)> = Vec::with_capacity(messages.len());
    let mut groups: Vec<(StreamName, Vec<NewMessage>)> = Vec::new();
    for Validated { stream, message } in messages {
        // Batches are small (bounded by the batch and in-flight limits) and mostly hold few
        // streams: a scan beats hashing every name.
        let group = match groups.iter().position(|(s, _)| *s == stream) {
            Some(i) => i,
            None => {
                groups.push((stream.clone(), Vec::new()));
                groups.len() - 1
            }
        };
        groups[group].1.push(message);
        order.push((stream, group));
    }
    let engine = &engine;
    let budget = per_stream_budget.as_ref();
    let results = join_all(groups.into_iter().map(|(stream, messages)| async move {
        let n = messages.len();
        if let Some((budget, who)) = budget
            && let Err(e) = budget.admit(&**engine, *who, [&stream]).await
        {
            return vec![Err(e); n];
        }
        match engine.append(&stream, messages).await {
            Ok(appended) => appended.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => vec![Err(ApiError::from(e)); n],
        }
    }))
    .await;
    let mut results: Vec<std::vec::IntoIter<ApiResult<Appended>>> =
        results.into_iter().map(Vec::into_iter).collect();
    order
        .into_iter()
        .map(|(stream, group)| {
            let result = results[group].next().unwrap_or_else(|| {
                Err(ApiError::from(EngineError::internal(
                    "append returned too few results",
                )))
            });
            (stream, result)
        })
        .collect()
}

/// [`append_grouped`] when every message goes to one stream (and there is at least one).
async fn append_one_stream(
    engine: Arc<dyn Engine>,
    per_stream_budget: Option<(Arc<StreamBudget>, Identity)>,
    messages: Vec<Validated>,
) -> Vec<(StreamName, ApiResult<Appended>)> {
    let mut streams = Vec::with_capacity(messages.len());
    let mut batch = Vec::with_capacity(messages.len());
    for Validated { stream, message } in messages {
        streams.push(stream);
        batch.push(message);
    }
    let stream = &streams[0];
    let results = match &per_stream_budget {
        Some((budget, who)) => budget.admit(&*engine, *who, [stream]).await,
        None => Ok(()),
    };
    let results = match results {
        Err(e) => Err(e),
        Ok(()) => engine.append(stream, batch).await.map_err(ApiError::from),
    };
    match results {
        Ok(appended) => {
            let mut appended = appended.into_iter();
            streams
                .into_iter()
                .map(|stream| {
                    let result = appended.next().ok_or_else(|| {
                        ApiError::from(EngineError::internal("append returned too few results"))
                    });
                    (stream, result)
                })
                .collect()
        }
        Err(e) => streams.into_iter().map(|s| (s, Err(e.clone()))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use spool_engine::{MemoryEngine, memory::MemoryConfig};
    use spool_protocol::ErrorCode;

    use super::*;

    fn message(stream: &str, data: &str) -> Validated {
        validate(
            &ServerConfig::default(),
            &Principal::ApiKey,
            ToAppend {
                stream: stream.into(),
                payload: Payload::Json {
                    data: Some(data.into()),
                    data_base64: None,
                },
                content_type: None,
                key: None,
                headers: BTreeMap::new(),
                idempotency_key: None,
            },
        )
        .unwrap()
    }

    fn engine(max_streams: usize) -> Arc<dyn Engine> {
        Arc::new(MemoryEngine::new(MemoryConfig {
            max_streams,
            ..Default::default()
        }))
    }

    /// (stream, offset or error code) per result.
    fn summary(
        results: &[(StreamName, ApiResult<Appended>)],
    ) -> Vec<(String, Result<u64, ErrorCode>)> {
        results
            .iter()
            .map(|(s, r)| {
                (
                    s.to_string(),
                    r.as_ref()
                        .map(|a| a.position.offset.get())
                        .map_err(|e| e.code),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn one_result_per_message_in_input_order_and_each_streams_order_kept() {
        let engine = engine(100);
        let input = [
            ("a", "a1"),
            ("b", "b1"),
            ("a", "a2"),
            ("c", "c1"),
            ("b", "b2"),
            ("a", "a3"),
        ];
        let messages = input.iter().map(|(s, d)| message(s, d)).collect();
        let results = append_grouped(engine.clone(), None, messages).await;
        let expected: Vec<(String, Result<u64, ErrorCode>)> =
            [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("b", 2), ("a", 3)]
                .iter()
                .map(|(s, o)| (s.to_string(), Ok(*o)))
                .collect();
        assert_eq!(summary(&results), expected);
        // Each stream holds its messages in the order they came.
        let a = StreamName::new("a").unwrap();
        let read = engine.read(&a, spool_core::Offset(0), 10).await.unwrap();
        let payloads: Vec<&[u8]> = read.messages.iter().map(|m| &m.payload[..]).collect();
        assert_eq!(payloads, [&b"a1"[..], b"a2", b"a3"]);
    }

    #[tokio::test]
    async fn a_failing_stream_fails_only_its_own_messages() {
        // The engine holds one stream: appending to a second one fails, the first works.
        let engine = engine(1);
        let first = append_grouped(engine.clone(), None, vec![message("a", "a1")]).await;
        assert_eq!(summary(&first), [("a".to_string(), Ok(1))]);
        let messages = vec![message("b", "b1"), message("a", "a2"), message("b", "b2")];
        let results = append_grouped(engine, None, messages).await;
        assert_eq!(
            summary(&results),
            [
                ("b".to_string(), Err(ErrorCode::StreamLimit)),
                ("a".to_string(), Ok(2)),
                ("b".to_string(), Err(ErrorCode::StreamLimit)),
            ]
        );
    }

    #[tokio::test]
    async fn a_stream_over_budget_fails_only_its_own_messages() {
        let engine = engine(100);
        let budget = Arc::new(StreamBudget::new(1));
        let who = budget.identity(&Principal::ApiKey, None);
        let messages = vec![message("x", "x1"), message("y", "y1"), message("x", "x2")];
        let results = append_grouped(engine, Some((budget, who)), messages).await;
        let codes: Vec<_> = summary(&results).into_iter().map(|(_, r)| r).collect();
        // One of the two new streams fits the budget of one, the other is refused whole.
        assert!(
            codes == [Ok(1), Err(ErrorCode::StreamBudgetExceeded), Ok(2)]
                || codes
                    == [
                        Err(ErrorCode::StreamBudgetExceeded),
                        Ok(1),
                        Err(ErrorCode::StreamBudgetExceeded)
                    ],
            "{codes:?}"
        );
    }

    #[tokio::test]
    async fn one_stream_rounds_answer_every_message_and_spend_the_budget() {
        let engine = engine(100);
        let budget = Arc::new(StreamBudget::new(1));
        let who = budget.identity(&Principal::ApiKey, None);
        let per_stream = || Some((budget.clone(), who));
        let x = vec![message("x", "x1"), message("x", "x2"), message("x", "x3")];
        let results = append_grouped(engine.clone(), per_stream(), x).await;
        let ok: Vec<_> = [1, 2, 3]
            .iter()
            .map(|o| ("x".to_string(), Ok(*o)))
            .collect();
        assert_eq!(summary(&results), ok);
        // The budget of one new stream is spent: a second new stream is refused whole, and
        // publishing to the existing one still works.
        let y = vec![message("y", "y1"), message("y", "y2")];
        let results = append_grouped(engine.clone(), per_stream(), y).await;
        let refused = Err(ErrorCode::StreamBudgetExceeded);
        assert_eq!(
            summary(&results),
            [("y".to_string(), refused), ("y".to_string(), refused)]
        );
        let results = append_grouped(engine.clone(), per_stream(), vec![message("x", "x4")]).await;
        assert_eq!(summary(&results), [("x".to_string(), Ok(4))]);
        assert!(
            append_grouped(engine, per_stream(), Vec::new())
                .await
                .is_empty()
        );
    }

    #[test]
    fn validation_errors_are_the_wire_ones() {
        let config = ServerConfig::default();
        let base = ToAppend {
            stream: "s".into(),
            payload: Payload::Json {
                data: None,
                data_base64: None,
            },
            content_type: None,
            key: None,
            headers: BTreeMap::new(),
            idempotency_key: None,
        };
        let e = validate(&config, &Principal::ApiKey, base.clone()).unwrap_err();
        assert_eq!(
            e.message,
            "give exactly one of \"data\" and \"data_base64\""
        );
        let raw = ToAppend {
            payload: Payload::Raw(Bytes::from_static(&[0xff])),
            ..base.clone()
        };
        let ok = validate(&config, &Principal::ApiKey, raw).unwrap();
        assert_eq!(&ok.message.payload[..], [0xff]);
        let bad_name = ToAppend {
            stream: String::new(),
            ..base
        };
        assert_eq!(
            validate(&config, &Principal::ApiKey, bad_name)
                .unwrap_err()
                .code,
            ErrorCode::InvalidStreamName
        );
    }
}
