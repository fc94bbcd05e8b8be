//! Behaviour of leases, locks, elections and fencing checks.

use std::collections::BTreeMap;

use super::*;

pub(super) const BOUNDS: TtlBounds = TtlBounds {
    min_ttl_ms: 1_000,
    max_ttl_ms: 60_000,
};
pub(super) const TTL_MS: u64 = 10_000;

/// Applies ops at consecutive indexes, keeps a fake record store up to date
/// with their changes, and checks every invariant after each op.
pub(super) struct Harness {
    pub(super) state: Coordination,
    pub(super) index: LogIndex,
    pub(super) store: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Harness {
    pub(super) fn new() -> Harness {
        Harness {
            state: Coordination::new(BOUNDS),
            index: LogIndex(0),
            store: BTreeMap::new(),
        }
    }

    pub(super) fn apply(&mut self, op: Op) -> Applied {
        self.index = LogIndex(self.index.0 + 1);
        let applied = self.state.apply(self.index, op);
        self.persist(&applied.changes);
        if let Err(err) = self.state.validate() {
            panic!("invalid state after index {}: {err}", self.index);
        }
        applied
    }

    pub(super) fn persist(&mut self, changes: &Changes) {
        for (key, value) in changes {
            match value {
                Some(value) => self.store.insert(key.clone(), value.clone()),
                None => self.store.remove(key),
            };
        }
    }

    pub(super) fn reload(&self) -> Coordination {
        let records = self.store.clone();
        Coordination::load(BOUNDS, records).expect("persisted state loads")
    }

    pub(super) fn grant_lease(&mut self) -> LeaseId {
        match self.apply(Op::GrantLease { ttl_ms: TTL_MS }).result {
            Ok(Outcome::LeaseGranted { lease, .. }) => lease,
            other => panic!("lease not granted: {other:?}"),
        }
    }

    pub(super) fn acquire(
        &mut self,
        kind: Kind,
        name: &str,
        lease: LeaseId,
        wait: bool,
    ) -> Result<Outcome, CoordinationError> {
        let value = match kind {
            Kind::Lock => Vec::new(),
            Kind::Election => format!("candidate-{lease}").into_bytes(),
        };
        let name = name.to_string();
        self.apply(Op::Acquire {
            kind,
            name,
            lease,
            wait,
            value,
        })
        .result
    }

    /// Acquires a free lock and returns the new grant.
    pub(super) fn lock(&mut self, kind: Kind, name: &str, lease: LeaseId) -> Grant {
        match self.acquire(kind, name, lease, false) {
            Ok(Outcome::Acquired {
                grant,
                already_held: false,
            }) => grant,
            other => panic!("{kind} {name} not newly granted to {lease}: {other:?}"),
        }
    }

    pub(super) fn wait(&mut self, kind: Kind, name: &str, lease: LeaseId) -> usize {
        match self.acquire(kind, name, lease, true) {
            Ok(Outcome::Queued { position }) => position,
            other => panic!("{lease} not queued for {kind} {name}: {other:?}"),
        }
    }

    pub(super) fn release(&mut self, kind: Kind, name: &str, token: FencingToken) -> Applied {
        let name = name.to_string();
        self.apply(Op::Release { kind, name, token })
    }

    pub(super) fn holder(&self, kind: Kind, name: &str) -> Option<LeaseId> {
        self.state
            .describe(kind, name)
            .map(|lock| lock.holder.lease)
    }

    pub(super) fn queue(&self, kind: Kind, name: &str) -> Vec<LeaseId> {
        let lock = self.state.describe(kind, name);
        lock.map_or_else(Vec::new, |lock| {
            lock.waiters.iter().map(|w| w.lease).collect()
        })
    }
}

/// Applies `op` and asserts it was refused with `expected` and changed nothing.
fn assert_refused(h: &mut Harness, op: Op, expected: CoordinationError) {
    let before = h.state.clone();
    let applied = h.apply(op);
    assert_eq!(applied.result, Err(expected));
    assert!(
        applied.changes.is_empty(),
        "refusal wrote {:?}",
        applied.changes
    );
    assert!(
        applied.events.is_empty(),
        "refusal emitted {:?}",
        applied.events
    );
    assert_eq!(h.state, before, "refusal changed the state");
}

fn next_of(applied: &Applied) -> Option<Grant> {
    match &applied.result {
        Ok(Outcome::Released { next }) => next.clone(),
        other => panic!("not released: {other:?}"),
    }
}

#[test]
fn lease_id_is_the_index_of_the_granting_entry() {
    let mut h = Harness::new();
    h.apply(Op::RevokeLease { lease: LeaseId(99) });
    let lease = h.grant_lease();
    assert_eq!(lease, LeaseId(2));
    let stored = h.state.lease(lease).expect("granted lease exists");
    assert_eq!(
        (stored.ttl_ms, stored.granted_index()),
        (TTL_MS, LogIndex(2))
    );
}

#[test]
fn lease_ttl_outside_bounds_is_refused_naming_both_bounds() {
    let mut h = Harness::new();
    for ttl_ms in [999, 60_001, 0] {
        let applied = h.apply(Op::GrantLease { ttl_ms });
        let Err(CoordinationError::InvalidArgument { field, reason }) = applied.result else {
            panic!("ttl {ttl_ms} accepted: {:?}", applied.result);
        };
        assert_eq!(field, "ttl_ms");
        assert!(
            reason.contains("1000") && reason.contains("60000"),
            "{reason}"
        );
        assert!(applied.changes.is_empty());
    }
    assert_eq!(h.state.leases().count(), 0);
    for ttl_ms in [1_000, 60_000] {
        assert!(h.apply(Op::GrantLease { ttl_ms }).result.is_ok());
    }
}

#[test]
fn acquiring_a_free_lock_grants_it_with_a_new_token() {
    let mut h = Harness::new();
    let a = h.grant_lease();
    let grant = h.lock(Kind::Lock, "db", a);
    let expected = Grant {
        lease: a,
        token: FencingToken(1),
        value: Vec::new(),
        granted_index: LogIndex(2),
    };
    assert_eq!(grant, expected);
    assert_eq!(h.state.next_token(), FencingToken(2));
    assert_eq!(
        h.state.locks_of(a).collect::<Vec<_>>(),
        vec![(&LockKey::new(Kind::Lock, "db"), &expected)]
    );
    assert_eq!(h.state.lease(a).map(|l| l.held.len()), Some(1));
}

#[test]
fn acquiring_again_with_the_holding_lease_returns_the_same_grant_and_changes_nothing() {
    let mut h = Harness::new();
    let a = h.grant_lease();
    let grant = h.lock(Kind::Lock, "db", a);
    let before = h.state.clone();
    for wait in [false, true] {
        let applied = h.apply(Op::Acquire {
            kind: Kind::Lock,
            name: "db".into(),
            lease: a,
            wait,
            value: Vec::new(),
        });
        let expected = Outcome::Acquired {
            grant: grant.clone(),
            already_held: true,
        };
        assert_eq!(applied.result, Ok(expected));
        assert!(applied.changes.is_empty() && applied.events.is_empty());
    }
    assert_eq!(h.state, before);
    // Not counted: one release frees it.
    assert_eq!(next_of(&h.release(Kind::Lock, "db", grant.token)), None);
    assert_eq!(h.holder(Kind::Lock, "db"), None);
}

#[test]
fn acquiring_a_held_lock_without_waiting_names_the_holder_and_changes_nothing() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    let grant = h.lock(Kind::Lock, "db", a);
    let op = Op::Acquire {
        kind: Kind::Lock,
        name: "db".into(),
        lease: b,
        wait: false,
        value: Vec::new(),
    };
    let held = CoordinationError::Held {
        holder_lease: a,
        holder_token: grant.token,
    };
    assert_refused(&mut h, op.clone(), held.clone());
    // Already queued, a try-lock still fails and keeps the place in line.
    h.wait(Kind::Lock, "db", b);
    assert_refused(&mut h, op, held);
    assert_eq!(h.queue(Kind::Lock, "db"), vec![b]);
}

