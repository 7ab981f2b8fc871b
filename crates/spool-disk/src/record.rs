//! The on-disk record format of the write-ahead log.
//!
//! A frame is `len: u32 LE | crc32: u32 LE | body[len]`, the CRC covering the body. A body is
//! one record:
//!
//! ```text
//! kind 1  Stream   name_len u16 | name | epoch_len u8 | epoch | head u64
//! kind 2  Message  name_len u16 | name | offset u64 | time_ms u64 | flags u8
//!                  | [ct_len u16 | content_type]  (flags & 1)
//!                  | [key_len u16 | key]          (flags & 2)
//!                  | [idem_len u16 | idem_key]    (flags & 4)
//!                  | header_count u16 | (k_len u16 | k | v_len u32 | v)*
//!                  | payload_len u32 | payload
//! ```
//!
//! A `Stream` record states a stream's epoch (and its head when written as a snapshot at the
//! start of a segment); `Message` records that follow belong to that epoch. Decoding never
//! trusts a length: every read is bounds-checked, so a corrupted frame is an error, never a
//! panic or a huge allocation.

use bytes::{BufMut, Bytes};
use spool_core::{Epoch, Message, Offset, StreamName};

pub const FRAME_HEADER: usize = 8;
/// Upper bound on one record body; anything larger in a length field is corruption.
pub const MAX_RECORD: usize = 64 * 1024 * 1024;

const KIND_STREAM: u8 = 1;
const KIND_MESSAGE: u8 = 2;
const HAS_CONTENT_TYPE: u8 = 1;
const HAS_KEY: u8 = 2;
const HAS_IDEMPOTENCY_KEY: u8 = 4;

/// One decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Stream {
        name: StreamName,
        epoch: Epoch,
        head: Offset,
    },
    Message {
        name: StreamName,
        message: Message,
        idempotency_key: Option<String>,
    },
}

/// What [`decode_frame`] found at a place in a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A valid record and the size of its frame.
    Record(Record, usize),
    /// The buffer ends inside the frame (a torn write at the tail of a log).
    Incomplete,
    /// The frame is damaged: bad checksum, impossible length or undecodable body.
    Corrupt(&'static str),
}

pub fn encode_stream(out: &mut Vec<u8>, name: &StreamName, epoch: &Epoch, head: Offset) {
    frame(out, |b| {
        b.put_u8(KIND_STREAM);
        put_str16(b, name.as_str());
        b.put_u8(epoch.as_str().len() as u8);
        b.put_slice(epoch.as_str().as_bytes());
        b.put_u64_le(head.get());
    });
}

pub fn encode_message(
    out: &mut Vec<u8>,
    name: &StreamName,
    m: &Message,
    idempotency_key: Option<&str>,
) {
    frame(out, |b| {
        b.put_u8(KIND_MESSAGE);
        put_str16(b, name.as_str());
        b.put_u64_le(m.offset.get());
        b.put_u64_le(m.time_ms);
        let mut flags = 0;
        if m.content_type.is_some() {
            flags |= HAS_CONTENT_TYPE;
        }
        if m.key.is_some() {
            flags |= HAS_KEY;
        }
        if idempotency_key.is_some() {
            flags |= HAS_IDEMPOTENCY_KEY;
        }
        b.put_u8(flags);
        for s in [m.content_type.as_deref(), m.key.as_deref(), idempotency_key]
            .into_iter()
            .flatten()
        {
            put_str16(b, s);
        }
        b.put_u16_le(m.headers.len() as u16);
        for (k, v) in &m.headers {
            put_str16(b, k);
            b.put_u32_le(v.len() as u32);
            b.put_slice(v.as_bytes());
        }
        b.put_u32_le(m.payload.len() as u32);
        b.put_slice(&m.payload);
    });
}

/// The bytes a message's frame takes, to size buffers and segments.
#[cfg(test)]
pub fn message_frame_len(name: &StreamName, m: &Message, idempotency_key: Option<&str>) -> usize {
    let strs: usize = [m.content_type.as_deref(), m.key.as_deref(), idempotency_key]
        .into_iter()
        .flatten()
        .map(|s| 2 + s.len())
        .sum();
    let headers: usize = m
        .headers
        .iter()
        .map(|(k, v)| 2 + k.len() + 4 + v.len())
        .sum();
    FRAME_HEADER
        + 1
        + 2
        + name.as_str().len()
        + 8
        + 8
        + 1
        + strs
        + 2
        + headers
        + 4
        + m.payload.len()
}

fn frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    body(out);
    let len = (out.len() - start - FRAME_HEADER) as u32;
    let crc = crc32fast::hash(&out[start + FRAME_HEADER..]);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str16(b: &mut Vec<u8>, s: &str) {
    // Callers bound these strings well below 64 KiB (names 255, keys 1 KiB, headers by the
    // payload limit is not enough, so headers are capped by the server at 64 KiB each).
    b.put_u16_le(s.len().min(u16::MAX as usize) as u16);
    b.put_slice(&s.as_bytes()[..s.len().min(u16::MAX as usize)]);
}

