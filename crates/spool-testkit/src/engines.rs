//! Starting `spool serve` on every engine, and clusters of nodes on the Redis and NATS engines.
//!
//! A [`Backend`] names an engine; [`Backend::cluster`] starts `n` nodes on it (one for the
//! single-node engines) on a namespace of their own — a temp dir, or a fresh Redis key prefix /
//! JetStream prefix — so tests sharing the machine's Redis and NATS never see each other's
//! streams. Dropping the [`Cluster`] stops its nodes and deletes what it stored in Redis/NATS.
//!
//! The shared servers are 127.0.0.1:6379 and 127.0.0.1:4222 (`SPOOL_TEST_REDIS_URL` /
//! `SPOOL_TEST_NATS_URL` override). When one is unreachable the test is skipped with a message,
//! except under CI (`CI` set), where it fails: `.ci/run` starts them.

use std::time::Duration;

use std::path::PathBuf;

use crate::Server;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Disk,
    Redis,
    Nats,
}

pub const ALL: [Backend; 4] = [
    Backend::Memory,
    Backend::Disk,
    Backend::Redis,
    Backend::Nats,
];

pub fn redis_url() -> String {
    std::env::var("SPOOL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn nats_url() -> String {
    std::env::var("SPOOL_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// `host:port` of a `scheme://host:port` URL.
pub fn host_port(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    rest.split([',', '/']).next().unwrap_or(rest).to_owned()
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::Disk => "disk",
            Backend::Redis => "redis",
            Backend::Nats => "nats",
        }
    }

    /// Whether several nodes can share this engine's data.
    pub fn clustered(self) -> bool {
        matches!(self, Backend::Redis | Backend::Nats)
    }

    /// Whether the engine's server can be used now: always for the embedded engines; for
    /// Redis and NATS, when their server answers (otherwise skip, or fail under CI).
    pub fn available(self) -> bool {
        let (what, addr) = match self {
            Backend::Memory | Backend::Disk => return true,
            Backend::Redis => ("Redis", host_port(&redis_url())),
            Backend::Nats => ("NATS", host_port(&nats_url())),
        };
        let reachable = std::net::TcpStream::connect_timeout(
            &match addr.parse() {
                Ok(a) => a,
                Err(_) => panic!("{what} test address {addr:?} is not host:port"),
            },
            Duration::from_secs(2),
        )
        .is_ok();
        if !reachable {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "{what} at {addr} is unreachable; under CI this fails instead of skipping (.ci/run starts it)"
                );
            }
            eprintln!(
                "SKIPPED on the {} engine: {what} at {addr} is unreachable",
                self.name()
            );
        }
        reachable
    }

    /// Starts `nodes` nodes (1 for single-node engines, whatever is asked) on a fresh namespace,
    /// each with `extra` flags.
    pub fn cluster(self, nodes: usize, extra: &[&str]) -> Cluster {
        let url = match self {
            Backend::Redis => redis_url(),
            Backend::Nats => nats_url(),
            _ => String::new(),
        };
        self.cluster_at(&url, nodes, extra)
    }

    /// Like [`Backend::cluster`], on the Redis or NATS server at `url` (e.g. an [`OwnServer`]).
    pub fn cluster_at(self, url: &str, nodes: usize, extra: &[&str]) -> Cluster {
        let nodes = if self.clustered() { nodes.max(1) } else { 1 };
        let namespace = Namespace::new(self);
        let mut cluster = Cluster {
            backend: self,
            url: url.to_owned(),
            namespace,
            nodes: Vec::new(),
        };
        for _ in 0..nodes {
            cluster.add_node(extra);
        }
        cluster
    }
}

/// Where a cluster's data lives.
pub struct Namespace {
    pub prefix: String,
    pub dir: Option<tempfile::TempDir>,
}

impl Namespace {
    fn new(backend: Backend) -> Namespace {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Namespace {
            prefix: format!("t{}x{nanos:x}", std::process::id()),
            dir: (backend == Backend::Disk).then(|| tempfile::tempdir().expect("temp dir")),
        }
    }
}