#[test]
fn waiters_are_granted_in_fifo_order_with_increasing_tokens() {
    let mut h = Harness::new();
    let leases: Vec<LeaseId> = (0..4).map(|_| h.grant_lease()).collect();
    let mut token = h.lock(Kind::Lock, "db", leases[0]).token;
    for (position, lease) in leases[1..].iter().enumerate() {
        assert_eq!(h.wait(Kind::Lock, "db", *lease), position);
    }
    for lease in &leases[1..] {
        let next = next_of(&h.release(Kind::Lock, "db", token)).expect("a waiter is next");
        assert_eq!(next.lease, *lease, "granted out of order");
        assert!(next.token > token, "token {} after {token}", next.token);
        assert_eq!(next.granted_index, h.index);
        token = next.token;
    }
    assert_eq!(next_of(&h.release(Kind::Lock, "db", token)), None);
    assert!(h.state.describe(Kind::Lock, "db").is_none());
}

#[test]
fn queueing_again_keeps_the_original_place() {
    let mut h = Harness::new();
    let (a, b, c) = (h.grant_lease(), h.grant_lease(), h.grant_lease());
    h.lock(Kind::Lock, "db", a);
    assert_eq!(h.wait(Kind::Lock, "db", b), 0);
    assert_eq!(h.wait(Kind::Lock, "db", c), 1);
    assert_eq!(h.wait(Kind::Lock, "db", b), 0);
    assert_eq!(h.queue(Kind::Lock, "db"), vec![b, c]);
    // Only the attempt of b's waiter moved on, to the resent wait.
    let lock = h.state.describe(Kind::Lock, "db").expect("held");
    let attempts: Vec<(LogIndex, LogIndex)> = lock
        .waiters
        .iter()
        .map(|w| (w.enqueued_index, w.attempt))
        .collect();
    assert_eq!(
        attempts,
        vec![(LogIndex(5), h.index), (LogIndex(6), LogIndex(6))]
    );
}

