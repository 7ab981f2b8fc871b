//! A consumer group's settings (SPEC §7): where it starts, how long a lease lasts, how often a
//! message may be delivered, the backoff between deliveries, how many messages may be out at
//! once, whether messages of one key are ordered, and where dead letters go.
//!
//! [`GroupConfigSpec`] is the wire form (the body of `PUT …/groups/{group}`: every field
//! optional, durations as `"30s"`, unknown fields refused). [`GroupConfig::from_spec`] fills the
//! defaults and validates; every out-of-range value is a [`GroupConfigError`] whose message says
//! what is allowed (the HTTP layer answers it as a `400`). A `GroupConfig` can only be built
//! validated: its `Deserialize` goes through the same checks, so a stored config read back is
//! as trustworthy as a new one.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    continuity::Start,
    group::name::GroupName,
    name::{InvalidStreamName, StreamName},
    position::InvalidPosition,
};

/// The longest visibility timeout, nack delay or backoff step: 12 hours (as SQS).
pub const MAX_DURATION: Duration = Duration::from_secs(12 * 3600);
/// The most deliveries a group may allow a message before dead-lettering it (as SQS's
/// `maxReceiveCount`).
pub const MAX_DELIVERIES_CAP: u32 = 1000;
/// The most messages a group may have leased at once. The group's memory is bounded by twice
/// this (see the module docs of [`crate::group`]), so it is a memory bound too.
pub const MAX_IN_FLIGHT_CAP: u32 = 100_000;
/// The most steps a backoff list may have.
pub const MAX_BACKOFF_STEPS: usize = 100;

/// Whether messages of one key are delivered one at a time, in offset order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Any member, any order: the most throughput.
    #[default]
    None,
    /// Messages with the same `key` are never leased at the same time and finish in offset
    /// order per key; messages without a key are unordered.
    Key,
}

/// A group's validated settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupConfig {
    /// Where a new group starts (used once, at creation).
    pub start: Start,
    /// How long a lease lasts unless the receive names its own.
    pub visibility_timeout: Duration,
    /// Deliveries without an ack before the message is dead-lettered.
    pub max_deliveries: u32,
    /// The delay before a message whose lease ran out is visible again, per delivery count:
    /// `backoff[d - 1]` after the `d`-th delivery, the last step repeating; empty: at once.
    pub backoff: Vec<Duration>,
    /// The most messages leased at once in the group.
    pub max_in_flight: u32,
    pub ordering: Ordering,
    /// The dead-letter stream; `None` is the default `{stream}.{group}.dead`.
    pub dead_letter: Option<StreamName>,
}

impl Default for GroupConfig {
    /// SPEC §7's defaults.
    fn default() -> Self {
        Self {
            start: Start::Oldest,
            visibility_timeout: Duration::from_secs(30),
            max_deliveries: 5,
            backoff: Vec::new(),
            max_in_flight: 1000,
            ordering: Ordering::None,
            dead_letter: None,
        }
    }
}

/// Why a group's settings are refused. Each message names the field and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupConfigError {
    #[error("start must be \"oldest\", \"latest\" or a position EPOCH:OFFSET: {0}")]
    Start(InvalidPosition),
    #[error("visibility_timeout must be more than 0s and at most 12h; got {}", fmt_duration(*.0))]
    VisibilityTimeout(Duration),
    #[error("max_deliveries must be from 1 to {MAX_DELIVERIES_CAP}; got {0}")]
    MaxDeliveries(u32),
    #[error("max_in_flight must be from 1 to {MAX_IN_FLIGHT_CAP}; got {0}")]
    MaxInFlight(u32),
    #[error("backoff may have at most {MAX_BACKOFF_STEPS} steps; got {0}")]
    BackoffSteps(usize),
    #[error("every backoff step must be at most 12h; got {}", fmt_duration(*.0))]
    BackoffStep(Duration),
    #[error("dead_letter is not a valid stream name: {0}")]
    DeadLetter(InvalidStreamName),
    #[error(
        "the default dead-letter stream name {name:?} is not a valid stream name ({error}); \
         give the group a dead_letter stream"
    )]
    DefaultDeadLetter {
        name: String,
        error: InvalidStreamName,
    },
    #[error("dead_letter must not be the group's own stream")]
    DeadLetterIsSource,
}

