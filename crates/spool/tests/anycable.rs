//! AnyCable compatibility on `/cable` against the real binary (docs/anycable.md): the
//! `actioncable-v1-ext-json` and `actioncable-v1-json` wire shapes, `$pubsub` signed and
//! public streams, history (`confirm_history` / `reject_history`), session restore (also
//! across a restart of the disk engine), `/_broadcast` as a normal Spool publish, JWT
//! identification, disconnect reasons, and malformed input.

mod common;

use std::time::Duration;

use common::{Server, WsEnd, WsPeer, now_secs};
use serde_json::{Value, json};
use spool_server::ws::actioncable::channel::sign;

const STREAMS_SECRET: &str = "test-streams-secret";
const SECRET: &str = "test-anycable-secret";
const EXT: &str = "actioncable-v1-ext-json";
const BASE: &str = "actioncable-v1-json";

fn flags() -> Vec<&'static str> {
    vec!["--anycable-streams-secret", STREAMS_SECRET]
}

fn identifier(stream: &str) -> String {
    json!({"channel": "$pubsub", "signed_stream_name": sign(stream, STREAMS_SECRET)}).to_string()
}

/// Opens `/cable{query}` speaking `protocol`.
async fn open(addr: &str, query: &str, protocol: &str, headers: &[(&str, &str)]) -> WsPeer {
    let mut all = vec![("sec-websocket-protocol", protocol)];
    all.extend_from_slice(headers);
    WsPeer::open_url(&format!("ws://{addr}/cable{query}"), &all)
        .await
        .expect("upgrade")
}

/// Opens `/cable` (extended protocol) and reads the welcome.
async fn cable(addr: &str, query: &str) -> (WsPeer, Value) {
    let mut peer = open(addr, query, EXT, &[]).await;
    let welcome = peer.expect("welcome").await;
    (peer, welcome)
}

/// The next frame that is not a ping (AnyCable data messages have no `type`).
async fn next(peer: &mut WsPeer) -> Value {
    peer.next(Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("the connection ended: {e:?}"))
}

async fn subscribe(peer: &mut WsPeer, identifier: &str, history: Option<Value>) -> Value {
    let mut command = json!({"command": "subscribe", "identifier": identifier});
    if let Some(history) = history {
        command["history"] = history;
    }
    peer.send(command).await;
    next(peer).await
}

