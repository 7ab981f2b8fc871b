//! The fault proxy: a TCP proxy on 127.0.0.1 in front of a server, whose connections the test
//! can cut, freeze or deafen at any moment, and which can turn new connections away.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{AbortHandle, JoinHandle},
};

/// What the connections live at a change do until the next change (then they are dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Both sockets stay open, nothing is forwarded: a dead peer.
    Frozen,
    /// Only what the client sends is forwarded; what the server sends is lost.
    Deaf,
}

/// A TCP proxy on 127.0.0.1 in front of a server. Cutting a connection drops both of its
/// sockets: the client and the server each see the connection end, and whatever was in
/// flight inside the proxy is lost. Killed (every connection cut) when dropped.
pub struct Proxy {
    /// `127.0.0.1:PORT` the proxy listens on.
    pub addr: String,
    conns: Arc<Mutex<HashMap<u64, AbortHandle>>>,
    upstream: Arc<Mutex<String>>,
    fault: watch::Sender<Fault>,
    refusing: Arc<AtomicBool>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy forwarding every connection to `upstream`.
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let conns: Arc<Mutex<HashMap<u64, AbortHandle>>> = Default::default();
        let upstream = Arc::new(Mutex::new(upstream.to_owned()));
        let (fault, _) = watch::channel(Fault::Frozen);
        let refusing = Arc::new(AtomicBool::new(false));
        let accept = tokio::spawn({
            let target = upstream.clone();
            let table = conns.clone();
            let fault = fault.clone();
            let refusing = refusing.clone();
            async move {
                let mut next_id = 0u64;
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if refusing.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection close
                    }
                    next_id += 1;
                    let id = next_id;
                    let upstream = target.lock().unwrap().clone();
                    let changed = fault.subscribe();
                    let done = table.clone();
                    // Registered under the lock before it can finish, so its own removal below
                    // always comes after the insert.
                    let mut guard = table.lock().unwrap();
                    let task = tokio::spawn(async move {
                        forward(client, &upstream, changed).await;
                        done.lock().unwrap().remove(&id);
                    });
                    guard.insert(id, task.abort_handle());
                }
            }
        });
        Proxy {
            addr,
            conns,
            upstream,
            fault,
            refusing,
            accept,
        }
    }

    /// Sends new connections to `upstream` from now on (a load balancer taking a dead node
    /// out); live ones stay where they are.
    pub fn set_upstream(&self, upstream: &str) {
        *self.upstream.lock().unwrap() = upstream.to_owned();
    }

    /// How many connections are open through the proxy.
    pub fn live(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Cuts every live connection; returns how many.
    pub fn cut_all(&self) -> usize {
        self.cut_where(|| true)
    }

    /// Cuts each live connection for which `pick` says so; returns how many.
    pub fn cut_where(&self, mut pick: impl FnMut() -> bool) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let chosen: Vec<u64> = conns.keys().copied().filter(|_| pick()).collect();
        for id in &chosen {
            if let Some(task) = conns.remove(id) {
                task.abort();
            }
        }
        chosen.len()
    }

    /// Leaves the live connections open but silent in both directions (a dead peer) until
    /// the next cut, freeze or deafen; new connections work.
    pub fn freeze(&self) {
        self.fault.send_modify(|f| *f = Fault::Frozen);
    }

    /// Loses what the server sends on the live connections (acks included) while the
    /// client's still arrive, until the next cut, freeze or deafen; new connections work.
    pub fn deafen(&self) {
        self.fault.send_modify(|f| *f = Fault::Deaf);
    }

    /// Turns new connections away (accepted and closed at once) while `refusing`.
    pub fn refuse(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }
}

/// Forwards one connection until it ends or a fault is set on it; a faulty connection is
/// dropped at the change after.
async fn forward(mut client: TcpStream, upstream: &str, mut changed: watch::Receiver<Fault>) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = copy_bidirectional(&mut client, &mut server) => return,
        _ = changed.changed() => {}
    }
    let fault = *changed.borrow_and_update();
    match fault {
        Fault::Frozen => {
            let _ = changed.changed().await;
        }
        Fault::Deaf => {
            let (mut from_client, _to_client) = client.split();
            let (_from_server, mut to_server) = server.split();
            tokio::select! {
                _ = tokio::io::copy(&mut from_client, &mut to_server) => {}
                _ = changed.changed() => {}
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}
