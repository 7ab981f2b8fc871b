//! Consumer groups on the disk engine through the real binary under kill -9 (issue 12):
//! 4 competing members drain 5,000 messages while the server is SIGKILLed 3 times at random
//! moments and restarted on the same data directory. Every message is acked at least once (an
//! ack answered `ok`, or one whose answer the crash took), no message is delivered again by a
//! receive sent after its ack was answered `ok`, and at the end the group holds nothing
//! pending, in flight or due again, and counts exactly 5,000 acks and no dead letter.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use common::{API_KEY, Server, TestRng};
use serde_json::{Value, json};

const MESSAGES: u64 = 5_000;
const MEMBERS: usize = 4;
const KILLS: usize = 3;
const STREAM: &str = "jobs";
const GROUP: &str = "workers";
/// Short, so that leases a crash orphaned (a receive answered into a dead connection) come
/// back within the test's time.
const VISIBILITY: &str = "2s";
const SERVE: &[&str] = &["--durability", "fsync"];

/// What the members saw, shared.
#[derive(Default)]
struct Ledger {
    /// Offset → when its first ack was answered `ok`.
    acked: BTreeMap<u64, Instant>,
    /// Offsets whose ack went unanswered (the server died) and whose retry was not `ok`: the
    /// lost ack was made durable (then the message is finished), or its lease ran out while
    /// the server was down (then it comes back). A receipt of a finished message is answered
    /// `expired` like a run-out lease, so the client cannot tell; the group's counters can.
    acked_unanswered: BTreeSet<u64>,
    /// Messages received, counting each delivery.
    deliveries: u64,
    /// Offsets received with a delivery count above 1: a crash took the answer of the receive
    /// that leased them before, or their ack, and their lease ran out.
    redelivered: BTreeSet<u64>,
    /// Receive attempts that got no answer (the server dying, down or starting).
    receives_lost: u64,
    /// Deliveries of a message by a receive sent after its ack was answered.
    violations: Vec<String>,
}

async fn group_info(http: &reqwest::Client, base: &str) -> Option<Value> {
    let r = http
        .get(group_url(base, ""))
        .bearer_auth(API_KEY)
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.json().await.ok()
}

fn group_url(base: &str, call: &str) -> String {
    format!("{base}/v1/streams/{STREAM}/groups/{GROUP}{call}")
}

