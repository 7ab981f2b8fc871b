//! The HTTP routes, one file per concern, and what they share: the router, CORS, request
//! metrics, JSON fallbacks, and extracting a stream name and a principal from a request.

mod admin;
mod admin_ui;
mod broadcast;
mod groups;
mod ops;
mod poll;
mod publish;
mod sse;
mod streams;

use std::time::{Duration, Instant};

use axum::{
    Router,
    extract::{FromRequestParts, MatchedPath, Request, State, rejection::PathRejection},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, request::Parts},
    middleware::{self, Next},
    response::Response,
    routing::{get, post},
};
use spool_core::StreamName;
use spool_protocol::{
    ErrorCode,
    groups::{AckRequest, ExtendRequest, NackRequest, TerminateRequest},
};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    AppState,
    auth::Principal,
    error::{ApiError, ApiResult},
    metrics::RequestLabels,
    query::QueryParams,
};

pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
    let api = Router::new()
        // Publish handlers read their bodies themselves, after authentication and within the
        // body timeout (publish.rs), so no extractor buffers a body first.
        .route(ROUTES[0], post(publish::publish_one).get(poll::long_poll))
        .route("/v1/publish", post(publish::publish_batch))
        .route(
            "/v1/streams/{stream}",
            get(streams::info).delete(streams::delete),
        )
        // Stream administration (docs/http-api.md): admin right needed.
        .route(ROUTES[17], get(streams::list))
        .route(ROUTES[18], post(streams::truncate))
        .route(ROUTES[19], axum::routing::delete(admin::disconnect_session))
        .route(ROUTES[20], post(admin::disconnect_identity))
        .route("/v1/streams/{stream}/events", get(sse::single))
        .route("/v1/events", get(sse::multi))
        .route("/v1/ws", get(crate::ws::upgrade))
        // AnyCable compatibility (docs/anycable.md).
        .route(&config.anycable.path, get(crate::ws::cable))
        .route("/_broadcast", post(broadcast::broadcast))
        // Consumer groups (SPEC §7): bodies are read after authentication (groups.rs).
        .route(ROUTES[9], get(groups::list))
        .route(
            ROUTES[10],
            axum::routing::put(groups::put)
                .get(groups::get)
                .delete(groups::delete),
        )
        .route(ROUTES[11], post(groups::receive))
        .route(ROUTES[12], post(groups::settle::<AckRequest>))
        .route(ROUTES[13], post(groups::settle::<NackRequest>))
        .route(ROUTES[14], post(groups::settle::<ExtendRequest>))
        .route(ROUTES[15], post(groups::settle::<TerminateRequest>))
        .route(ROUTES[16], post(groups::redrive))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        // The admin web UI (admin_ui.rs): static, embedded; it calls the API above.
        .route("/admin", get(admin_ui::index))
        .route("/admin/", get(admin_ui::index))
        .route("/admin/app.js", get(admin_ui::script))
        .route("/admin/app.css", get(admin_ui::style))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    let app = api
        .layer(middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .with_state(state);
    match cors(&config.cors_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// The internal address's routes (`--metrics-listen`): metrics and probes, no API.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(ops::metrics))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .fallback(not_found)
        .with_state(state)
}

fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| match HeaderValue::from_str(o) {
                Ok(v) => Some(v),
                Err(_) => {
                    tracing::warn!(origin = %o, "ignoring a CORS origin that is not a valid header value");
                    None
                }
            })
            .collect();
        AllowOrigin::list(list)
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static("spool-key"),
            ])
            .max_age(Duration::from_secs(3600)),
    )
}

/// Every route, so request metrics can label with a `&'static str` (no allocation per request).
const ROUTES: [&str; 21] = [
    "/v1/streams/{stream}/messages",
    "/v1/publish",
    "/v1/streams/{stream}",
    "/v1/streams/{stream}/events",
    "/v1/events",
    "/v1/ws",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/streams/{stream}/groups",
    "/v1/streams/{stream}/groups/{group}",
    "/v1/streams/{stream}/groups/{group}/receive",
    "/v1/streams/{stream}/groups/{group}/ack",
    "/v1/streams/{stream}/groups/{group}/nack",
    "/v1/streams/{stream}/groups/{group}/extend",
    "/v1/streams/{stream}/groups/{group}/terminate",
    "/v1/streams/{stream}/groups/{group}/redrive",
    "/v1/streams",
    "/v1/streams/{stream}/truncate",
    "/v1/sessions/{id}",
    "/v1/identities/{id}/disconnect",
];

async fn record_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        _ => "other",
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| ROUTES.iter().find(|r| **r == p.as_str()).copied())
        .unwrap_or("unmatched");
    let response = next.run(request).await;
    let labels = RequestLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    state
        .metrics
        .requests
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see docs/http-api.md")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        "method not allowed on this route; see docs/http-api.md",
    )
}

/// The `{stream}` path segment, validated. Names with `/` must be sent percent-encoded.
fn stream_name(path: Result<axum::extract::Path<String>, PathRejection>) -> ApiResult<StreamName> {
    let axum::extract::Path(raw) =
        path.map_err(|e| ApiError::bad_param(format!("bad path: {e}")))?;
    StreamName::new(&raw).map_err(|e| ApiError::invalid_name(&raw, e))
}

/// A request on one stream (`/v1/streams/{stream}…`) past what each of its handlers checks
/// first, in this order: the query string, the credential, the stream name in the path.
/// What the caller may do on the stream is the handler's to check.
pub struct OnStream {
    pub query: QueryParams,
    pub principal: Principal,
    pub stream: StreamName,
}

impl FromRequestParts<AppState> for OnStream {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let query = QueryParams::parse(parts.uri.query())?;
        let principal = authenticate(state, &parts.headers, &query)?;
        let stream = stream_name(axum::extract::Path::from_request_parts(parts, state).await)?;
        Ok(OnStream {
            query,
            principal,
            stream,
        })
    }
}

fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query: &QueryParams,
) -> ApiResult<Principal> {
    state.auth.authenticate(headers, query.get("token"))
}
