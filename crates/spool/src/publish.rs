//! `spool publish STREAM [DATA|-]`: publish one message, or with `--lines` one per stdin line.
//! Prints the position of each message as `EPOCH:OFFSET` (with ` duplicate` for a retry that
//! an idempotency key caught).

use anyhow::{Context, bail};
use clap::Args;
use spool_client::http::HttpClient as Client;
use spool_protocol::http::{BatchMessage, PublishResponse};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use crate::client::ClientArgs;

/// Messages per batch request with `--lines`.
const LINES_PER_BATCH: usize = 1000;

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// The stream to publish to.
    pub stream: String,
    /// The payload; `-` or nothing reads it from stdin.
    pub data: Option<String>,
    /// Publish each stdin line as its own message.
    #[arg(long)]
    pub lines: bool,
    /// Idempotency key: a retry with the same key is appended once.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Content type stored with the message.
    #[arg(long)]
    pub content_type: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub async fn run(args: PublishArgs) -> anyhow::Result<()> {
    let client = args.client.http()?;
    if args.lines {
        if args.data.as_deref().is_some_and(|d| d != "-") {
            bail!("--lines reads stdin; do not give DATA");
        }
        return publish_lines(&client, &args).await;
    }
    let payload = match args.data.as_deref() {
        Some(d) if d != "-" => d.as_bytes().to_vec(),
        _ => {
            let mut buf = Vec::new();
            tokio::io::stdin()
                .read_to_end(&mut buf)
                .await
                .context("cannot read stdin")?;
            buf
        }
    };
    let answer = client
        .publish(
            &args.stream,
            payload,
            args.idempotency_key.as_deref(),
            args.content_type.as_deref(),
        )
        .await?;
    print(&answer);
    Ok(())
}

async fn publish_lines(client: &Client, args: &PublishArgs) -> anyhow::Result<()> {
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut batch = Vec::with_capacity(LINES_PER_BATCH);
    let mut n = 0usize;
    loop {
        let line = lines.next_line().await.context("cannot read stdin")?;
        let done = line.is_none();
        if let Some(line) = line {
            n += 1;
            batch.push(BatchMessage {
                stream: args.stream.clone(),
                data: Some(line),
                content_type: args.content_type.clone(),
                idempotency_key: args.idempotency_key.as_ref().map(|k| format!("{k}-{n}")),
                ..BatchMessage::default()
            });
        }
        if batch.len() >= LINES_PER_BATCH || (done && !batch.is_empty()) {
            let answer = client.publish_batch(std::mem::take(&mut batch)).await?;
            answer.results.iter().for_each(print);
        }
        if done {
            return Ok(());
        }
    }
}

fn print(answer: &PublishResponse) {
    if answer.duplicate {
        println!("{}:{} duplicate", answer.epoch, answer.offset);
    } else {
        println!("{}:{}", answer.epoch, answer.offset);
    }
}
