//! Messages as stored and delivered, and as handed to an engine for appending.

use bytes::Bytes;

use crate::position::Offset;

/// A message to append: everything but the place the engine gives it.
#[derive(Clone, Debug, Default)]
pub struct NewMessage {
    pub payload: Bytes,
    pub content_type: Option<String>,
    /// Conflation key: for a slow subscriber of a conflated stream only the latest message per
    /// key is kept.
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    /// A retry with the same key on the same stream within the dedup window appends nothing and
    /// answers the original position.
    pub idempotency_key: Option<String>,
}

impl NewMessage {
    /// The stored message this becomes at `offset`, published at `time_ms`, and its
    /// idempotency key (kept by the engine's dedup window, not in the message).
    pub fn stamp(self, offset: Offset, time_ms: u64) -> (Message, Option<String>) {
        let message = Message {
            offset,
            time_ms,
            payload: self.payload,
            content_type: self.content_type,
            key: self.key,
            headers: self.headers,
        };
        (message, self.idempotency_key)
    }
}

/// A stored message. Engines hand these out behind an `Arc`, so one copy serves every reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub offset: Offset,
    /// Publish time, ms since the Unix epoch.
    pub time_ms: u64,
    pub payload: Bytes,
    pub content_type: Option<String>,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Message {
    /// The bytes this message counts against a stream's `max_bytes` retention.
    pub fn retained_bytes(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        (self.payload.len()
            + self.content_type.as_ref().map_or(0, String::len)
            + self.key.as_ref().map_or(0, String::len)
            + headers) as u64
    }
}
