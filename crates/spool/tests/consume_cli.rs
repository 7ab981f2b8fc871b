//! `spool consume STREAM GROUP` against the real server: print-and-ack, `--exec` that acks on
//! exit 0 and nacks otherwise (a message that keeps failing lands in the dead-letter stream),
//! `--create`, and clear errors for a group that does not exist.

mod common;

use std::process::{Command, Output};

use common::{API_KEY, Server, enc};
use serde_json::{Value, json};

fn spool(server: &Server) -> Command {
    let mut cmd = Command::new(common::spool_bin());
    cmd.env("SPOOL_SERVER", format!("http://{}", server.addr))
        .env("SPOOL_TOKEN", API_KEY)
        .env_remove("SPOOL_CONFIG");
    cmd
}

/// Runs `spool consume` on a blocking thread, so the test's runtime can go on.
async fn consume(server: &Server, args: &[&str]) -> Output {
    let mut cmd = spool(server);
    cmd.arg("consume").args(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run spool consume"))
        .await
        .expect("the consume thread")
}

async fn put_group(server: &Server, stream: &str, group: &str, body: Value) -> u16 {
    reqwest::Client::new()
        .put(server.url(&format!(
            "/v1/streams/{}/groups/{}",
            enc(stream),
            enc(group)
        )))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .expect("put group")
        .status()
        .as_u16()
}

async fn group_info(server: &Server, stream: &str, group: &str) -> Value {
    reqwest::Client::new()
        .get(server.url(&format!(
            "/v1/streams/{}/groups/{}",
            enc(stream),
            enc(group)
        )))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("get group")
        .json()
        .await
        .expect("group json")
}

#[tokio::test]
async fn consume_prints_and_acks_every_message_once() {
    let server = Server::start(&[]);
    for i in 1..=5 {
        server.publish("jobs", &format!("job {i}")).await;
    }
    // --create makes the group from the oldest message; --no-follow ends at the drained backlog.
    let out = consume(
        &server,
        &["jobs", "workers", "--create", "--no-follow", "--wait", "1s"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    for (i, line) in lines.iter().enumerate() {
        let fields: Vec<&str> = line.split('\t').collect();
        assert!(
            fields[0].ends_with(&format!(":{}", i + 1)),
            "EPOCH:OFFSET first: {line}"
        );
        assert_eq!(fields[1], "1", "first delivery: {line}");
        assert_eq!(fields[2], format!("job {}", i + 1));
    }
    assert!(stderr.contains("acked 5"), "{stderr}");

    let info = group_info(&server, "jobs", "workers").await;
    assert_eq!(info["stats"]["acked"], 5, "{info}");
    assert_eq!(info["stats"]["in_flight"], 0, "{info}");
    assert_eq!(info["stats"]["pending"], 0, "{info}");

    // Nothing is delivered again to the group.
    let again = consume(&server, &["jobs", "workers", "--no-follow", "--wait", "0s"]).await;
    assert!(again.status.success());
    assert!(again.stdout.is_empty(), "acked messages came back");
}

#[tokio::test]
async fn exec_acks_on_success_and_nacks_until_the_dead_letter_stream() {
    let server = Server::start(&[]);
    assert_eq!(
        put_group(
            &server,
            "tasks",
            "runners",
            json!({"start": "oldest", "max_deliveries": 2}),
        )
        .await,
        201
    );
    for i in 1..=4 {
        server.publish("tasks", &format!("task {i}")).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("seen");
    // Offset 2 always fails; the others succeed. The payload arrives on stdin.
    let cmd = format!(
        "cat >> {log}; echo \" $SPOOL_OFFSET $SPOOL_DELIVERIES\" >> {log}; test \"$SPOOL_OFFSET\" != 2",
        log = log.display()
    );
    // 3 acks + 2 failed deliveries of offset 2 = 5 settlements.
    let out = consume(
        &server,
        &[
            "tasks", "runners", "--exec", &cmd, "--count", "5", "--wait", "2s",
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("acked 3, nacked 2"), "{stderr}");
    let seen = std::fs::read_to_string(&log).unwrap();
    assert!(seen.contains("task 1 1 1"), "{seen}");
    assert!(seen.contains("task 2 2 1"), "{seen}");
    assert!(
        seen.contains("task 2 2 2"),
        "second delivery of the failing one: {seen}"
    );

    // After max_deliveries (2) failures the message is in the dead-letter stream, with its
    // headers naming where it came from and why.
    let (status, dead) = server
        .poll("tasks.runners.dead", "after=oldest&wait=5")
        .await;
    assert_eq!(status, 200, "{dead}");
    let messages = dead["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 1, "{dead}");
    assert_eq!(messages[0]["data"], "task 2");
    let headers = &messages[0]["headers"];
    assert_eq!(headers["spool-dead-stream"], "tasks", "{headers}");
    assert_eq!(headers["spool-dead-offset"], "2", "{headers}");
    assert_eq!(headers["spool-dead-reason"], "command_failed", "{headers}");

    let info = group_info(&server, "tasks", "runners").await;
    assert_eq!(info["stats"]["acked"], 3, "{info}");
    assert_eq!(info["stats"]["dead_lettered"], 1, "{info}");
}

#[tokio::test]
async fn consume_says_plainly_when_it_cannot() {
    let server = Server::start(&[]);
    server.publish("s", "x").await;
    let out = consume(&server, &["s", "nobody", "--no-follow", "--wait", "0s"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("group_not_found"), "{stderr}");

    let out = consume(&server, &["s", "g", "--max", "0"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--max"),
        "a bad flag is named"
    );

    // A wrong credential is a refusal, not a retry loop.
    let mut cmd = spool(&server);
    cmd.env("SPOOL_TOKEN", "wrong")
        .args(["consume", "s", "g", "--create", "--no-follow"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
