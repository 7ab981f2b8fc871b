//! SPEC §2 against the real binary: ordering and no holes under concurrent publishers, resume
//! from every kind of position, SSE replay-then-live (also while publishes race the replay),
//! multi-stream SSE, long-poll wake-up, and the reconnect event on shutdown.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{API_KEY, Server, SseClient};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

/// Reads the whole stream with long-polls from `after`, following `position`.
async fn read_all(s: &Server, stream: &str, mut after: String) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let (status, body) = s.poll(stream, &format!("after={after}&limit=1000")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["reset"].is_null(), "unexpected reset {body}");
        let messages = body["messages"].as_array().unwrap().clone();
        after = body["position"].as_str().unwrap().to_owned();
        if messages.is_empty() {
            return out;
        }
        out.extend(messages);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_messages_from_concurrent_publishers_have_no_holes() {
    const PUBLISHERS: usize = 20;
    const EACH: usize = 500;
    let s = Server::start(&[]);
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let http = s.http.clone();
        let url = s.url("/v1/streams/load/messages");
        tasks.push(tokio::spawn(async move {
            let mut offsets = Vec::with_capacity(EACH);
            for i in 0..EACH {
                let r: Value = http
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .body(format!("{p}-{i}"))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                offsets.push(r["offset"].as_u64().unwrap());
            }
            offsets
        }));
    }
    let mut acked: HashMap<u64, String> = HashMap::new();
    for (p, task) in tasks.into_iter().enumerate() {
        let offsets = task.await.unwrap();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "a publisher's acks must be in its own order"
        );
        for (i, o) in offsets.into_iter().enumerate() {
            assert!(
                acked.insert(o, format!("{p}-{i}")).is_none(),
                "offset {o} given twice"
            );
        }
    }
    let all = read_all(&s, "load", "oldest".into()).await;
    assert_eq!(all.len(), PUBLISHERS * EACH);
    for (i, m) in all.iter().enumerate() {
        let offset = m["offset"].as_u64().unwrap();
        assert_eq!(offset, i as u64 + 1, "offsets are 1..N with no hole");
        assert_eq!(
            m["data"].as_str().unwrap(),
            acked[&offset],
            "payload at offset {offset}"
        );
    }
}

#[tokio::test]
async fn resume_from_every_kind_of_position() {
    let s = Server::start(&["--history-limit", "5"]);
    for i in 1..=8 {
        s.publish("res", &i.to_string()).await;
    }
    let epoch = s.publish("res", "9").await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    // Retained: 5..=9.

    // Exact: everything after it, nothing else.
    let (_, body) = s.poll("res", &format!("after={epoch}:6")).await;
    let offsets: Vec<u64> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [7, 8, 9]);
    assert!(body["reset"].is_null());
    assert_eq!(body["position"], format!("{epoch}:9"));
    assert_eq!(body["head"], format!("{epoch}:9"));

    // The oldest retained boundary: after 4 needs 5.., which is retained.
    let (_, body) = s.poll("res", &format!("after={epoch}:4")).await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 5);

    let expect_reset = |body: &Value, reason: &str| {
        assert_eq!(body["reset"]["reason"], reason, "{body}");
        assert_eq!(body["reset"]["position"], format!("{epoch}:9"), "{body}");
        assert_eq!(body["position"], format!("{epoch}:9"), "{body}");
        assert!(
            body["messages"].as_array().unwrap().is_empty(),
            "nothing before the reset {body}"
        );
    };
    let (_, body) = s.poll("res", &format!("after={epoch}:3")).await;
    expect_reset(&body, "history_expired");
    let (_, body) = s.poll("res", "after=someOldEpoch:7").await;
    expect_reset(&body, "epoch_changed");
    let (_, body) = s.poll("res", &format!("after={epoch}:12")).await;
    expect_reset(&body, "epoch_changed");

    // After a reset the reader continues from the head it was given.
    s.publish("res", "10").await;
    let (_, body) = s.poll("res", &format!("after={epoch}:9")).await;
    assert_eq!(body["messages"][0]["offset"], 10);

    // Keywords.
    let (_, body) = s.poll("res", "after=oldest").await;
    assert_eq!(body["messages"][0]["offset"], 6);
    let (_, body) = s.poll("res", "after=latest").await;
    assert_eq!(body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(body["messages"][0]["offset"], 10);
    let (_, body) = s.poll("res", "after=now").await;
    assert!(body["messages"].as_array().unwrap().is_empty());
    assert_eq!(body["position"], format!("{epoch}:10"));

    // An empty stream: a reader learns a position to resume from, then gets the first message.
    let (_, body) = s.poll("empty", "after=now").await;
    let pos = body["position"].as_str().unwrap().to_owned();
    assert!(pos.ends_with(":0"), "{pos}");
    let (_, body) = s.poll("empty", &format!("after={pos}")).await;
    assert!(body["reset"].is_null() && body["messages"].as_array().unwrap().is_empty());
    s.publish("empty", "first").await;
    let (_, body) = s.poll("empty", &format!("after={pos}")).await;
    assert_eq!(body["messages"][0]["offset"], 1);

    // A position on a stream this server has no history for.
    let (_, body) = s.poll("unknown", "after=gone:42").await;
    assert_eq!(body["reset"]["reason"], "unknown_stream", "{body}");
    assert!(body["reset"]["position"].as_str().unwrap().ends_with(":0"));
}

