use latchkey_proto::state::v1::{command, command_result, Acquire, GrantLease, Put, Release};
use latchkey_proto::v1::{error_details, Fence, RequestId};

use super::*;

struct Harness {
    _dir: tempfile::TempDir,
    engine: Engine,
    machine: StateMachine,
    index: u64,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let machine = StateMachine::open(engine.clone(), &UnsafeSwitches::default()).unwrap();
        Harness {
            _dir: dir,
            engine,
            machine,
            index: 0,
        }
    }

    fn open_session(&mut self) -> u64 {
        let opened = self.apply_with(
            command::Command::OpenSession(latchkey_proto::state::v1::OpenSession {}),
            None,
        );
        match opened.result {
            Some(command_result::Result::SessionOpened(opened)) => opened.session,
            other => panic!("no session: {other:?}"),
        }
    }

    fn apply_with(&mut self, body: command::Command, request: Option<RequestId>) -> CommandResult {
        self.index += 1;
        let mut batch = Batch::new(&self.engine);
        let command = Command {
            command: Some(body),
            request,
        };
        let output = self.machine.apply(&mut batch, self.index, command).unwrap();
        self.write_batch(batch);
        output.result
    }

    /// Finishes `batch` with the last applied index, writes it, and returns
    /// how many writes it held.
    fn write_batch(&mut self, mut batch: Batch) -> usize {
        let position = LogPosition {
            index: self.index,
            term: 1,
        };
        self.machine.finish_batch(&mut batch, position);
        let writes = batch.len();
        self.engine.write(batch, false).unwrap();
        self.machine.batch_written();
        writes
    }

    fn apply(&mut self, body: command::Command) -> CommandResult {
        self.apply_with(body, None)
    }

    fn lease(&mut self) -> u64 {
        match self
            .apply(command::Command::GrantLease(GrantLease {
                ttl_ms: 5_000,
                ..Default::default()
            }))
            .result
        {
            Some(command_result::Result::LeaseGranted(granted)) => granted.lease,
            other => panic!("lease not granted: {other:?}"),
        }
    }

    fn acquire(&mut self, name: &str, lease: u64) -> CommandResult {
        self.apply(command::Command::Acquire(Acquire {
            name: name.into(),
            lease,
            wait: true,
            ..Acquire::default()
        }))
    }

    fn fenced_put(&mut self, key: &str, value: &str, lock: &str, token: u64) -> CommandResult {
        self.apply(command::Command::Put(Put {
            key: key.into(),
            value: value.into(),
            fence: Some(Fence {
                name: lock.into(),
                token,
                ..Fence::default()
            }),
            expected_mod_revision: None,
        }))
    }

    fn value(&self, key: &str) -> Option<KvRecord> {
        Reader::new(
            self.engine.clone(),
            self.machine.coordination(),
            self.machine.auth(),
        )
        .get(key.as_bytes())
        .unwrap()
    }
}

fn token_of(result: &CommandResult) -> u64 {
    match &result.result {
        Some(command_result::Result::Granted(grant)) => grant.token,
        other => panic!("expected a grant, got {other:?}"),
    }
}

