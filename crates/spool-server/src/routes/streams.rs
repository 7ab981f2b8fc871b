//! `GET /v1/streams/{stream}`: a stream's epoch, bounds and retention (with its figures for a
//! caller with the `admin` right on it), and the stream administration API
//! (docs/http-api.md, "Stream administration"): list streams, delete one, truncate one.

use axum::{
    Json,
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::json;
use spool_core::{Offset, StreamName};
use spool_engine::{StreamAdmin, StreamSummary, store::MAX_LIST_STREAMS};
use spool_protocol::{
    ErrorCode,
    http::{
        RetentionBody, StreamAdminBody, StreamInfoResponse, StreamListResponse, TruncateRequest,
    },
};

use super::{OnStream, authenticate, publish::read_body};
use crate::{
    AppState,
    auth::Action,
    error::{ApiError, ApiResult},
    query::QueryParams,
};

/// Streams in one page of `GET /v1/streams` unless `limit` says otherwise.
const DEFAULT_LIST_LIMIT: usize = 100;

/// Largest truncate body.
const MAX_TRUNCATE_BODY: usize = 4096;

pub async fn info(
    State(state): State<AppState>,
    OnStream {
        principal, stream, ..
    }: OnStream,
) -> ApiResult<Response> {
    if principal.may(Action::Admin, &stream)
        && let Some(admin) = state.engine.admin()
    {
        let Some(summary) = admin.describe_stream(&stream).await? else {
            return Err(unknown(&stream));
        };
        return Ok(Json(admin_body(&state, summary)).into_response());
    }
    principal.check(Action::Subscribe, &stream)?;
    let Some(s) = state.engine.state(&stream).await? else {
        return Err(unknown(&stream));
    };
    Ok(Json(info_body(&state, &stream, &s)).into_response())
}

fn unknown(stream: &StreamName) -> ApiError {
    ApiError::not_found(format!(
        "stream {stream:?} has no history here: nothing was published to it (or it was deleted)"
    ))
}

fn info_body(
    state: &AppState,
    stream: &StreamName,
    s: &spool_core::StreamState,
) -> StreamInfoResponse {
    let retention = state.engine.retention(stream);
    StreamInfoResponse {
        stream: stream.to_string(),
        position: s.head_position().to_string(),
        epoch: s.epoch.to_string(),
        head: s.head.get(),
        oldest: s.oldest.get(),
        retention: RetentionBody {
            max_messages: retention.max_messages,
            max_bytes: retention.max_bytes,
            max_age_ms: retention.max_age.as_millis() as u64,
        },
    }
}

fn admin_body(state: &AppState, s: StreamSummary) -> StreamAdminBody {
    StreamAdminBody {
        info: info_body(state, &s.name, &s.state),
        retained_messages: s.retained_messages,
        retained_bytes: s.retained_bytes,
        last_publish_ms: s.last_publish_ms,
        subscribers: s.watchers,
    }
}

/// The engine's stream administration, or `501 not_supported`.
fn admin(state: &AppState) -> ApiResult<&dyn StreamAdmin> {
    state.engine.admin().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            ErrorCode::NotSupported,
            format!(
                "the {} engine does not support stream administration",
                state.engine.name()
            ),
        )
    })
}

/// `GET /v1/streams?prefix=&limit=&cursor=`: streams in name order, a page at a time. A
/// token sees the streams its `admin` patterns match (a page may then hold fewer than `limit`
/// while `next_cursor` goes on).
pub async fn list(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Json<StreamListResponse>> {
    let query = QueryParams::parse(query.as_deref())?;
    let principal = authenticate(&state, &headers, &query)?;
    if !principal.any_admin() {
        return Err(forbidden("list streams"));
    }
    let prefix = query.get("prefix").unwrap_or("");
    if prefix.len() > 1024 {
        return Err(ApiError::bad_param(
            "prefix is longer than a stream name may be",
        ));
    }
    let limit = match query.get("limit") {
        None => DEFAULT_LIST_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIST_STREAMS).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_param(format!(
                    "limit must be 1 to {MAX_LIST_STREAMS}, got {v:?}"
                )));
            }
        },
    };
    let cursor = match query.get("cursor") {
        None | Some("") => None,
        Some(c) => Some(StreamName::new(c).map_err(|_| {
            ApiError::bad_param("cursor is not one this server gave (a stream name)")
        })?),
    };
    let page = admin(&state)?
        .list_streams(prefix, cursor.as_ref(), limit)
        .await?;
    let next_cursor = (page.len() == limit)
        .then(|| page.last().map(|s| s.name.to_string()))
        .flatten();
    let streams = page
        .into_iter()
        .filter(|s| principal.may(Action::Admin, &s.name))
        .map(|s| admin_body(&state, s))
        .collect();
    Ok(Json(StreamListResponse {
        streams,
        next_cursor,
    }))
}

fn forbidden(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::Forbidden,
        format!(
            "this credential may not {what}: it needs an API key or a token with an admin claim"
        ),
    )
}

/// `DELETE /v1/streams/{stream}`: the stream's history, epoch and idempotency keys go; its
/// readers get a reset and the next publish starts it again in a new epoch.
pub async fn delete(
    State(state): State<AppState>,
    OnStream {
        principal, stream, ..
    }: OnStream,
) -> ApiResult<Json<serde_json::Value>> {
    principal.check(Action::Admin, &stream)?;
    if !admin(&state)?.delete_stream(&stream).await? {
        return Err(unknown(&stream));
    }
    tracing::info!(stream = %stream, "stream deleted through the admin API");
    state.metrics.admin_action("delete");
    Ok(Json(json!({"stream": stream.as_str(), "deleted": true})))
}

/// `POST /v1/streams/{stream}/truncate` `{"before": N}`: drops retained messages with offsets
/// before N; readers behind get `history_expired`.
pub async fn truncate(
    State(state): State<AppState>,
    OnStream {
        principal, stream, ..
    }: OnStream,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<Json<StreamInfoResponse>> {
    principal.check(Action::Admin, &stream)?;
    let admin = admin(&state)?;
    let bytes = read_body(raw, &headers, MAX_TRUNCATE_BODY, &state.config).await?;
    let request: TruncateRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_body(format!(
            "the body must be {{\"before\": OFFSET}} (messages before OFFSET are dropped): {e}"
        ))
    })?;
    let Some(after) = admin
        .truncate_stream(&stream, Offset(request.before))
        .await?
    else {
        return Err(unknown(&stream));
    };
    tracing::info!(stream = %stream, before = request.before, "stream truncated through the admin API");
    state.metrics.admin_action("truncate");
    Ok(Json(info_body(&state, &stream, &after)))
}
