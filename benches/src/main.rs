//! `latchkey-bench`: parses flags and calls the library (see `lib.rs`).

use std::process::ExitCode;

use clap::Parser;
use latchkey_bench::cli::{Cli, Command};

/// The load generator shares the machine with the clusters it measures:
/// glibc's allocator was a tenth of its CPU under `lock-nc` (measured in
/// `docs/performance.md`), CPU that both systems' servers then lacked.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("latchkey-bench: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        latchkey_bench::processes::install_signal_handlers().map_err(|e| e.to_string())?;
        match cli.command {
            Command::Compare(args) => latchkey_bench::run_compare(args, command).await,
            Command::Floor(args) => latchkey_bench::run_floor(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("latchkey-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
