//! A long-poll reader of one stream (`GET /v1/streams/STREAM/messages`): each answer says
//! where the next request continues, so the reader keeps its position across requests and
//! failed requests, and the server answers with exactly what was missed, or with a reset.
//!
//! ```no_run
//! use spool_client::{Start, http::HttpClient, poll::{LongPoll, PollItem}};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = HttpClient::new("http://127.0.0.1:7070", Some("my-api-key"))?;
//! let mut reader = LongPoll::new(&client, "chat:1", &Start::Oldest);
//! loop {
//!     match reader.next().await? {
//!         PollItem::Answer(answer) => {
//!             if let Some(reset) = &answer.reset {
//!                 println!("continuity lost ({}), continuing after {}", reset.reason, reset.position);
//!             }
//!             for m in &answer.messages {
//!                 println!("{}:{} {:?}", m.epoch, m.offset, m.data);
//!             }
//!         }
//!         // The next call waits out a backoff delay, then asks again from the same position.
//!         PollItem::Retry(retry) => eprintln!("{}; retrying in {:?}", retry.why, retry.delay),
//!     }
//! }
//! # }
//! ```

use std::time::Duration;

use reqwest::Url;
use spool_core::Start;
use spool_protocol::http::MessagesResponse;

use crate::{
    Backoff,
    http::{HttpClient, RequestError, Retry},
};

/// Seconds each long-poll waits on the server unless [`LongPoll::wait`] says otherwise.
pub const DEFAULT_WAIT_SECS: u64 = 25;
/// Messages per request unless [`LongPoll::limit`] says otherwise.
pub const DEFAULT_LIMIT: u32 = 500;

/// What [`LongPoll::next`] gives.
#[derive(Debug)]
pub enum PollItem {
    /// An answer: a reset (if continuity was lost), then messages (none when the wait ran
    /// out). The reader already continues from its `position`.
    Answer(MessagesResponse),
    /// The request failed in a way retrying may fix.
    Retry(Retry),
}

/// Long-polls one stream, keeping the position between requests.
#[derive(Debug)]
pub struct LongPoll {
    client: HttpClient,
    url: Url,
    after: String,
    limit: u32,
    wait_secs: u64,
    backoff: Backoff,
    retrying: bool,
}

impl LongPoll {
    /// A reader of `stream` from `start`; it sends nothing until [`LongPoll::next`].
    pub fn new(client: &HttpClient, stream: &str, start: &Start) -> Self {
        Self {
            url: client.url(&["v1", "streams", stream, "messages"]),
            client: client.clone(),
            after: start.to_string(),
            limit: DEFAULT_LIMIT,
            wait_secs: DEFAULT_WAIT_SECS,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            retrying: false,
        }
    }

    /// Messages per request (the server caps it).
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }

    /// Seconds each request waits on the server for a message (the server caps it); 0 reads
    /// what there is without waiting.
    pub fn wait(mut self, secs: u64) -> Self {
        self.wait_secs = secs;
        self
    }

    /// The backoff between failed requests (default 100 ms to 5 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(min, max);
        self
    }

    /// Where the next request continues: `EPOCH:OFFSET` or the start's keyword.
    pub fn position(&self) -> &str {
        &self.after
    }

    /// Sends the next request (after a backoff delay if the last one failed). An error is a
    /// rejection retrying cannot fix (bad credentials, a bad stream name or position).
    pub async fn next(&mut self) -> Result<PollItem, RequestError> {
        if std::mem::take(&mut self.retrying) {
            self.backoff.wait().await;
        }
        let request = self
            .client
            .get(self.url.clone())
            .query(&[("after", self.after.as_str())])
            .query(&[("limit", self.limit), ("wait", self.wait_secs as u32)])
            .timeout(Duration::from_secs(
                self.wait_secs.max(DEFAULT_WAIT_SECS) + 10,
            ));
        match self.client.send_json::<MessagesResponse>(request).await {
            Ok(answer) => {
                self.backoff.reset();
                if !answer.position.is_empty() {
                    self.after.clone_from(&answer.position);
                }
                Ok(PollItem::Answer(answer))
            }
            Err(RequestError::Transient(why)) => {
                self.retrying = true;
                Ok(PollItem::Retry(Retry {
                    why,
                    delay: self.backoff.ceiling(),
                    from: Some(self.after.clone()),
                }))
            }
            Err(e) => Err(e),
        }
    }
}
