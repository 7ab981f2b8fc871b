//! `spool check`: a Jepsen-style checker of Spool's central promise, SPEC §2 — a subscriber
//! that saw offset n since its last reset saw every offset before it — under random faults,
//! on every engine.
//!
//! - [`scenario`]: a run against servers it starts itself (any engine, several nodes, an
//!   engine server of its own to restart) or a running deployment; every client goes through
//!   a fault [`proxy`] in front of each node.
//! - workload: publishers with idempotency keys retrying across nodes; subscribers on every
//!   transport (WebSocket sessions through `spool-client`, SSE with `Last-Event-ID`,
//!   long-poll), spread over the nodes.
//! - [`nemesis`]: a fault schedule drawn from the seed: connection cuts and stalls, subscribers
//!   that stop reading (retention pressure on a stream with a small history limit), SIGTERM
//!   and kill -9 of a node, restarts of the engine server.
//! - [`history`]: every publish attempt and its answer, every delivery and reset of every
//!   subscriber, every fault.
//! - [`checker`]: the rules, checked from the history alone.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod proxy;
pub mod rng;
pub mod scenario;
mod summary;

pub use checker::{Kind, Report, Violation, check};
pub use history::{Entry, Event};
pub use scenario::{Engine, Options, RunResult, Target, run};
