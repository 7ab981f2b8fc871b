//! Publishing over HTTP: one message (`POST /v1/streams/{stream}/messages`) or a batch for
//! many streams (`POST /v1/publish`). The answer is sent only once the engine says the
//! messages are durable to its configured level.

use std::collections::HashMap;

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::{
        Extensions, HeaderMap, StatusCode,
        header::{CONTENT_LENGTH, CONTENT_TYPE},
    },
};
use base64::Engine as _;
use futures::future::try_join_all;
use http_body_util::LengthLimitError;
use spool_core::{NewMessage, StreamName};
use spool_engine::Appended;
use spool_protocol::{
    ErrorCode,
    http::{BatchMessage, BatchRequest, BatchResponse, PublishResponse},
};

use super::{authenticate, stream_name};
use crate::{
    AppState, ServerConfig,
    auth::{Action, Principal},
    budget,
    error::{ApiError, ApiResult},
    query::QueryParams,
};

/// Longest idempotency key, in bytes.
const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Longest conflation key, in bytes.
const MAX_KEY: usize = 1024;
/// Longest content type, in bytes.
const MAX_CONTENT_TYPE: usize = 256;
/// Most headers on one message, and the longest header name.
const MAX_HEADERS: usize = 64;
const MAX_HEADER_NAME: usize = 256;

pub async fn publish_one(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    extensions: Extensions,
    body: Body,
) -> ApiResult<(StatusCode, Json<PublishResponse>)> {
    // Everything the request head can tell is checked before a byte of the body is read: a
    // caller without the right to publish never gets the server to buffer its body.
    let query = QueryParams::parse(query.as_deref())?;
    let principal = authenticate(&state, &headers, &query)?;
    let stream = stream_name(path)?;
    principal.check(Action::Publish, &stream)?;
    let content_type = header_string(&headers, CONTENT_TYPE.as_str(), MAX_CONTENT_TYPE)?;
    let key = header_string(&headers, "spool-key", MAX_KEY)?;
    let idempotency_key = header_string(&headers, "idempotency-key", MAX_IDEMPOTENCY_KEY)?;
    let extra = content_type.as_ref().map_or(0, String::len) + key.as_ref().map_or(0, String::len);
    let limit = state.config.max_payload.saturating_sub(extra);
    let body = read_body(body, &headers, limit, &state.config).await?;
    // Copy: the body may be a view into the connection's read buffer, and a stored message
    // must not keep that whole buffer alive for as long as retention keeps the message.
    let message = NewMessage {
        payload: Bytes::copy_from_slice(&body),
        content_type,
        key,
        headers: Vec::new(),
        idempotency_key,
    };
    let client = budget::client_ip(&extensions);
    budget::admit(&state, &principal, client, [&stream]).await?;
    let appended = state.engine.append(&stream, vec![message]).await?;
    let appended = appended.into_iter().next().ok_or_else(|| {
        ApiError::from(spool_engine::EngineError::Internal(
            "append returned nothing".into(),
        ))
    })?;
    if !appended.duplicate {
        state.metrics.published.inc();
    }
    Ok((StatusCode::CREATED, Json(response(&stream, appended))))
}

