//! `spool tail STREAM`: print a stream's messages as `EPOCH:OFFSET<TAB>DATA`, one per line,
//! then follow it live. A lost continuity prints `reset<TAB>REASON<TAB>EPOCH:OFFSET`.
//!
//! It reads with long-polls and keeps its position, so when the connection drops or the
//! server restarts it reconnects (with capped exponential backoff) and resumes exactly where
//! it was: the server answers with the missed messages, or with a reset.

use std::{io::Write, time::Duration};

use anyhow::bail;
use clap::Args;
use spool_protocol::http::{MessageBody, MessagesResponse};

use crate::client::{Client, ClientArgs, RequestError};

/// Seconds each long-poll waits on the server.
const POLL_WAIT_SECS: u64 = 25;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct TailArgs {
    /// The stream to follow.
    pub stream: String,
    /// Start after this position (`EPOCH:OFFSET`), or `oldest`, `latest`, `now`.
    #[arg(long, conflicts_with = "from_start")]
    pub after: Option<String>,
    /// Start from the oldest retained message (default: from now).
    #[arg(long)]
    pub from_start: bool,
    /// Exit after printing this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Exit once caught up instead of following live.
    #[arg(long)]
    pub no_follow: bool,
    /// Messages per request.
    #[arg(long, default_value_t = 500)]
    pub limit: u32,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let mut after = match (&args.after, args.from_start) {
        (Some(a), _) => a.clone(),
        (None, true) => "oldest".to_owned(),
        (None, false) => "now".to_owned(),
    };
    let mut printed = 0u64;
    let mut backoff = Duration::from_millis(100);
    let url = client.url(&["v1", "streams", &args.stream, "messages"]);
    let wait = if args.no_follow { 0 } else { POLL_WAIT_SECS };
    loop {
        let request = client
            .get(url.clone())
            .query(&[("after", after.as_str())])
            .query(&[("limit", args.limit), ("wait", wait as u32)])
            .timeout(Duration::from_secs(POLL_WAIT_SECS + 10));
        let answer: MessagesResponse = match client.send_json(request).await {
            Ok(answer) => answer,
            Err(RequestError::Rejected(status, msg)) => bail!("{status}: {msg}"),
            Err(RequestError::Transient(msg)) => {
                eprintln!("spool tail: {msg}; retrying in {backoff:?} from {after}");
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let mut out = std::io::stdout().lock();
        if let Some(reset) = &answer.reset {
            writeln!(out, "reset\t{}\t{}", reset.reason, reset.position)?;
        }
        let caught_up = answer.messages.is_empty();
        for m in &answer.messages {
            writeln!(out, "{}:{}\t{}", m.epoch, m.offset, display(m))?;
            printed += 1;
            if args.count.is_some_and(|c| printed >= c) {
                out.flush()?;
                return Ok(());
            }
        }
        out.flush()?;
        if !answer.position.is_empty() {
            after = answer.position;
        }
        if args.no_follow && caught_up && answer.reset.is_none() {
            return Ok(());
        }
    }
}

/// The payload on one line: text with CR/LF escaped as `\r` / `\n`, or `base64:…` for bytes.
fn display(m: &MessageBody) -> String {
    match (&m.data, &m.data_base64) {
        (Some(text), _) => text.replace('\r', "\\r").replace('\n', "\\n"),
        (None, Some(b64)) => format!("base64:{b64}"),
        (None, None) => String::new(),
    }
}

fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d + d.mul_f64(f64::from(nanos % 1000) / 2000.0)
}
