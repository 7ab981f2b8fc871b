//! A Spool group member over the WebSocket protocol (`spool.v1.json`, docs/protocol.md
//! "Consumer groups"), as a JetStream pull member runs on one NATS connection: one socket per
//! member, `consume` with `credit` = the cell's batch, so the server pushes up to that many
//! `leased` frames and each ack returns its credit. How the member acks is [`WsAck`]
//! (`--ws-ack`): `per-batch` (the default) sends **one** `ack` frame carrying the receipts of
//! every lease the receive took (as a Redis member sends one `XACK` per batch and the HTTP
//! member one ack request), `per-message` one `ack` frame per leased message, all of a batch
//! written at once (pipelined settles). The server answers each `ack` frame with one `settled`
//! frame (one result per receipt, in order).
//!
//! Mapped onto [`Member`]: `receive` hands out the leases pushed so far (waiting up to `wait`
//! for the first one), at most `max`: once one has arrived it takes what else the socket holds
//! right now, and (`per-batch` only) when that is fewer than `max` it gives the runtime one
//! turn and looks again (no timer: a batch of 1 is never delayed); `ack` writes the `ack`
//! frame(s) and reads until every one is answered (leases pushed meanwhile are kept for the
//! next `receive`). A lease's receive → ack time starts at the earlier of the `receive` call
//! and the lease's arrival (a lease that waited in the client's buffer while the member was
//! busy acking counts that wait), see [`Member::since`].
//!
//! Frames are read as the other WebSocket benchmarks read deliveries: a prefix check and a
//! substring search for the fields needed (receipt, the payload's stamp, each result), no
//! full JSON parse on the hot path.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use clap::ValueEnum;
use futures::{FutureExt, SinkExt, StreamExt};
use memchr::memmem;
use spool_protocol::ws::{ClientFrame, Connect, Consume, SUBPROTOCOL, ServerFrame};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{Member, STREAM, stamp_of};
use crate::ws::wire::{Ws, spool_connect, ws_open};

/// Longest wait for the answers of one batch of acks.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Receipts one `ack` frame may carry (docs/protocol.md).
const MAX_RECEIPTS: usize = 1000;

const LEASED: &[u8] = br#"{"type":"leased","#;
const SETTLED: &[u8] = br#"{"type":"settled","#;
const RECEIPT: &[u8] = br#""receipt":""#;
const DATA: &[u8] = br#""data":""#;
const OK: &[u8] = br#""result":"ok""#;

/// How a WebSocket member acks the leases of one receive (`--ws-ack`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum WsAck {
    /// One `ack` frame per leased message (one receipt each), pipelined.
    PerMessage,
    /// One `ack` frame with the receipts of every lease the receive took.
    #[default]
    PerBatch,
}

impl WsAck {
    /// The value of `--ws-ack`.
    pub fn flag(self) -> &'static str {
        match self {
            Self::PerMessage => "per-message",
            Self::PerBatch => "per-batch",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::PerMessage => "one `ack` frame per leased message, pipelined",
            Self::PerBatch => "one `ack` frame per receive's leases",
        }
    }
}

/// `ack` frames sent and receipts they carried, over every member of a target.
#[derive(Debug, Default)]
pub struct AckCount {
    pub frames: AtomicU64,
    pub receipts: AtomicU64,
}

impl AckCount {
    /// The counts since the last call, reset to 0.
    pub fn take(&self) -> (u64, u64) {
        (
            self.frames.swap(0, Ordering::Relaxed),
            self.receipts.swap(0, Ordering::Relaxed),
        )
    }
}

/// A leased message not handed out yet.
struct Lease {
    receipt: String,
    stamp: u64,
    arrived: Instant,
}

pub struct WsMember {
    ws: Ws,
    /// The JSON of an ack frame before its id, and from the id to its first receipt.
    ack_head: String,
    ack_tail: String,
    mode: WsAck,
    count: Arc<AckCount>,
    buffered: VecDeque<Lease>,
    /// The receipts the last `receive` handed out.
    receipts: Vec<String>,
    since: Option<Instant>,
    next_id: u64,
}

