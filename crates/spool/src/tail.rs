//! `spool tail STREAM`: print a stream's messages as `EPOCH:OFFSET<TAB>DATA`, one per line,
//! then follow it live. A lost continuity prints `reset<TAB>REASON<TAB>EPOCH:OFFSET`; on a
//! conflated stream read over WebSocket, superseded messages print
//! `skipped<TAB>EPOCH:AFTER<TAB>EPOCH:THROUGH<TAB>COUNT`.
//!
//! Three transports print the same lines (`--transport`):
//!
//! - `ws` (default): the WebSocket protocol through `spool-client`, which reconnects, resumes
//!   its session and deduplicates by itself.
//! - `sse`: Server-Sent Events, reconnecting with backoff and `Last-Event-ID`
//!   (`spool_client::sse`).
//! - `poll`: long-polls, keeping the position between requests (`spool_client::poll`).
//!
//! Each keeps its position, so when the connection drops or the server restarts it reconnects
//! (with capped exponential backoff) and resumes exactly where it was: the server answers
//! with the missed messages, or with a reset. Ctrl-C ends it cleanly (exit status 0).

mod poll;
mod sse;
mod ws;

use std::{
    io::{self, BufWriter, Stdout, Write},
    time::Duration,
};

use anyhow::bail;
use clap::{Args, ValueEnum};
use reqwest::StatusCode;
use spool_client::{
    Backoff,
    http::{HttpClient as Client, RequestError},
};
use spool_core::{Position, Start};
use spool_protocol::http::{MessageBody, StreamInfoResponse};
use tokio_util::sync::CancellationToken;

use crate::client::ClientArgs;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct TailArgs {
    /// The stream to follow.
    pub stream: String,
    /// How to read the stream.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    /// Start after this position (`EPOCH:OFFSET`), or `oldest`, `latest`, `now`.
    #[arg(long, conflicts_with = "from_start")]
    pub after: Option<String>,
    /// Start from the oldest retained message (default: from now).
    #[arg(long)]
    pub from_start: bool,
    /// Exit after printing this many messages.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Exit once caught up instead of following live. With `ws` and `sse`: once the head the
    /// stream had at start (`GET /v1/streams/STREAM`) is printed.
    #[arg(long)]
    pub no_follow: bool,
    /// Messages per request (`--transport poll` only; default 500).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: Option<u32>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// How `spool tail` reads the stream.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// The WebSocket protocol on `/v1/ws` (spool-client).
    Ws,
    /// Server-Sent Events on `/v1/streams/STREAM/events`.
    Sse,
    /// Long-polls on `/v1/streams/STREAM/messages`.
    Poll,
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    if args.limit.is_some() && args.transport != Transport::Poll {
        bail!("--limit sets the messages per long-poll request: it needs --transport poll");
    }
    let start = match (&args.after, args.from_start) {
        (Some(after), _) => parse_start(after)?,
        (None, true) => Start::Oldest,
        (None, false) => Start::Now,
    };
    let client = args.client.http()?;

    // Ctrl-C: each transport stops at its next await, with everything printed flushed.
    let interrupted = CancellationToken::new();
    tokio::spawn({
        let interrupted = interrupted.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.cancel();
            }
        }
    });

    let outcome = tokio::select! {
        outcome = follow(&client, &args, start, &interrupted) => outcome,
        // The WebSocket transport handles Ctrl-C itself, to close the connection properly.
        _ = interrupted.cancelled(), if args.transport != Transport::Ws => Ok(()),
    };
    match outcome {
        // `spool tail … | head`: the reader is gone, which is no error of ours.
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        other => other,
    }
}

async fn follow(
    client: &Client,
    args: &TailArgs,
    start: Start,
    interrupted: &CancellationToken,
) -> anyhow::Result<()> {
    let mut printer = Printer::new(args.count);
    match args.transport {
        Transport::Poll => poll::run(client, args, &start, &mut printer).await,
        Transport::Ws | Transport::Sse => {
            if args.no_follow {
                let info = tokio::select! {
                    info = stream_head(client, &args.stream) => info?,
                    _ = interrupted.cancelled() => return Ok(()),
                };
                match no_follow_target(&start, info) {
                    Some(until) => printer.until = Some(until),
                    None => return Ok(()), // nothing to print
                }
            }
            match args.transport {
                Transport::Ws => ws::run(client, args, start, &mut printer, interrupted).await,
                _ => sse::run(client, args, &start, &mut printer).await,
            }
        }
    }
}

