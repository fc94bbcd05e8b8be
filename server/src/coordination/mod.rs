//! The coordination state machine: leases, locks, elections and the
//! exactly-once session table, as a pure deterministic function of the
//! committed log.
//!
//! # How it is driven
//! The Raft apply loop calls [`Coordination::apply`] once per committed
//! coordination entry with the entry's index, and writes the returned
//! [`Applied::changes`] in the same batch as the applied index. At startup
//! and after installing a snapshot it rebuilds the state from every record
//! under [`RECORD_PREFIX`] with [`Coordination::load`]. Nothing here does
//! I/O, reads a clock or draws a random number (Invariant 8), and every
//! collection that reaches an output is a `BTreeMap`, `BTreeSet` or
//! `VecDeque`, so replicas that apply the same entries produce the same
//! results, events and bytes. Time enters only as values in commands: the
//! leader decides which leases expired and proposes [`Op::ExpireLeases`].
//!
//! # Leases
//! A lease's id is the index of the entry that granted it: unique, never
//! reused, so a late expiry of an old lease can never hit a newer one.
//! Removing leases ([`Op::RevokeLease`], [`Op::ExpireLeases`]) happens in
//! two phases within the one entry: first every removed lease leaves every
//! queue it waits in, then each lock it holds is released and handed to its
//! first waiter. So a lock is never handed to a lease that dies in the same
//! entry, and every handover goes to a live lease (Invariant 2).
//!
//! # Locks and elections
//! Both are the same record, [`Lock`], keyed by [`LockKey`]: `(kind, name)`,
//! so lock names and election names are separate namespaces. An election's
//! grant carries the leader's published value; a lock's value is always
//! empty.
//! - Acquire: a free lock is granted at once with a new token. The lease
//!   that already holds it gets the same grant back (idempotent, not counted;
//!   a candidate campaigning again keeps its leadership and value). Held by
//!   another lease: refused with the holder, or, with `wait`, queued FIFO;
//!   queueing again keeps the original place and value.
//! - Release (and resign): only the current grant's token releases. Any
//!   other token, including one for a lock nobody holds, is
//!   [`CoordinationError::StaleToken`] with the current token (`None` if
//!   free): to a client both mean "you no longer hold it".
//! - A released lock goes to its first waiter in the same entry. A lock with
//!   no holder has no record at all; there is no "free lock with waiters".
//! - Cancel wait removes a waiter; if the grant won the race, the outcome
//!   carries it so the client can release it.
//! - Proclaim replaces the leader's value, fenced by its token.
//!
//! # Fencing tokens (Invariant 1)
//! Every grant, to any lock or election, takes the value of one counter,
//! `next_token` (starting at 1), and increments it; the counter's record is
//! written in the same batch as the grant. Tokens are therefore unique
//! across locks and strictly increasing per lock, and because the counter is
//! persisted and restored with everything else, the first token after a
//! restart or snapshot install is above every token issued before it. Each
//! grant asserts that its token is above the lock's previous one. A freed
//! lock's record is dropped rather than kept for its last token: the global
//! counter alone already guarantees that its next token is higher, and
//! keeping every name ever locked would grow without bound. [`Coordination::load`]
//! refuses a state in which some stored token is not below `next_token`.
//!
//! The fenced store asks [`Coordination::check_fence`] (or
//! [`Coordination::check_election_fence`]) at the index of the write; only
//! the current grant's token passes.
//!
//! # Persistence
//! Record keys and the value format are described in `codec.rs`; the key
//! builders and prefixes are public. An op mutates the in-memory state and
//! marks what it touched; the changes are then rendered from the final
//! state, one per key, ascending by key. So the stored records are, by
//! construction, the state after the op. `Lease::held` and `Lease::waiting`
//! are not stored: load rebuilds them from the lock and waiter records, then
//! checks every invariant ([`Coordination::validate`]) and refuses an
//! inconsistent state with the offending key rather than panicking.
//! Waiters are stored one record each, keyed by the index that queued them,
//! so queueing or leaving a long queue writes one small record, not the
//! whole queue.
//!
//! # Errors
//! Refusals ([`CoordinationError`]) are deterministic results: they are
//! decided before any mutation, and a refused op has no changes and no
//! events. Broken invariants are bugs and stop the node with a messaged
//! panic.
//!
//! # Limits
//! Names: non-empty UTF-8, at most [`MAX_NAME_BYTES`], no control characters
//! ([`validate_name`]). Election values: at most [`MAX_ELECTION_VALUE_BYTES`].
//! At most [`MAX_WAITERS_PER_LOCK`] waiters per lock, [`MAX_LOCKS_PER_LEASE`]
//! locks held or awaited per lease (which bounds the work of removing one
//! lease), [`MAX_LOCKS`] held locks and elections, [`MAX_LEASES`] leases;
//! beyond a limit an op is refused with
//! [`CoordinationError::ResourceExhausted`]. Lease TTLs must lie within the
//! [`TtlBounds`] given at construction. Limits are checked when state grows,
//! not on load, so lowering one never makes a stored state unloadable.
//!
//! The TTL bounds take part in apply, so they must be identical on every
//! replica: a replica with different bounds would accept a lease others
//! refuse and diverge. They belong to the cluster's configuration, not to
//! one node's.
//!
//! # Sessions
//! The exactly-once table ([`sessions`]) is part of this state: sessions
//! are opened, closed and expired by ops of their own, and each request's
//! result is recorded with [`Coordination::record_session`].
//!
//! # Not done yet
//! - The size of one [`Op::ExpireLeases`] is bounded only by its proposer.
//! - No count of waiters across all locks beyond the per-lease bound, and
//!   no bound on the total bytes of candidate values (each is at most
//!   [`MAX_ELECTION_VALUE_BYTES`]).
//! - Changing the TTL bounds of a running cluster needs a replicated
//!   configuration entry; today it needs every replica restarted with the
//!   same bounds before new leases are granted.

