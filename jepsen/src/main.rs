//! `latchkey-jepsen`: run fault-injection tests and check saved histories.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use latchkey_jepsen::{check, harness};

#[derive(Parser)]
#[command(
    name = "latchkey-jepsen",
    version,
    about = "Fault-injection tests and history checkers for latchkey"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a cluster under faults, record a history, check it, write a report.
    Test(harness::cli::TestArgs),
    /// Check a saved history.
    Check(check::cli::CheckArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Test(args) => harness::cli::run(args),
        Command::Check(args) => check::cli::run(args),
    }
}
