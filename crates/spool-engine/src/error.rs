//! What can go wrong inside an engine, typed so that callers branch on it.
//!
//! [`EngineError`] keeps four broad kinds, which is what the server maps to HTTP statuses and
//! error codes (`engine_unavailable` 503, `limit_reached` 503, `stream_limit` 507, `internal`
//! 500): [`EngineError::Unavailable`] (retry later), [`EngineError::Limit`] (a bound of the
//! engine, named by [`Limit`]), [`EngineError::StreamLimit`] (no new stream may be created,
//! named by [`StreamLimit`]) and [`EngineError::Internal`] (a bug, bad configuration or
//! corrupted data).
//!
//! Where a backend's own error (a `redis::RedisError`, an async-nats error, an `io::Error`, a
//! redb error) is the cause, it is kept as the error's [`source`](std::error::Error::source),
//! as a [`Cause`], so this crate depends on no backend. The message (`Display`) also ends with
//! the cause's text, because it is what reaches a client's error body and most log lines,
//! which print only the top error.

use std::{error::Error as StdError, fmt, sync::Arc};

/// A backend's own error under an [`EngineError`]. Shared rather than boxed: an engine error
/// is `Clone`, because one failed read may answer every reader waiting on it
/// (`cluster::TailCache::read_through`).
pub type Cause = Arc<dyn StdError + Send + Sync + 'static>;

/// What went wrong inside an engine. The server maps the kinds to HTTP statuses and error
/// codes; the data inside says what exactly, for logs and for callers that branch on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The engine's backing store cannot be reached or used right now; retry later.
    #[error("engine unavailable: {what}{}", Because(.source))]
    Unavailable {
        /// What could not be done, or why not (e.g. `redis append`, `cannot connect to NATS`).
        what: String,
        #[source]
        source: Option<Cause>,
    },
    /// A limit of the engine itself was hit (e.g. too many sessions, a message too large).
    #[error("engine limit reached: {0}")]
    Limit(Limit),
    /// The engine holds as many streams as it may: the stream cannot be created (streams that
    /// exist go on working).
    #[error("stream limit reached: {0}")]
    StreamLimit(StreamLimit),
    /// Anything else: a bug, an invalid configuration or corrupted data.
    #[error("engine failure: {what}{}", Because(.source))]
    Internal {
        /// What failed (e.g. `stream entry 7 is corrupt`, `invalid Redis URL`).
        what: String,
        #[source]
        source: Option<Cause>,
    },
}

impl EngineError {
    /// The backing store cannot be used now, with no underlying error to keep.
    pub fn unavailable(what: impl Into<String>) -> Self {
        Self::Unavailable {
            what: what.into(),
            source: None,
        }
    }

    /// The backing store cannot be used now because of `source` (the backend's own error).
    pub fn unavailable_from(
        what: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            what: what.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// A bug, invalid configuration or corrupted data, with no underlying error to keep.
    pub fn internal(what: impl Into<String>) -> Self {
        Self::Internal {
            what: what.into(),
            source: None,
        }
    }

    /// A bug, invalid configuration or corrupted data, caused by `source`.
    pub fn internal_from(
        what: impl Into<String>,
        source: impl StdError + Send + Sync + 'static,
    ) -> Self {
        Self::Internal {
            what: what.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// Whether retrying later may succeed (the store was unreachable or refusing for now).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

impl From<Limit> for EngineError {
    fn from(limit: Limit) -> Self {
        Self::Limit(limit)
    }
}

impl From<StreamLimit> for EngineError {
    fn from(limit: StreamLimit) -> Self {
        Self::StreamLimit(limit)
    }
}

/// Which limit of the engine refused a request ([`EngineError::Limit`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Limit {
    /// A save at `--max-sessions`: every session already stored was saved, `refused` new ones
    /// of the batch were not (`crate::sessions::refused`).
    #[error(
        "{max} sessions are stored (--max-sessions): {refused} new sessions were not saved \
         (sessions already stored were)"
    )]
    Sessions { max: usize, refused: usize },
    /// A session record larger than the backing store takes (NATS: the server's
    /// `max_payload`); it was not saved.
    #[error(
        "session record {id:?} ({size} bytes) is larger than the {store} server's max_payload; \
         it was not saved{}",
        Because(.source)
    )]
    SessionTooLarge {
        id: String,
        size: usize,
        store: &'static str,
        #[source]
        source: Option<Cause>,
    },
    /// A message larger than the backing store takes (NATS: the server's `max_payload`, which
    /// counts the payload and Spool's headers). `size` is the message's payload in bytes,
    /// `max` the store's bound when it said.
    #[error(
        "the message is larger than the {store} server's max_payload{}{}",
        Sizes(*.size, *.max),
        Because(.source)
    )]
    MessageTooLarge {
        store: &'static str,
        size: usize,
        max: Option<usize>,
        #[source]
        source: Option<Cause>,
    },
    /// A group would be created while the engine holds `max` (`--max-groups`); groups that
    /// exist go on working.
    #[error(
        "{max} consumer groups exist (--max-groups): new groups cannot be created, existing \
         ones work as before"
    )]
    Groups { max: usize },
    /// A limit the backing store enforces on its own (e.g. a JetStream account's maximum
    /// number of streams).
    #[error("{what}{}", Because(.source))]
    Store {
        what: String,
        #[source]
        source: Option<Cause>,
    },
}

