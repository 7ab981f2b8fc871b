//! What a Spool message looks like inside JetStream, and how a stream's epoch is derived.
//!
//! The payload is the JetStream message body, untouched, so NATS tools show it as published.
//! Everything else Spool keeps — publish time, content type, conflation key, user headers —
//! travels in one `Spool-Meta` header holding a small JSON object. One JSON header rather than
//! a NATS header per user header because user header names and values are arbitrary UTF-8,
//! while NATS header names are restricted tokens and values may not hold line breaks; the JSON
//! is written in pure ASCII (`\uXXXX` escapes), so no byte of it can break the header block.
//!
//! A message without `Spool-Meta` (published to the subject by a plain NATS client) is read as
//! a bare payload stamped with JetStream's own time. A `Spool-Meta` that does not decode is
//! corruption and reads as [`EngineError::Internal`], never a panic.

use async_nats::{HeaderMap, HeaderValue, jetstream::message::StreamMessage};
use serde::{Deserialize, Serialize};
use spool_core::{Epoch, Message, NewMessage, Offset};
use spool_engine::EngineError;

/// The header holding Spool's metadata.
pub(crate) const META: &str = "Spool-Meta";

#[derive(Serialize, Deserialize, Default)]
struct Meta {
    /// Publish time, ms since the Unix epoch.
    t: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    k: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    h: Vec<(String, String)>,
}

/// The headers of `message` published at `time_ms` (without `Nats-Msg-Id`, which the caller
/// adds when the message has an idempotency key).
pub(crate) fn headers(message: &NewMessage, time_ms: u64) -> Result<HeaderMap, EngineError> {
    let meta = Meta {
        t: time_ms,
        c: message.content_type.clone(),
        k: message.key.clone(),
        h: message.headers.clone(),
    };
    let json = serde_json::to_string(&meta)
        .map_err(|e| EngineError::Internal(format!("cannot encode message metadata: {e}")))?;
    let value: HeaderValue = ascii_json(&json)
        .parse()
        .map_err(|e| EngineError::Internal(format!("cannot encode message metadata: {e}")))?;
    let mut headers = HeaderMap::new();
    headers.insert(META, value);
    Ok(headers)
}

/// `json` with every non-ASCII character written as a `\uXXXX` escape (UTF-16, so characters
/// beyond the BMP become surrogate pairs). Outside strings JSON is ASCII already, so this only
/// touches string contents and the result means the same.
fn ascii_json(json: &str) -> String {
    if json.is_ascii() {
        return json.to_owned();
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// The Spool message stored at `offset`.
pub(crate) fn decode(offset: Offset, stored: StreamMessage) -> Result<Message, EngineError> {
    if stored.sequence != offset.get() {
        return Err(EngineError::Internal(format!(
            "asked JetStream for message {offset}, got {}",
            stored.sequence
        )));
    }
    let meta = match stored.headers.get(META) {
        Some(value) => serde_json::from_str::<Meta>(value.as_str()).map_err(|e| {
            EngineError::Internal(format!(
                "message {offset} has a corrupt {META} header ({e}); it was not written by Spool"
            ))
        })?,
        None => Meta {
            t: unix_ms(&stored.time),
            ..Meta::default()
        },
    };
    Ok(Message {
        offset,
        time_ms: meta.t,
        payload: stored.payload,
        content_type: meta.c,
        key: meta.k,
        headers: meta.h,
    })
}

/// The epoch of a JetStream stream created at `created`: its creation time in nanoseconds, in
/// lower-case hex. A stream that is deleted and made again (its data lost) gets another
/// creation time and so another epoch, while the stream itself — with its sequence numbers —
/// outlives the expiry of all its messages, so an idle stream keeps its epoch.
pub(crate) fn epoch(created: &async_nats::jetstream::stream::Info) -> Result<Epoch, EngineError> {
    let nanos = created.created.unix_timestamp_nanos();
    let nanos = u128::try_from(nanos).map_err(|_| {
        EngineError::Internal(format!(
            "JetStream stream {} reports a creation time before 1970",
            created.config.name
        ))
    })?;
    Epoch::parse(&format!("{nanos:x}"))
        .map_err(|e| EngineError::Internal(format!("cannot make an epoch: {e}")))
}

fn unix_ms(time: &async_nats::datetime::DateTime) -> u64 {
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn metadata_survives_any_utf8() {
        let new = NewMessage {
            payload: Bytes::from_static(b"p"),
            content_type: Some("text/plain; charset=utf-8".into()),
            key: Some("ключ 🔑".into()),
            headers: vec![("x:y\"z".into(), "a\\b\u{7f}ü😀".into())],
            idempotency_key: None,
        };
        let headers = headers(&new, 42).unwrap();
        let raw = headers.get(META).unwrap().as_str();
        assert!(raw.is_ascii() && !raw.contains('\n') && !raw.contains('\r'));
        let meta: Meta = serde_json::from_str(raw).unwrap();
        assert_eq!(meta.t, 42);
        assert_eq!(meta.k, new.key);
        assert_eq!(meta.c, new.content_type);
        assert_eq!(meta.h, new.headers);
    }
}
