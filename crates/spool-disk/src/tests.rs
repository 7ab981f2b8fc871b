//! The disk engine against its own files: persistence across reopen, torn tails, flipped
//! bits, repair, retention reclaiming segments, group commit under concurrency, and a property
//! test of random appends, retention and reopen cycles.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use proptest::prelude::*;
use spool_core::{Message, NewMessage, Offset, StreamName};

use super::*;
use spool_engine::Engine;

fn name(s: &str) -> StreamName {
    StreamName::new(s).unwrap()
}

fn msg(data: impl Into<Bytes>) -> NewMessage {
    NewMessage {
        payload: data.into(),
        ..Default::default()
    }
}

fn keyed(data: &'static str, key: &str) -> NewMessage {
    NewMessage {
        idempotency_key: Some(key.into()),
        ..msg(data)
    }
}

fn config(dir: &Path) -> DiskConfig {
    DiskConfig::new(dir)
}

async fn payloads(engine: &DiskEngine, stream: &str) -> Vec<(u64, Vec<u8>)> {
    let oldest = engine
        .state(&name(stream))
        .await
        .unwrap()
        .map_or(1, |s| s.oldest.get());
    let batch = engine
        .read(&name(stream), Offset(oldest - 1), usize::MAX)
        .await
        .unwrap();
    batch
        .messages
        .iter()
        .map(|m| (m.offset.get(), m.payload.to_vec()))
        .collect()
}

fn last_segment(dir: &Path) -> PathBuf {
    let wal = dir.join("wal");
    let ids = segment::list(&wal).unwrap();
    segment::path(&wal, *ids.last().unwrap())
}

fn segment_with_messages(dir: &Path) -> PathBuf {
    // The newest segment holding more than a header and snapshots: the biggest one.
    let wal = dir.join("wal");
    segment::list(&wal)
        .unwrap()
        .into_iter()
        .map(|id| segment::path(&wal, id))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap()
}

#[tokio::test]
async fn epochs_offsets_and_payloads_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (epoch, idle_epoch) = {
        let engine = DiskEngine::open(config(dir.path())).unwrap();
        let out = engine
            .append(&name("a"), vec![msg("1"), msg("2")])
            .await
            .unwrap();
        engine.append(&name("b"), vec![msg("x")]).await.unwrap();
        engine.append(&name("a"), vec![msg("3")]).await.unwrap();
        // A stream only read is not persisted; a published one is, even if empty later.
        engine
            .read(&name("only-read"), Offset::ZERO, 10)
            .await
            .unwrap();
        let idle = engine.append(&name("idle"), vec![msg("i")]).await.unwrap();
        (
            out[0].position.epoch.clone(),
            idle[0].position.epoch.clone(),
        )
    };
    let engine = DiskEngine::open(config(dir.path())).unwrap();
    assert_eq!(
        payloads(&engine, "a").await,
        [(1, b"1".to_vec()), (2, b"2".to_vec()), (3, b"3".to_vec())]
    );
    assert_eq!(payloads(&engine, "b").await, [(1, b"x".to_vec())]);
    let state = engine.state(&name("a")).await.unwrap().unwrap();
    assert_eq!((state.epoch, state.head), (epoch, Offset(3)));
    assert_eq!(
        engine.state(&name("idle")).await.unwrap().unwrap().epoch,
        idle_epoch
    );
    assert!(engine.state(&name("only-read")).await.unwrap().is_none());
    let next = engine.append(&name("a"), vec![msg("4")]).await.unwrap();
    assert_eq!(next[0].position.offset, Offset(4));
}

#[tokio::test]
async fn epochs_and_heads_survive_when_every_message_expired_and_segments_are_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.retention.default.max_messages = 1;
    cfg.segment_size = 512;
    let epoch = {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let mut epoch = None;
        for i in 0..50 {
            let out = engine
                .append(&name("quiet"), vec![msg(format!("q{i}"))])
                .await
                .unwrap();
            epoch = Some(out[0].position.epoch.clone());
            engine
                .append(&name("busy"), vec![msg(vec![b'b'; 300])])
                .await
                .unwrap();
        }
        epoch.unwrap()
    };
    for _ in 0..3 {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let state = engine.state(&name("quiet")).await.unwrap().unwrap();
        assert_eq!(
            (state.epoch.clone(), state.head),
            (epoch.clone(), Offset(50))
        );
        assert_eq!(payloads(&engine, "quiet").await, [(50, b"q49".to_vec())]);
    }
    let segments = segment::list(&dir.path().join("wal")).unwrap().len();
    assert!(
        segments <= 4,
        "expired segments must be deleted, found {segments}"
    );
}