/// One member: receive up to 10, check each delivery, ack them all (retrying an ack whose
/// answer was lost until the server answers it), until the group counts every message acked.
async fn member(
    id: usize,
    base: Arc<RwLock<String>>,
    ledger: Arc<Mutex<Ledger>>,
    progress: tokio::sync::watch::Sender<usize>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let consumer = format!("w{id}");
    let url = |call: &str| group_url(&base.read().unwrap(), call);
    loop {
        let sent = Instant::now();
        let answer = http
            .post(url("/receive"))
            .bearer_auth(API_KEY)
            .json(&json!({"consumer": consumer, "max": 10, "wait": "1s"}))
            .send()
            .await;
        let body: Value = match answer {
            Ok(r) if r.status() == 200 => match r.json().await {
                Ok(body) => body,
                Err(_) => {
                    ledger.lock().unwrap().receives_lost += 1;
                    continue;
                }
            },
            // The server is down or restarting: wait for it.
            other => {
                ledger.lock().unwrap().receives_lost += u64::from(other.is_err());
                if let Ok(r) = other {
                    eprintln!(
                        "{consumer}: receive answered {}: {:?}",
                        r.status(),
                        r.text().await
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let mut receipts = Vec::new();
        {
            let mut l = ledger.lock().unwrap();
            for m in body["messages"].as_array().unwrap() {
                let offset = m["offset"].as_u64().unwrap();
                assert_eq!(m["data"], format!("m{offset}"), "{m}");
                l.deliveries += 1;
                if m["deliveries"].as_u64() != Some(1) {
                    l.redelivered.insert(offset);
                }
                if let Some(at) = l.acked.get(&offset)
                    && *at < sent
                {
                    let violation = format!(
                        "offset {offset} delivered to {consumer} (delivery {}) by a receive sent {:?} after its ack was answered",
                        m["deliveries"],
                        sent - *at
                    );
                    l.violations.push(violation);
                }
                receipts.push((offset, m["receipt"].as_str().unwrap().to_owned()));
            }
        }
        if receipts.is_empty() {
            let at = base.read().unwrap().clone();
            let info = group_info(&http, &at).await;
            if info.is_some_and(|i| i["stats"]["acked"] == json!(MESSAGES)) {
                return;
            }
            continue;
        }
        let mut unanswered = false;
        loop {
            let texts: Vec<&str> = receipts.iter().map(|(_, r)| r.as_str()).collect();
            let answer = http
                .post(url("/ack"))
                .bearer_auth(API_KEY)
                .json(&json!({ "receipts": texts }))
                .send()
                .await;
            let body: Value = match answer {
                Ok(r) if r.status() == 200 => match r.json().await {
                    Ok(body) => body,
                    Err(_) => {
                        unanswered = true;
                        continue;
                    }
                },
                other => {
                    if let Ok(r) = other {
                        eprintln!(
                            "{consumer}: ack answered {}: {:?}",
                            r.status(),
                            r.text().await
                        );
                    }
                    unanswered = true;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let results = body["results"].as_array().unwrap();
            assert_eq!(results.len(), receipts.len(), "{body}");
            let answered = Instant::now();
            let mut l = ledger.lock().unwrap();
            for ((offset, _), result) in receipts.iter().zip(results) {
                match result["result"].as_str().unwrap() {
                    "ok" => {
                        l.acked.entry(*offset).or_insert(answered);
                    }
                    _ if unanswered => {
                        l.acked_unanswered.insert(*offset);
                    }
                    // Its lease ran out (it comes back), or another member finished it.
                    _ => {}
                }
            }
            progress.send_replace(l.acked.len());
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_least_once_under_kill_9() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let mut server = Server::start_disk(&listen, dir.path(), SERVE);
    let base = Arc::new(RwLock::new(format!("http://{}", server.addr)));

    for batch in 0..MESSAGES / 250 {
        let messages: Vec<Value> = (1..=250)
            .map(|i| json!({"stream": STREAM, "data": format!("m{}", batch * 250 + i)}))
            .collect();
        server.publish_batch(messages).await;
    }
    let created = server
        .http
        .put(group_url(&format!("http://{}", server.addr), ""))
        .bearer_auth(API_KEY)
        .json(&json!({"start": "oldest", "visibility_timeout": VISIBILITY, "max_deliveries": 100}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "{}", created.text().await.unwrap());

    // Kill when the members have finished a random share of the messages, a random moment
    // later (mid-request, mid-fsync): thresholds spread over the run. Replay with the seed.
    let mut rng = TestRng::from_env("SPOOL_GROUPS_CRASH_SEED");
    let thresholds: Vec<usize> = (0..KILLS as u64)
        .map(|k| {
            let slice = MESSAGES / (KILLS as u64 + 1);
            (slice * (k + 1) + rng.range(0, slice / 2) - slice / 4) as usize
        })
        .collect();

    let ledger: Arc<Mutex<Ledger>> = Arc::default();
    let (progress, mut watch) = tokio::sync::watch::channel(0usize);
    let mut members = Vec::new();
    for id in 0..MEMBERS {
        members.push(tokio::spawn(member(
            id,
            base.clone(),
            ledger.clone(),
            progress.clone(),
        )));
    }
    for (kill, threshold) in thresholds.iter().enumerate() {
        tokio::time::timeout(
            Duration::from_secs(30),
            watch.wait_for(|n| *n >= *threshold),
        )
        .await
        .unwrap_or_else(|_| panic!("kill {kill}: the members stalled before {threshold} acks"))
        .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.range(0, 30))).await;
        tokio::task::block_in_place(|| {
            server.kill();
            server = Server::start_disk(&listen, dir.path(), SERVE);
        });
        eprintln!(
            "kill {kill} after {} acks answered ok",
            ledger.lock().unwrap().acked.len()
        );
        *base.write().unwrap() = format!("http://{}", server.addr);
    }
    for m in members {
        if tokio::time::timeout(Duration::from_secs(40), m)
            .await
            .is_err()
        {
            let info = group_info(&server.http, &format!("http://{}", server.addr)).await;
            let l = ledger.lock().unwrap();
            let missing: Vec<u64> = (1..=MESSAGES)
                .filter(|o| !l.acked.contains_key(o) && !l.acked_unanswered.contains(o))
                .take(20)
                .collect();
            panic!(
                "the members did not finish: {} acks answered ok, never acked {missing:?}, group {info:?}",
                l.acked.len()
            );
        }
    }

    {
        let l = ledger.lock().unwrap();
        assert!(l.violations.is_empty(), "{:#?}", l.violations);
        let missing: Vec<u64> = (1..=MESSAGES)
            .filter(|o| !l.acked.contains_key(o) && !l.acked_unanswered.contains(o))
            .take(20)
            .collect();
        assert!(missing.is_empty(), "never acked: {missing:?}");
    }
    let info = group_info(&server.http, &format!("http://{}", server.addr))
        .await
        .expect("the group's info");
    let stats = &info["stats"];
    // Every message finished once in the stored state, by an ack (nothing dead-lettered or
    // lost), and nothing left: not pending, not leased, not due again (oldest age 0).
    assert_eq!(
        [
            "acked",
            "pending",
            "in_flight",
            "oldest_age_ms",
            "dead_lettered",
            "expired"
        ]
        .map(|k| stats[k].as_u64()),
        [Some(MESSAGES), Some(0), Some(0), Some(0), Some(0), Some(0)],
        "{info}"
    );
    let l = ledger.lock().unwrap();
    eprintln!(
        "{} deliveries for {MESSAGES} messages ({} delivered again), {} receives and {} acks unanswered, in {:?}",
        l.deliveries,
        l.redelivered.len(),
        l.receives_lost,
        l.acked_unanswered.len(),
        started.elapsed()
    );
}
