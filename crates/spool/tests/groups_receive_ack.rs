//! A consumer-group receive that acks (`"ack": [receipts]` on `POST …/receive`,
//! docs/http-api.md "Receive"), against the real binary on the disk engine: the acks are done
//! before the receive (so the room they free is leased at once), each answered per receipt in
//! `acks`; a long-poll after them answers with the acks; a request refused as a whole acks
//! nothing; a receive without `ack` answers as before. Waits are long-polls or polls with
//! generous deadlines, never fixed sleeps.

mod common;

use std::time::{Duration, Instant};

use common::{API_KEY, Server, enc};
use serde_json::{Value, json};
use spool_client::{groups::GroupClient, http::HttpClient};
use spool_protocol::groups::ReceiptResult;

struct Node {
    server: Server,
    _dir: tempfile::TempDir,
}

fn start() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_disk("127.0.0.1:0", dir.path(), &[]);
    Node { server, _dir: dir }
}

/// One group of one stream, called with the API key.
struct Group<'a> {
    s: &'a Server,
    stream: String,
    group: String,
}

impl<'a> Group<'a> {
    fn new(s: &'a Server, stream: &str, group: &str) -> Self {
        Self {
            s,
            stream: stream.into(),
            group: group.into(),
        }
    }

    fn url(&self, tail: &str) -> String {
        self.s.url(&format!(
            "/v1/streams/{}/groups/{}{tail}",
            enc(&self.stream),
            enc(&self.group)
        ))
    }

