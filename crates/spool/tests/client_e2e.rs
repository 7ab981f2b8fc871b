//! Spool's Rust client (`spool-client`) against the real server: `spool serve` (the memory
//! engine) started by the test kit, reached through its fault proxy, which the tests cut,
//! freeze or deafen to make the client reconnect.

mod common;

use std::time::Duration;

use common::{API_KEY, Proxy, Server};
use spool_client::{Client, Config, Error, ErrorCode, Event, Message, Outgoing, Start};

const WAIT: Duration = Duration::from_secs(10);

/// The WebSocket endpoint of a server or proxy at `addr`.
fn ws_url(addr: &str) -> String {
    format!("ws://{addr}/v1/ws")
}

fn config(url: String) -> Config {
    Config::new(url)
        .token(API_KEY)
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
}

async fn next_event(client: &Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("timed out waiting for an event")
        .expect("the client closed")
}

/// The next `n` messages, skipping other events; fails on a reset or a terminal error.
async fn messages(client: &Client, n: usize) -> Vec<Message> {
    let mut out = Vec::new();
    while out.len() < n {
        match next_event(client).await {
            Event::Message(m) => out.push(m),
            Event::Reset { .. } => panic!("unexpected reset"),
            Event::Error {
                error,
                terminal: true,
            } => panic!("terminal error: {error}"),
            _ => {}
        }
    }
    out
}

/// Waits for an event matching `pred`, skipping others.
async fn until(client: &Client, pred: impl Fn(&Event) -> bool) -> Event {
    loop {
        let event = next_event(client).await;
        if let Event::Error {
            error,
            terminal: true,
        } = &event
        {
            panic!("terminal error: {error}");
        }
        if pred(&event) {
            return event;
        }
    }
}

fn texts(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m.text().expect("utf-8").to_owned())
        .collect()
}

fn offsets(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.position.offset.get()).collect()
}

async fn publish_all(client: &Client, stream: &str, texts: &[&str]) {
    for t in texts {
        client.publish(stream, Outgoing::text(*t)).await.unwrap();
    }
}

