//! The leader's lease clock: when each lease runs out, on this node's
//! monotonic clock.
//!
//! Only the leader keeps deadlines; a keepalive renews one in memory, with
//! no Raft write. Expiry is decided here but takes effect only through a
//! committed `ExpireLeases` entry, proposed after a ReadIndex round has
//! confirmed that this node is still the leader (a deposed or paused leader
//! cannot revoke leases).
//!
//! Why a client can trust its own deadline (Invariant 4): the client
//! computes `send time of its last acknowledged keepalive + TTL`. The leader
//! received that keepalive after it was sent and set its deadline to
//! `receive time + TTL`, which is later. A new leader restarts every lease
//! at its full TTL when it takes over, and answers keepalives only after it
//! has applied an entry of its own term ([`LeaseClock::ready`]): by then
//! every expiry proposed by an earlier leader has been applied, so no
//! earlier leader's decision can land after a keepalive this leader
//! acknowledged. (Clock rates are assumed to agree within the drift the
//! client's margin allows; see docs/semantics.md.)
//!
//! A lease past its deadline is never renewed ([`LeaseClock::keep_alive`]
//! answers `NotFound`): an `ExpireLeases` entry naming it may already be
//! proposed, and a renewal acknowledged now would be undone when that entry
//! applies. Every lease in a proposed expiry has a deadline at or before the
//! proposal, so this closes that race. (Found by the deterministic
//! simulator, seed 15.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::coordination::{Coordination, LeaseId};

/// Most leases expired by one entry.
pub const MAX_EXPIRED_PER_ENTRY: usize = 1000;
/// An expiry round whose ReadIndex or proposal gets no answer in this time
/// is abandoned and retried.
pub const EXPIRY_ROUND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    ttl: Duration,
}

/// Lease deadlines while this node leads; empty otherwise.
#[derive(Debug, Default)]
pub struct LeaseClock {
    leading: bool,
    /// The index of this leader's first entry; keepalives wait until it is applied.
    ready_index: u64,
    ready: bool,
    deadlines: BTreeMap<LeaseId, Deadline>,
    /// The expiry round in flight: its ReadIndex request id and when it started.
    round: Option<(u64, Instant)>,
}

/// The answer to a keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    Renewed {
        ttl_ms: u64,
    },
    NotFound,
    /// This node leads but has not yet applied an entry of its term.
    NotReady,
}

impl LeaseClock {
    /// Starts leading: every lease gets its full TTL from `now`.
    pub fn lead(&mut self, now: Instant, ready_index: u64, state: &Coordination) {
        self.leading = true;
        self.ready = false;
        self.ready_index = ready_index;
        self.round = None;
        self.deadlines = state
            .leases()
            .map(|lease| {
                let ttl = Duration::from_millis(lease.ttl_ms);
                (lease.id, Deadline { at: now + ttl, ttl })
            })
            .collect();
    }

    /// Stops leading: deadlines are meaningless on a follower.
    pub fn follow(&mut self) {
        *self = LeaseClock::default();
    }

    pub fn leading(&self) -> bool {
        self.leading
    }

    /// Called after each apply; the clock is ready once this leader's first
    /// entry is applied.
    pub fn applied(&mut self, applied_index: u64) {
        if self.leading && applied_index >= self.ready_index {
            self.ready = true;
        }
    }

    pub fn ready(&self) -> bool {
        self.leading && self.ready
    }

    /// A lease was granted (applied) while leading.
    pub fn granted(&mut self, now: Instant, lease: LeaseId, ttl_ms: u64) {
        if self.leading {
            let ttl = Duration::from_millis(ttl_ms);
            self.deadlines
                .insert(lease, Deadline { at: now + ttl, ttl });
        }
    }

    /// A lease was revoked or expired (applied).
    pub fn removed(&mut self, lease: LeaseId) {
        self.deadlines.remove(&lease);
    }

    pub fn keep_alive(&mut self, now: Instant, lease: LeaseId) -> KeepAlive {
        if !self.ready() {
            return KeepAlive::NotReady;
        }
        match self.deadlines.get_mut(&lease) {
            // Doomed: an expiry naming it may be in flight (see module docs).
            Some(deadline) if deadline.at <= now => KeepAlive::NotFound,
            Some(deadline) => {
                deadline.at = now + deadline.ttl;
                KeepAlive::Renewed {
                    ttl_ms: deadline.ttl.as_millis() as u64,
                }
            }
            None => KeepAlive::NotFound,
        }
    }

    /// Time left on `lease`, if this node leads and knows it.
    pub fn remaining(&self, now: Instant, lease: LeaseId) -> Option<Duration> {
        self.deadlines
            .get(&lease)
            .map(|deadline| deadline.at.saturating_duration_since(now))
    }