/// Formats a duration the way the wire form writes it (`"30s"`, `"1m 30s"`, `"250ms"`).
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

impl GroupConfig {
    /// The settings a create request asks for: the defaults, with the fields `spec` gives.
    pub fn from_spec(spec: &GroupConfigSpec) -> Result<Self, GroupConfigError> {
        GroupConfig::default().updated(spec)
    }

    /// These settings with the fields `spec` gives replaced (an update keeps what it does not
    /// name), validated.
    pub fn updated(&self, spec: &GroupConfigSpec) -> Result<Self, GroupConfigError> {
        let mut c = self.clone();
        if let Some(start) = &spec.start {
            c.start = start.parse().map_err(GroupConfigError::Start)?;
        }
        if let Some(v) = spec.visibility_timeout {
            c.visibility_timeout = v.0;
        }
        if let Some(n) = spec.max_deliveries {
            c.max_deliveries = n;
        }
        if let Some(b) = &spec.backoff {
            c.backoff = b.iter().map(|d| d.0).collect();
        }
        if let Some(n) = spec.max_in_flight {
            c.max_in_flight = n;
        }
        if let Some(o) = spec.ordering {
            c.ordering = o;
        }
        if let Some(name) = &spec.dead_letter {
            c.dead_letter = Some(StreamName::new(name).map_err(GroupConfigError::DeadLetter)?);
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks every range. Everything that builds a `GroupConfig` from outside calls this.
    pub fn validate(&self) -> Result<(), GroupConfigError> {
        check_visibility(self.visibility_timeout)?;
        if !(1..=MAX_DELIVERIES_CAP).contains(&self.max_deliveries) {
            return Err(GroupConfigError::MaxDeliveries(self.max_deliveries));
        }
        if !(1..=MAX_IN_FLIGHT_CAP).contains(&self.max_in_flight) {
            return Err(GroupConfigError::MaxInFlight(self.max_in_flight));
        }
        if self.backoff.len() > MAX_BACKOFF_STEPS {
            return Err(GroupConfigError::BackoffSteps(self.backoff.len()));
        }
        if let Some(&step) = self.backoff.iter().find(|&&d| d > MAX_DURATION) {
            return Err(GroupConfigError::BackoffStep(step));
        }
        Ok(())
    }

    /// The dead-letter stream of this group on `stream`: the configured one, or
    /// `{stream}.{group}.dead`. Fails when the default name would be too long, or when the
    /// dead letters would go back into the stream itself.
    pub fn dead_letter_for(
        &self,
        stream: &StreamName,
        group: &GroupName,
    ) -> Result<StreamName, GroupConfigError> {
        let name = match &self.dead_letter {
            Some(name) => name.clone(),
            None => {
                let name = format!("{stream}.{group}.dead");
                StreamName::new(&name)
                    .map_err(|error| GroupConfigError::DefaultDeadLetter { name, error })?
            }
        };
        if &name == stream {
            return Err(GroupConfigError::DeadLetterIsSource);
        }
        Ok(name)
    }

    /// How long after its lease ran out a message delivered `deliveries` times is visible
    /// again.
    pub fn backoff_after(&self, deliveries: u32) -> Duration {
        let i = (deliveries.max(1) - 1) as usize;
        match self.backoff.get(i).or(self.backoff.last()) {
            Some(&d) => d,
            None => Duration::ZERO,
        }
    }

    /// The wire form of these settings, every field given (the default dead-letter stream
    /// left out).
    pub fn to_spec(&self) -> GroupConfigSpec {
        GroupConfigSpec {
            start: Some(self.start.to_string()),
            visibility_timeout: Some(DurationText(self.visibility_timeout)),
            max_deliveries: Some(self.max_deliveries),
            backoff: Some(self.backoff.iter().copied().map(DurationText).collect()),
            max_in_flight: Some(self.max_in_flight),
            ordering: Some(self.ordering),
            dead_letter: self.dead_letter.as_ref().map(|n| n.as_str().to_owned()),
        }
    }
}

/// Checks a visibility timeout (the group's, a receive's or an extend's): more than zero, at
/// most 12 h.
pub fn check_visibility(d: Duration) -> Result<(), GroupConfigError> {
    if d.is_zero() || d > MAX_DURATION {
        return Err(GroupConfigError::VisibilityTimeout(d));
    }
    Ok(())
}

impl Serialize for GroupConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_spec().serialize(s)
    }
}

