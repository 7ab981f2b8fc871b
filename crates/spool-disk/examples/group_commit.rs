//! Group commits against appends on the disk engine, measured by hand (not a test):
//!
//! ```text
//! cargo run --release -p spool-disk --example group_commit [-- DIR [SECONDS [memory]]]
//! ```
//!
//! For 1 and 32 concurrent callers, for `SECONDS` each (default 3): appends of one 256-byte
//! message, then consumer group commits (each caller its own group, alternating a receive of
//! one message and its ack — the commits an ack path makes), then both at once. Prints
//! operations per second, and writes (fsyncs) per second from the engine's `WalStats`.
//! `DIR` (default: a temp dir) decides the file system, hence the fsync cost; `memory` runs
//! with `Durability::Memory` (no fsync), which compares what each operation costs the CPU.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use spool_core::{
    Epoch, NewMessage, Offset, Start, StreamName, StreamState,
    group::{GroupConfig, GroupName, GroupState, MemberName, ReceiveRequest},
};
use spool_disk::{DiskConfig, DiskEngine, Durability};
use spool_engine::{Committed, Engine, GroupStore};

const HEAD: u64 = 1 << 40;

fn stream_state() -> StreamState {
    StreamState {
        epoch: Epoch::parse("bench").expect("epoch"),
        oldest: Offset(1),
        head: Offset(HEAD),
    }
}

async fn appender(engine: Arc<DiskEngine>, until: Instant) -> u64 {
    let stream = StreamName::new("bench-append").expect("name");
    let payload = Bytes::from(vec![b'x'; 256]);
    let mut n = 0;
    while Instant::now() < until {
        engine
            .append(
                &stream,
                vec![NewMessage {
                    payload: payload.clone(),
                    ..Default::default()
                }],
            )
            .await
            .expect("append");
        n += 1;
    }
    n
}

async fn committer(engine: Arc<DiskEngine>, group: usize, until: Instant) -> u64 {
    let stream = StreamName::new("bench-groups").expect("name");
    let name = GroupName::new(&format!("g{group}-{}", rand_suffix())).expect("name");
    let config = GroupConfig {
        start: Start::Oldest,
        ..GroupConfig::default()
    };
    let mut state = GroupState::new(stream.clone(), name.clone(), config, &stream_state(), 1_000)
        .expect("group");
    assert!(
        engine
            .create_group(&state.snapshot())
            .await
            .expect("create")
    );
    let member = MemberName::new("w").expect("member");
    let (mut version, mut n, mut now) = (0, 0, 1_000u64);
    while Instant::now() < until {
        now += 1;
        let want = state.want(1, now);
        let message = NewMessage {
            payload: Bytes::from_static(b"m"),
            ..Default::default()
        }
        .stamp(want.after.next(), 1_000)
        .0;
        let request = ReceiveRequest {
            member: member.clone(),
            max: 1,
            visibility_timeout: None,
        };
        let received = state
            .receive(&request, &stream_state(), &[message], now)
            .expect("receive");
        let receipts: Vec<String> = received
            .value
            .deliveries
            .iter()
            .map(|d| d.receipt.encode())
            .collect();
        for changes in [
            received.changes,
            state.ack(&receipts, now).expect("ack").changes,
        ] {
            match engine
                .commit_group(&stream, &name, version, &changes)
                .await
                .expect("commit")
            {
                Committed::Done { version: v } => version = v,
                Committed::Conflict => panic!("conflict"),
            }
            n += 1;
        }
        if version % 1000 == 0 {
            let snapshot = state.snapshot();
            engine
                .compact_group(&stream, &name, version, &snapshot)
                .await
                .expect("compact");
        }
    }
    n
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

async fn run(engine: &Arc<DiskEngine>, what: &str, appenders: usize, committers: usize, secs: u64) {
    let before = engine.wal_stats();
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let mut appends = Vec::new();
    for _ in 0..appenders {
        appends.push(tokio::spawn(appender(engine.clone(), until)));
    }
    let mut commits = Vec::new();
    for g in 0..committers {
        commits.push(tokio::spawn(committer(engine.clone(), g, until)));
    }
    let (mut a, mut c) = (0, 0);
    for t in appends {
        a += t.await.expect("appender");
    }
    for t in commits {
        c += t.await.expect("committer");
    }
    let secs = start.elapsed().as_secs_f64();
    let after = engine.wal_stats();
    let batches = after.batches - before.batches;
    println!(
        "{what:<34} appends/s {:>8.0}  commits/s {:>8.0}  writes(fsyncs)/s {:>7.0}  requests/write {:>5.1}  mixed writes {}",
        a as f64 / secs,
        c as f64 / secs,
        batches as f64 / secs,
        (after.requests - before.requests) as f64 / batches.max(1) as f64,
        after.mixed_batches - before.mixed_batches,
    );
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = args
        .next()
        .map_or_else(|| tmp.path().to_owned(), std::path::PathBuf::from);
    let secs = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let durability = match args.next().as_deref() {
        Some("memory") => Durability::Memory,
        _ => Durability::Fsync,
    };
    let engine = Arc::new(
        DiskEngine::open(DiskConfig {
            durability,
            ..DiskConfig::new(&dir)
        })
        .expect("open"),
    );
    println!("data dir {} (durability {durability:?})", dir.display());
    for callers in [1, 32] {
        run(
            &engine,
            &format!("appends, {callers} callers"),
            callers,
            0,
            secs,
        )
        .await;
        run(
            &engine,
            &format!("group commits, {callers} callers"),
            0,
            callers,
            secs,
        )
        .await;
        run(
            &engine,
            &format!("both, {callers} + {callers} callers"),
            callers,
            callers,
            secs,
        )
        .await;
    }
}
