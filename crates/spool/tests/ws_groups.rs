//! Consumer groups over the WebSocket protocol (docs/protocol.md "Consumer groups") against
//! the real binary: credit bounds what is pushed and settling returns it, settle answers per
//! receipt in order, a lease that runs out comes back, a disconnect or `stop_consuming` gives
//! the leases back at once, rights, clear refusals, and a member that does not read.
//!
//! Negative checks ("nothing more is pushed") wait a short, fixed moment: there is no event
//! to wait for when the server rightly does nothing. Everything else waits for frames.

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::{API_KEY, Server, WsPeer, enc, jwt, now_secs};
use serde_json::{Value, json};

/// How long "nothing more arrives" is watched.
const QUIET: Duration = Duration::from_millis(400);

async fn create_group(s: &Server, stream: &str, group: &str, settings: Value) {
    let r = s
        .http
        .put(s.url(&format!(
            "/v1/streams/{}/groups/{}",
            enc(stream),
            enc(group)
        )))
        .bearer_auth(API_KEY)
        .json(&settings)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

async fn group_info(s: &Server, stream: &str, group: &str) -> Value {
    s.http
        .get(s.url(&format!(
            "/v1/streams/{}/groups/{}",
            enc(stream),
            enc(group)
        )))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn publish_n(s: &Server, stream: &str, n: usize) {
    let messages = (1..=n)
        .map(|i| json!({"stream": stream, "data": format!("m{i}")}))
        .collect();
    s.publish_batch(messages).await;
}

/// The next frame that is not a heartbeat, waiting at most `within`; `None` when none came.
async fn next_within(peer: &mut WsPeer, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match peer.next_text(left).await? {
            Ok(text) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] != "ping" {
                    return Some(v);
                }
            }
            Err(e) => panic!("the connection ended: {e:?}"),
        }
    }
}

/// `n` leased frames.
async fn leased(peer: &mut WsPeer, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(peer.expect("leased").await);
    }
    out
}

async fn consume(peer: &mut WsPeer, id: u64, stream: &str, group: &str, credit: u32) -> Value {
    peer.send(
        json!({"type":"consume","id":id,"stream":stream,"group":group,
                     "consumer":format!("w{id}"),"credit":credit}),
    )
    .await;
    let c = peer.expect("consuming").await;
    assert_eq!(c["id"], id);
    c
}

fn receipts(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["receipt"].as_str().unwrap().to_owned())
        .collect()
}

