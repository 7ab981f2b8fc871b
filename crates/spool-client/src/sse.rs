//! A Server-Sent Events reader of one stream (`GET /v1/streams/STREAM/events?format=json`).
//!
//! Like an EventSource it remembers the `id` of the last event, and when the stream ends
//! (a dropped connection, the server's `event: reconnect` on shutdown, an `event: error`, or
//! no bytes at all for [`IDLE_TIMEOUT`]) it reconnects with backoff and `Last-Event-ID`, so
//! the server sends exactly what was missed — or a reset. Anything a resume sends again is
//! dropped, so each message comes once.
//!
//! ```no_run
//! use spool_client::{Start, http::HttpClient, sse::{SseItem, SseReader}};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = HttpClient::new("http://127.0.0.1:7070", Some("my-api-key"))?;
//! let mut reader = SseReader::new(&client, "chat:1", Start::Now);
//! loop {
//!     match reader.next().await? {
//!         SseItem::Message(m) => println!("{}:{} {:?}", m.epoch, m.offset, m.data),
//!         SseItem::Reset(r) => println!("continuity lost ({}), continuing after {}", r.reason, r.position),
//!         // The next call waits out a backoff delay, then reconnects.
//!         SseItem::Retry(retry) => eprintln!("{}; reconnecting in {:?}", retry.why, retry.delay),
//!     }
//! }
//! # }
//! ```

use std::{
    collections::VecDeque,
    pin::Pin,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::{Response, Url};
use spool_core::{Position, Start};
use spool_protocol::{
    ErrorBody,
    http::{MessageBody, MessagesResponse, ReconnectBody, ResetBody},
};

use crate::{
    Backoff,
    http::{HttpClient, RequestError, Retry, check},
};

/// The server sends a keep-alive comment every 15 s (`--heartbeat`); this long without a
/// byte means the connection is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection that lasted this long was healthy: the next reconnect starts fast again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// What [`SseReader::next`] gives.
#[derive(Debug)]
pub enum SseItem {
    /// The next message.
    Message(MessageBody),
    /// Continuity was lost: the reader continues after `position`.
    Reset(ResetBody),
    /// The connection failed or ended; the next call waits out a backoff delay, then
    /// reconnects from where the reader is.
    Retry(Retry),
}

type Body = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Reads one stream's events, reconnecting by itself.
pub struct SseReader {
    client: HttpClient,
    stream: String,
    url: Url,
    start: Start,
    /// The start as text once known (`now` is first pinned to the head).
    after: Option<String>,
    last_event_id: Option<String>,
    /// The last message or reset given, to drop anything a resume sends again.
    last_seen: Option<(String, u64)>,
    backoff: Backoff,
    retrying: bool,
    body: Option<Body>,
    parser: Parser,
    pending: VecDeque<SseEvent>,
    opened: Instant,
    /// Whether this connection gave anything.
    delivered: bool,
}

impl std::fmt::Debug for SseReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseReader")
            .field("stream", &self.stream)
            .field("start", &self.start)
            .field("last_event_id", &self.last_event_id)
            .field("connected", &self.body.is_some())
            .finish_non_exhaustive()
    }
}

impl SseReader {
    /// A reader of `stream` from `start`; it connects on the first [`SseReader::next`].
    ///
    /// An SSE stream names no position until its first event; should the connection drop
    /// before one, reconnecting with `now` would lose what was published meanwhile. So
    /// [`Start::Now`] is first pinned to the stream's head (a long-poll that does not wait).
    pub fn new(client: &HttpClient, stream: &str, start: Start) -> Self {
        Self {
            url: client.url(&["v1", "streams", stream, "events"]),
            client: client.clone(),
            stream: stream.to_owned(),
            after: (start != Start::Now).then(|| start.to_string()),
            start,
            last_event_id: None,
            last_seen: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            retrying: false,
            body: None,
            parser: Parser::default(),
            pending: VecDeque::new(),
            opened: Instant::now(),
            delivered: false,
        }
    }

