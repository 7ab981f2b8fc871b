//! `spool-bench cluster`: the cluster engines (Redis, NATS JetStream) on one node and on
//! three, against the disk engine on one node measured in the same run.
//!
//! For each setup (`--setups disk:1,redis:1,redis:3,nats:1,nats:3`) the benchmark starts its
//! own engine server on a spare 127.0.0.1 port with its own data directory (`redis-server
//! --appendonly yes --appendfsync always`, `nats-server -js -sd DIR`; never a shared one), then
//! N `spool serve` nodes on it with the same prefix, each engine with the strongest durability
//! one machine offers (disk `fsync`, redis `fsync`, nats `replicated` with one replica), and
//! measures two things on the same nodes:
//!
//! - **publish**: `--clients` HTTP publishers, client `i` on node `i % N`, each publishing
//!   sequentially (`POST /v1/streams/bench-K/messages`, one message, API key) over `--streams`
//!   streams; acked messages per second and ack latency (the same runner and client as
//!   `spool-bench publish`). Everything acked is then read back from the last node.
//! - **fan-out**: `--subscribers` WebSocket subscribers on one stream, subscriber `i` on node
//!   `i % N`, all subscribed after a first message's position; one open-loop publisher sends
//!   `--rate` messages per second on a fixed schedule over HTTP, message `k` to node `k % N`
//!   (a few keep-alive connections per node, so a slow ack does not hold back the schedule).
//!   Every payload starts with `SEQ:STAMP_US:`, the *scheduled* send time, so a publisher or
//!   node that falls behind shows in the latency. Every subscriber checks that offsets arrive
//!   one after the other; missing, out-of-order and reset deliveries are counted.
//!
//! Every figure is also given as a ratio to the first `disk:1` setup of the same run.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures::SinkExt;
use reqwest::{
    Url,
    header::{AUTHORIZATION, HeaderValue},
};
use serde_json::{Value, json};
use spool_protocol::{
    http::PublishResponse,
    ws::{Connect, SUBPROTOCOL},
};
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
    time::Instant,
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    JsonArgs, SpoolBinArgs,
    publish::Verdict,
    readback::{self, ReadBack},
    runner::{self, RunConfig, RunResult},
    spool_process::SpoolProcess,
    targets::{
        Publisher, Target,
        http::{AckCounts, HttpPublisher, one_connection_client, publish_urls},
        process::PeerProcess,
        redis::start_aof_always,
    },
    workload::Workload,
    ws::{
        self, Errors,
        measure::{self, CpuMark, Latencies, Quantiles, now_us},
        wire,
    },
};

/// The API key every node is started with.
const API_KEY: &str = "bench-key";
/// Key / stream prefix of the cluster in Redis and NATS (valid for both engines).
const PREFIX: &str = "bench";
/// The fan-out stream; a retention rule keeps `FANOUT_HISTORY` of it so nothing resets.
const FANOUT_STREAM: &str = "fanout-0";
const FANOUT_HISTORY: u64 = 1_000_000;
/// Longest wait for every subscriber to connect and subscribe.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait, after the last publish, for every delivery to arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How far behind its schedule the fan-out publisher may be before it says so.
const BEHIND: Duration = Duration::from_secs(1);
/// Prefix of a Spool delivery frame, and where its offset and payload start.
const MESSAGE_FRAME: &[u8] = br#"{"type":"message","#;
const OFFSET_FIELD: &[u8] = br#""offset":"#;
const DATA_FIELD: &[u8] = br#""data":""#;

/// Options of `spool-bench cluster`.
#[derive(Args, Debug, Clone)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub spool: SpoolBinArgs,
    /// The nats-server binary (redis-server is taken from the PATH).
    #[arg(long, value_name = "PATH", default_value = "nats-server")]
    pub nats_server: String,
    /// Setups measured, in this order: ENGINE:NODES with ENGINE disk (1 node), redis or nats.
    /// Ratios divide by the first `disk:1`.
    #[arg(
        long,
        value_name = "E:N,…",
        value_delimiter = ',',
        default_value = "disk:1,redis:1,redis:3,nats:1,nats:3"
    )]
    pub setups: Vec<Setup>,
    /// What to measure on each setup.
    #[arg(
        long,
        value_name = "P,P",
        value_delimiter = ',',
        default_value = "publish,fanout"
    )]
    pub phases: Vec<Phase>,
    /// Payload bytes (publish and fan-out).
    #[arg(long, value_name = "BYTES", default_value_t = 256)]
    pub size: usize,
    /// Publish: concurrent HTTP publishers, spread round-robin over the nodes.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub clients: u16,
    /// Publish: streams published to, round-robin (`bench-0`, …).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub streams: u16,
    /// Publish: timed messages per setup.
    #[arg(long, value_name = "N", default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub messages: u64,
    /// Publish: untimed messages first (opens connections, creates streams).
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    pub warmup: u64,
    /// Fan-out: WebSocket subscribers on the one stream, spread round-robin over the nodes.
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    pub subscribers: usize,
    /// Fan-out: messages per second the publisher offers (× subscribers = deliveries/s; the
    /// default 100 × 1,000 = 100k/s is what a shared 2-core machine delivers unbatched).
    #[arg(long, value_name = "MSGS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: u64,
    /// Fan-out: timed window.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Fan-out: untimed start, at the same rate.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = humantime::parse_duration)]
    pub fanout_warmup: Duration,
    /// Fan-out: the publisher's keep-alive connections per node (publishes in flight at most).
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub publish_connections: u16,
    /// Fan-out: subscriber handshakes at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub connect_concurrency: usize,
    #[command(flatten)]
    pub out: JsonArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Phase {
    Publish,
    Fanout,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Disk,
    Redis,
    Nats,
}