#[tokio::test]
async fn idempotency_keys_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let engine = DiskEngine::open(config(dir.path())).unwrap();
        engine
            .append(&name("o"), vec![keyed("paid", "order-1")])
            .await
            .unwrap()
    };
    let engine = DiskEngine::open(config(dir.path())).unwrap();
    let retry = engine
        .append(
            &name("o"),
            vec![keyed("paid", "order-1"), keyed("new", "order-2")],
        )
        .await
        .unwrap();
    assert!(retry[0].duplicate);
    assert_eq!(retry[0].position, first[0].position);
    assert_eq!(retry[1].position.offset, Offset(2));
    assert_eq!(payloads(&engine, "o").await.len(), 2);
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_nothing_acked_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = DiskEngine::open(config(dir.path())).unwrap();
        engine
            .append(&name("t"), vec![msg("a"), msg("b")])
            .await
            .unwrap();
    }
    // A crash in the middle of writing the next batch: half a frame at the end.
    let seg = segment_with_messages(dir.path());
    let mut frame = Vec::new();
    record::encode_message(
        &mut frame,
        &name("t"),
        &Message {
            offset: Offset(3),
            time_ms: 1,
            payload: Bytes::from_static(b"half"),
            content_type: None,
            key: None,
            headers: vec![],
        },
        None,
    );
    let mut file = fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut file, &frame[..frame.len() / 2]).unwrap();
    drop(file);
    let len_before = fs::metadata(&seg).unwrap().len();

    let engine = DiskEngine::open(config(dir.path())).unwrap();
    assert_eq!(
        payloads(&engine, "t").await,
        [(1, b"a".to_vec()), (2, b"b".to_vec())]
    );
    assert!(
        fs::metadata(&seg).unwrap().len() < len_before,
        "the torn bytes were cut"
    );
    let next = engine.append(&name("t"), vec![msg("c")]).await.unwrap();
    assert_eq!(next[0].position.offset, Offset(3));
    drop(engine);
    let engine = DiskEngine::open(config(dir.path())).unwrap();
    assert_eq!(payloads(&engine, "t").await.len(), 3);
}

#[tokio::test]
async fn a_flipped_bit_fails_closed_and_repair_quarantines_with_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let epoch = {
        let engine = DiskEngine::open(config(dir.path())).unwrap();
        let out = engine
            .append(&name("f"), vec![msg("first"), msg("second"), msg("third")])
            .await
            .unwrap();
        out[0].position.epoch.clone()
    };
    // Flip one bit inside the payload "second" (not at the tail: valid data follows it).
    let seg = segment_with_messages(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    let at = bytes.windows(6).position(|w| w == b"second").unwrap();
    bytes[at + 2] ^= 0x04;
    fs::write(&seg, &bytes).unwrap();

    let err = DiskEngine::open(config(dir.path()))
        .err()
        .expect("must refuse to start");
    let text = err.to_string();
    assert!(matches!(err, OpenError::Corrupt { .. }), "{text}");
    assert!(
        text.contains(&seg.display().to_string()),
        "names the file: {text}"
    );
    assert!(text.contains("spool repair"), "says how to repair: {text}");
    // Still refuses: nothing was changed behind the operator's back.
    assert!(DiskEngine::open(config(dir.path())).is_err());

    let dry = repair(dir.path(), true).unwrap();
    assert_eq!(dry.damaged.len(), 1);
    assert!(dry.quarantined.is_empty());
    assert!(
        DiskEngine::open(config(dir.path())).is_err(),
        "a dry run changes nothing"
    );
    let report = repair(dir.path(), false).unwrap();
    assert_eq!(report.quarantined.len(), 1);
    assert!(report.quarantined[0].exists());
    // The damage is in the newest segment: nothing tells which streams wrote there, so every
    // stream known then is cut; what came before the damage stays.
    assert_eq!(report.cut.len(), 1);
    let engine = DiskEngine::open(config(dir.path())).unwrap();
    let state = engine.state(&name("f")).await.unwrap().unwrap();
    assert_ne!(state.epoch, epoch, "a cut stream never keeps its epoch");
    assert_eq!(payloads(&engine, "f").await, [(1, b"first".to_vec())]);
    engine
        .append(&name("f"), vec![msg("after repair")])
        .await
        .unwrap();
    drop(engine);
    let engine = DiskEngine::open(config(dir.path())).unwrap();
    let again = engine.state(&name("f")).await.unwrap().unwrap();
    assert_eq!(
        again.epoch, state.epoch,
        "the new epoch holds across restarts"
    );
    assert_eq!(
        payloads(&engine, "f").await,
        [(1, b"first".to_vec()), (2, b"after repair".to_vec())]
    );
}

