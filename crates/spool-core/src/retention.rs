//! How much history a stream keeps: at most `max_messages`, at most `max_bytes`, nothing older
//! than `max_age` — whichever bites first. Set globally, and overridden per stream-name pattern
//! (the first matching rule wins; fields a rule leaves out come from the global setting).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::{name::StreamName, pattern::Pattern};

/// The retention in force for one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Retention {
    pub max_messages: u64,
    pub max_bytes: u64,
    #[serde(serialize_with = "ser_duration_ms", rename = "max_age_ms")]
    pub max_age: Duration,
}

impl Default for Retention {
    /// SPEC §1: 10,000 messages, 64 MiB, 24 h.
    fn default() -> Self {
        Self {
            max_messages: 10_000,
            max_bytes: 64 * 1024 * 1024,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

impl Retention {
    /// Whether the oldest retained message must go, given the stream's current totals.
    /// A stream always keeps its newest message if it fits the count and byte limits on its
    /// own, so `max_bytes` smaller than one message still keeps nothing rather than looping.
    pub fn must_trim(&self, count: u64, bytes: u64, oldest_time_ms: u64, now_ms: u64) -> bool {
        count > self.max_messages
            || bytes > self.max_bytes
            || (count > 0
                && now_ms.saturating_sub(oldest_time_ms) > self.max_age.as_millis() as u64)
    }
}

fn ser_duration_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// A per-pattern override, e.g. `chat:*` keeps 1,000 messages for 1 h.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    pub pattern: Pattern,
    #[serde(default)]
    pub max_messages: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_bytes")]
    pub max_bytes: Option<u64>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max_age: Option<Duration>,
}

/// The global retention plus the per-pattern rules.
#[derive(Clone, Debug, Default)]
pub struct RetentionPolicy {
    pub default: Retention,
    pub rules: Vec<RetentionRule>,
}

impl RetentionPolicy {
    pub fn for_stream(&self, stream: &StreamName) -> Retention {
        let base = self.default;
        match self
            .rules
            .iter()
            .find(|r| r.pattern.matches(stream.as_str()))
        {
            None => base,
            Some(rule) => Retention {
                max_messages: rule.max_messages.unwrap_or(base.max_messages),
                max_bytes: rule.max_bytes.unwrap_or(base.max_bytes),
                max_age: rule.max_age.unwrap_or(base.max_age),
            },
        }
    }
}

/// Parses a human duration such as `90s`, `15m`, `1h 30m`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Parses a byte size such as `1048576`, `64MiB`, `1 GB`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid byte size {s:?}: {e}"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(u64),
    String(String),
}

/// Deserializes a byte size written as a number or a string (`"64MiB"`).
pub fn de_opt_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Option::<NumberOrString>::deserialize(d)? {
        None => None,
        Some(NumberOrString::Number(n)) => Some(n),
        Some(NumberOrString::String(s)) => Some(parse_bytes(&s).map_err(serde::de::Error::custom)?),
    })
}

/// Deserializes a duration written as a string (`"1h"`) or a number of seconds.
pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    Ok(match Option::<NumberOrString>::deserialize(d)? {
        None => None,
        Some(NumberOrString::Number(n)) => Some(Duration::from_secs(n)),
        Some(NumberOrString::String(s)) => {
            Some(parse_duration(&s).map_err(serde::de::Error::custom)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_wins_and_inherits() {
        let policy = RetentionPolicy {
            default: Retention::default(),
            rules: vec![
                RetentionRule {
                    pattern: Pattern::new("chat:*"),
                    max_messages: Some(1000),
                    max_bytes: None,
                    max_age: Some(Duration::from_secs(3600)),
                },
                RetentionRule {
                    pattern: Pattern::new("*"),
                    max_messages: Some(5),
                    max_bytes: None,
                    max_age: None,
                },
            ],
        };
        let chat = policy.for_stream(&StreamName::new("chat:lobby").unwrap());
        assert_eq!(chat.max_messages, 1000);
        assert_eq!(chat.max_age, Duration::from_secs(3600));
        assert_eq!(chat.max_bytes, Retention::default().max_bytes);
        let other = policy.for_stream(&StreamName::new("other").unwrap());
        assert_eq!(other.max_messages, 5);
    }

    #[test]
    fn trims_on_each_limit() {
        let r = Retention {
            max_messages: 3,
            max_bytes: 100,
            max_age: Duration::from_secs(10),
        };
        assert!(!r.must_trim(3, 100, 1_000, 10_000));
        assert!(r.must_trim(4, 10, 1_000, 1_000));
        assert!(r.must_trim(1, 101, 1_000, 1_000));
        assert!(r.must_trim(1, 1, 1_000, 11_001));
        assert!(!r.must_trim(0, 0, 0, u64::MAX));
    }

    #[test]
    fn parses_sizes_and_durations() {
        assert_eq!(parse_bytes("64MiB").unwrap(), 64 * 1024 * 1024);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("lots").is_err());
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("soon").is_err());
    }
}
