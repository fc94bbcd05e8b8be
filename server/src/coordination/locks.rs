//! Acquire, release, cancel and proclaim: the ops on locks and elections,
//! and the grant and handover they share with lease removal.
//!
//! Each op checks everything that can refuse it before it mutates anything.

use std::collections::VecDeque;
use std::mem;

use super::ops::{CoordinationError, Event, Outcome};
use super::types::{FencingToken, Grant, Kind, LeaseId, Lock, LockKey, Waiter};
use super::{
    validate_name, validate_value, Coordination, Effects, Record, MAX_LOCKS, MAX_LOCKS_PER_LEASE,
    MAX_WAITERS_PER_LOCK,
};
use crate::types::LogIndex;

/// What [`MAX_LOCKS_PER_LEASE`] counts, for its error.
const PER_LEASE_LIMIT: &str = "locks held or awaited per lease";

/// What an acquire asks for besides the lock and the lease.
pub(super) struct Wanted {
    /// Queue if the lock is held (else fail at once).
    pub wait: bool,
    /// The candidate's published value (elections).
    pub value: Vec<u8>,
    /// The proposer's bound on the queue (0: the global one only).
    pub max_waiters: u64,
}

impl Coordination {
    pub(super) fn acquire(
        &mut self,
        index: LogIndex,
        key: LockKey,
        lease: LeaseId,
        wanted: Wanted,
        fx: &mut Effects,
    ) -> Result<Outcome, CoordinationError> {
        let Wanted {
            wait,
            value,
            max_waiters,
        } = wanted;
        validate_name(&key.name)?;
        validate_value(key.kind, &value)?;
        if self.restore_pending {
            return Err(CoordinationError::RestoreInProgress);
        }
        let holdings = self
            .leases
            .get(&lease)
            .ok_or(CoordinationError::LeaseNotFound { lease })?;
        let has_room = holdings.held.len() + holdings.waiting.len() < MAX_LOCKS_PER_LEASE;
        let Some(lock) = self.locks.get(&key) else {
            check_limit(has_room, PER_LEASE_LIMIT, MAX_LOCKS_PER_LEASE)?;
            check_limit(self.locks.len() < MAX_LOCKS, "held locks", MAX_LOCKS)?;
            return Ok(self.grant_free(index, key, lease, value, fx));
        };
        if lock.holder.lease == lease {
            return Ok(Outcome::Acquired {
                grant: lock.holder.clone(),
                already_held: true,
            });
        }
        if !wait {
            return Err(CoordinationError::Held {
                holder_lease: lock.holder.lease,
                holder_token: lock.holder.token,
            });
        }
        if let Some(position) = lock.waiters.iter().position(|w| w.lease == lease) {
            // A resent wait: it supersedes the attempt that queued the lease,
            // whose cancel must no longer take the lease out of the queue.
            let lock = self.locks.get_mut(&key).expect("the lock was just found");
            let waiter = &mut lock.waiters[position];
            waiter.attempt = index;
            let enqueued_index = waiter.enqueued_index;
            fx.touched.insert(Record::Waiter(key, enqueued_index));
            return Ok(Outcome::Queued { position });
        }
        let (what, waiter_limit) = match max_waiters as usize {
            n if n > 0 && n < MAX_WAITERS_PER_LOCK => {
                ("waiters per lock (--max-waiters-per-lock)", n)
            }
            _ => ("waiters per lock", MAX_WAITERS_PER_LOCK),
        };
        check_limit(lock.waiters.len() < waiter_limit, what, waiter_limit)?;
        check_limit(has_room, PER_LEASE_LIMIT, MAX_LOCKS_PER_LEASE)?;
        Ok(self.enqueue(index, key, lease, value, fx))
    }

    fn grant_free(
        &mut self,
        index: LogIndex,
        key: LockKey,
        lease: LeaseId,
        value: Vec<u8>,
        fx: &mut Effects,
    ) -> Outcome {
        let grant = self.grant_to(index, &key, lease, value, None, fx);
        let holder = grant.clone();
        let waiters = VecDeque::new();
        self.locks.insert(key, Lock { holder, waiters });
        Outcome::Acquired {
            grant,
            already_held: false,
        }
    }

    fn enqueue(
        &mut self,
        index: LogIndex,
        key: LockKey,
        lease: LeaseId,
        value: Vec<u8>,
        fx: &mut Effects,
    ) -> Outcome {
        // The caller found both the lock and the lease.
        let lock = self.locks.get_mut(&key).expect("queued lock exists");
        let holdings = self.leases.get_mut(&lease).expect("queued lease exists");
        assert!(
            lock.waiters
                .back()
                .is_none_or(|last| last.enqueued_index < index),
            "{key}: waiter queued at index {index} behind a later one"
        );
        lock.waiters.push_back(Waiter {
            lease,
            value,
            enqueued_index: index,
            attempt: index,
        });
        holdings.waiting.insert(key.clone());
        let position = lock.waiters.len() - 1;
        fx.touched.insert(Record::Waiter(key, index));
        Outcome::Queued { position }
    }

    pub(super) fn release(
        &mut self,
        index: LogIndex,
        key: &LockKey,
        token: FencingToken,
        fx: &mut Effects,
    ) -> Result<Outcome, CoordinationError> {
        validate_name(&key.name)?;
        self.check_current(key, token)?;
        let next = self.release_holder(index, key, fx);
        Ok(Outcome::Released { next })
    }