/// Three segments, a flipped byte in the first: streams that wrote nothing at or after the
/// damaged byte of that segment keep their epoch and every message; the stream that did gets
/// a new epoch and keeps its messages after the damage — on this start and every later one.
#[tokio::test]
async fn repair_cuts_only_the_streams_that_wrote_in_the_damaged_range() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_size = 4096;
    let pad = "p".repeat(100);
    let epochs = {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let mut epochs = HashMap::new();
        for (stream, n) in [("early", 5), ("cut", 5)] {
            for i in 1..=n {
                let out = engine
                    .append(&name(stream), vec![msg(format!("{stream}-{i:03}-{pad}"))])
                    .await
                    .unwrap();
                epochs.insert(stream, out[0].position.epoch.clone());
            }
        }
        epochs
    };
    // A restart starts a new segment: "late" never writes into the first one.
    let epochs = {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let mut epochs = epochs;
        for i in 1..=60 {
            let out = engine
                .append(&name("late"), vec![msg(format!("late-{i:03}-{pad}"))])
                .await
                .unwrap();
            epochs.insert("late", out[0].position.epoch.clone());
        }
        for i in 6..=8 {
            engine
                .append(&name("cut"), vec![msg(format!("cut-{i:03}-{pad}"))])
                .await
                .unwrap();
        }
        epochs
    };
    let wal = dir.path().join("wal");
    let ids = segment::list(&wal).unwrap();
    assert!(ids.len() >= 3, "{ids:?}");
    let first = segment::path(&wal, ids[0]);
    let mut bytes = fs::read(&first).unwrap();
    let at = bytes.windows(7).position(|w| w == b"cut-003").unwrap();
    bytes[at + 2] ^= 0x01;
    fs::write(&first, &bytes).unwrap();
    assert!(DiskEngine::open(cfg.clone()).is_err());

    let report = repair(dir.path(), false).unwrap();
    let cut: Vec<&str> = report.cut.iter().map(|c| c.stream.as_str()).collect();
    assert_eq!(cut, ["cut"]);
    assert_eq!(report.intact, 2);
    for reopen in 0..2 {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        for stream in ["early", "late"] {
            let state = engine.state(&name(stream)).await.unwrap().unwrap();
            assert_eq!(state.epoch, epochs[stream], "{stream} (reopen {reopen})");
        }
        assert_eq!(payloads(&engine, "early").await.len(), 5);
        assert_eq!(payloads(&engine, "late").await.len(), 60);
        let state = engine.state(&name("cut")).await.unwrap().unwrap();
        assert_ne!(state.epoch, epochs["cut"]);
        assert_eq!(state.head, Offset(8));
        let kept: Vec<u64> = payloads(&engine, "cut").await.iter().map(|m| m.0).collect();
        assert_eq!(kept, [6, 7, 8], "the messages after the damage stay");
        for id in &ids[1..] {
            assert!(
                segment::path(&wal, *id).exists(),
                "intact segment {id} kept"
            );
        }
    }
}

#[tokio::test]
async fn a_second_process_cannot_open_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _engine = DiskEngine::open(config(dir.path())).unwrap();
    assert!(matches!(
        DiskEngine::open(config(dir.path())),
        Err(OpenError::Locked { .. })
    ));
}

#[tokio::test]
async fn retention_reclaims_disk_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.retention.default.max_messages = 10;
    cfg.segment_size = 64 * 1024;
    cfg.durability = Durability::Memory;
    let engine = DiskEngine::open(cfg).unwrap();
    let payload = Bytes::from(vec![b'x'; 1024]);
    for _ in 0..2000 {
        engine
            .append(&name("r"), vec![msg(payload.clone())])
            .await
            .unwrap();
    }
    let wal = dir.path().join("wal");
    let total: u64 = segment::list(&wal)
        .unwrap()
        .iter()
        .map(|id| fs::metadata(segment::path(&wal, *id)).unwrap().len())
        .sum();
    assert!(
        total < 256 * 1024,
        "2 MB written, 10 KB retained, {total} bytes still on disk"
    );
    assert_eq!(payloads(&engine, "r").await.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_fsyncs_and_stay_gap_free() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(DiskEngine::open(config(dir.path())).unwrap());
    let mut tasks = Vec::new();
    for t in 0..64 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            for i in 0..20 {
                let out = engine
                    .append(&name("c"), vec![msg(format!("{t}-{i}"))])
                    .await
                    .unwrap();
                offsets.push(out[0].position.offset.get());
            }
            offsets
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let offsets = task.await.unwrap();
        assert!(offsets.windows(2).all(|w| w[0] < w[1]));
        all.extend(offsets);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=1280).collect::<Vec<u64>>());
    drop(engine);
    let engine = DiskEngine::open(config(dir.path())).unwrap();
    assert_eq!(payloads(&engine, "c").await.len(), 1280);
}

