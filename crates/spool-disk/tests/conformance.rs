//! The engine conformance suite (`spool_engine::conformance`) on the disk engine: each
//! namespace a fresh temp dir, every node the same engine instance (a single-node engine); and
//! the group store suite (`spool_engine::group_conformance`).

use std::sync::Arc;

use async_trait::async_trait;
use spool_disk::{DiskConfig, DiskEngine};
use spool_engine::conformance::{Backend, Namespace, Settings, SingleNode, run};

/// The disk engine; `from_segments`: no tail cache and small segments, so every read of
/// history comes from the segment files, across rolls and deletions.
struct Disk {
    from_segments: bool,
}

#[async_trait]
impl Backend for Disk {
    async fn namespace(&self, settings: Settings) -> Box<dyn Namespace> {
        let dir = tempfile::tempdir().expect("temp dir");
        let defaults = DiskConfig::new(dir.path());
        let config = DiskConfig {
            retention: settings.retention,
            dedup_window: settings.dedup_window,
            cache_size: if self.from_segments {
                0
            } else {
                defaults.cache_size
            },
            segment_size: if self.from_segments {
                4096
            } else {
                defaults.segment_size
            },
            ..defaults
        };
        let engine = DiskEngine::open(config).expect("open the disk engine");
        Box::new(SingleNode::new(Arc::new(engine), dir))
    }
}

#[tokio::test]
async fn disk_engine_conforms() {
    run(&Disk {
        from_segments: false,
    })
    .await;
}

/// Stream administration (list, delete, truncate), also from the segment files.
#[tokio::test]
async fn disk_engine_administers_streams() {
    for from_segments in [false, true] {
        spool_engine::conformance::run_stream_admin(&Disk { from_segments }).await;
    }
}

/// The same contract with every read of history served from the segment files (issue 14).
#[tokio::test]
async fn disk_engine_conforms_reading_history_from_the_segments() {
    run(&Disk {
        from_segments: true,
    })
    .await;
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
