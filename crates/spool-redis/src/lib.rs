//! The Redis engine of Spool: stream history in Redis Streams, head notifications over
//! pub/sub, sessions and idempotency records as keys with a TTL. Several Spool nodes pointed
//! at one Redis (and one prefix) form a cluster: a publish on any node reaches subscribers on
//! every node, and a client resumes on any node.
//!
//! # Key layout
//!
//! All keys of a stream share the stream's name as hash tag, so the layout fits Redis Cluster
//! too (see [`keys`](crate::keys) for the escaping):
//!
//! | key | what |
//! |---|---|
//! | `<prefix>:{<stream>}:m` | hash: `e` epoch, `h` head offset, `b` retained bytes; expires `meta_ttl` after the last touch |
//! | `<prefix>:{<stream>}:x` | Redis Stream, entry id `<offset>-0`, fields `t` publish ms, `n` retained bytes, `d` the message; expires `max_age` after the last append |
//! | `<prefix>:{<stream>}:i:<key>` | `<epoch>:<offset>` of an idempotency key, expires with the dedup window |
//! | `<prefix>:session:<id>` | a session record (after the holder that wrote it), expires with it |
//! | `<prefix>:heads` | pub/sub channel: `<epoch> <head> <stream>` after each append (`<epoch> 0 <stream>`: a new, empty history — a delete), `!truncated <stream>` after a truncate, transient notes |
//! | `<prefix>:groups{<prefix>}:…` | consumer groups: an index, and per group a hash (version, snapshot) and a list of commits (see `groups`) |
//!
//! # Why scripts
//!
//! An append is one Lua script call per batch (`EVALSHA`, loaded once): it registers the
//! stream if needed, gives each message the next offset, stores it with its idempotency
//! record, trims to the retention and publishes the new head, atomically. So offsets are
//! gap-free and unique across nodes with no lock and no retry, in one round trip. A read is
//! one script too, so epoch, head, oldest and messages come from one snapshot.
//!
//! # Durability
//!
//! - [`RedisDurability::Memory`]: acked when the script returned (Redis applied it).
//! - [`RedisDurability::Fsync`]: Redis must run with `appendonly yes` and `appendfsync
//!   always` (checked at connect; refused otherwise). Redis then fsyncs before it replies.
//! - [`RedisDurability::Replicated`]: after the script, `WAIT n timeout` on the same
//!   connection (appends get a connection of their own, since `WAIT` blocks it). Too few
//!   replicas is `Unavailable`: the message may be stored, so the retry carries the same
//!   idempotency key. Redis replication is asynchronous: this narrows, not closes, the
//!   window in which a failover loses acked messages.
//!
//! # Outages and data loss
//!
//! Every call has a deadline (`timeout`), so while Redis is down calls fail fast with
//! `Unavailable` and work again once it is back (the connection reconnects by itself).
//! Redis coming back without its data has lost the metadata key: the next append registers a
//! new epoch, so readers get a reset (`unknown_stream` or `epoch_changed`), never a silent gap.
//!
//! # Reads create nothing
//!
//! Only an append writes a stream's keys. A read or watch of a stream Redis does not hold
//! answers head 0 of a placeholder epoch the node keeps in its [`Heads`] while someone watches
//! (never written); an append on this node makes the stream in that epoch, so its waiting
//! readers get offset 1 with no reset (a reader on another node follows the new epoch from its
//! start: `subscription.rs` knows its position was a placeholder). The notification
//! task resubscribes, drops the tail cache and re-reads every watched stream, which moves
//! watchers to the new epoch at once. Metadata outlives the data (`meta_ttl`), so a stream
//! whose messages all expired keeps its epoch and readers get `history_expired` instead.
//! The streams watched at a placeholder are capped per node (`max_unpublished_streams`,
//! `--max-unpublished-streams`): at the cap those no longer watched go, and if every one still
//! is, a watch of another is refused (`StreamLimit`); a sweep drops the unwatched ones too.
//!
//! # Administration
//!
//! Listing, describing, deleting and truncating streams: see `admin.rs` (a delete or truncate
//! reaches every node through a note on the heads channel).

