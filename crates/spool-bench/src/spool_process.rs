//! A `spool serve` child process on a free 127.0.0.1 port, stopped when its guard drops
//! (also on error and panic), so a benchmark never leaves a server behind. Every benchmark
//! starts Spool here: [`SpoolProcess::start_on`] with one of the engines the benchmarks use
//! (and a fresh data directory for the disk engine), or [`SpoolProcess::start`] with the
//! engine flags spelled out (the cluster engines).

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use tokio::time::{Instant, sleep};

use crate::targets::process::free_port;

/// Longest wait for a new server to answer `/healthz`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Tries with a fresh port when the one picked was taken in the meantime.
const START_ATTEMPTS: u32 = 3;
/// Lines of the server's log kept to explain a failure.
const LOG_TAIL_LINES: usize = 40;
/// How long, at most, an exited server's last log lines are waited for.
const DRAIN_POLLS: u32 = 25;
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The server's last log lines, filled by a thread that drains its stderr.
type LogTail = Arc<Mutex<VecDeque<String>>>;

/// How `spool serve` stores messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpoolEngine {
    /// `--engine memory`.
    Memory,
    /// `--engine disk --durability fsync`: ack after fsync (the default setup).
    DiskFsync,
    /// `--engine disk --durability memory`: ack once written to the OS.
    DiskNosync,
}

/// A running `spool serve`.
pub struct SpoolProcess {
    child: Mutex<Child>,
    addr: SocketAddr,
    command_line: String,
    log: LogTail,
    /// The thread that fills `log`; it ends when the child's stderr closes.
    drain: Option<JoinHandle<()>>,
    /// The disk engine's data directory, removed on drop — after `Drop::drop` stopped the
    /// child, since fields drop after it.
    _data: Option<tempfile::TempDir>,
}

/// Why one start attempt failed.
enum StartError {
    /// Someone else took the port between picking and binding it: try another.
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

impl SpoolProcess {
    /// Runs `BIN serve --listen 127.0.0.1:PORT --engine … ARGS…` on `engine` (the disk engine
    /// in a fresh data directory) and waits until it answers `/healthz`.
    pub async fn start_on(bin: &Path, engine: SpoolEngine, args: &[String]) -> Result<Self> {
        let data = match engine {
            SpoolEngine::Memory => None,
            SpoolEngine::DiskFsync | SpoolEngine::DiskNosync => {
                Some(tempfile::tempdir().context("cannot create a data directory")?)
            }
        };
        let mut all: Vec<String> = match (&data, engine) {
            (Some(dir), SpoolEngine::DiskFsync | SpoolEngine::DiskNosync) => vec![
                "--engine".into(),
                "disk".into(),
                "--data-dir".into(),
                dir.path().display().to_string(),
                "--durability".into(),
                if engine == SpoolEngine::DiskFsync {
                    "fsync"
                } else {
                    "memory"
                }
                .into(),
            ],
            _ => vec!["--engine".into(), "memory".into()],
        };
        all.extend(args.iter().cloned());
        let mut process = Self::start(bin, &all).await?;
        process._data = data;
        Ok(process)
    }

    /// Runs `BIN serve --listen 127.0.0.1:PORT ARGS…` and waits until it answers `/healthz`.
    pub async fn start(bin: &Path, args: &[String]) -> Result<Self> {
        if !bin.is_file() {
            bail!(
                "{} not found: build it with `cargo build --release -p spool` or pass --spool-bin",
                bin.display()
            );
        }
        let mut last = anyhow!("no start attempt was made");
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(bin, args).await {
                Ok(process) => return Ok(process),
                Err(StartError::PortTaken(e)) => last = e,
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        Err(last)
    }

    async fn try_start(bin: &Path, args: &[String]) -> Result<Self, StartError> {
        let addr = free_port().map_err(StartError::Other)?;
        let command_line = std::iter::once(bin.display().to_string())
            .chain(["serve".to_owned(), "--listen".to_owned(), addr.to_string()])
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut command = Command::new(bin);
        command
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The benchmark's flags say everything: no stray SPOOL_* setting or config file of the
        // caller's environment may change what is measured (logging excepted).
        for (key, _) in std::env::vars_os() {
            if let Some(key) = key.to_str()
                && key.starts_with("SPOOL_")
                && key != "SPOOL_LOG"
            {
                command.env_remove(key);
            }
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))
            .map_err(StartError::Other)?;
        let log = LogTail::default();
        let mut drain = None;
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            // Draining also keeps a chatty server from blocking on a full pipe.
            let spawned = std::thread::Builder::new()
                .name("spool-stderr".into())
                .spawn(move || {
                    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                        if let Ok(mut log) = log.lock() {
                            if log.len() == LOG_TAIL_LINES {
                                log.pop_front();
                            }
                            log.push_back(line);
                        }
                    }
                });
            match spawned {
                Ok(handle) => drain = Some(handle),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(StartError::Other(
                        anyhow!(e).context("cannot start the log reader"),
                    ));
                }
            }
        }
        // From here on, the guard stops the child on every way out.
        let process = Self {
            child: Mutex::new(child),
            addr,
            command_line,
            log,
            drain,
            _data: None,
        };
        match process.wait_ready().await {
            Ok(()) => Ok(process),
            Err(e) if process.log_tail().contains("in use") => Err(StartError::PortTaken(e)),
            Err(e) => Err(StartError::Other(e)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's process id (for its memory and CPU readings in `/proc`).
    pub fn pid(&self) -> u32 {
        match self.child.lock() {
            Ok(child) => child.id(),
            Err(poisoned) => poisoned.into_inner().id(),
        }
    }

    /// The command the server was started with.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Fails, with the server's last log lines, when it has exited.
    pub fn check_alive(&self) -> Result<()> {
        let exited = self
            .child
            .lock()
            .map_err(|_| anyhow!("the spool process lock is poisoned"))?
            .try_wait()
            .context("cannot check the spool process")?;
        let Some(status) = exited else {
            return Ok(());
        };
        // Let the log reader catch the last lines, which say why.
        for _ in 0..DRAIN_POLLS {
            if self.drain.as_ref().is_none_or(|d| d.is_finished()) {
                break;
            }
            std::thread::sleep(DRAIN_POLL_INTERVAL);
        }
        bail!(
            "spool exited ({status}); its last log lines:\n{}",
            self.log_tail()
        )
    }

    async fn wait_ready(&self) -> Result<()> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(1))
            .build()
            .context("cannot build an HTTP client")?;
        let url = format!("http://{}/healthz", self.addr);
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            self.check_alive()?;
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                // Answered by our child, not by a stranger on the port: it is still running.
                return self.check_alive();
            }
            sleep(PROBE_INTERVAL).await;
        }
        bail!(
            "spool did not answer {url} within {READY_TIMEOUT:?}; its last log lines:\n{}",
            self.log_tail()
        )
    }

    fn log_tail(&self) -> String {
        self.log
            .lock()
            .map(|log| log.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }
}

impl Drop for SpoolProcess {
    fn drop(&mut self) {
        let child = match self.child.get_mut() {
            Ok(child) => child,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Nothing a benchmark stores is kept afterwards: a hard kill is fine and cannot hang.
        let _ = child.kill();
        let _ = child.wait();
    }
}
