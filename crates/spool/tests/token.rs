//! `spool token` through the binary: tokens it signs (HS256 with the secret from a flag, the
//! environment or the config file; RS256 / ES256 with a private key) are accepted by a real
//! server for exactly their patterns, `--check` verifies like the server and prints the claims,
//! and every bad input is a clear error.

mod common;

use std::{
    io::Write,
    process::{Command, Output, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use common::{JWT_SECRET, Server, enc, spool_bin};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn fixture(name: &str) -> String {
    format!(
        "{}/../spool-server/tests/fixtures/jwt/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Runs `spool` with `args` (and `stdin`), none of the JWT variables inherited.
fn spool_with(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut command = Command::new(spool_bin());
    command.args(args);
    for var in [
        "SPOOL_JWT_SECRET",
        "SPOOL_JWT_PUBLIC_KEY",
        "SPOOL_JWT_ISSUER",
        "SPOOL_JWT_AUDIENCE",
        "SPOOL_JWT_PRIVATE_KEY",
        "SPOOL_CONFIG",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn spool(args: &[&str]) -> Output {
    spool_with(args, &[], None)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded; wanted {needle:?}");
    assert!(err.contains(needle), "{needle:?} not in: {err}");
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

async fn publish(server: &Server, token: &str, stream: &str) -> u16 {
    server
        .http
        .post(server.url(&format!("/v1/streams/{}/messages", enc(stream))))
        .bearer_auth(token)
        .body("x")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn read(server: &Server, token: &str, stream: &str) -> u16 {
    server
        .http
        .get(server.url(&format!("/v1/streams/{}/messages?wait=0", enc(stream))))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn signed_tokens_are_accepted_for_exactly_their_patterns() {
    let server = Server::start(&[]);
    let before = now();
    let token = ok(&spool(&[
        "token",
        "--jwt-secret",
        JWT_SECRET,
        "--subscribe",
        "tok:*",
        "--publish",
        "tok:pub",
        "--publish",
        "tok:also",
        "--admin",
        "tok:*",
        "--sub",
        "alice",
        "--ttl",
        "10m",
    ]));
    let token = token.trim();
    let c = claims(token);
    assert_eq!(c["sub"], "alice");
    assert_eq!(c["subscribe"], json!(["tok:*"]));
    assert_eq!(c["publish"], json!(["tok:pub", "tok:also"]));
    assert_eq!(c["admin"], json!(["tok:*"]));
    assert!(c.get("consume").is_none(), "no empty claims: {c}");
    let exp = c["exp"].as_u64().unwrap();
    assert!((before + 600..=now() + 600).contains(&exp), "exp {exp}");

    assert_eq!(publish(&server, token, "tok:pub").await, 201);
    assert_eq!(publish(&server, token, "tok:also").await, 201);
    assert_eq!(publish(&server, token, "tok:other").await, 403);
    assert_eq!(read(&server, token, "tok:pub").await, 200);
    assert_eq!(read(&server, token, "other").await, 403);
    // The admin claim: this token may delete tok:* streams and nothing else.
    let delete = |stream: &'static str| {
        server
            .http
            .delete(server.url(&format!("/v1/streams/{}", enc(stream))))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(delete("tok:also").await.unwrap().status(), 200);
    assert_eq!(delete("other").await.unwrap().status(), 403);

    // The secret from the environment, an absolute expiry (RFC 3339), the default TTL.
    let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(now() + 120));
    let out = spool_with(
        &["token", "--publish", "tok:pub", "--exp", &at.to_string()],
        &[("SPOOL_JWT_SECRET", JWT_SECRET)],
        None,
    );
    let token = ok(&out);
    assert_eq!(publish(&server, token.trim(), "tok:pub").await, 201);
    let out = spool_with(
        &["token", "--publish", "x"],
        &[("SPOOL_JWT_SECRET", JWT_SECRET)],
        None,
    );
    let exp = claims(ok(&out).trim())["exp"].as_u64().unwrap();
    assert!((before + 3600..=now() + 3600).contains(&exp), "1h default");
}

#[tokio::test]
async fn the_config_file_gives_secret_issuer_and_audience() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spool.toml");
    std::fs::write(
        &file,
        format!(
            "jwt_secret = \"{JWT_SECRET}\"\njwt_issuer = \"https://id.example\"\njwt_audience = \"spool\"\n"
        ),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let server = Server::start(&["--config", file]);
    let token = ok(&spool(&["token", "--config", file, "--publish", "cfg:*"]));
    let c = claims(token.trim());
    assert_eq!(
        (c["iss"].as_str(), c["aud"].as_str()),
        (Some("https://id.example"), Some("spool"))
    );
    assert_eq!(publish(&server, token.trim(), "cfg:1").await, 201);
    // The same secret without the file's issuer and audience: the server refuses it.
    let bare = ok(&spool(&[
        "token",
        "--jwt-secret",
        JWT_SECRET,
        "--publish",
        "cfg:*",
    ]));
    assert_eq!(publish(&server, bare.trim(), "cfg:1").await, 401);
    // --check with the file says why (one of the two claims it lacks; the order of the
    // checks is not fixed).
    let out = spool(&["token", "--config", file, "--check", bare.trim()]);
    fails(&out, "invalid token: the token lacks the ");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"iss\"") || err.contains("\"aud\""), "{err}");
    let out = ok(&spool(&[
        "token",
        "--config",
        file,
        "--check",
        token.trim(),
    ]));
    assert!(out.contains("valid token, signed with HS256"), "{out}");
}

#[tokio::test]
async fn rs256_and_es256_with_a_private_key() {
    let server = Server::start(&[
        "--jwt-public-key",
        &fixture("rsa_public.pem"),
        "--jwt-public-key",
        &fixture("ec_public.pem"),
    ]);
    for (key, public, alg) in [
        ("rsa_private.pem", "rsa_public.pem", "RS256"),
        ("ec_private.pem", "ec_public.pem", "ES256"),
    ] {
        let token = ok(&spool(&[
            "token",
            "--private-key",
            &fixture(key),
            "--publish",
            "keys:*",
            "--sub",
            "svc",
        ]));
        let token = token.trim();
        let header: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], alg);
        assert_eq!(publish(&server, token, "keys:a").await, 201, "{alg}");
        let out = ok(&spool(&[
            "token",
            "--jwt-public-key",
            &fixture(public),
            "--check",
            token,
        ]));
        assert!(out.contains(&format!("signed with {alg}")), "{out}");
        // The other kind of key does not verify it.
        let other = if alg == "RS256" {
            "rsa_other_public.pem"
        } else {
            "rsa_public.pem"
        };
        let out = spool(&[
            "token",
            "--jwt-public-key",
            &fixture(other),
            "--check",
            token,
        ]);
        assert!(!out.status.success(), "{alg} verified with {other}");
    }
    fails(
        &spool(&[
            "token",
            "--private-key",
            &fixture("rsa_public.pem"),
            "--publish",
            "x",
        ]),
        "not a PEM RSA or EC P-256 private key",
    );
    fails(
        &spool(&[
            "token",
            "--private-key",
            "/nonexistent/key.pem",
            "--publish",
            "x",
        ]),
        "--private-key: cannot read /nonexistent/key.pem",
    );
}

#[test]
fn check_prints_claims_and_refuses_bad_tokens() {
    let token = ok(&spool(&[
        "token",
        "--jwt-secret",
        "k1",
        "--subscribe",
        "a:*",
        "--consume",
        "jobs",
        "--sub",
        "bob",
        "--ttl",
        "2h",
    ]));
    let out = ok(&spool(&[
        "token",
        "--jwt-secret",
        "k1",
        "--check",
        token.trim(),
    ]));
    assert!(out.contains("valid token, signed with HS256"), "{out}");
    assert!(out.contains("\"sub\": \"bob\""), "{out}");
    assert!(out.contains("\"consume\": ["), "{out}");
    assert!(
        out.contains("expires ") && (out.contains("(in 2h)") || out.contains("(in 1h 59m")),
        "{out}"
    );
    // From stdin.
    let out = spool_with(
        &["token", "--jwt-secret", "k1", "--check", "-"],
        &[],
        Some(&token),
    );
    assert!(ok(&out).contains("\"sub\": \"bob\""));

    fails(
        &spool(&["token", "--jwt-secret", "k2", "--check", token.trim()]),
        "invalid token: the token's signature does not verify",
    );
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "old", "exp": now() - 3600, "subscribe": ["a"]}),
        &EncodingKey::from_secret(b"k1"),
    )
    .unwrap();
    fails(
        &spool(&["token", "--jwt-secret", "k1", "--check", &expired]),
        "the token has expired",
    );
    let mut parts: Vec<String> = token.trim().split('.').map(str::to_owned).collect();
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(br#"{"sub":"mallory","exp":9999999999,"subscribe":["*"]}"#);
    fails(
        &spool(&["token", "--jwt-secret", "k1", "--check", &parts.join(".")]),
        "signature does not verify",
    );
    fails(
        &spool(&["token", "--jwt-secret", "k1", "--check", "not-a-token"]),
        "invalid token",
    );
    fails(
        &spool(&["token", "--check", token.trim()]),
        "nothing to verify with",
    );
}

#[test]
fn bad_signing_requests_are_clear_errors() {
    for (args, needle) in [
        (&["token", "--jwt-secret", "k"][..], "would allow nothing"),
        (&["token", "--publish", "x"][..], "nothing to sign with"),
        (
            &[
                "token",
                "--jwt-secret",
                "k",
                "--publish",
                "x",
                "--exp",
                "1000",
            ][..],
            "not in the future",
        ),
        (
            &[
                "token",
                "--jwt-secret",
                "k",
                "--publish",
                "x",
                "--exp",
                "soon",
            ][..],
            "neither Unix seconds nor an RFC 3339 time",
        ),
        (
            &[
                "token",
                "--jwt-secret",
                "k",
                "--publish",
                "x",
                "--ttl",
                "0s",
            ][..],
            "--ttl must be longer than zero",
        ),
        (
            &[
                "token",
                "--jwt-secret",
                "k",
                "--publish",
                "x",
                "--ttl",
                "400d",
            ][..],
            "more than a year",
        ),
        (
            &["token", "--jwt-secret", "k", "--publish", ""][..],
            "must not be empty",
        ),
        (
            &["token", "--jwt-secret", "", "--publish", "x"][..],
            "secret is empty",
        ),
        (
            &[
                "token",
                "--jwt-secret",
                "k",
                "--publish",
                "x",
                "--ttl",
                "1h",
                "--exp",
                "99999999999",
            ][..],
            "cannot be used with",
        ),
        (
            &[
                "token",
                "--jwt-secret",
                "k",
                "--check",
                "t",
                "--publish",
                "x",
            ][..],
            "cannot be used with",
        ),
        (
            &[
                "token",
                "--config",
                "/nonexistent/spool.toml",
                "--publish",
                "x",
            ][..],
            "cannot read config file",
        ),
    ] {
        fails(&spool(args), needle);
    }
}
