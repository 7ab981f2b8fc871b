//! Consumer groups (SPEC §7) in Redis: the [`GroupStore`] of the Redis engine.
//!
//! A group is its snapshot and the commits since (`spool_engine::StoredGroup`), kept so that
//! every Spool node sharing the Redis (and the prefix) sees one copy, and a commit computed
//! against a stale version is refused (`Committed::Conflict`) with nothing written.
//!
//! # Keys
//!
//! | key | what |
//! |---|---|
//! | `<prefix>:groups{<prefix>}:index` | sorted set, every member at score 0: `<stream> <group>` for each group (names hold no whitespace, so the space sorts before every character of a name and lexical order is (stream, group) order) |
//! | `<prefix>:groups{<prefix>}:s:<stream>:<group>` | hash: `v` version, `id` the group's incarnation, `s` snapshot (JSON) |
//! | `<prefix>:groups{<prefix>}:c:<stream>:<group>` | list: one JSON array of changes per commit since the snapshot, oldest first |
//!
//! (`%` and `:` in the names are percent-escaped, so a key names one group.) Group keys never
//! expire: a group lives until it is deleted.
//!
//! Every group key carries the prefix as its hash tag, so all of them are in one slot: a
//! creation checks `--max-groups` against the index and adds to it in the same script as it
//! writes the group, which Redis Cluster allows only within one slot. The price on a Redis
//! Cluster is that one shard takes every group write; a commit is small (a few hundred bytes
//! per message received or settled), so that shard's CPU, not its memory, is the bound.
//!
//! # Writes
//!
//! Every write is one Lua script (`EVALSHA`, loaded on first use) that compares the version
//! and writes atomically: a commit is one round trip (plus `WAIT` under replicated durability,
//! on the append connection as appends do), a load one round trip (a read script, so snapshot,
//! version and changes are one snapshot in time). Durability is the engine's: `fsync` has Redis
//! fsync before it answers (`appendfsync always`), `replicated` waits for the replicas and
//! answers `Unavailable` when too few acknowledged — the write may still be there, which the
//! caller handles by reloading the group.

use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, Value, aio::ConnectionManager};
use spool_core::{
    StreamName,
    group::{Change, GroupName, GroupSnapshot},
};
use spool_engine::{Committed, EngineError, GroupStore, HasGroupStore, Limit, StoredGroup};

use crate::{RedisConfig, RedisDurability, RedisEngine, error::within, wait_for_replicas};

/// The largest record (a snapshot, or one commit's changes) the store writes. A group's state
/// machine bounds its snapshot far below this (entries ≤ 2 × `max_in_flight`, members ≤
/// 1024); anything larger is a bug, refused before Redis sees it.
pub const MAX_RECORD_BYTES: usize = 32 * 1024 * 1024;

/// KEYS: index, state, changes. ARGV: index member, group id, snapshot, max groups.
/// Reply: 1 created, 0 exists already, -1 at the bound.
const CREATE: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return -1 end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[2], 'v', '0', 'id', ARGV[2], 's', ARGV[3])
redis.call('ZADD', KEYS[1], 0, ARGV[1])
return 1
"#;

/// KEYS: state, changes. ARGV: expected version, changes ('' = none).
/// Reply: the new version, or -1 (no such group, or at another version: nothing written).
const COMMIT: &str = r#"
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] then return -1 end
if ARGV[2] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[2]) end
return redis.call('HINCRBY', KEYS[1], 'v', 1)
"#;

/// KEYS: state, changes. ARGV: version, group id, snapshot.
/// Reply: 1 replaced, -1 (no such group, another version or incarnation: nothing written).
const COMPACT: &str = r#"
if redis.call('HGET', KEYS[1], 'v') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'id') ~= ARGV[2] then
  return -1
end
redis.call('HSET', KEYS[1], 's', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
"#;

/// KEYS: index, state, changes. ARGV: index member. Reply: 1 deleted, 0 there was none.
const DELETE: &str = r#"
local existed = redis.call('DEL', KEYS[2])
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[1])
return existed
"#;

