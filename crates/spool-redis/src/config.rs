//! Settings of the Redis engine, and the durability levels it maps onto Redis (SPEC §4).

use std::{fmt, time::Duration};

use spool_core::RetentionPolicy;

/// When an append is acknowledged, in Redis terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisDurability {
    /// Once the primary applied the append script (in its memory; persisted later as Redis is
    /// configured).
    Memory,
    /// Once the primary fsynced it to its append-only file. Requires `appendonly yes` and
    /// `appendfsync always`, checked at connect: Redis then fsyncs before it replies.
    Fsync,
    /// Once at least `replicas` replicas acknowledged it (`WAIT`). Fewer within the timeout
    /// fails the append with `Unavailable`; the message may still be stored, so the client
    /// retries with the same idempotency key.
    Replicated { replicas: u32 },
}

/// How to reach Redis and what to keep there.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (or `rediss://`, `unix://`).
    pub url: String,
    /// Prefix of every key and of the notification channel, so several Spool clusters can
    /// share one Redis. No braces or whitespace (braces would break the hash tags).
    pub prefix: String,
    pub durability: RedisDurability,
    pub retention: RetentionPolicy,
    /// How long an idempotency key is remembered.
    pub dedup_window: Duration,
    /// How long a stream's metadata (its epoch and head) outlives the last touch. Longer than
    /// any retention, so that a stream whose messages all expired keeps its epoch and readers
    /// get `history_expired` rather than `epoch_changed`.
    pub meta_ttl: Duration,
    /// The longest any one Redis call may take before the engine answers `Unavailable`.
    pub timeout: Duration,
    /// The most consumer groups kept (`--max-groups`); past it a creation is refused.
    pub max_groups: usize,
    /// The most streams Redis does not hold that this node's readers may watch at once
    /// (`--max-unpublished-streams`: placeholder epochs kept in memory only; see the crate
    /// docs). At the cap the ones no longer watched go; if every one is, a watch of another
    /// such stream answers `StreamLimit`.
    pub max_unpublished_streams: usize,
}

impl fmt::Debug for RedisConfig {
    /// Without the URL's password, so the config can be logged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redacted(&self.url))
            .field("prefix", &self.prefix)
            .field("durability", &self.durability)
            .field("retention", &self.retention)
            .field("dedup_window", &self.dedup_window)
            .field("meta_ttl", &self.meta_ttl)
            .field("timeout", &self.timeout)
            .field("max_groups", &self.max_groups)
            .field("max_unpublished_streams", &self.max_unpublished_streams)
            .finish()
    }
}

/// `scheme://user:secret@host` → `scheme://***@host`.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl RedisConfig {
    /// Defaults: prefix `spool`, [`RedisDurability::Memory`], the default retention, a
    /// 2-minute dedup window, 30 days of metadata, a 2 s timeout, 10,000 groups, 100,000
    /// unpublished streams watched.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "spool".into(),
            durability: RedisDurability::Memory,
            retention: RetentionPolicy::default(),
            dedup_window: Duration::from_secs(120),
            meta_ttl: Duration::from_secs(30 * 24 * 3600),
            timeout: Duration::from_secs(2),
            max_groups: spool_engine::groups::MAX_GROUPS,
            max_unpublished_streams: 100_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let shown = format!("{:?}", RedisConfig::new("redis://u:hunter2@h:6379/0"));
        assert!(shown.contains("redis://***@h:6379/0") && !shown.contains("hunter2"));
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
    }
}
