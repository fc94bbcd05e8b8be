//! What goes into [`super::Coordination::apply`] and what comes out.

use super::sessions::SessionId;
use super::types::{FencingToken, Grant, Kind, LeaseId};
use crate::types::LogIndex;

/// One replicated coordination command, applied at one Raft index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creates a lease whose id is the entry's index.
    GrantLease { ttl_ms: u64 },
    /// Removes a lease at its client's request, releasing everything it holds.
    RevokeLease { lease: LeaseId },
    /// Removes leases the leader found expired. Ids that are already gone are
    /// skipped: an expiry may race a revoke.
    ExpireLeases { leases: Vec<LeaseId> },
    /// Takes a lock, or campaigns in an election. `value` is the candidate's
    /// published value and must be empty for a lock.
    Acquire {
        kind: Kind,
        name: String,
        lease: LeaseId,
        wait: bool,
        value: Vec<u8>,
    },
    /// Gives up a lock or resigns leadership; only the current token does.
    Release {
        kind: Kind,
        name: String,
        token: FencingToken,
    },
    /// Leaves the queue of a lock or election, if the waiting acquire at
    /// index `attempt` is still the latest one for the lease (`None`: in
    /// any case).
    CancelWait {
        kind: Kind,
        name: String,
        lease: LeaseId,
        attempt: Option<LogIndex>,
    },
    /// Replaces the published value of an election's current leader.
    Proclaim {
        name: String,
        token: FencingToken,
        value: Vec<u8>,
    },
    /// Opens an exactly-once session whose id is the entry's index.
    OpenSession,
    /// Ends a session at its client's request; an unknown id is skipped.
    CloseSession { session: SessionId },
    /// Ends sessions the leader found idle; ids already gone are skipped.
    ExpireSessions { sessions: Vec<SessionId> },
    /// After a restore: the token counter jumps to at least `floor`, and
    /// grants may be made again.
    RaiseTokenFloor { floor: FencingToken },
}

/// Who proposed an op, and the limits the proposing node enforces. It
/// travels in the command, so every replica applies the same checks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The identity that asked (`None`: anonymous). A granted lease is
    /// owned by it.
    pub identity: Option<String>,
    /// Refuse to use or revoke a lease that `identity` does not own (off
    /// for admins and while authentication is off).
    pub check_owner: bool,
    /// Most live leases one identity may own (0: only the global bound).
    pub max_owner_leases: u64,
    /// Most waiters one lock may have (0: only the global bound).
    pub max_waiters: u64,
}

/// The successful result of an [`Op`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    LeaseGranted {
        lease: LeaseId,
        ttl_ms: u64,
    },
    LeaseRevoked {
        lease: LeaseId,
    },
    /// The leases that were removed, ascending; ids already gone are absent.
    LeasesExpired {
        leases: Vec<LeaseId>,
    },
    /// The lease holds the lock. `already_held` is true when it held it
    /// before this op: acquire is idempotent, not counted, and one release
    /// frees the lock.
    Acquired {
        grant: Grant,
        already_held: bool,
    },
    /// The lease waits for the lock. `position` 0 is next in line.
    Queued {
        position: usize,
    },
    /// The lock was released; `next` is the waiter it went to, if any.
    Released {
        next: Option<Grant>,
    },
    /// `was_waiting` says whether a waiter was removed. `held` is the lease's
    /// grant if it already holds the lock (the grant won the race with the
    /// cancel): the client must release it with that token.
    WaitCancelled {
        was_waiting: bool,
        held: Option<Grant>,
    },
    Proclaimed {
        leader: Grant,
    },
    SessionOpened {
        session: SessionId,
    },
    /// The sessions that were open and are now ended, in the op's order.
    SessionsEnded {
        sessions: Vec<SessionId>,
    },
    TokenFloorRaised {
        next_token: FencingToken,
    },
}

/// Why an [`Op`] was refused. Every refusal changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordinationError {
    #[error("invalid argument: {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("lease {lease} not found: it expired, was revoked, or never existed")]
    LeaseNotFound { lease: LeaseId },
    #[error("held by lease {holder_lease} with fencing token {holder_token}")]
    Held {
        holder_lease: LeaseId,
        holder_token: FencingToken,
    },
    /// The token is not the current grant. `current` is `None` when nobody
    /// holds the lock (this is also the answer for a lock that never existed).
    #[error("stale fencing token {presented}; current token is {}", describe_token(.current))]
    StaleToken {
        presented: FencingToken,
        current: Option<FencingToken>,
    },
    #[error("resource exhausted: at most {limit} {what}")]
    ResourceExhausted { what: &'static str, limit: u64 },
    /// The caller does not own the lease it named.
    #[error("lease {lease} belongs to another user")]
    NotOwner { lease: LeaseId, caller: String },
    /// Restored from a backup; grants wait until the first leader has
    /// raised the token floor (moments after it is elected).
    #[error("the cluster is completing a restore; retry shortly")]
    RestoreInProgress,
}

/// A fenced write named a token that is not the lock's current grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stale fencing token {presented}; current token is {}", describe_token(.current))]
pub struct FenceError {
    pub presented: FencingToken,
    /// `None` when nobody holds the lock.
    pub current: Option<FencingToken>,
}

impl From<FenceError> for CoordinationError {
    fn from(err: FenceError) -> Self {
        CoordinationError::StaleToken {
            presented: err.presented,
            current: err.current,
        }
    }
}

fn describe_token(token: &Option<FencingToken>) -> String {
    match token {
        Some(token) => token.to_string(),
        None => "none (not held)".to_string(),
    }
}

/// A change that watchers may want to hear about, in the order it happened
/// within the op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A lock or election was granted, to a new acquirer or to a waiter.
    Granted {
        kind: Kind,
        name: String,
        lease: LeaseId,
        token: FencingToken,
        value: Vec<u8>,
    },
    /// A grant ended: released, or its lease revoked or expired.
    Released {
        kind: Kind,
        name: String,
        lease: LeaseId,
        token: FencingToken,
    },
    /// An election's leader or its published value changed.
    LeaderChanged {
        name: String,
        leader: Option<Grant>,
    },
    LeaseRemoved {
        lease: LeaseId,
        expired: bool,
    },
    SessionOpened {
        session: SessionId,
    },
    SessionEnded {
        session: SessionId,
        expired: bool,
    },
}

/// Record changes to write, ascending by key, at most one per key; `None`
/// deletes the key.
pub type Changes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Everything one applied [`Op`] produced. A refused op has no events and
/// no changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub result: Result<Outcome, CoordinationError>,
    pub events: Vec<Event>,
    pub changes: Changes,
}
