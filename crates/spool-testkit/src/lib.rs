//! Test support for Spool's integration tests (not published; a dev-dependency only).
//!
//! - [`Server`]: the real `spool serve` binary started on `127.0.0.1:0` (memory engine by
//!   default, or disk, or any engine flags), with API key [`API_KEY`] and JWT secret
//!   [`JWT_SECRET`]; [`refuses_to_start`] for configurations that must not start.
//! - [`engines`]: every engine as a [`engines::Backend`], clusters of nodes on a namespace of
//!   their own, the shared Redis/NATS of the tests, and [`engines::OwnServer`], a Redis or NATS
//!   server of a test's own to stop and restart.
//! - [`Proxy`]: a TCP fault proxy that cuts, freezes or deafens connections, or refuses new ones.
//! - [`SseClient`], [`WsPeer`]: raw SSE and `spool.v1.json` peers; [`follow`]: subscribers
//!   on Spool's own client that check every message.
//! - [`free_port`], [`jwt`], [`rss_of`], [`TestRng`] and other small helpers.
//!
//! The `spool` binary is the one Cargo built for the integration tests of `crates/spool`
//! ([`spool_bin`]), so every test that starts it lives there; nothing here runs `cargo build`.

pub mod engines;
pub mod follow;
mod proxy;
mod server;
mod sse;
mod ws;

use std::{path::PathBuf, process::Command, time::Duration};

use serde_json::Value;

pub use proxy::Proxy;
pub use server::Server;
pub use sse::{SseClient, SseEvent};
pub use ws::{WsEnd, WsPeer, connect_with, message_offset};

pub const API_KEY: &str = "test-api-key";
pub const JWT_SECRET: &str = "test-jwt-secret";

/// The `spool` binary under test: `CARGO_BIN_EXE_spool`, which Cargo sets when it builds and
/// when it runs the integration tests of `crates/spool` (it builds the binary for them).
pub fn spool_bin() -> PathBuf {
    std::env::var_os("CARGO_BIN_EXE_spool")
        .map(PathBuf::from)
        .expect(
            "CARGO_BIN_EXE_spool is not set: tests that start `spool serve` are integration tests \
             of crates/spool, run by `cargo test -p spool`",
        )
}

/// Percent-encodes a stream name as one path segment.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A port that was free a moment ago, for tests that restart a server on the same address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn jwt(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("encode jwt")
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A small seeded xorshift generator for tests with random moments; the seed is printed, and
/// taken from the environment variable `var` when set, so a failing run can be replayed.
pub struct TestRng(u64);

impl TestRng {
    pub fn from_env(var: &str) -> TestRng {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            })
            | 1;
        eprintln!("random seed: {var}={seed}");
        TestRng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }
}

/// The resident set size (`VmRSS` of /proc/PID/status) of process `pid`, in bytes.
pub fn rss_of(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// `spool serve` with `args` must refuse to start: exit non-zero within 15 s, saying every
/// one of `needles`.
pub fn refuses_to_start(args: &[&str], needles: &[&str]) {
    let started = std::time::Instant::now();
    let out = Command::new(spool_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--api-key", API_KEY])
        .args(args)
        .output()
        .expect("run spool serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} started: {stderr}");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} not in {stderr}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{args:?} took {:?} to give up",
        started.elapsed()
    );
}