    async fn create(&self, config: Value) {
        let r = self
            .s
            .http
            .put(self.url(""))
            .bearer_auth(API_KEY)
            .json(&config)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    async fn post(&self, op: &str, body: &Value) -> (u16, Value) {
        let r = self
            .s
            .http
            .post(self.url(&format!("/{op}")))
            .bearer_auth(API_KEY)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// A receive that must succeed: its whole answer.
    async fn receive(&self, body: Value) -> Value {
        let (status, answer) = self.post("receive", &body).await;
        assert_eq!(status, 200, "{body}: {answer}");
        answer
    }

    async fn stats(&self) -> Value {
        let r = self
            .s
            .http
            .get(self.url(""))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()["stats"].clone()
    }
}

fn messages(answer: &Value) -> &Vec<Value> {
    answer["messages"].as_array().expect("messages")
}

/// The results of an answer's `acks`, checking each names its receipt in the order sent.
fn acks(answer: &Value, sent: &[&Value]) -> Vec<String> {
    let acks = answer["acks"].as_array().expect("acks");
    assert_eq!(acks.len(), sent.len(), "{answer}");
    acks.iter()
        .zip(sent)
        .map(|(a, r)| {
            assert_eq!(&a["receipt"], *r, "{answer}");
            a["result"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn each_receive_acks_the_last_one_and_gets_the_next_message() {
    let node = start();
    let s = &node.server;
    let g = Group::new(s, "jobs", "workers");
    // One lease at a time: the next message can only be leased once the ack freed its room.
    g.create(json!({"max_in_flight": 1})).await;
    for i in 0..20 {
        s.publish("jobs", &format!("m{i}")).await;
    }
    let first = g.receive(json!({"consumer": "w", "max": 1})).await;
    assert_eq!(messages(&first).len(), 1, "{first}");
    assert!(first.get("acks").is_none(), "{first}");
    let mut held = messages(&first)[0].clone();
    let mut seen = vec![held["data"].as_str().unwrap().to_owned()];
    let mut offsets = vec![held["offset"].as_u64().unwrap()];
    loop {
        let answer = g
            .receive(json!({"consumer": "w", "max": 1, "ack": [held["receipt"]]}))
            .await;
        assert_eq!(acks(&answer, &[&held["receipt"]]), ["ok"]);
        let got = messages(&answer);
        let Some(next) = got.first() else { break };
        assert_eq!(got.len(), 1, "{answer}");
        assert_eq!(next["deliveries"], 1, "{answer}");
        seen.push(next["data"].as_str().unwrap().to_owned());
        offsets.push(next["offset"].as_u64().unwrap());
        held = next.clone();
    }
    let expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(seen, expected, "each message once, in order");
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    let stats = g.stats().await;
    assert_eq!(stats["acked"], 20, "{stats}");
    assert_eq!(stats["in_flight"], 0, "{stats}");
    assert_eq!(stats["pending"], 0, "{stats}");
    assert_eq!(stats["redelivered"], 0, "{stats}");
}

#[tokio::test]
async fn a_batch_acked_with_the_next_receive_frees_room_for_a_whole_batch() {
    let node = start();
    let s = &node.server;
    let g = Group::new(s, "batches", "g");
    g.create(json!({"max_in_flight": 3})).await;
    for i in 0..6 {
        s.publish("batches", &format!("b{i}")).await;
    }
    let first = g.receive(json!({"consumer": "w", "max": 3})).await;
    let held: Vec<Value> = messages(&first)
        .iter()
        .map(|m| m["receipt"].clone())
        .collect();
    assert_eq!(held.len(), 3, "{first}");
    let answer = g
        .receive(json!({"consumer": "w", "max": 3, "ack": held}))
        .await;
    let sent: Vec<&Value> = held.iter().collect();
    assert_eq!(acks(&answer, &sent), ["ok", "ok", "ok"]);
    let data: Vec<&str> = messages(&answer)
        .iter()
        .map(|m| m["data"].as_str().unwrap())
        .collect();
    assert_eq!(data, ["b3", "b4", "b5"], "{answer}");
    let stats = g.stats().await;
    assert_eq!(
        (stats["acked"].clone(), stats["in_flight"].clone()),
        (json!(3), json!(3))
    );
}

#[tokio::test]
async fn each_receipt_gets_its_own_result_and_the_receive_still_leases() {
    let node = start();
    let s = &node.server;
    let a = Group::new(s, "r", "a");
    let b = Group::new(s, "r", "b");
    a.create(json!({})).await;
    b.create(json!({})).await;
    for i in 0..3 {
        s.publish("r", &format!("{i}")).await;
    }
    let from_a = a.receive(json!({"consumer": "w", "max": 1})).await;
    let mine = messages(&from_a)[0]["receipt"].clone();
    let from_b = b.receive(json!({"consumer": "w", "max": 1})).await;
    let foreign = messages(&from_b)[0]["receipt"].clone();
    assert_eq!(
        acks(
            &a.receive(json!({"consumer": "w", "ack": [mine]})).await,
            &[&mine]
        ),
        ["ok"]
    );
    let garbage = json!("not-a-receipt");
    let answer = a
        .receive(json!({"consumer": "w", "max": 5, "ack": [mine, garbage, foreign]}))
        .await;
    assert_eq!(
        acks(&answer, &[&mine, &garbage, &foreign]),
        ["expired", "unknown", "unknown"],
        "a settled receipt is expired, a malformed or foreign one unknown"
    );
    assert!(!messages(&answer).is_empty(), "still received: {answer}");
    // The other group's lease was not touched.
    let (status, body) = b.post("ack", &json!({"receipts": [foreign]})).await;
    assert_eq!(status, 200);
    assert_eq!(body["results"][0]["result"], "ok", "{body}");
}

#[tokio::test]
async fn an_ack_then_a_long_poll_answers_the_next_publish_with_the_acks() {
    let node = start();
    let s = &node.server;
    let g = Group::new(s, "waits", "g");
    g.create(json!({})).await;
    s.publish("waits", "first").await;
    let first = g.receive(json!({"consumer": "w"})).await;
    let receipt = messages(&first)[0]["receipt"].clone();

    let waiter = {
        let (http, url) = (s.http.clone(), g.url("/receive"));
        let body = json!({"consumer": "w", "wait": "30s", "ack": [receipt]});
        tokio::spawn(async move {
            let started = Instant::now();
            let r = http
                .post(url)
                .bearer_auth(API_KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            (r.json::<Value>().await.unwrap(), started.elapsed())
        })
    };
    // The ack is stored before the receive waits: once the stats show it, the request is
    // waiting for a message (nothing was left to lease).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = g.stats().await;
        if stats["acked"] == 1 {
            assert_eq!(stats["in_flight"], 0, "{stats}");
            break;
        }
        assert!(Instant::now() < deadline, "the ack was not stored: {stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !waiter.is_finished(),
        "answered before anything was published"
    );
    s.publish("waits", "second").await;
    let (answer, took) = waiter.await.unwrap();
    assert_eq!(acks(&answer, &[&receipt]), ["ok"]);
    let got = messages(&answer);
    assert_eq!(got.len(), 1, "{answer}");
    assert_eq!(got[0]["data"], "second");
    assert!(
        took < Duration::from_secs(20),
        "woken by the publish: {took:?}"
    );

    // Nothing arrives in the wait: the acks come with the empty answer when it ends.
    let answer = g
        .receive(json!({"consumer": "w", "wait": "300ms", "ack": [got[0]["receipt"]]}))
        .await;
    assert_eq!(acks(&answer, &[&got[0]["receipt"]]), ["ok"]);
    assert!(messages(&answer).is_empty(), "{answer}");
    let stats = g.stats().await;
    assert_eq!(
        (stats["acked"].clone(), stats["in_flight"].clone()),
        (json!(2), json!(0))
    );
}

#[tokio::test]
async fn a_request_refused_as_a_whole_acks_nothing() {
    let node = start();
    let s = &node.server;
    let g = Group::new(s, "refused", "g");
    g.create(json!({})).await;
    s.publish("refused", "one").await;
    s.publish("refused", "two").await;
    let first = g.receive(json!({"consumer": "w"})).await;
    let receipt = messages(&first)[0]["receipt"].clone();
    let before = g.stats().await;
    assert_eq!(
        (before["acked"].clone(), before["in_flight"].clone()),
        (json!(0), json!(1))
    );

    // 1,001 receipts (the first a valid one) are one too many.
    let many: Vec<Value> = std::iter::repeat_n(receipt.clone(), 1001).collect();
    for body in [
        json!({"consumer": "w", "ack": many}),
        json!({"consumer": "w", "max": 0, "ack": [receipt]}),
        json!({"consumer": "w", "max": 1001, "ack": [receipt]}),
        json!({"consumer": "w", "visibility_timeout": "13h", "ack": [receipt]}),
        json!({"consumer": "w", "wait": "soon", "ack": [receipt]}),
        json!({"consumer": "has space", "ack": [receipt]}),
        json!({"consumer": "w", "ack": "not-a-list"}),
        json!({"consumer": "w", "acks": [receipt]}),
    ] {
        let (status, answer) = g.post("receive", &body).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some("invalid_body")),
            "{answer}"
        );
    }
    let after = g.stats().await;
    assert_eq!(after["acked"], 0, "nothing acked: {after}");
    assert_eq!(after["in_flight"], 1, "nothing leased: {after}");
    assert_eq!(after["pending"], before["pending"], "{after}");

    // A group that does not exist: 404, and the receipt of another group is untouched.
    let missing = Group::new(s, "refused", "nope");
    let (status, answer) = missing
        .post("receive", &json!({"consumer": "w", "ack": [receipt]}))
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (404, Some("group_not_found")),
        "{answer}"
    );
    assert_eq!(g.stats().await["acked"], 0);

    // At the limit it is fine: one ok, the other 999 copies expired.
    let many: Vec<Value> = std::iter::repeat_n(receipt.clone(), 1000).collect();
    let answer = g.receive(json!({"consumer": "w", "ack": many})).await;
    let results = answer["acks"].as_array().unwrap();
    assert_eq!(results.len(), 1000);
    assert_eq!(results[0]["result"], "ok");
    assert!(results[1..].iter().all(|r| r["result"] == "expired"));
    assert_eq!(messages(&answer)[0]["data"], "two", "{answer}");
}

#[tokio::test]
async fn a_receive_without_ack_answers_as_before() {
    let node = start();
    let s = &node.server;
    let g = Group::new(s, "plain", "g");
    g.create(json!({})).await;
    s.publish("plain", "x").await;
    s.publish("plain", "y").await;
    let (status, answer) = g.post("receive", &json!({"consumer": "w"})).await;
    assert_eq!(status, 200);
    let keys: Vec<&String> = answer.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["messages"], "{answer}");
    // An empty `ack` acks nothing and says so with an empty `acks`.
    let answer = g.receive(json!({"consumer": "w", "ack": []})).await;
    assert_eq!(answer["acks"], json!([]), "{answer}");
    assert_eq!(messages(&answer)[0]["data"], "y", "{answer}");
    assert_eq!(g.stats().await["acked"], 0);
}

#[tokio::test]
async fn the_client_receives_acking() {
    let node = start();
    let s = &node.server;
    let http = HttpClient::new(&s.url(""), Some(API_KEY)).unwrap();
    let group = GroupClient::new(&http, "client", "g");
    group.create(&Default::default()).await.unwrap();
    for i in 0..5 {
        s.publish("client", &format!("c{i}")).await;
    }
    let mut batch = group
        .receive("w", 2, Duration::ZERO, None)
        .await
        .unwrap()
        .messages;
    let mut seen = Vec::new();
    let mut acked = 0;
    while !batch.is_empty() {
        seen.extend(batch.iter().map(|m| m.data.clone().unwrap()));
        let receipts: Vec<String> = batch.iter().map(|m| m.receipt.clone()).collect();
        let (answer, results) = group
            .receive_acking("w", 2, Duration::ZERO, None, &receipts)
            .await
            .unwrap();
        assert_eq!(results.len(), receipts.len());
        for (r, sent) in results.iter().zip(&receipts) {
            assert_eq!(&r.receipt, sent);
            assert_eq!(r.result, ReceiptResult::Ok);
        }
        acked += results.len();
        assert_eq!(answer.acks, None, "taken out");
        batch = answer.messages;
    }
    assert_eq!(seen, ["c0", "c1", "c2", "c3", "c4"]);
    assert_eq!(acked, 5);
    let stats = group.info().await.unwrap().stats;
    assert_eq!((stats.acked, stats.in_flight), (5, 0));
    // Refused as a whole: too many receipts.
    let many = vec!["x".to_owned(); 1001];
    assert!(matches!(
        group
            .receive_acking("w", 1, Duration::ZERO, None, &many)
            .await,
        Err(spool_client::http::RequestError::Rejected(status, _)) if status == 400
    ));
}

/// `spool consume` without `--exec` acks each batch with its next receive, and what it printed
/// last with a plain ack when it stops (here at `--count`; `--no-follow` at the end).
#[tokio::test]
async fn spool_consume_acks_with_the_next_receive_and_at_its_end() {
    let node = start();
    let s = &node.server;
    let g = Group::new(s, "cli", "g");
    g.create(json!({})).await;
    for i in 0..7 {
        s.publish("cli", &format!("c{i}")).await;
    }
    let run = |args: &'static [&'static str]| {
        let mut cmd = std::process::Command::new(common::spool_bin());
        cmd.env("SPOOL_SERVER", format!("http://{}", s.addr))
            .env("SPOOL_TOKEN", API_KEY)
            .env_remove("SPOOL_CONFIG")
            .args(["consume", "cli", "g"])
            .args(args);
        tokio::task::spawn_blocking(move || cmd.output().expect("run spool consume"))
    };
    let lines = |out: &std::process::Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.rsplit('\t').next().unwrap().to_owned())
            .collect()
    };
    let out = run(&["--max", "3", "--count", "5", "--wait", "1s"])
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(lines(&out), ["c0", "c1", "c2", "c3", "c4"], "{stderr}");
    assert!(
        stderr.contains("received 5, acked 5, nacked 0, lost 0"),
        "{stderr}"
    );
    let stats = g.stats().await;
    assert_eq!(
        (&stats["acked"], &stats["in_flight"], &stats["pending"]),
        (&json!(5), &json!(0), &json!(2)),
        "nothing of a counted run stays leased: {stats}"
    );

