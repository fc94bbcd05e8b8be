//! The checker's own tests: each check that no broken variant exercises
//! flags a violation planted in a hand-made history, and stays quiet on the
//! same history without it.
//!
//! Not done yet: the lease-safety and fenced-write checks are shown to
//! fail only through broken variants, not here.

use latchkey_proto::state::v1::{
    command, command_result, Acquire, Command, CommandResult, GrantKind, GrantLease, LeaseGranted,
    Put, PutResult, Queued, Release,
};
use latchkey_proto::v1::RequestId;
use latchkey_server::coordination::{Event, FencingToken, Kind, LeaseId, SessionId};
use latchkey_server::storage::raft_log::BOOTSTRAP_INDEX;
use prost::Message as _;

use crate::checker::{AppliedEntry, Checker, Observation};

/// Feeds a history to a checker, one entry per index after the bootstrap
/// snapshot, as node 1 applied it at virtual time `index` ms.
struct History {
    checker: Checker,
    index: u64,
}

impl History {
    fn new() -> History {
        History {
            checker: Checker::new(),
            // Entries follow the bootstrap snapshot.
            index: BOOTSTRAP_INDEX,
        }
    }

    fn apply(
        &mut self,
        command: command::Command,
        request: Option<RequestId>,
        result: command_result::Result,
        events: Vec<Event>,
    ) {
        self.index += 1;
        let data = Command {
            command: Some(command),
            request,
        }
        .encode_to_vec();
        let entry = AppliedEntry {
            index: self.index,
            term: 1,
            digest: self.index,
            data,
            result: Some(CommandResult {
                result: Some(result),
            }),
        };
        self.checker.applied(1, entry, events, self.index * 1000);
    }

    fn lease(&mut self, lease: u64) {
        let granted = command_result::Result::LeaseGranted(LeaseGranted {
            lease,
            ttl_ms: 2000,
        });
        let grant = command::Command::GrantLease(GrantLease {
            ttl_ms: 2000,
            ..Default::default()
        });
        self.apply(grant, None, granted, Vec::new());
    }

    fn acquire(&mut self, kind: Kind, lease: u64, outcome: Result<u64, u32>) {
        let acquire = command::Command::Acquire(Acquire {
            kind: grant_kind(kind),
            name: "a".into(),
            lease,
            wait: true,
            value: Vec::new(),
            ..Default::default()
        });
        let (result, events) = match outcome {
            Ok(token) => (
                command_result::Result::Done(Default::default()),
                vec![granted(kind, lease, token)],
            ),
            Err(position) => (
                command_result::Result::Queued(Queued { position }),
                Vec::new(),
            ),
        };
        self.apply(acquire, None, result, events);
    }

    fn violations(&self) -> &[String] {
        &self.checker.violations.0
    }
}

fn grant_kind(kind: Kind) -> i32 {
    match kind {
        Kind::Lock => GrantKind::Lock as i32,
        Kind::Election => GrantKind::Election as i32,
    }
}

fn granted(kind: Kind, lease: u64, token: u64) -> Event {
    Event::Granted {
        kind,
        name: "a".into(),
        lease: LeaseId(lease),
        token: FencingToken(token),
        value: Vec::new(),
    }
}

fn released(kind: Kind, lease: u64, token: u64) -> Event {
    Event::Released {
        kind,
        name: "a".into(),
        lease: LeaseId(lease),
        token: FencingToken(token),
    }
}

/// Lease 1 holds "a" (a lock or an election) with token 1; leases 2 then 3
/// queue; lease 1 releases and "a" goes to `next` with token 2.
fn handover_to(kind: Kind, next: u64) -> History {
    let mut history = History::new();
    for lease in 1..=3 {
        history.lease(lease);
    }
    history.acquire(kind, 1, Ok(1));
    history.acquire(kind, 2, Err(0));
    history.acquire(kind, 3, Err(1));
    let release = command::Command::Release(Release {
        kind: grant_kind(kind),
        name: "a".into(),
        token: 1,
    });
    let done = command_result::Result::Done(Default::default());
    let events = vec![released(kind, 1, 1), granted(kind, next, 2)];
    history.apply(release, None, done, events);
    history
}

