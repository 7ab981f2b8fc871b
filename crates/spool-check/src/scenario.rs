//! A run: set up the target (servers of its own behind fault proxies, or a running deployment
//! behind fault proxies), run the workload while the nemesis applies its schedule, let every
//! subscriber catch up, read every stream whole, and check the history.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::Serialize;
use spool_client::{
    Client, Config, Event as ClientEvent, Position, Start,
    http::{HttpClient, RequestError},
    poll::{LongPoll, PollItem},
    sse::{SseItem, SseReader},
};
use spool_protocol::http::{MessagesResponse, StreamInfoResponse};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    checker::{self, Report},
    cluster::{EngineKind, EngineServer, Node},
    history::{Entry, Event, FaultKind, Outcome, Recorder, Transport, split_position},
    nemesis::{self, Abilities, Planned},
    proxy::Proxy,
    rng::Rng,
};

/// How long after connecting a WebSocket session is surely saved in the engine.
const SESSION_SAVED: Duration = Duration::from_secs(2);

/// The engines a scenario can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    Memory,
    Disk,
    Redis,
    Nats,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Memory => "memory",
            Engine::Disk => "disk",
            Engine::Redis => "redis",
            Engine::Nats => "nats",
        }
    }

    fn clustered(self) -> bool {
        matches!(self, Engine::Redis | Engine::Nats)
    }
}

/// What to run against.
#[derive(Clone, Debug)]
pub enum Target {
    /// Servers the run starts itself.
    Start {
        engine: Engine,
        nodes: usize,
        /// The `spool` binary to run as `spool serve`.
        spool_bin: PathBuf,
        /// For Redis/NATS: use this running server (with a key prefix of the run's own) instead
        /// of starting one; the engine is then not restarted.
        engine_url: Option<String>,
    },
    /// A running deployment: `http://HOST:PORT` of each node.
    Remote {
        urls: Vec<String>,
        token: Option<String>,
    },
}

/// A run's settings.
#[derive(Clone, Debug)]
pub struct Options {
    pub target: Target,
    pub seed: u64,
    pub duration: Duration,
    /// Most publish operations (besides one first message per stream).
    pub ops: Option<u64>,
    pub publishers: usize,
    /// Subscribers, spread over the transports (ws, sse, poll in turn) and the nodes.
    pub subscribers: usize,
    /// Streams with the default retention.
    pub streams: usize,
    /// Publish operations per second, all publishers together.
    pub rate: u64,
    /// `max_messages` of the run's tight-retention stream (scenarios that start servers).
    pub tight_limit: u64,
    /// Inject faults.
    pub faults: bool,
    /// Longest wait for every subscriber to catch up after the workload.
    pub settle: Duration,
    /// Most history entries kept (the workload stops early when it is full).
    pub max_history: usize,
    /// Progress lines on stderr.
    pub progress: bool,
}

impl Options {
    /// Defaults for `target`: seed 1, 60 s, 3 publishers, 6 subscribers, 2 streams + a tight one.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            seed: 1,
            duration: Duration::from_secs(60),
            ops: None,
            publishers: 3,
            subscribers: 6,
            streams: 2,
            rate: 100,
            tight_limit: 40,
            faults: true,
            settle: Duration::from_secs(60),
            max_history: 5_000_000,
            progress: false,
        }
    }
}

/// What a run produced.
pub struct RunResult {
    pub seed: u64,
    pub engine: String,
    pub nodes: usize,
    pub elapsed: Duration,
    pub schedule: Vec<Planned>,
    pub faults_applied: u64,
    pub entries: Vec<Entry>,
    pub report: Report,
    /// Entries that did not fit the history (then the run is not conclusive).
    pub dropped_entries: u64,
    /// Problems of the harness itself (a node that would not restart…): they make the run
    /// fail, but are not violations of Spool's guarantees.
    pub harness_errors: Vec<String>,
}

impl RunResult {
    /// Whether the run found nothing wrong.
    pub fn passed(&self) -> bool {
        self.report.violation_count() == 0
            && self.dropped_entries == 0
            && self.harness_errors.is_empty()
    }
}

/// One node of the target: its fault proxy, and the process when the run started it.
struct Slot {
    proxy: Proxy,
    node: Option<Node>,
    /// Where the node listens (the proxy's upstream when it is up).
    addr: String,
}

/// Everything the workload, the nemesis and the end of the run share.
struct Ctx {
    rec: Recorder,
    slots: Vec<Mutex<Slot>>,
    http: Vec<HttpClient>,
    token: Option<String>,
    spool_bin: Option<PathBuf>,
    node_args: Vec<String>,
    engine_server: Option<Arc<Mutex<EngineServer>>>,
    engine: String,
    run: String,
    streams: Vec<String>,
    /// The first message of each stream: every subscriber starts after it.
    anchors: Vec<Position>,
    stop: AtomicBool,
    next_op: AtomicU64,
    max_ops: Option<u64>,
    /// Where each (subscriber, stream) stands.
    positions: Mutex<HashMap<(String, String), String>>,
    harness_errors: Mutex<Vec<String>>,
}

