//! The accept loop: what a TCP connection may cost before it has proved anything.
//!
//! Every socket the server holds is a file descriptor and a few KiB of buffers that anyone who
//! can reach the port can ask for, without a credential. So the loop bounds them:
//!
//! - **how many**: `max_connections` in all and `max_connections_per_ip` per client address
//!   (0: no per-address bound). Past either, the connection gets a one-line `503` and is
//!   closed at once — counted, never queued;
//! - **how slow**: a request head must arrive within `header_timeout` (hyper's header-read
//!   timer, which also bounds the wait for the next request on a kept-alive connection);
//! - **how idle**: a connection that moves no byte either way for `idle_timeout` while no
//!   request is being answered is closed. Long-polls count as requests being answered, SSE
//!   streams send heartbeats and WebSockets ping, so only dead weight is cut.
//!
//! A WebSocket keeps its slot after the upgrade: the slot lives in the socket wrapper
//! ([`Tracked`]), which hyper hands over to the upgraded connection.
//!
//! Accepting fails when the process runs out of file descriptors; the loop then waits a
//! moment instead of spinning, and goes on once descriptors are free again.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{Router, extract::ConnectInfo, extract::Request};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{config::HttpConfig, metrics::Metrics};

/// What a refused connection reads before it is closed.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 89\r\n\r\n\
{\"error\":{\"code\":\"too_many_connections\",\"message\":\"connection limit reached; try later\"}}";

/// Serves `app` on `listener` until `shutdown` fires, then lets every open HTTP connection
/// finish its request (upgraded WebSockets have their own shutdown) and returns.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    config: HttpConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(Slots::new(&config));
    if let Some(tls) = &config.tls {
        tls.clone().reload_on_sighup(shutdown.clone());
    }
    let connections = TaskTracker::new();
    // Dropping the sender tells every connection to finish gracefully.
    let (stop_tx, stop_rx) = watch::channel(());
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    // Out of file descriptors (EMFILE/ENFILE) or memory: wait instead of
                    // spinning; the backlog holds the callers meanwhile.
                    tracing::warn!(error = %e, "accepting a connection failed; retrying in 100 ms");
                    metrics.accept_errors.inc();
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let Some(slot) = slots.take(remote.ip()) else {
            metrics.connections_refused.inc();
            // Best effort: a full socket buffer on a brand-new connection is unlikely, and the
            // close says enough if the answer does not fit.
            let _ = tcp.try_write(REFUSED);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            // Deliveries are small frames written as they come: without TCP_NODELAY, Nagle
            // holds a subscriber's next frame until the delayed ACK (docs/benchmarks.md).
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let io = Tracked::new(tcp, slot);
        let activity = io.activity.clone();
        match &config.tls {
            None => connections.spawn(serve_connection(
                io,
                activity,
                remote,
                app.clone(),
                config.clone(),
                stop_rx.clone(),
            )),
            Some(tls) => connections.spawn(serve_tls_connection(
                io,
                tls.acceptor(),
                remote,
                app.clone(),
                config.clone(),
                stop_rx.clone(),
            )),
        };
    }
    drop(listener);
    drop(stop_tx);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// File descriptors kept for everything but client connections: the listener, the engine's
/// files and connections, logs, the runtime.
const RESERVED_FDS: u64 = 256;

/// Raises the process's soft open-file limit to its hard limit (as Go's runtime and nginx's
/// `worker_rlimit_nofile` do), then makes sure `max_connections` fits under it: when the
/// kernel runs out of descriptors first, accept fails and the engine may fail to open a file
/// (a segment roll), instead of one client being told "too many connections".
pub(crate) fn fit_to_file_limit(config: &mut HttpConfig) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            tracing::debug!(
                from = limit.rlim_cur,
                to = limit.rlim_max,
                "raised the open-file limit"
            );
            limit.rlim_cur = limit.rlim_max;
        }
    }
    let room = usize::try_from(limit.rlim_cur.saturating_sub(RESERVED_FDS))
        .unwrap_or(usize::MAX)
        .max(1);
    if config.max_connections > room {
        tracing::warn!(
            max_connections = config.max_connections,
            open_file_limit = limit.rlim_cur,
            using = room,
            "--max-connections is above what the open-file limit allows; using {room} (raise \
             `ulimit -n` to allow more)"
        );
        config.max_connections = room;
    }
}

