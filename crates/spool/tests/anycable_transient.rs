//! AnyCable's transient side on `/cable` against the real binary: `whisper` (delivered to the
//! other subscribers of the stream, never stored, the sender excluded; allowed on public
//! streams, and on signed ones with `--anycable-whisper`; bounded: a subscriber that reads
//! nothing loses whispers instead of holding them), and the liveness disconnects —
//! `no_pong` with `--anycable-pong-timeout` (driven by `{"command":"pong"}`), `too_slow` for
//! a client that reads nothing.

mod common;

use std::time::{Duration, Instant};

use common::{Server, WsEnd, WsPeer};
use serde_json::{Value, json};
use spool_server::ws::actioncable::channel::sign;

const STREAMS_SECRET: &str = "test-streams-secret";
const EXT: &str = "actioncable-v1-ext-json";
const BASE: &str = "actioncable-v1-json";

fn signed(stream: &str) -> String {
    json!({"channel": "$pubsub", "signed_stream_name": sign(stream, STREAMS_SECRET)}).to_string()
}

fn public(stream: &str) -> String {
    json!({"channel": "$pubsub", "stream_name": stream}).to_string()
}

fn request(
    addr: &str,
    protocol: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}/cable")
        .into_client_request()
        .expect("url");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    request
}

/// Opens `/cable` speaking `protocol` and reads the welcome.
async fn cable(addr: &str, protocol: &str) -> WsPeer {
    let (socket, _) = tokio_tungstenite::connect_async(request(addr, protocol))
        .await
        .expect("upgrade");
    let mut peer = WsPeer { socket };
    assert_eq!(next(&mut peer).await["type"], "welcome");
    peer
}