#[tokio::test]
async fn subscribe_publish_receive() {
    let server = Server::start(&[]);
    let client = Client::connect(config(ws_url(&server.addr))).await.unwrap();
    let Event::Connected { resumed, .. } = next_event(&client).await else {
        panic!("the first event is Connected");
    };
    assert!(!resumed);

    let sub = client.subscribe("chat:1", Start::Now).await.unwrap();
    assert_eq!(sub.stream, "chat:1");
    assert_eq!(sub.position, sub.head);

    let ack = client
        .publish(
            "chat:1",
            Outgoing::text("hi")
                .key("k")
                .header("h", "v")
                .content_type("text/plain"),
        )
        .await
        .unwrap();
    assert_eq!(ack.position.offset.get(), 1);
    assert!(!ack.duplicate);
    let binary = client
        .publish("chat:1", Outgoing::bytes(vec![0u8, 159, 255]))
        .await
        .unwrap();
    assert_eq!(binary.position.offset.get(), 2);

    let got = messages(&client, 2).await;
    assert_eq!(got[0].text(), Some("hi"));
    assert_eq!(got[0].position, ack.position);
    assert_eq!(got[0].key.as_deref(), Some("k"));
    assert_eq!(got[0].headers.get("h").map(String::as_str), Some("v"));
    assert_eq!(got[1].payload.as_ref(), &[0u8, 159, 255]);

    // A retry with the same idempotency key appends nothing.
    let first = client
        .publish("chat:1", Outgoing::text("once").idempotency_key("k-1"))
        .await
        .unwrap();
    let again = client
        .publish("chat:1", Outgoing::text("once").idempotency_key("k-1"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.position, first.position);

    // Publishes pipeline: many in flight at once, acked in order of offsets.
    let acks = futures::future::join_all(
        (0..20).map(|i| client.publish("chat:2", Outgoing::text(format!("m{i}")))),
    )
    .await;
    let mut acked: Vec<u64> = acks
        .into_iter()
        .map(|a| a.unwrap().position.offset.get())
        .collect();
    acked.sort();
    assert_eq!(acked, (1..=20).collect::<Vec<_>>());

    // Oldest replays the history of a stream.
    let replay = client.subscribe("chat:2", Start::Oldest).await.unwrap();
    assert_eq!(replay.head.offset.get(), 20);
    let got = until(
        &client,
        |e| matches!(e, Event::Message(m) if m.stream == "chat:2"),
    )
    .await;
    let Event::Message(first) = got else {
        unreachable!()
    };
    assert_eq!(first.position.offset.get(), 1);

    // Errors come back per request.
    let err = client.subscribe("chat:2", Start::Now).await.unwrap_err();
    assert!(matches!(err, Error::AlreadySubscribed(_)), "{err}");
    let err = client.subscribe("bad name", Start::Now).await.unwrap_err();
    assert!(matches!(err, Error::InvalidStreamName(_)), "{err}");

    client.close().await;
    let err = client.publish("chat:1", Outgoing::text("late")).await;
    assert_eq!(err.unwrap_err(), Error::ClientClosed);
}

#[tokio::test]
async fn bad_credentials_fail_the_connect() {
    let server = Server::start(&[]);
    let err = Client::connect(Config::new(ws_url(&server.addr)).token("wrong"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Some(ErrorCode::InvalidToken | ErrorCode::Unauthorized)
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_cut_connection_resumes_its_session_without_gaps_or_duplicates() {
    let server = Server::start(&[]);
    let proxy = Proxy::start(&server.addr).await;
    let publisher = Client::connect(config(ws_url(&server.addr))).await.unwrap();
    let client = Client::connect(config(ws_url(&proxy.addr))).await.unwrap();
    let Event::Connected { session, .. } = next_event(&client).await else {
        panic!("the first event is Connected");
    };
    client.subscribe("room", Start::Now).await.unwrap();
    publish_all(&publisher, "room", &["a", "b"]).await;
    assert_eq!(texts(&messages(&client, 2).await), ["a", "b"]);

    proxy.refuse(true);
    proxy.cut_all();
    until(&client, |e| matches!(e, Event::Disconnected { .. })).await;
    // Published while the client is away.
    publish_all(&publisher, "room", &["c", "d"]).await;
    proxy.refuse(false);

    let Event::Connected {
        session: again,
        resumed,
    } = until(&client, |e| matches!(e, Event::Connected { .. })).await
    else {
        unreachable!()
    };
    assert!(resumed, "the session is restored");
    assert_eq!(again, session);
    publish_all(&publisher, "room", &["e"]).await;
    let got = messages(&client, 3).await;
    assert_eq!(texts(&got), ["c", "d", "e"]);
    assert_eq!(offsets(&got), [3, 4, 5]);

    client.close().await;
    publisher.close().await;
}

#[tokio::test]
async fn an_expired_session_is_replaced_and_every_subscription_resumed_by_the_client() {
    // With a token, the server starts a new session itself (`resumed: false`).
    expired_session(&[], config).await;
}

#[tokio::test]
async fn an_expired_session_without_credentials_falls_back_to_a_fresh_connect() {
    // Without one, it answers `session_not_restored` and the client connects afresh.
    expired_session(&["--allow-anonymous"], |url| {
        Config::new(url).backoff(Duration::from_millis(20), Duration::from_millis(200))
    })
    .await;
}

async fn expired_session(extra: &[&str], config_for: impl Fn(String) -> Config) {
    let server = Server::start(&[&["--session-ttl", "1s"], extra].concat());
    let proxy = Proxy::start(&server.addr).await;
    let publisher = Client::connect(config(ws_url(&server.addr))).await.unwrap();
    let client = Client::connect(config_for(ws_url(&proxy.addr)))
        .await
        .unwrap();
    let Event::Connected { session, .. } = next_event(&client).await else {
        panic!("the first event is Connected");
    };
    client.subscribe("s1", Start::Now).await.unwrap();
    client.subscribe("s2", Start::Oldest).await.unwrap();
    publish_all(&publisher, "s1", &["1a"]).await;
    publish_all(&publisher, "s2", &["2a"]).await;
    let got = messages(&client, 2).await;
    assert_eq!(got.len(), 2);

    proxy.refuse(true);
    proxy.cut_all();
    until(&client, |e| matches!(e, Event::Disconnected { .. })).await;
    // The session's TTL runs from when the server let go of the connection (the publisher's
    // is the one left), which on a loaded machine may come a while after the cut.
    let deadline = std::time::Instant::now() + WAIT;
    while server.metric(r#"spool_connections{transport="ws"}"#).await != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the server still holds the cut connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publish_all(&publisher, "s1", &["1b"]).await;
    publish_all(&publisher, "s2", &["2b"]).await;
    // Well past the session TTL (and the server's once-a-second session save).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    proxy.refuse(false);

    let Event::Connected {
        session: fresh,
        resumed,
    } = until(&client, |e| matches!(e, Event::Connected { .. })).await
    else {
        unreachable!()
    };
    assert!(!resumed, "the session expired");
    assert_ne!(fresh, session);
    let mut got = texts(&messages(&client, 2).await);
    got.sort();
    assert_eq!(
        got,
        ["1b", "2b"],
        "each stream continues after what was processed"
    );

    client.close().await;
    publisher.close().await;
}

#[tokio::test]
async fn a_silent_server_is_detected_and_left() {
    let server = Server::start(&["--ws-ping-interval", "300ms"]);
    let proxy = Proxy::start(&server.addr).await;
    let publisher = Client::connect(config(ws_url(&server.addr))).await.unwrap();
    let client = Client::connect(config(ws_url(&proxy.addr))).await.unwrap();
    next_event(&client).await;
    client.subscribe("quiet", Start::Now).await.unwrap();

    proxy.freeze();
    publish_all(&publisher, "quiet", &["x"]).await;
    let Event::Disconnected { reason } =
        until(&client, |e| matches!(e, Event::Disconnected { .. })).await
    else {
        unreachable!()
    };
    assert!(reason.contains("nothing heard"), "{reason}");
    let got = messages(&client, 1).await;
    assert_eq!(texts(&got), ["x"]);

    client.close().await;
    publisher.close().await;
}

#[tokio::test]
async fn publishes_cut_off_by_a_disconnect_are_sent_again_after_the_reconnect() {
    let server = Server::start(&[]);
    let proxy = Proxy::start(&server.addr).await;
    let client = Client::connect(config(ws_url(&proxy.addr))).await.unwrap();
    next_event(&client).await;
    client.subscribe("orders", Start::Now).await.unwrap();

    // Freeze the connection so the publishes get no ack, then cut it.
    proxy.freeze();
    let pending = {
        let client = client.clone();
        tokio::spawn(async move {
            futures::future::join_all(
                (0..5).map(|i| client.publish("orders", Outgoing::text(format!("o{i}")))),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut_all();

    let acks = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
    let mut acked: Vec<u64> = acks
        .into_iter()
        .map(|a| a.unwrap().position.offset.get())
        .collect();
    acked.sort();
    assert_eq!(acked, [1, 2, 3, 4, 5], "each publish appended exactly once");
    let got = messages(&client, 5).await;
    assert_eq!(offsets(&got), [1, 2, 3, 4, 5]);

    client.close().await;
}

#[tokio::test]
async fn a_refresh_is_answered_and_the_session_resumes_after_it() {
    let server = Server::start(&["--api-key", "second-key"]);
    let proxy = Proxy::start(&server.addr).await;
    let client = Client::connect(config(ws_url(&proxy.addr))).await.unwrap();
    next_event(&client).await;
    let err = client.refresh("wrong").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidToken), "{err}");
    client.refresh("second-key").await.unwrap();
    proxy.cut_all();
    let Event::Connected { resumed, .. } =
        until(&client, |e| matches!(e, Event::Connected { .. })).await
    else {
        unreachable!()
    };
    assert!(resumed);
    client.close().await;
}

#[tokio::test]
async fn publishes_whose_acks_were_lost_are_retried_without_duplicates() {
    let server = Server::start(&[]);
    let proxy = Proxy::start(&server.addr).await;
    let client = Client::connect(config(ws_url(&proxy.addr))).await.unwrap();
    next_event(&client).await;
    client.subscribe("payments", Start::Now).await.unwrap();

    // The server appends these, but its acks (and deliveries) never arrive.
    proxy.deafen();
    let pending = {
        let client = client.clone();
        tokio::spawn(async move {
            futures::future::join_all(
                (0..5).map(|i| client.publish("payments", Outgoing::text(format!("p{i}")))),
            )
            .await
        })
    };
    // Cut only once the server has appended all five (a cut before would leave some to be
    // appended first by the retry, not found as duplicates by it).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (status, body) = server.poll("payments", "after=oldest").await;
        assert_eq!(status, 200, "{body}");
        if body["messages"].as_array().map_or(0, Vec::len) == 5 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not append the five publishes: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.cut_all();

    let acks = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
    let mut acked = Vec::new();
    for ack in acks {
        let ack = ack.unwrap();
        assert!(ack.duplicate, "the retry found the original append");
        acked.push(ack.position.offset.get());
    }
    acked.sort();
    assert_eq!(acked, [1, 2, 3, 4, 5]);
    // Every message once, including those delivered while the client could not hear.
    let got = messages(&client, 5).await;
    assert_eq!(offsets(&got), [1, 2, 3, 4, 5]);
    let ack = client
        .publish("payments", Outgoing::text("after"))
        .await
        .unwrap();
    assert_eq!(ack.position.offset.get(), 6, "nothing was appended twice");

    client.close().await;
}
