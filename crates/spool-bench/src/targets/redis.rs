//! Redis Streams with the strictest durability Redis offers: its own `redis-server` with
//! `appendonly yes` and `appendfsync always` (the reply to a write comes after the AOF
//! fsync), loaded with `XADD stream * d <payload>`, one connection per client.

use std::sync::Arc;

use anyhow::{Context, Result};
use async_trait::async_trait;

use super::{Publisher, Target, process::PeerProcess};
use crate::workload::Workload;

pub struct RedisTarget {
    process: PeerProcess,
    client: redis::Client,
    workload: Arc<Workload>,
}

/// Starts `redis-server` with the AOF fsynced before every reply, on a free port with its own
/// data directory.
pub async fn start_aof_always() -> Result<PeerProcess> {
    PeerProcess::start("redis-server", |port, dir| {
        [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            dir,
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
        ]
        .map(String::from)
        .to_vec()
    })
    .await
}

impl RedisTarget {
    pub async fn start(workload: Arc<Workload>) -> Result<Self> {
        let process = start_aof_always().await?;
        let client =
            redis::Client::open(format!("redis://{}/", process.addr)).context("bad redis URL")?;
        Ok(Self {
            process,
            client,
            workload,
        })
    }
}

#[async_trait]
impl Target for RedisTarget {
    fn name(&self) -> &str {
        "redis-aof-always"
    }

    fn description(&self) -> String {
        format!("`{}`, `XADD` per message", self.process.command_line)
    }

    async fn connect(&self, _client_idx: usize) -> Result<Box<dyn Publisher>> {
        let connection = self
            .client
            .get_multiplexed_async_connection()
            .await
            .context("cannot connect to redis-server")?;
        Ok(Box::new(RedisPublisher {
            connection,
            workload: self.workload.clone(),
        }))
    }

    fn server_pid(&self) -> Option<u32> {
        Some(self.process.pid())
    }

    fn check_alive(&self) -> Result<()> {
        self.process.check_alive()
    }
}

struct RedisPublisher {
    connection: redis::aio::MultiplexedConnection,
    workload: Arc<Workload>,
}

#[async_trait]
impl Publisher for RedisPublisher {
    async fn publish_one(&mut self, seq: u64) -> Result<()> {
        let stream = &self.workload.streams()[self.workload.stream_index(seq)];
        let _id: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("d")
            .arg(self.workload.payload(seq).as_ref())
            .query_async(&mut self.connection)
            .await
            .context("XADD failed")?;
        Ok(())
    }
}
