//! Settings of the NATS JetStream engine, and the JetStream stream configuration they imply.

use std::{fmt, time::Duration};

use async_nats::{
    ServerAddr,
    jetstream::stream::{Config, DiscardPolicy, StorageType},
};
use spool_core::{Epoch, Retention, RetentionPolicy, StreamName};
use spool_engine::EngineError;

use crate::{
    codec,
    names::{self, StreamNames},
};

/// How JetStream keeps the engine's streams and sessions (SPEC §4 durability levels).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NatsDurability {
    /// JetStream memory storage: an ack means the message is in the memory of `replicas`
    /// servers. A restart of those servers loses it (the stream comes back with a new epoch).
    Memory,
    /// JetStream file storage on `replicas` servers; an ack comes after JetStream's quorum
    /// (a majority of the replicas) has written it. See the crate docs for what "written"
    /// means on disk.
    #[default]
    Replicated,
}

/// Settings of [`crate::NatsEngine`].
#[derive(Clone)]
pub struct NatsConfig {
    /// NATS server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222` or
    /// `nats://10.0.0.1:4222,nats://10.0.0.2:4222,nats://10.0.0.3:4222`. The client connects to
    /// one of them and, when that one goes away, reconnects to another (and to the servers the
    /// cluster itself announces), so naming every server of a NATS cluster keeps the engine
    /// reachable while any one of them is down.
    pub url: String,
    /// Starts every NATS name the engine makes (streams `<prefix>_…`, subjects `<prefix>.…`,
    /// the KV bucket `<prefix>_sessions`): `[A-Za-z0-9-]`, at most 32 characters. Spool
    /// nodes of one cluster share it; separate clusters on one NATS use separate prefixes.
    pub prefix: String,
    pub durability: NatsDurability,
    /// Copies JetStream keeps of each stream, 1..=5 (more than 1 needs a JetStream cluster).
    pub replicas: usize,
    pub retention: RetentionPolicy,
    /// How long an idempotency key is remembered (JetStream's duplicate window; at most a
    /// stream's `max_age`).
    pub dedup_window: Duration,
    /// How long the sessions bucket keeps a record at most, whatever its own expiry.
    pub session_max_age: Duration,
    /// How long any one request to NATS (a publish ack, an API call) may take before the
    /// engine answers `Unavailable`.
    pub timeout: Duration,
    /// Most streams JetStream does not hold that this node's readers may wait on (placeholder
    /// epochs kept in memory only; see the crate docs). Past it, with every one watched, a
    /// watch of another such stream answers `StreamLimit`.
    pub max_unpublished_streams: usize,
    /// The most consumer groups kept (`--max-groups`); past it a creation is refused.
    pub max_groups: usize,
}

impl fmt::Debug for NatsConfig {
    /// Without the URLs' passwords, so the config can be logged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redacted(&self.url))
            .field("prefix", &self.prefix)
            .field("durability", &self.durability)
            .field("replicas", &self.replicas)
            .field("retention", &self.retention)
            .field("dedup_window", &self.dedup_window)
            .field("session_max_age", &self.session_max_age)
            .field("timeout", &self.timeout)
            .field("max_unpublished_streams", &self.max_unpublished_streams)
            .field("max_groups", &self.max_groups)
            .finish()
    }
}

