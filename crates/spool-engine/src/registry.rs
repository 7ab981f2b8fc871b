//! The streams an engine holds, by name, with a cap on how many: lookups take a read lock,
//! only the first touch of a stream takes the write lock.
//!
//! Two kinds of entry, capped separately:
//!
//! - **published** streams: created by the first append, durable on an engine that is, and
//!   capped by `max` (`--max-streams`). Reaching the cap refuses only the creation of new
//!   ones ([`EngineError::StreamLimit`]); existing streams go on as before.
//! - **unpublished** streams (placeholders): a stream someone reads or watches before anything
//!   was published to it. It exists only so that the reader has an epoch and a head watch: it
//!   is never written anywhere, and it is dropped by [`Registry::prune_unpublished`] once no
//!   watcher has held it for [`LINGER_MS`]. The first append adopts it — the same entry, its
//!   epoch and its head watch — so a reader waiting on it sees offset 1 with no reset. They are
//!   capped by `max_unpublished` (`--max-unpublished-streams`): at the cap, idle ones are
//!   dropped at once, and only when every one has a watcher is a new reader refused.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::RwLock;
use spool_core::{Clock, StreamName};

use crate::{EngineError, StreamCounts, StreamLimit};

/// How long an unpublished stream outlives its last watcher, in ms: a reader that comes back
/// within this time (the next long-poll, an SSE or WebSocket reconnect) finds the same epoch.
pub const LINGER_MS: u64 = 30_000;

/// At the cap of unpublished streams, idle ones are dropped (a full scan). A scan that frees
/// less than an eighth of the cap is not repeated for this long, so a cap held by live
/// watchers does not cost a scan per reader; a scan that frees more pays for itself.
const FUTILE_PRUNE_BACKOFF_MS: u64 = 1_000;

/// What the registry needs to know of a stream: how many head watches are out.
pub trait Watched {
    /// How many head watches on the stream are out.
    fn watchers(&self) -> usize;
}

struct Unpublished<T> {
    stream: Arc<T>,
    /// When a watcher last held it (or it was created), ms since the Unix epoch.
    touched: AtomicU64,
}

struct Maps<T> {
    published: HashMap<StreamName, Arc<T>>,
    unpublished: HashMap<StreamName, Unpublished<T>>,
}

/// The streams of one engine by name, published and unpublished, each kind capped.
pub struct Registry<T> {
    maps: RwLock<Maps<T>>,
    max: usize,
    max_unpublished: usize,
    engine: &'static str,
    /// Creations refused at the cap of published streams.
    refused: AtomicU64,
    /// When a prune at the cap last freed too little (ms since the Unix epoch).
    futile_prune_at: AtomicU64,
    clock: Clock,
}

impl<T: Watched> Registry<T> {
    /// An empty registry of the engine named `engine` (for error messages), holding at most
    /// `max` published and `max_unpublished` unpublished streams.
    /// `clock` decides how long an unwatched placeholder lingers.
    pub fn new(engine: &'static str, max: usize, max_unpublished: usize, clock: Clock) -> Self {
        Self {
            maps: RwLock::new(Maps {
                published: HashMap::new(),
                unpublished: HashMap::new(),
            }),
            max,
            max_unpublished,
            engine,
            refused: AtomicU64::new(0),
            futile_prune_at: AtomicU64::new(0),
            clock,
        }
    }

    /// A published stream.
    pub fn get(&self, name: &StreamName) -> Option<Arc<T>> {
        self.maps.read().published.get(name).cloned()
    }

    /// The stream for an append: published already, the unpublished one readers wait on
    /// (adopted as it is), or made with `make`. Also says whether this call created it. An
    /// error past the cap of published streams.
    pub fn get_or_create(
        &self,
        name: &StreamName,
        make: impl FnOnce() -> T,
    ) -> Result<(Arc<T>, bool), EngineError> {
        if let Some(s) = self.get(name) {
            return Ok((s, false));
        }
        let mut maps = self.maps.write();
        if let Some(s) = maps.published.get(name) {
            return Ok((s.clone(), false));
        }
        if maps.published.len() >= self.max {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(EngineError::StreamLimit(StreamLimit::Streams {
                engine: self.engine,
                max: self.max as u64,
            }));
        }
        let s = match maps.unpublished.remove(name) {
            Some(u) => u.stream,
            None => Arc::new(make()),
        };
        maps.published.insert(name.clone(), s.clone());
        Ok((s, true))
    }

    /// Runs `f` on the stream for a reader: published, or unpublished (made with `make` on
    /// first touch, never written anywhere). `f` runs under the registry's lock, so a head
    /// watch it takes is in place before any prune can look at the stream.
    pub fn with_for_reader<R>(
        &self,
        name: &StreamName,
        make: impl FnOnce() -> T,
        f: impl FnOnce(&T) -> R,
    ) -> Result<R, EngineError> {
        {
            let maps = self.maps.read();
            if let Some(s) = maps.published.get(name) {
                return Ok(f(s));
            }
            if let Some(u) = maps.unpublished.get(name) {
                u.touched.store(self.clock.now_ms(), Ordering::Relaxed);
                return Ok(f(&u.stream));
            }
        }
        let now = self.clock.now_ms();
        let mut maps = self.maps.write();
        if let Some(s) = maps.published.get(name) {
            return Ok(f(s));
        }
        if let Some(u) = maps.unpublished.get(name) {
            u.touched.store(now, Ordering::Relaxed);
            return Ok(f(&u.stream));
        }
        if maps.unpublished.len() >= self.max_unpublished {
            let futile = self.futile_prune_at.load(Ordering::Relaxed);
            if now.saturating_sub(futile) >= FUTILE_PRUNE_BACKOFF_MS {
                let before = maps.unpublished.len();
                maps.unpublished.retain(|_, u| u.stream.watchers() > 0);
                if before - maps.unpublished.len() < (self.max_unpublished / 8).max(1) {
                    self.futile_prune_at.store(now, Ordering::Relaxed);
                }
            }
            if maps.unpublished.len() >= self.max_unpublished {
                return Err(EngineError::StreamLimit(StreamLimit::Unpublished {
                    engine: Some(self.engine),
                    max: self.max_unpublished as u64,
                }));
            }
        }
        let stream = Arc::new(make());
        let out = f(&stream);
        maps.unpublished.insert(
            name.clone(),
            Unpublished {
                stream,
                touched: AtomicU64::new(now),
            },
        );
        Ok(out)
    }

