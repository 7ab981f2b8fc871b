//! What a benchmark can measure: Spool itself and peers that show what the numbers mean.
//!
//! A [`Target`] is a running system (it owns its server, if any, and stops it on drop); it
//! hands each client task its own [`Publisher`], one connection, so the runner never shares a
//! connection between clients. Adding a target (a Redis `XADD` peer, a NATS JetStream peer,
//! Spool with `--durability fsync`) means one file here, one [`TargetKind`] variant and one
//! line in [`start`]; the runner and the report need no change.

pub mod http;
pub mod nats;
mod peer;
pub mod process;
pub mod redis;
mod spool;

use std::{path::PathBuf, sync::Arc};

use anyhow::Result;
use async_trait::async_trait;
use clap::ValueEnum;

use crate::{readback::ReadBack, spool_process::SpoolEngine, workload::Workload};

/// A system under test.
#[async_trait]
pub trait Target: Send + Sync {
    /// The name in the report.
    fn name(&self) -> &str;

    /// How it was set up, for the report (e.g. the server's command line).
    fn description(&self) -> String;

    /// Opens the connection client `client_idx` publishes on.
    async fn connect(&self, client_idx: usize) -> Result<Box<dyn Publisher>>;

    /// The server process, when the target is one (its CPU time is read from `/proc`).
    fn server_pid(&self) -> Option<u32> {
        None
    }

    /// Fails when the target can no longer be trusted (e.g. its server exited); checked
    /// after every run.
    fn check_alive(&self) -> Result<()> {
        Ok(())
    }

    /// Reads back what was acked, stream by stream; `None` for targets that store nothing.
    async fn read_back(&self) -> Result<Option<Vec<ReadBack>>> {
        Ok(None)
    }
}

/// One client's connection to a target.
#[async_trait]
pub trait Publisher: Send {
    /// Publishes message `seq` of the workload and waits for its ack. An error is a message
    /// that was not acked (a refusal, a timeout, a lost connection); the runner counts it
    /// and goes on.
    async fn publish_one(&mut self, seq: u64) -> Result<()>;
}

/// The targets the command line can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TargetKind {
    /// `spool serve --engine memory`, started from `--spool-bin`.
    Spool,
    /// `spool serve --engine disk --durability fsync`: ack after fsync (the default setup).
    SpoolFsync,
    /// `spool serve --engine disk --durability memory`: ack once written to the OS.
    SpoolNosync,
    /// A bare axum server that acks without storing: the HTTP ceiling.
    Peer,
    /// Its own `redis-server` with `appendonly yes` + `appendfsync always`, loaded with `XADD`.
    Redis,
    /// Its own `nats-server -js` with a file-storage stream, loaded with acked JetStream publishes.
    Nats,
}

/// How to start Spool.
#[derive(Clone, Debug)]
pub struct SpoolOptions {
    pub bin: PathBuf,
    pub extra_args: Vec<String>,
}

/// Starts a target and waits until it is ready.
pub async fn start(
    kind: TargetKind,
    spool: &SpoolOptions,
    workload: Arc<Workload>,
) -> Result<Box<dyn Target>> {
    Ok(match kind {
        TargetKind::Spool => {
            Box::new(spool::SpoolTarget::start(spool, SpoolEngine::Memory, workload).await?)
        }
        TargetKind::SpoolFsync => {
            Box::new(spool::SpoolTarget::start(spool, SpoolEngine::DiskFsync, workload).await?)
        }
        TargetKind::SpoolNosync => {
            Box::new(spool::SpoolTarget::start(spool, SpoolEngine::DiskNosync, workload).await?)
        }
        TargetKind::Peer => Box::new(peer::PeerTarget::start(workload)?),
        TargetKind::Redis => Box::new(redis::RedisTarget::start(workload).await?),
        TargetKind::Nats => Box::new(nats::NatsTarget::start(workload).await?),
    })
}
