//! Offsets, epochs and positions (SPEC §1).
//!
//! An [`Offset`] numbers a message within one stream: 1, 2, 3 … with no holes. An [`Epoch`]
//! names one continuous history of those offsets; it changes exactly when the server can no
//! longer vouch for the history it had. A [`Position`] is the pair, written `EPOCH:OFFSET`.

use std::{fmt, str::FromStr, sync::Arc};

/// A message's place in its stream. `Offset(0)` is "before the first message".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(pub u64);

impl Offset {
    pub const ZERO: Offset = Offset(0);

    pub fn next(self) -> Offset {
        Offset(self.0 + 1)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The longest epoch accepted from a client.
pub const MAX_EPOCH_LEN: usize = 64;
const GENERATED_EPOCH_LEN: usize = 10;
const EPOCH_ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// An opaque id for one continuous history of a stream: a short random string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// A fresh random epoch: 10 base-62 characters (about 59 bits), so two histories of one
    /// stream never share a name in practice.
    pub fn generate() -> Self {
        use rand::RngExt;
        let mut rng = rand::rng();
        let s: String = (0..GENERATED_EPOCH_LEN)
            .map(|_| EPOCH_ALPHABET[rng.random_range(0..EPOCH_ALPHABET.len())] as char)
            .collect();
        Epoch(Arc::from(s))
    }

    /// Parses an epoch: 1–64 characters from `[A-Za-z0-9_-]`.
    pub fn parse(s: &str) -> Result<Self, InvalidPosition> {
        if s.is_empty() || s.len() > MAX_EPOCH_LEN {
            return Err(InvalidPosition::BadEpoch);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(InvalidPosition::BadEpoch);
        }
        Ok(Epoch(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({})", self.0)
    }
}

/// `(epoch, offset)`: the place of a message in one history of a stream.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Position {
    pub epoch: Epoch,
    pub offset: Offset,
}

/// Why a string is not a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPosition {
    #[error("a position is written EPOCH:OFFSET, e.g. \"a1B2c3:42\"")]
    Format,
    #[error("an epoch is 1-64 characters from [A-Za-z0-9_-]")]
    BadEpoch,
    #[error("an offset is a whole number from 0 to 2^64-1")]
    BadOffset,
}

impl Position {
    pub fn new(epoch: Epoch, offset: Offset) -> Self {
        Self { epoch, offset }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

impl FromStr for Position {
    type Err = InvalidPosition;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (epoch, offset) = s.rsplit_once(':').ok_or(InvalidPosition::Format)?;
        let epoch = Epoch::parse(epoch)?;
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidPosition::BadOffset);
        }
        let offset = offset.parse().map_err(|_| InvalidPosition::BadOffset)?;
        Ok(Position::new(epoch, Offset(offset)))
    }
}

impl serde::Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Position {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for Epoch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Epoch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Epoch::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_round_trips() {
        let p: Position = "abc:42".parse().unwrap();
        assert_eq!(p.epoch.as_str(), "abc");
        assert_eq!(p.offset, Offset(42));
        assert_eq!(p.to_string(), "abc:42");
        let e = Epoch::generate();
        let p = Position::new(e.clone(), Offset(0));
        assert_eq!(p.to_string().parse::<Position>().unwrap(), p);
    }

    #[test]
    fn garbage_is_rejected_with_a_reason() {
        assert_eq!("".parse::<Position>(), Err(InvalidPosition::Format));
        assert_eq!("abc".parse::<Position>(), Err(InvalidPosition::Format));
        assert_eq!(":4".parse::<Position>(), Err(InvalidPosition::BadEpoch));
        assert_eq!("a b:4".parse::<Position>(), Err(InvalidPosition::BadEpoch));
        assert_eq!("a:".parse::<Position>(), Err(InvalidPosition::BadOffset));
        assert_eq!("a:-1".parse::<Position>(), Err(InvalidPosition::BadOffset));
        assert_eq!("a:+1".parse::<Position>(), Err(InvalidPosition::BadOffset));
        assert_eq!(
            "a:99999999999999999999999".parse::<Position>(),
            Err(InvalidPosition::BadOffset)
        );
        assert_eq!("a:b:1".parse::<Position>(), Err(InvalidPosition::BadEpoch));
    }

    #[test]
    fn generated_epochs_differ_and_parse() {
        let a = Epoch::generate();
        let b = Epoch::generate();
        assert_ne!(a, b);
        assert_eq!(Epoch::parse(a.as_str()).unwrap(), a);
    }
}
