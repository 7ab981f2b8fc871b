//! NATS JetStream with file storage: its own `nats-server -js` with a store directory, one
//! stream `BENCH` on `bench.>`, loaded with JetStream publishes that wait for the server's
//! ack, one connection per client.
//!
//! Note on durability: JetStream acks once the message is written to its file store; it
//! fsyncs on an interval (2 min by default; nats-server 2.9 has no per-message fsync), so the
//! fair Spool comparison is `spool-nosync`, not `spool-fsync`.

use std::sync::Arc;

use anyhow::{Context, Result};
use async_nats::jetstream;
use async_trait::async_trait;

use super::{Publisher, Target, process::PeerProcess};
use crate::workload::Workload;

pub struct NatsTarget {
    process: PeerProcess,
    url: String,
    workload: Arc<Workload>,
}

/// The arguments of a loopback `nats-server` with JetStream storing in `dir`.
pub fn jetstream_args(port: u16, dir: &str) -> Vec<String> {
    [
        "-a",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-js",
        "-sd",
        dir,
    ]
    .map(String::from)
    .to_vec()
}

impl NatsTarget {
    pub async fn start(workload: Arc<Workload>) -> Result<Self> {
        let process = PeerProcess::start("nats-server", jetstream_args).await?;
        let url = format!("nats://{}", process.addr);
        let client = async_nats::connect(&url)
            .await
            .context("cannot connect to nats-server")?;
        jetstream::new(client)
            .get_or_create_stream(jetstream::stream::Config {
                name: "BENCH".into(),
                subjects: vec!["bench.>".into()],
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("cannot create the JetStream stream: {e}"))?;
        Ok(Self {
            process,
            url,
            workload,
        })
    }
}

#[async_trait]
impl Target for NatsTarget {
    fn name(&self) -> &str {
        "nats-js-file"
    }

    fn description(&self) -> String {
        format!(
            "`{}`, file-storage stream, acked JetStream publish per message",
            self.process.command_line
        )
    }

    async fn connect(&self, _client_idx: usize) -> Result<Box<dyn Publisher>> {
        let client = async_nats::connect(&self.url)
            .await
            .context("cannot connect to nats-server")?;
        Ok(Box::new(NatsPublisher {
            js: jetstream::new(client),
            subjects: self
                .workload
                .streams()
                .iter()
                .map(|s| format!("bench.{s}"))
                .collect(),
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

struct NatsPublisher {
    js: jetstream::Context,
    subjects: Vec<String>,
    workload: Arc<Workload>,
}

#[async_trait]
impl Publisher for NatsPublisher {
    async fn publish_one(&mut self, seq: u64) -> Result<()> {
        let subject = self.subjects[self.workload.stream_index(seq)].clone();
        let ack = self
            .js
            .publish(subject, self.workload.payload(seq))
            .await
            .map_err(|e| anyhow::anyhow!("publish failed: {e}"))?;
        ack.await
            .map_err(|e| anyhow::anyhow!("no JetStream ack: {e}"))?;
        Ok(())
    }
}
