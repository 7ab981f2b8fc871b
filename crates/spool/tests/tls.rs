//! TLS through the real binary: `spool serve --tls-cert --tls-key` with a CA and certificates
//! made in the test (rcgen), HTTPS publish (the CLI and spool-client) and WSS subscribe
//! (spool-client), plain HTTP against the TLS port, stalled handshakes, bad files at startup,
//! and the certificate reloaded on SIGHUP without dropping connections.

mod common;

use std::{
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{API_KEY, Server, spool_bin};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use spool_client::{Client, Config, Event, Start, Tls, http::HttpClient};

/// A CA and a server certificate it signed, for 127.0.0.1 and localhost, as PEM.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn make_pki(name: &str) -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, name);
    let cert = leaf.signed_by(&key, &ca).unwrap();
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// Writes `pki`'s files into `dir` as ca.pem, cert.pem and key.pem; returns their paths.
fn write(dir: &Path, pki: &Pki) -> (PathBuf, PathBuf, PathBuf) {
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, &pki.ca).unwrap();
    std::fs::write(&paths.1, &pki.cert).unwrap();
    std::fs::write(&paths.2, &pki.key).unwrap();
    paths
}

fn tls_flags<'a>(cert: &'a Path, key: &'a Path) -> [&'a str; 4] {
    [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]
}

