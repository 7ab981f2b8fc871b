//! [`NatsEngine`]: the [`Engine`] trait on JetStream. See the crate docs for the design.

mod admin;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::{
    Client, ConnectOptions, Event,
    connection::State,
    jetstream::{
        context::{PublishError, PublishErrorKind},
        publish::PublishAck,
        stream::Info,
    },
};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use spool_core::{
    Epoch, Message, NewMessage, Offset, Position, Retention, StreamName, StreamState, now_ms,
};
use spool_engine::{
    Appended, Engine, EngineError, HeadWatch, Limit, ReadBatch, SessionRecord, SessionStore,
    StreamLimit,
    cluster::{ClusterNode, HeadNote, Heads, Store},
};
use tokio::{sync::Notify, task::AbortHandle};

use crate::{
    codec,
    config::{NatsConfig, redacted},
    fanout,
    jetstream::Api,
    names::{self, StreamNames},
    sessions::Sessions,
};

/// How many message reads one `read` keeps in flight.
const READ_CONCURRENCY: usize = 32;
/// The most streams whose epoch a node remembers; past it the memory is cleared (each is
/// looked up again on its next append, one request).
const MAX_KNOWN: usize = 100_000;
/// How old a remembered epoch may be before an append checks it against JetStream again
/// (after its acks), in case the stream was deleted and made again by another node.
const RECHECK_EPOCH: Duration = Duration::from_secs(5);
/// How often a read retries when its first message vanished under it (retention moving on).
const READ_ATTEMPTS: usize = 3;
/// How long a placeholder epoch outlives its last watcher: a reader that comes back within
/// this time (the next long-poll, an SSE or WebSocket reconnect) finds the same epoch.
const PLACEHOLDER_LINGER: Duration = Duration::from_secs(30);
/// At the cap of placeholders, unwatched ones are dropped (a full scan). A scan that frees less
/// than an eighth of the cap is not repeated for this long.
const FUTILE_PRUNE_BACKOFF: Duration = Duration::from_secs(1);
/// How long JetStream may report a stream's head behind an offset this node has already seen
/// in the same epoch before the node believes it (see [`Inner::fresh`]).
const STALE_GRACE: Duration = Duration::from_secs(10);

/// The NATS JetStream engine; see the crate docs.
pub struct NatsEngine {
    inner: Arc<Inner>,
    tasks: Vec<AbortHandle>,
    /// Consumer groups (`impl GroupStore` in `groups.rs`).
    pub(crate) groups: crate::groups::Groups,
}

pub(crate) struct Inner {
    config: NatsConfig,
    client: Client,
    api: Api,
    /// Heads, tail cache, watch and resync: the part every cluster engine shares, over this
    /// engine's reads (`impl Store for Inner`).
    pub node: ClusterNode,
    /// The epoch of each stream this node has touched, and when it was last confirmed.
    known: Mutex<HashMap<StreamName, (Epoch, Instant)>>,
    /// Watched streams JetStream currently reports behind their known head (see
    /// [`Inner::fresh`]): since when, and whether the node has given in and believes it.
    behind: Mutex<HashMap<StreamName, (Instant, bool)>>,
    /// Epochs shown to this node's readers of streams JetStream does not hold (see
    /// [`Placeholders`]).
    placeholders: Mutex<Placeholders>,
    sessions: Sessions,
    /// Signalled by the client on every (re)connect.
    pub reconnected: Arc<Notify>,
}

