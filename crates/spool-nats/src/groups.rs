//! Consumer groups (SPEC §7) in JetStream: the [`GroupStore`] of the NATS engine.
//!
//! # Layout
//!
//! One JetStream stream, `<prefix>__groups` (a name no Spool stream's can be: an encoded
//! name's `_` is always followed by an upper-case hex digit or `h`), subjects
//! `<prefix>.g.>`. Each group is one subject, `<prefix>.g.<encoded stream>.<encoded group>`
//! (`names::encode`), holding the group's records in order: a **snapshot** record (at creation
//! and at each compaction) and then one **commit** record per commit since. Every record
//! carries the headers `Spool-Group` (`snapshot` or `commit`), `Spool-Group-Version` (the
//! group's version once it is written) and `Spool-Group-Id` (the group's incarnation); the
//! payload is the snapshot's or the commit's changes' JSON.
//!
//! # Why a subject per group, checked by sequence
//!
//! The version check is JetStream's own: every write is a publish with
//! `Nats-Expected-Last-Subject-Sequence` naming the sequence of the record that carries the
//! version the writer computed against, so JetStream refuses it (wrong last sequence) if any
//! other record reached the subject since: a stale commit gets `Conflict` and writes nothing.
//! Creation expects sequence 0 (an empty subject), so two nodes creating one name cannot
//! both win. (A JetStream *cluster* of nats-server before 2.9.21 checks that header only
//! before the Raft proposal, so racing writes may both land — nats-io/nats-server#4320: on
//! such servers group writes are refused with a message saying so, see [`unserializable`]; a
//! single server is safe in every version.) A compaction publishes the new snapshot with `Nats-Rollup: sub` as well, which
//! makes JetStream drop every earlier record of the subject in the same step: a compaction is
//! atomic and the subject stays as small as the state. Deletion purges the subject.
//!
//! A KV bucket with revision-checked updates was the alternative, but a KV value is the whole
//! group: every commit would rewrite the snapshot (tens of KiB, up to JetStream's
//! `max_payload`), where here it writes only its changes.
//!
//! # Cost
//!
//! A commit is one publish and its ack (one round trip) when this node wrote or read the
//! version it names (it remembers the sequence of each group's last record it saw), else two
//! (the subject's last record, from the stream's leader, first). A load asks for the
//! subject's last record, then reads the records one by one from the leader (`STREAM.MSG.GET`
//! with `next_by_subj`) — but only those after the copy this node loaded or wrote last (it
//! keeps up to 256 groups): one round trip when nothing changed, two after another node's
//! commit; a cold load costs one per commit since the last compaction (a group 256 commits
//! after its snapshot: tens of ms on one machine). A compaction costs three round trips (the
//! last and first records, the publish). `list_groups` reads the stream's subjects
//! (`STREAM.INFO` with a subject filter); `--max-groups` is checked against the stream's count
//! of subjects before a creation, so nodes creating groups at the same moment may pass the
//! bound by one each (the other engines' bound is exact).
//!
//! # Durability and limits
//!
//! The stream is made by the first group write that finds it missing (an engine whose groups
//! are never used makes none), and stored and replicated as the engine's streams are
//! (`durability`, `replicas`).
//! A record must fit NATS's `max_payload` (1 MiB by default): a group's snapshot is bounded by
//! its state machine (entries ≤ 2 × `max_in_flight`, members ≤ 1024) and is far below that
//! with the default `max_in_flight`; one that is not is refused with `Limit` (raise the NATS
//! servers' `max_payload`, or lower the group's `max_in_flight`).

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::{
    HeaderMap, ServerInfo,
    jetstream::{
        context::PublishErrorKind,
        message::StreamMessage,
        response::Response,
        stream::{Config, DiscardPolicy},
    },
};
use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use spool_core::{
    StreamName,
    group::{Change, GroupName, GroupSnapshot},
};
use spool_engine::{Committed, EngineError, GroupStore, HasGroupStore, Limit, StoredGroup};
use tokio::time::Instant;

