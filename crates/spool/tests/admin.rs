//! The stream administration API through the real binary (docs/http-api.md, "Stream
//! administration"): deny by default (API key, or a token's `admin` claim), listing streams
//! with their figures in cursor pages, deleting a stream (its readers get a reset, the next
//! publish starts a new epoch), truncating one (readers behind get `history_expired`),
//! disconnecting a session and every connection of an identity, and reads of unknown streams
//! that leave no state behind. The memory engine, and the disk engine across a restart.

mod common;

use std::time::Duration;

use common::{API_KEY, Server, WsPeer, enc, jwt, now_secs};
use serde_json::{Value, json};

fn token(claims: Value) -> String {
    let mut claims = claims;
    claims["exp"] = json!(now_secs() + 3600);
    jwt(claims)
}

async fn call(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    credential: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = server.http.request(method, server.url(path));
    if let Some(c) = credential {
        request = request.bearer_auth(c);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn get(server: &Server, path: &str, credential: Option<&str>) -> (u16, Value) {
    call(server, reqwest::Method::GET, path, credential, None).await
}

#[tokio::test]
async fn administration_is_denied_by_default() {
    let server = Server::start(&[]);
    server.publish("a/1", "x").await;
    let reader = token(json!({"sub": "r", "subscribe": ["*"], "publish": ["*"], "consume": ["*"]}));
    let narrow = token(json!({"sub": "n", "admin": ["a/*"]}));
    for credential in [None, Some(reader.as_str())] {
        let want = if credential.is_none() { 401 } else { 403 };
        assert_eq!(get(&server, "/v1/streams", credential).await.0, want);
        let (status, _) = call(
            &server,
            reqwest::Method::DELETE,
            "/v1/streams/a%2F1",
            credential,
            None,
        )
        .await;
        assert_eq!(status, want);
        let (status, _) = call(
            &server,
            reqwest::Method::POST,
            "/v1/streams/a%2F1/truncate",
            credential,
            Some(json!({"before": 2})),
        )
        .await;
        assert_eq!(status, want);
        for (method, path) in [
            (reqwest::Method::DELETE, "/v1/sessions/abc"),
            (reqwest::Method::POST, "/v1/identities/u1/disconnect"),
        ] {
            assert_eq!(call(&server, method, path, credential, None).await.0, want);
        }
    }
    // A token with an admin claim for some streams: those only, and no disconnects.
    let (status, body) = call(
        &server,
        reqwest::Method::DELETE,
        "/v1/streams/b",
        Some(&narrow),
        None,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(
        call(
            &server,
            reqwest::Method::DELETE,
            "/v1/sessions/abc",
            Some(&narrow),
            None
        )
        .await
        .0,
        403
    );
    // Anonymous access never administers.
    let open = Server::start(&["--allow-anonymous"]);
    assert_eq!(get(&open, "/v1/streams", None).await.0, 403);
    // The stream is untouched.
    assert_eq!(server.info_status("a/1").await, 200);
}

#[tokio::test]
async fn streams_are_listed_with_their_figures_in_pages() {
    let server = Server::start(&[]);
    for name in ["b/1", "a/3", "a/1", "a/2", "a/5", "a/4"] {
        server.publish(name, "hello").await;
    }
    server.publish("a/1", "world!").await;
    // A reader on a/1 counts as a subscriber.
    let sse = server
        .http
        .get(server.url("/v1/streams/a%2F1/events?after=now"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);

    let mut names = Vec::new();
    let mut cursor = String::new();
    for page in 0.. {
        assert!(page < 10, "pages end");
        let (status, body) = get(
            &server,
            &format!("/v1/streams?prefix=a/&limit=2&cursor={}", enc(&cursor)),
            Some(API_KEY),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let streams = body["streams"].as_array().unwrap();
        assert!(streams.len() <= 2);
        names.extend(
            streams
                .iter()
                .map(|s| s["stream"].as_str().unwrap().to_owned()),
        );
        match body["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => break,
        }
    }
    assert_eq!(names, ["a/1", "a/2", "a/3", "a/4", "a/5"]);

    let (_, body) = get(&server, "/v1/streams?prefix=a/1", Some(API_KEY)).await;
    let a1 = &body["streams"][0];
    assert_eq!(a1["stream"], "a/1");
    assert_eq!(a1["head"], 2);
    assert_eq!(a1["oldest"], 1);
    assert!(a1["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(a1["retained_messages"], 2);
    assert!(a1["retained_bytes"].as_u64().unwrap() >= 11);
    assert!(a1["last_publish_ms"].as_u64().unwrap() > 1_600_000_000_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = get(&server, "/v1/streams/a%2F1", Some(API_KEY)).await;
        if body["subscribers"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "one subscriber: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(sse);

    // A token sees the streams its admin patterns match.
    let narrow = token(json!({"sub": "n", "admin": ["b/*"]}));
    let (status, body) = get(&server, "/v1/streams", Some(&narrow)).await;
    assert_eq!(status, 200);
    let seen: Vec<&str> = body["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap())
        .collect();
    assert_eq!(seen, ["b/1"]);
    // A reader's view of one stream has no admin figures.
    let reader = token(json!({"sub": "r", "subscribe": ["*"]}));
    let (_, body) = get(&server, "/v1/streams/a%2F1", Some(&reader)).await;
    assert_eq!(body["head"], 2);
    assert!(body.get("retained_messages").is_none(), "{body}");

    // Bad parameters.
    for query in ["limit=0", "limit=1001", "limit=x", "cursor=%00bad"] {
        let (status, body) = get(&server, &format!("/v1/streams?{query}"), Some(API_KEY)).await;
        assert_eq!(status, 400, "{query}: {body}");
    }
}

#[tokio::test]
async fn deleting_a_stream_resets_its_readers_and_starts_a_new_epoch() {
    let server = Server::start(&[]);
    let mut epoch = String::new();
    for i in 0..3 {
        epoch = server.publish("doomed", &format!("m{i}")).await["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    // A long-poll waiting at the head when the stream is deleted.
    let waiting = {
        let http = server.http.clone();
        let url = server.url(&format!(
            "/v1/streams/doomed/messages?after={epoch}:3&wait=20"
        ));
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(API_KEY).send().await.unwrap();
            r.json::<Value>().await.unwrap()
        })
    };
    // Waiting indeed (on a loaded machine 300 ms of sleep did not make sure of it).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server
        .metric(r#"spool_connections{transport="poll"}"#)
        .await
        != Some(1.0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the long-poll did not reach the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = call(
        &server,
        reqwest::Method::DELETE,
        "/v1/streams/doomed",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], true);
    let answer = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("the waiting reader is answered")
        .unwrap();
    assert_eq!(answer["reset"]["reason"], "unknown_stream", "{answer}");
    assert_eq!(server.info_status("doomed").await, 404);
    let (status, _) = call(
        &server,
        reqwest::Method::DELETE,
        "/v1/streams/doomed",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 404, "deleted once");
    // A reader coming back with its position gets a reset too.
    let (_, poll) = server.poll("doomed", &format!("after={epoch}:2")).await;
    assert!(poll["reset"]["reason"].is_string(), "{poll}");
    // The next publish starts a new epoch at offset 1.
    let again = server.publish("doomed", "reborn").await;
    assert_eq!(again["offset"], 1);
    assert_ne!(again["epoch"], epoch.as_str());
    assert_eq!(
        server
            .metric("spool_admin_actions_total{action=\"delete\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn truncating_drops_older_history() {
    let server = Server::start(&[]);
    let mut epoch = String::new();
    for i in 1..=10 {
        epoch = server.publish("t", &format!("m{i}")).await["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    let (status, body) = call(
        &server,
        reqwest::Method::POST,
        "/v1/streams/t/truncate",
        Some(API_KEY),
        Some(json!({"before": 6})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["oldest"].as_u64(), body["head"].as_u64()),
        (Some(6), Some(10))
    );
    assert_eq!(body["epoch"], epoch.as_str());
    let (_, behind) = server.poll("t", &format!("after={epoch}:2")).await;
    assert_eq!(behind["reset"]["reason"], "history_expired", "{behind}");
    let (_, kept) = server.poll("t", &format!("after={epoch}:5")).await;
    let offsets: Vec<u64> = kept["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [6, 7, 8, 9, 10]);
    // Bad bodies and unknown streams.
    for bad in [
        json!({}),
        json!({"before": "x"}),
        json!({"before": 1, "more": 1}),
    ] {
        let (status, body) = call(
            &server,
            reqwest::Method::POST,
            "/v1/streams/t/truncate",
            Some(API_KEY),
            Some(bad.clone()),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = call(
        &server,
        reqwest::Method::POST,
        "/v1/streams/none/truncate",
        Some(API_KEY),
        Some(json!({"before": 1})),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn sessions_and_identities_are_disconnected() {
    let server = Server::start(&[]);
    let alice = token(json!({"sub": "alice", "subscribe": ["*"]}));
    let bob = token(json!({"sub": "bob", "subscribe": ["*"]}));
    let (mut a1, _) = WsPeer::connect(&server.addr, &alice).await;
    let (mut a2, _) = WsPeer::connect(&server.addr, &alice).await;
    let (mut b, connected) = WsPeer::connect(&server.addr, &bob).await;
    let bob_session = connected["session"].as_str().unwrap().to_owned();

    let (status, body) = call(
        &server,
        reqwest::Method::POST,
        "/v1/identities/alice/disconnect",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["disconnected"], 2);
    for peer in [&mut a1, &mut a2] {
        let (code, _) = peer.closed().await;
        assert_eq!(code, 4009);
    }
    // Bob is still connected.
    b.send(json!({"type": "subscribe", "id": 1, "stream": "s"}))
        .await;
    b.expect("subscribed").await;

    let (status, body) = call(
        &server,
        reqwest::Method::DELETE,
        &format!("/v1/sessions/{bob_session}"),
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["disconnected"], 1);
    assert_eq!(b.closed().await.0, 4009);
    // The session is forgotten: it cannot be resumed.
    let (_again, connected) =
        common::connect_with(&server.addr, json!({"token": bob, "session": bob_session})).await;
    assert_ne!(connected["resumed"], true, "{connected}");
    assert_ne!(connected["session"], bob_session.as_str(), "{connected}");
    let (status, body) = call(
        &server,
        reqwest::Method::DELETE,
        "/v1/sessions/no-such-session",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!((status, &body["disconnected"]), (200, &json!(0)));
}

/// Reads of streams nothing was published to leave no state that stays: they create no
/// stream, their placeholders are bounded by --max-unpublished-streams (idle ones dropped to
/// make room) and go after their linger, and memory does not grow with them.
#[tokio::test]
async fn reads_of_unknown_streams_leave_no_state() {
    let server = Server::start(&["--max-unpublished-streams", "100"]);
    let read_many = |from: usize| {
        let server = &server;
        async move {
            for i in from..from + 1000 {
                let (status, body) = server.poll(&format!("ghost/{i}"), "after=oldest").await;
                assert_eq!(status, 200, "{body}");
            }
        }
    };
    read_many(0).await;
    let rss_after_first = server.rss_bytes();
    for round in 1..4 {
        read_many(round * 1000).await;
    }
    assert_eq!(
        server.metric("spool_streams ").await,
        Some(0.0),
        "no stream created"
    );
    let unpublished = server.metric("spool_unpublished_streams ").await.unwrap();
    assert!(unpublished <= 100.0, "bounded: {unpublished}");
    let (_, listed) = get(&server, "/v1/streams", Some(API_KEY)).await;
    assert_eq!(listed["streams"], json!([]));
    let rss = server.rss_bytes();
    assert!(
        rss < rss_after_first + 8 * 1024 * 1024,
        "3,000 more reads of unknown streams grew memory from {rss_after_first} to {rss}"
    );
}

/// On the disk engine (the default), a delete and a truncate are durable: after a restart the
/// deleted stream is still gone (its next publish starts a new epoch) and the truncated one
/// still starts at the floor.
#[tokio::test]
async fn on_disk_deletes_and_truncations_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_disk("127.0.0.1:0", dir.path(), &[]);
    let mut doomed_epoch = String::new();
    for i in 1..=5 {
        doomed_epoch = server.publish("doomed", &format!("d{i}")).await["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
        server.publish("cut", &format!("c{i}")).await;
    }
    let (status, _) = call(
        &server,
        reqwest::Method::DELETE,
        "/v1/streams/doomed",
        Some(API_KEY),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = call(
        &server,
        reqwest::Method::POST,
        "/v1/streams/cut/truncate",
        Some(API_KEY),
        Some(json!({"before": 4})),
    )
    .await;
    assert_eq!((status, &body["oldest"]), (200, &json!(4)), "{body}");
    assert!(server.terminate().success());

    let server = Server::start_disk("127.0.0.1:0", dir.path(), &[]);
    assert_eq!(server.info_status("doomed").await, 404);
    let (_, listed) = get(&server, "/v1/streams", Some(API_KEY)).await;
    let names: Vec<&str> = listed["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cut"]);
    assert_eq!(listed["streams"][0]["oldest"], 4);
    assert_eq!(listed["streams"][0]["retained_messages"], 2);
    let again = server.publish("doomed", "reborn").await;
    assert_eq!(again["offset"], 1);
    assert_ne!(again["epoch"], doomed_epoch.as_str());
}
