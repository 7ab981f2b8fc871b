//! Liveness, readiness and Prometheus metrics.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};
use serde_json::json;

use crate::AppState;

pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready when the engine answers and the server is not shutting down (nor draining: the
/// `--shutdown-drain` window after SIGTERM). At the stream limit the
/// node stays ready (every existing stream works) and says so under `streams`.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting_down"})),
        );
    }
    if state.config.draining.is_cancelled() {
        // SIGTERM: take this node out of the load balancer; requests still work meanwhile.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        );
    }
    match state.engine.ready().await {
        Ok(()) => {
            let mut body = json!({"status": "ready", "engine": state.engine.name()});
            if let Some(c) = state.engine.stream_counts() {
                body["streams"] = json!({
                    "count": c.streams,
                    "limit": c.limit,
                    "at_limit": c.limit.is_some_and(|l| c.streams >= l),
                    "unpublished": c.unpublished,
                    "refused": c.refused + state.budget.refused_at_limit(),
                });
            }
            (StatusCode::OK, Json(body))
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "engine_unavailable", "engine": state.engine.name(), "error": e.to_string()}),
            ),
        ),
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.metrics.observe_process();
    state
        .metrics
        .sessions
        .set(state.sessions.live_count() as i64);
    state.metrics.observe_streams(
        state.engine.stream_counts().map(|mut c| {
            c.refused += state.budget.refused_at_limit();
            c
        }),
        state.budget.refused(),
    );
    if let Some(groups) = &state.groups {
        let observed = groups.observe().await;
        let _one_at_a_time = groups.observing();
        state.metrics.observe_groups(&observed);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
