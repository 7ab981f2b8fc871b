//! Spool's consumer groups over HTTP: `spool serve --engine disk --durability fsync` (an ack is
//! answered once fsynced; target `spool-fsync`) or `--durability memory` (answered once the
//! WAL record is written to the file, without waiting for an fsync: JetStream 2.9's level;
//! target `spool-write`), `PUT …/groups/{g}`, then per member `POST …/receive` and
//! `POST …/ack` on one keep-alive raw hyper connection (as `publish` does: the load generator
//! shares the two cores with the server, and reqwest costs about twice its CPU per request).
//! With `--http-ack on-receive` ([`HttpAck`]) a member sends no `/ack`: a batch's receipts go
//! in the `ack` field of the next receive (one request and one commit for the acks and the next
//! lease round), which does not wait, so its answer tells at once what was acked; when it
//! leases nothing the member's next receive long-polls as usual. The acks of the batch a
//! member holds at the end of a cell go in one plain `/ack` (not counted), so nothing stays
//! leased.
//! Targets `spool-ws` (fsync) and `spool-ws-write` (`--durability memory`) run the same servers
//! with members on the WebSocket protocol instead (`ws.rs`: one socket per member, `consume`
//! with credit = batch, one `ack` frame per receive's leases or, with `--ws-ack per-message`,
//! per leased message).

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use clap::ValueEnum;
use futures::future::try_join_all;
use http_body_util::{BodyExt, Full};
use hyper::{
    Method, Request, StatusCode,
    client::conn::http1,
    header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue},
};
use hyper_util::rt::TokioIo;
use serde_json::json;
use spool_protocol::groups::{ReceiptOutcome, ReceiptResult, ReceiveResponse, SettleResponse};
use tokio::time::Instant;

use super::{
    GroupTarget, Member, STREAM, StampPublisher, payload, stamp_of,
    ws::{AckCount, WsAck},
};
use crate::{
    SpoolBinArgs,
    spool_process::{SpoolEngine, SpoolProcess},
};

/// The fsynced target's name in the report.
pub const NAME: &str = "spool-fsync";
/// The name of the target answered once written to the WAL file, not fsynced.
pub const WRITE_NAME: &str = "spool-write";
/// The fsynced target with WebSocket members.
pub const WS_NAME: &str = "spool-ws";
/// The not-fsynced target with WebSocket members.
pub const WS_WRITE_NAME: &str = "spool-ws-write";
/// Every Spool target's name, in the order of the report's ratio columns.
pub const NAMES: [&str; 4] = [NAME, WRITE_NAME, WS_NAME, WS_WRITE_NAME];
const API_KEY: &str = "bench-key";
/// Longest wait for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages per `POST /v1/publish` while preloading.
const PRELOAD_BATCH: u64 = 1000;
/// Connections preloading at once.
const PRELOAD_CONNECTIONS: u64 = 4;

/// How an HTTP member acks the leases of one receive (`--http-ack`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum HttpAck {
    /// One `POST …/ack` per receive's leases.
    #[default]
    Separate,
    /// The receipts in the `ack` field of the next `POST …/receive`.
    OnReceive,
}

impl HttpAck {
    /// The value of `--http-ack`.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Separate => "separate",
            Self::OnReceive => "on-receive",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Separate => "receive + ack over HTTP",
            Self::OnReceive => {
                "receive over HTTP, each batch acked in the `ack` field of the next receive"
            }
        }
    }
}

/// How a target's members talk to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `POST …/receive` and `POST …/ack` (or the acks in the next receive) on a keep-alive
    /// connection.
    Http(HttpAck),
    /// `consume` on a WebSocket, acking as [`WsAck`] says.
    Ws(WsAck),
}

pub struct SpoolGroups {
    process: SpoolProcess,
    name: &'static str,
    transport: Transport,
    /// The WebSocket members' `ack` frames and receipts.
    acks: Arc<AckCount>,
}

impl SpoolGroups {
    /// Starts Spool on the disk engine with fsync, keeping up to `history` messages (at least
    /// 2,000,000).
    pub async fn start(
        spool: &SpoolBinArgs,
        history: Option<u64>,
        transport: Transport,
    ) -> Result<Self> {
        Self::start_on(spool, history, SpoolEngine::DiskFsync, transport).await
    }

