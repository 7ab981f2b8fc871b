//! Stream names: UTF-8, 1–255 bytes, no control characters and no whitespace.
//!
//! A [`StreamName`] can only be built through validation, so every layer below the transports
//! can take a name for granted. It is an `Arc<str>` inside: cloning it per message is cheap.

use std::{fmt, sync::Arc};

/// The longest stream name, in bytes.
pub const MAX_STREAM_NAME_LEN: usize = 255;

/// A validated stream name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

/// Why a string is not a stream name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidStreamName {
    #[error("stream name is empty")]
    Empty,
    #[error("stream name is {0} bytes long; the limit is 255")]
    TooLong(usize),
    #[error("stream name contains {0:?}; control characters and whitespace are not allowed")]
    BadChar(char),
}

impl StreamName {
    /// Validates `name` as a stream name.
    pub fn new(name: &str) -> Result<Self, InvalidStreamName> {
        if name.is_empty() {
            return Err(InvalidStreamName::Empty);
        }
        if name.len() > MAX_STREAM_NAME_LEN {
            return Err(InvalidStreamName::TooLong(name.len()));
        }
        if let Some(c) = name.chars().find(|c| c.is_control() || c.is_whitespace()) {
            return Err(InvalidStreamName::BadChar(c));
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for StreamName {
    type Err = InvalidStreamName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl AsRef<str> for StreamName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_punctuation() {
        for ok in ["a", "chat:room-1", "a.b_c/d", "ünïcode", &"x".repeat(255)] {
            assert!(StreamName::new(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn rejects_empty_long_and_blank() {
        assert_eq!(StreamName::new(""), Err(InvalidStreamName::Empty));
        assert_eq!(
            StreamName::new(&"x".repeat(256)),
            Err(InvalidStreamName::TooLong(256))
        );
        assert_eq!(StreamName::new("a b"), Err(InvalidStreamName::BadChar(' ')));
        assert_eq!(
            StreamName::new("a\nb"),
            Err(InvalidStreamName::BadChar('\n'))
        );
        assert_eq!(
            StreamName::new("a\u{7f}"),
            Err(InvalidStreamName::BadChar('\u{7f}'))
        );
    }
}
