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
//! kind 3  GroupPut     version u64 | snapshot_len u32 | snapshot (JSON) | changes (JSON array)
//! kind 4  GroupCommit  name_len u16 | name | group_len u16 | group | id u64 | version u64
//!                      | changes (JSON array)
//! kind 5  GroupDeleted name_len u16 | name | group_len u16 | group
//! kind 6  SnapshotEnd  (empty)
//! kind 7  GroupPut     as kind 3, the changes binary (below)
//! kind 8  GroupCommit  as kind 4, the changes binary (below)
//! ```
//!
//! Binary group changes (kinds 7 and 8; this version writes these, and reads 3 and 4 as
//! older versions wrote them): `count u32 | change*`, a change being a tag and its fields:
//!
//! ```text
//! 1 CursorMoved   epoch_len u8 | epoch | offset u64 | head u64
//! 2 EntryPut      offset u64 | deliveries u32 | time_ms u64 | has_key u8 | [key_len u16 | key]
//!                 | state u8: 0 waiting | 1 leased: lease u64 | member_len u16 | member
//!                 | until_ms u64 | 2 visible: at_ms u64
//! 3 EntryRemoved  offset u64
//! 4 CountersSet   acked u64 | redelivered u64 | dead_lettered u64 | expired u64 | resets u64
//! 5 MemberPut     member_len u16 | member | last_seen_ms u64 | nacks u64 | timeouts u64
//! 6 MemberRemoved member_len u16 | member
//! 7 Json          len u32 | the change as JSON (resets, settings: rare)
//! ```
//!
//! A `Stream` record states a stream's epoch (and its head when written as a snapshot at the
//! start of a segment); `Message` records that follow belong to that epoch. Decoding never
//! trusts a length: every read is bounds-checked, so a corrupted frame is an error, never a
//! panic or a huge allocation.
//!
//! Consumer groups (kinds 3–5, `groups.rs`): a `GroupPut` is a group whole — its
//! `spool_core::group::GroupSnapshot` and the changes committed since, at a version — written
//! when it is created (version 0, no changes), compacted (no changes), and for every group at
//! the start of every segment; a `GroupCommit` is one versioned commit (`version` is the
//! group's version after it, `id` its incarnation); `GroupDeleted` forgets it. `SnapshotEnd`
//! closes the snapshot a segment starts with: from there, the groups are exactly those the
//! snapshot restated (a group deleted in a segment that is gone does not come back), and a
//! segment without it (a crash while starting it) restates nothing for sure. The snapshot is
//! the state machine's own JSON (`GroupSnapshot::version` versions it); changes are binary
//! (kinds 7 and 8, below) or, as older versions wrote them, the state machine's JSON tagged by
//! `change` (kinds 3 and 4). A record whose JSON or binary does not decode is corrupt like any
//! other. Spool versions before groups refuse a log holding these kinds as undecodable, and
//! versions before binary changes (kinds 7 and 8) refuse those the same way.

use bytes::{BufMut, Bytes};
use spool_core::{
    Epoch, Message, Offset, Position, StreamName,
    group::{
        Change, Counters, Entry, EntryState, GroupId, GroupName, GroupSnapshot, LeaseId,
        MemberName, MemberRecord,
    },
};

pub const FRAME_HEADER: usize = 8;
/// Upper bound on one record body; anything larger in a length field is corruption.
pub const MAX_RECORD: usize = 64 * 1024 * 1024;