/// KEYS: state, changes. Reply: nil, or {version, snapshot, {changes…}}.
const LOAD: &str = r#"
local s = redis.call('HMGET', KEYS[1], 'v', 's')
if not s[1] or not s[2] then return false end
return {s[1], s[2], redis.call('LRANGE', KEYS[2], 0, -1)}
"#;

/// The group store of one engine: its connections, key names and scripts.
pub(crate) struct Groups {
    /// Reads (loads, lists).
    conn: ConnectionManager,
    /// Writes: the engine's append connection (its own under replicated durability, where
    /// `WAIT` follows each write).
    writer: ConnectionManager,
    /// `<prefix>:groups{<prefix>}:`
    base: String,
    timeout: Duration,
    durability: RedisDurability,
    max: usize,
    scripts: [Script; 5],
}

const S_CREATE: usize = 0;
const S_COMMIT: usize = 1;
const S_COMPACT: usize = 2;
const S_DELETE: usize = 3;
const S_LOAD: usize = 4;

struct GroupKeys {
    state: String,
    changes: String,
    member: String,
}

impl Groups {
    pub fn new(config: &RedisConfig, conn: ConnectionManager, writer: ConnectionManager) -> Self {
        Self {
            conn,
            writer,
            base: format!("{p}:groups{{{p}}}:", p = config.prefix),
            timeout: config.timeout,
            durability: config.durability,
            max: config.max_groups,
            scripts: [CREATE, COMMIT, COMPACT, DELETE, LOAD].map(Script::new),
        }
    }

    fn index(&self) -> String {
        format!("{}index", self.base)
    }

    fn keys(&self, stream: &StreamName, group: &GroupName) -> GroupKeys {
        let name = format!("{}:{}", escape(stream.as_str()), escape(group.as_str()));
        GroupKeys {
            state: format!("{}s:{name}", self.base),
            changes: format!("{}c:{name}", self.base),
            member: format!("{stream} {group}"),
        }
    }

    /// Runs a write script on the writer connection, then waits for the replicas if the
    /// durability says so (only when `wrote`, judged from the reply).
    async fn write(
        &self,
        what: &str,
        call: &redis::ScriptInvocation<'_>,
        wrote: impl Fn(i64) -> bool,
    ) -> Result<i64, EngineError> {
        let reply: i64 = within(
            what,
            self.timeout,
            call.invoke_async(&mut self.writer.clone()),
        )
        .await?;
        if wrote(reply)
            && let RedisDurability::Replicated { replicas } = self.durability
        {
            wait_for_replicas(
                &self.writer,
                replicas,
                self.timeout,
                &format!("the {what} "),
                "it may be stored — load the group again",
            )
            .await?;
        }
        Ok(reply)
    }
}

/// The engine's group store: see the module docs.
#[async_trait]
impl GroupStore for Groups {
    /// Every node of a cluster commits to the same groups.
    fn shared(&self) -> bool {
        true
    }

    async fn create_group(&self, snapshot: &GroupSnapshot) -> Result<bool, EngineError> {
        let keys = self.keys(&snapshot.stream, &snapshot.group);
        let data = encode("snapshot", serde_json::to_vec(snapshot))?;
        let mut call = self.scripts[S_CREATE].prepare_invoke();
        call.key(self.index())
            .key(&keys.state)
            .key(&keys.changes)
            .arg(&keys.member)
            .arg(id_text(snapshot)?)
            .arg(data)
            .arg(self.max);
        match self.write("group create", &call, |r| r == 1).await? {
            1 => Ok(true),
            0 => Ok(false),
            -1 => Err(EngineError::Limit(Limit::Groups { max: self.max })),
            other => Err(unexpected("group create", other)),
        }
    }