    /// Starts Spool on the disk engine with `--durability memory`: every group operation (and
    /// publish) is answered once its record is written to the WAL file, without an fsync.
    pub async fn start_write(
        spool: &SpoolBinArgs,
        history: Option<u64>,
        transport: Transport,
    ) -> Result<Self> {
        Self::start_on(spool, history, SpoolEngine::DiskNosync, transport).await
    }

    async fn start_on(
        spool: &SpoolBinArgs,
        history: Option<u64>,
        engine: SpoolEngine,
        transport: Transport,
    ) -> Result<Self> {
        let name = match (engine, transport) {
            (SpoolEngine::DiskNosync, Transport::Http(_)) => WRITE_NAME,
            (SpoolEngine::DiskNosync, Transport::Ws(_)) => WS_WRITE_NAME,
            (SpoolEngine::DiskFsync | SpoolEngine::Memory, Transport::Http(_)) => NAME,
            (SpoolEngine::DiskFsync | SpoolEngine::Memory, Transport::Ws(_)) => WS_NAME,
        };
        let history = history.unwrap_or(0).max(2_000_000);
        let mut args: Vec<String> = vec![
            "--api-key".into(),
            API_KEY.into(),
            "--history-limit".into(),
            history.to_string(),
            "--history-max-bytes".into(),
            "8GiB".into(),
        ];
        args.extend(spool.server_args.iter().cloned());
        let process = SpoolProcess::start_on(&spool.spool_bin, engine, &args)
            .await
            .with_context(|| format!("cannot start {}", spool.spool_bin.display()))?;
        wait_ready(process.addr()).await?;
        Ok(Self {
            process,
            name,
            transport,
            acks: Arc::default(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    async fn conn(&self) -> Result<Conn> {
        Conn::open(self.process.addr()).await
    }
}

/// One keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    host: HeaderValue,
    auth: HeaderValue,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(tcp))
            .await
            .context("HTTP handshake failed")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self {
            sender,
            host: HeaderValue::from_str(&addr.to_string())?,
            auth: HeaderValue::from_str(&format!("Bearer {API_KEY}"))?,
        })
    }

    /// Sends `body` and returns the answer's status and body.
    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
        json: bool,
    ) -> Result<(StatusCode, Bytes)> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, self.auth.clone());
        if json {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body))
            .context("cannot build the request")?;
        self.sender.ready().await.context("the connection closed")?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.sender.send_request(request))
            .await
            .context("no answer in time")?
            .context("request failed")?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the answer failed")?
            .to_bytes();
        Ok((status, body))
    }

    /// `send` that fails unless the status is `expect`.
    async fn expect(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
        json: bool,
        expect: &[StatusCode],
    ) -> Result<Bytes> {
        let (status, body) = self.send(method, path, body, json).await?;
        if !expect.contains(&status) {
            bail!(
                "{path}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(200)
                    .collect::<String>()
            );
        }
        Ok(body)
    }
}