impl EngineKind {
    fn name(self) -> &'static str {
        match self {
            EngineKind::Disk => "disk",
            EngineKind::Redis => "redis",
            EngineKind::Nats => "nats",
        }
    }

    /// The strongest `--durability` the engine offers on one machine.
    fn durability(self) -> &'static str {
        match self {
            EngineKind::Disk => "fsync",
            EngineKind::Redis => "fsync",
            EngineKind::Nats => "replicated (R1, file)",
        }
    }
}

/// One engine on some nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup {
    pub engine: EngineKind,
    pub nodes: usize,
}

impl Setup {
    fn label(&self) -> String {
        format!("{} ×{}", self.engine.name(), self.nodes)
    }

    fn is_baseline(&self) -> bool {
        self.engine == EngineKind::Disk && self.nodes == 1
    }
}

impl FromStr for Setup {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (engine, nodes) = s.split_once(':').unwrap_or((s, "1"));
        let engine = match engine {
            "disk" => EngineKind::Disk,
            "redis" => EngineKind::Redis,
            "nats" => EngineKind::Nats,
            other => bail!("unknown engine {other:?}: disk, redis or nats"),
        };
        let nodes: usize = nodes
            .parse()
            .with_context(|| format!("bad node count in {s:?}"))?;
        if nodes == 0 || nodes > 16 {
            bail!("{s:?}: between 1 and 16 nodes");
        }
        if engine == EngineKind::Disk && nodes != 1 {
            bail!("the disk engine runs on one node only");
        }
        Ok(Self { engine, nodes })
    }
}

/// An engine server and N `spool serve` nodes on it; everything stops on drop.
struct Cluster {
    setup: Setup,
    /// Stopped first (fields drop in declaration order), then the engine, then the files.
    nodes: Vec<SpoolProcess>,
    engine: Option<PeerProcess>,
    engine_line: Option<String>,
    engine_pid: Option<u32>,
    _work: tempfile::TempDir,
}

impl Cluster {
    async fn start(setup: Setup, args: &ClusterArgs) -> Result<Self> {
        let work = tempfile::tempdir().context("cannot create a work directory")?;
        let config = work.path().join("spool.toml");
        // Default retention everywhere, except on the fan-out stream, which must keep all it
        // gets so that no subscriber can be reset.
        std::fs::write(
            &config,
            format!(
                "[[retention.rules]]\npattern = \"{FANOUT_STREAM}\"\nmax_messages = \
                 {FANOUT_HISTORY}\nmax_bytes = \"1GiB\"\n"
            ),
        )
        .context("cannot write the node configuration")?;
        let (engine, mut node_args): (Option<PeerProcess>, Vec<String>) = match setup.engine {
            EngineKind::Disk => (
                None,
                vec![
                    "--engine".into(),
                    "disk".into(),
                    "--data-dir".into(),
                    work.path().join("data").display().to_string(),
                    "--durability".into(),
                    "fsync".into(),
                ],
            ),
            EngineKind::Redis => {
                let redis = start_aof_always().await?;
                let url = format!("redis://{}/", redis.addr);
                (
                    Some(redis),
                    [
                        "--engine",
                        "redis",
                        "--redis-url",
                        &url,
                        "--redis-prefix",
                        PREFIX,
                        "--durability",
                        "fsync",
                    ]
                    .map(String::from)
                    .to_vec(),
                )
            }
            EngineKind::Nats => {
                let nats =
                    PeerProcess::start(&args.nats_server, crate::targets::nats::jetstream_args)
                        .await?;
                let url = format!("nats://{}", nats.addr);
                (
                    Some(nats),
                    [
                        "--engine",
                        "nats",
                        "--nats-url",
                        &url,
                        "--nats-prefix",
                        PREFIX,
                        "--durability",
                        "replicated",
                        "--nats-replicas",
                        "1",
                    ]
                    .map(String::from)
                    .to_vec(),
                )
            }
        };
        node_args.extend([
            "--api-key".into(),
            API_KEY.into(),
            "--config".into(),
            config.display().to_string(),
        ]);
        node_args.extend(args.spool.server_args.iter().cloned());
        let engine_line = engine.as_ref().map(|e| e.command_line.clone());
        let engine_pid = engine.as_ref().map(PeerProcess::pid);
        let mut cluster = Self {
            setup,
            nodes: Vec::with_capacity(setup.nodes),
            engine,
            engine_line,
            engine_pid,
            _work: work,
        };
        for _ in 0..setup.nodes {
            let node = SpoolProcess::start(&args.spool.spool_bin, &node_args).await?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    fn check_alive(&self) -> Result<()> {
        for (i, node) in self.nodes.iter().enumerate() {
            node.check_alive()
                .with_context(|| format!("node {} of {}", i + 1, self.nodes.len()))?;
        }
        if let Some(engine) = &self.engine {
            engine.check_alive()?;
        }
        Ok(())
    }

    fn base(&self, node: usize) -> Result<Url> {
        let addr = self.nodes[node % self.nodes.len()].addr();
        Url::parse(&format!("http://{addr}/")).context("bad node URL")
    }

    /// CPU marks of every node, and of the engine server.
    fn cpu_marks(&self) -> Result<(Vec<CpuMark>, Option<CpuMark>)> {
        let nodes = self
            .nodes
            .iter()
            .map(|n| CpuMark::now(n.pid()))
            .collect::<Result<_>>()?;
        let engine = self.engine_pid.map(CpuMark::now).transpose()?;
        Ok((nodes, engine))
    }
}

/// CPU time used since `marks`: every node together, and the engine server.
fn cpu_since(marks: &(Vec<CpuMark>, Option<CpuMark>)) -> Result<(Duration, Option<Duration>)> {
    let mut nodes = Duration::ZERO;
    for m in &marks.0 {
        nodes += m.since()?.0;
    }
    let engine = marks
        .1
        .as_ref()
        .map(|m| m.since().map(|s| s.0))
        .transpose()?;
    Ok((nodes, engine))
}

fn auth() -> Result<HeaderValue> {
    HeaderValue::from_str(&format!("Bearer {API_KEY}")).context("bad Authorization header")
}

// --- publish ------------------------------------------------------------------------------

/// The cluster as a publish target: client `i` publishes to node `i % N`.
struct ClusterTarget<'a> {
    cluster: &'a Cluster,
    name: String,
    urls: Vec<Arc<[Url]>>,
    auth: HeaderValue,
    workload: Arc<Workload>,
    acks: Arc<AckCounts>,
}

#[async_trait]
impl Target for ClusterTarget<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> String {
        self.cluster.setup.label()
    }

