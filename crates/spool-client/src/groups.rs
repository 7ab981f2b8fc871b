//! A consumer group's member and manager over HTTP (SPEC §7, docs/http-api.md "Consumer
//! groups"): create or update a group, receive leased messages with long-poll, and settle each
//! lease with ack, nack, extend or terminate — one result per receipt (`ok`, `expired`,
//! `unknown`).
//!
//! ```no_run
//! use std::time::Duration;
//! use spool_client::{groups::GroupClient, http::HttpClient};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let http = HttpClient::new("http://127.0.0.1:7070", Some("my-api-key"))?;
//! let jobs = GroupClient::new(&http, "jobs", "workers");
//! jobs.create(&Default::default()).await?;
//! loop {
//!     let batch = jobs.receive("worker-1", 10, Duration::from_secs(20), None).await?;
//!     let receipts: Vec<String> = batch.messages.iter().map(|m| m.receipt.clone()).collect();
//!     // … do the work …
//!     jobs.ack(&receipts).await?;
//! }
//! # }
//! ```

use std::time::Duration;

use spool_protocol::groups::{
    AckRequest, DurationText, ExtendRequest, GroupConfigSpec, GroupInfo, GroupList, NackRequest,
    ReceiptOutcome, ReceiveRequest, ReceiveResponse, RedriveResponse, SettleResponse,
    TerminateRequest,
};

use crate::http::{HttpClient, RequestError, check};

/// How much longer than a receive's `wait` the client waits for its answer before it calls
/// the request failed.
const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// One group of one stream, on one server. Cheap to clone.
#[derive(Clone, Debug)]
pub struct GroupClient {
    http: HttpClient,
    stream: String,
    group: String,
}

