//! Test helpers: the shared Redis (127.0.0.1:6379 or `SPOOL_TEST_REDIS_URL`), unique key
//! prefixes cleaned up on drop, and private `redis-server` processes killed on drop.

#![allow(dead_code)]

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use spool_redis::RedisConfig;

pub fn shared_url() -> String {
    std::env::var("SPOOL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Whether the shared Redis is up: skip on a laptop, fail under CI.
pub fn shared_redis() -> Option<String> {
    let url = shared_url();
    let addr = url
        .split("://")
        .nth(1)
        .unwrap_or(&url)
        .rsplit('@')
        .next()
        .unwrap_or_default()
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    spool_engine::conformance::service_reachable("Redis", &addr).then_some(url)
}

/// A key prefix no other test (or run) uses; its keys are deleted when it drops.
pub struct Prefix {
    pub name: String,
    url: String,
}

impl Prefix {
    pub fn new(url: &str) -> Self {
        Self {
            name: format!("spooltest:{:016x}", rand::random::<u64>()),
            url: url.to_string(),
        }
    }

    pub fn config(&self) -> RedisConfig {
        RedisConfig {
            prefix: self.name.clone(),
            ..RedisConfig::new(&self.url)
        }
    }

    /// A plain connection for poking at the keys directly.
    pub fn raw(&self) -> redis::Connection {
        redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("raw connection to the test Redis")
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let Ok(mut conn) = redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.name))
            .query(&mut conn)
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query(&mut conn);
        }
    }
}

/// The `redis-server` binary, or `None` (with a message) when it is not installed.
pub fn redis_server_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("redis-server"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        eprintln!("SKIPPED: redis-server is not installed (needed for a private Redis)");
    }
    found
}

/// A free loopback port (free when asked; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A private `redis-server`, killed when dropped.
pub struct RedisServer {
    binary: PathBuf,
    pub port: u16,
    args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port, without persistence unless `args` say otherwise.
    pub fn start(args: &[&str]) -> Option<Self> {
        let binary = redis_server_binary()?;
        let mut server = Self {
            binary,
            port: free_port(),
            args: args.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.launch();
        Some(server)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port (empty, unless persistence is on).
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(self.dir.path());
        for arg in &self.args {
            cmd.arg(arg);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        self.wait_until_up();
    }

    fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let up = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if up.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not come up",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it (SIGKILL: no chance to save anything).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn raw(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("raw connection to the private Redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