    let out = run(&["--max", "10", "--no-follow", "--wait", "1s"])
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(lines(&out), ["c5", "c6"], "{stderr}");
    assert!(stderr.contains("acked 2"), "{stderr}");
    let stats = g.stats().await;
    assert_eq!(
        (&stats["acked"], &stats["in_flight"], &stats["pending"]),
        (&json!(7), &json!(0), &json!(0)),
        "{stats}"
    );
}

/// Stopped with SIGINT while it waits for more, `spool consume` has acked everything it
/// printed: nothing stays leased.
#[tokio::test]
async fn spool_consume_stopped_by_sigint_leaves_nothing_leased() {
    use std::io::BufRead;

    let node = start();
    let s = &node.server;
    let g = Group::new(s, "stop", "g");
    g.create(json!({})).await;
    for i in 0..4 {
        s.publish("stop", &format!("s{i}")).await;
    }
    let mut child = std::process::Command::new(common::spool_bin())
        .env("SPOOL_SERVER", format!("http://{}", s.addr))
        .env("SPOOL_TOKEN", API_KEY)
        .env_remove("SPOOL_CONFIG")
        .args(["consume", "stop", "g", "--max", "3", "--wait", "30s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run spool consume");
    let stdout = child.stdout.take().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .take(4)
            .map(|l| l.unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(printed.len(), 4, "{printed:?}");
    // Every printed message acked: the command is in its waiting receive now.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = g.stats().await;
        if stats["acked"] == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "not acked: {stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("received 4, acked 4, nacked 0, lost 0"),
        "{stderr}"
    );
    let stats = g.stats().await;
    assert_eq!(
        (&stats["acked"], &stats["in_flight"]),
        (&json!(4), &json!(0)),
        "{stats}"
    );
}
