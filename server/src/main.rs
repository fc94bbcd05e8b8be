//! The `latchkey` binary: parses flags and hands off to the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use latchkey_server::{cli, config::ServeArgs, dev, server};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Serve(Box<ServeArgs>),
    /// Run a local cluster of `serve` child processes on loopback.
    Dev(dev::DevArgs),
    /// Show each node's Raft status.
    Status(cli::StatusArgs),
    /// Read and write the replicated key-value store.
    Kv(cli::KvArgs),
    /// Hold a lock while a command runs (or until Ctrl-C); prints the fencing token.
    Lock(cli::LockArgs),
    /// Campaign in an election and lead while a command runs (or until Ctrl-C).
    Elect(cli::ElectArgs),
    /// Print an election's leader; `leader transfer ID` hands the cluster's leadership to node ID.
    Leader(cli::LeaderCommandArgs),
    /// Print an election's leader and every change, one line each.
    Observe(cli::LeaderArgs),
    /// End a leadership by its token.
    Resign(cli::ResignArgs),
    /// Grant, renew, revoke, inspect and list leases by id.
    Lease(cli::LeaseArgs),
    /// Acquire a lock with an existing lease; prints the fencing token.
    Acquire(cli::AcquireArgs),
    /// Release a lock by its token.
    Release(cli::ReleaseArgs),
    /// List, add, promote and remove cluster members.
    Member(cli::MemberArgs),
    /// Save a backup of a running cluster, restore a new cluster from one, or check one.
    Snapshot(cli::SnapshotArgs),
    /// Turn authentication on or off, see its state, or log in for a token.
    Auth(cli::AuthArgs),
    /// Add, delete and list users, set passwords, grant and revoke roles.
    User(cli::UserArgs),
    /// Add, delete and list roles; grant and revoke their permissions.
    Role(cli::RoleArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => server::run_from_args(*args),
        Command::Dev(args) => dev::run(args),
        Command::Status(args) => cli::status(args),
        Command::Kv(args) => cli::kv(args),
        Command::Lock(args) => cli::lock(args),
        Command::Elect(args) => cli::elect(args),
        Command::Leader(args) => cli::leader(args),
        Command::Observe(args) => cli::observe(args),
        Command::Resign(args) => cli::resign(args),
        Command::Lease(args) => cli::lease(args),
        Command::Acquire(args) => cli::acquire(args),
        Command::Release(args) => cli::release(args),
        Command::Member(args) => cli::member(args),
        Command::Snapshot(args) => cli::snapshot(args),
        Command::Auth(args) => cli::auth(args),
        Command::User(args) => cli::user(args),
        Command::Role(args) => cli::role(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("latchkey: error: {err}");
            ExitCode::FAILURE
        }
    }
}
