//! Consumer groups (SPEC §7) against the real binary, on the memory and disk engines: leases
//! and visibility expiry, dead letters and redrive, key ordering, max_in_flight, nack delay,
//! extend, terminate, stats and metrics, per-receipt answers, and every refused request with
//! its status and code. Time-based cases use visibility timeouts of about a second and wait
//! with long-poll (the server wakes at the lease's end), never with fixed sleeps that decide
//! the outcome.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{API_KEY, Server, TestRng, enc, jwt, now_secs};
use serde_json::{Value, json};

/// Every engine whose group store the binary uses.
const ENGINES: [&str; 2] = ["memory", "disk"];

struct Node {
    server: Server,
    _dir: Option<tempfile::TempDir>,
}

fn start(engine: &str, extra: &[&str]) -> Node {
    match engine {
        "disk" => {
            let dir = tempfile::tempdir().unwrap();
            let server = Server::start_disk("127.0.0.1:0", dir.path(), extra);
            Node {
                server,
                _dir: Some(dir),
            }
        }
        _ => Node {
            server: Server::start(extra),
            _dir: None,
        },
    }
}

/// One group of one stream on one server, called with `credential`.
struct Group<'a> {
    s: &'a Server,
    stream: String,
    group: String,
    credential: String,
}

impl<'a> Group<'a> {
    fn new(s: &'a Server, stream: &str, group: &str) -> Self {
        Self {
            s,
            stream: stream.into(),
            group: group.into(),
            credential: API_KEY.into(),
        }
    }

