//! The Cluster service: each node's status, the membership, changes to it,
//! and leader transfers.
//!
//! Changes are made by the leader (a follower answers `UNAVAILABLE` with
//! the leader's address, and the client retries there). Before proposing,
//! the leader checks the change (`crate::membership::check`); an add also
//! checks that the new node's peer address answers, so that a typo is
//! refused rather than added. Removing the leader itself first hands its
//! leadership to the best caught-up voter and then answers "not the
//! leader", so that the client sends the removal to the new leader.

use std::time::Duration;

use tonic::{Request, Response, Status};

use latchkey_proto::v1::cluster_server::Cluster;
use latchkey_proto::v1::{
    LeaderTransferRequest, LeaderTransferResponse, Member, MemberAddRequest, MemberAddResponse,
    MemberListRequest, MemberListResponse, MemberPromoteRequest, MemberPromoteResponse,
    MemberRemoveRequest, MemberRemoveResponse, MemberState, Role as ProtoRole, StatusRequest,
    StatusResponse,
};

use super::{header_at, Api};
use crate::error::RequestError;
use crate::membership::{self, Change};
use crate::node::{MembershipView, Role};
use crate::types::NodeId;

/// How long the leader tries to reach a new member's peer address.
const REACH_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a transferred leadership to show up, in election timeouts.
const TRANSFER_WAIT_ELECTION_TIMEOUTS: u32 = 3;

fn proto_role(role: Role) -> ProtoRole {
    match role {
        Role::Follower => ProtoRole::Follower,
        Role::Candidate => ProtoRole::Candidate,
        Role::PreCandidate => ProtoRole::PreCandidate,
        Role::Leader => ProtoRole::Leader,
    }
}

/// The members of `view`, with roles.
fn members_of(view: &MembershipView) -> Vec<Member> {
    view.members
        .iter()
        .map(|(id, info)| Member {
            id: id.0,
            client_addr: info.client_addr.clone(),
            peer_addr: info.peer_addr.clone(),
            learner: view.learners.contains(id),
        })
        .collect()
}

impl Api {
    async fn view(&self) -> Result<MembershipView, Status> {
        self.node.members().await.map_err(|e| self.status(e))
    }

    /// Refuses at once unless this node leads.
    fn require_leader(&self) -> Result<(), Status> {
        let status = self.node.status();
        if status.role == Role::Leader {
            return Ok(());
        }
        Err(self.status(RequestError::NotLeader {
            leader_id: Some(status.leader_id).filter(|id| *id != 0),
            leader_client_addr: None,
        }))
    }

    async fn change(&self, change: Change) -> Result<(Vec<Member>, crate::node::Applied), Status> {
        let applied = self
            .node
            .change_members(change)
            .await
            .map_err(|e| self.status(e))?;
        let view = self.view().await?;
        Ok((members_of(&view), applied))
    }