use crate::{
    NatsEngine,
    config::NatsConfig,
    jetstream::{Api, Got},
    names,
};

const KIND: &str = "Spool-Group";
const VERSION: &str = "Spool-Group-Version";
const ID: &str = "Spool-Group-Id";
const SNAPSHOT: &str = "snapshot";
const COMMIT: &str = "commit";
/// JetStream's error code for "stream not found".
const STREAM_NOT_FOUND: u64 = 10059;
/// The most groups whose last record this node remembers; past it the memory is cleared
/// (each costs one more round trip on its next commit).
const MAX_KNOWN: usize = 100_000;
/// The most groups whose whole stored form this node keeps for its next load (snapshot and
/// changes since: up to a few hundred KiB each); past it the memory is cleared.
const MAX_LOADED: usize = 256;

/// The group store of one engine.
pub(crate) struct Groups {
    api: Api,
    config: Config,
    /// `<prefix>.g.`
    subjects: String,
    max: usize,
    /// Per group this node wrote or loaded: its version and the sequence of the record that
    /// carries it.
    known: Mutex<HashMap<(StreamName, GroupName), (u64, u64)>>,
    /// The groups this node loaded or wrote last, with the sequence of the record they end
    /// at, so that loading again reads only what other nodes wrote since.
    loaded: Mutex<HashMap<(StreamName, GroupName), (StoredGroup, u64)>>,
    /// Why group writes are refused on this NATS, if they are (see [`unserializable`]).
    refused: Option<String>,
}

/// A group's last record, as far as a commit needs it.
struct Last {
    version: u64,
    sequence: u64,
}

impl Groups {
    /// The store; its stream is made by the first group written. `server` is the NATS server
    /// the engine connected to.
    pub fn new(api: Api, config: &NatsConfig, server: &ServerInfo) -> Self {
        let refused = unserializable(server);
        if let Some(why) = &refused {
            tracing::warn!("{why}");
        }
        Self {
            refused,
            config: Config {
                name: format!("{}__groups", config.prefix),
                description: Some("Spool consumer groups".into()),
                subjects: vec![format!("{}.g.>", config.prefix)],
                storage: config.storage(),
                num_replicas: config.replicas,
                max_messages: -1,
                max_bytes: -1,
                max_messages_per_subject: -1,
                discard: DiscardPolicy::New,
                duplicate_window: Duration::from_secs(120),
                allow_rollup: true,
                deny_delete: true,
                ..Default::default()
            },
            subjects: format!("{}.g.", config.prefix),
            max: config.max_groups,
            known: Mutex::new(HashMap::new()),
            loaded: Mutex::new(HashMap::new()),
            api,
        }
    }

    async fn create_stream(&self) -> Result<(), EngineError> {
        self.api
            .open(
                &self.config,
                &format!("the groups stream {}", self.config.name),
            )
            .await
    }

    fn subject(&self, stream: &StreamName, group: &GroupName) -> String {
        format!(
            "{}{}.{}",
            self.subjects,
            names::encode(stream.as_str()),
            names::encode(group.as_str())
        )
    }

    fn remember(&self, stream: &StreamName, group: &GroupName, version: u64, sequence: u64) {
        let mut known = self.known.lock();
        if known.len() >= MAX_KNOWN {
            known.clear();
        }
        known.insert((stream.clone(), group.clone()), (version, sequence));
    }

    fn forget(&self, stream: &StreamName, group: &GroupName) {
        self.known.lock().remove(&(stream.clone(), group.clone()));
    }

    /// `STREAM.MSG.GET` on the groups' stream: `None` when there is no such message.
    async fn get(&self, request: serde_json::Value) -> Result<Option<StreamMessage>, EngineError> {
        let what = "reading a group record";
        match self.api.msg_get(&self.config.name, request, what).await? {
            Got::Message(message) => Ok(Some(message)),
            Got::NoMessage => Ok(None),
            Got::NoStream => {
                // A server still recovering its streams (just restarted) says so too: no group
                // is taken for gone unless JetStream confirms the stream is.
                if self.api.info(&self.config.name).await?.is_some() {
                    return Err(EngineError::unavailable(format!(
                        "{what}: the groups stream {} is not ready yet",
                        self.config.name
                    )));
                }
                Ok(None)
            }
        }
    }