#[test]
fn release_hands_the_lock_to_the_next_waiter_with_events() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    let first = h.lock(Kind::Lock, "db", a);
    h.wait(Kind::Lock, "db", b);
    let applied = h.release(Kind::Lock, "db", first.token);
    let next = next_of(&applied).expect("b is next");
    assert_eq!((next.lease, next.token), (b, FencingToken(2)));
    let name = "db".to_string();
    let expected = vec![
        Event::Released {
            kind: Kind::Lock,
            name: name.clone(),
            lease: a,
            token: first.token,
        },
        Event::Granted {
            kind: Kind::Lock,
            name,
            lease: b,
            token: next.token,
            value: Vec::new(),
        },
    ];
    assert_eq!(applied.events, expected);
    assert!(h.state.lease(a).is_some_and(|l| l.held.is_empty()));
    assert!(h
        .state
        .lease(b)
        .is_some_and(|l| l.waiting.is_empty() && l.held.len() == 1));
}

#[test]
fn stale_release_is_rejected_and_changes_nothing() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    let first = h.lock(Kind::Lock, "db", a);
    h.wait(Kind::Lock, "db", b);
    let second = next_of(&h.release(Kind::Lock, "db", first.token)).expect("b is next");
    let op = Op::Release {
        kind: Kind::Lock,
        name: "db".into(),
        token: first.token,
    };
    let stale = CoordinationError::StaleToken {
        presented: first.token,
        current: Some(second.token),
    };
    assert_refused(&mut h, op, stale);
    // A token of another namespace's same-named election does not release it.
    let op = Op::Release {
        kind: Kind::Election,
        name: "db".into(),
        token: second.token,
    };
    let stale = CoordinationError::StaleToken {
        presented: second.token,
        current: None,
    };
    assert_refused(&mut h, op, stale);
    assert_eq!(h.holder(Kind::Lock, "db"), Some(b));
}

#[test]
fn releasing_a_lock_nobody_holds_is_a_stale_token_with_no_current() {
    let mut h = Harness::new();
    let op = Op::Release {
        kind: Kind::Lock,
        name: "never-locked".into(),
        token: FencingToken(7),
    };
    let stale = CoordinationError::StaleToken {
        presented: FencingToken(7),
        current: None,
    };
    assert_refused(&mut h, op, stale);
}

#[test]
fn expiry_releases_locks_and_grants_each_to_its_next_waiter() {
    let mut h = Harness::new();
    let (a, b, c) = (h.grant_lease(), h.grant_lease(), h.grant_lease());
    h.lock(Kind::Lock, "x", a);
    h.lock(Kind::Lock, "y", a);
    h.wait(Kind::Lock, "x", b);
    h.wait(Kind::Lock, "y", c);
    let applied = h.apply(Op::ExpireLeases { leases: vec![a] });
    assert_eq!(
        applied.result,
        Ok(Outcome::LeasesExpired { leases: vec![a] })
    );
    assert!(h.state.lease(a).is_none());
    assert_eq!(h.holder(Kind::Lock, "x"), Some(b));
    assert_eq!(h.holder(Kind::Lock, "y"), Some(c));
    let removed = Event::LeaseRemoved {
        lease: a,
        expired: true,
    };
    assert_eq!(applied.events.last(), Some(&removed));
    let granted: Vec<LeaseId> = applied
        .events
        .iter()
        .filter_map(|event| match event {
            Event::Granted { lease, .. } => Some(*lease),
            _ => None,
        })
        .collect();
    assert_eq!(granted, vec![b, c]);
    assert!(applied.changes.contains(&(lease_key(a), None)));
}