    async fn connect(&self, client_idx: usize) -> Result<Box<dyn Publisher>> {
        let urls = &self.urls[client_idx % self.urls.len()];
        Ok(Box::new(
            HttpPublisher::connect(
                urls,
                Some(self.auth.clone()),
                self.workload.clone(),
                Some(self.acks.clone()),
            )
            .await?,
        ))
    }

    fn check_alive(&self) -> Result<()> {
        self.cluster.check_alive()
    }
}

struct PublishResult {
    run: RunResult,
    read_backs: Vec<ReadBack>,
    /// CPU per message (warm-up included): all nodes, and the engine server, in µs.
    node_us_per_msg: f64,
    engine_us_per_msg: Option<f64>,
}

impl PublishResult {
    fn read_ok(&self) -> bool {
        self.read_backs.iter().all(ReadBack::ok)
    }

    fn read_total(&self) -> u64 {
        self.read_backs.iter().map(|r| r.read).sum()
    }
}

async fn publish_phase(cluster: &Cluster, args: &ClusterArgs) -> Result<PublishResult> {
    let workload = Arc::new(Workload::new(args.streams, args.size));
    let urls = (0..cluster.nodes.len())
        .map(|i| publish_urls(&cluster.base(i)?, &workload))
        .collect::<Result<Vec<_>>>()?;
    let target = ClusterTarget {
        cluster,
        name: cluster.setup.label(),
        urls,
        auth: auth()?,
        acks: Arc::new(AckCounts::new(workload.streams().len())),
        workload: workload.clone(),
    };
    let marks = cluster.cpu_marks()?;
    let run = runner::run(
        &target,
        RunConfig {
            clients: usize::from(args.clients),
            messages: args.messages,
            warmup: args.warmup,
        },
    )
    .await?;
    let (node_cpu, engine_cpu) = cpu_since(&marks)?;
    let per = |cpu: Duration| cpu.as_secs_f64() * 1e6 / (args.messages + args.warmup) as f64;

    // Read everything back from the last node: what any node acked, every node serves.
    let last = cluster.nodes.len() - 1;
    let base = cluster.base(last)?;
    let client = one_connection_client()?;
    let mut read_backs = Vec::with_capacity(workload.streams().len());
    for (i, stream) in workload.streams().iter().enumerate() {
        let name = format!("{} (read on node {})", target.name, last + 1);
        read_backs.push(
            readback::read_stream(
                &name,
                &client,
                &base,
                &target.auth,
                stream,
                target.acks.get(i),
            )
            .await?,
        );
    }
    cluster.check_alive()?;
    Ok(PublishResult {
        run,
        read_backs,
        node_us_per_msg: per(node_cpu),
        engine_us_per_msg: engine_cpu.map(per),
    })
}

// --- fan-out ------------------------------------------------------------------------------