fn offsets(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["offset"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn credit_bounds_what_is_pushed_and_settling_returns_it() {
    let s = Server::start(&[]);
    create_group(&s, "jobs", "g", json!({})).await;
    publish_n(&s, "jobs", 12).await;
    let (mut ws, _) = WsPeer::connect(&s.addr, API_KEY).await;
    let c = consume(&mut ws, 1, "jobs", "g", 3).await;
    assert_eq!(
        (
            c["stream"].as_str(),
            c["group"].as_str(),
            c["consumer"].as_str(),
            c["credit"].as_u64()
        ),
        (Some("jobs"), Some("g"), Some("w1"), Some(3))
    );

    let first = leased(&mut ws, 3).await;
    assert_eq!(offsets(&first), [1, 2, 3]);
    for f in &first {
        assert_eq!(f["deliveries"], 1);
        assert_eq!(f["stream"], "jobs");
        assert_eq!(f["group"], "g");
        assert_eq!(f["data"], format!("m{}", f["offset"]));
        assert!(f["time"].as_u64().unwrap() > 0);
        assert!(f["epoch"].as_str().is_some());
    }
    assert_eq!(
        next_within(&mut ws, QUIET).await,
        None,
        "pushed beyond the credit"
    );
    assert_eq!(group_info(&s, "jobs", "g").await["stats"]["in_flight"], 3);

    // Acking two returns two credits: two more come.
    let r = receipts(&first);
    ws.send(json!({"type":"ack","id":2,"stream":"jobs","group":"g","receipts":[r[0],r[1]]}))
        .await;
    let settled = ws.expect("settled").await;
    assert_eq!(settled["id"], 2);
    assert_eq!(settled["op"], "ack");
    assert_eq!(
        settled["results"],
        json!([{"receipt": r[0], "result": "ok"}, {"receipt": r[1], "result": "ok"}])
    );
    let more = leased(&mut ws, 2).await;
    assert_eq!(offsets(&more), [4, 5]);
    assert_eq!(next_within(&mut ws, QUIET).await, None);

    // An extend returns nothing.
    ws.send(
        json!({"type":"extend","id":3,"stream":"jobs","group":"g","receipts":[r[2]],
                   "visibility_timeout":"60s"}),
    )
    .await;
    let settled = ws.expect("settled").await;
    assert_eq!(settled["results"][0]["result"], "ok");
    assert_eq!(
        next_within(&mut ws, QUIET).await,
        None,
        "an extend returned credit"
    );

    // A nack and a terminate do; so does raising the credit.
    let m = receipts(&more);
    ws.send(
        json!({"type":"nack","id":4,"stream":"jobs","group":"g","receipts":[m[0]],
                   "delay":"60s","reason":"later"}),
    )
    .await;
    assert_eq!(ws.expect("settled").await["results"][0]["result"], "ok");
    assert_eq!(offsets(&leased(&mut ws, 1).await), [6]);
    ws.send(
        json!({"type":"terminate","id":5,"stream":"jobs","group":"g","receipts":[m[1]],
                   "reason":"poison"}),
    )
    .await;
    assert_eq!(ws.expect("settled").await["results"][0]["result"], "ok");
    assert_eq!(offsets(&leased(&mut ws, 1).await), [7]);
    ws.send(json!({"type":"credit","id":6,"stream":"jobs","group":"g","credit":5}))
        .await;
    let c = ws.expect("consuming").await;
    assert_eq!((c["id"].as_u64(), c["credit"].as_u64()), (Some(6), Some(5)));
    assert_eq!(offsets(&leased(&mut ws, 2).await), [8, 9]);
    assert_eq!(next_within(&mut ws, QUIET).await, None);

    // The terminated message is in the dead-letter stream.
    let (status, dead) = s.poll("jobs.g.dead", "after=oldest&limit=10").await;
    assert_eq!(status, 200, "{dead}");
    let dead = dead["messages"].as_array().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["headers"]["spool-dead-detail"], "poison");

    // Credit 0 pauses: settling returns nothing to push.
    ws.send(json!({"type":"credit","id":7,"stream":"jobs","group":"g","credit":0}))
        .await;
    assert_eq!(ws.expect("consuming").await["credit"], 0);
    let info = group_info(&s, "jobs", "g").await;
    assert_eq!(info["stats"]["in_flight"], 5);
    assert_eq!(info["stats"]["members"][0]["consumer"], "w1");
}

#[tokio::test]
async fn settle_answers_each_receipt_in_order() {
    let s = Server::start(&[]);
    create_group(&s, "orders", "billing", json!({})).await;
    publish_n(&s, "orders", 3).await;
    let (mut ws, _) = WsPeer::connect(&s.addr, API_KEY).await;
    consume(&mut ws, 1, "orders", "billing", 3).await;
    let r = receipts(&leased(&mut ws, 3).await);

    ws.send(
        json!({"type":"ack","id":9,"stream":"orders","group":"billing",
                   "receipts":[r[2], "not-a-receipt", r[0], r[2]]}),
    )
    .await;
    let settled = ws.expect("settled").await;
    let results: Vec<(&str, &str)> = settled["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["receipt"].as_str().unwrap(),
                x["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            (r[2].as_str(), "ok"),
            ("not-a-receipt", "unknown"),
            (r[0].as_str(), "ok"),
            (r[2].as_str(), "expired"),
        ]
    );
    // Pipelined settles are answered in the order sent.
    for id in 10..20 {
        ws.send(
            json!({"type":"extend","id":id,"stream":"orders","group":"billing",
                       "receipts":[r[1]]}),
        )
        .await;
    }
    for id in 10..20 {
        let settled = ws.expect("settled").await;
        assert_eq!(settled["id"], id);
        assert_eq!(settled["results"][0]["result"], "ok");
    }
    ws.send(json!({"type":"ack","id":20,"stream":"orders","group":"billing","receipts":[r[1]]}))
        .await;
    assert_eq!(ws.expect("settled").await["results"][0]["result"], "ok");
    let stats = &group_info(&s, "orders", "billing").await["stats"];
    assert_eq!(
        (stats["acked"].as_u64(), stats["in_flight"].as_u64()),
        (Some(3), Some(0))
    );
}

#[tokio::test]
async fn a_lease_that_runs_out_returns_its_credit_and_comes_back() {
    let s = Server::start(&[]);
    create_group(&s, "q", "g", json!({"visibility_timeout": "1s"})).await;
    publish_n(&s, "q", 1).await;
    let (mut ws, _) = WsPeer::connect(&s.addr, API_KEY).await;
    consume(&mut ws, 1, "q", "g", 1).await;
    let first = ws.expect("leased").await;
    assert_eq!(first["deliveries"], 1);
    // Not settled: after the visibility timeout the credit is back and the message is leased
    // again (this member is the only one), with a new receipt.
    let again = ws.expect("leased").await;
    assert_eq!(
        (again["offset"].as_u64(), again["deliveries"].as_u64()),
        (Some(1), Some(2))
    );
    assert_ne!(again["receipt"], first["receipt"]);
    ws.send(json!({"type":"ack","id":2,"stream":"q","group":"g",
                   "receipts":[first["receipt"], again["receipt"]]}))
        .await;
    let settled = ws.expect("settled").await;
    assert_eq!(settled["results"][0]["result"], "expired");
    assert_eq!(settled["results"][1]["result"], "ok");
}

#[tokio::test]
async fn a_disconnect_gives_the_leases_back_at_once() {
    let s = Server::start(&[]);
    create_group(&s, "work", "g", json!({"visibility_timeout": "5m"})).await;
    publish_n(&s, "work", 5).await;
    let (mut a, _) = WsPeer::connect(&s.addr, API_KEY).await;
    consume(&mut a, 1, "work", "g", 10).await;
    let held = leased(&mut a, 5).await;
    let (mut b, _) = WsPeer::connect(&s.addr, API_KEY).await;
    consume(&mut b, 2, "work", "g", 10).await;
    assert_eq!(next_within(&mut b, QUIET).await, None, "b got a's leases");

    drop(a);
    // Given back at once (the visibility timeout is 5 minutes): b gets all five.
    let back = leased(&mut b, 5).await;
    let got: BTreeSet<u64> = offsets(&back).into_iter().collect();
    assert_eq!(got, offsets(&held).into_iter().collect());
    assert!(back.iter().all(|f| f["deliveries"] == 2), "{back:?}");
    b.send(json!({"type":"ack","id":3,"stream":"work","group":"g","receipts":receipts(&back)}))
        .await;
    let settled = b.expect("settled").await;
    assert!(
        settled["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["result"] == "ok")
    );
    let stats = &group_info(&s, "work", "g").await["stats"];
    assert_eq!(
        (stats["acked"].as_u64(), stats["in_flight"].as_u64()),
        (Some(5), Some(0))
    );
}

#[tokio::test]
async fn stop_consuming_answers_queued_settles_then_gives_the_rest_back() {
    let s = Server::start(&[]);
    create_group(&s, "work", "g", json!({"visibility_timeout": "5m"})).await;
    publish_n(&s, "work", 3).await;
    let (mut a, _) = WsPeer::connect(&s.addr, API_KEY).await;
    consume(&mut a, 1, "work", "g", 3).await;
    let held = leased(&mut a, 3).await;
    let r = receipts(&held);
    a.send(json!({"type":"ack","id":2,"stream":"work","group":"g","receipts":[r[0]]}))
        .await;
    a.send(json!({"type":"stop_consuming","id":3,"stream":"work","group":"g"}))
        .await;
    let settled = a.expect("settled").await;
    assert_eq!(
        (
            settled["id"].as_u64(),
            settled["results"][0]["result"].as_str()
        ),
        (Some(2), Some("ok"))
    );
    let stopped = a.expect("stopped").await;
    assert_eq!(
        stopped,
        json!({"type":"stopped","id":3,"stream":"work","group":"g"})
    );
    // Given back: another member gets the other two now.
    let (mut b, _) = WsPeer::connect(&s.addr, API_KEY).await;
    consume(&mut b, 1, "work", "g", 5).await;
    let back = leased(&mut b, 2).await;
    assert_eq!(offsets(&back), [2, 3]);
    assert!(back.iter().all(|f| f["deliveries"] == 2));
    // The stopped consume takes no more settles, and pushes nothing more.
    a.send(json!({"type":"ack","id":4,"stream":"work","group":"g","receipts":[r[1]]}))
        .await;
    let e = a.expect("error").await;
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(4), Some("invalid_parameter"))
    );
    publish_n(&s, "work", 1).await;
    assert_eq!(next_within(&mut a, QUIET).await, None);
    // Stopping what is not consumed is answered all the same; consuming again works.
    a.send(json!({"type":"stop_consuming","id":5,"stream":"work","group":"g"}))
        .await;
    assert_eq!(a.expect("stopped").await["id"], 5);
    consume(&mut a, 6, "work", "g", 1).await;
}