const KIND_STREAM: u8 = 1;
const KIND_MESSAGE: u8 = 2;
const KIND_GROUP_PUT: u8 = 3;
const KIND_GROUP_COMMIT: u8 = 4;
const KIND_GROUP_DELETED: u8 = 5;
const KIND_SNAPSHOT_END: u8 = 6;
const KIND_GROUP_PUT_BIN: u8 = 7;
const KIND_GROUP_COMMIT_BIN: u8 = 8;
const KIND_STREAM_DELETED: u8 = 9;
const KIND_STREAM_TRUNCATED: u8 = 10;
const CHANGE_CURSOR_MOVED: u8 = 1;
const CHANGE_ENTRY_PUT: u8 = 2;
const CHANGE_ENTRY_REMOVED: u8 = 3;
const CHANGE_COUNTERS_SET: u8 = 4;
const CHANGE_MEMBER_PUT: u8 = 5;
const CHANGE_MEMBER_REMOVED: u8 = 6;
const CHANGE_JSON: u8 = 7;
const STATE_WAITING: u8 = 0;
const STATE_LEASED: u8 = 1;
const STATE_VISIBLE: u8 = 2;
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
    /// A consumer group whole: created, compacted, or restated at the start of a segment.
    GroupPut {
        version: u64,
        snapshot: Box<GroupSnapshot>,
        changes: Vec<Change>,
    },
    /// One commit of a group: its version after the commit, and the changes.
    GroupCommit {
        stream: StreamName,
        group: GroupName,
        id: GroupId,
        version: u64,
        changes: Vec<Change>,
    },
    GroupDeleted {
        stream: StreamName,
        group: GroupName,
    },
    /// The end of the snapshot a segment starts with.
    SnapshotEnd,
    /// An operator deleted the stream (the admin API): its history in this epoch is gone.
    StreamDeleted { name: StreamName, epoch: Epoch },
    /// An operator dropped the stream's messages before `before` (the admin API); restated
    /// after the stream's record in every later snapshot, so older segments never bring them
    /// back.
    StreamTruncated {
        name: StreamName,
        epoch: Epoch,
        before: Offset,
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
        put_epoch(b, epoch);
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

/// A group whole. `snapshot` is JSON and `changes` binary, both already encoded
/// (`snapshot_json`, `changes_bin`), so a caller measures them before it writes.
pub fn encode_group_put(out: &mut Vec<u8>, version: u64, snapshot: &[u8], changes: &[u8]) {
    frame(out, |b| {
        b.put_u8(KIND_GROUP_PUT_BIN);
        b.put_u64_le(version);
        b.put_u32_le(snapshot.len() as u32);
        b.put_slice(snapshot);
        b.put_slice(changes);
    });
}

/// One commit of a group; `changes` is binary (`changes_bin`).
pub fn encode_group_commit(
    out: &mut Vec<u8>,
    stream: &StreamName,
    group: &GroupName,
    id: GroupId,
    version: u64,
    changes: &[u8],
) {
    frame(out, |b| {
        b.put_u8(KIND_GROUP_COMMIT_BIN);
        put_str16(b, stream.as_str());
        put_str16(b, group.as_str());
        b.put_u64_le(id.0);
        b.put_u64_le(version);
        b.put_slice(changes);
    });
}

pub fn encode_group_deleted(out: &mut Vec<u8>, stream: &StreamName, group: &GroupName) {
    frame(out, |b| {
        b.put_u8(KIND_GROUP_DELETED);
        put_str16(b, stream.as_str());
        put_str16(b, group.as_str());
    });
}

pub fn encode_stream_deleted(out: &mut Vec<u8>, name: &StreamName, epoch: &Epoch) {
    frame(out, |b| {
        b.put_u8(KIND_STREAM_DELETED);
        put_str16(b, name.as_str());
        put_epoch(b, epoch);
    });
}

pub fn encode_stream_truncated(
    out: &mut Vec<u8>,
    name: &StreamName,
    epoch: &Epoch,
    before: Offset,
) {
    frame(out, |b| {
        b.put_u8(KIND_STREAM_TRUNCATED);
        put_str16(b, name.as_str());
        put_epoch(b, epoch);
        b.put_u64_le(before.get());
    });
}

pub fn encode_snapshot_end(out: &mut Vec<u8>) {
    frame(out, |b| b.put_u8(KIND_SNAPSHOT_END));
}

/// A group snapshot as a group record holds it (JSON). Fails only on a bug (every map of a
/// snapshot has string keys, and nothing does I/O).
pub fn snapshot_json(snapshot: &GroupSnapshot) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(snapshot)
}

/// Changes as older group records (kinds 3 and 4) hold them: a JSON array.
#[cfg(test)]
pub fn changes_json(changes: &[Change]) -> serde_json::Result<Vec<u8>> {
    serde_json::to_vec(changes)
}

