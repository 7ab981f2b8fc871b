//! `--transport poll`: long-polls on `GET /v1/streams/STREAM/messages` through
//! spool-client's [`LongPoll`], each answer saying where to continue. `--no-follow` reads
//! without waiting until an answer has no messages.

use spool_client::{
    http::HttpClient as Client,
    poll::{DEFAULT_LIMIT, DEFAULT_WAIT_SECS, LongPoll, PollItem},
};
use spool_core::Start;

use super::{Flow, MAX_BACKOFF, MIN_BACKOFF, Printer, TailArgs};

pub(super) async fn run(
    client: &Client,
    args: &TailArgs,
    start: &Start,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let mut reader = LongPoll::new(client, &args.stream, start)
        .limit(args.limit.unwrap_or(DEFAULT_LIMIT))
        .wait(if args.no_follow { 0 } else { DEFAULT_WAIT_SECS })
        .backoff(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        let answer = match reader.next().await? {
            PollItem::Answer(answer) => answer,
            PollItem::Retry(retry) => {
                eprintln!(
                    "spool tail: {}; retrying in {:?} from {}",
                    retry.why,
                    retry.delay,
                    retry.from.as_deref().unwrap_or_default()
                );
                continue;
            }
        };
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
        if args.no_follow && caught_up && answer.reset.is_none() {
            return Ok(());
        }
    }
}
