//! Session records (SPEC §3) in a JetStream KV bucket, `<prefix>_sessions`, so a client can
//! resume on any node.
//!
//! One key per session (the id, see [`names::session_key`]), history 1, and the bucket's
//! `max_age` as a backstop that forgets records nobody deleted. A value is the record's
//! expiry (8 bytes, big-endian ms since the Unix epoch) then its data; a load checks the
//! expiry, since a record usually expires long before the bucket would drop it.
//!
//! Writes are publishes to the bucket's subjects (pipelined: a batch of sessions costs one
//! round trip, not one each). Each carries the holder that wrote it (header
//! `Spool-Session-Holder`): a save that does not take the session over first reads the key's
//! last message (one more round trip, concurrent for the batch) and is refused if another
//! holder wrote it, then publishes with `Nats-Expected-Last-Subject-Sequence` naming that
//! message, so JetStream refuses it if anything reached the key since (a take-over racing
//! it): a connection whose session was taken over on any node never overwrites its
//! successor's record. (A JetStream cluster of nats-server before 2.9.21 checks that header
//! only before the Raft proposal, nats-io/nats-server#4320: there a stale save racing a
//! take-over within the same instant may still land; see `groups.rs`.) Loads ask the stream's leader for the key's last message, not a
//! replica by direct get, so a session saved on one node is seen by the next load on any node
//! even while a replica lags.

use async_nats::{
    HeaderMap,
    jetstream::{
        context::{PublishAckFuture, PublishErrorKind},
        stream::{Config, DiscardPolicy},
    },
};
use bytes::{BufMut, Bytes, BytesMut};
use spool_engine::{EngineError, Limit, SessionRecord};

use crate::{config::NatsConfig, jetstream::Api, names};

const KV_OPERATION: &str = "KV-Operation";
/// The holder that wrote a record (`SessionRecord::holder`, decimal).
const HOLDER: &str = "Spool-Session-Holder";
/// Holder checks of one save in flight at once.
const CHECKS_IN_FLIGHT: usize = 64;

/// What a save of one record publishes with.
enum Check {
    /// Whatever the key holds (a take-over).
    Any,
    /// Only if the key's last message is still this one (0: none).
    After(u64),
    /// Refused: another holder wrote the record.
    Superseded,
}

pub(crate) struct Sessions {
    api: Api,
    bucket: String,
    /// The JetStream stream behind the bucket, `KV_<bucket>`, configured as async-nats would
    /// configure a KV bucket (its KV helpers ask for account info in a form a 2.9 server does
    /// not answer, so the engine makes the stream itself).
    config: Config,
}

impl Sessions {
    /// Opens the bucket, creating it (or updating its limits) as needed.
    pub async fn open(api: Api, config: &NatsConfig) -> Result<Self, EngineError> {
        let bucket = format!("{}_sessions", config.prefix);
        let sessions = Self {
            config: Config {
                name: format!("KV_{bucket}"),
                description: Some("Spool sessions".into()),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age: config.session_max_age,
                storage: config.storage(),
                num_replicas: config.replicas,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: DiscardPolicy::New,
                ..Default::default()
            },
            bucket,
            api,
        };
        sessions.create_bucket().await?;
        Ok(sessions)
    }

    async fn create_bucket(&self) -> Result<(), EngineError> {
        self.api
            .open(
                &self.config,
                &format!("the sessions bucket {}", self.bucket),
            )
            .await
    }

    fn subject(&self, id: &str) -> String {
        format!("$KV.{}.{}", self.bucket, names::session_key(id))
    }

    pub async fn save(
        &self,
        records: &[SessionRecord],
        now: u64,
    ) -> Result<Vec<String>, EngineError> {
        match self.save_once(records, now).await {
            Err(NoResponders) => {
                // Nothing took the writes. Only when JetStream says the bucket is gone (the
                // NATS servers lost their data) is it made again, once; otherwise it has no
                // leader right now and the server retries the batch later.
                self.gone().await?;
                tracing::warn!(bucket = %self.bucket, "the sessions bucket is gone; creating it again");
                self.create_bucket().await?;
                self.save_once(records, now)
                    .await
                    .map_err(|_| no_leader(&self.bucket))?
            }
            Ok(done) => done,
        }
    }

    /// `Ok` when JetStream says the bucket does not exist; `Unavailable` when it does (it has
    /// no leader right now: an election) or JetStream does not answer.
    async fn gone(&self) -> Result<(), EngineError> {
        let deadline = tokio::time::Instant::now() + self.api.timeout;
        if self.api.exists(&self.config.name, deadline).await? {
            return Err(no_leader(&self.bucket));
        }
        Ok(())
    }

