//! Rebuilding the state from its records, and checking every invariant of
//! a state.
//!
//! Load accepts records in any order. It refuses, with the key at fault,
//! anything it cannot vouch for: a record that does not decode, a key seen
//! twice, a holder or waiter whose lease is gone, a token not below the
//! token counter, two locks sharing a token, a queue out of order. It never
//! panics on bad input: a replica whose records are inconsistent must stop
//! and say where, not serve (Invariant 7).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::codec::{self, Decoded};
use super::types::{FencingToken, Kind, Lease, Lock, LockKey, LockSet, Waiter};
use super::{lease_key, lock_key, session_key, validate_name, waiter_key, Coordination, TtlBounds};
use crate::types::LogIndex;

/// The stored coordination records are inconsistent or do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("coordination record {key}: {reason}")]
pub struct LoadError {
    /// The offending key, with non-printable bytes escaped.
    pub key: String,
    pub reason: String,
}

impl LoadError {
    fn at(key: &[u8], reason: impl Into<String>) -> LoadError {
        LoadError {
            key: key.escape_ascii().to_string(),
            reason: reason.into(),
        }
    }
}

/// Waiter records in queue order: by lock, then by the index that queued them.
type StoredWaiters = BTreeMap<(LockKey, LogIndex), Waiter>;

