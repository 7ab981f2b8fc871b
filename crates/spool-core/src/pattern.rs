//! Stream-name patterns, as used by retention rules and token claims: `*` matches any run of
//! characters (including none), everything else matches itself. `chat:*` matches `chat:lobby`
//! and `chat:a/b`; `*` matches every stream.

use std::fmt;

/// A glob over stream names where `*` is the only wildcard.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern {
    source: String,
    parts: Vec<String>,
}

impl Pattern {
    pub fn new(source: &str) -> Self {
        Self {
            source: source.to_owned(),
            parts: source.split('*').map(str::to_owned).collect(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `name` matches. Linear in the name's length per part; no backtracking blow-up
    /// because each part is matched at its leftmost place (which is optimal for `*` globs).
    pub fn matches(&self, name: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(split) => split,
            None => return name.is_empty(),
        };
        let Some(mut remaining) = name.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return remaining.is_empty();
        };
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(i) => remaining = &remaining[i + part.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.source, f)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl<'de> serde::Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Pattern::new(&String::deserialize(d)?))
    }
}

impl serde::Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let cases = [
            ("*", "anything", true),
            ("*", "", true),
            ("chat:*", "chat:lobby", true),
            ("chat:*", "chat:", true),
            ("chat:*", "chatroom", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("*:x", "a:b:x", true),
            ("a*a", "a", false),
            ("user/*/inbox", "user/42/inbox", true),
        ];
        for (p, name, want) in cases {
            assert_eq!(Pattern::new(p).matches(name), want, "{p} ~ {name}");
        }
    }
}
