//! The process launcher: `spool serve` as a child process on 127.0.0.1.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use serde_json::Value;

use crate::{API_KEY, JWT_SECRET, enc, rss_of, spool_bin};

/// How many of the server's last log lines [`Server::logged`] looks through.
const LOG_LINES: usize = 100_000;

/// A running `spool serve`; killed when dropped. Its log (stderr, `SPOOL_LOG=info`) is kept
/// for [`Server::logged`], and echoed when `SPOOL_TEST_LOGS` is set.
pub struct Server {
    child: Child,
    pub addr: String,
    pub http: reqwest::Client,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    /// Starts `spool serve` on a free loopback port with the memory engine, an API key and a
    /// JWT secret, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_on("127.0.0.1:0", extra)
    }

    pub fn start_on(listen: &str, extra: &[&str]) -> Server {
        Self::spawn(listen, &["--engine", "memory"], extra)
    }

    /// Starts `spool serve` on the disk engine with its data in `dir`.
    pub fn start_disk(listen: &str, dir: &std::path::Path, extra: &[&str]) -> Server {
        let dir = dir.to_str().expect("utf-8 temp dir");
        Self::spawn(listen, &["--engine", "disk", "--data-dir", dir], extra)
    }

    pub fn spawn(listen: &str, engine: &[&str], extra: &[&str]) -> Server {
        let mut child = Command::new(spool_bin())
            .args(["serve", "--listen", listen])
            .args(engine)
            .args(["--api-key", API_KEY, "--jwt-secret", JWT_SECRET])
            .args(extra)
            .env("SPOOL_LOG", "info")
            // Tests stop servers often: no drain window unless a test asks for one.
            .env("SPOOL_SHUTDOWN_DRAIN", "0s")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn spool serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let log: Arc<Mutex<VecDeque<String>>> = Default::default();
        let lines = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("SPOOL_TEST_LOGS").is_some() {
                    eprintln!("[server] {line}");
                }
                if let Some(rest) = line.split("addr=").nth(1)
                    && line.contains("listening")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                }
                let mut lines = lines.lock().unwrap();
                if lines.len() == LOG_LINES {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("spool serve did not report its address (is the port free?)");
            }
        };
        Server {
            child,
            addr,
            http: reqwest::Client::new(),
            log,
        }
    }

    /// Whether one of the server's log lines so far contains `what`.
    pub fn logged(&self, what: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(what))
    }

    /// Whether the server logs a line containing `what` within 10 s. Its log is read on a
    /// thread of the test kit's own, so a line the server has already written may not have
    /// been read yet when the test asks ([`logged`](Self::logged) right after an answer can
    /// miss it on a loaded machine).
    pub async fn logs(&self, what: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.logged(what) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Publishes `data` to `stream` with the API key; returns the answer.
    pub async fn publish(&self, stream: &str, data: &str) -> Value {
        let r = self
            .http
            .post(self.url(&format!("/v1/streams/{}/messages", enc(stream))))
            .bearer_auth(API_KEY)
            .body(data.to_owned())
            .send()
            .await
            .expect("publish");
        assert_eq!(r.status(), 201, "publish answered {}", r.status());
        r.json().await.expect("publish json")
    }

    /// A long-poll read with the API key.
    pub async fn poll(&self, stream: &str, query: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(&format!("/v1/streams/{}/messages?{query}", enc(stream))))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("poll");
        let status = r.status().as_u16();
        (status, r.json().await.expect("poll json"))
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("spool serve did not exit within 10 s of SIGTERM");
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident set size, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.pid())
    }

    /// The status of `GET /v1/streams/{stream}` with the API key (404: no such stream).
    pub async fn info_status(&self, stream: &str) -> u16 {
        self.http
            .get(self.url(&format!("/v1/streams/{}", enc(stream))))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("stream info")
            .status()
            .as_u16()
    }

    /// Publishes `messages` (objects of the batch endpoint: `stream`, `data`, `key`, …) in
    /// one `POST /v1/publish` with the API key; returns the results.
    pub async fn publish_batch(&self, messages: Vec<Value>) -> Vec<Value> {
        let r = self
            .http
            .post(self.url("/v1/publish"))
            .bearer_auth(API_KEY)
            .json(&serde_json::json!({ "messages": messages }))
            .send()
            .await
            .expect("batch publish");
        let status = r.status();
        let body: Value = r.json().await.expect("batch publish json");
        assert!(
            status.is_success(),
            "batch publish answered {status}: {body}"
        );
        body["results"].as_array().expect("results").clone()
    }

    /// Waits until the server counts no open WebSocket connection (each has ended and saved
    /// its session). A session's position is the last message written to its socket, so a
    /// test that publishes "while the client is away" waits for this first: on a loaded
    /// machine the server may otherwise still write into the dead socket.
    pub async fn wait_for_no_ws_connection(&self) {
        for _ in 0..200 {
            if self.metric("spool_connections{transport=\"ws\"}").await == Some(0.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server still counts an open WebSocket connection after 10 s");
    }

    /// The value of the Prometheus sample whose line starts with `sample` (name and labels,
    /// e.g. `spool_connections{transport="ws"}`), if present.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
