//! Issue 14 item 4 through the real binary: the disk engine keeps only a bounded tail of
//! recent messages in memory (`--cache-size`) and serves older history from its WAL segments.
//! Every read — long-poll and SSE, before and after a kill -9, across segment rolls and
//! segments deleted by retention — answers exactly the retained messages in order; memory
//! does not grow with retained history; a bad `--cache-size` is refused.

mod common;

use std::{process::Command, time::Duration};

use common::{API_KEY, Server, SseClient};
use serde_json::json;

fn payload(stream: &str, n: u64) -> String {
    format!("{stream}/{n}/{}", "x".repeat((n % 61) as usize))
}

/// Every retained message of `stream` by long-poll from `oldest`: (offset, data) in order.
async fn read_all(s: &Server, stream: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut after = "oldest".to_owned();
    loop {
        let (status, body) = s.poll(stream, &format!("after={after}&limit=1000")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["reset"].is_null(), "{body}");
        let messages = body["messages"].as_array().unwrap();
        if messages.is_empty() {
            return out;
        }
        for m in messages {
            out.push((
                m["offset"].as_u64().unwrap(),
                m["data"].as_str().unwrap().to_owned(),
            ));
        }
        after = body["position"].as_str().unwrap().to_owned();
    }
}

fn expected(stream: &str, oldest: u64, head: u64) -> Vec<(u64, String)> {
    (oldest..=head).map(|n| (n, payload(stream, n))).collect()
}

/// Publishes messages `from..=to` of every stream, in batches that mix the streams.
async fn publish_range(s: &Server, streams: &[&str], from: u64, to: u64) {
    let mut n = from;
    while n <= to {
        let last = (n + 24).min(to);
        let mut batch = Vec::new();
        for i in n..=last {
            for st in streams {
                batch.push(json!({"stream": st, "data": payload(st, i)}));
            }
        }
        s.publish_batch(batch).await;
        n = last + 1;
    }
}

async fn check_everything(s: &Server, streams: &[&str], oldest: u64, head: u64) {
    for st in streams {
        assert_eq!(
            read_all(s, st).await,
            expected(st, oldest, head),
            "{st}: exactly the retained messages, in order"
        );
    }
    // SSE from a position in the middle of the history, older than any cache.
    let st = streams[0];
    let (_, info) = s.poll(st, "after=oldest&limit=1").await;
    let epoch = info["head"].as_str().unwrap().rsplit_once(':').unwrap().0;
    let from = oldest + (head - oldest) / 3;
    let mut es = SseClient::connect(
        s.http
            .get(s.url(&format!("/v1/streams/{st}/events?after={epoch}:{from}")))
            .bearer_auth(API_KEY),
    )
    .await;
    for n in from + 1..=head {
        let ev = es
            .next(Duration::from_secs(20))
            .await
            .expect("an SSE event");
        assert_eq!(ev.event, "message");
        assert_eq!(ev.id.as_deref(), Some(format!("{epoch}:{n}").as_str()));
        assert_eq!(ev.data, payload(st, n));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn history_older_than_the_cache_is_read_from_the_segments_before_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    // A 4 KiB cache and 8 KiB segments: nearly every read comes from the segments, across
    // many rolls, and retention (500 per stream) deletes segments as it goes.
    let flags = [
        "--cache-size",
        "4KiB",
        "--segment-size",
        "8KiB",
        "--history-limit",
        "500",
        "--durability",
        "memory",
    ];
    let streams = ["alpha", "beta/1", "gamma"];
    let mut s = Server::start_disk(&listen, dir.path(), &flags);
    publish_range(&s, &streams, 1, 1200).await;
    check_everything(&s, &streams, 701, 1200).await;
    let segments = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
    assert!(segments < 60, "retention deleted segments: {segments} left");

    // kill -9: recovery rebuilds the index, nothing is cached, the same answers.
    s.kill();
    let s = Server::start_disk(&listen, dir.path(), &flags);
    check_everything(&s, &streams, 701, 1200).await;
    publish_range(&s, &streams, 1201, 1300).await;
    check_everything(&s, &streams, 801, 1300).await;
}

/// Memory does not grow with retained history: 96 MiB retained with a 4 MiB cache, live and
/// after a restart, while the whole history stays readable.
#[tokio::test(flavor = "multi_thread")]
async fn memory_stays_bounded_with_history_far_beyond_the_cache() {
    const MESSAGES: u64 = 384;
    const SIZE: usize = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let flags = [
        "--cache-size",
        "4MiB",
        "--history-max-bytes",
        "1GiB",
        "--durability",
        "memory",
    ];
    let mut s = Server::start_disk(&listen, dir.path(), &flags);
    // Warm up (allocator, connections) before the baseline.
    s.publish("warm", "up").await;
    let before = s.rss_bytes();
    for n in 1..=MESSAGES {
        s.publish(&format!("big{}", n % 4), &big(n, SIZE)).await;
    }
    let live = s.rss_bytes();
    let retained = MESSAGES * SIZE as u64;
    let grew = live.saturating_sub(before);
    assert!(
        grew < 48 << 20,
        "RSS grew by {} MiB with {} MiB retained and a 4 MiB cache",
        grew >> 20,
        retained >> 20
    );
    check_big(&s, MESSAGES, SIZE).await;

    s.kill();
    let s = Server::start_disk(&listen, dir.path(), &flags);
    let restarted = s.rss_bytes();
    assert!(
        restarted < before + (48 << 20),
        "RSS after a restart {} MiB (before loading: {} MiB) with {} MiB retained",
        restarted >> 20,
        before >> 20,
        retained >> 20
    );
    check_big(&s, MESSAGES, SIZE).await;
}

fn big(n: u64, size: usize) -> String {
    let mut d = format!("{n:08}");
    d.push_str(&"y".repeat(size - d.len()));
    d
}

/// Stream `big{k}` holds messages n = 1..=count with n % 4 == k, in order.
async fn check_big(s: &Server, count: u64, size: usize) {
    for k in 0..4u64 {
        let got = read_all(s, &format!("big{k}")).await;
        let want: Vec<(u64, String)> = (1..=count)
            .filter(|n| n % 4 == k)
            .enumerate()
            .map(|(i, n)| (i as u64 + 1, big(n, size)))
            .collect();
        assert!(got == want, "big{k}: exactly its messages, in order");
    }
}

#[test]
fn a_bad_cache_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["serve", "--listen", "127.0.0.1:0", "--engine", "disk"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--api-key", API_KEY, "--cache-size", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache-size"), "{err}");
}
