//! Disconnecting WebSocket sessions (docs/http-api.md, "Stream administration"):
//! `DELETE /v1/sessions/{id}` and `POST /v1/identities/{subject}/disconnect`. Both need an API
//! key or a token whose `admin` claim holds `*`, and act on the connections of this node; the
//! sessions are forgotten in the store, so they cannot be resumed on any node.

use axum::{
    Json,
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::{HeaderMap, StatusCode},
};
use serde_json::json;
use spool_protocol::ErrorCode;

use super::authenticate;
use crate::{
    AppState,
    error::{ApiError, ApiResult},
    query::QueryParams,
};

/// Longest session id or identity accepted in a path.
const MAX_ID: usize = 256;

/// The session id or identity (`what`) in the path of a call whose caller may disconnect
/// sessions: an API key, or a token whose `admin` claim holds `*`.
fn target(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
    path: Result<Path<String>, PathRejection>,
    what: &str,
) -> ApiResult<String> {
    let query = QueryParams::parse(query)?;
    let principal = authenticate(state, headers, &query)?;
    if !principal.admin_of_all() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "disconnecting sessions needs an API key or a token whose admin claim holds \"*\"",
        ));
    }
    id(path, what)
}

fn id(path: Result<Path<String>, PathRejection>, what: &str) -> ApiResult<String> {
    let Path(id) = path.map_err(|e| ApiError::bad_param(format!("bad path: {e}")))?;
    if id.is_empty() || id.len() > MAX_ID || id.chars().any(char::is_control) {
        return Err(ApiError::bad_param(format!(
            "{what} must be 1 to {MAX_ID} printable characters"
        )));
    }
    Ok(id)
}

/// `DELETE /v1/sessions/{id}`: the connection holding the session on this node closes with
/// `4009` and the session is forgotten.
pub async fn disconnect_session(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    let id = target(&state, &headers, query.as_deref(), path, "a session id")?;
    let held = state.sessions.disconnect(&id).await?;
    tracing::info!(session = %id, connected = held, "session disconnected through the admin API");
    state.metrics.admin_action("disconnect_session");
    Ok(Json(
        json!({"session": id, "disconnected": u64::from(held)}),
    ))
}

/// `POST /v1/identities/{subject}/disconnect`: every connection on this node whose session
/// belongs to the token subject closes with `4009`; their sessions are forgotten.
pub async fn disconnect_identity(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    let subject = target(
        &state,
        &headers,
        query.as_deref(),
        path,
        "an identity (a token's sub)",
    )?;
    let n = state.sessions.disconnect_identity(&subject).await?;
    tracing::info!(identity = %subject, sessions = n, "identity disconnected through the admin API");
    state.metrics.admin_action("disconnect_identity");
    Ok(Json(json!({"identity": subject, "disconnected": n})))
}