#[test]
fn a_handover_that_skips_the_first_waiter_is_flagged() {
    let fair = handover_to(Kind::Lock, 2);
    assert!(fair.violations().is_empty(), "{:?}", fair.violations());
    let skipped = handover_to(Kind::Lock, 3);
    assert!(
        skipped.violations()[0].contains("but lease 2 queued first"),
        "{:?}",
        skipped.violations()
    );
}

fn put_in_session(history: &mut History, seq: u64, revision: u64) {
    let put = command::Command::Put(Put {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        fence: None,
        expected_mod_revision: None,
    });
    let request = RequestId {
        client_id: 1,
        seq,
        oldest_pending_seq: seq,
    };
    let result = command_result::Result::Put(PutResult { revision });
    history.apply(put, Some(request), result, Vec::new());
}

#[test]
fn a_request_applied_after_its_session_ended_is_flagged() {
    let mut history = History::new();
    let open = command::Command::OpenSession(Default::default());
    let opened = command_result::Result::SessionOpened(Default::default());
    let opened_event = Event::SessionOpened {
        session: SessionId(1),
    };
    history.apply(open, None, opened, vec![opened_event]);
    put_in_session(&mut history, 1, 2);
    assert!(
        history.violations().is_empty(),
        "{:?}",
        history.violations()
    );
    let expire = command::Command::ExpireSessions(Default::default());
    let ended = Event::SessionEnded {
        session: SessionId(1),
        expired: true,
    };
    let done = command_result::Result::Done(Default::default());
    history.apply(expire, None, done, vec![ended]);
    // The retry of seq 1 is applied again instead of being refused.
    put_in_session(&mut history, 1, 4);
    assert!(
        history.violations()[0].contains("applied although its session is not open"),
        "{:?}",
        history.violations()
    );
}

fn observe(history: &mut History, leader: Option<(u64, u64)>) {
    history.checker.observed(Observation {
        observer: Some(1),
        name: "a".into(),
        node: 1,
        leader,
    });
}

#[test]
fn an_observer_that_goes_back_is_flagged() {
    let mut forward = handover_to(Kind::Election, 2);
    observe(&mut forward, Some((1, 1)));
    observe(&mut forward, None);
    observe(&mut forward, Some((2, 2)));
    assert!(
        forward.violations().is_empty(),
        "{:?}",
        forward.violations()
    );
    let mut back = handover_to(Kind::Election, 2);
    observe(&mut back, Some((2, 2)));
    observe(&mut back, Some((1, 1)));
    assert!(
        back.violations()[0].contains("went back from token 2 to 1"),
        "{:?}",
        back.violations()
    );
}

#[test]
fn a_leader_that_was_never_elected_is_flagged() {
    let mut lock_only = handover_to(Kind::Lock, 2);
    observe(&mut lock_only, Some((2, 2)));
    assert!(
        lock_only.violations()[0].contains("but that grant is"),
        "a lock grant is not a leadership: {:?}",
        lock_only.violations()
    );
}

#[test]
fn a_renewal_after_a_successor_took_over_is_flagged() {
    let mut checker = Checker::new();
    checker.leader_seen(1, 1, 0);
    checker.leader_seen(2, 2, 5_000);
    checker.renewed(1, 1, 7, 4_000);
    assert!(checker.violations.0.is_empty(), "sent before the takeover");
    checker.renewed(1, 1, 7, 6_000);
    assert!(checker.violations.0[0].contains("had led term 2 since 5000"));
}

#[test]
fn a_read_older_than_an_acknowledged_write_is_flagged() {
    let mut checker = Checker::new();
    checker.acked_write(10, 1_000);
    checker.read_served("read", 3, 500, 9);
    assert!(checker.violations.0.is_empty(), "invoked before the ack");
    checker.read_served("read", 3, 1_500, 9);
    assert!(checker.violations.0[0].contains("stale read on node 3"));
}
