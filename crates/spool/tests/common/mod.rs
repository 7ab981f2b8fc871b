//! The test harness: starts the real `spool` binary on 127.0.0.1 and talks to it over HTTP.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod engines;
pub mod follow;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use futures::StreamExt;
use serde_json::Value;

pub const API_KEY: &str = "test-api-key";
pub const JWT_SECRET: &str = "test-jwt-secret";

/// A running `spool serve`; killed when dropped.
pub struct Server {
    child: Child,
    pub addr: String,
    pub http: reqwest::Client,
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_spool"))
            .args(["serve", "--listen", listen])
            .args(engine)
            .args(["--api-key", API_KEY, "--jwt-secret", JWT_SECRET])
            .args(extra)
            .env("SPOOL_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn spool serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
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
        }
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
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// A minimal EventSource: parses the event stream of a response.
pub struct SseClient {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl SseClient {
    pub async fn connect(request: reqwest::RequestBuilder) -> SseClient {
        let r = request.send().await.expect("sse connect");
        assert_eq!(r.status(), 200, "SSE answered {}", r.status());
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream"),
            "not an event stream"
        );
        SseClient {
            body: r.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event with data (comments and retry-only blocks are skipped), or `None` when
    /// the stream ends; panics after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        tokio::time::timeout(timeout, self.next_inner())
            .await
            .expect("timed out waiting for an SSE event")
    }

    async fn next_inner(&mut self) -> Option<SseEvent> {
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent {
                    event: "message".into(),
                    ..Default::default()
                };
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = Some(v.trim_start().to_owned());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim_start().to_owned();
                    }
                }
                if !data.is_empty() {
                    ev.data = data.join("\n");
                    return Some(ev);
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }
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

/// A raw `spool.v1.json` WebSocket peer, for tests of the protocol itself.
pub struct WsPeer {
    pub socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

/// How a WebSocket read ended when it did not yield a frame.
#[derive(Debug, PartialEq)]
pub enum WsEnd {
    Closed(Option<(u16, String)>),
    Error(String),
}

impl WsPeer {
    /// Opens `/v1/ws` with the `spool.v1.json` subprotocol and `headers` on the upgrade.
    pub async fn open(addr: &str, headers: &[(&str, &str)]) -> Result<WsPeer, (u16, String)> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "spool.v1.json".parse().unwrap());
        for (k, v) in headers {
            let name: tokio_tungstenite::tungstenite::http::HeaderName =
                k.parse().expect("header name");
            request
                .headers_mut()
                .insert(name, v.parse().expect("header value"));
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(WsPeer { socket }),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                let body = r
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((r.status().as_u16(), body))
            }
            Err(e) => panic!("websocket connect failed: {e}"),
        }
    }

    /// Opens `/v1/ws` and sends `connect` with `token` (and optionally a session).
    pub async fn connect(addr: &str, token: &str) -> (WsPeer, Value) {
        let mut peer = WsPeer::open(addr, &[]).await.expect("upgrade");
        peer.send(serde_json::json!({"type":"connect","token":token}))
            .await;
        let connected = peer.expect("connected").await;
        (peer, connected)
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        use futures::SinkExt;
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .expect("ws send");
    }

