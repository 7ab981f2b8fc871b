//! The WebSocket protocol's guarantees against the real binary: sessions survive a restart of
//! the disk engine, graceful or `kill -9`, without a gap (SPEC §2, §3); a client that stops
//! reading costs a bounded buffer, catches up from history without a gap, and is closed only
//! when stuck past the timeout, without harm to anyone else (§8); conflated streams give a
//! subscriber that is behind the newest message per key, and account for every offset (§8).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use common::{API_KEY, Server, WsEnd, WsPeer, free_port, jwt, message_offset, now_secs};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);
const MIB: u64 = 1024 * 1024;

/// Reads frames until `n` messages arrived; fails on a reset or an end of the connection.
async fn messages(peer: &mut WsPeer, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let f = peer.next(T).await.expect("a frame");
        assert_ne!(f["type"], "reset", "a reset: {f}");
        assert_ne!(f["type"], "error", "an error: {f}");
        if f["type"] == "message" {
            got.push(f);
        }
    }
    got
}

fn offsets(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["offset"].as_u64().unwrap())
        .collect()
}

/// Publishes `data` for each of `range` to `stream` (one message each, in order).
async fn publish_range(server: &Server, stream: &str, range: std::ops::RangeInclusive<u64>) {
    let batch = range
        .map(|i| json!({"stream": stream, "data": format!("m{i}")}))
        .collect();
    server.publish_batch(batch).await;
}

/// Resumes `session` on a fresh connection with `positions`; returns the peer and `connected`.
async fn resume(addr: &str, session: &str, positions: Value) -> (WsPeer, Value) {
    let mut peer = WsPeer::open(addr, &[]).await.expect("upgrade");
    let mut connect = json!({"type":"connect","session":session});
    if !positions.is_null() {
        connect["positions"] = positions;
    }
    peer.send(connect).await;
    let connected = peer.expect("connected").await;
    (peer, connected)
}

fn alice() -> String {
    jwt(json!({"sub":"alice","exp":now_secs()+600,"subscribe":["chat:*"]}))
}

#[tokio::test]
async fn a_session_resumes_across_graceful_restarts_of_the_disk_engine() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start_disk(&listen, dir.path(), &[]);

    let (mut peer, connected) = WsPeer::connect(&server.addr, &alice()).await;
    let session = connected["session"].as_str().unwrap().to_owned();
    peer.send(json!({"type":"subscribe","stream":"chat:1","after":"oldest"}))
        .await;
    peer.expect("subscribed").await;
    publish_range(&server, "chat:1", 1..=3).await;
    let got = messages(&mut peer, 3).await;
    assert_eq!(offsets(&got), [1, 2, 3]);
    let epoch = got[0]["epoch"].as_str().unwrap().to_owned();

    // SIGTERM while the client is connected: it is told to reconnect, then closed with 1001.
    // (The frames wait in the socket while `terminate` blocks this thread.)
    assert!(server.terminate().success());
    assert_eq!(peer.expect("reconnect").await["reason"], "server_shutdown");
    assert_eq!(peer.closed().await.0, 1001);

    // Same data directory, same address. Messages are published before the client is back.
    let mut server = Server::start_disk(&listen, dir.path(), &[]);
    assert_eq!(server.addr, listen);
    publish_range(&server, "chat:1", 4..=5).await;
    let (mut peer, connected) = resume(&server.addr, &session, Value::Null).await;
    assert_eq!(connected["resumed"], true, "{connected}");
    assert_eq!(connected["session"], session.as_str());
    assert_eq!(connected["subject"], "alice");
    let subs = connected["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 1, "{connected}");
    assert_eq!(subs[0]["stream"], "chat:1");
    assert_eq!(subs[0]["position"], format!("{epoch}:3"));
    let got = messages(&mut peer, 2).await;
    assert_eq!(offsets(&got), [4, 5]);
    assert_eq!(
        got[0]["epoch"],
        epoch.as_str(),
        "the disk engine keeps the epoch"
    );
    publish_range(&server, "chat:1", 6..=6).await;
    assert_eq!(offsets(&messages(&mut peer, 1).await), [6]);

    // Messages published before a restart while the client was away arrive after it.
    drop(peer);
    server.wait_for_no_ws_connection().await;
    publish_range(&server, "chat:1", 7..=8).await;
    assert!(server.terminate().success());
    let server = Server::start_disk(&listen, dir.path(), &[]);
    publish_range(&server, "chat:1", 9..=9).await;
    let (mut peer, connected) = resume(&server.addr, &session, Value::Null).await;
    assert_eq!(connected["resumed"], true, "{connected}");
    assert_eq!(
        connected["subscriptions"][0]["position"],
        format!("{epoch}:6")
    );
    let got = messages(&mut peer, 3).await;
    assert_eq!(offsets(&got), [7, 8, 9]);
    assert!(got.iter().all(|m| m["epoch"] == epoch.as_str()));
    // Nothing else is waiting: a ping is answered before any other frame.
    peer.send(json!({"type":"ping"})).await;
    peer.expect("pong").await;
}

