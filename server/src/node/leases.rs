//! The leader's lease work on the node task: keepalives waiting for a
//! confirmation round, starting and finishing rounds, and proposing the
//! expiry of overdue leases. The rules are `crate::lease_clock`'s; this
//! file only connects them to raft-rs and to the callers' reply channels.

use raft::StateRole;
use tokio::sync::oneshot;

use latchkey_proto::state::v1::{command, Command, ExpireLeases};

use super::Node;
use crate::coordination::{Event, FencingToken, Kind, LeaseId};
use crate::error::{FatalError, RequestError};
use crate::lease_clock::KeepAlive;
use crate::storage::Batch;

pub(super) type KeepAliveReply = oneshot::Sender<Result<KeepAliveAnswer, RequestError>>;

/// A grant held by a renewed lease, as the leader had applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldGrant {
    pub kind: Kind,
    pub name: String,
    pub token: FencingToken,
}

/// The leader's answer to one keepalive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepAliveAnswer {
    pub answer: KeepAlive,
    /// For a renewal: every grant the lease holds, so that a client learns
    /// of a release made elsewhere from its next keepalive. Empty otherwise.
    pub grants: Vec<HeldGrant>,
}

impl Node {
    pub(super) fn keep_alive(&mut self, lease: LeaseId, reply: KeepAliveReply) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let now = self.clock.now();
        if let Some((reply, answer)) = self.lease_clock.keep_alive(now, lease, reply) {
            self.answer_keep_alive(reply, lease, answer);
        }
    }

    fn answer_keep_alive(&self, reply: KeepAliveReply, lease: LeaseId, answer: KeepAlive) {
        let grants = match answer {
            KeepAlive::Renewed { .. } => self.grants_of(lease),
            _ => Vec::new(),
        };
        let _ = reply.send(Ok(KeepAliveAnswer { answer, grants }));
    }

    fn grants_of(&self, lease: LeaseId) -> Vec<HeldGrant> {
        let state = self.state_machine.coordination();
        let state = state.read();
        state
            .locks_of(lease)
            .map(|(key, grant)| HeldGrant {
                kind: key.kind,
                name: key.name.clone(),
                token: grant.token,
            })
            .collect()
    }

    /// Starts a confirmation round if the lease clock wants one: once per
    /// loop iteration at most, so that all keepalives that arrived in it
    /// share the round.
    pub(super) fn maybe_start_round(&mut self) {
        let now = self.clock.now();
        if self.raw.raft.state != StateRole::Leader || !self.lease_clock.round_wanted(now) {
            return;
        }
        let request_id = self.take_request_id();
        self.raw.read_index(self.read_context(request_id));
        self.lease_clock.start_round(request_id, now);
    }

    /// A quorum confirmed round `id`: answer the keepalives it covers and
    /// expire what is overdue.
    pub(super) fn finish_round(&mut self, id: u64) {
        let now = self.clock.now();
        let Some(confirmed) = self.lease_clock.finish_round(id, now) else {
            return;
        };
        for answered in confirmed.answers {
            self.answer_keep_alive(answered.reply, answered.lease, answered.answer);
        }
        if confirmed.expire.is_empty()
            || self.raw.raft.state != StateRole::Leader
            || self.restore_pending()
        {
            return;
        }
        self.lease_clock.expiry_proposed(&confirmed.expire, now);
        if self.unsafe_switches.local_expiry {
            if let Err(error) = self.expire_locally(&confirmed.expire) {
                self.report_fatal(error);
            }
            return;
        }
        self.propose_expiry(&confirmed.expire);
    }

    fn propose_expiry(&mut self, leases: &[LeaseId]) {
        tracing::info!(node = %self.id, ?leases, "expiring leases");
        let command = expire_command(leases);
        if let Err(e) = self.propose_own(&command) {
            tracing::debug!(node = %self.id, "expiry proposal dropped: {e}");
        }
    }

    /// Broken on purpose (test switch `local_expiry`): applies the expiry to
    /// this node's state only, at the current applied index, with no entry.
    fn expire_locally(&mut self, leases: &[LeaseId]) -> Result<(), FatalError> {
        let index = self.state_machine.applied().index;
        let mut batch = Batch::new(self.raw.store().engine());
        let output = self
            .state_machine
            .apply(&mut batch, index, expire_command(leases))?;
        self.state_machine.checkpoint(&mut batch);
        self.raw.store().engine().write(batch, false)?;
        self.state_machine.batch_written();
        for event in &output.events {
            if let Event::LeaseRemoved { lease, .. } = event {
                self.lease_clock.removed(*lease);
            }
        }
        Ok(())
    }

    /// Keepalives no round confirmed in time: this node has probably lost
    /// its leadership without knowing it yet.
    pub(super) fn refuse_unconfirmed(&mut self) {
        let now = self.clock.now();
        for reply in self.lease_clock.unconfirmed(now) {
            let _ = reply.send(Ok(KeepAliveAnswer {
                answer: KeepAlive::Unconfirmed,
                grants: Vec::new(),
            }));
        }
    }

    pub(super) fn report_fatal(&self, error: FatalError) {
        tracing::error!("{error}");
        self.fatal.lock().get_or_insert(error);
    }
}

fn expire_command(leases: &[LeaseId]) -> Command {
    Command {
        command: Some(command::Command::ExpireLeases(ExpireLeases {
            leases: leases.iter().map(|lease| lease.0).collect(),
        })),
        request: None,
    }
}
