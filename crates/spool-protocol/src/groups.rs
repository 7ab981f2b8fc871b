//! JSON bodies of the consumer-group calls (SPEC §7, docs/http-api.md "Consumer groups"):
//! `PUT/GET/DELETE /v1/streams/{stream}/groups/{group}`, `GET …/groups`, and `POST
//! …/groups/{group}/{receive,ack,nack,extend,terminate,redrive}`.
//!
//! A group's settings travel as `spool_core::group::GroupConfigSpec` (durations as `"30s"`).
//! Request bodies refuse unknown fields, so a misspelt field is an error, not a silent default.

use serde::{Deserialize, Serialize};
pub use spool_core::group::{GroupConfigSpec, ReceiptResult, config::DurationText};

/// `POST …/receive`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// The member receiving (same rules as a stream name).
    pub consumer: String,
    /// At most this many messages, 1–1000 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Long-poll: wait up to this long when nothing is available (default 0, at most the
    /// server's long-poll maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<DurationText>,
    /// The lease's length for these messages (default: the group's `visibility_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility_timeout: Option<DurationText>,
    /// Receipts to ack before receiving (at most 1000; empty: nothing to ack): the acks and
    /// the receive's first round are one commit, and the answer carries one result per
    /// receipt in [`ReceiveResponse::acks`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<Vec<String>>,
}

delivered! {
    /// One leased message.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct GroupMessage {
        /// Settles this lease (ack, nack, extend, terminate); valid for this delivery only.
        pub receipt: String,
        /// 1 on the first delivery.
        pub deliveries: u32,
    }
}

/// The answer of a receive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveResponse {
    /// Leased messages, in offset order (possibly none after `wait`).
    pub messages: Vec<GroupMessage>,
    /// A loss of continuity this receive recorded (never silent: also in the group's stats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset: Option<GroupResetBody>,
    /// When the request carried `ack`: one result per receipt, in the order sent. Reported
    /// even when the receive after the acks failed (then `messages` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acks: Option<Vec<ReceiptOutcome>>,
}

/// `POST …/ack`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    pub receipts: Vec<String>,
}

/// `POST …/nack`: visible again after `delay` (default at once). `reason` becomes the dead
/// letter's `spool-dead-reason` if this was the message's last allowed delivery.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NackRequest {
    pub receipts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DurationText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `POST …/extend`: each lease renewed for `visibility_timeout` from now (default: the
/// group's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    pub receipts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility_timeout: Option<DurationText>,
}

/// `POST …/terminate`: straight to the dead-letter stream; `reason` goes in its
/// `spool-dead-detail` header.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminateRequest {
    pub receipts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The result for one receipt, in the order sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptOutcome {
    pub receipt: String,
    /// `ok`, `expired` or `unknown`.
    pub result: ReceiptResult,
}

/// The answer of ack, nack, extend and terminate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleResponse {
    pub results: Vec<ReceiptOutcome>,
}

/// A group's description: `GET …/groups/{group}`, and the answer of `PUT`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub stream: String,
    pub group: String,
    /// The settings, every field given.
    pub config: GroupConfigSpec,
    /// The dead-letter stream (the default `{stream}.{group}.dead` when not configured).
    pub dead_letter: String,
    /// Creation time, ms since the Unix epoch.
    pub created: u64,
    pub stats: GroupStatsBody,
}

/// A group's stats (SPEC §7).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatsBody {
    /// Messages not handed out yet.
    pub pending: u64,
    /// Messages leased now.
    pub in_flight: u64,
    /// Age of the oldest unfinished message (0: none).
    pub oldest_age_ms: u64,
    pub acked: u64,
    pub redelivered: u64,
    pub dead_lettered: u64,
    /// Messages lost before the group finished them (retention, epoch change).
    pub expired: u64,
    pub resets: u64,
    /// `EPOCH:OFFSET`: every message up to here has been taken into the group.
    pub cursor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reset: Option<GroupResetBody>,
    pub members: Vec<MemberStatsBody>,
}

