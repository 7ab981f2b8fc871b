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
    spool_process::SpoolProcess,
    workload::Workload,
};

/// The API key the benchmark server is started with.
pub const API_KEY: &str = "bench-key";

/// Which engine `spool serve` runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Memory,
    DiskFsync,
    DiskNosync,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Memory => "spool",
            Engine::DiskFsync => "spool-fsync",
            Engine::DiskNosync => "spool-nosync",
        }
    }
}

/// `spool serve` under test.
pub struct SpoolTarget {
    engine: Engine,
    /// Stopped on drop.
    process: SpoolProcess,
    base: Url,
    urls: Arc<[Url]>,
    auth: HeaderValue,
    workload: Arc<Workload>,
    acks: Arc<AckCounts>,
    /// The disk engine's data directory, removed on drop — after `process` stopped, since
    /// fields drop in declaration order.
    _data: Option<tempfile::TempDir>,
}

impl SpoolTarget {
    /// Starts `spool serve` on a free 127.0.0.1 port and waits until it answers.
    pub async fn start(
        options: &SpoolOptions,
        engine: Engine,
        workload: Arc<Workload>,
    ) -> Result<Self> {
        let data = match engine {
            Engine::Memory => None,
            Engine::DiskFsync | Engine::DiskNosync => {
                Some(tempfile::tempdir().context("cannot create a data directory")?)
            }
        };
        let mut args: Vec<String> = match (&data, engine) {
            (Some(dir), Engine::DiskFsync | Engine::DiskNosync) => vec![
                "--engine".into(),
                "disk".into(),
                "--data-dir".into(),
                dir.path().display().to_string(),
                "--durability".into(),
                if engine == Engine::DiskFsync {
                    "fsync"
                } else {
                    "memory"
                }
                .into(),
            ],
            _ => vec!["--engine".into(), "memory".into()],
        };
        args.extend(
            [
                "--api-key",
                API_KEY,
                // Keep everything the benchmark publishes, so the read-back can count it all.
                "--history-limit",
                "1000000",
                "--history-max-bytes",
                "4GiB",
            ]
            .map(String::from),
        );
        args.extend(options.extra_args.iter().cloned());
        let process = SpoolProcess::start(&options.bin, &args).await?;
        let base =
            Url::parse(&format!("http://{}/", process.addr())).context("bad spool base URL")?;
        let urls = publish_urls(&base, &workload)?;
        let auth = HeaderValue::from_str(&format!("Bearer {API_KEY}"))
            .context("bad Authorization header")?;
        Ok(Self {
            engine,
            _data: data,
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
        self.engine.name()
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
