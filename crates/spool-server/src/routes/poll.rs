//! Long-poll: `GET /v1/streams/{stream}/messages?after=…&limit=…&wait=…`.
//!
//! Answers at once when something follows `after`; otherwise waits up to `wait` seconds for
//! the next message. Works through any proxy that passes plain HTTP (the Comet fallback).

use axum::{
    Json,
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::HeaderMap,
};
use spool_core::{Epoch, Message, Start, StreamName};
use spool_protocol::http::{MessageBody, MessagesResponse, ResetBody, encode_payload};
use tokio::time::Instant;

use super::{authenticate, stream_name};
use crate::{
    AppState,
    auth::Action,
    error::ApiResult,
    metrics::Transport,
    query::{QueryParams, parse_start},
    subscription::{Budget, Event, Subscription},
};

/// Messages per answer when the request does not say.
const DEFAULT_LIMIT: usize = 100;

pub async fn long_poll(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Json<MessagesResponse>> {
    let query = QueryParams::parse(query.as_deref())?;
    let principal = authenticate(&state, &headers, &query)?;
    let stream = stream_name(path)?;
    principal.check(Action::Subscribe, &stream)?;
    let start = match query.get("after") {
        Some(after) => parse_start("after", after)?,
        None => Start::Oldest,
    };
    let limit = query.limit(DEFAULT_LIMIT, state.config.max_read_limit)?;
    let wait = query.wait(state.config.max_poll_wait)?;
    let _connection = state.metrics.connection(Transport::poll);

    // A token that expires while the poll waits ends the wait: nothing published after the
    // expiry is handed to its holder (the next poll is refused with 401).
    let mut deadline = Instant::now() + wait;
    if let Some(at) = principal.expires_at() {
        deadline = deadline.min(Instant::now() + super::sse::until_unix_ms(at));
    }
    let budget = Budget {
        messages: limit,
        bytes: state.config.max_read_bytes,
        conflate: false,
    };
    let mut sub = Subscription::open(state.engine.clone(), stream.clone(), start, limit).await?;
    let events = sub
        .next_batch_within(Some(deadline), &state.shutdown, budget)
        .await?
        .unwrap_or_default();
    sub.resolve().await?;

    let mut messages = Vec::with_capacity(events.len());
    let mut reset = None;
    for event in events {
        match event {
            Event::Message { epoch, message } => {
                messages.push(message_body(None, &epoch, &message))
            }
            Event::Reset { reason, head } => {
                state.metrics.reset(reason);
                reset = Some(ResetBody {
                    stream: None,
                    reason: reason.to_string(),
                    position: head.to_string(),
                });
            }
            // Only WebSocket reads conflate.
            Event::Skipped { .. } => {}
        }
    }
    state.metrics.delivered(Transport::poll, messages.len());
    let position = sub.position().map(ToString::to_string).unwrap_or_default();
    let head = sub
        .last_state()
        .map(|s| s.head_position().to_string())
        .unwrap_or_else(|| position.clone());
    Ok(Json(MessagesResponse {
        messages,
        position,
        head,
        reset,
    }))
}

/// A stored message in its JSON wire form.
pub(super) fn message_body(stream: Option<&StreamName>, epoch: &Epoch, m: &Message) -> MessageBody {
    let (data, data_base64) = encode_payload(&m.payload);
    MessageBody {
        stream: stream.map(ToString::to_string),
        epoch: epoch.to_string(),
        offset: m.offset.get(),
        time: m.time_ms,
        data,
        data_base64,
        content_type: m.content_type.clone(),
        key: m.key.clone(),
        headers: m.headers.iter().cloned().collect(),
    }
}
