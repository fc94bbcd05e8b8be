//! `latchkey elect`, `leader`, `observe` and `resign`.
//!
//! `elect` campaigns with a lease of its own and, once elected, holds the
//! leadership the way `lock` holds a lock (see [`super::hold`]). `leader`
//! and `observe` read who leads; `resign` ends a leadership by its token.

use futures::StreamExt;
use latchkey_client::{Error, FencingToken, GrantInfo};
use serde::Serialize;

use super::hold::{Held, HoldArgs};
use super::lock::print_ended;
use super::session::{connect, connect_once, failure, not_acquired, ClientArgs, StopSignals};
use super::{print_error, write_json, write_stdout, Failure};
use super::{EXIT_NOT_FOUND, EXIT_OK};

/// Flags of `latchkey elect`.
#[derive(clap::Args, Debug)]
pub struct ElectArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The election's name.
    pub name: String,
    /// The value to publish while leading (for example this process's address).
    #[arg(long)]
    pub value: String,
    #[command(flatten)]
    pub hold: HoldArgs,
}

/// Flags of `latchkey leader` and `latchkey observe`.
#[derive(clap::Args, Debug)]
pub struct LeaderArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The election's name.
    pub name: String,
}

/// Flags of `latchkey resign`.
#[derive(clap::Args, Debug)]
pub struct ResignArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The election's name.
    pub name: String,
    /// The token of the leadership to end (from `elect`).
    #[arg(long)]
    pub token: u64,
}

/// `leader --json` and each line of `observe --json`.
#[derive(Serialize, Debug)]
pub struct LeaderOutput {
    pub name: String,
    /// `null` when the election has no leader.
    pub holder: Option<HolderOutput>,
}

/// The leader of an election.
#[derive(Serialize, Debug)]
pub struct HolderOutput {
    pub lease: u64,
    pub token: u64,
    pub value: String,
    pub revision: u64,
}

impl LeaderOutput {
    fn new(name: &str, leader: Option<&GrantInfo>) -> LeaderOutput {
        LeaderOutput {
            name: name.to_string(),
            holder: leader.map(|grant| HolderOutput {
                lease: grant.lease.0,
                token: grant.token.0,
                value: String::from_utf8_lossy(&grant.value).into_owned(),
                revision: grant.revision.0,
            }),
        }
    }
}

pub(crate) async fn elect(args: ElectArgs) -> Result<u8, Failure> {
    let client = connect(&args.client).await?;
    let lease = client.grant_lease(args.hold.ttl).await.map_err(failure)?;
    let election = client.election(args.name.clone());
    let campaign = match args.hold.wait_timeout {
        Some(timeout) => {
            election
                .campaign_with_timeout(&lease, args.value.clone(), timeout)
                .await
        }
        None => election.campaign(&lease, args.value.clone()).await,
    };
    let leadership = match campaign {
        Ok(leadership) => leadership,
        Err(error) => {
            let _ = lease.revoke().await;
            return Err(match (error, args.hold.wait_timeout) {
                (Error::Timeout { .. }, Some(timeout)) => {
                    not_acquired("leadership of", &args.name, timeout)
                }
                (error, _) => failure(error),
            });
        }
    };
    let held = Held::Leadership {
        leadership,
        value: args.value,
    };
    args.hold.hold(held, args.client.json).await
}

/// Flags of `latchkey leader`: an election's leader, or (with `transfer`)
/// the cluster's own Raft leadership.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct LeaderCommandArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The election's name.
    #[arg(required = true)]
    pub name: Option<String>,
    #[command(subcommand)]
    pub action: Option<LeaderAction>,
}

/// What `latchkey leader` can do besides reading an election's leader.
#[derive(clap::Subcommand, Debug)]
pub enum LeaderAction {
    /// Hand the cluster's Raft leadership to voter ID (which must have caught up).
    Transfer { id: u64 },
}

/// `latchkey leader NAME` or `latchkey leader transfer ID`.
pub(crate) async fn leader_command(args: LeaderCommandArgs) -> Result<u8, Failure> {
    match (args.action, args.name) {
        (Some(LeaderAction::Transfer { id }), _) => super::member::transfer(&args.client, id).await,
        (None, Some(name)) => {
            leader(LeaderArgs {
                client: args.client,
                name,
            })
            .await
        }
        (None, None) => Err(Failure::usage("give an election name, or `transfer ID`")),
    }
}

pub(crate) async fn leader(args: LeaderArgs) -> Result<u8, Failure> {
    let client = connect_once(&args.client).await?;
    let leader = client
        .election(args.name.clone())
        .leader()
        .await
        .map_err(failure)?;
    if args.client.json {
        write_json(&LeaderOutput::new(&args.name, leader.as_ref()))?;
    } else if let Some(grant) = &leader {
        let mut line = grant.value.clone();
        line.push(b'\n');
        write_stdout(&line)?;
    }
    if leader.is_none() {
        if !args.client.json {
            print_error(&format!("election {:?} has no leader", args.name));
        }
        return Ok(EXIT_NOT_FOUND);
    }
    Ok(EXIT_OK)
}

pub(crate) async fn observe(args: LeaderArgs) -> Result<u8, Failure> {
    let client = connect_once(&args.client).await?;
    let mut stops = StopSignals::install(false)?;
    let changes = client.election(args.name.clone()).observe();
    futures::pin_mut!(changes);
    // Bounded by the user: it runs until a stop is requested or the stream
    // fails for good.
    loop {
        let change = tokio::select! {
            change = changes.next() => change,
            _ = stops.next() => return Ok(EXIT_OK),
        };
        let leader = match change {
            Some(Ok(leader)) => leader,
            Some(Err(error)) => return Err(failure(error)),
            None => return Ok(EXIT_OK),
        };
        if args.client.json {
            write_json(&LeaderOutput::new(&args.name, leader.as_ref()))?;
        } else {
            write_stdout(observe_line(leader.as_ref()).as_bytes())?;
        }
    }
}

/// One line of plain `observe` output: `TOKEN LEASE VALUE`, or `-` when
/// there is no leader.
fn observe_line(leader: Option<&GrantInfo>) -> String {
    match leader {
        Some(grant) => format!(
            "{} {} {}\n",
            grant.token,
            grant.lease,
            String::from_utf8_lossy(&grant.value)
        ),
        None => "-\n".to_string(),
    }
}

pub(crate) async fn resign(args: ResignArgs) -> Result<u8, Failure> {
    let client = connect_once(&args.client).await?;
    client
        .raw()
        .resign(&args.name, FencingToken(args.token))
        .await
        .map_err(failure)?;
    print_ended(&args.name, args.token, "resigned", args.client.json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use latchkey_client::{LeaseId, Revision};

    #[test]
    fn observe_lines_show_token_lease_and_value_or_a_dash() {
        let grant = GrantInfo {
            name: "e".into(),
            lease: LeaseId(5),
            token: FencingToken(17),
            value: b"node-a".to_vec(),
            revision: Revision(9),
        };
        assert_eq!(observe_line(Some(&grant)), "17 5 node-a\n");
        assert_eq!(observe_line(None), "-\n");
    }
}