    /// Drops unpublished streams no watcher has held for [`LINGER_MS`]. Called by the sweep.
    pub fn prune_unpublished(&self) {
        let now = self.clock.now_ms();
        {
            let maps = self.maps.read();
            if maps.unpublished.is_empty() {
                return;
            }
            for u in maps.unpublished.values() {
                if u.stream.watchers() > 0 {
                    u.touched.store(now, Ordering::Relaxed);
                }
            }
        }
        let mut maps = self.maps.write();
        maps.unpublished.retain(|_, u| {
            u.stream.watchers() > 0
                || now.saturating_sub(u.touched.load(Ordering::Relaxed)) < LINGER_MS
        });
    }

    /// Every published stream, for sweeps and snapshots (a copy, so no lock is held while
    /// using it).
    pub fn all(&self) -> Vec<Arc<T>> {
        self.maps.read().published.values().cloned().collect()
    }

    /// Forgets a published stream (an admin's delete): the next append makes it anew. Its
    /// entry goes when the last holder lets go of it, and with it its head watch, so every
    /// reader watching it takes a new watch and finds the stream unknown.
    pub fn remove(&self, name: &StreamName) -> Option<Arc<T>> {
        self.maps.write().published.remove(name)
    }

    /// The names of a page of published streams ([`crate::store::page_of_names`]), each
    /// with its entry.
    pub fn page(
        &self,
        prefix: &str,
        after: Option<&StreamName>,
        limit: usize,
    ) -> Vec<(StreamName, Arc<T>)> {
        let maps = self.maps.read();
        crate::store::page_of_names(maps.published.keys(), prefix, after, limit)
            .into_iter()
            .filter_map(|name| {
                let s = maps.published.get(&name)?.clone();
                Some((name, s))
            })
            .collect()
    }

    /// Sets the published streams, as recovered at startup (no cap is checked).
    pub fn replace_all(&self, streams: HashMap<StreamName, Arc<T>>) {
        self.maps.write().published = streams;
    }

    /// How many streams the registry holds, for [`crate::Engine::stream_counts`].
    pub fn counts(&self) -> StreamCounts {
        let maps = self.maps.read();
        StreamCounts {
            streams: maps.published.len() as u64,
            limit: Some(self.max as u64),
            unpublished: maps.unpublished.len() as u64,
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[derive(Debug, Default)]
    struct S(AtomicUsize);

    impl Watched for S {
        fn watchers(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }

    fn name(s: &str) -> StreamName {
        StreamName::new(s).unwrap()
    }

    #[test]
    fn readers_hold_placeholders_that_an_append_adopts_or_a_prune_drops() {
        let time = spool_core::ManualClock::new(1_000_000);
        let r: Registry<S> = Registry::new("test", 2, 2, time.clock());
        // A watched placeholder: not published, adopted as it is by the first append.
        let p = r
            .with_for_reader(&name("a"), S::default, |s| {
                s.0.store(1, Ordering::Relaxed);
                s as *const S as usize
            })
            .unwrap();
        assert!(r.get(&name("a")).is_none());
        assert_eq!(r.counts().unpublished, 1);
        let (a, created) = r.get_or_create(&name("a"), S::default).unwrap();
        assert!(created);
        assert_eq!(Arc::as_ptr(&a) as usize, p, "the placeholder is adopted");
        assert_eq!((r.counts().streams, r.counts().unpublished), (1, 0));
        assert!(!r.get_or_create(&name("a"), S::default).unwrap().1);

        // Unwatched placeholders linger, then go; watched ones stay.
        r.with_for_reader(&name("b"), S::default, |_| ()).unwrap();
        r.with_for_reader(&name("c"), S::default, |s| s.0.store(1, Ordering::Relaxed))
            .unwrap();
        // At the cap (2) with one idle: the idle one makes room.
        r.with_for_reader(&name("d"), S::default, |_| ()).unwrap();
        assert_eq!(r.counts().unpublished, 2);
        r.prune_unpublished();
        assert_eq!(r.counts().unpublished, 2, "lingers");
        time.advance(std::time::Duration::from_millis(LINGER_MS - 1));
        r.prune_unpublished();
        assert_eq!(
            r.counts().unpublished,
            2,
            "lingers until the end of its time"
        );
        time.advance(std::time::Duration::from_millis(1));
        r.prune_unpublished();
        assert_eq!(r.counts().unpublished, 1, "the watched one stays");

        // The published cap refuses creations only, and counts them.
        r.get_or_create(&name("e"), S::default).unwrap();
        let err = r.get_or_create(&name("f"), S::default).unwrap_err();
        assert!(matches!(
            err,
            EngineError::StreamLimit(StreamLimit::Streams { max: 2, .. })
        ));
        assert!(!r.get_or_create(&name("e"), S::default).unwrap().1);
        assert_eq!(r.counts().refused, 1);
    }
}
