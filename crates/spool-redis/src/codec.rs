//! The bytes of one message in the `d` field of its Redis Stream entry.
//!
//! Binary rather than JSON because payloads are arbitrary bytes (JSON would need base64, a
//! third more memory in Redis). Layout, integers big-endian:
//!
//! ```text
//! version (1 = this layout) | flags (bit 0: content type, bit 1: key)
//! [u32 len, content type]   [u32 len, key]   u32 header count, then per header
//! u32 len, name, u32 len, value | payload (the rest)
//! ```
//!
//! The offset and publish time are not in here: they are the entry id and the `t` field.
//! Decoding trusts nothing: whatever else is found in Redis is an error, never a panic.

use bytes::Bytes;
use spool_core::{Message, Offset};

const VERSION: u8 = 1;
const HAS_CONTENT_TYPE: u8 = 1;
const HAS_KEY: u8 = 2;

/// Encodes what of `message` is stored besides its offset and time.
pub fn encode(message: &Message) -> Vec<u8> {
    let strings: usize = message.content_type.as_ref().map_or(0, |s| 4 + s.len())
        + message.key.as_ref().map_or(0, |s| 4 + s.len())
        + message
            .headers
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>();
    let mut out = Vec::with_capacity(6 + strings + message.payload.len());
    out.push(VERSION);
    let mut flags = 0;
    if message.content_type.is_some() {
        flags |= HAS_CONTENT_TYPE;
    }
    if message.key.is_some() {
        flags |= HAS_KEY;
    }
    out.push(flags);
    for s in [&message.content_type, &message.key].into_iter().flatten() {
        put(&mut out, s.as_bytes());
    }
    out.extend_from_slice(&(message.headers.len() as u32).to_be_bytes());
    for (k, v) in &message.headers {
        put(&mut out, k.as_bytes());
        put(&mut out, v.as_bytes());
    }
    out.extend_from_slice(&message.payload);
    out
}

fn put(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// Decodes a stored message; the error says what is wrong with the bytes.
pub fn decode(offset: Offset, time_ms: u64, data: Vec<u8>) -> Result<Message, String> {
    let mut r = Reader { data: &data, at: 0 };
    let version = r.byte()?;
    if version != VERSION {
        return Err(format!("unknown encoding version {version}"));
    }
    let flags = r.byte()?;
    if flags & !(HAS_CONTENT_TYPE | HAS_KEY) != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let content_type = (flags & HAS_CONTENT_TYPE != 0)
        .then(|| r.string())
        .transpose()?;
    let key = (flags & HAS_KEY != 0).then(|| r.string()).transpose()?;
    let count = r.u32()? as usize;
    // Each header takes at least 8 bytes, which bounds the allocation by the input's size.
    if count > r.remaining() / 8 {
        return Err(format!("{count} headers in {} bytes", r.remaining()));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        headers.push((r.string()?, r.string()?));
    }
    let start = r.at;
    let mut payload = Bytes::from(data);
    let payload = payload.split_off(start);
    Ok(Message {
        offset,
        time_ms,
        payload,
        content_type,
        key,
        headers,
    })
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len() - self.at
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "truncated: {n} bytes wanted at {}, {} left",
                self.at,
                self.remaining()
            ));
        }
        let s = &self.data[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }
}

#[cfg(test)]
mod tests {
    use spool_core::NewMessage;

    use super::*;

    fn stamped(new: NewMessage) -> Message {
        new.stamp(Offset(0), 0).0
    }

    #[test]
    fn round_trips() {
        let new = stamped(NewMessage {
            payload: Bytes::from_static(b"\x00{\"a\":1}\xff"),
            content_type: Some("application/json".into()),
            key: None,
            headers: vec![("h".into(), "v".into()), ("".into(), "é".into())],
            idempotency_key: Some("ignored".into()),
        });
        let m = decode(Offset(7), 42, encode(&new)).unwrap();
        assert_eq!(m.offset, Offset(7));
        assert_eq!(m.time_ms, 42);
        assert_eq!(m.payload, new.payload);
        assert_eq!(m.content_type, new.content_type);
        assert_eq!(m.key, None);
        assert_eq!(m.headers, new.headers);
        let plain = decode(Offset(1), 1, encode(&stamped(NewMessage::default()))).unwrap();
        assert!(plain.payload.is_empty() && plain.headers.is_empty());
    }

    #[test]
    fn garbage_is_an_error() {
        let good = encode(&stamped(NewMessage {
            key: Some("k".into()),
            headers: vec![("h".into(), "v".into())],
            ..NewMessage::default()
        }));
        for cut in 0..good.len() - 1 {
            // Every truncation inside the header part fails; none panics.
            let _ = decode(Offset(1), 0, good[..cut].to_vec());
        }
        assert!(decode(Offset(1), 0, b"garbage".to_vec()).is_err());
        assert!(decode(Offset(1), 0, Vec::new()).is_err());
        assert!(decode(Offset(1), 0, vec![1, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode(Offset(1), 0, vec![1, 1, 0, 0, 0, 2, 0xc3, 0x28, 0, 0, 0, 0]).is_err());
    }
}
