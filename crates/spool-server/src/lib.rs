//! Spool's server: the HTTP API (publish, stream info, long-poll), Server-Sent Events, the
//! WebSocket protocol with resumable sessions, auth, metrics and graceful shutdown, over any
//! [`Engine`].
//!
//! [`serve`] runs the server on a bound listener until a [`CancellationToken`] fires; the
//! `spool` binary builds the configuration, the engine and its [`SessionStore`] and calls it.
//! Transports are thin adapters over the [`delivery`] layer (publish, encode once), and never
//! read history themselves: they drive a [`subscription::Subscription`], which applies the
//! continuity rule of `spool_core` to everything an engine returns.

pub mod auth;
pub mod config;
pub mod delivery;
pub mod error;
mod listener;
pub mod metrics;
mod query;
mod routes;
pub mod tls;
pub mod ws;

use std::{sync::Arc, time::Duration};

use spool_engine::{Engine, GroupStore, SessionStore};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::ServerConfig;
pub use delivery::budget;

use crate::{auth::Authenticator, delivery::session::Sessions, metrics::Metrics};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<dyn Engine>,
    pub config: Arc<ServerConfig>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// Where WebSocket session records are kept (the engine's store; a group store for
    /// consumer groups will sit beside it).
    pub session_store: Arc<dyn SessionStore>,
    /// WebSocket sessions (SPEC §3), saved to `session_store`.
    pub sessions: Arc<Sessions>,
    /// How many new streams each identity may still create (`delivery/budget.rs`).
    pub budget: Arc<budget::StreamBudget>,
    /// Delivered messages' wire forms, encoded once for every subscriber (`delivery/encode.rs`).
    pub encodings: Arc<delivery::encode::Encodings>,
    /// Upgraded WebSocket connections, which outlive their HTTP request: shutdown waits for
    /// them to say goodbye and save their sessions.
    pub tasks: TaskTracker,
    /// Consumer groups (`delivery/groups.rs`), when the engine keeps them; `None` answers the
    /// group routes `501 groups_unavailable`.
    pub groups: Option<Arc<delivery::groups::Groups>>,
    /// Transient messages for live subscribers on every node, never stored
    /// (`delivery/transient.rs`; AnyCable's `whisper`).
    pub transients: Arc<delivery::transient::Transients>,
}

/// What [`serve`] runs beside the API listener.
#[derive(Default)]
pub struct Extras {
    /// An internal address serving `/metrics`, `/healthz` and `/readyz` only
    /// (`--metrics-listen`).
    pub metrics: Option<TcpListener>,
}

/// Serves the API on `listener` (and `extras` beside it) until `shutdown` is cancelled, then
/// stops accepting, ends every SSE stream with a `reconnect` event, answers pending
/// long-polls, and returns once open requests are done. `engine` holds the streams,
/// `session_store` the WebSocket sessions and `group_store` the consumer groups (`spool serve`
/// passes the same engine for each; `None` for an engine that keeps no groups yet: the group
/// routes answer `501`).
pub async fn serve(
    listener: TcpListener,
    extras: Extras,
    engine: Arc<dyn Engine>,
    session_store: Arc<dyn SessionStore>,
    group_store: Option<Arc<dyn GroupStore>>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut config = config;
    listener::fit_to_file_limit(&mut config.http);
    let sessions = Arc::new(Sessions::new(session_store.clone(), config.ws.session_ttl));
    // Every engine operation is timed, the consumer groups' reads and appends (dead letters,
    // redrives) with the rest.
    let metrics = Arc::new(Metrics::new());
    let engine: Arc<dyn Engine> = Arc::new(metrics::Measured::new(engine, metrics.clone()));
    let groups = group_store.map(|store| {
        delivery::groups::Groups::new(
            engine.clone(),
            store,
            delivery::groups::GroupsConfig {
                max_cached: config.max_groups,
                max_payload: config.max_payload,
                max_read_bytes: config.max_read_bytes,
                read_ahead_bytes: config.group_read_ahead,
                clock: config.clock.clone(),
            },
        )
    });
    let group_sweeper = groups
        .clone()
        .map(|g| tokio::spawn(g.run_sweeper(shutdown.clone())));
    let transients = delivery::transient::Transients::new(
        engine.clone(),
        config.anycable.whisper_limits,
        metrics.transient.clone(),
    );
    let transient_task = tokio::spawn(transients.clone().run_remote(shutdown.clone()));
    let state = AppState {
        transients,
        auth: Arc::new(Authenticator::new(&config.auth)),
        budget: Arc::new(budget::StreamBudget::new(config.max_new_streams_per_minute)),
        encodings: Arc::default(),
        engine,
        config: Arc::new(config),
        metrics,
        shutdown: shutdown.clone(),
        session_store,
        sessions: sessions.clone(),
        tasks: TaskTracker::new(),
        groups,
    };
    let tasks = state.tasks.clone();
    let sweeper = tokio::spawn(sweep(state.engine.clone(), shutdown.clone()));
    let flusher = tokio::spawn(sessions.clone().run(shutdown.clone()));
    let http = state.config.http.clone();
    let metrics = state.metrics.clone();
    let internal = extras.metrics.map(|metrics_listener| {
        let app = routes::ops_router(state.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(metrics_listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "the metrics listener failed");
            }
        })
    });
    let app = routes::router(state);
    let result = listener::run(listener, app, http, metrics, shutdown.clone()).await;
    // WebSocket connections saw the same cancellation: they send `reconnect`, close, and save
    // their sessions. Wait for them, then save whatever else changed.
    tasks.close();
    tasks.wait().await;
    let _ = flusher.await;
    sessions.flush().await;
    sweeper.abort();
    if let Some(task) = internal {
        task.abort();
    }
    transient_task.abort();
    if let Some(task) = group_sweeper {
        task.abort();
    }
    result
}

/// Applies age-based retention to idle streams once a second.
async fn sweep(engine: Arc<dyn Engine>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = engine.sweep().await {
                    tracing::warn!(error = %e, "retention sweep failed");
                }
            }
        }
    }
}