async fn broadcast(server: &Server, key: &str, body: Value) -> (u16, Value) {
    let r = server
        .http
        .post(server.url("/_broadcast"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("broadcast");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn welcome_ping_and_signed_stream_broadcasts() {
    let server = Server::start(&flags());
    let (mut peer, welcome) = cable(&server.addr, "").await;
    let sid = welcome["sid"]
        .as_str()
        .expect("a sid in the extended welcome");
    assert!(sid.len() >= 22, "{welcome}");
    assert_eq!(welcome.get("restored"), None);

    let id = identifier("chat/42");
    let confirm = subscribe(&mut peer, &id, None).await;
    assert_eq!(
        confirm,
        json!({"type": "confirm_subscription", "identifier": id})
    );

    // A Spool publish reaches the AnyCable subscriber; JSON payloads are the message object.
    let acked = server.publish("chat/42", r#"{"text":"hello!"}"#).await;
    let message = next(&mut peer).await;
    assert_eq!(
        message,
        json!({
            "identifier": id, "message": {"text": "hello!"}, "stream_id": "chat/42",
            "epoch": acked["epoch"], "offset": 1,
        })
    );
    // Other payloads are JSON strings.
    server.publish("chat/42", "plain text").await;
    assert_eq!(next(&mut peer).await["message"], "plain text");

    // Pings every 3 s by default, `{"type":"ping","message":<unix seconds>}`. Two pings in
    // turn are at most 6 s apart even when the machine is loaded (spool.v1.json's default
    // interval is 25 s); the seconds are the server's clock, which is the test's.
    let mut pings = Vec::new();
    while pings.len() < 2 {
        let text = peer
            .next_text(Duration::from_secs(10))
            .await
            .expect("a ping within 10 s")
            .expect("open");
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "ping" {
            let at = frame["message"].as_i64().expect("unix seconds");
            assert!((at - now_secs()).abs() <= 5, "{frame}");
            pings.push(std::time::Instant::now());
        }
    }
    let apart = pings[1] - pings[0];
    assert!(apart <= Duration::from_secs(6), "pings {apart:?} apart");
}

#[tokio::test]
async fn the_base_protocol_has_no_session_nor_positions() {
    let server = Server::start(&flags());
    let mut peer = open(&server.addr, "?pi=1", BASE, &[]).await;
    assert_eq!(peer.expect("welcome").await, json!({"type": "welcome"}));
    let id = identifier("news");
    assert_eq!(
        subscribe(&mut peer, &id, None).await["type"],
        "confirm_subscription"
    );
    server.publish("news", r#"{"n":1}"#).await;
    assert_eq!(
        next(&mut peer).await,
        json!({"identifier": id, "message": {"n": 1}})
    );
    // `?pi=1`: a ping every second. Four pings come within 8 s even on a loaded machine; at
    // the default 3 s the fourth would take at least 9 s.
    let mut pings = 0;
    let started = std::time::Instant::now();
    while pings < 4 {
        let text = peer
            .next_text(Duration::from_secs(8))
            .await
            .expect("a frame within 8 s")
            .unwrap();
        if text.contains(r#""type":"ping""#) {
            pings += 1;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "4 pings took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn subscriptions_that_are_refused() {
    let server = Server::start(&flags());
    let (mut peer, _) = cable(&server.addr, "").await;
    let reject = |id: &str| json!({"type": "reject_subscription", "identifier": id});

    let forged =
        json!({"channel": "$pubsub", "signed_stream_name": sign("chat/42", "wrong")}).to_string();
    assert_eq!(subscribe(&mut peer, &forged, None).await, reject(&forged));
    let public = r#"{"channel":"$pubsub","stream_name":"open"}"#;
    assert_eq!(subscribe(&mut peer, public, None).await, reject(public));
    let rpc = r#"{"channel":"ChatChannel","id":42}"#;
    assert_eq!(subscribe(&mut peer, rpc, None).await, reject(rpc));
    assert_eq!(
        subscribe(&mut peer, "not json", None).await,
        reject("not json")
    );

    // With --anycable-public-streams, plain names are allowed.
    let server = Server::start(&["--anycable-public-streams"]);
    let (mut peer, _) = cable(&server.addr, "").await;
    assert_eq!(
        subscribe(&mut peer, public, None).await,
        json!({"type": "confirm_subscription", "identifier": public})
    );
}

#[tokio::test]
async fn history_replays_then_confirms_or_rejects() {
    let server = Server::start(&[
        "--anycable-streams-secret",
        STREAMS_SECRET,
        "--history-limit",
        "3",
    ]);
    let mut epoch = Value::Null;
    for n in 1..=5 {
        epoch = server.publish("h", &format!(r#"{{"n":{n}}}"#)).await["epoch"].clone();
    }
    let id = identifier("h");

    // From a position still retained: confirm first, then the messages, then confirm_history.
    let (mut peer, _) = cable(&server.addr, "").await;
    let history = json!({"streams": {"h": {"epoch": epoch, "offset": 3}}});
    assert_eq!(
        subscribe(&mut peer, &id, Some(history)).await["type"],
        "confirm_subscription"
    );
    assert_eq!(next(&mut peer).await["offset"], 4);
    assert_eq!(next(&mut peer).await["offset"], 5);
    assert_eq!(
        next(&mut peer).await,
        json!({"type": "confirm_history", "identifier": id})
    );
    server.publish("h", r#"{"n":6}"#).await;
    assert_eq!(next(&mut peer).await["offset"], 6);

    // Retention dropped offset 2: reject_history (Spool's reset), then live.
    let (mut peer, _) = cable(&server.addr, "").await;
    let history = json!({"streams": {"h": {"epoch": epoch, "offset": 1}}});
    assert_eq!(
        subscribe(&mut peer, &id, Some(history)).await["type"],
        "confirm_subscription"
    );
    assert_eq!(
        next(&mut peer).await,
        json!({"type": "reject_history", "identifier": id})
    );
    server.publish("h", r#"{"n":7}"#).await;
    assert_eq!(next(&mut peer).await["offset"], 7);

    // An epoch the stream never had: reject_history.
    let (mut peer, _) = cable(&server.addr, "").await;
    let history = json!({"streams": {"h": {"epoch": "nope", "offset": 6}}});
    assert_eq!(
        subscribe(&mut peer, &id, Some(history)).await["type"],
        "confirm_subscription"
    );
    assert_eq!(next(&mut peer).await["type"], "reject_history");

    // At the head already: confirm_history at once.
    let (mut peer, _) = cable(&server.addr, "").await;
    let history = json!({"streams": {"h": {"epoch": epoch, "offset": 7}}});
    assert_eq!(
        subscribe(&mut peer, &id, Some(history)).await["type"],
        "confirm_subscription"
    );
    assert_eq!(next(&mut peer).await["type"], "confirm_history");

    // `since` (Unix seconds): what was published since then, of what is retained.
    let (mut peer, _) = cable(&server.addr, "").await;
    let history = json!({"since": now_secs() - 60});
    assert_eq!(
        subscribe(&mut peer, &id, Some(history)).await["type"],
        "confirm_subscription"
    );
    for offset in 5..=7 {
        assert_eq!(next(&mut peer).await["offset"], offset);
    }
    assert_eq!(next(&mut peer).await["type"], "confirm_history");
    let (mut peer, _) = cable(&server.addr, "").await;
    let history = json!({"since": now_secs() + 60});
    assert_eq!(
        subscribe(&mut peer, &id, Some(history)).await["type"],
        "confirm_subscription"
    );
    assert_eq!(next(&mut peer).await["type"], "confirm_history");

    // The `history` command on a subscription.
    let history = json!({"streams": {"h": {"epoch": epoch, "offset": 6}}});
    peer.send(json!({"command": "history", "identifier": id, "history": history}))
        .await;
    assert_eq!(next(&mut peer).await["offset"], 7);
    assert_eq!(next(&mut peer).await["type"], "confirm_history");
    // ... and on none.
    let other = identifier("other");
    peer.send(json!({"command": "history", "identifier": other, "history": history}))
        .await;
    assert_eq!(
        next(&mut peer).await,
        json!({"type": "reject_history", "identifier": other})
    );
}

/// Restores `sid`: the welcome lists the subscription, and a history request from the
/// client's last offset replays what it missed, once, in order.
async fn restore_and_catch_up(
    addr: &str,
    sid: &str,
    id: &str,
    epoch: &Value,
    seen: u64,
    last: u64,
) -> String {
    let (mut peer, welcome) = cable(addr, &format!("?sid={sid}")).await;
    assert_eq!(welcome["restored"], true, "{welcome}");
    assert_eq!(welcome["restored_ids"], json!([id]), "{welcome}");
    let history = json!({"streams": {"r": {"epoch": epoch, "offset": seen}}});
    peer.send(json!({"command": "history", "identifier": id, "history": history}))
        .await;
    for offset in seen + 1..=last {
        let frame = next(&mut peer).await;
        assert_eq!(frame["offset"], offset, "{frame}");
        assert_eq!(frame["identifier"], id);
    }
    assert_eq!(next(&mut peer).await["type"], "confirm_history");
    welcome["sid"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn sessions_restore_with_their_subscriptions() {
    let server = Server::start(&flags());
    let id = identifier("r");
    let (mut peer, welcome) = cable(&server.addr, "").await;
    let sid = welcome["sid"].as_str().unwrap().to_owned();
    subscribe(&mut peer, &id, None).await;
    let epoch = server.publish("r", r#"{"n":1}"#).await["epoch"].clone();
    assert_eq!(next(&mut peer).await["offset"], 1);
    drop(peer);
    server.wait_for_no_ws_connection().await;
    for n in 2..=4 {
        server.publish("r", &format!(r#"{{"n":{n}}}"#)).await;
    }
    restore_and_catch_up(&server.addr, &sid, &id, &epoch, 1, 4).await;

    // The header wins over the query; an unknown sid is a plain welcome with a new session.
    let (_, fresh) = cable(&server.addr, &format!("?sid={sid}x")).await;
    assert_eq!(fresh.get("restored"), None);
    assert_ne!(fresh["sid"], json!(sid));
    let mut peer = open(
        &server.addr,
        "?sid=unknown",
        EXT,
        &[("x-anycable-restore-sid", &sid)],
    )
    .await;
    assert_eq!(peer.expect("welcome").await["restored"], true);
}

#[tokio::test]
async fn a_restart_of_the_disk_engine_keeps_sessions_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let mut server = Server::start_disk(&listen, dir.path(), &flags());
    let id = identifier("r");
    let (mut peer, welcome) = cable(&server.addr, "").await;
    let sid = welcome["sid"].as_str().unwrap().to_owned();
    subscribe(&mut peer, &id, None).await;
    let epoch = server.publish("r", r#"{"n":1}"#).await["epoch"].clone();
    assert_eq!(next(&mut peer).await["offset"], 1);
    server.publish("r", r#"{"n":2}"#).await;

    // A graceful shutdown says so, and the client may reconnect.
    let stop = tokio::task::spawn_blocking(move || {
        server.terminate();
        server
    });
    loop {
        match peer.next(Duration::from_secs(10)).await {
            Ok(frame) if frame["type"] == "disconnect" => {
                assert_eq!(
                    frame,
                    json!({"type": "disconnect", "reason": "server_restart", "reconnect": true})
                );
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("no disconnect before the close: {e:?}"),
        }
    }
    drop(stop.await.unwrap());
    let server = Server::start_disk(&listen, dir.path(), &flags());
    server.publish("r", r#"{"n":3}"#).await;
    restore_and_catch_up(&server.addr, &sid, &id, &epoch, 1, 3).await;
}

#[tokio::test]
async fn broadcasts_are_durable_spool_publishes() {
    let server = Server::start(&["--anycable-secret", SECRET]);
    let key = spool_server::ws::actioncable::config::hex_hmac_sha256(
        SECRET.as_bytes(),
        b"broadcast-cable",
    );
    let id = json!({"channel": "$pubsub", "signed_stream_name": sign("b", SECRET)}).to_string();
    let (mut peer, welcome) = cable(&server.addr, "").await;
    subscribe(&mut peer, &id, None).await;
    let (mut other, other_welcome) = cable(&server.addr, "").await;
    subscribe(&mut other, &id, None).await;

    let (status, _) = broadcast(&server, &key, json!({"stream": "b", "data": "{\"n\":1}"})).await;
    assert_eq!(status, 201);
    let frame = next(&mut peer).await;
    assert_eq!(
        (frame["message"].clone(), frame["offset"].clone()),
        (json!({"n": 1}), json!(1))
    );
    assert_eq!(next(&mut other).await["offset"], 1);

    // A batch, one excluding the first socket.
    let batch = json!([
        {"stream": "b", "data": "{\"n\":2}", "meta": {"exclude_socket": welcome["sid"]}},
        {"stream": "b", "data": "{\"n\":3}"},
    ]);
    assert_eq!(broadcast(&server, &key, batch).await.0, 201);
    assert_eq!(
        next(&mut peer).await["offset"],
        3,
        "the excluded message is skipped"
    );
    assert_eq!(next(&mut other).await["offset"], 2);
    assert_eq!(next(&mut other).await["offset"], 3);
    assert_ne!(welcome["sid"], other_welcome["sid"]);

    // Readable as any Spool message.
    let (status, body) = server.poll("b", "after=oldest").await;
    assert_eq!(status, 200);
    let data: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].as_str().unwrap())
        .collect();
    assert_eq!(data, [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#]);

    // Refusals.
    assert_eq!(
        broadcast(&server, "wrong", json!({"stream": "b", "data": "x"}))
            .await
            .0,
        401
    );
    for bad in [
        json!({"data": "x"}),
        json!("x"),
        json!([]),
        json!({"stream": "bad name", "data": "x"}),
    ] {
        let (status, body) = broadcast(&server, &key, bad.clone()).await;
        assert_eq!(status, 422, "{bad}");
        assert!(
            body["error"]["message"].is_string() || body["message"].is_string(),
            "{body}"
        );
    }
}

#[tokio::test]
async fn jwt_identification() {
    let server = Server::start(&["--anycable-secret", SECRET, "--anycable-enforce-jwt"]);
    let token = |exp: i64| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &json!({"ext": "{\"user_id\":42}", "exp": exp}),
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let disconnect =
        |reason: &str| json!({"type": "disconnect", "reason": reason, "reconnect": false});

    // No token, a bad one, an expired one.
    let mut peer = open(&server.addr, "", EXT, &[]).await;
    assert_eq!(next(&mut peer).await, disconnect("unauthorized"));
    assert!(matches!(
        peer.next(Duration::from_secs(5)).await,
        Err(WsEnd::Closed(_))
    ));
    let mut peer = open(&server.addr, "?jid=garbage", EXT, &[]).await;
    assert_eq!(next(&mut peer).await, disconnect("unauthorized"));
    let mut peer = open(
        &server.addr,
        &format!("?jid={}", token(now_secs() - 10)),
        EXT,
        &[],
    )
    .await;
    assert_eq!(next(&mut peer).await, disconnect("token_expired"));

    // Query, header and subprotocol; expiry while connected.
    let good = token(now_secs() + 3600);
    let (_, w) = cable(&server.addr, &format!("?jid={good}")).await;
    assert!(w["sid"].is_string());
    let mut peer = open(&server.addr, "", EXT, &[("x-jid", &good)]).await;
    assert_eq!(peer.expect("welcome").await["type"], "welcome");
    let protocols = format!("{EXT}, anycable-token.{good}");
    let mut peer = open(&server.addr, "", &protocols, &[]).await;
    assert_eq!(peer.expect("welcome").await["type"], "welcome");

    // AnyCable identities allow no clock-skew leeway: the token must still be valid when the
    // welcome is sent, with room for a loaded machine (+2 s left as little as 1 s).
    let soon = token(now_secs() + 4);
    let (mut peer, _) = cable(&server.addr, &format!("?jid={soon}")).await;
    assert_eq!(next(&mut peer).await, disconnect("token_expired"));
}

#[tokio::test]
async fn malformed_commands_never_affect_other_connections() {
    let server = Server::start(&flags());
    let id = identifier("m");
    let (mut bystander, _) = cable(&server.addr, "").await;
    subscribe(&mut bystander, &id, None).await;

    let (mut peer, _) = cable(&server.addr, "").await;
    subscribe(&mut peer, &id, None).await;
    peer.send_text("{not json").await;
    peer.send(json!({"command": "dance", "identifier": id}))
        .await;
    peer.send(json!({"command": "subscribe"})).await;
    peer.send(json!({"identifier": id})).await;
    peer.send(json!({"command": "message", "identifier": id, "data": "{\"action\":\"x\"}"}))
        .await;
    peer.send(json!({"command": "unsubscribe", "identifier": "{}"}))
        .await;
    // The connection works on.
    server.publish("m", r#"{"n":1}"#).await;
    assert_eq!(next(&mut peer).await["offset"], 1);
    peer.send(json!({"command": "unsubscribe", "identifier": id}))
        .await;
    peer.send(json!({"command": "ping"})).await;
    assert_eq!(next(&mut peer).await, json!({"type": "pong"}));

    // A frame over the server's bound (2 × --max-payload + 64 KiB): closed cleanly (1009).
    let (mut big, _) = cable(&server.addr, "").await;
    let huge = format!(
        r#"{{"command":"subscribe","identifier":"{}"}}"#,
        "x".repeat(3 * 1024 * 1024)
    );
    use futures::SinkExt;
    let _ = big
        .socket
        .send(tokio_tungstenite::tungstenite::Message::text(huge))
        .await;
    match big.next(Duration::from_secs(10)).await {
        Err(WsEnd::Closed(Some((code, _)))) => assert_eq!(code, 1009),
        other => assert!(other.is_err(), "{other:?}"),
    }
    // A 1 MiB frame (within the bound) with a 1 MiB identifier: refused, the connection lives.
    let (mut mib, _) = cable(&server.addr, "").await;
    let long = "x".repeat(1024 * 1024);
    assert_eq!(
        subscribe(&mut mib, &long, None).await["type"],
        "reject_subscription"
    );

    server.publish("m", r#"{"n":2}"#).await;
    assert_eq!(next(&mut bystander).await["offset"], 1);
    assert_eq!(next(&mut bystander).await["offset"], 2);
}