#[tokio::test]
async fn after_kill_9_a_resumed_session_has_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start_disk(&listen, dir.path(), &[]);

    // Two clients on the same stream: one will resume with its session only, the other with
    // the positions it processed.
    let mut sessions = Vec::new();
    for sub in ["alice", "bob"] {
        let token = jwt(json!({"sub":sub,"exp":now_secs()+600,"subscribe":["chat:*"]}));
        let (mut peer, connected) = WsPeer::connect(&server.addr, &token).await;
        sessions.push(connected["session"].as_str().unwrap().to_owned());
        peer.send(json!({"type":"subscribe","stream":"chat:k","after":"oldest"}))
            .await;
        peer.expect("subscribed").await;
    }
    // The subscriptions must be stored before the crash. The periodic save (about once a
    // second) may come late on a loaded machine, so they are stored for sure the way a
    // connection's end stores them: both connections end, and the sessions are resumed.
    server.wait_for_no_ws_connection().await;
    let mut peers = Vec::new();
    for session in &sessions {
        let (peer, connected) = resume(&server.addr, session, Value::Null).await;
        assert_eq!(connected["resumed"], true, "{connected}");
        assert_eq!(
            connected["subscriptions"][0]["stream"], "chat:k",
            "{connected}"
        );
        peers.push(peer);
    }
    // Deliver more and crash before (most of) the new positions are saved.
    publish_range(&server, "chat:k", 1..=20).await;
    let mut epoch = String::new();
    for peer in &mut peers {
        let got = messages(peer, 20).await;
        assert_eq!(offsets(&got), (1..=20).collect::<Vec<_>>());
        epoch = got[0]["epoch"].as_str().unwrap().to_owned();
    }
    server.kill();
    drop(peers);

    let server = Server::start_disk(&listen, dir.path(), &[]);
    publish_range(&server, "chat:k", 21..=25).await;

    // Session only: the server's record may be up to a second stale, so some of 1..=20 may
    // come again (at-least-once; a client drops them by offset), but never a gap.
    let (mut a, connected) = resume(&server.addr, &sessions[0], Value::Null).await;
    assert_eq!(connected["resumed"], true, "{connected}");
    let from: u64 = connected["subscriptions"][0]["position"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert!(
        from <= 20,
        "the session claims more than was delivered: {connected}"
    );
    let got = messages(&mut a, (25 - from) as usize).await;
    assert_eq!(offsets(&got), (from + 1..=25).collect::<Vec<_>>());
    eprintln!("after kill -9 the session resumed after offset {from} of 20 delivered");

    // With the client's own positions: exactly what it had not processed.
    let (mut b, connected) = resume(
        &server.addr,
        &sessions[1],
        json!({"chat:k": format!("{epoch}:20")}),
    )
    .await;
    assert_eq!(connected["resumed"], true, "{connected}");
    let got = messages(&mut b, 5).await;
    assert_eq!(offsets(&got), [21, 22, 23, 24, 25]);
    assert!(got.iter().all(|m| m["epoch"] == epoch.as_str()));
    for peer in [&mut a, &mut b] {
        peer.send(json!({"type":"ping"})).await;
        peer.expect("pong").await;
    }
}

