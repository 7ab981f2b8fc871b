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
        for c in stream.as_str().chars() {
            match c {
                '%' => tag.push_str("%25"),
                '{' => tag.push_str("%7B"),
                '}' => tag.push_str("%7D"),
                c => tag.push(c),
            }
        }
        tag.push('}');
        StreamKeys {
            meta: format!("{tag}:m"),
            data: format!("{tag}:x"),
            dedup: format!("{tag}:i:"),
        }
    }

    pub fn session(&self, id: &str) -> String {
        format!("{}:session:{id}", self.prefix)
    }

    pub fn heads_channel(&self) -> String {
        format!("{}:heads", self.prefix)
    }
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
        assert!(Keys::new("a{b").is_err());
        assert!(Keys::new("").is_err());
    }
}