fn stale_details(result: &CommandResult) -> (u64, u64) {
    match &result.result {
        Some(command_result::Result::Error(error)) => {
            match error.details.as_ref().and_then(|d| d.detail.clone()) {
                Some(error_details::Detail::StaleToken(stale)) => (stale.presented, stale.current),
                other => panic!("expected stale token details, got {other:?}"),
            }
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn fenced_put_with_current_token_is_applied_and_records_the_token() {
    let mut h = Harness::new();
    let lease = h.lease();
    let token = token_of(&h.acquire("res", lease));
    let result = h.fenced_put("k", "v1", "res", token);
    assert!(
        matches!(result.result, Some(command_result::Result::Put(_))),
        "{result:?}"
    );
    let record = h.value("k").unwrap();
    assert_eq!(record.value, b"v1");
    assert_eq!(record.token, token);
    assert_eq!(record.fence_name, "res");
}

#[test]
fn stale_token_write_is_rejected_and_changes_nothing() {
    let mut h = Harness::new();
    let a = h.lease();
    let b = h.lease();
    let t1 = token_of(&h.acquire("res", a));
    h.fenced_put("k", "from-a", "res", t1);
    h.acquire("res", b);
    h.apply(command::Command::Release(Release {
        name: "res".into(),
        token: t1,
        ..Release::default()
    }));
    let t2 = h
        .machine
        .coordination()
        .read()
        .describe(Kind::Lock, "res")
        .unwrap()
        .holder
        .token
        .0;
    assert!(t2 > t1, "the next holder's token is higher");
    let before = h.value("k");
    let rejected = h.fenced_put("k", "late-a", "res", t1);
    assert_eq!(stale_details(&rejected), (t1, t2));
    assert_eq!(h.value("k"), before, "a rejected write changes nothing");
}

#[test]
fn with_fencing_disabled_a_stale_write_is_applied() {
    let mut h = Harness::new();
    let switches = UnsafeSwitches {
        no_fencing: true,
        ..UnsafeSwitches::default()
    };
    h.machine = StateMachine::open(h.engine.clone(), &switches).unwrap();
    let a = h.lease();
    let b = h.lease();
    let t_other = token_of(&h.acquire("other", a));
    let t_res = token_of(&h.acquire("res", b));
    h.fenced_put("k", "high", "res", t_res);
    let late = h.fenced_put("k", "low", "other", t_other);
    assert!(
        !matches!(late.result, Some(command_result::Result::Error(_))),
        "{late:?}"
    );
    assert_eq!(h.value("k").unwrap().value, b"low");
}

#[test]
fn token_lower_than_the_keys_stored_token_is_rejected() {
    let mut h = Harness::new();
    let a = h.lease();
    let b = h.lease();
    let t_other = token_of(&h.acquire("other", a));
    let t_res = token_of(&h.acquire("res", b));
    assert!(t_res > t_other);
    h.fenced_put("k", "high", "res", t_res);
    let rejected = h.fenced_put("k", "low", "other", t_other);
    assert_eq!(stale_details(&rejected), (t_other, t_res));
    assert_eq!(h.value("k").unwrap().value, b"high");
}

#[test]
fn compare_and_set_on_mod_revision() {
    let mut h = Harness::new();
    let put = |expected| {
        command::Command::Put(Put {
            key: "k".into(),
            value: "v".into(),
            fence: None,
            expected_mod_revision: expected,
        })
    };
    let created = h.apply(put(Some(0)));
    let Some(command_result::Result::Put(created)) = created.result else {
        panic!("{created:?}")
    };
    let again = h.apply(put(Some(0)));
    assert!(
        matches!(again.result, Some(command_result::Result::Error(_))),
        "key exists now"
    );
    let updated = h.apply(put(Some(created.revision)));
    assert!(matches!(
        updated.result,
        Some(command_result::Result::Put(_))
    ));
}

#[test]
fn retried_request_is_applied_once_and_returns_the_first_result() {
    let mut h = Harness::new();
    let session = h.open_session();
    let request = Some(RequestId {
        client_id: session,
        seq: 1,
        oldest_pending_seq: 1,
    });
    let grant = || {
        command::Command::GrantLease(GrantLease {
            ttl_ms: 5_000,
            ..Default::default()
        })
    };
    let first = h.apply_with(grant(), request);
    let leases_before = h.machine.coordination().read().leases().count();
    let retry = h.apply_with(grant(), request);
    assert_eq!(first, retry, "the retry gets the original result");
    assert_eq!(
        h.machine.coordination().read().leases().count(),
        leases_before,
        "applied once"
    );
}

#[test]
fn request_of_an_unknown_session_is_refused_as_expired_and_changes_nothing() {
    let mut h = Harness::new();
    let request = Some(RequestId {
        client_id: 42,
        seq: 1,
        oldest_pending_seq: 1,
    });
    let refused = h.apply_with(
        command::Command::GrantLease(GrantLease {
            ttl_ms: 5_000,
            ..Default::default()
        }),
        request,
    );
    let Some(command_result::Result::Error(error)) = refused.result else {
        panic!("not refused: {refused:?}");
    };
    assert_eq!(error.code, Code::FailedPrecondition as i32);
    assert!(matches!(
        error.details.and_then(|d| d.detail),
        Some(error_details::Detail::SessionExpired(
            latchkey_proto::v1::SessionExpired {
                session: 42,
                seq: 1
            }
        ))
    ));
    assert_eq!(h.machine.coordination().read().leases().count(), 0);
}

#[test]
fn tokens_keep_increasing_after_reload() {
    let mut h = Harness::new();
    let lease = h.lease();
    let t1 = token_of(&h.acquire("a", lease));
    h.machine.reload().unwrap();
    let reopened = StateMachine::open(h.engine.clone(), &UnsafeSwitches::default()).unwrap();
    h.machine = reopened;
    let t2 = token_of(&h.acquire("b", lease));
    assert!(t2 > t1, "token after restart {t2} must exceed {t1}");
}

#[test]
fn entries_applied_into_one_batch_see_each_others_writes_before_it_is_written() {
    let mut h = Harness::new();
    let mut batch = Batch::new(&h.engine);
    let put = |key: &str, value: &str, expected: Option<u64>| Command {
        command: Some(command::Command::Put(Put {
            key: key.into(),
            value: value.into(),
            expected_mod_revision: expected,
            ..Put::default()
        })),
        request: None,
    };
    // Entry 1 creates the key; entry 2's compare-and-set expects entry 1's
    // revision, which only the overlay knows; entry 3 expects the key absent.
    let first = h
        .machine
        .apply(&mut batch, 1, put("k", "a", Some(0)))
        .unwrap();
    assert!(matches!(
        first.result.result,
        Some(command_result::Result::Put(_))
    ));
    let second = h
        .machine
        .apply(&mut batch, 2, put("k", "b", Some(1)))
        .unwrap();
    assert!(
        matches!(second.result.result, Some(command_result::Result::Put(_))),
        "{:?}",
        second.result
    );
    let third = h
        .machine
        .apply(&mut batch, 3, put("k", "c", Some(0)))
        .unwrap();
    assert!(
        matches!(third.result.result, Some(command_result::Result::Error(_))),
        "the key exists as of entry 2: {:?}",
        third.result
    );
    assert_eq!(
        h.machine.read_kv(&keys::kv(b"k")).unwrap().unwrap().value,
        b"b"
    );
    // Nothing is in the engine until the batch is written.
    assert!(h
        .engine
        .get_message::<KvRecord>(CF_STATE, &keys::kv(b"k"))
        .unwrap()
        .is_none());
    h.machine
        .finish_batch(&mut batch, LogPosition { index: 3, term: 1 });
    h.engine.write(batch, false).unwrap();
    h.machine.batch_written();
    let stored = h.machine.read_kv(&keys::kv(b"k")).unwrap().unwrap();
    assert_eq!(
        (
            stored.value.as_slice(),
            stored.create_revision,
            stored.mod_revision
        ),
        (&b"b"[..], 1, 2)
    );
}

#[test]
fn records_several_entries_of_a_batch_change_are_written_once_at_their_latest_value() {
    // The same entries applied into one batch and one batch per entry: the
    // first writes fewer records (the token counter, the session, lock `a`
    // and its waiter change more than once), and both load back as the
    // state they applied.
    let acquire = |name: &str, lease| {
        command::Command::Acquire(Acquire {
            name: name.into(),
            lease,
            wait: true,
            ..Acquire::default()
        })
    };
    let release = |name: &str, token| {
        command::Command::Release(Release {
            name: name.into(),
            token,
            ..Release::default()
        })
    };
    let mut batched = Harness::new();
    let mut one_by_one = Harness::new();
    let mut writes = [0, 0];
    let mut second_lease = 0;
    let runs = [(&mut batched, true), (&mut one_by_one, false)];
    for ((h, one_batch), writes) in runs.into_iter().zip(writes.iter_mut()) {
        let session = h.open_session();
        let leases = [h.lease(), h.lease()];
        second_lease = leases[1];
        let mut batch = Batch::new(&h.engine);
        let mut seq = 0;
        let mut step = |h: &mut Harness, body| {
            h.index += 1;
            seq += 1;
            let command = Command {
                command: Some(body),
                request: Some(RequestId {
                    client_id: session,
                    seq,
                    oldest_pending_seq: seq,
                }),
            };
            let result = h.machine.apply(&mut batch, h.index, command).unwrap();
            if !one_batch {
                let written = std::mem::replace(&mut batch, Batch::new(&h.engine));
                *writes += h.write_batch(written);
            }
            result.result
        };
        let first = token_of(&step(h, acquire("a", leases[0])));
        step(h, acquire("a", leases[1]));
        step(h, release("a", first));
        let b = token_of(&step(h, acquire("b", leases[0])));
        step(h, release("b", b));
        if one_batch {
            *writes += h.write_batch(batch);
        }
    }
    let applied = batched.machine.coordination().read().clone();
    assert_eq!(applied, one_by_one.machine.coordination().read().clone());
    let a = applied
        .describe(Kind::Lock, "a")
        .expect("a was handed over");
    assert_eq!(a.holder.lease, LeaseId(second_lease));
    assert!(applied.describe(Kind::Lock, "b").is_none());
    for h in [&batched, &one_by_one] {
        let reloaded = StateMachine::open(h.engine.clone(), &UnsafeSwitches::default()).unwrap();
        assert_eq!(*reloaded.coordination().read(), applied);
        assert_eq!(reloaded.applied().index, h.index);
    }
    assert!(
        writes[0] < writes[1],
        "one batch wrote {} records, one per entry {}",
        writes[0],
        writes[1]
    );
}