#[tokio::test]
async fn rights_and_missing_groups() {
    let s = Server::start(&[]);
    create_group(&s, "jobs", "g", json!({})).await;
    let exp = now_secs() + 600;
    let no_consume = jwt(json!({"sub":"u","exp":exp,"subscribe":["*"],"publish":["*"]}));
    let (mut ws, _) = WsPeer::connect(&s.addr, &no_consume).await;
    ws.send(json!({"type":"consume","id":1,"stream":"jobs","group":"g","consumer":"w","credit":1}))
        .await;
    let e = ws.expect("error").await;
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(1), Some("forbidden"))
    );

    let consumer = jwt(json!({"sub":"u","exp":exp,"consume":["jobs*"]}));
    let (mut ws, _) = WsPeer::connect(&s.addr, &consumer).await;
    consume(&mut ws, 1, "jobs", "g", 1).await;
    ws.send(
        json!({"type":"consume","id":2,"stream":"jobs","group":"nope","consumer":"w","credit":1}),
    )
    .await;
    let e = ws.expect("error").await;
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(2), Some("group_not_found"))
    );
    ws.send(
        json!({"type":"consume","id":3,"stream":"other","group":"g","consumer":"w","credit":1}),
    )
    .await;
    assert_eq!(ws.expect("error").await["code"], "forbidden");

    // A group deleted while consumed ends the consume, never silently.
    let r = s
        .http
        .delete(s.url("/v1/streams/jobs/groups/g"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    publish_n(&s, "jobs", 1).await;
    let stopped = ws.expect("stopped").await;
    assert_eq!(stopped["reason"], "group_not_found");
    assert_eq!(stopped["group"], "g");
}

#[tokio::test]
async fn bad_values_are_refused_with_the_request_id() {
    let s = Server::start(&[]);
    create_group(&s, "jobs", "g", json!({})).await;
    let (mut ws, _) = WsPeer::connect(&s.addr, API_KEY).await;
    let cases = [
        (
            json!({"type":"consume","id":1,"stream":"jobs","group":"g","consumer":"w","credit":1001}),
            "invalid_parameter",
        ),
        (
            json!({"type":"consume","id":2,"stream":"jobs","group":"g","consumer":"w","credit":1,"visibility_timeout":"13h"}),
            "invalid_parameter",
        ),
        (
            json!({"type":"consume","id":3,"stream":"jobs","group":"g","consumer":"","credit":1}),
            "invalid_parameter",
        ),
        (
            json!({"type":"consume","id":4,"stream":"jobs","group":"spool:x","consumer":"w","credit":1}),
            "invalid_group_name",
        ),
        (
            json!({"type":"consume","id":5,"stream":"","group":"g","consumer":"w","credit":1}),
            "invalid_stream_name",
        ),
        (
            json!({"type":"consume","id":6,"stream":"jobs","group":"g","consumer":"w","credit":-1}),
            "bad_frame",
        ),
        (
            json!({"type":"consume","id":7,"stream":"jobs","group":"g","consumer":"w"}),
            "bad_frame",
        ),
        (
            json!({"type":"credit","id":8,"stream":"jobs","group":"g","credit":1}),
            "invalid_parameter",
        ),
        (
            json!({"type":"ack","id":9,"stream":"jobs","group":"g","receipts":["x"]}),
            "invalid_parameter",
        ),
    ];
    for (frame, code) in cases {
        ws.send(frame.clone()).await;
        let e = ws.expect("error").await;
        assert_eq!(
            (&e["id"], e["code"].as_str()),
            (&frame["id"], Some(code)),
            "{frame} → {e}"
        );
    }
    consume(&mut ws, 10, "jobs", "g", 0).await;
    let cases = [
        (
            json!({"type":"consume","id":11,"stream":"jobs","group":"g","consumer":"w","credit":1}),
            "invalid_parameter",
        ),
        (
            json!({"type":"credit","id":12,"stream":"jobs","group":"g","credit":5000}),
            "invalid_parameter",
        ),
        (
            json!({"type":"ack","id":13,"stream":"jobs","group":"g","receipts":["x"],"delay":"1s"}),
            "invalid_parameter",
        ),
        (
            json!({"type":"extend","id":14,"stream":"jobs","group":"g","receipts":["x"],"reason":"r"}),
            "invalid_parameter",
        ),
        (
            json!({"type":"nack","id":15,"stream":"jobs","group":"g","receipts":["x"],"delay":"13h"}),
            "invalid_parameter",
        ),
        (
            json!({"type":"nack","id":16,"stream":"jobs","group":"g","receipts":["x"],"reason":""}),
            "invalid_parameter",
        ),
        (
            json!({"type":"ack","id":17,"stream":"jobs","group":"g","receipts":vec!["x"; 1001]}),
            "invalid_parameter",
        ),
    ];
    for (frame, code) in cases {
        ws.send(frame.clone()).await;
        let e = ws.expect("error").await;
        assert_eq!(
            (&e["id"], e["code"].as_str()),
            (&frame["id"], Some(code)),
            "{frame} → {e}"
        );
    }
    // At most 16 consumes per connection.
    for i in 0..15 {
        let group = format!("g{i}");
        create_group(&s, "jobs", &group, json!({})).await;
        consume(&mut ws, 100 + i, "jobs", &group, 0).await;
    }
    create_group(&s, "jobs", "g16", json!({})).await;
    ws.send(
        json!({"type":"consume","id":200,"stream":"jobs","group":"g16","consumer":"w","credit":1}),
    )
    .await;
    let e = ws.expect("error").await;
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(200), Some("limit_reached"))
    );
    // The connection is still fine.
    ws.send(json!({"type":"ping"})).await;
    assert_eq!(ws.expect("pong").await["type"], "pong");
}