#[test]
fn expiry_skips_leases_that_are_already_gone() {
    let mut h = Harness::new();
    let a = h.grant_lease();
    h.apply(Op::RevokeLease { lease: a });
    let b = h.grant_lease();
    let applied = h.apply(Op::ExpireLeases {
        leases: vec![LeaseId(1000), a, b, b],
    });
    assert_eq!(
        applied.result,
        Ok(Outcome::LeasesExpired { leases: vec![b] })
    );
    assert_eq!(h.state.leases().count(), 0);
}

#[test]
fn expiring_a_holder_with_its_first_waiter_grants_the_second_waiter() {
    let mut h = Harness::new();
    let (a, b, c) = (h.grant_lease(), h.grant_lease(), h.grant_lease());
    let first = h.lock(Kind::Lock, "db", a);
    h.wait(Kind::Lock, "db", b);
    h.wait(Kind::Lock, "db", c);
    let applied = h.apply(Op::ExpireLeases { leases: vec![b, a] });
    assert_eq!(h.holder(Kind::Lock, "db"), Some(c));
    assert!(h.queue(Kind::Lock, "db").is_empty());
    let to_b = applied
        .events
        .iter()
        .any(|event| matches!(event, Event::Granted { lease, .. } if *lease == b));
    assert!(!to_b, "granted to a lease that died in the same entry");
    // Exactly one token was issued for the handover.
    let current = h.state.describe(Kind::Lock, "db").map(|l| l.holder.token);
    assert_eq!(current, Some(FencingToken(first.token.0 + 1)));
}

#[test]
fn revoke_releases_locks_and_leadership_and_removes_waits_and_candidacies() {
    let mut h = Harness::new();
    let (a, b, c) = (h.grant_lease(), h.grant_lease(), h.grant_lease());
    h.lock(Kind::Lock, "x", a);
    h.lock(Kind::Election, "e", a);
    h.lock(Kind::Lock, "y", b);
    h.lock(Kind::Election, "f", b);
    h.wait(Kind::Lock, "y", a);
    h.wait(Kind::Election, "f", a);
    h.wait(Kind::Lock, "x", c);
    let applied = h.apply(Op::RevokeLease { lease: a });
    assert_eq!(applied.result, Ok(Outcome::LeaseRevoked { lease: a }));
    assert!(h.state.lease(a).is_none());
    assert_eq!(h.state.locks_of(a).count(), 0);
    assert_eq!(h.holder(Kind::Lock, "x"), Some(c));
    assert_eq!(h.state.leader("e"), None);
    assert!(h.queue(Kind::Lock, "y").is_empty());
    assert!(h.queue(Kind::Election, "f").is_empty());
    assert_eq!(h.holder(Kind::Election, "f"), Some(b));
    let no_leader = Event::LeaderChanged {
        name: "e".into(),
        leader: None,
    };
    assert!(applied.events.contains(&no_leader), "{:?}", applied.events);
    let removed = Event::LeaseRemoved {
        lease: a,
        expired: false,
    };
    assert_eq!(applied.events.last(), Some(&removed));
}

#[test]
fn unknown_lease_is_refused_by_revoke_acquire_and_cancel() {
    let mut h = Harness::new();
    let lease = LeaseId(42);
    let not_found = CoordinationError::LeaseNotFound { lease };
    assert_refused(&mut h, Op::RevokeLease { lease }, not_found.clone());
    let acquire = Op::Acquire {
        kind: Kind::Lock,
        name: "db".into(),
        lease,
        wait: true,
        value: Vec::new(),
    };
    assert_refused(&mut h, acquire, not_found.clone());
    let cancel = Op::CancelWait {
        kind: Kind::Lock,
        name: "db".into(),
        lease,
        attempt: None,
    };
    assert_refused(&mut h, cancel, not_found);
}

