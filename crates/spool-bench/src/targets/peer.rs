//! The bare-HTTP peer: an in-process axum server that answers Spool's publish route with
//! `201` and a small JSON body without storing anything.
//!
//! It is the ceiling of the same HTTP stack (hyper, axum, JSON answer) on the same machine, so
//! "spool msgs/s ÷ peer msgs/s" says how much of raw HTTP throughput Spool keeps. It runs on
//! its own thread and tokio runtime (worker count as Spool's: one per core), never on the
//! benchmark client's runtime, so client and server do not share scheduler queues.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use async_trait::async_trait;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    routing::post,
};
use reqwest::Url;
use spool_protocol::http::PublishResponse;
use tokio::sync::oneshot;

use super::{
    Publisher, Target,
    http::{HttpPublisher, publish_urls},
};
use crate::workload::Workload;

/// Longest wait for the peer's runtime to stop its tasks on drop.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// The peer server and how to reach it.
pub struct PeerTarget {
    /// Stopped on drop.
    server: PeerServer,
    urls: Arc<[Url]>,
    workload: Arc<Workload>,
}

impl PeerTarget {
    pub fn start(workload: Arc<Workload>) -> Result<Self> {
        let server = PeerServer::start()?;
        let base = Url::parse(&format!("http://{}/", server.addr)).context("bad peer base URL")?;
        Ok(Self {
            urls: publish_urls(&base, &workload)?,
            server,
            workload,
        })
    }
}

#[async_trait]
impl Target for PeerTarget {
    fn name(&self) -> &str {
        "peer"
    }

    fn description(&self) -> String {
        format!(
            "in-process axum server on {}, its own tokio runtime ({} workers); acks `201` \
             with a Spool-shaped JSON body and stores nothing (the bare-HTTP ceiling)",
            self.server.addr, self.server.workers
        )
    }

    async fn connect(&self, _client_idx: usize) -> Result<Box<dyn Publisher>> {
        Ok(Box::new(
            HttpPublisher::connect(&self.urls, None, self.workload.clone(), None).await?,
        ))
    }
}

/// The server thread; dropping it stops the runtime and joins the thread.
struct PeerServer {
    addr: SocketAddr,
    workers: usize,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PeerServer {
    fn start() -> Result<Self> {
        // Bind here, so the address is known and a failure is reported before anything runs.
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("the peer cannot bind 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let workers = std::thread::available_parallelism().map_or(1, usize::from);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("bench-peer")
            .enable_all()
            .build()
            .context("cannot build the peer's runtime")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-peer".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            eprintln!("spool-bench: the peer cannot use its listener: {e}");
                            return;
                        }
                    };
                    let app = Router::new()
                        .route("/v1/streams/{stream}/messages", post(publish))
                        .with_state(Arc::new(AtomicU64::new(0)));
                    tokio::select! {
                        served = axum::serve(listener, app) => {
                            if let Err(e) = served {
                                eprintln!("spool-bench: the peer server failed: {e}");
                            }
                        }
                        _ = stopped => {}
                    }
                });
                // Not graceful on purpose: idle keep-alive connections must not hold us up.
                runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
            })
            .context("cannot start the peer's thread")?;
        Ok(Self {
            addr,
            workers,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Consumes the body like Spool does, then acks with a Spool-shaped answer.
async fn publish(
    State(offsets): State<Arc<AtomicU64>>,
    Path(stream): Path<String>,
    _payload: Bytes,
) -> (StatusCode, Json<PublishResponse>) {
    let offset = offsets.fetch_add(1, Ordering::Relaxed) + 1;
    (
        StatusCode::CREATED,
        Json(PublishResponse {
            stream,
            epoch: "peer".to_owned(),
            offset,
            duplicate: false,
        }),
    )
}
