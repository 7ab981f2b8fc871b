//! The engine conformance suite (`spool_engine::conformance`) on the disk engine: each
//! namespace a fresh temp dir, every node the same engine instance (a single-node engine).

use std::sync::Arc;

use async_trait::async_trait;
use spool_disk::{DiskConfig, DiskEngine};
use spool_engine::{
    Engine,
    conformance::{Backend, Namespace, Settings, run},
};

struct Disk;

/// The engine, and the temp dir it lives in (kept until the namespace drops).
struct One(Arc<dyn Engine>, #[allow(dead_code)] tempfile::TempDir);

#[async_trait]
impl Namespace for One {
    async fn node(&self) -> Arc<dyn Engine> {
        self.0.clone()
    }
    fn clustered(&self) -> bool {
        false
    }
}

#[async_trait]
impl Backend for Disk {
    async fn namespace(&self, settings: Settings) -> Box<dyn Namespace> {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = DiskConfig {
            retention: settings.retention,
            dedup_window: settings.dedup_window,
            ..DiskConfig::new(dir.path())
        };
        let engine = DiskEngine::open(config).expect("open the disk engine");
        Box::new(One(Arc::new(engine), dir))
    }
}

#[tokio::test]
async fn disk_engine_conforms() {
    run(&Disk).await;
}
