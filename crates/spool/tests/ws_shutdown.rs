//! A WebSocket client that keeps asking for answers but reads none of them fills its bounded
//! outbound queue, and the server then stops reading it while a reply waits for a slot. That
//! wait must not hold the server up: SIGTERM ends such a connection at once (the process exits
//! well within `--shutdown-timeout`, every other client still getting `reconnect` and `1001`),
//! a take-over of its session or an operator's disconnect ends it at once, and
//! `--stuck-timeout` still closes it.

mod common;

use std::time::{Duration, Instant};

use common::{API_KEY, Server, WsEnd, WsPeer, connect_with};
use futures::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// What a flooding client asks for: requests each answered by a frame.
#[derive(Clone, Copy)]
enum Flood {
    /// `unsubscribe` frames (answered `unsubscribed`, which repeats the long stream name).
    Unsubscribes,
    /// `publish` frames (answered `ack`).
    Publishes,
}

/// A client with a small receive buffer that connects, then reads nothing more; with its
/// session id.
async fn deaf(addr: &str) -> (WsPeer, String) {
    let mut peer = WsPeer::open_small_rcvbuf(addr, 4096).await;
    peer.send(json!({"type":"connect","token":API_KEY})).await;
    let connected = peer.expect("connected").await;
    let session = connected["session"]
        .as_str()
        .expect("session id")
        .to_owned();
    (peer, session)
}

/// Sends requests without reading any answer until the server stops reading the connection
/// (nothing sent is taken for a second: the client's socket buffers are full). Returns how
/// many frames were sent.
async fn flood_until_unread(peer: &mut WsPeer, flood: Flood) -> u64 {
    let stream = format!("u:{}", "x".repeat(1000));
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the server still read the flooding client after {sent} frames"
        );
        let batch = async {
            for _ in 0..64 {
                sent += 1;
                let frame = match flood {
                    Flood::Unsubscribes => {
                        json!({"type":"unsubscribe","id":sent,"stream":stream})
                    }
                    Flood::Publishes => {
                        json!({"type":"publish","id":sent,"stream":"s:flood","data":"x"})
                    }
                };
                peer.socket.feed(Message::text(frame.to_string())).await?;
            }
            peer.socket.flush().await
        };
        match tokio::time::timeout(Duration::from_secs(1), batch).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => panic!("the server ended the flooding client after {sent} frames: {e}"),
            Err(_) => return sent,
        }
    }
}