/// `--after`: a position or a keyword, checked here so every transport says the same.
fn parse_start(after: &str) -> anyhow::Result<Start> {
    match after.parse::<Start>() {
        Ok(start) => Ok(start),
        Err(e) => bail!("invalid_position: --after {after:?}: {e}; or give oldest, latest or now"),
    }
}

/// The stream's head and oldest retained offset now (`GET /v1/streams/STREAM`); `None` for
/// a stream the server has no history of. Retries while the server cannot be reached.
async fn stream_head(client: &Client, stream: &str) -> anyhow::Result<Option<StreamInfoResponse>> {
    let url = client.url(&["v1", "streams", stream]);
    let mut backoff = backoff();
    loop {
        let request = client.get(url.clone()).timeout(Duration::from_secs(30));
        match client.send_json::<StreamInfoResponse>(request).await {
            Ok(info) => return Ok(Some(info)),
            Err(RequestError::Rejected(StatusCode::NOT_FOUND, _)) => return Ok(None),
            Err(RequestError::Transient(msg)) => {
                eprintln!("spool tail: {msg}; retrying in {:?}", backoff.ceiling());
                backoff.wait().await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Where `--no-follow` ends over `ws` and `sse`, given the stream's state at start; `None`
/// when there is nothing to print at all.
fn no_follow_target(start: &Start, info: Option<StreamInfoResponse>) -> Option<Until> {
    let Some(info) = info else {
        // No history: a position from before gets a reset (`unknown_stream`), then it is over.
        return matches!(start, Start::After(_)).then_some(Until::FirstLine);
    };
    let head = Until::Head {
        epoch: info.epoch.clone(),
        offset: info.head,
    };
    match start {
        Start::Now => None,
        Start::After(p) if p.epoch.as_str() == info.epoch && p.offset.get() == info.head => None,
        Start::After(_) => Some(head),
        Start::Oldest if info.oldest > info.head => None,
        Start::Latest if info.head == 0 => None,
        Start::Oldest | Start::Latest => Some(head),
    }
}

/// The last line `--no-follow` prints over `ws` and `sse`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Until {
    /// The first position at or past the head the stream had at start (a reset's position
    /// is the head, so a reset there ends it too). Another epoch means the history changed
    /// meanwhile: what there was to print is gone, so that ends it as well.
    Head { epoch: String, offset: u64 },
    /// Whatever comes first (the reset of a stream the server has no history of).
    FirstLine,
}

impl Until {
    fn reached(&self, epoch: &str, offset: u64) -> bool {
        match self {
            Until::Head {
                epoch: head_epoch,
                offset: head,
            } => epoch != head_epoch || offset >= *head,
            Until::FirstLine => true,
        }
    }
}

/// Whether to go on after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
enum Flow {
    Continue,
    Stop,
}

/// Prints the lines every transport shares, and decides when `--count` or `--no-follow`
/// are satisfied. Buffered: call [`Printer::flush`] before waiting for the network.
struct Printer {
    out: BufWriter<Stdout>,
    printed: u64,
    count: Option<u64>,
    until: Option<Until>,
}

impl Printer {
    fn new(count: Option<u64>) -> Self {
        Self {
            out: BufWriter::new(io::stdout()),
            printed: 0,
            count,
            until: None,
        }
    }

    fn message(&mut self, m: &MessageBody) -> io::Result<Flow> {
        let data = match (&m.data, &m.data_base64) {
            (Some(text), _) => escape(text),
            (None, Some(b64)) => format!("base64:{b64}"),
            (None, None) => String::new(),
        };
        self.message_line(&m.epoch, m.offset, &data)
    }

    /// `data` is already on one line (see [`escape`]).
    fn message_line(&mut self, epoch: &str, offset: u64, data: &str) -> io::Result<Flow> {
        writeln!(self.out, "{epoch}:{offset}\t{data}")?;
        self.printed += 1;
        if self.count.is_some_and(|c| self.printed >= c) {
            return Ok(Flow::Stop);
        }
        Ok(self.after(epoch, offset))
    }

    fn reset(&mut self, reason: &str, position: &str) -> io::Result<Flow> {
        writeln!(self.out, "reset\t{reason}\t{position}")?;
        Ok(match position.parse::<Position>() {
            Ok(p) => self.after(p.epoch.as_str(), p.offset.get()),
            // Not a position: --no-follow cannot tell how far it got, so it is over.
            Err(_) if self.until.is_some() => Flow::Stop,
            Err(_) => Flow::Continue,
        })
    }

    fn skipped(&mut self, epoch: &str, after: u64, through: u64, count: u64) -> io::Result<Flow> {
        writeln!(
            self.out,
            "skipped\t{epoch}:{after}\t{epoch}:{through}\t{count}"
        )?;
        Ok(self.after(epoch, through))
    }

    fn after(&self, epoch: &str, offset: u64) -> Flow {
        match &self.until {
            Some(until) if until.reached(epoch, offset) => Flow::Stop,
            _ => Flow::Continue,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// A text payload on one line: CR and LF escaped as `\r` / `\n`.
fn escape(text: &str) -> String {
    text.replace('\r', "\\r").replace('\n', "\\n")
}

/// The reconnect backoff every transport uses (spool-client's, with full jitter).
fn backoff() -> Backoff {
    Backoff::new(MIN_BACKOFF, MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(epoch: &str, head: u64, oldest: u64) -> Option<StreamInfoResponse> {
        Some(StreamInfoResponse {
            stream: "s".into(),
            epoch: epoch.into(),
            head,
            oldest,
            position: format!("{epoch}:{head}"),
            retention: spool_protocol::http::RetentionBody {
                max_messages: 0,
                max_bytes: 0,
                max_age_ms: 0,
            },
        })
    }

    fn after(p: &str) -> Start {
        Start::After(p.parse().unwrap())
    }

    #[test]
    fn no_follow_stops_at_the_head_at_start() {
        let head = Some(Until::Head {
            epoch: "e1".into(),
            offset: 5,
        });
        assert_eq!(no_follow_target(&Start::Now, info("e1", 5, 1)), None);
        assert_eq!(no_follow_target(&Start::Oldest, info("e1", 5, 1)), head);
        assert_eq!(no_follow_target(&Start::Latest, info("e1", 5, 1)), head);
        assert_eq!(no_follow_target(&after("e1:2"), info("e1", 5, 1)), head);
        // Another epoch, or past the head: a reset at the head comes, then it is over.
        assert_eq!(no_follow_target(&after("e0:9"), info("e1", 5, 1)), head);
        assert_eq!(no_follow_target(&after("e1:9"), info("e1", 5, 1)), head);
        // Nothing to print.
        assert_eq!(no_follow_target(&after("e1:5"), info("e1", 5, 1)), None);
        assert_eq!(no_follow_target(&Start::Oldest, info("e1", 5, 6)), None);
        assert_eq!(no_follow_target(&Start::Latest, info("e1", 0, 1)), None);
        assert_eq!(no_follow_target(&Start::Oldest, None), None);
        assert_eq!(
            no_follow_target(&after("e1:3"), None),
            Some(Until::FirstLine)
        );
    }

    #[test]
    fn the_head_is_reached_at_it_past_it_or_in_another_epoch() {
        let until = Until::Head {
            epoch: "e1".into(),
            offset: 5,
        };
        assert!(!until.reached("e1", 4));
        assert!(until.reached("e1", 5));
        assert!(until.reached("e1", 6));
        assert!(until.reached("e2", 1));
    }

    #[test]
    fn after_takes_keywords_and_positions_and_names_bad_ones() {
        assert_eq!(parse_start("oldest").unwrap(), Start::Oldest);
        assert_eq!(parse_start("latest").unwrap(), Start::Latest);
        assert_eq!(parse_start("now").unwrap(), Start::Now);
        assert_eq!(parse_start("e1:7").unwrap(), after("e1:7"));
        let e = parse_start("garbage").unwrap_err().to_string();
        assert!(
            e.starts_with("invalid_position: --after \"garbage\""),
            "{e}"
        );
    }
}