    /// `Err(NoResponders)` when nothing took a write (the bucket is gone or has no leader). A record too large for NATS is skipped
    /// (and reported as `Limit`) rather than failing the records after it: the server
    /// retries a failed batch whole, so one oversized session would otherwise keep every
    /// session batched with it from ever being saved.
    async fn save_once(
        &self,
        records: &[SessionRecord],
        now: u64,
    ) -> Result<Result<Vec<String>, EngineError>, NoResponders> {
        // The holder checks (a read of each key's last message), at most CHECKS_IN_FLIGHT at once:
        // a node saving thousands of sessions does not send thousands of requests together.
        let mut checks = Vec::with_capacity(records.len());
        for chunk in records.chunks(CHECKS_IN_FLIGHT) {
            checks
                .extend(futures::future::join_all(chunk.iter().map(|r| self.check(r, now))).await);
        }
        let mut superseded = Vec::new();
        let mut acks: Vec<(&str, PublishAckFuture)> = Vec::with_capacity(records.len());
        let mut oversized = None;
        for (record, check) in records.iter().zip(checks) {
            let mut headers = HeaderMap::new();
            headers.insert(HOLDER, record.holder.to_string().as_str());
            match check {
                Ok(Check::Any) => {}
                Ok(Check::After(sequence)) => headers.insert(
                    "Nats-Expected-Last-Subject-Sequence",
                    sequence.to_string().as_str(),
                ),
                Ok(Check::Superseded) => {
                    superseded.push(record.id.clone());
                    continue;
                }
                Err(e) => return Ok(Err(e)),
            }
            let mut value = BytesMut::with_capacity(8 + record.data.len());
            value.put_u64(record.expires_at);
            value.put_slice(&record.data);
            match self
                .api
                .js
                .publish_with_headers(self.subject(&record.id), headers, value.freeze())
                .await
            {
                Ok(ack) => acks.push((&record.id, ack)),
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    oversized.get_or_insert_with(|| {
                        EngineError::Limit(Limit::SessionTooLarge {
                            id: record.id.clone(),
                            size: record.data.len(),
                            store: "NATS",
                            source: Some(std::sync::Arc::new(e)),
                        })
                    });
                }
                Err(e) => return Ok(Err(publish_error(&e))),
            }
        }
        for (id, ack) in acks {
            match ack.await {
                Ok(_) => {}
                // Something reached the key after the message checked: a take-over.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    superseded.push(id.to_owned());
                }
                // async-nats's name for NATS's "no responders".
                Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                    return Err(NoResponders);
                }
                Err(e) => return Ok(Err(publish_error(&e))),
            }
        }
        Ok(oversized.map_or(Ok(superseded), Err))
    }

    /// What a save of `record` publishes with: a take-over anything; another save only after
    /// the key's last message, if that one is its own holder's, absent, deleted or expired.
    async fn check(&self, record: &SessionRecord, now: u64) -> Result<Check, EngineError> {
        if record.take_over {
            return Ok(Check::Any);
        }
        let Some(last) = self
            .api
            .get_last(&self.config.name, &self.subject(&record.id))
            .await?
        else {
            return Ok(Check::After(0));
        };
        let deleted = last.headers.get(KV_OPERATION).is_some();
        let expired = last
            .payload
            .first_chunk::<8>()
            .is_none_or(|at| u64::from_be_bytes(*at) <= now);
        // A record without a holder was written before records named one: no one's.
        let holder = last
            .headers
            .get(HOLDER)
            .and_then(|h| h.as_str().parse::<u64>().ok());
        Ok(if deleted || expired || holder == Some(record.holder) {
            Check::After(last.sequence)
        } else {
            Check::Superseded
        })
    }

    pub async fn load(&self, id: &str, now: u64) -> Result<Option<Bytes>, EngineError> {
        let Some(message) = self
            .api
            .get_last(&self.config.name, &self.subject(id))
            .await?
        else {
            return Ok(None);
        };
        if message.headers.get(KV_OPERATION).is_some() {
            // A delete or purge marker.
            return Ok(None);
        }
        let Some((expires_at, data)) = message.payload.split_first_chunk::<8>() else {
            return Err(EngineError::internal(format!(
                "session record {id:?} is {} bytes, too short to hold its expiry",
                message.payload.len()
            )));
        };
        if u64::from_be_bytes(*expires_at) <= now {
            return Ok(None);
        }
        Ok(Some(message.payload.slice(8..8 + data.len())))
    }

    pub async fn delete(&self, id: &str) -> Result<(), EngineError> {
        let mut headers = HeaderMap::new();
        headers.insert(KV_OPERATION, "DEL");
        let ack = self
            .api
            .js
            .publish_with_headers(self.subject(id), headers, Bytes::new())
            .await
            .map_err(|e| publish_error(&e))?;
        match ack.await {
            Ok(_) => Ok(()),
            // No bucket, no session: deleted already. But "no responders" is also what a
            // bucket without a leader (an election) answers; then the record is still there.
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => self.gone().await,
            Err(e) => Err(publish_error(&e)),
        }
    }
}

struct NoResponders;

fn no_leader(bucket: &str) -> EngineError {
    EngineError::unavailable(format!(
        "the sessions bucket {bucket} takes no writes right now (no leader: an election is under \
         way, or its servers are unreachable)"
    ))
}

fn publish_error(e: &async_nats::jetstream::context::PublishError) -> EngineError {
    EngineError::unavailable(format!("cannot write a session record to NATS: {e}"))
}