/// Whether process `pid` has exited (gone, or a zombie not reaped yet).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Polls `ready` every 50 ms until it holds or `within` passed; how long it took, if it held.
async fn until<F: Future<Output = bool>>(
    within: Duration,
    mut ready: impl FnMut() -> F,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < within {
        if ready().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn ws_connections(server: &Server) -> f64 {
    server
        .metric("spool_connections{transport=\"ws\"}")
        .await
        .unwrap_or(-1.0)
}

/// Reads every frame until the connection ends: their types, and the close code and reason.
async fn read_to_end(mut peer: WsPeer) -> (Vec<Value>, Result<(u16, String), WsEnd>) {
    let mut frames = Vec::new();
    loop {
        match peer.next(Duration::from_secs(60)).await {
            Ok(frame) => frames.push(frame),
            Err(WsEnd::Closed(Some(close))) => return (frames, Ok(close)),
            Err(end) => return (frames, Err(end)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_clients_that_read_nothing() {
    let mut server = Server::start(&["--shutdown-timeout", "30s", "--stuck-timeout", "60s"]);
    let (mut calm, _) = WsPeer::connect(&server.addr, API_KEY).await;
    calm.send(json!({"type":"subscribe","id":1,"stream":"s:calm"}))
        .await;
    calm.expect("subscribed").await;

    // Two clients that ask and never read: one waits for `unsubscribed` answers, one for acks.
    let (mut asks, _) = deaf(&server.addr).await;
    let sent = flood_until_unread(&mut asks, Flood::Unsubscribes).await;
    let (mut publishes, _) = deaf(&server.addr).await;
    let published = flood_until_unread(&mut publishes, Flood::Publishes).await;
    eprintln!("the server stopped reading after {sent} unsubscribes and {published} publishes");
    assert_eq!(ws_connections(&server).await, 3.0);

    // The well-behaved client is served meanwhile.
    calm.send(json!({"type":"ping"})).await;
    calm.expect("pong").await;
    let calm = tokio::spawn(read_to_end(calm));

    let pid = server.pid();
    let started = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let took = until(Duration::from_secs(45), || async { exited(pid) }).await;
    eprintln!("SIGTERM to exit: {took:?} (--shutdown-timeout 30s)");
    let took =
        took.unwrap_or_else(|| panic!("still running {:?} after SIGTERM", started.elapsed()));
    assert!(
        took < Duration::from_secs(5),
        "the server took {took:?} to exit: it waited for the clients that read nothing"
    );
    assert!(server.terminate().success());

    let (frames, close) = calm.await.unwrap();
    assert!(
        frames
            .iter()
            .any(|f| f["type"] == "reconnect" && f["reason"] == "server_shutdown"),
        "no reconnect frame: {frames:?}"
    );
    assert_eq!(close.expect("a close frame").0, 1001);
    drop((asks, publishes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_ends_a_connection_that_reads_nothing_at_once() {
    let server = Server::start(&["--stuck-timeout", "60s"]);
    let (mut old, session) = deaf(&server.addr).await;
    flood_until_unread(&mut old, Flood::Unsubscribes).await;
    assert_eq!(ws_connections(&server).await, 1.0);

    let started = Instant::now();
    let (mut new, connected) =
        connect_with(&server.addr, json!({"token": API_KEY, "session": session})).await;
    assert_eq!(connected["type"], "connected", "{connected}");
    assert_eq!(connected["resumed"], true, "{connected}");
    let resumed = started.elapsed();
    // The old connection has ended (not at the stuck timeout, a minute later).
    let gone = until(Duration::from_secs(20), || async {
        ws_connections(&server).await == 1.0
    })
    .await;
    eprintln!("take-over: connected after {resumed:?}, the old connection gone after {gone:?}");
    let gone = gone.expect("the connection taken over was still open 20 s later");
    assert!(gone < Duration::from_secs(5), "{gone:?}");
    new.send(json!({"type":"ping"})).await;
    new.expect("pong").await;
    drop(old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stuck_timeout_closes_a_connection_waiting_to_answer() {
    let server = Server::start(&["--stuck-timeout", "3s"]);
    let (mut peer, session) = deaf(&server.addr).await;
    flood_until_unread(&mut peer, Flood::Unsubscribes).await;
    let closed = until(Duration::from_secs(20), || async {
        ws_connections(&server).await == 0.0
    })
    .await;
    eprintln!("stuck: closed {closed:?} after the server stopped reading (--stuck-timeout 3s)");
    let closed = closed.expect("still open 20 s after the server stopped reading it");
    // The stuck timeout, then at most the close's own grace (2 s) to write the close frame.
    assert!(closed < Duration::from_secs(7), "{closed:?}");
    drop(peer);
    // The client could not read why; its session says.
    let (_, connected) =
        connect_with(&server.addr, json!({"token": API_KEY, "session": session})).await;
    assert_eq!(connected["resumed"], true, "{connected}");
    assert_eq!(connected["last_close"], "slow_consumer", "{connected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_disconnect_ends_a_connection_that_reads_nothing_at_once() {
    let server = Server::start(&["--stuck-timeout", "60s"]);
    let (mut peer, session) = deaf(&server.addr).await;
    flood_until_unread(&mut peer, Flood::Unsubscribes).await;
    let answer = server
        .http
        .delete(server.url(&format!("/v1/sessions/{session}")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("disconnect");
    assert_eq!(answer.status(), 200);
    let gone = until(Duration::from_secs(20), || async {
        ws_connections(&server).await == 0.0
    })
    .await;
    eprintln!("disconnect: the connection gone after {gone:?}");
    let gone = gone.expect("the disconnected connection was still open 20 s later");
    assert!(gone < Duration::from_secs(5), "{gone:?}");
    drop(peer);
}