    /// Leases whose deadline has passed, when a new expiry round may start.
    pub fn due(&mut self, now: Instant) -> Vec<LeaseId> {
        if !self.ready() {
            return Vec::new();
        }
        if let Some((_, started)) = self.round {
            if now.duration_since(started) < EXPIRY_ROUND_TIMEOUT {
                return Vec::new();
            }
            self.round = None;
        }
        self.expired(now)
    }

    /// Leases whose deadline has passed (re-checked when the round's
    /// ReadIndex returns, since keepalives may have come in meanwhile).
    pub fn expired(&self, now: Instant) -> Vec<LeaseId> {
        self.deadlines
            .iter()
            .filter(|(_, deadline)| deadline.at <= now)
            .map(|(lease, _)| *lease)
            .take(MAX_EXPIRED_PER_ENTRY)
            .collect()
    }

    /// Records that an expiry round started with ReadIndex request `id`.
    pub fn start_round(&mut self, id: u64, now: Instant) {
        self.round = Some((id, now));
    }

    /// Whether `id` is the ReadIndex request of the round in flight; ends the round.
    pub fn finish_round(&mut self, id: u64) -> bool {
        if self.round.is_some_and(|(round, _)| round == id) {
            self.round = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordination::{Op, TtlBounds};
    use crate::types::LogIndex;

    fn state_with_lease(ttl_ms: u64) -> (Coordination, LeaseId) {
        let mut state = Coordination::new(TtlBounds {
            min_ttl_ms: 1,
            max_ttl_ms: 1_000_000,
        });
        state.apply(LogIndex(1), Op::GrantLease { ttl_ms });
        (state, LeaseId(1))
    }

    #[test]
    fn new_leader_restarts_every_lease_at_its_full_ttl() {
        let (state, lease) = state_with_lease(1000);
        let mut clock = LeaseClock::default();
        let start = Instant::now();
        clock.lead(start, 5, &state);
        clock.applied(5);
        assert!(clock.due(start + Duration::from_millis(999)).is_empty());
        assert_eq!(clock.due(start + Duration::from_millis(1000)), vec![lease]);
    }

    #[test]
    fn keepalives_wait_until_the_leaders_first_entry_is_applied() {
        let (state, lease) = state_with_lease(1000);
        let mut clock = LeaseClock::default();
        let start = Instant::now();
        clock.lead(start, 5, &state);
        clock.applied(4);
        assert_eq!(clock.keep_alive(start, lease), KeepAlive::NotReady);
        assert!(
            clock.due(start + Duration::from_secs(10)).is_empty(),
            "no expiry before ready"
        );
        clock.applied(5);
        assert_eq!(
            clock.keep_alive(start, lease),
            KeepAlive::Renewed { ttl_ms: 1000 }
        );
    }

    #[test]
    fn keepalive_pushes_the_deadline_back() {
        let (state, lease) = state_with_lease(1000);
        let mut clock = LeaseClock::default();
        let start = Instant::now();
        clock.lead(start, 1, &state);
        clock.applied(1);
        clock.keep_alive(start + Duration::from_millis(900), lease);
        assert!(clock.due(start + Duration::from_millis(1500)).is_empty());
        assert_eq!(clock.due(start + Duration::from_millis(1900)), vec![lease]);
    }

    #[test]
    fn keepalive_after_the_deadline_does_not_revive_the_lease() {
        let (state, lease) = state_with_lease(1000);
        let mut clock = LeaseClock::default();
        let start = Instant::now();
        clock.lead(start, 1, &state);
        clock.applied(1);
        let late = start + Duration::from_millis(1000);
        // The round is proposed; its entry has not applied yet.
        assert_eq!(clock.due(late), vec![lease]);
        clock.start_round(7, late);
        assert!(clock.finish_round(7));
        assert_eq!(clock.expired(late), vec![lease]);
        let keepalive = late + Duration::from_millis(5);
        assert_eq!(clock.keep_alive(keepalive, lease), KeepAlive::NotFound);
        assert_eq!(clock.expired(keepalive), vec![lease], "still doomed");
    }

    #[test]
    fn a_follower_keeps_no_deadlines() {
        let (state, lease) = state_with_lease(1000);
        let mut clock = LeaseClock::default();
        let start = Instant::now();
        clock.lead(start, 1, &state);
        clock.applied(1);
        clock.follow();
        assert_eq!(clock.keep_alive(start, lease), KeepAlive::NotReady);
        assert!(clock.due(start + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn one_round_at_a_time() {
        let (state, lease) = state_with_lease(10);
        let mut clock = LeaseClock::default();
        let start = Instant::now();
        clock.lead(start, 1, &state);
        clock.applied(1);
        let later = start + Duration::from_millis(20);
        assert_eq!(clock.due(later), vec![lease]);
        clock.start_round(42, later);
        assert!(clock.due(later).is_empty(), "round in flight");
        assert!(clock.finish_round(42));
        assert_eq!(clock.due(later), vec![lease]);
    }
}