/// `--durability memory` has no writer thread: appenders write for each other (`Inline`).
/// Many appenders on several streams, segments small enough to roll every few commits (the
/// roll moves off the worker on a multi-threaded runtime, not on a current-thread one): every
/// offset once, each appender's in the order it appended, and all of it back after a reopen.
async fn appenders_writing_for_each_other(worker_threads: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.durability = Durability::Memory;
    cfg.segment_size = 16 * 1024;
    let engine = Arc::new(DiskEngine::open(cfg.clone()).unwrap());
    let streams = ["m0", "m1", "m2", "m3"];
    let mut tasks = Vec::new();
    for t in 0..48 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let stream = streams[t % streams.len()];
            let mut offsets = Vec::new();
            for i in 0..40 {
                let batch = (0..=i % 3).map(|j| msg(format!("{t}-{i}-{j}"))).collect();
                let out = engine.append(&name(stream), batch).await.unwrap();
                offsets.extend(out.iter().map(|a| a.position.offset.get()));
            }
            (stream, offsets)
        }));
    }
    let mut by_stream: HashMap<&str, Vec<u64>> = HashMap::new();
    for task in tasks {
        let (stream, offsets) = task.await.unwrap();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "{worker_threads} workers: an appender's offsets out of order"
        );
        by_stream.entry(stream).or_default().extend(offsets);
    }
    let stats = engine.wal_stats();
    assert!(
        stats.batches > 0 && stats.batches <= stats.requests,
        "{stats:?}"
    );
    let mut expected = HashMap::new();
    for (stream, mut offsets) in by_stream {
        offsets.sort_unstable();
        let n = offsets.len() as u64;
        assert_eq!(
            offsets,
            (1..=n).collect::<Vec<u64>>(),
            "{worker_threads} workers, stream {stream}"
        );
        assert_eq!(payloads(&engine, stream).await.len() as u64, n);
        expected.insert(stream, payloads(&engine, stream).await);
    }
    assert!(
        fs::read_dir(dir.path().join("wal")).unwrap().count() > 2,
        "the segments rolled"
    );
    drop(engine);
    let engine = DiskEngine::open(cfg).unwrap();
    for (stream, before) in expected {
        assert_eq!(
            payloads(&engine, stream).await,
            before,
            "stream {stream} after a reopen"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appenders_write_for_each_other_without_a_writer_thread_multi_thread() {
    appenders_writing_for_each_other(4).await;
}

#[tokio::test]
async fn appenders_write_for_each_other_without_a_writer_thread_current_thread() {
    appenders_writing_for_each_other(1).await;
}

/// A disk engine at `--durability memory` (no writer thread), its config and its writer.
fn inline_engine(dir: &Path) -> (Arc<DiskEngine>, DiskConfig, Arc<writer::Inline>) {
    let mut cfg = config(dir);
    cfg.durability = Durability::Memory;
    let engine = Arc::new(DiskEngine::open(cfg.clone()).unwrap());
    let Sink::Inline(inline) = &engine.sink else {
        panic!("--durability memory writes inline");
    };
    let inline = inline.clone();
    (engine, cfg, inline)
}

/// An appender writes at most `TURN` batches before it leaves the rest to a task: 12 appends
/// of 4 MiB queued while the writer is held make 6 batches of 8 MiB; the turn that starts
/// when the writer is let go writes 4 of them, a task of its own the rest, and every append is
/// answered with its message durable. (A current-thread runtime: the task runs only once the
/// test awaits, so the turn's own count is exact.) The writer is held across the awaits on
/// purpose: the appends must queue behind it.
#[tokio::test]
#[allow(clippy::await_holding_lock)]
async fn an_inline_writer_leaves_what_its_turn_cannot_write_to_a_task() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, cfg, inline) = inline_engine(dir.path());
    let held = inline.writer.lock();
    let big = |i: usize| Bytes::from(vec![b'a' + i as u8; 4 * 1024 * 1024]);
    let mut tasks = Vec::new();
    for i in 0..12 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            engine
                .append(&name(&format!("big{i}")), vec![msg(big(i))])
                .await
        }));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while inline.queue.lock().len() < 12 {
        assert!(
            std::time::Instant::now() < deadline,
            "the appends never queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(held);
    let batches = engine.wal_stats().batches;
    inline.turn(inline.writer.lock());
    assert_eq!(
        engine.wal_stats().batches - batches,
        4,
        "one turn, four batches"
    );
    for task in tasks {
        let appended = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("an append left queued was never written")
            .unwrap()
            .unwrap();
        assert_eq!(appended[0].position.offset.get(), 1);
    }
    assert_eq!(engine.wal_stats().batches - batches, 6);
    assert!(inline.queue.lock().is_empty());
    drop(inline);
    drop(engine);
    let engine = DiskEngine::open(cfg).unwrap();
    for i in 0..12 {
        let read = payloads(&engine, &format!("big{i}")).await;
        assert_eq!(read, vec![(1, big(i).to_vec())]);
    }
}

/// The inline writer's queue is bounded: with the writer held, appenders queue up to
/// `WRITE_QUEUE` requests, and the next ones block their threads waiting for the writer (as a
/// full channel held them) instead of queueing more. Once it is let go, every append is
/// written, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock)]
async fn the_inline_writers_queue_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _, inline) = inline_engine(dir.path());
    let total = WRITE_QUEUE + 500;
    // Held by the test's own thread (not a worker), which only blocks from here on: both
    // workers end up waiting for the writer, and nothing drives the runtime's timers.
    let held = inline.writer.lock();
    let mut tasks = Vec::new();
    for i in 0..total {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            engine.append(&name("q"), vec![msg(format!("{i}"))]).await
        }));
    }
    let mut last = 0;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let now = inline.queue.lock().len();
        if now == last && now > WRITE_QUEUE {
            break;
        }
        last = now;
    }
    let queued = inline.queue.lock().len();
    assert!(
        queued > WRITE_QUEUE && queued <= WRITE_QUEUE + 2,
        "{queued} requests queued: the bound is {WRITE_QUEUE} and one blocked appender per worker"
    );
    drop(held);
    let mut offsets = Vec::new();
    for task in tasks {
        let appended = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("an append was never written")
            .unwrap()
            .unwrap();
        offsets.push(appended[0].position.offset.get());
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=total as u64).collect::<Vec<u64>>());
    assert!(inline.queue.lock().is_empty());
}