/// A member that grants a large credit and reads nothing is bounded by its connection's
/// outbound buffer, closed as a slow consumer, and its leases go to another member at once.
#[tokio::test]
async fn a_member_that_does_not_read_is_a_slow_consumer() {
    const SIZE: usize = 16 * 1024;
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    // More than the socket buffers and the outbound buffer together can hold.
    let n = 600.max((wmem_max + (2 << 20)) / SIZE + 64).min(1000);
    let s = Server::start(&[
        "--stuck-timeout",
        "2s",
        "--ws-outbound-messages",
        "64",
        "--ws-outbound-bytes",
        "65536",
        "--ws-ping-interval",
        "300s",
    ]);
    create_group(&s, "big", "g", json!({"visibility_timeout": "10m"})).await;
    let payload = "x".repeat(SIZE);
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let messages = chunk
            .iter()
            .map(|_| json!({"stream": "big", "data": payload}))
            .collect();
        s.publish_batch(messages).await;
    }

    let mut stuck = WsPeer::open_small_rcvbuf(&s.addr, 4096).await;
    stuck.send(json!({"type":"connect","token":API_KEY})).await;
    stuck.expect("connected").await;
    consume(&mut stuck, 1, "big", "g", 1000).await;
    // It reads nothing more: closed once its buffer makes no progress for 2 s.
    let ws_connections = r#"spool_connections{transport="ws"}"#;
    let mut closed = false;
    let mut most_in_flight = 0;
    for _ in 0..150 {
        let info = group_info(&s, "big", "g").await;
        most_in_flight = most_in_flight.max(info["stats"]["in_flight"].as_u64().unwrap());
        if s.metric(ws_connections).await == Some(0.0) {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        closed,
        "the member that reads nothing was not closed within 15 s"
    );
    assert!(
        most_in_flight < n as u64,
        "it leased everything ({most_in_flight} of {n}): not bounded by its buffer"
    );
    eprintln!("the stuck member held at most {most_in_flight} of {n} leases");

    // Its leases are back at once (the visibility timeout is 10 minutes): another member
    // drains the whole stream, the stuck member's share with deliveries 2.
    let (mut b, _) = WsPeer::connect(&s.addr, API_KEY).await;
    consume(&mut b, 1, "big", "g", 100).await;
    let mut seen = BTreeSet::new();
    let mut redelivered = 0;
    while seen.len() < n {
        let frame = b
            .next(Duration::from_secs(10))
            .await
            .expect("b's connection ended");
        match frame["type"].as_str() {
            Some("leased") => {
                seen.insert(frame["offset"].as_u64().unwrap());
                if frame["deliveries"] == 2 {
                    redelivered += 1;
                }
                b.send(json!({"type":"ack","stream":"big","group":"g",
                              "receipts":[frame["receipt"]]}))
                    .await;
            }
            _ => assert_eq!(frame["type"], "settled", "{frame}"),
        }
    }
    assert!(
        redelivered > 0,
        "none of the stuck member's leases came back"
    );
    assert_eq!(seen.len(), n);
}

