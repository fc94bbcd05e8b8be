//! Cluster membership: who the members are, where they listen, and the
//! rules a change must pass before the leader proposes it.
//!
//! # Where membership lives
//! Which members vote is raft-rs's `ConfState`; where each member listens
//! is a [`MemberTable`], stored in the state machine next to it
//! (`storage::keys::MEMBERS`), so both travel in snapshots and change in
//! the same batch, at the index of the committed conf change that changes
//! them. A conf change carries the added member's addresses in its
//! context ([`encode_record`]). A new cluster starts from the members of
//! `--initial-cluster` (the bootstrap snapshot, `storage::raft_log`); from
//! then on the stored table, not the flag, is what a restarting node
//! believes.
//!
//! # Changes, one at a time
//! - add: a new node joins as a *learner*: it receives the log (a snapshot
//!   first) but does not vote, so it changes no quorum;
//! - promote: a learner that has caught up becomes a voter;
//! - remove: a member leaves (the leader hands its leadership on first).
//!
//! Each is a single-step `ConfChangeV2` (one voter more or less), which
//! raft-rs applies without joint consensus. A change is refused, before
//! anything is proposed, if another is still in progress, or if afterwards
//! the voters that answer the leader now would not be a quorum
//! ([`check`]): an operator must never be one command away from a cluster
//! that cannot commit. A new leader holds every change back until it has
//! applied the entries of earlier terms (raft-rs does not know until then
//! whether one of them is a change); a change that reaches it in that
//! moment, as the removal of the old leader does right after the hand-off,
//! waits for it instead of being refused.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message as _;

use latchkey_proto::state::v1::{MemberRecord, Members};

use crate::types::NodeId;

/// A learner is caught up (may be promoted, may be handed leadership) when
/// it is at most this many entries behind the leader's last entry.
pub const MAX_CATCH_UP_LAG: u64 = 100;

/// Where one member listens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberInfo {
    pub peer_addr: String,
    /// Empty until known (members of `--initial-cluster` tell theirs when
    /// they first connect).
    pub client_addr: String,
}

/// Every member by id, voters and learners alike.
pub type MemberTable = BTreeMap<NodeId, MemberInfo>;

/// A change an operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    AddLearner {
        id: NodeId,
        peer_addr: String,
        client_addr: String,
    },
    Promote {
        id: NodeId,
    },
    Remove {
        id: NodeId,
    },
}

impl Change {
    pub fn id(&self) -> NodeId {
        match self {
            Change::AddLearner { id, .. } | Change::Promote { id } | Change::Remove { id } => *id,
        }
    }
}

/// What the leader knows of one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberProgress {
    pub id: NodeId,
    pub voter: bool,
    /// The highest log index the leader knows the member has.
    pub matched: u64,
    /// Whether it answered the leader within the last election timeout
    /// (the leader itself always counts).
    pub active: bool,
}

/// The leader's view of the whole membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressReport {
    pub leader: NodeId,
    pub last_index: u64,
    pub members: Vec<MemberProgress>,
}

impl ProgressReport {
    fn get(&self, id: NodeId) -> Option<&MemberProgress> {
        self.members.iter().find(|member| member.id == id)
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        self.members
            .iter()
            .filter(|member| member.voter)
            .map(|member| member.id)
            .collect()
    }

    /// How many entries `id` is behind the leader's last entry.
    pub fn lag(&self, id: NodeId) -> Option<u64> {
        self.get(id)
            .map(|member| self.last_index.saturating_sub(member.matched))
    }

    /// Whether `id` answers and is within [`MAX_CATCH_UP_LAG`] entries.
    pub fn caught_up(&self, id: NodeId) -> bool {
        self.get(id).is_some_and(|member| {
            member.active && self.last_index.saturating_sub(member.matched) <= MAX_CATCH_UP_LAG
        })
    }

    /// How many of `voters` answer now.
    fn answering(&self, voters: &BTreeSet<NodeId>) -> usize {
        voters
            .iter()
            .filter(|id| self.get(**id).is_some_and(|member| member.active))
            .count()
    }
}

/// Why a change is refused; the message says why and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NoQuorum(String),
}

