//! `spool`: the server (`spool serve`) and client commands for scripts and debugging
//! (`spool publish`, `spool tail`, `spool consume`).

mod check;
mod client;
mod config;
mod config_check;
mod consume;
mod publish;
mod serve;
mod tail;
mod token;

use clap::{Parser, Subcommand};

/// mimalloc: the server allocates per request and per message from many threads; glibc's
/// malloc showed up at ~11% of server CPU under publish load, mimalloc roughly halves that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "spool",
    version,
    about = "Realtime messages that survive disconnects, restarts and node loss"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<config::Settings>),
    /// Publish a message (or one per stdin line) to a stream.
    Publish(publish::PublishArgs),
    /// Print a stream's messages, then follow it live over WebSocket, SSE or long-poll;
    /// resumes by itself after disconnects.
    Tail(tail::TailArgs),
    /// Be a member of a consumer group: receive leased messages, print them (or run a
    /// command per message) and ack; a failed command nacks, so the message comes back.
    Consume(consume::ConsumeArgs),
    /// Cut damaged WAL segments (and a damaged session file) out of the disk engine's data
    /// directory so the server can start again; only streams that lost messages get a new epoch.
    Repair(RepairArgs),
    /// Sign a client token (JWT) with the server's secret or a private key, or check one
    /// (--check) and print its claims and expiry.
    Token(Box<token::TokenArgs>),
    /// Configuration helpers: `spool config check FILE`.
    Config(config_check::ConfigArgs),
    /// Prove "no silent gap" under random faults: publishers and subscribers on every
    /// transport against servers it starts (or --url), a seeded fault schedule, and a checker
    /// of the history; exits non-zero on a violation (docs/reliability.md).
    Check(Box<check::CheckArgs>),
}

#[derive(clap::Args)]
struct RepairArgs {
    /// The disk engine's data directory.
    #[arg(long, env = "SPOOL_DATA_DIR", default_value = "spool-data")]
    data_dir: std::path::PathBuf,
    /// Say what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Most cut streams listed by name; the rest are counted.
const LISTED_STREAMS: usize = 50;

fn repair(args: RepairArgs) -> anyhow::Result<()> {
    serve::init_logging(false);
    let dir = &args.data_dir;
    let report = spool_disk::repair(dir, args.dry_run)?;
    if report.is_clean() {
        println!("nothing to repair in {}", dir.display());
        return Ok(());
    }
    let (will, keep) = if args.dry_run {
        println!("dry run: nothing was changed");
        ("would be", "would keep")
    } else {
        ("were", "keep")
    };
    for d in &report.damaged {
        println!(
            "damaged: {} at byte {} ({}): the records before that byte are kept, the rest of the segment is lost",
            d.segment.display(),
            d.at,
            d.why
        );
    }
    if !report.damaged.is_empty() {
        println!(
            "{} streams {will} cut and get a new epoch (their clients get an epoch_changed reset; messages after the damage are kept):",
            report.cut.len()
        );
        for c in report.cut.iter().take(LISTED_STREAMS) {
            if args.dry_run {
                println!("  {} (epoch {} -> a new one)", c.stream, c.epoch);
            } else {
                println!("  {} (epoch {} -> {})", c.stream, c.epoch, c.new_epoch);
            }
        }
        if report.cut.len() > LISTED_STREAMS {
            println!("  … and {} more", report.cut.len() - LISTED_STREAMS);
        }
        println!(
            "{} streams {keep} their epoch and every message",
            report.intact
        );
    }
    if !report.groups_rolled_back.is_empty() {
        println!(
            "{} consumer groups {will} rolled back to their state at the damaged byte (commits after it are lost: their messages not acked by then are delivered again):",
            report.groups_rolled_back.len()
        );
        for g in report.groups_rolled_back.iter().take(LISTED_STREAMS) {
            println!("  {} on {} (version {})", g.group, g.stream, g.version);
        }
        if report.groups_rolled_back.len() > LISTED_STREAMS {
            println!(
                "  … and {} more",
                report.groups_rolled_back.len() - LISTED_STREAMS
            );
        }
    }
    if let Some(why) = &report.sessions_damaged {
        println!(
            "damaged: {} ({why}): {will} moved aside; WebSocket clients cannot resume their sessions and connect fresh",
            dir.join("sessions.redb").display()
        );
    }
    for path in &report.quarantined {
        println!("quarantined {}", path.display());
    }
    Ok(())
}

/// An error and its causes as one line, "a: b: c", each cause once: a cause whose text the
/// line already holds (an I/O error both shown and kept as the source, so "(os error N)"
/// twice) is left out.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Parses the command line. A value from a `SPOOL_*` variable that does not parse is named by
/// its variable (clap names the flag, which the user never typed); with `--log-format json`
/// (or `SPOOL_LOG_FORMAT=json`) `spool serve`'s parse errors are a JSON log line.
fn parse() -> Result<Cli, std::process::ExitCode> {
    let error = match Cli::try_parse() {
        Ok(cli) => return Ok(cli),
        Err(e) => e,
    };
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        error.exit();
    }
    let bad_value = matches!(
        error.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    );
    let args: Vec<String> = std::env::args().collect();
    let flag = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.split_whitespace().next().unwrap_or("").to_owned(),
        _ => String::new(),
    };
    let typed = !flag.is_empty()
        && args
            .iter()
            .any(|a| a == &flag || a.starts_with(&format!("{flag}=")));
    let var = flag
        .strip_prefix("--")
        .map(|name| format!("SPOOL_{}", name.to_uppercase().replace('-', "_")));
    let from_env = match &var {
        Some(var) if bad_value && !typed => std::env::var_os(var).is_some(),
        _ => false,
    };
    let json = args.get(1).is_some_and(|c| c == "serve")
        && (args
            .windows(2)
            .any(|w| w[0] == "--log-format" && w[1] == "json")
            || args.iter().any(|a| a == "--log-format=json")
            || std::env::var("SPOOL_LOG_FORMAT").is_ok_and(|v| v == "json"));
    if !from_env && !json {
        error.exit();
    }
    let mut message = error.to_string();
    if from_env && let Some(var) = &var {
        let value = match error.get(ContextKind::InvalidValue) {
            Some(ContextValue::String(v)) => v.clone(),
            _ => String::new(),
        };
        let why = std::error::Error::source(&error)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        message = format!(
            "invalid value {value:?} in the environment variable {var} (the value of {flag}){why}"
        );
    }
    let message = message
        .trim()
        .trim_start_matches("error: ")
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    if json {
        serve::init_logging(true);
        tracing::error!(error = %message, "spool serve failed");
    } else {
        eprintln!("spool: {message}");
    }
    Err(std::process::ExitCode::from(2))
}

fn main() -> std::process::ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("spool: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Publish(args) => publish::run(args).await,
            Command::Tail(args) => tail::run(args).await,
            Command::Consume(args) => consume::run(args).await,
            Command::Repair(args) => repair(args),
            Command::Token(args) => token::run(*args),
            Command::Config(args) => config_check::run(args),
            Command::Check(args) => check::run(*args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.is::<serve::Reported>() => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("spool: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