mod admin;
mod codec;
mod config;
mod error;
mod fanout;
mod groups;
pub mod keys;
mod scripts;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{
    Client, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use spool_core::{
    Epoch, Message, NewMessage, Offset, Position, Retention, StreamName, StreamState, now_ms,
};
use spool_engine::{
    Appended, Engine, EngineError, HeadWatch, ReadBatch, SessionRecord, SessionStore,
    cluster::{ClusterNode, Store},
};
use tokio_util::sync::{CancellationToken, DropGuard};

pub use config::{RedisConfig, RedisDurability};

use crate::{
    error::within,
    keys::Keys,
    scripts::{AppendReply, Scripts},
};

/// A Spool node's handle on Redis; see the crate docs.
pub struct RedisEngine {
    shared: Arc<Shared>,
    /// Stops the notification task when the engine is dropped.
    _fanout: DropGuard,
    /// Consumer groups (`impl GroupStore` in `groups.rs`).
    groups: groups::Groups,
}

/// What the engine and its notification task share.
struct Shared {
    config: RedisConfig,
    keys: Keys,
    channel: String,
    conn: ConnectionManager,
    /// Appends go here: `conn` itself, or under replicated durability a connection of their
    /// own, as `WAIT` blocks the connection it is sent on.
    writer: ConnectionManager,
    scripts: Scripts,
    /// Heads, tail cache, watch and resync: the part every cluster engine shares, over this
    /// engine's reads (`impl Store for Shared`).
    node: ClusterNode,
    /// Streams Redis does not hold that this node's readers watch at a placeholder, capped by
    /// `max_unpublished_streams` (see [`Placeholders`]).
    placeholders: std::sync::Mutex<Placeholders>,
}

/// Which streams this node's watchers wait in at a placeholder (head 0 of an epoch Redis does
/// not hold; the epoch itself is the watch's, in the node's `Heads`). Capped: at the cap, the
/// streams no longer watched at a placeholder (unwatched, or published to since) go, and when
/// every one still is, the new watch is refused with `StreamLimit`. A sweep drops them too.
/// Lock order: `placeholders`, then the `Heads`' own lock.
struct Placeholders {
    streams: std::collections::HashSet<StreamName>,
    max: usize,
    /// When a reclaim at the cap last freed too little: not repeated for a second, so refused
    /// watches at the cap cost no scan each.
    futile_at: Option<std::time::Instant>,
}

impl Placeholders {
    fn reclaim(&mut self, heads: &spool_engine::cluster::Heads) {
        // A stream's head stays in `Heads` until the next prune after its last watcher left:
        // only live watchers count.
        self.streams.retain(|s| {
            heads.watchers(s) > 0
                && heads
                    .current(s)
                    .is_some_and(|head| head.offset == Offset::ZERO)
        });
    }
}

impl RedisEngine {
    /// Connects, checks that Redis can give the configured durability, and subscribes to head
    /// notifications. Fails with a message saying what is wrong when Redis is unreachable
    /// (`Unavailable`; a supervisor restarts the node) or unfit (`Internal`).
    pub async fn connect(config: RedisConfig) -> Result<Self, EngineError> {
        let keys = Keys::new(&config.prefix).map_err(EngineError::internal)?;
        let client = Client::open(config.url.as_str())
            .map_err(|e| EngineError::internal_from("invalid Redis URL", e))?;
        let conn = manager(&client, &config).await?;
        let writer = match config.durability {
            RedisDurability::Replicated { .. } => manager(&client, &config).await?,
            _ => conn.clone(),
        };
        check_server(&mut conn.clone(), &config).await?;
        let scripts = Scripts::new();
        for script in [
            &scripts.append,
            &scripts.read,
            &scripts.delete,
            &scripts.truncate,
            &scripts.describe,
        ] {
            within(
                "SCRIPT LOAD",
                config.timeout,
                script.load_async(&mut conn.clone()),
            )
            .await?;
        }
        let groups = groups::Groups::new(&config, conn.clone(), writer.clone());
        let shared = Arc::new(Shared {
            channel: keys.heads_channel(),
            keys,
            conn,
            writer,
            scripts,
            node: ClusterNode::default(),
            placeholders: std::sync::Mutex::new(Placeholders {
                streams: std::collections::HashSet::new(),
                max: config.max_unpublished_streams.max(1),
                futile_at: None,
            }),
            config,
        });
        let cancel = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(fanout::run(
            shared.clone(),
            client,
            cancel.clone(),
            ready_tx,
        ));
        tokio::spawn(fanout::send_transient(shared.clone(), cancel.clone()));
        let fanout = cancel.drop_guard();
        match ready_rx.await {
            Ok(Ok(())) => Ok(Self {
                shared,
                _fanout: fanout,
                groups,
            }),
            Ok(Err(e)) => Err(EngineError::unavailable(format!(
                "cannot subscribe to Redis head notifications: {e}"
            ))),
            Err(_) => Err(EngineError::internal(
                "the Redis notification task ended before subscribing",
            )),
        }
    }
}

/// A connection that reconnects by itself, with a few quick attempts per call so that calls
/// during an outage fail within the deadline and the first call after it succeeds.
async fn manager(client: &Client, config: &RedisConfig) -> Result<ConnectionManager, EngineError> {
    let settings = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.timeout))
        // A backstop behind each call's own deadline; `WAIT` may take the whole timeout.
        .set_response_timeout(Some(config.timeout + Duration::from_secs(1)))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    within(
        "connect",
        config.timeout * 2,
        client.get_connection_manager_with_config(settings),
    )
    .await
    .map_err(|e| EngineError::unavailable_from("cannot connect to Redis", e))
}

