//! Running the real binary as an operator does (issue 16's defects): the listen port is bound
//! before the engine opens (a port in use fails at once; the port answers 503 while the engine
//! opens) and recovery logs its progress; on SIGTERM `/readyz` answers 503 for the drain window
//! while everything else works; fatal errors are JSON with `--log-format json`, name the flag,
//! path or `SPOOL_*` variable at fault, and say an OS error once; a CLI connection error says
//! "connection refused".

mod common;

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{API_KEY, JWT_SECRET, Server};
use serde_json::Value;

/// `spool` with `args`, its environment cleared of `SPOOL_*` settings; waits at most 60 s.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(common::spool_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("SPOOL_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spool");
    wait_output(child, Duration::from_secs(60))
}

fn wait_output(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "spool did not exit within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A `spool serve` whose stderr lines arrive on a channel, for tests that watch it start.
struct Starting {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Starting {
    fn spawn(args: &[&str]) -> Starting {
        let mut child = Command::new(common::spool_bin())
            .arg("serve")
            .args(args)
            .env("SPOOL_LOG", "info")
            .env_remove("SPOOL_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn spool serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Starting { child, lines }
    }

    /// Waits (60 s at most) for a log line containing `what`.
    fn wait_for(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(_) => {}
                Err(_) => panic!("spool serve logged no line with {what:?} within 60 s"),
            }
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_of(line: &str) -> String {
    line.split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("addr= in the line")
        .to_owned()
}

/// The port is bound before the engine opens: a second server on a data directory another
/// server holds, and on that server's port, fails on the port (before the fix it failed on
/// the data directory's lock, i.e. only after opening the engine).
#[tokio::test]
async fn a_port_in_use_fails_before_the_engine_opens() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start_disk("127.0.0.1:0", dir.path(), &[]);
    let out = run(
        &[
            "serve",
            "--listen",
            &first.addr,
            "--engine",
            "disk",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--api-key",
            API_KEY,
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot listen on {}", first.addr))
            && err.contains("Address already in use")
            && err.contains("--listen"),
        "the port is what fails, named by its flag: {err}"
    );
    assert!(!err.contains("locked"), "the engine was not opened: {err}");
}

/// While the engine opens, the bound port answers: `/healthz` 200, `/readyz` 503 `starting`,
/// the API 503 `engine_unavailable` (before the fix the port was not bound: connection
/// refused). A Redis that accepts connections and never answers keeps the engine opening.
#[tokio::test]
async fn the_port_answers_503_while_the_engine_opens() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let redis = format!("redis://{}", silent.local_addr().unwrap());
    let server = Starting::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--engine",
        "redis",
        "--redis-url",
        &redis,
        "--engine-timeout",
        "30s",
        "--api-key",
        API_KEY,
    ]);
    let addr = addr_of(&server.wait_for("bound the listen address"));
    let http = reqwest::Client::new();
    let ready = http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .expect("the port answers while the engine opens");
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "starting");
    let health = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let publish = http
        .post(format!("http://{addr}/v1/streams/a/messages"))
        .bearer_auth(API_KEY)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(publish.status(), 503);
    assert_eq!(publish.headers()["retry-after"], "1");
    let body: Value = publish.json().await.unwrap();
    assert_eq!(body["error"]["code"], "engine_unavailable");
    drop(silent);
}

/// Recovery says what it reads and what it recovered: streams, records, bytes.
#[tokio::test]
async fn recovery_logs_its_progress() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Server::start_disk("127.0.0.1:0", dir.path(), &["--segment-size", "64KiB"]);
    for round in 0..10 {
        let batch = (0..100)
            .map(|i| {
                serde_json::json!({"stream": format!("s{}", i % 20), "data": format!("{round}-{i}-{}", "x".repeat(200))})
            })
            .collect();
        first.publish_batch(batch).await;
    }
    assert!(first.terminate().success());
    let dir_arg = dir.path().to_str().unwrap();
    let again = Starting::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--engine",
        "disk",
        "--data-dir",
        dir_arg,
        "--api-key",
        API_KEY,
    ]);
    let start = again.wait_for("recovering: reading the WAL");
    assert!(figure(&start, "segments") > 1, "{start}");
    let done = again.wait_for("recovered");
    assert_eq!(figure(&done, "streams"), 20, "{done}");
    assert!(figure(&done, "records") >= 1000, "{done}");
    assert!(figure(&done, "bytes") >= 200_000, "{done}");
    again.wait_for("listening");
}

/// The number after `what=` in a log line.
fn figure(line: &str, what: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{what}="))?.parse().ok())
        .unwrap_or_else(|| panic!("no {what}= in {line:?}"))
}

/// On SIGTERM, `/readyz` answers 503 `draining` for `--shutdown-drain` while publishes still
/// work, then the server stops (before the fix: connection refused at once).
#[tokio::test]
async fn readyz_answers_503_while_draining() {
    // A window of 5 s, watched for 3.5 s: room for a loaded machine to deliver the signal and
    // for the publish below to land inside the window.
    let mut server = Server::start(&["--shutdown-drain", "5s"]);
    let ready = server.http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let sent = Instant::now();
    Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    let mut draining = false;
    while sent.elapsed() < Duration::from_millis(3500) {
        let r = server.http.get(server.url("/readyz")).send().await.unwrap();
        if r.status() == 503 {
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["status"], "draining");
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(draining, "/readyz answered 503 draining");
    // Everything else still works during the drain window.
    server.publish("during-drain", "still served").await;
    assert!(server.logs("drain window").await);
    // The listener closes once the window has passed (a second SIGTERM would end it early,
    // so the test waits instead of sending one).
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.http.get(server.url("/readyz")).send().await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the listener closed after the window"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sent.elapsed() >= Duration::from_millis(4900),
        "the listener stayed open for the drain window"
    );
    assert!(server.terminate().success());
}