impl NatsEngine {
    /// Connects to NATS, checks that JetStream answers and opens the sessions bucket. Fails
    /// with `Unavailable` (saying what and where) when NATS cannot be reached now; once
    /// connected, the client reconnects by itself for as long as the engine lives.
    pub async fn connect(config: NatsConfig) -> Result<Self, EngineError> {
        config.validate()?;
        // Every server named: the client tries them in turn at start and reconnects to any of
        // them (or to the servers the cluster announces) when its server goes away.
        let servers = config.servers()?;
        let shown = redacted(&config.url);
        let reconnected = Arc::new(Notify::new());
        let on_event = reconnected.clone();
        let client = ConnectOptions::new()
            .name("spool")
            .connection_timeout(config.timeout)
            .request_timeout(Some(config.timeout))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64).saturating_mul(250).min(2_000))
            })
            .event_callback(move |event| {
                let on_event = on_event.clone();
                async move {
                    match event {
                        Event::Connected => {
                            tracing::info!("connected to NATS");
                            on_event.notify_one();
                        }
                        Event::Disconnected => {
                            tracing::warn!("disconnected from NATS; reconnecting")
                        }
                        other => tracing::info!(event = %other, "NATS client event"),
                    }
                }
            })
            .connect(servers)
            .await
            .map_err(|e| {
                EngineError::unavailable_from(format!("cannot connect to NATS at {shown}"), e)
            })?;
        let first = client.server_info();
        tracing::info!(
            servers = %shown, server = %first.server_name, port = first.port,
            "NATS client started"
        );
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(config.timeout)
            .build(client.clone());
        let api = Api {
            js,
            timeout: config.timeout,
        };
        api.ping().await.map_err(|e| {
            EngineError::unavailable_from(
                format!("NATS at {shown} answers but JetStream does not (is it enabled?)"),
                e,
            )
        })?;
        let sessions = Sessions::open(api.clone(), &config).await?;
        let groups = crate::groups::Groups::new(api.clone(), &config, &first);
        let notes = client
            .subscribe(format!("{}.heads", config.prefix))
            .await
            .map_err(|e| EngineError::unavailable_from("cannot subscribe to head notes", e))?;
        let placeholders = Placeholders {
            epochs: HashMap::new(),
            max: config.max_unpublished_streams,
            futile_prune_at: None,
        };
        let inner = Arc::new(Inner {
            config,
            client,
            api,
            node: ClusterNode::default(),
            known: Mutex::new(HashMap::new()),
            behind: Mutex::new(HashMap::new()),
            placeholders: Mutex::new(placeholders),
            sessions,
            reconnected,
        });
        let tasks = vec![
            tokio::spawn(fanout::listen(inner.clone(), notes)).abort_handle(),
            tokio::spawn(fanout::refresh(inner.clone())).abort_handle(),
            tokio::spawn(fanout::send_transient(inner.clone())).abort_handle(),
        ];
        Ok(Self {
            inner,
            tasks,
            groups,
        })
    }
}