    /// The next JSON frame (server pings are skipped), or how the connection ended.
    pub async fn next(&mut self, timeout: Duration) -> Result<Value, WsEnd> {
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let item = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("timed out waiting for a websocket frame");
            match item {
                None => return Err(WsEnd::Closed(None)),
                Some(Err(e)) => return Err(WsEnd::Error(e.to_string())),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("frame is JSON");
                    if v["type"] == "ping" {
                        continue;
                    }
                    return Ok(v);
                }
                Some(Ok(Message::Close(c))) => {
                    return Err(WsEnd::Closed(
                        c.map(|c| (u16::from(c.code), c.reason.to_string())),
                    ));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next frame, which must be of type `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let frame = self
            .next(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("expected a {kind} frame, the connection ended: {e:?}"));
        assert_eq!(frame["type"], kind, "expected a {kind} frame, got {frame}");
        frame
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            match self.next(Duration::from_secs(10)).await {
                Ok(_) => continue,
                Err(WsEnd::Closed(Some(c))) => return c,
                Err(e) => panic!("expected a close frame, got {e:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers of the WebSocket guarantee tests (ws_faults.rs, ws_guarantees.rs, ws_auth.rs).

impl Server {
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

/// A TCP proxy on 127.0.0.1 in front of a server, whose live connections can be cut at any
/// moment (both sockets are dropped: the client and the server each see the connection end,
/// and whatever was in flight inside the proxy is lost).
pub struct Proxy {
    /// `127.0.0.1:PORT` the proxy listens on.
    pub addr: String,
    conns:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, tokio::task::AbortHandle>>>,
    upstream: std::sync::Arc<std::sync::Mutex<String>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy forwarding every connection to `upstream`.
    pub async fn start(upstream: &str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let conns: std::sync::Arc<
            std::sync::Mutex<std::collections::HashMap<u64, tokio::task::AbortHandle>>,
        > = Default::default();
        let upstream = std::sync::Arc::new(std::sync::Mutex::new(upstream.to_owned()));
        let target = upstream.clone();
        let table = conns.clone();
        let accept = tokio::spawn(async move {
            let mut next_id = 0u64;
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                next_id += 1;
                let id = next_id;
                let upstream = target.lock().unwrap().clone();
                let done = table.clone();
                // Registered under the lock before it can finish, so its own removal below
                // always comes after the insert.
                let mut guard = table.lock().unwrap();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                    done.lock().unwrap().remove(&id);
                });
                guard.insert(id, task.abort_handle());
            }
        });
        Proxy {
            addr,
            conns,
            upstream,
            accept,
        }
    }

    /// Sends new connections to `upstream` from now on (a load balancer taking a dead node
    /// out); live ones stay where they are.
    pub fn set_upstream(&self, upstream: &str) {
        *self.upstream.lock().unwrap() = upstream.to_owned();
    }

    /// How many connections are open through the proxy.
    pub fn live(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Cuts every live connection; returns how many.
    pub fn cut_all(&self) -> usize {
        self.cut_where(|| true)
    }

    /// Cuts each live connection for which `pick` says so; returns how many.
    pub fn cut_where(&self, mut pick: impl FnMut() -> bool) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let chosen: Vec<u64> = conns.keys().copied().filter(|_| pick()).collect();
        for id in &chosen {
            if let Some(task) = conns.remove(id) {
                task.abort();
            }
        }
        chosen.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

impl WsPeer {
    /// Opens the WebSocket at `url` (e.g. `ws://ADDR/v1/ws?token=…`) with the `spool.v1.json`
    /// subprotocol and `headers`; an HTTP refusal is returned as its status and body.
    pub async fn open_url(url: &str, headers: &[(&str, &str)]) -> Result<WsPeer, (u16, String)> {
        let request = ws_request(url, headers);
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(WsPeer { socket }),
            Err(e) => Err(http_refusal(e)),
        }
    }

    /// Opens `/v1/ws` over a socket with a small receive buffer (`rcvbuf` bytes; the kernel
    /// may round it up), so a peer that stops reading backs the server up quickly.
    pub async fn open_small_rcvbuf(addr: &str, rcvbuf: u32) -> WsPeer {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let stream = socket
            .connect(addr.parse().expect("socket address"))
            .await
            .expect("tcp connect");
        let request = ws_request(&format!("ws://{addr}/v1/ws"), &[]);
        let (socket, _) = tokio_tungstenite::client_async(
            request,
            tokio_tungstenite::MaybeTlsStream::Plain(stream),
        )
        .await
        .expect("websocket handshake");
        WsPeer { socket }
    }

    /// The next text frame as it came (server pings included), or how the connection ended;
    /// `None` when `timeout` passed first.
    pub async fn next_text(&mut self, timeout: Duration) -> Option<Result<String, WsEnd>> {
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let item = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()?;
            return Some(match item {
                None => Err(WsEnd::Closed(None)),
                Some(Err(e)) => Err(WsEnd::Error(e.to_string())),
                Some(Ok(Message::Text(t))) => Ok(t.as_str().to_owned()),
                Some(Ok(Message::Close(c))) => Err(WsEnd::Closed(
                    c.map(|c| (u16::from(c.code), c.reason.to_string())),
                )),
                Some(Ok(_)) => continue,
            });
        }
    }
}

fn ws_request(
    url: &str,
    headers: &[(&str, &str)],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("websocket url");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "spool.v1.json".parse().unwrap());
    for (k, v) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName =
            k.parse().expect("header name");
        request
            .headers_mut()
            .insert(name, v.parse().expect("header value"));
    }
    request
}

fn http_refusal(e: tokio_tungstenite::tungstenite::Error) -> (u16, String) {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => {
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            (r.status().as_u16(), body)
        }
        e => panic!("websocket connect failed: {e}"),
    }
}

/// The `offset` of a `message` frame, read without parsing the whole frame (fast enough for
/// the hundreds of thousands of frames of the flood tests in debug builds); `None` for any
/// other frame.
pub fn message_offset(frame: &str) -> Option<u64> {
    if !frame.starts_with(r#"{"type":"message""#) {
        return None;
    }
    let rest = &frame[frame.find(r#""offset":"#)? + 9..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
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
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
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

/// Opens `/v1/ws` and sends `connect` with `fields`; returns the peer and the first answer.
pub async fn connect_with(addr: &str, fields: Value) -> (WsPeer, Value) {
    let mut peer = WsPeer::open(addr, &[]).await.expect("upgrade");
    let mut connect = fields;
    connect["type"] = serde_json::json!("connect");
    peer.send(connect).await;
    let answer = peer.next(Duration::from_secs(10)).await.expect("an answer");
    (peer, answer)
}
