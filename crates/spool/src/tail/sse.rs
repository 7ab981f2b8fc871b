//! `--transport sse`: Server-Sent Events on `GET /v1/streams/STREAM/events?format=json`
//! through spool-client's [`SseReader`], which reconnects with backoff and `Last-Event-ID`
//! and drops what a resume sends again.

use spool_client::{
    http::HttpClient as Client,
    sse::{SseItem, SseReader},
};
use spool_core::Start;

use super::{Flow, MAX_BACKOFF, MIN_BACKOFF, Printer, TailArgs};

pub(super) async fn run(
    client: &Client,
    args: &TailArgs,
    start: &Start,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let mut reader =
        SseReader::new(client, &args.stream, start.clone()).backoff(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        if !reader.has_buffered() {
            printer.flush()?;
        }
        let flow = match reader.next().await {
            Ok(SseItem::Message(m)) => printer.message(&m)?,
            Ok(SseItem::Reset(reset)) => printer.reset(&reset.reason, &reset.position)?,
            Ok(SseItem::Retry(retry)) => {
                printer.flush()?;
                match &retry.from {
                    Some(from) => eprintln!(
                        "spool tail: {}; reconnecting in {:?} from {from}",
                        retry.why, retry.delay
                    ),
                    None => eprintln!("spool tail: {}; retrying in {:?}", retry.why, retry.delay),
                }
                Flow::Continue
            }
            Err(e) => {
                printer.flush()?;
                return Err(e.into());
            }
        };
        if flow == Flow::Stop {
            printer.flush()?;
            return Ok(());
        }
    }
}
