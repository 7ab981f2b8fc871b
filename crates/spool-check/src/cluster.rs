//! The servers a scenario starts itself: `spool serve` nodes (the binary given, normally the
//! running `spool` itself) and, for the Redis and NATS engines, an engine server of its own on
//! a spare loopback port so it can be restarted without disturbing anyone else.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Log lines of a node kept for a failure report.
const LOG_LINES: usize = 200;

/// One `spool serve` process.
pub struct Node {
    child: Option<Child>,
    /// `127.0.0.1:PORT` it listens on.
    pub addr: String,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl Node {
    /// Starts `bin serve --listen 127.0.0.1:0 ARGS` and waits (up to 30 s) until it says
    /// where it listens. Blocking: call it from `spawn_blocking`.
    pub fn start(bin: &Path, args: &[String]) -> anyhow::Result<Node> {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("SPOOL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} serve", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let log: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn({
            let log = log.clone();
            move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("listening")
                        && let Some(rest) = line.split("addr=").nth(1)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
                    }
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    if log.len() == LOG_LINES {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) if !addr.is_empty() => Ok(Node {
                child: Some(child),
                addr,
                log,
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let log = log.lock().unwrap_or_else(|e| e.into_inner());
                let tail: Vec<&str> = log
                    .iter()
                    .rev()
                    .take(20)
                    .rev()
                    .map(String::as_str)
                    .collect();
                bail!("spool serve did not start:\n{}", tail.join("\n"))
            }
        }
    }

    /// SIGTERM, then wait up to 20 s for it to exit (SIGKILL after that). Blocking.
    pub fn terminate(&mut self) {
        if let Some(child) = &mut self.child {
            signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// SIGKILL: a crash. Blocking.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process has exited by itself (a crash the nemesis did not cause).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// The node's last log lines.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().rev().take(n).rev().cloned().collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with the pid of a child this process started and has not reaped.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The engine servers a scenario can run itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    Redis,
    Nats,
}

/// A `redis-server` or `nats-server` of the run's own on a spare loopback port, keeping its
/// data in a temp dir across restarts: Redis with an append-only file fsynced on every write,
/// NATS with JetStream's file store.
pub struct EngineServer {
    kind: EngineKind,
    binary: PathBuf,
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// `name` on `PATH` or in the usual system directories (`/usr/sbin` is not on every `PATH`).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let system = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(system)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

impl EngineServer {
    /// The binary's name for `kind`.
    pub fn binary_name(kind: EngineKind) -> &'static str {
        match kind {
            EngineKind::Redis => "redis-server",
            EngineKind::Nats => "nats-server",
        }
    }

    /// Starts one. Blocking.
    pub fn start(kind: EngineKind) -> anyhow::Result<EngineServer> {
        let name = Self::binary_name(kind);
        let binary = find_binary(name).with_context(|| {
            format!("{name} is not installed (needed to restart the engine); give --engine-url to use a running one without engine restarts")
        })?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut server = EngineServer {
            kind,
            binary,
            port,
            dir: tempfile::tempdir()?,
            child: None,
        };
        server.launch()?;
        Ok(server)
    }

    /// The URL nodes use.
    pub fn url(&self) -> String {
        match self.kind {
            EngineKind::Redis => format!("redis://127.0.0.1:{}", self.port),
            EngineKind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let port = self.port.to_string();
        let dir = self.dir.path().display().to_string();
        let mut cmd = Command::new(&self.binary);
        match self.kind {
            EngineKind::Redis => cmd.args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                &dir,
            ]),
            EngineKind::Nats => cmd.args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd", &dir]),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers() {
            if Instant::now() > deadline {
                bail!(
                    "{} on port {port} did not come up within 20 s",
                    self.binary.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Redis answers `PING` with `+PONG` once its data is loaded; NATS greets with `INFO`
    /// (JetStream may need a moment more, which the nodes' retries absorb).
    fn answers(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 64];
        match self.kind {
            EngineKind::Redis => {
                s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf)
                        .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
            }
            EngineKind::Nats => s
                .read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"INFO")),
        }
    }

    /// SIGTERM (the server saves and exits), wait, and start it again on the same port and
    /// data. Blocking.
    pub fn restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        std::thread::sleep(down_for);
        self.launch()
    }
}

impl Drop for EngineServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
