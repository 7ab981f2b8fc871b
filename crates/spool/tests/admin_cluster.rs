//! Stream administration on the cluster engines through the real binary: two `spool serve`
//! nodes on one Redis prefix / one NATS prefix (the shared servers; skipped on a laptop without
//! them, failing under CI). A delete on node 0 resets a subscriber waiting on node 1 and the
//! next publish starts a new epoch at offset 1; a truncate on node 0 gives a reader behind on
//! node 1 `history_expired`, even while node 1 holds the stream's tail in its cache (a live
//! SSE subscriber there); listing and describing through either node agree.

mod common;

use std::time::{Duration, Instant};

use common::{API_KEY, Server, engines::Backend};
use serde_json::{Value, json};

async fn call(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = server
        .http
        .request(method, server.url(path))
        .bearer_auth(API_KEY)
        .timeout(Duration::from_secs(20));
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn listed(body: &Value) -> Vec<String> {
    body["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .map(|s| s["stream"].as_str().expect("stream").to_owned())
        .collect()
}

async fn delete_on_one_node_resets_subscribers_on_the_other(backend: Backend) {
    if !backend.available() {
        return;
    }
    let c = backend.cluster(2, &[]);
    let (n0, n1) = (c.node(0), c.node(1));
    let mut epoch = String::new();
    for i in 1..=3 {
        let answer = n0.publish("doomed", &format!("m{i}")).await;
        assert_eq!(answer["offset"], i, "{answer}");
        epoch = answer["epoch"].as_str().unwrap().to_owned();
    }
    n0.publish("kept", "k").await;

    // A long-poll on node 1 waiting at the head.
    let waiting = {
        let http = n1.http.clone();
        let url = n1.url(&format!(
            "/v1/streams/doomed/messages?after={epoch}:3&wait=30"
        ));
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(API_KEY).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    // Node 1 lists both streams (published on node 0).
    let (status, body) = call(n1, reqwest::Method::GET, "/v1/streams", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(listed(&body), ["doomed", "kept"], "{body}");
    // Waiting indeed (on a loaded machine 500 ms of sleep did not make sure of it).
    let until = Instant::now() + Duration::from_secs(20);
    while n1.metric(r#"spool_connections{transport="poll"}"#).await != Some(1.0) {
        assert!(
            Instant::now() < until,
            "{}: the long-poll did not reach node 1",
            backend.name()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (status, body) = call(n0, reqwest::Method::DELETE, "/v1/streams/doomed", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], true);
    let (status, answer) = tokio::time::timeout(Duration::from_secs(25), waiting)
        .await
        .expect("the reader waiting on node 1 is answered")
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let reason = answer["reset"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason == "unknown_stream" || reason == "epoch_changed",
        "{}: node 1's reader gets a reset: {answer}",
        backend.name()
    );
    // Gone through either node; deleted once.
    assert_eq!(n1.info_status("doomed").await, 404);
    let (status, _) = call(n1, reqwest::Method::DELETE, "/v1/streams/doomed", None).await;
    assert_eq!(status, 404, "deleted once");
    let (_, body) = call(n1, reqwest::Method::GET, "/v1/streams", None).await;
    assert_eq!(listed(&body), ["kept"], "{body}");
    // A reader coming back to node 1 with its old position gets a reset too.
    let (_, poll) = n1.poll("doomed", &format!("after={epoch}:2")).await;
    assert!(poll["reset"]["reason"].is_string(), "{poll}");
    // The next publish, on node 1, starts a new epoch at offset 1.
    let again = n1.publish("doomed", "reborn").await;
    assert_eq!(again["offset"], 1, "{again}");
    assert_ne!(again["epoch"], epoch.as_str(), "a new epoch");
    let new_epoch = again["epoch"].as_str().unwrap();
    let (_, read) = n0.poll("doomed", "after=oldest").await;
    assert_eq!(read["messages"].as_array().map(Vec::len), Some(1), "{read}");
    assert_eq!(read["messages"][0]["epoch"], new_epoch, "{read}");
    // The other stream is untouched.
    assert_eq!(n1.info_status("kept").await, 200);
}

async fn truncate_on_one_node_expires_readers_on_the_other(backend: Backend) {
    if !backend.available() {
        return;
    }
    let c = backend.cluster(2, &[]);
    let (n0, n1) = (c.node(0), c.node(1));
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = n0.publish("cut", &format!("m{i}")).await["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    // A live SSE subscriber on node 1 from the oldest message keeps the stream watched there
    // (so node 1 caches its tail); it has read everything once the head event came.
    let sse = n1
        .http
        .get(n1.url("/v1/streams/cut/events?after=oldest"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let (_, read) = n1.poll("cut", &format!("after={epoch}:1")).await;
    assert_eq!(read["messages"].as_array().map(Vec::len), Some(4), "{read}");

    let (status, body) = call(
        n0,
        reqwest::Method::POST,
        "/v1/streams/cut/truncate",
        Some(json!({"before": 4})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Node 1 tells a reader behind the new oldest message that its history expired: at once
    // or once the truncate note arrived, never the dropped messages for long.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, poll) = n1.poll("cut", &format!("after={epoch}:1")).await;
        assert_eq!(status, 200, "{poll}");
        if poll["reset"]["reason"] == "history_expired" {
            break;
        }
        assert!(
            Instant::now() < until,
            "{}: node 1 still answers a reader behind a truncate: {poll}",
            backend.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, tail) = n1.poll("cut", &format!("after={epoch}:3")).await;
    let offsets: Vec<u64> = tail["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [4, 5], "{tail}");
    let (status, info) = call(n1, reqwest::Method::GET, "/v1/streams/cut", None).await;
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["oldest"], 4, "{info}");
    assert_eq!(info["head"], 5, "{info}");
    assert_eq!(info["retained_messages"], 2, "{info}");
    assert!(
        info["last_publish_ms"].as_u64().unwrap() > 1_600_000_000_000,
        "{info}"
    );
    // The SSE subscriber is node 1's, not node 0's.
    assert_eq!(info["subscribers"], 1, "{info}");
    let (_, on0) = call(n0, reqwest::Method::GET, "/v1/streams/cut", None).await;
    assert_eq!(on0["subscribers"], 0, "{on0}");
    assert_eq!(on0["oldest"], 4, "{on0}");
    drop(sse);
}

#[tokio::test]
async fn redis_delete_on_one_node_resets_subscribers_on_the_other() {
    delete_on_one_node_resets_subscribers_on_the_other(Backend::Redis).await;
}

#[tokio::test]
async fn nats_delete_on_one_node_resets_subscribers_on_the_other() {
    delete_on_one_node_resets_subscribers_on_the_other(Backend::Nats).await;
}

#[tokio::test]
async fn redis_truncate_on_one_node_expires_readers_on_the_other() {
    truncate_on_one_node_expires_readers_on_the_other(Backend::Redis).await;
}

#[tokio::test]
async fn nats_truncate_on_one_node_expires_readers_on_the_other() {
    truncate_on_one_node_expires_readers_on_the_other(Backend::Nats).await;
}

/// Reads of streams nothing was published to keep per-node state (a placeholder epoch while
/// someone watches) that is bounded by --max-unpublished-streams and reclaimed: with three
/// SSE subscribers holding three such streams, a fourth is refused (507 stream_limit); once
/// one leaves, its place is taken again, and thousands of one-off reads of such streams all
/// work and create nothing.
async fn reads_of_unknown_streams_are_bounded(backend: Backend) {
    if !backend.available() {
        return;
    }
    let c = backend.cluster(1, &["--max-unpublished-streams", "3"]);
    let node = c.node(0);
    let sse = |i: usize| {
        node.http
            .get(node.url(&format!("/v1/streams/ghost%2F{i}/events?after=oldest")))
            .bearer_auth(API_KEY)
            .timeout(Duration::from_secs(60))
            .send()
    };
    let mut held = Vec::new();
    for i in 0..3 {
        let r = sse(i).await.expect("sse");
        assert_eq!(r.status(), 200, "{}: placeholder {i}", backend.name());
        held.push(r);
    }
    let refused = sse(3).await.expect("sse");
    assert_eq!(refused.status(), 507, "{}: past the cap", backend.name());
    let body: Value = refused.json().await.expect("error body");
    assert_eq!(body["error"]["code"], "stream_limit", "{body}");
    // One subscriber leaves: its place is taken back at the cap.
    drop(held.pop());
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let r = sse(3).await.expect("sse");
        if r.status() == 200 {
            held.push(r);
            break;
        }
        assert_eq!(r.status(), 507);
        assert!(
            Instant::now() < until,
            "{}: the placeholder of a subscriber that left is never reclaimed",
            backend.name()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(held);
    // One-off reads of many unknown streams: every one answered, nothing created.
    let until = Instant::now() + Duration::from_secs(60);
    for i in 100..400 {
        loop {
            let (status, body) = node.poll(&format!("ghost/{i}"), "after=oldest").await;
            if status == 200 {
                assert_eq!(body["messages"], json!([]), "{body}");
                break;
            }
            // Right after the held subscribers left, their placeholders may still count.
            assert_eq!(status, 507, "{body}");
            assert!(
                Instant::now() < until,
                "{}: reads refused for good",
                backend.name()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (status, body) = call(node, reqwest::Method::GET, "/v1/streams?prefix=ghost", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["streams"], json!([]), "reads create no stream");
}

#[tokio::test]
async fn redis_reads_of_unknown_streams_are_bounded() {
    reads_of_unknown_streams_are_bounded(Backend::Redis).await;
}

#[tokio::test]
async fn nats_reads_of_unknown_streams_are_bounded() {
    reads_of_unknown_streams_are_bounded(Backend::Nats).await;
}