    /// Waits until a leader other than this node is known, or `to` leads.
    async fn wait_for_leader(&self, to: Option<NodeId>) -> Result<(), Status> {
        let timeout = self.settings.election_timeout() * TRANSFER_WAIT_ELECTION_TIMEOUTS;
        let mut status = self.node.watch_standing();
        let me = self.id.0;
        let moved = tokio::time::timeout(
            timeout,
            status.wait_for(|s| match to {
                Some(to) => s.leader_id == to.0,
                None => s.leader_id != 0 && s.leader_id != me,
            }),
        )
        .await;
        match moved {
            Ok(Ok(_)) => Ok(()),
            _ => Err(self.status(RequestError::Timeout(format!(
                "leadership did not move within {timeout:?}; it may yet"
            )))),
        }
    }
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let status = self.node.status();
        let members = self.directory.all();
        let me = members.get(&self.id).cloned().unwrap_or_default();
        let leader_client_addr = members
            .get(&NodeId(status.leader_id))
            .map(|info| info.client_addr.clone())
            .unwrap_or_default();
        Ok(Response::new(StatusResponse {
            id: self.id.0,
            role: proto_role(status.role).into(),
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            leader_id: status.leader_id,
            client_addr: me.client_addr,
            peer_addr: me.peer_addr,
            first_index: status.first_index,
            last_index: status.last_index,
            members: members
                .into_iter()
                .map(|(id, info)| Member {
                    id: id.0,
                    client_addr: info.client_addr,
                    peer_addr: info.peer_addr,
                    learner: false,
                })
                .collect(),
            leader_client_addr,
        }))
    }

    async fn member_list(
        &self,
        _request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let view = self.view().await?;
        let leader = view.progress.leader;
        let members = members_of(&view)
            .into_iter()
            .map(|member| {
                let id = NodeId(member.id);
                let progress = view.progress.members.iter().find(|p| p.id == id);
                MemberState {
                    leader: id == leader,
                    matched_index: progress.map_or(0, |p| p.matched),
                    lag: view.progress.lag(id).unwrap_or(0),
                    active: progress.is_some_and(|p| p.active),
                    member: Some(member),
                }
            })
            .collect();
        Ok(Response::new(MemberListResponse {
            header: Some(self.header()),
            members,
        }))
    }

    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.identify(&request)?.require_admin()?;
        let MemberAddRequest {
            id,
            peer_addr,
            client_addr,
        } = request.into_inner();
        for (field, addr) in [("peer_addr", &peer_addr), ("client_addr", &client_addr)] {
            membership::check_address(field, addr).map_err(|e| self.status(e.into()))?;
        }
        self.require_leader()?;
        reach(&peer_addr).await.map_err(|reason| {
            self.status(RequestError::Conflict(format!(
                "cannot reach peer address {peer_addr}: {reason}; start the new node first (`latchkey serve --join …`) and check the address"
            )))
        })?;
        let change = Change::AddLearner {
            id: NodeId(id),
            peer_addr,
            client_addr,
        };
        let (members, applied) = self.change(change).await?;
        Ok(Response::new(MemberAddResponse {
            header: Some(header_at(self, &applied)),
            members,
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.identify(&request)?.require_admin()?;
        let id = NodeId(request.into_inner().id);
        let (members, applied) = self.change(Change::Promote { id }).await?;
        Ok(Response::new(MemberPromoteResponse {
            header: Some(header_at(self, &applied)),
            members,
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.identify(&request)?.require_admin()?;
        let id = NodeId(request.into_inner().id);
        if id == self.id && self.node.status().role == Role::Leader {
            // Hand leadership on, then send the client to the new leader.
            self.node
                .transfer_leader(None)
                .await
                .map_err(|e| self.status(e))?;
            self.wait_for_leader(None).await?;
            let leader = self.node.status().leader_id;
            return Err(self.status(RequestError::NotLeader {
                leader_id: Some(leader).filter(|id| *id != 0),
                leader_client_addr: None,
            }));
        }
        let (members, applied) = self.change(Change::Remove { id }).await?;
        Ok(Response::new(MemberRemoveResponse {
            header: Some(header_at(self, &applied)),
            members,
        }))
    }

    async fn leader_transfer(
        &self,
        request: Request<LeaderTransferRequest>,
    ) -> Result<Response<LeaderTransferResponse>, Status> {
        self.identify(&request)?.require_admin()?;
        let to = NodeId(request.into_inner().to);
        self.node
            .transfer_leader(Some(to))
            .await
            .map_err(|e| self.status(e))?;
        self.wait_for_leader(Some(to)).await?;
        Ok(Response::new(LeaderTransferResponse {
            header: Some(self.header()),
        }))
    }
}

/// Whether a TCP connection to `addr` opens within [`REACH_TIMEOUT`].
async fn reach(addr: &str) -> Result<(), String> {
    match tokio::time::timeout(REACH_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {REACH_TIMEOUT:?}")),
    }
}