impl GroupClient {
    pub fn new(http: &HttpClient, stream: &str, group: &str) -> Self {
        Self {
            http: http.clone(),
            stream: stream.to_owned(),
            group: group.to_owned(),
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    fn url(&self, tail: &[&str]) -> reqwest::Url {
        let mut segments = vec!["v1", "streams", &self.stream, "groups", &self.group];
        segments.extend_from_slice(tail);
        self.http.url(&segments)
    }

    /// Creates the group, or updates the settings `spec` names (`PUT`). True when it was
    /// created.
    pub async fn create(&self, spec: &GroupConfigSpec) -> Result<(GroupInfo, bool), RequestError> {
        let request = self.http.put(self.url(&[])).json(spec);
        let response = request
            .send()
            .await
            .map_err(|e| RequestError::Transient(format!("request failed: {e}")))?;
        let response = check(response).await?;
        let created = response.status() == reqwest::StatusCode::CREATED;
        let info = response
            .json::<GroupInfo>()
            .await
            .map_err(|e| RequestError::Unreadable(format!("unreadable answer: {e}")))?;
        Ok((info, created))
    }

    /// The group's settings and stats.
    pub async fn info(&self) -> Result<GroupInfo, RequestError> {
        self.http.send_json(self.http.get(self.url(&[]))).await
    }

    /// The groups of this client's stream.
    pub async fn list(&self) -> Result<GroupList, RequestError> {
        let url = self.http.url(&["v1", "streams", &self.stream, "groups"]);
        self.http.send_json(self.http.get(url)).await
    }

    /// Deletes the group (not its stream).
    pub async fn delete(&self) -> Result<(), RequestError> {
        let response = self
            .http
            .delete(self.url(&[]))
            .send()
            .await
            .map_err(|e| RequestError::Transient(format!("request failed: {e}")))?;
        check(response).await.map(drop)
    }

    /// Leases up to `max` messages to `consumer`, waiting up to `wait` when none is available.
    /// `visibility_timeout` overrides the group's for these leases.
    pub async fn receive(
        &self,
        consumer: &str,
        max: u32,
        wait: Duration,
        visibility_timeout: Option<Duration>,
    ) -> Result<ReceiveResponse, RequestError> {
        let body = ReceiveRequest {
            consumer: consumer.to_owned(),
            max: Some(max),
            wait: (!wait.is_zero()).then_some(DurationText(wait)),
            visibility_timeout: visibility_timeout.map(DurationText),
            ack: None,
        };
        self.send_receive(&body, wait).await
    }

    /// Acks `receipts` (at most 1000), then receives as [`receive`](Self::receive) does, in
    /// one request: the acks and the first lease round are stored as one commit. Answers the
    /// receive (its `acks` taken out) and one result per receipt, in order. The acks' results
    /// come with the receive's answer, so after a `wait` for new messages; a failure of the
    /// receive after the acks is answered as no messages with the results. After a
    /// [`RequestError::Rejected`] nothing was acked; after another error the acks may have
    /// been done (an ack of the same receipts then answers `expired` for those).
    pub async fn receive_acking(
        &self,
        consumer: &str,
        max: u32,
        wait: Duration,
        visibility_timeout: Option<Duration>,
        receipts: &[String],
    ) -> Result<(ReceiveResponse, Vec<ReceiptOutcome>), RequestError> {
        let body = ReceiveRequest {
            consumer: consumer.to_owned(),
            max: Some(max),
            wait: (!wait.is_zero()).then_some(DurationText(wait)),
            visibility_timeout: visibility_timeout.map(DurationText),
            ack: Some(receipts.to_vec()),
        };
        let mut answer = self.send_receive(&body, wait).await?;
        let acks = answer.acks.take().ok_or_else(|| {
            RequestError::Unreadable("the receive's answer has no results of its acks".into())
        })?;
        if acks.len() != receipts.len() {
            return Err(RequestError::Unreadable(format!(
                "the receive's answer has {} results for {} acks",
                acks.len(),
                receipts.len()
            )));
        }
        Ok((answer, acks))
    }

    async fn send_receive(
        &self,
        body: &ReceiveRequest,
        wait: Duration,
    ) -> Result<ReceiveResponse, RequestError> {
        let request = self
            .http
            .post(self.url(&["receive"]))
            .timeout(wait + ANSWER_GRACE)
            .json(body);
        self.http.send_json(request).await
    }

    /// Ends each message for the group for good.
    pub async fn ack(&self, receipts: &[String]) -> Result<SettleResponse, RequestError> {
        let body = AckRequest {
            receipts: receipts.to_vec(),
        };
        self.settle("ack", &body).await
    }

    /// Makes each message visible again, after `delay` (at once when `None`). `reason` is the
    /// dead letter's reason if this was a message's last allowed delivery.
    pub async fn nack(
        &self,
        receipts: &[String],
        delay: Option<Duration>,
        reason: Option<&str>,
    ) -> Result<SettleResponse, RequestError> {
        let body = NackRequest {
            receipts: receipts.to_vec(),
            delay: delay.map(DurationText),
            reason: reason.map(ToOwned::to_owned),
        };
        self.settle("nack", &body).await
    }

    /// Renews each lease for `visibility_timeout` from now (the group's when `None`).
    pub async fn extend(
        &self,
        receipts: &[String],
        visibility_timeout: Option<Duration>,
    ) -> Result<SettleResponse, RequestError> {
        let body = ExtendRequest {
            receipts: receipts.to_vec(),
            visibility_timeout: visibility_timeout.map(DurationText),
        };
        self.settle("extend", &body).await
    }

    /// Sends each message to the dead-letter stream at once.
    pub async fn terminate(
        &self,
        receipts: &[String],
        reason: Option<&str>,
    ) -> Result<SettleResponse, RequestError> {
        let body = TerminateRequest {
            receipts: receipts.to_vec(),
            reason: reason.map(ToOwned::to_owned),
        };
        self.settle("terminate", &body).await
    }

    /// Publishes the dead-letter stream's messages back into the stream.
    pub async fn redrive(&self) -> Result<RedriveResponse, RequestError> {
        self.http
            .send_json(self.http.post(self.url(&["redrive"])))
            .await
    }

    async fn settle<B: serde::Serialize>(
        &self,
        what: &str,
        body: &B,
    ) -> Result<SettleResponse, RequestError> {
        self.http
            .send_json(self.http.post(self.url(&[what])).json(body))
            .await
    }
}
