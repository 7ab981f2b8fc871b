//! The few JetStream API calls the engine makes, with their failures sorted into
//! [`EngineError`]s.
//!
//! They go through [`Context::request`] with our own response types rather than the typed
//! helpers of async-nats, because those fold "the server did not answer" and "the answer did
//! not parse" into one error kind, and the engine must tell an outage (`Unavailable`, retry
//! later) from corrupt data (`Internal`).
//!
//! Messages are read with `STREAM.MSG.GET`, which the stream's leader answers with the stored
//! message as JSON (headers and body in base64), not with direct get. Two reasons: a direct
//! get may be answered by a replica that has not caught up yet, which would show a hole inside
//! the range the leader just reported as retained; and a direct-get reply carries the stored
//! headers as protocol headers, so a malformed header block written by some other client would
//! make async-nats drop the whole connection on every read of it, where here it is just a
//! message that does not decode.
//!
//! For the same reason a stream's info is taken only from its leader (see [`from_leader`]):
//! in a JetStream cluster other replicas answer `STREAM.INFO` at times, with a state that may
//! lack acked messages, and a head behind what a reader already got reads as lost history.
//! Only JetStream's own "stream not found" means a stream is gone; no answer, "no responders"
//! or a refusal is `Unavailable`.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self, Context, ErrorCode,
    context::{RequestError, RequestErrorKind},
    message::StreamMessage,
    response::Response,
    stream::{Config, Info, RawMessage},
};
use async_nats::subject::ToSubject;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::json;
use spool_core::Offset;
use spool_engine::{EngineError, Limit};
use tokio::time::Instant;

use crate::config::same_limits;

/// JetStream error codes the engine acts on.
const STREAM_NOT_FOUND: ErrorCode = ErrorCode::STREAM_NOT_FOUND;
const STREAM_NAME_EXIST: ErrorCode = ErrorCode::STREAM_NAME_EXIST;
/// "subjects overlap with an existing stream": a stream's subjects are its name's own, so this
/// is the same stream being created by another node at this moment (JetStream 2.9 answers so
/// while that creation is in flight).
const STREAM_SUBJECT_OVERLAP: ErrorCode = ErrorCode::STREAM_SUBJECT_OVERLAP;
const NO_MESSAGE_FOUND: ErrorCode = ErrorCode::NO_MESSAGE_FOUND;
/// "maximum number of streams reached" (account limit).
const MAXIMUM_STREAMS_LIMIT: ErrorCode = ErrorCode(10027);

/// What a `STREAM.MSG.GET` found ([`Api::msg_get`]).
pub(crate) enum Got {
    Message(StreamMessage),
    /// JetStream holds no such message.
    NoMessage,
    /// JetStream says the stream does not exist.
    NoStream,
}

/// A JetStream context and the timeout it runs with (for error messages).
#[derive(Clone)]
pub(crate) struct Api {
    pub js: Context,
    pub timeout: Duration,
}

#[derive(Deserialize)]
struct AccountInfo {
    #[serde(default)]
    #[allow(dead_code)]
    streams: u64,
}

#[derive(Deserialize)]
struct StreamList {
    #[serde(default)]
    total: usize,
    /// `null` on an empty page.
    #[serde(default)]
    streams: Option<Vec<Info>>,
}

#[derive(Deserialize)]
struct Success {
    #[serde(default)]
    success: bool,
}

#[derive(Deserialize)]
struct MsgGet {
    message: RawMessage,
}

impl Api {
    /// The stream's info as its leader reports it, or `None` when JetStream says the stream
    /// does not exist. An answer from another replica (see [`from_leader`]) is not taken: the
    /// request is repeated for a moment (the leader's own answer races it), then the call fails
    /// with `Unavailable` — a replica's older head must never reach a reader, which would take
    /// it for lost history.
    pub async fn info(&self, stream: &str) -> Result<Option<Info>, EngineError> {
        self.info_or_not_found(stream, true).await
    }