/// What the subscriber tasks share.
struct Shared {
    /// In-order deliveries (offset above the subscriber's last), every subscriber.
    delivered: AtomicU64,
    node_delivered: Vec<AtomicU64>,
    /// Deliveries at or below the subscriber's last offset (duplicates, out of order).
    backwards: AtomicU64,
    /// Offsets jumped over (each later arrival of one counts as backwards).
    skipped: AtomicU64,
    resets: AtomicU64,
    malformed: AtomicU64,
    ready: AtomicUsize,
    /// Latencies of messages with `seq >= rec_from` are recorded.
    rec_from: AtomicU64,
    latencies: Latencies,
    node_latencies: Vec<Latencies>,
    errors: Arc<Errors>,
}

impl Shared {
    /// Handles one text frame of subscriber `sub` on node `node`; `last` is its last offset.
    /// Returns the answer to send, if any.
    fn on_frame(
        &self,
        sub: usize,
        node: usize,
        last: &mut u64,
        text: &[u8],
    ) -> Option<&'static str> {
        if text.starts_with(MESSAGE_FRAME) {
            let Some(offset) = field_number(text, OFFSET_FIELD) else {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            if offset <= *last {
                self.backwards.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            self.skipped
                .fetch_add(offset - *last - 1, Ordering::Relaxed);
            *last = offset;
            self.delivered.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = self.node_delivered.get(node) {
                n.fetch_add(1, Ordering::Relaxed);
            }
            let stamp = memchr::memmem::find(text, DATA_FIELD)
                .and_then(|at| measure::parse_stamp(&text[at + DATA_FIELD.len()..]));
            match stamp {
                Some((seq, stamp)) => {
                    if seq >= self.rec_from.load(Ordering::Relaxed) {
                        let us = now_us().saturating_sub(stamp);
                        self.latencies.record(sub, us);
                        if let Some(l) = self.node_latencies.get(node) {
                            l.record(sub, us);
                        }
                    }
                }
                None => {
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            None
        } else if text == br#"{"type":"ping"}"# {
            Some(r#"{"type":"pong"}"#)
        } else if text.starts_with(br#"{"type":"reset""#) {
            self.resets.fetch_add(1, Ordering::Relaxed);
            self.errors
                .record(&anyhow!("reset: {}", String::from_utf8_lossy(text)));
            None
        } else {
            if text.starts_with(br#"{"type":"error""#) {
                self.errors
                    .record(&anyhow!("error frame: {}", String::from_utf8_lossy(text)));
            }
            None
        }
    }
}

/// The number after `field` in a JSON frame.
fn field_number(text: &[u8], field: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(text, field)? + field.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

struct FanoutResult {
    subscribers: usize,
    /// Messages scheduled, acked and refused (warm-up included).
    published: u64,
    acked: u64,
    publish_errors: u64,
    publish_error_samples: Vec<String>,
    /// The publisher was more than [`BEHIND`] late on its schedule at some point.
    publisher_behind: bool,
    deliveries_per_sec: f64,
    expected_per_sec: f64,
    latency: Quantiles,
    node_latency: Vec<Quantiles>,
    node_deliveries: Vec<u64>,
    missing: u64,
    extra: u64,
    backwards: u64,
    skipped: u64,
    resets: u64,
    malformed: u64,
    subscriber_errors: u64,
    subscriber_error_samples: Vec<String>,
    setup_secs: f64,
    drain_secs: f64,
    /// CPU over the timed window, in cores: every node together, the engine, the benchmark.
    node_cpu: f64,
    engine_cpu: Option<f64>,
    bench_cpu: f64,
}

impl FanoutResult {
    fn clean(&self) -> bool {
        self.missing == 0
            && self.backwards == 0
            && self.resets == 0
            && self.subscriber_errors == 0
            && self.publish_errors == 0
            && self.malformed == 0
    }
}

/// One subscriber: connects to `addr` with the API key, subscribes after `after`, then counts
/// deliveries until aborted.
async fn subscriber(
    shared: Arc<Shared>,
    setup: Arc<Semaphore>,
    addr: SocketAddr,
    sub: usize,
    node: usize,
    after: String,
    after_offset: u64,
) {
    let opened = async {
        let _permit = setup.acquire().await;
        let path = format!("/v1/ws?token={API_KEY}");
        let mut ws = wire::ws_open(addr, &path, Some(SUBPROTOCOL)).await?;
        wire::spool_connect(&mut ws, Connect::default()).await?;
        // Nothing is published while subscribers connect: no delivery is skipped.
        wire::spool_subscribe(&mut ws, FANOUT_STREAM, after).await?;
        anyhow::Ok(ws)
    }
    .await;
    let mut ws = match opened {
        Ok(ws) => ws,
        Err(e) => return shared.errors.record(&e.context("subscriber setup")),
    };
    shared.ready.fetch_add(1, Ordering::Relaxed);
    let mut last = after_offset;
    loop {
        let text = match wire::next_text(&mut ws).await {
            Ok(Some(text)) => text,
            Ok(None) => {
                return shared
                    .errors
                    .record(&anyhow!("the node closed the connection"));
            }
            Err(e) => return shared.errors.record(&e),
        };
        if let Some(answer) = shared.on_frame(sub, node, &mut last, text.as_bytes())
            && let Err(e) = ws.send(Message::text(answer)).await
        {
            return shared
                .errors
                .record(&anyhow!(e).context("cannot answer a ping"));
        }
    }
}

async fn fanout_phase(cluster: &Cluster, args: &ClusterArgs) -> Result<FanoutResult> {
    let nodes = cluster.nodes.len();
    let auth = auth()?;
    // A first message fixes where every subscriber starts: right after it.
    let client = one_connection_client()?;
    let first_url = cluster
        .base(0)?
        .join(&format!("v1/streams/{FANOUT_STREAM}/messages"))
        .context("bad fan-out URL")?;
    let answer = client
        .post(first_url)
        .header(AUTHORIZATION, auth.clone())
        .body(measure::stamped_payload(u64::MAX, 0, args.size))
        .send()
        .await
        .context("the first fan-out publish failed")?;
    let status = answer.status();
    if !status.is_success() {
        bail!(
            "the first fan-out publish got {status}: {}",
            answer.text().await.unwrap_or_default()
        );
    }
    let first: PublishResponse = answer
        .json()
        .await
        .context("bad answer to the first fan-out publish")?;
    let after = format!("{}:{}", first.epoch, first.offset);

    let shared = Arc::new(Shared {
        delivered: AtomicU64::new(0),
        node_delivered: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
        backwards: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        resets: AtomicU64::new(0),
        malformed: AtomicU64::new(0),
        ready: AtomicUsize::new(0),
        rec_from: AtomicU64::new(u64::MAX),
        latencies: Latencies::new()?,
        node_latencies: (0..nodes)
            .map(|_| Latencies::new())
            .collect::<Result<_>>()?,
        errors: Errors::new(),
    });

    let started = Instant::now();
    let setup = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for sub in 0..args.subscribers {
        let node = sub % nodes;
        tasks.spawn(subscriber(
            shared.clone(),
            setup.clone(),
            cluster.nodes[node].addr(),
            sub,
            node,
            after.clone(),
            first.offset,
        ));
    }
    ws::wait_for_subscribers(
        args.subscribers,
        &shared.ready,
        &shared.errors,
        "subscribed",
        SETUP_TIMEOUT,
        || cluster.check_alive(),
    )
    .await?;
    if shared.errors.count() > 0 {
        bail!(
            "{} subscribers could not subscribe, e.g. {}",
            shared.errors.count(),
            shared.errors.samples().join(" | ")
        );
    }
    let setup_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "  {} subscribers on {nodes} node(s) in {setup_secs:.1} s",
        args.subscribers
    );

    // The publisher: a small pool of keep-alive connections per node, taken for one publish
    // and given back; the pool bounds the publishes in flight.
    let dummy = Arc::new(Workload::new(1, 0));
    let mut pools = Vec::with_capacity(nodes);
    for node in 0..nodes {
        let url = cluster
            .base(node)?
            .join(&format!("v1/streams/{FANOUT_STREAM}/messages"))
            .context("bad fan-out URL")?;
        let size = usize::from(args.publish_connections);
        let (give, take) = mpsc::channel::<HttpPublisher>(size);
        for _ in 0..size {
            let conn = HttpPublisher::connect(
                std::slice::from_ref(&url),
                Some(auth.clone()),
                dummy.clone(),
                None,
            )
            .await?;
            give.try_send(conn)
                .map_err(|_| anyhow!("the publisher pool is full"))?;
        }
        pools.push((give, take));
    }
    let acked = Arc::new(AtomicU64::new(0));
    let publish_errors = Errors::new();
    let rate = args.rate as f64;
    let total = (rate * (args.fanout_warmup + args.duration).as_secs_f64()).ceil() as u64;
    let timed_from = (rate * args.fanout_warmup.as_secs_f64()) as u64;
    let begin = Instant::now();
    let begin_us = now_us();
    let mut inflight: JoinSet<()> = JoinSet::new();
    let mut mark = None;
    let mut behind = false;
    for k in 0..total {
        let offset_us = (k as f64 * 1e6 / rate) as u64;
        let due = begin + Duration::from_micros(offset_us);
        tokio::time::sleep_until(due).await;
        if k == timed_from {
            shared.latencies.reset();
            for l in &shared.node_latencies {
                l.reset();
            }
            shared.rec_from.store(k, Ordering::Relaxed);
            mark = Some((
                Instant::now(),
                shared.delivered.load(Ordering::Relaxed),
                cluster.cpu_marks()?,
                CpuMark::now(std::process::id())?,
            ));
        }
        let (give, take) = &mut pools[(k % nodes as u64) as usize];
        let mut conn = take.recv().await.context("the publisher pool closed")?;
        if Instant::now() > due + BEHIND {
            behind = true;
        }
        let (give, acked, errors) = (give.clone(), acked.clone(), publish_errors.clone());
        let body = Bytes::from(measure::stamped_payload(k, begin_us + offset_us, args.size));
        inflight.spawn(async move {
            match conn.publish_body(0, body).await {
                Ok(()) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => errors.record(&e),
            }
            // The pool has room for every connection: this never waits.
            let _ = give.send(conn).await;
        });
        while inflight.try_join_next().is_some() {}
    }
    let (timed_at, delivered0, cpu_marks, own_mark) =
        mark.context("the timed window never started")?;
    let delivered1 = shared.delivered.load(Ordering::Relaxed);
    let wall = timed_at.elapsed();
    let (node_cpu, engine_cpu) = cpu_since(&cpu_marks)?;
    let (own_cpu, _) = own_mark.since()?;
    while inflight.join_next().await.is_some() {}

    // Drain: every acked message to every subscriber.
    let drain_started = Instant::now();
    let expected = acked.load(Ordering::Relaxed) * args.subscribers as u64;
    while shared.delivered.load(Ordering::Relaxed) < expected
        && drain_started.elapsed() < DRAIN_TIMEOUT
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_secs = drain_started.elapsed().as_secs_f64();
    // Stragglers and duplicates: a moment more.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    cluster.check_alive()?;

    let delivered = shared.delivered.load(Ordering::Relaxed);
    let secs = wall.as_secs_f64();
    Ok(FanoutResult {
        subscribers: args.subscribers,
        published: total,
        acked: acked.load(Ordering::Relaxed),
        publish_errors: publish_errors.count(),
        publish_error_samples: publish_errors.samples(),
        publisher_behind: behind,
        deliveries_per_sec: (delivered1 - delivered0) as f64 / secs,
        expected_per_sec: rate * args.subscribers as f64,
        latency: Quantiles::of(&shared.latencies.merged()),
        node_latency: shared
            .node_latencies
            .iter()
            .map(|l| Quantiles::of(&l.merged()))
            .collect(),
        node_deliveries: shared
            .node_delivered
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect(),
        missing: expected.saturating_sub(delivered),
        extra: delivered.saturating_sub(expected),
        backwards: shared.backwards.load(Ordering::Relaxed),
        skipped: shared.skipped.load(Ordering::Relaxed),
        resets: shared.resets.load(Ordering::Relaxed),
        malformed: shared.malformed.load(Ordering::Relaxed),
        subscriber_errors: shared.errors.count(),
        subscriber_error_samples: shared.errors.samples(),
        setup_secs,
        drain_secs,
        node_cpu: node_cpu.as_secs_f64() / secs,
        engine_cpu: engine_cpu.map(|c| c.as_secs_f64() / secs),
        bench_cpu: own_cpu.as_secs_f64() / secs,
    })
}

// --- the run and its report ---------------------------------------------------------------

struct SetupResult {
    setup: Setup,
    node_line: String,
    engine_line: Option<String>,
    publish: Option<PublishResult>,
    fanout: Option<FanoutResult>,
}

pub async fn run(args: ClusterArgs) -> Result<Verdict> {
    if args.setups.is_empty() || args.phases.is_empty() {
        bail!("--setups and --phases must name at least one");
    }
    if args.phases.contains(&Phase::Fanout) {
        if args.subscribers == 0 {
            bail!("--subscribers must be at least 1");
        }
        let limit = measure::raise_nofile(args.subscribers as u64 + 1000)?;
        eprintln!("open-files limit: {limit}");
    }
    let machine = crate::ws::machine_line();
    let mut results = Vec::with_capacity(args.setups.len());
    for &setup in &args.setups {
        eprintln!("== cluster {}", setup.label());
        let cluster = Cluster::start(setup, &args)
            .await
            .with_context(|| format!("cannot start {}", setup.label()))?;
        let node_line = cluster.nodes[0].command_line().to_owned();
        eprintln!("  nodes: {node_line}");
        if let Some(line) = &cluster.engine_line {
            eprintln!("  engine: {line}");
        }
        let mut result = SetupResult {
            setup,
            node_line,
            engine_line: cluster.engine_line.clone(),
            publish: None,
            fanout: None,
        };
        if args.phases.contains(&Phase::Publish) {
            let p = publish_phase(&cluster, &args)
                .await
                .with_context(|| format!("publish on {} failed", setup.label()))?;
            eprintln!(
                "  publish: {:.0} msgs/s, p50 {:.2} ms, p99 {:.2} ms, {} errors, read back {}/{}",
                p.run.msgs_per_sec(),
                p.run.latency_ms(0.5).unwrap_or(0.0),
                p.run.latency_ms(0.99).unwrap_or(0.0),
                p.run.all_errors(),
                p.read_total(),
                p.read_backs.iter().map(|b| b.acked).sum::<u64>(),
            );
            result.publish = Some(p);
        }
        if args.phases.contains(&Phase::Fanout) {
            let f = fanout_phase(&cluster, &args)
                .await
                .with_context(|| format!("fan-out on {} failed", setup.label()))?;
            eprintln!(
                "  fan-out: {:.0} deliveries/s of {:.0}, p50 {:.1} ms, p99 {:.1} ms, missing {}, \
                 out of order {}, resets {}, publish errors {}",
                f.deliveries_per_sec,
                f.expected_per_sec,
                f.latency.p50,
                f.latency.p99,
                f.missing,
                f.backwards,
                f.resets,
                f.publish_errors
            );
            result.fanout = Some(f);
        }
        drop(cluster);
        results.push(result);
    }
    let report = markdown(&args, &machine, &results);
    println!("{report}");
    args.out.write(&to_json(&args, &results))?;
    let clean = results.iter().all(|r| {
        r.publish
            .as_ref()
            .is_none_or(|p| p.run.all_errors() == 0 && p.read_ok())
            && r.fanout.as_ref().is_none_or(FanoutResult::clean)
    });
    Ok(if clean {
        Verdict::Clean
    } else {
        Verdict::Failed
    })
}

/// `value ÷ base` to two decimals, or "—".
fn ratio(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "—".into(),
    }
}

fn markdown(args: &ClusterArgs, machine: &str, results: &[SetupResult]) -> String {
    let base = results.iter().find(|r| r.setup.is_baseline());
    let mut out = String::new();
    let _ = writeln!(out, "## spool-bench cluster\n");
    let _ = writeln!(
        out,
        "{} B payloads; {machine}. Ratios divide by `disk ×1` of this run.\n",
        args.size
    );
    for r in results {
        let _ = write!(out, "- `{}`: `{}`", r.setup.label(), r.node_line);
        if r.setup.nodes > 1 {
            let _ = write!(out, " (×{}, each on its own port)", r.setup.nodes);
        }
        if let Some(e) = &r.engine_line {
            let _ = write!(out, "; engine `{e}`");
        }
        let _ = writeln!(out);
    }

    if results.iter().any(|r| r.publish.is_some()) {
        let _ = writeln!(
            out,
            "\n### Publish: {} HTTP clients round-robin over the nodes, {} streams, {} timed \
             messages after {} warm-up\n",
            args.clients, args.streams, args.messages, args.warmup
        );
        let _ = writeln!(
            out,
            "| setup | durability | msgs/s | ÷ disk ×1 | p50 ms | p99 ms | p99 ÷ disk ×1 | p999 ms | errors | read back | nodes CPU µs/msg | engine CPU µs/msg |"
        );
        let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|");
        let base_p = base.and_then(|b| b.publish.as_ref());
        for r in results {
            let Some(p) = &r.publish else { continue };
            let read_acked: u64 = p.read_backs.iter().map(|b| b.acked).sum();
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {} | {:.2} | {:.2} | {} | {:.2} | {} | {} | {:.0} | {} |",
                r.setup.label(),
                r.setup.engine.durability(),
                p.run.msgs_per_sec(),
                ratio(
                    Some(p.run.msgs_per_sec()),
                    base_p.map(|b| b.run.msgs_per_sec())
                ),
                p.run.latency_ms(0.5).unwrap_or(0.0),
                p.run.latency_ms(0.99).unwrap_or(0.0),
                ratio(
                    p.run.latency_ms(0.99),
                    base_p.and_then(|b| b.run.latency_ms(0.99))
                ),
                p.run.latency_ms(0.999).unwrap_or(0.0),
                p.run.all_errors(),
                if p.read_ok() {
                    format!("ok ({}/{read_acked})", p.read_total())
                } else {
                    format!("MISMATCH ({}/{read_acked})", p.read_total())
                },
                p.node_us_per_msg,
                p.engine_us_per_msg
                    .map_or("—".into(), |u| format!("{u:.0}")),
            );
        }
        for r in results {
            let Some(p) = &r.publish else { continue };
            if p.run.all_errors() > 0 {
                let _ = writeln!(
                    out,
                    "\nERRORS: {}: {} not acked; e.g. {}",
                    r.setup.label(),
                    p.run.all_errors(),
                    p.run.error_samples.join(" | ")
                );
            }
            for b in p.read_backs.iter().filter(|b| !b.ok()) {
                let _ = writeln!(
                    out,
                    "\nREAD-BACK FAILED: {} {}: read {} of {} acked; {}",
                    b.target,
                    b.stream,
                    b.read,
                    b.acked,
                    b.problems.join("; ")
                );
            }
        }
    }

    if results.iter().any(|r| r.fanout.is_some()) {
        let _ = writeln!(
            out,
            "\n### Fan-out: {} WebSocket subscribers on one stream, round-robin over the nodes; \
             {} msgs/s published over HTTP round-robin over the nodes, {:?} warm-up + {:?} timed\n",
            args.subscribers, args.rate, args.fanout_warmup, args.duration
        );
        let _ = writeln!(
            out,
            "| setup | deliveries/s | ÷ offered | ÷ disk ×1 | p50 ms | p99 ms | p99 ÷ disk ×1 | max ms | p99 per node ms | missing | out of order | resets | publish errors | nodes CPU | engine CPU | drain s |"
        );
        let _ = writeln!(
            out,
            "|---|--:|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|"
        );
        let base_f = base.and_then(|b| b.fanout.as_ref());
        for r in results {
            let Some(f) = &r.fanout else { continue };
            let q = &f.latency;
            let _ = writeln!(
                out,
                "| {}{} | {:.0} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} % | {} | {:.1} |",
                r.setup.label(),
                if f.publisher_behind {
                    " (publisher fell behind)"
                } else {
                    ""
                },
                f.deliveries_per_sec,
                f.deliveries_per_sec / f.expected_per_sec.max(1.0),
                ratio(
                    Some(f.deliveries_per_sec),
                    base_f.map(|b| b.deliveries_per_sec)
                ),
                measure::ms(q.p50, q.count),
                measure::ms(q.p99, q.count),
                ratio(
                    (q.count > 0).then_some(q.p99),
                    base_f.and_then(|b| (b.latency.count > 0).then_some(b.latency.p99))
                ),
                measure::ms(q.max, q.count),
                f.node_latency
                    .iter()
                    .map(|n| measure::ms(n.p99, n.count))
                    .collect::<Vec<_>>()
                    .join(" / "),
                f.missing,
                f.backwards,
                f.resets,
                f.publish_errors,
                f.node_cpu * 100.0,
                f.engine_cpu
                    .map_or("—".into(), |c| format!("{:.0} %", c * 100.0)),
                f.drain_secs,
            );
        }
        for r in results {
            let Some(f) = &r.fanout else { continue };
            for e in &f.publish_error_samples {
                let _ = writeln!(out, "\n{} publish error: {e}", r.setup.label());
            }
            for e in &f.subscriber_error_samples {
                let _ = writeln!(out, "\n{} subscriber: {e}", r.setup.label());
            }
            if f.skipped > 0 || f.extra > 0 || f.malformed > 0 {
                let _ = writeln!(
                    out,
                    "\n{}: {} offsets skipped, {} deliveries beyond the acked, {} malformed",
                    r.setup.label(),
                    f.skipped,
                    f.extra,
                    f.malformed
                );
            }
        }
    }
    out
}

fn to_json(args: &ClusterArgs, results: &[SetupResult]) -> Value {
    json!({
        "benchmark": "cluster",
        "settings": {
            "size": args.size, "clients": args.clients, "streams": args.streams,
            "messages": args.messages, "warmup": args.warmup,
            "subscribers": args.subscribers, "rate": args.rate,
            "duration_s": args.duration.as_secs_f64(),
            "fanout_warmup_s": args.fanout_warmup.as_secs_f64(),
            "publish_connections": args.publish_connections,
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
        },
        "setups": results.iter().map(|r| json!({
            "setup": r.setup.label(),
            "engine": r.setup.engine.name(),
            "nodes": r.setup.nodes,
            "durability": r.setup.engine.durability(),
            "node_command_line": r.node_line,
            "engine_command_line": r.engine_line,
            "publish": r.publish.as_ref().map(|p| json!({
                "msgs_per_sec": p.run.msgs_per_sec(),
                "acked": p.run.acked,
                "errors": p.run.all_errors(),
                "elapsed_s": p.run.elapsed.as_secs_f64(),
                "p50_ms": p.run.latency_ms(0.5),
                "p99_ms": p.run.latency_ms(0.99),
                "p999_ms": p.run.latency_ms(0.999),
                "max_ms": p.run.latency_ms(1.0),
                "read_back_ok": p.read_ok(),
                "read_back": p.read_total(),
                "nodes_cpu_us_per_msg": p.node_us_per_msg,
                "engine_cpu_us_per_msg": p.engine_us_per_msg,
                "error_samples": p.run.error_samples,
            })),
            "fanout": r.fanout.as_ref().map(|f| json!({
                "subscribers": f.subscribers,
                "published": f.published,
                "acked": f.acked,
                "publish_errors": f.publish_errors,
                "publish_error_samples": f.publish_error_samples,
                "publisher_behind": f.publisher_behind,
                "deliveries_per_sec": f.deliveries_per_sec,
                "expected_per_sec": f.expected_per_sec,
                "latency": f.latency.json(),
                "node_latency": f.node_latency.iter().map(Quantiles::json).collect::<Vec<_>>(),
                "node_deliveries": f.node_deliveries,
                "missing": f.missing,
                "extra": f.extra,
                "out_of_order": f.backwards,
                "skipped_offsets": f.skipped,
                "resets": f.resets,
                "malformed": f.malformed,
                "subscriber_errors": f.subscriber_errors,
                "subscriber_error_samples": f.subscriber_error_samples,
                "setup_s": f.setup_secs,
                "drain_s": f.drain_secs,
                "nodes_cpu": f.node_cpu,
                "engine_cpu": f.engine_cpu,
                "bench_cpu": f.bench_cpu,
            })),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setups_parse() {
        let s: Setup = "redis:3".parse().unwrap();
        assert_eq!((s.engine, s.nodes), (EngineKind::Redis, 3));
        assert_eq!("nats".parse::<Setup>().unwrap().nodes, 1);
        assert!("disk:3".parse::<Setup>().is_err());
        assert!("mongo:1".parse::<Setup>().is_err());
        assert!("nats:0".parse::<Setup>().is_err());
    }

    #[test]
    fn delivery_fields() {
        let frame = br#"{"type":"message","stream":"fanout-0","epoch":"e1","offset":42,"time":1,"data":"7:123:xx"}"#;
        assert_eq!(field_number(frame, OFFSET_FIELD), Some(42));
        assert_eq!(field_number(b"{}", OFFSET_FIELD), None);
    }
}