/// Reads `peer` until offset `last` of a flood arrived, checking that offsets come exactly
/// once, in order, from `first`; any other frame but a ping is a failure.
async fn read_flood(mut peer: WsPeer, first: u64, last: u64) -> WsPeer {
    let mut expected = first;
    while expected <= last {
        let text = match peer.next_text(Duration::from_secs(20)).await {
            Some(Ok(text)) => text,
            Some(Err(end)) => panic!("the connection ended at offset {expected}: {end:?}"),
            None => panic!("timed out waiting for offset {expected}"),
        };
        match message_offset(&text) {
            Some(offset) => {
                assert_eq!(offset, expected, "offsets out of order");
                expected += 1;
            }
            None if text.contains(r#""type":"ping""#) => {}
            None => panic!("unexpected frame at offset {expected}: {text}"),
        }
    }
    peer
}

/// Publishes `n` messages of `size` bytes to `stream`, in batches of 1,000.
async fn flood(server: &Server, stream: &str, n: u64, size: usize) {
    let body = "x".repeat(size);
    let mut next = 1;
    while next <= n {
        let batch = (next..(next + 1000).min(n + 1))
            .map(|_| json!({"stream": stream, "data": body}))
            .collect::<Vec<_>>();
        next += batch.len() as u64;
        server.publish_batch(batch).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_costs_a_bounded_buffer_then_catches_up_from_history() {
    const FLOOD: u64 = 100_000;
    const SIZE: usize = 200;
    const SLOW: usize = 4;
    let flags = [
        "--history-limit",
        "200000",
        "--ws-outbound-messages",
        "256",
        "--ws-outbound-bytes",
        "262144",
        "--stuck-timeout",
        "300s",
        "--ws-ping-interval",
        "300s",
    ];
    // The retained history is in memory with either engine (the disk engine keeps what
    // retention keeps in memory for reads), and it grows with the flood: ~20 MB of payloads
    // plus per-message overhead. So the same flood goes to a control server without
    // subscribers, and the slow clients' cost is the difference between the two.
    let server = Server::start(&flags);
    let control = Server::start(&flags);

    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let (mut peer, _) = WsPeer::connect(&server.addr, API_KEY).await;
        peer.send(json!({"type":"subscribe","stream":"flood","after":"oldest"}))
            .await;
        peer.expect("subscribed").await;
        slow.push(peer); // …and reads nothing until the flood is over.
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before, control_before) = (server.rss_bytes(), control.rss_bytes());
    let started = Instant::now();
    tokio::join!(
        flood(&server, "flood", FLOOD, SIZE),
        flood(&control, "flood", FLOOD, SIZE)
    );
    let flooded = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (after, control_after) = (server.rss_bytes(), control.rss_bytes());
    let growth = after.saturating_sub(before);
    let control_growth = control_after.saturating_sub(control_before);
    eprintln!(
        "flood of {FLOOD} × {SIZE} B in {flooded:?}: RSS grew {} MiB with {SLOW} stalled \
         subscribers, {} MiB without (from {} / {} MiB)",
        growth / MIB,
        control_growth / MIB,
        before / MIB,
        control_before / MIB
    );
    // Each stalled connection may hold its outbound budget (256 frames, 256 KiB) plus the
    // socket writer's buffer: a few MiB for all four. A buffer that grew with the flood would
    // hold every frame not yet read — ~30 MB of JSON per connection, ~120 MB in all — on top
    // of what the control server needs for the same history.
    assert!(
        growth < control_growth + 24 * MIB,
        "the stalled subscribers cost {} MiB",
        (growth - control_growth) / MIB
    );
    assert!(growth < 96 * MIB, "RSS grew {} MiB", growth / MIB);

    // Now they read: everything, once, in order, from history.
    let started = Instant::now();
    let readers: Vec<_> = slow
        .into_iter()
        .map(|peer| tokio::spawn(read_flood(peer, 1, FLOOD)))
        .collect();
    for reader in readers {
        reader.await.unwrap();
    }
    eprintln!(
        "{SLOW} subscribers read {FLOOD} messages each in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stuck_past_the_timeout_is_closed_and_no_one_else_notices() {
    const SIZE: usize = 16 * 1024;
    // More than the kernel can hold for a client that reads nothing (its receive buffer is
    // tiny; the server's send buffer may grow to tcp_wmem's maximum), so the server's writer
    // really blocks.
    let wmem_max: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * MIB);
    let n: u64 = 600.max((wmem_max + 2 * MIB) / SIZE as u64 + 64);
    let server = Server::start(&[
        "--stuck-timeout",
        "2s",
        "--ws-outbound-messages",
        "64",
        "--ws-outbound-bytes",
        "65536",
        "--ws-ping-interval",
        "300s",
    ]);
    let ws_connections = r#"spool_connections{transport="ws"}"#;

    // The stuck client: a small socket receive buffer, and it reads nothing.
    let mut stuck = WsPeer::open_small_rcvbuf(&server.addr, 4096).await;
    stuck.send(json!({"type":"connect","token":API_KEY})).await;
    let session = stuck.expect("connected").await["session"]
        .as_str()
        .unwrap()
        .to_owned();
    stuck
        .send(json!({"type":"subscribe","stream":"big","after":"oldest"}))
        .await;
    let epoch = stuck.expect("subscribed").await["position"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .0
        .to_owned();

    // A healthy client on the same stream reads everything as it comes.
    let (mut healthy, _) = WsPeer::connect(&server.addr, API_KEY).await;
    healthy
        .send(json!({"type":"subscribe","stream":"big","after":"oldest"}))
        .await;
    healthy.expect("subscribed").await;
    let healthy = tokio::spawn(read_flood(healthy, 1, n));
    assert_eq!(server.metric(ws_connections).await, Some(2.0));

    let started = Instant::now();
    flood(&server, "big", n, SIZE).await;
    let mut healthy = tokio::time::timeout(Duration::from_secs(60), healthy)
        .await
        .expect("the healthy client was held up")
        .unwrap();
    eprintln!(
        "{n} × {SIZE} B published and read by the healthy client in {:?}",
        started.elapsed()
    );

    // The stuck one is closed once it has made no progress for the stuck timeout (2 s, checked
    // every 0.5 s, plus up to 2 s for the close frame to get through); the default is 60 s, so
    // a deadline of 30 s, generous for a loaded machine, still tells the flag worked.
    let mut closed_after = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if server.metric(ws_connections).await == Some(1.0) {
            closed_after = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed_after = closed_after.expect("the stuck client was not closed within 30 s");
    eprintln!("the stuck client was closed {closed_after:?} after the flood began");

    // What it finds when it reads again: a prefix of the stream, in order, then the close —
    // 4006 when the close frame got through, else just the end of the connection.
    let mut last = 0;
    let end = loop {
        match stuck
            .next_text(T)
            .await
            .expect("the stuck client's socket hangs")
        {
            Ok(text) => {
                if let Some(offset) = message_offset(&text) {
                    assert_eq!(offset, last + 1);
                    last = offset;
                } else if text.contains(r#""type":"error""#) {
                    assert!(text.contains(r#""code":"slow_consumer""#), "{text}");
                }
            }
            Err(end) => break end,
        }
    };
    eprintln!("the stuck client read {last} of {n} messages, then {end:?}");
    assert!(last < n, "the client was not stuck at all");
    match &end {
        WsEnd::Closed(Some((code, _))) => assert_eq!(*code, 4006),
        WsEnd::Closed(None) | WsEnd::Error(_) => {}
    }

    // The server is fine, the healthy client too, and the stuck one resumes from history.
    let health = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    healthy.send(json!({"type":"ping"})).await;
    healthy.expect("pong").await;
    let (peer, connected) = resume(
        &server.addr,
        &session,
        json!({"big": format!("{epoch}:{last}")}),
    )
    .await;
    assert_eq!(connected["resumed"], true, "{connected}");
    // The reason it could not read in a close frame, it learns on resume.
    assert_eq!(connected["last_close"], "slow_consumer", "{connected}");
    read_flood(peer, last + 1, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_sending_requests_but_reads_nothing_is_closed_too() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let server = Server::start(&["--stuck-timeout", "2s", "--ws-ping-interval", "300s"]);
    let ws_connections = r#"spool_connections{transport="ws"}"#;
    let (mut healthy, _) = WsPeer::connect(&server.addr, API_KEY).await;
    healthy
        .send(json!({"type":"subscribe","stream":"s","after":"oldest"}))
        .await;
    healthy.expect("subscribed").await;

    // Requests whose answers (errors of ~150 bytes) it never reads, until the server stops
    // taking them: its answers fill the socket, then the connection's queue.
    let mut stuck = WsPeer::open_small_rcvbuf(&server.addr, 4096).await;
    stuck.send(json!({"type":"connect","token":API_KEY})).await;
    stuck.expect("connected").await;
    let request = json!({"type":"subscribe","stream":"not a stream name"}).to_string();
    let started = Instant::now();
    let mut sent = 0u64;
    // A send blocked for 5 s means the server stopped reading. (1 s was too short a sign on a
    // loaded machine: a server merely descheduled that long, with the socket buffers full of
    // requests, looked stopped, and once it went on its answers to that many requests fitted
    // in the socket buffers, so it never got stuck at all.)
    loop {
        let send = stuck.socket.send(Message::text(request.clone()));
        match tokio::time::timeout(Duration::from_secs(5), send).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) | Err(_) => break,
        }
        assert!(sent < 500_000, "the server never stopped taking requests");
    }
    eprintln!(
        "the server stopped taking requests after {sent} in {:?}",
        started.elapsed()
    );

    // Closed about the stuck timeout after the server stopped taking requests (2 s, plus up
    // to 2 s for a close frame that cannot get through): well within 20 s of now on a loaded
    // machine, and well before the default stuck timeout (60 s).
    let stopped = Instant::now();
    let mut closed_after = None;
    while stopped.elapsed() < Duration::from_secs(20) {
        if server.metric(ws_connections).await == Some(1.0) {
            closed_after = Some(stopped.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed_after = closed_after.expect("the client was not closed within 20 s");
    eprintln!("it was closed {closed_after:?} after the server stopped taking requests");

    // What it reads: the answers, then 4006 or just the end of the connection.
    let mut answers = 0u64;
    let end = loop {
        match stuck
            .next_text(T)
            .await
            .expect("the stuck client's socket hangs")
        {
            Ok(text) if text.contains(r#""code":"invalid_stream_name""#) => answers += 1,
            Ok(text) => assert!(text.contains(r#""code":"slow_consumer""#), "{text}"),
            Err(end) => break end,
        }
    };
    eprintln!("it read {answers} answers, then {end:?}");
    assert!(
        answers < sent,
        "every request was answered: the client was not stuck"
    );
    if let WsEnd::Closed(Some((code, _))) = &end {
        assert_eq!(*code, 4006);
    }
    server.publish("s", "fine").await;
    assert_eq!(healthy.expect("message").await["data"], "fine");
}

/// One conflated read: the messages delivered and the `skipped` ranges, in order.
#[derive(Debug, Default)]
struct Conflated {
    delivered: Vec<(u64, String)>,
    /// `(after, through, count)`.
    skipped: Vec<(u64, u64, u64)>,
}

/// Reads a subscription until offset `last` is accounted for (delivered or skipped).
async fn read_conflated(peer: &mut WsPeer, stream: &str, last: u64) -> Conflated {
    let mut out = Conflated::default();
    let mut through = 0;
    while through < last {
        let f = peer.next(T).await.expect("a frame");
        assert_eq!(f["stream"], stream, "{f}");
        match f["type"].as_str().unwrap() {
            "message" => {
                let offset = f["offset"].as_u64().unwrap();
                let key = f["key"].as_str().unwrap().to_owned();
                assert_eq!(f["data"], format!("{key}={offset}"));
                out.delivered.push((offset, key));
                through = through.max(offset);
            }
            "skipped" => {
                let (after, to, count) = (
                    f["after"].as_u64().unwrap(),
                    f["through"].as_u64().unwrap(),
                    f["count"].as_u64().unwrap(),
                );
                out.skipped.push((after, to, count));
                through = through.max(to);
            }
            _ => panic!("unexpected frame {f}"),
        }
    }
    out
}

/// Checks that a conflated read of offsets `1..=last`, published with key `k{offset % keys}`,
/// accounts for every offset exactly once and ends with the newest message of every key.
fn check_conflated(read: &Conflated, last: u64, keys: u64) {
    let delivered: Vec<u64> = read.delivered.iter().map(|(o, _)| *o).collect();
    assert!(
        delivered.windows(2).all(|w| w[0] < w[1]),
        "delivered out of order or twice: {delivered:?}"
    );
    for (offset, key) in &read.delivered {
        assert_eq!(*key, format!("k{}", offset % keys));
    }
    let delivered_set: BTreeSet<u64> = delivered.iter().copied().collect();
    // Skipped ranges are disjoint and each count is what its range did not deliver.
    let mut covered = BTreeSet::new();
    let mut previous_through = 0;
    for &(after, through, count) in &read.skipped {
        assert!(
            after >= previous_through && after < through,
            "{:?}",
            read.skipped
        );
        previous_through = through;
        let delivered_in = delivered_set.range(after + 1..=through).count() as u64;
        assert_eq!(
            count,
            through - after - delivered_in,
            "skipped ({after}, {through}] count {count}, {delivered_in} of it delivered"
        );
        // A skipped offset was superseded by a delivered message with the same key.
        for offset in (after + 1..=through).filter(|o| !delivered_set.contains(o)) {
            assert!(
                delivered_set
                    .range(offset + 1..)
                    .any(|d| d % keys == offset % keys),
                "offset {offset} was skipped but nothing newer with its key was delivered"
            );
            covered.insert(offset);
        }
    }
    let skipped: u64 = read.skipped.iter().map(|s| s.2).sum();
    assert_eq!(covered.len() as u64, skipped);
    assert_eq!(
        delivered.len() as u64 + skipped,
        last,
        "delivered {} + skipped {skipped}",
        delivered.len()
    );
    let all: BTreeSet<u64> = delivered_set.union(&covered).copied().collect();
    assert_eq!(all, (1..=last).collect::<BTreeSet<_>>());
    // The newest value of every key is there.
    let mut newest = BTreeMap::new();
    for (offset, key) in &read.delivered {
        newest.insert(key.clone(), *offset);
    }
    let expected: BTreeMap<String, u64> = (last - keys + 1..=last)
        .map(|o| (format!("k{}", o % keys), o))
        .collect();
    assert_eq!(newest, expected);
}

#[tokio::test]
async fn conflated_streams_give_a_late_reader_the_newest_per_key_and_account_for_every_offset() {
    const N: u64 = 1000;
    const KEYS: u64 = 5;
    let server = Server::start(&[
        "--conflate",
        "prices/*",
        "--ws-outbound-messages",
        "4",
        "--history-limit",
        "20000",
    ]);

    // A live subscriber that does not read while the messages are published.
    let (mut live, _) = WsPeer::connect(&server.addr, API_KEY).await;
    live.send(json!({"type":"subscribe","stream":"prices/eur","after":"now"}))
        .await;
    live.expect("subscribed").await;

    // In 20 batches, so the live subscriber's reads see different slices of the stream.
    for first in (1..=N).step_by(50) {
        for stream in ["prices/eur", "plain/eur"] {
            let batch = (first..first + 50)
                .map(|i| {
                    let key = format!("k{}", i % KEYS);
                    json!({"stream": stream, "key": key, "data": format!("{key}={i}")})
                })
                .collect();
            server.publish_batch(batch).await;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Subscribed from the oldest message, far behind: the newest per key, and the rest skipped.
    let (mut late, _) = WsPeer::connect(&server.addr, API_KEY).await;
    late.send(json!({"type":"subscribe","stream":"prices/eur","after":"oldest"}))
        .await;
    late.expect("subscribed").await;
    let read = read_conflated(&mut late, "prices/eur", N).await;
    eprintln!(
        "late reader: {} delivered, {} skipped in {} ranges",
        read.delivered.len(),
        read.skipped.iter().map(|s| s.2).sum::<u64>(),
        read.skipped.len()
    );
    check_conflated(&read, N, KEYS);
    assert!(
        read.delivered.len() < 50,
        "hardly conflated: {} delivered",
        read.delivered.len()
    );

    // The live subscriber that fell behind: whatever it got before, every offset is accounted
    // for and the newest value of each key is delivered.
    let read = read_conflated(&mut live, "prices/eur", N).await;
    eprintln!(
        "stalled live reader: {} delivered, {} skipped in {} ranges",
        read.delivered.len(),
        read.skipped.iter().map(|s| s.2).sum::<u64>(),
        read.skipped.len()
    );
    check_conflated(&read, N, KEYS);

    // A stream that does not match the pattern is not conflated: all 1000, in order.
    late.send(json!({"type":"subscribe","stream":"plain/eur","after":"oldest"}))
        .await;
    late.expect("subscribed").await;
    let read = read_conflated(&mut late, "plain/eur", N).await;
    assert!(read.skipped.is_empty(), "{:?}", read.skipped);
    assert_eq!(
        read.delivered.iter().map(|d| d.0).collect::<Vec<_>>(),
        (1..=N).collect::<Vec<_>>()
    );

    // Nothing further is waiting on either connection.
    for peer in [&mut late, &mut live] {
        peer.send(json!({"type":"ping"})).await;
        peer.expect("pong").await;
    }
}
