//! Spool itself: a `spool serve` child process (memory or disk engine), published to over HTTP
//! with an API key, and read back afterwards to prove every ack was real.

use std::sync::Arc;

use anyhow::{Context, Result};
use async_trait::async_trait;
use reqwest::{Url, header::HeaderValue};

use super::{
    Publisher, SpoolOptions, Target,
    http::{AckCounts, HttpPublisher, one_connection_client, publish_urls},
};
use crate::{
    readback::{self, ReadBack},
    spool_process::{SpoolEngine, SpoolProcess},
    workload::Workload,
};

/// The API key the benchmark server is started with.
pub const API_KEY: &str = "bench-key";

/// The name of a target on `engine` in the report.
fn name(engine: SpoolEngine) -> &'static str {
    match engine {
        SpoolEngine::Memory => "spool",
        SpoolEngine::DiskFsync => "spool-fsync",
        SpoolEngine::DiskNosync => "spool-nosync",
    }
}

/// `spool serve` under test.
pub struct SpoolTarget {
    engine: SpoolEngine,
    /// Stopped on drop (with its data directory).
    process: SpoolProcess,
    base: Url,
    urls: Arc<[Url]>,
    auth: HeaderValue,
    workload: Arc<Workload>,
    acks: Arc<AckCounts>,
}

impl SpoolTarget {
    /// Starts `spool serve` on a free 127.0.0.1 port and waits until it answers.
    pub async fn start(
        options: &SpoolOptions,
        engine: SpoolEngine,
        workload: Arc<Workload>,
    ) -> Result<Self> {
        let mut args: Vec<String> = [
            "--api-key",
            API_KEY,
            // Keep everything the benchmark publishes, so the read-back can count it all.
            "--history-limit",
            "1000000",
            "--history-max-bytes",
            "4GiB",
        ]
        .map(String::from)
        .to_vec();
        args.extend(options.extra_args.iter().cloned());
        let process = SpoolProcess::start_on(&options.bin, engine, &args).await?;
        let base =
            Url::parse(&format!("http://{}/", process.addr())).context("bad spool base URL")?;
        let urls = publish_urls(&base, &workload)?;
        let auth = HeaderValue::from_str(&format!("Bearer {API_KEY}"))
            .context("bad Authorization header")?;
        Ok(Self {
            engine,
            process,
            base,
            urls,
            auth,
            acks: Arc::new(AckCounts::new(workload.streams().len())),
            workload,
        })
    }
}

#[async_trait]
impl Target for SpoolTarget {
    fn name(&self) -> &str {
        name(self.engine)
    }

    fn description(&self) -> String {
        format!("`{}`", self.process.command_line())
    }

    async fn connect(&self, _client_idx: usize) -> Result<Box<dyn Publisher>> {
        Ok(Box::new(
            HttpPublisher::connect(
                &self.urls,
                Some(self.auth.clone()),
                self.workload.clone(),
                Some(self.acks.clone()),
            )
            .await?,
        ))
    }

    fn server_pid(&self) -> Option<u32> {
        Some(self.process.pid())
    }

    fn check_alive(&self) -> Result<()> {
        self.process.check_alive()
    }

    async fn read_back(&self) -> Result<Option<Vec<ReadBack>>> {
        let client = one_connection_client()?;
        let mut out = Vec::with_capacity(self.workload.streams().len());
        for (i, stream) in self.workload.streams().iter().enumerate() {
            let acked = self.acks.get(i);
            let report =
                readback::read_stream(self.name(), &client, &self.base, &self.auth, stream, acked)
                    .await?;
            out.push(report);
        }
        self.process.check_alive()?;
        Ok(Some(out))
    }
}