#[test]
fn cancelled_waiter_is_skipped_when_the_lock_is_released() {
    let mut h = Harness::new();
    let (a, b, c) = (h.grant_lease(), h.grant_lease(), h.grant_lease());
    let first = h.lock(Kind::Lock, "db", a);
    h.wait(Kind::Lock, "db", b);
    h.wait(Kind::Lock, "db", c);
    let cancel = Op::CancelWait {
        kind: Kind::Lock,
        name: "db".into(),
        lease: b,
        attempt: None,
    };
    let applied = h.apply(cancel.clone());
    let cancelled = Outcome::WaitCancelled {
        was_waiting: true,
        held: None,
    };
    assert_eq!(applied.result, Ok(cancelled));
    assert_eq!(
        applied.changes,
        vec![(
            waiter_key(&LockKey::new(Kind::Lock, "db"), LogIndex(5)),
            None
        )]
    );
    assert!(h.state.lease(b).is_some_and(|l| l.waiting.is_empty()));
    let next = next_of(&h.release(Kind::Lock, "db", first.token));
    assert_eq!(next.map(|g| g.lease), Some(c));
    let again = Outcome::WaitCancelled {
        was_waiting: false,
        held: None,
    };
    assert_eq!(h.apply(cancel).result, Ok(again));
}

#[test]
fn a_cancel_from_an_attempt_that_was_resent_leaves_the_resent_wait_queued() {
    let mut h = Harness::new();
    let (a, b, c) = (h.grant_lease(), h.grant_lease(), h.grant_lease());
    let first = h.lock(Kind::Lock, "db", a);
    h.wait(Kind::Lock, "db", b);
    let first_attempt = h.index;
    h.wait(Kind::Lock, "db", c);
    // b's connection broke; its client resent the wait, which was applied
    // before the first attempt's cancel.
    assert_eq!(h.wait(Kind::Lock, "db", b), 0, "a resend keeps its place");
    let cancel = |attempt| Op::CancelWait {
        kind: Kind::Lock,
        name: "db".into(),
        lease: b,
        attempt: Some(attempt),
    };
    let stale = h.apply(cancel(first_attempt));
    let nothing = Outcome::WaitCancelled {
        was_waiting: false,
        held: None,
    };
    assert_eq!(stale.result, Ok(nothing));
    assert!(stale.changes.is_empty());
    let next = next_of(&h.release(Kind::Lock, "db", first.token));
    assert_eq!(next.map(|g| g.lease), Some(b), "b still waited first");

    // A cancel of the latest attempt does take a waiter out.
    h.wait(Kind::Lock, "db", a);
    let latest = h.index;
    let cancelled = h.apply(Op::CancelWait {
        kind: Kind::Lock,
        name: "db".into(),
        lease: a,
        attempt: Some(latest),
    });
    let done = Outcome::WaitCancelled {
        was_waiting: true,
        held: None,
    };
    assert_eq!(cancelled.result, Ok(done));
}

#[test]
fn cancelling_after_the_grant_won_the_race_returns_the_grant() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    let first = h.lock(Kind::Lock, "db", a);
    h.wait(Kind::Lock, "db", b);
    let granted = next_of(&h.release(Kind::Lock, "db", first.token));
    let applied = h.apply(Op::CancelWait {
        kind: Kind::Lock,
        name: "db".into(),
        lease: b,
        attempt: None,
    });
    let expected = Outcome::WaitCancelled {
        was_waiting: false,
        held: granted,
    };
    assert_eq!(applied.result, Ok(expected));
    assert!(applied.changes.is_empty());
    assert_eq!(h.holder(Kind::Lock, "db"), Some(b));
}

#[test]
fn locks_and_elections_are_separate_namespaces() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    let lock = h.lock(Kind::Lock, "svc", a);
    let election = h.lock(Kind::Election, "svc", b);
    assert_ne!(lock.token, election.token, "tokens are unique across locks");
    assert_eq!(h.holder(Kind::Lock, "svc"), Some(a));
    assert_eq!(h.state.leader("svc").map(|g| g.lease), Some(b));
    assert!(h.state.check_fence("svc", election.token).is_err());
    assert!(h.state.check_election_fence("svc", lock.token).is_err());
    assert!(h.state.check_fence("svc", lock.token).is_ok());
    assert!(h.state.check_election_fence("svc", election.token).is_ok());
}

