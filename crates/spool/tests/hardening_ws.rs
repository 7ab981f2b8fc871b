//! Hardening of the WebSocket protocol against the real binary (issue 10): a resumed session
//! must still hold a credential the running configuration accepts, heartbeats keep healthy
//! clients connected and close dead ones, error frames repeat the id of the frame that caused
//! them, ping floods and publish floods cost bounded memory, and a browser origin must be
//! listed.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use common::engines::{Backend, OwnServer};
use common::{API_KEY, Server, WsEnd, WsPeer, connect_with, free_port, jwt, now_secs};
use futures::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

fn fixture(name: &str) -> String {
    format!(
        "{}/../spool-server/tests/fixtures/jwt/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn rs256(claims: &Value) -> String {
    let pem = std::fs::read(fixture("rsa_private.pem")).unwrap();
    jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

/// Connects with `token`, subscribes to `stream`, and returns the session id.
async fn session_of(addr: &str, token: Option<&str>, stream: &str) -> String {
    let fields = match token {
        Some(t) => json!({ "token": t }),
        None => json!({}),
    };
    let (mut peer, connected) = connect_with(addr, fields).await;
    assert_eq!(connected["type"], "connected", "{connected}");
    peer.send(json!({"type":"subscribe","id":1,"stream":stream,"after":"oldest"}))
        .await;
    peer.expect("subscribed").await;
    let _ = peer.socket.close(None).await;
    connected["session"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_resume_needs_a_credential_the_running_configuration_still_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let rsa = fixture("rsa_public.pem");
    let mut first = Server::start_disk(
        &listen,
        dir.path(),
        &[
            "--api-key",
            "old-key",
            "--allow-anonymous",
            "--jwt-public-key",
            &rsa,
        ],
    );
    let addr = first.addr.clone();
    let long =
        |sub: &str| jwt(json!({"sub":sub,"exp":now_secs()+600,"subscribe":["*"],"publish":["*"]}));
    let old_key = session_of(&addr, Some("old-key"), "h:key").await;
    let anonymous = session_of(&addr, None, "h:anon").await;
    let rotated = session_of(
        &addr,
        Some(&rs256(
            &json!({"sub":"rita","exp":now_secs()+600,"subscribe":["*"]}),
        )),
        "h:rsa",
    )
    .await;
    let bob_exp = now_secs() + 3;
    let expiring = session_of(
        &addr,
        Some(&jwt(json!({"sub":"bob","exp":bob_exp,"subscribe":["*"]}))),
        "h:bob",
    )
    .await;
    let kept_key = session_of(&addr, Some(API_KEY), "h:kept").await;
    let carol = session_of(&addr, Some(&long("carol")), "h:carol").await;
    // A session of the old key, resumed with a key still configured: the same identity.
    let old_key_renewed = session_of(&addr, Some("old-key"), "h:renewed").await;

    // Before the restart, every one of them resumes with the session alone.
    for id in [&old_key, &anonymous, &rotated, &kept_key, &carol] {
        let (_, answer) = connect_with(&addr, json!({ "session": id })).await;
        assert_eq!(answer["resumed"], true, "{answer}");
    }

    // Restart: the old key gone, anonymous access off, the RSA key rotated.
    first.terminate();
    drop(first);
    let other_rsa = fixture("rsa_other_public.pem");
    let server = Server::start_disk(&listen, dir.path(), &["--jwt-public-key", &other_rsa]);
    // Let bob's token expire.
    while now_secs() <= bob_exp {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for (what, id) in [
        ("an API key no longer configured", &old_key),
        ("anonymous with anonymous access off", &anonymous),
        ("a token whose key was rotated", &rotated),
        ("an expired token", &expiring),
    ] {
        let (mut peer, answer) = connect_with(&server.addr, json!({ "session": id })).await;
        assert_eq!(answer["type"], "error", "{what}: {answer}");
        assert_eq!(answer["code"], "session_not_restored", "{what}: {answer}");
        // Nothing is allowed on that connection: it is not connected.
        peer.send(json!({"type":"publish","id":5,"stream":"h:key","data":"x"}))
            .await;
        let refused = peer.expect("error").await;
        assert_eq!(refused["code"], "not_connected", "{what}: {refused}");
        assert_eq!(refused["id"], 5, "{what}: {refused}");
        // A fresh connect without a credential is refused as ever.
        peer.send(json!({"type":"connect"})).await;
        assert_eq!(peer.expect("error").await["code"], "unauthorized");
        assert_eq!(peer.closed().await.0, 4001, "{what}");
    }

    // Still accepted: resumed, and publishes are acked.
    for id in [&kept_key, &carol] {
        let (mut peer, answer) = connect_with(&server.addr, json!({ "session": id })).await;
        assert_eq!(answer["resumed"], true, "{answer}");
        peer.send(json!({"type":"publish","id":9,"stream":"h:ok","data":"still here"}))
            .await;
        let ack = loop {
            let frame = peer.next(Duration::from_secs(10)).await.expect("a frame");
            if frame["type"] == "ack" {
                break frame;
            }
        };
        assert_eq!(ack["id"], 9, "{ack}");
    }
    // A valid credential of the same identity given with the session resumes it.
    let (_, answer) = connect_with(
        &server.addr,
        json!({ "session": old_key_renewed, "token": API_KEY }),
    )
    .await;
    assert_eq!(answer["resumed"], true, "{answer}");
    assert_eq!(
        answer["subscriptions"][0]["stream"], "h:renewed",
        "{answer}"
    );
}

#[tokio::test]
async fn a_session_does_not_outlive_its_token() {
    let server = Server::start(&[]);
    let exp = now_secs() + 2;
    let token = jwt(json!({"sub":"dora","exp":exp,"subscribe":["*"]}));
    let session = session_of(&server.addr, Some(&token), "h:dora").await;
    while now_secs() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, answer) = connect_with(&server.addr, json!({ "session": session })).await;
    assert_eq!(answer["code"], "session_not_restored", "{answer}");
    let fresh = jwt(json!({"sub":"dora","exp":now_secs()+600,"subscribe":["*"]}));
    let (_, answer) =
        connect_with(&server.addr, json!({ "session": session, "token": fresh })).await;
    assert_eq!(answer["resumed"], true, "{answer}");
}

/// Issue 10, item 1 (a rotated `--jwt-secret`): a session made with an HS256 token is not
/// resumed by its id alone once the server runs with another secret; a token of the same
/// identity signed with the new secret resumes it. (The testkit's launcher always passes its
/// own `--jwt-secret`, so the first server, with the old secret, is started by hand.)
#[tokio::test]
async fn a_session_of_a_rotated_jwt_secret_is_not_restored() {
    use std::process::{Command, Stdio};
    struct Terminate(std::process::Child);
    impl Terminate {
        fn stop(&mut self) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status();
            for _ in 0..200 {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    impl Drop for Terminate {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut old = Terminate(
        Command::new(common::spool_bin())
            .args([
                "serve",
                "--listen",
                &listen,
                "--engine",
                "disk",
                "--data-dir",
            ])
            .arg(dir.path())
            .args(["--jwt-secret", "the-old-secret"])
            .env("SPOOL_LOG", "warn")
            .env("SPOOL_SHUTDOWN_DRAIN", "0s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn spool serve"),
    );
    // Listening comes before the engine is open: wait until it is ready.
    let until = Instant::now() + Duration::from_secs(20);
    let http = reqwest::Client::new();
    loop {
        let ready = http.get(format!("http://{listen}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < until, "spool serve did not get ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let claims = json!({"sub":"hana","exp":now_secs()+600,"subscribe":["*"],"publish":["*"]});
    let old_token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(b"the-old-secret"),
    )
    .unwrap();
    let session = session_of(&listen, Some(&old_token), "h:hs").await;
    // With the secret it was made under, the id alone resumes it.
    let (_, answer) = connect_with(&listen, json!({ "session": session })).await;
    assert_eq!(answer["resumed"], true, "{answer}");
    old.stop();

    // The secret rotated (the launcher's own, JWT_SECRET).
    let server = Server::start_disk("127.0.0.1:0", dir.path(), &[]);
    let (mut peer, answer) = connect_with(&server.addr, json!({ "session": session })).await;
    assert_eq!(answer["code"], "session_not_restored", "{answer}");
    peer.send(json!({"type":"publish","id":3,"stream":"h:hs","data":"x"}))
        .await;
    let refused = peer.expect("error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_u64()),
        (Some("not_connected"), Some(3)),
        "{refused}"
    );
    // The old token itself is refused too.
    peer.send(json!({"type":"connect","session":session,"token":old_token}))
        .await;
    assert_eq!(peer.expect("error").await["code"], "invalid_token");
    // A token of the same identity under the new secret resumes the session.
    let (_, answer) = connect_with(
        &server.addr,
        json!({ "session": session, "token": jwt(claims.clone()) }),
    )
    .await;
    assert_eq!(answer["resumed"], true, "{answer}");
    assert_eq!(answer["subscriptions"][0]["stream"], "h:hs", "{answer}");
}

/// What an idle client that answers pings saw.
struct Heard {
    pings: u64,
    longest_gap: Duration,
    end: Option<String>,
}

/// The ping timeout is 2 s, not less: a client that answers every ping must not be closed
/// because the loaded machine it shares with the server did not schedule it for a moment
/// (with 800 ms it was at the mercy of the scheduler on a CI machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_answer_pings_stay_and_silent_ones_are_closed_with_4005() {
    let server = Server::start(&["--ws-ping-interval", "2s", "--ws-ping-timeout", "2s"]);
    const CLIENTS: usize = 20;
    const STAY: Duration = Duration::from_secs(12);
    let mut idle = Vec::new();
    for _ in 0..CLIENTS {
        let (peer, connected) = WsPeer::connect(&server.addr, API_KEY).await;
        assert_eq!(connected["ping_interval_ms"], 2000);
        idle.push(tokio::spawn(answer_pings(peer, STAY)));
    }
    // One that reads nothing, so answers nothing (not even the WebSocket layer's pong). It is
    // a raw socket: a WebSocket library would answer the queued pings when it finally reads,
    // into a connection the server may have torn down by then (a broken pipe, not a close).
    let mut silent = raw::open(&server.addr).await;
    {
        use tokio::io::AsyncWriteExt;
        let connect = json!({"type":"connect","token":API_KEY}).to_string();
        silent
            .write_all(&raw::text(connect.as_bytes()))
            .await
            .unwrap();
    }
    let connected = raw::next_text(&mut silent).await.expect("connected");
    assert!(connected.contains(r#""type":"connected""#), "{connected}");
    let started = Instant::now();

    for client in idle {
        let heard = client.await.unwrap();
        assert_eq!(heard.end, None, "a client that answers pings was closed");
        // Every 2 s: about 6 in 12 s; the default interval (25 s) would give none.
        assert!(heard.pings >= 4, "{} pings in {STAY:?}", heard.pings);
        assert!(
            heard.longest_gap < Duration::from_secs(6),
            "pings {:?} apart",
            heard.longest_gap
        );
    }
    let code = tokio::time::timeout(Duration::from_secs(10), raw::close_code(&mut silent))
        .await
        .expect("the silent client's socket hangs");
    assert_eq!(code, Some(4005));
    assert!(started.elapsed() < STAY + Duration::from_secs(10));
}

/// Reads for `stay`, answering every `ping` frame with `pong` (tokio-tungstenite answers the
/// WebSocket control pings by itself while it reads).
async fn answer_pings(mut peer: WsPeer, stay: Duration) -> Heard {
    let until = Instant::now() + stay;
    let mut heard = Heard {
        pings: 0,
        longest_gap: Duration::ZERO,
        end: None,
    };
    let mut last = Instant::now();
    while Instant::now() < until {
        let Some(next) = peer.next_text(until - Instant::now()).await else {
            break;
        };
        match next {
            Ok(text) if text.contains(r#""type":"ping""#) => {
                heard.pings += 1;
                heard.longest_gap = heard.longest_gap.max(last.elapsed());
                last = Instant::now();
                peer.send(json!({"type":"pong"})).await;
            }
            Ok(_) => {}
            Err(end) => {
                heard.end = Some(format!("{end:?}"));
                break;
            }
        }
    }
    heard
}

#[tokio::test]
async fn errors_repeat_the_id_of_the_frame_that_caused_them() {
    let server = Server::start(&[]);
    let mut peer = WsPeer::open(&server.addr, &[]).await.expect("upgrade");

    // Before connect.
    peer.send(json!({"type":"subscribe","id":7,"stream":"h:a"}))
        .await;
    let e = peer.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_u64()),
        (Some("not_connected"), Some(7)),
        "{e}"
    );
    peer.send(json!({"type":"publish","id":8,"stream":"h:a","data":"x"}))
        .await;
    let e = peer.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_u64()),
        (Some("not_connected"), Some(8)),
        "{e}"
    );
    // Invalid frames, before and after connect: the id is read from the raw JSON.
    peer.send(json!({"type":"subscribe","id":9,"stream":"h:a","from":"oldest"}))
        .await;
    let e = peer.expect("error").await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_u64()),
        (Some("bad_frame"), Some(9)),
        "{e}"
    );

    peer.send(json!({"type":"connect","token":API_KEY})).await;
    peer.expect("connected").await;
    for (id, frame) in [
        (
            10,
            json!({"type":"subscribe","id":10,"stream":"h:a","from":"oldest"}),
        ),
        (11, json!({"type":"subscrbe","id":11,"stream":"h:a"})),
        (12, json!({"type":"subscribe","id":12})),
        (13, json!({"type":"publish","id":13,"data":"x"})),
        (14, json!({"id":14,"stream":"h:a"})),
    ] {
        peer.send(frame.clone()).await;
        let e = peer.expect("error").await;
        assert_eq!(e["code"], "bad_frame", "{frame}: {e}");
        assert_eq!(e["id"], id, "{frame}: {e}");
    }
    // A valid frame that fails also repeats its id.
    peer.send(json!({"type":"subscribe","id":15,"stream":"h:a","after":"nonsense"}))
        .await;
    let e = peer.expect("error").await;
    assert_eq!(e["id"], 15, "{e}");
    // Without a readable id, the error has none, and the connection stays open.
    peer.send_text(r#"{"id":"sixteen","type":"nope"}"#).await;
    let e = peer.expect("error").await;
    assert!(e.get("id").is_none(), "{e}");
    peer.send_text("not json").await;
    let e = peer.expect("error").await;
    assert!(e.get("id").is_none(), "{e}");
    peer.send(json!({"type":"ping"})).await;
    peer.expect("pong").await;
}

#[tokio::test]
async fn a_ping_flood_that_reads_nothing_is_closed_with_bounded_memory() {
    let server = Server::start(&[]);
    let before = server.rss_bytes();
    let mut flooder = WsPeer::open_small_rcvbuf(&server.addr, 4096).await;
    let payload = bytes::Bytes::from(vec![b'p'; 125]);
    let started = Instant::now();
    let mut peak = before;
    let mut sent = 0u64;
    let mut cut = false;
    while started.elapsed() < Duration::from_secs(6) {
        let mut failed = false;
        for _ in 0..256 {
            if flooder
                .socket
                .feed(Message::Ping(payload.clone()))
                .await
                .is_err()
            {
                failed = true;
                break;
            }
            sent += 1;
        }
        let flushed =
            tokio::time::timeout(Duration::from_millis(500), flooder.socket.flush()).await;
        peak = peak.max(server.rss_bytes());
        if failed || matches!(flushed, Ok(Err(_))) {
            cut = true;
            break;
        }
    }
    let grew = peak.saturating_sub(before);
    eprintln!("sent {sent} pings; RSS grew by {} MB", grew / 1_000_000);
    assert!(grew < 150_000_000, "RSS grew by {} MB", grew / 1_000_000);
    // The server ended the connection: the flood could not go on (before, it was answered
    // until the connect timeout, 10 s).
    assert!(cut, "the flooding connection was still open after 6 s");
    // Others are unaffected.
    let (mut peer, _) = WsPeer::connect(&server.addr, API_KEY).await;
    peer.send(json!({"type":"publish","id":1,"stream":"h:after","data":"fine"}))
        .await;
    assert_eq!(peer.expect("ack").await["id"], 1);
}

#[tokio::test]
async fn a_ping_flood_closes_with_1008() {
    let server = Server::start(&[]);
    let (mut peer, _) = WsPeer::connect(&server.addr, API_KEY).await;
    for _ in 0..150 {
        if peer
            .socket
            .send(Message::Ping(Default::default()))
            .await
            .is_err()
        {
            break;
        }
    }
    let end = loop {
        match peer.next_text(Duration::from_secs(10)).await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(end, Some(Err(WsEnd::Closed(Some((1008, _)))))),
        "{end:?}"
    );
}

/// A WebSocket client written by hand, so that flooding costs the test next to nothing: the
/// upgrade, then frames masked once and written as they are.
mod raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub async fn open(addr: &str) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.expect("tcp connect");
        let request = format!(
            "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: spool.v1.json\r\n\r\n"
        );
        s.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.expect("upgrade answer");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        s
    }

    /// A masked text frame carrying `payload`.
    pub fn text(payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![0x81];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// Reads frames until the server's close frame; returns its code (`None` when the
    /// connection ended without one).
    pub async fn close_code(s: &mut (impl AsyncReadExt + Unpin)) -> Option<u16> {
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.ok()?;
            let len = match h[1] & 0x7f {
                126 => {
                    let mut l = [0u8; 2];
                    s.read_exact(&mut l).await.ok()?;
                    u16::from_be_bytes(l) as usize
                }
                127 => {
                    let mut l = [0u8; 8];
                    s.read_exact(&mut l).await.ok()?;
                    u64::from_be_bytes(l) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.ok()?;
            if h[0] & 0x0f == 0x8 {
                return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
    }

    /// The next text frame from the server (control frames are skipped); `None` at a close.
    pub async fn next_text(s: &mut (impl AsyncReadExt + Unpin)) -> Option<String> {
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.ok()?;
            let len = match h[1] & 0x7f {
                126 => {
                    let mut l = [0u8; 2];
                    s.read_exact(&mut l).await.ok()?;
                    u16::from_be_bytes(l) as usize
                }
                127 => {
                    let mut l = [0u8; 8];
                    s.read_exact(&mut l).await.ok()?;
                    u64::from_be_bytes(l) as usize
                }
                n => n as usize,
            };
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.ok()?;
            match h[0] & 0x0f {
                0x1 => return Some(String::from_utf8_lossy(&payload).into_owned()),
                0x8 => return None,
                _ => continue,
            }
        }
    }
}

/// The engine stalls (its Redis is stopped) while a client keeps sending 2 MB publishes and
/// reads no ack: the server must stop reading at the in-flight bound instead of holding every
/// publish it can read. (Any engine slower than the client shows it; a stopped Redis is one
/// a test can make on demand.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_waiting_for_acks_are_bounded_in_bytes() {
    use tokio::io::AsyncWriteExt;
    let Some(redis) = OwnServer::start(Backend::Redis) else {
        return;
    };
    let url = redis.url();
    let server = Server::spawn(
        "127.0.0.1:0",
        &["--engine", "redis", "--redis-url", &url],
        &[
            "--engine-timeout",
            "120s",
            "--max-payload",
            "2MiB",
            "--history-limit",
            "4",
        ],
    );
    const N: u64 = 150;
    let mut socket = raw::open(&server.addr).await;
    let connect = json!({"type":"connect","token":API_KEY}).to_string();
    socket
        .write_all(&raw::text(connect.as_bytes()))
        .await
        .unwrap();
    let connected = raw::next_text(&mut socket).await.expect("connected");
    assert!(connected.contains(r#""type":"connected""#), "{connected}");
    let (mut reader, mut writer) = socket.into_split();
    let frame = raw::text(
        json!({"type":"publish","stream":"h:big","data":"x".repeat(2_000_000)})
            .to_string()
            .as_bytes(),
    );
    let before = server.rss_bytes();
    redis.signal("-STOP");
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let sender = tokio::spawn(async move {
        for _ in 0..N {
            if writer.write_all(&frame).await.is_err() {
                break;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
        writer
    });
    // Read no ack for a while; the server's memory must stay bounded meanwhile.
    let mut peak = before;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) && !sender.is_finished() {
        peak = peak.max(server.rss_bytes());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let grew = peak.saturating_sub(before);
    eprintln!(
        "{} publishes sent while the engine stalled and no ack was read; RSS grew by {} MB",
        sent.load(Ordering::Relaxed),
        grew / 1_000_000,
    );
    assert!(grew < 150_000_000, "RSS grew by {} MB", grew / 1_000_000);

    // Backpressure, not an error: once the engine is back, every publish is acked.
    redis.signal("-CONT");
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked < N {
        let text = tokio::time::timeout_at(deadline, raw::next_text(&mut reader))
            .await
            .expect("acks in time")
            .expect("the connection stays open");
        if text.contains(r#""type":"ack""#) {
            acked += 1;
        } else {
            assert!(text.contains(r#""type":"ping""#), "unexpected frame {text}");
        }
    }
    let _writer = sender.await.unwrap();
}

#[tokio::test]
async fn a_browser_origin_must_be_listed_even_when_it_is_the_host() {
    let server = Server::start(&["--allow-anonymous"]);
    let own = format!("http://{}", server.addr);
    for origin in [own.as_str(), "http://localhost", "null"] {
        let host = server.addr.as_str();
        let (status, body) = WsPeer::open(&server.addr, &[("origin", origin), ("host", host)])
            .await
            .err()
            .unwrap_or_else(|| panic!("origin {origin} was let in"));
        assert_eq!(status, 403, "{origin}");
        assert!(body.contains("origin_not_allowed"), "{body}");
    }
    // Clients that are not browsers send no Origin.
    let (_, connected) = connect_with(&server.addr, json!({})).await;
    assert_eq!(connected["type"], "connected", "{connected}");

    // Listed (or `*`): in; the server's own origin is still not listed.
    let listed = Server::start(&["--allow-anonymous", "--cors-origin", "https://app.example"]);
    assert!(
        WsPeer::open(&listed.addr, &[("origin", "https://app.example")])
            .await
            .is_ok()
    );
    let own = format!("http://{}", listed.addr);
    let refused = WsPeer::open(&listed.addr, &[("origin", own.as_str())]).await;
    assert_eq!(refused.err().map(|e| e.0), Some(403));
    let any = Server::start(&["--allow-anonymous", "--cors-origin", "*"]);
    assert!(
        WsPeer::open(&any.addr, &[("origin", "https://anything.example")])
            .await
            .is_ok()
    );
}