    /// The backoff between reconnects (default 100 ms to 5 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(min, max);
        self
    }

    /// Whether [`SseReader::next`] has an event at hand without reading the network (e.g.
    /// to flush output only before waiting).
    pub fn has_buffered(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The next message, reset or retry notice. An error is one retrying cannot fix: a
    /// rejection (bad credentials, stream name or position), an answer that is not an event
    /// stream, or an event this client cannot read.
    pub async fn next(&mut self) -> Result<SseItem, RequestError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                if let Some(item) = self.event(event)? {
                    return Ok(item);
                }
                continue;
            }
            let Some(body) = &mut self.body else {
                if let Some(retry) = self.connect().await? {
                    return Ok(SseItem::Retry(retry));
                }
                continue;
            };
            let chunk = match tokio::time::timeout(IDLE_TIMEOUT, body.next()).await {
                Err(_) => {
                    return Ok(self.lost(format!(
                        "nothing heard from the server for {IDLE_TIMEOUT:?}"
                    )));
                }
                Ok(None) => return Ok(self.lost("the server ended the stream".into())),
                Ok(Some(Err(e))) => return Ok(self.lost(format!("the stream broke: {e}"))),
                Ok(Some(Ok(chunk))) => chunk,
            };
            self.pending.extend(self.parser.feed(&chunk));
        }
    }

    /// Opens the event stream (after a backoff delay if the last attempt failed); `Some`
    /// when it failed in a way retrying may fix.
    async fn connect(&mut self) -> Result<Option<Retry>, RequestError> {
        if std::mem::take(&mut self.retrying) {
            self.backoff.wait().await;
        }
        let after = match &self.after {
            Some(after) => after.clone(),
            None => match self.head_position().await {
                Ok(head) => {
                    self.backoff.reset();
                    self.after = Some(head.clone());
                    head
                }
                Err(RequestError::Transient(why)) => {
                    self.retrying = true;
                    return Ok(Some(Retry {
                        why,
                        delay: self.backoff.ceiling(),
                        from: None,
                    }));
                }
                Err(e) => return Err(e),
            },
        };
        let mut request = self
            .client
            .get(self.url.clone())
            .query(&[("format", "json")])
            .header(reqwest::header::ACCEPT, "text/event-stream");
        request = match &self.last_event_id {
            Some(id) => request.header("last-event-id", id),
            None => request.query(&[("after", after.as_str())]),
        };
        self.opened = Instant::now();
        self.delivered = false;
        let why = match request.send().await {
            Err(e) => format!("request failed: {}", chain(&e)),
            Ok(response) => match checked(response).await {
                Err(RequestError::Transient(why)) => why,
                Err(e) => return Err(e),
                Ok(response) => {
                    self.body = Some(Box::pin(response.bytes_stream()));
                    self.parser = Parser::default();
                    return Ok(None);
                }
            },
        };
        Ok(Some(self.retry(why)))
    }

    /// Where the stream's head is now: a long-poll from `now` that does not wait.
    async fn head_position(&self) -> Result<String, RequestError> {
        let url = self
            .client
            .url(&["v1", "streams", &self.stream, "messages"]);
        let request = self
            .client
            .get(url)
            .query(&[("after", "now"), ("limit", "1"), ("wait", "0")])
            .timeout(Duration::from_secs(30));
        let answer: MessagesResponse = self.client.send_json(request).await?;
        Ok(if answer.position.is_empty() {
            "now".to_owned()
        } else {
            answer.position
        })
    }

    /// The connection is over: reconnect with backoff, fast again if it was healthy.
    fn lost(&mut self, why: String) -> SseItem {
        if self.delivered || self.opened.elapsed() >= HEALTHY_AFTER {
            self.backoff.reset();
        }
        SseItem::Retry(self.retry(why))
    }

    fn retry(&mut self, why: String) -> Retry {
        self.body = None;
        self.pending.clear();
        self.retrying = true;
        Retry {
            why,
            delay: self.backoff.ceiling(),
            from: self.last_event_id.clone().or_else(|| self.after.clone()),
        }
    }

    /// Handles one dispatched event; `Some` when it is something to give.
    fn event(&mut self, event: SseEvent) -> Result<Option<SseItem>, RequestError> {
        if let Some(id) = event.id.filter(|id| !id.is_empty()) {
            self.last_event_id = Some(id);
        }
        let Some(data) = event.data else {
            return Ok(None);
        };
        match event.kind.as_str() {
            "message" => {
                let m: MessageBody = serde_json::from_str(&data).map_err(|e| {
                    RequestError::Unreadable(format!("unreadable SSE message: {data}: {e}"))
                })?;
                if self
                    .last_seen
                    .as_ref()
                    .is_some_and(|(epoch, offset)| *epoch == m.epoch && m.offset <= *offset)
                {
                    return Ok(None); // already given before a reconnect
                }
                self.last_seen = Some((m.epoch.clone(), m.offset));
                self.delivered = true;
                Ok(Some(SseItem::Message(m)))
            }
            "reset" => {
                let reset: ResetBody = serde_json::from_str(&data).map_err(|e| {
                    RequestError::Unreadable(format!("unreadable SSE reset: {data}: {e}"))
                })?;
                if let Ok(p) = reset.position.parse::<Position>() {
                    self.last_seen = Some((p.epoch.to_string(), p.offset.get()));
                }
                self.delivered = true;
                Ok(Some(SseItem::Reset(reset)))
            }
            "reconnect" => {
                let why = serde_json::from_str::<ReconnectBody>(&data)
                    .map(|r| r.reason)
                    .unwrap_or(data);
                // The server is shutting down and asked for a reconnect.
                self.backoff.reset();
                Ok(Some(SseItem::Retry(
                    self.retry(format!("the server is going away ({why})")),
                )))
            }
            "error" => {
                let why = serde_json::from_str::<ErrorBody>(&data)
                    .map(|b| format!("{}: {}", b.error.code.as_str(), b.error.message))
                    .unwrap_or(data);
                Ok(Some(
                    self.lost(format!("the server ended the stream: {why}")),
                ))
            }
            _ => Ok(None), // an event type this client does not know
        }
    }
}

