//! Granting and removing leases. Removal releases everything the lease
//! holds and takes it out of every queue, in the entry that removes it.

use std::collections::BTreeSet;
use std::mem;
use std::sync::Arc;

use super::ops::{Caller, CoordinationError, Event, Outcome};
use super::types::{Lease, LeaseId, LockSet};
use super::{Coordination, Effects, Record, TtlBounds, MAX_LEASES};
use crate::types::LogIndex;

impl Coordination {
    pub(super) fn grant_lease(
        &mut self,
        index: LogIndex,
        ttl_ms: u64,
        caller: &Caller,
        fx: &mut Effects,
    ) -> Result<Outcome, CoordinationError> {
        let TtlBounds {
            min_ttl_ms,
            max_ttl_ms,
        } = self.ttl_bounds;
        if !(min_ttl_ms..=max_ttl_ms).contains(&ttl_ms) {
            return Err(CoordinationError::InvalidArgument {
                field: "ttl_ms",
                reason: format!("{ttl_ms} ms is outside {min_ttl_ms}..={max_ttl_ms} ms"),
            });
        }
        if self.leases.len() >= MAX_LEASES {
            return Err(CoordinationError::ResourceExhausted {
                what: "leases",
                limit: MAX_LEASES as u64,
            });
        }
        let owner = self.intern_owner(caller.identity.as_deref());
        let owned = self.owner_lease_count(owner.as_deref());
        if caller.max_owner_leases > 0 && owned >= caller.max_owner_leases {
            return Err(CoordinationError::ResourceExhausted {
                what: "leases per identity (--max-leases-per-identity)",
                limit: caller.max_owner_leases,
            });
        }
        let id = LeaseId(index.0);
        self.count_owner_lease(&owner, 1);
        let lease = Lease {
            id,
            ttl_ms,
            owner,
            held: LockSet::new(),
            waiting: LockSet::new(),
        };
        let replaced = self.leases.insert(id, lease);
        assert!(
            replaced.is_none(),
            "lease {id} granted twice: every index must be applied once"
        );
        fx.touched.insert(Record::Lease(id));
        Ok(Outcome::LeaseGranted { lease: id, ttl_ms })
    }

    pub(super) fn revoke_lease(
        &mut self,
        index: LogIndex,
        lease: LeaseId,
        fx: &mut Effects,
    ) -> Result<Outcome, CoordinationError> {
        if !self.leases.contains_key(&lease) {
            return Err(CoordinationError::LeaseNotFound { lease });
        }
        self.remove_leases(index, &BTreeSet::from([lease]), false, fx);
        Ok(Outcome::LeaseRevoked { lease })
    }

    pub(super) fn expire_leases(
        &mut self,
        index: LogIndex,
        leases: Vec<LeaseId>,
        fx: &mut Effects,
    ) -> Outcome {
        let alive: BTreeSet<LeaseId> = leases
            .into_iter()
            .filter(|lease| self.leases.contains_key(lease))
            .collect();
        self.remove_leases(index, &alive, true, fx);
        Outcome::LeasesExpired {
            leases: alive.into_iter().collect(),
        }
    }

    /// Removes live leases `ids`: all of them leave every queue first, so
    /// that no lock they free is handed to one of them; then each releases
    /// what it holds, in key order.
    fn remove_leases(
        &mut self,
        index: LogIndex,
        ids: &BTreeSet<LeaseId>,
        expired: bool,
        fx: &mut Effects,
    ) {
        for id in ids {
            self.leave_queues(*id, fx);
        }
        for id in ids {
            let lease = self.leases.get_mut(id).expect("removed leases are alive");
            let held = mem::take(&mut lease.held);
            for key in &held {
                self.release_holder(index, key, fx);
            }
            if let Some(lease) = self.leases.remove(id) {
                self.count_owner_lease(&lease.owner, -1);
            }
            fx.touched.insert(Record::Lease(*id));
            fx.events.push(Event::LeaseRemoved {
                lease: *id,
                expired,
            });
        }
    }

    fn leave_queues(&mut self, id: LeaseId, fx: &mut Effects) {
        let lease = self.leases.get_mut(&id).expect("removed leases are alive");
        let waiting = mem::take(&mut lease.waiting);
        for key in waiting {
            let lock = self.locks.get_mut(&key);
            let lock = lock.expect("a lease waits only for held locks");
            let position = lock.waiters.iter().position(|waiter| waiter.lease == id);
            let position = position.expect("a lease's waiting set matches the queues");
            // `position` was just found in this queue.
            let waiter = lock
                .waiters
                .remove(position)
                .expect("position is in the queue");
            fx.touched
                .insert(Record::Waiter(key, waiter.enqueued_index));
        }
    }

    /// Refuses `lease` to a caller that must own it and does not. An
    /// unknown lease passes: the op itself reports it as not found.
    pub fn check_owner(&self, lease: LeaseId, caller: &Caller) -> Result<(), CoordinationError> {
        if !caller.check_owner {
            return Ok(());
        }
        let Some(found) = self.leases.get(&lease) else {
            return Ok(());
        };
        if found.owner.as_deref() == caller.identity.as_deref() {
            Ok(())
        } else {
            Err(CoordinationError::NotOwner {
                lease,
                caller: caller.identity.clone().unwrap_or_default(),
            })
        }
    }

    /// The shared name of `owner`, so that the leases of one owner hold
    /// one allocation between them.
    pub(super) fn intern_owner(&self, owner: Option<&str>) -> Option<Arc<str>> {
        let owner = owner.filter(|o| !o.is_empty())?;
        match self.owner_leases.get_key_value(owner) {
            Some((name, _)) => Some(name.clone()),
            None => Some(Arc::from(owner)),
        }
    }

    /// How many live leases `owner` has (`None`: anonymous ones).
    pub fn owner_lease_count(&self, owner: Option<&str>) -> u64 {
        self.owner_leases
            .get(owner.unwrap_or(""))
            .copied()
            .unwrap_or(0)
    }

    pub(super) fn count_owner_lease(&mut self, owner: &Option<Arc<str>>, delta: i64) {
        let name = owner.clone().unwrap_or_else(|| Arc::from(""));
        let count = self.owner_leases.entry(name.clone()).or_insert(0);
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            self.owner_leases.remove(&name);
        }
    }
}