impl Ctx {
    fn nodes(&self) -> usize {
        self.slots.len()
    }

    fn harness_error(&self, e: String) {
        if let Ok(mut errors) = self.harness_errors.lock() {
            errors.push(e);
        }
    }

    fn set_position(&self, sub: &str, stream: &str, position: String) {
        if let Ok(mut p) = self.positions.lock() {
            p.insert((sub.to_owned(), stream.to_owned()), position);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a scenario and checks its history.
pub async fn run(opts: Options) -> anyhow::Result<RunResult> {
    let started = Instant::now();
    let nonce = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ u64::from(std::process::id())
    );
    let run = format!("spool-check-{nonce}");
    let rec = Recorder::new(opts.max_history);
    let mut streams: Vec<String> = (0..opts.streams.max(1))
        .map(|i| format!("{run}/s{i}"))
        .collect();

    let setup = set_up(&opts, &nonce).await?;
    if setup.tight {
        streams.push(format!("{run}/tight"));
    }
    let Setup {
        engine,
        durable,
        token,
        spool_bin,
        node_args,
        engine_server,
        nodes,
        dir,
        cleanup,
        tight: _,
    } = setup;
    let node_count = nodes.len();
    let mut slots = Vec::new();
    let mut http = Vec::new();
    for (addr, node) in nodes {
        let proxy = Proxy::start(&addr).await.context("start the fault proxy")?;
        http.push(HttpClient::new(
            &format!("http://{}", proxy.addr),
            token.as_deref(),
        )?);
        slots.push(Mutex::new(Slot { proxy, node, addr }));
    }
    rec.record(Event::Setup {
        engine: engine.clone(),
        nodes: node_count,
        seed: opts.seed,
        durable,
    });
    progress(
        &opts,
        format!(
            "spool check: {engine}, {node_count} node(s), seed {}, up to {:?}; streams {run}/…",
            opts.seed, opts.duration
        ),
    );

    // The first message of each stream, which every subscriber starts after.
    let mut anchors = Vec::new();
    for (i, stream) in streams.iter().enumerate() {
        let (epoch, offset) = publish_op(
            &rec,
            &http,
            &run,
            i as u64,
            0,
            stream,
            Duration::from_secs(30),
            None,
        )
        .await
        .with_context(|| format!("the first publish to {stream} was never acked"))?;
        anchors.push(
            format!("{epoch}:{offset}")
                .parse::<Position>()
                .map_err(|e| {
                    anyhow::anyhow!("the server acked an unreadable position {epoch}:{offset}: {e}")
                })?,
        );
        let info = stream_info(&http[0], stream).await?;
        rec.record(Event::Stream {
            stream: stream.clone(),
            max_messages: info.as_ref().map(|i| i.retention.max_messages),
            max_bytes: info.as_ref().map(|i| i.retention.max_bytes),
            max_age_ms: info.as_ref().map(|i| i.retention.max_age_ms),
        });
    }

    let ctx = Arc::new(Ctx {
        rec: rec.clone(),
        slots,
        http,
        token,
        spool_bin,
        node_args,
        engine_server,
        engine: engine.clone(),
        run: run.clone(),
        streams: streams.clone(),
        anchors,
        stop: AtomicBool::new(false),
        next_op: AtomicU64::new(streams.len() as u64),
        max_ops: opts.ops.map(|n| n + streams.len() as u64),
        positions: Mutex::default(),
        harness_errors: Mutex::default(),
    });

    // Subscribers: ws, sse, poll in turn, over the nodes.
    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    let (stop_readers, _) = watch::channel(false);
    let mut pauses = Vec::new();
    for i in 0..opts.subscribers.max(1) {
        let transport = Transport::ALL[i % 3];
        let node = i % node_count;
        let sub = format!("{}-{i}", transport.name());
        let (pause, paused) = watch::channel(false);
        pauses.push(pause);
        match transport {
            Transport::Ws => readers.push(ws_subscriber(ctx.clone(), sub, node, paused).await?),
            Transport::Sse | Transport::Poll => {
                for s in 0..ctx.streams.len() {
                    let (ctx, sub, paused) = (ctx.clone(), sub.clone(), paused.clone());
                    // The SSE reader's future is not `Send` (spool-client's SseReader holds a
                    // non-`Sync` body across an await), so it runs on a blocking thread of its
                    // own, on this runtime, until the readers are told to stop.
                    let handle = tokio::runtime::Handle::current();
                    let mut stop = stop_readers.subscribe();
                    readers.push(tokio::task::spawn_blocking(move || {
                        handle.block_on(async move {
                            tokio::select! {
                                _ = http_subscriber(ctx, sub, transport, node, s, paused) => {}
                                _ = stop.wait_for(|s| *s) => {}
                            }
                        })
                    }));
                }
            }
        }
    }

    // The engines save sessions about once a second: a session younger than that may be lost
    // by a kill -9 (allowed), so the faults (and the workload, whose clock they follow) start
    // once every WebSocket session is surely saved.
    tokio::time::sleep(SESSION_SAVED).await;

    // Publishers.
    let t0 = Instant::now();
    let mut publishers = Vec::new();
    let interval =
        Duration::from_micros(1_000_000 * opts.publishers.max(1) as u64 / opts.rate.max(1));
    for p in 0..opts.publishers.max(1) {
        publishers.push(tokio::spawn(publisher(
            ctx.clone(),
            p as u32,
            Rng::new(opts.seed).fork(100 + p as u64),
            interval,
        )));
    }

    // The nemesis.
    let quiet = (opts.duration / 4).min(Duration::from_secs(5));
    let abilities = Abilities {
        nodes: node_count,
        subscribers: pauses.len(),
        laggards: (0..pauses.len())
            .filter(|i| Transport::ALL[i % 3] == Transport::Poll)
            .collect(),
        processes: ctx.spool_bin.is_some(),
        engine_restart: ctx.engine_server.is_some(),
    };
    let schedule = if opts.faults {
        nemesis::schedule(opts.seed, opts.duration, quiet, &abilities)
    } else {
        Vec::new()
    };
    let pauses = Arc::new(pauses);
    let nemesis_task = tokio::spawn(apply_schedule(
        ctx.clone(),
        schedule.clone(),
        pauses.clone(),
        t0,
        opts.seed,
    ));

    // The workload runs for the duration, or until the ops are done.
    let mut last_progress = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if t0.elapsed() >= opts.duration || publishers.iter().all(|p| p.is_finished()) {
            break;
        }
        if rec.full() {
            ctx.harness_error(format!(
                "the history neared its limit of {} entries (--max-history); the run stopped early",
                opts.max_history
            ));
            break;
        }
        if last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            progress(
                &opts,
                format!(
                    "  {:>4.0} s: {} ops",
                    t0.elapsed().as_secs_f64(),
                    ctx.next_op.load(Ordering::Relaxed)
                ),
            );
        }
    }
    ctx.stop.store(true, Ordering::SeqCst);
    let faults_applied = nemesis_task.await.unwrap_or(0);
    for p in publishers {
        let _ = p.await;
    }
    for pause in pauses.iter() {
        pause.send_replace(false);
    }
    progress(
        &opts,
        format!(
            "  workload done after {:.1} s ({} faults); waiting for every subscriber to catch up",
            t0.elapsed().as_secs_f64(),
            faults_applied
        ),
    );

