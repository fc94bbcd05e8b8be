//! Linearizable reads on the node task: ReadIndex requests, their contexts,
//! and re-sending the ones raft-rs dropped.
//!
//! A ReadIndex request carries a context, and raft-rs's leader keys its
//! pending requests by those bytes: a second request with the same context
//! as one still pending is dropped without a word. Followers forward their
//! requests to the leader *with their own context*, so a context must be
//! unique across the cluster, not just on one node. Ours is
//! [`ReadContext`]: node id, boot id and request id. (When it was the
//! request id alone, a follower's read whose id matched one of the leader's
//! own pending rounds was dropped and timed out; the leader runs a round for
//! every batch of keepalives, so that became likely.)
//!
//! raft-rs drops requests in other cases too, silently: a follower that
//! knows no leader, a leader that has not yet committed an entry of its
//! term, a forwarded message lost in the network. So a pending read is sent
//! again, with the same context, whenever the leader changes and every
//! [`READ_RESEND_INTERVAL`], until it is answered or [`READ_INDEX_TIMEOUT`]
//! passes. That is safe: any round that starts after the read was asked for
//! returns a valid read point, and a leader that still has the first copy
//! pending ignores the second.

use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::oneshot;

use latchkey_proto::state::v1::ProposalContext;

use super::{Node, READ_INDEX_TIMEOUT};
use crate::error::RequestError;
use crate::types::LogIndex;

/// A read not answered within this time is asked for again.
pub const READ_RESEND_INTERVAL: Duration = Duration::from_millis(300);

pub(super) type ReadReply = oneshot::Sender<Result<LogIndex, RequestError>>;

/// A read waiting for its ReadIndex.
pub(super) struct PendingRead {
    reply: ReadReply,
    since: Instant,
    sent: Instant,
}

/// The context of a ReadIndex request: unique across the cluster and across
/// restarts (see the module docs). Encoded like a proposal's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ReadContext {
    pub node_id: u64,
    pub boot_id: u64,
    pub request_id: u64,
}

impl ReadContext {
    pub fn encode(&self) -> Vec<u8> {
        ProposalContext {
            node_id: self.node_id,
            boot_id: self.boot_id,
            request_id: self.request_id,
        }
        .encode_to_vec()
    }

    pub fn decode(bytes: &[u8]) -> Option<ReadContext> {
        let context = ProposalContext::decode(bytes).ok()?;
        Some(ReadContext {
            node_id: context.node_id,
            boot_id: context.boot_id,
            request_id: context.request_id,
        })
    }
}

impl Node {
    /// The context for request `request_id` of this node.
    pub(super) fn read_context(&self, request_id: u64) -> Vec<u8> {
        ReadContext {
            node_id: self.id.0,
            boot_id: self.boot_id,
            request_id,
        }
        .encode()
    }

    /// The request id of a context of this very process, if it is one.
    pub(super) fn own_request(&self, context: &[u8]) -> Option<u64> {
        ReadContext::decode(context)
            .filter(|c| c.node_id == self.id.0 && c.boot_id == self.boot_id)
            .map(|c| c.request_id)
    }

    pub(super) fn read_index(&mut self, reply: ReadReply) {
        if self.unsafe_switches.local_reads {
            // Broken on purpose (test switch): no quorum confirms anything.
            let applied = self.state_machine.applied().index;
            let _ = reply.send(Ok(LogIndex(applied)));
            return;
        }
        if self.raw.raft.leader_id == raft::INVALID_ID {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let request_id = self.take_request_id();
        self.raw.read_index(self.read_context(request_id));
        let now = self.clock.now();
        self.reads.insert(
            request_id,
            PendingRead {
                reply,
                since: now,
                sent: now,
            },
        );
    }

    /// Answers every pending read with `error`; a confirmation that comes
    /// later finds nobody waiting.
    pub(super) fn refuse_reads(&mut self, error: RequestError) {
        for (_, read) in std::mem::take(&mut self.reads) {
            let _ = read.reply.send(Err(error.clone()));
        }
    }

    /// Fails reads that waited too long; sends the others again when they
    /// have waited [`READ_RESEND_INTERVAL`] or `leader_changed`.
    pub(super) fn tend_reads(&mut self, leader_changed: bool) {
        let now = self.clock.now();
        let expired: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, read)| now.duration_since(read.since) > READ_INDEX_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(read) = self.reads.remove(&id) {
                let _ = read.reply.send(Err(RequestError::Timeout(
                    "no quorum confirmed the read in time".into(),
                )));
            }
        }
        if self.raw.raft.leader_id == raft::INVALID_ID {
            return;
        }
        let resend: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, read)| {
                leader_changed || now.duration_since(read.sent) >= READ_RESEND_INTERVAL
            })
            .map(|(id, _)| *id)
            .collect();
        for id in resend {
            self.raw.read_index(self.read_context(id));
            if let Some(read) = self.reads.get_mut(&id) {
                read.sent = now;
            }
        }
    }

    /// Hands confirmed read points to their readers, and confirmed rounds
    /// to the lease clock.
    pub(super) fn answer_reads(&mut self, read_states: Vec<raft::ReadState>) {
        for state in read_states {
            let Some(id) = self.own_request(&state.request_ctx) else {
                continue;
            };
            if self.lease_clock.is_round(id) {
                self.finish_round(id);
            } else if let Some(read) = self.reads.remove(&id) {
                let _ = read.reply.send(Ok(LogIndex(state.index)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_of_different_nodes_or_boots_never_collide() {
        let a = ReadContext {
            node_id: 1,
            boot_id: 7,
            request_id: 42,
        };
        let other_node = ReadContext { node_id: 2, ..a };
        let other_boot = ReadContext { boot_id: 8, ..a };
        assert_ne!(a.encode(), other_node.encode());
        assert_ne!(a.encode(), other_boot.encode());
        assert_eq!(ReadContext::decode(&a.encode()), Some(a));
    }
}