impl Drop for NatsEngine {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Why a publish did not land: no server took it (NATS answered "no responders": nothing was
/// stored, so it may be sent again), or anything else.
enum PublishFailure {
    NoResponders,
    Failed(EngineError),
}

/// Placeholder epochs: for each stream JetStream does not hold that this node's readers watch
/// (or did within [`PLACEHOLDER_LINGER`]), the epoch they were shown at head 0 — never
/// written anywhere. This node's first append makes the JetStream stream in it, so those
/// readers get offset 1 with no reset. An entry goes once JetStream is seen holding the stream
/// (a state read, a head note), or when it is unwatched and has lingered. Capped by
/// [`NatsConfig::max_unpublished_streams`]: at the cap unwatched entries are dropped at once,
/// and only when every one is watched is a new watch refused.
///
/// Lock order: `placeholders`, then the `Heads`' own lock (never the other way).
struct Placeholders {
    /// The epoch, and when a watcher last held it (or it was made).
    epochs: HashMap<StreamName, (Epoch, Instant)>,
    max: usize,
    /// When a prune at the cap last freed too little.
    futile_prune_at: Option<Instant>,
}

impl Placeholders {
    /// Keeps `epoch` for `stream` (one a watch is about to hold), unless one is kept already:
    /// the epoch kept. At the cap, unwatched entries go first; if every one is watched, the
    /// stream is refused.
    fn keep(
        &mut self,
        stream: &StreamName,
        epoch: Epoch,
        heads: &Heads,
    ) -> Result<Epoch, EngineError> {
        let now = Instant::now();
        if let Some((kept, touched)) = self.epochs.get_mut(stream) {
            *touched = now;
            return Ok(kept.clone());
        }
        if self.epochs.len() >= self.max {
            let backoff = self
                .futile_prune_at
                .is_some_and(|at| now.duration_since(at) < FUTILE_PRUNE_BACKOFF);
            if !backoff {
                // A stream's head stays in `Heads` until the next prune after its last watcher
                // left: only live watchers count.
                let before = self.epochs.len();
                self.epochs.retain(|s, _| heads.watchers(s) > 0);
                if before - self.epochs.len() < (self.max / 8).max(1) {
                    self.futile_prune_at = Some(now);
                }
            }
            if self.epochs.len() >= self.max {
                return Err(EngineError::StreamLimit(StreamLimit::Unpublished {
                    engine: None,
                    max: self.max as u64,
                }));
            }
        }
        self.epochs.insert(stream.clone(), (epoch.clone(), now));
        Ok(epoch)
    }

    /// Whether `head` is the placeholder kept for `stream`.
    fn shows(&self, stream: &StreamName, head: &Position) -> bool {
        head.offset == Offset::ZERO
            && self
                .epochs
                .get(stream)
                .is_some_and(|(epoch, _)| *epoch == head.epoch)
    }

    /// Drops the entries no watcher held for [`PLACEHOLDER_LINGER`]; `watched` are the streams
    /// the node's `Heads` still hold.
    fn prune(&mut self, watched: &HashSet<StreamName>) {
        let now = Instant::now();
        self.epochs.retain(|stream, (_, touched)| {
            if watched.contains(stream) {
                *touched = now;
                return true;
            }
            now.duration_since(*touched) < PLACEHOLDER_LINGER
        });
    }
}

impl Inner {
    pub fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn names(&self, stream: &StreamName) -> StreamNames {
        StreamNames::new(&self.config.prefix, stream)
    }

    /// The state a JetStream stream's info describes; remembers its epoch and moves this
    /// node's watch of it (if any) to its head (the stream has no placeholder any more). When
    /// the epoch is news (the stream was made again), the other nodes are told at once, so
    /// their appends stop naming the old one.
    async fn state_from(
        &self,
        stream: &StreamName,
        info: &Info,
    ) -> Result<StreamState, EngineError> {
        let epoch = codec::epoch(stream, info)?;
        let head = Offset(info.state.last_sequence);
        // With no message JetStream reports first = last + 1 (or 0 on a new stream).
        let oldest = if info.state.messages == 0 {
            head.next()
        } else {
            Offset(info.state.first_sequence)
        };
        let head_position = Position::new(epoch.clone(), head);
        self.placeholders.lock().epochs.remove(stream);
        if self.remember(stream, &epoch) {
            self.tell(stream, &head_position).await;
        }
        self.node.heads().advance(stream, head_position);
        Ok(StreamState {
            epoch,
            head,
            oldest,
        })
    }

    /// Remembers `stream`'s epoch; returns whether it replaced another one.
    fn remember(&self, stream: &StreamName, epoch: &Epoch) -> bool {
        let mut known = self.known.lock();
        if known.len() >= MAX_KNOWN && !known.contains_key(stream) {
            known.clear();
        }
        known
            .insert(stream.clone(), (epoch.clone(), Instant::now()))
            .is_some_and(|(before, _)| before != *epoch)
    }

    /// Publishes a transient note on the notes subject, given up after the timeout (as `tell`).
    pub(crate) async fn publish_note(&self, note: bytes::Bytes) {
        let publish = self
            .client
            .publish(format!("{}.heads", self.config.prefix), note);
        match tokio::time::timeout(self.config.timeout, publish).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot publish a transient note"),
            Err(_) => tracing::debug!("no room to publish a transient note"),
        }
    }

    /// Publishes a head note (see `fanout`). Best effort: other nodes catch up by their
    /// periodic refresh. Skipped while disconnected, and given up after the timeout: the
    /// client's command queue is not drained while it reconnects, so once it is full a
    /// publish would wait there (holding up an append already acked) until NATS is back.
    async fn tell(&self, stream: &StreamName, head: &Position) {
        let note = HeadNote::new(stream.clone(), head.clone()).encode();
        if !self.connected() {
            tracing::debug!(%stream, "not connected: no head note");
            return;
        }
        let publish = self
            .client
            .publish(format!("{}.heads", self.config.prefix), note);
        match tokio::time::timeout(self.config.timeout, publish).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%stream, error = %e, "cannot publish a head note"),
            Err(_) => tracing::debug!(%stream, "no room to publish a head note"),
        }
    }

    fn forget(&self, stream: &StreamName) {
        self.known.lock().remove(stream);
    }

    /// The stream's current state from JetStream, or `None` when JetStream does not hold it.
    /// Never creates anything: only an append makes a JetStream stream.
    pub async fn fetch_state(
        &self,
        stream: &StreamName,
    ) -> Result<Option<StreamState>, EngineError> {
        self.fetch_state_confirming(stream, true).await
    }

    /// [`Inner::fetch_state`]; with `confirm` false, JetStream's first "stream not found" is
    /// believed (see [`Api::info_or_not_found`]).
    async fn fetch_state_confirming(
        &self,
        stream: &StreamName,
        confirm: bool,
    ) -> Result<Option<StreamState>, EngineError> {
        let names = self.names(stream);
        match self.api.info_or_not_found(&names.stream, confirm).await? {
            Some(info) => self.state_from(stream, &info).await.map(Some),
            // The epoch stays remembered: when the stream is made again, the new epoch is
            // news to tell the other nodes, and an append meanwhile finds no stream anyway.
            None => Ok(None),
        }
    }

    /// A stream's state for a reader: JetStream's (and `true`), or — for a stream JetStream
    /// does not hold — head 0 of a placeholder epoch (and `false`): the one this node's
    /// watchers wait in, or one kept from a moment ago, else a fresh one nobody keeps. Nothing
    /// is created.
    ///
    /// When this node's watchers wait in a history JetStream no longer holds (the stream was
    /// deleted, or NATS lost its data), they move to a fresh placeholder, so they are told (a
    /// reset) instead of waiting in the lost one. Only if no note moved their head while
    /// JetStream answered: a "not found" that raced the stream's creation is asked again.
    pub async fn state_or_placeholder(
        &self,
        stream: &StreamName,
    ) -> Result<(StreamState, bool), EngineError> {
        for _ in 0..3 {
            let before = self.node.heads().current(stream);
            // "Not found" is believed when it comes twice (a member recovering the stream says
            // so too) — but once is enough while this node's readers wait in its placeholder:
            // a wrong answer then only keeps them there until the next read or note.
            let waiting = before
                .as_ref()
                .is_some_and(|head| self.placeholders.lock().shows(stream, head));
            if let Some(state) = self.fetch_state_confirming(stream, !waiting).await? {
                return Ok((state, true));
            }
            let mut placeholders = self.placeholders.lock();
            let epoch = match before {
                Some(waiting) if placeholders.shows(stream, &waiting) => waiting.epoch,
                Some(seen) => {
                    let fresh = Epoch::generate();
                    let placeholder = Position::new(fresh.clone(), Offset::ZERO);
                    // Not retiring the epoch left: should the "not found" have been wrong,
                    // the stream's head, read again, moves the watchers back.
                    if !self.node.heads().park_if(stream, &seen, placeholder) {
                        continue;
                    }
                    placeholders
                        .epochs
                        .insert(stream.clone(), (fresh.clone(), Instant::now()));
                    fresh
                }
                None => match placeholders.epochs.get(stream) {
                    Some((kept, _)) => kept.clone(),
                    None => Epoch::generate(),
                },
            };
            return Ok((StreamState::empty(epoch), false));
        }
        Err(EngineError::unavailable(format!(
            "JetStream kept reporting no stream {stream:?} while notes moved its head; retry"
        )))
    }

    /// The epoch appends to `stream` land in: remembered, or learned by creating the stream
    /// (which answers with the existing one's info if it is there). A stream JetStream does
    /// not hold is made in the placeholder epoch this node's readers wait in, if any.
    async fn epoch(&self, stream: &StreamName, names: &StreamNames) -> Result<Epoch, EngineError> {
        if let Some((epoch, _)) = self.known.lock().get(stream) {
            return Ok(epoch.clone());
        }
        let candidate = self
            .placeholders
            .lock()
            .epochs
            .get(stream)
            .map(|(epoch, _)| epoch.clone())
            .unwrap_or_else(Epoch::generate);
        let config = self.config.stream_config(stream, names, &candidate);
        let info = self.api.create(&config).await?;
        Ok(self.state_from(stream, &info).await?.epoch)
    }

    /// A note from another node (or this one) that `stream`'s head moved: JetStream holds the
    /// stream, so it has no placeholder any more.
    pub fn heard(&self, stream: &StreamName, head: Position) {
        // A note at head 0 announces an empty history: the stream was deleted (`admin.rs`).
        if head.offset == Offset::ZERO {
            self.deleted(stream, head.epoch);
            return;
        }
        let stale = self
            .known
            .lock()
            .get(stream)
            .is_some_and(|(epoch, _)| *epoch != head.epoch);
        if stale {
            self.forget(stream);
        }
        self.placeholders.lock().epochs.remove(stream);
        self.node.heads().advance(stream, head);
    }

    /// Publishes `messages` back to back on the one connection, then awaits their acks in
    /// order; JetStream's sequences are the offsets.
    async fn publish(
        &self,
        names: &StreamNames,
        messages: &[NewMessage],
        time_ms: u64,
    ) -> Result<Vec<PublishAck>, PublishFailure> {
        // While disconnected the client would buffer the publishes and send them after it
        // reconnects — long after this call answered 503. Refuse up front instead, so "503"
        // means "not stored" whenever the engine can know it.
        if !self.connected() {
            return Err(PublishFailure::Failed(EngineError::unavailable(
                "not connected to NATS (reconnecting); nothing was published",
            )));
        }
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let mut headers = codec::headers(message, time_ms).map_err(PublishFailure::Failed)?;
            if let Some(key) = &message.idempotency_key
                && !self.config.dedup_window.is_zero()
            {
                let id: async_nats::HeaderValue = names::msg_id(key).parse().map_err(|e| {
                    PublishFailure::Failed(EngineError::internal_from(
                        "cannot encode an idempotency key",
                        e,
                    ))
                })?;
                headers.insert("Nats-Msg-Id", id);
            }
            let ack = self
                .api
                .js
                .publish_with_headers(names.subject.clone(), headers, message.payload.clone())
                .await
                .map_err(|e| self.publish_failure(e, message.payload.len()))?;
            pending.push((ack, message.payload.len()));
        }
        // Every answer is awaited: "no responders" means the whole batch may be sent again
        // only when no message of it was taken (a leader elected part-way through takes the
        // rest).
        let mut acks = Vec::with_capacity(pending.len());
        let mut failure = None;
        let mut unanswered = 0;
        for (ack, size) in pending {
            match ack.await.map_err(|e| self.publish_failure(e, size)) {
                Ok(ack) => acks.push(ack),
                Err(f) => {
                    unanswered += usize::from(matches!(f, PublishFailure::NoResponders));
                    failure.get_or_insert(f);
                }
            }
        }
        match failure {
            Some(PublishFailure::NoResponders) if unanswered == messages.len() => {
                return Err(PublishFailure::NoResponders);
            }
            Some(PublishFailure::NoResponders) => {
                return Err(PublishFailure::Failed(EngineError::unavailable(format!(
                    "JetStream stream {} lost its leader during the publish: {} of {} messages \
                     were acked; retry with the same idempotency keys",
                    names.stream,
                    acks.len(),
                    messages.len()
                ))));
            }
            Some(failed) => return Err(failed),
            None => {}
        }
        if let Some(ack) = acks.iter().find(|ack| ack.stream != names.stream) {
            return Err(PublishFailure::Failed(EngineError::internal(format!(
                "a publish to {} was stored in JetStream stream {}, not {}",
                names.subject, ack.stream, names.stream
            ))));
        }
        Ok(acks)
    }

    /// `size` is the message's payload in bytes.
    fn publish_failure(&self, e: PublishError, size: usize) -> PublishFailure {
        let failed = |e| PublishFailure::Failed(e);
        match e.kind() {
            // async-nats names NATS's "no responders" so. It is not JetStream saying the stream
            // is gone: a stream whose leader died takes no publishes until the election ends.
            PublishErrorKind::StreamNotFound => PublishFailure::NoResponders,
            PublishErrorKind::MaxPayloadExceeded => {
                failed(EngineError::Limit(Limit::MessageTooLarge {
                    store: "NATS",
                    size,
                    max: Some(self.client.server_info().max_payload),
                    source: Some(Arc::new(e)),
                }))
            }
            PublishErrorKind::TimedOut => failed(EngineError::unavailable(format!(
                "NATS JetStream did not acknowledge the publish within {:?}; it may still be \
                 stored, so retry with the same idempotency key",
                self.config.timeout
            ))),
            _ => failed(EngineError::unavailable_from(
                "publishing to NATS JetStream failed",
                e,
            )),
        }
    }

    async fn append(
        &self,
        stream: &StreamName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, EngineError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let names = self.names(stream);
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        let mut epoch = self.epoch(stream, &names).await?;
        let time_ms = now_ms();
        let mut checked = false;
        let mut pause = Duration::from_millis(25);
        let acks = loop {
            match self.publish(&names, &messages, time_ms).await {
                Ok(acks) => break acks,
                Err(PublishFailure::Failed(e)) => return Err(e),
                Err(PublishFailure::NoResponders) => {}
            }
            // Nothing took the publish, so nothing was stored and sending it again is safe.
            // Either the JetStream stream is gone, or it has no leader right now (the election
            // after its leader died takes seconds). Only JetStream's own "stream not found" is
            // the former; then what the stream held is lost with it, and these messages start
            // its next history, in a new epoch. Otherwise wait for the leader, within the
            // engine timeout.
            if !checked {
                checked = true;
                if !self.api.exists(&names.stream, deadline).await? {
                    tracing::warn!(%stream, "the JetStream stream is gone; creating it again");
                    self.forget(stream);
                    epoch = tokio::time::timeout_at(deadline, self.epoch(stream, &names))
                        .await
                        .map_err(|_| no_leader(&names))??;
                    continue;
                }
            }
            if tokio::time::Instant::now() + pause >= deadline {
                return Err(no_leader(&names));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        };
        // The acks landed in whichever JetStream stream has the subject now. Name the newest
        // epoch this node knows for it (another task may have learned of a remade stream
        // meanwhile), and now and then confirm it with JetStream, since another node may have
        // deleted and remade the stream without this one hearing of it. The messages are
        // stored either way: a failed check (JetStream busy electing a leader) keeps the epoch
        // the publish went to rather than turn a stored publish into an error.
        let known = self.known.lock().get(stream).cloned();
        match known {
            Some((known, at)) if at.elapsed() <= RECHECK_EPOCH => epoch = known,
            _ => match self.fetch_state(stream).await {
                Ok(Some(state)) => epoch = state.epoch,
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(%stream, error = %e, "cannot confirm the epoch after a publish")
                }
            },
        }

        let mut out = Vec::with_capacity(acks.len());
        let mut fresh = Vec::with_capacity(acks.len());
        for (message, ack) in messages.into_iter().zip(&acks) {
            let offset = Offset(ack.sequence);
            out.push(Appended {
                position: Position::new(epoch.clone(), offset),
                duplicate: ack.duplicate,
            });
            if !ack.duplicate {
                fresh.push(Arc::new(message.stamp(offset, time_ms).0));
            }
        }
        if let Some(last) = fresh.last() {
            let head = Position::new(epoch.clone(), last.offset);
            self.node.appended(stream, head.clone(), &fresh);
            self.tell(stream, &head).await;
        }
        Ok(out)
    }

    /// A read straight from JetStream: the stream's info (the snapshot's bounds), then its
    /// messages by sequence.
    async fn read_jetstream(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<ReadBatch, EngineError> {
        let names = self.names(stream);
        let known = self.node.heads().current(stream);
        let (mut state, found) = self.state_or_placeholder(stream).await?;
        if !found {
            return Ok(ReadBatch {
                state,
                messages: Vec::new(),
            });
        }
        self.fresh(stream, &state, known)?;
        let mut messages = Vec::new();
        for attempt in 1..=READ_ATTEMPTS {
            let first = after.next();
            if limit == 0 || after >= state.head || first < state.oldest {
                break;
            }
            let last = state
                .head
                .get()
                .min(after.get().saturating_add(limit as u64));
            messages = self.fetch(&names, first.get()..=last).await?;
            if !messages.is_empty() {
                break;
            }
            // The first message vanished between the info and the get: retention moved the
            // oldest on, or the stream was remade. Look again.
            let known = self.node.heads().current(stream);
            let (again, _) = self.state_or_placeholder(stream).await?;
            self.fresh(stream, &again, known)?;
            let still_retained =
                again.epoch == state.epoch && again.oldest <= first && first <= again.head;
            if still_retained && attempt == READ_ATTEMPTS {
                // Across a leader change the state and the gets may come from different
                // leaders, the newer one still applying what the older acked: retry later.
                return Err(EngineError::unavailable(format!(
                    "message {first} of {stream:?} is missing though JetStream reports it retained"
                )));
            }
            state = again;
        }
        Ok(ReadBatch { state, messages })
    }

    /// Checks a state JetStream reported for a read against `known`, the head this node knew
    /// for the stream before it asked. JetStream never moves a stream's head back within one
    /// epoch (a remade stream has a new epoch), and this node's head moves only on JetStream's
    /// acks and its leader's answers, so an answer behind what was known before the question
    /// comes from a server that has not applied everything yet — a stream leader elected a
    /// moment ago — and is not lost history. Handing it to a reader past that head would tell
    /// it `epoch_changed` for messages that are safe. So the read fails as `Unavailable`
    /// (readers retry) until JetStream catches up. Should JetStream keep reporting an older head
    /// for [`STALE_GRACE`], it did lose acked messages (see "When the engine loses data" in
    /// docs/operations.md), and the node believes it. (The head known *before* asking: one
    /// learned while the question was out may be newer than a correct answer.)
    fn fresh(
        &self,
        stream: &StreamName,
        state: &StreamState,
        known: Option<Position>,
    ) -> Result<(), EngineError> {
        let seen = known.filter(|h| h.epoch == state.epoch && h.offset > state.head);
        let mut behind = self.behind.lock();
        let Some(seen) = seen else {
            behind.remove(stream);
            return Ok(());
        };
        if behind.len() >= MAX_KNOWN && !behind.contains_key(stream) {
            behind.clear();
        }
        let (since, believed) = behind
            .entry(stream.clone())
            .or_insert_with(|| (Instant::now(), false));
        if *believed {
            return Ok(());
        }
        if since.elapsed() < STALE_GRACE {
            return Err(EngineError::unavailable(format!(
                "JetStream reports stream {stream:?} at offset {}, behind offset {} it acknowledged: \
                 a server that has not caught up (a leader change); not used",
                state.head, seen.offset
            )));
        }
        *believed = true;
        tracing::warn!(
            %stream, head = %state.head, seen = %seen.offset,
            "JetStream has reported the stream behind offsets it acknowledged for {STALE_GRACE:?}: \
             taking it as lost messages"
        );
        Ok(())
    }

    /// The messages at `offsets`, up to the first one missing (a read never has a hole).
    async fn fetch(
        &self,
        names: &StreamNames,
        offsets: std::ops::RangeInclusive<u64>,
    ) -> Result<Vec<Arc<Message>>, EngineError> {
        let mut gets = futures::stream::iter(offsets)
            .map(|seq| async move {
                let got = self.api.get(&names.stream, Offset(seq)).await;
                (seq, got)
            })
            .buffered(READ_CONCURRENCY);
        let mut messages = Vec::new();
        while let Some((seq, got)) = gets.next().await {
            match got? {
                Some(stored) => messages.push(Arc::new(codec::decode(Offset(seq), stored)?)),
                None => break,
            }
        }
        Ok(messages)
    }
}

