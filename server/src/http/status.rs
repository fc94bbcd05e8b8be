//! The `/api/status` document: everything the status page shows, built on
//! the node that serves it.
//!
//! - **Members**: every member this node knows, each asked for its own
//!   `Cluster.Status` at once (this node answers from its own status), each
//!   within [`MEMBER_TIMEOUT`], so one stopped member costs the page that
//!   long and no more. A member's lag is the leader's commit index minus
//!   the member's applied index, both as reported in this round.
//! - **Locks, elections, leases**: this node's applied state, read without
//!   a ReadIndex round (the page says at which index). At most
//!   [`MAX_LISTED`] of each are listed; the totals are always given.
//! - **Time left on leases**: only the leader's lease clock knows it. A
//!   leader answers from its own; a follower asks the leader's `Lease.List`
//!   once. When no leader answers, the time left is absent (`null`).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use latchkey_proto::v1::lease_client::LeaseClient;
use latchkey_proto::v1::{LeaseListRequest, Role as ProtoRole, StatusResponse};

use crate::coordination::{Coordination, Kind, LeaseId};
use crate::metrics::Census;
use crate::node::{NodeStatus, Role};
use crate::types::NodeId;

use super::{readiness, HttpState};

/// How long the page waits for each member and for the leader's lease times.
pub const MEMBER_TIMEOUT: Duration = Duration::from_millis(500);
/// Most locks, elections and leases listed each.
pub const MAX_LISTED: usize = 1000;

/// The whole document.
#[derive(Serialize, Debug)]
pub struct StatusDocument {
    /// Unix time of this answer, in milliseconds (for the page's clock).
    pub generated_at_ms: u64,
    pub node: NodeView,
    pub members: Vec<MemberView>,
    /// The leader as this node knows it; 0: none.
    pub leader_id: u64,
    /// Which node's lease clock the leases' time left comes from; 0: none.
    pub lease_times_from: u64,
    pub totals: Census,
    pub locks: Vec<LockView>,
    pub elections: Vec<ElectionView>,
    pub leases: Vec<LeaseView>,
}

#[derive(Serialize, Debug)]
pub struct NodeView {
    pub id: u64,
    pub role: &'static str,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub ready: bool,
    /// Why not, when not ready.
    pub not_ready: Option<&'static str>,
}

#[derive(Serialize, Debug, Default)]
pub struct MemberView {
    pub id: u64,
    pub client_addr: String,
    pub peer_addr: String,
    /// Whether it answered this round; the fields below are set only then.
    pub reachable: bool,
    pub error: Option<String>,
    pub role: Option<&'static str>,
    pub term: Option<u64>,
    pub leader_id: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// Entries behind the leader's commit index.
    pub lag: Option<u64>,
}

#[derive(Serialize, Debug)]
pub struct LockView {
    pub name: String,
    pub holder_lease: u64,
    pub token: u64,
    pub granted_index: u64,
    /// First in line first.
    pub waiters: Vec<WaiterView>,
}

#[derive(Serialize, Debug)]
pub struct WaiterView {
    pub lease: u64,
    pub enqueued_index: u64,
    /// An election candidate's value (lossy UTF-8); empty for a lock.
    pub value: String,
}

#[derive(Serialize, Debug)]
pub struct ElectionView {
    pub name: String,
    pub leader_lease: u64,
    /// The leader's published value, as lossy UTF-8.
    pub value: String,
    pub token: u64,
    pub candidates: Vec<WaiterView>,
}

#[derive(Serialize, Debug)]
pub struct LeaseView {
    pub id: u64,
    pub ttl_ms: u64,
    /// `None` when no leader said.
    pub remaining_ms: Option<u64>,
    /// Names of the locks and elections it holds (`lock a`, `election b`).
    pub holds: Vec<String>,
    pub waits_for: Vec<String>,
}

/// Builds the document; never fails (what cannot be learnt is absent).
pub async fn collect(state: &HttpState) -> StatusDocument {
    let status = state.node.status();
    let ready = readiness(&status.standing(), *state.stopping.borrow());
    let (locks, elections, leases, totals) = {
        let coordination = state.node.coordination();
        let coordination = coordination.read();
        let (locks, elections) = lock_views(&coordination);
        (
            locks,
            elections,
            lease_views(&coordination),
            Census::of(&coordination),
        )
    };
    let members = member_views(state, &status).await;
    let (lease_times_from, remaining) = lease_times(state, &status, &leases).await;
    let leases = leases
        .into_iter()
        .map(|mut lease| {
            lease.remaining_ms = remaining.get(&lease.id).copied();
            lease
        })
        .collect();
    StatusDocument {
        generated_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        node: NodeView {
            id: state.id.0,
            role: role_name(status.role),
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            ready: ready.is_ok(),
            not_ready: ready.err(),
        },
        members,
        leader_id: status.leader_id,
        lease_times_from,
        totals,
        locks,
        elections,
        leases,
    }
}

fn lock_views(state: &Coordination) -> (Vec<LockView>, Vec<ElectionView>) {
    let mut locks = Vec::new();
    let mut elections = Vec::new();
    for (key, lock) in state.locks() {
        let waiters = lock
            .waiters
            .iter()
            .map(|w| WaiterView {
                lease: w.lease.0,
                enqueued_index: w.enqueued_index.0,
                value: String::from_utf8_lossy(&w.value).into_owned(),
            })
            .collect();
        match key.kind {
            Kind::Lock if locks.len() < MAX_LISTED => locks.push(LockView {
                name: key.name.clone(),
                holder_lease: lock.holder.lease.0,
                token: lock.holder.token.0,
                granted_index: lock.holder.granted_index.0,
                waiters,
            }),
            Kind::Election if elections.len() < MAX_LISTED => elections.push(ElectionView {
                name: key.name.clone(),
                leader_lease: lock.holder.lease.0,
                value: String::from_utf8_lossy(&lock.holder.value).into_owned(),
                token: lock.holder.token.0,
                candidates: waiters,
            }),
            _ => {}
        }
    }
    (locks, elections)
}

