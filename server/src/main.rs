//! The `latchkey` binary: parses flags and hands off to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use latchkey_server::{cli, config::ServeArgs, dev, server};

#[derive(Parser)]
#[command(
    name = "latchkey",
    version,
    about = "Distributed locks, leases and leader election with fencing tokens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one cluster member.
    Serve(ServeArgs),
    /// Run a local cluster of `serve` child processes on loopback.
    Dev(dev::DevArgs),
    /// Show each node's Raft status.
    Status(cli::StatusArgs),
    /// Read and write the replicated key-value store.
    Kv(cli::KvArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => server::run_from_args(args),
        Command::Dev(args) => dev::run(args),
        Command::Status(args) => cli::status(args),
        Command::Kv(args) => cli::kv(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("latchkey: error: {err}");
            ExitCode::FAILURE
        }
    }
}
