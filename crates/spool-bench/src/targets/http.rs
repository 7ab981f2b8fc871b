//! Publishing over Spool's HTTP API (`POST /v1/streams/{stream}/messages`, `201` on ack),
//! shared by every target that speaks it, so Spool and the bare-HTTP peer see the very same
//! client code and differ only in the server.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, StatusCode,
    client::conn::http1,
    header::{AUTHORIZATION, HOST, HeaderValue},
};
use hyper_util::rt::TokioIo;
use reqwest::Url;

use super::Publisher;
use crate::workload::Workload;

/// Longest wait for one ack; a slower answer counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a refusal's body an error message quotes.
const ERROR_BODY_CHARS: usize = 200;

/// A client with at most one keep-alive connection: a client task publishes sequentially, so
/// it reuses that connection for every message.
pub fn one_connection_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("cannot build an HTTP client")
}

/// `{base}v1/streams/{stream}/messages` for every stream of the workload, in order.
pub fn publish_urls(base: &Url, workload: &Workload) -> Result<Arc<[Url]>> {
    workload
        .streams()
        .iter()
        .map(|s| {
            base.join(&format!("v1/streams/{s}/messages"))
                .with_context(|| format!("bad publish URL for stream {s:?}"))
        })
        .collect()
}

/// Acks counted per stream (indexed like [`Workload::streams`]), for the read-back check.
#[derive(Debug)]
pub struct AckCounts(Vec<AtomicU64>);

impl AckCounts {
    pub fn new(streams: usize) -> Self {
        Self((0..streams).map(|_| AtomicU64::new(0)).collect())
    }

    fn record(&self, stream: usize) {
        if let Some(n) = self.0.get(stream) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, stream: usize) -> u64 {
        self.0.get(stream).map_or(0, |n| n.load(Ordering::Relaxed))
    }
}

/// One client's connection publishing over HTTP: a raw hyper HTTP/1.1 connection, so the
/// load generator spends as little CPU per request as it can (it shares the machine with the
/// server under test; reqwest's pool and URL handling cost about twice as much per request).
pub struct HttpPublisher {
    sender: http1::SendRequest<Full<Bytes>>,
    host: HeaderValue,
    paths: Arc<[String]>,
    auth: Option<HeaderValue>,
    workload: Arc<Workload>,
    /// Where to count acks, when the target is read back afterwards.
    acks: Option<Arc<AckCounts>>,
}

impl HttpPublisher {
    /// Opens one keep-alive connection to the server of `urls`.
    pub async fn connect(
        urls: &[Url],
        auth: Option<HeaderValue>,
        workload: Arc<Workload>,
        acks: Option<Arc<AckCounts>>,
    ) -> Result<Self> {
        let first = urls.first().context("no publish URL")?;
        let addr = first
            .socket_addrs(|| None)
            .context("cannot resolve the server address")?
            .into_iter()
            .next()
            .context("the server URL has no address")?;
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
        let host = HeaderValue::from_str(&addr.to_string()).context("bad Host header")?;
        let paths: Arc<[String]> = urls.iter().map(|u| u.path().to_owned()).collect();
        Ok(Self {
            sender,
            host,
            paths,
            auth,
            workload,
            acks,
        })
    }
}

#[async_trait]
impl Publisher for HttpPublisher {
    async fn publish_one(&mut self, seq: u64) -> Result<()> {
        let stream = self.workload.stream_index(seq);
        self.publish_body(stream, self.workload.payload(seq)).await
    }
}

impl HttpPublisher {
    /// Publishes `body` to stream #`stream` of the URLs given to [`Self::connect`] and waits
    /// for the `201`.
    pub async fn publish_body(&mut self, stream: usize, body: Bytes) -> Result<()> {
        let path = self
            .paths
            .get(stream)
            .with_context(|| format!("no URL for stream #{stream}"))?;
        let mut request = Request::post(path.as_str())
            .header(HOST, self.host.clone())
            .body(Full::new(body))
            .context("cannot build the request")?;
        if let Some(auth) = &self.auth {
            request.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        self.sender.ready().await.context("the connection closed")?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.sender.send_request(request))
            .await
            .context("no answer in time")?
            .context("publish request failed")?;
        let status = response.status();
        // Read the whole answer even on success: the connection is reused only after that.
        let body = response
            .into_body()
            .collect()
            .await
            .context("reading the publish answer failed")?
            .to_bytes();
        if status != StatusCode::CREATED {
            let text: String = String::from_utf8_lossy(&body)
                .chars()
                .take(ERROR_BODY_CHARS)
                .collect();
            bail!("HTTP {status}: {text}");
        }
        if let Some(acks) = &self.acks {
            acks.record(stream);
        }
        Ok(())
    }
}
