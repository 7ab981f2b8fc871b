//! `--transport poll`: long-polls on `GET /v1/streams/STREAM/messages`, each answer saying
//! where to continue. `--no-follow` reads without waiting until an answer has no messages.

use std::time::Duration;

use anyhow::bail;
use spool_core::Start;
use spool_protocol::http::MessagesResponse;

use super::{Flow, Printer, TailArgs, backoff};
use crate::client::{Client, RequestError};

/// Seconds each long-poll waits on the server.
const POLL_WAIT_SECS: u64 = 25;
/// Messages per request unless `--limit` says otherwise.
const DEFAULT_LIMIT: u32 = 500;

pub(super) async fn run(
    client: &Client,
    args: &TailArgs,
    start: &Start,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let mut after = start.to_string();
    let mut backoff = backoff();
    let url = client.url(&["v1", "streams", &args.stream, "messages"]);
    let wait = if args.no_follow { 0 } else { POLL_WAIT_SECS };
    let limit = args.limit.unwrap_or(DEFAULT_LIMIT);
    loop {
        let request = client
            .get(url.clone())
            .query(&[("after", after.as_str())])
            .query(&[("limit", limit), ("wait", wait as u32)])
            .timeout(Duration::from_secs(POLL_WAIT_SECS + 10));
        let answer: MessagesResponse = match client.send_json(request).await {
            Ok(answer) => answer,
            Err(RequestError::Rejected(status, msg)) => bail!("{status}: {msg}"),
            Err(RequestError::Transient(msg)) => {
                eprintln!(
                    "spool tail: {msg}; retrying in {:?} from {after}",
                    backoff.ceiling()
                );
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        if let Some(reset) = &answer.reset {
            // Never ends a poll read: its `position` is where the next request continues.
            let _ = printer.reset(&reset.reason, &reset.position)?;
        }
        let caught_up = answer.messages.is_empty();
        for m in &answer.messages {
            if printer.message(m)? == Flow::Stop {
                printer.flush()?;
                return Ok(());
            }
        }
        printer.flush()?;
        if !answer.position.is_empty() {
            after = answer.position;
        }
        if args.no_follow && caught_up && answer.reset.is_none() {
            return Ok(());
        }
    }
}
