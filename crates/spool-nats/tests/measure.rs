//! A rough measurement of the engine on the shared NATS, one node: appends per second to one
//! stream (single-message calls from many tasks, and batches), and reads per second. Ignored
//! by default; run with
//! `cargo test --release -p spool-nats --test measure -- --ignored --nocapture`.

mod common;

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use spool_core::{NewMessage, Offset, StreamName};
use spool_engine::Engine;
use spool_nats::{NatsConfig, NatsEngine};

fn msg() -> NewMessage {
    NewMessage {
        payload: Bytes::from_static(&[b'x'; 100]),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, not a check"]
async fn appends_and_reads_per_second() {
    let Some(url) = common::shared_nats() else {
        return;
    };
    let prefix = common::unique_prefix();
    let _cleanup = common::Cleanup {
        url: url.clone(),
        prefix: prefix.clone(),
    };
    let engine = Arc::new(
        NatsEngine::connect(NatsConfig {
            prefix,
            ..NatsConfig::new(&url)
        })
        .await
        .unwrap(),
    );

    for tasks in [1usize, 16, 64] {
        let s = StreamName::new(&format!("single-{tasks}")).unwrap();
        engine.append(&s, vec![msg()]).await.unwrap();
        const TOTAL: usize = 4096;
        let started = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let engine = engine.clone();
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..TOTAL / tasks {
                    engine.append(&s, vec![msg()]).await.unwrap();
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        let rate = TOTAL as f64 / started.elapsed().as_secs_f64();
        println!("1 stream, {tasks:>2} tasks, 1 message per append: {rate:>8.0} appends/s");
    }

    let s = StreamName::new("batched").unwrap();
    let started = Instant::now();
    for _ in 0..100 {
        engine
            .append(&s, (0..100).map(|_| msg()).collect())
            .await
            .unwrap();
    }
    let rate = 10_000.0 / started.elapsed().as_secs_f64();
    println!("1 stream, 1 task, 100 messages per append: {rate:>8.0} messages/s");

    let started = Instant::now();
    let mut after = Offset(0);
    loop {
        let batch = engine.read(&s, after, 100).await.unwrap();
        let Some(last) = batch.messages.last() else {
            break;
        };
        after = last.offset;
    }
    let rate = after.get() as f64 / started.elapsed().as_secs_f64();
    println!("reads of 100 from JetStream (not the tail cache): {rate:>8.0} messages/s");
}