/// Changes as a group record holds them (binary, module docs). Fails only on a bug (a change
/// kept as JSON that does not encode).
pub fn changes_bin(changes: &[Change]) -> serde_json::Result<Vec<u8>> {
    let mut b = Vec::with_capacity(4 + changes.len() * 48);
    b.put_u32_le(changes.len() as u32);
    for change in changes {
        put_change(&mut b, change)?;
    }
    Ok(b)
}

/// The binary changes of an empty commit list, as `changes_bin(&[])` encodes it.
pub const NO_CHANGES: &[u8] = &[0, 0, 0, 0];

fn put_change(b: &mut Vec<u8>, change: &Change) -> serde_json::Result<()> {
    let fits = |s: &str| s.len() <= u16::MAX as usize;
    match change {
        Change::CursorMoved { cursor, head } if cursor.epoch.as_str().len() <= u8::MAX as usize => {
            b.put_u8(CHANGE_CURSOR_MOVED);
            put_epoch(b, &cursor.epoch);
            b.put_u64_le(cursor.offset.get());
            b.put_u64_le(head.get());
        }
        Change::EntryPut { offset, entry }
            if entry.key.as_deref().is_none_or(fits)
                && entry.lease().is_none_or(|(_, m, _)| fits(m.as_str())) =>
        {
            b.put_u8(CHANGE_ENTRY_PUT);
            b.put_u64_le(offset.get());
            b.put_u32_le(entry.deliveries);
            b.put_u64_le(entry.time_ms);
            match &entry.key {
                Some(key) => {
                    b.put_u8(1);
                    put_str16(b, key);
                }
                None => b.put_u8(0),
            }
            match &entry.state {
                EntryState::Waiting => b.put_u8(STATE_WAITING),
                EntryState::Leased {
                    lease,
                    member,
                    until_ms,
                } => {
                    b.put_u8(STATE_LEASED);
                    b.put_u64_le(lease.0);
                    put_str16(b, member.as_str());
                    b.put_u64_le(*until_ms);
                }
                EntryState::Visible { at_ms } => {
                    b.put_u8(STATE_VISIBLE);
                    b.put_u64_le(*at_ms);
                }
            }
        }
        Change::EntryRemoved { offset } => {
            b.put_u8(CHANGE_ENTRY_REMOVED);
            b.put_u64_le(offset.get());
        }
        Change::CountersSet { counters } => {
            let Counters {
                acked,
                redelivered,
                dead_lettered,
                expired,
                resets,
            } = *counters;
            b.put_u8(CHANGE_COUNTERS_SET);
            for n in [acked, redelivered, dead_lettered, expired, resets] {
                b.put_u64_le(n);
            }
        }
        Change::MemberPut { member, record } if fits(member.as_str()) => {
            let MemberRecord {
                last_seen_ms,
                nacks,
                timeouts,
            } = *record;
            b.put_u8(CHANGE_MEMBER_PUT);
            put_str16(b, member.as_str());
            for n in [last_seen_ms, nacks, timeouts] {
                b.put_u64_le(n);
            }
        }
        Change::MemberRemoved { member } if fits(member.as_str()) => {
            b.put_u8(CHANGE_MEMBER_REMOVED);
            put_str16(b, member.as_str());
        }
        other => {
            let json = serde_json::to_vec(other)?;
            b.put_u8(CHANGE_JSON);
            b.put_u32_le(json.len() as u32);
            b.put_slice(&json);
        }
    }
    Ok(())
}

/// Decodes a group record's changes: JSON (`json`: kinds 3 and 4, as older versions wrote them)
/// or binary (kinds 7 and 8); `None` when they are damaged.
fn decode_changes(json: bool, body: &[u8]) -> Option<Vec<Change>> {
    if json {
        serde_json::from_slice(body).ok()
    } else {
        decode_changes_bin(body)
    }
}

/// Decodes binary changes; `None` when they are damaged (the whole body must be used).
fn decode_changes_bin(body: &[u8]) -> Option<Vec<Change>> {
    let mut r = Reader(body);
    let count = r.u32()? as usize;
    // Every change takes at least 4 bytes: no allocation beyond what the body can hold.
    let mut changes = Vec::with_capacity(count.min(r.0.len() / 4));
    for _ in 0..count {
        changes.push(decode_change(&mut r)?);
    }
    r.0.is_empty().then_some(changes)
}

