//! A raw `spool.v1.json` WebSocket peer.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

/// A raw `spool.v1.json` WebSocket peer, for tests of the protocol itself.
pub struct WsPeer {
    pub socket: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

/// How a WebSocket read ended when it did not yield a frame.
#[derive(Debug, PartialEq)]
pub enum WsEnd {
    Closed(Option<(u16, String)>),
    Error(String),
}

impl WsPeer {
    /// Opens `/v1/ws` with the `spool.v1.json` subprotocol and `headers` on the upgrade.
    pub async fn open(addr: &str, headers: &[(&str, &str)]) -> Result<WsPeer, (u16, String)> {
        WsPeer::open_url(&format!("ws://{addr}/v1/ws"), headers).await
    }

    /// Opens `/v1/ws` and sends `connect` with `token` (and optionally a session).
    pub async fn connect(addr: &str, token: &str) -> (WsPeer, Value) {
        let mut peer = WsPeer::open(addr, &[]).await.expect("upgrade");
        peer.send(serde_json::json!({"type":"connect","token":token}))
            .await;
        let connected = peer.expect("connected").await;
        (peer, connected)
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        use futures::SinkExt;
        self.socket
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .expect("ws send");
    }

    /// The next JSON frame (server pings are skipped), or how the connection ended.
    pub async fn next(&mut self, timeout: Duration) -> Result<Value, WsEnd> {
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let item = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("timed out waiting for a websocket frame");
            match item {
                None => return Err(WsEnd::Closed(None)),
                Some(Err(e)) => return Err(WsEnd::Error(e.to_string())),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("frame is JSON");
                    if v["type"] == "ping" {
                        continue;
                    }
                    return Ok(v);
                }
                Some(Ok(Message::Close(c))) => {
                    return Err(WsEnd::Closed(
                        c.map(|c| (u16::from(c.code), c.reason.to_string())),
                    ));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next frame, which must be of type `kind`.
    pub async fn expect(&mut self, kind: &str) -> Value {
        let frame = self
            .next(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("expected a {kind} frame, the connection ended: {e:?}"));
        assert_eq!(frame["type"], kind, "expected a {kind} frame, got {frame}");
        frame
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            match self.next(Duration::from_secs(10)).await {
                Ok(_) => continue,
                Err(WsEnd::Closed(Some(c))) => return c,
                Err(e) => panic!("expected a close frame, got {e:?}"),
            }
        }
    }

    /// Opens the WebSocket at `url` (e.g. `ws://ADDR/v1/ws?token=…`) with the `spool.v1.json`
    /// subprotocol and `headers`; an HTTP refusal is returned as its status and body.
    pub async fn open_url(url: &str, headers: &[(&str, &str)]) -> Result<WsPeer, (u16, String)> {
        let request = ws_request(url, headers);
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => Ok(WsPeer { socket }),
            Err(e) => Err(http_refusal(e)),
        }
    }

    /// Opens `/v1/ws` over a socket with a small receive buffer (`rcvbuf` bytes; the kernel
    /// may round it up), so a peer that stops reading backs the server up quickly.
    pub async fn open_small_rcvbuf(addr: &str, rcvbuf: u32) -> WsPeer {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let stream = socket
            .connect(addr.parse().expect("socket address"))
            .await
            .expect("tcp connect");
        let request = ws_request(&format!("ws://{addr}/v1/ws"), &[]);
        let (socket, _) = tokio_tungstenite::client_async(
            request,
            tokio_tungstenite::MaybeTlsStream::Plain(stream),
        )
        .await
        .expect("websocket handshake");
        WsPeer { socket }
    }

    /// The next text frame as it came (server pings included), or how the connection ended;
    /// `None` when `timeout` passed first.
    pub async fn next_text(&mut self, timeout: Duration) -> Option<Result<String, WsEnd>> {
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let item = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()?;
            return Some(match item {
                None => Err(WsEnd::Closed(None)),
                Some(Err(e)) => Err(WsEnd::Error(e.to_string())),
                Some(Ok(Message::Text(t))) => Ok(t.as_str().to_owned()),
                Some(Ok(Message::Close(c))) => Err(WsEnd::Closed(
                    c.map(|c| (u16::from(c.code), c.reason.to_string())),
                )),
                Some(Ok(_)) => continue,
            });
        }
    }
}

fn ws_request(
    url: &str,
    headers: &[(&str, &str)],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("websocket url");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "spool.v1.json".parse().unwrap());
    for (k, v) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName =
            k.parse().expect("header name");
        request
            .headers_mut()
            .insert(name, v.parse().expect("header value"));
    }
    request
}

fn http_refusal(e: tokio_tungstenite::tungstenite::Error) -> (u16, String) {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => {
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            (r.status().as_u16(), body)
        }
        e => panic!("websocket connect failed: {e}"),
    }
}

/// The `offset` of a `message` frame, read without parsing the whole frame (fast enough for
/// the hundreds of thousands of frames of the flood tests in debug builds); `None` for any
/// other frame.
pub fn message_offset(frame: &str) -> Option<u64> {
    if !frame.starts_with(r#"{"type":"message""#) {
        return None;
    }
    let rest = &frame[frame.find(r#""offset":"#)? + 9..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Opens `/v1/ws` and sends `connect` with `fields`; returns the peer and the first answer.
pub async fn connect_with(addr: &str, fields: Value) -> (WsPeer, Value) {
    let mut peer = WsPeer::open(addr, &[]).await.expect("upgrade");
    let mut connect = fields;
    connect["type"] = serde_json::json!("connect");
    peer.send(connect).await;
    let answer = peer.next(Duration::from_secs(10)).await.expect("an answer");
    (peer, answer)
}
