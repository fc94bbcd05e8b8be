//! The exactly-once session table: the lookup every deduplicated request
//! makes before apply (`Coordination::check_session`) and the record it
//! writes after (`Coordination::record_session`, which also forgets
//! results the client has acknowledged and renders the changed records).
//!
//! Benchmarks, with 1 000 and 100 000 (the maximum) sessions open:
//! - `check_record`: one request of one session, checked and recorded,
//!   with the client acknowledging all but the last few results (the
//!   steady state of a client with a few writes in flight);
//! - `check_duplicate`: the lookup of a resent request.
//!
//! Run with `cargo bench --workspace --bench sessions`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use latchkey_server::coordination::{
    Coordination, Op, Outcome, SequenceNumber, SessionCheck, SessionId,
};
use latchkey_server::state_machine::TTL_BOUNDS;
use latchkey_server::types::LogIndex;

/// Results a client keeps unacknowledged in the steady state.
const IN_FLIGHT: u64 = 4;
/// Bytes of a recorded result (an encoded grant is about this size).
const RESULT_BYTES: usize = 48;

fn with_sessions(count: usize) -> (Coordination, Vec<SessionId>) {
    let mut state = Coordination::new(TTL_BOUNDS);
    let mut sessions = Vec::with_capacity(count);
    for index in 1..=count as u64 {
        match state.apply(LogIndex(index), Op::OpenSession).result {
            Ok(Outcome::SessionOpened { session }) => sessions.push(session),
            other => panic!("session not opened: {other:?}"),
        }
    }
    (state, sessions)
}

fn sessions(c: &mut Criterion) {
    let mut group = c.benchmark_group("sessions");
    for count in [1_000usize, 100_000] {
        let (mut state, sessions) = with_sessions(count);
        let session = sessions[count / 2];
        let mut seq = 0u64;
        group.bench_with_input(BenchmarkId::new("check_record", count), &count, |b, _| {
            b.iter(|| {
                seq += 1;
                let check = state.check_session(session, SequenceNumber(seq));
                assert!(matches!(check, SessionCheck::New), "seq {seq} not new");
                let oldest = SequenceNumber(seq.saturating_sub(IN_FLIGHT).max(1));
                state.record_session(session, SequenceNumber(seq), oldest, vec![0; RESULT_BYTES])
            })
        });
        let last = SequenceNumber(seq);
        group.bench_with_input(
            BenchmarkId::new("check_duplicate", count),
            &count,
            |b, _| {
                b.iter(|| {
                    let check = state.check_session(session, last);
                    assert!(matches!(check, SessionCheck::Duplicate(_)));
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, sessions);
criterion_main!(benches);
