//! Rough throughput against the shared Redis; ignored by default. Run with
//! `cargo test --release -p spool-redis --test bench -- --ignored --nocapture`.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use spool_core::{NewMessage, Offset, StreamName};
use spool_engine::Engine;
use spool_redis::RedisEngine;

use common::Prefix;

fn msg() -> NewMessage {
    NewMessage {
        payload: Bytes::from(vec![b'x'; 200]),
        ..Default::default()
    }
}

fn report(what: &str, messages: usize, took: Duration, mut latencies: Vec<Duration>) {
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "{what}: {:.0} msg/s; call p50 {:?} p99 {:?}",
        messages as f64 / took.as_secs_f64(),
        p(0.5),
        p(0.99)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn throughput() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let e = Arc::new(RedisEngine::connect(prefix.config()).await.unwrap());
    let s = StreamName::new("bench").unwrap();

    let n = 5000;
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        e.append(&s, vec![msg()]).await.unwrap();
        lat.push(t.elapsed());
    }
    report("sequential appends of 1", n, start.elapsed(), lat);

    let tasks = 64;
    let per = 500;
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let e = e.clone();
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                e.append(&s, vec![msg()]).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await.unwrap());
    }
    report(
        "64 concurrent appenders of 1",
        tasks * per,
        start.elapsed(),
        lat,
    );

    let batches = 200;
    let mut lat = Vec::with_capacity(batches);
    let start = Instant::now();
    for _ in 0..batches {
        let t = Instant::now();
        e.append(&s, (0..100).map(|_| msg()).collect())
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    report(
        "sequential appends of 100",
        batches * 100,
        start.elapsed(),
        lat,
    );

    // Within the newest 10,000 messages (the default retention).
    let from = e.state(&s).await.unwrap().unwrap().head.get() - 9000;
    let reads = 2000;
    let mut lat = Vec::with_capacity(reads);
    let start = Instant::now();
    for i in 0..reads {
        let t = Instant::now();
        let b = e.read(&s, Offset(from + i as u64), 100).await.unwrap();
        assert_eq!(b.messages.len(), 100);
        lat.push(t.elapsed());
    }
    report(
        "reads of 100 (Redis, no cache)",
        reads * 100,
        start.elapsed(),
        lat,
    );
}