/// A batch that panics half-way (a bug) stops the engine, as the writer thread's death did:
/// the appender whose wait ran it fails, the next append is refused with the reason, and
/// nothing after it is written from a state half-applied.
#[tokio::test]
async fn a_panic_in_the_inline_writer_stops_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _, inline) = inline_engine(dir.path());
    engine
        .append(&name("p"), vec![msg("before")])
        .await
        .unwrap();
    inline.writer.lock().panic_next = true;
    let appending = engine.clone();
    let panicked = tokio::spawn(async move { appending.append(&name("p"), vec![msg("x")]).await })
        .await
        .unwrap_err();
    assert!(panicked.is_panic());
    let refused = engine
        .append(&name("p"), vec![msg("after")])
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("the WAL writer panicked"),
        "{refused}"
    );
    assert_eq!(payloads(&engine, "p").await, vec![(1, b"before".to_vec())]);
}

#[tokio::test]
async fn watchers_only_see_durable_messages() {
    let dir = tempfile::tempdir().unwrap();
    let engine = DiskEngine::open(config(dir.path())).unwrap();
    let mut watch = engine.watch(&name("w")).await.unwrap();
    let out = engine.append(&name("w"), vec![msg("1")]).await.unwrap();
    watch.changed().await.unwrap();
    assert_eq!(watch.borrow_and_update().offset, out[0].position.offset);
    assert_eq!(
        engine
            .read(&name("w"), Offset::ZERO, 10)
            .await
            .unwrap()
            .messages
            .len(),
        1
    );
}

#[derive(Clone, Debug)]
enum Op {
    Append(u8, u8),
    Reopen,
    TearTail(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..3, 1u8..6).prop_map(|(s, n)| Op::Append(s, n)),
        2 => Just(Op::Reopen),
        1 => (1u8..40).prop_map(Op::TearTail),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    /// Random appends to three streams, with a small segment size and count retention, reopened
    /// at random and with random garbage appended to the tail (a torn write): every acked
    /// message that retention keeps is there with its offset and payload, offsets have no
    /// hole, epochs never change. The tail cache is none, a few messages or all of them, so
    /// reads come from the segments, the cache or both.
    #[test]
    fn log_survives_random_appends_tears_and_reopens(
        ops in prop::collection::vec(op(), 1..40),
        cache_size in prop_oneof![Just(0u64), Just(400), Just(DEFAULT_CACHE_SIZE)],
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(dir.path());
            cfg.retention.default.max_messages = 7;
            cfg.segment_size = 700;
            cfg.cache_size = cache_size;
            cfg.durability = Durability::Memory;
            let mut engine = Some(DiskEngine::open(cfg.clone()).unwrap());
            let mut model: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); 3];
            let mut epochs: Vec<Option<Epoch>> = vec![None; 3];
            let mut n = 0u32;
            for op in ops {
                match op {
                    Op::Append(s, count) => {
                        let e = engine.as_ref().unwrap();
                        let batch: Vec<_> = (0..count).map(|_| { n += 1; msg(format!("m{n}")) }).collect();
                        let expected: Vec<Vec<u8>> = batch.iter().map(|m| m.payload.to_vec()).collect();
                        let out = e.append(&name(&format!("s{s}")), batch).await.unwrap();
                        for (a, p) in out.iter().zip(expected) {
                            let m = &mut model[s as usize];
                            assert_eq!(a.position.offset.get(), m.last().map_or(1, |l| l.0 + 1));
                            if let Some(epoch) = &epochs[s as usize] { assert_eq!(&a.position.epoch, epoch); }
                            epochs[s as usize] = Some(a.position.epoch.clone());
                            m.push((a.position.offset.get(), p));
                        }
                    }
                    Op::Reopen => {
                        drop(engine.take());
                        engine = Some(DiskEngine::open(cfg.clone()).unwrap());
                    }
                    Op::TearTail(len) => {
                        drop(engine.take());
                        let seg = last_segment(dir.path());
                        let mut f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
                        std::io::Write::write_all(&mut f, &vec![0xA5; len as usize]).unwrap();
                        drop(f);
                        engine = Some(DiskEngine::open(cfg.clone()).unwrap());
                    }
                }
                let e = engine.as_ref().unwrap();
                for s in 0..3 {
                    let want: Vec<_> = model[s].iter().rev().take(7).rev().cloned().collect();
                    assert_eq!(payloads(e, &format!("s{s}")).await, want, "stream s{}", s);
                    if let Some(epoch) = &epochs[s] {
                        let state = e.state(&name(&format!("s{s}"))).await.unwrap().unwrap();
                        assert_eq!(&state.epoch, epoch);
                    }
                }
            }
        });
    }
}

