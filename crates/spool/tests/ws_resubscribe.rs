//! A WebSocket connection that unsubscribes while a subscription is reading keeps delivering
//! on its other subscriptions, on every engine.
//!
//! A subscription's deliveries take all the room left in the connection's outbound buffer
//! before they read the engine (`ws/core/deliveries.rs`). On the cluster engines that read is a
//! round trip, so an `unsubscribe` handled meanwhile dropped the deliveries holding the room,
//! and the room was never given back: with all of it gone, every other subscription of the
//! connection waited for room for good — a subscriber silently receiving nothing (seen on
//! Redis in 2 of 3 runs: subscribe `s:a` and `s:x` from oldest, unsubscribe `s:x` at once,
//! subscribe `s:b`, publish to `s:a` and `s:b`).

mod common;

use std::time::Duration;

use common::{
    API_KEY, WsPeer,
    engines::{Backend, Cluster},
};
use serde_json::{Value, json};

/// Connections per run, each its own chance of the race.
const ROUNDS: usize = 12;
/// Messages already in `s:a` and `s:x` before the connections subscribe.
const HISTORY: u64 = 20;

/// Counts one frame against what `a` and `b` must deliver, asserting each stream's messages
/// arrive in order with no gap (`x`'s may come until its unsubscribe is handled).
fn count(frame: &Value, a: &str, b: &str, got: &mut (u64, u64), round: usize) {
    assert_ne!(frame["type"], "reset", "round {round}: {frame}");
    assert_ne!(frame["type"], "error", "round {round}: {frame}");
    if frame["type"] != "message" {
        return;
    }
    let offset = frame["offset"].as_u64().expect("offset");
    let stream = frame["stream"].as_str().expect("stream");
    let seen = if stream == a {
        &mut got.0
    } else if stream == b {
        &mut got.1
    } else {
        return;
    };
    assert_eq!(
        offset,
        *seen + 1,
        "round {round}: {stream} out of order: {frame}"
    );
    *seen = offset;
}

/// The reported sequence, on a fresh connection each round: subscribe `a` and `x` from the
/// oldest, unsubscribe `x` at once (pipelined, no wait), subscribe `b` (never published to),
/// then publish to `a` and `b` — over HTTP, or over the same WebSocket.
async fn resubscribing_keeps_delivering(backend: Backend, nodes: usize, over_ws: bool) {
    if !backend.available() {
        return;
    }
    let c: Cluster = backend.cluster(nodes, &[]);
    let (a, x) = ("s:a", "s:x");
    let batch: Vec<Value> = (0..HISTORY)
        .flat_map(|i| {
            [
                json!({"stream": a, "data": format!("a{i}")}),
                json!({"stream": x, "data": format!("x{i}")}),
            ]
        })
        .collect();
    c.node(0).publish_batch(batch).await;
    let mut a_head = HISTORY;
    for round in 0..ROUNDS {
        let b = format!("s:b{round}");
        // Subscribe on the last node, publish through the first.
        let at = c.node(nodes - 1);
        let (mut peer, _) = WsPeer::connect(&at.addr, API_KEY).await;
        for frame in [
            json!({"type":"subscribe","id":1,"stream":a,"after":"oldest"}),
            json!({"type":"subscribe","id":2,"stream":x,"after":"oldest"}),
            json!({"type":"unsubscribe","id":3,"stream":x}),
            json!({"type":"subscribe","id":4,"stream":b,"after":"oldest"}),
        ] {
            peer.send(frame).await;
        }
        // Until `b` is subscribed; deliveries of `a` (and `x`, before its unsubscribe) may
        // come first, and are read again below.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut early = Vec::new();
        loop {
            let frame = peer.next(Duration::from_secs(10)).await.expect("frame");
            if frame["type"] == "subscribed" && frame["stream"] == b.as_str() {
                break;
            }
            assert_ne!(frame["type"], "error", "round {round}: {frame}");
            early.push(frame);
        }
        a_head += 1;
        if over_ws {
            peer.send(json!({"type":"publish","id":5,"stream":a,"data":"live-a"}))
                .await;
            peer.send(json!({"type":"publish","id":6,"stream":b,"data":"live-b"}))
                .await;
        } else {
            c.node(0).publish(a, "live-a").await;
            c.node(0).publish(&b, "live-b").await;
        }
        let mut got = (0, 0);
        for frame in &early {
            count(frame, a, &b, &mut got, round);
        }
        while got.0 < a_head || got.1 < 1 {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(
                !left.is_zero(),
                "round {round}: {a} delivered {} of {a_head}, {b} {} of 1 within 10 s",
                got.0,
                got.1
            );
            let frame =
                match tokio::time::timeout(left, peer.next(left + Duration::from_secs(1))).await {
                    Ok(Ok(frame)) => frame,
                    Ok(Err(end)) => panic!("round {round}: the connection ended: {end:?}"),
                    Err(_) => continue,
                };
            count(&frame, a, &b, &mut got, round);
        }
    }
}

#[tokio::test]
async fn redis_one_node_publish_over_http() {
    resubscribing_keeps_delivering(Backend::Redis, 1, false).await;
}

#[tokio::test]
async fn redis_one_node_publish_over_the_websocket() {
    resubscribing_keeps_delivering(Backend::Redis, 1, true).await;
}

#[tokio::test]
async fn redis_two_nodes() {
    resubscribing_keeps_delivering(Backend::Redis, 2, false).await;
}

#[tokio::test]
async fn memory() {
    resubscribing_keeps_delivering(Backend::Memory, 1, false).await;
}

#[tokio::test]
async fn nats_two_nodes() {
    resubscribing_keeps_delivering(Backend::Nats, 2, false).await;
}

#[tokio::test]
async fn disk() {
    resubscribing_keeps_delivering(Backend::Disk, 1, true).await;
}
