//! `spool consume STREAM GROUP`: a member of a consumer group (SPEC §7) for scripts and
//! operators. It receives leased messages with long-poll and
//!
//! - without `--exec`, prints each one (`EPOCH:OFFSET\tDELIVERIES\tDATA`, one line, like
//!   `spool tail`) and acks it once it is written: a batch's acks go with the next receive
//!   (its `ack` field, one request; that receive does not wait, so its answer says at once
//!   what was acked), and what was printed when the command stops is acked with a plain ack;
//! - with `--exec CMD`, runs `sh -c CMD` per message with the payload on stdin (and
//!   `SPOOL_STREAM`, `SPOOL_GROUP`, `SPOOL_EPOCH`, `SPOOL_OFFSET`, `SPOOL_DELIVERIES`,
//!   `SPOOL_KEY`, `SPOOL_RECEIPT` in its environment): exit 0 acks, anything else nacks (the
//!   message comes back, and after the group's `max_deliveries` goes to its dead-letter
//!   stream). While the command runs its lease is extended, so slow work is not handed to a
//!   second member.
//!
//! On a terminal it keeps a live count of received / acked / nacked on stderr. Ctrl-C stops
//! after the message at hand; the batch's unstarted messages are nacked so other members get
//! them at once. Server or network failures are retried with backoff; refusals (unknown group,
//! no right to consume) end the command with the server's message.