#[tokio::test]
async fn a_server_restart_on_the_memory_engine_is_a_reset_not_a_gap() {
    let port = common::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut s = Server::start_on(&listen, &[]);
    s.publish("restart", "a").await;
    let before = s.publish("restart", "b").await;
    s.kill();
    let s = Server::start_on(&listen, &[]);
    let position = format!("{}:2", before["epoch"].as_str().unwrap());
    let (_, body) = s.poll("restart", &format!("after={position}")).await;
    assert_eq!(body["reset"]["reason"], "unknown_stream", "{body}");
    s.publish("restart", "c").await;
    let (_, body) = s.poll("restart", &format!("after={position}")).await;
    assert_eq!(body["reset"]["reason"], "epoch_changed", "{body}");
    assert_ne!(body["position"].as_str().unwrap(), position);
}

#[tokio::test]
async fn long_poll_wakes_up_on_publish() {
    let s = Server::start(&[]);
    let (_, body) = s.poll("wake", "after=now").await;
    let position = body["position"].as_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    let query = format!("after={position}&wait=20");
    let poll = s.poll("wake", &query);
    let publish = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.publish("wake", "ding").await
    };
    let ((status, body), _) = tokio::join!(poll, publish);
    assert_eq!(status, 200);
    assert_eq!(body["messages"][0]["data"], "ding");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woke on publish, not on timeout"
    );

    // With nothing to deliver it answers after `wait`, empty, with the same position.
    let started = std::time::Instant::now();
    let (_, body) = s
        .poll(
            "wake",
            &format!("after={}&wait=0.5", body["position"].as_str().unwrap()),
        )
        .await;
    assert!(body["messages"].as_array().unwrap().is_empty());
    assert!(started.elapsed() >= Duration::from_millis(450));
}

fn sse(s: &Server, path: &str) -> reqwest::RequestBuilder {
    s.http.get(s.url(path)).bearer_auth(API_KEY)
}

#[tokio::test]
async fn sse_replays_from_last_event_id_then_goes_live() {
    let s = Server::start(&[]);
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = s.publish("feed", &format!("m{i}")).await["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    let mut es = SseClient::connect(
        sse(&s, "/v1/streams/feed/events").header("last-event-id", format!("{epoch}:2")),
    )
    .await;
    for i in 3..=5 {
        let ev = es.next(T).await.unwrap();
        assert_eq!(ev.event, "message");
        assert_eq!(ev.id.as_deref(), Some(format!("{epoch}:{i}").as_str()));
        assert_eq!(ev.data, format!("m{i}"));
    }
    s.publish("feed", "live\nwith two lines").await;
    let ev = es.next(T).await.unwrap();
    assert_eq!(ev.id.as_deref(), Some(format!("{epoch}:6").as_str()));
    assert_eq!(ev.data, "live\nwith two lines");

    // Last-Event-ID wins over ?after= (EventSource reconnects to the original URL).
    let mut es = SseClient::connect(
        sse(&s, "/v1/streams/feed/events?after=oldest")
            .header("last-event-id", format!("{epoch}:5")),
    )
    .await;
    assert_eq!(
        es.next(T).await.unwrap().id.as_deref(),
        Some(format!("{epoch}:6").as_str())
    );

    // JSON format carries the whole message.
    let mut es = SseClient::connect(sse(
        &s,
        &format!("/v1/streams/feed/events?after={epoch}:5&format=json"),
    ))
    .await;
    let ev = es.next(T).await.unwrap();
    let m: Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(
        (m["offset"].as_u64(), m["epoch"].as_str()),
        (Some(6), Some(epoch.as_str()))
    );
}

