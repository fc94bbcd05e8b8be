//! `latchkey member list|add|promote|remove` and `latchkey leader transfer`:
//! the cluster's membership, through `latchkey-client`.
//!
//! Every change is made by the leader, one at a time, and refused with a
//! message that says why when it cannot be made safely (exit code 4): an
//! id or address in use, an address that does not answer, a learner that
//! has not caught up, another change in progress, or a cluster that would
//! be left without a quorum of voters that answer now.

use latchkey_client::cluster::{MemberInfo, MemberStatus};
use serde::Serialize;

use super::session::{connect_once, failure, ClientArgs};
use super::{write_json, write_stdout, Failure, EXIT_OK};

/// Flags of `latchkey member`.
#[derive(clap::Args, Debug)]
pub struct MemberArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: MemberCommand,
}

/// The `member` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum MemberCommand {
    /// Every member: id, addresses, voter or learner, how far behind the leader.
    List,
    /// Add a running node as a learner (it gets the log but does not vote).
    Add {
        id: u64,
        /// Where the other members reach the node (its --advertise-peer).
        #[arg(long)]
        peer_addr: String,
        /// Where clients reach the node (its --advertise-client).
        #[arg(long)]
        client_addr: String,
    },
    /// Make a caught-up learner a voter.
    Promote { id: u64 },
    /// Remove a member (a leader hands its leadership on first).
    Remove { id: u64 },
}

/// One row of `member list --json`.
#[derive(Serialize, Debug)]
pub struct MemberOutput {
    pub id: u64,
    pub peer_addr: String,
    pub client_addr: String,
    pub role: &'static str,
    pub leader: bool,
    pub matched_index: u64,
    pub lag: u64,
    pub active: bool,
}

impl From<&MemberStatus> for MemberOutput {
    fn from(member: &MemberStatus) -> Self {
        MemberOutput {
            id: member.id,
            peer_addr: member.peer_addr.clone(),
            client_addr: member.client_addr.clone(),
            role: if member.learner { "learner" } else { "voter" },
            leader: member.leader,
            matched_index: member.matched_index,
            lag: member.lag,
            active: member.active,
        }
    }
}

/// `member add|promote|remove --json`: the members once the change applied.
#[derive(Serialize, Debug)]
pub struct ChangedOutput {
    pub members: Vec<ChangedMember>,
}

/// One member of [`ChangedOutput`].
#[derive(Serialize, Debug)]
pub struct ChangedMember {
    pub id: u64,
    pub peer_addr: String,
    pub client_addr: String,
    pub role: &'static str,
}

pub(crate) async fn run(args: MemberArgs) -> Result<u8, Failure> {
    let client = connect_once(&args.client).await?;
    let json = args.client.json;
    let (changed, verb) = match args.command {
        MemberCommand::List => {
            let members = client.members().await.map_err(failure)?;
            print_list(&members, json)?;
            return Ok(EXIT_OK);
        }
        MemberCommand::Add {
            id,
            peer_addr,
            client_addr,
        } => (
            client.add_member(id, &peer_addr, &client_addr).await,
            format!("added {id} as a learner"),
        ),
        MemberCommand::Promote { id } => (
            client.promote_member(id).await,
            format!("promoted {id} to voter"),
        ),
        MemberCommand::Remove { id } => (client.remove_member(id).await, format!("removed {id}")),
    };
    let members = changed.map_err(failure)?;
    print_changed(&members, &verb, json)?;
    Ok(EXIT_OK)
}

fn role(learner: bool) -> &'static str {
    if learner {
        "learner"
    } else {
        "voter"
    }
}

fn print_list(members: &[MemberStatus], json: bool) -> Result<(), Failure> {
    if json {
        let rows: Vec<MemberOutput> = members.iter().map(MemberOutput::from).collect();
        return write_json(&rows);
    }
    let mut out = String::from("ID\tPEER\tCLIENT\tROLE\tLAG\tACTIVE\n");
    for member in members {
        let leader = if member.leader { " (leader)" } else { "" };
        out.push_str(&format!(
            "{}\t{}\t{}\t{}{leader}\t{}\t{}\n",
            member.id,
            member.peer_addr,
            if member.client_addr.is_empty() {
                "-"
            } else {
                &member.client_addr
            },
            role(member.learner),
            member.lag,
            if member.active { "yes" } else { "no" },
        ));
    }
    write_stdout(out.as_bytes())
}

fn print_changed(members: &[MemberInfo], verb: &str, json: bool) -> Result<(), Failure> {
    if json {
        return write_json(&ChangedOutput {
            members: members
                .iter()
                .map(|member| ChangedMember {
                    id: member.id,
                    peer_addr: member.peer_addr.clone(),
                    client_addr: member.client_addr.clone(),
                    role: role(member.learner),
                })
                .collect(),
        });
    }
    let listed: Vec<String> = members
        .iter()
        .map(|member| format!("{} ({})", member.id, role(member.learner)))
        .collect();
    write_stdout(format!("OK {verb}; members: {}\n", listed.join(", ")).as_bytes())
}

/// `latchkey leader transfer ID`.
pub(crate) async fn transfer(client: &ClientArgs, to: u64) -> Result<u8, Failure> {
    let connected = connect_once(client).await?;
    connected.transfer_leadership(to).await.map_err(failure)?;
    if client.json {
        write_json(&serde_json::json!({ "leader": to }))?;
    } else {
        write_stdout(format!("OK node {to} leads\n").as_bytes())?;
    }
    Ok(EXIT_OK)
}
