//! Record changes, load, and the exactly-once session table.

use std::collections::BTreeMap;

use super::codec;
use super::tests::{Harness, BOUNDS};
use super::*;

/// A state with a bit of everything: leases, held locks and elections with
/// values, queues, and sessions.
fn busy_harness() -> Harness {
    let mut h = Harness::new();
    let (a, b, c) = (h.grant_lease(), h.grant_lease(), h.grant_lease());
    h.lock(Kind::Lock, "x", a);
    h.lock(Kind::Election, "x", b);
    h.wait(Kind::Lock, "x", b);
    h.wait(Kind::Lock, "x", c);
    h.wait(Kind::Election, "x", c);
    h.lock(Kind::Lock, "y", c);
    let one = h.open_session();
    let two = h.open_session();
    for (session, seq) in [(one, 1), (one, 2), (two, 1)] {
        let result = format!("result {session}/{seq}").into_bytes();
        h.record(session, seq, 0, result);
    }
    h
}

impl Harness {
    pub(super) fn open_session(&mut self) -> SessionId {
        match self.apply(Op::OpenSession).result {
            Ok(Outcome::SessionOpened { session }) => session,
            other => panic!("session not opened: {other:?}"),
        }
    }

    /// Records a result as apply would, persisting its changes.
    fn record(
        &mut self,
        session: SessionId,
        seq: u64,
        oldest_pending: u64,
        result: Vec<u8>,
    ) -> Changes {
        assert_eq!(
            self.state.check_session(session, SequenceNumber(seq)),
            SessionCheck::New,
            "apply records only new requests"
        );
        let changes = self.state.record_session(
            session,
            SequenceNumber(seq),
            SequenceNumber(oldest_pending),
            result,
        );
        self.persist(&changes);
        changes
    }
}

fn load_error(records: BTreeMap<Vec<u8>, Vec<u8>>) -> LoadError {
    match Coordination::load(BOUNDS, records) {
        Err(err) => err,
        Ok(state) => panic!("inconsistent records loaded: {state:?}"),
    }
}

#[test]
fn changes_are_one_per_key_in_ascending_order() {
    let mut h = busy_harness();
    let applied = h.apply(Op::ExpireLeases {
        leases: vec![LeaseId(1), LeaseId(2)],
    });
    let keys: Vec<&Vec<u8>> = applied.changes.iter().map(|(key, _)| key).collect();
    assert!(
        keys.windows(2).all(|pair| pair[0] < pair[1]),
        "keys not strictly ascending: {keys:?}"
    );
    assert!(keys.iter().all(|key| key.starts_with(RECORD_PREFIX)));
    assert!(applied.changes.contains(&(
        NEXT_TOKEN_KEY.to_vec(),
        Some(codec::encode_next_token(h.state.next_token()))
    )));
}

#[test]
fn load_of_the_persisted_changes_rebuilds_the_live_state_after_every_op() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    assert_eq!(h.reload(), h.state);
    let first = h.lock(Kind::Election, "e", a);
    h.wait(Kind::Election, "e", b);
    assert_eq!(h.reload(), h.state);
    h.apply(Op::Proclaim {
        name: "e".into(),
        token: first.token,
        value: b"moved".to_vec(),
    });
    assert_eq!(h.reload(), h.state);
    h.release(Kind::Election, "e", first.token);
    assert_eq!(h.reload(), h.state);
    h.apply(Op::ExpireLeases { leases: vec![b] });
    assert_eq!(h.reload(), h.state);
    let busy = busy_harness();
    assert_eq!(busy.reload(), busy.state);
}

#[test]
fn load_accepts_records_in_any_order() {
    let h = busy_harness();
    let reversed: Vec<(Vec<u8>, Vec<u8>)> = h.store.clone().into_iter().rev().collect();
    let loaded = Coordination::load(BOUNDS, reversed).expect("loads");
    assert_eq!(loaded, h.state);
}

#[test]
fn load_of_no_records_is_the_initial_state() {
    let loaded = Coordination::load(BOUNDS, Vec::new()).expect("loads");
    assert_eq!(loaded, Coordination::new(BOUNDS));
    assert_eq!(loaded.next_token(), FencingToken(1));
}