fn decode_change(r: &mut Reader<'_>) -> Option<Change> {
    let member = |r: &mut Reader<'_>| MemberName::new(&r.str16()?).ok();
    Some(match r.u8()? {
        CHANGE_CURSOR_MOVED => {
            let epoch = r.epoch()?;
            Change::CursorMoved {
                cursor: Position {
                    epoch,
                    offset: Offset(r.u64()?),
                },
                head: Offset(r.u64()?),
            }
        }
        CHANGE_ENTRY_PUT => {
            let offset = Offset(r.u64()?);
            let deliveries = r.u32()?;
            let time_ms = r.u64()?;
            let key = match r.u8()? {
                0 => None,
                1 => Some(r.str16()?),
                _ => return None,
            };
            let state = match r.u8()? {
                STATE_WAITING => EntryState::Waiting,
                STATE_LEASED => EntryState::Leased {
                    lease: LeaseId(r.u64()?),
                    member: member(r)?,
                    until_ms: r.u64()?,
                },
                STATE_VISIBLE => EntryState::Visible { at_ms: r.u64()? },
                _ => return None,
            };
            Change::EntryPut {
                offset,
                entry: Entry {
                    deliveries,
                    key,
                    time_ms,
                    state,
                },
            }
        }
        CHANGE_ENTRY_REMOVED => Change::EntryRemoved {
            offset: Offset(r.u64()?),
        },
        CHANGE_COUNTERS_SET => Change::CountersSet {
            counters: Counters {
                acked: r.u64()?,
                redelivered: r.u64()?,
                dead_lettered: r.u64()?,
                expired: r.u64()?,
                resets: r.u64()?,
            },
        },
        CHANGE_MEMBER_PUT => Change::MemberPut {
            member: member(r)?,
            record: MemberRecord {
                last_seen_ms: r.u64()?,
                nacks: r.u64()?,
                timeouts: r.u64()?,
            },
        },
        CHANGE_MEMBER_REMOVED => Change::MemberRemoved { member: member(r)? },
        CHANGE_JSON => {
            let len = r.u32()? as usize;
            serde_json::from_slice(r.take(len)?).ok()?
        }
        _ => return None,
    })
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

/// An epoch: its length (u8; an epoch has at most `MAX_EPOCH_LEN`, 64, characters) then its
/// text.
fn put_epoch(b: &mut Vec<u8>, epoch: &Epoch) {
    b.put_u8(epoch.as_str().len() as u8);
    b.put_slice(epoch.as_str().as_bytes());
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
    /// An epoch as [`put_epoch`] writes it.
    fn epoch(&mut self) -> Option<Epoch> {
        let len = self.u8()? as usize;
        Epoch::parse(&self.str(len)?).ok()
    }
}

fn decode_body(body: &[u8]) -> Option<Record> {
    let mut r = Reader(body);
    match r.u8()? {
        KIND_STREAM => {
            let name = StreamName::stored(&r.str16()?).ok()?;
            let epoch = r.epoch()?;
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
        kind @ (KIND_GROUP_PUT | KIND_GROUP_PUT_BIN) => {
            let version = r.u64()?;
            let snapshot_len = r.u32()? as usize;
            let snapshot = serde_json::from_slice(r.take(snapshot_len)?).ok()?;
            let changes = decode_changes(kind == KIND_GROUP_PUT, r.0)?;
            Some(Record::GroupPut {
                version,
                snapshot,
                changes,
            })
        }
        kind @ (KIND_GROUP_COMMIT | KIND_GROUP_COMMIT_BIN) => {
            let stream = StreamName::stored(&r.str16()?).ok()?;
            let group = GroupName::new(&r.str16()?).ok()?;
            let id = GroupId(r.u64()?);
            let version = r.u64()?;
            let changes = decode_changes(kind == KIND_GROUP_COMMIT, r.0)?;
            Some(Record::GroupCommit {
                stream,
                group,
                id,
                version,
                changes,
            })
        }
        KIND_GROUP_DELETED => {
            let stream = StreamName::stored(&r.str16()?).ok()?;
            let group = GroupName::new(&r.str16()?).ok()?;
            r.0.is_empty()
                .then_some(Record::GroupDeleted { stream, group })
        }
        KIND_SNAPSHOT_END => r.0.is_empty().then_some(Record::SnapshotEnd),
        KIND_STREAM_DELETED => {
            let name = StreamName::stored(&r.str16()?).ok()?;
            let epoch = r.epoch()?;
            r.0.is_empty()
                .then_some(Record::StreamDeleted { name, epoch })
        }
        KIND_STREAM_TRUNCATED => {
            let name = StreamName::stored(&r.str16()?).ok()?;
            let epoch = r.epoch()?;
            let before = Offset(r.u64()?);
            r.0.is_empty().then_some(Record::StreamTruncated {
                name,
                epoch,
                before,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
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

    #[test]
    fn admin_records_round_trip() {
        let name = StreamName::new("chat:room/1").unwrap();
        let epoch = Epoch::generate();
        let mut buf = Vec::new();
        encode_stream_deleted(&mut buf, &name, &epoch);
        let deleted = Record::StreamDeleted {
            name: name.clone(),
            epoch: epoch.clone(),
        };
        assert_eq!(decode_frame(&buf), Frame::Record(deleted, buf.len()));
        let mut buf = Vec::new();
        encode_stream_truncated(&mut buf, &name, &epoch, Offset(42));
        let truncated = Record::StreamTruncated {
            name,
            epoch,
            before: Offset(42),
        };
        assert_eq!(decode_frame(&buf), Frame::Record(truncated, buf.len()));
        // A flipped byte is caught by the CRC.
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert!(!matches!(decode_frame(&buf), Frame::Record(..)));
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

    /// A group commit as versions before binary changes framed it (kind 4, JSON changes).
    pub(crate) fn encode_group_commit_json(
        out: &mut Vec<u8>,
        stream: &StreamName,
        group: &GroupName,
        id: GroupId,
        version: u64,
        changes: &[Change],
    ) {
        let json = changes_json(changes).unwrap();
        frame(out, |b| {
            b.put_u8(KIND_GROUP_COMMIT);
            put_str16(b, stream.as_str());
            put_str16(b, group.as_str());
            b.put_u64_le(id.0);
            b.put_u64_le(version);
            b.put_slice(&json);
        });
    }

    /// A group whole as versions before binary changes framed it (kind 3).
    pub(crate) fn encode_group_put_json(
        out: &mut Vec<u8>,
        version: u64,
        snapshot: &GroupSnapshot,
        changes: &[Change],
    ) {
        let snapshot = snapshot_json(snapshot).unwrap();
        let changes = changes_json(changes).unwrap();
        frame(out, |b| {
            b.put_u8(KIND_GROUP_PUT);
            b.put_u64_le(version);
            b.put_u32_le(snapshot.len() as u32);
            b.put_slice(&snapshot);
            b.put_slice(&changes);
        });
    }

    /// One change of every kind and state, including the rare ones kept as JSON.
    pub(crate) fn every_change(key: Option<String>, member: &str, n: u64) -> Vec<Change> {
        use spool_core::{ResetReason, group::GroupReset};
        let member = MemberName::new(member).unwrap();
        let epoch = Epoch::generate();
        let entry = |state| Entry {
            deliveries: n as u32,
            key: key.clone(),
            time_ms: n + 1,
            state,
        };
        vec![
            Change::CursorMoved {
                cursor: Position {
                    epoch: epoch.clone(),
                    offset: Offset(n),
                },
                head: Offset(n + 7),
            },
            Change::EntryPut {
                offset: Offset(n + 1),
                entry: entry(EntryState::Waiting),
            },
            Change::EntryPut {
                offset: Offset(n + 2),
                entry: entry(EntryState::Leased {
                    lease: LeaseId(n ^ u64::MAX),
                    member: member.clone(),
                    until_ms: n + 30_000,
                }),
            },
            Change::EntryPut {
                offset: Offset(n + 3),
                entry: entry(EntryState::Visible { at_ms: n + 5 }),
            },
            Change::EntryRemoved { offset: Offset(n) },
            Change::CountersSet {
                counters: Counters {
                    acked: n,
                    redelivered: n + 1,
                    dead_lettered: n + 2,
                    expired: n + 3,
                    resets: n + 4,
                },
            },
            Change::MemberPut {
                member: member.clone(),
                record: MemberRecord {
                    last_seen_ms: n,
                    nacks: n + 1,
                    timeouts: u64::MAX,
                },
            },
            Change::MemberRemoved { member },
            Change::ResetRecorded {
                reset: GroupReset {
                    reason: ResetReason::EpochChanged,
                    lost: n,
                    at_ms: n + 9,
                    from: Position {
                        epoch: epoch.clone(),
                        offset: Offset(n),
                    },
                    to: Position {
                        epoch,
                        offset: Offset::ZERO,
                    },
                },
            },
            Change::ConfigSet {
                config: spool_core::group::GroupConfig::default(),
                dead_letter: StreamName::new("s.g.dead").unwrap(),
            },
        ]
    }

    proptest! {
        #[test]
        fn binary_group_changes_round_trip(
            n in 0u64..u64::MAX / 2,
            key in prop::option::of("\\PC{0,40}"),
            member in "[a-z0-9_-]{1,40}",
        ) {
            let changes = every_change(key, &member, n);
            let (stream, group) = (StreamName::new("s").unwrap(), GroupName::new("g").unwrap());
            let mut buf = Vec::new();
            encode_group_commit(&mut buf, &stream, &group, GroupId(n), n + 1, &changes_bin(&changes).unwrap());
            let expected = Record::GroupCommit { stream, group, id: GroupId(n), version: n + 1, changes };
            prop_assert_eq!(decode_frame(&buf), Frame::Record(expected, buf.len()));
        }

        #[test]
        fn damaged_binary_changes_never_panic(cut in 0usize..400, flip in 0usize..3200) {
            let changes = every_change(Some("k".into()), "m", 3);
            let mut bin = changes_bin(&changes).unwrap();
            let flip = flip % (bin.len() * 8);
            bin[flip / 8] ^= 1 << (flip % 8);
            bin.truncate(cut.min(bin.len()));
            // Inside a frame with a valid checksum, so only the decoder stands guard.
            let _ = decode_changes_bin(&bin);
        }
    }

    #[test]
    fn binary_changes_are_smaller_than_json_and_decode_as_it_does() {
        let changes = every_change(Some("order-17".into()), "worker-1", 1_700_000_000_000);
        let bin = changes_bin(&changes).unwrap();
        let json = changes_json(&changes).unwrap();
        assert!(
            bin.len() * 2 < json.len(),
            "{} vs {} bytes",
            bin.len(),
            json.len()
        );
        assert_eq!(decode_changes_bin(&bin).unwrap(), changes);
        assert_eq!(
            decode_changes_bin(NO_CHANGES).unwrap(),
            Vec::<Change>::new()
        );
        assert_eq!(changes_bin(&[]).unwrap(), NO_CHANGES);
        // Trailing bytes, a count beyond the body, an unknown tag: damaged.
        let mut extra = bin.clone();
        extra.push(0);
        assert_eq!(decode_changes_bin(&extra), None);
        assert_eq!(decode_changes_bin(&[255, 255, 255, 255]), None);
        assert_eq!(decode_changes_bin(&[1, 0, 0, 0, 99]), None);
    }

    #[test]
    fn json_group_records_of_older_versions_are_still_read() {
        let changes = every_change(None, "w", 11);
        let (stream, group) = (StreamName::new("s").unwrap(), GroupName::new("g").unwrap());
        let mut buf = Vec::new();
        encode_group_commit_json(&mut buf, &stream, &group, GroupId(5), 3, &changes);
        assert_eq!(buf[FRAME_HEADER], KIND_GROUP_COMMIT);
        let expected = Record::GroupCommit {
            stream,
            group,
            id: GroupId(5),
            version: 3,
            changes: changes.clone(),
        };
        assert_eq!(decode_frame(&buf), Frame::Record(expected, buf.len()));
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