/// Retention's age and the idempotency window are decided by the engine's clock, in a running
/// engine and in recovery alike: moved by the test, never slept through.
#[tokio::test]
async fn age_retention_and_idempotency_follow_the_clock_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let time = spool_core::ManualClock::new(1_000_000);
    let mut cfg = config(dir.path());
    cfg.clock = time.clock();
    cfg.dedup_window = Duration::from_secs(120);
    {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        engine.append(&name("age"), vec![msg("old")]).await.unwrap();
        engine
            .append(&name("o"), vec![keyed("paid", "order-1")])
            .await
            .unwrap();
    }
    // Reopened inside the window, the key is remembered.
    time.advance(Duration::from_secs(119));
    {
        let engine = DiskEngine::open(cfg.clone()).unwrap();
        let retry = engine
            .append(&name("o"), vec![keyed("paid", "order-1")])
            .await
            .unwrap();
        assert!(retry[0].duplicate);
    }
    // Reopened past it, the same key is a new message; and with a max age the old message is
    // gone at recovery, the head kept.
    time.advance(Duration::from_secs(2));
    cfg.retention.default.max_age = Duration::from_secs(120);
    let engine = DiskEngine::open(cfg).unwrap();
    let state = engine.state(&name("age")).await.unwrap().unwrap();
    assert_eq!((state.head, state.oldest), (Offset(1), Offset(2)));
    let again = engine
        .append(&name("o"), vec![keyed("paid", "order-1")])
        .await
        .unwrap();
    assert_eq!(
        (again[0].duplicate, again[0].position.offset),
        (false, Offset(2))
    );
}

/// A segment that cannot be started (here: a directory in its place; in production: no file
/// descriptor left) is not a failed write: appends go on in the current segment, the roll is
/// retried at the next commit, and nothing is lost.
#[tokio::test]
async fn a_failed_roll_is_retried_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_size = 4096;
    let wal = dir.path().join("wal");
    let engine = DiskEngine::open(cfg.clone()).unwrap();
    let active = *segment::list(&wal).unwrap().last().unwrap();
    let blocker = segment::path(&wal, active + 1);
    fs::create_dir(&blocker).unwrap();
    fs::write(blocker.join("keep"), b"x").unwrap();
    let payload = "x".repeat(500);
    for _ in 0..40 {
        engine
            .append(&name("r"), vec![msg(payload.clone())])
            .await
            .expect("appends go on while the roll fails");
    }
    engine.ready().await.expect("still ready");
    assert!(fs::metadata(segment::path(&wal, active)).unwrap().len() > 4096 * 4);

    fs::remove_dir_all(&blocker).unwrap();
    for _ in 0..20 {
        engine
            .append(&name("r"), vec![msg(payload.clone())])
            .await
            .unwrap();
    }
    assert!(
        segment::path(&wal, active + 1).is_file(),
        "the roll succeeded"
    );
    assert!(segment::list(&wal).unwrap().len() >= 3, "and rolls go on");
    drop(engine);
    let engine = DiskEngine::open(cfg).unwrap();
    let offsets: Vec<u64> = payloads(&engine, "r").await.iter().map(|m| m.0).collect();
    assert_eq!(offsets, (1..=60).collect::<Vec<u64>>());
}

/// The payload of message `n` of `stream`: a wrong, shifted or partial answer cannot match.
fn numbered(stream: &str, n: u64) -> String {
    format!("{stream}#{n}:{}", "p".repeat((n % 97) as usize))
}

