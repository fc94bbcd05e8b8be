//! Validation of names and values, and the bounds on state growth.

use super::tests::{Harness, BOUNDS, TTL_MS};
use super::*;

#[test]
fn invalid_names_are_refused_and_change_nothing() {
    assert!(validate_name(&"n".repeat(MAX_NAME_BYTES)).is_ok());
    assert!(validate_name("ünïcode/ok-name.1").is_ok());
    let mut h = Harness::new();
    let a = h.grant_lease();
    let too_long = "n".repeat(MAX_NAME_BYTES + 1);
    for name in ["", "tab\there", "nul\0", "del\u{7f}", too_long.as_str()] {
        let Err(CoordinationError::InvalidArgument { field, .. }) = validate_name(name) else {
            panic!("name {name:?} accepted");
        };
        assert_eq!(field, "name");
        let op = Op::Acquire {
            kind: Kind::Lock,
            name: name.to_string(),
            lease: a,
            wait: false,
            value: Vec::new(),
        };
        let before = h.state.clone();
        assert!(h.apply(op).result.is_err());
        assert_eq!(h.state, before);
    }
}

#[test]
fn values_are_refused_on_locks_and_bounded_on_elections() {
    let mut h = Harness::new();
    let a = h.grant_lease();
    let acquire = |kind, value: Vec<u8>| Op::Acquire {
        kind,
        name: "v".into(),
        lease: a,
        wait: false,
        value,
    };
    for (kind, len) in [
        (Kind::Lock, 1),
        (Kind::Election, MAX_ELECTION_VALUE_BYTES + 1),
    ] {
        let applied = h.apply(acquire(kind, vec![7; len]));
        let Err(CoordinationError::InvalidArgument { field, .. }) = applied.result else {
            panic!("{kind} value of {len} bytes accepted");
        };
        assert_eq!(field, "value");
    }
    let max = vec![7; MAX_ELECTION_VALUE_BYTES];
    assert!(h.apply(acquire(Kind::Election, max)).result.is_ok());
}

/// Applies ops at consecutive indexes without the per-op full check, for
/// tests that build states too large to check after every op.
fn apply_fast(
    state: &mut Coordination,
    index: &mut u64,
    op: Op,
) -> Result<Outcome, CoordinationError> {
    *index += 1;
    state.apply(LogIndex(*index), op).result
}

#[test]
fn a_full_queue_refuses_another_waiter() {
    let mut state = Coordination::new(BOUNDS);
    let mut index = 0;
    let lease_op = || Op::GrantLease { ttl_ms: TTL_MS };
    let acquire = |lease| Op::Acquire {
        kind: Kind::Lock,
        name: "busy".into(),
        lease,
        wait: true,
        value: Vec::new(),
    };
    for _ in 0..=MAX_WAITERS_PER_LOCK {
        apply_fast(&mut state, &mut index, lease_op()).expect("lease granted");
        let lease = LeaseId(index);
        apply_fast(&mut state, &mut index, acquire(lease)).expect("acquired or queued");
    }
    apply_fast(&mut state, &mut index, lease_op()).expect("lease granted");
    let lease = LeaseId(index);
    let refused = apply_fast(&mut state, &mut index, acquire(lease));
    let exhausted = CoordinationError::ResourceExhausted {
        what: "waiters per lock",
        limit: MAX_WAITERS_PER_LOCK as u64,
    };
    assert_eq!(refused, Err(exhausted));
    state.validate().expect("state stays consistent");
}

#[test]
fn a_lease_holding_its_limit_cannot_take_another_lock() {
    let mut state = Coordination::new(BOUNDS);
    let mut index = 0;
    apply_fast(&mut state, &mut index, Op::GrantLease { ttl_ms: TTL_MS }).expect("lease granted");
    let acquire = |name: String| Op::Acquire {
        kind: Kind::Lock,
        name,
        lease: LeaseId(1),
        wait: false,
        value: Vec::new(),
    };
    for n in 0..MAX_LOCKS_PER_LEASE {
        apply_fast(&mut state, &mut index, acquire(format!("l{n}"))).expect("acquired");
    }
    let refused = apply_fast(&mut state, &mut index, acquire("one-more".into()));
    let exhausted = CoordinationError::ResourceExhausted {
        what: "locks held or awaited per lease",
        limit: MAX_LOCKS_PER_LEASE as u64,
    };
    assert_eq!(refused, Err(exhausted));
    // Re-acquiring a held lock is not growth and still succeeds.
    assert!(apply_fast(&mut state, &mut index, acquire("l0".into())).is_ok());
}