/// Waits until the server answers `/readyz` 200: it answers `/healthz` while the disk engine
/// still opens its log, and the API `503 engine_unavailable` until then.
async fn wait_ready(addr: std::net::SocketAddr) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let mut conn = Conn::open(addr).await?;
        let (status, _) = conn
            .send(Method::GET, "/readyz", Bytes::new(), false)
            .await?;
        if status == StatusCode::OK {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{addr} is not ready after 120 s (/readyz {status})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Publishes `count` preloaded payloads through `POST /v1/publish`, 1,000 per request.
pub async fn preload(addr: std::net::SocketAddr, count: u64, size: usize) -> Result<()> {
    let text = String::from_utf8(payload(0, size).to_vec()).context("payload is text")?;
    let message = json!({"stream": STREAM, "data": text});
    let batches = count.div_ceil(PRELOAD_BATCH);
    try_join_all((0..PRELOAD_CONNECTIONS).map(|c| {
        let message = message.clone();
        async move {
            let mut conn = Conn::open(addr).await?;
            let mut b = c;
            while b < batches {
                let n = PRELOAD_BATCH.min(count - b * PRELOAD_BATCH);
                let body = json!({"messages": vec![message.clone(); n as usize]});
                conn.expect(
                    Method::POST,
                    "/v1/publish",
                    Bytes::from(serde_json::to_vec(&body)?),
                    true,
                    &[StatusCode::CREATED],
                )
                .await?;
                b += PRELOAD_CONNECTIONS;
            }
            Ok::<_, anyhow::Error>(())
        }
    }))
    .await?;
    Ok(())
}

/// Creates group `group` on `STREAM` through `conn`.
pub async fn create_group(
    addr: std::net::SocketAddr,
    group: &str,
    from_oldest: bool,
) -> Result<()> {
    let mut conn = Conn::open(addr).await?;
    let body = json!({
        "start": if from_oldest { "oldest" } else { "latest" },
        "visibility_timeout": "60s",
        "max_in_flight": 100_000,
    });
    conn.expect(
        Method::PUT,
        &format!("/v1/streams/{STREAM}/groups/{group}"),
        Bytes::from(serde_json::to_vec(&body)?),
        true,
        &[StatusCode::CREATED],
    )
    .await?;
    Ok(())
}

#[async_trait]
impl GroupTarget for SpoolGroups {
    fn name(&self) -> &str {
        self.name
    }

    fn description(&self) -> String {
        match self.transport {
            Transport::Http(ack) => format!(
                "`{}`, {} (`--http-ack {}`; one raw hyper connection per member)",
                self.process.command_line(),
                ack.describe(),
                ack.flag()
            ),
            Transport::Ws(ack) => format!(
                "`{}`, WebSocket `consume` with credit = batch, {} (`--ws-ack {}`; one socket \
                 per member)",
                self.process.command_line(),
                ack.describe(),
                ack.flag()
            ),
        }
    }

    fn server_pid(&self) -> u32 {
        self.process.pid()
    }

    fn check_alive(&self) -> Result<()> {
        self.process.check_alive()
    }

    async fn preload(&self, count: u64, size: usize) -> Result<()> {
        preload(self.process.addr(), count, size).await
    }

    async fn create_group(&self, group: &str, from_oldest: bool) -> Result<()> {
        create_group(self.process.addr(), group, from_oldest).await
    }

    async fn member(&self, group: &str, idx: usize, batch: usize) -> Result<Box<dyn Member>> {
        Ok(match self.transport {
            Transport::Http(ack) => Box::new(member(self.process.addr(), group, idx, ack).await?),
            Transport::Ws(ack) => {
                let credit = u32::try_from(batch).context("batch too large for a credit")?;
                Box::new(
                    super::ws::WsMember::open(
                        self.process.addr(),
                        API_KEY,
                        group,
                        idx,
                        credit,
                        ack,
                        self.acks.clone(),
                    )
                    .await?,
                )
            }
        })
    }

    fn ack_frames(&self) -> Option<(u64, u64)> {
        matches!(self.transport, Transport::Ws(_)).then(|| self.acks.take())
    }

    async fn publisher(&self) -> Result<Box<dyn StampPublisher>> {
        Ok(Box::new(SpoolPublisher {
            conn: self.conn().await?,
            path: format!("/v1/streams/{STREAM}/messages"),
        }))
    }
}

/// Member `idx` of `group`, on its own connection, acking as `ack` says.
pub async fn member(
    addr: std::net::SocketAddr,
    group: &str,
    idx: usize,
    ack: HttpAck,
) -> Result<SpoolMember> {
    Ok(SpoolMember {
        conn: Conn::open(addr).await?,
        consumer: format!("m{idx}"),
        receive_path: format!("/v1/streams/{STREAM}/groups/{group}/receive"),
        ack_path: format!("/v1/streams/{STREAM}/groups/{group}/ack"),
        mode: ack,
        receipts: Vec::new(),
        max: 1,
        leased: None,
        since: None,
    })
}

/// Messages an acking receive leased, for the member's next `receive`.
struct Leased {
    /// When the receive that leased them was sent.
    sent: Instant,
    stamps: Vec<u64>,
    receipts: Vec<String>,
}

pub struct SpoolMember {
    conn: Conn,
    consumer: String,
    receive_path: String,
    ack_path: String,
    mode: HttpAck,
    /// The receipts the last `receive` handed out.
    receipts: Vec<String>,
    /// `max` of the last `receive`, for the receive an `on-receive` ack makes.
    max: usize,
    /// What the last `on-receive` ack leased.
    leased: Option<Leased>,
    /// When the receive that leased the last `receive`'s messages was sent, when not by it.
    since: Option<Instant>,
}

impl SpoolMember {
    /// Sends a receive with `body`, returning its answer.
    async fn post_receive(&mut self, body: &serde_json::Value) -> Result<ReceiveResponse> {
        let answer = self
            .conn
            .expect(
                Method::POST,
                &self.receive_path,
                Bytes::from(serde_json::to_vec(body)?),
                true,
                &[StatusCode::OK],
            )
            .await?;
        serde_json::from_slice(&answer).context("bad receive answer")
    }

    /// The stamps and receipts of a receive's messages.
    fn split(answer: ReceiveResponse) -> (Vec<u64>, Vec<String>) {
        answer
            .messages
            .into_iter()
            .map(|m| {
                (
                    stamp_of(m.data.as_deref().unwrap_or("").as_bytes()),
                    m.receipt,
                )
            })
            .unzip()
    }

    /// A plain `POST …/ack` of `receipts`; the number acked `ok`.
    async fn post_ack(&mut self, receipts: &[String]) -> Result<usize> {
        let body = json!({ "receipts": receipts });
        let answer = self
            .conn
            .expect(
                Method::POST,
                &self.ack_path,
                Bytes::from(serde_json::to_vec(&body)?),
                true,
                &[StatusCode::OK],
            )
            .await?;
        let answer: SettleResponse = serde_json::from_slice(&answer).context("bad ack answer")?;
        Ok(count_ok(&answer.results))
    }
}

fn count_ok(results: &[ReceiptOutcome]) -> usize {
    results
        .iter()
        .filter(|r| r.result == ReceiptResult::Ok)
        .count()
}

#[async_trait]
impl Member for SpoolMember {
    async fn receive(&mut self, max: usize, wait: Option<Duration>) -> Result<Vec<u64>> {
        self.max = max;
        if let Some(leased) = self.leased.take() {
            self.since = Some(leased.sent);
            self.receipts = leased.receipts;
            return Ok(leased.stamps);
        }
        self.since = None;
        let mut body = json!({"consumer": self.consumer, "max": max});
        if let Some(wait) = wait {
            body["wait"] = json!(format!("{}ms", wait.as_millis()));
        }
        let answer = self.post_receive(&body).await?;
        let (stamps, receipts) = Self::split(answer);
        self.receipts = receipts;
        Ok(stamps)
    }

    fn since(&self) -> Option<Instant> {
        self.since
    }

    async fn ack(&mut self) -> Result<usize> {
        let receipts = std::mem::take(&mut self.receipts);
        let ok = match self.mode {
            HttpAck::Separate => self.post_ack(&receipts).await?,
            HttpAck::OnReceive => {
                // The next receive, carrying the acks; without a wait, so the acks' results
                // come at once (nothing leased: the next `receive` long-polls).
                let sent = Instant::now();
                let body = json!({"consumer": self.consumer, "max": self.max, "ack": receipts});
                let mut answer = self.post_receive(&body).await?;
                let acks = answer
                    .acks
                    .take()
                    .context("the receive answered no `acks`")?;
                let (stamps, leased) = Self::split(answer);
                if !leased.is_empty() {
                    self.leased = Some(Leased {
                        sent,
                        stamps,
                        receipts: leased,
                    });
                }
                if acks.len() != receipts.len() {
                    bail!("{} ack results for {} receipts", acks.len(), receipts.len());
                }
                count_ok(&acks)
            }
        };
        if ok != receipts.len() {
            bail!("{} of {} acks not ok", receipts.len() - ok, receipts.len());
        }
        Ok(ok)
    }

    async fn finish(&mut self) -> Result<()> {
        if let Some(leased) = self.leased.take() {
            self.post_ack(&leased.receipts).await?;
        }
        Ok(())
    }
}

struct SpoolPublisher {
    conn: Conn,
    path: String,
}

#[async_trait]
impl StampPublisher for SpoolPublisher {
    async fn publish(&mut self, payload: Bytes) -> Result<()> {
        self.conn
            .expect(
                Method::POST,
                &self.path,
                payload,
                false,
                &[StatusCode::CREATED],
            )
            .await?;
        Ok(())
    }
}
