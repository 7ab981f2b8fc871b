//! Publishing over HTTP: one message (`POST /v1/streams/{stream}/messages`) or a batch for
//! many streams (`POST /v1/publish`). The answer is sent only once the engine says the
//! messages are durable to its configured level.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{ConnectInfo, RawQuery, State},
    http::{
        Extensions, HeaderMap, StatusCode,
        header::{CONTENT_LENGTH, CONTENT_TYPE},
    },
};
use http_body_util::LengthLimitError;
use spool_core::{NewMessage, StreamName};
use spool_engine::Appended;
use spool_protocol::{
    ErrorCode,
    http::{BatchMessage, BatchRequest, BatchResponse, PublishResponse},
};

use super::{OnStream, authenticate};
use crate::{
    AppState, ServerConfig,
    auth::Action,
    delivery::publish::{
        self as delivery, MAX_CONTENT_TYPE, MAX_IDEMPOTENCY_KEY, MAX_KEY, Payload, ToAppend,
        Validated, check_len,
    },
    error::{ApiError, ApiResult},
    query::QueryParams,
};

pub async fn publish_one(
    State(state): State<AppState>,
    OnStream {
        principal, stream, ..
    }: OnStream,
    headers: HeaderMap,
    extensions: Extensions,
    body: Body,
) -> ApiResult<(StatusCode, Json<PublishResponse>)> {
    // Everything the request head can tell is checked before a byte of the body is read: a
    // caller without the right to publish never gets the server to buffer its body.
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
    let client = client_ip(&extensions);
    delivery::admit(&*state.engine, &state.budget, &principal, client, [&stream]).await?;
    let (stream, appended) = delivery::append_grouped(
        state.engine.clone(),
        None,
        vec![Validated { stream, message }],
    )
    .await
    .into_iter()
    .next()
    .ok_or_else(|| {
        ApiError::from(spool_engine::EngineError::internal(
            "append returned nothing",
        ))
    })?;
    let appended = appended?;
    if !appended.duplicate {
        state.metrics.publish(crate::metrics::PublishVia::http);
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
    let mut messages = Vec::with_capacity(request.messages.len());
    for (i, m) in request.messages.into_iter().enumerate() {
        let at = |e: ApiError| ApiError {
            message: format!("messages[{i}]: {}", e.message),
            ..e
        };
        messages.push(delivery::validate(&state.config, &principal, to_append(m)).map_err(at)?);
    }

    // New streams are admitted all at once, then one append per stream, all streams at once.
    // If one fails the request fails; retrying with idempotency keys is safe.
    let streams: HashSet<&StreamName> = messages.iter().map(|m| &m.stream).collect();
    let client = client_ip(&extensions);
    delivery::admit(&*state.engine, &state.budget, &principal, client, streams).await?;
    let appended = delivery::append_grouped(state.engine.clone(), None, messages)
        .await
        .into_iter()
        .map(|(stream, result)| result.map(|a| (stream, a)))
        .collect::<ApiResult<Vec<_>>>()?;
    let mut results = Vec::with_capacity(appended.len());
    for (stream, a) in appended {
        if !a.duplicate {
            state.metrics.publish(crate::metrics::PublishVia::http);
        }
        results.push(response(&stream, a));
    }
    Ok((StatusCode::CREATED, Json(BatchResponse { results })))
}

/// A batch message in the delivery layer's terms.
fn to_append(m: BatchMessage) -> ToAppend {
    ToAppend {
        stream: m.stream,
        payload: Payload::Json {
            data: m.data,
            data_base64: m.data_base64,
        },
        content_type: m.content_type,
        key: m.key,
        headers: m.headers,
        idempotency_key: m.idempotency_key,
    }
}

/// The client's address, when the listener recorded it.
fn client_ip(extensions: &Extensions) -> Option<IpAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
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
pub(super) async fn read_body(
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
