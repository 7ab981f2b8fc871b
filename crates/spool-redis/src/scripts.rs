//! The two Lua scripts that touch stream data, and the decoding of their replies.
//!
//! Why scripts: an append must read the head, give each message the next offset, write the
//! entry, the idempotency record and the byte count, trim, and notify, with no other node's
//! append in between. A script is atomic in Redis, so offsets are gap-free and unique across
//! every Spool node without a lock or a retry loop, and it costs one round trip per batch.
//!
//! Both scripts take the time from Redis (`TIME`), not from the calling node, so publish times
//! and age-based trimming follow one clock however far the nodes' clocks drift. A fresh epoch
//! comes from the caller: Lua has no good randomness.

use std::{sync::Arc, time::Duration};

use redis::{Script, Value};
use spool_core::{Epoch, Message, Offset, Position, Retention, StreamState};
use spool_engine::{Appended, EngineError, ReadBatch};

use crate::codec;

/// Shared by both scripts: the clock, and trimming exactly as `Retention::must_trim` does,
/// always judging the oldest entry.
const COMMON: &str = r#"
local meta, data = KEYS[1], KEYS[2]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function field(f, name)
  for j = 1, #f - 1, 2 do
    if f[j] == name then return f[j + 1] end
  end
  return nil
end

-- Creates the stream's metadata when it has none. Data without metadata is history nobody
-- can vouch for (the epoch that named it is gone), so it is dropped with the new epoch.
local function register(candidate)
  redis.call('DEL', data)
  redis.call('HSET', meta, 'e', candidate, 'h', 0, 'b', 0)
  return candidate
end

-- Drops the oldest entries while the retention says so; returns the id of the oldest kept
-- entry, or '' when nothing is kept.
local function trim(max_n, max_b, max_age)
  local count = redis.call('XLEN', data)
  local bytes0 = tonumber(redis.call('HGET', meta, 'b')) or 0
  local bytes = bytes0
  local oldest = ''
  while count > 0 do
    local first = redis.call('XRANGE', data, '-', '+', 'COUNT', 1)[1]
    if not first then break end
    local t = tonumber(field(first[2], 't')) or now
    if not (count > max_n or bytes > max_b or now - t > max_age) then
      oldest = first[1]
      break
    end
    redis.call('XDEL', data, first[1])
    count = count - 1
    bytes = bytes - (tonumber(field(first[2], 'n')) or 0)
  end
  if count == 0 then bytes = 0 end
  if bytes ~= bytes0 then redis.call('HSET', meta, 'b', string.format('%d', bytes)) end
  return oldest
end
"#;

