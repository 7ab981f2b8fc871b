//! The names a consumer group deals in: the group's own ([`GroupName`]) and its members'
//! ([`MemberName`], the `consumer` of a receive). Both follow the stream-name rules (SPEC §1 and
//! §7): UTF-8, 1–255 bytes, no control, whitespace or invisible formatting characters, so they
//! can sit in URLs, logs and dead-letter headers without surprises.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::name::{InvalidStreamName, StreamName};

/// Why a string is not a group or member name. The first field says which kind of name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    #[error("{0} name is empty")]
    Empty(&'static str),
    #[error("{0} name is {1} bytes long; the limit is 255")]
    TooLong(&'static str, usize),
    #[error(
        "{0} name contains {1:?}; control characters, whitespace and invisible formatting \
         characters are not allowed"
    )]
    BadChar(&'static str, char),
}

impl InvalidName {
    fn from_stream(kind: &'static str, e: InvalidStreamName) -> Self {
        match e {
            InvalidStreamName::Empty => InvalidName::Empty(kind),
            InvalidStreamName::TooLong(n) => InvalidName::TooLong(kind, n),
            InvalidStreamName::BadChar(c) => InvalidName::BadChar(kind, c),
        }
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `name` with the stream-name rules.
            pub fn new(name: &str) -> Result<Self, InvalidName> {
                StreamName::new(name)
                    .map(|_| Self(Arc::from(name)))
                    .map_err(|e| InvalidName::from_stream($kind, e))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A consumer group's name, unique per stream.
    GroupName,
    "group"
);

name_type!(
    /// A member of a group: the `consumer` a receive names (e.g. `worker-1`). Members are not
    /// registered: a name is a member from its first receive on.
    MemberName,
    "consumer"
);

/// Serde for a [`StreamName`] inside group records (spool-core's `StreamName` has no serde of
/// its own; stored names are read back with [`StreamName::stored`]).
pub(crate) mod stream_name_serde {
    use super::*;

    pub fn serialize<S: Serializer>(name: &StreamName, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<StreamName, D::Error> {
        let s = String::deserialize(d)?;
        StreamName::stored(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_stream_rules_and_say_which_name() {
        assert!(GroupName::new("billing/v2:eu").is_ok());
        assert_eq!(GroupName::new(""), Err(InvalidName::Empty("group")));
        assert_eq!(
            MemberName::new("worker 1"),
            Err(InvalidName::BadChar("consumer", ' '))
        );
        assert_eq!(
            MemberName::new(&"w".repeat(256)),
            Err(InvalidName::TooLong("consumer", 256))
        );
        assert_eq!(
            MemberName::new("w\u{200B}").unwrap_err().to_string(),
            "consumer name contains '\\u{200b}'; control characters, whitespace and invisible \
             formatting characters are not allowed"
        );
        let g: GroupName = serde_json::from_str("\"g1\"").unwrap();
        assert_eq!(serde_json::to_string(&g).unwrap(), "\"g1\"");
        assert!(serde_json::from_str::<GroupName>("\"a b\"").is_err());
    }
}
