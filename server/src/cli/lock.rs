//! `latchkey lock`, `latchkey acquire` and `latchkey release`.
//!
//! `lock` is the everyday command: it grants its own lease, waits for the
//! lock, and holds it for as long as a command runs or until told to stop
//! (see [`super::hold`]). `acquire` and `release` are the two halves for
//! scripts that manage a lease themselves (`latchkey lease grant`).

use std::time::Duration;

use latchkey_client::{Error, FencingToken, GrantInfo, LeaseId};
use serde::Serialize;

use super::hold::{Held, HoldArgs};
use super::session::{connect, connect_once, failure, not_acquired, ClientArgs};
use super::{parse_duration, write_json, write_stdout, Failure, EXIT_OK};

/// Flags of `latchkey lock`.
#[derive(clap::Args, Debug)]
pub struct LockArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The lock's name.
    pub name: String,
    /// Fail at once (exit code 5) if another lease holds the lock.
    #[arg(long, conflicts_with = "wait_timeout")]
    pub no_wait: bool,
    #[command(flatten)]
    pub hold: HoldArgs,
}

/// Flags of `latchkey acquire`.
#[derive(clap::Args, Debug)]
pub struct AcquireArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The lock's name.
    pub name: String,
    /// The lease to hold it with (from `latchkey lease grant`).
    #[arg(long)]
    pub lease: u64,
    /// Fail at once (exit code 5) if another lease holds the lock.
    #[arg(long, conflicts_with = "wait_timeout")]
    pub no_wait: bool,
    /// Give up waiting after this long (exit code 5); waits forever if omitted.
    #[arg(long, value_parser = parse_duration)]
    pub wait_timeout: Option<Duration>,
}

/// Flags of `latchkey release`.
#[derive(clap::Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The lock's name.
    pub name: String,
    /// The token of the grant to end (from `acquire` or `lock`).
    #[arg(long)]
    pub token: u64,
}

/// `acquire --json`, and the grant part of other outputs.
#[derive(Serialize, Debug)]
pub struct AcquireOutput {
    pub name: String,
    pub token: u64,
    pub lease: u64,
    pub revision: u64,
}

/// `release --json` and `resign --json`.
#[derive(Serialize, Debug)]
pub struct EndOutput {
    pub name: String,
    pub token: u64,
    pub ended: bool,
}

pub(crate) async fn lock(args: LockArgs) -> Result<u8, Failure> {
    let client = connect(&args.client).await?;
    let lease = client.grant_lease(args.hold.ttl).await.map_err(failure)?;
    let acquired = if args.no_wait {
        lease.try_lock(&args.name).await
    } else if let Some(timeout) = args.hold.wait_timeout {
        lease.lock_with_timeout(&args.name, timeout).await
    } else {
        lease.lock(&args.name).await
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(error) => {
            // Nothing is held; do not leave the lease to expire on its own.
            let _ = lease.revoke().await;
            return Err(match (error, args.hold.wait_timeout) {
                (Error::Timeout { .. }, Some(timeout)) => not_acquired("lock", &args.name, timeout),
                (error, _) => failure(error),
            });
        }
    };
    args.hold.hold(Held::Lock(guard), args.client.json).await
}

pub(crate) async fn acquire(args: AcquireArgs) -> Result<u8, Failure> {
    let client = connect_once(&args.client).await?;
    let lease = LeaseId(args.lease);
    let grant: GrantInfo = client
        .raw()
        .acquire(&args.name, lease, !args.no_wait, args.wait_timeout)
        .await
        .map_err(|error| match (error, args.wait_timeout) {
            (Error::Timeout { .. }, Some(timeout)) => not_acquired("lock", &args.name, timeout),
            (error, _) => failure(error),
        })?;
    if args.client.json {
        write_json(&AcquireOutput {
            name: grant.name,
            token: grant.token.0,
            lease: grant.lease.0,
            revision: grant.revision.0,
        })?;
    } else {
        write_stdout(format!("{}\n", grant.token).as_bytes())?;
    }
    Ok(EXIT_OK)
}

pub(crate) async fn release(args: ReleaseArgs) -> Result<u8, Failure> {
    let client = connect_once(&args.client).await?;
    client
        .raw()
        .release(&args.name, FencingToken(args.token))
        .await
        .map_err(failure)?;
    print_ended(&args.name, args.token, "released", args.client.json)
}

/// Prints the success of `release` or `resign`.
pub(crate) fn print_ended(name: &str, token: u64, verb: &str, json: bool) -> Result<u8, Failure> {
    if json {
        write_json(&EndOutput {
            name: name.to_string(),
            token,
            ended: true,
        })?;
    } else {
        write_stdout(format!("OK {verb} {name:?} (token {token})\n").as_bytes())?;
    }
    Ok(EXIT_OK)
}