/// The next frame that is not a ping.
async fn next(peer: &mut WsPeer) -> Value {
    peer.next(Duration::from_secs(10))
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

async fn whisper(peer: &mut WsPeer, identifier: &str, data: Value) {
    peer.send(json!({"command": "whisper", "identifier": identifier, "data": data}))
        .await;
}

/// Nothing but pings arrives on `peer` for `within`.
async fn quiet(peer: &mut WsPeer, within: Duration) {
    if let Some(frame) = peer.next_text(within).await {
        let frame = frame.expect("open");
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "ping", "unexpected frame {frame}");
        Box::pin(quiet(peer, within)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whispers_reach_the_other_subscribers_only_and_are_not_stored() {
    let server = Server::start(&[
        "--anycable-streams-secret",
        STREAMS_SECRET,
        "--anycable-public-streams",
    ]);
    let id = public("room/1");
    let mut alice = cable(&server.addr, EXT).await;
    let mut bob = cable(&server.addr, EXT).await;
    let mut carol = cable(&server.addr, BASE).await;
    // Dave follows the same stream through its signed name: whispers are the stream's.
    let mut dave = cable(&server.addr, EXT).await;
    let mut eve = cable(&server.addr, EXT).await;
    subscribe(&mut alice, &id).await;
    subscribe(&mut bob, &id).await;
    subscribe(&mut carol, &id).await;
    subscribe(&mut dave, &signed("room/1")).await;
    subscribe(&mut eve, &public("room/2")).await;

    let typing = json!({"event": "typing", "user": "Alice", "n": [1, 2.5, null]});
    whisper(&mut alice, &id, typing.clone()).await;
    // A normal channel message, without a position (nothing is stored).
    let expected = json!({"identifier": id, "message": typing});
    assert_eq!(next(&mut bob).await, expected);
    assert_eq!(next(&mut carol).await, expected);
    assert_eq!(
        next(&mut dave).await,
        json!({"identifier": signed("room/1"), "message": typing})
    );
    // A whisper whose data is a string stays one.
    whisper(&mut bob, &id, json!("hi")).await;
    assert_eq!(
        next(&mut alice).await,
        json!({"identifier": id, "message": "hi"})
    );
    assert_eq!(next(&mut carol).await["message"], "hi");
    assert_eq!(next(&mut dave).await["message"], "hi");

    // Nothing was stored: a durable publish gets offset 1, and comes to everyone next.
    let acked = server.publish("room/1", r#"{"durable":true}"#).await;
    assert_eq!(acked["offset"], 1, "{acked}");
    for peer in [&mut alice, &mut bob, &mut dave] {
        assert_eq!(next(peer).await["offset"], 1);
    }
    assert_eq!(next(&mut carol).await["message"], json!({"durable": true}));

    // Ignored, as AnyCable ignores them: whispers through a signed name without
    // --anycable-whisper, on an identifier not subscribed, without data; too large (over the
    // 8 KiB default); the sender never gets its own (bob whispered above and got nothing).
    whisper(&mut dave, &signed("room/1"), json!({"from": "dave"})).await;
    whisper(&mut alice, &public("room/9"), json!({"x": 1})).await;
    alice
        .send(json!({"command": "whisper", "identifier": id}))
        .await;
    whisper(&mut alice, &id, json!({"big": "x".repeat(9 * 1024)})).await;
    whisper(&mut alice, &id, json!({"last": true})).await;
    assert_eq!(next(&mut bob).await["message"], json!({"last": true}));
    assert_eq!(next(&mut dave).await["message"], json!({"last": true}));
    quiet(&mut eve, Duration::from_millis(300)).await;
    // An unsubscribed connection no longer gets them.
    bob.send(json!({"command": "unsubscribe", "identifier": id}))
        .await;
    bob.send(json!({"command": "ping"})).await;
    assert_eq!(next(&mut bob).await["type"], "pong");
    whisper(&mut alice, &id, json!({"after": "bob left"})).await;
    assert_eq!(
        next(&mut dave).await["message"],
        json!({"after": "bob left"})
    );
    quiet(&mut bob, Duration::from_millis(300)).await;
    quiet(&mut alice, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_streams_whisper_with_the_flag() {
    let server = Server::start(&[
        "--anycable-streams-secret",
        STREAMS_SECRET,
        "--anycable-whisper",
    ]);
    let id = signed("doc/7");
    let mut a = cable(&server.addr, EXT).await;
    let mut b = cable(&server.addr, EXT).await;
    subscribe(&mut a, &id).await;
    subscribe(&mut b, &id).await;
    whisper(&mut a, &id, json!({"cursor": [3, 4]})).await;
    assert_eq!(
        next(&mut b).await,
        json!({"identifier": id, "message": {"cursor": [3, 4]}})
    );
    quiet(&mut a, Duration::from_millis(300)).await;
}

/// A subscriber that reads nothing while another whispers without end: the server holds at
/// most its whisper buffer for it (the rest is dropped and counted), the whisperer and the
/// other subscribers are not held up, and the durable messages still arrive in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whisper_flood_to_a_subscriber_that_reads_nothing_is_dropped_not_queued() {
    const WHISPERS: usize = 3_000;
    let server = Server::start(&[
        "--anycable-public-streams",
        "--anycable-whisper-buffer",
        "8",
        "--ws-outbound-messages",
        "16",
    ]);
    let id = public("flood");
    let mut sleeper = cable_small_rcvbuf(&server.addr).await;
    subscribe(&mut sleeper, &id).await;
    let mut reader = cable(&server.addr, EXT).await;
    subscribe(&mut reader, &id).await;
    let mut whisperer = cable(&server.addr, EXT).await;
    subscribe(&mut whisperer, &id).await;
    let before = server.rss_bytes();
    let payload = "w".repeat(4000);
    let reading = tokio::spawn(async move {
        // Until the last whisper, or 3 s without one (it may have been dropped too).
        let mut got = 0usize;
        let mut quiet_until = Instant::now() + Duration::from_secs(3);
        while let Some(Ok(text)) = reader
            .next_text(Duration::from_secs(1))
            .await
            .or_else(|| (Instant::now() < quiet_until).then(|| Ok(String::new())))
        {
            if text.contains(r#""w":"#) {
                got += 1;
                quiet_until = Instant::now() + Duration::from_secs(3);
            }
            if text.contains(r#""done":true"#) {
                break;
            }
        }
        got
    });
    for n in 0..WHISPERS {
        whisper(&mut whisperer, &id, json!({"n": n, "w": payload})).await;
    }
    whisper(&mut whisperer, &id, json!({"done": true})).await;
    let got = reading.await.unwrap();
    let grew = server.rss_bytes().saturating_sub(before);
    let metric = |name: &'static str| {
        let server = &server;
        async move { server.metric(name).await.unwrap_or(-1.0) }
    };
    // The reader may have stopped at a quiet spell (its last whispers dropped) while the
    // server, on a loaded machine, was still going through the whisperer's frames: wait until
    // the counts account for every whisper before comparing them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (published, delivered, dropped) = loop {
        let counts = (
            metric("spool_transient_published_total").await,
            metric("spool_transient_delivered_total").await,
            metric("spool_transient_dropped_total").await,
        );
        let (published, delivered, dropped) = counts;
        if (published == (WHISPERS + 1) as f64 && delivered + dropped == 2.0 * published)
            || Instant::now() >= deadline
        {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "reader got {got} of {WHISPERS} whispers; published {published}, delivered \
         {delivered}, dropped at a full inbox {dropped}; RSS grew {} KiB",
        grew / 1024
    );
    assert!(got > 0);
    assert_eq!(published, (WHISPERS + 1) as f64);
    assert_eq!(
        delivered + dropped,
        2.0 * published,
        "every whisper is counted for both"
    );
    // The sleeper's ~12 MB of whispers were not kept for it: memory grew by far less.
    assert!(grew < 8 * 1024 * 1024, "RSS grew {grew} bytes");
    // Durable messages are not transient: the sleeper gets every one once it reads.
    server.publish("flood", r#"{"durable":1}"#).await;
    let mut whispers_read = 0;
    loop {
        let frame = next(&mut sleeper).await;
        if frame.get("offset").is_some() {
            assert_eq!(frame["offset"], 1);
            break;
        }
        whispers_read += 1;
    }
    eprintln!("the sleeper read {whispers_read} whispers that were kept for it");
    // What was kept for it: its inbox (8), frames in its connection's bounded outbound queue
    // and the sockets' buffers — a fraction of the flood.
    assert!(whispers_read < WHISPERS / 2, "{whispers_read}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pong_comes_from_pong_commands_with_the_pong_timeout() {
    let server = Server::start(&[
        "--anycable-public-streams",
        "--anycable-pong-timeout",
        "2s",
        "--anycable-ping-interval",
        "1s",
    ]);
    // A client that answers every ping with `{"command":"pong"}` stays (WebSocket control
    // pongs, which tungstenite sends by itself, do not count — and do not need to).
    let ponger = cable(&server.addr, EXT).await;
    let ponging = tokio::spawn(async move {
        let mut ponger = ponger;
        let until = Instant::now() + Duration::from_secs(6);
        while Instant::now() < until {
            let text = ponger
                .next_text(Duration::from_secs(5))
                .await
                .expect("pings keep coming")
                .expect("the ponger stays connected");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["type"], "ping", "{text}");
            ponger.send(json!({"command": "pong"})).await;
        }
        ponger
    });
    // One that sends none is disconnected: no_pong, reconnect true. The clock starts before
    // it connects: the server's pong timeout starts at the earliest when it accepts it, so
    // the time to the disconnect seen from here is never shorter than the server's.
    let started = Instant::now();
    let mut silent = cable(&server.addr, EXT).await;
    // The base protocol has no pong command: the timeout is not applied to it.
    let mut base = cable(&server.addr, BASE).await;
    let frame = loop {
        let text = silent
            .next_text(Duration::from_secs(10))
            .await
            .expect("a frame within 10 s")
            .expect("a disconnect frame before the end");
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["type"] != "ping" {
            break v;
        }
    };
    assert_eq!(
        frame,
        json!({"type": "disconnect", "reason": "no_pong", "reconnect": true})
    );
    let after = started.elapsed();
    assert!(after >= Duration::from_secs(2), "{after:?}");
    match silent.next(Duration::from_secs(10)).await {
        Err(WsEnd::Closed(_)) | Err(WsEnd::Error(_)) => {}
        other => panic!("expected the close, got {other:?}"),
    }
    // Meanwhile the ponger, answering each ping, is still there, well past the timeout.
    let mut ponger = ponging.await.unwrap();
    let id = public("alive");
    subscribe(&mut ponger, &id).await;
    subscribe(&mut base, &id).await;
    server.publish("alive", r#"{"ok":1}"#).await;
    assert_eq!(next(&mut ponger).await["offset"], 1);
    assert_eq!(next(&mut base).await["message"], json!({"ok": 1}));
}

/// Opens `/cable` over a socket with a small receive buffer, so a client that stops reading
/// backs the server up quickly.
async fn cable_small_rcvbuf(addr: &str) -> WsPeer {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let (socket, _) = tokio_tungstenite::client_async(
        request(addr, EXT),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("handshake");
    let mut peer = WsPeer { socket };
    assert_eq!(next(&mut peer).await["type"], "welcome");
    peer
}

/// A client that reads nothing while messages keep coming is closed with `too_slow`
/// (reconnect true) after `--stuck-timeout`. The frame is the last one queued, behind
/// everything the client did not read, and the server gives a closing connection 2 s to
/// write it, so the client must start reading inside that window. The server counts the
/// slow consumer it gives up on (`spool_slow_consumers_total{outcome="closed"}`) as the
/// window opens, so the client watches that count and reads as soon as it moves (a fixed
/// wait missed the window on a loaded machine); should it still read too late (the
/// connection ended without the frame), it tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_nothing_is_disconnected_too_slow() {
    let server = Server::start(&[
        "--anycable-public-streams",
        "--stuck-timeout",
        "1s",
        "--ws-outbound-messages",
        "16",
        "--anycable-ping-interval",
        "300s",
    ]);
    let payload = format!(r#"{{"pad":"{}"}}"#, "p".repeat(16 * 1024));
    let closed = r#"spool_slow_consumers_total{outcome="closed"}"#;
    for attempt in 1..=5 {
        let closed_before = server.metric(closed).await.unwrap_or(0.0);
        let stream = format!("slow{attempt}");
        let id = public(&stream);
        let mut peer = cable_small_rcvbuf(&server.addr).await;
        subscribe(&mut peer, &id).await;
        // ~3 MB for a client that reads nothing: far more than the socket buffers hold.
        let batch: Vec<Value> = (0..40)
            .map(|_| json!({"stream": stream, "data": payload}))
            .collect();
        for _ in 0..5 {
            server.publish_batch(batch.clone()).await;
        }
        let wait_started = Instant::now();
        while server.metric(closed).await.unwrap_or(0.0) <= closed_before {
            assert!(
                wait_started.elapsed() < Duration::from_secs(30),
                "the server did not give up on a client that read nothing for 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let waited = wait_started.elapsed();
        let mut last = None;
        let mut read = 0;
        let mut ours = 0;
        let end = loop {
            match peer.next_text(Duration::from_secs(5)).await {
                Some(Ok(text)) => {
                    read += 1;
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    ours += usize::from(frame["identifier"] == id);
                    last = Some(text);
                }
                Some(Err(end)) => break Some(end),
                None => break None,
            }
        };
        eprintln!("attempt {attempt} (waited {waited:?}): read {read} frames, then {end:?}");
        let last: Value = serde_json::from_str(last.as_deref().unwrap_or("null")).unwrap();
        assert!(
            end.is_some(),
            "the connection stayed open after the server counted it closed ({read} frames read)"
        );
        if last == json!({"type": "disconnect", "reason": "too_slow", "reconnect": true}) {
            // The server gave up while the client read nothing; what it had queued before the
            // frame still goes out in the closing window — all of it when the loopback socket
            // buffers grew large enough to hold the rest — and never more than was published.
            assert!(read <= 201, "read {read} frames: more than published");
            assert_eq!(
                ours,
                read - 1,
                "every frame before too_slow is the stream's message"
            );
            return;
        }
        assert_eq!(last["identifier"], id, "an unexpected last frame {last}");
    }
    panic!("five times the connection ended without the too_slow frame");
}

#[test]
fn whisper_bounds_must_be_positive() {
    common::refuses_to_start(
        &["--anycable-whisper-buffer", "0"],
        &["--anycable-whisper-buffer"],
    );
    common::refuses_to_start(
        &["--anycable-whisper-max-bytes", "0"],
        &["--anycable-whisper-max-bytes"],
    );
}