mod codec;
mod leases;
mod load;
mod locks;
mod ops;
pub mod sessions;
mod types;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_limits;
#[cfg(test)]
mod tests_persistence;
#[cfg(test)]
mod tests_random;

use std::collections::{BTreeMap, BTreeSet};

pub use codec::{
    encode_restore_pending, lease_key, lock_key, session_key, session_result_key, waiter_key,
    LEASE_PREFIX, LOCK_PREFIX, NEXT_TOKEN_KEY, RECORD_PREFIX, RESTORE_PENDING_KEY, SESSION_PREFIX,
    SESSION_RESULT_PREFIX, WAITER_PREFIX,
};
pub use load::LoadError;
pub use ops::{Applied, Caller, Changes, CoordinationError, Event, FenceError, Op, Outcome};
pub use sessions::{
    SequenceNumber, Session, SessionCheck, SessionId, Sessions, MAX_SESSIONS, SESSION_WINDOW,
};
pub use types::{FencingToken, Grant, Kind, Lease, LeaseId, Lock, LockKey, LockSet, Waiter};

use crate::types::LogIndex;

/// Longest lock or election name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Largest value an election candidate may publish, in bytes.
pub const MAX_ELECTION_VALUE_BYTES: usize = 64 * 1024;
/// Most waiters queued for one lock or election.
pub const MAX_WAITERS_PER_LOCK: usize = 10_000;
/// Most locks and elections one lease holds or waits for, together.
pub const MAX_LOCKS_PER_LEASE: usize = 10_000;
/// Most locks and elections held at once.
pub const MAX_LOCKS: usize = 1_000_000;
/// Most live leases.
pub const MAX_LEASES: usize = 1_000_000;
/// The least a restore moves the token counter past the restored state's,
/// whatever the floor proposed (`docs/semantics.md`, Invariant 1).
pub const RESTORE_TOKEN_STEP: u64 = 1 << 32;

/// The range of lease TTLs apply accepts, inclusive. Must be the same on
/// every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlBounds {
    pub min_ttl_ms: u64,
    pub max_ttl_ms: u64,
}

/// The replicated coordination state. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordination {
    ttl_bounds: TtlBounds,
    /// The token the next grant receives; above every token issued so far.
    next_token: FencingToken,
    /// Restored from a backup, and the token floor not yet raised: no grant
    /// may be made until it is (see `docs/semantics.md`, Invariant 1).
    restore_pending: bool,
    leases: BTreeMap<LeaseId, Lease>,
    /// Live leases per owner (`""`: anonymous); derived from `leases`.
    owner_leases: std::collections::HashMap<std::sync::Arc<str>, u64>,
    /// Held locks and elections only.
    locks: BTreeMap<LockKey, Lock>,
    sessions: Sessions,
}

