//! Reads create no durable state on the NATS JetStream engine either (issue 10, item 6),
//! through the real binary on the shared NATS (a fresh prefix per test, deleted at the end):
//!
//! - long-polls, SSE and WebSocket subscriptions of 500 distinct streams nothing was published
//!   to make no JetStream stream; the first publish makes one;
//! - a reader waiting on a stream not yet created, on the node that then publishes and on
//!   another node, gets offset 1 with no reset, and a position learned while the stream was
//!   empty resumes with no reset;
//! - the node's placeholders are capped by `--max-unpublished-streams` (507 `stream_limit`).
//!
//! Skipped with a message when NATS is unreachable, except under CI (`CI` set), where it fails.

mod common;

use std::time::Duration;

use common::engines::{Backend, Cluster};
use common::{Server, SseClient, WsPeer, jwt, now_secs};
use futures::StreamExt;
use serde_json::{Value, json};

/// The JetStream streams of the cluster's prefix (its sessions bucket, `KV_…`, is not one).
async fn jetstream_streams(cluster: &Cluster) -> Vec<String> {
    let client = async_nats::connect(cluster.url.as_str())
        .await
        .expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let mine = format!("{}_", cluster.namespace.prefix);
    let mut names = js.stream_names();
    let mut out = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.expect("JetStream stream names");
        if name.starts_with(&mine) {
            out.push(name);
        }
    }
    out
}

fn reader_token() -> String {
    jwt(json!({"sub":"reader","exp":now_secs()+600,"subscribe":["*"]}))
}

#[tokio::test]
async fn reads_of_500_unknown_streams_make_no_jetstream_stream() {
    if !Backend::Nats.available() {
        return;
    }
    let cluster = Backend::Nats.cluster(2, &[]);
    let (a, b) = (cluster.node(0), cluster.node(1));
    let reader = reader_token();

    // 400 long-polls, half on each node.
    futures::stream::iter(0..400)
        .for_each_concurrent(16, |i| {
            let (node, reader) = (cluster.node(i), &reader);
            async move {
                let r = node
                    .http
                    .get(node.url(&format!("/v1/streams/ghost-{i}/messages?wait=0")))
                    .bearer_auth(reader)
                    .send()
                    .await
                    .expect("poll");
                assert_eq!(r.status(), 200, "reading an unknown stream");
                let body: Value = r.json().await.expect("poll json");
                assert!(body["messages"].as_array().unwrap().is_empty(), "{body}");
                assert!(body["position"].as_str().unwrap().ends_with(":0"), "{body}");
            }
        })
        .await;
    // 50 SSE subscriptions, held open together.
    let mut sse = Vec::new();
    for i in 0..50 {
        sse.push(
            SseClient::connect(
                a.http
                    .get(a.url(&format!("/v1/streams/sse-ghost-{i}/events?token={reader}"))),
            )
            .await,
        );
    }
    // 50 WebSocket subscriptions on one connection.
    let (mut peer, _) = WsPeer::connect(&b.addr, &reader).await;
    for i in 0..50 {
        peer.send(
            json!({"type":"subscribe","id":i,"stream":format!("ws-ghost-{i}"),"after":"oldest"}),
        )
        .await;
        let subscribed = peer.expect("subscribed").await;
        assert!(
            subscribed["position"].as_str().unwrap().ends_with(":0"),
            "{subscribed}"
        );
    }
    // Let the held subscriptions read (and the nodes re-read what they watch) a few times.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        jetstream_streams(&cluster).await,
        Vec::<String>::new(),
        "reads made JetStream streams"
    );
    assert_eq!(a.info_status("ghost-7").await, 404);
    assert_eq!(b.info_status("ws-ghost-3").await, 404);
    drop((sse, peer));

    // A publish makes the stream, and only that one.
    let acked = a.publish("real", "x").await;
    assert_eq!(acked["offset"], 1);
    assert_eq!(jetstream_streams(&cluster).await.len(), 1);
    assert_eq!(b.info_status("real").await, 200);
}

/// What waits on the stream `fresh` on one node: a WebSocket subscription, an SSE
/// subscription and a long-poll, and the position a long-poll learned while it was empty.
struct Waiting {
    peer: WsPeer,
    sse: SseClient,
    poll: tokio::task::JoinHandle<Value>,
    learned: String,
}