    // Every subscriber catches up with the final heads, then every stream is read whole.
    settle(&ctx, opts.settle).await;
    final_reads(&ctx).await;
    stop_readers.send_replace(true);
    for r in &readers {
        r.abort();
    }
    for r in readers {
        let _ = r.await;
    }
    // Nodes and proxies stop here (a node is killed when dropped).
    let harness_errors = std::mem::take(&mut *lock(&ctx.harness_errors));
    drop(ctx);
    if let Some((engine, url, prefix)) = cleanup {
        clean_shared(engine, &url, &format!("c{prefix}")).await;
    }
    drop(dir);

    let entries = rec.snapshot();
    let report = checker::check(&entries);
    Ok(RunResult {
        seed: opts.seed,
        engine,
        nodes: node_count,
        elapsed: started.elapsed(),
        schedule,
        faults_applied,
        dropped_entries: rec.dropped(),
        entries,
        report,
        harness_errors,
    })
}

fn progress(opts: &Options, line: String) {
    if opts.progress {
        eprintln!("{line}");
    }
}

/// The target, set up.
struct Setup {
    engine: String,
    durable: bool,
    token: Option<String>,
    spool_bin: Option<PathBuf>,
    node_args: Vec<String>,
    engine_server: Option<Arc<Mutex<EngineServer>>>,
    /// Each node's address, with its process when the run started it.
    nodes: Vec<(String, Option<Node>)>,
    dir: Option<tempfile::TempDir>,
    /// A shared Redis/NATS and the prefix to delete from it afterwards.
    cleanup: Option<(Engine, String, String)>,
    /// Whether the run has a tight-retention stream (it configured the servers).
    tight: bool,
}

