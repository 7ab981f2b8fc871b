//! The clients of the WebSocket benchmarks, one per protocol, all written the same way so the
//! load generator spends about the same CPU per delivery on every target:
//!
//! - Spool's `spool.v1.json` over tokio-tungstenite;
//! - socket.io 4 (engine.io 4's WebSocket transport, spoken directly: `0` open, `40` connect,
//!   `42` events, `43` acks, `2`/`3` heartbeats) over the same tokio-tungstenite, with the same
//!   buffer sizes;
//! - the NATS core text protocol (`INFO`, `CONNECT`, `SUB`, `PUB`, `MSG`, `PING`/`PONG`) over
//!   a plain TCP stream with one read buffer.
//!
//! A subscriber reads a delivery only far enough to find its payload (a prefix check and one
//! substring search), then reads the `SEQ:STAMP:` at the payload's start; no protocol gets a
//! full JSON parse on the hot path. Control frames (connected, subscribed, acks of the
//! handshake) are parsed properly.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BytesMut};
use futures::{SinkExt, StreamExt, stream::SplitSink};
use serde_json::Value;
use spool_protocol::ws::{ClientFrame, Connect, Connected, SUBPROTOCOL, ServerFrame, Subscribe};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::Semaphore,
    task::JoinHandle,
};
use tokio_tungstenite::{
    WebSocketStream, client_async_with_config,
    tungstenite::{
        Message, client::IntoClientRequest, http::HeaderValue, protocol::WebSocketConfig,
    },
};

use super::WsTarget;

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Read buffer of every client WebSocket (tungstenite allocates it eagerly; its 128 KiB
/// default would cost 1.3 GB for 10,000 subscribers) and write buffer (frames are fed, then
/// flushed once).
const CLIENT_READ_BUFFER: usize = 8 * 1024;
const CLIENT_WRITE_BUFFER: usize = 16 * 1024;
/// A NATS client's initial read buffer.
const NATS_READ_BUFFER: usize = 8 * 1024;
/// Prefix of a Spool delivery frame (`encode_delivery` writes `type` first).
const SPOOL_MESSAGE: &[u8] = br#"{"type":"message","#;
/// Where a Spool delivery's payload starts.
const SPOOL_DATA: &[u8] = br#""data":""#;
/// AnyCable's broadcast frame, and where a string message starts in it.
const CABLE_MESSAGE: &[u8] = br#"{"identifier":"#;
const CABLE_DATA: &[u8] = br#""message":""#;
/// AnyCable's extended protocol, spoken on Spool's `/cable`.
const CABLE_SUBPROTOCOL: &str = "actioncable-v1-ext-json";
/// Prefix of a socket.io `message` event: `42["message","PAYLOAD","OFFSET"]`.
const SIO_MESSAGE: &[u8] = br#"42["message",""#;

/// Opens a WebSocket to `ws://ADDR/PATH`.
pub(crate) async fn ws_open(
    addr: SocketAddr,
    path: &str,
    subprotocol: Option<&'static str>,
) -> Result<Ws> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .context("bad WebSocket URL")?;
    if let Some(p) = subprotocol {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static(p));
    }
    let config = WebSocketConfig::default()
        .read_buffer_size(CLIENT_READ_BUFFER)
        .write_buffer_size(CLIENT_WRITE_BUFFER);
    let (ws, _) = client_async_with_config(request, tcp, Some(config))
        .await
        .context("WebSocket handshake failed")?;
    Ok(ws)
}

/// The next text frame; `None` when the connection ended.
pub(crate) async fn next_text(
    ws: &mut Ws,
) -> Result<Option<tokio_tungstenite::tungstenite::Utf8Bytes>> {
    loop {
        match ws.next().await {
            None | Some(Ok(Message::Close(_))) => return Ok(None),
            Some(Err(e)) => return Err(anyhow!(e).context("WebSocket read failed")),
            Some(Ok(Message::Text(text))) => return Ok(Some(text)),
            Some(Ok(_)) => continue,
        }
    }
}

