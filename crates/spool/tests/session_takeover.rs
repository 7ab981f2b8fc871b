//! A session taken over by a new connection is the new connection's: the connection that held
//! it before — lingering on, ending late, or on another node of a cluster that never heard of
//! the resume — must not overwrite the record its successor saved. A client that comes back a
//! third time gets what the second connection left (its subscriptions, its positions), never
//! the first connection's older state; and the first connection, once it tries to save, is
//! ended as taken over (`4007`).

mod common;

use std::time::{Duration, Instant};

use common::{API_KEY, Server, WsEnd, WsPeer, connect_with, engines::Backend};
use serde_json::{Value, json};

/// Reads frames until, for each `(stream, offset)` of `wanted`, a `message` of that stream at
/// that offset or later arrived.
async fn until_messages(peer: &mut WsPeer, wanted: &[(&str, u64)]) {
    let mut missing: Vec<(&str, u64)> = wanted.to_vec();
    while !missing.is_empty() {
        let f = peer
            .next(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("waiting for {missing:?}, the connection ended: {e:?}"));
        if f["type"] == "message" {
            let offset = f["offset"].as_u64().unwrap_or(0);
            missing.retain(|(stream, at)| !(f["stream"] == *stream && offset >= *at));
        }
    }
}

/// Reads frames until one of type `kind` arrives (deliveries and resets of the subscriptions
/// may come first).
async fn until_frame(peer: &mut WsPeer, kind: &str) -> Value {
    loop {
        let f = peer
            .next(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("waiting for {kind}, the connection ended: {e:?}"));
        if f["type"] == kind {
            return f;
        }
    }
}

/// Resumes `session` on `server`, retrying while the session is not saved yet (an answer of
/// `error` does not touch the session); the peer and its `connected`.
async fn resume(server: &Server, session: &str) -> (WsPeer, Value) {
    let started = Instant::now();
    loop {
        let (peer, answer) = connect_with(&server.addr, json!({"session": session})).await;
        if answer["type"] == "connected" {
            assert_eq!(answer["resumed"], true, "{answer}");
            return (peer, answer);
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the session was not saved 10 s after it was made: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stream → position (`EPOCH:OFFSET`) of the subscriptions a `connected` lists.
fn subscriptions(connected: &Value) -> Vec<(String, u64)> {
    let mut subs: Vec<(String, u64)> = connected["subscriptions"]
        .as_array()
        .unwrap_or_else(|| panic!("no subscriptions in {connected}"))
        .iter()
        .map(|s| {
            let position = s["position"].as_str().expect("a position");
            let offset = position.rsplit(':').next().and_then(|o| o.parse().ok());
            (
                s["stream"].as_str().expect("a stream").to_owned(),
                offset.expect("EPOCH:OFFSET"),
            )
        })
        .collect();
    subs.sort();
    subs
}

/// Reads the old connection until it ends; its close code, if the server sent one within
/// `within`.
async fn close_code(peer: &mut WsPeer, within: Duration) -> Option<u16> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match peer.next_text(left).await {
            None => return None,
            Some(Ok(_)) => continue,
            Some(Err(WsEnd::Closed(Some((code, _))))) => return Some(code),
            Some(Err(_)) => return Some(0),
        }
    }
}

async fn ws_connections(server: &Server) -> f64 {
    server
        .metric("spool_connections{transport=\"ws\"}")
        .await
        .unwrap_or(-1.0)
}

async fn until_no_ws_connection(server: &Server) {
    let started = Instant::now();
    while ws_connections(server).await != 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a WebSocket connection was still open 15 s after its client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The old connection (node 0) holds a session subscribed to `s:a` and `s:x`; a new one
/// (node 1: another node on a cluster engine, the same node otherwise) resumes it,
/// subscribes `s:b` and receives; messages reach the old connection too
/// (on another node it is still subscribed), so it has positions to save. The new connection
/// leaves; the old one ends after it. A third connection must get the new one's state.
async fn the_newest_holder_wins(backend: Backend) {
    if !backend.available() {
        return;
    }
    let cluster = backend.cluster(2, &[]);
    let (old_node, new_node) = (cluster.node(0), cluster.node(1));
    let name = backend.name();

    // (The new connection does not unsubscribe anything: on a cluster engine, an unsubscribe
    // then a subscribe on a connection that resumed on another node can stall its deliveries,
    // a separate bug seen with or without this fix.)
    old_node.publish("s:x", "x1").await;
    let (mut old, connected) = WsPeer::connect(&old_node.addr, API_KEY).await;
    let session = connected["session"].as_str().expect("session").to_owned();
    for (id, stream) in [(1, "s:a"), (2, "s:x")] {
        old.send(json!({"type":"subscribe","id":id,"stream":stream,"after":"oldest"}))
            .await;
        until_frame(&mut old, "subscribed").await;
    }
    for i in 1..=3 {
        old_node.publish("s:a", &format!("a{i}")).await;
    }
    until_messages(&mut old, &[("s:a", 3), ("s:x", 1)]).await;

    // Taken over: on a cluster the old connection is on another node and is not told.
    let (mut new, connected) = resume(new_node, &session).await;
    eprintln!("{name}: resumed with {:?}", subscriptions(&connected));
    new.send(json!({"type":"subscribe","id":4,"stream":"s:b","after":"oldest"}))
        .await;
    until_frame(&mut new, "subscribed").await;
    for i in 4..=6 {
        new_node.publish("s:a", &format!("a{i}")).await;
    }
    new_node.publish("s:b", "b1").await;
    until_messages(&mut new, &[("s:a", 6), ("s:b", 1)]).await;
    // The new connection leaves: its record is saved as it ends.
    drop(new);
    until_no_ws_connection(new_node).await;

    // The old connection received 4..6 too (where it is still subscribed): it has had every
    // chance to save. It ends now, after the new one.
    let code = close_code(&mut old, Duration::from_secs(3)).await;
    drop(old);
    until_no_ws_connection(old_node).await;

    let (_third, connected) = resume(new_node, &session).await;
    let got = subscriptions(&connected);
    eprintln!(
        "{name}: the old connection's close code {code:?}; the third connection resumed with {got:?}"
    );
    assert_eq!(
        got,
        [
            ("s:a".to_owned(), 6),
            ("s:b".to_owned(), 1),
            ("s:x".to_owned(), 1)
        ],
        "{name}: the third connection must get what the second left (s:b subscribed, s:a at \
         6), not the first connection's older record"
    );
    // The old connection learnt it was taken over: at once on the same node; on another node
    // when its save was refused.
    assert_eq!(
        code,
        Some(4007),
        "{name}: the connection taken over was not ended as taken over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_holder_wins_on_memory() {
    the_newest_holder_wins(Backend::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_holder_wins_on_disk() {
    the_newest_holder_wins(Backend::Disk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_holder_wins_across_redis_nodes() {
    the_newest_holder_wins(Backend::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_holder_wins_across_nats_nodes() {
    the_newest_holder_wins(Backend::Nats).await;
}