    pub(super) fn cancel_wait(
        &mut self,
        key: LockKey,
        lease: LeaseId,
        attempt: Option<LogIndex>,
        fx: &mut Effects,
    ) -> Result<Outcome, CoordinationError> {
        validate_name(&key.name)?;
        let holdings = self
            .leases
            .get_mut(&lease)
            .ok_or(CoordinationError::LeaseNotFound { lease })?;
        let Some(lock) = self.locks.get_mut(&key) else {
            return Ok(Outcome::WaitCancelled {
                was_waiting: false,
                held: None,
            });
        };
        let held = (lock.holder.lease == lease).then(|| lock.holder.clone());
        let current_attempt = |w: &Waiter| attempt.is_none_or(|a| a == w.attempt);
        let position = lock.waiters.iter().position(|w| w.lease == lease);
        let Some(position) = position.filter(|p| current_attempt(&lock.waiters[*p])) else {
            return Ok(Outcome::WaitCancelled {
                was_waiting: false,
                held,
            });
        };
        // `position` was just found in this queue.
        let waiter = lock
            .waiters
            .remove(position)
            .expect("position is in the queue");
        holdings.waiting.remove(&key);
        fx.touched
            .insert(Record::Waiter(key, waiter.enqueued_index));
        Ok(Outcome::WaitCancelled {
            was_waiting: true,
            held,
        })
    }

    pub(super) fn proclaim(
        &mut self,
        key: LockKey,
        token: FencingToken,
        value: Vec<u8>,
        fx: &mut Effects,
    ) -> Result<Outcome, CoordinationError> {
        validate_name(&key.name)?;
        validate_value(key.kind, &value)?;
        self.check_current(&key, token)?;
        // check_current found the election held with `token`.
        let lock = self
            .locks
            .get_mut(&key)
            .expect("proclaimed election is held");
        lock.holder.value = value;
        let leader = lock.holder.clone();
        fx.events.push(Event::LeaderChanged {
            name: key.name.clone(),
            leader: Some(leader.clone()),
        });
        fx.touched.insert(Record::Lock(key));
        Ok(Outcome::Proclaimed { leader })
    }

    /// Ends the current grant of `key` and hands the lock to its first
    /// waiter, if any. Returns the new grant.
    pub(super) fn release_holder(
        &mut self,
        index: LogIndex,
        key: &LockKey,
        fx: &mut Effects,
    ) -> Option<Grant> {
        let lock = self.locks.get_mut(key).expect("released lock is held");
        let next_waiter = lock.waiters.pop_front();
        let old = (lock.holder.lease, lock.holder.token);
        let old_holdings = self.leases.get_mut(&old.0);
        let old_holdings = old_holdings.expect("a holder's lease is alive (Invariant 2)");
        old_holdings.held.remove(key);
        fx.events.push(Event::Released {
            kind: key.kind,
            name: key.name.clone(),
            lease: old.0,
            token: old.1,
        });
        fx.touched.insert(Record::Lock(key.clone()));
        let Some(waiter) = next_waiter else {
            self.locks.remove(key);
            if key.kind == Kind::Election {
                fx.events.push(Event::LeaderChanged {
                    name: key.name.clone(),
                    leader: None,
                });
            }
            return None;
        };
        fx.touched
            .insert(Record::Waiter(key.clone(), waiter.enqueued_index));
        let next_holdings = self.leases.get_mut(&waiter.lease);
        let next_holdings =
            next_holdings.expect("a waiter's lease is alive: removed leases leave queues first");
        next_holdings.waiting.remove(key);
        let grant = self.grant_to(index, key, waiter.lease, waiter.value, Some(old.1), fx);
        let lock = self
            .locks
            .get_mut(key)
            .expect("handed-over lock is still held");
        let previous = mem::replace(&mut lock.holder, grant.clone());
        assert!(
            previous.token == old.1,
            "{key} changed holder during its own handover"
        );
        Some(grant)
    }

    /// Makes a grant of `key` to `lease` with a fresh token; the caller
    /// stores it in the lock.
    fn grant_to(
        &mut self,
        index: LogIndex,
        key: &LockKey,
        lease: LeaseId,
        value: Vec<u8>,
        previous: Option<FencingToken>,
        fx: &mut Effects,
    ) -> Grant {
        let token = self.issue_token(key, previous, fx);
        let holdings = self.leases.get_mut(&lease);
        holdings
            .expect("locks are granted only to live leases (Invariant 2)")
            .held
            .insert(key.clone());
        let grant = Grant {
            lease,
            token,
            value,
            granted_index: index,
        };
        fx.events.push(Event::Granted {
            kind: key.kind,
            name: key.name.clone(),
            lease,
            token,
            value: grant.value.clone(),
        });
        if key.kind == Kind::Election {
            fx.events.push(Event::LeaderChanged {
                name: key.name.clone(),
                leader: Some(grant.clone()),
            });
        }
        fx.touched.insert(Record::Lock(key.clone()));
        grant
    }

    /// Takes the next token from the cluster-wide counter (Invariant 1).
    fn issue_token(
        &mut self,
        key: &LockKey,
        previous: Option<FencingToken>,
        fx: &mut Effects,
    ) -> FencingToken {
        assert!(
            !self.restore_pending,
            "a grant of {key} while a restore is pending: no leader proposes one before raising the token floor"
        );
        let token = self.next_token;
        assert!(
            previous.is_none_or(|previous| token > previous),
            "{key}: new fencing token {token} is not above its previous token {previous:?}"
        );
        let next = token.0.checked_add(1);
        self.next_token = FencingToken(next.expect("fencing token counter (u64) exhausted"));
        fx.touched.insert(Record::NextToken);
        token
    }
}

fn check_limit(has_room: bool, what: &'static str, limit: usize) -> Result<(), CoordinationError> {
    if has_room {
        Ok(())
    } else {
        Err(CoordinationError::ResourceExhausted {
            what,
            limit: limit as u64,
        })
    }
}
