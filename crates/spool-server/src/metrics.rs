//! Prometheus metrics, served at `/metrics`.
//!
//! Labels are enums where they sit on a hot path (one delivery per message per subscriber), so
//! counting allocates nothing.

use std::{
    sync::{Arc, LazyLock, atomic::AtomicU64},
    time::Instant,
};

use async_trait::async_trait;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use spool_core::{
    NewMessage, Offset, ResetReason, Retention, StreamName, StreamState,
    group::{GroupName, GroupStats},
};
use spool_engine::{
    Appended, Engine, EngineError, HeadWatch, ReadBatch, StreamAdmin, StreamCounts,
};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Transport {
    sse,
    poll,
    ws,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: Transport,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResetLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// `stream_limit` (the engine's `--max-streams`) or `budget`
    /// (`--max-new-streams-per-minute`).
    pub reason: &'static str,
}

/// The engine's stream counts, set at each scrape (see [`Metrics::observe_streams`]).
#[derive(Default)]
pub struct StreamMetrics {
    pub streams: Gauge,
    pub limit: Gauge,
    pub unpublished: Gauge,
    pub refused: Family<RefusedLabels, Counter>,
    /// The totals last added to `refused`: stream limit, budget.
    seen: parking_lot::Mutex<(u64, u64)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub route: &'static str,
    pub status: u16,
}

/// A consumer group's labels. Bounded: groups by `--max-groups`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub stream: String,
    pub group: String,
}

/// A group member's labels. Bounded: members per group by the state machine (1024).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub stream: String,
    pub group: String,
    pub consumer: String,
}

/// Consumer groups' stats (SPEC §7), refilled from the groups' own numbers at each scrape
/// ([`Metrics::observe_groups`]), so a deleted group's series go with it.
#[derive(Default)]
pub struct GroupMetrics {
    pub pending: Family<GroupLabels, Gauge>,
    pub in_flight: Family<GroupLabels, Gauge>,
    pub oldest_age: Family<GroupLabels, Gauge<f64, AtomicU64>>,
    pub acked: Family<GroupLabels, Counter>,
    pub redelivered: Family<GroupLabels, Counter>,
    pub dead_lettered: Family<GroupLabels, Counter>,
    pub expired: Family<GroupLabels, Counter>,
    pub member_nacks: Family<MemberLabels, Counter>,
}

/// Transient messages (`delivery/transient.rs`, AnyCable's `whisper`): counted, never stored.
#[derive(Clone, Default)]
pub struct TransientMetrics {
    /// Published on this node.
    pub published: Counter,
    /// Refused: over the size bound.
    pub refused: Counter,
    /// Put in a listener's inbox (one per listener).
    pub delivered: Counter,
    /// Dropped for a listener whose inbox was full.
    pub dropped: Counter,
}

/// Where a publish came in.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PublishVia {
    /// `POST /v1/streams/{stream}/messages`, `POST /v1/publish`.
    http,
    /// A `publish` frame over WebSocket.
    ws,
    /// AnyCable's `POST /_broadcast`.
    broadcast,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishLabels {
    pub transport: PublishVia,
}

/// An engine operation the server times.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// `append`, `read`, `state`, `watch`.
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineErrorLabels {
    pub op: &'static str,
    /// `unavailable`, `limit`, `stream_limit`, `internal`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `closed` (the connection was closed as a slow consumer) or `caught_up`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// `delete`, `truncate`, `disconnect_session`, `disconnect_identity`.
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

/// What subscriptions measure as they read (`delivery/subscription.rs`), process-wide: every
/// server of the process registers the same series.
pub struct SubscriptionMetrics {
    /// Messages between a subscription's read and the stream's head, once per delivered
    /// batch: how far behind readers are. Buckets bound the series, never one per stream.
    pub lag: Histogram,
    /// Messages a conflated subscription left out (only the newest per key was sent).
    pub conflation_skipped: Counter,
}

pub static SUBSCRIPTIONS: LazyLock<SubscriptionMetrics> = LazyLock::new(|| SubscriptionMetrics {
    lag: Histogram::new([
        0.0,
        1.0,
        10.0,
        100.0,
        1_000.0,
        10_000.0,
        100_000.0,
        1_000_000.0,
    ]),
    conflation_skipped: Counter::default(),
});

/// The disk engine's fsync latency ([`spool_engine::timing::WAL_FSYNC`]) as a histogram.
#[derive(Debug)]
struct FsyncCollector;

impl prometheus_client::collector::Collector for FsyncCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = spool_engine::timing::WAL_FSYNC.snapshot();
        let mut metric = encoder.encode_descriptor(
            "wal_fsync_duration_seconds",
            "Time of the disk engine's WAL fdatasync per group commit (--durability fsync)",
            None,
            prometheus_client::metrics::MetricType::Histogram,
        )?;
        metric
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
}