    async fn load_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<Option<StoredGroup>, EngineError> {
        let keys = self.keys(stream, group);
        let mut call = self.scripts[S_LOAD].prepare_invoke();
        call.key(&keys.state).key(&keys.changes);
        let reply: Value = within(
            "group load",
            self.timeout,
            call.invoke_async(&mut self.conn.clone()),
        )
        .await?;
        parse_load(reply, stream, group)
    }

    async fn list_groups(
        &self,
        stream: Option<&StreamName>,
    ) -> Result<Vec<(StreamName, GroupName)>, EngineError> {
        let (min, max) = match stream {
            // Every member `<stream> <group>`: a space, then anything, sorts below `<stream>!`.
            Some(s) => (format!("[{s} "), format!("({s}!")),
            None => ("-".to_owned(), "+".to_owned()),
        };
        let members: Vec<String> = within(
            "group list",
            self.timeout,
            redis::cmd("ZRANGEBYLEX")
                .arg(self.index())
                .arg(min)
                .arg(max)
                .query_async(&mut self.conn.clone()),
        )
        .await?;
        let mut groups = members
            .iter()
            .map(|m| parse_member(m))
            .collect::<Result<Vec<_>, _>>()?;
        groups.sort();
        Ok(groups)
    }

    async fn commit_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        expected: u64,
        changes: &[Change],
    ) -> Result<Committed, EngineError> {
        let keys = self.keys(stream, group);
        let data = if changes.is_empty() {
            Vec::new()
        } else {
            encode("commit", serde_json::to_vec(changes))?
        };
        let mut call = self.scripts[S_COMMIT].prepare_invoke();
        call.key(&keys.state)
            .key(&keys.changes)
            .arg(expected)
            .arg(data);
        match self.write("group commit", &call, |r| r > 0).await? {
            -1 => Ok(Committed::Conflict),
            v if v > 0 => Ok(Committed::Done { version: v as u64 }),
            other => Err(unexpected("group commit", other)),
        }
    }

    async fn compact_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
        version: u64,
        snapshot: &GroupSnapshot,
    ) -> Result<Committed, EngineError> {
        spool_engine::groups::check_compaction(stream, group, snapshot)?;
        let keys = self.keys(stream, group);
        let data = encode("snapshot", serde_json::to_vec(snapshot))?;
        let mut call = self.scripts[S_COMPACT].prepare_invoke();
        call.key(&keys.state)
            .key(&keys.changes)
            .arg(version)
            .arg(id_text(snapshot)?)
            .arg(data);
        match self.write("group compaction", &call, |r| r == 1).await? {
            1 => Ok(Committed::Done { version }),
            -1 => Ok(Committed::Conflict),
            other => Err(unexpected("group compaction", other)),
        }
    }

    async fn delete_group(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<bool, EngineError> {
        let keys = self.keys(stream, group);
        let mut call = self.scripts[S_DELETE].prepare_invoke();
        call.key(self.index())
            .key(&keys.state)
            .key(&keys.changes)
            .arg(&keys.member);
        match self.write("group delete", &call, |r| r == 1).await? {
            1 => Ok(true),
            0 => Ok(false),
            other => Err(unexpected("group delete", other)),
        }
    }
}

/// `%` and `:` escaped, so `<stream>:<group>` splits one way only.
fn escape(name: &str) -> String {
    name.replace('%', "%25").replace(':', "%3A")
}

/// A record's JSON (`serde_json::to_vec` of it), within [`MAX_RECORD_BYTES`].
fn encode(what: &str, json: serde_json::Result<Vec<u8>>) -> Result<Vec<u8>, EngineError> {
    let data =
        json.map_err(|e| EngineError::internal_from(format!("cannot encode a group {what}"), e))?;
    if data.len() > MAX_RECORD_BYTES {
        return Err(EngineError::Limit(Limit::Store {
            what: format!(
                "a group {what} of {} bytes is larger than the Redis engine stores in one \
                 record ({MAX_RECORD_BYTES} bytes); lower the group's max_in_flight",
                data.len()
            ),
            source: None,
        }));
    }
    Ok(data)
}

