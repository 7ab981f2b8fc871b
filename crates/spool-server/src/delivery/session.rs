//! Resumable sessions (SPEC §3): an unguessable id standing for an identity, its
//! subscriptions, and the last position delivered on each — cursors, never messages.
//!
//! A connected session lives in memory ([`LiveSession`]); the writer of its connection moves
//! the positions as frames reach the socket, and [`Sessions`] saves every changed session to
//! the [`SessionStore`] (the engine's, given to `serve` beside the engine) about once a second
//! in one batch (and once more when its connection ends), so a busy connection costs one small
//! write per second, not one per message. Records expire in the store `session_ttl` after their
//! last save; a live session is re-saved well before that.
//!
//! # Take-over: the newest holder's record wins, on every node
//!
//! Each hold of a session by a connection has its own random `holder` id, written with every
//! record. A resume takes the session over by saving the record it loaded under its new holder
//! (`SessionRecord::take_over`, before it answers); every other save is refused by the store —
//! atomically, on whichever node — when another holder wrote the record since. So a connection
//! that lingers after its session was taken over (its socket blocked past `TAKEOVER_WAIT`, or
//! on another node that never heard of the resume) cannot move the record's positions back or
//! bring back subscriptions its successor changed: its saves are refused, and a refusal ends
//! it as taken over (`4007`). What the successor starts from is the record as the old holder
//! last saved it: its final save when it let go within `TAKEOVER_WAIT` (its last positions),
//! else its last periodic one (at most a second of deliveries older: sent again, never
//! skipped).
//!
//! # Take-overs are group-committed
//!
//! A take-over save must be durable before the resume answers, and on the disk engine each
//! call to `save_sessions` is one write transaction with an fsync. So concurrent resumes share
//! calls ([`TakeOvers`]): each puts its record in a pending batch and waits for its own answer;
//! the first to find no flush running starts one (a spawned task, so that no resume's future
//! being dropped can strand the others), which saves up to [`TAKE_OVER_BATCH`] records per
//! call and goes on while more arrived meanwhile. A reconnect storm of N sessions costs about
//! N / (records arriving during one fsync) store calls instead of N, each resume still
//! answering only once its own record is in the store.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use spool_core::{Position, now_ms};
use spool_engine::{EngineError, SessionRecord, SessionStore};
use tokio::{
    sync::{Notify, oneshot},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticator, Principal, Proof};

/// Random bytes in a session id: 192 bits, base64url-encoded to 32 characters.
const ID_BYTES: usize = 24;
/// Longest session id accepted from a client.
const MAX_ID_LEN: usize = 64;
/// How often changed sessions are saved.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long a resume waits for the connection that holds the session to let go of it.
const TAKEOVER_WAIT: Duration = Duration::from_secs(3);
/// Most take-over records saved in one call to the session store (the rest wait for the next).
const TAKE_OVER_BATCH: usize = 1024;

/// What a session record holds (JSON in the session store).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Stored {
    principal: Principal,
    /// What resuming without a credential checks against the running configuration. A
    /// record without one (written before proofs were kept) resumes only with a credential,
    /// or, if anonymous, while anonymous access is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    proof: Option<Proof>,
    /// Stream → the last position delivered (`EPOCH:OFFSET`).
    subscriptions: BTreeMap<String, String>,
    /// Stream → the protocol's own name for the subscription (AnyCable's channel
    /// identifier), where it gave one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, String>,
    /// Why the server closed the last connection, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_close: Option<String>,
}

/// Why a session could not be restored.
#[derive(Debug, PartialEq, Eq)]
pub enum NotRestored {
    /// Unknown, expired, malformed or forged.
    Unknown,
    /// It belongs to another identity than the credential given.
    OtherIdentity,
    /// The credential it was created with has expired and no new one was given.
    CredentialExpired,
    /// The running configuration no longer accepts the credential it was created with (an API
    /// key no longer configured, a token that no longer verifies, anonymous access turned
    /// off) and no new one was given.
    CredentialRevoked,
}

impl NotRestored {
    pub fn message(&self) -> &'static str {
        match self {
            NotRestored::Unknown => {
                "the session is unknown or has expired; connect with credentials to start a new one"
            }
            NotRestored::OtherIdentity => {
                "the session belongs to another identity; connect without it to start a new one"
            }
            NotRestored::CredentialExpired => {
                "the token the session was created with has expired; connect with a fresh token"
            }
            NotRestored::CredentialRevoked => {
                "the credential the session was created with is no longer accepted by this server; connect with a valid credential"
            }
        }
    }
}

/// A subscription of a session: its generation (so a stale frame of an earlier subscription
/// to the same stream cannot move it) and the last position delivered.
#[derive(Clone, Debug)]
struct Cursor {
    generation: u64,
    position: Position,
    label: Option<Arc<str>>,
}