/// What the node shares with the Redis engine (`spool_engine::cluster::ClusterNode`) reads
/// through: JetStream, a stream it does not hold being a placeholder ([`Placeholders`]).
impl Store for Inner {
    async fn read_head(&self, stream: &StreamName) -> Result<(StreamState, bool), EngineError> {
        self.state_or_placeholder(stream).await
    }

    async fn read_range(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<ReadBatch, EngineError> {
        self.read_jetstream(stream, after, limit).await
    }

    async fn state(&self, stream: &StreamName) -> Result<Option<StreamState>, EngineError> {
        let known = self.node.heads().current(stream);
        let state = self.fetch_state(stream).await?;
        if let Some(state) = &state {
            self.fresh(stream, state, known)?;
        }
        Ok(state)
    }

    /// Kept from now on, within the cap (lock order: the node's watch lock, then
    /// `placeholders`, then the heads').
    fn keep_placeholder(&self, stream: &StreamName, epoch: Epoch) -> Result<Epoch, EngineError> {
        self.placeholders
            .lock()
            .keep(stream, epoch, self.node.heads())
    }
}

fn no_leader(names: &StreamNames) -> EngineError {
    EngineError::unavailable(format!(
        "JetStream stream {} takes no publishes right now (no leader: an election is under way, \
         or its servers are unreachable); nothing was published",
        names.stream
    ))
}

#[async_trait]
impl Engine for NatsEngine {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn transient(&self) -> Option<&spool_engine::cluster::TransientLink> {
        Some(self.inner.node.transient())
    }

