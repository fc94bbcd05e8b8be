//! Membership on the node task: proposing checked conf changes, applying
//! committed ones (with the member table, in the same batch), telling the
//! transport about new and departed peers, and leader transfers. The rules
//! are `crate::membership`'s.

use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry};
use raft::StateRole;
use tokio::sync::oneshot;

use latchkey_proto::state::v1::{command_result, CommandResult, Done};

use super::{Node, ProposalReply};
use crate::error::{FatalError, RequestError};
use crate::membership::{self, Change, MemberInfo, MemberProgress, MemberTable, ProgressReport};
use crate::storage::{keys, Batch, CF_STATE};
use crate::types::NodeId;

pub(super) type MembersReply = oneshot::Sender<Result<MembershipView, RequestError>>;

/// The membership as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipView {
    pub members: MemberTable,
    /// Voters and learners, and how far each is behind.
    pub progress: ProgressReport,
    /// Learners, by id.
    pub learners: Vec<NodeId>,
}

impl Node {
    /// The stored member table, or the one `--initial-cluster` gives (a
    /// node that bootstrapped before tables were stored).
    pub(super) fn load_members(&self) -> Result<MemberTable, FatalError> {
        let engine = self.raw.store().engine();
        match engine.get(CF_STATE, keys::MEMBERS)? {
            Some(bytes) => membership::decode(&bytes).map_err(|reason| FatalError::Corruption {
                cf: CF_STATE,
                key: "members".into(),
                reason,
            }),
            None => Ok(self.config_members.clone()),
        }
    }

    /// Hands the current members to the transport.
    pub(super) fn publish_members(&mut self) {
        self.transport.set_peers(&self.members);
    }

    /// A peer's message arrived: it is alive.
    pub(super) fn heard_from(&mut self, peer: u64) {
        self.last_heard.insert(NodeId(peer), self.clock.now());
    }

    fn answered_lately(&self, id: NodeId, now: Instant) -> bool {
        id == self.id
            || self
                .last_heard
                .get(&id)
                .is_some_and(|at| now.duration_since(*at) < self.election_timeout())
    }

    fn election_timeout(&self) -> Duration {
        self.tick_interval * self.raw.raft.election_timeout() as u32
    }

    /// The leader's view of every member's progress.
    pub(super) fn progress_report(&self) -> ProgressReport {
        let now = self.clock.now();
        let conf = self.raw.store().conf_state().clone();
        let prs = self.raw.raft.prs();
        let members = conf
            .voters
            .iter()
            .map(|id| (*id, true))
            .chain(conf.learners.iter().map(|id| (*id, false)))
            .map(|(id, voter)| MemberProgress {
                id: NodeId(id),
                voter,
                matched: prs.get(id).map_or(0, |pr| pr.matched),
                active: self.answered_lately(NodeId(id), now),
            })
            .collect();
        ProgressReport {
            leader: self.id,
            last_index: self.raw.raft.raft_log.last_index(),
            members,
        }
    }