/// Why no new stream may be created ([`EngineError::StreamLimit`]). Streams that exist go on
/// working.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamLimit {
    /// An append would create a stream while the engine holds `max` (`--max-streams`).
    #[error(
        "the {engine} engine holds its maximum of {max} streams (--max-streams): new streams \
         cannot be created, existing ones work as before"
    )]
    Streams { engine: &'static str, max: u64 },
    /// A request that would create `new` streams while `held` of `max` exist, refused before
    /// anything of it was appended (the server's stream budget).
    #[error(
        "the {engine} engine holds {held} of its maximum of {max} streams (--max-streams) and \
         this request would create {new}: nothing was published. New streams cannot be \
         created, existing ones work as before"
    )]
    Request {
        engine: &'static str,
        held: u64,
        max: u64,
        new: u32,
    },
    /// Readers already wait on `max` streams nothing was published to
    /// (`--max-unpublished-streams`) — in the engine (`engine`), or on this node of a cluster
    /// engine (`engine` is `None`); retry later.
    #[error(
        "{} already {} on {max} streams nothing was published to \
         (--max-unpublished-streams); retry later",
        Holder(*.engine),
        if .engine.is_some() { "has readers waiting" } else { "wait" }
    )]
    Unpublished {
        engine: Option<&'static str>,
        max: u64,
    },
}

/// `": <cause>"`, or nothing.
struct Because<'a>(&'a Option<Cause>);

impl fmt::Display for Because<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(cause) => write!(f, ": {cause}"),
            None => Ok(()),
        }
    }
}

/// `" (N bytes, at most M)"`.
struct Sizes(usize, Option<usize>);

impl fmt::Display for Sizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Some(max) => write!(f, " ({} bytes of payload, at most {max} in all)", self.0),
            None => write!(f, " ({} bytes of payload)", self.0),
        }
    }
}

/// Who holds the unpublished streams: an engine, or this node's readers.
struct Holder(Option<&'static str>);

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(engine) => write!(f, "the {engine} engine"),
            None => f.write_str("this node's readers"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_the_cause_and_name_the_limit() {
        let io = std::io::Error::other("connection refused");
        let e = EngineError::unavailable_from("redis append", io);
        assert_eq!(
            e.to_string(),
            "engine unavailable: redis append: connection refused"
        );
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("connection refused"));
        assert!(e.is_unavailable());
        assert_eq!(
            EngineError::internal("append returned nothing").to_string(),
            "engine failure: append returned nothing"
        );
        let e = EngineError::from(Limit::Sessions { max: 2, refused: 1 });
        assert!(
            e.to_string()
                .starts_with("engine limit reached: 2 sessions are stored")
        );
        let e = EngineError::from(StreamLimit::Unpublished {
            engine: None,
            max: 5,
        });
        assert_eq!(
            e.to_string(),
            "stream limit reached: this node's readers already wait on 5 streams nothing was \
             published to (--max-unpublished-streams); retry later"
        );
        let e = EngineError::from(StreamLimit::Unpublished {
            engine: Some("memory"),
            max: 5,
        });
        assert!(
            e.to_string()
                .contains("the memory engine already has readers waiting on 5 streams"),
            "{e}"
        );
    }
}