/// Checks `change` against the membership and the leader's view of it.
pub fn check(
    change: &Change,
    members: &MemberTable,
    progress: &ProgressReport,
) -> Result<(), Refusal> {
    let id = change.id();
    if id.0 == 0 {
        return Err(Refusal::Invalid {
            field: "id",
            reason: "node ids start at 1".into(),
        });
    }
    let voters = progress.voters();
    match change {
        Change::AddLearner { peer_addr, .. } => check_add(id, peer_addr, members),
        Change::Promote { .. } => {
            if !members.contains_key(&id) {
                return Err(Refusal::Conflict(format!("node {id} is not a member")));
            }
            if voters.contains(&id) {
                return Err(Refusal::Conflict(format!("node {id} is already a voter")));
            }
            if !progress.caught_up(id) {
                let lag = progress.lag(id).unwrap_or(progress.last_index);
                return Err(Refusal::Conflict(format!(
                    "learner {id} has not caught up: it is {lag} entries behind the leader (at most {MAX_CATCH_UP_LAG}), or has not answered lately; wait and try again"
                )));
            }
            let mut after = voters.clone();
            after.insert(id);
            check_quorum(&after, progress, &format!("promoting {id}"))
        }
        Change::Remove { .. } => {
            if !members.contains_key(&id) {
                return Err(Refusal::Conflict(format!("node {id} is not a member")));
            }
            if !voters.contains(&id) {
                return Ok(());
            }
            let mut after = voters.clone();
            after.remove(&id);
            if after.is_empty() {
                return Err(Refusal::Conflict(format!(
                    "node {id} is the last voter; a cluster needs at least one"
                )));
            }
            check_quorum(&after, progress, &format!("removing {id}"))
        }
    }
}

fn check_add(id: NodeId, peer_addr: &str, members: &MemberTable) -> Result<(), Refusal> {
    if let Some(existing) = members.get(&id) {
        return Err(Refusal::Conflict(format!(
            "member id {id} is already in use (peer address {})",
            existing.peer_addr
        )));
    }
    check_address("peer_addr", peer_addr)?;
    if let Some((other, _)) = members.iter().find(|(_, m)| m.peer_addr == peer_addr) {
        return Err(Refusal::Conflict(format!(
            "peer address {peer_addr} is already member {other}'s"
        )));
    }
    Ok(())
}

/// `HOST:PORT` with a numeric port.
pub fn check_address(field: &'static str, addr: &str) -> Result<(), Refusal> {
    let valid = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if valid {
        Ok(())
    } else {
        Err(Refusal::Invalid {
            field,
            reason: format!("{addr:?} is not HOST:PORT"),
        })
    }
}

/// The voters after a change must include a quorum that answers now.
fn check_quorum(
    after: &BTreeSet<NodeId>,
    progress: &ProgressReport,
    what: &str,
) -> Result<(), Refusal> {
    let quorum = after.len() / 2 + 1;
    let answering = progress.answering(after);
    if answering >= quorum {
        return Ok(());
    }
    Err(Refusal::NoQuorum(format!(
        "{what} would leave {} voters, of which {answering} answer now; a quorum needs {quorum}. Bring members back (or add and promote new ones) first",
        after.len()
    )))
}

/// The table of `--initial-cluster`. Client addresses are left empty, even
/// this node's: the table is replicated state and must be the same bytes on
/// every member (each node learns the others' client addresses when they
/// connect).
pub fn from_peers(peers: &BTreeMap<NodeId, String>) -> MemberTable {
    peers
        .iter()
        .map(|(id, peer_addr)| {
            let info = MemberInfo {
                peer_addr: peer_addr.clone(),
                client_addr: String::new(),
            };
            (*id, info)
        })
        .collect()
}

/// The stored form of a table.
pub fn encode(table: &MemberTable) -> Vec<u8> {
    Members {
        members: table.iter().map(|(id, info)| record(*id, info)).collect(),
    }
    .encode_to_vec()
}

/// Reads a stored table; the error says what is wrong.
pub fn decode(bytes: &[u8]) -> Result<MemberTable, String> {
    let members = Members::decode(bytes).map_err(|e| format!("members do not decode: {e}"))?;
    let mut table = MemberTable::new();
    for member in members.members {
        let (id, info) = from_record(member);
        if table.insert(id, info).is_some() {
            return Err(format!("member {id} appears twice"));
        }
    }
    Ok(table)
}

/// The context of a conf change that adds `id`.
pub fn encode_record(id: NodeId, info: &MemberInfo) -> Vec<u8> {
    record(id, info).encode_to_vec()
}

/// Reads a conf change's context.
pub fn decode_record(bytes: &[u8]) -> Result<(NodeId, MemberInfo), String> {
    MemberRecord::decode(bytes)
        .map(from_record)
        .map_err(|e| format!("member record does not decode: {e}"))
}

fn record(id: NodeId, info: &MemberInfo) -> MemberRecord {
    MemberRecord {
        id: id.0,
        peer_addr: info.peer_addr.clone(),
        client_addr: info.client_addr.clone(),
    }
}

fn from_record(record: MemberRecord) -> (NodeId, MemberInfo) {
    let info = MemberInfo {
        peer_addr: record.peer_addr,
        client_addr: record.client_addr,
    };
    (NodeId(record.id), info)
}

#[cfg(test)]
mod tests;