/// Spool's `connect` on an open `/v1/ws` socket: sends it and waits for `connected`.
pub(crate) async fn spool_connect(ws: &mut Ws, connect: Connect) -> Result<Connected> {
    spool_exchange(
        ws,
        &ClientFrame::Connect(connect),
        "connect",
        "`connected`",
        |frame| match frame {
            ServerFrame::Connected(c) => Some(c),
            _ => None,
        },
    )
    .await
}

/// Spool's `subscribe` to `stream` after `after` (`now`, or a position): sends it and waits
/// for `subscribed`; frames before it are skipped (the benchmarks publish nothing meanwhile).
pub(crate) async fn spool_subscribe(ws: &mut Ws, stream: &str, after: String) -> Result<()> {
    let frame = ClientFrame::Subscribe(Subscribe {
        id: Some(1),
        stream: stream.to_owned(),
        after: Some(after),
    });
    spool_exchange(ws, &frame, "subscribe", "`subscribed`", |frame| {
        matches!(frame, ServerFrame::Subscribed(_)).then_some(())
    })
    .await
}

/// Sends `frame`, then reads until `answer` picks a frame; an `error` frame fails as `VERB
/// refused`.
async fn spool_exchange<T>(
    ws: &mut Ws,
    frame: &ClientFrame,
    verb: &str,
    waiting_for: &str,
    mut answer: impl FnMut(ServerFrame) -> Option<T>,
) -> Result<T> {
    ws.send(Message::text(serde_json::to_string(frame)?))
        .await?;
    loop {
        let text = next_text(ws)
            .await?
            .with_context(|| format!("closed before {waiting_for}"))?;
        match serde_json::from_str::<ServerFrame>(&text) {
            Ok(ServerFrame::Error(e)) => bail!("{verb} refused: {}", e.message),
            Ok(frame) => {
                if let Some(found) = answer(frame) {
                    return Ok(found);
                }
            }
            Err(_) => continue,
        }
    }
}

/// One delivered message, as a subscriber sees it.
pub struct Delivery<'a> {
    pub payload: &'a [u8],
    /// socket.io's recovery offset (the event's last argument), when present.
    pub offset: Option<&'a str>,
}

/// What `hello` found: the session to resume later, and deliveries that arrived before the
/// handshake's answer (socket.io sends missed packets before its `40`).
pub struct Hello {
    /// Spool's session id; socket.io's private session id (`pid`); empty for NATS.
    pub session: String,
    /// Spool: `resumed`; socket.io: the same `pid` came back (the state was recovered).
    pub resumed: bool,
    /// Payloads (and offsets) of deliveries seen before the answer.
    pub early: Vec<(Vec<u8>, Option<String>)>,
}

/// A session to resume.
pub struct Resume<'a> {
    pub session: &'a str,
    /// socket.io: the offset of the last packet processed.
    pub offset: Option<&'a str>,
}

/// One subscriber's connection.
pub enum Conn {
    Spool(Ws),
    Cable(Ws),
    Socketio { ws: Ws, next_id: u64 },
    Nats { tcp: TcpStream, buf: BytesMut },
}

