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
                // Held by a guard: the read below is an await (a round trip on a cluster
                // engine), and an unsubscribe drops these deliveries wherever they wait.
                let held = Held {
                    taken: room.take().await,
                    room: &room,
                };
                let budget = Budget {
                    messages: held.taken.messages,
                    bytes: held.taken.bytes,
                    conflate,
                };
                let events = match sub.poll_within(budget).await {
                    Ok(events) => events,
                    Err(e) => {
                        drop(held);
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
                    drop(held);
                    continue;
                }
                // Share the room out over the messages; what is left goes back now.
                let mut left = held.into_taken();
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

/// Room taken for one read, given back when dropped — also when the deliveries are dropped
/// while the read is in flight (an unsubscribe, or a reposition, removes them from the
/// connection). The room taken is all the connection had: lost, it would leave every other
/// subscription of the connection waiting for room for good.
struct Held<'a> {
    taken: Taken,
    room: &'a Room,
}

impl Held<'_> {
    /// The room, to hand out with the events read; no longer given back on drop.
    fn into_taken(mut self) -> Taken {
        std::mem::take(&mut self.taken)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.room.give_back(std::mem::take(&mut self.taken));
    }
}
