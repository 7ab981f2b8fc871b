//! `--transport ws`: the WebSocket protocol on `/v1/ws` through `spool-client`, which keeps
//! the connection up: it reconnects with backoff, resumes its session (or subscribes again
//! after the last message printed) and drops the duplicates a reconnect may bring.

use anyhow::{Context, bail};
use futures::FutureExt;
use spool_client::{Client as WsClient, Config, Error, ErrorCode, Event, Start};
use spool_protocol::ws::close;
use tokio_util::sync::CancellationToken;

use super::{Flow, MAX_BACKOFF, MIN_BACKOFF, Printer, TailArgs, backoff, escape};
use spool_client::http::HttpClient as Client;

pub(super) async fn run(
    client: &Client,
    args: &TailArgs,
    start: Start,
    printer: &mut Printer,
    interrupted: &CancellationToken,
) -> anyhow::Result<()> {
    let mut url = client.url(&["v1", "ws"]);
    let ws_scheme = match url.scheme() {
        "http" => "ws",
        "https" => "wss",
        _ => "",
    };
    if ws_scheme.is_empty() || url.set_scheme(ws_scheme).is_err() {
        bail!(
            "--transport ws needs an http:// or https:// server URL, got {}",
            args.client.server
        );
    }
    let mut config = Config::new(url.as_str()).backoff(MIN_BACKOFF, MAX_BACKOFF);
    if let Some(tls) = args.client.tls()? {
        config = config.tls(tls);
    }
    if let Some(token) = args.client.token.as_deref().filter(|t| !t.is_empty()) {
        config = config.token(token);
    }
    let ws = tokio::select! {
        ws = connect(config) => ws?,
        _ = interrupted.cancelled() => return Ok(()),
    };
    let outcome = tokio::select! {
        outcome = subscribe_and_print(&ws, &args.stream, start, printer) => outcome,
        _ = interrupted.cancelled() => Ok(()),
    };
    let flushed = printer.flush();
    ws.close().await;
    outcome.and(flushed.map_err(Into::into))
}

/// Connects, trying again with backoff while the server cannot be reached; gives up on
/// what retrying cannot fix (credentials, a bad URL).
async fn connect(config: Config) -> anyhow::Result<WsClient> {
    let mut backoff = backoff();
    loop {
        match WsClient::connect(config.clone()).await {
            Ok(ws) => return Ok(ws),
            Err(e) if !retryable(&e) => return Err(e).context("cannot connect over WebSocket"),
            Err(e) => {
                eprintln!("spool tail: {e}; retrying in {:?}", backoff.ceiling());
                backoff.wait().await;
            }
        }
    }
}

fn retryable(e: &Error) -> bool {
    match e {
        Error::Connect(_) | Error::Timeout | Error::ConnectionLost(_) => true,
        Error::Closed { code, .. } => close::should_reconnect(*code),
        Error::Server { code, .. } => !matches!(
            code,
            ErrorCode::Unauthorized | ErrorCode::InvalidToken | ErrorCode::Forbidden
        ),
        _ => false,
    }
}

async fn subscribe_and_print(
    ws: &WsClient,
    stream: &str,
    start: Start,
    printer: &mut Printer,
) -> anyhow::Result<()> {
    ws.subscribe(stream, start)
        .await
        .with_context(|| format!("cannot subscribe to {stream:?}"))?;
    loop {
        // Print what is already here in one write; flush before waiting for more.
        let event = match ws.next_event().now_or_never() {
            Some(event) => event,
            None => {
                printer.flush()?;
                ws.next_event().await
            }
        };
        let flow = match event {
            Some(Event::Message(m)) => {
                let data = match m.text() {
                    Some(text) => escape(text),
                    None => {
                        use base64::Engine as _;
                        let b64 = base64::engine::general_purpose::STANDARD.encode(&m.payload);
                        format!("base64:{b64}")
                    }
                };
                printer.message_line(m.position.epoch.as_str(), m.position.offset.get(), &data)?
            }
            Some(Event::Reset {
                reason, position, ..
            }) => printer.reset(&reason, &position.to_string())?,
            Some(Event::Skipped {
                epoch,
                after,
                through,
                count,
                ..
            }) => printer.skipped(epoch.as_str(), after.get(), through.get(), count)?,
            Some(Event::Disconnected { reason }) => {
                eprintln!("spool tail: {reason}; reconnecting");
                Flow::Continue
            }
            Some(Event::Error {
                error,
                terminal: true,
            }) => bail!("{error}"),
            Some(Event::Error { error, .. }) => {
                eprintln!("spool tail: {error}");
                Flow::Continue
            }
            Some(Event::Unsubscribed { reason, .. }) => bail!(
                "the server ended the subscription ({})",
                reason.as_deref().unwrap_or("no reason given")
            ),
            Some(_) => Flow::Continue, // connected, subscribed
            None => bail!("the WebSocket client stopped"),
        };
        if flow == Flow::Stop {
            return Ok(());
        }
    }
}
