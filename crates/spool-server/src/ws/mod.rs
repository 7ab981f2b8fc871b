//! WebSocket on `/v1/ws` (docs/protocol.md): subscriptions to many streams with their own
//! start positions, publishing with acks, resumable sessions, heartbeats, token refresh, and
//! flow control, in the protocol the client picks by subprotocol.
//!
//! - [`core`] is what every WebSocket protocol needs: one task per connection that reads
//!   client frames, drives one [`crate::delivery::subscription::Subscription`] per stream and pipelines
//!   publishes, and the bounded outbound buffer it writes to the socket (SPEC §8). A protocol
//!   plugs in through [`core::Protocol`] (decode a frame into a command, encode an event).
//! - [`spool_v1`] is `spool.v1.json` on `/v1/ws`; [`actioncable`] is AnyCable's
//!   `actioncable-v1-json` and `actioncable-v1-ext-json` on `/cable` ([`cable`]).
//! - [`session`] keeps sessions (SPEC §3): identity, subscriptions and delivered positions,
//!   saved in the engine in batches.
//!
//! A protocol is a folder implementing [`core::Protocol`], a variant of [`Speaks`], and its
//! arm in [`run`].

pub mod actioncable;
pub mod core;
pub mod spool_v1;

use std::sync::Arc;

use axum::{
    extract::{FromRequestParts, State, WebSocketUpgrade},
    http::{
        HeaderMap, HeaderValue, StatusCode,
        header::{ORIGIN, SEC_WEBSOCKET_PROTOCOL},
        request::Parts,
    },
    response::Response,
};
use spool_protocol::ErrorCode;

use self::{
    actioncable::{ActionCable, Opening, identity::Identity},
    core::Protocol,
    spool_v1::SpoolV1,
};

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    metrics::Transport,
    query::QueryParams,
};

/// `GET /v1/ws`: checks the origin, the subprotocol and any credential sent with the upgrade,
/// then hands the socket to a connection task tracked for graceful shutdown.
pub async fn upgrade(State(state): State<AppState>, req: Accepted) -> ApiResult<Response> {
    let speaks = check_subprotocol(&req.headers)?;
    not_shutting_down(&state)?;
    // A credential on the upgrade (header or ?token=) is checked now, so a bad one gets a plain
    // 401; without one, the `connect` frame must carry it.
    let query = QueryParams::parse(req.query.as_deref())?;
    let has_credential = req.headers.contains_key(axum::http::header::AUTHORIZATION)
        || query.get("token").is_some_and(|t| !t.is_empty());
    let principal = if has_credential {
        Some(
            state
                .auth
                .authenticate_with_proof(&req.headers, query.get("token"))?,
        )
    } else {
        None
    };

    Ok(run(state, req.upgrade, speaks, principal, req.client))
}

/// `GET /cable` (`--anycable-path`): AnyCable's protocols. The upgrade is the handshake: the
/// identity (a JWT in `?jid=`, `X-JID` or an `anycable-token.` subprotocol; anonymous unless
/// `--anycable-enforce-jwt`) and a session to restore (`X-ANYCABLE-RESTORE-SID`, `?sid=`) are
/// read here; a refused identity is told with `disconnect` once the socket is open, as
/// AnyCable does.
pub async fn cable(State(state): State<AppState>, req: Accepted) -> ApiResult<Response> {
    not_shutting_down(&state)?;
    let config = state.config.anycable.clone();
    let query = QueryParams::parse(req.query.as_deref())?;
    let ext = req
        .headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or_default().split(','))
        .any(|p| p.trim() == actioncable::EXT);
    let token = actioncable::identity::token(&req.headers, query.get(&config.jwt_param), &config);
    let (opening, principal) = match actioncable::identity::identify(token, &config) {
        Identity::Token(principal, proof) => {
            (Opening::Connect { restore: None }, Some((principal, proof)))
        }
        Identity::None => (
            Opening::Connect { restore: None },
            Some((
                crate::auth::Principal::Anonymous,
                crate::auth::Proof::Anonymous,
            )),
        ),
        Identity::Unauthorized => (Opening::Unauthorized, None),
        Identity::Expired => (Opening::TokenExpired, None),
    };
    let opening = match opening {
        Opening::Connect { .. } => Opening::Connect {
            restore: req
                .headers
                .get(actioncable::RESTORE_HEADER)
                .and_then(|v| v.to_str().ok())
                .or(query.get("sid"))
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        },
        refused => refused,
    };
    // `?pi=` is the ping interval in seconds.
    let ping_interval = query
        .get("pi")
        .and_then(|pi| pi.parse::<u64>().ok())
        .filter(|pi| (1..=3600).contains(pi))
        .map(std::time::Duration::from_secs);
    let speaks = Speaks::ActionCable {
        ext,
        opening,
        ping_interval,
    };
    Ok(run(state, req.upgrade, speaks, principal, req.client))
}

/// An upgrade request past what every upgrade checks first (that it is one, and its origin),
/// with what the endpoints read from it.
pub struct Accepted {
    upgrade: WebSocketUpgrade,
    /// The client's address, for the per-address bounds.
    client: Option<std::net::IpAddr>,
    query: Option<String>,
    headers: HeaderMap,
}

impl FromRequestParts<AppState> for Accepted {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let client = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|axum::extract::ConnectInfo(addr)| addr.ip());
        let upgrade = WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map_err(|e| {
                ApiError::new(
                    e.status(),
                    ErrorCode::InvalidParameter,
                    format!("not a WebSocket upgrade: {e}"),
                )
            })?;
        check_origin(&parts.headers, &state.config.cors_origins)?;
        Ok(Accepted {
            upgrade,
            client,
            query: parts.uri.query().map(str::to_owned),
            headers: parts.headers.clone(),
        })
    }
}

