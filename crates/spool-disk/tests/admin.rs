//! Stream administration survives restarts: a deleted stream stays deleted and a truncated
//! one stays truncated after the engine reopens — also once the segment holding the delete
//! or truncate record is gone while older segments with the stream's messages remain.

use bytes::Bytes;
use spool_core::{NewMessage, Offset, StreamName};
use spool_disk::{DiskConfig, DiskEngine};
use spool_engine::Engine;

fn name(s: &str) -> StreamName {
    StreamName::new(s).unwrap()
}

fn msg(s: String) -> NewMessage {
    NewMessage {
        payload: Bytes::from(s),
        ..Default::default()
    }
}

/// Small segments; `filler*` streams keep one message, so the segments only they (and the
/// admin records) wrote die and are deleted while older ones, holding `keeper`, stay.
fn open(dir: &std::path::Path) -> DiskEngine {
    let mut config = DiskConfig {
        segment_size: 4096,
        ..DiskConfig::new(dir)
    };
    config.retention.rules.push(spool_core::RetentionRule {
        pattern: spool_core::Pattern::new("filler*"),
        max_messages: Some(1),
        max_bytes: None,
        max_age: None,
    });
    DiskEngine::open(config).expect("open")
}

fn segments(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn fill(engine: &DiskEngine, n: usize) {
    for i in 0..n {
        engine
            .append(
                &name("filler"),
                vec![msg(format!("f{i} {}", "w".repeat(100)))],
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn deletes_and_truncations_survive_restarts_and_segment_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let (kept_epoch, doomed_epoch) = {
        let engine = open(dir.path());
        // Both streams write into the first segments; `keeper` keeps old messages there.
        for i in 0..40 {
            engine
                .append(
                    &name("keeper"),
                    vec![msg(format!("k{i} {}", "x".repeat(100)))],
                )
                .await
                .unwrap();
            engine
                .append(
                    &name("doomed"),
                    vec![msg(format!("d{i} {}", "y".repeat(100)))],
                )
                .await
                .unwrap();
            engine
                .append(&name("cut"), vec![msg(format!("c{i} {}", "z".repeat(100)))])
                .await
                .unwrap();
        }
        // Segments of their own for the admin records: fillers before and after them.
        fill(&engine, 60).await;
        let admin = engine.admin().unwrap();
        let doomed = engine.state(&name("doomed")).await.unwrap().unwrap().epoch;
        assert!(admin.delete_stream(&name("doomed")).await.unwrap());
        let cut = admin
            .truncate_stream(&name("cut"), Offset(31))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cut.oldest, Offset(31));
        let with_records = segments(dir.path());
        fill(&engine, 120).await;
        engine.sweep().await.unwrap();
        // The segment the admin records went to is gone; the oldest (keeper's) is not.
        let now = segments(dir.path());
        assert!(
            !now.contains(with_records.last().unwrap()),
            "the segment with the records was deleted: {with_records:?} -> {now:?}"
        );
        assert_eq!(now.first(), with_records.first(), "the oldest stays");
        let keeper = engine.state(&name("keeper")).await.unwrap().unwrap().epoch;
        (keeper, doomed)
    };
    for _ in 0..2 {
        let engine = open(dir.path());
        assert!(
            engine.state(&name("doomed")).await.unwrap().is_none(),
            "a deleted stream stays deleted"
        );
        let cut = engine.state(&name("cut")).await.unwrap().unwrap();
        assert_eq!((cut.oldest, cut.head), (Offset(31), Offset(40)));
        let read = engine.read(&name("cut"), Offset(30), 100).await.unwrap();
        assert_eq!(read.messages.len(), 10);
        assert!(read.messages[0].payload.starts_with(b"c30 "));
        let keeper = engine.state(&name("keeper")).await.unwrap().unwrap();
        assert_eq!(
            (keeper.epoch.clone(), keeper.head),
            (kept_epoch.clone(), Offset(40))
        );
        assert_eq!(
            engine
                .read(&name("keeper"), Offset(0), 100)
                .await
                .unwrap()
                .messages
                .len(),
            40
        );
    }
    let engine = open(dir.path());
    let reborn = engine
        .append(&name("doomed"), vec![msg("new".into())])
        .await
        .unwrap();
    assert_eq!(reborn[0].position.offset, Offset(1));
    assert_ne!(reborn[0].position.epoch, doomed_epoch);
    drop(engine);
    let engine = open(dir.path());
    let read = engine.read(&name("doomed"), Offset(0), 10).await.unwrap();
    assert_eq!(read.messages.len(), 1, "only the new incarnation's message");
    assert_eq!(read.messages[0].payload, "new");
}