/// `scheme://user:secret@host` → `scheme://***@host`, for each server of a list.
pub(crate) fn redacted(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &url[..scheme + 3], &url[at..])
            }
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl NatsConfig {
    /// The servers of [`NatsConfig::url`], each checked: a clear error names the one that is
    /// not a NATS URL (by its position and, without its password, its text).
    pub fn servers(&self) -> Result<Vec<ServerAddr>, EngineError> {
        let entries: Vec<&str> = self.url.split(',').map(str::trim).collect();
        let several = entries.len() > 1;
        entries
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                let which = if several {
                    format!("server {} of {} in the NATS URL list", i + 1, entries.len())
                } else {
                    "the NATS URL".to_owned()
                };
                if entry.is_empty() {
                    return Err(EngineError::internal(format!(
                        "{which} is empty (servers are separated by single commas)"
                    )));
                }
                entry.parse::<ServerAddr>().map_err(|e| {
                    EngineError::internal(format!(
                        "{which}, {:?}, is not a NATS server URL \
                         (nats://host:port, tls://… or ws://…): {e}",
                        redacted(entry)
                    ))
                })
            })
            .collect()
    }

    /// Defaults: prefix `spool`, file storage with 1 replica, SPEC retention, a 2-minute dedup
    /// window, sessions kept at most a day, a 2 s timeout, 100,000 placeholders, 10,000 groups.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "spool".into(),
            durability: NatsDurability::Replicated,
            replicas: 1,
            retention: RetentionPolicy::default(),
            dedup_window: Duration::from_secs(120),
            session_max_age: Duration::from_secs(24 * 3600),
            timeout: Duration::from_secs(2),
            max_unpublished_streams: 100_000,
            max_groups: spool_engine::groups::MAX_GROUPS,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), EngineError> {
        let bad = |what: String| Err(EngineError::internal(format!("NATS engine: {what}")));
        if !names::valid_prefix(&self.prefix) {
            return bad(format!(
                "prefix {:?} must be 1-32 characters from [A-Za-z0-9-]",
                self.prefix
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return bad(format!("replicas must be 1 to 5, not {}", self.replicas));
        }
        if self.timeout.is_zero() {
            return bad("the timeout must be more than zero".into());
        }
        if self.session_max_age.is_zero() {
            return bad("the session max age must be more than zero".into());
        }
        if self.max_unpublished_streams == 0 {
            return bad("the unpublished stream limit must be more than zero".into());
        }
        self.servers().map(|_| ())
    }

    pub(crate) fn storage(&self) -> StorageType {
        match self.durability {
            NatsDurability::Memory => StorageType::Memory,
            NatsDurability::Replicated => StorageType::File,
        }
    }

    /// The JetStream stream holding `stream`, made in `epoch`: its one subject, this node's
    /// retention as JetStream limits (discarding the oldest), the dedup window, and the Spool
    /// name and the epoch as the description (the name is checked on every info; see `names`
    /// and `codec::epoch`).
    pub(crate) fn stream_config(
        &self,
        stream: &StreamName,
        names: &StreamNames,
        epoch: &Epoch,
    ) -> Config {
        let retention = self.retention.for_stream(stream);
        Config {
            name: names.stream.clone(),
            description: Some(codec::description(stream, epoch)),
            subjects: vec![names.subject.clone()],
            storage: self.storage(),
            num_replicas: self.replicas,
            max_messages: clamp(retention.max_messages),
            max_bytes: clamp(retention.max_bytes),
            max_age: retention.max_age,
            discard: DiscardPolicy::Old,
            duplicate_window: duplicate_window(self.dedup_window, &retention),
            ..Default::default()
        }
    }
}

/// Whether a JetStream stream configured as `have` already has everything of `want` that Spool
/// sets, except the description (which carries the epoch the stream was made in, and is never
/// changed: see `jetstream::Api::create`).
pub(crate) fn same_limits(have: &Config, want: &Config) -> bool {
    have.subjects == want.subjects
        && have.storage == want.storage
        && have.num_replicas == want.num_replicas
        && have.max_messages == want.max_messages
        && have.max_bytes == want.max_bytes
        && have.max_age == want.max_age
        && have.discard == want.discard
        && have.duplicate_window == want.duplicate_window
}

/// JetStream refuses a duplicate window longer than `max_age` (0 = no age limit), and reads
/// a zero window as its 2-minute default; with no dedup wanted no message carries an id, so
/// the window is moot then.
fn duplicate_window(dedup: Duration, retention: &Retention) -> Duration {
    if retention.max_age.is_zero() {
        dedup
    } else {
        dedup.min(retention.max_age)
    }
}

/// JetStream limits are `i64`, with -1 or 0 for "none"; Spool's are `u64` and never "none".
fn clamp(limit: u64) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(url: &str) -> Result<Vec<String>, String> {
        NatsConfig::new(url)
            .servers()
            .map(|all| all.iter().map(|s| s.as_url_str().to_owned()).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_comma_separated_url_is_a_list_of_servers() {
        assert_eq!(
            servers("nats://127.0.0.1:4222, nats://127.0.0.1:4223,tls://h:4224").unwrap(),
            [
                "nats://127.0.0.1:4222",
                "nats://127.0.0.1:4223",
                "tls://h:4224"
            ]
        );
        assert_eq!(servers("127.0.0.1:5").unwrap(), ["nats://127.0.0.1:5"]);
    }

    #[test]
    fn a_bad_server_is_named_without_its_password() {
        let e = servers("nats://a:1,nats://u:hunter2@b:99999").unwrap_err();
        assert!(
            e.contains("server 2 of 2") && e.contains("nats://***@b:99999"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        let e = servers("nats://a:1,").unwrap_err();
        assert!(e.contains("server 2 of 2") && e.contains("empty"), "{e}");
        let e = servers("http://a:1").unwrap_err();
        assert!(
            e.contains("the NATS URL") && e.contains("http://a:1"),
            "{e}"
        );
        let shown = format!("{:?}", NatsConfig::new("nats://u:hunter2@h:1,nats://h:2"));
        assert!(
            shown.contains("nats://***@h:1,nats://h:2") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