/// Decodes the frame at the start of `buf`.
pub fn decode_frame(buf: &[u8]) -> Frame {
    if buf.len() < FRAME_HEADER {
        return Frame::Incomplete;
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len == 0 || len > MAX_RECORD {
        return Frame::Corrupt("impossible record length");
    }
    let Some(body) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
        return Frame::Incomplete;
    };
    if crc32fast::hash(body) != crc {
        return Frame::Corrupt("checksum mismatch");
    }
    match decode_body(body) {
        Some(record) => Frame::Record(record, FRAME_HEADER + len),
        None => Frame::Corrupt("undecodable record"),
    }
}

/// A bounds-checked reader over a record body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn str(&mut self, len: usize) -> Option<String> {
        self.take(len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .map(str::to_owned)
    }
    fn str16(&mut self) -> Option<String> {
        let len = self.u16()? as usize;
        self.str(len)
    }
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let mut r = Reader(body);
    match r.u8()? {
        KIND_STREAM => {
            let name = StreamName::stored(&r.str16()?).ok()?;
            let epoch_len = r.u8()? as usize;
            let epoch = Epoch::parse(&r.str(epoch_len)?).ok()?;
            let head = Offset(r.u64()?);
            r.0.is_empty()
                .then_some(Record::Stream { name, epoch, head })
        }
        KIND_MESSAGE => {
            let name = StreamName::stored(&r.str16()?).ok()?;
            let offset = Offset(r.u64()?);
            let time_ms = r.u64()?;
            let flags = r.u8()?;
            let content_type = if flags & HAS_CONTENT_TYPE != 0 {
                Some(r.str16()?)
            } else {
                None
            };
            let key = if flags & HAS_KEY != 0 {
                Some(r.str16()?)
            } else {
                None
            };
            let idempotency_key = if flags & HAS_IDEMPOTENCY_KEY != 0 {
                Some(r.str16()?)
            } else {
                None
            };
            let count = r.u16()? as usize;
            let mut headers = Vec::with_capacity(count.min(64));
            for _ in 0..count {
                let k = r.str16()?;
                let v_len = r.u32()? as usize;
                headers.push((k, r.str(v_len)?));
            }
            let payload_len = r.u32()? as usize;
            let payload = Bytes::copy_from_slice(r.take(payload_len)?);
            if !r.0.is_empty() || offset == Offset::ZERO {
                return None;
            }
            Some(Record::Message {
                name,
                message: Message {
                    offset,
                    time_ms,
                    payload,
                    content_type,
                    key,
                    headers,
                },
                idempotency_key,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn message(
        offset: u64,
        payload: Vec<u8>,
        ct: Option<String>,
        key: Option<String>,
        headers: Vec<(String, String)>,
    ) -> Message {
        Message {
            offset: Offset(offset),
            time_ms: 1_700_000_000_000,
            payload: Bytes::from(payload),
            content_type: ct,
            key,
            headers,
        }
    }

    proptest! {
        #[test]
        fn messages_round_trip(
            offset in 1u64..u64::MAX,
            payload in prop::collection::vec(any::<u8>(), 0..512),
            ct in prop::option::of("[a-z/+.-]{1,40}"),
            key in prop::option::of("\\PC{0,40}"),
            idem in prop::option::of("\\PC{1,40}"),
            headers in prop::collection::vec(("[a-z-]{1,10}", "\\PC{0,20}"), 0..4),
        ) {
            let name = StreamName::new("chat:room/1").unwrap();
            let m = message(offset, payload, ct, key, headers);
            let mut buf = Vec::new();
            encode_message(&mut buf, &name, &m, idem.as_deref());
            prop_assert_eq!(buf.len(), message_frame_len(&name, &m, idem.as_deref()));
            let expected = Record::Message { name: name.clone(), message: m, idempotency_key: idem };
            prop_assert_eq!(decode_frame(&buf), Frame::Record(expected, buf.len()));
        }

        #[test]
        fn any_single_bit_flip_is_detected(bit in 0usize..(8 * 90)) {
            let name = StreamName::new("s").unwrap();
            let mut buf = Vec::new();
            encode_message(&mut buf, &name, &message(7, b"payload bytes here".to_vec(), None, Some("k".into()), vec![]), Some("idem"));
            let bit = bit % (buf.len() * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(!matches!(decode_frame(&buf), Frame::Record(..)), "flip at bit {} went unnoticed", bit);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame(&bytes);
        }
    }

    #[test]
    fn stream_records_and_truncation() {
        let name = StreamName::new("s").unwrap();
        let epoch = Epoch::generate();
        let mut buf = Vec::new();
        encode_stream(&mut buf, &name, &epoch, Offset(42));
        assert_eq!(
            decode_frame(&buf),
            Frame::Record(
                Record::Stream {
                    name,
                    epoch,
                    head: Offset(42)
                },
                buf.len()
            )
        );
        for cut in 0..buf.len() {
            assert_eq!(decode_frame(&buf[..cut]), Frame::Incomplete, "cut at {cut}");
        }
    }
}