    /// Listing, deleting and truncating streams (`engine/admin.rs`).
    fn admin(&self) -> Option<&dyn spool_engine::StreamAdmin> {
        Some(self)
    }

    async fn append(
        &self,
        stream: &StreamName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<Appended>, EngineError> {
        self.inner.append(stream, messages).await
    }

    async fn read(
        &self,
        stream: &StreamName,
        after: Offset,
        limit: usize,
    ) -> Result<ReadBatch, EngineError> {
        let inner = &*self.inner;
        inner.node.read(inner, stream, after, limit).await
    }

    async fn state(&self, stream: &StreamName) -> Result<Option<StreamState>, EngineError> {
        self.inner.state(stream).await
    }

    /// Like a read, creates nothing: a stream JetStream does not hold is watched at head 0 of
    /// this node's placeholder for it (see [`Placeholders`]).
    async fn watch(&self, stream: &StreamName) -> Result<HeadWatch, EngineError> {
        let inner = &*self.inner;
        inner.node.watch(inner, stream).await
    }

    /// Cheap for a stream this node watches and has seen a message of; else one state read.
    async fn exists(&self, stream: &StreamName) -> Result<bool, EngineError> {
        let inner = &*self.inner;
        inner.node.exists(inner, stream).await
    }

    fn retention(&self, stream: &StreamName) -> Retention {
        self.inner.config.retention.for_stream(stream)
    }

    async fn sweep(&self) -> Result<(), EngineError> {
        let gone = self.inner.node.prune();
        {
            let mut behind = self.inner.behind.lock();
            for stream in &gone {
                behind.remove(stream);
            }
        }
        let mut placeholders = self.inner.placeholders.lock();
        if !placeholders.epochs.is_empty() {
            let watched: HashSet<StreamName> =
                self.inner.node.heads().watched().into_iter().collect();
            placeholders.prune(&watched);
        }
        Ok(())
    }

    async fn ready(&self) -> Result<(), EngineError> {
        if !self.inner.connected() {
            return Err(EngineError::unavailable(format!(
                "not connected to NATS at {}",
                redacted(&self.inner.config.url)
            )));
        }
        self.inner.api.ping().await
    }
}

/// Sessions in the `<prefix>_sessions` KV bucket (`sessions.rs`), on the node's connection.
#[async_trait]
impl SessionStore for NatsEngine {
    async fn save_sessions(
        &self,
        sessions: Vec<SessionRecord>,
    ) -> Result<Vec<String>, EngineError> {
        self.inner.sessions.save(&sessions, now_ms()).await
    }

    async fn load_session(&self, id: &str) -> Result<Option<Bytes>, EngineError> {
        self.inner.sessions.load(id, now_ms()).await
    }

    async fn delete_session(&self, id: &str) -> Result<(), EngineError> {
        self.inner.sessions.delete(id).await
    }
}
