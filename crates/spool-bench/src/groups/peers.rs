//! The peers of `groups`, each its own server process on a free port with its own data
//! directory:
//!
//! - `nats-js-pull`: `nats-server -js -sd DIR`, a file-storage stream, one durable pull
//!   consumer per group with `AckPolicy::Explicit`; a member fetches up to B (`no_wait`; in
//!   steady cells, when nothing is there, a pull of 1 that waits) and acks each message with
//!   `double_ack` (the ack's confirmation from the server), all of a batch at once. JetStream
//!   has no batch ack for a shared consumer (`AckAll` would ack other members' messages).
//!   Durability: nats-server 2.9 writes acks and messages to its files without fsync (it syncs
//!   every 2 min), so this peer is **less** durable than the others.
//! - `redis-aof-always`: `redis-server --appendonly yes --appendfsync always`: `XREADGROUP
//!   GROUP g m COUNT B [BLOCK ms] STREAMS s >` then one `XACK s g id…` for the batch; both
//!   write the AOF, fsynced before the reply.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer::pull};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, future::try_join_all};
use redis::{AsyncConnectionConfig, Value};

use super::{GroupTarget, Member, STREAM, StampPublisher, payload, stamp_of};
use crate::targets::{nats::jetstream_args, process::PeerProcess, redis::start_aof_always};

/// Publishes in flight at once while preloading NATS; commands per pipeline for Redis.
const PRELOAD_CHUNK: u64 = 1000;
/// The JetStream stream's name (its one subject is [`STREAM`]).
const JS_STREAM: &str = "BENCHGROUPS";

pub struct NatsGroups {
    process: PeerProcess,
    url: String,
    js: jetstream::Context,
}

