//! Long-poll: `GET /v1/streams/{stream}/messages?after=…&limit=…&wait=…`.
//!
//! Answers at once when something follows `after`; otherwise waits up to `wait` seconds for
//! the next message. Works through any proxy that passes plain HTTP (the Comet fallback).

use axum::{
    extract::{State, ws::Utf8Bytes},
    http::{HeaderValue, header::CONTENT_TYPE},
    response::IntoResponse,
};
use bytes::Bytes;
use spool_core::Start;
use spool_protocol::http::ResetBody;
use tokio::time::Instant;

use super::OnStream;
use crate::{
    AppState,
    auth::Action,
    delivery::subscription::{Budget, Event, Subscription},
    error::ApiResult,
    metrics::Transport,
    query::parse_start,
};

/// Messages per answer when the request does not say.
const DEFAULT_LIMIT: usize = 100;

pub async fn long_poll(
    State(state): State<AppState>,
    OnStream {
        query,
        principal,
        stream,
    }: OnStream,
) -> ApiResult<impl IntoResponse> {
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
                messages.push(state.encodings.body(stream.as_str(), &epoch, &message))
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
    let body = messages_response(&messages, &position, &head, reset.as_ref());
    Ok((
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    ))
}

/// `spool_protocol::http::MessagesResponse` as JSON, around message bodies encoded once
/// (`delivery::encode`): the same bytes serde writes for it.
fn messages_response(
    messages: &[Utf8Bytes],
    position: &str,
    head: &str,
    reset: Option<&ResetBody>,
) -> Bytes {
    let size = messages.iter().map(|m| m.len() + 1).sum::<usize>() + 128;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(b"{\"messages\":[");
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(m.as_bytes());
    }
    out.extend_from_slice(b"],\"position\":");
    // Writing strings and a plain struct to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, position);
    out.extend_from_slice(b",\"head\":");
    let _ = serde_json::to_writer(&mut out, head);
    out.extend_from_slice(b",\"reset\":");
    let _ = serde_json::to_writer(&mut out, &reset);
    out.push(b'}');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use spool_core::{Epoch, Message, Offset};
    use spool_protocol::http::MessagesResponse;

    use super::*;
    use crate::delivery::encode::{Encodings, tests::message_body};

    #[test]
    fn the_answer_is_what_serde_writes() {
        let encodings = Encodings::default();
        let epoch = Epoch::parse("e1").unwrap();
        let messages: Vec<Arc<Message>> = [&b"text"[..], &[0xff, 0x00][..]]
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Arc::new(Message {
                    offset: Offset(i as u64 + 1),
                    time_ms: 7,
                    payload: Bytes::copy_from_slice(p),
                    content_type: Some("text/plain".into()),
                    key: None,
                    headers: vec![("b".into(), "2".into()), ("a".into(), "\"1\"".into())],
                })
            })
            .collect();
        for reset in [
            None,
            Some(ResetBody {
                stream: None,
                reason: "epoch_changed".into(),
                position: "e2:0".into(),
            }),
        ] {
            for n in [0, 1, 2] {
                let bodies: Vec<Utf8Bytes> = messages[..n]
                    .iter()
                    .map(|m| encodings.body("s", &epoch, m))
                    .collect();
                let ours = messages_response(&bodies, "e1:2", "e1:\"3", reset.as_ref());
                let theirs = serde_json::to_vec(&MessagesResponse {
                    messages: messages[..n]
                        .iter()
                        .map(|m| message_body(None, &epoch, m))
                        .collect(),
                    position: "e1:2".into(),
                    head: "e1:\"3".into(),
                    reset: reset.clone(),
                })
                .unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&ours),
                    String::from_utf8_lossy(&theirs)
                );
            }
        }
    }
}