/// A record an op touched; rendered into [`Changes`] after the op.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Record {
    NextToken,
    RestorePending,
    Lease(LeaseId),
    Lock(LockKey),
    Waiter(LockKey, LogIndex),
    Session(SessionId),
    SessionResult(SessionId, SequenceNumber),
}

/// Records ops changed, kept to be rendered later, at their value then
/// ([`Coordination::render_touched`]).
#[derive(Debug, Default)]
pub struct Touched(BTreeSet<Record>);

impl Touched {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What an op has produced so far.
#[derive(Debug, Default)]
struct Effects {
    events: Vec<Event>,
    touched: BTreeSet<Record>,
}

impl Coordination {
    /// An empty state, as at the start of the log.
    pub fn new(ttl_bounds: TtlBounds) -> Coordination {
        assert!(
            ttl_bounds.min_ttl_ms <= ttl_bounds.max_ttl_ms,
            "lease TTL bounds are inverted: min {} ms > max {} ms",
            ttl_bounds.min_ttl_ms,
            ttl_bounds.max_ttl_ms
        );
        Coordination {
            ttl_bounds,
            next_token: FencingToken(1),
            restore_pending: false,
            leases: BTreeMap::new(),
            owner_leases: std::collections::HashMap::new(),
            locks: BTreeMap::new(),
            sessions: Sessions::default(),
        }
    }

    /// Applies `op`, committed at `index`. Indexes must be applied once each,
    /// in increasing order.
    pub fn apply(&mut self, index: LogIndex, op: Op) -> Applied {
        self.apply_as(index, op, &Caller::default())
    }

    /// Applies `op` on behalf of `caller`: leases it grants are the
    /// caller's, and the owner and limit checks it asks for are made.
    pub fn apply_as(&mut self, index: LogIndex, op: Op, caller: &Caller) -> Applied {
        let mut touched = Touched::default();
        let applied = self.apply_touching(index, op, caller, &mut touched);
        Applied {
            changes: self.render(&touched.0),
            ..applied
        }
    }

    /// [`Coordination::apply_as`], adding the records the op changed to
    /// `touched` instead of rendering them; `changes` is left empty.
    pub fn apply_touching(
        &mut self,
        index: LogIndex,
        op: Op,
        caller: &Caller,
        touched: &mut Touched,
    ) -> Applied {
        let mut effects = Effects::default();
        let fx = &mut effects;
        let result = match op {
            Op::GrantLease { ttl_ms } => self.grant_lease(index, ttl_ms, caller, fx),
            Op::RevokeLease { lease } => self
                .check_owner(lease, caller)
                .and_then(|()| self.revoke_lease(index, lease, fx)),
            Op::ExpireLeases { leases } => Ok(self.expire_leases(index, leases, fx)),
            Op::Acquire {
                kind,
                name,
                lease,
                wait,
                value,
            } => self.check_owner(lease, caller).and_then(|()| {
                let key = LockKey::new(kind, name);
                let wanted = locks::Wanted {
                    wait,
                    value,
                    max_waiters: caller.max_waiters,
                };
                self.acquire(index, key, lease, wanted, fx)
            }),
            Op::Release { kind, name, token } => {
                self.release(index, &LockKey::new(kind, name), token, fx)
            }
            Op::CancelWait {
                kind,
                name,
                lease,
                attempt,
            } => self.cancel_wait(LockKey::new(kind, name), lease, attempt, fx),
            Op::Proclaim { name, token, value } => {
                self.proclaim(LockKey::new(Kind::Election, name), token, value, fx)
            }
            Op::OpenSession => self.open_session(index, fx),
            Op::RaiseTokenFloor { floor } => Ok(self.raise_token_floor(floor, fx)),
            Op::CloseSession { session } => Ok(self.end_sessions(vec![session], false, fx)),
            Op::ExpireSessions { sessions } => Ok(self.end_sessions(sessions, true, fx)),
        };
        assert!(
            result.is_ok() || (effects.events.is_empty() && effects.touched.is_empty()),
            "a refused op must change nothing, but {result:?} touched {:?}",
            effects.touched
        );
        touched.0.extend(effects.touched);
        Applied {
            result,
            changes: Changes::new(),
            events: effects.events,
        }
    }

    /// Whether request `seq` of `session` must be applied, answered from
    /// the session table, or refused.
    pub fn check_session(&self, session: SessionId, seq: SequenceNumber) -> SessionCheck<'_> {
        self.sessions.check(session, seq)
    }