impl Coordination {
    /// Rebuilds the state from every record under [`super::RECORD_PREFIX`],
    /// in any order, and checks it with [`Coordination::validate`].
    pub fn load(
        ttl_bounds: TtlBounds,
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<Coordination, LoadError> {
        Coordination::load_counting(ttl_bounds, records, false)
    }

    /// A broken variant of [`Coordination::load`] for the simulator's
    /// proof that it catches a token counter that is not persisted
    /// (`UnsafeSwitches::volatile_token_counter`): any stored counter is
    /// ignored and the counter restarts above the tokens of the locks held
    /// now, so tokens of released locks are issued again.
    pub fn load_recomputing_counter(
        ttl_bounds: TtlBounds,
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> Result<Coordination, LoadError> {
        Coordination::load_counting(ttl_bounds, records, true)
    }

    fn load_counting(
        ttl_bounds: TtlBounds,
        records: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        recompute_counter: bool,
    ) -> Result<Coordination, LoadError> {
        let mut state = Coordination::new(ttl_bounds);
        let mut next_token = None;
        let mut waiters = StoredWaiters::new();
        // Results are linked to their sessions once every header is read.
        let mut results = Vec::new();
        for (key, value) in records {
            let decoded =
                codec::decode(&key, &value).map_err(|reason| LoadError::at(&key, reason))?;
            let fresh = match decoded {
                Decoded::NextToken(token) => next_token.replace(token).is_none(),
                Decoded::RestorePending => !std::mem::replace(&mut state.restore_pending, true),
                Decoded::Lease {
                    lease,
                    ttl_ms,
                    owner,
                } => {
                    let held = LockSet::new();
                    let waiting = LockSet::new();
                    let owner = state.intern_owner(owner.as_deref());
                    let lease = Lease {
                        id: lease,
                        ttl_ms,
                        owner,
                        held,
                        waiting,
                    };
                    let owner = lease.owner.clone();
                    let fresh = state.leases.insert(lease.id, lease).is_none();
                    if fresh {
                        state.count_owner_lease(&owner, 1);
                    }
                    fresh
                }
                Decoded::Lock { key, holder } => {
                    let waiters = VecDeque::new();
                    state.locks.insert(key, Lock { holder, waiters }).is_none()
                }
                Decoded::Waiter { key, waiter } => waiters
                    .insert((key, waiter.enqueued_index), waiter)
                    .is_none(),
                Decoded::Session { id, session } => state.sessions.insert_loaded(id, session),
                Decoded::SessionResult { id, seq, result } => {
                    results.push((key.clone(), id, seq, result));
                    true
                }
                Decoded::LegacySession => true,
            };
            if !fresh {
                return Err(LoadError::at(&key, "record appears twice"));
            }
        }
        for (key, id, seq, result) in results {
            if !state.sessions.insert_loaded_result(id, seq, result) {
                return Err(LoadError::at(
                    &key,
                    "result of a session that is not open, or twice",
                ));
            }
        }
        state.next_token = next_token.unwrap_or(FencingToken(1));
        if recompute_counter {
            let highest = state.locks.values().map(|lock| lock.holder.token.0).max();
            state.next_token = FencingToken(highest.unwrap_or(0) + 1);
        }
        state.link_holders()?;
        state.link_waiters(waiters)?;
        state.validate()?;
        Ok(state)
    }

    /// Fills each lease's `held` set from the lock records.
    fn link_holders(&mut self) -> Result<(), LoadError> {
        for (key, lock) in &self.locks {
            let lease = self.leases.get_mut(&lock.holder.lease).ok_or_else(|| {
                let reason = format!("held by lease {}, which does not exist", lock.holder.lease);
                LoadError::at(&lock_key(key), reason)
            })?;
            lease.held.insert(key.clone());
        }
        Ok(())
    }

    /// Builds the queues, in index order, and each lease's `waiting` set.
    fn link_waiters(&mut self, waiters: StoredWaiters) -> Result<(), LoadError> {
        for ((key, enqueued_index), waiter) in waiters {
            let stored_key = waiter_key(&key, enqueued_index);
            let Some(lock) = self.locks.get_mut(&key) else {
                return Err(LoadError::at(&stored_key, "waits for a lock nobody holds"));
            };
            let Some(lease) = self.leases.get_mut(&waiter.lease) else {
                let reason = format!("lease {} does not exist", waiter.lease);
                return Err(LoadError::at(&stored_key, reason));
            };
            if !lease.waiting.insert(key) {
                let reason = format!("lease {} waits twice for this lock", waiter.lease);
                return Err(LoadError::at(&stored_key, reason));
            }
            lock.waiters.push_back(waiter);
        }
        Ok(())
    }

    /// Checks every invariant of the state; the error names the record at
    /// fault. Load runs it; tests run it after every op.
    /// The highest log index the state records (a lease's or session's
    /// id, a grant's index, a waiter's index): the state was applied at
    /// least that far. A stored applied position below it means the
    /// records and the position disagree, and replaying the log from that
    /// position would apply entries a second time.
    pub fn latest_index(&self) -> LogIndex {
        let leases = self.leases.keys().map(|id| id.0);
        let locks = self.locks.values().flat_map(|lock| {
            std::iter::once(lock.holder.granted_index.0).chain(
                lock.waiters
                    .iter()
                    .flat_map(|w| [w.enqueued_index.0, w.attempt.0]),
            )
        });
        let sessions = self.sessions.ids().map(|id| id.0);
        LogIndex(leases.chain(locks).chain(sessions).max().unwrap_or(0))
    }

    pub fn validate(&self) -> Result<(), LoadError> {
        if self.next_token.0 == 0 {
            return Err(LoadError::at(codec::NEXT_TOKEN_KEY, "token counter is 0"));
        }
        let mut tokens = BTreeSet::new();
        for (key, lock) in &self.locks {
            self.validate_lock(key, lock, &mut tokens)?;
        }
        for (id, lease) in &self.leases {
            let checked = if *id == lease.id {
                self.validate_lease(lease)
            } else {
                Err(format!("lease {} is stored as {id}", lease.id))
            };
            checked.map_err(|reason| LoadError::at(&lease_key(*id), reason))?;
        }
        self.sessions
            .validate()
            .map_err(|(session, reason)| LoadError::at(&session_key(session), reason))
    }

    /// One held lock: a valid name, a live holder lease that knows it holds
    /// the lock, a unique token below the counter, and a well-formed queue.
    fn validate_lock(
        &self,
        key: &LockKey,
        lock: &Lock,
        tokens: &mut BTreeSet<FencingToken>,
    ) -> Result<(), LoadError> {
        let stored_key = lock_key(key);
        let fail = |reason: String| Err(LoadError::at(&stored_key, reason));
        let holder = &lock.holder;
        if let Err(err) = validate_name(&key.name) {
            return fail(err.to_string());
        }
        if holder.token.0 == 0 || holder.token >= self.next_token {
            return fail(format!(
                "token {} is not in 1..{} (the token counter)",
                holder.token, self.next_token
            ));
        }
        if !tokens.insert(holder.token) {
            return fail(format!(
                "token {} is held by another lock too",
                holder.token
            ));
        }
        let holder_knows = self
            .leases
            .get(&holder.lease)
            .is_some_and(|lease| lease.held.contains(key));
        if !holder_knows {
            return fail(format!(
                "holder lease {} is missing or unaware",
                holder.lease
            ));
        }
        if holder.granted_index.0 < holder.lease.0 {
            return fail(format!("granted before its lease {} existed", holder.lease));
        }
        if key.kind == Kind::Lock && !holder.value.is_empty() {
            return fail("a lock's grant carries a value".into());
        }
        self.validate_queue(key, lock)
    }

    /// A queue: live, distinct waiters that know they wait, none of them the
    /// holder, in increasing index order.
    fn validate_queue(&self, key: &LockKey, lock: &Lock) -> Result<(), LoadError> {
        let mut seen = BTreeSet::new();
        let mut previous_index = None;
        for waiter in &lock.waiters {
            let stored_key = waiter_key(key, waiter.enqueued_index);
            let lease_knows = self
                .leases
                .get(&waiter.lease)
                .is_some_and(|lease| lease.waiting.contains(key));
            let reason = if !lease_knows {
                format!("waiter lease {} is missing or unaware", waiter.lease)
            } else if waiter.lease == lock.holder.lease {
                format!("lease {} both holds and waits", waiter.lease)
            } else if !seen.insert(waiter.lease) {
                format!("lease {} waits twice", waiter.lease)
            } else if previous_index.is_some_and(|previous| previous >= waiter.enqueued_index) {
                "queue is not in index order".to_string()
            } else if key.kind == Kind::Lock && !waiter.value.is_empty() {
                "a lock's waiter carries a value".to_string()
            } else {
                previous_index = Some(waiter.enqueued_index);
                continue;
            };
            return Err(LoadError::at(&stored_key, reason));
        }
        Ok(())
    }

    /// A lease's `held` and `waiting` sets match the locks and queues.
    fn validate_lease(&self, lease: &Lease) -> Result<(), String> {
        for key in &lease.held {
            let holds = self
                .locks
                .get(key)
                .is_some_and(|lock| lock.holder.lease == lease.id);
            if !holds {
                return Err(format!("believes it holds {key}, which it does not"));
            }
        }
        for key in &lease.waiting {
            let waits = self
                .locks
                .get(key)
                .is_some_and(|lock| lock.waiters.iter().any(|waiter| waiter.lease == lease.id));
            if !waits {
                return Err(format!("believes it waits for {key}, which it does not"));
            }
        }
        Ok(())
    }
}
