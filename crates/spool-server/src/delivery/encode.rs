//! Encode once, share the bytes: a delivered message's wire forms, built the first time a
//! subscriber needs one and then handed to every other subscriber that receives the same
//! message in the same form, as a cheap clone of shared bytes.
//!
//! The forms, each byte for byte what the transports wrote before they shared:
//! - [`Encodings::body`]: the `spool_protocol::http::MessageBody` JSON without `stream` (the
//!   long-poll answer's messages and single-stream SSE `data`);
//! - [`Encodings::body_with_stream`]: the same with `stream` first (multi-stream SSE);
//! - [`Encodings::ws_message`]: the whole WebSocket `message` frame of `spool.v1.json`. It
//!   carries nothing per subscriber (only the stream, the epoch and the message), so every
//!   subscriber of the stream sends the same frame and no splicing is needed.
//! - [`Encodings::cable_frame`]: AnyCable's broadcast frame (`ws/actioncable`), which names
//!   the subscription's channel identifier: kept for the first identifier asked for (all the
//!   subscribers of a stream usually share one), encoded per subscriber for any other.
//!
//! # Why a small table keyed by the message's allocation
//!
//! Engines hand every reader of a recent message the same `Arc<Message>` (their tail caches
//! and the memory engine's log hold them), and a fan-out reads each message within a short
//! window. So the cache is a fixed table of [`SLOTS`] entries, direct-mapped by the `Arc`'s
//! address: the table never grows, a new message evicts whatever held its slot, and nothing
//! is kept alive by the engine or by the message itself (no field in `spool_core::Message`,
//! which every engine builds and which retention keeps for long: an encoding there would
//! double the memory of every retained message). An entry keeps a `Weak` to its message, which
//! keeps the allocation from being reused while the entry exists, so an address match is the
//! same message. The encoded bytes of all entries together are bounded by [`MAX_BYTES`]: past
//! that, a form is encoded for its caller and not kept. A message read from disk again (a new
//! `Arc`) is simply encoded again.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, OnceLock, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use spool_core::{Epoch, Message};

/// Entries in the table (a power of two).
pub const SLOTS: usize = 1 << SLOT_BITS;
const SLOT_BITS: u32 = 12;
/// Most bytes of encoded forms the table keeps.
pub const MAX_BYTES: usize = 32 * 1024 * 1024;

/// The encode-once cache; one per server, shared by every transport.
pub struct Encodings {
    slots: Box<[Mutex<Option<Entry>>]>,
    bits: u32,
    held: Arc<Held>,
}

struct Held {
    bytes: AtomicUsize,
    max: usize,
    /// Forms encoded since the start (for tests and measurements).
    encoded: AtomicU64,
}

struct Entry {
    message: Weak<Message>,
    epoch: Epoch,
    stream: Box<str>,
    forms: Arc<Forms>,
}

/// One message's forms, each filled when first asked for.
struct Forms {
    held: Arc<Held>,
    body: OnceLock<Utf8Bytes>,
    body_with_stream: OnceLock<Utf8Bytes>,
    ws_message: OnceLock<Utf8Bytes>,
    /// AnyCable frames with and without the position fields, with the identifier they name.
    cable: [OnceLock<(Box<str>, Utf8Bytes)>; 2],
}

impl Drop for Forms {
    fn drop(&mut self) {
        let kept: usize = [&self.body, &self.body_with_stream, &self.ws_message]
            .iter()
            .filter_map(|cell| cell.get())
            .map(|b| b.len())
            .chain(
                self.cable
                    .iter()
                    .filter_map(|c| c.get())
                    .map(|(_, b)| b.len()),
            )
            .sum();
        self.held.bytes.fetch_sub(kept, Ordering::Relaxed);
    }
}

impl Default for Encodings {
    fn default() -> Self {
        Self::new(SLOT_BITS, MAX_BYTES)
    }
}

impl Encodings {
    /// A table of `2^bits` entries keeping at most `max_bytes` of encoded forms.
    pub fn new(bits: u32, max_bytes: usize) -> Self {
        Self {
            slots: (0..1usize << bits).map(|_| Mutex::new(None)).collect(),
            bits,
            held: Arc::new(Held {
                bytes: AtomicUsize::new(0),
                max: max_bytes,
                encoded: AtomicU64::new(0),
            }),
        }
    }

