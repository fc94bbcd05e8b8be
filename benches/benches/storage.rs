//! Log append plus synced batch: what the Raft node does with every Ready
//! that carries new entries — `RaftLog::append` and the hard state into one
//! `WriteBatch`, written with sync (`Engine::write(batch, true)`).
//!
//! Benchmarks:
//! - `append_synced/{1,16}`: one and sixteen entries (a batch of proposals)
//!   of [`ENTRY_BYTES`] each, synced; on most disks this is the fsync.
//! - `append_unsynced/{1,16}`: the same without sync: the CPU cost of
//!   encoding, checksumming and RocksDB's memtable insert.
//! - `read_committed/{cached,rocksdb}/{1,64}`: raft-rs reading the newest
//!   1 or 64 entries back, as every Ready does for the committed entries it
//!   hands to apply: from the log's cache of the newest entries, and with
//!   the cache off, from RocksDB (an iterator and a decode per entry).
//!
//! Run with `cargo bench --workspace --bench storage` (all benches:
//! `cargo bench --workspace --benches`).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use latchkey_server::storage::raft_log::FatalSlot;
use latchkey_server::storage::{Batch, Engine, RaftLog};
use raft::prelude::{Entry, HardState};
use raft::{GetEntriesContext, Storage as _};

/// Bytes of each entry's data: a small command.
const ENTRY_BYTES: usize = 128;

struct Log {
    _dir: tempfile::TempDir,
    engine: Engine,
    log: RaftLog,
    hard_state: HardState,
}

impl Log {
    fn new() -> Log {
        // A benchmark cannot run without its scratch directory and database.
        let dir = tempfile::tempdir().expect("temp dir");
        let engine = Engine::open(dir.path()).expect("open RocksDB");
        let log = RaftLog::open(engine.clone(), &[1], &[], FatalSlot::default()).expect("open log");
        Log {
            _dir: dir,
            engine,
            log,
            hard_state: HardState {
                term: 1,
                vote: 1,
                commit: 0,
                ..HardState::default()
            },
        }
    }

    /// Appends `count` entries and the hard state in one batch.
    fn append(&mut self, count: usize, sync: bool) {
        let first = self.log.last_index() + 1;
        let entries: Vec<Entry> = (first..first + count as u64)
            .map(|index| Entry {
                index,
                term: 1,
                data: vec![0x5a; ENTRY_BYTES].into(),
                ..Entry::default()
            })
            .collect();
        self.hard_state.commit = first - 1;
        let mut batch = Batch::new(&self.engine);
        self.log.append(&mut batch, &entries);
        self.log.set_hard_state(&mut batch, &self.hard_state);
        // A failed write means the scratch disk is broken: nothing to measure.
        self.engine.write(batch, sync).expect("write batch");
    }
}

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_log");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for sync in [true, false] {
        let name = if sync {
            "append_synced"
        } else {
            "append_unsynced"
        };
        for count in [1usize, 16] {
            let mut log = Log::new();
            group.throughput(Throughput::Elements(count as u64));
            group.bench_with_input(BenchmarkId::new(name, count), &count, |b, &count| {
                b.iter(|| log.append(count, sync))
            });
        }
    }
    group.finish();
}

fn read_committed(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_log");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for cached in [true, false] {
        let mut log = Log::new();
        if !cached {
            log.log.set_cache_limits(0, 0);
        }
        for _ in 0..64 {
            log.append(16, false);
        }
        let last = log.log.last_index();
        let name = if cached {
            "read_committed/cached"
        } else {
            "read_committed/rocksdb"
        };
        for count in [1u64, 64] {
            group.throughput(Throughput::Elements(count));
            group.bench_with_input(BenchmarkId::new(name, count), &count, |b, &count| {
                b.iter(|| {
                    // The log holds these entries: a failure is a broken disk.
                    log.log
                        .entries(
                            last + 1 - count,
                            last + 1,
                            None,
                            GetEntriesContext::empty(false),
                        )
                        .expect("read entries")
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, append, read_committed);
criterion_main!(benches);
