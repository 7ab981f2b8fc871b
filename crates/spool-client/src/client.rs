//! The application's handle: requests in, events out.

use std::sync::Arc;

use spool_core::Start;
use tokio::{
    sync::{Mutex, mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use spool_protocol::{groups::ReceiptOutcome, ws};

use crate::{
    Ack, Config, Error, Event, Outgoing, SettleOp, Subscription,
    connection::{Command, Connection, End, Reply},
};

/// A connection to a Spool server that keeps itself up: it reconnects with backoff,
/// resumes its session and every subscription, and retries unacknowledged publishes.
///
/// Cloning is cheap and every clone talks to the same connection. The connection closes
/// when [`Client::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    events: Mutex<mpsc::Receiver<Event>>,
    cancel: CancellationToken,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Client {
    /// Connects to the server (one attempt: the error says why it failed) and starts the
    /// background task that keeps the connection up from then on. The first event is
    /// [`Event::Connected`].
    pub async fn connect(config: Config) -> Result<Client, Error> {
        let (event_tx, event_rx) = mpsc::channel(config.event_capacity);
        let (command_tx, command_rx) = mpsc::channel(config.command_capacity);
        let cancel = CancellationToken::new();
        let mut connection = Connection::new(config, command_rx, event_tx, cancel.clone());
        let established = connection.establish().await.map_err(|end| match end {
            End::Lost(e) | End::Fatal(e) => e,
            End::Stopped => Error::ClientClosed,
        })?;
        let task = tokio::spawn(connection.run(Some(established)));
        Ok(Client {
            inner: Arc::new(Inner {
                commands: command_tx,
                events: Mutex::new(event_rx),
                cancel,
                task: std::sync::Mutex::new(Some(task)),
            }),
        })
    }

    /// Subscribes to `stream` from `start`; resolves when the server confirms. The messages
    /// arrive as [`Event::Message`]s. The subscription survives reconnects: the client
    /// resumes it after the last position it handed to the application.
    pub async fn subscribe(
        &self,
        stream: impl Into<String>,
        start: Start,
    ) -> Result<Subscription, Error> {
        let stream = stream.into();
        self.request(|reply| Command::Subscribe {
            stream,
            start,
            reply,
        })
        .await
    }

    /// Ends a subscription; no message of `stream` is delivered after this returns.
    pub async fn unsubscribe(&self, stream: impl Into<String>) -> Result<(), Error> {
        let stream = stream.into();
        self.request(|reply| Command::Unsubscribe { stream, reply })
            .await
    }

    /// Publishes a message; resolves when the server acknowledges it as durable. Many
    /// publishes may be in flight at once (run the futures concurrently). A publish cut off
    /// by a disconnect is sent again after the reconnect with the same idempotency key, so
    /// it is appended once.
    ///
    /// The ack is read from the same connection as the messages: keep reading
    /// [`Client::next_event`] (from another task) while awaiting it.
    pub async fn publish(
        &self,
        stream: impl Into<String>,
        message: Outgoing,
    ) -> Result<Ack, Error> {
        let frame = message.into_frame(stream.into());
        self.request(|reply| Command::Publish { frame, reply })
            .await
    }

    /// Replaces the connection's token (same identity) before it expires, and uses the new
    /// one for later reconnects. Resolves to the new expiry (ms since the Unix epoch), if
    /// the token has one.
    pub async fn refresh(&self, token: impl Into<String>) -> Result<Option<u64>, Error> {
        let token = token.into();
        self.request(|reply| Command::Refresh { token, reply })
            .await
    }

    /// Joins consumer group `group` of `stream` as member `consumer` with a window of
    /// `credit` messages (0–1000; docs/protocol.md "Consumer groups"): the server pushes up
    /// to `credit` unsettled leases as [`Event::Leased`], and each ack, nack or terminate
    /// (or a lease running out) makes room for the next. Resolves once the server accepted
    /// it. After a reconnect the client consumes again by itself; the leases held when the
    /// connection ended were given back (they come again, with `deliveries` one higher).
    pub async fn consume(
        &self,
        stream: impl Into<String>,
        group: impl Into<String>,
        consumer: impl Into<String>,
        credit: u32,
    ) -> Result<(), Error> {
        let frame = ws::Consume {
            id: None,
            stream: stream.into(),
            group: group.into(),
            consumer: consumer.into(),
            credit,
            visibility_timeout: None,
        };
        self.consume_with(frame).await
    }

    /// [`Client::consume`] with every field of the `consume` frame (e.g. a
    /// `visibility_timeout`); its `id` is the client's.
    pub async fn consume_with(&self, frame: ws::Consume) -> Result<(), Error> {
        self.request(|reply| Command::Consume { frame, reply })
            .await
    }

    /// Sets a consume's window (0 pauses it; leases already pushed stay).
    pub async fn credit(
        &self,
        stream: impl Into<String>,
        group: impl Into<String>,
        credit: u32,
    ) -> Result<(), Error> {
        let (stream, group) = (stream.into(), group.into());
        self.request(|reply| Command::Credit {
            stream,
            group,
            credit,
            reply,
        })
        .await
    }

    /// Acks leases of a consumed group by receipt: one result per receipt, in order
    /// (`ok`, `expired` or `unknown`).
    pub async fn ack(
        &self,
        stream: impl Into<String>,
        group: impl Into<String>,
        receipts: Vec<String>,
    ) -> Result<Vec<ReceiptOutcome>, Error> {
        let frame = ws::Settle {
            stream: stream.into(),
            group: group.into(),
            receipts,
            ..Default::default()
        };
        self.settle(SettleOp::Ack, frame).await
    }

    /// Any settle operation with every field of its frame (`delay` and `reason` for a
    /// nack, `reason` for a terminate, `visibility_timeout` for an extend); its `id` is the
    /// client's.
    pub async fn settle(
        &self,
        op: SettleOp,
        frame: ws::Settle,
    ) -> Result<Vec<ReceiptOutcome>, Error> {
        self.request(|reply| Command::Settle { op, frame, reply })
            .await
    }

    /// Leaves a consumed group: the leases still held are given back at once.
    pub async fn stop_consuming(
        &self,
        stream: impl Into<String>,
        group: impl Into<String>,
    ) -> Result<(), Error> {
        let (stream, group) = (stream.into(), group.into());
        self.request(|reply| Command::StopConsuming {
            stream,
            group,
            reply,
        })
        .await
    }

    /// The next event; `None` once the client is closed and every event was read.
    /// Not reading events stops the client from reading the socket (backpressure).
    pub async fn next_event(&self) -> Option<Event> {
        self.inner.events.lock().await.recv().await
    }

    /// Closes the connection gracefully (a WebSocket close) and stops reconnecting.
    /// Requests still waiting fail with [`Error::ClientClosed`]; events already received
    /// can still be read.
    pub async fn close(&self) {
        self.inner.cancel.cancel();
        let task = self.inner.task.lock().ok().and_then(|mut task| task.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    async fn request<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        self.inner
            .commands
            .send(command(reply))
            .await
            .map_err(|_| Error::ClientClosed)?;
        answer.await.unwrap_or(Err(Error::ClientClosed))
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}