    /// [`Api::info`]; with `confirm` false, a first "not found" is believed at once — for a
    /// stream the caller already takes to be missing, where a wrong answer only keeps it so a
    /// moment longer (no reader is moved off a history by it).
    pub async fn info_or_not_found(
        &self,
        stream: &str,
        confirm: bool,
    ) -> Result<Option<Info>, EngineError> {
        let deadline = Instant::now() + self.timeout;
        let mut pause = Duration::from_millis(20);
        let mut not_found = !confirm;
        loop {
            match self.info_within(stream, deadline).await? {
                Some(info) if from_leader(&info) => return Ok(Some(info)),
                Some(info) => {
                    if Instant::now() + pause >= deadline {
                        return Err(not_from_leader(stream, &info));
                    }
                }
                // "Not found" is definite from JetStream's meta leader, but a member still
                // recovering the stream answers so too, racing the leader's answer: believe it
                // when it comes twice.
                None if not_found || Instant::now() + pause >= deadline => return Ok(None),
                None => not_found = true,
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Whether JetStream has the stream, as any replica says. `false` only on JetStream's own
    /// "stream not found"; no answer is an error, never "gone".
    pub async fn exists(&self, stream: &str, deadline: Instant) -> Result<bool, EngineError> {
        Ok(self.info_within(stream, deadline).await?.is_some())
    }

    /// One `STREAM.INFO`, answered by whichever server JetStream lets answer, by `deadline`.
    async fn info_within(
        &self,
        stream: &str,
        deadline: Instant,
    ) -> Result<Option<Info>, EngineError> {
        let what = "reading a stream's state";
        let response: Response<Info> = self
            .request_until(deadline, what, format!("STREAM.INFO.{stream}"), &json!({}))
            .await?;
        match response {
            Response::Ok(info) => Ok(Some(info)),
            Response::Err { error } if error.error_code() == STREAM_NOT_FOUND => Ok(None),
            Response::Err { error } => Err(api_error(what, error)),
        }
    }

    /// Creates the stream; an identical one already there is success (JetStream answers with
    /// its info). One with another configuration — made by another node in another epoch (the
    /// description names it), or with other limits (retention changed since) — is taken as it
    /// is, which settles the race of two nodes creating it at once: its description, and so
    /// its epoch, is never changed; only limits that differ from `config`'s are updated.
    pub async fn create(&self, config: &Config) -> Result<Info, EngineError> {
        let what = "creating a stream";
        let response: Response<Info> = self
            .request(what, format!("STREAM.CREATE.{}", config.name), config)
            .await?;
        match response {
            Response::Ok(info) if from_leader(&info) => Ok(info),
            // The stream was there already and a replica answered for it: ask its leader.
            Response::Ok(_) => self.leader_info(&config.name).await,
            Response::Err { error }
                if error.error_code() == STREAM_NAME_EXIST
                    || error.error_code() == STREAM_SUBJECT_OVERLAP =>
            {
                let info = self.leader_info(&config.name).await?;
                if same_limits(&info.config, config) {
                    return Ok(info);
                }
                let keep = Config {
                    description: info.config.description.clone(),
                    ..config.clone()
                };
                self.update(&keep).await
            }
            Response::Err { error } => Err(api_error(what, error)),
        }
    }

    /// [`Api::create`] for a stream of the engine's own (the groups' stream, the sessions'
    /// bucket): any failure is `Unavailable`, "cannot open `what`".
    pub async fn open(&self, config: &Config, what: &str) -> Result<(), EngineError> {
        self.create(config)
            .await
            .map(|_| ())
            .map_err(|e| EngineError::unavailable_from(format!("cannot open {what}"), e))
    }

    /// The info of a stream that was just created or updated, from its leader.
    async fn leader_info(&self, stream: &str) -> Result<Info, EngineError> {
        self.info(stream).await?.ok_or_else(|| {
            EngineError::unavailable(format!(
                "JetStream stream {stream} vanished while being created"
            ))
        })
    }

    async fn update(&self, config: &Config) -> Result<Info, EngineError> {
        let what = "updating a stream's limits";
        let response: Response<Info> = self
            .request(what, format!("STREAM.UPDATE.{}", config.name), config)
            .await?;
        match response {
            Response::Ok(info) => {
                tracing::info!(stream = %config.name, "updated the JetStream stream's limits");
                if from_leader(&info) {
                    Ok(info)
                } else {
                    self.leader_info(&config.name).await
                }
            }
            Response::Err { error } => {
                // A change JetStream will not make (e.g. another storage type): keep the stream
                // as it is rather than fail every request on it.
                tracing::warn!(
                    stream = %config.name, %error,
                    "the JetStream stream's configuration differs from Spool's and cannot be updated; using it as it is"
                );
                self.leader_info(&config.name).await
            }
        }
    }

    /// The message at `offset`, or `None` when the stream does not hold it (never stored,
    /// removed by retention, or the stream is gone).
    pub async fn get(
        &self,
        stream: &str,
        offset: Offset,
    ) -> Result<Option<StreamMessage>, EngineError> {
        let message = self
            .get_message(stream, json!({ "seq": offset.get() }))
            .await?;
        if let Some(m) = &message
            && m.sequence != offset.get()
        {
            return Err(EngineError::internal(format!(
                "asked JetStream stream {stream} for message {offset}, got {}",
                m.sequence
            )));
        }
        Ok(message)
    }

    /// The newest message on `subject`, or `None`.
    pub async fn get_last(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<Option<StreamMessage>, EngineError> {
        self.get_message(stream, json!({ "last_by_subj": subject }))
            .await
    }

    async fn get_message(
        &self,
        stream: &str,
        request: serde_json::Value,
    ) -> Result<Option<StreamMessage>, EngineError> {
        Ok(
            match self.msg_get(stream, request, "reading a message").await? {
                Got::Message(message) => Some(message),
                Got::NoMessage | Got::NoStream => None,
            },
        )
    }

    /// One `STREAM.MSG.GET` on `stream` (`what` says what it reads, in errors); the caller
    /// tells "no such message" from "no such stream".
    pub async fn msg_get(
        &self,
        stream: &str,
        request: serde_json::Value,
        what: &str,
    ) -> Result<Got, EngineError> {
        let response: Response<MsgGet> = self
            .request(what, format!("STREAM.MSG.GET.{stream}"), &request)
            .await?;
        match response {
            Response::Ok(got) => StreamMessage::try_from(got.message)
                .map(Got::Message)
                .map_err(|e| EngineError::Internal {
                    what: format!(
                        "a message of JetStream stream {stream} ({request}) does not decode"
                    ),
                    source: Some(Arc::from(e)),
                }),
            Response::Err { error } if error.error_code() == NO_MESSAGE_FOUND => Ok(Got::NoMessage),
            Response::Err { error } if error.error_code() == STREAM_NOT_FOUND => Ok(Got::NoStream),
            Response::Err { error } => Err(api_error(what, error)),
        }
    }

    /// One page of `STREAM.LIST` (the infos of the streams with a subject matching
    /// `subject`, from the `offset`th on; JetStream answers up to 256 a page) and the total.
    pub async fn list_page(
        &self,
        subject: &str,
        offset: usize,
    ) -> Result<(Vec<Info>, usize), EngineError> {
        let what = "listing streams";
        let response: Response<StreamList> = self
            .request(
                what,
                "STREAM.LIST",
                &json!({ "offset": offset, "subject": subject }),
            )
            .await?;
        match response {
            Response::Ok(list) => Ok((list.streams.unwrap_or_default(), list.total)),
            Response::Err { error } => Err(api_error(what, error)),
        }
    }

    /// Deletes a stream; false when JetStream does not hold it.
    pub async fn delete(&self, stream: &str) -> Result<bool, EngineError> {
        let what = "deleting a stream";
        let response: Response<Success> = self
            .request(what, format!("STREAM.DELETE.{stream}"), &json!({}))
            .await?;
        match response {
            Response::Ok(done) => Ok(done.success),
            Response::Err { error } if error.error_code() == STREAM_NOT_FOUND => Ok(false),
            Response::Err { error } => Err(api_error(what, error)),
        }
    }

    /// Drops the stream's messages before sequence `keep` (JetStream 2.9's purge with `seq`:
    /// the messages from `keep` on stay, and so does the last sequence while `keep` is at most
    /// one past it); false when JetStream does not hold the stream.
    pub async fn purge_before(&self, stream: &str, keep: u64) -> Result<bool, EngineError> {
        let what = "purging a stream";
        let response: Response<Success> = self
            .request(
                what,
                format!("STREAM.PURGE.{stream}"),
                &json!({ "seq": keep }),
            )
            .await?;
        match response {
            Response::Ok(done) => Ok(done.success),
            Response::Err { error } if error.error_code() == STREAM_NOT_FOUND => Ok(false),
            Response::Err { error } => Err(api_error(what, error)),
        }
    }

    /// Whether JetStream answers for this account. (A request of our own: the `Account` type
    /// of async-nats 0.51 does not parse the answer of a 2.9 server.)
    pub async fn ping(&self) -> Result<(), EngineError> {
        let what = "asking JetStream for the account's info";
        let response: Response<AccountInfo> = self.request(what, "INFO", &json!({})).await?;
        match response {
            Response::Ok(_) => Ok(()),
            Response::Err { error } => Err(api_error(what, error)),
        }
    }

    /// One JetStream API request, answered or failed within the timeout. The client's own
    /// request timeout starts only once the request is in its command queue, and while NATS is
    /// down that queue is not drained: once it is full, a request would wait there until NATS
    /// is back. So the deadline covers the whole call.
    pub async fn request<T: Serialize + ?Sized, V: DeserializeOwned>(
        &self,
        what: &str,
        subject: impl ToSubject,
        payload: &T,
    ) -> Result<V, EngineError> {
        self.request_until(Instant::now() + self.timeout, what, subject, payload)
            .await
    }

    /// [`Api::request`], answered or failed by `deadline` (at most the timeout from now).
    async fn request_until<T: Serialize + ?Sized, V: DeserializeOwned>(
        &self,
        deadline: Instant,
        what: &str,
        subject: impl ToSubject,
        payload: &T,
    ) -> Result<V, EngineError> {
        let deadline = deadline.min(Instant::now() + self.timeout);
        match tokio::time::timeout_at(deadline, self.js.request(subject, payload)).await {
            Ok(answer) => answer.map_err(|e| self.request_error(what, e)),
            Err(_) => Err(EngineError::unavailable(format!(
                "{what}: NATS JetStream did not answer within {:?}",
                self.timeout
            ))),
        }
    }

    pub fn request_error(&self, what: &str, e: RequestError) -> EngineError {
        match e.kind() {
            RequestErrorKind::TimedOut => EngineError::unavailable(format!(
                "{what}: NATS JetStream did not answer within {:?}",
                self.timeout
            )),
            RequestErrorKind::NoResponders => EngineError::unavailable(format!(
                "{what}: NATS JetStream is not available (no responders)"
            )),
            _ => EngineError::unavailable_from(what, e),
        }
    }
}

/// Whether a stream's info comes from the stream's leader. In a JetStream cluster other
/// replicas answer `STREAM.INFO` (and a create of an existing stream) at times: every member
/// while the stream's group has no leader (the election after its leader died), and for its
/// first seconds the group's preferred member after it restarted. Their state may lack
/// messages the leader has acked, so their head may be behind offsets readers already got.
/// The answer names the leader the answering server knows (`cluster.leader`) and every member
/// except itself (`cluster.replicas`): it is the leader's own answer exactly when a leader is
/// named and is not among the others. A server outside a cluster leads its streams (it sends
/// no `cluster`).
pub(crate) fn from_leader(info: &Info) -> bool {
    let Some(cluster) = &info.cluster else {
        return true;
    };
    match cluster.leader.as_deref() {
        Some(leader) if !leader.is_empty() => !cluster.replicas.iter().any(|r| r.name == leader),
        _ => false,
    }
}

fn not_from_leader(stream: &str, info: &Info) -> EngineError {
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .filter(|l| !l.is_empty());
    EngineError::unavailable(match leader {
        Some(leader) => format!(
            "JetStream stream {stream}: only a replica that is not its leader ({leader}) answered; its state may be behind, so it is not used"
        ),
        None => {
            format!("JetStream stream {stream} has no leader right now (an election is under way)")
        }
    })
}

/// An error JetStream answered with. Most are the store refusing for now (no quorum, out of
/// storage), so `Unavailable`; the account's stream limit is a `Limit`.
fn api_error(what: &str, error: jetstream::Error) -> EngineError {
    if error.error_code() == MAXIMUM_STREAMS_LIMIT {
        EngineError::Limit(Limit::Store {
            what: what.to_owned(),
            source: Some(Arc::new(error)),
        })
    } else {
        EngineError::unavailable_from(format!("{what}: JetStream refused"), error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `STREAM.INFO` answer with the given `cluster` section (as nats-server 2.9 sends it).
    fn info(cluster: serde_json::Value) -> Info {
        let mut answer = json!({
            "config": {"name": "s", "subjects": ["s"], "retention": "limits",
                "max_consumers": -1, "max_msgs": -1, "max_bytes": -1, "max_age": 0,
                "max_msgs_per_subject": -1, "max_msg_size": -1, "discard": "old",
                "storage": "file", "num_replicas": 3, "duplicate_window": 120000000000u64},
            "created": "2026-11-30T03:06:52.622861876Z",
            "state": {"messages": 0, "bytes": 0, "first_seq": 0,
                "first_ts": "0001-01-01T00:00:00Z", "last_seq": 0,
                "last_ts": "0001-01-01T00:00:00Z", "consumer_count": 0}
        });
        if !cluster.is_null() {
            answer["cluster"] = cluster;
        }
        serde_json::from_value(answer).expect("a stream info")
    }

    fn peer(name: &str) -> serde_json::Value {
        json!({"name": name, "current": true, "active": 1000})
    }

    #[test]
    fn only_the_leaders_own_answer_counts() {
        // A single server, and the leader of a replicated stream (it lists the others).
        assert!(from_leader(&info(serde_json::Value::Null)));
        assert!(from_leader(&info(json!({"name": "c", "leader": "n3"}))));
        assert!(from_leader(&info(
            json!({"name": "c", "leader": "n3", "replicas": [peer("n1"), peer("n2")]})
        )));
        // A follower (it lists the leader among the others), and a member while there is no
        // leader (seen from a restarted server: every member listed, last_seq 0).
        assert!(!from_leader(&info(
            json!({"name": "c", "leader": "n1", "replicas": [peer("n1"), peer("n3")]})
        )));
        assert!(!from_leader(&info(
            json!({"name": "c", "replicas": [peer("n1"), peer("n2"), peer("n3")]})
        )));
        assert!(!from_leader(&info(json!({"name": "c", "leader": ""}))));
    }
}
