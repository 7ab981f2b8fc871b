//! Dead letters: what a group hands back when a message goes aside (SPEC §7), for the caller
//! to publish to the group's dead-letter stream.
//!
//! The state machine keeps no payloads ("store cursors, not data"), so a [`DeadLetter`] names
//! the message; the caller reads it from the source stream and appends it to
//! [`DeadLetter::to`] with its payload, content type, key and headers, plus
//! [`DeadLetter::headers`]:
//!
//! | header | value |
//! |---|---|
//! | `spool-dead-stream` | the source stream |
//! | `spool-dead-group` | the group |
//! | `spool-dead-epoch` | the message's epoch in the source stream |
//! | `spool-dead-offset` | its offset there |
//! | `spool-dead-deliveries` | how many times it was delivered |
//! | `spool-dead-reason` | `max_deliveries`, `terminated`, or the reason of the nack that used its last delivery |
//! | `spool-dead-detail` | only for `terminated` with a reason: that reason |
//!
//! A source message that retention removed meanwhile is dead-lettered with an empty payload
//! and these headers, so the loss stays visible. The append should carry
//! [`DeadLetter::idempotency_key`], so that publishing again after a crash between the append
//! and the group's changes being stored appends nothing twice.

use crate::{
    group::name::GroupName,
    name::StreamName,
    position::{Epoch, Offset},
};

pub const HEADER_STREAM: &str = "spool-dead-stream";
pub const HEADER_GROUP: &str = "spool-dead-group";
pub const HEADER_EPOCH: &str = "spool-dead-epoch";
pub const HEADER_OFFSET: &str = "spool-dead-offset";
pub const HEADER_DELIVERIES: &str = "spool-dead-deliveries";
pub const HEADER_REASON: &str = "spool-dead-reason";
pub const HEADER_DETAIL: &str = "spool-dead-detail";

/// The reason of a message whose deliveries ran out.
pub const REASON_MAX_DELIVERIES: &str = "max_deliveries";
/// The reason of a terminated message.
pub const REASON_TERMINATED: &str = "terminated";

/// The longest reason a nack or terminate may give, in bytes.
pub const MAX_REASON_LEN: usize = 256;

/// A reason given by a client with a nack or terminate: 1–256 bytes of UTF-8 without control
/// characters, so it can travel as a header value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reason(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReason {
    #[error("a reason must not be empty")]
    Empty,
    #[error("a reason is at most {MAX_REASON_LEN} bytes; got {0}")]
    TooLong(usize),
    #[error("a reason must not contain control characters; found {0:?}")]
    BadChar(char),
}

impl Reason {
    pub fn new(text: &str) -> Result<Self, InvalidReason> {
        if text.is_empty() {
            return Err(InvalidReason::Empty);
        }
        if text.len() > MAX_REASON_LEN {
            return Err(InvalidReason::TooLong(text.len()));
        }
        if let Some(c) = text.chars().find(|c| c.is_control()) {
            return Err(InvalidReason::BadChar(c));
        }
        Ok(Reason(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A message the group has put aside: to be appended to the dead-letter stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The dead-letter stream.
    pub to: StreamName,
    pub source: StreamName,
    pub group: GroupName,
    pub epoch: Epoch,
    pub offset: Offset,
    pub deliveries: u32,
    /// `max_deliveries`, `terminated`, or a nack's reason.
    pub reason: String,
    /// A terminate's own reason.
    pub detail: Option<String>,
    /// The message's key, to keep on the dead letter.
    pub key: Option<String>,
    /// The idempotency key of the append: the same for every attempt to dead-letter this
    /// message in this group incarnation.
    pub idempotency_key: String,
}

impl DeadLetter {
    /// The headers to add to the copied message.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut h = vec![
            (HEADER_STREAM.to_owned(), self.source.to_string()),
            (HEADER_GROUP.to_owned(), self.group.to_string()),
            (HEADER_EPOCH.to_owned(), self.epoch.to_string()),
            (HEADER_OFFSET.to_owned(), self.offset.to_string()),
            (HEADER_DELIVERIES.to_owned(), self.deliveries.to_string()),
            (HEADER_REASON.to_owned(), self.reason.clone()),
        ];
        if let Some(detail) = &self.detail {
            h.push((HEADER_DETAIL.to_owned(), detail.clone()));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_bounded_header_safe_text() {
        assert_eq!(Reason::new("bad json").unwrap().as_str(), "bad json");
        assert_eq!(Reason::new(""), Err(InvalidReason::Empty));
        assert_eq!(
            Reason::new(&"x".repeat(257)),
            Err(InvalidReason::TooLong(257))
        );
        assert!(Reason::new(&"é".repeat(128)).is_ok());
        assert_eq!(Reason::new("a\r\nb"), Err(InvalidReason::BadChar('\r')));
    }

    #[test]
    fn headers_name_the_source_and_the_reason() {
        let d = DeadLetter {
            to: StreamName::new("orders.billing.dead").unwrap(),
            source: StreamName::new("orders").unwrap(),
            group: GroupName::new("billing").unwrap(),
            epoch: Epoch::parse("e1").unwrap(),
            offset: Offset(7),
            deliveries: 5,
            reason: REASON_TERMINATED.into(),
            detail: Some("bad json".into()),
            key: None,
            idempotency_key: "k".into(),
        };
        let h = d.headers();
        let get = |name: &str| h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(get(HEADER_STREAM), Some("orders"));
        assert_eq!(get(HEADER_GROUP), Some("billing"));
        assert_eq!(get(HEADER_EPOCH), Some("e1"));
        assert_eq!(get(HEADER_OFFSET), Some("7"));
        assert_eq!(get(HEADER_DELIVERIES), Some("5"));
        assert_eq!(get(HEADER_REASON), Some("terminated"));
        assert_eq!(get(HEADER_DETAIL), Some("bad json"));
    }
}
