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

use async_nats::{
    HeaderMap, HeaderValue,
    jetstream::{message::StreamMessage, stream::Info},
};
use serde::{Deserialize, Serialize};
use spool_core::{Epoch, Message, NewMessage, Offset, StreamName};
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
        .map_err(|e| EngineError::internal_from("cannot encode message metadata", e))?;
    let value: HeaderValue = ascii_json(&json)
        .parse()
        .map_err(|e| EngineError::internal_from("cannot encode message metadata", e))?;
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
        return Err(EngineError::internal(format!(
            "asked JetStream for message {offset}, got {}",
            stored.sequence
        )));
    }
    let meta = match stored.headers.get(META) {
        Some(value) => serde_json::from_str::<Meta>(value.as_str()).map_err(|e| {
            EngineError::internal(format!(
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

/// The description of the JetStream stream made for `stream` in `epoch`: the Spool name, a
/// space, the epoch. A stream name never holds whitespace, so the two part cleanly.
///
/// The epoch is chosen by the node that makes the stream — the placeholder its readers already
/// wait in, or a fresh one — so readers that learned it before the first publish get offset 1
/// with no reset. A stream that is deleted and made again (its data lost) is made with another
/// epoch, while the stream itself — with its sequence numbers — outlives the expiry of all its
/// messages, so an idle stream keeps its epoch.
pub(crate) fn description(stream: &StreamName, epoch: &Epoch) -> String {
    format!("{} {}", stream.as_str(), epoch.as_str())
}

/// The epoch of the JetStream stream `info` describes, after checking that it holds `stream`
/// (an `Internal` error otherwise: a name collision, or a stream Spool did not make). Its
/// description is `<name> <epoch>` (see [`description`]); a stream made by an earlier version
/// of Spool has just the name, and its epoch is its creation time in nanoseconds, in lower-case
/// hex.
pub(crate) fn epoch(stream: &StreamName, info: &Info) -> Result<Epoch, EngineError> {
    let description = info.config.description.as_deref().unwrap_or_default();
    let (name, epoch) = match description.split_once(' ') {
        Some((name, epoch)) => (name, Some(epoch)),
        None => (description, None),
    };
    if name != stream.as_str() {
        return Err(EngineError::internal(format!(
            "JetStream stream {} holds {:?}, not {stream:?}: a name collision or a stream Spool did not make",
            info.config.name, info.config.description
        )));
    }
    let epoch = match epoch {
        Some(epoch) => epoch.to_owned(),
        None => {
            let nanos = u128::try_from(info.created.unix_timestamp_nanos()).map_err(|_| {
                EngineError::internal(format!(
                    "JetStream stream {} reports a creation time before 1970",
                    info.config.name
                ))
            })?;
            format!("{nanos:x}")
        }
    };
    Epoch::parse(&epoch).map_err(|e| {
        EngineError::internal(format!(
            "JetStream stream {} has no valid epoch in its description {description:?}: {e}",
            info.config.name
        ))
    })
}

fn unix_ms(time: &async_nats::datetime::DateTime) -> u64 {
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// A `STREAM.INFO` answer for a stream with `description`, created at 1 s past the epoch.
    fn info(description: Option<&str>) -> Info {
        serde_json::from_value(serde_json::json!({
            "config": {"name": "spool_a", "description": description, "subjects": ["spool.s.a"],
                "retention": "limits", "max_consumers": -1, "max_msgs": -1, "max_bytes": -1,
                "max_age": 0, "max_msgs_per_subject": -1, "max_msg_size": -1,
                "discard": "old", "storage": "file", "num_replicas": 1,
                "duplicate_window": 120000000000u64},
            "created": "1970-01-01T00:00:01Z",
            "state": {"messages": 0, "bytes": 0, "first_seq": 0,
                "first_ts": "0001-01-01T00:00:00Z", "last_seq": 0,
                "last_ts": "0001-01-01T00:00:00Z", "consumer_count": 0}
        }))
        .expect("a stream info")
    }

    #[test]
    fn the_epoch_is_the_one_the_stream_was_made_in_or_its_creation_time() {
        let a = StreamName::new("a").unwrap();
        let made_in = Epoch::generate();
        let described = description(&a, &made_in);
        assert_eq!(epoch(&a, &info(Some(&described))).unwrap(), made_in);
        // Made by an earlier version: just the name, and the creation time in ns, in hex.
        assert_eq!(epoch(&a, &info(Some("a"))).unwrap().as_str(), "3b9aca00");
        // Another stream's, or not Spool's at all.
        let b = StreamName::new("b").unwrap();
        for other in [Some(described.as_str()), Some("a"), None] {
            let e = epoch(&b, &info(other)).unwrap_err();
            assert!(matches!(e, EngineError::Internal { .. }), "{e:?}");
        }
        assert!(epoch(&a, &info(Some("a not/an/epoch"))).is_err());
    }

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
