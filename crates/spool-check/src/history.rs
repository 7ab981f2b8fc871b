//! The history: everything the workload did and saw, and every fault the nemesis injected, in
//! the order it happened. The checker reads only this.
//!
//! Entries of one subscriber (or one publisher) are recorded by one task, in the order that
//! task saw them, so a subscriber's own entries are in its delivery order.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use serde::{Deserialize, Serialize};

/// One recorded event, `at_ms` after the run started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// The transports a subscriber reads with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// A `spool.v1.json` WebSocket session through `spool-client`.
    Ws,
    /// Server-Sent Events with `Last-Event-ID`.
    Sse,
    /// HTTP long-poll following `position`.
    Poll,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::Ws, Transport::Sse, Transport::Poll];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::Poll => "poll",
        }
    }
}

/// How one publish attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The server acknowledged it as durable at this position.
    Acked {
        epoch: String,
        offset: u64,
        duplicate: bool,
    },
    /// The server refused it (a 4xx): nothing was appended.
    Refused { why: String },
    /// No answer (a timeout, a cut connection, a 5xx): it may or may not have been appended.
    Indeterminate { why: String },
}

/// The faults the nemesis injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Some of a node's client connections cut at the fault proxy.
    Cut,
    /// A node's connections stalled (nothing forwarded) for a while, then resumed.
    Stall,
    /// One subscriber stops reading for a while (retention pressure: it falls behind).
    Pause,
    /// A node stopped with SIGTERM (graceful), then started again.
    Term,
    /// A node killed with SIGKILL (a crash), then started again.
    Kill,
    /// The engine's own Redis / NATS server stopped and started again.
    EngineRestart,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Cut => "cut",
            FaultKind::Stall => "stall",
            FaultKind::Pause => "pause",
            FaultKind::Term => "sigterm",
            FaultKind::Kill => "kill9",
            FaultKind::EngineRestart => "engine_restart",
        }
    }
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The run: what it ran against.
    Setup {
        engine: String,
        nodes: usize,
        seed: u64,
        /// Whether an acked message must survive every fault of this run (disk with fsync,
        /// Redis/NATS whose server keeps its data). When false, only faults marked `lossy`
        /// may lose data.
        durable: bool,
    },
    /// A stream of the run and the retention in force for it (from stream info).
    Stream {
        stream: String,
        max_messages: Option<u64>,
        /// The byte and age limits, when known: the checker holds retention to its message
        /// limit only while these cannot have removed anything.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_age_ms: Option<u64>,
    },
    /// One publish attempt of operation `op` (all attempts of an op carry the same
    /// idempotency key and payload).
    Publish {
        op: u64,
        publisher: u32,
        attempt: u32,
        node: usize,
        stream: String,
        key: String,
        payload: String,
        #[serde(flatten)]
        outcome: Outcome,
    },
    /// A subscriber starts reading `stream` after `position` (its anchor).
    Subscribe {
        sub: String,
        transport: Transport,
        node: usize,
        stream: String,
        position: String,
    },
    /// A message given to a subscriber.
    Deliver {
        sub: String,
        stream: String,
        epoch: String,
        offset: u64,
        payload: String,
    },
    /// A reset given to a subscriber: delivery continues after `position`.
    Reset {
        sub: String,
        stream: String,
        reason: String,
        position: String,
    },
    /// A WebSocket subscriber's connection was (re-)established.
    Connected { sub: String, resumed: bool },
    /// A subscriber's connection (or request) failed; it reconnects by itself.
    Disconnected { sub: String, why: String },
    /// A fault began. `lossy`: the engine may lose data because of it (the memory engine
    /// restarting); then resets with `epoch_changed` / `unknown_stream` are expected.
    Fault {
        kind: FaultKind,
        node: Option<usize>,
        lossy: bool,
        detail: String,
    },
    /// A fault's effect ended (a node is back, a stall lifted).
    Healed {
        kind: FaultKind,
        node: Option<usize>,
    },
    /// After the run: the whole retained stream read from `oldest`.
    FinalRead {
        stream: String,
        epoch: String,
        oldest: u64,
        head: u64,
        /// `(offset, payload)` of every retained message, in the order read.
        messages: Vec<(u64, String)>,
    },
    /// A subscriber did not reach the stream's final head before the run ended.
    Lagging {
        sub: String,
        stream: String,
        position: String,
        head: String,
    },
}

impl Event {
    /// The subscriber an entry belongs to, if any.
    pub fn sub(&self) -> Option<&str> {
        match self {
            Event::Subscribe { sub, .. }
            | Event::Deliver { sub, .. }
            | Event::Reset { sub, .. }
            | Event::Connected { sub, .. }
            | Event::Disconnected { sub, .. }
            | Event::Lagging { sub, .. } => Some(sub),
            _ => None,
        }
    }
}

/// The recorder the workload and the nemesis share; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    started: Instant,
    entries: Arc<Mutex<Vec<Entry>>>,
    /// Entries beyond this many are dropped and counted (memory stays bounded).
    limit: usize,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl Recorder {
    /// A recorder keeping at most `limit` entries.
    pub fn new(limit: usize) -> Self {
        Self {
            started: Instant::now(),
            entries: Arc::default(),
            limit,
            dropped: Arc::default(),
        }
    }

    /// Milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn record(&self, event: Event) {
        let at_ms = self.now_ms();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.limit {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        entries.push(Entry { at_ms, event });
    }

    /// How many entries did not fit.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the history is nearly full (90%): the workload should stop, leaving room for
    /// the subscribers to catch up and the final reads (a truncated history cannot be
    /// checked).
    pub fn full(&self) -> bool {
        self.entries.lock().map(|e| e.len()).unwrap_or(0) >= self.limit / 10 * 9
    }

    /// The entries so far.
    pub fn snapshot(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// `EPOCH:OFFSET` split into its parts.
pub fn split_position(position: &str) -> Option<(&str, u64)> {
    let (epoch, offset) = position.rsplit_once(':')?;
    Some((epoch, offset.parse().ok()?))
}