struct Inner {
    principal: Principal,
    proof: Option<Proof>,
    subscriptions: HashMap<Arc<str>, Cursor>,
    last_close: Option<String>,
    dirty: bool,
    saved_at: Instant,
    /// The store refused a save: another connection took the session over since. Nothing of
    /// this hold is saved again.
    superseded: bool,
}

/// A session held by a connection.
pub struct LiveSession {
    pub id: String,
    /// This hold of the session (random, never 0: what the records it saves are written by).
    holder: u64,
    inner: Mutex<Inner>,
    /// Fires when another connection resumes this session.
    pub taken_over: CancellationToken,
    /// Fires when an operator disconnects the session (the admin API).
    pub disconnected: CancellationToken,
    /// Set once the holding connection has ended and saved the session.
    released: Released,
}

/// A flag set once, with a wait for it: what a connection taking a session over waits for.
/// (A `watch` channel did the same with ~350 B per session, most of it notifiers it never
/// used; every connected session holds one.)
#[derive(Default)]
struct Released {
    done: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Released {
    fn set(&self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    async fn wait(&self) {
        loop {
            // Registered before the check: a `set` after it still ends this wait.
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.done.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

impl LiveSession {
    fn new(
        id: String,
        principal: Principal,
        proof: Option<Proof>,
        subscriptions: HashMap<Arc<str>, Cursor>,
        last_close: Option<String>,
    ) -> Self {
        Self {
            id,
            holder: rand::random::<u64>() | 1,
            inner: Mutex::new(Inner {
                principal,
                proof,
                subscriptions,
                last_close,
                dirty: true,
                saved_at: Instant::now(),
                superseded: false,
            }),
            taken_over: CancellationToken::new(),
            disconnected: CancellationToken::new(),
            released: Released::default(),
        }
    }

    /// The writer wrote deliveries up to these positions, `(stream, generation, position)`,
    /// to the socket. A generation that is no longer the subscription's is ignored.
    pub fn delivered(&self, written: &mut Vec<(Arc<str>, u64, Position)>) {
        if written.is_empty() {
            return;
        }
        let mut inner = self.inner.lock();
        for (stream, generation, position) in written.drain(..) {
            if let Some(cursor) = inner.subscriptions.get_mut(&stream)
                && cursor.generation == generation
            {
                cursor.position = position;
                inner.dirty = true;
            }
        }
    }

    pub fn subscribe(
        &self,
        stream: Arc<str>,
        generation: u64,
        position: Position,
        label: Option<Arc<str>>,
    ) {
        let mut inner = self.inner.lock();
        inner.subscriptions.insert(
            stream,
            Cursor {
                generation,
                position,
                label,
            },
        );
        inner.dirty = true;
    }

    /// The last position delivered on a subscription, if subscribed.
    pub fn position(&self, stream: &str) -> Option<Position> {
        let inner = self.inner.lock();
        inner.subscriptions.get(stream).map(|c| c.position.clone())
    }

    pub fn unsubscribe(&self, stream: &str) {
        let mut inner = self.inner.lock();
        if inner.subscriptions.remove(stream).is_some() {
            inner.dirty = true;
        }
    }

    /// Why the server closed the previous connection (read once, on resume).
    pub fn take_last_close(&self) -> Option<String> {
        let mut inner = self.inner.lock();
        let reason = inner.last_close.take();
        if reason.is_some() {
            inner.dirty = true;
        }
        reason
    }

    /// Records why the server is closing this session's connection.
    pub fn set_last_close(&self, reason: &str) {
        let mut inner = self.inner.lock();
        inner.last_close = Some(reason.to_owned());
        inner.dirty = true;
    }

    /// A refresh replaced the credential.
    pub fn set_principal(&self, principal: Principal, proof: Proof) {
        let mut inner = self.inner.lock();
        inner.principal = principal;
        inner.proof = Some(proof);
        inner.dirty = true;
    }

    /// The subscriptions with their last delivered positions.
    pub fn subscriptions(&self) -> Vec<(Arc<str>, Position)> {
        let inner = self.inner.lock();
        let mut out: Vec<_> = inner
            .subscriptions
            .iter()
            .map(|(s, c)| (s.clone(), c.position.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The subscriptions with their last delivered positions and labels.
    pub fn labelled_subscriptions(&self) -> Vec<(Arc<str>, Position, Option<Arc<str>>)> {
        let inner = self.inner.lock();
        let mut out: Vec<_> = inner
            .subscriptions
            .iter()
            .map(|(s, c)| (s.clone(), c.position.clone(), c.label.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The record to save now (`take_over`: this hold starts, whoever wrote the record), or
    /// nothing once superseded.
    fn record(&self, ttl: Duration, take_over: bool) -> Option<SessionRecord> {
        let mut inner = self.inner.lock();
        if inner.superseded {
            return None;
        }
        let stored = Stored {
            principal: inner.principal.clone(),
            proof: inner.proof.clone(),
            subscriptions: inner
                .subscriptions
                .iter()
                .map(|(s, c)| (s.to_string(), c.position.to_string()))
                .collect(),
            labels: inner
                .subscriptions
                .iter()
                .filter_map(|(s, c)| Some((s.to_string(), c.label.as_deref()?.to_owned())))
                .collect(),
            last_close: inner.last_close.clone(),
        };
        let data = match serde_json::to_vec(&stored) {
            Ok(data) => data,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a session");
                return None;
            }
        };
        inner.dirty = false;
        inner.saved_at = Instant::now();
        Some(SessionRecord {
            id: self.id.clone(),
            data: Bytes::from(data),
            expires_at: now_ms() + ttl.as_millis() as u64,
            holder: self.holder,
            take_over,
        })
    }

    /// The store refused this hold's save: the session was taken over (here or on another
    /// node). Its connection ends as taken over; nothing of it is saved again.
    fn supersede(&self) {
        self.inner.lock().superseded = true;
        self.taken_over.cancel();
    }

    /// Whether it should be saved now: changed, or not saved for a third of the TTL (so the
    /// store's record of a quiet live session never expires).
    fn due(&self, ttl: Duration) -> bool {
        let inner = self.inner.lock();
        !inner.superseded && (inner.dirty || inner.saved_at.elapsed() >= ttl / 3)
    }
}

/// The take-over saves of the resumes in progress, group-committed: one call to the session
/// store (on the disk engine one transaction, one fsync) for every record that arrived while
/// the previous call ran.
///
/// - A resume pushes its record with a oneshot for its answer, and, if no flush is running,
///   spawns one ([`TakeOvers::flush`]). The flush takes up to [`TAKE_OVER_BATCH`] records,
///   saves them in one call, answers each waiter its own result (refused: its id is in the
///   store's answer; an error: every waiter of that call gets it), and loops until nothing is
///   pending, then clears `flushing` under the same lock a resume checks it under — so a record
///   is never left pending with no flush to take it.
/// - The flush is a task of its own, not a resume's future: a resume whose connection goes
///   away mid-wait is dropped without stopping the save of the others' records. A resume
///   dropped while its record is still pending is skipped (its answer channel is closed:
///   nothing of it is saved, as before batching); one dropped once its record is in a call
///   leaves it to land — the store then
///   names a holder no connection has, which only means the next resume takes the session
///   over as it would anyway. If the flush task itself ends early or never starts (the
///   runtime shutting down, a panic in the store), a guard made before it is spawned clears
///   `flushing` and the pending records: their resumes get an error rather than waiting
///   forever, and the next resume starts a new flush.
/// - A call the store refuses as a whole for a bound (`Limit`: one record was new at
///   `--max-sessions`) is saved again record by record, so only the resume whose record
///   met the bound fails, as when each resume saved alone.
/// - One session id is never twice in a call: when two resumes of one session race, the later
///   record waits for the next call. So the store sees them in the order they arrived, as it
///   did when each resume saved alone, and each gets the answer for its own record (two
///   records of one id in one call would depend on each engine's order within a call — NATS
///   checks all of them before writing any).
/// - Bounded: at most one pending record per resume in progress (resumes are bounded by
///   connections), and a call carries at most [`TAKE_OVER_BATCH`].
struct TakeOvers {
    store: Arc<dyn SessionStore>,
    state: Mutex<TakeOverState>,
}

#[derive(Default)]
struct TakeOverState {
    pending: VecDeque<Waiting>,
    /// A flush task is running (it takes whatever is pending before it ends).
    flushing: bool,
}

/// A take-over record waiting for its save; `done` gets whether it was saved (`false`: refused).
struct Waiting {
    record: SessionRecord,
    done: oneshot::Sender<Result<bool, EngineError>>,
}

impl TakeOvers {
    fn new(store: Arc<dyn SessionStore>) -> Arc<Self> {
        Arc::new(Self {
            store,
            state: Mutex::new(TakeOverState::default()),
        })
    }

    /// Saves `record` (a take-over) with the others pending; whether the store saved it
    /// (`false`: it refused it). Answers once the call carrying it has returned.
    async fn save(self: &Arc<Self>, record: SessionRecord) -> Result<bool, EngineError> {
        let (done, answer) = oneshot::channel();
        {
            let mut state = self.state.lock();
            state.pending.push_back(Waiting { record, done });
            if !state.flushing {
                state.flushing = true;
                let ended = EndFlush {
                    take_overs: self.clone(),
                    armed: true,
                };
                tokio::spawn(ended.flush());
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(EngineError::unavailable(
                "the session take-over was not saved (the server is stopping)",
            ))
        })
    }

    /// The next call's records: up to [`TAKE_OVER_BATCH`], one per session id, in arrival
    /// order, leaving out resumes that went away; the rest stay pending, in their order.
    /// `None`, with `flushing` cleared, once nothing is pending.
    fn next_batch(&self) -> Option<Vec<Waiting>> {
        let mut state = self.state.lock();
        let mut ids = HashSet::new();
        let mut batch = Vec::new();
        let mut rest = VecDeque::new();
        let mut pending = std::mem::take(&mut state.pending).into_iter();
        for waiting in pending.by_ref() {
            if waiting.done.is_closed() {
                continue;
            }
            if ids.insert(waiting.record.id.clone()) {
                batch.push(waiting);
                if batch.len() == TAKE_OVER_BATCH {
                    break;
                }
            } else {
                rest.push_back(waiting);
            }
        }
        rest.extend(pending);
        state.pending = rest;
        if batch.is_empty() && state.pending.is_empty() {
            state.flushing = false;
            return None;
        }
        Some(batch)
    }

    /// Saves `batch` in one call and answers each waiter; a call refused as a whole for a
    /// bound is saved again record by record.
    async fn save_batch(&self, batch: Vec<Waiting>) {
        let records = batch.iter().map(|w| w.record.clone()).collect();
        match self.store.save_sessions(records).await {
            Ok(refused) => {
                let refused: HashSet<String> = refused.into_iter().collect();
                for w in batch {
                    let saved = !refused.contains(&w.record.id);
                    let _ = w.done.send(Ok(saved));
                }
            }
            Err(EngineError::Limit(_)) if batch.len() > 1 => {
                for w in batch {
                    let answer = self.store.save_sessions(vec![w.record]).await;
                    let _ = w.done.send(answer.map(|refused| refused.is_empty()));
                }
            }
            Err(e) => {
                for w in batch {
                    let _ = w.done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The flush task: saves what is pending, a call at a time, until nothing is. Made before it
/// is spawned, so a task that ends early or never runs (dropped at runtime shutdown, a panic
/// in the store) still clears `flushing` and the pending records: their resumes are answered
/// with an error (their senders dropped) and the next resume starts a new flush.
struct EndFlush {
    take_overs: Arc<TakeOvers>,
    armed: bool,
}

impl EndFlush {
    async fn flush(mut self) {
        while let Some(batch) = self.take_overs.next_batch() {
            self.take_overs.save_batch(batch).await;
        }
        self.armed = false;
    }
}

impl Drop for EndFlush {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.take_overs.state.lock();
            state.flushing = false;
            state.pending.clear();
        }
    }
}

/// A restored session: the principal it stands for and its subscriptions.
pub struct Restored {
    pub session: Arc<LiveSession>,
    pub principal: Principal,
}

/// Every session of this node, and their persistence.
pub struct Sessions {
    store: Arc<dyn SessionStore>,
    ttl: Duration,
    live: Mutex<HashMap<String, Arc<LiveSession>>>,
    /// Held from taking records to their save, so a newer record of a session is never
    /// overwritten by an older one saved later (a flush racing a disconnect).
    saving: tokio::sync::Mutex<()>,
    /// The take-over saves of resumes, group-committed.
    take_overs: Arc<TakeOvers>,
}

impl Sessions {
    pub fn new(store: Arc<dyn SessionStore>, ttl: Duration) -> Self {
        Self {
            take_overs: TakeOvers::new(store.clone()),
            store,
            ttl,
            live: Mutex::new(HashMap::new()),
            saving: tokio::sync::Mutex::new(()),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Starts a new session for `principal`, who proved it with `proof`.
    pub fn create(&self, principal: Principal, proof: Proof) -> Arc<LiveSession> {
        let id = new_id();
        let session = Arc::new(LiveSession::new(
            id.clone(),
            principal,
            Some(proof),
            HashMap::new(),
            None,
        ));
        self.live.lock().insert(id, session.clone());
        session
    }

    /// Restores session `id` for a client presenting `credential` (already verified, with its
    /// proof), or nothing: then the credential the session was created with must still be
    /// accepted by `auth` — the configuration running now — and unexpired.
    /// A session held by another connection is taken over: that connection is told to close
    /// and its last positions are saved first.
    pub async fn restore(
        &self,
        id: &str,
        credential: Option<(&Principal, &Proof)>,
        auth: &Authenticator,
    ) -> Result<Result<Restored, NotRestored>, EngineError> {
        let credential_principal = credential.map(|(p, _)| p);
        if id.is_empty()
            || id.len() > MAX_ID_LEN
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Ok(Err(NotRestored::Unknown));
        }
        let holder = self.live.lock().get(id).cloned();
        if let Some(holder) = holder {
            let principal = holder.inner.lock().principal.clone();
            if let Some(credential) = credential_principal
                && !principal.same_identity(credential)
            {
                return Ok(Err(NotRestored::OtherIdentity));
            }
            holder.taken_over.cancel();
            let _ = tokio::time::timeout(TAKEOVER_WAIT, holder.released.wait()).await;
        }
        let Some(data) = self.store.load_session(id).await? else {
            return Ok(Err(NotRestored::Unknown));
        };
        let Ok(stored) = serde_json::from_slice::<Stored>(&data) else {
            tracing::warn!("ignoring a session record that does not parse");
            return Ok(Err(NotRestored::Unknown));
        };
        let (principal, proof) = match credential {
            Some((credential, _)) if !stored.principal.same_identity(credential) => {
                return Ok(Err(NotRestored::OtherIdentity));
            }
            Some((credential, proof)) => (credential.clone(), proof.clone()),
            None => {
                if stored
                    .principal
                    .expires_at()
                    .is_some_and(|exp| exp <= now_ms())
                {
                    return Ok(Err(NotRestored::CredentialExpired));
                }
                let proof = match stored.proof {
                    Some(proof) => proof,
                    None if stored.principal == Principal::Anonymous => Proof::Anonymous,
                    None => return Ok(Err(NotRestored::CredentialRevoked)),
                };
                // The rights are the credential's as verified now (a token's claims are its
                // own, so they are those it was created with).
                match auth.recheck(&proof) {
                    Ok(now)
                        if now.same_identity(&stored.principal)
                            && now.expires_at().is_none_or(|exp| exp > now_ms()) =>
                    {
                        (now, proof)
                    }
                    _ => return Ok(Err(NotRestored::CredentialRevoked)),
                }
            }
        };
        let mut labels = stored.labels;
        let subscriptions = stored
            .subscriptions
            .into_iter()
            .filter_map(|(stream, position)| {
                let position = position.parse::<Position>().ok()?;
                let label = labels.remove(&stream).map(Arc::from);
                Some((
                    Arc::<str>::from(stream),
                    Cursor {
                        generation: 0,
                        position,
                        label,
                    },
                ))
            })
            .collect();
        let session = Arc::new(LiveSession::new(
            id.to_owned(),
            principal.clone(),
            Some(proof),
            subscriptions,
            stored.last_close,
        ));
        // Take it over in the store before answering: from here on, a save of any earlier
        // hold (one that let go too late, or one on another node) is refused. Saved with the
        // other resumes' take-overs in one call (`TakeOvers`); answered once it is in the store.
        if let Some(record) = session.record(self.ttl, true)
            && !self.take_overs.save(record).await?
        {
            // A take-over replaces whatever holder wrote the record: a store refusing one
            // breaks its contract. Not answered as restored: its saves would all be refused.
            return Err(EngineError::unavailable(
                "the session store refused to hand the session over",
            ));
        }
        self.live.lock().insert(id.to_owned(), session.clone());
        Ok(Ok(Restored { session, principal }))
    }

    /// Disconnects the connection holding session `id` on this node (an operator's
    /// `DELETE /v1/sessions/{id}`) and forgets the session, held or not, so it cannot be
    /// resumed. Whether a connection held it here.
    pub async fn disconnect(&self, id: &str) -> Result<bool, EngineError> {
        let held = self.live.lock().get(id).cloned();
        if let Some(s) = &held {
            s.disconnected.cancel();
            let _ = tokio::time::timeout(TAKEOVER_WAIT, s.released.wait()).await;
        }
        self.store.delete_session(id).await?;
        Ok(held.is_some())
    }

    /// Disconnects every connection on this node whose session belongs to the token subject
    /// `subject` (an operator's `POST /v1/identities/{subject}/disconnect`) and forgets those
    /// sessions. How many were disconnected.
    pub async fn disconnect_identity(&self, subject: &str) -> Result<usize, EngineError> {
        let held: Vec<Arc<LiveSession>> = self
            .live
            .lock()
            .values()
            .filter(|s| s.inner.lock().principal.subject() == Some(subject))
            .cloned()
            .collect();
        for s in &held {
            self.disconnect(&s.id).await?;
        }
        Ok(held.len())
    }

    /// How many sessions connections hold on this node, for `/metrics`.
    pub fn live_count(&self) -> usize {
        self.live.lock().len()
    }

    /// The connection holding `session` ended: save it and let go of it.
    pub async fn release(&self, session: &Arc<LiveSession>) {
        let saving = self.saving.lock().await;
        if session.disconnected.is_cancelled() {
            // Disconnected by an operator: the session is forgotten, not saved again.
            drop(saving);
            let _ = self.store.delete_session(&session.id).await;
            let mut live = self.live.lock();
            if live
                .get(&session.id)
                .is_some_and(|held| Arc::ptr_eq(held, session))
            {
                live.remove(&session.id);
            }
            drop(live);
            session.released.set();
            return;
        }
        // A connection on this node that took the session over holds it now (and has taken it
        // over in the store): nothing of this one's is saved (the store would refuse it).
        let succeeded = self
            .live
            .lock()
            .get(&session.id)
            .is_some_and(|held| !Arc::ptr_eq(held, session));
        if succeeded {
            session.inner.lock().superseded = true;
        }
        if let Some(record) = session.record(self.ttl, false) {
            match self.store.save_sessions(vec![record]).await {
                Ok(superseded) if !superseded.is_empty() => session.supersede(),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "could not save a session on disconnect"),
            }
        }
        drop(saving);
        {
            let mut live = self.live.lock();
            if live
                .get(&session.id)
                .is_some_and(|held| Arc::ptr_eq(held, session))
            {
                live.remove(&session.id);
            }
        }
        session.released.set();
    }

    /// Saves every live session that is due, in one call to the session store.
    pub async fn flush(&self) {
        let _saving = self.saving.lock().await;
        let due: Vec<Arc<LiveSession>> = self
            .live
            .lock()
            .values()
            .filter(|s| s.due(self.ttl))
            .cloned()
            .collect();
        let records: Vec<SessionRecord> = due
            .iter()
            .filter_map(|s| s.record(self.ttl, false))
            .collect();
        if records.is_empty() {
            return;
        }
        let n = records.len();
        match self.store.save_sessions(records).await {
            Ok(superseded) => {
                for id in superseded {
                    if let Some(s) = due.iter().find(|s| s.id == id) {
                        tracing::debug!(
                            "a session was taken over elsewhere; its connection here ends"
                        );
                        s.supersede();
                    }
                }
            }
            // At the session limit the store saved every session it already held and left
            // only new ones unsaved: retrying the whole batch each second would only repeat
            // that. A session left out is tried again when it next changes.
            Err(e @ spool_engine::EngineError::Limit(_)) => {
                tracing::warn!(error = %e, sessions = n, "session limit reached: new sessions are not saved (clients cannot resume them)");
            }
            Err(e) => {
                tracing::warn!(error = %e, sessions = n, "could not save sessions; will retry");
                for s in due {
                    s.inner.lock().dirty = true;
                }
            }
        }
    }

    /// Saves changed sessions every second until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.flush().await,
            }
        }
    }
}

/// A fresh session id: 192 random bits, base64url without padding.
fn new_id() -> String {
    use rand::Rng as _;
    let mut bytes = [0u8; ID_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuthConfig;
    use spool_engine::MemoryEngine;

    fn sessions() -> Sessions {
        Sessions::new(
            Arc::new(MemoryEngine::new(Default::default())),
            Duration::from_secs(60),
        )
    }

    fn auth_with(api_key: &str, secret: &str, anonymous: bool) -> Authenticator {
        Authenticator::new(&AuthConfig {
            api_keys: vec![api_key.into()],
            jwt_secret: Some(secret.into()),
            allow_anonymous: anonymous,
            ..AuthConfig::default()
        })
    }

    fn auth() -> Authenticator {
        auth_with("k1", "s3cret", false)
    }

    /// A token for `sub` expiring `exp_in` seconds from now, signed with `secret`.
    fn token(sub: &str, exp_in: i64, secret: &str) -> String {
        let exp = now_ms() as i64 / 1000 + exp_in;
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"sub": sub, "exp": exp, "subscribe": ["*"]}),
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn user(sub: &str) -> (Principal, Proof) {
        auth().verify_with_proof(&token(sub, 60, "s3cret")).unwrap()
    }

    fn creds(c: &(Principal, Proof)) -> Option<(&Principal, &Proof)> {
        Some((&c.0, &c.1))
    }

    #[test]
    fn ids_are_long_random_and_url_safe() {
        let a = new_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, new_id());
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }

    #[tokio::test]
    async fn a_released_session_resumes_with_its_positions() {
        let s = sessions();
        let (principal, proof) = user("u1");
        let live = s.create(principal.clone(), proof);
        let p: Position = "ep:3".parse().unwrap();
        live.subscribe("a".into(), 1, "ep:0".parse().unwrap(), None);
        live.delivered(&mut vec![
            ("a".into(), 1, p.clone()),
            ("a".into(), 0, "ep:9".parse().unwrap()), // a stale generation: ignored
        ]);
        s.release(&live).await;
        let restored = s.restore(&live.id, None, &auth()).await.unwrap().unwrap();
        assert_eq!(restored.session.subscriptions(), vec![("a".into(), p)]);
        assert_eq!(restored.principal, principal);
    }

    #[tokio::test]
    async fn restore_refuses_other_identities_and_forgeries() {
        let s = sessions();
        let (principal, proof) = user("u1");
        let live = s.create(principal, proof);
        s.release(&live).await;
        let other = user("u2");
        assert_eq!(
            s.restore(&live.id, creds(&other), &auth())
                .await
                .unwrap()
                .err(),
            Some(NotRestored::OtherIdentity)
        );
        for forged in ["", "nope", "../../etc", &"x".repeat(100)] {
            assert_eq!(
                s.restore(forged, None, &auth()).await.unwrap().err(),
                Some(NotRestored::Unknown)
            );
        }
    }

    #[tokio::test]
    async fn an_expired_credential_needs_a_fresh_token() {
        let s = sessions();
        let (mut expired, proof) = user("u1");
        if let Principal::Token { expires_at, .. } = &mut expired {
            *expires_at = Some(now_ms() - 1);
        }
        let live = s.create(expired, proof);
        s.release(&live).await;
        assert_eq!(
            s.restore(&live.id, None, &auth()).await.unwrap().err(),
            Some(NotRestored::CredentialExpired)
        );
        assert!(
            s.restore(&live.id, creds(&user("u1")), &auth())
                .await
                .unwrap()
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_credential_the_configuration_no_longer_accepts_resumes_nothing() {
        let s = sessions();
        let by_key = auth().verify_with_proof("k1").unwrap();
        let by_token = user("u1");
        let anonymous = (Principal::Anonymous, Proof::Anonymous);
        let mut ids = Vec::new();
        for c in [&by_key, &by_token, &anonymous] {
            let live = s.create(c.0.clone(), c.1.clone());
            s.release(&live).await;
            ids.push(live.id.clone());
        }
        // The same configuration (anonymous allowed) resumes all three.
        let same = auth_with("k1", "s3cret", true);
        for id in &ids {
            assert!(s.restore(id, None, &same).await.unwrap().is_ok(), "{id}");
        }
        // A rotated key, a rotated secret, anonymous access off: none.
        let rotated = auth_with("k2", "other", false);
        for id in &ids {
            let refused = s.restore(id, None, &rotated).await.unwrap().err();
            assert_eq!(refused, Some(NotRestored::CredentialRevoked), "{id}");
        }
        // With a valid credential of the same identity, they do.
        let new_key = rotated.verify_with_proof("k2").unwrap();
        assert!(
            s.restore(&ids[0], creds(&new_key), &rotated)
                .await
                .unwrap()
                .is_ok()
        );
        // The proof is not in the Debug output.
        let text = format!("{:?} {:?}", by_key.1, by_token.1);
        assert!(!text.contains("k1") && !text.contains("eyJ"), "{text}");
    }

    /// The connection holding a session lets go of it only after `TAKEOVER_WAIT` (its socket
    /// blocked): the resume goes ahead without it, and the old connection's late save must
    /// not bring back what the new one changed.
    #[tokio::test]
    async fn a_late_release_does_not_overwrite_the_new_holder() {
        let s = sessions();
        let (principal, proof) = user("u1");
        let old = s.create(principal, proof);
        old.subscribe("a".into(), 1, "ep:0".parse().unwrap(), None);
        old.subscribe("x".into(), 2, "ep:0".parse().unwrap(), None);
        old.delivered(&mut vec![("a".into(), 1, "ep:3".parse().unwrap())]);
        s.flush().await;
        // Nothing releases `old` meanwhile: the resume waits TAKEOVER_WAIT, then goes ahead.
        let new = s
            .restore(&old.id, creds(&user("u1")), &auth())
            .await
            .unwrap()
            .unwrap()
            .session;
        assert!(old.taken_over.is_cancelled());
        new.unsubscribe("x");
        new.subscribe("b".into(), 3, "ep:0".parse().unwrap(), None);
        new.delivered(&mut vec![("a".into(), 0, "ep:6".parse().unwrap())]);
        s.release(&new).await;
        // The old connection ends at last, with what it had.
        old.delivered(&mut vec![("a".into(), 1, "ep:4".parse().unwrap())]);
        s.release(&old).await;
        let third = s
            .restore(&old.id, None, &auth())
            .await
            .unwrap()
            .unwrap()
            .session;
        assert_eq!(
            third.subscriptions(),
            vec![
                ("a".into(), "ep:6".parse().unwrap()),
                ("b".into(), "ep:0".parse().unwrap())
            ]
        );
    }

    /// Another node took the session over (its record was written by another holder): the
    /// next save here is refused and the connection told it was taken over.
    #[tokio::test]
    async fn a_session_taken_over_elsewhere_is_told_at_its_next_save() {
        let store = Arc::new(MemoryEngine::new(Default::default()));
        let here = Sessions::new(store.clone(), Duration::from_secs(60));
        let there = Sessions::new(store, Duration::from_secs(60));
        let (principal, proof) = user("u1");
        let old = here.create(principal, proof);
        old.subscribe("a".into(), 1, "ep:0".parse().unwrap(), None);
        here.flush().await;
        let new = there
            .restore(&old.id, None, &auth())
            .await
            .unwrap()
            .unwrap()
            .session;
        new.subscribe("b".into(), 1, "ep:0".parse().unwrap(), None);
        there.flush().await;
        assert!(!old.taken_over.is_cancelled());
        old.delivered(&mut vec![("a".into(), 1, "ep:5".parse().unwrap())]);
        here.flush().await;
        assert!(old.taken_over.is_cancelled(), "told it was taken over");
        here.release(&old).await;
        there.release(&new).await;
        let names: Vec<_> = there
            .restore(&old.id, None, &auth())
            .await
            .unwrap()
            .unwrap()
            .session
            .subscriptions()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(names, vec![Arc::<str>::from("a"), Arc::from("b")]);
    }

    /// A session store that counts its `save_sessions` calls, each taking `delay` (an fsync),
    /// and checks that no call names one session twice.
    struct Counting {
        inner: Arc<MemoryEngine>,
        delay: Duration,
        calls: std::sync::atomic::AtomicUsize,
        largest: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl SessionStore for Counting {
        async fn save_sessions(
            &self,
            sessions: Vec<SessionRecord>,
        ) -> Result<Vec<String>, EngineError> {
            use std::sync::atomic::Ordering::Relaxed;
            self.calls.fetch_add(1, Relaxed);
            self.largest.fetch_max(sessions.len(), Relaxed);
            let ids: HashSet<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
            assert_eq!(ids.len(), sessions.len(), "one session twice in a call");
            tokio::time::sleep(self.delay).await;
            self.inner.save_sessions(sessions).await
        }

        async fn load_session(&self, id: &str) -> Result<Option<Bytes>, EngineError> {
            self.inner.load_session(id).await
        }

        async fn delete_session(&self, id: &str) -> Result<(), EngineError> {
            self.inner.delete_session(id).await
        }
    }

    fn counting(inner: Arc<MemoryEngine>, delay: Duration) -> Arc<Counting> {
        Arc::new(Counting {
            inner,
            delay,
            calls: Default::default(),
            largest: Default::default(),
        })
    }

    /// A reconnect storm on another node: 200 resumes at once share a few store calls, each is
    /// restored with its own state, and every old holder's next save is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_take_overs_share_store_calls() {
        use std::sync::atomic::Ordering::Relaxed;
        let memory = Arc::new(MemoryEngine::new(Default::default()));
        let here = Sessions::new(memory.clone(), Duration::from_secs(60));
        let store = counting(memory, Duration::from_millis(20));
        let there = Arc::new(Sessions::new(store.clone(), Duration::from_secs(60)));
        let (principal, proof) = user("u1");
        let old: Vec<_> = (0..200)
            .map(|i| {
                let s = here.create(principal.clone(), proof.clone());
                s.subscribe(format!("s{i}").into(), 1, "ep:0".parse().unwrap(), None);
                s
            })
            .collect();
        here.flush().await;
        let resumes: Vec<_> = old
            .iter()
            .map(|s| {
                let (there, id) = (there.clone(), s.id.clone());
                tokio::spawn(async move { there.restore(&id, None, &auth()).await })
            })
            .collect();
        for (i, resume) in resumes.into_iter().enumerate() {
            let restored = resume.await.unwrap().unwrap().unwrap().session;
            let names: Vec<_> = restored
                .subscriptions()
                .into_iter()
                .map(|(s, _)| s)
                .collect();
            assert_eq!(names, vec![Arc::<str>::from(format!("s{i}"))]);
        }
        let calls = store.calls.load(Relaxed);
        eprintln!(
            "200 take-overs: {calls} store calls, the largest of {}",
            store.largest.load(Relaxed)
        );
        assert!(calls <= 40, "{calls} store calls for 200 take-overs");
        // Every old holder's next save is refused, and its connection told.
        for s in &old {
            s.set_last_close("late");
        }
        here.flush().await;
        assert!(old.iter().all(|s| s.taken_over.is_cancelled()));
    }

    /// Two resumes of one session racing go in separate calls (the store checks it), and a
    /// resume dropped while waiting strands nobody.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_and_dropped_take_overs() {
        let memory = Arc::new(MemoryEngine::new(Default::default()));
        let here = Sessions::new(memory.clone(), Duration::from_secs(60));
        let store = counting(memory, Duration::from_millis(50));
        let there = Arc::new(Sessions::new(store.clone(), Duration::from_secs(60)));
        let (principal, proof) = user("u1");
        let ids: Vec<String> = (0..20)
            .map(|_| here.create(principal.clone(), proof.clone()).id.clone())
            .collect();
        here.flush().await;
        let mut resumes = Vec::new();
        for id in ids.iter().chain(ids.iter().take(3)) {
            let (there, id) = (there.clone(), id.clone());
            resumes.push(tokio::spawn(async move {
                there.restore(&id, None, &auth()).await
            }));
        }
        // Drop some while their records are pending or in a call.
        tokio::time::sleep(Duration::from_millis(5)).await;
        for r in resumes.iter().skip(10).take(5) {
            r.abort();
        }
        let deadline = Duration::from_secs(10);
        for (i, r) in resumes.into_iter().enumerate() {
            match tokio::time::timeout(deadline, r)
                .await
                .expect("a resume stranded")
            {
                Ok(done) => assert!(done.unwrap().is_ok(), "resume {i}"),
                Err(e) => assert!(e.is_cancelled() && (10..15).contains(&i), "resume {i}"),
            }
        }
        // A later resume goes through too.
        assert!(there.restore(&ids[0], None, &auth()).await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_live_session_is_taken_over() {
        let s = Arc::new(sessions());
        let (principal, proof) = user("u1");
        let live = s.create(principal, proof);
        let holder = live.clone();
        let s2 = s.clone();
        let waiter = tokio::spawn(async move {
            holder.taken_over.cancelled().await;
            s2.release(&holder).await;
        });
        let restored = s
            .restore(&live.id, creds(&user("u1")), &auth())
            .await
            .unwrap();
        assert!(restored.is_ok());
        waiter.await.unwrap();
    }
}
