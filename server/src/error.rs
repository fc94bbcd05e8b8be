//! Errors: startup problems for the operator, and request errors for clients.
//!
//! Deterministic outcomes of a request (bad argument, key too large) are
//! values returned to the caller. Anything that means this replica can no
//! longer be trusted (a checksum mismatch, an entry that does not decode, an
//! I/O error while applying) is a [`FatalError`]: the node stops instead of
//! serving data it cannot vouch for.

use std::fmt;

/// A problem that prevents the node from starting. Printed as one line that
/// says what to fix; never a backtrace.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Storage(String),
    #[error("{0}")]
    Listen(String),
}

impl StartupError {
    pub fn config(message: impl Into<String>) -> Self {
        StartupError::Config(message.into())
    }
}

/// The node can no longer serve correctly and must stop.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FatalError {
    /// A stored record failed its checksum or did not decode.
    #[error("corrupted record in column family {cf:?} at key {key}: {reason}; this replica's data cannot be trusted — restore it from a healthy member (remove its data dir and let it catch up)")]
    Corruption {
        cf: &'static str,
        key: String,
        reason: String,
    },
    /// RocksDB reported an error (I/O, or its own checksum).
    #[error("storage error ({context}): {message}")]
    Storage { context: String, message: String },
    /// raft-rs rejected a step the node believed valid.
    #[error("raft error: {0}")]
    Raft(String),
    /// This node was removed from the cluster's membership; it stops.
    #[error("node {0} was removed from the cluster; it no longer serves (wipe its data dir before it rejoins)")]
    Removed(u64),
}

impl FatalError {
    pub fn storage(context: impl Into<String>, err: impl fmt::Display) -> Self {
        FatalError::Storage {
            context: context.into(),
            message: err.to_string(),
        }
    }
}

impl From<FatalError> for StartupError {
    fn from(err: FatalError) -> Self {
        StartupError::Storage(err.to_string())
    }
}

/// Why a request was not served. Mapped to gRPC status codes in
/// [`crate::api::status_from`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// This node is not the leader. Retry at the leader (hint may be absent).
    #[error("not the leader{}", leader_hint(.leader_id, .leader_client_addr))]
    NotLeader {
        leader_id: Option<u64>,
        leader_client_addr: Option<String>,
    },
    /// Leadership changed while the request was in flight; it may or may not
    /// have been applied.
    #[error("leadership changed before the request was confirmed; its outcome is unknown, retry")]
    LeadershipLost,
    /// The node did not get an answer in time (no quorum, overloaded).
    #[error("timed out waiting for the cluster: {0}")]
    Timeout(String),
    /// The node is stopping or has stopped.
    #[error("node is shutting down")]
    ShuttingDown,
    /// The request itself is malformed; retrying will not help.
    #[error("invalid argument: {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The request conflicts with the cluster's state (a membership change
    /// in progress, an id in use, a learner not caught up); it may succeed
    /// later.
    #[error("{0}")]
    Conflict(String),
    /// The request would leave the cluster without a quorum that answers.
    #[error("{0}")]
    NoQuorum(String),
    /// This node's disk has not completed a sync for longer than twice the
    /// election timeout; the request was not proposed. Retry at another
    /// node.
    #[error("this node's disk is not completing syncs; the request was not proposed, retry at another node")]
    SyncStalled,
    /// The cluster was restored from a backup and is raising its token
    /// floor; retry shortly.
    #[error("the cluster is completing a restore (raising its token floor); retry shortly")]
    Restoring,
}

impl From<crate::membership::Refusal> for RequestError {
    fn from(refusal: crate::membership::Refusal) -> Self {
        use crate::membership::Refusal;
        match refusal {
            Refusal::Invalid { field, reason } => RequestError::InvalidArgument { field, reason },
            Refusal::Conflict(message) => RequestError::Conflict(message),
            Refusal::NoQuorum(message) => RequestError::NoQuorum(message),
        }
    }
}

fn leader_hint(id: &Option<u64>, addr: &Option<String>) -> String {
    match (id, addr) {
        (Some(id), Some(addr)) => format!("; leader is node {id} at {addr}"),
        (Some(id), None) => format!("; leader is node {id}"),
        _ => "; no leader known yet".to_string(),
    }
}
