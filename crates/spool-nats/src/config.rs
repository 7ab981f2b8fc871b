//! Settings of the NATS JetStream engine, and the JetStream stream configuration they imply.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, StorageType};
use spool_core::{Retention, RetentionPolicy, StreamName};
use spool_engine::EngineError;

use crate::names::{self, StreamNames};

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
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// NATS server URL(s), comma-separated, e.g. `nats://127.0.0.1:4222`.
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
}

impl NatsConfig {
    /// Defaults: prefix `spool`, file storage with 1 replica, SPEC retention, a 2-minute dedup
    /// window, sessions kept at most a day, a 2 s timeout.
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
        }
    }

    pub(crate) fn validate(&self) -> Result<(), EngineError> {
        let bad = |what: String| Err(EngineError::Internal(format!("NATS engine: {what}")));
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
        Ok(())
    }

    pub(crate) fn storage(&self) -> StorageType {
        match self.durability {
            NatsDurability::Memory => StorageType::Memory,
            NatsDurability::Replicated => StorageType::File,
        }
    }

    /// The JetStream stream holding `stream`: its one subject, this node's retention as
    /// JetStream limits (discarding the oldest), the dedup window, and the Spool name as the
    /// description (checked on every info; see `names`).
    pub(crate) fn stream_config(&self, stream: &StreamName, names: &StreamNames) -> Config {
        let retention = self.retention.for_stream(stream);
        Config {
            name: names.stream.clone(),
            description: Some(stream.as_str().to_owned()),
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
