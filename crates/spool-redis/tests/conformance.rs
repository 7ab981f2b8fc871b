//! The engine conformance suite against a real Redis: each namespace a fresh key prefix,
//! each node (log or session store) a new engine instance on it (a second Spool node).

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use spool_engine::{
    Engine, SessionStore,
    conformance::{Backend, Namespace, Settings, run},
};
use spool_redis::{RedisConfig, RedisEngine};

use common::Prefix;

struct Redis(String);

struct Space {
    prefix: Prefix,
    settings: Settings,
}

#[async_trait]
impl Backend for Redis {
    async fn namespace(&self, settings: Settings) -> Box<dyn Namespace> {
        Box::new(Space {
            prefix: Prefix::new(&self.0),
            settings,
        })
    }
}

impl Space {
    /// A new node on this namespace.
    async fn connect(&self) -> Arc<RedisEngine> {
        let config = RedisConfig {
            retention: self.settings.retention.clone(),
            dedup_window: self.settings.dedup_window,
            ..self.prefix.config()
        };
        Arc::new(
            RedisEngine::connect(config)
                .await
                .expect("connect to the test Redis"),
        )
    }
}

#[async_trait]
impl Namespace for Space {
    async fn node(&self) -> Arc<dyn Engine> {
        self.connect().await
    }

    async fn session_store(&self) -> Arc<dyn SessionStore> {
        self.connect().await
    }

    fn clustered(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_engine_conforms() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    tokio::time::timeout(std::time::Duration::from_secs(120), run(&Redis(url)))
        .await
        .expect("the conformance suite finishes within 2 minutes");
}

/// Stream administration (list, describe, delete, truncate) on Redis, two nodes on one prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_engine_stream_admin_conforms() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        spool_engine::conformance::run_stream_admin(&Redis(url)),
    )
    .await
    .expect("the stream admin case finishes within a minute");
}
