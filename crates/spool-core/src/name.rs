//! Stream names: UTF-8, 1–255 bytes, no control characters, no whitespace, and no invisible
//! formatting characters (zero-width spaces, bidi controls, the BOM …): two names that look
//! the same on a screen or in a log must be the same name.
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
    #[error(
        "stream name contains {0:?}; control characters, whitespace and invisible formatting \
         characters are not allowed"
    )]
    BadChar(char),
}

impl StreamName {
    /// Validates `name` as a stream name.
    pub fn new(name: &str) -> Result<Self, InvalidStreamName> {
        // Most names are printable ASCII (`!` to `~`): no control, whitespace or invisible
        // character can be among them, so one pass over the bytes decides (every publish
        // validates its stream's name).
        if !name.is_empty()
            && name.len() <= MAX_STREAM_NAME_LEN
            && name.bytes().all(|b| (b'!'..=b'~').contains(&b))
        {
            return Ok(Self(Arc::from(name)));
        }
        if let Some(c) = name.chars().find(|&c| is_invisible(c)) {
            return Err(InvalidStreamName::BadChar(c));
        }
        Self::stored(name)
    }

    /// A name read back from storage. Data written by an earlier version may hold a name
    /// that today's rules refuse (invisible characters were allowed before); it must still
    /// load, so only the rules that have always held are checked here.
    pub fn stored(name: &str) -> Result<Self, InvalidStreamName> {
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

/// Characters that change how text is shown without showing themselves: Unicode's format
/// characters (category Cf: zero-width spaces and joiners, bidi embeddings, overrides and
/// isolates, the BOM, invisible operators, tags …) and the Hangul fillers, which render blank.
/// A name holding one could pass for another (`chat:a` and `chat:\u{200B}a`) or reorder how a
/// log line reads (U+202E).
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{0600}'..='\u{0605}'
            | '\u{061C}'
            | '\u{06DD}'
            | '\u{070F}'
            | '\u{0890}'..='\u{0891}'
            | '\u{08E2}'
            | '\u{115F}'..='\u{1160}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
            | '\u{E0100}'..='\u{E01EF}'
    )
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

    #[test]
    fn the_ascii_shortcut_decides_as_the_full_rules_do() {
        for b in 0u8..0x80 {
            let c = char::from(b);
            for name in [format!("{c}"), format!("a{c}b")] {
                let full = if c.is_control() || c.is_whitespace() {
                    Err(InvalidStreamName::BadChar(c))
                } else {
                    Ok(())
                };
                assert_eq!(StreamName::new(&name).map(|_| ()), full, "{name:?}");
            }
        }
    }

    #[test]
    fn rejects_invisible_and_bidi_characters() {
        for c in [
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{200E}',
            '\u{202A}',
            '\u{202E}',
            '\u{2066}',
            '\u{2069}',
            '\u{2060}',
            '\u{FEFF}',
            '\u{00AD}',
            '\u{061C}',
            '\u{E0041}',
            '\u{3164}',
        ] {
            let name = format!("chat:{c}a");
            assert_eq!(
                StreamName::new(&name),
                Err(InvalidStreamName::BadChar(c)),
                "{:?}",
                c
            );
        }
        // Visible non-ASCII letters and symbols stay allowed.
        for ok in ["chat:日本", "ß/ü", "emoji:🎉", "a→b"] {
            assert!(StreamName::new(ok).is_ok(), "{ok:?}");
        }
    }
}