/// A draining node takes no new connection: the client should go to another.
fn not_shutting_down(state: &AppState) -> ApiResult<()> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the server is shutting down; connect to another node or retry shortly",
        ));
    }
    Ok(())
}

/// Hands the upgraded socket to a connection task speaking `speaks`, tracked for graceful
/// shutdown.
fn run(
    state: AppState,
    upgrade: WebSocketUpgrade,
    speaks: Speaks,
    principal: Option<(crate::auth::Principal, crate::auth::Proof)>,
    client: Option<std::net::IpAddr>,
) -> Response {
    let ws = &state.config.ws;
    let max_message = state.config.max_payload.saturating_mul(2) + 64 * 1024;
    let upgrade = upgrade
        .protocols([speaks.name()])
        .read_buffer_size(ws.read_buffer)
        .write_buffer_size(ws.write_buffer)
        .max_message_size(max_message)
        .max_frame_size(max_message);
    let tasks = state.tasks.clone();
    upgrade.on_upgrade(move |socket| {
        let guard = state.metrics.connection(Transport::ws);
        // Boxed, each protocol's at its own size: awaited inline, the match held the larger
        // of the two futures (ActionCable's, ~700 B more) in every connection's task, beside
        // the state this block kept to make them.
        let connection: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match speaks {
            Speaks::SpoolV1 => {
                let protocol = SpoolV1::new(state.encodings.clone());
                Box::pin(core::run(socket, state, principal, client, protocol))
            }
            Speaks::ActionCable {
                ext,
                opening,
                ping_interval,
            } => {
                let protocol = ActionCable::new(
                    ext,
                    Arc::new(state.config.anycable.clone()),
                    state.encodings.clone(),
                    opening,
                    ping_interval,
                    &state.transients,
                );
                Box::pin(core::run(socket, state, principal, client, protocol))
            }
        };
        tasks.track_future(async move {
            connection.await;
            drop(guard);
        })
    })
}

/// A browser's `Origin` must be listed with `--cors-origin` (or `*` be). An origin equal to
/// the request's own `Host` is not trusted by itself: under DNS rebinding, a hostile page's
/// origin names the very host it makes the browser connect to. Clients that are not browsers
/// send no `Origin` and are not affected.
fn check_origin(headers: &HeaderMap, allowed: &[String]) -> ApiResult<()> {
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or_default();
    if allowed.iter().any(|a| a == "*" || a == origin) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        ErrorCode::OriginNotAllowed,
        format!("origin {origin:?} is not allowed; add it with --cors-origin"),
    ))
}

/// The WebSocket protocols Spool speaks.
#[derive(Debug)]
enum Speaks {
    SpoolV1,
    /// AnyCable's, on `/cable`: extended if the client named `actioncable-v1-ext-json`.
    ActionCable {
        ext: bool,
        opening: Opening,
        ping_interval: Option<std::time::Duration>,
    },
}

impl Speaks {
    fn name(&self) -> &'static str {
        match self {
            Speaks::SpoolV1 => SpoolV1::NAME,
            Speaks::ActionCable { ext: true, .. } => actioncable::EXT,
            Speaks::ActionCable { ext: false, .. } => actioncable::BASE,
        }
    }
}

/// `/v1/ws`: a client that names subprotocols must name ours; one that names none gets
/// `spool.v1.json`.
fn check_subprotocol(headers: &HeaderMap) -> ApiResult<Speaks> {
    let offered: Vec<&HeaderValue> = headers.get_all(SEC_WEBSOCKET_PROTOCOL).iter().collect();
    let named = offered
        .iter()
        .flat_map(|v| v.to_str().unwrap_or_default().split(','))
        .any(|p| p.trim() == SpoolV1::NAME);
    if offered.is_empty() || named {
        return Ok(Speaks::SpoolV1);
    }
    Err(ApiError::bad_param(format!(
        "unsupported WebSocket subprotocol; this endpoint speaks {}",
        SpoolV1::NAME
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn origins() {
        let none: Vec<String> = vec![];
        let app = vec!["https://app.example".to_owned()];
        assert!(check_origin(&headers(&[]), &none).is_ok());
        // The request's own host is no exception (DNS rebinding).
        let own = headers(&[
            ("origin", "http://127.0.0.1:7070"),
            ("host", "127.0.0.1:7070"),
        ]);
        assert!(check_origin(&own, &none).is_err());
        assert!(check_origin(&own, &["http://127.0.0.1:7070".to_owned()]).is_ok());
        let evil = headers(&[
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:7070"),
        ]);
        assert_eq!(
            check_origin(&evil, &none).unwrap_err().code,
            ErrorCode::OriginNotAllowed
        );
        assert!(check_origin(&evil, &app).is_err());
        assert!(check_origin(&headers(&[("origin", "https://app.example")]), &app).is_ok());
        assert!(check_origin(&evil, &["*".to_owned()]).is_ok());
    }

    #[test]
    fn subprotocols() {
        assert!(check_subprotocol(&headers(&[])).is_ok());
        assert!(
            check_subprotocol(&headers(&[("sec-websocket-protocol", "x, spool.v1.json")])).is_ok()
        );
        assert!(check_subprotocol(&headers(&[("sec-websocket-protocol", "mqtt")])).is_err());
    }
}
