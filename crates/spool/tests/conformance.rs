//! One conformance suite, SPEC §2–§4 through the real binary, run against every engine —
//! memory, disk, redis, nats — from the same code. On the cluster engines every case runs on
//! three nodes sharing the engine: publishes go round-robin across them, readers and
//! subscribers sit on every node, and a session moves between them.
//!
//! The engine-level contract (offsets, retention, idempotency, sessions, cross-node wake-ups)
//! has its own suite in `spool_engine::conformance`, run by each engine's crate.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    API_KEY, WsPeer, enc,
    engines::{Backend, Cluster},
};
use serde_json::{Value, json};

const NODES: usize = 3;

/// Publishes `data` through node `i` of the cluster with an optional idempotency key.
async fn publish(c: &Cluster, i: usize, stream: &str, data: &str, key: Option<&str>) -> Value {
    let node = c.node(i);
    let mut req = node
        .http
        .post(node.url(&format!("/v1/streams/{}/messages", enc(stream))))
        .bearer_auth(API_KEY)
        .body(data.to_owned());
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let r = req.send().await.expect("publish");
    let status = r.status();
    let body: Value = r.json().await.expect("publish json");
    assert_eq!(status, 201, "publish on node {i} answered {status}: {body}");
    body
}

/// Every retained message of `stream` as node `i` serves it, by long-poll pages.
async fn read_all(c: &Cluster, i: usize, stream: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = "oldest".to_owned();
    loop {
        let (status, body) = c
            .node(i)
            .poll(stream, &format!("after={after}&limit=100"))
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(body["reset"].is_null(), "unexpected reset {body}");
        let page = body["messages"].as_array().expect("messages").clone();
        if page.is_empty() {
            return out;
        }
        after = body["position"].as_str().expect("position").to_owned();
        out.extend(page);
    }
}

fn offsets(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["offset"].as_u64().expect("offset"))
        .collect()
}

/// SPEC §2: offsets are gap-free and unique, and each publisher's messages keep their order,
/// whatever node each publish went through; every node serves the same history.
async fn ordered_without_holes_from_concurrent_publishers(backend: Backend) {
    const PUBLISHERS: usize = 4;
    const EACH: usize = 50;
    let c = std::sync::Arc::new(backend.cluster(NODES, &[]));
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..EACH {
                let ack = publish(&c, p + i, "orders", &format!("{p}/{i}"), None).await;
                acks.push(ack["offset"].as_u64().expect("offset"));
            }
            acks
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.expect("publisher"));
    }
    acked.sort_unstable();
    let total = (PUBLISHERS * EACH) as u64;
    assert_eq!(acked, (1..=total).collect::<Vec<_>>(), "acks are 1..=N");
    for i in 0..c.nodes.len() {
        let all = read_all(&c, i, "orders").await;
        assert_eq!(offsets(&all), (1..=total).collect::<Vec<_>>(), "node {i}");
        let mut last = HashMap::new();
        for m in &all {
            let data = m["data"].as_str().expect("data");
            let (p, n) = data.split_once('/').expect("p/n");
            let n: usize = n.parse().expect("n");
            if let Some(prev) = last.insert(p.to_owned(), n) {
                assert!(n > prev, "publisher {p}: {n} after {prev} on node {i}");
            }
        }
        assert_eq!(last.len(), PUBLISHERS);
    }
}

/// SPEC §2 live: subscribers on every node get every message published on any node, in
/// order, exactly once.
async fn live_subscribers_on_every_node_get_everything_in_order(backend: Backend) {
    const TOTAL: u64 = 150;
    let c = backend.cluster(NODES, &[]);
    let mut peers = Vec::new();
    for i in 0..c.nodes.len() {
        let (mut peer, _) = WsPeer::connect(&c.node(i).addr, API_KEY).await;
        peer.send(json!({"type":"subscribe","stream":"live","after":"now"}))
            .await;
        peer.expect("subscribed").await;
        peers.push(peer);
    }
    for n in 1..=TOTAL {
        publish(&c, n as usize, "live", &n.to_string(), None).await;
    }
    for (i, peer) in peers.iter_mut().enumerate() {
        let mut next = 1;
        while next <= TOTAL {
            let f = peer
                .next(Duration::from_secs(15))
                .await
                .unwrap_or_else(|e| panic!("node {i} subscriber at {next}: {e:?}"));
            match f["type"].as_str() {
                Some("message") => {
                    assert_eq!(f["offset"], next, "node {i}: {f}");
                    assert_eq!(f["data"], next.to_string(), "node {i}: {f}");
                    next += 1;
                }
                Some("ping") => peer.send(json!({"type":"pong"})).await,
                _ => panic!("node {i}: unexpected {f}"),
            }
        }
    }
}

