//! A message to publish, and the server's acknowledgement of it.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use rand::RngExt;
use spool_core::Position;
use spool_protocol::ws::Publish;

/// A message to publish: a payload and optional metadata.
///
/// ```
/// let m = spool_client::Outgoing::text(r#"{"hello":"world"}"#)
///     .content_type("application/json")
///     .key("greeting")
///     .header("trace", "abc");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    payload: Payload,
    content_type: Option<String>,
    key: Option<String>,
    headers: BTreeMap<String, String>,
    idempotency_key: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Payload {
    Text(String),
    Binary(Bytes),
}

impl Outgoing {
    /// A text payload (sent as `data`).
    pub fn text(text: impl Into<String>) -> Self {
        Self::with(Payload::Text(text.into()))
    }

    /// A binary payload (sent as `data_base64`).
    pub fn bytes(bytes: impl Into<Bytes>) -> Self {
        Self::with(Payload::Binary(bytes.into()))
    }

    fn with(payload: Payload) -> Self {
        Self {
            payload,
            content_type: None,
            key: None,
            headers: BTreeMap::new(),
            idempotency_key: None,
        }
    }

    /// The payload's media type, kept with the message (e.g. `application/json`).
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// The conflation key: on a conflated stream a reader that falls behind gets only the
    /// newest message per key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// A header kept with the message; repeat for more.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// The key that makes retries of this publish append it once. Without one the client
    /// makes a random one, so its own retries after a reconnect are never duplicates.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// The `publish` frame (without its request id).
    pub(crate) fn into_frame(self, stream: String) -> Publish {
        let (data, data_base64) = match self.payload {
            Payload::Text(t) => (Some(t), None),
            Payload::Binary(b) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&b)),
            ),
        };
        Publish {
            id: None,
            stream,
            data,
            data_base64,
            content_type: self.content_type,
            key: self.key,
            headers: self.headers,
            idempotency_key: Some(self.idempotency_key.unwrap_or_else(random_key)),
        }
    }
}

/// 128 random bits in hex: unique enough that two publishes never share one.
fn random_key() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// A publish the server made durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The stream it was appended to.
    pub stream: String,
    /// Where the message is in the stream.
    pub position: Position,
    /// True when the server had already appended it (an idempotent retry).
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_bytes_become_data_and_data_base64() {
        let f = Outgoing::text("hi").key("k").into_frame("s".into());
        assert_eq!(f.data.as_deref(), Some("hi"));
        assert_eq!(f.data_base64, None);
        assert_eq!(f.key.as_deref(), Some("k"));
        let f = Outgoing::bytes(vec![0u8, 255]).into_frame("s".into());
        assert_eq!(f.data, None);
        assert_eq!(f.data_base64.as_deref(), Some("AP8="));
    }

    #[test]
    fn every_publish_gets_an_idempotency_key() {
        let a = Outgoing::text("x").into_frame("s".into());
        let b = Outgoing::text("x").into_frame("s".into());
        let (a, b) = (a.idempotency_key.unwrap(), b.idempotency_key.unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        let c = Outgoing::text("x")
            .idempotency_key("mine")
            .into_frame("s".into());
        assert_eq!(c.idempotency_key.as_deref(), Some("mine"));
    }
}