/// PING, then what the durability needs: `appendfsync always` for fsync. Warns about an
/// eviction policy, which could drop any key (stream keys have a TTL, so even the `volatile-*`
/// policies; consumer group keys have none, so the `allkeys-*` ones).
async fn check_server(
    conn: &mut ConnectionManager,
    config: &RedisConfig,
) -> Result<(), EngineError> {
    within(
        "PING",
        config.timeout,
        redis::cmd("PING").query_async::<Value>(conn),
    )
    .await?;
    let settings = within(
        "CONFIG GET",
        config.timeout,
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .arg("appendfsync")
            .arg("maxmemory-policy")
            .query_async::<std::collections::HashMap<String, String>>(conn),
    )
    .await;
    if let RedisDurability::Replicated { replicas } = config.durability {
        let info: String = within(
            "INFO replication",
            config.timeout,
            redis::cmd("INFO").arg("replication").query_async(conn),
        )
        .await?;
        let connected = info
            .lines()
            .find_map(|l| l.strip_prefix("connected_slaves:"))
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or(0);
        if connected < replicas {
            tracing::warn!(
                connected,
                replicas,
                "fewer Redis replicas are connected than replicated durability waits for: \
                 appends will fail until enough replicas are back"
            );
        }
    }
    let settings = match settings {
        Ok(s) => s,
        // Managed Redis services often disable CONFIG.
        Err(e) if config.durability == RedisDurability::Fsync => {
            tracing::warn!(
                error = %e,
                "cannot read the Redis configuration: fsync durability cannot be verified \
                 (it needs appendonly yes and appendfsync always)"
            );
            return Ok(());
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the Redis configuration");
            return Ok(());
        }
    };
    let get = |name: &str| settings.get(name).map_or("?", String::as_str);
    if config.durability == RedisDurability::Fsync
        && (get("appendonly") != "yes" || get("appendfsync") != "always")
    {
        return Err(EngineError::internal(format!(
            "fsync durability needs Redis with appendonly yes and appendfsync always, and this \
             one has appendonly {} and appendfsync {}: set them (redis.conf or CONFIG SET) or \
             choose another durability",
            get("appendonly"),
            get("appendfsync")
        )));
    }
    let policy = get("maxmemory-policy");
    if policy != "noeviction" && policy != "?" {
        tracing::warn!(
            policy,
            "Redis may evict keys under memory pressure (maxmemory-policy is not noeviction): \
             streams may then lose history or epochs early, and consumer groups their state"
        );
    }
    Ok(())
}

