//! Server-Sent Events: `GET /v1/streams/{stream}/events` for one stream and
//! `GET /v1/events?stream=a&stream=b` for several on one connection.
//!
//! Every message is a default `message` event whose `id` is where to resume, so a plain
//! EventSource reconnects with `Last-Event-ID` and gets exactly what it missed. For one stream
//! the id is `EPOCH:OFFSET` and the data is the payload itself (or, with `format=json`, the
//! message as JSON); for several streams the id lists every stream's position in the order of
//! the `stream` parameters (`E1:5,E2:9`) and the data is always JSON naming its stream.
//! A lost continuity is an `event: reset` sent before anything else of that stream. On
//! shutdown the last event is `event: reconnect`.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::HeaderMap,
    response::{
        IntoResponse, Response,
        sse::{Event as SseEvent, KeepAlive, Sse},
    },
};
use base64::Engine as _;
use futures::{
    Stream, StreamExt,
    stream::{self, BoxStream, SelectAll},
};
use spool_core::{Start, StreamName};
use spool_engine::EngineError;
use spool_protocol::{
    ErrorBody, ErrorCode,
    http::{ReconnectBody, ResetBody},
};

use super::{authenticate, stream_name};
use crate::{
    AppState,
    auth::{Action, Principal},
    delivery::subscription::{Budget, Event, Idle, Subscription, position_after},
    error::{ApiError, ApiResult},
    metrics::{ConnectionGuard, Transport},
    query::{QueryParams, parse_start},
};

/// How long EventSource should wait before reconnecting (sent as `retry:`).
const RECONNECT_DELAY: Duration = Duration::from_millis(1000);
/// Messages read per engine call for one SSE stream.
const READ_BATCH: usize = 256;

/// One subscription's event batches, tagged with its index on the connection.
type Tagged = BoxStream<'static, (usize, Result<Vec<Event>, EngineError>)>;
/// Every subscription of a connection, polled fairly.
type Merged = SelectAll<Tagged>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    /// The payload as the event's data.
    Raw,
    /// The message as JSON (`spool_protocol::http::MessageBody`).
    Json,
}

pub async fn single(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let query = QueryParams::parse(query.as_deref())?;
    let principal = authenticate(&state, &headers, &query)?;
    let stream = stream_name(path)?;
    principal.check(Action::Subscribe, &stream)?;
    let format = match query.get("format") {
        None | Some("raw") => Format::Raw,
        Some("json") => Format::Json,
        Some(other) => {
            return Err(ApiError::bad_param(format!(
                "format must be raw or json, got {other:?}"
            )));
        }
    };
    let start = match last_event_id(&headers)? {
        Some(id) => parse_start("Last-Event-ID", id)?,
        None => match query.get("after") {
            Some(after) => parse_start("after", after)?,
            None => Start::Now,
        },
    };
    open(state, &principal, vec![(stream, start)], format, false).await
}

pub async fn multi(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let query = QueryParams::parse(query.as_deref())?;
    let principal: Principal = authenticate(&state, &headers, &query)?;
    let names: Vec<&str> = query.get_all("stream").collect();
    let max = state.config.max_streams_per_connection;
    if names.is_empty() || names.len() > max {
        return Err(ApiError::bad_param(format!(
            "give 1 to {max} stream parameters (?stream=a&stream=b), got {}",
            names.len()
        )));
    }
    let mut streams = Vec::with_capacity(names.len());
    for raw in &names {
        let stream = StreamName::new(raw).map_err(|e| ApiError::invalid_name(raw, e))?;
        principal.check(Action::Subscribe, &stream)?;
        if streams.contains(&stream) {
            return Err(ApiError::bad_param(format!(
                "stream {raw:?} is listed twice"
            )));
        }
        streams.push(stream);
    }
    let (what, starts) = match last_event_id(&headers)? {
        Some(id) => ("Last-Event-ID", Some(id)),
        None => ("after", query.get("after")),
    };
    let starts: Vec<Start> = match starts {
        None => vec![Start::Now; streams.len()],
        Some(list) => {
            let parts: Vec<&str> = list.split(',').collect();
            if parts.len() != streams.len() {
                return Err(ApiError::bad_param(format!(
                    "{what} lists {} positions for {} streams; give one per stream, comma-separated, in the order of the stream parameters",
                    parts.len(),
                    streams.len()
                )));
            }
            parts
                .into_iter()
                .map(|p| {
                    if p.is_empty() {
                        Ok(Start::Now)
                    } else {
                        parse_start(what, p)
                    }
                })
                .collect::<ApiResult<_>>()?
        }
    };
    let format = match query.get("format") {
        None | Some("json") => Format::Json,
        Some(other) => {
            return Err(ApiError::bad_param(format!(
                "format of the multi-stream form is json, got {other:?}"
            )));
        }
    };
    open(
        state,
        &principal,
        streams.into_iter().zip(starts).collect(),
        format,
        true,
    )
    .await
}

