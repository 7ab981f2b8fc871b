//! Test helpers: unique key prefixes on the shared Redis (127.0.0.1:6379 or
//! `SPOOL_TEST_REDIS_URL`), cleaned up on drop. Private `redis-server`s and the shared Redis
//! itself come from `spool_testkit::engines`.

#![allow(dead_code)]

use std::time::Duration;

use spool_redis::RedisConfig;

pub use spool_testkit::engines::shared_redis;

/// A key prefix no other test (or run) uses; its keys are deleted when it drops.
pub struct Prefix {
    pub name: String,
    url: String,
}

impl Prefix {
    pub fn new(url: &str) -> Self {
        Self {
            name: format!("spooltest:{:016x}", rand::random::<u64>()),
            url: url.to_string(),
        }
    }

    pub fn config(&self) -> RedisConfig {
        RedisConfig {
            prefix: self.name.clone(),
            ..RedisConfig::new(&self.url)
        }
    }

    /// A plain connection for poking at the keys directly.
    pub fn raw(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("raw connection to the test Redis")
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        spool_testkit::engines::delete_redis_prefix(&self.url, &self.name);
    }
}