/// A read after `after` answered exactly the retained messages from `after + 1` on, in order,
/// or nothing because `after + 1` is no longer retained (or nothing is newer).
fn check_read(stream: &str, after: u64, limit: usize, batch: &ReadBatch) {
    let (oldest, head) = (batch.state.oldest.get(), batch.state.head.get());
    if batch.messages.is_empty() {
        assert!(
            after + 1 < oldest || after >= head || limit == 0,
            "{stream}: an empty answer after {after} with {oldest}..={head} retained"
        );
        return;
    }
    assert!(
        after + 1 >= oldest,
        "{stream}: an answer after {after} though {oldest} is the oldest"
    );
    assert!(batch.messages.len() <= limit);
    for (i, m) in batch.messages.iter().enumerate() {
        let want = after + 1 + i as u64;
        assert_eq!(m.offset.get(), want, "{stream}: offsets in order, no gap");
        assert!(
            want <= head,
            "{stream}: nothing past the head of the same snapshot"
        );
        assert_eq!(
            std::str::from_utf8(&m.payload).unwrap(),
            numbered(stream, want),
            "{stream}: message {want}'s own payload"
        );
    }
}

/// Appends `count` numbered messages to each of `streams`, interleaved in small batches so
/// that every segment holds frames of several streams.
async fn append_numbered(engine: &DiskEngine, streams: &[&str], from: u64, count: u64) {
    let mut n = from;
    while n < from + count {
        for s in streams {
            let batch = (n..(n + 3).min(from + count))
                .map(|i| msg(numbered(s, i)))
                .collect();
            engine.append(&name(s), batch).await.unwrap();
        }
        n += 3;
    }
}

/// Reads every retained position of each stream with several limits and checks each answer.
async fn check_all_reads(engine: &DiskEngine, streams: &[&str]) {
    for s in streams {
        let state = engine.state(&name(s)).await.unwrap().unwrap();
        let (oldest, head) = (state.oldest.get(), state.head.get());
        for after in (oldest.saturating_sub(3)..=head).step_by(7) {
            for limit in [1, 10, 1000] {
                let batch = engine.read(&name(s), Offset(after), limit).await.unwrap();
                check_read(s, after, limit, &batch);
                if after + 1 >= oldest && after < head {
                    assert_eq!(
                        batch.messages.len() as u64,
                        (head - after).min(limit as u64),
                        "{s}: every retained message after {after}, up to the limit"
                    );
                }
            }
        }
    }
}

/// Issue 14 item 4: history older than the tail cache is read from the segments — across
/// segment rolls, segments deleted by retention, and a restart (which rebuilds the index, not
/// the payloads) — and the caches stay within their budget.
#[tokio::test]
async fn history_older_than_the_cache_is_read_from_the_segments_across_rolls_retention_and_restart()
{
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_size = 4096;
    cfg.cache_size = 8 * 1024;
    cfg.retention.default.max_messages = 300;
    cfg.durability = Durability::Memory;
    let streams = ["a", "b/c", "d"];
    let engine = DiskEngine::open(cfg.clone()).unwrap();
    append_numbered(&engine, &streams, 1, 1000).await;
    let stats = engine.cache_stats();
    assert!(stats.bytes <= cfg.cache_size, "{stats:?}");
    assert!(
        stats.messages > 0,
        "the newest messages are cached: {stats:?}"
    );
    let state = engine.state(&name("a")).await.unwrap().unwrap();
    assert_eq!((state.oldest, state.head), (Offset(701), Offset(1000)));
    check_all_reads(&engine, &streams).await;
    let segments = segment::list(&dir.path().join("wal")).unwrap().len();
    assert!(
        segments < 150,
        "retention deleted old segments: {segments} left"
    );

    drop(engine);
    let engine = DiskEngine::open(cfg.clone()).unwrap();
    assert_eq!(engine.cache_stats().messages, 0, "recovery caches nothing");
    check_all_reads(&engine, &streams).await;
    append_numbered(&engine, &streams, 1001, 200).await;
    check_all_reads(&engine, &streams).await;

    // With no cache at all, every read comes from the segments.
    drop(engine);
    cfg.cache_size = 0;
    let engine = DiskEngine::open(cfg).unwrap();
    append_numbered(&engine, &streams, 1201, 50).await;
    assert_eq!(
        engine.cache_stats(),
        CacheStats {
            bytes: 0,
            messages: 0,
            budget: 0
        }
    );
    check_all_reads(&engine, &streams).await;
}

/// The caches of many streams share one budget: the oldest-published messages are evicted
/// first, whatever their stream, and a stream's cache is always its newest messages.
#[tokio::test]
async fn many_streams_share_one_cache_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.cache_size = 64 * 1024;
    cfg.durability = Durability::Memory;
    let engine = DiskEngine::open(cfg.clone()).unwrap();
    let streams: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = streams.iter().map(String::as_str).collect();
    append_numbered(&engine, &refs, 1, 60).await;
    let stats = engine.cache_stats();
    assert!(stats.bytes <= cfg.cache_size, "{stats:?}");
    assert!(
        stats.bytes > cfg.cache_size / 2,
        "the budget is used: {stats:?}"
    );
    // The last stream written is cached whole from its newest message back; the first is not.
    let last = engine.shared.streams.get(&name("s49")).unwrap();
    let first = engine.shared.streams.get(&name("s0")).unwrap();
    assert!(last.log.lock().caches(Offset(60)));
    assert!(!first.log.lock().caches(Offset(1)));
    check_all_reads(&engine, &refs).await;
}

