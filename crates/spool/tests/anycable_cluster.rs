//! `/cable` on a cluster (Redis and NATS engines, two nodes on one namespace), through the real
//! binary: an AnyCable session restores on another node with its subscriptions and catches up
//! from the client's position, once and in order; a whisper on one node reaches the
//! subscribers on the other (the transient note on the engines' notes channel), and is stored
//! nowhere. Skipped with a message when the shared Redis / NATS is unreachable, failed under CI.

mod common;

use std::time::Duration;

use common::{Server, WsPeer, engines::Backend};
use serde_json::{Value, json};
use spool_server::ws::actioncable::channel::sign;

const STREAMS_SECRET: &str = "test-streams-secret";
const EXT: &str = "actioncable-v1-ext-json";

fn flags() -> Vec<&'static str> {
    vec![
        "--anycable-streams-secret",
        STREAMS_SECRET,
        "--anycable-public-streams",
    ]
}

fn signed(stream: &str) -> String {
    json!({"channel": "$pubsub", "signed_stream_name": sign(stream, STREAMS_SECRET)}).to_string()
}

fn public(stream: &str) -> String {
    json!({"channel": "$pubsub", "stream_name": stream}).to_string()
}

/// Opens `/cable{query}` on `node` (extended protocol); returns the peer and its welcome.
async fn cable(node: &Server, query: &str) -> (WsPeer, Value) {
    let mut peer = WsPeer::open_url(
        &format!("ws://{}/cable{query}", node.addr),
        &[("sec-websocket-protocol", EXT)],
    )
    .await
    .expect("upgrade");
    let welcome = next(&mut peer).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (peer, welcome)
}

async fn next(peer: &mut WsPeer) -> Value {
    peer.next(Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("the connection ended: {e:?}"))
}

async fn subscribe(peer: &mut WsPeer, identifier: &str) {
    peer.send(json!({"command": "subscribe", "identifier": identifier}))
        .await;
    assert_eq!(
        next(peer).await,
        json!({"type": "confirm_subscription", "identifier": identifier})
    );
}

async fn a_session_restores_on_another_node(backend: Backend) {
    let c = backend.cluster(2, &flags());
    let id = signed("orders/9");
    let (mut peer, welcome) = cable(c.node(0), "").await;
    let sid = welcome["sid"].as_str().expect("a sid").to_owned();
    subscribe(&mut peer, &id).await;
    let epoch = c.node(1).publish("orders/9", r#"{"n":1}"#).await["epoch"].clone();
    let first = next(&mut peer).await;
    assert_eq!(first["offset"], 1, "{first}");
    drop(peer);
    c.node(0).wait_for_no_ws_connection().await;
    for n in 2..=5 {
        c.node(0)
            .publish("orders/9", &format!(r#"{{"n":{n}}}"#))
            .await;
    }
    // The balancer sends the client to node 1 now.
    let (mut peer, welcome) = cable(c.node(1), &format!("?sid={sid}")).await;
    assert_eq!(welcome["restored"], true, "{welcome}");
    assert_eq!(welcome["restored_ids"], json!([id]), "{welcome}");
    let history = json!({"streams": {"orders/9": {"epoch": epoch, "offset": 1}}});
    peer.send(json!({"command": "history", "identifier": id, "history": history}))
        .await;
    for n in 2..=5u64 {
        let frame = next(&mut peer).await;
        assert_eq!(frame["offset"], n, "{frame}");
        assert_eq!(frame["message"], json!({"n": n}), "{frame}");
        assert_eq!(frame["identifier"], id);
    }
    assert_eq!(
        next(&mut peer).await,
        json!({"type": "confirm_history", "identifier": id})
    );
    // And it follows live messages published on either node.
    c.node(0).publish("orders/9", r#"{"n":6}"#).await;
    assert_eq!(next(&mut peer).await["offset"], 6);
}

async fn whispers_cross_nodes(backend: Backend) {
    let c = backend.cluster(2, &flags());
    let id = public("typing/3");
    let (mut alice, _) = cable(c.node(0), "").await;
    let (mut bob, _) = cable(c.node(1), "").await;
    let (mut carol, _) = cable(c.node(0), "").await;
    subscribe(&mut alice, &id).await;
    subscribe(&mut bob, &id).await;
    subscribe(&mut carol, &id).await;
    for n in 0..3 {
        alice
            .send(json!({"command": "whisper", "identifier": id, "data": {"typing": n}}))
            .await;
        let expected = json!({"identifier": id, "message": {"typing": n}});
        assert_eq!(next(&mut bob).await, expected, "across nodes");
        assert_eq!(next(&mut carol).await, expected, "on the sender's node");
    }
    bob.send(json!({"command": "whisper", "identifier": id, "data": "from bob"}))
        .await;
    assert_eq!(next(&mut alice).await["message"], "from bob");
    assert_eq!(next(&mut carol).await["message"], "from bob");
    // Nothing was stored: the first durable message is offset 1, and it is the next frame
    // everyone gets (the senders got none of their own whispers, not even from the other node).
    let acked = c.node(1).publish("typing/3", r#"{"durable":true}"#).await;
    assert_eq!(acked["offset"], 1, "{acked}");
    for peer in [&mut alice, &mut bob, &mut carol] {
        let frame = next(peer).await;
        assert_eq!(frame["offset"], 1, "{frame}");
    }
}

macro_rules! cluster_tests {
    ($($backend:ident => $variant:expr),* $(,)?) => {$(
        mod $backend {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_session_restores_on_another_node() {
                if $variant.available() {
                    super::a_session_restores_on_another_node($variant).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn whispers_cross_nodes() {
                if $variant.available() {
                    super::whispers_cross_nodes($variant).await;
                }
            }
        }
    )*};
}

cluster_tests! {
    redis => super::Backend::Redis,
    nats => super::Backend::Nats,
}