    /// The `MessageBody` JSON without `stream`.
    pub fn body(&self, stream: &str, epoch: &Epoch, message: &Arc<Message>) -> Utf8Bytes {
        let forms = self.forms(stream, epoch, message);
        self.fill(&forms.body, || encode_body(None, epoch, message))
    }

    /// The `MessageBody` JSON with `stream`.
    pub fn body_with_stream(
        &self,
        stream: &str,
        epoch: &Epoch,
        message: &Arc<Message>,
    ) -> Utf8Bytes {
        let forms = self.forms(stream, epoch, message);
        self.fill(&forms.body_with_stream, || {
            encode_body(Some(stream), epoch, message)
        })
    }

    /// The WebSocket `message` frame.
    pub fn ws_message(&self, stream: &str, epoch: &Epoch, message: &Arc<Message>) -> Utf8Bytes {
        let forms = self.forms(stream, epoch, message);
        self.fill(&forms.ws_message, || {
            encode_ws_message(stream, epoch.as_str(), message)
        })
    }

    /// AnyCable's broadcast frame of a message for the subscription named `identifier`,
    /// `positioned` (with `stream_id`, `epoch`, `offset`) or not; `encode` builds it.
    pub fn cable_frame(
        &self,
        stream: &str,
        epoch: &Epoch,
        message: &Arc<Message>,
        identifier: &str,
        positioned: bool,
        encode: impl FnOnce() -> String,
    ) -> Utf8Bytes {
        let forms = self.forms(stream, epoch, message);
        let cell = &forms.cable[usize::from(positioned)];
        if let Some((kept_for, bytes)) = cell.get() {
            if **kept_for == *identifier {
                return bytes.clone();
            }
            return Utf8Bytes::from(encode());
        }
        let bytes = Utf8Bytes::from(encode());
        self.held.encoded.fetch_add(1, Ordering::Relaxed);
        let len = bytes.len();
        let before = self.held.bytes.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) > self.held.max
            || cell.set((identifier.into(), bytes.clone())).is_err()
        {
            self.held.bytes.fetch_sub(len, Ordering::Relaxed);
        }
        bytes
    }

    /// Forms encoded since the start.
    pub fn encoded(&self) -> u64 {
        self.held.encoded.load(Ordering::Relaxed)
    }

    /// Bytes of encoded forms kept now.
    pub fn held_bytes(&self) -> usize {
        self.held.bytes.load(Ordering::Relaxed)
    }

    fn forms(&self, stream: &str, epoch: &Epoch, message: &Arc<Message>) -> Arc<Forms> {
        let address = Arc::as_ptr(message) as usize as u64;
        let slot =
            ((address >> 4).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - self.bits)) as usize;
        let mut slot = self.slots[slot].lock();
        if let Some(e) = slot.as_ref()
            && std::ptr::eq(e.message.as_ptr(), Arc::as_ptr(message))
            && e.epoch == *epoch
            && *e.stream == *stream
        {
            return e.forms.clone();
        }
        let forms = Arc::new(Forms {
            held: self.held.clone(),
            body: OnceLock::new(),
            body_with_stream: OnceLock::new(),
            ws_message: OnceLock::new(),
            cable: Default::default(),
        });
        let old = slot.replace(Entry {
            message: Arc::downgrade(message),
            epoch: epoch.clone(),
            stream: stream.into(),
            forms: forms.clone(),
        });
        drop(slot);
        drop(old);
        forms
    }

    /// The form in `cell`, encoding it first if needed; kept only within [`MAX_BYTES`].
    fn fill(&self, cell: &OnceLock<Utf8Bytes>, encode: impl FnOnce() -> String) -> Utf8Bytes {
        if let Some(bytes) = cell.get() {
            return bytes.clone();
        }
        let bytes = Utf8Bytes::from(encode());
        self.held.encoded.fetch_add(1, Ordering::Relaxed);
        let len = bytes.len();
        let before = self.held.bytes.fetch_add(len, Ordering::Relaxed);
        if before.saturating_add(len) > self.held.max || cell.set(bytes.clone()).is_err() {
            self.held.bytes.fetch_sub(len, Ordering::Relaxed);
        }
        bytes
    }
}

