//! The metrics an operator alerts on, through the real binary: every metric the Grafana
//! dashboard (deploy/grafana/spool-dashboard.json), the Prometheus alert rules
//! (deploy/prometheus/spool-alerts.yml) and docs/operations.md name exists in a live
//! server's /metrics; `--metrics-listen` serves them on an internal address; the figures move
//! with the traffic that drives them.

mod common;

use std::{collections::BTreeSet, path::Path, time::Duration};

use common::{API_KEY, Server, WsPeer};
use serde_json::json;

fn repo_file(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Every `spool_…` metric name in `text` (sample names as PromQL uses them).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("spool_") {
        let start = i + at;
        let before = start.checked_sub(1).map(|b| bytes[b]);
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        // Not part of a longer identifier (a label value such as `spool-overview` has no `_`).
        if !before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
            out.insert(text[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// The families `/metrics` declares (`# TYPE name kind`).
fn families(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| {
            let mut parts = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// Whether `name` (as a query uses it) is a sample name of a declared family.
fn exists(name: &str, families: &[(String, String)]) -> bool {
    families.iter().any(|(family, kind)| {
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        // A family's own name (as docs write a histogram), or one of its sample names.
        name == family || suffixes.iter().any(|s| name == format!("{family}{s}"))
    })
}

/// The rows of docs/operations.md's metrics table.
fn metrics_table() -> String {
    let doc = repo_file("docs/operations.md");
    let start = doc.find("\n## Metrics").expect("a Metrics section");
    let section = &doc[start + 1..];
    let end = section[1..].find("\n## ").map_or(section.len(), |e| e + 1);
    section[..end]
        .lines()
        .filter(|l| l.starts_with("| `spool_"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn scrape(server: &Server, url: &str) -> String {
    server
        .http
        .get(url)
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text")
}

#[tokio::test]
async fn every_metric_the_dashboard_alerts_and_docs_use_exists() {
    let dir = tempfile::tempdir().unwrap();
    let internal = format!("127.0.0.1:{}", common::free_port());
    let server = Server::start_disk(
        "127.0.0.1:0",
        dir.path(),
        &["--metrics-listen", &internal, "--durability", "fsync"],
    );
    // Traffic: HTTP and WebSocket publishes, a reader, a consumer group.
    for i in 0..3 {
        server.publish("m", &format!("http {i}")).await;
    }
    let (mut ws, _) = WsPeer::connect(&server.addr, API_KEY).await;
    for id in 1..=2 {
        ws.send(json!({"type": "publish", "id": id, "stream": "m", "data": "ws"}))
            .await;
        ws.expect("ack").await;
    }
    let (status, _) = server.poll("m", "after=oldest").await;
    assert_eq!(status, 200);
    let group = server
        .http
        .put(server.url("/v1/streams/m/groups/g"))
        .bearer_auth(API_KEY)
        .json(&json!({"start": "oldest"}))
        .send()
        .await
        .unwrap();
    assert!(group.status().is_success(), "{}", group.status());
    // A member's nack, so the per-member series exists.
    let received: serde_json::Value = server
        .http
        .post(server.url("/v1/streams/m/groups/g/receive"))
        .bearer_auth(API_KEY)
        .json(&json!({"consumer": "c1", "max": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let receipt = received["messages"][0]["receipt"].clone();
    assert!(receipt.is_string(), "{received}");
    let nacked = server
        .http
        .post(server.url("/v1/streams/m/groups/g/nack"))
        .bearer_auth(API_KEY)
        .json(&json!({"receipts": [receipt]}))
        .send()
        .await
        .unwrap();
    assert!(nacked.status().is_success());

    let exposition = scrape(&server, &format!("http://{internal}/metrics")).await;
    let declared = families(&exposition);
    assert!(declared.len() > 20, "{exposition}");
    for (file, text) in [
        (
            "deploy/grafana/spool-dashboard.json",
            repo_file("deploy/grafana/spool-dashboard.json"),
        ),
        (
            "deploy/prometheus/spool-alerts.yml",
            repo_file("deploy/prometheus/spool-alerts.yml"),
        ),
        ("docs/operations.md", metrics_table()),
    ] {
        let used = names_in(&text);
        assert!(used.len() > 5, "{file} names metrics");
        let missing: Vec<&String> = used.iter().filter(|n| !exists(n, &declared)).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics /metrics does not have: {missing:?}"
        );
    }
    // The dashboard is valid JSON with panels that query Prometheus.
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/spool-dashboard.json")).unwrap();
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| p.len() >= 10)
    );

    // The figures follow the traffic, on the API port and the internal one alike.
    let sample = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    let api = scrape(&server, &server.url("/metrics")).await;
    for text in [&exposition, &api] {
        assert_eq!(
            sample(text, "spool_publishes_total{transport=\"http\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(text, "spool_publishes_total{transport=\"ws\"}"),
            Some(2.0)
        );
        assert!(
            sample(
                text,
                "spool_engine_operation_duration_seconds_count{op=\"append\"}"
            )
            .is_some_and(|n| n >= 5.0)
        );
        assert!(sample(text, "spool_wal_fsync_duration_seconds_count").is_some_and(|n| n >= 1.0));
        assert!(sample(text, "spool_process_resident_memory_bytes").is_some_and(|n| n > 0.0));
        assert!(sample(text, "spool_process_open_fds").is_some_and(|n| n > 0.0));
        assert_eq!(sample(text, "spool_sessions"), Some(1.0));
        assert_eq!(
            sample(
                text,
                &format!(
                    "spool_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                )
            ),
            Some(1.0)
        );
        assert!(sample(text, "spool_subscriber_lag_messages_count").is_some_and(|n| n >= 1.0));
    }
    // The internal address serves metrics and probes only.
    let api_route = server
        .http
        .post(format!("http://{internal}/v1/streams/m/messages"))
        .bearer_auth(API_KEY)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(api_route.status(), 404);
    let ready = server
        .http
        .get(format!("http://{internal}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    drop(ws);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// `--metrics-listen` on an address in use fails at once, naming the flag.
#[tokio::test]
async fn a_metrics_address_in_use_fails_naming_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(common::spool_bin())
        .args([
            "serve",
            "--engine",
            "memory",
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            API_KEY,
            "--metrics-listen",
            &addr,
        ])
        .env_remove("SPOOL_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--metrics-listen") && err.contains("Address already in use"),
        "{err}"
    );
}

/// A WebSocket client that falls behind (its outbound buffer full while its subscription has
/// more to read) and then reads everything is counted as a slow consumer that caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_that_catches_up_is_counted() {
    const SIZE: usize = 16 * 1024;
    const MIB: u64 = 1024 * 1024;
    let wmem_max: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * MIB);
    let n = 600.max((wmem_max + 2 * MIB) / SIZE as u64 + 64) as usize;
    let server = Server::start(&[
        "--ws-outbound-messages",
        "64",
        "--ws-outbound-bytes",
        "65536",
        "--history-limit",
        "100000",
    ]);
    let caught_up = r#"spool_slow_consumers_total{outcome="caught_up"}"#;
    assert_eq!(server.metric(caught_up).await, Some(0.0));
    let mut slow = WsPeer::open_small_rcvbuf(&server.addr, 4096).await;
    slow.send(json!({"type": "connect", "token": API_KEY}))
        .await;
    slow.expect("connected").await;
    slow.send(json!({"type": "subscribe", "stream": "big", "after": "oldest"}))
        .await;
    slow.expect("subscribed").await;
    let data = "x".repeat(SIZE);
    for start in (0..n).step_by(50) {
        let batch = (start..(start + 50).min(n))
            .map(|_| json!({"stream": "big", "data": data}))
            .collect();
        server.publish_batch(batch).await;
    }
    // It read nothing meanwhile; now it reads everything.
    let mut messages = 0;
    while messages < n {
        let frame = slow
            .next(Duration::from_secs(30))
            .await
            .expect("the slow client is served");
        if frame["type"] == "message" {
            messages += 1;
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // Once per time it fell behind and caught up again (the publishes came in batches).
    while !server.metric(caught_up).await.is_some_and(|n| n >= 1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "caught_up counted: {:?}",
            server.metric(caught_up).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        server
            .metric(r#"spool_slow_consumers_total{outcome="closed"}"#)
            .await,
        Some(0.0)
    );
}
