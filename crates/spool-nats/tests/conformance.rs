//! The engine conformance suite against a real NATS JetStream: every namespace has its own
//! prefix, every node (log or session store) is a new engine with its own connection, as
//! separate Spool nodes would.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use spool_engine::{
    Engine, SessionStore,
    conformance::{self, Backend, Namespace, Settings},
};
use spool_nats::{NatsConfig, NatsEngine};

struct Nats {
    url: String,
}

struct Prefix {
    config: NatsConfig,
    _cleanup: common::Cleanup,
}

#[async_trait]
impl Backend for Nats {
    async fn namespace(&self, settings: Settings) -> Box<dyn Namespace> {
        let prefix = common::unique_prefix();
        let config = NatsConfig {
            prefix: prefix.clone(),
            retention: settings.retention,
            dedup_window: settings.dedup_window,
            ..NatsConfig::new(&self.url)
        };
        Box::new(Prefix {
            config,
            _cleanup: common::Cleanup {
                url: self.url.clone(),
                prefix,
            },
        })
    }
}

impl Prefix {
    /// A new node on this prefix, with its own connection.
    async fn connect(&self) -> Arc<NatsEngine> {
        Arc::new(
            NatsEngine::connect(self.config.clone())
                .await
                .expect("connect to NATS"),
        )
    }
}

#[async_trait]
impl Namespace for Prefix {
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
async fn nats_engine_conforms() {
    let Some(url) = common::shared_nats() else {
        return;
    };
    common::sweep_stale(&url).await;
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        conformance::run(&Nats { url }),
    )
    .await
    .expect("the conformance suite finished within 2 minutes");
}

/// Stream administration (list, describe, delete, truncate) on JetStream, two nodes on one
/// prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_engine_stream_admin_conforms() {
    let Some(url) = common::shared_nats() else {
        return;
    };
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        conformance::run_stream_admin(&Nats { url }),
    )
    .await
    .expect("the stream admin case finished within a minute");
}
