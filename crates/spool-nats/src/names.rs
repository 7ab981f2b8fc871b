//! How Spool names map onto NATS names.
//!
//! A Spool stream name is UTF-8 with `.`, `/`, `:` and any non-ASCII character allowed; a
//! JetStream stream name may not hold `.`, `*`, `>` or whitespace (and is a directory name on
//! disk), and a subject token may not hold `.`, `*`, `>` either. So every name is encoded into
//! `[A-Za-z0-9_-]`: `[A-Za-z0-9-]` is kept, every other byte becomes `_XX` (upper-case hex).
//! That is injective — a `_` in the output always starts an escape — so two Spool streams
//! never share a JetStream stream. A name whose encoding would be too long (a 255-byte name of
//! non-ASCII characters triples) becomes `_h` and the SHA-256 of the name in lower-case hex;
//! `h` is never an escape's first digit, so the two forms cannot meet. The real name is kept
//! in the JetStream stream's description and checked whenever its info is read, so even a
//! hash collision would be an error, never a mix-up.

use sha2::{Digest, Sha256};
use spool_core::StreamName;

/// The longest encoded name used as is; longer ones are hashed. JetStream stores a file
/// stream in a directory named after it (≤ 255 bytes on common filesystems), and the
/// prefix and separators come on top.
const MAX_ENCODED: usize = 160;

/// The JetStream names of one Spool stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StreamNames {
    /// The JetStream stream: `<prefix>_<encoded>`.
    pub stream: String,
    /// Its one subject: `<prefix>.s.<encoded>`.
    pub subject: String,
}

impl StreamNames {
    pub fn new(prefix: &str, name: &StreamName) -> Self {
        let encoded = encode(name.as_str());
        Self {
            stream: format!("{prefix}_{encoded}"),
            subject: format!("{prefix}.s.{encoded}"),
        }
    }
}

/// `name` in `[A-Za-z0-9_-]`; see the module docs.
pub(crate) fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            out.push(b as char);
        } else {
            out.push('_');
            out.push_str(&format!("{b:02X}"));
        }
    }
    if out.len() > MAX_ENCODED {
        format!("_h{}", hex(&Sha256::digest(name.as_bytes())))
    } else {
        out
    }
}

/// Whether `prefix` can start every NATS name the engine makes: a stream name, a subject
/// token and a KV bucket name. No `_`: the first `_` of a JetStream stream name ends the
/// prefix, so prefixes `a` and `a_b` can never claim the same stream.
pub(crate) fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= 32
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A KV key for a session id. Ids are base64url, which KV keys allow as they are; anything
/// else (not issued by Spool, but the engine must not choke on it) is hex-encoded behind a
/// `x.` that no base64url id can start with.
pub(crate) fn session_key(id: &str) -> String {
    if !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        id.to_owned()
    } else {
        format!("x.{}", hex(&Sha256::digest(id.as_bytes())))
    }
}

/// The `Nats-Msg-Id` for an idempotency key: the key itself when it is a short, printable
/// ASCII token (readable in NATS tools), else a digest of it, since a header value must not
/// hold line breaks and JetStream keeps every id of the window in memory.
pub(crate) fn msg_id(key: &str) -> String {
    if !key.is_empty()
        && key.len() <= 128
        && !key.starts_with("sha256:")
        && key.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        key.to_owned()
    } else {
        format!("sha256:{}", hex(&Sha256::digest(key.as_bytes())))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn names(s: &str) -> StreamNames {
        StreamNames::new("spool", &StreamName::new(s).unwrap())
    }

    #[test]
    fn names_are_legal_and_distinct() {
        let long = "é".repeat(127);
        let inputs = [
            "a.b",
            "a_2Eb",
            "a_b",
            "x/y",
            "ü*>",
            "chat:room-1",
            "A",
            "a",
            &long,
        ];
        let mut seen = HashSet::new();
        for s in inputs {
            let n = names(s);
            assert!(
                n.stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{s}: {}",
                n.stream
            );
            assert!(n.stream.len() <= 200, "{s}: {}", n.stream);
            assert_eq!(n.subject.matches('.').count(), 2);
            assert!(seen.insert(n.stream), "{s} collides");
        }
        assert_eq!(names("a.b").stream, "spool_a_2Eb");
        assert_eq!(names("a_2Eb").stream, "spool_a_5F2Eb");
        assert!(names(&long).stream.starts_with("spool__h"));
    }

    #[test]
    fn session_keys_and_msg_ids_are_safe() {
        assert_eq!(session_key("aB3-_x"), "aB3-_x");
        assert!(session_key("a.b").starts_with("x."));
        assert!(session_key("").starts_with("x."));
        assert_eq!(msg_id("k1"), "k1");
        assert!(msg_id("with space").starts_with("sha256:"));
        assert!(msg_id("line\r\nbreak").starts_with("sha256:"));
        assert_ne!(msg_id("sha256:x"), "sha256:x");
        assert!(valid_prefix("spool"));
        assert!(!valid_prefix("a.b"));
        assert!(!valid_prefix("a_b"));
        assert!(!valid_prefix(""));
    }
}
