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

    /// Finishes `batch` with the last applied index, writes it if it is a
    /// checkpoint (as the node does), and returns how many writes it held.
    fn write_batch(&mut self, mut batch: Batch) -> usize {
        let position = LogPosition {
            index: self.index,
            term: 1,
        };
        let writes = if self.machine.finish_batch(&mut batch, position) {
            let writes = batch.len();
            self.engine.write(batch, false).unwrap();
            writes
        } else {
            assert!(
                batch.is_empty(),
                "a batch that is no checkpoint stays empty"
            );
            0
        };
        self.machine.batch_written();
        writes
    }

    /// Finishes `batch` as a checkpoint, due or not, writes it, and returns
    /// how many writes it held.
    fn write_checkpoint(&mut self, mut batch: Batch) -> usize {
        let position = LogPosition {
            index: self.index,
            term: 1,
        };
        let new_entries = position.index > self.machine.applied().index;
        if !(new_entries && self.machine.finish_batch(&mut batch, position)) {
            self.machine.checkpoint(&mut batch);
        }
        let writes = batch.len();
        self.engine.write(batch, false).unwrap();
        self.machine.batch_written();
        writes
    }

    /// What a restart finds: the state machine opened again on the engine.
    fn reopened(&self) -> StateMachine {
        StateMachine::open(self.engine.clone(), &UnsafeSwitches::default()).unwrap()
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
    h.write_checkpoint(Batch::new(&h.engine));
    h.machine.reload().unwrap();
    h.machine = h.reopened();
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
                *writes += h.write_checkpoint(written);
            }
            result.result
        };
        let first = token_of(&step(h, acquire("a", leases[0])));
        step(h, acquire("a", leases[1]));
        step(h, release("a", first));
        let b = token_of(&step(h, acquire("b", leases[0])));
        step(h, release("b", b));
        if one_batch {
            *writes += h.write_checkpoint(batch);
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
        let reloaded = h.reopened();
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

/// Applies a lock-only workload, each entry in a batch of its own, and
/// returns its entries: a session and a lease, then `cycles` acquires and
/// releases of their own locks, none of them a key-value write.
fn lock_cycles(h: &mut Harness, cycles: usize) -> Vec<(u64, Command)> {
    let mut applied = Vec::new();
    let mut step = |h: &mut Harness, body, request| {
        let command = Command {
            command: Some(body),
            request,
        };
        h.index += 1;
        let mut batch = Batch::new(&h.engine);
        let output = h.machine.apply(&mut batch, h.index, command.clone());
        h.write_batch(batch);
        applied.push((h.index, command));
        output.unwrap().result
    };
    let session = match step(
        h,
        command::Command::OpenSession(latchkey_proto::state::v1::OpenSession {}),
        None,
    )
    .result
    {
        Some(command_result::Result::SessionOpened(opened)) => opened.session,
        other => panic!("no session: {other:?}"),
    };
    let grant = GrantLease {
        ttl_ms: 5_000,
        ..GrantLease::default()
    };
    let lease = match step(h, command::Command::GrantLease(grant), None).result {
        Some(command_result::Result::LeaseGranted(granted)) => granted.lease,
        other => panic!("lease not granted: {other:?}"),
    };
    let request = |seq| {
        Some(RequestId {
            client_id: session,
            seq,
            oldest_pending_seq: seq,
        })
    };
    for cycle in 0..cycles as u64 {
        let name = format!("lock-{}", cycle % 7);
        let acquire = Acquire {
            name: name.clone(),
            lease,
            wait: true,
            ..Acquire::default()
        };
        let granted = step(
            h,
            command::Command::Acquire(acquire),
            request(2 * cycle + 1),
        );
        let release = Release {
            name,
            token: token_of(&granted),
            ..Release::default()
        };
        step(
            h,
            command::Command::Release(release),
            request(2 * cycle + 2),
        );
    }
    applied
}

#[test]
fn batches_between_checkpoints_write_nothing_and_a_restart_applies_them_again() {
    let mut h = Harness::new();
    let checkpoint = h.machine.checkpointed();
    assert_eq!(checkpoint, h.machine.applied());
    let applied = lock_cycles(&mut h, 20);
    assert_eq!(h.machine.checkpointed(), checkpoint, "no batch was due");
    assert_eq!(h.machine.applied().index, h.index);
    let state = h.machine.coordination().read().clone();

    // A restart finds the last checkpoint: the engine never saw the cycles.
    let mut restarted = h.reopened();
    assert_eq!(restarted.applied(), checkpoint);
    assert_ne!(*restarted.coordination().read(), state);
    // Raft applies the committed entries after it again, to the same state,
    // and the retried requests among them get their first answers.
    for (index, command) in applied.iter().filter(|(i, _)| *i > checkpoint.index) {
        let mut batch = Batch::new(&h.engine);
        restarted
            .apply(&mut batch, *index, command.clone())
            .unwrap();
        let position = LogPosition {
            index: *index,
            term: 1,
        };
        if restarted.finish_batch(&mut batch, position) {
            h.engine.write(batch, false).unwrap();
        }
        restarted.batch_written();
    }
    assert_eq!(*restarted.coordination().read(), state);
}

#[test]
fn a_key_value_write_makes_its_batch_a_checkpoint_of_every_record_changed_since_the_last() {
    let mut h = Harness::new();
    lock_cycles(&mut h, 5);
    let before = h.machine.checkpointed();
    let put = h.apply(command::Command::Put(Put {
        key: "k".into(),
        value: "v".into(),
        ..Put::default()
    }));
    assert!(matches!(put.result, Some(command_result::Result::Put(_))));
    assert!(h.machine.checkpointed().index > before.index);
    assert_eq!(h.machine.checkpointed(), h.machine.applied());
    let restarted = h.reopened();
    assert_eq!(restarted.applied(), h.machine.applied());
    assert_eq!(
        *restarted.coordination().read(),
        *h.machine.coordination().read()
    );
    assert_eq!(h.value("k").unwrap().value, b"v");
}

#[test]
fn a_checkpoint_is_due_once_enough_entries_have_applied_since_the_last() {
    let mut h = Harness::new();
    let first = h.machine.checkpointed().index;
    let cycles = CHECKPOINT_ENTRIES as usize / 2 + 1;
    lock_cycles(&mut h, cycles);
    let checkpointed = h.machine.checkpointed().index;
    assert!(
        checkpointed >= first + CHECKPOINT_ENTRIES && checkpointed < h.index,
        "checkpoint at {checkpointed}, first {first}, applied {}",
        h.index
    );
    let restarted = h.reopened();
    assert_eq!(restarted.applied().index, checkpointed);
}

#[test]
fn a_checkpoint_is_due_once_the_commands_applied_since_the_last_reach_checkpoint_bytes() {
    let mut h = Harness::new();
    let lease = h.lease();
    let value = vec![7u8; coordination::MAX_ELECTION_VALUE_BYTES];
    let campaigns = CHECKPOINT_BYTES / value.len() + 1;
    for n in 0..campaigns {
        let campaign = h.apply(command::Command::Acquire(Acquire {
            kind: latchkey_proto::state::v1::GrantKind::Election as i32,
            name: format!("election-{n}"),
            lease,
            value: value.clone(),
            ..Acquire::default()
        }));
        token_of(&campaign);
    }
    let checkpointed = h.machine.checkpointed().index;
    assert!(
        checkpointed > 1 && h.index < CHECKPOINT_ENTRIES,
        "checkpoint at {checkpointed} after {} entries",
        h.index
    );
    let restarted = h.reopened();
    assert_eq!(restarted.applied().index, checkpointed);
}
