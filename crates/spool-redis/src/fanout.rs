//! Cross-node fan-out: one task per engine listens on the `<prefix>:heads` channel and moves
//! this node's head watches when any node appends.
//!
//! Pub/sub delivers at most once, and nothing while the connection is down. So after every
//! (re)subscription the task re-reads every watched stream and moves its head from the truth
//! in Redis; a notification lost meanwhile costs a read, never a subscriber left waiting. The
//! tail cache is dropped too, as Redis may have restarted without its data (the re-read then
//! registers a new epoch, and the epoch change wakes the watchers).

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use redis::Client;
use spool_engine::cluster::HeadNote;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::Shared;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the subscription is pinged, so a connection that died silently (no reset from
/// the peer) is noticed and replaced.
const PING_EVERY: Duration = Duration::from_secs(5);

/// Runs until `cancel` fires. The first subscription's outcome goes to `ready`; if it fails
/// the task ends (the engine's `connect` reports the error).
pub async fn run(
    shared: Arc<Shared>,
    client: Client,
    cancel: CancellationToken,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut ready = Some(ready);
    let mut backoff = BACKOFF_MIN;
    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            attempt = subscribe(&shared, &client, ready.is_none()) => attempt,
        };
        match attempt {
            Ok((sink, stream)) => {
                backoff = BACKOFF_MIN;
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Ok(()));
                } else {
                    tracing::info!("redis notification channel is back");
                }
                if listen(&shared, sink, stream, &cancel).await {
                    return;
                }
                tracing::warn!("redis notification channel lost; reconnecting");
            }
            Err(e) => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Err(e));
                    return;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "redis notification channel down");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Subscribes, then (on a resubscription) catches the watched streams up.
async fn subscribe(
    shared: &Shared,
    client: &Client,
    resync: bool,
) -> Result<(redis::aio::PubSubSink, redis::aio::PubSubStream), String> {
    let timeout = shared.config.timeout;
    let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| format!("no connection within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let (mut sink, stream) = pubsub.split();
    tokio::time::timeout(timeout, sink.subscribe(&shared.channel))
        .await
        .map_err(|_| format!("no SUBSCRIBE answer within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    if resync {
        shared
            .node
            .resubscribed(shared)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok((sink, stream))
}

/// Moves heads until the subscription ends (false) or the engine is dropped (true).
async fn listen(
    shared: &Shared,
    mut sink: redis::aio::PubSubSink,
    mut stream: redis::aio::PubSubStream,
    cancel: &CancellationToken,
) -> bool {
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return true,
            msg = stream.next() => match msg {
                // Transient notes share the channel (`spool_engine::cluster::TransientLink`).
                Some(msg) if shared.node.transient().heard(msg.get_payload_bytes()) => {}
                // So do the stream-admin notes (a truncate: drop the cached tail).
                Some(msg) if shared.node.heard_admin(msg.get_payload_bytes()) => {}
                Some(msg) => match HeadNote::decode(msg.get_payload_bytes()) {
                    Some(note) => {
                        shared.node.heads().advance(&note.stream, note.head);
                    }
                    None => tracing::warn!(
                        channel = %shared.channel,
                        "ignored a malformed head notification"
                    ),
                },
                None => return false,
            },
            _ = ping.tick() => {
                let answer = tokio::time::timeout(
                    shared.config.timeout,
                    sink.ping::<redis::Value>(),
                ).await;
                if !matches!(answer, Ok(Ok(_))) {
                    return false;
                }
            }
        }
    }
}

/// Publishes this node's transient notes on the notes channel until `cancel` fires. A note
/// that cannot be published (Redis down) is dropped: it is worth sending only now.
pub async fn send_transient(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut conn = shared.conn.clone();
    loop {
        let note = tokio::select! {
            _ = cancel.cancelled() => return,
            note = shared.node.transient().next_outgoing() => note,
        };
        let Some(note) = note else { return };
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&shared.channel).arg(note.as_ref());
        let publish = cmd.query_async::<i64>(&mut conn);
        match tokio::time::timeout(shared.config.timeout, publish).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot publish a transient note"),
            Err(_) => tracing::debug!("no answer to a transient note's PUBLISH in time"),
        }
    }
}