/// The Rust client's consume: leased events within the credit, acks answered per receipt,
/// and after a cut connection it consumes again by itself and gets the leases it held back.
#[tokio::test]
async fn the_rust_client_consumes_and_consumes_again_after_a_reconnect() {
    use spool_client::{Client, Config, Event};

    let s = Server::start(&[]);
    create_group(&s, "tasks", "g", json!({"visibility_timeout": "5m"})).await;
    publish_n(&s, "tasks", 3).await;
    let proxy = common::Proxy::start(&s.addr).await;
    let client = Client::connect(
        Config::new(format!("ws://{}/v1/ws", proxy.addr))
            .token(API_KEY)
            .backoff(Duration::from_millis(20), Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let next = || async {
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), client.next_event())
                .await
                .expect("timed out waiting for an event")
                .expect("the client closed");
            if let Event::Leased(leased) = event {
                return leased;
            }
        }
    };
    client.consume("tasks", "g", "rusty", 2).await.unwrap();
    let (a, b) = (next().await, next().await);
    assert_eq!((a.offset, b.offset, a.deliveries), (1, 2, 1));
    assert_eq!(a.payload().unwrap(), b"m1");
    let results = client
        .ack("tasks", "g", vec![a.receipt.clone(), "bogus".into()])
        .await
        .unwrap();
    let results: Vec<String> = results
        .iter()
        .map(|r| {
            serde_json::to_value(r.result)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(results, ["ok", "unknown"]);
    let c = next().await;
    assert_eq!(c.offset, 3);

    // Cut: the server gives 2 and 3 back; the client consumes again and gets them again.
    proxy.cut_all();
    let mut again = [next().await, next().await];
    again.sort_by_key(|l| l.offset);
    assert_eq!(
        again
            .iter()
            .map(|l| (l.offset, l.deliveries))
            .collect::<Vec<_>>(),
        [(2, 2), (3, 2)]
    );
    let results = client
        .ack(
            "tasks",
            "g",
            again.iter().map(|l| l.receipt.clone()).collect(),
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 2);
    client.stop_consuming("tasks", "g").await.unwrap();
    let stats = &group_info(&s, "tasks", "g").await["stats"];
    assert_eq!(
        (stats["acked"].as_u64(), stats["in_flight"].as_u64()),
        (Some(3), Some(0))
    );
    client.close().await;
}

#[tokio::test]
async fn a_refresh_without_the_consume_right_ends_the_consume_and_gives_its_leases_back() {
    let s = Server::start(&[]);
    create_group(&s, "jobs", "g", json!({"visibility_timeout": "5m"})).await;
    publish_n(&s, "jobs", 2).await;
    let exp = now_secs() + 600;
    let with = jwt(json!({"sub":"u","exp":exp,"consume":["jobs"],"subscribe":["*"]}));
    let without = jwt(json!({"sub":"u","exp":exp + 1,"subscribe":["*"]}));
    let (mut ws, _) = WsPeer::connect(&s.addr, &with).await;
    consume(&mut ws, 1, "jobs", "g", 2).await;
    let held = leased(&mut ws, 2).await;
    ws.send(json!({"type":"refresh","id":2,"token":without}))
        .await;
    assert_eq!(ws.expect("refreshed").await["id"], 2);
    let stopped = ws.expect("stopped").await;
    assert_eq!(
        stopped,
        json!({"type":"stopped","stream":"jobs","group":"g","reason":"forbidden"})
    );
    assert_eq!(group_info(&s, "jobs", "g").await["stats"]["in_flight"], 0);
    ws.send(json!({"type":"ack","id":3,"stream":"jobs","group":"g","receipts":receipts(&held)}))
        .await;
    assert_eq!(ws.expect("error").await["code"], "forbidden");
}

/// The same consume on the disk engine (`--durability fsync`), two members on two
/// connections: every message is pushed to exactly one of them, a `settled` ack is durable —
/// after a kill -9 and a restart no acked message is delivered again — and the leases that
/// were open come back (deliveries 2) once their visibility timeout has run out.
#[tokio::test]
async fn on_disk_consumes_share_a_group_and_settled_acks_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let flags = ["--durability", "fsync"];
    let mut s = Server::start_disk(&listen, dir.path(), &flags);
    create_group(&s, "jobs", "g", json!({"visibility_timeout": "2s"})).await;
    publish_n(&s, "jobs", 40).await;
    let (mut a, _) = WsPeer::connect(&s.addr, API_KEY).await;
    let (mut b, _) = WsPeer::connect(&s.addr, API_KEY).await;
    consume(&mut a, 1, "jobs", "g", 10).await;
    consume(&mut b, 2, "jobs", "g", 10).await;
    let from_a = leased(&mut a, 10).await;
    let from_b = leased(&mut b, 10).await;
    let mut all: Vec<u64> = offsets(&from_a);
    all.extend(offsets(&from_b));
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), 20, "a message leased twice: {all:?}");
    for f in from_a.iter().chain(&from_b) {
        assert_eq!(f["deliveries"], 1);
        assert_eq!(f["data"], format!("m{}", f["offset"]));
    }

    // `a` acks all it holds; `b` acks nothing.
    a.send(json!({"type":"ack","id":3,"stream":"jobs","group":"g","receipts":receipts(&from_a)}))
        .await;
    let settled = a.expect("settled").await;
    let results = settled["results"].as_array().unwrap();
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(|r| r["result"] == "ok"), "{settled}");
    let acked: BTreeSet<u64> = offsets(&from_a).into_iter().collect();
    let held: BTreeSet<u64> = offsets(&from_b).into_iter().collect();
    // The credit the acks returned brings `a` more (not yet acked when the server dies).
    let more: BTreeSet<u64> = offsets(&leased(&mut a, 10).await).into_iter().collect();
    assert!(more.is_disjoint(&distinct));
    s.kill();
    drop((a, b));

    let s = Server::start_disk(&listen, dir.path(), &flags);
    assert_eq!(group_info(&s, "jobs", "g").await["stats"]["acked"], 10);
    let (mut c, _) = WsPeer::connect(&s.addr, API_KEY).await;
    // Its own leases long, so that they do not run out while it waits for the old ones.
    c.send(
        json!({"type":"consume","id":1,"stream":"jobs","group":"g","consumer":"c",
                  "credit":100,"visibility_timeout":"60s"}),
    )
    .await;
    c.expect("consuming").await;
    // The 20 that were leased come back after the lease (2 s), the 10 never leased at once.
    let mut seen: Vec<(u64, u64)> = Vec::new();
    while seen.len() < 30 {
        let f = c.expect("leased").await;
        seen.push((
            f["offset"].as_u64().unwrap(),
            f["deliveries"].as_u64().unwrap(),
        ));
    }
    let extra = next_within(&mut c, QUIET).await;
    assert_eq!(
        extra, None,
        "more than the 30 unacked came back: {seen:?}, more {more:?}"
    );
    for (offset, deliveries) in &seen {
        assert!(!acked.contains(offset), "acked {offset} came back");
        let leased_before = held.contains(offset) || more.contains(offset);
        assert_eq!(*deliveries, if leased_before { 2 } else { 1 }, "{offset}");
    }
    let offsets: BTreeSet<u64> = seen.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets.len(), 30);
    assert_eq!(offsets.union(&acked).count(), 40);
}

