//! `GET /v1/streams/{stream}`: a stream's epoch, bounds and retention.

use axum::{
    Json,
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::HeaderMap,
};
use spool_protocol::http::{RetentionBody, StreamInfoResponse};

use super::{authenticate, stream_name};
use crate::{
    AppState,
    auth::Action,
    error::{ApiError, ApiResult},
    query::QueryParams,
};

pub async fn info(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Json<StreamInfoResponse>> {
    let query = QueryParams::parse(query.as_deref())?;
    let principal = authenticate(&state, &headers, &query)?;
    let stream = stream_name(path)?;
    principal.check(Action::Subscribe, &stream)?;
    let Some(s) = state.engine.state(&stream).await? else {
        return Err(ApiError::not_found(format!(
            "stream {stream:?} has no history here: nothing was published to or read from it"
        )));
    };
    let retention = state.engine.retention(&stream);
    Ok(Json(StreamInfoResponse {
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
    }))
}