/// Runs the spool CLI with `args`, giving up (and failing) after 60 s.
fn spool(args: &[&str]) -> Output {
    let mut child = Command::new(spool_bin())
        .args(args)
        .env_remove("SPOOL_CA_CERT")
        .env_remove("SPOOL_SERVER")
        .env_remove("SPOOL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn spool");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("spool {args:?} did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

async fn next_message(client: &Client) -> spool_client::Message {
    let wait = async {
        loop {
            match client.next_event().await {
                Some(Event::Message(m)) => return m,
                Some(_) => continue,
                None => panic!("the client ended"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("a message within 30 s")
}

async fn wss(server: &Server, tls: Tls) -> Result<Client, spool_client::Error> {
    Client::connect(
        Config::new(format!("wss://{}/v1/ws", server.addr))
            .token(API_KEY)
            .tls(tls)
            .connect_timeout(Duration::from_secs(20)),
    )
    .await
}

#[tokio::test]
async fn https_publish_and_wss_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki("spool");
    let (ca, cert, key) = write(dir.path(), &pki);
    let server = Server::start(&tls_flags(&cert, &key));
    let https = format!("https://{}", server.addr);
    let tls = Tls::from_ca_pem(pki.ca.as_bytes()).unwrap();

    let ws = wss(&server, tls.clone()).await.expect("wss connect");
    ws.subscribe("tls:chat", Start::Now).await.unwrap();

    // The CLI over HTTPS, trusting the test CA.
    let out = spool(&[
        "publish",
        "--server",
        &https,
        "--token",
        API_KEY,
        "--ca-cert",
        ca.to_str().unwrap(),
        "tls:chat",
        "hello over https",
    ]);
    assert!(out.status.success(), "spool publish: {}", stderr(&out));
    let m = next_message(&ws).await;
    assert_eq!(m.text(), Some("hello over https"));

    // spool-client's HTTP client, and the CA through the environment for the CLI.
    let http = HttpClient::with_tls(&https, Some(API_KEY), Some(&tls)).unwrap();
    http.publish("tls:chat", b"second".to_vec(), None, None)
        .await
        .unwrap();
    assert_eq!(next_message(&ws).await.text(), Some("second"));
    let out = Command::new(spool_bin())
        .args(["publish", "--server", &https, "--token", API_KEY])
        .args(["tls:chat", "third"])
        .env("SPOOL_CA_CERT", &ca)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(next_message(&ws).await.text(), Some("third"));

    // `spool tail` over WSS reads them back.
    let out = spool(&[
        "tail",
        "--server",
        &https,
        "--token",
        API_KEY,
        "--ca-cert",
        ca.to_str().unwrap(),
        "--transport",
        "ws",
        "--from-start",
        "--count",
        "3",
        "tls:chat",
    ]);
    assert!(out.status.success(), "spool tail: {}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    for m in ["hello over https", "second", "third"] {
        assert!(printed.contains(m), "tail printed {printed}");
    }

    // Without the CA the server is not trusted (the system store does not hold the test CA).
    let out = spool(&[
        "publish",
        "--server",
        &https,
        "--token",
        API_KEY,
        "tls:chat",
        "untrusted",
    ]);
    assert!(!out.status.success(), "an untrusted server was accepted");
    let other = Tls::from_ca_pem(make_pki("other").ca.as_bytes()).unwrap();
    let Err(err) = wss(&server, other).await else {
        panic!("a foreign CA must fail");
    };
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "the error says why: {err}"
    );

    // A CA file that is no CA: a clear error naming the flag.
    let bogus = dir.path().join("bogus.pem");
    std::fs::write(&bogus, "not a certificate").unwrap();
    let out = spool(&[
        "publish",
        "--server",
        &https,
        "--ca-cert",
        bogus.to_str().unwrap(),
        "tls:chat",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--ca-cert"), "{}", stderr(&out));
    ws.close().await;
}

#[tokio::test]
async fn plain_http_and_stalled_handshakes_on_the_tls_port_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki("spool");
    let (ca, cert, key) = write(dir.path(), &pki);
    let mut flags = tls_flags(&cert, &key).to_vec();
    flags.extend(["--header-timeout", "1s"]);
    let server = Server::start(&flags);

    // A plain-HTTP request gets a one-line 400 saying the port speaks HTTPS, then EOF.
    let mut tcp = std::net::TcpStream::connect(&server.addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    tcp.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("tls_required"), "{answer}");

    // The CLI against it with http:// fails with that message.
    let out = spool(&[
        "publish",
        "--server",
        &format!("http://{}", server.addr),
        "--token",
        API_KEY,
        "s",
        "x",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("HTTPS"), "{}", stderr(&out));

    // A connection that never starts its handshake, and one that stops halfway through its
    // first record, are closed after the header timeout.
    for first in [&b""[..], &[0x16, 0x03, 0x01][..]] {
        let mut tcp = std::net::TcpStream::connect(&server.addr).unwrap();
        tcp.write_all(first).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "a stalled handshake got bytes");
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "a stalled handshake was held for {:?}",
            started.elapsed()
        );
    }

    // The server still serves HTTPS.
    let tls = Tls::from_ca_file(&ca).unwrap();
    let http = HttpClient::with_tls(
        &format!("https://{}", server.addr),
        Some(API_KEY),
        Some(&tls),
    )
    .unwrap();
    http.publish("after", b"ok".to_vec(), None, None)
        .await
        .expect("https after the refusals");
}

/// A TLS handshake holds its connection slot: connections that never finish one fill
/// `--max-connections`, the next is refused at once, and the slots come back when the header
/// timeout closes them.
#[tokio::test]
async fn stalled_handshakes_count_against_the_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki("spool");
    let (ca, cert, key) = write(dir.path(), &pki);
    let mut flags = tls_flags(&cert, &key).to_vec();
    flags.extend(["--max-connections", "2", "--header-timeout", "5s"]);
    let server = Server::start(&flags);
    let stalled: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(&server.addr).unwrap())
        .collect();
    let mut third = std::net::TcpStream::connect(&server.addr).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    let _ = third.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 503 ") && answer.contains("too_many_connections"),
        "the third connection got {answer:?}"
    );
    for mut tcp in stalled {
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            tcp.read(&mut buf).unwrap_or(0),
            0,
            "closed without an answer"
        );
    }
    // Their slots are free again.
    let tls = Tls::from_ca_file(&ca).unwrap();
    let http = HttpClient::with_tls(
        &format!("https://{}", server.addr),
        Some(API_KEY),
        Some(&tls),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = http.publish("slots", b"x".to_vec(), None, None).await {
        assert!(Instant::now() < deadline, "no slot came back: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn missing_or_bad_files_stop_the_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = write(dir.path(), &make_pki("spool"));
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, _, other_key) = write(&other, &make_pki("other"));
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN NOTHING-----\nabc\n-----END NOTHING-----\n",
    )
    .unwrap();
    let missing = dir.path().join("missing.pem");
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (
            vec![
                "--tls-cert".into(),
                p(&missing),
                "--tls-key".into(),
                p(&key),
            ],
            &["--tls-cert", "missing.pem", "no such file"],
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&garbage),
                "--tls-key".into(),
                p(&key),
            ],
            &["--tls-cert", "garbage.pem", "no PEM certificate"],
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&cert),
                "--tls-key".into(),
                p(&missing),
            ],
            &["--tls-key", "missing.pem", "no such file"],
        ),
        (
            vec!["--tls-cert".into(), p(&cert), "--tls-key".into(), p(&cert)],
            &["--tls-key", "no PEM private key"],
        ),
        (
            vec![
                "--tls-cert".into(),
                p(&cert),
                "--tls-key".into(),
                p(&other_key),
            ],
            &["does not belong to the certificate"],
        ),
        (
            vec!["--tls-cert".into(), p(&cert)],
            &["--tls-cert", "needs --tls-key"],
        ),
    ];
    for (flags, needles) in cases {
        let mut argv = vec!["serve", "--engine", "memory", "--listen", "127.0.0.1:0"];
        argv.extend(flags.iter().map(String::as_str));
        let out = spool(&argv);
        assert!(!out.status.success(), "{flags:?} started");
        let err = stderr(&out);
        assert!(!err.contains("listening"), "{flags:?}: {err}");
        for needle in needles {
            assert!(err.contains(needle), "{flags:?}: {needle:?} not in {err}");
        }
    }
}

