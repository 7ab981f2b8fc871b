//! `POST /_broadcast`: AnyCable's HTTP broadcast API (docs/anycable.md), as normal Spool
//! publishes. The body is one `{"stream", "data", "meta"}` object or an array of them; `data`
//! (a string, usually JSON) becomes the message's payload, so a broadcast is durable, has an
//! offset, and is read over SSE, long-poll and `/v1/ws` like any message. `meta.exclude_socket`
//! (a session id) is kept as a header that `/cable` connections of that session skip.
//! Authorized by `Authorization: Bearer <broadcast key>` (`--anycable-broadcast-key`, or
//! derived from `--anycable-secret`); `201` on success, `422` with a JSON error for a body
//! that is not a broadcast.

use std::collections::BTreeMap;

use axum::{
    body::Body,
    extract::State,
    http::{HeaderMap, StatusCode, header::AUTHORIZATION},
};
use serde::Deserialize;
use spool_protocol::ErrorCode;
use subtle::ConstantTimeEq;

use super::publish::read_body;
use crate::{
    AppState,
    auth::Principal,
    delivery::publish::{self as delivery, Payload, ToAppend},
    error::{ApiError, ApiResult},
    ws::actioncable::EXCLUDE_HEADER,
};

#[derive(Deserialize)]
#[serde(untagged)]
enum Body1 {
    Many(Vec<Broadcast>),
    One(Broadcast),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Broadcast {
    stream: String,
    data: serde_json::Value,
    #[serde(default)]
    meta: Meta,
}

#[derive(Default, Deserialize)]
struct Meta {
    #[serde(default)]
    exclude_socket: Option<String>,
}

pub async fn broadcast(
    State(state): State<AppState>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    body: Body,
) -> ApiResult<StatusCode> {
    let Some(key) = state.config.anycable.broadcast_key() else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "broadcasting is off: set --anycable-broadcast-key or --anycable-secret",
        ));
    };
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "a broadcast needs Authorization: Bearer <broadcast key>",
        ));
    }
    let body = read_body(body, &headers, state.config.max_batch_bytes, &state.config).await?;
    let unprocessable = |message: String| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::InvalidBody,
            message,
        )
    };
    let broadcasts = match serde_json::from_slice::<Body1>(&body)
        .map_err(|e| unprocessable(format!("not a broadcast: {e}")))?
    {
        Body1::One(b) => vec![b],
        Body1::Many(many) => many,
    };
    if broadcasts.is_empty() || broadcasts.len() > state.config.max_batch_messages {
        return Err(unprocessable(format!(
            "a broadcast batch holds 1 to {} messages",
            state.config.max_batch_messages
        )));
    }
    let principal = Principal::ApiKey;
    let mut validated = Vec::with_capacity(broadcasts.len());
    for b in broadcasts {
        let data = match b.data {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        let json = serde_json::from_str::<serde::de::IgnoredAny>(&data).is_ok();
        let mut headers = BTreeMap::new();
        if let Some(sid) = b.meta.exclude_socket.filter(|s| !s.is_empty()) {
            headers.insert(EXCLUDE_HEADER.to_owned(), sid);
        }
        let message = ToAppend {
            stream: b.stream,
            payload: Payload::Json {
                data: Some(data),
                data_base64: None,
            },
            content_type: Some(
                if json {
                    "application/json"
                } else {
                    "text/plain"
                }
                .to_owned(),
            ),
            key: None,
            headers,
            idempotency_key: None,
        };
        validated.push(
            delivery::validate(&state.config, &principal, message)
                .map_err(|e| unprocessable(e.message))?,
        );
    }
    let client = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|axum::extract::ConnectInfo(addr)| addr.ip());
    let streams: Vec<&spool_core::StreamName> = validated.iter().map(|v| &v.stream).collect();
    delivery::admit(&*state.engine, &state.budget, &principal, client, streams).await?;
    for (_, result) in delivery::append_grouped(state.engine.clone(), None, validated).await {
        let appended = result?;
        if !appended.duplicate {
            state.metrics.publish(crate::metrics::PublishVia::broadcast);
        }
    }
    Ok(StatusCode::CREATED)
}
