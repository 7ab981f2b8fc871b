//! The Rust client of Spool's WebSocket protocol, `spool.v1.json`.
//!
//! A [`Client`] keeps one WebSocket to a Spool server up for the application: it reconnects
//! with capped exponential backoff and full jitter, resumes its session (or, when the
//! session is gone, re-subscribes every stream itself), and tracks the position of every
//! subscription so that the application gets each message once, in order, and is told
//! plainly (an [`Event::Reset`]) when the server could not keep continuity (SPEC §2).
//!
//! ```no_run
//! use spool_client::{Client, Config, Event, Outgoing, Start};
//!
//! # async fn demo() -> Result<(), spool_client::Error> {
//! let client = Client::connect(Config::new("ws://127.0.0.1:7070/v1/ws").token("my-api-key")).await?;
//! client.subscribe("chat:1", Start::Now).await?;
//!
//! // The ack comes back on the same connection as the events: read events in another task.
//! let reader = client.clone();
//! tokio::spawn(async move {
//!     while let Some(event) = reader.next_event().await {
//!         match event {
//!             Event::Message(m) => println!("{} {}: {:?}", m.stream, m.position, m.text()),
//!             Event::Reset { stream, reason, position } => {
//!                 println!("{stream}: continuity lost ({reason}), continuing after {position}")
//!             }
//!             Event::Error { error, terminal: true } => eprintln!("gave up: {error}"),
//!             other => println!("{other:?}"),
//!         }
//!     }
//! });
//!
//! let ack = client.publish("chat:1", Outgoing::text("hi").key("k")).await?;
//! println!("stored at {}", ack.position);
//! client.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! Resuming from a stored position, e.g. after a restart of the application:
//!
//! ```no_run
//! # async fn demo(client: spool_client::Client) -> Result<(), spool_client::Error> {
//! let last: spool_client::Position = "a1B2c3:42".parse().expect("a position");
//! client.subscribe("orders", spool_client::Start::After(last)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! Everything between the application and the socket is bounded: requests wait for room,
//! and when [`Client::next_event`] is not called the client stops reading the socket, so
//! the server's flow control applies. `ws://` and `wss://` (TLS trusting the system's store,
//! or a CA of your own: [`Tls`]).
//!
//! Over plain HTTP, the same crate has a publish client ([`http::HttpClient`]), a
//! Server-Sent Events reader ([`sse::SseReader`]) and a long-poll reader
//! ([`poll::LongPoll`]); they keep their position and reconnect with the same [`Backoff`].

pub mod backoff;
mod client;
mod config;
mod connection;
mod cursor;
mod error;
mod event;
pub mod groups;
pub mod http;
mod outgoing;
pub mod poll;
pub mod sse;
pub mod tls;

pub use backoff::Backoff;
pub use client::Client;
pub use config::Config;
pub use error::Error;
pub use event::{Event, Message, Subscription};
pub use outgoing::{Ack, Outgoing};
pub use spool_core::{Epoch, Offset, Position, Start};
pub use spool_protocol::{ErrorCode, ws::SettleOp};
pub use tls::{Tls, TlsError};