/// Nodes of one backend on one namespace.
pub struct Cluster {
    pub backend: Backend,
    /// The Redis or NATS server the nodes share.
    pub url: String,
    pub namespace: Namespace,
    pub nodes: Vec<Server>,
}

impl Cluster {
    /// The engine flags of a node of this cluster.
    pub fn engine_args(&self) -> Vec<String> {
        let ns = &self.namespace;
        let mut args: Vec<String> = vec!["--engine".into(), self.backend.name().into()];
        match self.backend {
            Backend::Memory => {}
            Backend::Disk => {
                let dir = ns.dir.as_ref().expect("disk namespace has a dir");
                args.extend(["--data-dir".into(), dir.path().display().to_string()]);
            }
            Backend::Redis => args.extend([
                "--redis-url".into(),
                self.url.clone(),
                "--redis-prefix".into(),
                ns.prefix.clone(),
            ]),
            Backend::Nats => args.extend([
                "--nats-url".into(),
                self.url.clone(),
                "--nats-prefix".into(),
                ns.prefix.clone(),
            ]),
        }
        args
    }

    /// Starts one more node with `extra` flags; returns its index.
    pub fn add_node(&mut self, extra: &[&str]) -> usize {
        self.add_node_on("127.0.0.1:0", extra)
    }

    /// Starts one more node listening on `listen`.
    pub fn add_node_on(&mut self, listen: &str, extra: &[&str]) -> usize {
        let engine = self.engine_args();
        let engine: Vec<&str> = engine.iter().map(String::as_str).collect();
        self.nodes.push(Server::spawn(listen, &engine, extra));
        self.nodes.len() - 1
    }

    pub fn node(&self, i: usize) -> &Server {
        &self.nodes[i % self.nodes.len()]
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let prefix = self.namespace.prefix.clone();
        match self.backend {
            Backend::Redis => delete_redis_prefix(&self.url, &prefix),
            Backend::Nats => delete_nats_prefix(&self.url, &prefix),
            _ => {}
        }
    }
}

/// Deletes every key of a test's Redis prefix (best effort: a leftover only costs memory).
pub fn delete_redis_prefix(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
    }
}

/// Deletes every JetStream stream and KV bucket of a test's NATS prefix (best effort). Runs
/// on a thread with a runtime of its own, so it works inside and outside a runtime (in Drop).
pub fn delete_nats_prefix(url: &str, prefix: &str) {
    let (url, prefix) = (url.to_owned(), prefix.to_owned());
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            // Streams of the prefix (`PREFIX_…`) and its KV buckets (`KV_PREFIX_…`).
            let run = delete_nats_streams(&url, |name| {
                name.starts_with(&format!("{prefix}_"))
                    || name.starts_with(&format!("KV_{prefix}_"))
            });
            let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), run).await });
        }
    })
    .join();
}

/// Deletes the JetStream streams (KV buckets included: `KV_…`) at `url` whose name `matches`.
pub async fn delete_nats_streams(url: &str, matches: impl Fn(&str) -> bool) {
    use futures::StreamExt;
    let Ok(client) = async_nats::connect(url).await else {
        eprintln!("cleanup: cannot connect to {url}");
        return;
    };
    let js = async_nats::jetstream::new(client);
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    for name in names.into_iter().filter(|n| matches(n)) {
        if let Err(e) = js.delete_stream(&name).await {
            eprintln!("cleanup: cannot delete {name}: {e}");
        }
    }
}

/// The shared Redis if it is up (its URL), else `None`: skip on a laptop, fail under CI.
pub fn shared_redis() -> Option<String> {
    Backend::Redis.available().then(redis_url)
}

/// The shared NATS if it is up (its URL), else `None`: skip on a laptop, fail under CI.
pub fn shared_nats() -> Option<String> {
    Backend::Nats.available().then(nats_url)
}

