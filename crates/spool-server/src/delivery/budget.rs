//! The stream-creation budget: how many new streams one identity may create per minute
//! (`--max-new-streams-per-minute`).
//!
//! A stream is memory (and, on the disk engine, a record in every WAL segment) held for good —
//! a stream is never removed — and the engine's `--max-streams` is shared by every tenant. So
//! a publish that would create streams first asks [`StreamBudget::admit`]: it finds which of
//! the request's streams do not exist yet (`Engine::exists`, cheap on the memory and disk
//! engines) and takes that many tokens from the caller's bucket, all or nothing. Over budget,
//! the request is refused with `429 stream_budget_exceeded` before anything is appended;
//! publishes to existing streams never spend budget. A request that would cross the engine's
//! `--max-streams` is refused here too (`507 stream_limit`), so a batch is refused whole.
//!
//! An identity is the token's `sub` (a token without one: its publish patterns), the API key
//! holder, or — for anonymous callers — the client's IP address. Buckets refill continuously
//! (a full minute's worth at most). The table of buckets is bounded: when it is full, buckets
//! that have refilled completely (they hold nothing worth remembering) are dropped, and if
//! none has, further identities share one overflow bucket until room frees.

use std::{
    collections::{HashMap, HashSet},
    hash::{BuildHasher, BuildHasherDefault, Hash, Hasher},
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use axum::http::StatusCode;
use parking_lot::Mutex;
use spool_core::StreamName;
use spool_engine::{Engine, EngineError};
use spool_protocol::ErrorCode;

use crate::{
    auth::Principal,
    error::{ApiError, ApiResult},
};

/// Most identities with a bucket of their own.
const MAX_IDENTITIES: usize = 100_000;

/// Most streams remembered as existing (so that publishing to them costs no `Engine::exists`,
/// a round trip on the cluster engines); the set starts over when full.
const MAX_KNOWN: usize = 100_000;

/// The hasher of a set of keyed hashes: a key is its own hash (an attacker who cannot predict
/// the keyed hash cannot make keys collide either).
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; fold anything else in all the same.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Who spends the budget: a hash of the identity (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity(u64);

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets per identity; see the module docs.
pub struct StreamBudget {
    per_minute: u32,
    buckets: Mutex<HashMap<Identity, Bucket>>,
    overflow: Mutex<Bucket>,
    hasher: std::collections::hash_map::RandomState,
    refused: AtomicU64,
    refused_at_limit: AtomicU64,
    /// Hashes of streams an `exists` found: streams are never removed, so once seen they need
    /// no more asking (a stream a cluster engine lost is then created without a charge). The
    /// keys are already keyed SipHashes, so the set uses them as they are instead of hashing
    /// them again.
    known: Mutex<HashSet<u64, BuildHasherDefault<Prehashed>>>,
}

impl StreamBudget {
    /// `per_minute` new streams per identity per minute; 0 for no budget.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            buckets: Mutex::new(HashMap::new()),
            overflow: Mutex::new(Bucket {
                tokens: f64::from(per_minute),
                at: Instant::now(),
            }),
            hasher: std::collections::hash_map::RandomState::new(),
            refused: AtomicU64::new(0),
            refused_at_limit: AtomicU64::new(0),
            known: Mutex::new(HashSet::default()),
        }
    }

    /// Requests refused for their budget since the start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Requests refused here because they would cross the engine's stream limit (the engine
    /// counts the creations it refuses itself, when such a request raced another).
    pub fn refused_at_limit(&self) -> u64 {
        self.refused_at_limit.load(Ordering::Relaxed)
    }

    /// The identity a request spends from.
    pub fn identity(&self, principal: &Principal, client: Option<IpAddr>) -> Identity {
        let mut h = self.hasher.build_hasher();
        match principal {
            Principal::Anonymous => {
                0u8.hash(&mut h);
                client.hash(&mut h);
            }
            Principal::ApiKey => 1u8.hash(&mut h),
            Principal::Token {
                subject: Some(sub), ..
            } => {
                2u8.hash(&mut h);
                sub.hash(&mut h);
            }
            Principal::Token {
                subject: None,
                publish,
                ..
            } => {
                3u8.hash(&mut h);
                for p in publish {
                    p.as_str().hash(&mut h);
                }
            }
        }
        Identity(h.finish())
    }

    /// Checks that `who` may create the streams among `streams` that do not exist yet, and
    /// spends the budget for them; `429 stream_budget_exceeded` otherwise (nothing spent).
    pub async fn admit<'a>(
        &self,
        engine: &dyn Engine,
        who: Identity,
        streams: impl IntoIterator<Item = &'a StreamName>,
    ) -> ApiResult<()> {
        // The engine's own limit, checked here too so that a batch that would cross it is
        // refused whole instead of appending to the streams that exist.
        let limit = || {
            engine
                .stream_counts()
                .and_then(|c| Some((c.streams, c.limit?)))
        };
        if self.per_minute == 0 && limit().is_none() {
            return Ok(());
        }
        let mut new = 0u32;
        for stream in streams {
            if !self.exists(engine, stream).await? {
                new = new.saturating_add(1);
            }
        }
        // Publishing to streams that exist, the common case, ends here: the counts are only
        // needed for a creation.
        if new == 0 {
            return Ok(());
        }
        if let Some((held, max)) = limit()
            && held.saturating_add(u64::from(new)) > max
        {
            self.refused_at_limit.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::from(EngineError::StreamLimit(
                spool_engine::StreamLimit::Request {
                    engine: engine.name(),
                    held,
                    max,
                    new,
                },
            )));
        }
        if self.per_minute == 0 || self.take(who, new) {
            return Ok(());
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::StreamBudgetExceeded,
            format!(
                "this identity may create {} new streams per minute (--max-new-streams-per-minute) \
                 and this request would create {new}; nothing was published. Publishing to \
                 existing streams is not limited; retry new streams later",
                self.per_minute
            ),
        ))
    }

    async fn exists(&self, engine: &dyn Engine, stream: &StreamName) -> ApiResult<bool> {
        let hash = self.hasher.hash_one(stream.as_str());
        if self.known.lock().contains(&hash) {
            return Ok(true);
        }
        let exists = engine.exists(stream).await?;
        if exists {
            let mut known = self.known.lock();
            if known.len() >= MAX_KNOWN {
                known.clear();
            }
            known.insert(hash);
        }
        Ok(exists)
    }

    /// Takes `n` tokens from `who`'s bucket if it holds them.
    fn take(&self, who: Identity, n: u32) -> bool {
        let now = Instant::now();
        let full = f64::from(self.per_minute);
        let refill = |b: &mut Bucket| {
            let secs = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens = (b.tokens + secs * full / 60.0).min(full);
            b.at = now;
        };
        let spend = |b: &mut Bucket| {
            refill(b);
            let n = f64::from(n);
            if b.tokens >= n {
                b.tokens -= n;
                true
            } else {
                false
            }
        };
        let mut buckets = self.buckets.lock();
        if let Some(b) = buckets.get_mut(&who) {
            return spend(b);
        }
        if buckets.len() >= MAX_IDENTITIES {
            buckets.retain(|_, b| {
                refill(b);
                b.tokens < full
            });
        }
        if buckets.len() >= MAX_IDENTITIES {
            drop(buckets);
            return spend(&mut self.overflow.lock());
        }
        let mut b = Bucket {
            tokens: full,
            at: now,
        };
        let ok = spend(&mut b);
        buckets.insert(who, b);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_per_identity_and_refill() {
        let budget = StreamBudget::new(3);
        let a = budget.identity(&Principal::Anonymous, Some([10, 0, 0, 1].into()));
        let b = budget.identity(&Principal::Anonymous, Some([10, 0, 0, 2].into()));
        assert_ne!(a, b);
        assert!(budget.take(a, 2));
        assert!(!budget.take(a, 2), "all or nothing");
        assert!(budget.take(a, 1));
        assert!(!budget.take(a, 1));
        assert!(budget.take(b, 3), "another identity has its own budget");
        // A minute later the bucket is full again, not fuller.
        let mut buckets = budget.buckets.lock();
        let bucket = buckets.get_mut(&a).unwrap();
        bucket.at -= std::time::Duration::from_secs(120);
        drop(buckets);
        assert!(budget.take(a, 3));
        assert!(!budget.take(a, 1));
    }
}
