//! Publishing over HTTP: one message (`POST /v1/streams/{stream}/messages`) or a batch for
//! many streams (`POST /v1/publish`). The answer is sent only once the engine says the
//! messages are durable to its configured level.

use std::collections::HashMap;

use axum::{
    Json,
    body::Bytes,
    extract::{
        Path, RawQuery, State,
        rejection::{BytesRejection, PathRejection},
    },
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
};
use base64::Engine as _;
use futures::future::try_join_all;
use spool_core::{NewMessage, StreamName};
use spool_engine::Appended;
use spool_protocol::http::{BatchMessage, BatchRequest, BatchResponse, PublishResponse};

use super::{authenticate, stream_name};
use crate::{
    AppState, ServerConfig,
    auth::{Action, Principal},
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
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<PublishResponse>)> {
    let query = QueryParams::parse(query.as_deref())?;
    let principal = authenticate(&state, &headers, &query)?;
    let stream = stream_name(path)?;
    principal.check(Action::Publish, &stream)?;
    // Copy: the body may be a view into the connection's read buffer, and a stored message
    // must not keep that whole buffer alive for as long as retention keeps the message.
    let payload =
        Bytes::copy_from_slice(&body.map_err(|e| body_error(e, state.config.max_payload))?);
    let message = NewMessage {
        payload,
        content_type: header_string(&headers, CONTENT_TYPE.as_str(), MAX_CONTENT_TYPE)?,
        key: header_string(&headers, "spool-key", MAX_KEY)?,
        headers: Vec::new(),
        idempotency_key: header_string(&headers, "idempotency-key", MAX_IDEMPOTENCY_KEY)?,
    };
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
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<BatchResponse>)> {
    let query = QueryParams::parse(query.as_deref())?;
    let principal = authenticate(&state, &headers, &query)?;
    let body = body.map_err(|e| body_error(e, state.config.max_batch_bytes))?;
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
    if payload.len() > config.max_payload {
        return Err(ApiError::too_large(format!(
            "payload is {} bytes; the limit is {}",
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

fn body_error(e: BytesRejection, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(format!(
            "the body is larger than the limit of {limit} bytes"
        ))
    } else {
        ApiError::bad_body(format!("could not read the body: {e}"))
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