    pub(super) fn membership_view(&self, reply: MembersReply) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let conf = self.raw.store().conf_state();
        let view = MembershipView {
            members: self.members.clone(),
            progress: self.progress_report(),
            learners: conf.learners.iter().map(|id| NodeId(*id)).collect(),
        };
        let _ = reply.send(Ok(view));
    }

    /// Checks `change` and proposes it; the reply comes when it applies.
    pub(super) fn change_members(&mut self, change: Change, reply: ProposalReply) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.raw.raft.has_pending_conf() {
            if !self.lease_clock.ready() {
                // Only this leader's own start holds it back (a leader
                // that was just handed the leadership, by a removal of
                // the old one for instance): the lease clock is ready once
                // this leader's first entry has applied, which is past the
                // index raft-rs waits for. Wait instead of refusing.
                self.deferred_changes.push((change, reply));
                return;
            }
            let _ = reply.send(Err(RequestError::Conflict(
                "another membership change is still in progress; try again once it has applied"
                    .into(),
            )));
            return;
        }
        if let Err(refusal) = membership::check(&change, &self.members, &self.progress_report()) {
            let _ = reply.send(Err(RequestError::from(refusal)));
            return;
        }
        let request_id = self.take_request_id();
        match self
            .raw
            .propose_conf_change(self.proposal_context(request_id), conf_change(&change))
        {
            Ok(()) => {
                let pending = super::Pending {
                    reply,
                    resendable: false,
                };
                self.proposals.insert(request_id, pending);
            }
            Err(e) => {
                let _ = reply.send(Err(RequestError::Conflict(format!(
                    "the membership change was not proposed: {e}"
                ))));
            }
        }
    }

    /// Takes up the changes deferred by [`Node::change_members`] once this
    /// leader has applied its term's first entry (its lease clock is
    /// ready), or once it no longer leads, when `change_members` answers
    /// "not the leader" (also if it stepped down before it ever told the
    /// lease clock that it led).
    pub(super) fn resume_deferred_changes(&mut self) {
        let still_starting = self.raw.raft.state == StateRole::Leader && !self.lease_clock.ready();
        if self.deferred_changes.is_empty() || still_starting {
            return;
        }
        for (change, reply) in std::mem::take(&mut self.deferred_changes) {
            self.change_members(change, reply);
        }
    }

    /// Starts handing leadership to `to`, a caught-up voter.
    pub(super) fn transfer_leader(&mut self, to: NodeId) -> Result<(), RequestError> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(self.not_leader());
        }
        if to == self.id {
            return Ok(());
        }
        let report = self.progress_report();
        let voter = report.members.iter().any(|m| m.id == to && m.voter);
        if !voter {
            return Err(RequestError::Conflict(format!(
                "node {to} is not a voter; only voters can lead"
            )));
        }
        if !report.caught_up(to) {
            return Err(RequestError::Conflict(format!(
                "node {to} has not caught up or does not answer; leadership stays here"
            )));
        }
        self.raw.transfer_leader(to.0);
        Ok(())
    }

    /// Starts handing leadership to `to`, or to the best successor.
    pub(super) fn start_transfer(&mut self, to: Option<NodeId>) -> Result<NodeId, RequestError> {
        let target = to.or_else(|| self.best_successor()).ok_or_else(|| {
            RequestError::Conflict("no other voter has caught up to take over".into())
        })?;
        self.transfer_leader(target)?;
        Ok(target)
    }

    /// The caught-up voter (not this node) with the most of the log: where
    /// a leader that is leaving hands its leadership.
    pub(super) fn best_successor(&self) -> Option<NodeId> {
        let report = self.progress_report();
        report
            .members
            .iter()
            .filter(|m| m.voter && m.id != self.id && report.caught_up(m.id))
            .max_by_key(|m| (m.matched, std::cmp::Reverse(m.id)))
            .map(|m| m.id)
    }

    /// Applies a committed conf change: raft-rs's configuration, the member
    /// table, both stored in `batch`.
    pub(super) fn apply_conf_change(
        &mut self,
        batch: &mut Batch,
        entry: &Entry,
    ) -> Result<Option<CommandResult>, FatalError> {
        let change =
            ConfChangeV2::parse_from_bytes(&entry.data).map_err(|e| FatalError::Corruption {
                cf: crate::storage::CF_RAFT_LOG,
                key: entry.index.to_string(),
                reason: format!("committed conf change does not decode: {e}"),
            })?;
        let conf_state = self
            .raw
            .apply_conf_change(&change)
            .map_err(|e| FatalError::Raft(format!("applying a committed conf change: {e}")))?;
        self.update_members(&change, &conf_state, entry.index)?;
        self.raw.mut_store().set_conf_state(batch, &conf_state);
        batch.put(CF_STATE, keys::MEMBERS, &membership::encode(&self.members));
        self.members_changed = true;
        tracing::info!(node = %self.id, voters = ?conf_state.voters, learners = ?conf_state.learners, "membership changed");
        Ok(Some(CommandResult {
            result: Some(command_result::Result::Done(Done {})),
        }))
    }

    fn update_members(
        &mut self,
        change: &ConfChangeV2,
        conf_state: &ConfState,
        index: u64,
    ) -> Result<(), FatalError> {
        if !change.context.is_empty() {
            let (id, info) = membership::decode_record(&change.context).map_err(|reason| {
                FatalError::Corruption {
                    cf: crate::storage::CF_RAFT_LOG,
                    key: index.to_string(),
                    reason,
                }
            })?;
            self.members.insert(id, info);
        }
        let current: std::collections::BTreeSet<u64> = conf_state
            .voters
            .iter()
            .chain(&conf_state.learners)
            .chain(&conf_state.voters_outgoing)
            .copied()
            .collect();
        self.members.retain(|id, _| current.contains(&id.0));
        for id in &current {
            self.members.entry(NodeId(*id)).or_default();
        }
        Ok(())
    }

    /// After a batch with a conf change is written: peers, and whether this
    /// node is still a member.
    pub(super) fn after_members_changed(&mut self) {
        if !std::mem::take(&mut self.members_changed) {
            return;
        }
        self.publish_members();
        if !self.members.contains_key(&self.id) && !self.removed {
            self.removed = true;
            tracing::warn!(node = %self.id, "this node was removed from the cluster");
        }
    }
}

fn conf_change(change: &Change) -> ConfChangeV2 {
    let (change_type, context) = match change {
        Change::AddLearner {
            id,
            peer_addr,
            client_addr,
        } => {
            let info = MemberInfo {
                peer_addr: peer_addr.clone(),
                client_addr: client_addr.clone(),
            };
            (
                ConfChangeType::AddLearnerNode,
                membership::encode_record(*id, &info),
            )
        }
        Change::Promote { .. } => (ConfChangeType::AddNode, Vec::new()),
        Change::Remove { .. } => (ConfChangeType::RemoveNode, Vec::new()),
    };
    let mut single = ConfChangeSingle::default();
    single.set_change_type(change_type);
    single.node_id = change.id().0;
    let mut v2 = ConfChangeV2::default();
    v2.set_changes(vec![single].into());
    v2.context = context.into();
    v2
}
