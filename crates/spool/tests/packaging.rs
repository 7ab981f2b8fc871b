//! deploy/Dockerfile and deploy/spool.service: every flag and variable they give `spool serve`
//! exists, the unit passes `systemd-analyze verify` and has its hardening, the image's health
//! check command tells a ready server from a stopped one (plain and TLS), and — where a Docker
//! engine runs — the image builds, runs as a non-root user and becomes healthy. Without a
//! Docker engine that last test says so and skips.

mod common;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{Server, spool_bin};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `spool serve --help`: the flags and variables that exist.
fn serve_help() -> String {
    let out = Command::new(spool_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The Dockerfile's instructions, continuation lines joined.
fn dockerfile() -> Vec<String> {
    let text = read("deploy/Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

fn instruction<'a>(lines: &'a [String], name: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(name).map(str::trim))
        .collect()
}

/// The shell command of the image's HEALTHCHECK, for the port `port`.
fn healthcheck(port: u16) -> String {
    let lines = dockerfile();
    let check = instruction(&lines, "HEALTHCHECK ");
    assert_eq!(check.len(), 1, "one HEALTHCHECK");
    let cmd = check[0].split_once("CMD ").expect("HEALTHCHECK ... CMD").1;
    assert!(
        cmd.contains("/readyz"),
        "the health check asks /readyz: {cmd}"
    );
    cmd.replace("127.0.0.1:7070", &format!("127.0.0.1:{port}"))
}

fn run_sh(cmd: &str) -> bool {
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the health check did not finish in 30 s: {cmd}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_with_a_volume_and_a_healthcheck() {
    let lines = dockerfile();
    let stages = instruction(&lines, "FROM ");
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("COPY --from=build ")),
        "the runtime stage copies the built binary only"
    );
    let users = instruction(&lines, "USER ");
    let user = users.last().expect("a USER");
    assert!(
        !["root", "0", "0:0"].contains(user)
            && !user.starts_with("root:")
            && !user.starts_with("0:"),
        "runs as {user}"
    );
    let volumes = instruction(&lines, "VOLUME ");
    assert!(
        volumes.iter().any(|v| v.contains("/var/lib/spool")),
        "{volumes:?}"
    );
    assert_eq!(instruction(&lines, "EXPOSE "), ["7070"]);
    assert_eq!(instruction(&lines, "STOPSIGNAL "), ["SIGTERM"]);
    assert!(instruction(&lines, "CMD ").contains(&r#"["serve"]"#));
    // The variables it sets are spool serve's, and point where the volume is.
    let help = serve_help();
    let env = instruction(&lines, "ENV ").join(" ");
    for pair in env.split_whitespace() {
        let (var, value) = pair.split_once('=').expect("ENV VAR=value");
        assert!(
            help.contains(&format!("[env: {var}=")),
            "{var} is not a spool serve variable"
        );
        if var == "SPOOL_DATA_DIR" {
            assert_eq!(value, "/var/lib/spool");
        }
    }
    assert!(read(".dockerignore").lines().any(|l| l.trim() == "target"));
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = read("deploy/spool.service");
    let value = |key: &str| -> Vec<String> {
        unit.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    for (key, want) in [
        ("User", "spool"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("StateDirectory", "spool"),
        ("KillSignal", "SIGTERM"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(value(key), [want], "{key}");
    }
    assert_eq!(value("CapabilityBoundingSet"), [""], "no capabilities");
    assert!(value("LimitNOFILE")[0].parse::<u64>().unwrap() >= 65536);
    // Every flag of ExecStart is spool serve's; the data directory is the state directory.
    let exec = &value("ExecStart")[0];
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/spool"));
    assert_eq!(words.next(), Some("serve"));
    let help = serve_help();
    let args: Vec<&str> = words.collect();
    for flag in args.iter().filter(|w| w.starts_with("--")) {
        assert!(
            help.contains(&format!("{flag} ")),
            "{flag} is not a spool serve flag"
        );
    }
    assert!(exec.contains("--data-dir /var/lib/spool"));

    // systemd's own check, with ExecStart pointing at the binary under test.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping systemd-analyze verify: systemd-analyze is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/spool", spool_bin().to_str().unwrap()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    // Lines about the unit itself; systemd also reports on units of the host it cannot see.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("spool.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {said}"
    );
}

#[tokio::test]
async fn the_healthcheck_command_tells_ready_from_stopped() {
    let mut server = Server::start(&[]);
    let port: u16 = server.addr.rsplit(':').next().unwrap().parse().unwrap();
    let cmd = healthcheck(port);
    assert!(run_sh(&cmd), "ready server reported unhealthy: {cmd}");
    server.terminate();
    assert!(!run_sh(&cmd), "a stopped server reported healthy");

    // Over TLS (the second branch of the command).
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let server = Server::start(&[
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ]);
    let port: u16 = server.addr.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        run_sh(&healthcheck(port)),
        "a ready TLS server reported unhealthy"
    );
}

/// Builds the image and runs it where a Docker engine is available.
#[test]
fn the_image_builds_runs_as_non_root_and_becomes_healthy() {
    let engine = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output();
    match engine {
        Ok(out) if out.status.success() => {}
        _ => {
            eprintln!(
                "skipping the image build: no Docker engine here (`docker info` failed); \
                 the Dockerfile's static checks ran in the other tests"
            );
            return;
        }
    }
    let tag = format!("spool-test:{}", std::process::id());
    let status = Command::new("docker")
        .args(["build", "-f", "deploy/Dockerfile", "-t", &tag, "."])
        .current_dir(repo())
        .status()
        .unwrap();
    assert!(status.success(), "docker build failed");
    let name = format!("spool-test-{}", std::process::id());
    let run = Command::new("docker")
        .args(["run", "-d", "--name", &name, "-e", "SPOOL_API_KEY=k", &tag])
        .output()
        .unwrap();
    let cleanup = || {
        let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
    };
    if !run.status.success() {
        cleanup();
        panic!("docker run: {}", String::from_utf8_lossy(&run.stderr));
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    let healthy = loop {
        let out = Command::new("docker")
            .args(["inspect", "--format", "{{.State.Health.Status}}", &name])
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if status == "healthy" || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let uid = Command::new("docker")
        .args(["exec", &name, "id", "-u"])
        .output()
        .unwrap();
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
    cleanup();
    assert_eq!(healthy, "healthy");
    assert!(!uid.is_empty() && uid != "0", "runs as uid {uid:?}");
}
