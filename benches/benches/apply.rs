//! State-machine apply: `StateMachine::apply` of one committed command,
//! with the applied index in the same batch, written without sync (as the
//! node writes state-machine batches).
//!
//! Benchmarks:
//! - `apply/acquire_release`: a free lock acquired and released (two
//!   entries), the work behind one `lock-1c` cycle on each replica;
//! - `apply/fenced_put`: a 64-byte put fenced by a held lock's token;
//! - `apply/grant_lease`: a new lease.
//!
//! Run with `cargo bench --workspace --bench apply`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use latchkey_proto::state::v1::{
    command, command_result, Acquire, Command, GrantLease, Put, Release,
};
use latchkey_proto::v1::{fence, Fence};
use latchkey_server::config::UnsafeSwitches;
use latchkey_server::state_machine::StateMachine;
use latchkey_server::storage::{Batch, Engine, LogPosition};

struct Machine {
    _dir: tempfile::TempDir,
    engine: Engine,
    machine: StateMachine,
    index: u64,
}

impl Machine {
    fn new() -> Machine {
        // A benchmark cannot run without its scratch directory and database.
        let dir = tempfile::tempdir().expect("temp dir");
        let engine = Engine::open(dir.path()).expect("open RocksDB");
        let machine = StateMachine::open(engine.clone(), &UnsafeSwitches::default())
            .expect("open state machine");
        Machine {
            _dir: dir,
            engine,
            machine,
            index: 0,
        }
    }

    fn apply(&mut self, body: command::Command) -> Option<command_result::Result> {
        self.index += 1;
        let mut batch = Batch::new(&self.engine);
        let command = Command {
            command: Some(body),
            request: None,
        };
        // Apply fails only on storage errors or undecodable entries.
        let output = self
            .machine
            .apply(&mut batch, self.index, command)
            .expect("apply");
        let position = LogPosition {
            index: self.index,
            term: 1,
        };
        self.machine.finish_batch(&mut batch, position);
        self.engine.write(batch, false).expect("write batch");
        output.result.result
    }

    fn lease(&mut self) -> u64 {
        match self.apply(command::Command::GrantLease(GrantLease {
            ttl_ms: 60_000,
            ..Default::default()
        })) {
            Some(command_result::Result::LeaseGranted(granted)) => granted.lease,
            other => panic!("lease not granted: {other:?}"),
        }
    }

    fn acquire(&mut self, name: &str, lease: u64) -> u64 {
        let body = command::Command::Acquire(Acquire {
            name: name.into(),
            lease,
            wait: false,
            ..Acquire::default()
        });
        match self.apply(body) {
            Some(command_result::Result::Granted(grant)) => grant.token,
            other => panic!("lock not granted: {other:?}"),
        }
    }

    fn release(&mut self, name: &str, token: u64) {
        let body = command::Command::Release(Release {
            name: name.into(),
            token,
            ..Release::default()
        });
        match self.apply(body) {
            Some(command_result::Result::Done(_)) => {}
            other => panic!("lock not released: {other:?}"),
        }
    }
}

fn apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    let mut m = Machine::new();
    let lease = m.lease();
    group.bench_function("acquire_release", |b| {
        b.iter(|| {
            let token = m.acquire("bench", lease);
            m.release("bench", token);
        })
    });

    let mut m = Machine::new();
    let lease = m.lease();
    let token = m.acquire("fence", lease);
    group.bench_function("fenced_put", |b| {
        b.iter(|| {
            let body = command::Command::Put(Put {
                key: b"bench/key".to_vec(),
                value: vec![b'v'; 64],
                fence: Some(Fence {
                    name: "fence".into(),
                    token,
                    kind: fence::Kind::Lock as i32,
                }),
                expected_mod_revision: None,
            });
            match m.apply(body) {
                Some(command_result::Result::Put(_)) => {}
                other => panic!("put refused: {other:?}"),
            }
        })
    });

    let mut m = Machine::new();
    group.bench_function("grant_lease", |b| b.iter(|| m.lease()));
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
