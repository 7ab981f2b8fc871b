//! One subscription's deliveries: a stream that reads history only when the outbound buffer has
//! room for it, so a slow client costs a cursor, not a queue; replay and live are the same read
//! loop, as for SSE.

use std::{sync::Arc, time::Duration};

use futures::{
    StreamExt,
    stream::{self, BoxStream},
};

use super::outbound::{Room, Taken};
use crate::delivery::subscription::{Budget, Event, Subscription};

/// Longest wait between retries of a subscription whose engine reads fail.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// One subscription's deliveries: batches of events, each with the room it took.
pub type Deliveries = BoxStream<'static, Vec<(Event, Taken)>>;

/// A subscription's deliveries. It reads only when the outbound buffer has room, as much as
/// fits; an engine failure is retried with backoff (the client stays connected and catches up
/// from history when the engine is back). A subscription that had more to read while the
/// buffer was full and later reaches the head counts as a slow consumer that caught up
/// (`spool_slow_consumers_total{outcome="caught_up"}`).
pub fn deliveries(
    sub: Subscription,
    room: Arc<Room>,
    conflate: bool,
    metrics: Arc<crate::metrics::Metrics>,
) -> Deliveries {
    stream::unfold((sub, true, false), move |(mut sub, mut more, mut behind)| {
        let room = room.clone();
        let metrics = metrics.clone();
        async move {
            let mut retry = Duration::from_millis(100);
            loop {
                if !more
                    && !sub.has_news()
                    && let Err(e) = sub.changed().await
                {
                    tracing::warn!(error = %e, stream = %sub.stream(), "cannot watch a stream; retrying");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                    continue;
                }
                if more && room.is_full() {
                    behind = true;
                }
                let taken = room.take().await;
                let budget = Budget {
                    messages: taken.messages,
                    bytes: taken.bytes,
                    conflate,
                };
                let events = match sub.poll_within(budget).await {
                    Ok(events) => events,
                    Err(e) => {
                        room.give_back(taken);
                        tracing::warn!(error = %e, stream = %sub.stream(), "a subscription read failed; retrying");
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(MAX_RETRY);
                        more = true;
                        continue;
                    }
                };
                more = match (sub.last_state(), sub.position()) {
                    (Some(state), Some(position)) => {
                        state.epoch == position.epoch && state.head > position.offset
                    }
                    _ => false,
                };
                if behind && !more {
                    behind = false;
                    metrics.slow_consumer("caught_up");
                }
                if events.is_empty() {
                    room.give_back(taken);
                    continue;
                }
                // Share the room out over the messages; what is left goes back now.
                let mut left = taken;
                let batch: Vec<(Event, Taken)> = events
                    .into_iter()
                    .map(|event| {
                        let share = match &event {
                            Event::Message { message, .. } if left.messages > 0 => {
                                let bytes = (message.retained_bytes() as usize).min(left.bytes);
                                left.messages -= 1;
                                left.bytes -= bytes;
                                Taken { messages: 1, bytes }
                            }
                            _ => Taken::default(),
                        };
                        (event, share)
                    })
                    .collect();
                room.give_back(left);
                return Some((batch, (sub, more, behind)));
            }
        }
    })
    .boxed()
}