pub async fn publish_batch(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    extensions: Extensions,
    body: Body,
) -> ApiResult<(StatusCode, Json<BatchResponse>)> {
    let query = QueryParams::parse(query.as_deref())?;
    let principal = authenticate(&state, &headers, &query)?;
    let body = read_body(body, &headers, state.config.max_batch_bytes, &state.config).await?;
    let request: BatchRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_body(format!(
            "body must be {{\"messages\":[{{\"stream\",\"data\"}}…]}}: {e}"
        ))
    })?;
    let max = state.config.max_batch_messages;
    if request.messages.is_empty() || request.messages.len() > max {
        return Err(ApiError::bad_body(format!(
            "a batch holds 1 to {max} messages, got {}",
            request.messages.len()
        )));
    }

    // Validate everything before appending anything: a bad message fails the whole batch.
    let mut order: Vec<(StreamName, usize)> = Vec::with_capacity(request.messages.len());
    let mut by_stream: HashMap<StreamName, Vec<NewMessage>> = HashMap::new();
    for (i, m) in request.messages.into_iter().enumerate() {
        let at = |e: ApiError| ApiError {
            message: format!("messages[{i}]: {}", e.message),
            ..e
        };
        let (stream, message) = validate(&state.config, &principal, m).map_err(at)?;
        let slot = by_stream.entry(stream.clone()).or_default();
        order.push((stream, slot.len()));
        slot.push(message);
    }

    // One append per stream, all streams at once. If one fails the request fails; retrying
    // with idempotency keys is safe.
    let client = budget::client_ip(&extensions);
    budget::admit(&state, &principal, client, by_stream.keys()).await?;
    let engine = &state.engine;
    let appended: HashMap<StreamName, Vec<Appended>> =
        try_join_all(by_stream.into_iter().map(|(stream, messages)| async move {
            let out = engine.append(&stream, messages).await?;
            Ok::<_, ApiError>((stream, out))
        }))
        .await?
        .into_iter()
        .collect();

    let mut results = Vec::with_capacity(order.len());
    for (stream, i) in order {
        let a = appended
            .get(&stream)
            .and_then(|v| v.get(i))
            .ok_or_else(|| {
                ApiError::from(spool_engine::EngineError::Internal(
                    "append returned too few results".into(),
                ))
            })?;
        if !a.duplicate {
            state.metrics.published.inc();
        }
        results.push(response(&stream, a.clone()));
    }
    Ok((StatusCode::CREATED, Json(BatchResponse { results })))
}

/// Checks one message of a batch (or of a WebSocket `publish`) against the caller's rights and
/// the server's limits, and makes it ready to append.
pub(crate) fn validate(
    config: &ServerConfig,
    principal: &Principal,
    m: BatchMessage,
) -> ApiResult<(StreamName, NewMessage)> {
    let stream = StreamName::new(&m.stream).map_err(|e| ApiError::invalid_name(&m.stream, e))?;
    principal.check(Action::Publish, &stream)?;
    let payload = match (m.data, m.data_base64) {
        (Some(text), None) => Bytes::from(text),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map(Bytes::from)
            .map_err(|e| ApiError::bad_body(format!("data_base64 is not base64: {e}")))?,
        _ => {
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
    Ok((
        stream,
        NewMessage {
            payload,
            content_type: m.content_type,
            key: m.key,
            headers: m.headers.into_iter().collect(),
            idempotency_key: m.idempotency_key,
        },
    ))
}

fn response(stream: &StreamName, appended: Appended) -> PublishResponse {
    PublishResponse {
        stream: stream.to_string(),
        epoch: appended.position.epoch.to_string(),
        offset: appended.position.offset.get(),
        duplicate: appended.duplicate,
    }
}

/// Reads a request body of at most `limit` bytes within the body timeout. Called only once
/// the request head has passed authentication, so an anonymous caller never makes the server
/// buffer anything, and a caller that stalls mid-body holds its buffer for a bounded time.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    config: &ServerConfig,
) -> ApiResult<Bytes> {
    let too_large = || {
        ApiError::too_large(format!(
            "the body is larger than the limit of {limit} bytes"
        ))
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let timeout = config.http.body_timeout;
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let over_limit =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .any(|e| e.is::<LengthLimitError>());
            if over_limit {
                Err(too_large())
            } else {
                Err(ApiError::bad_body(format!("could not read the body: {e}")))
            }
        }
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::RequestTimeout,
            format!(
                "the body did not arrive within {} s (--body-timeout)",
                timeout.as_secs_f64()
            ),
        )),
    }
}

fn header_string(headers: &HeaderMap, name: &str, max: usize) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::bad_param(format!("header {name} must be visible ASCII")))?;
    check_len(name, Some(value), max)?;
    Ok(Some(value.to_owned()))
}

fn check_len(what: &str, value: Option<&str>, max: usize) -> ApiResult<()> {
    match value {
        Some("") => Err(ApiError::bad_param(format!("{what} must not be empty"))),
        Some(v) if v.len() > max => Err(ApiError::bad_param(format!(
            "{what} is {} bytes; the limit is {max}",
            v.len()
        ))),
        _ => Ok(()),
    }
}