    async fn last(&self, subject: &str) -> Result<Option<Last>, EngineError> {
        let Some(message) = self.get(json!({ "last_by_subj": subject })).await? else {
            return Ok(None);
        };
        let (_, version, _) = headers(&message)?;
        Ok(Some(Last {
            version,
            sequence: message.sequence,
        }))
    }

    /// Publishes one record expecting the subject's last sequence to be `after` (0: empty).
    /// `Ok(None)`: JetStream refused for the sequence (another record came first).
    ///
    /// The stream is made by the first write that finds it missing (an engine whose groups are
    /// never used makes none), and again if NATS lost it.
    async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Vec<u8>,
        what: &str,
    ) -> Result<Option<u64>, EngineError> {
        let payload = Bytes::from(payload);
        if let Some(sent) = self
            .publish_once(subject.clone(), headers.clone(), payload.clone(), what)
            .await?
        {
            return Ok(sent);
        }
        // "No responders": the stream does not exist, or has no leader now. Made only when
        // JetStream says it does not exist.
        let deadline = Instant::now() + self.api.timeout;
        if !self.api.exists(&self.config.name, deadline).await? {
            tracing::info!(stream = %self.config.name, "creating the groups stream");
            self.create_stream().await?;
            if let Some(sent) = self.publish_once(subject, headers, payload, what).await? {
                return Ok(sent);
            }
        }
        Err(EngineError::unavailable(format!(
            "writing a group {what}: the groups stream {} takes no writes right now (no \
             leader: an election is under way, or its servers are unreachable)",
            self.config.name
        )))
    }

    /// One publish: `Ok(None)` on "no responders" (nothing was stored).
    async fn publish_once(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        what: &str,
    ) -> Result<Option<Option<u64>>, EngineError> {
        let size = payload.len();
        let deadline = Instant::now() + self.api.timeout;
        let send = async {
            let ack = self
                .api
                .js
                .publish_with_headers(subject, headers, payload)
                .await?;
            ack.await
        };
        let result = match tokio::time::timeout_at(deadline, send).await {
            Ok(result) => result,
            Err(_) => {
                return Err(EngineError::unavailable(format!(
                    "writing a group {what}: NATS JetStream did not answer within {:?}",
                    self.api.timeout
                )));
            }
        };
        match result {
            Ok(ack) => Ok(Some(Some(ack.sequence))),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(Some(None)),
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                Err(EngineError::Limit(Limit::Store {
                    what: format!(
                        "a group {what} of {size} bytes is larger than the NATS server's \
                         max_payload: raise max_payload on the NATS servers, or lower the \
                         group's max_in_flight"
                    ),
                    source: Some(Arc::new(e)),
                }))
            }
            // async-nats's name for NATS's "no responders".
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => Ok(None),
            Err(e) => Err(EngineError::unavailable_from(
                format!("writing a group {what} to NATS"),
                e,
            )),
        }
    }

    async fn count(&self) -> Result<u64, EngineError> {
        Ok(self
            .api
            .info(&self.config.name)
            .await?
            .map_or(0, |info| info.state.subjects_count))
    }

    /// `Internal` when group writes are refused on this NATS (see [`unserializable`]).
    fn writable(&self) -> Result<(), EngineError> {
        match &self.refused {
            Some(why) => Err(EngineError::internal(why.clone())),
            None => Ok(()),
        }
    }

    fn keep_loaded(&self, key: (StreamName, GroupName), stored: StoredGroup, sequence: u64) {
        let mut loaded = self.loaded.lock();
        if loaded.len() >= MAX_LOADED && !loaded.contains_key(&key) {
            loaded.clear();
        }
        loaded.insert(key, (stored, sequence));
    }

    /// The answer to a publish of the group's record that brings it to `version`: once stored,
    /// this node knows the record's sequence and `stored` (given it) updates the loaded copy;
    /// refused or failed, what this node knew of the group is forgotten.
    fn published(
        &self,
        stream: &StreamName,
        group: &GroupName,
        version: u64,
        published: Result<Option<u64>, EngineError>,
        stored: impl FnOnce(u64),
    ) -> Result<Committed, EngineError> {
        match published {
            Ok(Some(at)) => {
                self.remember(stream, group, version, at);
                stored(at);
                Ok(Committed::Done { version })
            }
            Ok(None) => {
                self.forget(stream, group);
                Ok(Committed::Conflict)
            }
            Err(e) => {
                self.forget(stream, group);
                Err(e)
            }
        }
    }

    /// The group's last record if the group is at `version`.
    async fn at_version(
        &self,
        stream: &StreamName,
        group: &GroupName,
        subject: &str,
        version: u64,
    ) -> Result<Option<Last>, EngineError> {
        Ok(self
            .last(subject)
            .await?
            .filter(|last| last.version == version)
            .inspect(|last| self.remember(stream, group, last.version, last.sequence)))
    }

    /// The Spool names of a group's subject: decoded, or (for a name that was too long and is
    /// hashed) from its snapshot. `None` if it vanished meanwhile.
    async fn names_of(
        &self,
        subject: &str,
    ) -> Result<Option<(StreamName, GroupName)>, EngineError> {
        let bad = || EngineError::internal(format!("the groups stream holds subject {subject:?}"));
        let tokens = subject
            .strip_prefix(&self.subjects)
            .and_then(|rest| rest.split_once('.'))
            .ok_or_else(bad)?;
        if let (Some(s), Some(g)) = (decode(tokens.0), decode(tokens.1)) {
            return Ok(Some((
                StreamName::stored(&s).map_err(|_| bad())?,
                GroupName::new(&g).map_err(|_| bad())?,
            )));
        }
        let Some(first) = self
            .get(json!({ "seq": 0, "next_by_subj": subject }))
            .await?
        else {
            return Ok(None);
        };
        let snapshot: GroupSnapshot = serde_json::from_slice(&first.payload).map_err(|e| {
            EngineError::internal(format!(
                "the first record of group subject {subject:?} is not a snapshot: {e}"
            ))
        })?;
        Ok(Some((snapshot.stream, snapshot.group)))
    }
}