impl Conn {
    /// Opens the transport: the WebSocket handshake (for socket.io, also engine.io's open
    /// packet); for NATS, the TCP connection and the server's `INFO`.
    pub async fn open(target: WsTarget, addr: SocketAddr) -> Result<Self> {
        match target {
            WsTarget::Spool => Ok(Conn::Spool(
                ws_open(addr, "/v1/ws", Some(SUBPROTOCOL)).await?,
            )),
            WsTarget::Cable => Ok(Conn::Cable(
                ws_open(addr, "/cable", Some(CABLE_SUBPROTOCOL)).await?,
            )),
            WsTarget::Socketio => {
                let mut ws = ws_open(addr, "/socket.io/?EIO=4&transport=websocket", None).await?;
                let open = next_text(&mut ws)
                    .await?
                    .context("closed before engine.io's open packet")?;
                if !open.starts_with('0') {
                    bail!("expected engine.io's open packet, got {open:?}");
                }
                Ok(Conn::Socketio { ws, next_id: 1 })
            }
            WsTarget::Nats => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("cannot connect to {addr}"))?;
                tcp.set_nodelay(true)?;
                let mut conn = Conn::Nats {
                    tcp,
                    buf: BytesMut::with_capacity(NATS_READ_BUFFER),
                };
                conn.nats_until(|line| line.starts_with(b"INFO")).await?;
                Ok(conn)
            }
        }
    }

    /// A subscriber: the transport, the handshake and one subscription to `stream`, all while
    /// holding a permit of `setup` (at most that many handshakes at once).
    pub async fn subscriber(
        target: WsTarget,
        addr: SocketAddr,
        stream: &str,
        setup: &Semaphore,
    ) -> Result<(Self, Hello)> {
        let _permit = setup.acquire().await?;
        let mut conn = Conn::open(target, addr).await?;
        let hello = conn.hello(None).await?;
        conn.subscribe(stream).await?;
        Ok((conn, hello))
    }

    /// The protocol's own handshake: Spool's `connect` (anonymous, or resuming a session),
    /// socket.io's namespace `CONNECT` (with `pid`/`offset` to recover), NATS `CONNECT`.
    pub async fn hello(&mut self, resume: Option<Resume<'_>>) -> Result<Hello> {
        match self {
            Conn::Spool(ws) => {
                let connect = Connect {
                    session: resume.map(|r| r.session.to_owned()),
                    ..Connect::default()
                };
                let c = spool_connect(ws, connect).await?;
                Ok(Hello {
                    session: c.session,
                    resumed: c.resumed,
                    early: Vec::new(),
                })
            }
            Conn::Cable(ws) => {
                if resume.is_some() {
                    bail!("the cable target does not resume sessions here");
                }
                loop {
                    let text = next_text(ws).await?.context("closed before the welcome")?;
                    let frame: Value = serde_json::from_str(&text)
                        .with_context(|| format!("not JSON: {text:?}"))?;
                    match frame["type"].as_str() {
                        Some("welcome") => {
                            return Ok(Hello {
                                session: frame["sid"].as_str().unwrap_or_default().to_owned(),
                                resumed: false,
                                early: Vec::new(),
                            });
                        }
                        Some("disconnect") => bail!("the server refused: {text}"),
                        _ => continue,
                    }
                }
            }
            Conn::Socketio { ws, .. } => {
                let packet = match &resume {
                    Some(r) => format!(
                        "40{}",
                        serde_json::json!({"pid": r.session, "offset": r.offset})
                    ),
                    None => "40".to_owned(),
                };
                ws.send(Message::text(packet)).await?;
                let mut early = Vec::new();
                loop {
                    let text = next_text(ws).await?.context("closed before `40`")?;
                    if let Some(body) = text.strip_prefix("40") {
                        let answer: Value = serde_json::from_str(body)
                            .with_context(|| format!("bad CONNECT answer {text:?}"))?;
                        let pid = answer["pid"].as_str().unwrap_or_default().to_owned();
                        let resumed = resume.as_ref().is_some_and(|r| r.session == pid);
                        return Ok(Hello {
                            session: pid,
                            resumed,
                            early,
                        });
                    } else if text.starts_with("44") {
                        bail!("socket.io refused the connection: {text}");
                    } else if text.as_str() == "2" {
                        ws.send(Message::text("3")).await?;
                    } else if let Some(d) = sio_delivery(text.as_bytes()) {
                        early.push((d.payload.to_vec(), d.offset.map(str::to_owned)));
                    }
                }
            }
            Conn::Nats { tcp, .. } => {
                tcp.write_all(
                    b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"protocol\":1}\r\nPING\r\n",
                )
                .await?;
                self.nats_until(|line| line == b"PONG").await?;
                Ok(Hello {
                    session: String::new(),
                    resumed: false,
                    early: Vec::new(),
                })
            }
        }
    }

    /// Subscribes to `stream` (Spool: live from now on; socket.io: joins the room; NATS:
    /// `SUB` on the subject) and waits until the server confirmed it.
    pub async fn subscribe(&mut self, stream: &str) -> Result<()> {
        match self {
            Conn::Spool(ws) => spool_subscribe(ws, stream, "now".into()).await,
            Conn::Cable(ws) => {
                let identifier =
                    serde_json::json!({"channel": "$pubsub", "stream_name": stream}).to_string();
                let command = serde_json::json!({"command": "subscribe", "identifier": identifier});
                ws.send(Message::text(command.to_string())).await?;
                loop {
                    let text = next_text(ws).await?.context("closed before the confirm")?;
                    if text.contains(r#""type":"confirm_subscription""#) {
                        return Ok(());
                    } else if text.contains(r#""type":"reject_subscription""#) {
                        bail!("subscription refused: {text}");
                    }
                }
            }
            Conn::Socketio { ws, next_id } => {
                let id = *next_id;
                *next_id += 1;
                ws.send(Message::text(format!(r#"42{id}["subscribe","{stream}"]"#)))
                    .await?;
                let ack = format!("43{id}");
                loop {
                    let text = next_text(ws).await?.context("closed before the ack")?;
                    if text.starts_with(&ack) {
                        return Ok(());
                    } else if text.as_str() == "2" {
                        ws.send(Message::text("3")).await?;
                    }
                }
            }
            Conn::Nats { tcp, .. } => {
                tcp.write_all(format!("SUB {stream} 1\r\nPING\r\n").as_bytes())
                    .await?;
                self.nats_until(|line| line == b"PONG").await
            }
        }
    }

    /// Waits for what arrives next and hands every delivery in it to `on_delivery`; answers
    /// heartbeats. Fails when the connection ends.
    pub async fn read(&mut self, on_delivery: &mut (dyn FnMut(Delivery<'_>) + Send)) -> Result<()> {
        match self {
            Conn::Spool(ws) => {
                let text = next_text(ws).await?.context("the server closed")?;
                let bytes = text.as_bytes();
                if bytes.starts_with(SPOOL_MESSAGE) {
                    let start = memchr::memmem::find(bytes, SPOOL_DATA)
                        .context("a message frame without data")?
                        + SPOOL_DATA.len();
                    on_delivery(Delivery {
                        payload: &bytes[start..],
                        offset: None,
                    });
                } else if bytes == br#"{"type":"ping"}"# {
                    ws.send(Message::text(r#"{"type":"pong"}"#)).await?;
                } else if bytes.starts_with(br#"{"type":"error""#) {
                    bail!("the server sent an error: {text}");
                }
                Ok(())
            }
            Conn::Cable(ws) => {
                let text = next_text(ws).await?.context("the server closed")?;
                let bytes = text.as_bytes();
                if bytes.starts_with(CABLE_MESSAGE) {
                    let start = memchr::memmem::find(bytes, CABLE_DATA)
                        .context("a broadcast without a string message")?
                        + CABLE_DATA.len();
                    on_delivery(Delivery {
                        payload: &bytes[start..],
                        offset: None,
                    });
                } else if bytes.starts_with(br#"{"type":"disconnect""#) {
                    bail!("the server disconnected: {text}");
                }
                Ok(())
            }
            Conn::Socketio { ws, .. } => {
                let text = next_text(ws).await?.context("the server closed")?;
                if let Some(d) = sio_delivery(text.as_bytes()) {
                    on_delivery(d);
                } else if text.as_str() == "2" {
                    ws.send(Message::text("3")).await?;
                }
                Ok(())
            }
            Conn::Nats { tcp, buf } => {
                if tcp.read_buf(buf).await? == 0 {
                    bail!("nats-server closed the connection");
                }
                let pings = nats_parse(buf, &mut |payload| {
                    on_delivery(Delivery {
                        payload,
                        offset: None,
                    })
                })?;
                for _ in 0..pings {
                    tcp.write_all(b"PONG\r\n").await?;
                }
                Ok(())
            }
        }
    }

    /// Reads NATS protocol lines until `done` accepts one (deliveries are not expected yet).
    async fn nats_until(&mut self, done: impl Fn(&[u8]) -> bool) -> Result<()> {
        let Conn::Nats { tcp, buf } = self else {
            unreachable!("only for NATS")
        };
        loop {
            while let Some(end) = memchr::memmem::find(buf, b"\r\n") {
                let line = buf.split_to(end + 2);
                let line = &line[..end];
                if line.starts_with(b"-ERR") {
                    bail!("nats-server: {}", String::from_utf8_lossy(line));
                }
                if line == b"PING" {
                    tcp.write_all(b"PONG\r\n").await?;
                }
                if done(line) {
                    return Ok(());
                }
            }
            if tcp.read_buf(buf).await? == 0 {
                bail!("nats-server closed the connection");
            }
        }
    }
}

/// A socket.io `message` event's payload and recovery offset.
fn sio_delivery(bytes: &[u8]) -> Option<Delivery<'_>> {
    let rest = bytes.strip_prefix(SIO_MESSAGE)?;
    // Payloads are plain ASCII without quotes or escapes (the benchmark makes them).
    let end = memchr::memchr(b'"', rest)?;
    let offset = rest[end + 1..]
        .strip_prefix(b",\"")
        .and_then(|o| o.strip_suffix(b"\"]"))
        .and_then(|o| std::str::from_utf8(o).ok());
    Some(Delivery {
        payload: &rest[..end],
        offset,
    })
}

/// Consumes every complete NATS operation in `buf`, handing `MSG` payloads to `on_msg`;
/// returns how many `PING`s need a `PONG`.
fn nats_parse(buf: &mut BytesMut, on_msg: &mut (dyn FnMut(&[u8]) + Send)) -> Result<usize> {
    let mut pings = 0;
    while let Some(end) = memchr::memmem::find(buf, b"\r\n") {
        let line = &buf[..end];
        if line.starts_with(b"MSG ") {
            // MSG <subject> <sid> [reply-to] <#bytes>
            let len: usize = line
                .rsplit(|&b| b == b' ')
                .next()
                .and_then(|n| std::str::from_utf8(n).ok())
                .and_then(|n| n.parse().ok())
                .context("malformed MSG line")?;
            let total = end + 2 + len + 2;
            if buf.len() < total {
                // Wait for the rest of the payload; make room for it at once.
                buf.reserve(total - buf.len());
                break;
            }
            on_msg(&buf[end + 2..end + 2 + len]);
            buf.advance(total);
            continue;
        }
        if line == b"PING" {
            pings += 1;
        } else if line.starts_with(b"-ERR") {
            bail!("nats-server: {}", String::from_utf8_lossy(line));
        }
        buf.advance(end + 2);
    }
    Ok(pings)
}

/// The writing side of a publisher.
enum Sink {
    Ws(SplitSink<Ws, Message>),
    Tcp(OwnedWriteHalf),
}

/// A publisher: one connection whose writes are pipelined; a reader task counts the acks
/// (Spool's `ack`, socket.io's `43`; NATS core has none) and answers heartbeats.
pub struct Publisher {
    target: WsTarget,
    sink: Arc<tokio::sync::Mutex<Sink>>,
    next_id: u64,
    /// Publishes acknowledged by the server.
    pub acked: Arc<AtomicU64>,
    /// Publishes refused (Spool `error` frames).
    pub refused: Arc<AtomicU64>,
    reader: JoinHandle<()>,
    buf: Vec<u8>,
}

impl Publisher {
    pub async fn open(target: WsTarget, addr: SocketAddr) -> Result<Self> {
        // `/cable` subscribers get what is published over `/v1/ws`.
        let target = match target {
            WsTarget::Cable => WsTarget::Spool,
            other => other,
        };
        let mut conn = Conn::open(target, addr).await?;
        conn.hello(None).await?;
        let acked = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (sink, reader) = match conn {
            Conn::Spool(ws) | Conn::Cable(ws) | Conn::Socketio { ws, .. } => {
                let (sink, mut stream) = ws.split();
                let sink = Arc::new(tokio::sync::Mutex::new(Sink::Ws(sink)));
                let (acked, refused, sink2) = (acked.clone(), refused.clone(), sink.clone());
                let reader = tokio::spawn(async move {
                    while let Some(Ok(message)) = stream.next().await {
                        let Message::Text(text) = message else {
                            continue;
                        };
                        let reply = match target {
                            WsTarget::Spool => {
                                if text.starts_with(r#"{"type":"ack""#) {
                                    acked.fetch_add(1, Ordering::Relaxed);
                                } else if text.starts_with(r#"{"type":"error""#) {
                                    refused.fetch_add(1, Ordering::Relaxed);
                                }
                                (text.as_str() == r#"{"type":"ping"}"#)
                                    .then_some(r#"{"type":"pong"}"#)
                            }
                            _ => {
                                if text.starts_with("43") {
                                    acked.fetch_add(1, Ordering::Relaxed);
                                }
                                (text.as_str() == "2").then_some("3")
                            }
                        };
                        if let Some(reply) = reply
                            && let Sink::Ws(sink) = &mut *sink2.lock().await
                        {
                            let _ = sink.send(Message::text(reply)).await;
                        }
                    }
                });
                (sink, reader)
            }
            Conn::Nats { tcp, buf } => {
                let (mut rd, wr): (OwnedReadHalf, OwnedWriteHalf) = tcp.into_split();
                let sink = Arc::new(tokio::sync::Mutex::new(Sink::Tcp(wr)));
                let sink2 = sink.clone();
                let reader = tokio::spawn(async move {
                    let mut buf = buf;
                    loop {
                        match rd.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                        let Ok(pings) = nats_parse(&mut buf, &mut |_| {}) else {
                            return;
                        };
                        for _ in 0..pings {
                            if let Sink::Tcp(wr) = &mut *sink2.lock().await {
                                let _ = wr.write_all(b"PONG\r\n").await;
                            }
                        }
                    }
                });
                (sink, reader)
            }
        };
        Ok(Self {
            target,
            sink,
            next_id: 1,
            acked,
            refused,
            reader,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    /// Publishes every `(stream, payload)` of `batch` in one write.
    pub async fn publish(&mut self, batch: &[(&str, String)]) -> Result<()> {
        let mut sink = self.sink.lock().await;
        match &mut *sink {
            Sink::Ws(ws) => {
                for (stream, payload) in batch {
                    let id = self.next_id;
                    self.next_id += 1;
                    let frame = match self.target {
                        WsTarget::Spool => format!(
                            r#"{{"type":"publish","id":{id},"stream":"{stream}","data":"{payload}"}}"#
                        ),
                        _ => format!(r#"42{id}["publish","{stream}","{payload}"]"#),
                    };
                    ws.feed(Message::text(frame)).await?;
                }
                ws.flush().await?;
            }
            Sink::Tcp(wr) => {
                self.buf.clear();
                for (stream, payload) in batch {
                    self.buf.extend_from_slice(
                        format!("PUB {stream} {}\r\n{payload}\r\n", payload.len()).as_bytes(),
                    );
                }
                wr.write_all(&self.buf).await?;
            }
        }
        Ok(())
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socketio_events() {
        let d = sio_delivery(br#"42["message","12:34:xx","abc-1"]"#).unwrap();
        assert_eq!(d.payload, b"12:34:xx");
        assert_eq!(d.offset, Some("abc-1"));
        let d = sio_delivery(br#"42["message","12:34:xx"]"#).unwrap();
        assert_eq!(d.offset, None);
        assert!(sio_delivery(b"43[]").is_none());
    }

    #[test]
    fn nats_operations() {
        let mut buf = BytesMut::from(
            &b"PING\r\nMSG a 1 3\r\nabc\r\nMSG b 1 r 2\r\nxy\r\nMSG a 1 5\r\nab"[..],
        );
        let mut got = Vec::new();
        let pings = nats_parse(&mut buf, &mut |p| got.push(p.to_vec())).unwrap();
        assert_eq!(pings, 1);
        assert_eq!(got, [b"abc".to_vec(), b"xy".to_vec()]);
        assert_eq!(&buf[..], b"MSG a 1 5\r\nab");
    }
}