fn sighup(server: &Server) {
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let first = make_pki("first");
    let (_, cert, key) = write(dir.path(), &first);
    let server = Server::start(&tls_flags(&cert, &key));
    let https = format!("https://{}", server.addr);
    let first_ca = Tls::from_ca_pem(first.ca.as_bytes()).unwrap();

    let ws = wss(&server, first_ca.clone())
        .await
        .expect("wss with the first CA");
    ws.subscribe("reload", Start::Now).await.unwrap();

    // Rotate to a certificate of another CA, then SIGHUP.
    let second = make_pki("second");
    let second_ca = Tls::from_ca_pem(second.ca.as_bytes()).unwrap();
    assert!(
        HttpClient::with_tls(&https, Some(API_KEY), Some(&second_ca))
            .unwrap()
            .publish("reload", b"x".to_vec(), None, None)
            .await
            .is_err(),
        "the second CA is trusted before the reload"
    );
    std::fs::write(&cert, &second.cert).unwrap();
    std::fs::write(&key, &second.key).unwrap();
    sighup(&server);
    let deadline = Instant::now() + Duration::from_secs(30);
    let http = HttpClient::with_tls(&https, Some(API_KEY), Some(&second_ca)).unwrap();
    loop {
        match http.publish("reload", b"after".to_vec(), None, None).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the new certificate was not served within 30 s: {e}"),
        }
    }
    assert!(server.logs("reloaded the TLS certificate").await);
    // The connection opened with the old certificate is still up and delivering.
    assert_eq!(next_message(&ws).await.text(), Some("after"));
    // New connections get the new certificate only. (A fresh client: one that connected
    // before may resume its TLS session, which skips the certificate.)
    let fresh_first_ca = Tls::from_ca_pem(first.ca.as_bytes()).unwrap();
    assert!(wss(&server, fresh_first_ca).await.is_err());
    let ws2 = wss(&server, second_ca.clone())
        .await
        .expect("wss with the second CA");

    // A broken file on the next SIGHUP: logged, and the second certificate stays.
    std::fs::write(&cert, "garbage").unwrap();
    sighup(&server);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.logged("cannot reload the TLS certificate") {
        assert!(
            Instant::now() < deadline,
            "the failed reload was not logged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    http.publish("reload", b"still".to_vec(), None, None)
        .await
        .expect("still served after a failed reload");
    assert_eq!(next_message(&ws).await.text(), Some("still"));
    ws2.close().await;
    ws.close().await;
}
