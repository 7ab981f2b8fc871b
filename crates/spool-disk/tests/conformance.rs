//! The engine conformance suite (`spool_engine::conformance`) on the disk engine: each
//! namespace a fresh temp dir, every node the same engine instance (a single-node engine); and
//! the group store suite (`spool_engine::group_conformance`).

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

/// The group store's suite, on an engine reopened between runs: the second run sees the
/// first's groups deleted and its names free.
#[tokio::test]
async fn disk_group_store_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    for _ in 0..2 {
        let engine = DiskEngine::open(DiskConfig::new(dir.path())).expect("open the disk engine");
        spool_engine::group_conformance::run(&engine).await;
        assert!(
            spool_engine::GroupStore::list_groups(&engine, None)
                .await
                .expect("list")
                .is_empty(),
            "every group the suite created, it deleted"
        );
    }
}