/// The engine's group store: see the module docs.
#[async_trait]
impl GroupStore for Groups {
    /// Every node of a cluster commits to the same groups.
    fn shared(&self) -> bool {
        true
    }

    async fn create_group(&self, snapshot: &GroupSnapshot) -> Result<bool, EngineError> {
        self.writable()?;
        let subject = self.subject(&snapshot.stream, &snapshot.group);
        if self.count().await? >= self.max as u64 {
            // At the bound only a new name is refused.
            if self.last(&subject).await?.is_some() {
                return Ok(false);
            }
            return Err(EngineError::Limit(Limit::Groups { max: self.max }));
        }
        let payload = json_of("snapshot", serde_json::to_vec(snapshot))?;
        let mut headers = record_headers(SNAPSHOT, 0, &id_text(snapshot)?);
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        match self.publish(subject, headers, payload, "creation").await? {
            Some(sequence) => {
                self.remember(&snapshot.stream, &snapshot.group, 0, sequence);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The group as its records say: from the copy this node loaded or wrote last, if it has
    /// one, reading only the records after it (one round trip when nothing changed), else
    /// from the subject's first record.
    async fn load_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Option<StoredGroup>, EngineError> {
        let subject = self.subject(stream, group);
        let key = (stream.clone(), group.clone());
        let Some(end) = self.last(&subject).await? else {
            self.loaded.lock().remove(&key);
            return Ok(None);
        };
        let cached = self.loaded.lock().get(&key).cloned();
        let (mut found, mut at) = match cached {
            Some((stored, sequence))
                if sequence == end.sequence && stored.version == end.version =>
            {
                self.remember(stream, group, end.version, end.sequence);
                return Ok(Some(stored));
            }
            Some((stored, sequence)) if sequence < end.sequence => (
                Some((stored.snapshot, stored.changes, stored.version, sequence)),
                sequence + 1,
            ),
            _ => (None, 0),
        };
        while at <= end.sequence {
            let Some(message) = self
                .get(json!({ "seq": at, "next_by_subj": subject }))
                .await?
            else {
                break;
            };
            at = message.sequence + 1;
            let (kind, version, _) = headers(&message)?;
            let bad = |what: String| {
                EngineError::internal(format!(
                    "group {group:?} on stream {stream:?} in NATS, record {}: {what}",
                    message.sequence
                ))
            };
            match (kind.as_str(), &mut found) {
                (SNAPSHOT, _) => {
                    // The first record, or a compaction that happened while this load read.
                    let snapshot: GroupSnapshot = serde_json::from_slice(&message.payload)
                        .map_err(|e| bad(format!("the snapshot does not decode: {e}")))?;
                    if (&snapshot.stream, &snapshot.group) != (stream, group) {
                        return Err(bad(format!(
                            "the snapshot is of group {:?} on {:?}",
                            snapshot.group, snapshot.stream
                        )));
                    }
                    found = Some((snapshot, Vec::new(), version, message.sequence));
                }
                (COMMIT, Some((_, changes, at_version, last))) => {
                    if version != *at_version + 1 {
                        return Err(bad(format!(
                            "commit of version {version} follows version {at_version}"
                        )));
                    }
                    let batch: Vec<Change> = serde_json::from_slice(&message.payload)
                        .map_err(|e| bad(format!("the commit does not decode: {e}")))?;
                    changes.extend(batch);
                    *at_version = version;
                    *last = message.sequence;
                }
                (COMMIT, None) => return Err(bad("a commit with no snapshot before it".into())),
                (other, _) => return Err(bad(format!("unknown record kind {other:?}"))),
            }
        }
        Ok(found.map(|(snapshot, changes, version, sequence)| {
            self.remember(stream, group, version, sequence);
            let stored = StoredGroup {
                snapshot,
                changes,
                version,
            };
            self.keep_loaded(key, stored.clone(), sequence);
            stored
        }))
    }

    async fn list_groups(
        &self,
        stream: Option<&StreamName>,
    ) -> Result<Vec<(StreamName, GroupName)>, EngineError> {
        #[derive(Deserialize)]
        struct Page {
            state: PageState,
            #[serde(default)]
            total: usize,
        }
        #[derive(Deserialize)]
        struct PageState {
            #[serde(default)]
            subjects: Option<HashMap<String, u64>>,
        }
        let filter = match stream {
            Some(s) => format!("{}{}.*", self.subjects, names::encode(s.as_str())),
            None => format!("{}>", self.subjects),
        };
        let what = "listing groups";
        let mut subjects = Vec::new();
        loop {
            let response: Response<Page> = self
                .api
                .request(
                    what,
                    format!("STREAM.INFO.{}", self.config.name),
                    &json!({ "subjects_filter": filter, "offset": subjects.len() }),
                )
                .await?;
            let page = match response {
                Response::Ok(page) => page,
                Response::Err { error } if error.error_code().0 == STREAM_NOT_FOUND => break,
                Response::Err { error } => {
                    return Err(EngineError::unavailable_from(
                        format!("{what}: JetStream refused"),
                        error,
                    ));
                }
            };
            let got = page.state.subjects.unwrap_or_default();
            let empty = got.is_empty();
            subjects.extend(got.into_iter().filter(|(_, n)| *n > 0).map(|(s, _)| s));
            if empty || subjects.len() >= page.total {
                break;
            }
        }
        let mut groups = Vec::with_capacity(subjects.len());
        for subject in subjects {
            if let Some(names) = self.names_of(&subject).await? {
                groups.push(names);
            }
        }
        groups.sort();
        Ok(groups)
    }

    async fn commit_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        expected: u64,
        changes: &[Change],
    ) -> Result<Committed, EngineError> {
        self.writable()?;
        let subject = self.subject(stream, group);
        let known = self
            .known
            .lock()
            .get(&(stream.clone(), group.clone()))
            .copied();
        let sequence = match known {
            Some((version, sequence)) if version == expected => sequence,
            _ => match self.at_version(stream, group, &subject, expected).await? {
                Some(last) => last.sequence,
                None => return Ok(Committed::Conflict),
            },
        };
        let payload = json_of("commit", serde_json::to_vec(changes))?;
        let version = expected + 1;
        // The incarnation is the one of the record it follows (checked by its sequence).
        let mut headers = record_headers(COMMIT, version, "");
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            sequence.to_string().as_str(),
        );
        let published = self.publish(subject, headers, payload, "commit").await;
        self.published(stream, group, version, published, |at| {
            let mut loaded = self.loaded.lock();
            let key = (stream.clone(), group.clone());
            match loaded.get_mut(&key) {
                // The copy this commit follows: it is now the commit's.
                Some((stored, last)) if *last == sequence && stored.version == expected => {
                    stored.changes.extend_from_slice(changes);
                    stored.version = version;
                    *last = at;
                }
                _ => {
                    loaded.remove(&key);
                }
            }
        })
    }

    async fn compact_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        version: u64,
        snapshot: &GroupSnapshot,
    ) -> Result<Committed, EngineError> {
        spool_engine::groups::check_compaction(stream, group, snapshot)?;
        self.writable()?;
        let subject = self.subject(stream, group);
        let id = id_text(snapshot)?;
        // The incarnation is checked on the snapshot that starts the subject: the first
        // record, which the last one follows.
        let Some(last) = self.at_version(stream, group, &subject, version).await? else {
            return Ok(Committed::Conflict);
        };
        let first = self
            .get(json!({ "seq": 0, "next_by_subj": subject }))
            .await?;
        let same = match &first {
            Some(first) => headers(first)?.2 == id,
            None => false,
        };
        if !same {
            return Ok(Committed::Conflict);
        }
        let payload = json_of("snapshot", serde_json::to_vec(snapshot))?;
        let mut headers = record_headers(SNAPSHOT, version, &id);
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            last.sequence.to_string().as_str(),
        );
        headers.insert("Nats-Rollup", "sub");
        let published = self.publish(subject, headers, payload, "compaction").await;
        self.published(stream, group, version, published, |at| {
            let stored = StoredGroup {
                snapshot: snapshot.clone(),
                changes: Vec::new(),
                version,
            };
            self.keep_loaded((stream.clone(), group.clone()), stored, at);
        })
    }

    async fn delete_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<bool, EngineError> {
        #[derive(Deserialize)]
        struct Purged {
            #[serde(default)]
            purged: u64,
        }
        let subject = self.subject(stream, group);
        self.forget(stream, group);
        self.loaded.lock().remove(&(stream.clone(), group.clone()));
        let what = "deleting a group";
        let response: Response<Purged> = self
            .api
            .request(
                what,
                format!("STREAM.PURGE.{}", self.config.name),
                &json!({ "filter": subject }),
            )
            .await?;
        match response {
            Response::Ok(p) => Ok(p.purged > 0),
            Response::Err { error } if error.error_code().0 == STREAM_NOT_FOUND => Ok(false),
            Response::Err { error } => Err(EngineError::unavailable_from(
                format!("{what}: JetStream refused"),
                error,
            )),
        }
    }
}