fn lease_views(state: &Coordination) -> Vec<LeaseView> {
    state
        .leases()
        .take(MAX_LISTED)
        .map(|lease| LeaseView {
            id: lease.id.0,
            ttl_ms: lease.ttl_ms,
            remaining_ms: None,
            holds: lease.held.iter().map(|key| key.to_string()).collect(),
            waits_for: lease.waiting.iter().map(|key| key.to_string()).collect(),
        })
        .collect()
}

/// Every known member's own status, asked at once.
async fn member_views(state: &HttpState, status: &NodeStatus) -> Vec<MemberView> {
    let directory = state.directory.all();
    let asks = directory.iter().map(|(id, info)| async move {
        let answer = if *id == state.id {
            Ok(None)
        } else if info.client_addr.is_empty() {
            Err("its client address is not known yet".to_string())
        } else {
            crate::cli::connect::fetch_status_tls(
                &info.client_addr,
                MEMBER_TIMEOUT,
                state.member_tls.as_ref(),
            )
            .await
            .map(Some)
        };
        (*id, info.clone(), answer)
    });
    let answers = futures::future::join_all(asks).await;
    let mut members: Vec<MemberView> = answers
        .into_iter()
        .map(|(id, info, answer)| {
            let mut view = MemberView {
                id: id.0,
                client_addr: info.client_addr,
                peer_addr: info.peer_addr,
                ..MemberView::default()
            };
            match answer {
                Ok(None) => fill_own(&mut view, status),
                Ok(Some(remote)) => fill_remote(&mut view, &remote),
                Err(error) => view.error = Some(error),
            }
            view
        })
        .collect();
    let leader_commit = members
        .iter()
        .find(|m| m.role == Some("leader"))
        .and_then(|m| m.commit_index);
    if let Some(commit) = leader_commit {
        for member in &mut members {
            member.lag = member.applied_index.map(|a| commit.saturating_sub(a));
        }
    }
    members
}

fn fill_own(view: &mut MemberView, status: &NodeStatus) {
    view.reachable = true;
    view.role = Some(role_name(status.role));
    view.term = Some(status.term);
    view.leader_id = Some(status.leader_id);
    view.commit_index = Some(status.commit_index);
    view.applied_index = Some(status.applied_index);
}

fn fill_remote(view: &mut MemberView, remote: &StatusResponse) {
    view.reachable = true;
    view.role = Some(match remote.role() {
        ProtoRole::Leader => "leader",
        ProtoRole::Candidate => "candidate",
        ProtoRole::PreCandidate => "pre-candidate",
        ProtoRole::Follower | ProtoRole::Unspecified => "follower",
    });
    view.term = Some(remote.term);
    view.leader_id = Some(remote.leader_id);
    view.commit_index = Some(remote.commit_index);
    view.applied_index = Some(remote.applied_index);
}

/// Time left on each listed lease, and which node said so (0: nobody).
async fn lease_times(
    state: &HttpState,
    status: &NodeStatus,
    leases: &[LeaseView],
) -> (u64, BTreeMap<u64, u64>) {
    if leases.is_empty() || status.leader_id == 0 {
        return (0, BTreeMap::new());
    }
    if status.role == Role::Leader {
        let ids: Vec<LeaseId> = leases.iter().map(|l| LeaseId(l.id)).collect();
        let Ok(remaining) = state.node.leases_remaining(ids.clone()).await else {
            return (0, BTreeMap::new());
        };
        let times = ids
            .iter()
            .zip(remaining)
            .filter_map(|(id, left)| left.map(|left| (id.0, left.as_millis() as u64)))
            .collect();
        return (state.id.0, times);
    }
    let Some(leader) = state.directory.get(NodeId(status.leader_id)) else {
        return (0, BTreeMap::new());
    };
    match leader_lease_times(&leader.client_addr, state.member_tls.as_ref()).await {
        Ok(times) => (status.leader_id, times),
        Err(error) => {
            tracing::debug!(
                leader = status.leader_id,
                "status page: no lease times: {error}"
            );
            (0, BTreeMap::new())
        }
    }
}

async fn leader_lease_times(
    endpoint: &str,
    tls: Option<&latchkey_client::TlsConfig>,
) -> Result<BTreeMap<u64, u64>, String> {
    let call = async {
        let channel = crate::cli::connect::connect_tls(endpoint, MEMBER_TIMEOUT, tls).await?;
        LeaseClient::new(channel)
            .list(LeaseListRequest { serializable: true })
            .await
            .map_err(|status| crate::cli::connect::describe_status(&status))
    };
    let answer = tokio::time::timeout(MEMBER_TIMEOUT, call)
        .await
        .map_err(|_| "no answer in time".to_string())??;
    Ok(answer
        .into_inner()
        .leases
        .into_iter()
        .filter_map(|lease| lease.remaining_ms.map(|left| (lease.lease, left)))
        .collect())
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::PreCandidate => "pre-candidate",
    }
}