/// A read takes its segment handles under the stream's lock; retention may delete a segment
/// before the read gets to it, and the read still answers exactly what was retained when it
/// started (an unlinked file lives while open).
#[tokio::test]
async fn a_read_planned_before_retention_deletes_its_segment_still_answers_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_size = 4096;
    cfg.cache_size = 0;
    cfg.retention.default.max_messages = 20;
    cfg.durability = Durability::Memory;
    let engine = DiskEngine::open(cfg).unwrap();
    append_numbered(&engine, &["r"], 1, 20).await;
    let stream = engine.shared.streams.get(&name("r")).unwrap();
    let plan = stream
        .log
        .lock()
        .plan(Offset::ZERO, 100, &engine.shared.files)
        .unwrap();
    assert_eq!(plan.disk.len(), 20);
    let planned: Vec<u64> = plan.files.keys().copied().collect();
    // Push all twenty out of retention and roll past their segments: they are deleted.
    append_numbered(&engine, &["r"], 21, 200).await;
    let wal = dir.path().join("wal");
    for id in &planned {
        assert!(
            !segment::path(&wal, *id).exists(),
            "segment {id} deleted by retention"
        );
    }
    let messages = history::read_disk(&name("r"), &plan.disk, &plan.files).unwrap();
    let batch = ReadBatch {
        state: plan.state,
        messages,
    };
    check_read("r", 0, 100, &batch);
    assert_eq!(batch.messages.len(), 20);
    // A read now sees them gone: history expired, not a wrong answer.
    let now = engine.read(&name("r"), Offset::ZERO, 100).await.unwrap();
    assert!(now.messages.is_empty());
    assert_eq!(now.state.oldest, Offset(201));
}

/// Readers racing appends, rolls and retention deleting segments (no cache: every read from
/// the segments) only ever get exactly the retained messages in order, or nothing when their
/// position expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_racing_appends_and_segment_deletion_answer_exactly_what_was_retained() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.segment_size = 2048;
    cfg.cache_size = 0;
    cfg.retention.default.max_messages = 40;
    cfg.durability = Durability::Memory;
    let engine = Arc::new(DiskEngine::open(cfg).unwrap());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (engine, done) = (engine.clone(), done.clone());
        tokio::spawn(async move {
            for n in 1..=3000u64 {
                engine
                    .append(&name("race"), vec![msg(numbered("race", n))])
                    .await
                    .unwrap();
                engine
                    .append(&name("noise"), vec![msg(numbered("noise", n))])
                    .await
                    .unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Release);
        })
    };
    let mut readers = Vec::new();
    for r in 0..3u64 {
        let (engine, done) = (engine.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let (mut answered, mut expired) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let Some(state) = engine.state(&name("race")).await.unwrap() else {
                    tokio::task::yield_now().await;
                    continue;
                };
                // The oldest retained message is the one retention deletes next.
                let after = state.oldest.get().saturating_sub(1) + r;
                let batch = engine.read(&name("race"), Offset(after), 25).await.unwrap();
                check_read("race", after, 25, &batch);
                if batch.messages.is_empty() {
                    expired += 1;
                } else {
                    answered += 1;
                }
            }
            (answered, expired)
        }));
    }
    writer.await.unwrap();
    let mut answered = 0;
    for r in readers {
        answered += r.await.unwrap().0;
    }
    assert!(answered > 0, "reads were answered from the segments");
    let segments = segment::list(&dir.path().join("wal")).unwrap().len();
    assert!(
        segments < 40,
        "segments were deleted meanwhile: {segments} left"
    );
}

/// A frame that is not the message the index names (here: overwritten in place after the
/// engine indexed it) is an error, never a wrong message.
#[tokio::test]
async fn a_frame_changed_under_the_index_is_an_error_not_a_wrong_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.cache_size = 0;
    let engine = DiskEngine::open(cfg).unwrap();
    append_numbered(&engine, &["x"], 1, 10).await;
    let seg = segment_with_messages(dir.path());
    let mut bytes = fs::read(&seg).unwrap();
    let needle = numbered("x", 5);
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap();
    bytes[at] ^= 0xFF;
    fs::write(&seg, &bytes).unwrap();
    let err = engine.read(&name("x"), Offset(3), 10).await.unwrap_err();
    assert!(err.to_string().contains("WAL"), "{err}");
    // Reads that do not touch it are answered.
    let batch = engine.read(&name("x"), Offset(5), 10).await.unwrap();
    check_read("x", 5, 10, &batch);
    assert_eq!(batch.messages.len(), 5);
}