use std::{
    io::{IsTerminal, Write},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Args;
use futures::FutureExt;
use spool_client::{Backoff, groups::GroupClient, http::RequestError};
use spool_protocol::groups::{GroupConfigSpec, GroupMessage, ReceiptOutcome, ReceiptResult};
use tokio::io::AsyncWriteExt;

use crate::client::ClientArgs;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct ConsumeArgs {
    /// The stream the group reads.
    pub stream: String,
    /// The group.
    pub group: String,
    /// This member's name (default: `HOSTNAME-PID`).
    #[arg(long)]
    pub consumer: Option<String>,
    /// Run this shell command per message (payload on stdin); exit 0 acks, otherwise nack.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Messages per receive (1–1000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max: u32,
    /// How long a receive waits for messages (long-poll), e.g. `20s`.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub wait: Duration,
    /// The lease length for received messages (default: the group's).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub visibility_timeout: Option<Duration>,
    /// With --exec, how long after a failure the message may come back (default: at once,
    /// or the group's backoff).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub nack_delay: Option<Duration>,
    /// Create the group first (from the oldest retained message) if it does not exist.
    #[arg(long)]
    pub create: bool,
    /// Stop after this many messages were settled.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when a receive finds nothing (the backlog is drained).
    #[arg(long)]
    pub no_follow: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What happened so far, for the live count and the final line.
#[derive(Default)]
struct Tally {
    received: u64,
    acked: u64,
    nacked: u64,
    /// Settlements the server answered `expired` or `unknown` for: the lease was lost (it ran
    /// out, or the group was recreated), so another member may get the message again.
    lost: u64,
}

impl Tally {
    fn settled(&self) -> u64 {
        self.acked + self.nacked + self.lost
    }
}

pub async fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    if args.stream.is_empty() || args.group.is_empty() {
        bail!("STREAM and GROUP must not be empty");
    }
    let http = args.client.http()?;
    let group = GroupClient::new(&http, &args.stream, &args.group);
    let consumer = args.consumer.clone().unwrap_or_else(default_consumer);
    if args.create {
        let spec = GroupConfigSpec {
            start: Some("oldest".to_owned()),
            ..Default::default()
        };
        match group.info().await {
            Ok(_) => {}
            Err(RequestError::Rejected(status, _)) if status == reqwest::StatusCode::NOT_FOUND => {
                group
                    .create(&spec)
                    .await
                    .with_context(|| format!("cannot create group {:?}", args.group))?;
            }
            Err(e) => return Err(e).context("cannot look the group up"),
        }
    }

    let live = std::io::stderr().is_terminal();
    let mut tally = Tally::default();
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    let mut stopping = false;
    let mut out = std::io::BufWriter::new(std::io::stdout());

    // Without --exec: receipts of messages written to stdout and not acked yet; they go with
    // the next receive, or a plain ack when the command stops.
    let mut printed: Vec<String> = Vec::new();

    'receive: while !stopping {
        let max = receive_max(&args, &tally, printed.len());
        let batch = if printed.is_empty() {
            tokio::select! {
                batch = group.receive(&consumer, max, args.wait, args.visibility_timeout) => batch,
                _ = &mut stop => break,
            }
        } else {
            if (&mut stop).now_or_never().is_some() {
                break;
            }
            // Not interrupted: its acks' results must be known. It does not wait (a receive
            // that finds nothing is followed by a waiting one without acks).
            let answer = group
                .receive_acking(
                    &consumer,
                    max,
                    Duration::ZERO,
                    args.visibility_timeout,
                    &printed,
                )
                .await;
            match answer {
                Ok((batch, results)) => {
                    printed.clear();
                    count_acks(&mut tally, &results);
                    if (&mut stop).now_or_never().is_some() {
                        give_back(&group, batch.messages.into_iter()).await;
                        break;
                    }
                    Ok(batch)
                }
                Err(e) => {
                    // Whether its acks were done is not known: ack them plainly (those done
                    // answer `expired`); the receive's failure is then handled as any.
                    ack_printed(&group, &mut printed, &mut tally).await?;
                    Err(e)
                }
            }
        };
        let batch = match batch {
            Ok(batch) => {
                backoff.reset();
                batch
            }
            Err(RequestError::Transient(why)) => {
                let delay = backoff.next_delay();
                eprintln!("spool consume: {why}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                continue;
            }
            Err(e) => return Err(e).context("receive failed"),
        };
        if let Some(reset) = &batch.reset {
            eprintln!(
                "spool consume: the group lost {} messages ({}), from {} to {}",
                reset.lost, reset.reason, reset.from, reset.to
            );
        }
        if batch.messages.is_empty() {
            if args.no_follow {
                break;
            }
            continue;
        }
        tally.received += batch.messages.len() as u64;
        let Some(cmd) = &args.exec else {
            // Each message is acked only once it is written out.
            for m in &batch.messages {
                let written = print_message(&mut out, m).and_then(|()| out.flush());
                if let Err(e) = written {
                    ack_printed(&group, &mut printed, &mut tally).await?;
                    return Err(e).context("cannot write to stdout");
                }
                printed.push(m.receipt.clone());
            }
            if live {
                show(&tally);
            }
            if args
                .count
                .is_some_and(|c| tally.settled() + printed.len() as u64 >= c)
            {
                break;
            }
            continue;
        };
        let mut messages = batch.messages.into_iter();
        while let Some(m) = messages.next() {
            let ok = tokio::select! {
                ok = run_command(cmd, &args, &group, &m) => ok?,
                _ = &mut stop => {
                    // The command was interrupted with us: its message comes back.
                    stopping = true;
                    false
                }
            };
            let receipt = [m.receipt.clone()];
            let answer = if ok {
                group.ack(&receipt).await
            } else {
                group
                    .nack(&receipt, args.nack_delay, Some("command_failed"))
                    .await
            };
            count(&mut tally, ok, answer)?;
            if live {
                show(&tally);
            }
            let done = args.count.is_some_and(|c| tally.settled() >= c);
            if stopping || done {
                // What was received and not started goes back at once.
                give_back(&group, messages).await;
                break 'receive;
            }
        }
    }
    ack_printed(&group, &mut printed, &mut tally).await?;
    out.flush()?;
    if live {
        eprintln!();
    }
    eprintln!(
        "spool consume: received {}, acked {}, nacked {}, lost {}",
        tally.received, tally.acked, tally.nacked, tally.lost
    );
    Ok(())
}

/// No more than `--count` leaves to settle (`unacked` are printed and settled next), so a
/// counted run leases nothing it will not use.
fn receive_max(args: &ConsumeArgs, tally: &Tally, unacked: usize) -> u32 {
    match args.count {
        Some(c) => {
            let left = c.saturating_sub(tally.settled() + unacked as u64).max(1);
            args.max.min(u32::try_from(left).unwrap_or(u32::MAX))
        }
        None => args.max,
    }
}

/// The live count on a terminal.
fn show(tally: &Tally) {
    eprint!(
        "\rreceived {}  acked {}  nacked {}  lost {}",
        tally.received, tally.acked, tally.nacked, tally.lost
    );
}

/// Nacks messages received and not started, so other members get them at once.
async fn give_back(group: &GroupClient, rest: impl Iterator<Item = GroupMessage>) {
    let rest: Vec<String> = rest.map(|m| m.receipt).collect();
    if rest.is_empty() {
        return;
    }
    if let Err(e) = group.nack(&rest, None, Some("consumer_stopped")).await {
        eprintln!(
            "\nspool consume: could not give back {} messages ({e}); they come back when their leases run out",
            rest.len()
        );
    }
}

/// A plain ack of what was printed and not acked yet.
async fn ack_printed(
    group: &GroupClient,
    printed: &mut Vec<String>,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    if printed.is_empty() {
        return Ok(());
    }
    let answer = group.ack(printed).await.context("ack failed")?;
    printed.clear();
    count_acks(tally, &answer.results);
    Ok(())
}

/// Counts the results of acks: `ok` is acked, anything else a lost lease.
fn count_acks(tally: &mut Tally, results: &[ReceiptOutcome]) {
    for r in results {
        if r.result == ReceiptResult::Ok {
            tally.acked += 1;
        } else {
            tally.lost += 1;
            eprintln!(
                "\nspool consume: the lease was {} before it was acked; the message may be delivered again",
                r.result.as_str()
            );
        }
    }
}

fn count(
    tally: &mut Tally,
    ok: bool,
    answer: Result<spool_protocol::groups::SettleResponse, RequestError>,
) -> anyhow::Result<()> {
    let answer = answer.context(if ok { "ack failed" } else { "nack failed" })?;
    match answer.results.first().map(|r| r.result) {
        Some(ReceiptResult::Ok) if ok => tally.acked += 1,
        Some(ReceiptResult::Ok) => tally.nacked += 1,
        Some(other) => {
            tally.lost += 1;
            eprintln!(
                "\nspool consume: the lease was {} before it was settled; the message may be delivered again",
                other.as_str()
            );
        }
        None => bail!("the server answered no result for the receipt"),
    }
    Ok(())
}

fn print_message(out: &mut impl Write, m: &GroupMessage) -> std::io::Result<()> {
    let data = match (&m.data, &m.data_base64) {
        (Some(text), _) => text.replace('\r', "\\r").replace('\n', "\\n"),
        (None, Some(b64)) => format!("base64:{b64}"),
        (None, None) => String::new(),
    };
    writeln!(out, "{}:{}\t{}\t{data}", m.epoch, m.offset, m.deliveries)
}

/// Runs `cmd` for one message, extending its lease while it runs. True on exit 0.
async fn run_command(
    cmd: &str,
    args: &ConsumeArgs,
    group: &GroupClient,
    m: &GroupMessage,
) -> anyhow::Result<bool> {
    let payload = m
        .payload()
        .context("the message's payload does not decode")?;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("SPOOL_STREAM", &args.stream)
        .env("SPOOL_GROUP", &args.group)
        .env("SPOOL_EPOCH", &m.epoch)
        .env("SPOOL_OFFSET", m.offset.to_string())
        .env("SPOOL_DELIVERIES", m.deliveries.to_string())
        .env("SPOOL_KEY", m.key.as_deref().unwrap_or_default())
        .env("SPOOL_RECEIPT", &m.receipt)
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its stdin closes it early: not a failure of ours.
        let _ = stdin.write_all(&payload).await;
    }
    // Renew the lease at a third of its length while the command runs.
    let lease = args.visibility_timeout.unwrap_or(Duration::from_secs(30));
    let mut renew = tokio::time::interval((lease / 3).max(Duration::from_millis(200)));
    renew.tick().await;
    let receipt = [m.receipt.clone()];
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.context("waiting for the command failed")?;
                return Ok(status.success());
            }
            _ = renew.tick() => {
                if let Err(e) = group.extend(&receipt, args.visibility_timeout).await {
                    eprintln!("\nspool consume: could not extend the lease of {}:{} ({e})", m.epoch, m.offset);
                }
            }
        }
    }
}

fn default_consumer() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "spool".to_owned());
    let name: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    format!("{name}-{}", std::process::id())
}