async fn wait_on_fresh(node: &Server, reader: &str) -> Waiting {
    let (mut peer, _) = WsPeer::connect(&node.addr, reader).await;
    peer.send(json!({"type":"subscribe","id":1,"stream":"fresh","after":"now"}))
        .await;
    let subscribed = peer.expect("subscribed").await;
    let at = subscribed["position"].as_str().unwrap().to_owned();
    assert!(at.ends_with(":0"), "{subscribed}");
    let sse = SseClient::connect(
        node.http
            .get(node.url(&format!("/v1/streams/fresh/events?token={reader}"))),
    )
    .await;
    let (status, empty) = node.poll("fresh", "wait=0").await;
    assert_eq!(status, 200, "{empty}");
    let learned = empty["position"].as_str().unwrap().to_owned();
    assert_eq!(learned, at, "one placeholder epoch per stream per node");
    let poll = {
        let http = node.http.clone();
        let url = node.url("/v1/streams/fresh/messages?wait=30");
        let reader = reader.to_owned();
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(reader).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        })
    };
    Waiting {
        peer,
        sse,
        poll,
        learned,
    }
}

#[tokio::test]
async fn readers_waiting_on_every_node_get_offset_1_without_a_reset() {
    if !Backend::Nats.available() {
        return;
    }
    let cluster = Backend::Nats.cluster(2, &[]);
    let (a, b) = (cluster.node(0), cluster.node(1));
    let reader = reader_token();
    let mut on_a = wait_on_fresh(a, &reader).await;
    let mut on_b = wait_on_fresh(b, &reader).await;
    assert_ne!(
        on_a.learned, on_b.learned,
        "each node shows its own placeholder"
    );
    // Every reader is in place (SSE and the long-poll open their subscriptions as they start).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        jetstream_streams(&cluster).await.is_empty(),
        "readers made it"
    );
    assert_eq!(a.info_status("fresh").await, 404);

    // Node B publishes first: the stream is made in the epoch B's readers wait in.
    let acked = b.publish("fresh", "hello").await;
    assert_eq!(acked["offset"], 1);
    let epoch = acked["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        format!("{epoch}:0"),
        on_b.learned,
        "the first publish takes the epoch its node's readers wait in"
    );

    // Readers on both nodes get offset 1 with no reset — those on A from A's placeholder.
    for (node, waiting) in [("A", &mut on_a), ("B", &mut on_b)] {
        let m = waiting.peer.expect("message").await;
        assert_eq!(
            (m["offset"].as_u64(), m["epoch"].as_str()),
            (Some(1), Some(epoch.as_str())),
            "WebSocket on {node}: {m}"
        );
        let event = waiting.sse.next(Duration::from_secs(15)).await.unwrap();
        assert_eq!(event.event, "message", "SSE on {node}: {event:?}");
        assert_eq!(event.id.as_deref(), Some(format!("{epoch}:1").as_str()));
        let polled = tokio::time::timeout(Duration::from_secs(15), &mut waiting.poll)
            .await
            .expect("the long-poll answers")
            .unwrap();
        assert!(polled["reset"].is_null(), "long-poll on {node}: {polled}");
        assert_eq!(polled["messages"][0]["offset"], 1, "{polled}");
    }
    // On B the position learned while the stream was empty resumes with no reset.
    let (_, resumed) = b
        .poll("fresh", &format!("after={}&wait=0", on_b.learned))
        .await;
    assert!(resumed["reset"].is_null(), "{resumed}");
    assert_eq!(resumed["messages"][0]["offset"], 1, "{resumed}");
    assert_eq!(jetstream_streams(&cluster).await.len(), 1);
}

#[tokio::test]
async fn a_nodes_placeholders_are_capped() {
    if !Backend::Nats.available() {
        return;
    }
    let cluster = Backend::Nats.cluster(1, &["--max-unpublished-streams", "3"]);
    let node = cluster.node(0);
    let reader = reader_token();
    node.publish("known", "x").await;
    // Three readers waiting on three unknown streams (a subscription is answered once its
    // watch is taken).
    let (mut held, _) = WsPeer::connect(&node.addr, &reader).await;
    for i in 0..3 {
        held.send(json!({"type":"subscribe","id":i,"stream":format!("held-{i}"),"after":"now"}))
            .await;
        held.expect("subscribed").await;
    }
    // Every placeholder is watched: a read of another unknown stream is refused, clearly.
    let (status, body) = node.poll("one-more", "wait=0").await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "stream_limit", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-unpublished-streams"),
        "{body}"
    );
    held.send(json!({"type":"subscribe","id":9,"stream":"ws-more","after":"now"}))
        .await;
    let refused = held.expect("error").await;
    assert_eq!(refused["code"], "stream_limit", "{refused}");
    assert_eq!(refused["id"], 9, "{refused}");
    // Streams that exist are read as before.
    let (status, known) = node.poll("known", "after=oldest&wait=0").await;
    assert_eq!(status, 200, "{known}");
    assert_eq!(known["messages"][0]["offset"], 1);

    // Once their readers are gone, their room is free again.
    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = node.poll("one-more", "wait=0").await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 507, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cap stayed full"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(jetstream_streams(&cluster).await.len(), 1);
}
