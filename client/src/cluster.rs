//! Cluster membership and leadership, for operators and tools: list the
//! members with how far each is behind, add a node as a learner, promote
//! it, remove a member, hand leadership on.
//!
//! Each change is made by the leader, one at a time, through a committed
//! Raft entry; the cluster refuses (with [`crate::Error::Rejected`] and a
//! message that says why) a change while another is in progress, an id or
//! address in use, an address it cannot reach, a learner that has not
//! caught up, or any change that would leave fewer voters answering than
//! a quorum.

use latchkey_proto::v1::cluster_client::ClusterClient;
use latchkey_proto::v1::{
    LeaderTransferRequest, Member, MemberAddRequest, MemberListRequest, MemberPromoteRequest,
    MemberRemoveRequest,
};

use crate::client::{CallSpec, Client};
use crate::error::Error;

/// One member as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: u64,
    pub peer_addr: String,
    /// Empty when the leader has not learnt it yet.
    pub client_addr: String,
    /// A learner receives the log but does not vote.
    pub learner: bool,
    pub leader: bool,
    /// The last log index the leader knows the member has.
    pub matched_index: u64,
    /// Entries behind the leader's last one.
    pub lag: u64,
    /// Whether it answered the leader within the last election timeout.
    pub active: bool,
}

/// One member's addresses and role, as a change left them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    pub peer_addr: String,
    pub client_addr: String,
    pub learner: bool,
}

impl From<Member> for MemberInfo {
    fn from(member: Member) -> Self {
        MemberInfo {
            id: member.id,
            peer_addr: member.peer_addr,
            client_addr: member.client_addr,
            learner: member.learner,
        }
    }
}

impl Client {
    /// Every member, from the leader.
    pub async fn members(&self) -> Result<Vec<MemberStatus>, Error> {
        let inner = &self.inner;
        let answer = inner
            .call(CallSpec::write(&inner.options), |channel| async move {
                ClusterClient::new(channel)
                    .member_list(MemberListRequest {})
                    .await
            })
            .await?;
        Ok(answer
            .members
            .into_iter()
            .map(|state| {
                let member = state.member.unwrap_or_default();
                MemberStatus {
                    id: member.id,
                    peer_addr: member.peer_addr,
                    client_addr: member.client_addr,
                    learner: member.learner,
                    leader: state.leader,
                    matched_index: state.matched_index,
                    lag: state.lag,
                    active: state.active,
                }
            })
            .collect())
    }

    /// Adds node `id` as a learner. The node must already be running (the
    /// leader checks that `peer_addr` answers).
    pub async fn add_member(
        &self,
        id: u64,
        peer_addr: &str,
        client_addr: &str,
    ) -> Result<Vec<MemberInfo>, Error> {
        let request = MemberAddRequest {
            id,
            peer_addr: peer_addr.to_string(),
            client_addr: client_addr.to_string(),
        };
        let inner = &self.inner;
        let answer = inner
            .call(CallSpec::write(&inner.options), |channel| {
                let request = request.clone();
                async move { ClusterClient::new(channel).member_add(request).await }
            })
            .await?;
        Ok(answer.members.into_iter().map(MemberInfo::from).collect())
    }

    /// Makes learner `id`, once caught up, a voter.
    pub async fn promote_member(&self, id: u64) -> Result<Vec<MemberInfo>, Error> {
        let inner = &self.inner;
        let answer = inner
            .call(CallSpec::write(&inner.options), |channel| async move {
                ClusterClient::new(channel)
                    .member_promote(MemberPromoteRequest { id })
                    .await
            })
            .await?;
        Ok(answer.members.into_iter().map(MemberInfo::from).collect())
    }

    /// Removes member `id` (a leader that is removed hands on its
    /// leadership first).
    pub async fn remove_member(&self, id: u64) -> Result<Vec<MemberInfo>, Error> {
        let inner = &self.inner;
        let answer = inner
            .call(CallSpec::write(&inner.options), |channel| async move {
                ClusterClient::new(channel)
                    .member_remove(MemberRemoveRequest { id })
                    .await
            })
            .await?;
        Ok(answer.members.into_iter().map(MemberInfo::from).collect())
    }

    /// Hands leadership to voter `to`; returns once it leads.
    pub async fn transfer_leadership(&self, to: u64) -> Result<(), Error> {
        let inner = &self.inner;
        inner
            .call(CallSpec::write(&inner.options), |channel| async move {
                ClusterClient::new(channel)
                    .leader_transfer(LeaderTransferRequest { to })
                    .await
            })
            .await
            .map(|_| ())
    }
}