/// An error with its causes, `outer: inner: …`.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The answer when it is an event stream; an error answer otherwise (as [`check`] sorts them).
async fn checked(response: Response) -> Result<Response, RequestError> {
    let response = check(response).await?;
    let is_event_stream = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !is_event_stream {
        return Err(RequestError::Rejected(
            response.status(),
            "the answer is not an event stream (is the server URL a Spool server?)".into(),
        ));
    }
    Ok(response)
}

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SseEvent {
    /// The `event:` type, `message` when none was given.
    kind: String,
    /// The last event ID buffer when the event was dispatched (`id:` persists across events).
    id: Option<String>,
    /// The `data:` lines joined with `\n`; `None` for a block without data, which an
    /// EventSource does not dispatch (it still takes its `id`).
    data: Option<String>,
}

/// The `text/event-stream` parser of the HTML standard: lines end with LF, CRLF or CR (also
/// split across chunks), `:` starts a comment, a blank line dispatches the event.
#[derive(Default)]
struct Parser {
    line: Vec<u8>,
    /// The previous chunk ended with CR: an LF starting this one belongs to it.
    after_cr: bool,
    kind: String,
    data: Option<String>,
    id: Option<String>,
}

impl Parser {
    fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        for &b in chunk {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.line_done(&line) {
                        events.push(event);
                    }
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    fn line_done(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            return Some(SseEvent {
                kind: match std::mem::take(&mut self.kind) {
                    kind if kind.is_empty() => "message".to_owned(),
                    kind => kind,
                },
                id: self.id.clone(),
                data: self.data.take(),
            });
        }
        if line[0] == b':' {
            return None; // a comment (keep-alive)
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (&*line, ""),
        };
        match field {
            "event" => self.kind = value.to_owned(),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {} // retry, unknown fields
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, id: Option<&str>, data: Option<&str>) -> SseEvent {
        SseEvent {
            kind: kind.into(),
            id: id.map(Into::into),
            data: data.map(Into::into),
        }
    }

    #[test]
    fn parses_events_comments_and_every_line_ending() {
        let mut p = Parser::default();
        let events = p.feed(
            b"retry: 1000\n: spool\n\ndata: {\"a\":1}\nid: e:1\n\nevent: reset\r\ndata:x\r\ndata: y\r\nid: e:9\r\n\r\n",
        );
        assert_eq!(
            events,
            [
                event("message", None, None),
                event("message", Some("e:1"), Some("{\"a\":1}")),
                event("reset", Some("e:9"), Some("x\ny")),
            ]
        );
        // The id persists; CR alone ends lines too.
        assert_eq!(
            p.feed(b"data: z\r\r"),
            [event("message", Some("e:9"), Some("z"))]
        );
    }

    #[test]
    fn events_split_anywhere_across_chunks() {
        let stream = "data: {\"text\":\"h\u{e9}llo\"}\r\nid: e:1\r\n\r\n: ping\r\n\r\nevent: reconnect\r\ndata: {}\r\n\r\n";
        let expected = [
            event("message", Some("e:1"), Some("{\"text\":\"h\u{e9}llo\"}")),
            event("message", Some("e:1"), None),
            event("reconnect", Some("e:1"), Some("{}")),
        ];
        for split in 0..stream.len() {
            let (a, b) = stream.as_bytes().split_at(split);
            let mut p = Parser::default();
            let mut events = p.feed(a);
            events.extend(p.feed(b));
            assert_eq!(events, expected, "split at {split}");
        }
    }
}
