//! Prometheus metrics, served at `/metrics`.
//!
//! Labels are enums where they sit on a hot path (one delivery per message per subscriber), so
//! counting allocates nothing.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use spool_core::ResetReason;

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
