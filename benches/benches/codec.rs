//! Command encode/decode: what a proposal costs to encode on the leader
//! and every committed entry costs to decode on every replica (prost, the
//! `latchkey.state.v1.Command` and `ProposalContext` messages).
//!
//! Benchmarks: `encode` and `decode` of an acquire carrying a request id,
//! and of a fenced 64-byte put; `encode` of a proposal context.
//!
//! Run with `cargo bench --workspace --bench codec`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use latchkey_proto::state::v1::{command, Acquire, Command, ProposalContext, Put};
use latchkey_proto::v1::{fence, Fence, RequestId};
use prost::Message;

fn commands() -> Vec<(&'static str, Command)> {
    let request = Some(RequestId {
        client_id: 1_234,
        seq: 56_789,
        oldest_pending_seq: 56_780,
    });
    vec![
        (
            "acquire",
            Command {
                command: Some(command::Command::Acquire(Acquire {
                    name: "orders/compaction".into(),
                    lease: 987_654,
                    wait: true,
                    ..Acquire::default()
                })),
                request,
            },
        ),
        (
            "fenced_put",
            Command {
                command: Some(command::Command::Put(Put {
                    key: b"orders/next".to_vec(),
                    value: vec![b'v'; 64],
                    fence: Some(Fence {
                        name: "orders/compaction".into(),
                        token: 42_000,
                        kind: fence::Kind::Lock as i32,
                    }),
                    expected_mod_revision: None,
                })),
                request,
            },
        ),
    ]
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("command");
    for (name, command) in commands() {
        group.bench_with_input(BenchmarkId::new("encode", name), &command, |b, command| {
            b.iter(|| command.encode_to_vec())
        });
        let bytes = command.encode_to_vec();
        group.bench_with_input(BenchmarkId::new("decode", name), &bytes, |b, bytes| {
            // The bytes were just encoded from a valid command.
            b.iter(|| Command::decode(bytes.as_slice()).expect("valid command"))
        });
    }
    let context = ProposalContext {
        node_id: 3,
        boot_id: 0x1234_5678_9abc_def0,
        request_id: 77_777,
    };
    group.bench_function("encode/proposal_context", |b| {
        b.iter(|| context.encode_to_vec())
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