impl<'de> Deserialize<'de> for GroupConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spec = GroupConfigSpec::deserialize(d)?;
        GroupConfig::from_spec(&spec).map_err(serde::de::Error::custom)
    }
}

/// The wire form of a group's settings: the body of `PUT /v1/streams/{stream}/groups/{group}`
/// and the `config` of a group's description. Every field is optional; unknown fields are
/// refused, so a misspelt setting is an error and not a silent default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfigSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility_timeout: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_deliveries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Vec<DurationText>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering: Option<Ordering>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
}

/// A duration on the wire: written as `"30s"`, `"1m 30s"`, `"250ms"`; read from such a string
/// or from a number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DurationText(pub Duration);

impl Serialize for DurationText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match crate::retention::de_opt_duration(d)? {
            Some(d) => Ok(DurationText(d)),
            None => Err(serde::de::Error::custom(
                "a duration is written like \"30s\", \"1m 30s\" or \"250ms\"",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::{Epoch, Offset, Position};

    fn spec(json: &str) -> GroupConfigSpec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_are_the_spec_s() {
        let c = GroupConfig::from_spec(&GroupConfigSpec::default()).unwrap();
        assert_eq!(c, GroupConfig::default());
        assert_eq!(c.start, Start::Oldest);
        assert_eq!(c.visibility_timeout, Duration::from_secs(30));
        assert_eq!(c.max_deliveries, 5);
        assert!(c.backoff.is_empty());
        assert_eq!(c.max_in_flight, 1000);
        assert_eq!(c.ordering, Ordering::None);
        let stream = StreamName::new("orders").unwrap();
        let group = GroupName::new("billing").unwrap();
        assert_eq!(
            c.dead_letter_for(&stream, &group).unwrap().as_str(),
            "orders.billing.dead"
        );
    }

    #[test]
    fn the_wire_form_round_trips_with_durations_as_text() {
        let c = GroupConfig::from_spec(&spec(
            r#"{"start": "e1:42", "visibility_timeout": "1m 30s", "max_deliveries": 3,
                "backoff": ["1s", "5s", 60], "max_in_flight": 10, "ordering": "key",
                "dead_letter": "dlq"}"#,
        ))
        .unwrap();
        assert_eq!(
            c.start,
            Start::After(Position::new(Epoch::parse("e1").unwrap(), Offset(42)))
        );
        assert_eq!(c.visibility_timeout, Duration::from_secs(90));
        assert_eq!(
            c.backoff,
            [1, 5, 60]
                .map(Duration::from_secs)
                .into_iter()
                .collect::<Vec<_>>()
        );
        assert_eq!(c.ordering, Ordering::Key);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"start": "e1:42", "visibility_timeout": "1m 30s",
                "max_deliveries": 3, "backoff": ["1s", "5s", "1m"], "max_in_flight": 10,
                "ordering": "key", "dead_letter": "dlq"})
        );
        let back: GroupConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
        // The default dead-letter stream is not written out.
        let json = serde_json::to_value(GroupConfig::default()).unwrap();
        assert!(json.get("dead_letter").is_none());
        assert_eq!(json["visibility_timeout"], "30s");
    }

    #[test]
    fn an_update_keeps_what_it_does_not_name() {
        let c =
            GroupConfig::from_spec(&spec(r#"{"max_deliveries": 9, "ordering": "key"}"#)).unwrap();
        let u = c.updated(&spec(r#"{"max_in_flight": 7}"#)).unwrap();
        assert_eq!(
            (u.max_deliveries, u.ordering, u.max_in_flight),
            (9, Ordering::Key, 7)
        );
    }

    #[test]
    fn every_out_of_range_value_is_refused_with_a_clear_message() {
        use GroupConfigError as E;
        let cases: &[(&str, E)] = &[
            (r#"{"max_deliveries": 0}"#, E::MaxDeliveries(0)),
            (r#"{"max_deliveries": 1001}"#, E::MaxDeliveries(1001)),
            (r#"{"max_in_flight": 0}"#, E::MaxInFlight(0)),
            (r#"{"max_in_flight": 100001}"#, E::MaxInFlight(100_001)),
            (
                r#"{"visibility_timeout": "0s"}"#,
                E::VisibilityTimeout(Duration::ZERO),
            ),
            (
                r#"{"visibility_timeout": "12h 1s"}"#,
                E::VisibilityTimeout(Duration::from_secs(12 * 3600 + 1)),
            ),
            (
                r#"{"backoff": ["1s", "13h"]}"#,
                E::BackoffStep(Duration::from_secs(13 * 3600)),
            ),
            (
                r#"{"dead_letter": "a b"}"#,
                E::DeadLetter(InvalidStreamName::BadChar(' ')),
            ),
            (
                r#"{"start": "yesterday"}"#,
                E::Start(InvalidPosition::Format),
            ),
            (r#"{"start": "e1:x"}"#, E::Start(InvalidPosition::BadOffset)),
        ];
        for (json, want) in cases {
            assert_eq!(
                GroupConfig::from_spec(&spec(json)).as_ref(),
                Err(want),
                "{json}"
            );
        }
        let steps = vec!["1s"; 101];
        let json = serde_json::json!({ "backoff": steps }).to_string();
        assert_eq!(
            GroupConfig::from_spec(&spec(&json)),
            Err(E::BackoffSteps(101))
        );
        assert_eq!(
            E::MaxDeliveries(0).to_string(),
            "max_deliveries must be from 1 to 1000; got 0"
        );
        assert_eq!(
            E::VisibilityTimeout(Duration::from_secs(13 * 3600)).to_string(),
            "visibility_timeout must be more than 0s and at most 12h; got 13h"
        );
        // The boundaries themselves are fine.
        assert!(
            GroupConfig::from_spec(&spec(
                r#"{"visibility_timeout": "12h", "max_deliveries": 1000, "max_in_flight": 100000,
                    "backoff": ["0s", "12h"]}"#
            ))
            .is_ok()
        );
    }

    #[test]
    fn malformed_wire_forms_are_refused() {
        for bad in [
            r#"{"visibility": "30s"}"#,
            r#"{"visibility_timeout": "soon"}"#,
            r#"{"visibility_timeout": -1}"#,
            r#"{"ordering": "fifo"}"#,
            r#"{"max_deliveries": -1}"#,
            r#"{"backoff": "1s"}"#,
        ] {
            assert!(
                serde_json::from_str::<GroupConfigSpec>(bad).is_err(),
                "{bad}"
            );
        }
        // A stored config is validated when read back.
        assert!(serde_json::from_str::<GroupConfig>(r#"{"max_in_flight": 0}"#).is_err());
    }

    #[test]
    fn dead_letter_names_are_checked_against_the_stream() {
        let stream = StreamName::new(&"s".repeat(250)).unwrap();
        let group = GroupName::new("group").unwrap();
        let c = GroupConfig::default();
        assert!(matches!(
            c.dead_letter_for(&stream, &group),
            Err(GroupConfigError::DefaultDeadLetter {
                error: InvalidStreamName::TooLong(261),
                ..
            })
        ));
        let c =
            GroupConfig::from_spec(&spec(&format!(r#"{{"dead_letter": "{stream}"}}"#))).unwrap();
        assert_eq!(
            c.dead_letter_for(&stream, &group),
            Err(GroupConfigError::DeadLetterIsSource)
        );
    }

    #[test]
    fn backoff_applies_per_delivery_and_the_last_step_repeats() {
        let mut c = GroupConfig::default();
        assert_eq!(c.backoff_after(1), Duration::ZERO);
        c.backoff = vec![Duration::from_secs(1), Duration::from_secs(10)];
        assert_eq!(c.backoff_after(1), Duration::from_secs(1));
        assert_eq!(c.backoff_after(2), Duration::from_secs(10));
        assert_eq!(c.backoff_after(7), Duration::from_secs(10));
        assert_eq!(c.backoff_after(0), Duration::from_secs(1));
    }
}