/// The process, read from `/proc/self` at each scrape (Linux; zero elsewhere).
#[derive(Default)]
pub struct ProcessMetrics {
    pub resident_bytes: Gauge,
    pub virtual_bytes: Gauge,
    pub cpu_seconds: Gauge<f64, AtomicU64>,
    pub open_fds: Gauge,
    pub max_fds: Gauge,
    pub threads: Gauge,
    pub start_time: Gauge<f64, AtomicU64>,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    pub published: Counter,
    pub delivered: Family<TransportLabels, Counter>,
    pub connections: Family<TransportLabels, Gauge>,
    pub resets: Family<ResetLabels, Counter>,
    pub requests: Family<RequestLabels, Histogram>,
    pub streams: StreamMetrics,
    /// Connections closed at accept because a connection limit was reached.
    pub connections_refused: Counter,
    /// Failed accepts (typically: out of file descriptors).
    pub accept_errors: Counter,
    pub groups: GroupMetrics,
    /// Publishes by where they came in (`spool_publishes_total{transport}`).
    pub publishes: Family<PublishLabels, Counter>,
    pub engine_ops: Family<OpLabels, Histogram>,
    pub engine_errors: Family<EngineErrorLabels, Counter>,
    /// WebSocket sessions held by connections on this node (set at each scrape).
    pub sessions: Gauge,
    pub slow_consumers: Family<OutcomeLabels, Counter>,
    pub admin_actions: Family<ActionLabels, Counter>,
    pub process: ProcessMetrics,
    pub transient: TransientMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("spool");
        let published = Counter::default();
        registry.register(
            "messages_published",
            "Messages appended to streams",
            published.clone(),
        );
        let delivered = Family::<TransportLabels, Counter>::default();
        registry.register(
            "messages_delivered",
            "Messages delivered to readers",
            delivered.clone(),
        );
        let connections = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "connections",
            "Open streaming connections and pending long-polls",
            connections.clone(),
        );
        let resets = Family::<ResetLabels, Counter>::default();
        registry.register(
            "resets",
            "Continuity resets sent to readers",
            resets.clone(),
        );
        let requests = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
            ])
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests (for streams, time to the response head)",
            requests.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept by --max-connections or --max-connections-per-ip",
            connections_refused.clone(),
        );
        let accept_errors = Counter::default();
        registry.register(
            "accept_errors",
            "Accepts that failed (e.g. out of file descriptors) and were retried",
            accept_errors.clone(),
        );
        let streams = StreamMetrics::default();
        registry.register(
            "streams",
            "Streams the engine holds (something was published to them)",
            streams.streams.clone(),
        );
        registry.register(
            "streams_limit",
            "Most streams the engine will create (--max-streams)",
            streams.limit.clone(),
        );
        registry.register(
            "unpublished_streams",
            "Streams readers wait on that nothing was published to (memory only)",
            streams.unpublished.clone(),
        );
        registry.register(
            "stream_creations_refused",
            "Publishes refused because they would create a stream: at --max-streams \
             (stream_limit) or over --max-new-streams-per-minute (budget)",
            streams.refused.clone(),
        );
        let publishes = Family::<PublishLabels, Counter>::default();
        registry.register(
            "publishes",
            "Messages published, by where they came in (http, ws, broadcast)",
            publishes.clone(),
        );
        let engine_ops = Family::<OpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(spool_engine::timing::BUCKETS)
        });
        registry.register(
            "engine_operation_duration_seconds",
            "Time of engine operations the server calls: append (durable as configured), read, state, watch",
            engine_ops.clone(),
        );
        let engine_errors = Family::<EngineErrorLabels, Counter>::default();
        registry.register(
            "engine_errors",
            "Engine operations that failed, by operation and kind (unavailable, limit, stream_limit, internal)",
            engine_errors.clone(),
        );
        registry.register_collector(Box::new(FsyncCollector));
        let sessions = Gauge::default();
        registry.register(
            "sessions",
            "WebSocket sessions held by connections on this node",
            sessions.clone(),
        );
        let slow_consumers = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "slow_consumers",
            "WebSocket subscriptions that fell behind their outbound buffer: closed (4006) or caught up from history",
            slow_consumers.clone(),
        );
        let admin_actions = Family::<ActionLabels, Counter>::default();
        registry.register(
            "admin_actions",
            "Stream administration done through the admin API",
            admin_actions.clone(),
        );
        let subs = &*SUBSCRIPTIONS;
        registry.register(
            "subscriber_lag_messages",
            "Messages between a subscription's delivered batch and the stream's head, per batch",
            subs.lag.clone(),
        );
        registry.register(
            "conflation_skipped",
            "Messages conflated subscriptions left out (only the newest per key was sent)",
            subs.conflation_skipped.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "The running build: 1, labelled by version",
            build_info,
        );
        let process = ProcessMetrics::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the process",
            process.resident_bytes.clone(),
        );
        registry.register(
            "process_virtual_memory_bytes",
            "Virtual memory of the process",
            process.virtual_bytes.clone(),
        );
        registry.register(
            "process_cpu_seconds",
            "CPU time (user + system) the process has used",
            process.cpu_seconds.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors (each connection holds one)",
            process.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "The file descriptor limit (RLIMIT_NOFILE)",
            process.max_fds.clone(),
        );
        registry.register(
            "process_threads",
            "Threads of the process",
            process.threads.clone(),
        );
        registry.register(
            "process_start_time_seconds",
            "When the process started, seconds since the Unix epoch",
            process.start_time.clone(),
        );
        for via in [PublishVia::http, PublishVia::ws, PublishVia::broadcast] {
            drop(publishes.get_or_create(&PublishLabels { transport: via }));
        }
        for op in ["append", "read", "state", "watch"] {
            drop(engine_ops.get_or_create(&OpLabels { op }));
        }
        for op in ["append", "read", "state", "watch"] {
            for kind in ["unavailable", "limit", "stream_limit", "internal"] {
                drop(engine_errors.get_or_create(&EngineErrorLabels { op, kind }));
            }
        }
        for action in [
            "delete",
            "truncate",
            "disconnect_session",
            "disconnect_identity",
        ] {
            drop(admin_actions.get_or_create(&ActionLabels { action }));
        }
        for outcome in ["closed", "caught_up"] {
            drop(slow_consumers.get_or_create(&OutcomeLabels { outcome }));
        }
        for transport in [Transport::sse, Transport::poll, Transport::ws] {
            drop(delivered.get_or_create(&TransportLabels { transport }));
            drop(connections.get_or_create(&TransportLabels { transport }));
        }
        let groups = GroupMetrics::default();
        registry.register(
            "group_pending",
            "Messages of a consumer group's stream not handed out yet",
            groups.pending.clone(),
        );
        registry.register(
            "group_in_flight",
            "Messages of a consumer group leased to members now",
            groups.in_flight.clone(),
        );
        registry.register(
            "group_oldest_unacked_age_seconds",
            "Age of a consumer group's oldest unfinished message (0: none)",
            groups.oldest_age.clone(),
        );
        registry.register(
            "group_acked",
            "Messages a consumer group acked",
            groups.acked.clone(),
        );
        registry.register(
            "group_redelivered",
            "Deliveries after the first in a consumer group",
            groups.redelivered.clone(),
        );
        registry.register(
            "group_dead_lettered",
            "Messages a consumer group sent to its dead-letter stream",
            groups.dead_lettered.clone(),
        );
        registry.register(
            "group_expired",
            "Messages lost before a consumer group finished them (retention, epoch change)",
            groups.expired.clone(),
        );
        registry.register(
            "group_member_nacks",
            "Messages a consumer group's member nacked",
            groups.member_nacks.clone(),
        );
        let transient = TransientMetrics::default();
        registry.register(
            "transient_published",
            "Transient messages (AnyCable whispers, never stored) published on this node",
            transient.published.clone(),
        );
        registry.register(
            "transient_refused",
            "Transient messages refused as too large (--anycable-whisper-max-bytes)",
            transient.refused.clone(),
        );
        registry.register(
            "transient_delivered",
            "Transient messages handed to a subscriber's inbox, one per subscriber",
            transient.delivered.clone(),
        );
        registry.register(
            "transient_dropped",
            "Transient messages dropped for a subscriber whose inbox was full (a slow reader)",
            transient.dropped.clone(),
        );
        for reason in ["stream_limit", "budget"] {
            drop(streams.refused.get_or_create(&RefusedLabels { reason }));
        }
        // Make every reset reason visible from the start, at zero.
        for reason in ResetReason::ALL {
            drop(resets.get_or_create(&ResetLabels {
                reason: reason.as_str(),
            }));
        }
        Self {
            registry,
            published,
            delivered,
            connections,
            resets,
            requests,
            streams,
            connections_refused,
            accept_errors,
            groups,
            transient,
            publishes,
            engine_ops,
            engine_errors,
            sessions,
            slow_consumers,
            admin_actions,
            process,
        }
    }

    /// A message published through `via` (also counted in `spool_messages_published_total`).
    pub fn publish(&self, via: PublishVia) {
        self.published.inc();
        self.publishes
            .get_or_create(&PublishLabels { transport: via })
            .inc();
    }

    /// An admin API action done.
    pub fn admin_action(&self, action: &'static str) {
        self.admin_actions
            .get_or_create(&ActionLabels { action })
            .inc();
    }

    /// A WebSocket subscription that fell behind: `closed` or `caught_up`.
    pub fn slow_consumer(&self, outcome: &'static str) {
        self.slow_consumers
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Reads the process figures from `/proc/self` (Linux); leaves them at 0 elsewhere.
    pub fn observe_process(&self) {
        let p = &self.process;
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let kib = |key: &str| -> Option<i64> {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))?
                    .split_whitespace()
                    .next()?
                    .parse::<i64>()
                    .ok()
            };
            if let Some(v) = kib("VmRSS:") {
                p.resident_bytes.set(v * 1024);
            }
            if let Some(v) = kib("VmSize:") {
                p.virtual_bytes.set(v * 1024);
            }
            if let Some(v) = kib("Threads:") {
                p.threads.set(v);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            p.open_fds.set(dir.count() as i64);
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
            && let Some(max) = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<i64>().ok())
        {
            p.max_fds.set(max);
        }
        // /proc/self/stat: utime and stime (fields 14, 15) and starttime (22), in clock
        // ticks; the fields after the command name (which may hold spaces) start after ')'.
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r)
        {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = 100.0; // USER_HZ on Linux
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
            if let (Some(u), Some(s)) = (num(11), num(12)) {
                p.cpu_seconds.set((u + s) / ticks);
            }
            if let (Some(start), Ok(uptime)) = (num(19), std::fs::read_to_string("/proc/uptime"))
                && let Some(up) = uptime
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
            {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                p.start_time.set(now - up + start / ticks);
            }
        }
    }

    fn time<T>(&self, op: &'static str, started: Instant, result: &Result<T, EngineError>) {
        self.engine_ops
            .get_or_create(&OpLabels { op })
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            let kind = match e {
                EngineError::Unavailable { .. } => "unavailable",
                EngineError::Limit(_) => "limit",
                EngineError::StreamLimit(_) => "stream_limit",
                EngineError::Internal { .. } => "internal",
            };
            self.engine_errors
                .get_or_create(&EngineErrorLabels { op, kind })
                .inc();
        }
    }

    /// Replaces every group series with `observed` (each group's stats now). The counters are
    /// the groups' own totals, which only grow while a group lives.
    pub fn observe_groups(&self, observed: &[(StreamName, GroupName, GroupStats)]) {
        let g = &self.groups;
        g.pending.clear();
        g.in_flight.clear();
        g.oldest_age.clear();
        g.acked.clear();
        g.redelivered.clear();
        g.dead_lettered.clear();
        g.expired.clear();
        g.member_nacks.clear();
        for (stream, group, s) in observed {
            let labels = GroupLabels {
                stream: stream.to_string(),
                group: group.to_string(),
            };
            g.pending.get_or_create(&labels).set(s.pending as i64);
            g.in_flight.get_or_create(&labels).set(s.in_flight as i64);
            g.oldest_age
                .get_or_create(&labels)
                .set(s.oldest_age_ms as f64 / 1000.0);
            g.acked.get_or_create(&labels).inc_by(s.acked);
            g.redelivered.get_or_create(&labels).inc_by(s.redelivered);
            g.dead_lettered
                .get_or_create(&labels)
                .inc_by(s.dead_lettered);
            g.expired.get_or_create(&labels).inc_by(s.expired);
            for m in &s.members {
                let member = MemberLabels {
                    stream: labels.stream.clone(),
                    group: labels.group.clone(),
                    consumer: m.consumer.to_string(),
                };
                g.member_nacks.get_or_create(&member).inc_by(m.nacks);
            }
        }
    }

    pub fn delivered(&self, transport: Transport, n: usize) {
        self.delivered
            .get_or_create(&TransportLabels { transport })
            .inc_by(n as u64);
    }

    pub fn reset(&self, reason: ResetReason) {
        self.resets
            .get_or_create(&ResetLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Sets the stream gauges from the engine's counts (if it keeps them) and adds refusals
    /// counted since the last call.
    pub fn observe_streams(&self, counts: Option<spool_engine::StreamCounts>, budget_refused: u64) {
        let m = &self.streams;
        let mut seen = m.seen.lock();
        if let Some(c) = counts {
            m.streams.set(c.streams as i64);
            m.limit.set(c.limit.map_or(0, |l| l as i64));
            m.unpublished.set(c.unpublished as i64);
            let new = c.refused.saturating_sub(seen.0);
            m.refused
                .get_or_create(&RefusedLabels {
                    reason: "stream_limit",
                })
                .inc_by(new);
            seen.0 = seen.0.max(c.refused);
        }
        let new = budget_refused.saturating_sub(seen.1);
        m.refused
            .get_or_create(&RefusedLabels { reason: "budget" })
            .inc_by(new);
        seen.1 = seen.1.max(budget_refused);
    }

    /// Counts an open connection of `transport` until the guard drops.
    pub fn connection(&self, transport: Transport) -> ConnectionGuard {
        let gauge = self
            .connections
            .get_or_create(&TransportLabels { transport })
            .clone();
        gauge.inc();
        ConnectionGuard(gauge)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// Decrements the connection gauge on drop.
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The server's engine with its operations timed and their errors counted
/// (`spool_engine_operation_duration_seconds`, `spool_engine_errors_total`). Every method of
/// [`Engine`] is forwarded: a new one must be forwarded here too, or the server gets the
/// trait's default.
pub struct Measured {
    inner: Arc<dyn Engine>,
    metrics: Arc<Metrics>,
}

impl Measured {
    pub fn new(inner: Arc<dyn Engine>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

#[async_trait]
impl Engine for Measured {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn append(
        &self,
        stream: &StreamName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, EngineError> {
        let started = Instant::now();
        let result = self.inner.append(stream, messages).await;
        self.metrics.time("append", started, &result);
        result
    }

    async fn read(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<ReadBatch, EngineError> {
        let started = Instant::now();
        let result = self.inner.read(stream, after, limit).await;
        self.metrics.time("read", started, &result);
        result
    }

    async fn state(&self, stream: &StreamName) -> Result<Option<StreamState>, EngineError> {
        let started = Instant::now();
        let result = self.inner.state(stream).await;
        self.metrics.time("state", started, &result);
        result
    }

    async fn exists(&self, stream: &StreamName) -> Result<bool, EngineError> {
        self.inner.exists(stream).await
    }

    fn stream_counts(&self) -> Option<StreamCounts> {
        self.inner.stream_counts()
    }

    async fn watch(&self, stream: &StreamName) -> Result<HeadWatch, EngineError> {
        let started = Instant::now();
        let result = self.inner.watch(stream).await;
        self.metrics.time("watch", started, &result);
        result
    }

    fn retention(&self, stream: &StreamName) -> Retention {
        self.inner.retention(stream)
    }

    async fn sweep(&self) -> Result<(), EngineError> {
        self.inner.sweep().await
    }

    async fn ready(&self) -> Result<(), EngineError> {
        self.inner.ready().await
    }

    fn admin(&self) -> Option<&dyn StreamAdmin> {
        self.inner.admin()
    }

    fn transient(&self) -> Option<&spool_engine::cluster::TransientLink> {
        self.inner.transient()
    }
}