#[tokio::test]
async fn sse_reset_comes_first_then_live_from_the_head() {
    let s = Server::start(&["--history-limit", "2"]);
    for i in 1..=5 {
        s.publish("trim", &i.to_string()).await;
    }
    let mut es =
        SseClient::connect(sse(&s, "/v1/streams/trim/events").header("last-event-id", "stale:1"))
            .await;
    let ev = es.next(T).await.unwrap();
    assert_eq!(ev.event, "reset");
    let reset: Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(reset["reason"], "epoch_changed");
    let head = reset["position"].as_str().unwrap().to_owned();
    assert!(head.ends_with(":5"));
    assert_eq!(
        ev.id.as_deref(),
        Some(head.as_str()),
        "the reset moves Last-Event-ID to the head"
    );
    s.publish("trim", "6").await;
    let ev = es.next(T).await.unwrap();
    assert_eq!(ev.data, "6");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishes_racing_a_replay_are_neither_lost_nor_reordered() {
    const BEFORE: u64 = 3000;
    const DURING: u64 = 2000;
    let s = Server::start(&[]);
    let lines: Vec<String> = (1..=BEFORE).map(|i| i.to_string()).collect();
    for chunk in lines.chunks(1000) {
        let messages: Vec<Value> = chunk
            .iter()
            .map(|d| serde_json::json!({"stream": "race", "data": d}))
            .collect();
        let r = s
            .http
            .post(s.url("/v1/publish"))
            .bearer_auth(API_KEY)
            .json(&serde_json::json!({"messages": messages}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let mut es = SseClient::connect(sse(&s, "/v1/streams/race/events?after=oldest")).await;
    let http = s.http.clone();
    let url = s.url("/v1/streams/race/messages");
    let publisher = tokio::spawn(async move {
        for i in BEFORE + 1..=BEFORE + DURING {
            let r = http
                .post(&url)
                .bearer_auth(API_KEY)
                .body(i.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    });
    for expected in 1..=BEFORE + DURING {
        let ev = es.next(T).await.expect("stream ended early");
        assert_eq!(ev.event, "message");
        let offset: u64 = ev
            .id
            .as_deref()
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .1
            .parse()
            .unwrap();
        assert_eq!(offset, expected, "gap, duplicate or reorder");
        assert_eq!(ev.data, expected.to_string());
    }
    publisher.await.unwrap();
}

#[tokio::test]
async fn multi_stream_sse_resumes_every_stream_from_one_event_id() {
    let s = Server::start(&[]);
    let ea = s.publish("ma", "a1").await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let eb = s.publish("m/b", "b1").await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = "/v1/events?stream=ma&stream=m%2Fb&after=oldest,oldest";
    let mut es = SseClient::connect(sse(&s, path)).await;
    let mut seen = HashMap::new();
    let mut last_id = String::new();
    for _ in 0..2 {
        let ev = es.next(T).await.unwrap();
        let m: Value = serde_json::from_str(&ev.data).unwrap();
        seen.insert(
            m["stream"].as_str().unwrap().to_owned(),
            m["data"].as_str().unwrap().to_owned(),
        );
        last_id = ev.id.unwrap();
    }
    assert_eq!(seen["ma"], "a1");
    assert_eq!(seen["m/b"], "b1");
    assert_eq!(last_id, format!("{ea}:1,{eb}:1"));
    drop(es);

    // Missed while disconnected: one message on each stream.
    s.publish("ma", "a2").await;
    s.publish("m/b", "b2").await;
    let mut es = SseClient::connect(sse(&s, path).header("last-event-id", &last_id)).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let m: Value = serde_json::from_str(&es.next(T).await.unwrap().data).unwrap();
        got.push(m["data"].as_str().unwrap().to_owned());
    }
    got.sort();
    assert_eq!(got, ["a2", "b2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_sends_sse_clients_a_reconnect_event_and_exits_cleanly() {
    let mut s = Server::start(&[]);
    s.publish("bye", "x").await;
    let mut es = SseClient::connect(sse(&s, "/v1/streams/bye/events?after=oldest")).await;
    assert_eq!(es.next(T).await.unwrap().data, "x");
    let status = tokio::task::block_in_place(|| s.terminate());
    let ev = es.next(T).await.expect("a final event");
    assert_eq!(ev.event, "reconnect");
    assert!(es.next(T).await.is_none(), "the stream ends after it");
    assert!(status.success(), "exit status {status}");
}
