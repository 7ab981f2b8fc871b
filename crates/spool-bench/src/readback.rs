//! The read-back check: after publishing, read each stream from its oldest message with
//! long-poll (`GET /v1/streams/{stream}/messages?after=…&limit=1000`) until an answer comes
//! back empty, and compare what was read with what was acked.
//!
//! An ack that was not stored would make a fast but meaningless benchmark; this catches it.
//! It also checks that offsets run 1, 2, 3… in one epoch with no reset, and times the read.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use reqwest::{
    Url,
    header::{AUTHORIZATION, HeaderValue},
};
use spool_protocol::http::MessagesResponse;
use tokio::time::Instant;

/// Messages asked for per request (the server's maximum).
pub const PAGE_LIMIT: u64 = 1000;
/// Extra requests allowed beyond `acked / PAGE_LIMIT`, before giving up on a stream that
/// seems never to end.
const SPARE_PAGES: u64 = 10;
/// Problems listed per stream.
const MAX_PROBLEMS: usize = 5;

/// What reading one stream back found.
#[derive(Debug)]
pub struct ReadBack {
    pub target: String,
    pub stream: String,
    pub acked: u64,
    pub read: u64,
    pub elapsed: Duration,
    /// Anything wrong besides the count: a reset, a gap, a second epoch.
    pub problems: Vec<String>,
}

impl ReadBack {
    pub fn ok(&self) -> bool {
        self.read == self.acked && self.problems.is_empty()
    }

    pub fn msgs_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.read as f64 / secs
        } else {
            0.0
        }
    }
}

/// Reads `stream` on the Spool server at `base` from its oldest message to its head.
pub async fn read_stream(
    target: &str,
    client: &reqwest::Client,
    base: &Url,
    auth: &HeaderValue,
    stream: &str,
    acked: u64,
) -> Result<ReadBack> {
    let url = base
        .join(&format!("v1/streams/{stream}/messages"))
        .with_context(|| format!("bad read URL for stream {stream:?}"))?;
    let limit = PAGE_LIMIT.to_string();
    let mut after = "oldest".to_owned();
    let mut read = 0u64;
    let mut epoch: Option<String> = None;
    let mut next_offset = 1u64;
    let mut problems = Vec::new();
    let mut note = |problem: String| {
        if problems.len() < MAX_PROBLEMS {
            problems.push(problem);
        }
    };
    let mut reached_end = false;
    let started = Instant::now();
    for _ in 0..acked / PAGE_LIMIT + SPARE_PAGES {
        let response = client
            .get(url.clone())
            .query(&[("after", after.as_str()), ("limit", limit.as_str())])
            .header(AUTHORIZATION, auth.clone())
            .send()
            .await
            .with_context(|| format!("reading {stream} after {after} failed"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!("reading {stream} after {after}: HTTP {status}: {body}");
        }
        let page: MessagesResponse = response
            .json()
            .await
            .with_context(|| format!("reading {stream} after {after}: bad answer"))?;
        if let Some(reset) = &page.reset {
            note(format!(
                "reset after {after}: {} (head {})",
                reset.reason, reset.position
            ));
        }
        if page.messages.is_empty() {
            reached_end = true;
            break;
        }
        for m in &page.messages {
            match &epoch {
                None => epoch = Some(m.epoch.clone()),
                Some(e) if *e != m.epoch => note(format!("epoch changed from {e} to {}", m.epoch)),
                Some(_) => {}
            }
            if m.offset != next_offset {
                note(format!("expected offset {next_offset}, got {}", m.offset));
            }
            next_offset = m.offset + 1;
        }
        read += page.messages.len() as u64;
        after = page.position;
    }
    let elapsed = started.elapsed();
    if !reached_end {
        note(format!(
            "still not at the end after {read} messages; gave up"
        ));
    }
    Ok(ReadBack {
        target: target.to_owned(),
        stream: stream.to_owned(),
        acked,
        read,
        elapsed,
        problems,
    })
}
