//! The engine conformance suite (`spool_engine::conformance`) on the disk engine: each
//! namespace a fresh temp dir, every node the same engine instance (a single-node engine).

use std::sync::Arc;

use async_trait::async_trait;
use spool_disk::{DiskConfig, DiskEngine};
use spool_engine::conformance::{Backend, Namespace, Settings, SingleNode, run};

struct Disk;

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
        Box::new(SingleNode::new(Arc::new(engine), dir))
    }
}

#[tokio::test]
async fn disk_engine_conforms() {
    run(&Disk).await;
}