impl WsMember {
    /// Opens `/v1/ws`, authenticates with `token` and consumes `group` as member `m<idx>` with
    /// `credit` (waits for `consuming`), acking as `mode` says and counting its ack frames in
    /// `count`.
    pub async fn open(
        addr: SocketAddr,
        token: &str,
        group: &str,
        idx: usize,
        credit: u32,
        mode: WsAck,
        count: Arc<AckCount>,
    ) -> Result<Self> {
        let mut ws = ws_open(addr, "/v1/ws", Some(SUBPROTOCOL)).await?;
        spool_connect(
            &mut ws,
            Connect {
                token: Some(token.to_owned()),
                ..Connect::default()
            },
        )
        .await?;
        let consume = ClientFrame::Consume(Consume {
            id: Some(0),
            stream: STREAM.to_owned(),
            group: group.to_owned(),
            consumer: format!("m{idx}"),
            credit,
            visibility_timeout: None,
        });
        ws.send(Message::text(serde_json::to_string(&consume)?))
            .await?;
        let mut member = Self {
            ws,
            ack_head: String::from(r#"{"type":"ack","id":"#),
            ack_tail: format!(r#","stream":"{STREAM}","group":"{group}","receipts":["#),
            mode,
            count,
            buffered: VecDeque::new(),
            receipts: Vec::new(),
            since: None,
            next_id: 1,
        };
        // Leases may follow `consuming` at once; they are kept.
        loop {
            let text = member
                .next(ANSWER_TIMEOUT)
                .await?
                .context("no `consuming`")?;
            if member.take_lease(text.as_bytes())? {
                continue;
            }
            match serde_json::from_str::<ServerFrame>(&text) {
                Ok(ServerFrame::Consuming(_)) => return Ok(member),
                Ok(ServerFrame::Error(e)) => bail!("consume refused: {}", e.message),
                _ => continue,
            }
        }
    }

    /// The next text frame within `wait`: `None` when none came in time.
    async fn next(&mut self, wait: Duration) -> Result<Option<String>> {
        let read = async {
            loop {
                match self.ws.next().await {
                    None | Some(Ok(Message::Close(_))) => bail!("the server closed the socket"),
                    Some(Err(e)) => return Err(anyhow!(e).context("WebSocket read failed")),
                    Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
                    Some(Ok(_)) => continue,
                }
            }
        };
        match tokio::time::timeout(wait, read).await {
            Ok(text) => text.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// A frame already read by the socket, without waiting.
    fn ready(&mut self) -> Result<Option<String>> {
        loop {
            match self.ws.next().now_or_never() {
                None => return Ok(None),
                Some(None | Some(Ok(Message::Close(_)))) => bail!("the server closed the socket"),
                Some(Some(Err(e))) => return Err(anyhow!(e).context("WebSocket read failed")),
                Some(Some(Ok(Message::Text(text)))) => return Ok(Some(text.as_str().to_owned())),
                Some(Some(Ok(_))) => continue,
            }
        }
    }

    /// Keeps `frame` when it is a `leased` one (true).
    fn take_lease(&mut self, frame: &[u8]) -> Result<bool> {
        if !frame.starts_with(LEASED) {
            return Ok(false);
        }
        let receipt = field(frame, RECEIPT).context("a leased frame without a receipt")?;
        let stamp = field(frame, DATA).map_or(0, |d| stamp_of(d.as_bytes()));
        self.buffered.push_back(Lease {
            receipt,
            stamp,
            arrived: Instant::now(),
        });
        Ok(true)
    }

    /// A frame that is neither a lease nor a settle answer: an error fails the member.
    fn other(frame: &str) -> Result<()> {
        match serde_json::from_str::<ServerFrame>(frame) {
            Ok(ServerFrame::Error(e)) => bail!("error frame: {:?}: {}", e.code, e.message),
            Ok(ServerFrame::Stopped(s)) => bail!("the consume stopped: {:?}", s.reason),
            Ok(ServerFrame::GroupReset(_)) => bail!("group_reset: {frame}"),
            _ => Ok(()),
        }
    }
}

/// The JSON string value after `key` (no escapes: receipts are base64url, payloads the
/// benchmark's own text).
fn field(frame: &[u8], key: &[u8]) -> Option<String> {
    let start = memmem::find(frame, key)? + key.len();
    let len = memchr::memchr(b'"', &frame[start..])?;
    std::str::from_utf8(&frame[start..start + len])
        .ok()
        .map(str::to_owned)
}

#[async_trait]
impl Member for WsMember {
    async fn receive(&mut self, max: usize, wait: Option<Duration>) -> Result<Vec<u64>> {
        let called = Instant::now();
        if self.buffered.is_empty() {
            let deadline = called + wait.unwrap_or(Duration::ZERO);
            while self.buffered.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                let Some(text) = self.next(left).await? else {
                    break;
                };
                if !self.take_lease(text.as_bytes())? {
                    Self::other(&text)?;
                }
            }
        }
        // Whatever else the socket already holds; when short of `max` and acking per batch,
        // once more after one turn of the runtime (per message: as measured before).
        let mut yielded = self.mode == WsAck::PerMessage;
        while !self.buffered.is_empty() && self.buffered.len() < max {
            let Some(text) = self.ready()? else {
                if yielded {
                    break;
                }
                yielded = true;
                tokio::task::yield_now().await;
                continue;
            };
            if !self.take_lease(text.as_bytes())? {
                Self::other(&text)?;
            }
        }
        self.receipts.clear();
        let mut stamps = Vec::new();
        let mut since = called;
        while stamps.len() < max {
            let Some(lease) = self.buffered.pop_front() else {
                break;
            };
            since = since.min(lease.arrived);
            stamps.push(lease.stamp);
            self.receipts.push(lease.receipt);
        }
        self.since = Some(since);
        Ok(stamps)
    }

    fn since(&self) -> Option<Instant> {
        self.since
    }

    async fn ack(&mut self) -> Result<usize> {
        let count = self.receipts.len();
        if count == 0 {
            return Ok(0);
        }
        let receipts = std::mem::take(&mut self.receipts);
        let groups: Vec<&[String]> = match self.mode {
            WsAck::PerMessage => receipts.chunks(1).collect(),
            WsAck::PerBatch => receipts.chunks(MAX_RECEIPTS).collect(),
        };
        let frames = groups.len();
        for group in groups {
            let mut frame = format!("{}{}{}", self.ack_head, self.next_id, self.ack_tail);
            for (i, receipt) in group.iter().enumerate() {
                if i > 0 {
                    frame.push(',');
                }
                frame.push('"');
                frame.push_str(receipt);
                frame.push('"');
            }
            frame.push_str("]}");
            self.next_id += 1;
            self.ws.feed(Message::text(frame)).await?;
        }
        self.ws.flush().await?;
        self.count
            .frames
            .fetch_add(frames as u64, Ordering::Relaxed);
        self.count
            .receipts
            .fetch_add(count as u64, Ordering::Relaxed);
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let (mut answered, mut ok) = (0, 0);
        while answered < frames {
            let left = deadline.saturating_duration_since(Instant::now());
            let text = self
                .next(left)
                .await?
                .with_context(|| format!("{answered} of {frames} ack frames answered in time"))?;
            let frame = text.as_bytes();
            if self.take_lease(frame)? {
                continue;
            }
            if frame.starts_with(SETTLED) {
                answered += 1;
                ok += memmem::find_iter(frame, OK).count();
            } else {
                Self::other(&text)?;
            }
        }
        if ok != count {
            bail!("{} of {count} acks not ok", count - ok);
        }
        Ok(ok)
    }
}