/// Why group writes cannot be trusted on this NATS, if so: a JetStream cluster (the server
/// names one) of nats-server before 2.9.21 checks `Nats-Expected-Last-Subject-Sequence` only
/// before proposing the write to its Raft group, so two racing commits at one version may both
/// be accepted (nats-io/nats-server#4320, fixed in 2.9.21). A single server checks and stores
/// under one lock, which is safe in every version.
fn unserializable(server: &ServerInfo) -> Option<String> {
    let cluster = server.cluster.as_deref().filter(|c| !c.is_empty())?;
    if !version_before(&server.version, (2, 9, 21)) {
        return None;
    }
    Some(format!(
        "consumer groups are read-only on this NATS: it is a JetStream cluster ({cluster:?}) of \
         nats-server {}, which may accept two racing commits to one group \
         (nats-io/nats-server#4320); upgrade the NATS servers to 2.9.21 or later",
        server.version
    ))
}

/// Whether `version` (`major.minor.patch`, anything after ignored) is before `than`. An
/// unreadable version is taken as old.
fn version_before(version: &str, than: (u64, u64, u64)) -> bool {
    let mut parts = version
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u64>().ok());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c))) => (a, b, c) < than,
        _ => true,
    }
}

/// The inverse of `names::encode` for a name that was not hashed; `None` for a hashed one.
fn decode(token: &str) -> Option<String> {
    if token.starts_with("_h") {
        return None;
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn record_headers(kind: &str, version: u64, id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(KIND, kind);
    headers.insert(VERSION, version.to_string().as_str());
    if !id.is_empty() {
        headers.insert(ID, id);
    }
    headers
}

/// A record's kind, version and incarnation (empty on a commit).
fn headers(message: &StreamMessage) -> Result<(String, u64, String), EngineError> {
    let get = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
    let bad = |what: &str| {
        EngineError::internal(format!(
            "group record {} on {}: {what}",
            message.sequence, message.subject
        ))
    };
    let kind = get(KIND).ok_or_else(|| bad("no Spool-Group header"))?;
    let version = get(VERSION)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("no valid Spool-Group-Version header"))?;
    Ok((kind, version, get(ID).unwrap_or_default()))
}

fn json_of(what: &str, json: serde_json::Result<Vec<u8>>) -> Result<Vec<u8>, EngineError> {
    json.map_err(|e| EngineError::internal_from(format!("cannot encode a group {what}"), e))
}

/// The group's incarnation as stored: the hex of its id.
fn id_text(snapshot: &GroupSnapshot) -> Result<String, EngineError> {
    let json = serde_json::to_string(&snapshot.id)
        .map_err(|e| EngineError::internal_from("cannot encode a group id", e))?;
    Ok(json.trim_matches('"').to_owned())
}

/// The engine's [`GroupStore`] is its [`Groups`].
impl HasGroupStore for NatsEngine {
    fn group_store(&self) -> &dyn GroupStore {
        &self.groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_clustered_servers_are_refused() {
        assert!(version_before("2.9.10", (2, 9, 21)));
        assert!(!version_before("2.9.21", (2, 9, 21)));
        assert!(!version_before("2.10.0-beta.1", (2, 9, 21)));
        assert!(version_before("junk", (2, 9, 21)));
        let mut server = ServerInfo {
            version: "2.9.10".into(),
            ..Default::default()
        };
        assert!(unserializable(&server).is_none(), "a single server is safe");
        server.cluster = Some("c1".into());
        let why = unserializable(&server).expect("an old cluster");
        assert!(why.contains("2.9.21") && why.contains("#4320"), "{why}");
        server.version = "2.10.4".into();
        assert!(unserializable(&server).is_none());
    }

    #[test]
    fn encoded_names_decode() {
        for name in ["a.b", "chat:room/1", "x_y", "é*>", "A-z"] {
            assert_eq!(decode(&names::encode(name)).as_deref(), Some(name));
        }
        assert_eq!(decode(&names::encode(&"é".repeat(127))), None);
        assert_eq!(decode("_Z1"), None);
        assert_eq!(decode("a_"), None);
    }
}
