//! `spool config check FILE` through the binary: the effective configuration with the source
//! of every value (flag, env, file, default), secrets masked, and the file's errors with their
//! line — bad TOML, unknown keys, wrong types, values `spool serve` would refuse.

mod common;

use std::process::{Command, Output};

use common::spool_bin;

fn check(file: &str, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(spool_bin());
    command.args(["config", "check", file]).args(extra);
    // Nothing inherited: only what the test gives.
    for (var, _) in std::env::vars() {
        if var.starts_with("SPOOL_") {
            command.env_remove(var);
        }
    }
    command.envs(env.iter().copied()).output().unwrap()
}

/// The table's row for `key`: (value, source).
fn row(out: &str, key: &str) -> (String, String) {
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("no row for {key} in:\n{out}"));
    let cells: Vec<&str> = line.split_whitespace().collect();
    (
        cells[1..cells.len() - 1].join(" "),
        cells[cells.len() - 1].to_owned(),
    )
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted; wanted {needles:?}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
}

#[test]
fn prints_every_setting_with_its_source_and_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spool.toml");
    std::fs::write(
        &file,
        r#"
listen = "127.0.0.1:9000"
engine = "memory"
api_keys = ["file-key-1", "file-key-2"]
jwt_secret = "file-secret"
redis_url = "redis://user:hunter2@10.0.0.5:6379/2"
max_payload = "2MiB"
[retention]
max_messages = 50
[[retention.rules]]
pattern = "chat:*"
max_messages = 1000
"#,
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let out = check(
        file,
        &["--history-ttl", "2h", "--max-connections", "77"],
        &[
            ("SPOOL_HEARTBEAT", "7s"),
            ("SPOOL_JWT_ISSUER", "https://id.example"),
        ],
    );
    let out = stdout(&out);
    assert!(out.starts_with(&format!("{file}: valid")), "{out}");
    assert_eq!(
        row(&out, "listen"),
        ("127.0.0.1:9000".into(), "file".into())
    );
    assert_eq!(row(&out, "engine"), ("memory".into(), "file".into()));
    assert_eq!(row(&out, "max_payload"), ("2MiB".into(), "file".into()));
    assert_eq!(
        row(&out, "retention.max_messages"),
        ("50".into(), "file".into())
    );
    assert_eq!(row(&out, "retention.max_age"), ("2h".into(), "flag".into()));
    assert_eq!(row(&out, "max_connections"), ("77".into(), "flag".into()));
    assert_eq!(row(&out, "heartbeat"), ("7s".into(), "env".into()));
    assert_eq!(
        row(&out, "jwt_issuer"),
        ("https://id.example".into(), "env".into())
    );
    assert_eq!(row(&out, "dedup_window"), ("2m".into(), "default".into()));
    assert_eq!(
        row(&out, "max_streams"),
        ("1000000".into(), "default".into())
    );
    assert_eq!(
        row(&out, "allow_anonymous"),
        ("false".into(), "default".into())
    );
    assert_eq!(
        row(&out, "tls_cert"),
        ("(not set)".into(), "default".into())
    );
    // Secrets: masked, whatever their source.
    assert_eq!(row(&out, "api_keys"), ("****,****".into(), "file".into()));
    assert_eq!(row(&out, "jwt_secret"), ("****".into(), "file".into()));
    assert_eq!(
        row(&out, "redis_url"),
        ("redis://user:****@10.0.0.5:6379/2".into(), "file".into())
    );
    for secret in ["file-key-1", "file-key-2", "file-secret", "hunter2"] {
        assert!(!out.contains(secret), "{secret} printed:\n{out}");
    }
    assert!(out.contains("[[retention.rules]]: 1 rule(s)"), "{out}");

    // A secret from a flag and from the environment: masked too.
    let out = stdout(&check(
        file,
        &["--jwt-secret", "flag-secret"],
        &[("SPOOL_ANYCABLE_SECRET", "env-secret")],
    ));
    assert_eq!(row(&out, "jwt_secret"), ("****".into(), "flag".into()));
    assert_eq!(row(&out, "anycable_secret"), ("****".into(), "env".into()));
    assert!(!out.contains("flag-secret") && !out.contains("env-secret"));
}

#[test]
fn errors_name_the_line_the_key_and_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let bad_toml = write("bad.toml", "engine = \"memory\"\nlisten = \"127.0.0.1:1\n");
    fails(
        &check(&bad_toml, &[], &[]),
        &["invalid config file", "bad.toml", "line 2"],
    );
    let unknown = write(
        "unknown.toml",
        "engine = \"memory\"\n\nlisten_addr = \"x\"\n",
    );
    fails(
        &check(&unknown, &[], &[]),
        &["unknown field `listen_addr`", "line 3"],
    );
    let wrong_type = write("type.toml", "max_connections = \"many\"\n");
    fails(
        &check(&wrong_type, &[], &[]),
        &["invalid type", "line 1", "max_connections"],
    );
    let bad_value = write("value.toml", "engine = \"floppy\"\n");
    fails(&check(&bad_value, &[], &[]), &["unknown engine \"floppy\""]);
    let bad_duration = write("dur.toml", "[retention]\nmax_age = \"forever\"\n");
    fails(
        &check(&bad_duration, &[], &[]),
        &["invalid duration", "line 2"],
    );
    // What a start would read: the TLS files.
    let tls = write(
        "tls.toml",
        "tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n",
    );
    fails(&check(&tls, &[], &[]), &["--tls-cert", "no such file"]);
    fails(
        &check("/nonexistent/spool.toml", &[], &[]),
        &["cannot read config file /nonexistent/spool.toml"],
    );
    // A flag that fails to parse, and one value over the file that resolve refuses.
    let good = write("good.toml", "engine = \"memory\"\n");
    fails(
        &check(&good, &["--max-connections", "0"], &[]),
        &["must be at least 1"],
    );
}
