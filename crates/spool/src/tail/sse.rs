//! `--transport sse`: Server-Sent Events on `GET /v1/streams/STREAM/events?format=json`.
//!
//! Like an EventSource it remembers the `id` of the last event, and when the stream ends
//! (a dropped connection, the server's `event: reconnect` on shutdown, an `event: error`, or
//! no bytes at all for [`IDLE_TIMEOUT`]) it reconnects with backoff and `Last-Event-ID`, so
//! the server sends exactly what was missed — or a reset.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use reqwest::Response;
use spool_core::Start;
use spool_protocol::{
    ErrorBody,
    http::{MessageBody, MessagesResponse, ReconnectBody, ResetBody},
};

use super::{Flow, Printer, TailArgs, backoff};
use crate::client::{Client, RequestError, check};

/// The server sends a keep-alive comment every 15 s (`--heartbeat`); this long without a
/// byte means the connection is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection that lasted this long was healthy: the next reconnect starts fast again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

pub(super) async fn run(
    client: &Client,
    args: &TailArgs,
    start: &Start,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let url = client.url(&["v1", "streams", &args.stream, "events"]);
    let mut backoff = backoff();
    let mut last_event_id: Option<String> = None;
    let mut last_printed: Option<(String, u64)> = None;
    let after = match start {
        // An SSE stream names no position until its first event; should the connection
        // drop before one, reconnecting with `now` would lose what was published meanwhile.
        // So `now` is pinned to the head first.
        Start::Now => head_position(client, &args.stream).await?,
        _ => start.to_string(),
    };
    loop {
        let mut request = client
            .get(url.clone())
            .query(&[("format", "json")])
            .header(reqwest::header::ACCEPT, "text/event-stream");
        request = match &last_event_id {
            Some(id) => request.header("last-event-id", id),
            None => request.query(&[("after", after.as_str())]),
        };
        let from = last_event_id.as_deref().unwrap_or(&after).to_owned();
        let opened = Instant::now();
        let ended = match request.send().await {
            Err(e) => format!("request failed: {:#}", anyhow::Error::from(e)),
            Ok(response) => match checked(response).await {
                Err(RequestError::Rejected(status, msg)) => bail!("{status}: {msg}"),
                Err(RequestError::Transient(msg)) => msg,
                Ok(response) => {
                    let mut connection = Connection {
                        printer: &mut *printer,
                        last_event_id: &mut last_event_id,
                        last_printed: &mut last_printed,
                        delivered: false,
                    };
                    match connection.read(response).await? {
                        End::Stop => return Ok(()),
                        End::Lost(why) => {
                            if connection.delivered || opened.elapsed() >= HEALTHY_AFTER {
                                backoff.reset();
                            }
                            why
                        }
                        End::GoingAway(why) => {
                            backoff.reset();
                            why
                        }
                    }
                }
            },
        };
        eprintln!(
            "spool tail: {ended}; reconnecting in {:?} from {}",
            backoff.ceiling(),
            last_event_id.as_deref().unwrap_or(&from)
        );
        backoff.wait().await;
    }
}

/// Where the stream's head is now: a long-poll from `now` that does not wait.
async fn head_position(client: &Client, stream: &str) -> anyhow::Result<String> {
    let url = client.url(&["v1", "streams", stream, "messages"]);
    let mut backoff = backoff();
    loop {
        let request = client
            .get(url.clone())
            .query(&[("after", "now"), ("limit", "1"), ("wait", "0")])
            .timeout(Duration::from_secs(30));
        match client.send_json::<MessagesResponse>(request).await {
            Ok(answer) if !answer.position.is_empty() => return Ok(answer.position),
            Ok(_) => return Ok("now".to_owned()),
            Err(RequestError::Rejected(status, msg)) => bail!("{status}: {msg}"),
            Err(RequestError::Transient(msg)) => {
                eprintln!("spool tail: {msg}; retrying in {:?}", backoff.ceiling());
                backoff.wait().await;
            }
        }
    }
}

/// Why reading one event stream ended.
enum End {
    /// `--count` or `--no-follow` is satisfied.
    Stop,
    /// The connection broke or the server ended the stream: reconnect with backoff.
    Lost(String),
    /// The server is shutting down and asked for a reconnect.
    GoingAway(String),
}

/// One open event stream.
struct Connection<'a> {
    printer: &'a mut Printer,
    last_event_id: &'a mut Option<String>,
    /// The last message or reset printed, to drop anything a resume sends again.
    last_printed: &'a mut Option<(String, u64)>,
    /// Whether this connection printed anything.
    delivered: bool,
}

impl Connection<'_> {
    async fn read(&mut self, response: Response) -> anyhow::Result<End> {
        let mut body = response.bytes_stream();
        let mut parser = Parser::default();
        loop {
            let chunk = match tokio::time::timeout(IDLE_TIMEOUT, body.next()).await {
                Err(_) => {
                    return Ok(End::Lost(format!(
                        "nothing heard from the server for {IDLE_TIMEOUT:?}"
                    )));
                }
                Ok(None) => return Ok(End::Lost("the server ended the stream".into())),
                Ok(Some(Err(e))) => return Ok(End::Lost(format!("the stream broke: {e}"))),
                Ok(Some(Ok(chunk))) => chunk,
            };
            for event in parser.feed(&chunk) {
                if let Some(end) = self.event(event)? {
                    self.printer.flush()?;
                    return Ok(end);
                }
            }
            self.printer.flush()?;
        }
    }

    /// Handles one dispatched event; `Some` when the stream is done with.
    fn event(&mut self, event: SseEvent) -> anyhow::Result<Option<End>> {
        if let Some(id) = event.id.filter(|id| !id.is_empty()) {
            *self.last_event_id = Some(id);
        }
        let Some(data) = event.data else {
            return Ok(None);
        };
        let flow = match event.kind.as_str() {
            "message" => {
                let m: MessageBody = serde_json::from_str(&data)
                    .with_context(|| format!("unreadable SSE message: {data}"))?;
                if self
                    .last_printed
                    .as_ref()
                    .is_some_and(|(epoch, offset)| *epoch == m.epoch && m.offset <= *offset)
                {
                    return Ok(None); // already printed before a reconnect
                }
                *self.last_printed = Some((m.epoch.clone(), m.offset));
                self.delivered = true;
                self.printer.message(&m)?
            }
            "reset" => {
                let reset: ResetBody = serde_json::from_str(&data)
                    .with_context(|| format!("unreadable SSE reset: {data}"))?;
                if let Ok(p) = reset.position.parse::<spool_core::Position>() {
                    *self.last_printed = Some((p.epoch.to_string(), p.offset.get()));
                }
                self.delivered = true;
                self.printer.reset(&reset.reason, &reset.position)?
            }
            "reconnect" => {
                let why = serde_json::from_str::<ReconnectBody>(&data)
                    .map(|r| r.reason)
                    .unwrap_or(data);
                return Ok(Some(End::GoingAway(format!(
                    "the server is going away ({why})"
                ))));
            }
            "error" => {
                let why = serde_json::from_str::<ErrorBody>(&data)
                    .map(|b| format!("{}: {}", b.error.code.as_str(), b.error.message))
                    .unwrap_or(data);
                return Ok(Some(End::Lost(format!(
                    "the server ended the stream: {why}"
                ))));
            }
            _ => Flow::Continue, // an event type this client does not know
        };
        Ok((flow == Flow::Stop).then_some(End::Stop))
    }
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