/// A backlog drained by members that ack one message at a time, on the disk engine: each ack
/// of a member that has a backlog goes with its next receive as one group operation
/// (`Groups::settle_and_receive`), and that must keep every guarantee of the two apart. Three
/// members at credits 1, 2 and 5; some ack frames repeat a receipt or carry one that is not
/// theirs. Every message is leased to exactly one member, once, each member never holds more
/// than its credit, the acks are answered per receipt, and the group ends with everything
/// acked and nothing pending or in flight.
#[tokio::test]
async fn members_acking_one_by_one_drain_a_backlog_each_message_once_within_their_credit() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let s = Server::start_disk(&listen, dir.path(), &["--durability", "fsync"]);
    create_group(&s, "jobs", "g", json!({})).await;
    const N: usize = 300;
    publish_n(&s, "jobs", N).await;
    let credits = [1u32, 2, 5];
    let mut members = Vec::new();
    for (i, credit) in credits.iter().enumerate() {
        let (mut ws, _) = WsPeer::connect(&s.addr, API_KEY).await;
        consume(&mut ws, i as u64 + 1, "jobs", "g", *credit).await;
        members.push(ws);
    }
    let total = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (i, mut ws) in members.into_iter().enumerate() {
        let credit = credits[i] as usize;
        let total = total.clone();
        tasks.push(tokio::spawn(async move {
            let mut held: Vec<(u64, String)> = Vec::new();
            let mut acked: Vec<u64> = Vec::new();
            let mut id = 100u64;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while total.load(std::sync::atomic::Ordering::SeqCst) < N {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "not drained in time"
                );
                let Some(f) = next_within(&mut ws, Duration::from_millis(200)).await else {
                    continue;
                };
                match f["type"].as_str() {
                    Some("leased") => {
                        assert_eq!(f["deliveries"], 1, "{f}");
                        assert_eq!(f["data"], format!("m{}", f["offset"]));
                        held.push((
                            f["offset"].as_u64().unwrap(),
                            f["receipt"].as_str().unwrap().to_owned(),
                        ));
                        assert!(
                            held.len() <= credit,
                            "holds {} at credit {credit}",
                            held.len()
                        );
                    }
                    Some("settled") => {
                        let results = f["results"].as_array().unwrap();
                        assert_eq!(results[0]["result"], "ok", "{f}");
                        for r in &results[1..] {
                            assert_ne!(r["result"], "ok", "a repeated or foreign receipt: {f}");
                        }
                        continue;
                    }
                    other => panic!("unexpected frame {other:?}: {f}"),
                }
                // Ack the oldest held, one per frame; every seventh repeats it and adds one
                // that is not a receipt of this group.
                let (offset, receipt) = held.remove(0);
                id += 1;
                let receipts = if id.is_multiple_of(7) {
                    json!([receipt, receipt, "not-a-receipt"])
                } else {
                    json!([receipt])
                };
                ws.send(json!({"type":"ack","id":id,"stream":"jobs","group":"g",
                               "receipts":receipts}))
                    .await;
                acked.push(offset);
                total.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=N as u64).collect::<Vec<_>>(), "each message once");
    // The last acks' answers may still be on their way: poll the stats.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = group_info(&s, "jobs", "g").await["stats"].clone();
        if stats["acked"] == N && stats["in_flight"] == 0 && stats["pending"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