#[test]
fn tokens_keep_increasing_after_a_restore_even_once_every_lock_is_free() {
    let mut h = Harness::new();
    let a = h.grant_lease();
    let mut issued = Vec::new();
    for name in ["p", "q", "p"] {
        let grant = h.lock(Kind::Lock, name, a);
        issued.push(grant.token);
        h.release(Kind::Lock, name, grant.token);
    }
    assert!(h.state.describe(Kind::Lock, "p").is_none());
    assert!(
        !h.store.keys().any(|key| key.starts_with(LOCK_PREFIX)),
        "free locks leave no record"
    );
    let mut restored = Harness {
        state: h.reload(),
        index: h.index,
        store: h.store.clone(),
    };
    assert_eq!(restored.state, h.state);
    for name in ["p", "q", "r"] {
        let token = restored.lock(Kind::Lock, name, a).token;
        assert!(
            issued.iter().all(|old| token > *old),
            "token {token} after restore, issued before {issued:?}"
        );
        issued.push(token);
    }
}

#[test]
fn load_refuses_a_holder_whose_lease_is_missing() {
    let mut h = Harness::new();
    let a = h.grant_lease();
    h.lock(Kind::Lock, "db", a);
    let mut records = h.store.clone();
    records.remove(&lease_key(a));
    let err = load_error(records);
    assert_eq!(err.key, "c/lock/ldb");
    assert!(err.reason.contains("does not exist"), "{err}");
}

#[test]
fn load_refuses_a_token_not_below_the_counter() {
    let mut h = Harness::new();
    let a = h.grant_lease();
    h.lock(Kind::Lock, "db", a);
    let mut records = h.store.clone();
    records.insert(
        NEXT_TOKEN_KEY.to_vec(),
        codec::encode_next_token(FencingToken(1)),
    );
    let err = load_error(records.clone());
    assert_eq!(err.key, "c/lock/ldb");
    records.remove(NEXT_TOKEN_KEY);
    assert_eq!(
        load_error(records).key,
        "c/lock/ldb",
        "a missing counter restarts at 1"
    );
}

#[test]
fn load_refuses_two_locks_sharing_a_token() {
    let mut h = Harness::new();
    let a = h.grant_lease();
    h.lock(Kind::Lock, "db", a);
    let mut records = h.store.clone();
    let copy = records[&lock_key(&LockKey::new(Kind::Lock, "db"))].clone();
    records.insert(lock_key(&LockKey::new(Kind::Lock, "dc")), copy);
    let err = load_error(records);
    assert!(err.reason.contains("another lock"), "{err}");
}

#[test]
fn load_refuses_a_waiter_for_a_lock_nobody_holds() {
    let mut h = Harness::new();
    let (a, b) = (h.grant_lease(), h.grant_lease());
    h.lock(Kind::Lock, "db", a);
    h.wait(Kind::Lock, "db", b);
    let mut records = h.store.clone();
    records.remove(&lock_key(&LockKey::new(Kind::Lock, "db")));
    let err = load_error(records);
    assert_eq!(err.key, r"c/wait/ldb\x00\x00\x00\x00\x00\x00\x00\x00\x04");
}

#[test]
fn load_refuses_records_that_do_not_decode() {
    let h = busy_harness();
    let lease = lease_key(LeaseId(1));
    let cases: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (lease.clone(), vec![1, 0, 0]),
        (lease.clone(), vec![9, 0, 0, 0, 0, 0, 0, 0, 1]),
        (lease, [codec::encode_lease(5, None), vec![0]].concat()),
        (b"c/unknown".to_vec(), vec![1]),
        (b"k/user-key".to_vec(), vec![1]),
        (
            b"c/lock/zname".to_vec(),
            codec::encode_next_token(FencingToken(1)),
        ),
        (b"c/wait/l\x00".to_vec(), vec![1]),
    ];
    for (key, value) in cases {
        let mut records = h.store.clone();
        records.insert(key.clone(), value.clone());
        let err = load_error(records);
        assert_eq!(err.key, key.escape_ascii().to_string(), "{err}");
    }
}

fn first_session(h: &Harness) -> SessionId {
    h.state.sessions().ids().next().expect("a session is open")
}

