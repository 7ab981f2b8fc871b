//! `spool`: the server (`spool serve`) and client commands for scripts and debugging
//! (`spool publish`, `spool tail`).

mod client;
mod config;
mod publish;
mod serve;
mod tail;

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
    Serve(Box<serve::ServeArgs>),
    /// Publish a message (or one per stdin line) to a stream.
    Publish(publish::PublishArgs),
    /// Print a stream's messages, then follow it live over WebSocket, SSE or long-poll;
    /// resumes by itself after disconnects.
    Tail(tail::TailArgs),
    /// Move corrupt WAL segments of the disk engine aside so the server can start again.
    Repair(RepairArgs),
}

#[derive(clap::Args)]
struct RepairArgs {
    /// The disk engine's data directory.
    #[arg(long, env = "SPOOL_DATA_DIR", default_value = "spool-data")]
    data_dir: std::path::PathBuf,
}

fn repair(args: RepairArgs) -> anyhow::Result<()> {
    serve::init_logging(false);
    let moved = spool_engine::disk::repair(&args.data_dir)?;
    if moved.is_empty() {
        println!("no corrupt segment found in {}", args.data_dir.display());
    } else {
        for path in moved {
            println!("quarantined {}", path.display());
        }
        println!("every stream starts a new epoch on the next start; clients get a reset");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
            Command::Repair(args) => repair(args),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spool: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
