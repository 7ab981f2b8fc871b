//! Prometheus metrics, served at `/metrics`.
//!
//! Labels are enums where they sit on a hot path (one delivery per message per subscriber), so
//! counting allocates nothing.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use spool_core::{
    ResetReason, StreamName,
    group::{GroupName, GroupStats},
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