fn last_event_id(headers: &HeaderMap) -> ApiResult<Option<&str>> {
    match headers.get("last-event-id") {
        None => Ok(None),
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| ApiError::bad_param("Last-Event-ID must be ASCII"))?
                .trim();
            Ok((!v.is_empty()).then_some(v))
        }
    }
}

/// Opens every subscription, resolves its start, and returns the event stream.
///
/// An engine that is unavailable right now does not fail the request: EventSource gives up
/// for good on any status but 200, and the outage is one it would survive. Such a
/// subscription is opened inside the stream instead, retried with backoff until the engine
/// answers; its position meanwhile is the start as given.
async fn open(
    state: AppState,
    principal: &Principal,
    streams: Vec<(StreamName, Start)>,
    format: Format,
    multi: bool,
) -> ApiResult<Response> {
    let mut merged: Merged = SelectAll::new();
    let mut cursors = Vec::with_capacity(streams.len());
    let mut names = Vec::with_capacity(streams.len());
    let reader = Reader {
        engine: state.engine.clone(),
        shutdown: state.shutdown.clone(),
        budget: Budget {
            messages: READ_BATCH,
            bytes: state.config.max_read_bytes,
            conflate: false,
        },
    };
    for (i, (stream, start)) in streams.into_iter().enumerate() {
        let opened = match Subscription::open(
            state.engine.clone(),
            stream.clone(),
            start.clone(),
            READ_BATCH,
        )
        .await
        {
            Ok(mut sub) => sub.resolve().await.map(|()| sub),
            Err(e) => Err(e),
        };
        let pending = match opened {
            Ok(sub) => {
                cursors.push(sub.position().map(ToString::to_string).unwrap_or_default());
                Pending::Open(sub)
            }
            Err(e @ EngineError::Unavailable { .. }) => {
                tracing::info!(stream = %stream, error = %e, "engine unavailable: the SSE subscription opens once it is back");
                cursors.push(start.to_string());
                Pending::Closed(stream.clone(), start)
            }
            Err(e) => return Err(e.into()),
        };
        names.push(stream);
        merged.push(subscription_events(i, pending, reader.clone()));
    }
    let session = Session {
        guard: state.metrics.connection(Transport::sse),
        expires_at: principal.expires_at(),
        state,
        merged,
        cursors,
        names,
        format,
        multi,
        done: false,
    };
    let heartbeat = session.state.config.heartbeat;
    let events =
        stream::once(async { vec![SseEvent::default().retry(RECONNECT_DELAY).comment("spool")] })
            .chain(stream::unfold(session, Session::next))
            .flat_map(stream::iter)
            .map(Ok::<_, Infallible>);
    Ok(sse_response(events, heartbeat))
}

fn sse_response(
    events: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
    heartbeat: Duration,
) -> Response {
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(heartbeat).text("ping"))
        .into_response();
    // Tell buffering proxies (nginx) to pass events through as they come.
    response.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    response
}

/// What every subscription of one connection reads with.
#[derive(Clone)]
struct Reader {
    engine: std::sync::Arc<dyn spool_engine::Engine>,
    shutdown: tokio_util::sync::CancellationToken,
    /// One batch's bound: the events of a batch are encoded at once, so this bounds what a
    /// slow client makes the server hold (`--max-read-bytes`).
    budget: Budget,
}

/// A subscription, or what it takes to open it once the engine answers.
enum Pending {
    Open(Subscription),
    Closed(StreamName, Start),
}

