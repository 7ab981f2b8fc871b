//! Helpers for tests against a real NATS server: unique name prefixes, and cleanup of
//! everything a test made there, so a shared server does not fill up over many CI runs (a test
//! that crashed before its cleanup is swept by a later run after an hour). The servers, shared
//! and a test's own, come from `spool_testkit::engines`.

#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use rand::RngExt;

pub use spool_testkit::engines::shared_nats;

const TEST_PREFIX: &str = "spt";

/// A prefix no other test or run uses: `spt<unix seconds, hex>x<random>`.
pub fn unique_prefix() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let tag: u32 = rand::rng().random();
    format!("{TEST_PREFIX}{secs:x}x{tag:08x}")
}

/// Deletes every JetStream stream (and KV bucket) under `prefix` when dropped.
pub struct Cleanup {
    pub url: String,
    pub prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        spool_testkit::engines::delete_nats_prefix(&self.url, &self.prefix);
    }
}

/// The test prefix a JetStream stream belongs to, if it is a test stream.
fn owner_prefix(stream: &str) -> Option<&str> {
    let name = stream.strip_prefix("KV_").unwrap_or(stream);
    let (prefix, _) = name.split_once('_')?;
    prefix.starts_with(TEST_PREFIX).then_some(prefix)
}

/// Deletes test streams left behind by runs more than an hour old.
pub async fn sweep_stale(url: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    spool_testkit::engines::delete_nats_streams(url, |name| {
        owner_prefix(name)
            .and_then(|p| p[TEST_PREFIX.len()..].split_once('x'))
            .and_then(|(secs, _)| u64::from_str_radix(secs, 16).ok())
            .is_some_and(|secs| secs + 3600 < now)
    })
    .await;
}

/// The JetStream streams (KV buckets included) of a test prefix.
pub async fn streams_of(url: &str, prefix: &str) -> Vec<String> {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    js.stream_names()
        .filter_map(|n| async move { n.ok() })
        .filter(|n| std::future::ready(owner_prefix(n) == Some(prefix)))
        .collect()
        .await
}