impl Shared {
    /// The placeholder set (a panic while it was held left it consistent: every step is one
    /// set operation).
    fn placeholders(&self) -> std::sync::MutexGuard<'_, Placeholders> {
        self.placeholders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn retention(&self, stream: &StreamName) -> Retention {
        self.config.retention.for_stream(stream)
    }

    /// Metadata must outlive the data it describes.
    fn meta_ttl_ms(&self, retention: &Retention) -> u64 {
        scripts::ttl_ms(self.config.meta_ttl).max(data_ttl_ms(retention))
    }

    /// The read script: a snapshot of the stream and up to `limit` messages after `after`.
    /// An unknown stream is `None`: a read never creates one.
    async fn read_script(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<Option<ReadBatch>, EngineError> {
        let keys = self.keys.stream(stream);
        let retention = self.retention(stream);
        // There is nothing after the largest offset.
        let (first, limit) = match after.get().checked_add(1) {
            Some(first) => (Offset(first), limit),
            None => (after, 0),
        };
        let mut call = self.scripts.read.prepare_invoke();
        call.key(&keys.meta)
            .key(&keys.data)
            // No candidate epoch: the script registers nothing.
            .arg("")
            .arg(&scripts::retention_args(&retention)[..])
            .arg(self.meta_ttl_ms(&retention))
            .arg(&self.channel)
            .arg(stream.as_str())
            .arg(first.get())
            .arg(limit.min(i64::MAX as usize));
        let reply: Value = within(
            "read",
            self.config.timeout,
            call.invoke_async(&mut self.conn.clone()),
        )
        .await?;
        let batch = scripts::parse_read(reply, first)?;
        if let Some(batch) = &batch {
            // A read may be the first to see another node's append or a new epoch (Redis
            // lost the stream): wake this node's watchers.
            self.node.heads().advance(
                stream,
                Position::new(batch.state.epoch.clone(), batch.state.head),
            );
        }
        Ok(batch)
    }

    async fn append(
        &self,
        stream: &StreamName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, EngineError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys.stream(stream);
        let retention = self.retention(stream);
        // A new stream takes the placeholder epoch this node's readers wait in (see the crate
        // docs); Redis uses it only when the stream's metadata does not exist.
        let candidate = self.placeholder(stream);
        let mut call = self.scripts.append.prepare_invoke();
        call.key(&keys.meta)
            .key(&keys.data)
            .arg(candidate.as_str())
            .arg(&scripts::retention_args(&retention)[..])
            .arg(scripts::ttl_ms(self.config.dedup_window))
            .arg(data_ttl_ms(&retention))
            .arg(self.meta_ttl_ms(&retention))
            .arg(&self.channel)
            .arg(stream.as_str());
        let count = messages.len();
        let mut stamped = Vec::with_capacity(count);
        let mut next_key = 3;
        for new in messages {
            let (message, idempotency_key) = new.stamp(Offset::ZERO, 0);
            match idempotency_key {
                Some(key) => {
                    call.key(keys.dedup(&key)).arg(next_key);
                    next_key += 1;
                }
                None => {
                    call.arg(0);
                }
            }
            call.arg(message.retained_bytes())
                .arg(codec::encode(&message));
            stamped.push(message);
        }
        let reply: Value = within(
            "append",
            self.config.timeout,
            call.invoke_async(&mut self.writer.clone()),
        )
        .await?;
        let reply = AppendReply::parse(reply, count)?;
        let fresh: Vec<Arc<Message>> = stamped
            .into_iter()
            .zip(&reply.outcomes)
            .filter(|(_, (_, duplicate))| !duplicate)
            .map(|(mut message, (offset, _))| {
                message.offset = *offset;
                message.time_ms = reply.time_ms;
                Arc::new(message)
            })
            .collect();
        self.node.appended(
            stream,
            Position::new(reply.epoch.clone(), reply.head),
            &fresh,
        );
        // Duplicates wait too: the retry of an append whose WAIT failed must not be acked
        // before the original reached the replicas. The script always writes (expiries), so
        // WAIT covers everything applied before it, whichever node wrote it.
        if let RedisDurability::Replicated { replicas } = self.config.durability {
            wait_for_replicas(
                &self.writer,
                replicas,
                self.config.timeout,
                "",
                "the message may be stored — retry with the same idempotency key",
            )
            .await?;
        }
        Ok(reply.appended())
    }

    /// The epoch this node shows readers of a stream Redis does not hold: the one its watchers
    /// already wait in (a head at offset 0: no message was ever seen in it), else a fresh one.
    fn placeholder(&self, stream: &StreamName) -> Epoch {
        match self.node.heads().current(stream) {
            Some(head) if head.offset == Offset::ZERO => head.epoch,
            _ => Epoch::generate(),
        }
    }

    /// The read script, or — for a stream Redis does not hold — nothing at head 0 of the
    /// placeholder epoch (see [`Shared::placeholder`]); the flag says whether Redis held it.
    ///
    /// When this node's watchers wait in a history Redis no longer holds (its metadata is
    /// gone), they move to a fresh placeholder, so they are told (a reset) instead of waiting
    /// in the lost one. Only if no notification moved their head while Redis answered: a
    /// "no stream" that raced the stream's creation is stale, and is read again.
    async fn read_or_placeholder(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<(ReadBatch, bool), EngineError> {
        let empty = |epoch| ReadBatch {
            state: StreamState::empty(epoch),
            messages: Vec::new(),
        };
        for _ in 0..3 {
            let before = self.node.heads().current(stream);
            if let Some(batch) = self.read_script(stream, after, limit).await? {
                return Ok((batch, true));
            }
            match before {
                Some(seen) if seen.offset > Offset::ZERO => {
                    let epoch = Epoch::generate();
                    let placeholder = Position::new(epoch.clone(), Offset::ZERO);
                    if self.node.heads().replace_if(stream, &seen, placeholder) {
                        return Ok((empty(epoch), false));
                    }
                }
                Some(waiting) => return Ok((empty(waiting.epoch), false)),
                None => return Ok((empty(Epoch::generate()), false)),
            }
        }
        Err(EngineError::unavailable(format!(
            "Redis kept reporting no stream {stream:?} while notifications moved its head; retry"
        )))
    }
}

/// What the node shares with the NATS engine (`spool_engine::cluster::ClusterNode`) reads
/// through: the read script, a stream Redis does not hold being a placeholder.
impl Store for Shared {
    async fn read_head(&self, stream: &StreamName) -> Result<(StreamState, bool), EngineError> {
        let (batch, found) = self.read_or_placeholder(stream, Offset::ZERO, 0).await?;
        Ok((batch.state, found))
    }

    async fn read_range(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<ReadBatch, EngineError> {
        Ok(self.read_or_placeholder(stream, after, limit).await?.0)
    }

    async fn state(&self, stream: &StreamName) -> Result<Option<StreamState>, EngineError> {
        Ok(self
            .read_script(stream, Offset::ZERO, 0)
            .await?
            .map(|batch| batch.state))
    }

    /// Counted against `max_unpublished_streams` ([`Placeholders`]).
    fn keep_placeholder(&self, stream: &StreamName, epoch: Epoch) -> Result<Epoch, EngineError> {
        let mut kept = self.placeholders();
        if kept.streams.len() >= kept.max && !kept.streams.contains(stream) {
            let now = std::time::Instant::now();
            let backoff = kept
                .futile_at
                .is_some_and(|at| now.duration_since(at) < std::time::Duration::from_secs(1));
            if !backoff {
                let before = kept.streams.len();
                kept.reclaim(self.node.heads());
                if before - kept.streams.len() < (kept.max / 8).max(1) {
                    kept.futile_at = Some(now);
                }
            }
            if kept.streams.len() >= kept.max {
                return Err(EngineError::StreamLimit(
                    spool_engine::StreamLimit::Unpublished {
                        engine: None,
                        max: kept.max as u64,
                    },
                ));
            }
        }
        kept.streams.insert(stream.clone());
        Ok(epoch)
    }
}

/// `WAIT` on `writer` (which covers every write sent on that connection so far) for
/// `replicas` replicas within `timeout`. Fewer: `Unavailable`, naming what was `written` (with a
/// trailing space, or empty) and what the caller should do `then`, as it may be stored.
pub(crate) async fn wait_for_replicas(
    writer: &ConnectionManager,
    replicas: u32,
    timeout: Duration,
    written: &str,
    then: &str,
) -> Result<(), EngineError> {
    let acked: u64 = within(
        "WAIT",
        timeout + Duration::from_secs(1),
        redis::cmd("WAIT")
            .arg(replicas)
            .arg(
                u64::try_from(timeout.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            )
            .query_async(&mut writer.clone()),
    )
    .await?;
    if acked < u64::from(replicas) {
        return Err(EngineError::unavailable(format!(
            "replicated durability: {acked} of {replicas} replicas acknowledged {written}within \
             {timeout:?}; {then}"
        )));
    }
    Ok(())
}

/// The data key lives as long as its newest message may (plus a second, so the expiry never
/// beats the age check, which keeps a message exactly `max_age` old).
fn data_ttl_ms(retention: &Retention) -> u64 {
    scripts::ttl_ms(retention.max_age + Duration::from_secs(1))
}

#[async_trait]
impl Engine for RedisEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn transient(&self) -> Option<&spool_engine::cluster::TransientLink> {
        Some(self.shared.node.transient())
    }

    /// Listing, deleting and truncating streams (`admin.rs`).
    fn admin(&self) -> Option<&dyn spool_engine::StreamAdmin> {
        Some(self)
    }

    async fn append(
        &self,
        stream: &StreamName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, EngineError> {
        self.shared.append(stream, messages).await
    }

    async fn read(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<ReadBatch, EngineError> {
        let shared = &*self.shared;
        shared.node.read(shared, stream, after, limit).await
    }

    async fn state(&self, stream: &StreamName) -> Result<Option<StreamState>, EngineError> {
        self.shared.state(stream).await
    }

    /// Creates nothing: a stream Redis does not hold is watched at head 0 of this node's
    /// placeholder for it (see [`Shared::placeholder`]).
    async fn watch(&self, stream: &StreamName) -> Result<HeadWatch, EngineError> {
        let shared = &*self.shared;
        shared.node.watch(shared, stream).await
    }

    fn retention(&self, stream: &StreamName) -> Retention {
        self.shared.retention(stream)
    }

    /// Cheap for a stream this node watches and has seen a message of; else one read.
    async fn exists(&self, stream: &StreamName) -> Result<bool, EngineError> {
        let shared = &*self.shared;
        shared.node.exists(shared, stream).await
    }

    /// Forgets the heads and cached tails of streams nobody on this node watches any more.
    /// Age-based trimming needs no sweep: reads and appends trim, and a stream left alone
    /// expires as a whole (its data key's TTL).
    async fn sweep(&self) -> Result<(), EngineError> {
        self.shared.node.prune();
        let shared = &*self.shared;
        shared.placeholders().reclaim(shared.node.heads());
        Ok(())
    }

    async fn ready(&self) -> Result<(), EngineError> {
        within(
            "PING",
            self.shared.config.timeout,
            redis::cmd("PING").query_async::<Value>(&mut self.shared.conn.clone()),
        )
        .await
        .map(|_| ())
    }
}

/// What a session value starts with, before its holder: a record written before records named
/// their holder does not (a record is JSON), and is no one's — only a take-over replaces it.
const SESSION_MAGIC: &[u8; 8] = b"\xffspool1\x00";

/// Saves one session record unless another holder wrote the stored one. `KEYS[1]` the session
/// key; `ARGV[1]` the value ([`SESSION_MAGIC`] and holder: 16 bytes, then the record),
/// `ARGV[2]` its expiry (ms), `ARGV[3]` `1` to take the session over (no check), `ARGV[4]`
/// `1` when the record has expired already (the key is deleted). Answers 1 when written, 0
/// when refused. An expired key is gone, so it is no one's.
const SAVE_SESSION: &str = r"
if ARGV[3] ~= '1' then
  local head = redis.call('GETRANGE', KEYS[1], 0, 15)
  if head ~= '' and head ~= string.sub(ARGV[1], 1, 16) then
    return 0
  end
end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
end
return 1
";

/// Sessions as keys expiring at the record's own expiry (`PXAT`), on the same connection.
/// A value is [`SESSION_MAGIC`], the holder that wrote it (8 bytes, big-endian), then the
/// record; each save is [`SAVE_SESSION`], so the holder check and the write are atomic.
#[async_trait]
impl SessionStore for RedisEngine {
    async fn save_sessions(
        &self,
        sessions: Vec<SessionRecord>,
    ) -> Result<Vec<String>, EngineError> {
        if sessions.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for s in &sessions {
            let mut value = Vec::with_capacity(16 + s.data.len());
            value.extend_from_slice(SESSION_MAGIC);
            value.extend_from_slice(&s.holder.to_be_bytes());
            value.extend_from_slice(&s.data);
            pipe.cmd("EVAL")
                .arg(SAVE_SESSION)
                .arg(1)
                .arg(self.shared.keys.session(&s.id))
                .arg(value)
                .arg(s.expires_at)
                .arg(if s.take_over { "1" } else { "0" })
                .arg(if s.expires_at <= now { "1" } else { "0" });
        }
        let saved: Vec<i64> = within(
            "save sessions",
            self.shared.config.timeout,
            pipe.query_async(&mut self.shared.conn.clone()),
        )
        .await?;
        Ok(sessions
            .into_iter()
            .zip(saved)
            .filter(|(_, saved)| *saved == 0)
            .map(|(s, _)| s.id)
            .collect())
    }

    async fn load_session(&self, id: &str) -> Result<Option<Bytes>, EngineError> {
        let data: Option<Vec<u8>> = within(
            "load session",
            self.shared.config.timeout,
            redis::cmd("GET")
                .arg(self.shared.keys.session(id))
                .query_async(&mut self.shared.conn.clone()),
        )
        .await?;
        // A value written before records named their holder is the record alone.
        Ok(data.map(|data| match data.strip_prefix(SESSION_MAGIC) {
            Some(held) if held.len() >= 8 => Bytes::from(data).slice(16..),
            _ => Bytes::from(data),
        }))
    }

    async fn delete_session(&self, id: &str) -> Result<(), EngineError> {
        within(
            "delete session",
            self.shared.config.timeout,
            redis::cmd("DEL")
                .arg(self.shared.keys.session(id))
                .query_async::<()>(&mut self.shared.conn.clone()),
        )
        .await
    }
}