/// SPEC §2: resume from a position, and the three resets — never a silent gap.
async fn resume_and_resets(backend: Backend) {
    let c = backend.cluster(NODES, &["--history-limit", "5"]);
    let mut epoch = String::new();
    for n in 1..=9 {
        epoch = publish(&c, n, "res", &n.to_string(), None).await["epoch"]
            .as_str()
            .expect("epoch")
            .to_owned();
    }
    for i in 0..c.nodes.len() {
        let node = c.node(i);
        let (_, body) = node.poll("res", &format!("after={epoch}:6")).await;
        assert_eq!(
            offsets(body["messages"].as_array().unwrap()),
            [7, 8, 9],
            "node {i}"
        );
        assert!(body["reset"].is_null());
        let reset = |body: &Value, reason: &str| {
            assert_eq!(body["reset"]["reason"], reason, "node {i}: {body}");
            assert_eq!(body["reset"]["position"], format!("{epoch}:9"), "node {i}");
            assert!(body["messages"].as_array().unwrap().is_empty());
        };
        let (_, body) = node.poll("res", &format!("after={epoch}:3")).await;
        reset(&body, "history_expired");
        let (_, body) = node.poll("res", "after=someOldEpoch:7").await;
        reset(&body, "epoch_changed");
        let (_, body) = node.poll("never-published", "after=gone:42").await;
        assert_eq!(
            body["reset"]["reason"], "unknown_stream",
            "node {i}: {body}"
        );
    }
}

/// SPEC §2: a retried publish with the same idempotency key appends once, whichever node the
/// retry reaches.
async fn idempotent_publish_across_nodes(backend: Backend) {
    let c = backend.cluster(NODES, &[]);
    let first = publish(&c, 0, "idem", "order 17", Some("order-17")).await;
    assert_eq!(first["duplicate"], false);
    for i in 1..=NODES {
        let again = publish(&c, i, "idem", "order 17", Some("order-17")).await;
        assert_eq!(again["duplicate"], true, "retry via node {i}: {again}");
        assert_eq!(again["offset"], first["offset"]);
        assert_eq!(again["epoch"], first["epoch"]);
    }
    let other = publish(&c, 1, "idem", "order 18", Some("order-18")).await;
    assert_eq!(other["offset"], 2);
    assert_eq!(offsets(&read_all(&c, 2, "idem").await), [1, 2]);
}

/// SPEC §3: a session resumes — on another node of a cluster — with its subscriptions, and
/// gets exactly what it missed.
async fn a_session_resumes_on_another_node(backend: Backend) {
    let c = backend.cluster(NODES, &[]);
    let (mut peer, connected) = WsPeer::connect(&c.node(0).addr, API_KEY).await;
    let session = connected["session"].as_str().expect("session").to_owned();
    peer.send(json!({"type":"subscribe","stream":"sess","after":"oldest"}))
        .await;
    peer.expect("subscribed").await;
    for n in 1..=3 {
        publish(&c, n, "sess", &n.to_string(), None).await;
    }
    let mut epoch = Value::Null;
    for n in 1..=3u64 {
        let m = peer.expect("message").await;
        assert_eq!(m["offset"], n);
        epoch = m["epoch"].clone();
    }
    drop(peer);
    for n in 4..=6 {
        publish(&c, n, "sess", &n.to_string(), None).await;
    }
    // The old node saves the session when it sees the disconnect; until that save lands a
    // resume elsewhere finds nothing (`resumed: false`), so wait for the old node to let go
    // of the connection, and try again for a while after that, as a client would reconnect.
    c.node(0).wait_for_no_ws_connection().await;
    let processed = format!("{}:3", epoch.as_str().expect("epoch"));
    let until = std::time::Instant::now() + Duration::from_secs(30);
    let (mut peer, connected) = loop {
        let mut peer = WsPeer::open(&c.node(1).addr, &[]).await.expect("upgrade");
        // As every client does: say what it processed (the old node may have written more to
        // the dying socket, and recorded that).
        peer.send(json!({"type":"connect","session":session,"positions":{"sess":processed}}))
            .await;
        let connected = peer.expect("connected").await;
        if connected["resumed"] == true || std::time::Instant::now() > until {
            break (peer, connected);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(connected["resumed"], true, "{connected}");
    assert_eq!(connected["subscriptions"][0]["stream"], "sess");
    for n in 4..=6u64 {
        let m = peer.expect("message").await;
        assert_eq!(m["offset"], n, "{m}");
        assert_eq!(m["data"], n.to_string());
    }
    publish(&c, 2, "sess", "7", None).await;
    assert_eq!(peer.expect("message").await["offset"], 7);
}

/// Runs each case on one engine, as its own test (so a broken engine names itself).
macro_rules! conformance {
    ($($backend:ident => $variant:expr),* $(,)?) => {$(
        mod $backend {
            use super::*;

            async fn on(case: impl AsyncFnOnce(Backend)) {
                if $variant.available() {
                    case($variant).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ordered_without_holes_from_concurrent_publishers() {
                on(super::ordered_without_holes_from_concurrent_publishers).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn live_subscribers_on_every_node_get_everything_in_order() {
                on(super::live_subscribers_on_every_node_get_everything_in_order).await;
            }

            #[tokio::test]
            async fn resume_and_resets() {
                on(super::resume_and_resets).await;
            }

            #[tokio::test]
            async fn idempotent_publish_across_nodes() {
                on(super::idempotent_publish_across_nodes).await;
            }

            #[tokio::test]
            async fn a_session_resumes_on_another_node() {
                on(super::a_session_resumes_on_another_node).await;
            }
        }
    )*};
}

conformance! {
    memory => Backend::Memory,
    disk => Backend::Disk,
    redis => Backend::Redis,
    nats => Backend::Nats,
}
