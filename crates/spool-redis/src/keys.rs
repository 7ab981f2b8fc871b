//! Where things live in Redis.
//!
//! Every key of one stream carries the stream's name as its hash tag (`{…}`), so one append
//! script touches a single slot and the layout fits Redis Cluster too:
//!
//! - `<prefix>:{<stream>}:m`: hash, `e` epoch, `h` head offset, `b` retained bytes
//! - `<prefix>:{<stream>}:x`: Redis Stream of the retained messages, entry id `<offset>-0`
//! - `<prefix>:{<stream>}:i:<idempotency key>`: `<epoch>:<offset>`, expires with the window
//! - `<prefix>:session:<id>`: a session record, expires with it
//! - `<prefix>:heads`: pub/sub channel, `<epoch> <head> <stream>` after each append
//!
//! Stream names may contain `{`, `}` and `%`; they are percent-escaped inside the tag, so the
//! first `}` always ends the tag and no two streams' keys can collide.

use spool_core::StreamName;

/// The key names of one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

/// The keys of one stream.
pub struct StreamKeys {
    pub meta: String,
    pub data: String,
    /// `<prefix>:{<stream>}:i:`, to which an idempotency key is appended.
    dedup: String,
}

impl StreamKeys {
    pub fn dedup(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.dedup.len() + key.len());
        k.push_str(&self.dedup);
        k.push_str(key);
        k
    }
}

impl Keys {
    /// Checks the prefix: braces would move the hash tag, whitespace is unreadable in tools.
    pub fn new(prefix: &str) -> Result<Self, String> {
        if prefix.is_empty()
            || prefix
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "invalid Redis key prefix {prefix:?}: it must be non-empty, without braces or whitespace"
            ));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    pub fn stream(&self, stream: &StreamName) -> StreamKeys {
        let mut tag = String::with_capacity(self.prefix.len() + stream.as_str().len() + 4);
        tag.push_str(&self.prefix);
        tag.push_str(":{");
        tag.push_str(&escape(stream.as_str()));
        tag.push('}');
        StreamKeys {
            meta: format!("{tag}:m"),
            data: format!("{tag}:x"),
            dedup: format!("{tag}:i:"),
        }
    }

    /// The `SCAN` pattern matching the metadata keys of the streams whose names start with
    /// `name_prefix` (and, as `*` crosses braces, some idempotency keys: see
    /// [`Keys::stream_of_meta`]).
    pub fn meta_pattern(&self, name_prefix: &str) -> String {
        format!(
            "{}:{{{}*}}:m",
            glob_escape(&self.prefix),
            glob_escape(&escape(name_prefix))
        )
    }

    /// The stream whose metadata key `key` is; `None` for any other key. An escaped name holds
    /// no `}`, so an idempotency key ending in `}:m` is told apart.
    pub fn stream_of_meta(&self, key: &str) -> Option<StreamName> {
        let inner = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?
            .strip_suffix("}:m")?;
        if inner.contains('}') {
            return None;
        }
        let mut name = String::with_capacity(inner.len());
        let mut rest = inner;
        while let Some(i) = rest.find('%') {
            name.push_str(&rest[..i]);
            let code = rest.get(i..i + 3)?;
            name.push(match code {
                "%25" => '%',
                "%7B" => '{',
                "%7D" => '}',
                _ => return None,
            });
            rest = &rest[i + 3..];
        }
        name.push_str(rest);
        StreamName::new(&name).ok()
    }

    pub fn session(&self, id: &str) -> String {
        format!("{}:session:{id}", self.prefix)
    }

    pub fn heads_channel(&self) -> String {
        format!("{}:heads", self.prefix)
    }
}

/// A stream name as it stands inside the hash tag (see the module docs).
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

/// `text` matched literally in a Redis glob pattern.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_in_names_stay_inside_the_tag() {
        let keys = Keys::new("p").unwrap();
        let a = keys.stream(&StreamName::new("x}:i:k").unwrap());
        let b = keys.stream(&StreamName::new("x").unwrap());
        assert_eq!(a.meta, "p:{x%7D:i:k}:m");
        assert_ne!(a.meta, b.dedup("k}:m"));
        assert_eq!(b.dedup("k"), "p:{x}:i:k");
        for name in ["x}:i:k", "a%7Bb", "plain/1", "w*[?]\\"] {
            let stream = StreamName::new(name).unwrap();
            assert_eq!(
                keys.stream_of_meta(&keys.stream(&stream).meta),
                Some(stream)
            );
        }
        // An idempotency key ending like a metadata key is none.
        assert_eq!(keys.stream_of_meta(&b.dedup("k}:m")), None);
        assert_eq!(keys.stream_of_meta("p:session:x"), None);
        assert_eq!(keys.stream_of_meta("p:{bad%zz}:m"), None);
        assert_eq!(keys.meta_pattern("a*{"), "p:{a\\*%7B*}:m");
        assert!(Keys::new("a{b").is_err());
        assert!(Keys::new("").is_err());
    }
}