#[test]
fn campaign_publishes_the_value_and_resign_hands_leadership_to_the_next_candidate() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    let applied = h.apply(Op::Acquire {
        kind: Kind::Election,
        name: "primary".into(),
        lease: a,
        wait: true,
        value: b"10.0.0.1:7000".to_vec(),
    });
    let Ok(Outcome::Acquired { grant: leader, .. }) = applied.result else {
        panic!("not elected: {:?}", applied.result);
    };
    let changed = Event::LeaderChanged {
        name: "primary".into(),
        leader: Some(leader.clone()),
    };
    assert_eq!(applied.events.last(), Some(&changed));
    assert_eq!(h.state.leader("primary"), Some(&leader));
    h.wait(Kind::Election, "primary", b);
    let resigned = h.release(Kind::Election, "primary", leader.token);
    let next = next_of(&resigned).expect("b is elected");
    assert_eq!(next.value, format!("candidate-{b}").into_bytes());
    let changed = Event::LeaderChanged {
        name: "primary".into(),
        leader: Some(next.clone()),
    };
    assert_eq!(resigned.events.last(), Some(&changed));
    let last = h.release(Kind::Election, "primary", next.token);
    let vacant = Event::LeaderChanged {
        name: "primary".into(),
        leader: None,
    };
    assert_eq!(last.events.last(), Some(&vacant));
    assert_eq!(h.state.leader("primary"), None);
}

#[test]
fn campaigning_again_keeps_leadership_and_its_value() {
    let mut h = Harness::new();
    let a = h.grant_lease();
    let leader = h.lock(Kind::Election, "primary", a);
    let applied = h.apply(Op::Acquire {
        kind: Kind::Election,
        name: "primary".into(),
        lease: a,
        wait: true,
        value: b"other".to_vec(),
    });
    let expected = Outcome::Acquired {
        grant: leader.clone(),
        already_held: true,
    };
    assert_eq!(applied.result, Ok(expected));
    assert_eq!(h.state.leader("primary"), Some(&leader));
}

#[test]
fn proclaim_replaces_the_value_only_with_the_current_token() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    let first = h.lock(Kind::Election, "primary", a);
    h.wait(Kind::Election, "primary", b);
    let applied = h.apply(Op::Proclaim {
        name: "primary".into(),
        token: first.token,
        value: b"new-address".to_vec(),
    });
    let leader = Grant {
        value: b"new-address".to_vec(),
        ..first.clone()
    };
    assert_eq!(
        applied.result,
        Ok(Outcome::Proclaimed {
            leader: leader.clone()
        })
    );
    assert_eq!(h.state.leader("primary"), Some(&leader));
    let second = next_of(&h.release(Kind::Election, "primary", first.token)).expect("b");
    let stale = Op::Proclaim {
        name: "primary".into(),
        token: first.token,
        value: b"old leader".to_vec(),
    };
    let error = CoordinationError::StaleToken {
        presented: first.token,
        current: Some(second.token),
    };
    assert_refused(&mut h, stale, error);
}

#[test]
fn fence_check_accepts_the_current_token_and_rejects_the_previous_holders() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    let first = h.lock(Kind::Lock, "db", a);
    assert_eq!(h.state.check_fence("db", first.token), Ok(()));
    h.wait(Kind::Lock, "db", b);
    let second = next_of(&h.release(Kind::Lock, "db", first.token)).expect("b");
    assert_eq!(h.state.check_fence("db", second.token), Ok(()));
    let previous = FenceError {
        presented: first.token,
        current: Some(second.token),
    };
    assert_eq!(h.state.check_fence("db", first.token), Err(previous));
    h.apply(Op::ExpireLeases { leases: vec![b] });
    let freed = FenceError {
        presented: second.token,
        current: None,
    };
    assert_eq!(h.state.check_fence("db", second.token), Err(freed));
}

#[test]
fn election_fence_check_follows_the_leadership_token() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    let first = h.lock(Kind::Election, "primary", a);
    h.wait(Kind::Election, "primary", b);
    h.apply(Op::RevokeLease { lease: a });
    let second = h.state.leader("primary").map(|g| g.token);
    let error = FenceError {
        presented: first.token,
        current: second,
    };
    assert_eq!(
        h.state.check_election_fence("primary", first.token),
        Err(error)
    );
    let second = second.expect("b leads");
    assert_eq!(h.state.check_election_fence("primary", second), Ok(()));
}