    /// Records the encoded result of a request that
    /// [`Coordination::check_session`] found new; the client has received
    /// every result below `oldest_pending`.
    pub fn record_session(
        &mut self,
        session: SessionId,
        seq: SequenceNumber,
        oldest_pending: SequenceNumber,
        result: Vec<u8>,
    ) -> Changes {
        let mut touched = Touched::default();
        self.record_session_touching(session, seq, oldest_pending, result, &mut touched);
        self.render(&touched.0)
    }

    /// [`Coordination::record_session`], adding the records it changed to
    /// `touched` instead of rendering them.
    pub fn record_session_touching(
        &mut self,
        session: SessionId,
        seq: SequenceNumber,
        oldest_pending: SequenceNumber,
        result: Vec<u8>,
        touched: &mut Touched,
    ) {
        let changes = self.sessions.record(session, seq, oldest_pending, result);
        touched
            .0
            .extend(changes.headers.into_iter().map(Record::Session));
        touched.0.extend(
            changes
                .results
                .into_iter()
                .map(|(id, seq)| Record::SessionResult(id, seq)),
        );
    }

    /// The stored form of every record in `touched` as of now, ascending by
    /// key (`None`: the record is gone).
    pub fn render_touched(&self, touched: &Touched) -> Changes {
        self.render(&touched.0)
    }

    /// The counter jumps to at least `floor`, and at least 2^32 past where
    /// the restored state left it (so a restore moves tokens up even if the
    /// leader's wall clock that chose `floor` is behind), and grants may be
    /// made again.
    fn raise_token_floor(&mut self, floor: FencingToken, fx: &mut Effects) -> Outcome {
        let past_restored = FencingToken(self.next_token.0.saturating_add(RESTORE_TOKEN_STEP));
        self.next_token = self.next_token.max(floor).max(past_restored);
        self.restore_pending = false;
        fx.touched.insert(Record::NextToken);
        fx.touched.insert(Record::RestorePending);
        Outcome::TokenFloorRaised {
            next_token: self.next_token,
        }
    }

    /// Whether the state was restored from a backup and the token floor has
    /// not been raised yet.
    pub fn restore_pending(&self) -> bool {
        self.restore_pending
    }

    fn open_session(
        &mut self,
        index: LogIndex,
        fx: &mut Effects,
    ) -> Result<Outcome, CoordinationError> {
        let session = self
            .sessions
            .open(index)
            .ok_or(CoordinationError::ResourceExhausted {
                what: "open sessions",
                limit: MAX_SESSIONS as u64,
            })?;
        fx.touched.insert(Record::Session(session));
        fx.events.push(Event::SessionOpened { session });
        Ok(Outcome::SessionOpened { session })
    }

    /// Ends the sessions that are open among `sessions` (closed by their
    /// client, or `expired` by the leader); others are skipped.
    fn end_sessions(
        &mut self,
        sessions: Vec<SessionId>,
        expired: bool,
        fx: &mut Effects,
    ) -> Outcome {
        let mut ended = Vec::new();
        for id in sessions {
            let Some(session) = self.sessions.end(id) else {
                continue;
            };
            fx.touched.insert(Record::Session(id));
            for seq in session.results.keys() {
                fx.touched.insert(Record::SessionResult(id, *seq));
            }
            fx.events.push(Event::SessionEnded {
                session: id,
                expired,
            });
            ended.push(id);
        }
        Outcome::SessionsEnded { sessions: ended }
    }

    /// Accepts `token` for a fenced write only if it is `lock`'s current grant.
    pub fn check_fence(&self, lock: &str, token: FencingToken) -> Result<(), FenceError> {
        self.check_current(&LockKey::new(Kind::Lock, lock), token)
    }

    /// Like [`Coordination::check_fence`], for the leadership token of
    /// election `name`.
    pub fn check_election_fence(&self, name: &str, token: FencingToken) -> Result<(), FenceError> {
        self.check_current(&LockKey::new(Kind::Election, name), token)
    }

    fn check_current(&self, key: &LockKey, token: FencingToken) -> Result<(), FenceError> {
        let current = self.locks.get(key).map(|lock| lock.holder.token);
        if current == Some(token) {
            Ok(())
        } else {
            Err(FenceError {
                presented: token,
                current,
            })
        }
    }

    /// The holder and queue of a lock or election; `None` when nobody holds it.
    pub fn describe(&self, kind: Kind, name: &str) -> Option<&Lock> {
        self.locks.get(&LockKey::new(kind, name))
    }

