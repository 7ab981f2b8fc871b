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
use reqwest::{
    StatusCode, Url,
    header::{AUTHORIZATION, HeaderValue},
};

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

/// One client's connection publishing over HTTP.
pub struct HttpPublisher {
    pub client: reqwest::Client,
    pub urls: Arc<[Url]>,
    pub auth: Option<HeaderValue>,
    pub workload: Arc<Workload>,
    /// Where to count acks, when the target is read back afterwards.
    pub acks: Option<Arc<AckCounts>>,
}

#[async_trait]
impl Publisher for HttpPublisher {
    async fn publish_one(&mut self, seq: u64) -> Result<()> {
        let stream = self.workload.stream_index(seq);
        let url = self
            .urls
            .get(stream)
            .with_context(|| format!("no URL for stream #{stream}"))?;
        let mut request = self
            .client
            .post(url.clone())
            .body(self.workload.payload(seq));
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        let response = request.send().await.context("publish request failed")?;
        let status = response.status();
        // Read the whole answer even on success: the connection is reused only after that.
        let body = response
            .bytes()
            .await
            .context("reading the publish answer failed")?;
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
