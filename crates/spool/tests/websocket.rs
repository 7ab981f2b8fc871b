//! The WebSocket protocol `spool.v1.json` against the real binary: the frames, sessions,
//! authentication failures, malformed input, heartbeats and shutdown.

mod common;

use std::time::Duration;

use common::{API_KEY, Server, WsEnd, WsPeer, jwt, now_secs};
use serde_json::{Value, json};

/// Reads frames until `n` message frames arrived; returns them and every other frame seen.
async fn messages(peer: &mut WsPeer, n: usize) -> (Vec<Value>, Vec<Value>) {
    let mut got = Vec::new();
    let mut other = Vec::new();
    while got.len() < n {
        let f = peer.next(Duration::from_secs(10)).await.expect("frame");
        if f["type"] == "message" {
            got.push(f);
        } else {
            other.push(f);
        }
    }
    (got, other)
}

fn offsets(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["offset"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn subscribe_publish_ack_and_deliver() {
    let server = Server::start(&[]);
    let (mut peer, connected) = WsPeer::connect(&server.addr, API_KEY).await;
    assert_eq!(connected["resumed"], false);
    assert_eq!(connected["session"].as_str().unwrap().len(), 32);
    assert!(connected["ping_interval_ms"].as_u64().unwrap() > 0);

    server.publish("chat", "before").await;
    peer.send(json!({"type":"subscribe","id":1,"stream":"chat","after":"oldest"}))
        .await;
    let sub = peer.expect("subscribed").await;
    assert_eq!(sub["id"], 1);
    assert!(sub["position"].as_str().unwrap().ends_with(":0"));
    let first = peer.expect("message").await;
    assert_eq!(
        (first["offset"].as_u64(), first["data"].as_str()),
        (Some(1), Some("before"))
    );

    for i in 0..3 {
        peer.send(json!({"type":"publish","id":10+i,"stream":"chat","data":format!("m{i}")}))
            .await;
    }
    let (got, other) = messages(&mut peer, 3).await;
    assert_eq!(offsets(&got), [2, 3, 4]);
    let mut acks: Vec<Value> = other.into_iter().filter(|f| f["type"] == "ack").collect();
    while acks.len() < 3 {
        acks.push(peer.expect("ack").await);
    }
    let acked: Vec<(u64, u64)> = acks
        .iter()
        .map(|a| (a["id"].as_u64().unwrap(), a["offset"].as_u64().unwrap()))
        .collect();
    assert_eq!(acked, [(10, 2), (11, 3), (12, 4)]);

    // "latest" gives the newest message, then live.
    peer.send(json!({"type":"subscribe","id":2,"stream":"chat2","after":"now"}))
        .await;
    peer.expect("subscribed").await;
    peer.send(json!({"type":"unsubscribe","id":3,"stream":"chat"}))
        .await;
    assert_eq!(peer.expect("unsubscribed").await["id"], 3);
    let (mut late, _) = WsPeer::connect(&server.addr, API_KEY).await;
    late.send(json!({"type":"subscribe","stream":"chat","after":"latest"}))
        .await;
    late.expect("subscribed").await;
    assert_eq!(late.expect("message").await["offset"], 4);
}

#[tokio::test]
async fn idempotent_publish_over_websocket() {
    let server = Server::start(&[]);
    let (mut peer, _) = WsPeer::connect(&server.addr, API_KEY).await;
    for id in [1, 2] {
        peer.send(json!({"type":"publish","id":id,"stream":"s","data":"x","idempotency_key":"k1"}))
            .await;
    }
    let a = peer.expect("ack").await;
    let b = peer.expect("ack").await;
    assert_eq!(
        (a["offset"].as_u64(), a["duplicate"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(
        (b["offset"].as_u64(), b["duplicate"].as_bool()),
        (Some(1), Some(true))
    );
}

#[tokio::test]
async fn a_session_resumes_with_its_subscriptions_and_positions() {
    let server = Server::start(&[]);
    let token = jwt(json!({"sub":"alice","exp":now_secs()+600,"subscribe":["chat:*"]}));
    let (mut peer, connected) = WsPeer::connect(&server.addr, &token).await;
    let session = connected["session"].as_str().unwrap().to_owned();
    peer.send(json!({"type":"subscribe","stream":"chat:1","after":"oldest"}))
        .await;
    peer.expect("subscribed").await;
    for i in 1..=3 {
        server.publish("chat:1", &format!("m{i}")).await;
    }
    let (got, _) = messages(&mut peer, 3).await;
    assert_eq!(offsets(&got), [1, 2, 3]);
    drop(peer);
    // The session's position is the last message written to the old socket: let the server
    // see the connection end before publishing, or on a loaded machine it may still write
    // 4 and 5 into the dead socket (and rightly resume after them).
    server.wait_for_no_ws_connection().await;
    // Published while the client is away.
    for i in 4..=5 {
        server.publish("chat:1", &format!("m{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Only the session id: no token, no subscribe.
    let mut peer = WsPeer::open(&server.addr, &[]).await.unwrap();
    peer.send(json!({"type":"connect","session":session})).await;
    let connected = peer.expect("connected").await;
    assert_eq!(connected["resumed"], true, "{connected}");
    assert_eq!(connected["subject"], "alice");
    assert_eq!(connected["subscriptions"][0]["stream"], "chat:1");
    let (got, _) = messages(&mut peer, 2).await;
    assert_eq!(offsets(&got), [4, 5]);

    // The client's own positions win: it processed only up to 2.
    drop(peer);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut peer = WsPeer::open(&server.addr, &[]).await.unwrap();
    let epoch = got[0]["epoch"].as_str().unwrap();
    peer.send(
        json!({"type":"connect","session":session,"positions":{"chat:1":format!("{epoch}:2")}}),
    )
    .await;
    peer.expect("connected").await;
    let (got, _) = messages(&mut peer, 3).await;
    assert_eq!(offsets(&got), [3, 4, 5]);
}

#[tokio::test]
async fn a_second_connection_takes_the_session_over() {
    let server = Server::start(&[]);
    let (mut first, connected) = WsPeer::connect(&server.addr, API_KEY).await;
    let session = connected["session"].as_str().unwrap();
    let mut second = WsPeer::open(&server.addr, &[]).await.unwrap();
    second
        .send(json!({"type":"connect","session":session}))
        .await;
    assert_eq!(second.expect("connected").await["resumed"], true);
    assert_eq!(first.closed().await.0, 4007);
}

#[tokio::test]
async fn malformed_frames_get_errors_and_harm_no_one() {
    let server = Server::start(&[]);
    let (mut bystander, _) = WsPeer::connect(&server.addr, API_KEY).await;
    bystander
        .send(json!({"type":"subscribe","stream":"s","after":"oldest"}))
        .await;
    bystander.expect("subscribed").await;

    let (mut peer, _) = WsPeer::connect(&server.addr, API_KEY).await;
    for bad in [
        "not json",
        "{}",
        r#"{"type":"subscribe"}"#,
        r#"{"type":"subscribe","stream":"s","form":"oldest"}"#,
        r#"{"type":"launch"}"#,
        "[1,2,3]",
        "\u{0}",
    ] {
        peer.send_text(bad).await;
        let e = peer.expect("error").await;
        assert_eq!(e["code"], "bad_frame", "{bad}: {e}");
    }
    for (frame, code) in [
        (
            json!({"type":"subscribe","id":1,"stream":"bad name"}),
            "invalid_stream_name",
        ),
        (
            json!({"type":"subscribe","id":1,"stream":"s","after":"nope"}),
            "invalid_position",
        ),
        (
            json!({"type":"publish","id":1,"stream":"s"}),
            "invalid_body",
        ),
        (
            json!({"type":"publish","id":1,"stream":"s","data":"x","data_base64":"eA=="}),
            "invalid_body",
        ),
        (
            json!({"type":"publish","id":1,"stream":"s","data_base64":"%%%"}),
            "invalid_body",
        ),
        (json!({"type":"connect","token":API_KEY}), "not_connected"),
    ] {
        peer.send(frame.clone()).await;
        let e = peer.expect("error").await;
        assert_eq!(e["code"], code, "{frame}: {e}");
    }
    // Still usable.
    peer.send(json!({"type":"ping"})).await;
    peer.expect("pong").await;
    server.publish("s", "hello").await;
    assert_eq!(bystander.expect("message").await["data"], "hello");

    // A binary frame closes with 1003; a flood of bad frames with 4008.
    use futures::SinkExt;
    peer.socket
        .send(tokio_tungstenite::tungstenite::Message::binary(vec![
            1u8, 2, 3,
        ]))
        .await
        .unwrap();
    assert_eq!(peer.closed().await.0, 1003);
    let (mut flood, _) = WsPeer::connect(&server.addr, API_KEY).await;
    for _ in 0..64 {
        flood.send_text("garbage").await;
    }
    assert_eq!(flood.closed().await.0, 4008);
    server.publish("s", "still here").await;
    assert_eq!(bystander.expect("message").await["data"], "still here");
}

#[tokio::test]
async fn frames_before_connect_and_connect_timeout() {
    let server = Server::start(&["--ws-ping-interval", "1s", "--ws-ping-timeout", "1s"]);
    let mut peer = WsPeer::open(&server.addr, &[]).await.unwrap();
    peer.send(json!({"type":"subscribe","stream":"s"})).await;
    assert_eq!(peer.expect("error").await["code"], "not_connected");
    let (code, _) = peer.closed().await;
    assert!(code == 4004 || code == 4005, "closed with {code}");
}

#[tokio::test]
async fn shutdown_says_reconnect_and_closes_going_away() {
    let mut server = Server::start(&[]);
    let (mut peer, _) = WsPeer::connect(&server.addr, API_KEY).await;
    peer.send(json!({"type":"subscribe","stream":"s"})).await;
    peer.expect("subscribed").await;
    let reader = tokio::spawn(async move {
        let reconnect = peer.expect("reconnect").await;
        assert_eq!(reconnect["reason"], "server_shutdown");
        peer.closed().await.0
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.terminate().success());
    assert_eq!(reader.await.unwrap(), 1001);
}

#[tokio::test]
async fn unreachable_end_of_stream_is_reported_plainly() {
    let server = Server::start(&[]);
    let (mut peer, _) = WsPeer::connect(&server.addr, API_KEY).await;
    // A position in an epoch the stream never had: reset, then live.
    peer.send(json!({"type":"subscribe","stream":"r","after":"zzzzzzzzzz:5"}))
        .await;
    peer.expect("subscribed").await;
    let reset = peer.expect("reset").await;
    assert_eq!(reset["stream"], "r");
    assert!(["unknown_stream", "epoch_changed"].contains(&reset["reason"].as_str().unwrap()));
    server.publish("r", "x").await;
    assert_eq!(peer.expect("message").await["offset"], 1);
    let _ = WsEnd::Closed(None);
}