/// A stored message as `spool_protocol::http::MessageBody` JSON, from borrowed parts.
pub fn encode_body(stream: Option<&str>, epoch: &Epoch, m: &Message) -> String {
    Wire::new(None, stream, epoch.as_str(), m).to_json()
}

/// A `message` frame of `spool.v1.json`, from borrowed parts.
pub fn encode_ws_message(stream: &str, epoch: &str, message: &Message) -> String {
    Wire::new(Some("message"), Some(stream), epoch, message).to_json()
}

/// The one field list of a delivered message on the wire, borrowed from the stored message:
/// `MessageBody` (long-poll, SSE) and the WebSocket `message` frame differ only in the
/// leading `type` and whether `stream` is present.
#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<&'a str>,
    epoch: &'a str,
    offset: u64,
    time: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Headers::is_empty")]
    headers: Headers<'a>,
}

impl<'a> Wire<'a> {
    fn new(
        kind: Option<&'static str>,
        stream: Option<&'a str>,
        epoch: &'a str,
        m: &'a Message,
    ) -> Self {
        let (data, data_base64) = payload(&m.payload);
        Wire {
            kind,
            stream,
            epoch,
            offset: m.offset.get(),
            time: m.time_ms,
            data,
            data_base64,
            content_type: m.content_type.as_deref(),
            key: m.key.as_deref(),
            headers: Headers(&m.headers),
        }
    }

    fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A message's headers as a JSON object in name order, one value per name (what a map gives).
/// Publish takes them from a map, so they are stored that way and written as they are; only
/// headers stored otherwise go through a map first.
struct Headers<'a>(&'a [(String, String)]);

impl Headers<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Headers<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_sorted_by(|(a, _), (b, _)| a < b) {
            s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
        } else {
            s.collect_map(
                self.0
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect::<BTreeMap<_, _>>(),
            )
        }
    }
}