/// The group's incarnation as stored (its JSON form), so a compaction of an older incarnation
/// of the same name is refused.
fn id_text(snapshot: &GroupSnapshot) -> Result<String, EngineError> {
    serde_json::to_string(&snapshot.id)
        .map_err(|e| EngineError::internal_from("cannot encode a group id", e))
}

fn unexpected(what: &str, reply: i64) -> EngineError {
    EngineError::internal(format!(
        "unexpected reply {reply} from the redis {what} script"
    ))
}

fn bytes(v: Value, what: &str) -> Result<Vec<u8>, EngineError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        _ => Err(EngineError::internal(format!(
            "unexpected reply from Redis: a group's {what} is not a string"
        ))),
    }
}

fn corrupt(stream: &StreamName, group: &GroupName, what: &str) -> EngineError {
    EngineError::internal(format!(
        "group {group:?} on stream {stream:?} in Redis: {what}"
    ))
}

fn parse_load(
    reply: Value,
    stream: &StreamName,
    group: &GroupName,
) -> Result<Option<StoredGroup>, EngineError> {
    let items = match reply {
        Value::Nil => return Ok(None),
        Value::Array(items) if items.len() == 3 => items,
        _ => {
            return Err(corrupt(
                stream,
                group,
                "the load reply is not [v, s, changes]",
            ));
        }
    };
    let mut items = items.into_iter();
    let (Some(v), Some(s), Some(Value::Array(commits))) =
        (items.next(), items.next(), items.next())
    else {
        return Err(corrupt(
            stream,
            group,
            "the load reply is not [v, s, changes]",
        ));
    };
    let version = std::str::from_utf8(&bytes(v, "version")?)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| corrupt(stream, group, "the stored version is not a number"))?;
    let snapshot: GroupSnapshot = serde_json::from_slice(&bytes(s, "snapshot")?).map_err(|e| {
        EngineError::internal_from(
            format!("group {group:?} on stream {stream:?} in Redis: the snapshot does not decode"),
            e,
        )
    })?;
    if (&snapshot.stream, &snapshot.group) != (stream, group) {
        return Err(corrupt(
            stream,
            group,
            &format!(
                "the stored snapshot is of group {:?} on {:?}",
                snapshot.group, snapshot.stream
            ),
        ));
    }
    let mut changes = Vec::new();
    for (i, commit) in commits.into_iter().enumerate() {
        let batch: Vec<Change> =
            serde_json::from_slice(&bytes(commit, "commit")?).map_err(|e| {
                EngineError::internal_from(
                    format!(
                        "group {group:?} on stream {stream:?} in Redis: commit {i} since the \
                     snapshot does not decode"
                    ),
                    e,
                )
            })?;
        changes.extend(batch);
    }
    Ok(Some(StoredGroup {
        snapshot,
        changes,
        version,
    }))
}

fn parse_member(member: &str) -> Result<(StreamName, GroupName), EngineError> {
    let bad = || EngineError::internal(format!("the Redis group index holds {member:?}"));
    let (stream, group) = member.split_once(' ').ok_or_else(bad)?;
    Ok((
        StreamName::stored(stream).map_err(|_| bad())?,
        GroupName::new(group).map_err(|_| bad())?,
    ))
}

/// The engine's [`GroupStore`] is its [`Groups`].
impl HasGroupStore for RedisEngine {
    fn group_store(&self) -> &dyn GroupStore {
        &self.groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_and_keys_name_one_group() {
        assert_eq!(escape("a:b%c"), "a%3Ab%25c");
        let (s, g) = parse_member("chat:room/1 workers").unwrap();
        assert_eq!((s.as_str(), g.as_str()), ("chat:room/1", "workers"));
        assert!(parse_member("nospace").is_err());
        // `a:b` + `c` and `a` + `b:c` are different keys.
        assert_ne!(
            format!("{}:{}", escape("a:b"), escape("c")),
            format!("{}:{}", escape("a"), escape("b:c"))
        );
    }
}