/// Errors of one connection that say nothing about the listener (the peer gave up between
/// SYN and accept).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// What a plain-HTTP request sent to the TLS port reads before it is closed.
const TLS_REQUIRED: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 92\r\n\r\n\
{\"error\":{\"code\":\"tls_required\",\"message\":\"this port speaks HTTPS: use https:// or wss://\"}}";

/// The TLS handshake, bounded like a request head (`header_timeout`), then the connection as
/// over plain TCP. A client that speaks plain HTTP to this port (its first byte is not a TLS
/// handshake record, 0x16) gets a one-line `400` saying so instead of a bare reset.
async fn serve_tls_connection(
    io: Tracked,
    acceptor: tokio_rustls::TlsAcceptor,
    remote: SocketAddr,
    app: Router,
    config: HttpConfig,
    mut stop: watch::Receiver<()>,
) {
    let activity = io.activity.clone();
    let handshake = async {
        let mut first = [0u8; 1];
        match io.tcp.peek(&mut first).await {
            Ok(1) if first[0] != 0x16 => {
                refuse_plain(io).await;
                return None;
            }
            Ok(1) => {}
            _ => return None,
        }
        match acceptor.accept(io).await {
            Ok(tls) => Some(tls),
            Err(e) => {
                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                None
            }
        }
    };
    let tls = tokio::select! {
        done = tokio::time::timeout(config.header_timeout, handshake) => match done {
            Ok(Some(tls)) => tls,
            Ok(None) => return,
            Err(_) => {
                tracing::debug!(%remote, "TLS handshake timed out");
                return;
            }
        },
        _ = stop.changed() => return,
    };
    serve_connection(tls, activity, remote, app, config, stop).await;
}

/// Answers a plain-HTTP client on the TLS port with [`TLS_REQUIRED`] and closes. What it sent
/// is read first and after: closing with unread bytes resets the connection, and the reset
/// can overtake the answer.
async fn refuse_plain(mut io: Tracked) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 4096];
    let _ = io.read(&mut buf).await;
    if io.write_all(TLS_REQUIRED).await.is_ok() {
        let _ = io.shutdown().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn serve_connection<I>(
    io: I,
    activity: Arc<Activity>,
    remote: SocketAddr,
    app: Router,
    config: HttpConfig,
    mut stop: watch::Receiver<()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let in_flight = Arc::new(AtomicUsize::new(0));
    let requests = in_flight.clone();
    let service = app.map_request(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        request.map(axum::body::Body::new)
    });
    let service = tower::service_fn(move |request: Request<Incoming>| {
        let busy = InFlight::enter(&requests);
        let call = service.clone().oneshot(request);
        async move {
            let response = call.await;
            drop(busy);
            Ok::<_, Infallible>(match response {
                Ok(r) => r,
                Err(never) => match never {},
            })
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout)
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
        .with_upgrades();
    let mut conn = pin!(conn);
    let mut stopping = false;
    let idle = config.idle_timeout;
    let mut check = tokio::time::interval(
        idle.min(Duration::from_secs(5))
            .max(Duration::from_millis(50)),
    );
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!(error = %e, "connection ended with an error");
                }
                return;
            }
            changed = stop.changed(), if !stopping => {
                // The only change is the sender going away: shutdown.
                let _ = changed;
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = check.tick() => {
                if in_flight.load(Ordering::Relaxed) == 0 && activity.idle_for() >= idle {
                    tracing::debug!(%remote, ?idle, "closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// Counts a request being answered until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection budget: a count in all and per client address.
struct Slots {
    max: usize,
    max_per_ip: usize,
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Slots {
    fn new(config: &HttpConfig) -> Self {
        Self {
            max: config.max_connections,
            max_per_ip: config.max_connections_per_ip,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        }
    }

    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        if self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_err()
        {
            return None;
        }
        if self.max_per_ip > 0 {
            let mut per_ip = self.per_ip.lock();
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                drop(per_ip);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return None;
            }
            *n += 1;
        }
        Some(Slot {
            slots: self.clone(),
            ip,
        })
    }
}

/// One connection's place in [`Slots`], given back on drop (when the socket closes).
struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.slots.max_per_ip > 0 {
            let mut per_ip = self.slots.per_ip.lock();
            if let Some(n) = per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
        self.slots.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When a connection last moved a byte, in milliseconds since it was accepted.
struct Activity {
    since: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let now = self.since.elapsed().as_millis() as u64;
        // Only ever forward; a relaxed store is enough for a coarse idle check.
        if self.last_ms.load(Ordering::Relaxed) != now {
            self.last_ms.store(now, Ordering::Relaxed);
        }
    }

    fn idle_for(&self) -> Duration {
        let last = self.last_ms.load(Ordering::Relaxed);
        self.since
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// A TCP stream that notes each read and write and holds its connection slot for as long as
/// the socket lives (through a WebSocket upgrade).
struct Tracked {
    tcp: TcpStream,
    activity: Arc<Activity>,
    _slot: Slot,
}

impl Tracked {
    fn new(tcp: TcpStream, slot: Slot) -> Self {
        Self {
            tcp,
            activity: Arc::new(Activity {
                since: Instant::now(),
                last_ms: AtomicU64::new(0),
            }),
            _slot: slot,
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tcp).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use spool_protocol::{ErrorBody, ErrorCode};

    /// The hand-written answers are well-formed: their length header is their body's, and the
    /// body is the error JSON every client reads.
    #[test]
    fn the_fixed_answers_are_well_formed() {
        for (answer, status, code) in [
            (super::REFUSED, "503", ErrorCode::TooManyConnections),
            (super::TLS_REQUIRED, "400", ErrorCode::TlsRequired),
        ] {
            let text = std::str::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(length, body.len(), "{head}");
            let parsed: ErrorBody = serde_json::from_str(body).unwrap();
            assert_eq!(parsed.error.code, code);
        }
    }
}