/// With `--log-format json`, fatal errors are a JSON line (also a bad value from the
/// environment, caught while parsing the command line).
#[tokio::test]
async fn fatal_errors_are_json_with_log_format_json() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(
        &[
            "serve",
            "--engine",
            "memory",
            "--listen",
            &addr,
            "--api-key",
            API_KEY,
            "--log-format",
            "json",
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    let last: Value = serde_json::from_str(err.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the fatal error is JSON ({e}): {err}"));
    assert_eq!(last["level"], "ERROR");
    assert!(
        last["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("Address already in use"),
        "{last}"
    );
    assert!(
        err.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "every line is JSON: {err}"
    );

    let out = run(
        &["serve", "--engine", "memory"],
        &[("SPOOL_LOG_FORMAT", "json"), ("SPOOL_MAX_PAYLOAD", "lots")],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    let line: Value = serde_json::from_str(err.trim())
        .unwrap_or_else(|e| panic!("the parse error is JSON ({e}): {err}"));
    assert!(
        line["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("SPOOL_MAX_PAYLOAD"),
        "{line}"
    );
}

/// A path that cannot be used is named with its flag, and an OS error is said once (it was
/// "Not a directory (os error 20): Not a directory (os error 20)").
#[tokio::test]
async fn errors_name_the_flag_and_say_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let data_dir = file.join("data");
    let out = run(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--engine",
            "disk",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--api-key",
            API_KEY,
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    let last = err.lines().last().unwrap_or_default();
    assert!(last.contains("--data-dir"), "names the flag: {last}");
    assert!(
        last.contains(data_dir.to_str().unwrap()),
        "names the path: {last}"
    );
    assert_eq!(last.matches("os error").count(), 1, "{last}");
}

/// A bad value from a `SPOOL_*` variable names the variable (the user never typed the flag
/// clap names); a bad flag still names the flag.
#[tokio::test]
async fn env_errors_name_the_variable() {
    let out = run(
        &["serve", "--engine", "memory"],
        &[("SPOOL_MAX_PAYLOAD", "lots")],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("SPOOL_MAX_PAYLOAD") && err.contains("\"lots\""),
        "names the variable and its value: {err}"
    );
    let out = run(
        &["serve", "--engine", "memory", "--max-payload", "lots"],
        &[],
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("--max-payload") && !err.contains("SPOOL_MAX_PAYLOAD"),
        "{err}"
    );
    let out = run(
        &["serve", "--engine", "memory"],
        &[("SPOOL_SHUTDOWN_DRAIN", "forever")],
    );
    assert!(
        stderr(&out).contains("SPOOL_SHUTDOWN_DRAIN"),
        "{}",
        stderr(&out)
    );
}

/// `spool publish` to a port nothing listens on says why: connection refused (it said only
/// "error sending request").
#[tokio::test]
async fn cli_connection_errors_say_connection_refused() {
    let port = common::free_port();
    let out = run(
        &[
            "publish",
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "--token",
            JWT_SECRET,
            "s",
            "hello",
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = stderr(&out).to_lowercase();
    assert!(err.contains("connection refused"), "{err}");
}

/// SIGHUP never ends the server (its default action would: `systemctl reload` sends it).
/// Without TLS there is nothing to reload, which is logged, and the server keeps serving.
#[tokio::test]
async fn sighup_without_tls_keeps_serving() {
    let server = Server::start(&[]);
    server.publish("hup", "before").await;
    for _ in 0..3 {
        let sent = std::process::Command::new("kill")
            .args(["-HUP", &server.pid().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(sent.success());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !server.logged("nothing to reload") {
        assert!(
            std::time::Instant::now() < deadline,
            "no 'nothing to reload' line after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = server.publish("hup", "after").await;
    assert_eq!(after["offset"], 2, "{after}");
    let (status, read) = server.poll("hup", "after=oldest").await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["messages"].as_array().map(Vec::len), Some(2), "{read}");
}

/// A server whose stderr reader is gone (a supervisor or a pipe that ended) still stops on
/// SIGTERM: a log line it cannot write is lost, and nothing else. Before, tracing-subscriber
/// reported the failed write with `eprintln!`, which panicked on the same stderr inside the
/// task that logs "shutting down", so the server answered `draining` for good and no signal
/// stopped it.
#[test]
fn sigterm_stops_a_server_whose_stderr_reader_is_gone() {
    use std::os::unix::net::UnixStream;
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let (reader, writer) = UnixStream::pair().unwrap();
    let mut cmd = Command::new(common::spool_bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("SPOOL_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--api-key", API_KEY, "--engine", "disk", "--data-dir"])
        .arg(dir.path())
        .args(["--shutdown-drain", "1s"])
        .env("SPOOL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::os::fd::OwnedFd::from(writer)))
        .spawn()
        .unwrap();
    let ready = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < ready,
            "the server did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(reader);
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    // The drain window (1 s) and the shutdown (nothing open) take a second or two; a server
    // that no signal stops would still run at the deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("SIGTERM did not stop the server within 30 s (its stderr reader is gone)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
