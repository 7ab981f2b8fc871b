//! The built-in TCP fault proxy: one on 127.0.0.1 in front of each node. Every client of the
//! run connects through it, so the nemesis can cut connections (both sockets dropped, whatever
//! was in flight lost) or stall them (nothing forwarded either way for a while, then
//! everything continues), and point new connections at another node.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{AbortHandle, JoinHandle},
};

/// Bytes read per chunk before it is forwarded.
const CHUNK: usize = 16 * 1024;

/// A fault proxy; every connection is cut when it is dropped.
pub struct Proxy {
    /// `127.0.0.1:PORT` it listens on.
    pub addr: String,
    conns: Arc<Mutex<HashMap<u64, AbortHandle>>>,
    upstream: Arc<Mutex<String>>,
    stalled: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy forwarding to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let conns: Arc<Mutex<HashMap<u64, AbortHandle>>> = Arc::default();
        let upstream = Arc::new(Mutex::new(upstream.to_owned()));
        let (stalled, _) = watch::channel(false);
        let accept = tokio::spawn({
            let (conns, upstream, stalled) = (conns.clone(), upstream.clone(), stalled.clone());
            async move {
                let mut next = 0u64;
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    next += 1;
                    let id = next;
                    let target = lock(&upstream).clone();
                    let (done, stalled) = (conns.clone(), stalled.subscribe());
                    let mut table = lock(&conns);
                    let task = tokio::spawn(async move {
                        forward(client, &target, stalled).await;
                        lock(&done).remove(&id);
                    });
                    table.insert(id, task.abort_handle());
                }
            }
        });
        Ok(Proxy {
            addr,
            conns,
            upstream,
            stalled,
            accept,
        })
    }

    /// New connections go to `upstream` from now on; live ones stay where they are.
    pub fn set_upstream(&self, upstream: &str) {
        *lock(&self.upstream) = upstream.to_owned();
    }

    /// How many connections are open through it.
    pub fn live(&self) -> usize {
        lock(&self.conns).len()
    }

    /// Cuts each live connection for which `pick` says yes; returns how many.
    pub fn cut_where(&self, mut pick: impl FnMut() -> bool) -> usize {
        let mut conns = lock(&self.conns);
        let chosen: Vec<u64> = conns.keys().copied().filter(|_| pick()).collect();
        for id in &chosen {
            if let Some(task) = conns.remove(id) {
                task.abort();
            }
        }
        chosen.len()
    }

    /// Stops (true) or resumes (false) forwarding on every connection, live and new.
    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_where(|| true);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn forward(client: TcpStream, upstream: &str, stalled: watch::Receiver<bool>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::select! {
        _ = pump(cr, sw, stalled.clone()) => {}
        _ = pump(sr, cw, stalled) => {}
    }
}

/// Copies one direction, holding each chunk while the proxy is stalled.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
