//! `spool`: the server (`spool serve`) and client commands for scripts and debugging
//! (`spool publish`, `spool tail`).

mod client;
mod config;
mod publish;
mod serve;
mod tail;

use clap::{Parser, Subcommand};

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
    /// Print a stream's messages, then follow it live; resumes by itself after disconnects.
    Tail(tail::TailArgs),
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