/// KEYS: meta, data, then one dedup key per keyed message.
/// ARGV: candidate epoch, max messages, max bytes, max age ms, dedup ms, data ttl ms,
/// meta ttl ms, channel, stream, then per message: dedup key index into KEYS (0: none),
/// retained bytes, encoded message.
/// Reply: epoch, time ms, head, then per message 0 and its new offset, or 1 and the offset
/// it was first appended at.
const APPEND: &str = r#"
local epoch = redis.call('HGET', meta, 'e')
if not epoch then epoch = register(ARGV[1]) end
local head = tonumber(redis.call('HGET', meta, 'h'))
if not head then return redis.error_reply('ERR the stored head of ' .. ARGV[9] .. ' is not a number') end
local out = {epoch, now, 0}
local appended = false
local i = 10
while i + 2 <= #ARGV do
  local k = tonumber(ARGV[i])
  local prior = nil
  if k > 0 then
    local stored = redis.call('GET', KEYS[k])
    if stored then
      local sep = string.find(stored, ':', 1, true)
      -- A record from an earlier epoch names a message that is gone: append it again.
      if sep and string.sub(stored, 1, sep - 1) == epoch then
        prior = string.sub(stored, sep + 1)
      end
    end
  end
  if prior then
    out[#out + 1] = 1
    out[#out + 1] = prior
  else
    -- The entry first: Redis does not roll a failed script back, and an XADD that fails
    -- (bad data in the key) must not leave the head past a missing entry.
    head = head + 1
    local id = string.format('%d', head)
    redis.call('XADD', data, id .. '-0', 't', string.format('%d', now), 'n', ARGV[i + 1],
      'd', ARGV[i + 2])
    redis.call('HSET', meta, 'h', id)
    redis.call('HINCRBY', meta, 'b', ARGV[i + 1])
    if k > 0 then redis.call('SET', KEYS[k], epoch .. ':' .. id, 'PX', ARGV[5]) end
    out[#out + 1] = 0
    out[#out + 1] = id
    appended = true
  end
  i = i + 3
end
trim(tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
out[3] = string.format('%d', head)
-- Data lasts as long as its newest message may; metadata longer, so the epoch outlives an
-- idle period in which every message expired.
redis.call('PEXPIRE', data, ARGV[6])
redis.call('PEXPIRE', meta, ARGV[7])
if appended then redis.call('PUBLISH', ARGV[8], epoch .. ' ' .. out[3] .. ' ' .. ARGV[9]) end
return out
"#;

/// KEYS: meta, data.
/// ARGV: candidate epoch ('' = do not register), max messages, max bytes, max age ms,
/// meta ttl ms, channel, stream, first offset wanted, limit.
/// Reply: nil when unknown and not registered; else epoch, head, oldest id ('' = none), and
/// the entries from the first offset wanted (none unless that offset is still retained).
const READ: &str = r#"
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  if ARGV[1] == '' then return false end
  epoch = register(ARGV[1])
  redis.call('PEXPIRE', meta, ARGV[5])
  -- Other nodes' watchers learn of the new epoch at once (it replaces one that was lost).
  redis.call('PUBLISH', ARGV[6], epoch .. ' 0 ' .. ARGV[7])
elseif redis.call('PTTL', meta) < tonumber(ARGV[5]) / 2 then
  -- Readers keep a stream's epoch alive too, but only every half TTL: a write per read
  -- would cost an AOF write (and fsync) per read.
  redis.call('PEXPIRE', meta, ARGV[5])
end
local oldest = trim(tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
local head = redis.call('HGET', meta, 'h')
local entries = {}
local limit = tonumber(ARGV[9])
if limit > 0 and oldest ~= '' then
  local first = ARGV[8] .. '-0'
  -- The limit as given: a Lua number past 2^53 would be sent as '9.2e+18', which COUNT
  -- refuses.
  entries = redis.call('XRANGE', data, first, '+', 'COUNT', ARGV[9])
  if entries[1] and entries[1][1] ~= first then entries = {} end
end
return {epoch, head, oldest, entries}
"#;

/// KEYS: meta, data.
/// ARGV: channel, stream, the placeholder epoch announced.
/// Reply: 1 when the stream was deleted, 0 when Redis did not hold it. Its idempotency
/// records stay until they expire: they name the deleted epoch, which the append script
/// ignores. The note `<epoch> 0 <stream>` moves every node's watchers to that placeholder.
const DELETE: &str = r#"
if redis.call('EXISTS', meta) == 0 then return 0 end
redis.call('DEL', meta, data)
redis.call('PUBLISH', ARGV[1], ARGV[3] .. ' 0 ' .. ARGV[2])
return 1
"#;

/// KEYS: meta, data.
/// ARGV: the first offset kept, channel, the truncate note.
/// Reply: 0 when Redis does not hold the stream, else 1 once every entry before the offset
/// is gone (and its bytes taken off the count) and the note published. Epoch and head stay.
const TRUNCATE: &str = r#"
if redis.call('EXISTS', meta) == 0 then return 0 end
local before = tonumber(ARGV[1])
if before <= 1 then return 1 end
local last = string.format('%d', before - 1) .. '-0'
local bytes = tonumber(redis.call('HGET', meta, 'b')) or 0
while true do
  local batch = redis.call('XRANGE', data, '-', last, 'COUNT', 1000)
  if #batch == 0 then break end
  for _, entry in ipairs(batch) do
    redis.call('XDEL', data, entry[1])
    bytes = bytes - (tonumber(field(entry[2], 'n')) or 0)
  end
end
if redis.call('XLEN', data) == 0 or bytes < 0 then bytes = 0 end
redis.call('HSET', meta, 'b', string.format('%d', bytes))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"#;

/// KEYS: meta, data.
/// ARGV: max messages, max bytes, max age ms.
/// Reply: nil when unknown; else epoch, head, oldest id ('' = none), retained count,
/// retained bytes, the newest entry's publish ms ('' = none). Trims first, as a read does.
const DESCRIBE: &str = r#"
local epoch = redis.call('HGET', meta, 'e')
if not epoch then return false end
local oldest = trim(tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
local count = redis.call('XLEN', data)
local last = ''
if count > 0 then
  local newest = redis.call('XREVRANGE', data, '+', '-', 'COUNT', 1)[1]
  if newest then last = field(newest[2], 't') or '' end
end
return {epoch, redis.call('HGET', meta, 'h'), oldest, count,
  redis.call('HGET', meta, 'b') or '0', last}
"#;

/// The scripts, hashed once; `EVALSHA` falls back to loading them (after a Redis restart).
pub struct Scripts {
    pub append: Script,
    pub read: Script,
    pub delete: Script,
    pub truncate: Script,
    pub describe: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            append: Script::new(&format!("{COMMON}{APPEND}")),
            read: Script::new(&format!("{COMMON}{READ}")),
            delete: Script::new(&format!("{COMMON}{DELETE}")),
            truncate: Script::new(&format!("{COMMON}{TRUNCATE}")),
            describe: Script::new(&format!("{COMMON}{DESCRIBE}")),
        }
    }
}

/// Retention limits as script arguments.
pub fn retention_args(r: &Retention) -> [u64; 3] {
    [r.max_messages, r.max_bytes, ms(r.max_age)]
}

/// Milliseconds for a Redis expiry: at least 1 (0 would delete the key at once), at most a
/// century (beyond, Redis rejects the expiry as overflowing).
pub fn ttl_ms(d: Duration) -> u64 {
    ms(d).clamp(1, 100 * 365 * 24 * 3600 * 1000)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn bad(what: &str) -> EngineError {
    EngineError::internal(format!("unexpected reply from Redis: {what}"))
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

fn epoch(v: &Value) -> Result<Epoch, EngineError> {
    let s = text(v).ok_or_else(|| bad("epoch is not text"))?;
    Epoch::parse(s)
        .map_err(|e| EngineError::internal_from(format!("stored epoch {s:?} is invalid"), e))
}

/// An entry id `<offset>-0`.
fn entry_offset(v: &Value) -> Result<Offset, EngineError> {
    let id = text(v).ok_or_else(|| bad("entry id is not text"))?;
    match id.split_once('-') {
        Some((offset, "0")) => offset
            .parse()
            .map(Offset)
            .map_err(|_| EngineError::internal(format!("entry id {id:?} is not <offset>-0"))),
        _ => Err(EngineError::internal(format!(
            "entry id {id:?} is not <offset>-0"
        ))),
    }
}

/// What an append script call answered.
pub struct AppendReply {
    pub epoch: Epoch,
    pub time_ms: u64,
    pub head: Offset,
    /// Per message: its offset, and whether an earlier publish with its key already had it.
    pub outcomes: Vec<(Offset, bool)>,
}

impl AppendReply {
    pub fn parse(v: Value, expected: usize) -> Result<Self, EngineError> {
        let Value::Array(items) = v else {
            return Err(bad("append reply is not an array"));
        };
        if items.len() != 3 + 2 * expected {
            return Err(bad("append reply has the wrong length"));
        }
        let epoch = epoch(&items[0])?;
        let time_ms = number(&items[1]).ok_or_else(|| bad("append time"))?;
        let head = Offset(number(&items[2]).ok_or_else(|| bad("append head"))?);
        let outcomes = items[3..]
            .chunks_exact(2)
            .map(|pair| {
                let duplicate = number(&pair[0]).ok_or_else(|| bad("duplicate flag"))? == 1;
                let offset = number(&pair[1]).ok_or_else(|| bad("offset"))?;
                Ok((Offset(offset), duplicate))
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(Self {
            epoch,
            time_ms,
            head,
            outcomes,
        })
    }

    pub fn appended(&self) -> Vec<Appended> {
        self.outcomes
            .iter()
            .map(|&(offset, duplicate)| Appended {
                position: Position::new(self.epoch.clone(), offset),
                duplicate,
            })
            .collect()
    }
}

/// What the describe script answered: the stream's bounds and figures.
pub struct Described {
    pub state: StreamState,
    pub retained_messages: u64,
    pub retained_bytes: u64,
    pub last_publish_ms: Option<u64>,
}

/// Decodes a describe script's reply: `None` for an unknown stream.
pub fn parse_describe(v: Value) -> Result<Option<Described>, EngineError> {
    let items = match v {
        Value::Nil => return Ok(None),
        Value::Array(items) if items.len() == 6 => items,
        _ => return Err(bad("describe reply is not six items")),
    };
    let epoch = epoch(&items[0])?;
    let head = Offset(number(&items[1]).ok_or_else(|| bad("head"))?);
    let oldest = match text(&items[2]) {
        Some("") => head.next(),
        _ => entry_offset(&items[2])?,
    };
    let retained_messages = number(&items[3]).ok_or_else(|| bad("retained count"))?;
    let retained_bytes = number(&items[4]).ok_or_else(|| bad("retained bytes"))?;
    let last_publish_ms = match text(&items[5]) {
        Some("") => None,
        _ => Some(number(&items[5]).ok_or_else(|| bad("publish time"))?),
    };
    Ok(Some(Described {
        state: StreamState {
            epoch,
            head,
            oldest,
        },
        retained_messages,
        retained_bytes,
        last_publish_ms,
    }))
}

/// Decodes a read script's reply: `None` for an unknown stream (when not registering).
/// `first` is the offset asked for; the messages must run from it without a hole.
pub fn parse_read(v: Value, first: Offset) -> Result<Option<ReadBatch>, EngineError> {
    let items = match v {
        Value::Nil => return Ok(None),
        Value::Array(items) if items.len() == 4 => items,
        _ => return Err(bad("read reply is not [epoch, head, oldest, entries]")),
    };
    let mut items = items.into_iter();
    let (Some(e), Some(h), Some(o), Some(entries)) =
        (items.next(), items.next(), items.next(), items.next())
    else {
        return Err(bad("read reply is short"));
    };
    let epoch = epoch(&e)?;
    let head = Offset(number(&h).ok_or_else(|| bad("head"))?);
    let oldest = match text(&o) {
        Some("") => head.next(),
        _ => entry_offset(&o)?,
    };
    let Value::Array(entries) = entries else {
        return Err(bad("entries are not an array"));
    };
    let mut messages = Vec::with_capacity(entries.len());
    let mut expected = first;
    for entry in entries {
        let message = parse_entry(entry)?;
        if message.offset != expected {
            return Err(EngineError::internal(format!(
                "stream data has a hole: offset {} where {expected} was expected",
                message.offset
            )));
        }
        expected = expected.next();
        messages.push(Arc::new(message));
    }
    Ok(Some(ReadBatch {
        state: StreamState {
            epoch,
            head,
            oldest,
        },
        messages,
    }))
}

/// One `[id, [field, value, …]]` stream entry.
fn parse_entry(entry: Value) -> Result<Message, EngineError> {
    let Value::Array(parts) = entry else {
        return Err(bad("stream entry is not an array"));
    };
    let mut parts = parts.into_iter();
    let (Some(id), Some(Value::Array(fields))) = (parts.next(), parts.next()) else {
        return Err(bad("stream entry is not [id, fields]"));
    };
    let offset = entry_offset(&id)?;
    let mut time_ms = None;
    let mut data = None;
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        match text(&name) {
            Some("t") => time_ms = number(&value),
            Some("d") => {
                if let Value::BulkString(b) = value {
                    data = Some(b);
                }
            }
            _ => {}
        }
    }
    let (Some(time_ms), Some(data)) = (time_ms, data) else {
        return Err(EngineError::internal(format!(
            "stream entry {offset} lacks its time or data"
        )));
    };
    codec::decode(offset, time_ms, data)
        .map_err(|e| EngineError::internal(format!("stream entry {offset} is corrupt: {e}")))
}