/// First wait after an engine failure; it doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// One subscription as a stream of event batches tagged with its index.
///
/// An engine that is unavailable (an outage of Redis or NATS, a leader change) is waited out
/// with backoff: the connection stays open, heartbeats go on, and the subscription continues
/// from its cursor when reads work again — the same as the WebSocket path. Only errors that a
/// retry cannot cure end the stream with an `error` event.
fn subscription_events(index: usize, pending: Pending, reader: Reader) -> Tagged {
    stream::unfold(Some(pending), move |pending| {
        let reader = reader.clone();
        async move {
            let mut pending = pending?;
            let mut backoff = RETRY_MIN;
            loop {
                let failure = match pending {
                    Pending::Closed(stream, start) => {
                        match Subscription::open(
                            reader.engine.clone(),
                            stream.clone(),
                            start.clone(),
                            READ_BATCH,
                        )
                        .await
                        {
                            Ok(sub) => {
                                pending = Pending::Open(sub);
                                continue;
                            }
                            Err(e) => {
                                pending = Pending::Closed(stream, start);
                                e
                            }
                        }
                    }
                    Pending::Open(mut sub) => {
                        match sub
                            .next_batch_within(None, &reader.shutdown, reader.budget)
                            .await
                        {
                            Ok(Ok(events)) => {
                                return Some(((index, Ok(events)), Some(Pending::Open(sub))));
                            }
                            Ok(Err(Idle::Shutdown | Idle::Timeout)) => return None,
                            Err(e) => {
                                pending = Pending::Open(sub);
                                e
                            }
                        }
                    }
                };
                match failure {
                    e @ EngineError::Unavailable { .. } => {
                        tracing::debug!(error = %e, ?backoff, "SSE read failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = reader.shutdown.cancelled() => return None,
                        }
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                    e => return Some(((index, Err(e)), None)),
                }
            }
        }
    })
    .boxed()
}

/// The state of one SSE connection: its subscriptions and the position of each.
struct Session {
    state: AppState,
    merged: Merged,
    cursors: Vec<String>,
    names: Vec<StreamName>,
    format: Format,
    multi: bool,
    done: bool,
    /// When the credential stops being valid (ms since the Unix epoch): the stream ends then.
    expires_at: Option<u64>,
    #[allow(dead_code)] // held for its Drop: counts the connection while it is open
    guard: ConnectionGuard,
}

impl Session {
    async fn next(mut self) -> Option<(Vec<SseEvent>, Self)> {
        if self.done {
            return None;
        }
        let expiry = async {
            match self.expires_at {
                Some(at) => tokio::time::sleep(until_unix_ms(at)).await,
                None => std::future::pending().await,
            }
        };
        let item = tokio::select! {
            item = self.merged.next() => Some(item),
            _ = self.state.shutdown.cancelled() => Some(None),
            _ = expiry => None,
        };
        let Some(item) = item else {
            // The token expired: say so in an event the client can act on (reconnect with a
            // fresh token), then end. Nothing published after the expiry is delivered.
            self.done = true;
            return Some((
                vec![json_event(
                    "error",
                    &ErrorBody::new(
                        ErrorCode::TokenExpired,
                        "the token expired; reconnect with a fresh one",
                    ),
                )],
                self,
            ));
        };
        let out = match item {
            Some((i, Ok(events))) => self.encode(i, events),
            Some((_, Err(e))) => {
                self.done = true;
                tracing::warn!(error = %e, "ending an SSE stream on an engine error");
                let api: ApiError = e.into();
                vec![json_event("error", &ErrorBody::new(api.code, api.message))]
            }
            None => {
                self.done = true;
                vec![json_event(
                    "reconnect",
                    &ReconnectBody {
                        reason: "server_shutdown".into(),
                    },
                )]
            }
        };
        Some((out, self))
    }

    fn encode(&mut self, i: usize, events: Vec<Event>) -> Vec<SseEvent> {
        let mut out = Vec::with_capacity(events.len());
        let mut delivered = 0;
        for event in events {
            self.cursors[i] = position_after(&event).to_string();
            let id = if self.multi {
                self.cursors.join(",")
            } else {
                self.cursors[i].clone()
            };
            let stream = self.multi.then_some(&self.names[i]);
            let sse = match &event {
                Event::Message { epoch, message } => {
                    delivered += 1;
                    match self.format {
                        Format::Json => {
                            let name = self.names[i].as_str();
                            let encodings = &self.state.encodings;
                            let body = if self.multi {
                                encodings.body_with_stream(name, epoch, message)
                            } else {
                                encodings.body(name, epoch, message)
                            };
                            SseEvent::default().data(&*body)
                        }
                        Format::Raw => SseEvent::default().data(raw_data(&message.payload)),
                    }
                }
                // Only WebSocket reads conflate.
                Event::Skipped { .. } => continue,
                Event::Reset { reason, head } => {
                    self.state.metrics.reset(*reason);
                    json_event(
                        "reset",
                        &ResetBody {
                            stream: stream.map(ToString::to_string),
                            reason: reason.to_string(),
                            position: head.to_string(),
                        },
                    )
                }
            };
            out.push(sse.id(id));
        }
        self.state.metrics.delivered(Transport::sse, delivered);
        out
    }
}

/// The payload as SSE data. SSE is text: a payload that is not UTF-8 is sent base64-encoded,
/// and CR / CRLF arrive as LF (EventSource splits lines on all three anyway).
fn raw_data(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(text) if text.contains('\r') => text.replace("\r\n", "\n").replace('\r', "\n"),
        Ok(text) => text.to_owned(),
        Err(_) => base64::engine::general_purpose::STANDARD.encode(payload),
    }
}

fn json_event(name: &str, body: &impl serde::Serialize) -> SseEvent {
    let data = serde_json::to_string(body).unwrap_or_else(|e| {
        let fallback = ErrorBody::new(ErrorCode::Internal, format!("could not encode event: {e}"));
        serde_json::to_string(&fallback).unwrap_or_default()
    });
    let event = SseEvent::default().data(data);
    if name == "message" {
        event
    } else {
        event.event(name)
    }
}

/// Time from now until `at_ms` (ms since the Unix epoch); zero if it has passed.
pub(super) fn until_unix_ms(at_ms: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_millis(at_ms).saturating_sub(now)
}
