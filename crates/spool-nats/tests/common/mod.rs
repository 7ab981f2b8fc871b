//! Helpers for tests against a real NATS server: its address, unique name prefixes, and
//! cleanup of everything a test made there, so a shared server does not fill up over many CI
//! runs (a test that crashed before its cleanup is swept by a later run after an hour).

#![allow(dead_code)]

use std::{
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use rand::RngExt;

/// The shared NATS server of tests (`SPOOL_TEST_NATS_URL` overrides it).
pub fn nats_url() -> String {
    std::env::var("SPOOL_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// `host:port` of a NATS URL, for `service_reachable`.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split([',', '/']).next().unwrap_or(rest).to_string()
}

/// Whether the shared NATS is up (skips on a laptop, fails under CI).
pub fn shared_nats() -> Option<String> {
    let url = nats_url();
    spool_engine::conformance::service_reachable("NATS JetStream", &host_port(&url)).then_some(url)
}

const TEST_PREFIX: &str = "spt";

/// A prefix no other test or run uses: `spt<unix seconds, hex>x<random>`.
pub fn unique_prefix() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let tag: u32 = rand::rng().random();
    format!("{TEST_PREFIX}{secs:x}x{tag:08x}")
}

/// Deletes every JetStream stream (and KV bucket) under `prefix` when dropped.
pub struct Cleanup {
    pub url: String,
    pub prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let url = self.url.clone();
        let prefix = self.prefix.clone();
        // Drop may run inside or outside a runtime: a thread with its own is fine in both.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            rt.block_on(delete_matching(&url, |name| {
                owner_prefix(name).is_some_and(|p| p == prefix)
            }));
        })
        .join();
        if done.is_err() {
            eprintln!("cleanup of NATS prefix {} panicked", self.prefix);
        }
    }
}

/// The test prefix a JetStream stream belongs to, if it is a test stream.
fn owner_prefix(stream: &str) -> Option<&str> {
    let name = stream.strip_prefix("KV_").unwrap_or(stream);
    let (prefix, _) = name.split_once('_')?;
    prefix.starts_with(TEST_PREFIX).then_some(prefix)
}

/// Deletes test streams left behind by runs more than an hour old.
pub async fn sweep_stale(url: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    delete_matching(url, |name| {
        owner_prefix(name)
            .and_then(|p| p[TEST_PREFIX.len()..].split_once('x'))
            .and_then(|(secs, _)| u64::from_str_radix(secs, 16).ok())
            .is_some_and(|secs| secs + 3600 < now)
    })
    .await;
}

/// The JetStream streams (KV buckets included) of a test prefix.
pub async fn streams_of(url: &str, prefix: &str) -> Vec<String> {
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    js.stream_names()
        .filter_map(|n| async move { n.ok() })
        .filter(|n| std::future::ready(owner_prefix(n) == Some(prefix)))
        .collect()
        .await
}

async fn delete_matching(url: &str, matches: impl Fn(&str) -> bool) {
    let Ok(client) = async_nats::connect(url).await else {
        eprintln!("cleanup: cannot connect to {url}");
        return;
    };
    let js = async_nats::jetstream::new(client);
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    for name in names.into_iter().filter(|n| matches(n)) {
        if let Err(e) = js.delete_stream(&name).await {
            eprintln!("cleanup: cannot delete {name}: {e}");
        }
    }
}

/// A `nats-server` of a test's own, on a free loopback port with its store in `store`;
/// killed when dropped.
pub struct OwnNats {
    pub port: u16,
    child: Child,
}

/// The `nats-server` binary, if installed.
pub fn nats_server_binary() -> Option<String> {
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .map(String::from)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl OwnNats {
    pub fn start(binary: &str, port: u16, store: &Path) -> Self {
        let child = Command::new(binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        let server = Self { port, child };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen on {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
    }
}
