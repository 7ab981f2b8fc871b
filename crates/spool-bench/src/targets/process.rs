//! Peer servers (redis-server, nats-server, the socket.io peer) as child processes on free
//! 127.0.0.1 ports, each with its own data directory, stopped and cleaned up when the guard
//! drops.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use parking_lot::Mutex;
use tokio::time::{Instant, sleep};

/// Longest wait for a peer server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running peer server.
pub struct PeerProcess {
    child: Mutex<Child>,
    pub addr: SocketAddr,
    pub command_line: String,
    /// Removed after the child is stopped (see `Drop`).
    data: Option<tempfile::TempDir>,
}

impl PeerProcess {
    /// Starts `program` with `args(port, data_dir)` and waits until its port accepts.
    pub async fn start(program: &str, args: impl Fn(u16, &str) -> Vec<String>) -> Result<Self> {
        let data = tempfile::tempdir().context("cannot create a data directory")?;
        let addr = free_port()?;
        let args = args(addr.port(), &data.path().display().to_string());
        let child = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {program}: is it installed?"))?;
        let process = Self {
            child: Mutex::new(child),
            addr,
            command_line: format!("{program} {}", args.join(" ")),
            data: Some(data),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if tokio::net::TcpStream::connect(process.addr).await.is_ok() {
                return Ok(process);
            }
            if let Some(status) = process.child.lock().try_wait()? {
                bail!(
                    "{} exited with {status} before accepting connections",
                    process.command_line
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not accept connections within {READY_TIMEOUT:?}",
                    process.command_line
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's process id (for its memory and CPU readings in `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.lock().id()
    }

    /// Fails when the server has exited.
    pub fn check_alive(&self) -> Result<()> {
        match self.child.lock().try_wait()? {
            None => Ok(()),
            Some(status) => bail!("{} exited with {status}", self.command_line),
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut();
        let _ = child.kill();
        let _ = child.wait();
        drop(self.data.take());
    }
}

/// A port free on 127.0.0.1 right now (the OS picks it; it is released for the child).
pub fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("cannot find a free port on 127.0.0.1")?;
    listener.local_addr().context("cannot read the free port")
}
