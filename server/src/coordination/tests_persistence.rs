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
    for (client, seq) in [(1, 1), (1, 2), (2, 1)] {
        let result = format!("result {client}/{seq}").into_bytes();
        let changes =
            h.state
                .record_session(ClientId(client), SequenceNumber(seq), result, h.index);
        h.persist(&changes);
    }
    h
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
        (lease, [codec::encode_lease(5), vec![0]].concat()),
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

#[test]
fn duplicate_request_returns_the_cached_result() {
    let mut h = busy_harness();
    assert_eq!(
        h.state.check_session(ClientId(1), SequenceNumber(2)),
        SessionCheck::Duplicate(b"result 1/2")
    );
    assert_eq!(
        h.state.check_session(ClientId(1), SequenceNumber(3)),
        SessionCheck::New
    );
    let changes = h.state.record_session(
        ClientId(1),
        SequenceNumber(3),
        b"r3".to_vec(),
        LogIndex(100),
    );
    assert_eq!(changes.len(), 1);
    h.persist(&changes);
    assert_eq!(h.reload(), h.state);
    assert_eq!(
        h.state.check_session(ClientId(1), SequenceNumber(3)),
        SessionCheck::Duplicate(b"r3")
    );
}

#[test]
fn request_below_the_window_is_too_old() {
    let mut sessions = Sessions::default();
    let client = ClientId(9);
    let last = SESSION_WINDOW + 10;
    for seq in 1..=last {
        sessions.record(
            client,
            SequenceNumber(seq),
            seq.to_be_bytes().to_vec(),
            LogIndex(seq),
        );
    }
    let oldest = last - SESSION_WINDOW + 1;
    let too_old = SessionCheck::TooOld {
        oldest_kept: SequenceNumber(oldest),
    };
    assert_eq!(sessions.check(client, SequenceNumber(oldest - 1)), too_old);
    assert_eq!(sessions.check(client, SequenceNumber(1)), too_old);
    let kept = oldest.to_be_bytes();
    assert_eq!(
        sessions.check(client, SequenceNumber(oldest)),
        SessionCheck::Duplicate(&kept)
    );
    let len = sessions.get(client).map(|s| s.results.len() as u64);
    assert_eq!(len, Some(SESSION_WINDOW));
}

#[test]
fn pipelined_requests_within_the_window_are_new_in_any_order() {
    let mut sessions = Sessions::default();
    let client = ClientId(3);
    sessions.record(client, SequenceNumber(5), b"5".to_vec(), LogIndex(1));
    assert_eq!(sessions.check(client, SequenceNumber(4)), SessionCheck::New);
    sessions.record(client, SequenceNumber(4), b"4".to_vec(), LogIndex(2));
    assert_eq!(
        sessions.check(client, SequenceNumber(4)),
        SessionCheck::Duplicate(b"4")
    );
    assert_eq!(
        sessions.check(client, SequenceNumber(5)),
        SessionCheck::Duplicate(b"5")
    );
}

#[test]
fn requests_without_client_or_seq_are_never_deduplicated() {
    let mut sessions = Sessions::default();
    for (client, seq) in [(0, 1), (1, 0), (0, 0)] {
        let touched = sessions.record(ClientId(client), SequenceNumber(seq), vec![1], LogIndex(1));
        assert!(touched.is_empty());
        assert_eq!(
            sessions.check(ClientId(client), SequenceNumber(seq)),
            SessionCheck::New
        );
    }
    assert!(sessions.is_empty());
}

#[test]
fn full_session_table_evicts_the_least_recently_active_client_lowest_id_first() {
    let mut h = Harness::new();
    fn record(h: &mut Harness, client: u64, index: u64) -> Changes {
        let changes = h.state.record_session(
            ClientId(client),
            SequenceNumber(1),
            vec![1],
            LogIndex(index),
        );
        h.persist(&changes);
        changes
    }
    for client in [5, 3, 4] {
        record(&mut h, client, 1);
    }
    for client in 0..(MAX_SESSIONS as u64 - 3) {
        record(&mut h, 1_000 + client, 2 + client);
    }
    assert_eq!(h.state.sessions().len(), MAX_SESSIONS);
    // Client 4 is active again, so it is no longer among the oldest.
    let renewed = h
        .state
        .record_session(ClientId(4), SequenceNumber(2), vec![2], LogIndex(20_000));
    h.persist(&renewed);
    // 3 and 5 tie on activity: the lower id goes first; then the oldest filler.
    for (client, evicted) in [(77, 3), (78, 5), (79, 1_000)] {
        let changes = record(&mut h, client, 20_000 + client);
        assert!(
            changes.contains(&(session_key(ClientId(evicted)), None)),
            "{changes:?}"
        );
        assert!(h.state.sessions().get(ClientId(evicted)).is_none());
        assert_eq!(h.state.sessions().len(), MAX_SESSIONS);
    }
    assert!(h.state.sessions().get(ClientId(4)).is_some());
    assert_eq!(h.reload(), h.state);
}

#[test]
#[should_panic(expected = "recorded twice")]
fn recording_a_request_twice_is_a_bug() {
    let mut sessions = Sessions::default();
    sessions.record(ClientId(1), SequenceNumber(1), vec![1], LogIndex(1));
    sessions.record(ClientId(1), SequenceNumber(1), vec![1], LogIndex(2));
}