/// The `redis-server` / `nats-server` binary: the first on `PATH`, else in the usual system
/// directories (`/usr/sbin` is not on every user's `PATH`). When it is not installed the test
/// is skipped with a message (`None`), except under CI (`CI` set), where it fails.
pub fn server_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let system = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"].map(PathBuf::from);
    let found = std::env::split_paths(&path)
        .chain(system)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        if std::env::var_os("CI").is_some() {
            panic!("{name} is not installed; under CI this fails instead of skipping");
        }
        eprintln!("SKIPPED: {name} is not installed");
    }
    found
}

/// A Redis or NATS server of a test's own on a spare loopback port, to stop, freeze and
/// restart mid-test (the shared ones must stay up for the other tests). Killed when dropped.
pub struct OwnServer {
    pub port: u16,
    /// Its data (Redis `--dir`, NATS `-sd`).
    pub dir: tempfile::TempDir,
    kind: Backend,
    binary: PathBuf,
    args: Vec<String>,
    child: Option<std::process::Child>,
}

impl OwnServer {
    /// Starts one for `kind` (Redis or NATS), or `None` (see [`server_binary`]).
    pub fn start(kind: Backend) -> Option<OwnServer> {
        Self::start_with(kind, &[])
    }

    /// Like [`OwnServer::start`], with `args` after the defaults (Redis: no persistence unless
    /// `args` turn it on; NATS: JetStream).
    pub fn start_with(kind: Backend, args: &[&str]) -> Option<OwnServer> {
        let mut server = Self::stopped(kind, args)?;
        server.restart();
        Some(server)
    }

    /// One that is not started yet (its port and dir are chosen): [`OwnServer::restart`]
    /// starts it.
    pub fn stopped(kind: Backend, args: &[&str]) -> Option<OwnServer> {
        let name = match kind {
            Backend::Redis => "redis-server",
            Backend::Nats => "nats-server",
            _ => panic!("no own server for the {} engine", kind.name()),
        };
        Some(OwnServer {
            port: crate::free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            kind,
            binary: server_binary(name)?,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        })
    }

    /// The URL a client or a node uses to reach this server.
    pub fn url(&self) -> String {
        match self.kind {
            Backend::Redis => format!("redis://127.0.0.1:{}", self.port),
            _ => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// Whether it is running (started and not killed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (e.g. `-STOP`, `-CONT`) to the running server.
    pub fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the server is running");
        let status = std::process::Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// A plain connection to this Redis, for poking at it directly.
    pub fn redis(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("a connection to the test's own Redis")
    }

    /// Starts it (again) on the same port and data dir, and waits until it accepts connections.
    /// Redis runs without persistence (unless its args say otherwise), so a restarted Redis has
    /// lost everything; NATS keeps its JetStream store in the dir unless [`OwnServer::wipe`]
    /// emptied it.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port.to_string();
        let dir = self.dir.path().display().to_string();
        let mut cmd = std::process::Command::new(&self.binary);
        match self.kind {
            Backend::Redis => cmd.args(["--port", &port, "--bind", "127.0.0.1"]).args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir,
            ]),
            _ => cmd.args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd", &dir]),
        };
        let child = cmd
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the test's own engine server");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let addr = format!("127.0.0.1:{port}");
        while !self.answers(&addr) {
            assert!(
                std::time::Instant::now() < deadline,
                "own {} server on {addr} did not come up within 10 s",
                self.kind.name()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.kind == Backend::Nats {
            // NATS accepts before JetStream is ready; give it a moment.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the server at `addr` answers: a PING for Redis (it accepts while loading its
    /// data), a connection for NATS.
    fn answers(&self, addr: &str) -> bool {
        match self.kind {
            Backend::Redis => redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok(),
            _ => std::net::TcpStream::connect(addr).is_ok(),
        }
    }

    /// Deletes everything the server stored (it must be stopped).
    pub fn wipe(&mut self) {
        assert!(
            self.child.is_none(),
            "stop the server before wiping its data"
        );
        for entry in std::fs::read_dir(self.dir.path())
            .expect("read data dir")
            .flatten()
        {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill(); // SIGKILL ends a stopped (`-STOP`) one too
    }
}