    /// Every held lock and election with its queue, ascending by kind and name.
    pub fn locks(&self) -> impl Iterator<Item = (&LockKey, &Lock)> {
        self.locks.iter()
    }

    /// The current leader of election `name`.
    pub fn leader(&self, name: &str) -> Option<&Grant> {
        self.describe(Kind::Election, name).map(|lock| &lock.holder)
    }

    pub fn lease(&self, lease: LeaseId) -> Option<&Lease> {
        self.leases.get(&lease)
    }

    /// All live leases, ascending by id.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// The locks and elections `lease` holds, with their grants; empty for
    /// an unknown lease.
    pub fn locks_of(&self, lease: LeaseId) -> impl Iterator<Item = (&LockKey, &Grant)> {
        self.leases
            .get(&lease)
            .into_iter()
            .flat_map(|lease| lease.held.iter())
            .filter_map(|key| self.locks.get(key).map(|lock| (key, &lock.holder)))
    }

    /// The token the next grant will receive.
    pub fn next_token(&self) -> FencingToken {
        self.next_token
    }

    pub fn ttl_bounds(&self) -> TtlBounds {
        self.ttl_bounds
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The stored form of every touched record, ascending by key.
    fn render(&self, touched: &BTreeSet<Record>) -> Changes {
        let rendered: BTreeMap<Vec<u8>, Option<Vec<u8>>> = touched
            .iter()
            .map(|record| self.render_one(record))
            .collect();
        rendered.into_iter().collect()
    }

    fn render_one(&self, record: &Record) -> (Vec<u8>, Option<Vec<u8>>) {
        match record {
            Record::NextToken => (
                NEXT_TOKEN_KEY.to_vec(),
                Some(codec::encode_next_token(self.next_token)),
            ),
            Record::RestorePending => (
                RESTORE_PENDING_KEY.to_vec(),
                self.restore_pending.then(codec::encode_restore_pending),
            ),
            Record::Lease(id) => (
                lease_key(*id),
                self.leases
                    .get(id)
                    .map(|lease| codec::encode_lease(lease.ttl_ms, lease.owner.as_deref())),
            ),
            Record::Lock(key) => (
                lock_key(key),
                self.locks
                    .get(key)
                    .map(|lock| codec::encode_grant(&lock.holder)),
            ),
            Record::Waiter(key, enqueued_index) => {
                let waiter = self.locks.get(key).and_then(|lock| {
                    lock.waiters
                        .iter()
                        .find(|waiter| waiter.enqueued_index == *enqueued_index)
                });
                (
                    waiter_key(key, *enqueued_index),
                    waiter.map(codec::encode_waiter),
                )
            }
            Record::Session(id) => (
                session_key(*id),
                self.sessions.get(*id).map(codec::encode_session),
            ),
            Record::SessionResult(id, seq) => (
                session_result_key(*id, *seq),
                self.sessions
                    .get(*id)
                    .and_then(|session| session.results.get(seq))
                    .map(|result| codec::encode_session_result(result)),
            ),
        }
    }
}

/// Checks a lock or election name: non-empty UTF-8 (guaranteed by `str`),
/// at most [`MAX_NAME_BYTES`], no control characters.
pub fn validate_name(name: &str) -> Result<(), CoordinationError> {
    let reason = if name.is_empty() {
        "must not be empty".to_string()
    } else if name.len() > MAX_NAME_BYTES {
        format!("{} bytes, at most {MAX_NAME_BYTES} allowed", name.len())
    } else if let Some(control) = name.chars().find(|c| c.is_control()) {
        format!("contains control character {control:?}")
    } else {
        return Ok(());
    };
    Err(CoordinationError::InvalidArgument {
        field: "name",
        reason,
    })
}

/// Checks a grant's value: empty for a lock, at most
/// [`MAX_ELECTION_VALUE_BYTES`] for an election.
pub fn validate_value(kind: Kind, value: &[u8]) -> Result<(), CoordinationError> {
    let reason = match kind {
        Kind::Lock if !value.is_empty() => {
            "a lock carries no value; only elections publish one".to_string()
        }
        Kind::Election if value.len() > MAX_ELECTION_VALUE_BYTES => format!(
            "{} bytes, at most {MAX_ELECTION_VALUE_BYTES} allowed",
            value.len()
        ),
        _ => return Ok(()),
    };
    Err(CoordinationError::InvalidArgument {
        field: "value",
        reason,
    })
}
