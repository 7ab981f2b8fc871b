//! Several `spool serve` nodes sharing Redis or NATS JetStream (SPEC §6), under faults:
//!
//! - a node is SIGKILLed while publishes and deliveries run; its clients (behind a TCP proxy
//!   standing in for a load balancer) reconnect to another node and resume with no gap;
//! - the Redis / NATS server itself stops and comes back (a test-owned instance on a spare
//!   port): publishes fail fast with 503, readiness goes false, connected clients stay
//!   connected, and everything recovers; data the engine lost is a reset, never a silent gap.
//!
//! The same code runs on both engines. The shared servers' tests skip on a laptop without them
//! and fail under CI; the own-instance tests skip when the server binary is not installed.

mod common;

use std::time::{Duration, Instant};

use common::{
    API_KEY, Proxy, Server, WsPeer,
    engines::{Backend, Cluster, OwnServer},
    follow::{gather, subscribers},
    refuses_to_start,
};
use serde_json::{Value, json};

const STREAM: &str = "load";

/// Publishes messages `from..from+n` (payload = the offset it must land at, idempotency key
/// per message) through node `first` of `nodes`, moving on to the next node when one fails —
/// as a publisher behind a load balancer retries. Returns the batch's last offset.
async fn publish_with_failover(
    nodes: &[(String, reqwest::Client)],
    first: usize,
    from: u64,
    n: u64,
) {
    let batch: Vec<Value> = (from..from + n)
        .map(|i| json!({"stream": STREAM, "data": i.to_string(), "idempotency_key": format!("m{i}")}))
        .collect();
    let started = Instant::now();
    let mut attempt = first;
    loop {
        let (addr, http) = &nodes[attempt % nodes.len()];
        let answer = http
            .post(format!("http://{addr}/v1/publish"))
            .bearer_auth(API_KEY)
            .json(&json!({ "messages": batch }))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(r) = answer
            && r.status().is_success()
        {
            let body: Value = r.json().await.expect("publish json");
            let last = &body["results"][n as usize - 1];
            assert_eq!(last["offset"], from + n - 1, "{body}");
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no node took the batch at {from} within 30 s"
        );
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_node_killed_under_load_loses_no_message(backend: Backend) {
    const SUBSCRIBERS: usize = 12;
    const TOTAL: u64 = 3_000;
    const BATCH: u64 = 30;
    let started = Instant::now();
    let mut c = backend.cluster(3, &["--history-limit", "20000"]);
    let proxy = Proxy::start(&c.node(0).addr).await;
    let url = format!("ws://{}/v1/ws", proxy.addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let readers = subscribers(&url, STREAM, SUBSCRIBERS, TOTAL, deadline).await;
    let nodes: Vec<(String, reqwest::Client)> = c
        .nodes
        .iter()
        .map(|n| (n.addr.clone(), n.http.clone()))
        .collect();

    let mut next = 1;
    let mut round = 0;
    let mut killed = false;
    while next <= TOTAL {
        if !killed && next > TOTAL / 3 {
            killed = true;
            // Node 0 dies with every subscriber on it; the balancer sends them to node 1.
            c.nodes[0].kill();
            proxy.set_upstream(&c.node(1).addr);
            proxy.cut_all();
        }
        publish_with_failover(&nodes, round, next, BATCH).await;
        next += BATCH;
        round += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let (totals, failures) = gather(readers, TOTAL).await;
    eprintln!(
        "{}: {SUBSCRIBERS} subscribers × {TOTAL} messages across a node kill in {:?}; {} connects ({} resumed)",
        backend.name(),
        started.elapsed(),
        totals.connects,
        totals.resumed
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        totals.connects >= 2 * SUBSCRIBERS as u64,
        "every subscriber reconnected after the kill"
    );
}

async fn status_of(node: &Server, path: &str) -> Option<u16> {
    node.http
        .get(node.url(path))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Waits until every node's `/readyz` answers `want`.
async fn readiness(c: &Cluster, want: u16, within: Duration) {
    let until = Instant::now() + within;
    for node in &c.nodes {
        loop {
            if status_of(node, "/readyz").await == Some(want) {
                break;
            }
            assert!(
                Instant::now() < until,
                "readyz did not become {want} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn try_publish(node: &Server, data: &str) -> (u16, Value) {
    let r = node
        .http
        .post(node.url(&format!("/v1/streams/{STREAM}/messages")))
        .bearer_auth(API_KEY)
        .body(data.to_owned())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("publish request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Publishes `data` through `node` until the engine takes it (it may still be coming back).
async fn publish_when_back(node: &Server, data: &str) -> Value {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = try_publish(node, data).await;
        if status == 201 {
            return body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < until,
            "the engine did not come back: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The next frame (pings skipped), within 20 s.
async fn next_frame(peer: &mut WsPeer) -> Value {
    peer.next(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("the subscriber's connection ended: {e:?}"))
}

async fn the_engine_going_away_and_coming_back_is_survived(backend: Backend) {
    let Some(mut own) = OwnServer::start(backend) else {
        return;
    };
    let c = backend.cluster_at(&own.url(), 2, &["--engine-timeout", "1s"]);
    let (mut peer, _) = WsPeer::connect(&c.node(1).addr, API_KEY).await;
    peer.send(json!({"type":"subscribe","stream":STREAM,"after":"oldest"}))
        .await;
    assert_eq!(next_frame(&mut peer).await["type"], "subscribed");
    let mut epoch = Value::Null;
    for n in 1..=5 {
        let (status, body) = try_publish(c.node(0), &n.to_string()).await;
        assert_eq!(status, 201, "{body}");
        epoch = body["epoch"].clone();
    }
    for n in 1..=5u64 {
        let m = next_frame(&mut peer).await;
        assert_eq!(
            (m["type"].as_str(), m["offset"].as_u64()),
            (Some("message"), Some(n)),
            "{m}"
        );
    }

    // The engine goes away: readiness goes false, and once the node knows the engine is gone
    // publishes fail fast, say why, and store nothing. (A publish sent in the instant before
    // the node notices may time out and still be stored when the engine returns — its 503 says
    // so — which is why the outage is observed through readiness first.)
    own.kill();
    readiness(&c, 503, Duration::from_secs(10)).await;
    let started = Instant::now();
    let (status, body) = try_publish(c.node(0), "while down").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "engine_unavailable", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a publish during the outage took {:?}",
        started.elapsed()
    );
    // The subscriber is still connected: nothing arrives, the connection does not end.
    if let Ok(end) = tokio::time::timeout(
        Duration::from_millis(1500),
        peer.next(Duration::from_secs(60)),
    )
    .await
    {
        panic!("the subscriber should wait quietly through the outage, got {end:?}");
    }

    // It comes back.
    own.restart();
    readiness(&c, 200, Duration::from_secs(20)).await;
    let body = publish_when_back(c.node(0), "after").await;
    match backend {
        // Redis ran without persistence: everything is gone, so the stream has a new epoch and
        // the subscriber is told so before it gets the new history.
        Backend::Redis => {
            assert_ne!(body["epoch"], epoch, "{body}");
            assert_eq!(body["offset"], 1, "{body}");
            expect_reset_then(&mut peer, &body).await;
        }
        // JetStream kept its store: the same history continues.
        _ => {
            assert_eq!(body["epoch"], epoch, "{body}");
            assert_eq!(body["offset"], 6, "{body}");
            let m = next_frame(&mut peer).await;
            assert_eq!(
                (m["type"].as_str(), m["offset"].as_u64()),
                (Some("message"), Some(6)),
                "{m}"
            );

            // Now lose JetStream's data for real: the next publish starts a new epoch.
            own.kill();
            own.wipe();
            own.restart();
            readiness(&c, 200, Duration::from_secs(20)).await;
            let body = publish_when_back(c.node(0), "after the wipe").await;
            assert_ne!(body["epoch"], epoch, "{body}");
            expect_reset_then(&mut peer, &body).await;
        }
    }
}

/// The subscriber gets `reset` (the history it followed is gone) to a position of the new
/// epoch, then every message after that position up to the one `ack` names (none when the
/// reset's head already is that message: a reset hands over the head as it is when the
/// subscriber notices).
async fn expect_reset_then(peer: &mut WsPeer, ack: &Value) {
    let reset = next_frame(peer).await;
    assert_eq!(reset["type"], "reset", "{reset}");
    // `unknown_stream` when the subscriber noticed before anything was published again.
    assert!(
        reset["reason"] == "epoch_changed" || reset["reason"] == "unknown_stream",
        "{reset}"
    );
    let position = reset["position"].as_str().expect("reset position");
    let (epoch, offset) = position.rsplit_once(':').expect("EPOCH:OFFSET");
    let mut at: u64 = offset.parse().expect("offset");
    if epoch != ack["epoch"].as_str().expect("ack epoch") {
        // The subscriber's node noticed the loss before the publish and parked it at head 0
        // of its own placeholder (reads create no stream); the stream was then made by a
        // publish in another epoch, which the subscriber follows from its first message — no
        // history of the placeholder to lose, so no second reset.
        assert_eq!(
            (reset["reason"].as_str(), at),
            (Some("unknown_stream"), 0),
            "a reset to another epoch than the publish's must be to an empty placeholder: {reset}"
        );
    }
    let target = ack["offset"].as_u64().expect("ack offset");
    while at < target {
        let m = next_frame(peer).await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["epoch"], ack["epoch"], "{m}");
        assert_eq!(m["offset"], at + 1, "{m}");
        at += 1;
    }
}

macro_rules! cluster_tests {
    ($($backend:ident => $variant:expr),* $(,)?) => {$(
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_node_killed_under_load_loses_no_message() {
                if $variant.available() {
                    super::a_node_killed_under_load_loses_no_message($variant).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_engine_going_away_and_coming_back_is_survived() {
                super::the_engine_going_away_and_coming_back_is_survived($variant).await;
            }
        }
    )*};
}

cluster_tests! {
    redis => Backend::Redis,
    nats => Backend::Nats,
}

#[test]
fn an_unreachable_engine_at_startup_is_a_clear_error() {
    let port = common::free_port();
    refuses_to_start(
        &[
            "--engine",
            "redis",
            "--redis-url",
            &format!("redis://127.0.0.1:{port}"),
        ],
        &["cannot start the redis engine"],
    );
    refuses_to_start(
        &[
            "--engine",
            "nats",
            "--nats-url",
            &format!("nats://127.0.0.1:{port}"),
        ],
        &["cannot start the nats engine"],
    );
}

#[test]
fn fsync_on_a_redis_that_does_not_fsync_every_write_is_refused() {
    if !Backend::Redis.available() {
        return;
    }
    // The machine's Redis runs without `appendfsync always` (it keeps nothing on disk).
    let url = common::engines::redis_url();
    refuses_to_start(
        &[
            "--engine",
            "redis",
            "--redis-url",
            &url,
            "--durability",
            "fsync",
        ],
        &["appendfsync"],
    );
}