/// The payload as `data` (UTF-8 text) or `data_base64`.
fn payload(payload: &[u8]) -> (Option<&str>, Option<String>) {
    match std::str::from_utf8(payload) {
        Ok(text) => (Some(text), None),
        Err(_) => {
            use base64::Engine as _;
            (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(payload)),
            )
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use bytes::Bytes;
    use spool_core::Offset;
    use spool_protocol::{
        http::{MessageBody, encode_payload},
        ws::ServerFrame,
    };

    use super::*;

    fn message(offset: u64, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            offset: Offset(offset),
            time_ms: 42,
            payload: Bytes::from_static(payload),
            content_type: Some("application/json".into()),
            key: Some("k".into()),
            headers: vec![("h".into(), "v".into()), ("a\"b".into(), "\n".into())],
        })
    }

    /// What the SSE and long-poll code serialized before: `MessageBody` from cloned fields.
    pub(crate) fn message_body(stream: Option<&str>, epoch: &Epoch, m: &Message) -> MessageBody {
        let (data, data_base64) = encode_payload(&m.payload);
        MessageBody {
            stream: stream.map(ToString::to_string),
            epoch: epoch.to_string(),
            offset: m.offset.get(),
            time: m.time_ms,
            data,
            data_base64,
            content_type: m.content_type.clone(),
            key: m.key.clone(),
            headers: m.headers.iter().cloned().collect(),
        }
    }

    #[test]
    fn delivery_encoding_matches_the_protocol_type() {
        let message = spool_core::Message {
            offset: spool_core::Offset(7),
            time_ms: 42,
            payload: Bytes::from_static(b"{\"a\":1}"),
            content_type: Some("application/json".into()),
            key: Some("k".into()),
            headers: vec![("h".into(), "v".into())],
        };
        let text = encode_ws_message("s", "e", &message);
        let ServerFrame::Message(d) = serde_json::from_str::<ServerFrame>(&text).unwrap() else {
            panic!("not a message frame: {text}");
        };
        assert_eq!(
            (d.stream.as_str(), d.epoch.as_str(), d.offset, d.time),
            ("s", "e", 7, 42)
        );
        assert_eq!(d.payload().unwrap(), b"{\"a\":1}");
        assert_eq!(d.headers.get("h").map(String::as_str), Some("v"));
        let binary = spool_core::Message {
            payload: Bytes::from_static(&[0xff, 0]),
            headers: vec![],
            ..message
        };
        let text = encode_ws_message("s", "e", &binary);
        let ServerFrame::Message(d) = serde_json::from_str::<ServerFrame>(&text).unwrap() else {
            panic!()
        };
        assert_eq!(d.payload().unwrap(), [0xff, 0]);
    }

    #[test]
    fn bodies_are_the_bytes_serde_wrote_before() {
        let encodings = Encodings::default();
        let epoch = Epoch::parse("e1").unwrap();
        for m in [message(1, b"text \"quoted\"\n"), message(2, &[0xff, 0, 1])] {
            let plain = encodings.body("s/1", &epoch, &m);
            let before = serde_json::to_string(&message_body(None, &epoch, &m)).unwrap();
            assert_eq!(plain.as_str(), before);
            let with = encodings.body_with_stream("s/1", &epoch, &m);
            let before = serde_json::to_string(&message_body(Some("s/1"), &epoch, &m)).unwrap();
            assert_eq!(with.as_str(), before);
            let frame = encodings.ws_message("s/1", &epoch, &m);
            assert_eq!(frame.as_str(), encode_ws_message("s/1", "e1", &m));
            assert!(
                frame.starts_with(r#"{"type":"message","stream":"s/1","epoch":"e1","offset":"#)
            );
        }
    }

    #[test]
    fn a_message_is_encoded_once_for_every_subscriber() {
        let encodings = Encodings::default();
        let epoch = Epoch::parse("e1").unwrap();
        let m = message(1, b"hello");
        let first = encodings.ws_message("s", &epoch, &m);
        for _ in 0..100 {
            // Each subscriber holds its own clone of the `Arc`, as the engine hands out.
            let again = encodings.ws_message("s", &epoch, &m.clone());
            assert_eq!(again.as_ptr(), first.as_ptr(), "the same bytes, not a copy");
            encodings.body("s", &epoch, &m);
        }
        assert_eq!(encodings.encoded(), 2, "one WebSocket frame, one body");
        // Another stream's or epoch's subscriber does not get this stream's frame.
        let other = encodings.ws_message("t", &epoch, &m);
        assert!(other.contains(r#""stream":"t""#));
        let e2 = Epoch::parse("e2").unwrap();
        assert!(encodings.body("t", &e2, &m).contains(r#""epoch":"e2""#));
        // A different message with equal content is encoded on its own.
        let twin = message(1, b"hello");
        assert_ne!(
            encodings.ws_message("s", &epoch, &twin).as_ptr(),
            first.as_ptr()
        );
    }

    #[test]
    fn the_cache_is_bounded_in_entries_and_bytes() {
        // 4 entries, at most 1,000 bytes kept.
        let encodings = Encodings::new(2, 1_000);
        let epoch = Epoch::parse("e1").unwrap();
        let messages: Vec<Arc<Message>> = (1..=50).map(|i| message(i, b"payload")).collect();
        for m in &messages {
            encodings.ws_message("s", &epoch, m);
            assert!(encodings.held_bytes() <= 1_000);
        }
        let live = encodings
            .slots
            .iter()
            .filter(|s| s.lock().is_some())
            .count();
        assert!(live <= 4);
        assert!(encodings.held_bytes() > 0);
        // A form larger than the whole budget is encoded for its caller and not kept.
        let big: &'static [u8] = Box::leak(vec![b'x'; 2_000].into_boxed_slice());
        let big = message(99, big);
        let before = encodings.held_bytes();
        assert!(encodings.ws_message("s", &epoch, &big).len() > 2_000);
        assert!(encodings.held_bytes() <= before.max(1_000));
        let n = encodings.encoded();
        encodings.ws_message("s", &epoch, &big);
        assert_eq!(encodings.encoded(), n + 1, "not kept, so encoded again");
        // Entries do not keep messages alive, and their bytes go when they are replaced.
        let weak = Arc::downgrade(&messages[0]);
        drop(messages);
        assert!(weak.upgrade().is_none());
    }
}