/// A member's stats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatsBody {
    pub consumer: String,
    /// Its latest receive, ms since the Unix epoch (0: not known).
    pub last_seen: u64,
    pub in_flight: u64,
    pub nacks: u64,
    /// Leases it let run out.
    pub timeouts: u64,
}

/// A loss of continuity the group recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupResetBody {
    /// `epoch_changed`, `history_expired` or `unknown_stream`.
    pub reason: String,
    /// Messages lost (a lower bound after an epoch change).
    pub lost: u64,
    /// When, ms since the Unix epoch.
    pub at: u64,
    /// The cursor before and after, `EPOCH:OFFSET`.
    pub from: String,
    pub to: String,
}

impl From<&spool_core::group::GroupReset> for GroupResetBody {
    fn from(r: &spool_core::group::GroupReset) -> Self {
        GroupResetBody {
            reason: r.reason.as_str().to_owned(),
            lost: r.lost,
            at: r.at_ms,
            from: r.from.to_string(),
            to: r.to.to_string(),
        }
    }
}

/// `GET /v1/streams/{stream}/groups`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupList {
    pub stream: String,
    pub groups: Vec<GroupListEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupListEntry {
    pub group: String,
}

/// The answer of `POST …/redrive`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedriveResponse {
    /// The dead-letter stream read.
    pub dead_letter: String,
    /// Messages published back into the stream.
    pub moved: u64,
    /// Dead letters of other source streams (a shared dead-letter stream), left where they are.
    pub skipped: u64,
    /// True when the call stopped at its bound with more left: call again.
    pub more: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_refuse_unknown_fields_and_read_durations() {
        let r: ReceiveRequest = serde_json::from_str(
            r#"{"consumer":"w1","max":10,"wait":"20s","visibility_timeout":30}"#,
        )
        .unwrap();
        assert_eq!(r.max, Some(10));
        assert_eq!(r.wait.unwrap().0.as_secs(), 20);
        assert_eq!(r.visibility_timeout.unwrap().0.as_secs(), 30);
        assert!(serde_json::from_str::<ReceiveRequest>(r#"{"consumer":"w","mx":1}"#).is_err());
        assert_eq!(r.ack, None);
        let r: ReceiveRequest =
            serde_json::from_str(r#"{"consumer":"w","ack":["a","b"]}"#).unwrap();
        assert_eq!(r.ack, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert!(serde_json::from_str::<AckRequest>(r#"{"receipts":[],"delay":"1s"}"#).is_err());
        let n: NackRequest =
            serde_json::from_str(r#"{"receipts":["a"],"delay":"1m","reason":"bad"}"#).unwrap();
        assert_eq!(n.delay.unwrap().0.as_secs(), 60);
    }

    #[test]
    fn a_receive_writes_ack_and_acks_only_when_there_are_some() {
        let plain = ReceiveRequest {
            consumer: "w".into(),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&plain).unwrap(),
            r#"{"consumer":"w"}"#
        );
        let acking = ReceiveRequest {
            ack: Some(vec!["r".into()]),
            ..plain
        };
        assert_eq!(
            serde_json::to_string(&acking).unwrap(),
            r#"{"consumer":"w","ack":["r"]}"#
        );
        let answer: ReceiveResponse = serde_json::from_str(r#"{"messages":[]}"#).unwrap();
        assert_eq!(answer.acks, None);
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            r#"{"messages":[]}"#
        );
        let answer: ReceiveResponse =
            serde_json::from_str(r#"{"messages":[],"acks":[{"receipt":"r","result":"unknown"}]}"#)
                .unwrap();
        assert_eq!(
            answer.acks,
            Some(vec![ReceiptOutcome {
                receipt: "r".into(),
                result: ReceiptResult::Unknown,
            }])
        );
    }

    #[test]
    fn results_are_lowercase_words() {
        let r = SettleResponse {
            results: vec![ReceiptOutcome {
                receipt: "x".into(),
                result: ReceiptResult::Expired,
            }],
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"results":[{"receipt":"x","result":"expired"}]}"#
        );
    }
}