    fn url(&self, tail: &str) -> String {
        self.s.url(&format!(
            "/v1/streams/{}/groups/{}{tail}",
            enc(&self.stream),
            enc(&self.group)
        ))
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> (u16, Value) {
        let r = r.bearer_auth(&self.credential).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    async fn put(&self, config: Value) -> (u16, Value) {
        self.send(self.s.http.put(self.url("")).json(&config)).await
    }

    async fn create(&self, config: Value) -> Value {
        let (status, body) = self.put(config).await;
        assert_eq!(status, 201, "{body}");
        body
    }

    async fn get(&self) -> (u16, Value) {
        self.send(self.s.http.get(self.url(""))).await
    }

    async fn post(&self, op: &str, body: Value) -> (u16, Value) {
        self.send(self.s.http.post(self.url(&format!("/{op}"))).json(&body))
            .await
    }

    /// A receive that must succeed: its messages.
    async fn receive(&self, consumer: &str, max: u32, wait: &str) -> Vec<Value> {
        let (status, body) = self
            .post(
                "receive",
                json!({"consumer": consumer, "max": max, "wait": wait}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["messages"].as_array().unwrap().clone()
    }

    /// A settle call that must succeed: the result per receipt.
    async fn settle(&self, op: &str, body: Value) -> Vec<String> {
        let (status, answer) = self.post(op, body).await;
        assert_eq!(status, 200, "{answer}");
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["result"].as_str().unwrap().to_owned())
            .collect()
    }

    async fn ack(&self, receipts: &[&Value]) -> Vec<String> {
        self.settle("ack", json!({ "receipts": receipts })).await
    }

    async fn stats(&self) -> Value {
        let (status, body) = self.get().await;
        assert_eq!(status, 200, "{body}");
        body["stats"].clone()
    }
}

fn offsets(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn an_unacked_message_comes_back_to_another_member_after_its_visibility_timeout() {
    for engine in ENGINES {
        let node = start(engine, &[]);
        let g = Group::new(&node.server, "orders", "billing");
        let created = g.create(json!({"visibility_timeout": "1s"})).await;
        assert_eq!(created["config"]["visibility_timeout"], "1s");
        assert_eq!(created["dead_letter"], "orders.billing.dead");
        node.server.publish("orders", "o-1").await;

        let first = g.receive("worker-1", 10, "0s").await;
        assert_eq!(first.len(), 1, "{engine}");
        assert_eq!(first[0]["deliveries"], 1);
        assert_eq!(first[0]["data"], "o-1");
        assert_eq!(first[0]["offset"], 1);
        // Hidden from everyone else while leased.
        assert!(g.receive("worker-2", 10, "0s").await.is_empty());

        // worker-1 never acks: the long-poll of worker-2 is woken by the lease's end.
        let started = Instant::now();
        let second = g.receive("worker-2", 10, "10s").await;
        assert_eq!(second.len(), 1, "{engine}");
        assert_eq!(second[0]["deliveries"], 2);
        assert_eq!(second[0]["offset"], 1);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "woken by the lease's end, not the wait: {:?}",
            started.elapsed()
        );
        assert_ne!(first[0]["receipt"], second[0]["receipt"]);
        // The old receipt can no longer settle anything; the new one can.
        assert_eq!(g.ack(&[&first[0]["receipt"]]).await, ["expired"]);
        assert_eq!(g.ack(&[&second[0]["receipt"]]).await, ["ok"]);
        assert_eq!(g.ack(&[&second[0]["receipt"]]).await, ["expired"]);

        let stats = g.stats().await;
        assert_eq!(stats["acked"], 1);
        assert_eq!(stats["redelivered"], 1);
        assert_eq!(stats["in_flight"], 0);
        assert_eq!(stats["pending"], 0);
        let members: BTreeMap<String, Value> = stats["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["consumer"].as_str().unwrap().to_owned(), m.clone()))
            .collect();
        assert_eq!(members["worker-1"]["timeouts"], 1);
        assert_eq!(members["worker-2"]["timeouts"], 0);
    }
}

#[tokio::test]
async fn a_poison_message_goes_to_the_dead_letter_stream_and_redrive_brings_it_back() {
    for engine in ENGINES {
        let node = start(engine, &[]);
        let s = &node.server;
        let g = Group::new(s, "jobs", "workers");
        g.create(json!({"max_deliveries": 3})).await;
        s.publish_batch(vec![json!({
            "stream": "jobs", "data": "poison", "key": "k1",
            "headers": {"trace": "t-1"}, "content_type": "text/plain"
        })])
        .await;
        for delivery in 1..=3u64 {
            let m = g.receive("w", 1, "5s").await;
            assert_eq!(m.len(), 1, "{engine}: delivery {delivery}");
            assert_eq!(m[0]["deliveries"], delivery);
            let results = g
                .settle(
                    "nack",
                    json!({"receipts": [m[0]["receipt"]], "reason": "cannot parse"}),
                )
                .await;
            assert_eq!(results, ["ok"]);
        }
        assert!(g.receive("w", 1, "0s").await.is_empty());

        let (status, dead) = s.poll("jobs.workers.dead", "after=oldest").await;
        assert_eq!(status, 200);
        let dead = &dead["messages"][0];
        assert_eq!(dead["data"], "poison", "{engine}: {dead}");
        assert_eq!(dead["key"], "k1");
        assert_eq!(dead["content_type"], "text/plain");
        let h = &dead["headers"];
        assert_eq!(h["trace"], "t-1", "the message's own headers are kept");
        assert_eq!(h["spool-dead-stream"], "jobs");
        assert_eq!(h["spool-dead-group"], "workers");
        assert_eq!(h["spool-dead-offset"], "1");
        assert_eq!(h["spool-dead-deliveries"], "3");
        assert_eq!(h["spool-dead-reason"], "cannot parse");
        assert!(
            h["spool-dead-epoch"]
                .as_str()
                .is_some_and(|e| !e.is_empty())
        );
        let stats = g.stats().await;
        assert_eq!(stats["dead_lettered"], 1);
        assert_eq!(stats["members"][0]["nacks"], 3);

        // Redrive: back into the stream as a new message, without the dead-letter headers.
        let (status, r) = g.post("redrive", json!({})).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            (
                r["moved"].as_u64(),
                r["skipped"].as_u64(),
                r["more"].as_bool()
            ),
            (Some(1), Some(0), Some(false))
        );
        assert_eq!(r["dead_letter"], "jobs.workers.dead");
        let again = g.receive("w", 1, "5s").await;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0]["offset"], 2);
        assert_eq!(again[0]["deliveries"], 1);
        assert_eq!(again[0]["data"], "poison");
        assert_eq!(again[0]["key"], "k1");
        assert_eq!(again[0]["headers"], json!({"trace": "t-1"}));
        assert_eq!(g.ack(&[&again[0]["receipt"]]).await, ["ok"]);
        // Nothing left to move, and the internal group is not listed.
        let (_, r) = g.post("redrive", json!({})).await;
        assert_eq!(r["moved"], 0);
        let (status, list) = g
            .send(s.http.get(s.url("/v1/streams/jobs.workers.dead/groups")))
            .await;
        assert_eq!(status, 200);
        assert_eq!(list["groups"], json!([]));
    }
}

#[tokio::test]
async fn terminate_dead_letters_at_once_with_its_reason_as_detail() {
    let node = start("memory", &[]);
    let s = &node.server;
    let g = Group::new(s, "t", "g");
    g.create(json!({"dead_letter": "t-dlq"})).await;
    s.publish("t", "x").await;
    let m = g.receive("w", 1, "0s").await;
    let results = g
        .settle(
            "terminate",
            json!({"receipts": [m[0]["receipt"]], "reason": "invalid order"}),
        )
        .await;
    assert_eq!(results, ["ok"]);
    let (_, dead) = s.poll("t-dlq", "after=oldest").await;
    let h = &dead["messages"][0]["headers"];
    assert_eq!(h["spool-dead-reason"], "terminated");
    assert_eq!(h["spool-dead-detail"], "invalid order");
    assert_eq!(h["spool-dead-deliveries"], "1");
}

#[tokio::test]
async fn key_ordering_holds_with_8_members_50_keys_and_random_delays() {
    let node = start("memory", &[]);
    let s = &node.server;
    let g = Group::new(s, "ordered", "g");
    g.create(json!({"ordering": "key", "visibility_timeout": "30s", "max_in_flight": 64}))
        .await;
    const KEYS: usize = 50;
    const PER_KEY: usize = 4;
    let messages: Vec<Value> = (0..KEYS * PER_KEY)
        .map(|i| json!({"stream": "ordered", "data": format!("m{i}"), "key": format!("k{}", i % KEYS)}))
        .collect();
    s.publish_batch(messages).await;

    let in_flight: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let acked: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut members = Vec::new();
    for w in 0..8 {
        let (in_flight, acked, violations) = (in_flight.clone(), acked.clone(), violations.clone());
        let http = s.http.clone();
        let base = g.url("");
        members.push(tokio::spawn(async move {
            let mut rng = TestRng::from_env("SPOOL_GROUPS_SEED");
            rng.next_u64();
            for _ in 0..w {
                rng.next_u64();
            }
            while Instant::now() < deadline {
                if acked.lock().unwrap().values().map(Vec::len).sum::<usize>() == KEYS * PER_KEY {
                    return;
                }
                let r: Value = http
                    .post(format!("{base}/receive"))
                    .bearer_auth(API_KEY)
                    .json(&json!({"consumer": format!("w{w}"), "max": 3, "wait": "1s"}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let batch = r["messages"].as_array().cloned().unwrap_or_default();
                for m in &batch {
                    let key = m["key"].as_str().unwrap().to_owned();
                    let offset = m["offset"].as_u64().unwrap();
                    if let Some(other) = in_flight.lock().unwrap().insert(key.clone(), offset) {
                        violations
                            .lock()
                            .unwrap()
                            .push(format!("{key}: {offset} leased while {other} was"));
                    }
                }
                for m in &batch {
                    tokio::time::sleep(Duration::from_millis(rng.range(0, 15))).await;
                    let key = m["key"].as_str().unwrap().to_owned();
                    let offset = m["offset"].as_u64().unwrap();
                    // Record before the ack is answered: the next of this key may be leased
                    // as soon as the ack is stored.
                    in_flight.lock().unwrap().remove(&key);
                    acked.lock().unwrap().entry(key).or_default().push(offset);
                    let r: Value = http
                        .post(format!("{base}/ack"))
                        .bearer_auth(API_KEY)
                        .json(&json!({"receipts": [m["receipt"]]}))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    assert_eq!(r["results"][0]["result"], "ok", "{r}");
                }
            }
        }));
    }
    for m in members {
        m.await.unwrap();
    }
    assert_eq!(*violations.lock().unwrap(), Vec::<String>::new());
    let acked = acked.lock().unwrap().clone();
    assert_eq!(
        acked.values().map(Vec::len).sum::<usize>(),
        KEYS * PER_KEY,
        "every message acked within the time bound"
    );
    for (key, offsets) in acked.iter() {
        assert!(offsets.is_sorted(), "{key} acked out of order: {offsets:?}");
        assert_eq!(offsets.len(), PER_KEY, "{key}");
    }
    assert_eq!(g.stats().await["acked"], (KEYS * PER_KEY) as u64);
}

#[tokio::test]
async fn max_in_flight_holds_back_and_an_ack_makes_room() {
    let node = start("memory", &[]);
    let s = &node.server;
    let g = Group::new(s, "bp", "g");
    g.create(json!({"max_in_flight": 2})).await;
    for i in 0..5 {
        s.publish("bp", &format!("m{i}")).await;
    }
    let first = g.receive("a", 10, "0s").await;
    assert_eq!(offsets(&first), [1, 2]);
    assert!(g.receive("b", 10, "0s").await.is_empty());
    let stats = g.stats().await;
    assert_eq!(
        (stats["in_flight"].as_u64(), stats["pending"].as_u64()),
        (Some(2), Some(3))
    );
    // A waiting receive is woken by the ack that makes room.
    let waiter = {
        let (http, url) = (s.http.clone(), g.url("/receive"));
        tokio::spawn(async move {
            let r: Value = http
                .post(url)
                .bearer_auth(API_KEY)
                .json(&json!({"consumer": "b", "max": 10, "wait": "10s"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(g.ack(&[&first[0]["receipt"]]).await, ["ok"]);
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiting receive answered after the ack")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(offsets(r["messages"].as_array().unwrap()), [3]);
}

#[tokio::test]
async fn nack_with_a_delay_hides_the_message_until_then() {
    let node = start("memory", &[]);
    let g = Group::new(&node.server, "n", "g");
    g.create(json!({})).await;
    node.server.publish("n", "x").await;
    let m = g.receive("a", 1, "0s").await;
    let started = Instant::now();
    let r = g
        .settle(
            "nack",
            json!({"receipts": [m[0]["receipt"]], "delay": "1s"}),
        )
        .await;
    assert_eq!(r, ["ok"]);
    assert!(
        g.receive("b", 1, "0s").await.is_empty(),
        "hidden during the delay"
    );
    let again = g.receive("b", 1, "10s").await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["deliveries"], 2);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // A nack without delay makes it visible at once.
    let r = g
        .settle("nack", json!({"receipts": [again[0]["receipt"]]}))
        .await;
    assert_eq!(r, ["ok"]);
    assert_eq!(g.receive("c", 1, "0s").await[0]["deliveries"], 3);
}

#[tokio::test]
async fn extend_keeps_a_lease_past_its_visibility_timeout() {
    let node = start("memory", &[]);
    let g = Group::new(&node.server, "e", "g");
    g.create(json!({"visibility_timeout": "1s"})).await;
    node.server.publish("e", "x").await;
    let m = g.receive("a", 1, "0s").await;
    let r = g
        .settle(
            "extend",
            json!({"receipts": [m[0]["receipt"]], "visibility_timeout": "5s"}),
        )
        .await;
    assert_eq!(r, ["ok"]);
    // Past the original second, nobody else gets it (the wait ends at 2 s).
    assert!(g.receive("b", 1, "2s").await.is_empty());
    assert_eq!(g.ack(&[&m[0]["receipt"]]).await, ["ok"]);
}

#[tokio::test]
async fn receipts_are_answered_one_by_one_in_order() {
    let node = start("memory", &[]);
    let s = &node.server;
    let a = Group::new(s, "r", "a");
    let b = Group::new(s, "r", "b");
    a.create(json!({})).await;
    b.create(json!({})).await;
    s.publish("r", "1").await;
    s.publish("r", "2").await;
    let from_a = a.receive("w", 2, "0s").await;
    let from_b = b.receive("w", 1, "0s").await;
    let results = a
        .ack(&[
            &from_a[0]["receipt"],
            &json!("not-a-receipt"),
            &from_b[0]["receipt"],
            &json!(""),
            &from_a[0]["receipt"],
            &from_a[1]["receipt"],
        ])
        .await;
    assert_eq!(
        results,
        ["ok", "unknown", "unknown", "unknown", "expired", "ok"],
        "a foreign or malformed receipt is unknown, a settled one expired"
    );
    // The other group's lease was not touched.
    assert_eq!(b.ack(&[&from_b[0]["receipt"]]).await, ["ok"]);
    // Too many receipts is the request's fault.
    let many: Vec<String> = (0..1001).map(|i| format!("r{i}")).collect();
    let (status, body) = a.post("ack", json!({ "receipts": many })).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
}

#[tokio::test]
async fn a_group_on_a_stream_nothing_was_published_to_waits_for_its_first_message() {
    for engine in ENGINES {
        let node = start(engine, &[]);
        let s = &node.server;
        let g = Group::new(s, "fresh", "g");
        let created = g.create(json!({"start": "latest"})).await;
        assert_eq!(created["stats"]["pending"], 0);
        assert!(g.receive("w", 1, "0s").await.is_empty());
        assert_eq!(
            s.info_status("fresh").await,
            404,
            "{engine}: reads create no stream"
        );
        let waiter = {
            let (http, url) = (s.http.clone(), g.url("/receive"));
            tokio::spawn(async move {
                let r: Value = http
                    .post(url)
                    .bearer_auth(API_KEY)
                    .json(&json!({"consumer": "w", "wait": "10s"}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                r
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.publish("fresh", "first").await;
        let r = tokio::time::timeout(Duration::from_secs(8), waiter)
            .await
            .expect("woken by the publish")
            .unwrap();
        assert_eq!(r["messages"][0]["data"], "first", "{engine}: {r}");
        assert_eq!(r["messages"][0]["offset"], 1);
    }
}

#[tokio::test]
async fn a_deleted_group_created_again_knows_no_old_receipt() {
    let node = start("memory", &[]);
    let s = &node.server;
    let g = Group::new(s, "d", "g");
    g.create(json!({})).await;
    s.publish("d", "x").await;
    let m = g.receive("w", 1, "0s").await;
    let (status, _) = g.send(s.http.delete(g.url(""))).await;
    assert_eq!(status, 204);
    let (status, body) = g.send(s.http.delete(g.url(""))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("group_not_found"))
    );
    let (status, _) = g.post("ack", json!({"receipts": [m[0]["receipt"]]})).await;
    assert_eq!(status, 404);
    g.create(json!({})).await;
    assert_eq!(g.ack(&[&m[0]["receipt"]]).await, ["unknown"]);
    // The new group starts again from the oldest message: the stream was not deleted.
    assert_eq!(g.receive("w", 1, "0s").await[0]["deliveries"], 1);
}

#[tokio::test]
async fn put_updates_what_it_names_and_lists_the_groups() {
    let node = start("memory", &[]);
    let s = &node.server;
    let g = Group::new(s, "u", "g");
    g.create(json!({"max_deliveries": 9, "backoff": ["1s", "5s"]}))
        .await;
    let (status, body) = g.put(json!({"max_in_flight": 7})).await;
    assert_eq!(status, 200, "{body}");
    let c = &body["config"];
    assert_eq!(
        (c["max_deliveries"].as_u64(), c["max_in_flight"].as_u64()),
        (Some(9), Some(7))
    );
    assert_eq!(c["backoff"], json!(["1s", "5s"]));
    Group::new(s, "u", "a").create(json!({})).await;
    let (status, list) = g.send(s.http.get(s.url("/v1/streams/u/groups"))).await;
    assert_eq!(status, 200);
    assert_eq!(
        list,
        json!({"stream": "u", "groups": [{"group": "a"}, {"group": "g"}]})
    );
}

#[tokio::test]
async fn stats_and_metrics_count_the_same() {
    let node = start("memory", &[]);
    let s = &node.server;
    let g = Group::new(s, "m", "g");
    g.create(json!({})).await;
    for i in 0..4 {
        s.publish("m", &format!("{i}")).await;
    }
    let got = g.receive("w1", 3, "0s").await;
    assert_eq!(
        g.ack(&[&got[0]["receipt"], &got[1]["receipt"]]).await,
        ["ok", "ok"]
    );
    let r = g
        .settle(
            "nack",
            json!({"receipts": [got[2]["receipt"]], "delay": "1h"}),
        )
        .await;
    assert_eq!(r, ["ok"]);
    let stats = g.stats().await;
    assert_eq!(stats["acked"], 2);
    assert_eq!(stats["in_flight"], 0);
    assert_eq!(stats["pending"], 1, "offset 4 was never handed out");
    assert_eq!(stats["members"][0]["nacks"], 1);
    assert_eq!(
        stats["cursor"].as_str().unwrap().rsplit(':').next(),
        Some("3")
    );
    assert!(stats["oldest_age_ms"].as_u64().is_some());
    let labels = "{stream=\"m\",group=\"g\"}";
    assert_eq!(
        s.metric(&format!("spool_group_acked_total{labels}")).await,
        Some(2.0)
    );
    assert_eq!(
        s.metric(&format!("spool_group_pending{labels}")).await,
        Some(1.0)
    );
    assert_eq!(
        s.metric(&format!("spool_group_in_flight{labels}")).await,
        Some(0.0)
    );
    assert_eq!(
        s.metric(&format!("spool_group_redelivered_total{labels}"))
            .await,
        Some(0.0)
    );
    assert!(
        s.metric(&format!("spool_group_oldest_unacked_age_seconds{labels}"))
            .await
            .is_some()
    );
    assert_eq!(
        s.metric("spool_group_member_nacks_total{stream=\"m\",group=\"g\",consumer=\"w1\"}")
            .await,
        Some(1.0)
    );
    // The group's engine reads are timed with every other engine call (nothing else here
    // reads the stream: publishes append).
    let reads = s
        .metric("spool_engine_operation_duration_seconds_count{op=\"read\"}")
        .await;
    assert!(
        reads.is_some_and(|n| n >= 1.0),
        "engine reads timed: {reads:?}"
    );
}

#[tokio::test]
async fn bad_requests_are_refused_with_their_status_and_code() {
    let node = start("memory", &[]);
    let s = &node.server;
    let g = Group::new(s, "bad", "g");
    let code = |(status, body): (u16, Value)| {
        (
            status,
            body["error"]["code"].as_str().unwrap_or("").to_owned(),
        )
    };
    // Unknown group.
    let missing = Group::new(s, "bad", "nope");
    assert_eq!(code(missing.get().await), (404, "group_not_found".into()));
    assert_eq!(
        code(missing.post("receive", json!({"consumer": "w"})).await),
        (404, "group_not_found".into())
    );
    assert_eq!(
        code(missing.post("ack", json!({"receipts": []})).await),
        (404, "group_not_found".into())
    );
    assert_eq!(
        code(missing.post("redrive", json!({})).await),
        (404, "group_not_found".into())
    );
    // Out-of-range settings, unknown fields, bad names.
    for (config, needle) in [
        (json!({"max_deliveries": 0}), "max_deliveries"),
        (json!({"visibility_timeout": "0s"}), "visibility_timeout"),
        (json!({"max_in_flight": 100001}), "max_in_flight"),
        (json!({"dead_letter": "has space"}), "dead_letter"),
        (json!({"start": "yesterday"}), "start"),
        (json!({"visibilty_timeout": "1s"}), "visibilty_timeout"),
        (json!({"dead_letter": "bad"}), "own stream"),
    ] {
        let (status, body) = g.put(config.clone()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_body")),
            "{config}: {body}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{config}: {body}"
        );
    }
    let (status, body) = g
        .send(
            s.http
                .put(g.url(""))
                .body("{not json")
                .header("content-type", "application/json"),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    assert_eq!(
        code(Group::new(s, "bad", "spool:mine").put(json!({})).await),
        (400, "invalid_group_name".into())
    );
    assert_eq!(
        code(Group::new(s, "bad", "a b").put(json!({})).await),
        (400, "invalid_group_name".into())
    );
    assert_eq!(
        code(Group::new(s, "bad stream", "g").put(json!({})).await),
        (400, "invalid_stream_name".into())
    );
    g.create(json!({})).await;
    for body in [
        json!({"consumer": "w", "max": 0}),
        json!({"consumer": "w", "max": 1001}),
        json!({"consumer": "w", "visibility_timeout": "13h"}),
        json!({"consumer": "has space"}),
        json!({"max": 1}),
        json!({"consumer": "w", "wait": "soon"}),
    ] {
        assert_eq!(
            code(g.post("receive", body.clone()).await),
            (400, "invalid_body".into()),
            "{body}"
        );
    }
    assert_eq!(
        code(
            g.post("nack", json!({"receipts": [], "delay": "13h"}))
                .await
        ),
        (400, "invalid_body".into())
    );
    assert_eq!(
        code(g.post("nack", json!({"receipts": [], "reason": ""})).await),
        (400, "invalid_body".into())
    );
    assert_eq!(
        code(
            g.post(
                "extend",
                json!({"receipts": [], "visibility_timeout": "0s"})
            )
            .await
        ),
        (400, "invalid_body".into())
    );
    assert_eq!(
        code(g.post("ack", json!({"receipts": [], "delay": "1s"})).await),
        (400, "invalid_body".into())
    );
    let huge = "x".repeat(300 * 1024);
    assert_eq!(
        code(g.post("ack", json!({"receipts": [huge]})).await),
        (413, "payload_too_large".into())
    );
}

#[tokio::test]
async fn consuming_needs_the_consume_claim() {
    let node = start("memory", &[]);
    let s = &node.server;
    let admin = Group::new(s, "orders", "g");
    admin.create(json!({})).await;
    s.publish("orders", "x").await;
    let token = |claims: Value| {
        let mut c = json!({"sub": "svc", "exp": now_secs() + 300});
        for (k, v) in claims.as_object().unwrap() {
            c[k] = v.clone();
        }
        jwt(c)
    };
    let as_ = |credential: String| Group {
        credential,
        ..Group::new(s, "orders", "g")
    };
    let code = |(status, body): (u16, Value)| {
        (
            status,
            body["error"]["code"].as_str().unwrap_or("").to_owned(),
        )
    };

    // No credential at all.
    let r = s
        .http
        .post(admin.url("/receive"))
        .json(&json!({"consumer": "w"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        code(as_("wrong-key".into()).get().await),
        (401, "invalid_token".into())
    );
    // subscribe and publish rights do not let a token consume.
    let reader = as_(token(json!({"subscribe": ["*"], "publish": ["*"]})));
    assert_eq!(
        code(reader.post("receive", json!({"consumer": "w"})).await),
        (403, "forbidden".into())
    );
    assert_eq!(code(reader.put(json!({})).await), (403, "forbidden".into()));
    let other = as_(token(json!({"consume": ["other*"]})));
    assert_eq!(code(other.get().await), (403, "forbidden".into()));
    // A consume claim lets it receive and settle, and manage the stream's groups.
    let worker = as_(token(json!({"consume": ["orders"]})));
    let m = worker.receive("w", 1, "0s").await;
    assert_eq!(worker.ack(&[&m[0]["receipt"]]).await, ["ok"]);
    assert_eq!(worker.put(json!({"max_deliveries": 2})).await.0, 200);
    // ... but naming a dead-letter stream or redriving publishes: that needs publish rights.
    assert_eq!(
        code(worker.put(json!({"dead_letter": "elsewhere"})).await),
        (403, "forbidden".into())
    );
    assert_eq!(
        code(worker.post("redrive", json!({})).await),
        (403, "forbidden".into())
    );
    let manager = as_(token(
        json!({"consume": ["orders"], "publish": ["orders", "elsewhere"]}),
    ));
    assert_eq!(
        manager.put(json!({"dead_letter": "elsewhere"})).await.0,
        200
    );
    assert_eq!(manager.post("redrive", json!({})).await.0, 200);
}

#[tokio::test]
async fn anonymous_access_may_consume_when_allowed() {
    let node = start("memory", &["--allow-anonymous"]);
    let s = &node.server;
    let r = s
        .http
        .put(s.url("/v1/streams/anon/groups/g"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

/// An engine without a group store: the group routes say so with 501 (in-process, since
/// every engine of the binary keeps groups or soon will).
#[tokio::test]
async fn without_a_group_store_the_routes_answer_501() {
    use spool_engine::MemoryEngine;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let engine = Arc::new(MemoryEngine::new(
        spool_engine::memory::MemoryConfig::default(),
    ));
    let mut config = spool_server::ServerConfig::default();
    config.auth.api_keys = vec![API_KEY.into()];
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(spool_server::serve(
        listener,
        spool_server::Extras::default(),
        engine.clone(),
        engine,
        None,
        config,
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    for (method, path) in [
        (reqwest::Method::PUT, "/v1/streams/s/groups/g"),
        (reqwest::Method::GET, "/v1/streams/s/groups"),
        (reqwest::Method::POST, "/v1/streams/s/groups/g/receive"),
    ] {
        let r = http
            .request(method, format!("http://{addr}{path}"))
            .bearer_auth(API_KEY)
            .json(&json!({"consumer": "w"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 501);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "groups_unavailable");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("memory engine"),
            "{body}"
        );
    }
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_pending_receive_answers_at_once_on_shutdown() {
    let mut node = start("memory", &[]);
    let g = Group::new(&node.server, "sd", "g");
    g.create(json!({})).await;
    let waiter = {
        let (http, url) = (node.server.http.clone(), g.url("/receive"));
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(API_KEY)
                .json(&json!({"consumer": "w", "wait": "60s"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    assert!(node.server.terminate().success());
    assert!(started.elapsed() < Duration::from_secs(5));
    let status = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.ok(), Some(200));
}

/// The disk engine keeps a group across a restart: an acked message is never delivered again,
/// an unacked one is, once its lease (stored with its end) runs out.
#[tokio::test]
async fn on_disk_a_group_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let (acked, held) = {
        let mut s = Server::start_disk(&listen, dir.path(), &[]);
        let g = Group::new(&s, "durable", "g");
        g.create(json!({"visibility_timeout": "1s"})).await;
        for i in 0..3 {
            s.publish("durable", &format!("m{i}")).await;
        }
        let got = g.receive("w", 2, "0s").await;
        assert_eq!(g.ack(&[&got[0]["receipt"]]).await, ["ok"]);
        let ids = (got[0]["offset"].as_u64(), got[1]["offset"].as_u64());
        assert!(s.terminate().success());
        ids
    };
    let s = Server::start_disk(&listen, dir.path(), &[]);
    let g = Group::new(&s, "durable", "g");
    let stats = g.stats().await;
    assert_eq!(stats["acked"], 1);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 2 && Instant::now() < deadline {
        for m in g.receive("w2", 10, "3s").await {
            seen.push((m["offset"].as_u64(), m["deliveries"].as_u64()));
            assert_eq!(g.ack(&[&m["receipt"]]).await, ["ok"]);
        }
    }
    seen.sort();
    assert!(
        !seen.iter().any(|(o, _)| *o == acked),
        "an acked message came back: {seen:?}"
    );
    assert_eq!(seen, [(held, Some(2)), (Some(3), Some(1))]);
}

#[tokio::test]
async fn redrive_works_for_the_longest_names() {
    let node = start("memory", &[]);
    let s = &node.server;
    let stream = "s".repeat(220);
    let g = Group {
        group: "g".repeat(40),
        ..Group::new(s, &stream, "x")
    };
    // The default dead-letter name would be too long: the group must name one.
    let (status, body) = g.put(json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_body")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("dead_letter")
    );
    let dlq = "d".repeat(255);
    g.create(json!({"dead_letter": dlq, "max_deliveries": 1}))
        .await;
    s.publish(&stream, "x").await;
    let m = g.receive("w", 1, "0s").await;
    assert_eq!(
        g.settle("nack", json!({"receipts": [m[0]["receipt"]]}))
            .await,
        ["ok"]
    );
    let (status, r) = g.post("redrive", json!({})).await;
    assert_eq!((status, r["moved"].as_u64()), (200, Some(1)), "{r}");
}

/// Receive + ack throughput over HTTP (not a test: run with `--ignored --nocapture`): members
/// each receive up to `batch` messages and ack them in one call, until all are acked.
#[tokio::test]
#[ignore = "a measurement"]
async fn measure_receive_and_ack_throughput() {
    for engine in ENGINES {
        for (members, batch) in [(1usize, 1u32), (8, 1), (1, 32), (8, 32)] {
            // Retention must keep the whole backlog (the default keeps 10,000 per stream).
            let node = start(engine, &["--history-limit", "100000"]);
            let s = &node.server;
            let total: usize = if batch == 1 { 4_000 } else { 32_000 };
            let payload = "x".repeat(256);
            for chunk in 0..total / 1000 {
                let messages = (0..1000)
                    .map(|i| json!({"stream": "bench", "data": payload, "key": format!("{}", chunk * 1000 + i)}))
                    .collect();
                s.publish_batch(messages).await;
            }
            let g = Group::new(s, "bench", "g");
            g.create(json!({})).await;
            let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let started = Instant::now();
            let mut tasks = Vec::new();
            for w in 0..members {
                let (http, base, done) = (s.http.clone(), g.url(""), done.clone());
                tasks.push(tokio::spawn(async move {
                    while done.load(std::sync::atomic::Ordering::Relaxed) < total {
                        let r: Value = http
                            .post(format!("{base}/receive"))
                            .bearer_auth(API_KEY)
                            .json(&json!({"consumer": format!("w{w}"), "max": batch, "wait": "1s"}))
                            .send()
                            .await
                            .unwrap()
                            .json()
                            .await
                            .unwrap();
                        let receipts: Vec<Value> = r["messages"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|m| m["receipt"].clone())
                            .collect();
                        if receipts.is_empty() {
                            continue;
                        }
                        let n = receipts.len();
                        let a: Value = http
                            .post(format!("{base}/ack"))
                            .bearer_auth(API_KEY)
                            .json(&json!({ "receipts": receipts }))
                            .send()
                            .await
                            .unwrap()
                            .json()
                            .await
                            .unwrap();
                        assert!(
                            a["results"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .all(|r| r["result"] == "ok")
                        );
                        done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            let secs = started.elapsed().as_secs_f64();
            assert_eq!(g.stats().await["acked"], total as u64);
            println!(
                "{engine}: {members} members, batch {batch}: {total} messages in {secs:.2} s = {:.0} msg/s",
                total as f64 / secs
            );
        }
    }
}

/// Many members draining one backlog on one node: a receive that waits is not answered empty
/// while messages are pending. Each member stops at its first empty answer (as a consumer
/// that takes "nothing" for "idle" would), so the backlog is drained only if none was.
/// (`spool-bench groups` saw such empty answers with 8–32 members on a loaded machine; this
/// smaller run has not reproduced them — it guards the property.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_members_are_not_answered_empty_while_messages_are_pending() {
    const MESSAGES: usize = 2_000;
    let node = start("disk", &[]);
    let s = &node.server;
    for chunk in 0..MESSAGES / 500 {
        let batch = (0..500)
            .map(|i| json!({"stream": "backlog", "data": format!("m{}", chunk * 500 + i)}))
            .collect();
        s.publish_batch(batch).await;
    }
    let g = Group::new(s, "backlog", "drainers");
    g.create(json!({"start": "oldest"})).await;
    let members = (0..32).map(|m| {
        let g = Group::new(s, "backlog", "drainers");
        async move {
            let mut acked = 0usize;
            loop {
                let got = g.receive(&format!("m{m}"), 8, "200ms").await;
                if got.is_empty() {
                    return acked;
                }
                let receipts: Vec<&Value> = got.iter().map(|m| &m["receipt"]).collect();
                let results = g.ack(&receipts).await;
                acked += results.iter().filter(|r| *r == "ok").count();
            }
        }
    });
    let acked: usize = futures::future::join_all(members).await.into_iter().sum();
    let stats = g.stats().await;
    assert_eq!(
        (
            acked,
            stats["pending"].as_u64(),
            stats["in_flight"].as_u64()
        ),
        (MESSAGES, Some(0), Some(0)),
        "members were answered empty with messages pending: {stats}"
    );
}
