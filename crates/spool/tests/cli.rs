//! The client commands and configuration of the real binary: `spool publish`, `spool tail`
//! (including resuming by itself across a server restart), the TOML file with per-pattern
//! retention, and age-based retention.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use common::{API_KEY, Server};

fn spool(server: &Server) -> Command {
    let mut cmd = Command::new(common::spool_bin());
    cmd.env("SPOOL_SERVER", format!("http://{}", server.addr))
        .env("SPOOL_TOKEN", API_KEY)
        .env_remove("SPOOL_CONFIG");
    cmd
}

fn publish(server: &Server, stream: &str, data: &str) -> String {
    let out = spool(server)
        .args(["publish", stream, data])
        .output()
        .expect("run spool publish");
    assert!(
        out.status.success(),
        "publish failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Spawns `spool tail` and returns its stdout lines through a channel.
fn tail(server: &Server, args: &[&str]) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = spool(server)
        .arg("tail")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run spool tail");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

fn line(rx: &mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(20))
        .expect("spool tail printed nothing in time")
}

#[test]
fn publish_and_tail() {
    let s = Server::start(&[]);
    let first = publish(&s, "cli", "hello");
    assert!(first.ends_with(":1"), "{first}");
    let epoch = first.split(':').next().unwrap().to_owned();

    // Stdin, and one message per line.
    let mut child = spool(&s)
        .args(["publish", "cli", "--lines"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"two\nthree\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{epoch}:2\n{epoch}:3\n")
    );

    let out = spool(&s)
        .args(["tail", "cli", "--from-start", "--no-follow"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{epoch}:1\thello\n{epoch}:2\ttwo\n{epoch}:3\tthree\n")
    );

    let out = spool(&s)
        .args([
            "tail",
            "cli",
            "--after",
            &format!("{epoch}:2"),
            "--count",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{epoch}:3\tthree\n")
    );

    // Idempotent retries print "duplicate".
    for expect in ["4", "4 duplicate"] {
        let out = spool(&s)
            .args(["publish", "cli", "x", "--idempotency-key", "k"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            format!("{epoch}:{expect}")
        );
    }
}

#[test]
fn client_errors_are_clear_and_not_retried() {
    let s = Server::start(&[]);
    let out = spool(&s)
        .args(["publish", "bad name", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_stream_name"));
    let out = spool(&s)
        .env("SPOOL_TOKEN", "wrong")
        .args(["tail", "x", "--no-follow"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = spool(&s)
        .args(["tail", "x", "--after", "garbage"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_position"));
}

#[test]
fn tail_follows_live_and_survives_a_server_restart() {
    let listen = format!("127.0.0.1:{}", common::free_port());
    let mut s = Server::start_on(&listen, &[]);
    let epoch1 = publish(&s, "follow", "a")
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    let (mut child, rx) = tail(&s, &["follow", "--from-start"]);
    assert_eq!(line(&rx), format!("{epoch1}:1\ta"));
    publish(&s, "follow", "b");
    assert_eq!(line(&rx), format!("{epoch1}:2\tb"));

    // The memory engine forgets everything on restart: tail must say so, then go on.
    s.kill();
    std::thread::sleep(Duration::from_millis(300));
    let s = Server::start_on(&listen, &[]);
    let reset = line(&rx);
    assert!(reset.starts_with("reset\tunknown_stream\t"), "{reset}");
    let epoch2 = publish(&s, "follow", "c")
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    assert_ne!(epoch1, epoch2);
    assert_eq!(line(&rx), format!("{epoch2}:1\tc"));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn config_file_sets_per_pattern_retention_and_flags_win() {
    let dir = std::env::temp_dir().join(format!("spool-cli-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("spool.toml");
    std::fs::write(
        &path,
        r#"
[retention]
max_messages = 4

[[retention.rules]]
pattern = "chat:*"
max_messages = 2
max_age = "1h"
"#,
    )
    .unwrap();
    let s = Server::start(&["--config", path.to_str().unwrap()]);
    for i in 0..6 {
        publish(&s, "chat:room", &i.to_string());
        publish(&s, "other", &i.to_string());
    }
    let info = |stream: &str| info_of(&s, stream);
    let chat = info("chat:room");
    assert_eq!(
        (
            chat["oldest"].as_u64(),
            chat["retention"]["max_messages"].as_u64()
        ),
        (Some(5), Some(2))
    );
    assert_eq!(chat["retention"]["max_age_ms"], 3_600_000);
    assert_eq!(info("other")["oldest"], 3);
    drop(s);

    // A flag beats the file.
    let s = Server::start(&["--config", path.to_str().unwrap(), "--history-limit", "1"]);
    for i in 0..3 {
        publish(&s, "other", &i.to_string());
    }
    assert_eq!(info_of(&s, "other")["oldest"], 3);
    std::fs::remove_dir_all(&dir).ok();
}

fn info_of(s: &Server, stream: &str) -> serde_json::Value {
    let out = Command::new("curl")
        .args(["-sf", "-H", &format!("authorization: Bearer {API_KEY}")])
        .arg(s.url(&format!("/v1/streams/{stream}")))
        .output()
        .expect("curl");
    serde_json::from_slice(&out.stdout).expect("info json")
}

#[test]
fn history_ttl_expires_messages_and_readers_get_a_reset() {
    let s = Server::start(&["--history-ttl", "1s"]);
    let first = publish(&s, "ttl", "old");
    // The message expires after 1 s, at the next sweep (about once a second): polled, since
    // on a loaded machine the sweep may come late.
    let started = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    loop {
        let info = info_of(&s, "ttl");
        if info["oldest"].as_u64() == Some(2) {
            assert_eq!(info["head"].as_u64(), Some(1), "{info}");
            break;
        }
        assert_eq!(
            (info["head"].as_u64(), info["oldest"].as_u64()),
            (Some(1), Some(1)),
            "{info}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the message did not expire within 30 s: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let epoch = first.split(':').next().unwrap();
    let out = spool(&s)
        .args([
            "tail",
            "ttl",
            "--after",
            &format!("{epoch}:0"),
            "--no-follow",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("reset\thistory_expired\t{epoch}:1\n")
    );
}

#[test]
fn bad_configuration_fails_at_startup_with_a_reason() {
    for (args, needle) in [
        (vec!["--history-ttl", "soon"], "invalid duration"),
        (vec!["--max-payload", "lots"], "invalid byte size"),
        (vec!["--engine", "floppy"], "unknown engine"),
        (
            vec!["--config", "/nonexistent/spool.toml"],
            "cannot read config file",
        ),
        (
            vec!["--jwt-public-key", "/nonexistent/key.pem"],
            "cannot read JWT public key /nonexistent/key.pem",
        ),
        (
            vec!["--jwt-public-key", RSA_PRIVATE],
            "rsa_private.pem is a private key",
        ),
        (vec!["--session-ttl", "0s"], "must be longer than zero"),
        (vec!["--ws-outbound-messages", "0"], "must be at least 1"),
        (vec!["--ws-outbound-bytes", "1KiB"], "must be at least 4KiB"),
    ] {
        let out = Command::new(common::spool_bin())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

const RSA_PRIVATE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../spool-server/tests/fixtures/jwt/rsa_private.pem"
);
const RSA_PUBLIC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../spool-server/tests/fixtures/jwt/rsa_public.pem"
);

/// An RS256 token signed with the test key, for audience `aud`, that may publish anywhere.
fn rs256(aud: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let key = std::fs::read(RSA_PRIVATE).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        &serde_json::json!({"sub": "cli", "exp": exp, "aud": aud, "publish": ["*"]}),
        &jsonwebtoken::EncodingKey::from_rsa_pem(&key).unwrap(),
    )
    .unwrap()
}

#[test]
fn config_file_sets_jwt_public_keys_and_websocket_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.toml");
    std::fs::write(
        &path,
        format!(
            r#"
jwt_public_keys = [{RSA_PUBLIC:?}]
jwt_audience = "spool"
session_ttl = "10m"
ws_ping_interval = "30s"
ws_ping_timeout = "10s"
ws_outbound_messages = 64
ws_outbound_bytes = "256KiB"
stuck_timeout = "2m"
conflate = ["prices/*"]
ws_max_inflight_publishes = 16
"#
        ),
    )
    .unwrap();
    let s = Server::start(&["--config", path.to_str().unwrap()]);
    let out = spool(&s)
        .env("SPOOL_TOKEN", rs256("spool"))
        .args(["publish", "jwt", "signed with RS256"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = spool(&s)
        .env("SPOOL_TOKEN", rs256("someone-else"))
        .args(["publish", "jwt", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("audience (aud) is wrong"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// `spool tail --transport ws|sse|poll`: the same lines whichever way it reads.

const TRANSPORTS: [&str; 3] = ["ws", "sse", "poll"];

/// Runs `spool tail ARGS` to the end: (success, stdout, stderr).
fn tail_output(server: &Server, args: &[&str]) -> (bool, String, String) {
    let out = spool(server).arg("tail").args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits up to 5 s for `child` to exit by itself.
fn exits(child: &mut std::process::Child) -> std::process::ExitStatus {
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("spool tail did not exit in time");
}

#[test]
fn tail_prints_the_same_lines_over_every_transport() {
    let s = Server::start(&[]);
    let mut child = spool(&s)
        .args(["publish", "same", "--lines"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\nthree\n")
        .unwrap();
    let epoch = String::from_utf8(child.wait_with_output().unwrap().stdout)
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    publish(&s, "same", "multi\nline\r");
    // Bytes that are not UTF-8, from stdin.
    let mut child = spool(&s)
        .args(["publish", "same", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&[0xff, 0, 0x80])
        .unwrap();
    assert!(child.wait().unwrap().success());
    let all = format!(
        "{epoch}:1\tone\n{epoch}:2\ttwo\n{epoch}:3\tthree\n{epoch}:4\tmulti\\nline\\r\n{epoch}:5\tbase64:/wCA\n"
    );
    let at_3 = format!("{epoch}:3");
    let after_3 = format!("{epoch}:4\tmulti\\nline\\r\n{epoch}:5\tbase64:/wCA\n");

    for transport in TRANSPORTS {
        let t = ["--transport", transport];
        let cases: [(Vec<&str>, String); 6] = [
            (vec!["--from-start", "--count", "5"], all.clone()),
            (
                vec!["--from-start", "--count", "2"],
                format!("{epoch}:1\tone\n{epoch}:2\ttwo\n"),
            ),
            (vec!["--from-start", "--no-follow"], all.clone()),
            (vec!["--after", &at_3, "--no-follow"], after_3.clone()),
            (
                vec!["--after", "latest", "--count", "1"],
                format!("{epoch}:5\tbase64:/wCA\n"),
            ),
            // A position of another history: a reset to the head, and (no-follow) nothing more.
            (
                vec!["--after", "AAAAAAAAAA:3", "--no-follow"],
                format!("reset\tepoch_changed\t{epoch}:5\n"),
            ),
        ];
        for (args, expected) in cases {
            let args: Vec<&str> = ["same"].iter().chain(&t).chain(&args).copied().collect();
            let (ok, stdout, stderr) = tail_output(&s, &args);
            assert!(ok, "{args:?} failed: {stderr}");
            assert_eq!(stdout, expected, "{args:?}");
        }
        // Caught up already: --no-follow prints nothing and exits.
        for start in [&format!("{epoch}:5")[..], "now"] {
            let (ok, stdout, stderr) = tail_output(
                &s,
                &[
                    "same",
                    "--transport",
                    transport,
                    "--after",
                    start,
                    "--no-follow",
                ],
            );
            assert!(
                ok && stdout.is_empty(),
                "{transport} {start}: {stdout:?} {stderr}"
            );
        }
    }
}

#[test]
fn tail_follows_live_after_a_reset_and_ends_on_ctrl_c_over_every_transport() {
    let s = Server::start(&[]);
    let first = publish(&s, "live", "before");
    let epoch = first.split(':').next().unwrap().to_owned();
    let tails: Vec<_> = TRANSPORTS
        .iter()
        .map(|t| tail(&s, &["live", "--transport", t, "--after", "AAAAAAAAAA:7"]))
        .collect();
    for (_, rx) in &tails {
        assert_eq!(line(rx), format!("reset\tepoch_changed\t{epoch}:1"));
    }
    publish(&s, "live", "after");
    for (mut child, rx) in tails {
        assert_eq!(line(&rx), format!("{epoch}:2\tafter"));
        let killed = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        assert!(exits(&mut child).success(), "Ctrl-C is a clean end");
    }
}

#[test]
fn tail_resumes_over_sse_and_ws_across_a_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_port());
    let mut s = Server::start_disk(&listen, dir.path(), &[]);
    let epoch = publish(&s, "resume", "a")
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    let tails: Vec<_> = ["sse", "ws"]
        .iter()
        .map(|t| {
            tail(
                &s,
                &["resume", "--transport", t, "--from-start", "--count", "3"],
            )
        })
        .collect();
    for (_, rx) in &tails {
        assert_eq!(line(rx), format!("{epoch}:1\ta"));
    }
    // SSE gets `event: reconnect`, WebSocket a `reconnect` frame and close 1001.
    assert!(s.terminate().success());
    let s = Server::start_disk(&listen, dir.path(), &[]);
    publish(&s, "resume", "b");
    publish(&s, "resume", "c");
    for (mut child, rx) in tails {
        assert_eq!(
            line(&rx),
            format!("{epoch}:2\tb"),
            "no reset, nothing missed"
        );
        assert_eq!(line(&rx), format!("{epoch}:3\tc"));
        assert!(exits(&mut child).success());
    }
}

#[test]
fn tail_flag_mistakes_are_clear_errors() {
    let s = Server::start(&[]);
    let fails = |args: &[&str], needles: &[&str]| {
        let (ok, _, stderr) = tail_output(&s, args);
        assert!(!ok, "{args:?} should fail");
        for needle in needles {
            assert!(stderr.contains(needle), "{args:?}: {stderr}");
        }
    };
    fails(
        &["x", "--transport", "pigeon"],
        &[
            "invalid value 'pigeon' for '--transport",
            "ws",
            "sse",
            "poll",
        ],
    );
    fails(
        &["x", "--transport", "sse", "--limit", "10"],
        &["--limit", "--transport poll"],
    );
    fails(&["x", "--count", "0"], &["--count"]);
    fails(
        &["x", "--transport", "sse", "--after", "nope"],
        &["invalid_position"],
    );
    // https:// works (wss://, tests/tls.rs); a scheme that is neither is refused at once.
    let (ok, _, stderr) = tail_output(
        &s,
        &["x", "--transport", "ws", "--server", "ftp://127.0.0.1:1"],
    );
    assert!(
        !ok && stderr.contains("--transport ws needs an http:// or https:// server URL"),
        "{stderr}"
    );
    // Bad credentials are not retried, whichever the transport.
    for (transport, needle) in [("ws", "invalid_token"), ("sse", "401"), ("poll", "401")] {
        let out = spool(&s)
            .env("SPOOL_TOKEN", "wrong")
            .args(["tail", "x", "--transport", transport])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(needle),
            "{transport}: {stderr}"
        );
    }
}