impl NatsGroups {
    pub async fn start() -> Result<Self> {
        let process = PeerProcess::start("nats-server", jetstream_args).await?;
        let url = format!("nats://{}", process.addr);
        let client = async_nats::connect(&url)
            .await
            .context("cannot connect to nats-server")?;
        let js = jetstream::new(client);
        js.get_or_create_stream(jetstream::stream::Config {
            name: JS_STREAM.into(),
            subjects: vec![STREAM.into()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("cannot create the JetStream stream: {e}"))?;
        Ok(Self { process, url, js })
    }
}

#[async_trait]
impl GroupTarget for NatsGroups {
    fn name(&self) -> &str {
        "nats-js-pull"
    }

    fn description(&self) -> String {
        format!(
            "`{}`, file-storage stream, durable pull consumer (AckExplicit, max_ack_pending \
             100000), fetch + `double_ack` per message",
            self.process.command_line
        )
    }

    fn server_pid(&self) -> u32 {
        self.process.pid()
    }

    fn check_alive(&self) -> Result<()> {
        self.process.check_alive()
    }

    async fn preload(&self, count: u64, size: usize) -> Result<()> {
        let body = payload(0, size);
        let mut sent = 0;
        while sent < count {
            let n = PRELOAD_CHUNK.min(count - sent);
            let mut acks = Vec::with_capacity(n as usize);
            for _ in 0..n {
                acks.push(
                    self.js
                        .publish(STREAM, body.clone())
                        .await
                        .map_err(|e| anyhow!("publish: {e}"))?,
                );
            }
            try_join_all(
                acks.into_iter()
                    .map(|a| async move { a.await.map_err(|e| anyhow!("no JetStream ack: {e}")) }),
            )
            .await?;
            sent += n;
        }
        Ok(())
    }

    async fn create_group(&self, group: &str, from_oldest: bool) -> Result<()> {
        let stream = self
            .js
            .get_stream(JS_STREAM)
            .await
            .map_err(|e| anyhow!("get stream: {e}"))?;
        stream
            .create_consumer(pull::Config {
                durable_name: Some(group.into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                deliver_policy: if from_oldest {
                    jetstream::consumer::DeliverPolicy::All
                } else {
                    jetstream::consumer::DeliverPolicy::New
                },
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 100_000,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("create consumer: {e}"))?;
        Ok(())
    }

    async fn member(&self, group: &str, _idx: usize, _batch: usize) -> Result<Box<dyn Member>> {
        let client = async_nats::connect(&self.url)
            .await
            .context("cannot connect to nats-server")?;
        let js = jetstream::new(client);
        let consumer: jetstream::consumer::PullConsumer = js
            .get_consumer_from_stream(group, JS_STREAM)
            .await
            .map_err(|e| anyhow!("get consumer: {e}"))?;
        Ok(Box::new(NatsMember {
            consumer,
            held: Vec::new(),
        }))
    }

    async fn publisher(&self) -> Result<Box<dyn StampPublisher>> {
        let client = async_nats::connect(&self.url)
            .await
            .context("cannot connect to nats-server")?;
        Ok(Box::new(NatsPublisher {
            js: jetstream::new(client),
        }))
    }
}

struct NatsMember {
    consumer: jetstream::consumer::PullConsumer,
    held: Vec<jetstream::Message>,
}

#[async_trait]
impl Member for NatsMember {
    async fn receive(&mut self, max: usize, wait: Option<Duration>) -> Result<Vec<u64>> {
        self.held.clear();
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max)
            .messages()
            .await
            .map_err(|e| anyhow!("fetch: {e}"))?;
        while let Some(m) = batch.next().await {
            self.held.push(m.map_err(|e| anyhow!("fetch: {e}"))?);
        }
        if self.held.is_empty()
            && let Some(wait) = wait
        {
            let mut batch = self
                .consumer
                .batch()
                .max_messages(1)
                .expires(wait)
                .messages()
                .await
                .map_err(|e| anyhow!("pull: {e}"))?;
            while let Some(m) = batch.next().await {
                self.held.push(m.map_err(|e| anyhow!("pull: {e}"))?);
            }
        }
        Ok(self.held.iter().map(|m| stamp_of(&m.payload)).collect())
    }

    async fn ack(&mut self) -> Result<usize> {
        let held = std::mem::take(&mut self.held);
        try_join_all(
            held.iter().map(|m| async move {
                m.double_ack().await.map_err(|e| anyhow!("double_ack: {e}"))
            }),
        )
        .await?;
        Ok(held.len())
    }
}

struct NatsPublisher {
    js: jetstream::Context,
}

#[async_trait]
impl StampPublisher for NatsPublisher {
    async fn publish(&mut self, payload: Bytes) -> Result<()> {
        self.js
            .publish(STREAM, payload)
            .await
            .map_err(|e| anyhow!("publish: {e}"))?
            .await
            .map_err(|e| anyhow!("no JetStream ack: {e}"))?;
        Ok(())
    }
}

pub struct RedisGroups {
    process: PeerProcess,
    client: redis::Client,
}

impl RedisGroups {
    pub async fn start() -> Result<Self> {
        let process = start_aof_always().await?;
        let client =
            redis::Client::open(format!("redis://{}/", process.addr)).context("bad redis URL")?;
        Ok(Self { process, client })
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        // The crate's default answer timeout (500 ms) is shorter than a blocking read.
        let config =
            AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .context("cannot connect to redis-server")
    }
}

#[async_trait]
impl GroupTarget for RedisGroups {
    fn name(&self) -> &str {
        "redis-aof-always"
    }

    fn description(&self) -> String {
        format!(
            "`{}`, `XREADGROUP … COUNT B` + one `XACK` per batch",
            self.process.command_line
        )
    }

    fn server_pid(&self) -> u32 {
        self.process.pid()
    }

    fn check_alive(&self) -> Result<()> {
        self.process.check_alive()
    }

    async fn preload(&self, count: u64, size: usize) -> Result<()> {
        let mut conn = self.connection().await?;
        let body = payload(0, size);
        let mut sent = 0;
        while sent < count {
            let n = PRELOAD_CHUNK.min(count - sent);
            let mut pipe = redis::pipe();
            for _ in 0..n {
                pipe.cmd("XADD")
                    .arg(STREAM)
                    .arg("*")
                    .arg("d")
                    .arg(body.as_ref())
                    .ignore();
            }
            let () = pipe.query_async(&mut conn).await.context("XADD pipeline")?;
            sent += n;
        }
        Ok(())
    }

    async fn create_group(&self, group: &str, from_oldest: bool) -> Result<()> {
        let mut conn = self.connection().await?;
        let () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM)
            .arg(group)
            .arg(if from_oldest { "0" } else { "$" })
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .context("XGROUP CREATE")?;
        Ok(())
    }

    async fn member(&self, group: &str, idx: usize, _batch: usize) -> Result<Box<dyn Member>> {
        Ok(Box::new(RedisMember {
            conn: self.connection().await?,
            group: group.to_owned(),
            consumer: format!("m{idx}"),
            ids: Vec::new(),
        }))
    }

    async fn publisher(&self) -> Result<Box<dyn StampPublisher>> {
        Ok(Box::new(RedisPublisher {
            conn: self.connection().await?,
        }))
    }
}

struct RedisMember {
    conn: redis::aio::MultiplexedConnection,
    group: String,
    consumer: String,
    ids: Vec<Vec<u8>>,
}

/// Entries of an `XREADGROUP` answer (RESP2 arrays or RESP3 maps): (id, value of the first
/// field).
fn entries(answer: Value, out: &mut Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
    let streams: Vec<Value> = match answer {
        Value::Nil => return Ok(()),
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        other => bail!("unexpected XREADGROUP answer {other:?}"),
    };
    for list in streams {
        let Value::Array(list) = list else {
            bail!("unexpected XREADGROUP entries {list:?}");
        };
        for entry in list {
            let Value::Array(mut entry) = entry else {
                bail!("unexpected XREADGROUP entry {entry:?}");
            };
            let fields = entry.pop();
            let id = entry.pop();
            let (Some(Value::BulkString(id)), Some(Value::Array(mut fields))) = (id, fields) else {
                bail!("unexpected XREADGROUP entry shape");
            };
            let value = match fields.get_mut(1) {
                Some(Value::BulkString(v)) => std::mem::take(v),
                _ => Vec::new(),
            };
            out.push((id, value));
        }
    }
    Ok(())
}

#[async_trait]
impl Member for RedisMember {
    async fn receive(&mut self, max: usize, wait: Option<Duration>) -> Result<Vec<u64>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(max);
        if let Some(wait) = wait {
            cmd.arg("BLOCK").arg(wait.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(STREAM).arg(">");
        let answer: Value = cmd
            .query_async(&mut self.conn)
            .await
            .context("XREADGROUP")?;
        let mut found = Vec::new();
        entries(answer, &mut found)?;
        self.ids.clear();
        let mut stamps = Vec::with_capacity(found.len());
        for (id, value) in found {
            stamps.push(stamp_of(&value));
            self.ids.push(id);
        }
        Ok(stamps)
    }

    async fn ack(&mut self) -> Result<usize> {
        let n: i64 = redis::cmd("XACK")
            .arg(STREAM)
            .arg(&self.group)
            .arg(&self.ids)
            .query_async(&mut self.conn)
            .await
            .context("XACK")?;
        if n as usize != self.ids.len() {
            bail!("XACK acked {n} of {}", self.ids.len());
        }
        Ok(self.ids.len())
    }
}

struct RedisPublisher {
    conn: redis::aio::MultiplexedConnection,
}

#[async_trait]
impl StampPublisher for RedisPublisher {
    async fn publish(&mut self, payload: Bytes) -> Result<()> {
        let _id: String = redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("d")
            .arg(payload.as_ref())
            .query_async(&mut self.conn)
            .await
            .context("XADD")?;
        Ok(())
    }
}