#[test]
fn duplicate_request_returns_the_cached_result() {
    let mut h = busy_harness();
    let one = first_session(&h);
    let expected = format!("result {one}/2").into_bytes();
    assert_eq!(
        h.state.check_session(one, SequenceNumber(2)),
        SessionCheck::Duplicate(&expected)
    );
    let changes = h.record(one, 3, 0, b"r3".to_vec());
    assert_eq!(changes.len(), 1, "one result record: {changes:?}");
    assert_eq!(h.reload(), h.state);
    assert_eq!(
        h.state.check_session(one, SequenceNumber(3)),
        SessionCheck::Duplicate(b"r3")
    );
}

#[test]
fn results_the_client_has_received_are_forgotten_and_their_retries_refused() {
    let mut h = Harness::new();
    let session = h.open_session();
    h.record(session, 1, 1, b"1".to_vec());
    h.record(session, 2, 1, b"2".to_vec());
    // The client received 1 and 2, and says so with request 3.
    let changes = h.record(session, 3, 3, b"3".to_vec());
    assert!(
        changes.contains(&(session_result_key(session, SequenceNumber(1)), None)),
        "{changes:?}"
    );
    let kept = h.state.sessions().get(session).map(|s| s.results.len());
    assert_eq!(kept, Some(1), "only the result the client has not received");
    assert_eq!(
        h.state.check_session(session, SequenceNumber(2)),
        SessionCheck::TooOld {
            oldest_kept: SequenceNumber(3)
        }
    );
    assert_eq!(h.reload(), h.state);
}

#[test]
fn a_session_keeps_at_most_its_window_of_unacknowledged_results() {
    let mut h = Harness::new();
    let session = h.open_session();
    let last = SESSION_WINDOW + 10;
    for seq in 1..=last {
        h.record(session, seq, 0, seq.to_be_bytes().to_vec());
    }
    let oldest = last - SESSION_WINDOW + 1;
    let too_old = SessionCheck::TooOld {
        oldest_kept: SequenceNumber(oldest),
    };
    assert_eq!(
        h.state.check_session(session, SequenceNumber(oldest - 1)),
        too_old
    );
    assert_eq!(h.state.check_session(session, SequenceNumber(1)), too_old);
    let kept = oldest.to_be_bytes();
    assert_eq!(
        h.state.check_session(session, SequenceNumber(oldest)),
        SessionCheck::Duplicate(&kept)
    );
    assert_eq!(h.reload(), h.state);
}

#[test]
fn pipelined_requests_are_new_in_any_order() {
    let mut h = Harness::new();
    let session = h.open_session();
    // 4 and 5 were sent together; 5 commits first, and says 4 is pending.
    h.record(session, 5, 4, b"5".to_vec());
    assert_eq!(
        h.state.check_session(session, SequenceNumber(4)),
        SessionCheck::New
    );
    h.record(session, 4, 4, b"4".to_vec());
    assert_eq!(
        h.state.check_session(session, SequenceNumber(4)),
        SessionCheck::Duplicate(b"4")
    );
    assert_eq!(
        h.state.check_session(session, SequenceNumber(5)),
        SessionCheck::Duplicate(b"5")
    );
}

#[test]
fn requests_without_session_or_seq_are_never_deduplicated() {
    let mut sessions = Sessions::default();
    for (session, seq) in [(0, 1), (1, 0), (0, 0)] {
        let changes = sessions.record(
            SessionId(session),
            SequenceNumber(seq),
            SequenceNumber(0),
            vec![1],
        );
        assert_eq!(changes, sessions::SessionChanges::default());
        assert_eq!(
            sessions.check(SessionId(session), SequenceNumber(seq)),
            SessionCheck::New
        );
    }
    assert!(sessions.is_empty());
}