async fn set_up(opts: &Options, nonce: &str) -> anyhow::Result<Setup> {
    match &opts.target {
        Target::Remote { urls, token } => {
            if urls.is_empty() {
                bail!("give at least one --url");
            }
            let mut nodes = Vec::new();
            for url in urls {
                let u = reqwest::Url::parse(url).with_context(|| format!("--url {url:?}"))?;
                if u.scheme() != "http" {
                    bail!("--url {url:?}: only http:// URLs (the fault proxy is plain TCP)");
                }
                let host = u.host_str().context("--url without a host")?;
                let port = u.port_or_known_default().unwrap_or(80);
                nodes.push((format!("{host}:{port}"), None));
            }
            Ok(Setup {
                engine: "remote".into(),
                durable: true,
                token: token.clone(),
                spool_bin: None,
                node_args: Vec::new(),
                engine_server: None,
                nodes,
                dir: None,
                cleanup: None,
                tight: false,
            })
        }
        Target::Start {
            engine,
            nodes,
            spool_bin,
            engine_url,
        } => {
            let tmp = tempfile::tempdir().context("temp dir")?;
            let key = format!("check-{nonce}");
            let config = tmp.path().join("spool-check.toml");
            std::fs::write(
                &config,
                format!(
                    "[[retention.rules]]\npattern = \"spool-check-*/tight\"\nmax_messages = {}\n",
                    opts.tight_limit.max(1)
                ),
            )?;
            let mut args: Vec<String> = [
                "--api-key",
                key.as_str(),
                "--config",
                &config.display().to_string(),
                "--ws-ping-interval",
                "2s",
                "--ws-ping-timeout",
                "4s",
                "--shutdown-timeout",
                "3s",
                "--heartbeat",
                "2s",
                "--engine",
                engine.name(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut server = None;
            let mut cleanup = None;
            match engine {
                Engine::Memory => {}
                Engine::Disk => args.extend([
                    "--data-dir".into(),
                    tmp.path().join("data").display().to_string(),
                    "--durability".into(),
                    "fsync".into(),
                ]),
                Engine::Redis | Engine::Nats => {
                    let kind = if *engine == Engine::Redis {
                        EngineKind::Redis
                    } else {
                        EngineKind::Nats
                    };
                    let url = match engine_url {
                        Some(url) => {
                            cleanup = Some((*engine, url.clone(), nonce.to_owned()));
                            url.clone()
                        }
                        None => {
                            let s = tokio::task::spawn_blocking(move || EngineServer::start(kind))
                                .await??;
                            let url = s.url();
                            server = Some(Arc::new(Mutex::new(s)));
                            url
                        }
                    };
                    let (url_flag, prefix_flag) = if *engine == Engine::Redis {
                        ("--redis-url", "--redis-prefix")
                    } else {
                        ("--nats-url", "--nats-prefix")
                    };
                    args.extend([
                        url_flag.into(),
                        url,
                        prefix_flag.into(),
                        format!("c{nonce}"),
                    ]);
                }
            }
            let n = if engine.clustered() {
                (*nodes).max(1)
            } else {
                1
            };
            let mut started = Vec::new();
            for _ in 0..n {
                let (bin, a) = (spool_bin.clone(), args.clone());
                let node = tokio::task::spawn_blocking(move || Node::start(&bin, &a)).await??;
                started.push((node.addr.clone(), Some(node)));
            }
            Ok(Setup {
                engine: engine.name().into(),
                durable: *engine != Engine::Memory,
                token: Some(key),
                spool_bin: Some(spool_bin.clone()),
                node_args: args,
                engine_server: server,
                nodes: started,
                dir: Some(tmp),
                cleanup,
                tight: true,
            })
        }
    }
}

/// Publishes operation `op` until it is acked or refused, or `patience` ran out, each attempt
/// on the next node; records every attempt. The ack's `(epoch, offset)` if it came.
#[allow(clippy::too_many_arguments)]
async fn publish_op(
    rec: &Recorder,
    http: &[HttpClient],
    run: &str,
    op: u64,
    publisher: u32,
    stream: &str,
    patience: Duration,
    rng: Option<&mut Rng>,
) -> Option<(String, u64)> {
    let key = format!("{run}-{op}");
    let payload = format!("{run}:{op}");
    let started = Instant::now();
    let mut local = Rng::new(op);
    let rng = rng.unwrap_or(&mut local);
    for attempt in 0u32.. {
        let node = (publisher as usize + attempt as usize) % http.len();
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            http[node].publish(
                stream,
                payload.clone().into_bytes(),
                Some(&key),
                Some("text/plain"),
            ),
        )
        .await;
        let outcome = match answer {
            Ok(Ok(r)) => Outcome::Acked {
                epoch: r.epoch,
                offset: r.offset,
                duplicate: r.duplicate,
            },
            Ok(Err(RequestError::Rejected(status, why))) => Outcome::Refused {
                why: format!("{status}: {why}"),
            },
            Ok(Err(e)) => Outcome::Indeterminate { why: e.to_string() },
            Err(_) => Outcome::Indeterminate {
                why: "no answer within 5 s".into(),
            },
        };
        let done = match &outcome {
            Outcome::Acked { epoch, offset, .. } => Some(Some((epoch.clone(), *offset))),
            Outcome::Refused { .. } => Some(None),
            Outcome::Indeterminate { .. } => None,
        };
        rec.record(Event::Publish {
            op,
            publisher,
            attempt,
            node,
            stream: stream.to_owned(),
            key: key.clone(),
            payload: payload.clone(),
            outcome,
        });
        if let Some(done) = done {
            return done;
        }
        if started.elapsed() >= patience {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(rng.range(50, 300))).await;
    }
    None
}

async fn publisher(ctx: Arc<Ctx>, p: u32, mut rng: Rng, interval: Duration) {
    let tight = ctx.streams.iter().position(|s| s.ends_with("/tight"));
    let plain = tight.unwrap_or(ctx.streams.len());
    while !ctx.stop.load(Ordering::SeqCst) {
        let op = ctx.next_op.fetch_add(1, Ordering::SeqCst);
        if ctx.max_ops.is_some_and(|max| op >= max) {
            return;
        }
        // The tight stream gets 40% of the publishes, so retention drops messages quickly.
        let stream = match tight {
            Some(t) if rng.chance(40) => t,
            _ => rng.below(plain.max(1)),
        };
        let stream = ctx.streams[stream].clone();
        publish_op(
            &ctx.rec,
            &ctx.http,
            &ctx.run,
            op,
            p,
            &stream,
            Duration::from_secs(30),
            Some(&mut rng),
        )
        .await;
        let jitter = interval.as_micros() as u64;
        tokio::time::sleep(Duration::from_micros(
            rng.range(jitter / 2, jitter * 3 / 2 + 1),
        ))
        .await;
    }
}

async fn stream_info(
    http: &HttpClient,
    stream: &str,
) -> anyhow::Result<Option<StreamInfoResponse>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let request = http
            .get(http.url(&["v1", "streams", stream]))
            .timeout(Duration::from_secs(5));
        match http.send_json::<StreamInfoResponse>(request).await {
            Ok(info) => return Ok(Some(info)),
            Err(RequestError::Rejected(status, _)) if status == reqwest::StatusCode::NOT_FOUND => {
                return Ok(None);
            }
            Err(e) if Instant::now() >= deadline => {
                bail!("stream info of {stream}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn wait_unpaused(paused: &mut watch::Receiver<bool>) {
    let _ = paused.wait_for(|p| !*p).await;
}

async fn ws_subscriber(
    ctx: Arc<Ctx>,
    sub: String,
    node: usize,
    mut paused: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let addr = lock(&ctx.slots[node]).proxy.addr.clone();
    let mut config = Config::new(format!("ws://{addr}/v1/ws"))
        .backoff(Duration::from_millis(50), Duration::from_secs(2))
        .event_capacity(64)
        .connect_timeout(Duration::from_secs(5));
    if let Some(token) = &ctx.token {
        config = config.token(token.clone());
    }
    let client = Client::connect(config)
        .await
        .with_context(|| format!("{sub}: connect"))?;
    for (stream, anchor) in ctx.streams.iter().zip(&ctx.anchors) {
        ctx.rec.record(Event::Subscribe {
            sub: sub.clone(),
            transport: Transport::Ws,
            node,
            stream: stream.clone(),
            position: anchor.to_string(),
        });
        ctx.set_position(&sub, stream, anchor.to_string());
    }
    let reader = tokio::spawn({
        let (ctx, client, sub) = (ctx.clone(), client.clone(), sub.clone());
        async move {
            loop {
                wait_unpaused(&mut paused).await;
                let Some(event) = client.next_event().await else {
                    return;
                };
                match event {
                    ClientEvent::Connected { resumed, .. } => ctx.rec.record(Event::Connected {
                        sub: sub.clone(),
                        resumed,
                    }),
                    ClientEvent::Message(m) => {
                        let position = m.position.to_string();
                        ctx.rec.record(Event::Deliver {
                            sub: sub.clone(),
                            stream: m.stream.clone(),
                            epoch: m.position.epoch.to_string(),
                            offset: m.position.offset.get(),
                            payload: String::from_utf8_lossy(&m.payload).into_owned(),
                        });
                        ctx.set_position(&sub, &m.stream, position);
                    }
                    ClientEvent::Reset {
                        stream,
                        reason,
                        position,
                    } => {
                        ctx.rec.record(Event::Reset {
                            sub: sub.clone(),
                            stream: stream.clone(),
                            reason,
                            position: position.to_string(),
                        });
                        ctx.set_position(&sub, &stream, position.to_string());
                    }
                    ClientEvent::Disconnected { reason } => ctx.rec.record(Event::Disconnected {
                        sub: sub.clone(),
                        why: reason,
                    }),
                    ClientEvent::Error { error, terminal } => {
                        ctx.rec.record(Event::Disconnected {
                            sub: sub.clone(),
                            why: format!(
                                "error{}: {error}",
                                if terminal { " (terminal)" } else { "" }
                            ),
                        });
                        if terminal {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        }
    });
    for (stream, anchor) in ctx.streams.iter().zip(&ctx.anchors) {
        client
            .subscribe(stream.clone(), Start::After(anchor.clone()))
            .await
            .with_context(|| format!("{sub}: subscribe {stream}"))?;
    }
    Ok(reader)
}

/// An SSE or long-poll subscriber of one stream.
async fn http_subscriber(
    ctx: Arc<Ctx>,
    sub: String,
    transport: Transport,
    node: usize,
    index: usize,
    mut paused: watch::Receiver<bool>,
) {
    let http = ctx.http[node].clone();
    let stream = ctx.streams[index].clone();
    let mut after = ctx.anchors[index].clone();
    ctx.rec.record(Event::Subscribe {
        sub: sub.clone(),
        transport,
        node,
        stream: stream.clone(),
        position: after.to_string(),
    });
    ctx.set_position(&sub, &stream, after.to_string());
    let deliver = |after: &mut Position, epoch: &str, offset: u64, data: Option<String>| {
        ctx.rec.record(Event::Deliver {
            sub: sub.clone(),
            stream: stream.clone(),
            epoch: epoch.to_owned(),
            offset,
            payload: data.unwrap_or_default(),
        });
        if let Ok(p) = format!("{epoch}:{offset}").parse::<Position>() {
            *after = p;
        }
        ctx.set_position(&sub, &stream, format!("{epoch}:{offset}"));
    };
    let reset = |after: &mut Position, reason: String, position: String| {
        ctx.rec.record(Event::Reset {
            sub: sub.clone(),
            stream: stream.clone(),
            reason,
            position: position.clone(),
        });
        if let Ok(p) = position.parse::<Position>() {
            *after = p;
        }
        ctx.set_position(&sub, &stream, position);
    };
    loop {
        match transport {
            Transport::Sse => {
                let mut reader = SseReader::new(&http, &stream, Start::After(after.clone()))
                    .backoff(Duration::from_millis(50), Duration::from_secs(2));
                loop {
                    wait_unpaused(&mut paused).await;
                    match reader.next().await {
                        Ok(SseItem::Message(m)) => deliver(&mut after, &m.epoch, m.offset, m.data),
                        Ok(SseItem::Reset(r)) => reset(&mut after, r.reason, r.position),
                        Ok(SseItem::Retry(r)) => ctx.rec.record(Event::Disconnected {
                            sub: sub.clone(),
                            why: r.why,
                        }),
                        Err(e) => {
                            ctx.rec.record(Event::Disconnected {
                                sub: sub.clone(),
                                why: format!("refused: {e}"),
                            });
                            break;
                        }
                    }
                }
            }
            _ => {
                let mut reader = LongPoll::new(&http, &stream, &Start::After(after.clone()))
                    .wait(2)
                    .limit(100)
                    .backoff(Duration::from_millis(50), Duration::from_secs(2));
                loop {
                    wait_unpaused(&mut paused).await;
                    match reader.next().await {
                        Ok(PollItem::Answer(answer)) => {
                            if let Some(r) = answer.reset {
                                reset(&mut after, r.reason, r.position);
                            }
                            for m in answer.messages {
                                deliver(&mut after, &m.epoch, m.offset, m.data);
                            }
                        }
                        Ok(PollItem::Retry(r)) => ctx.rec.record(Event::Disconnected {
                            sub: sub.clone(),
                            why: r.why,
                        }),
                        Err(e) => {
                            ctx.rec.record(Event::Disconnected {
                                sub: sub.clone(),
                                why: format!("refused: {e}"),
                            });
                            break;
                        }
                    }
                }
            }
        }
        // Refused (e.g. by a node still starting): start over from where it was.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Applies the schedule until it ends or the workload stops; returns how many faults it applied.
async fn apply_schedule(
    ctx: Arc<Ctx>,
    schedule: Vec<Planned>,
    pauses: Arc<Vec<watch::Sender<bool>>>,
    t0: Instant,
    seed: u64,
) -> u64 {
    let mut applied = 0;
    let mut pause_tasks = Vec::new();
    for planned in schedule {
        let at = t0 + Duration::from_millis(planned.at_ms);
        loop {
            if ctx.stop.load(Ordering::SeqCst) {
                for t in pause_tasks {
                    let _ = tokio::join!(t);
                }
                return applied;
            }
            let now = Instant::now();
            if now >= at {
                break;
            }
            tokio::time::sleep((at - now).min(Duration::from_millis(100))).await;
        }
        applied += 1;
        let node = planned.target % ctx.nodes();
        match planned.kind {
            FaultKind::Cut => {
                let mut rng = Rng::new(seed).fork(planned.at_ms);
                let slot = lock(&ctx.slots[node]);
                let live = slot.proxy.live();
                let cut = slot.proxy.cut_where(|| rng.chance(planned.amount));
                drop(slot);
                ctx.rec.record(Event::Fault {
                    kind: FaultKind::Cut,
                    node: Some(node),
                    lossy: false,
                    detail: format!("cut {cut} of {live} connections"),
                });
            }
            FaultKind::Stall => {
                ctx.rec.record(Event::Fault {
                    kind: FaultKind::Stall,
                    node: Some(node),
                    lossy: false,
                    detail: format!("{} ms", planned.amount),
                });
                lock(&ctx.slots[node]).proxy.stall(true);
                tokio::time::sleep(Duration::from_millis(planned.amount)).await;
                lock(&ctx.slots[node]).proxy.stall(false);
                ctx.rec.record(Event::Healed {
                    kind: FaultKind::Stall,
                    node: Some(node),
                });
            }
            FaultKind::Pause => {
                let i = planned.target % pauses.len().max(1);
                let Some(pause) = pauses.get(i) else { continue };
                ctx.rec.record(Event::Fault {
                    kind: FaultKind::Pause,
                    node: None,
                    lossy: false,
                    detail: format!("subscriber #{i} stops reading for {} ms", planned.amount),
                });
                pause.send_replace(true);
                let (pauses, ctx) = (pauses.clone(), ctx.clone());
                pause_tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(planned.amount)).await;
                    if let Some(p) = pauses.get(i) {
                        p.send_replace(false);
                    }
                    ctx.rec.record(Event::Healed {
                        kind: FaultKind::Pause,
                        node: None,
                    });
                }));
            }
            FaultKind::Term | FaultKind::Kill => {
                restart_node(&ctx, node, planned.kind, planned.amount).await
            }
            FaultKind::EngineRestart => {
                let Some(server) = ctx.engine_server.clone() else {
                    continue;
                };
                ctx.rec.record(Event::Fault {
                    kind: FaultKind::EngineRestart,
                    node: None,
                    lossy: false,
                    detail: format!("SIGTERM, down for {} ms", planned.amount),
                });
                let down = Duration::from_millis(planned.amount);
                let restarted =
                    tokio::task::spawn_blocking(move || lock(&server).restart(down)).await;
                match restarted {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => ctx.harness_error(format!("engine restart: {e:#}")),
                    Err(e) => ctx.harness_error(format!("engine restart: {e}")),
                }
                ctx.rec.record(Event::Healed {
                    kind: FaultKind::EngineRestart,
                    node: None,
                });
            }
        }
    }
    for t in pause_tasks {
        let _ = t.await;
    }
    applied
}

/// Stops a node (SIGTERM or SIGKILL), keeps it down for `down_ms`, starts it again on the
/// same data and points its proxy at it. Meanwhile its proxy sends new connections to
/// another node, if there is one.
async fn restart_node(ctx: &Arc<Ctx>, node: usize, kind: FaultKind, down_ms: u64) {
    let Some(bin) = ctx.spool_bin.clone() else {
        return;
    };
    let lossy = checker::lossy(&ctx.engine, kind);
    ctx.rec.record(Event::Fault {
        kind,
        node: Some(node),
        lossy,
        detail: format!("down for {down_ms} ms"),
    });
    let process = {
        let mut slot = lock(&ctx.slots[node]);
        if ctx.nodes() > 1 {
            let other = lock(&ctx.slots[(node + 1) % ctx.nodes()]).addr.clone();
            slot.proxy.set_upstream(&other);
        }
        slot.node.take()
    };
    if let Some(mut process) = process {
        let _ = tokio::task::spawn_blocking(move || {
            if kind == FaultKind::Kill {
                process.kill();
            } else {
                process.terminate();
            }
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(down_ms)).await;
    for attempt in 1..=3 {
        let (bin, args) = (bin.clone(), ctx.node_args.clone());
        match tokio::task::spawn_blocking(move || Node::start(&bin, &args)).await {
            Ok(Ok(process)) => {
                let mut slot = lock(&ctx.slots[node]);
                slot.addr = process.addr.clone();
                slot.proxy.set_upstream(&process.addr);
                slot.node = Some(process);
                drop(slot);
                ctx.rec.record(Event::Healed {
                    kind,
                    node: Some(node),
                });
                return;
            }
            Ok(Err(e)) if attempt == 3 => {
                ctx.harness_error(format!("node {node} did not start again: {e:#}"))
            }
            Err(e) if attempt == 3 => ctx.harness_error(format!("node {node}: {e}")),
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Waits until every subscriber stands at its stream's head, up to `timeout`; records the
/// ones that do not as lagging.
async fn settle(ctx: &Arc<Ctx>, timeout: Duration) {
    let mut heads: HashMap<String, String> = HashMap::new();
    for stream in &ctx.streams {
        match stream_info(&ctx.http[0], stream).await {
            Ok(Some(info)) => {
                heads.insert(stream.clone(), info.position);
            }
            Ok(None) => {}
            Err(e) => ctx.harness_error(format!("final head of {stream}: {e:#}")),
        }
    }
    let deadline = Instant::now() + timeout;
    loop {
        let behind: Vec<((String, String), String)> = lock(&ctx.positions)
            .iter()
            .filter(|((_, stream), at)| heads.get(stream).is_some_and(|h| h != *at))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if behind.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for ((sub, stream), position) in behind {
                let head = heads.get(&stream).cloned().unwrap_or_default();
                ctx.rec.record(Event::Lagging {
                    sub,
                    stream,
                    position,
                    head,
                });
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads every stream whole (long-polls from `oldest`) and records what it holds.
async fn final_reads(ctx: &Arc<Ctx>) {
    let http = &ctx.http[0];
    for stream in &ctx.streams {
        let info = match stream_info(http, stream).await {
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(e) => {
                ctx.harness_error(format!("final read of {stream}: {e:#}"));
                continue;
            }
        };
        let mut messages = Vec::new();
        let mut after = "oldest".to_owned();
        let complete = loop {
            let request = http
                .get(http.url(&["v1", "streams", stream, "messages"]))
                .query(&[("after", after.as_str()), ("limit", "1000"), ("wait", "0")])
                .timeout(Duration::from_secs(30));
            let answer = match http.send_json::<MessagesResponse>(request).await {
                Ok(a) => a,
                Err(e) => {
                    ctx.harness_error(format!("final read of {stream}: {e}"));
                    break false;
                }
            };
            let empty = answer.messages.is_empty();
            for m in answer.messages {
                if m.epoch == info.epoch {
                    messages.push((m.offset, m.data.unwrap_or_default()));
                }
            }
            if empty || split_position(&answer.position).is_some_and(|(_, o)| o >= info.head) {
                break true;
            }
            after = answer.position;
        };
        if complete {
            ctx.rec.record(Event::FinalRead {
                stream: stream.clone(),
                epoch: info.epoch,
                oldest: info.oldest,
                head: info.head,
                messages,
            });
        }
    }
}

/// Deletes what the run stored in a shared Redis / NATS (best effort).
async fn clean_shared(engine: Engine, url: &str, prefix: &str) {
    let result = match engine {
        Engine::Redis => clean_redis(url, prefix).await,
        Engine::Nats => clean_nats(url, prefix).await,
        _ => Ok(()),
    };
    if let Err(e) = result {
        eprintln!("spool check: could not delete the run's data (prefix {prefix}) from {url}: {e}");
    }
}

/// `KEYS *PREFIX*` then `DEL`, in one script over a plain RESP connection.
async fn clean_redis(url: &str, prefix: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let u = reqwest::Url::parse(url)?;
    let addr = format!(
        "{}:{}",
        u.host_str().unwrap_or("127.0.0.1"),
        u.port().unwrap_or(6379)
    );
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    // Every key of the run holds its prefix (`PREFIX:…`, or in a hash tag `{PREFIX}…`), which
    // is unique to the run.
    let pattern = format!("*{prefix}*");
    let script = format!(
        "local k = redis.call('KEYS', '{pattern}') for i = 1, #k, 500 do redis.call('DEL', unpack(k, i, math.min(i + 499, #k))) end return #k"
    );
    let cmd = format!(
        "*3\r\n$4\r\nEVAL\r\n${}\r\n{script}\r\n$1\r\n0\r\n",
        script.len()
    );
    s.write_all(cmd.as_bytes()).await?;
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
    if buf[..n].starts_with(b"-") {
        bail!("{}", String::from_utf8_lossy(&buf[..n]).trim());
    }
    Ok(())
}

/// Deletes the JetStream streams (KV buckets included) of the run's prefix.
async fn clean_nats(url: &str, prefix: &str) -> anyhow::Result<()> {
    use futures::StreamExt;
    let client = tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url)).await??;
    let js = async_nats::jetstream::new(client);
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    for name in names {
        if name.starts_with(&format!("{prefix}_")) || name.starts_with(&format!("KV_{prefix}_")) {
            js.delete_stream(&name)
                .await
                .map_err(|e| anyhow::anyhow!("delete {name}: {e}"))?;
        }
    }
    Ok(())
}