#[test]
fn requests_of_a_session_that_is_not_open_are_refused_as_expired() {
    let mut h = busy_harness();
    assert_eq!(
        h.state.check_session(SessionId(999), SequenceNumber(1)),
        SessionCheck::Expired,
        "never opened"
    );
    let session = first_session(&h);
    let applied = h.apply(Op::ExpireSessions {
        sessions: vec![session, SessionId(999)],
    });
    assert_eq!(
        applied.result,
        Ok(Outcome::SessionsEnded {
            sessions: vec![session]
        })
    );
    assert_eq!(
        h.state.check_session(session, SequenceNumber(2)),
        SessionCheck::Expired,
        "even a request whose result was kept: the session is gone"
    );
    let id = session.0.to_be_bytes();
    let records_of_session = h.store.keys().filter(|key| {
        [SESSION_PREFIX, SESSION_RESULT_PREFIX]
            .iter()
            .any(|prefix| key.starts_with(&[*prefix, &id[..]].concat()))
    });
    assert_eq!(
        records_of_session.count(),
        0,
        "every record of the session is deleted"
    );
    let other = first_session(&h);
    let closed = h.apply(Op::CloseSession { session: other });
    assert!(closed.result.is_ok());
    assert!(h.state.sessions().is_empty());
    assert_eq!(h.reload(), h.state);
}

#[test]
fn a_full_table_refuses_new_sessions_and_evicts_none() {
    let mut h = Harness::new();
    // Straight to the state: the harness's check after every op would make
    // filling the table quadratic.
    for index in 1..=MAX_SESSIONS as u64 {
        let opened = h.state.apply(LogIndex(index), Op::OpenSession);
        assert!(opened.result.is_ok(), "{:?}", opened.result);
    }
    h.index = LogIndex(MAX_SESSIONS as u64);
    let refused = h.apply(Op::OpenSession);
    assert_eq!(
        refused.result,
        Err(CoordinationError::ResourceExhausted {
            what: "open sessions",
            limit: MAX_SESSIONS as u64
        })
    );
    assert!(refused.changes.is_empty());
    assert_eq!(h.state.sessions().len(), MAX_SESSIONS);
    assert!(
        h.state.sessions().get(SessionId(1)).is_some(),
        "the oldest stays"
    );
}

#[test]
fn records_of_the_earlier_session_format_are_ignored_on_load() {
    let mut h = busy_harness();
    h.store
        .insert(b"c/session/\0\0\0\0\0\0\0\x07".to_vec(), vec![1, 0, 0]);
    assert_eq!(h.reload(), h.state);
}

#[test]
#[should_panic(expected = "recorded twice")]
fn recording_a_request_twice_is_a_bug() {
    let mut h = Harness::new();
    let session = h.open_session();
    h.state
        .record_session(session, SequenceNumber(1), SequenceNumber(0), vec![1]);
    h.state
        .record_session(session, SequenceNumber(1), SequenceNumber(0), vec![1]);
}

#[test]
fn a_restored_state_grants_nothing_until_its_token_floor_is_raised() {
    let mut h = Harness::new();
    let lease = h.grant_lease();
    let before = h.lock(Kind::Lock, "a", lease);
    h.store
        .insert(RESTORE_PENDING_KEY.to_vec(), encode_restore_pending());
    h.state = h.reload();
    assert!(h.state.restore_pending());
    let refused = h.apply(Op::Acquire {
        kind: Kind::Lock,
        name: "b".into(),
        lease,
        wait: false,
        value: Vec::new(),
    });
    assert_eq!(refused.result, Err(CoordinationError::RestoreInProgress));
    assert!(refused.changes.is_empty());
    let floor = FencingToken(1 << 40);
    h.apply(Op::RaiseTokenFloor { floor });
    assert!(!h.state.restore_pending());
    assert!(
        !h.store.contains_key(RESTORE_PENDING_KEY),
        "the mark is gone"
    );
    let after = h.lock(Kind::Lock, "b", lease);
    assert!(after.token >= floor && after.token > before.token);
    assert_eq!(h.reload(), h.state);
}

#[test]
fn a_restore_moves_tokens_up_even_when_the_proposed_floor_is_low() {
    let mut h = Harness::new();
    let lease = h.grant_lease();
    let before = h.lock(Kind::Lock, "a", lease);
    h.store
        .insert(RESTORE_PENDING_KEY.to_vec(), encode_restore_pending());
    h.state = h.reload();
    // A leader whose wall clock reads 1970 proposes floor 0.
    h.apply(Op::RaiseTokenFloor {
        floor: FencingToken(0),
    });
    let after = h.lock(Kind::Lock, "b", lease);
    assert!(after.token.0 > before.token.0 + super::RESTORE_TOKEN_STEP - 1);
}
