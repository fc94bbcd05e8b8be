use raft::prelude::{Entry, HardState};
use raft::{GetEntriesContext, Storage as _, StorageError};

use super::keys;
use super::raft_log::{FatalSlot, RaftLog};
use super::*;

const VOTERS: [u64; 5] = [1, 2, 3, 4, 5];

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("entry {index}/{term}").into_bytes().into(),
        ..Entry::default()
    }
}

/// A log without the bootstrap snapshot (as a node that joins has): its
/// first entry is 1.
fn open(dir: &std::path::Path) -> RaftLog {
    let engine = Engine::open(dir).expect("open engine");
    RaftLog::open(engine, &[], &[], FatalSlot::default()).expect("open log")
}

/// A log of a new cluster of `VOTERS`.
fn open_bootstrapped(dir: &std::path::Path) -> RaftLog {
    let engine = Engine::open(dir).expect("open engine");
    RaftLog::open(engine, &VOTERS, b"members", FatalSlot::default()).expect("open log")
}

/// A log without the bootstrap snapshot on the memory `disk`.
fn open_on(disk: &MemoryDisk) -> RaftLog {
    let engine = Engine::open_memory(disk).expect("open engine");
    RaftLog::open(engine, &[], &[], FatalSlot::default()).expect("open log")
}

fn append(log: &mut RaftLog, entries: &[Entry]) {
    let mut batch = Batch::new(log.engine());
    log.append(&mut batch, entries);
    log.engine().clone().write(batch, true).unwrap();
}

fn all_entries(log: &RaftLog) -> Vec<(u64, u64)> {
    let first = log.first_index();
    let last = log.last_index();
    log.entries(first, last + 1, None, GetEntriesContext::empty(false))
        .unwrap()
        .iter()
        .map(|e| (e.index, e.term))
        .collect()
}

#[test]
fn a_new_cluster_starts_from_a_bootstrap_snapshot_at_index_1_with_the_voters() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_bootstrapped(dir.path());
    let state = log.initial_state().unwrap();
    assert_eq!(state.conf_state.voters, VOTERS.to_vec());
    assert_eq!((state.hard_state.term, state.hard_state.commit), (1, 1));
    assert_eq!(
        log.first_index(),
        2,
        "a node that joins later needs a snapshot"
    );
    assert_eq!(log.last_index(), 1);
    assert_eq!(log.term(1).unwrap(), 1);
    let engine = log.engine().clone();
    let applied: LogPosition = engine
        .get_message(CF_STATE, keys::APPLIED)
        .unwrap()
        .expect("applied position");
    assert_eq!((applied.index, applied.term), (1, 1));
    assert_eq!(
        engine.get(CF_STATE, keys::MEMBERS).unwrap().unwrap(),
        b"members"
    );
    drop(log);
    drop(engine);
    let log = open_bootstrapped(dir.path());
    assert_eq!(log.first_index(), 2, "bootstrapped once");
}

#[test]
fn a_node_that_joins_starts_with_no_voters_and_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let state = log.initial_state().unwrap();
    assert!(state.conf_state.voters.is_empty());
    assert_eq!(log.first_index(), 1);
    assert_eq!(log.last_index(), 0);
}

#[test]
fn appended_entries_are_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    append(&mut log, &[entry(1, 1), entry(2, 1), entry(3, 2)]);
    assert_eq!(all_entries(&log), vec![(1, 1), (2, 1), (3, 2)]);
    assert_eq!(log.term(3).unwrap(), 2);
    assert_eq!(log.term(2).unwrap(), 1);
    assert!(matches!(
        log.term(4),
        Err(raft::Error::Store(StorageError::Unavailable))
    ));
}

#[test]
fn conflicting_append_overwrites_the_suffix() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    append(
        &mut log,
        &[entry(1, 1), entry(2, 1), entry(3, 1), entry(4, 1)],
    );
    append(&mut log, &[entry(3, 2)]);
    assert_eq!(log.last_index(), 3);
    assert_eq!(all_entries(&log), vec![(1, 1), (2, 1), (3, 2)]);
    drop(log);
    let log = open(dir.path());
    assert_eq!(
        log.last_index(),
        3,
        "the overwritten tail must not come back"
    );
    assert_eq!(all_entries(&log), vec![(1, 1), (2, 1), (3, 2)]);
}

#[test]
fn entries_respect_max_size_but_return_at_least_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    append(&mut log, &[entry(1, 1), entry(2, 1), entry(3, 1)]);
    let one = log
        .entries(1, 4, 1, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(one.len(), 1);
}

#[test]
fn compaction_removes_entries_and_keeps_the_boundary_term() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    append(
        &mut log,
        &(1..=10).map(|i| entry(i, 1 + i / 5)).collect::<Vec<_>>(),
    );
    log.compact_to(6).unwrap();
    assert_eq!(log.first_index(), 7);
    assert_eq!(
        log.term(6).unwrap(),
        2,
        "term of the last compacted entry is kept"
    );
    assert!(matches!(
        log.entries(5, 8, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    assert!(matches!(
        log.term(5),
        Err(raft::Error::Store(StorageError::Compacted))
    ));
    drop(log);
    let log = open(dir.path());
    assert_eq!(log.first_index(), 7);
    assert_eq!(log.last_index(), 10);
    assert_eq!(all_entries(&log).len(), 4);
}

#[test]
fn restart_recovers_log_and_hard_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    append(&mut log, &[entry(1, 3), entry(2, 3)]);
    let hard_state = HardState {
        term: 3,
        vote: 2,
        commit: 2,
        ..HardState::default()
    };
    let mut batch = Batch::new(log.engine());
    log.set_hard_state(&mut batch, &hard_state);
    log.engine().clone().write(batch, true).unwrap();
    drop(log);
    let log = open(dir.path());
    let state = log.initial_state().unwrap();
    assert_eq!(state.hard_state, hard_state);
    assert_eq!(all_entries(&log), vec![(1, 3), (2, 3)]);
}

#[test]
fn snapshot_carries_the_state_machine_and_installs_elsewhere() {
    let leader_dir = tempfile::tempdir().unwrap();
    let mut leader = open(leader_dir.path());
    append(
        &mut leader,
        &(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>(),
    );
    let mut batch = Batch::new(leader.engine());
    batch.put(CF_STATE, &keys::kv(b"x"), b"payload");
    batch.put_message(CF_STATE, keys::APPLIED, &LogPosition { index: 5, term: 1 });
    leader.engine().clone().write(batch, true).unwrap();
    let snapshot = leader.snapshot(0, 2).unwrap();
    assert_eq!(snapshot.get_metadata().index, 5);
    assert_eq!(snapshot.get_metadata().term, 1);
    assert!(matches!(
        leader.snapshot(6, 2),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    ));

    let follower_dir = tempfile::tempdir().unwrap();
    let mut follower = open(follower_dir.path());
    // Entries of another term past the snapshot's index, which it replaces.
    append(
        &mut follower,
        &(1..=8).map(|i| entry(i, 2)).collect::<Vec<_>>(),
    );
    follower.apply_snapshot(&snapshot).unwrap();
    assert_eq!(follower.first_index(), 6);
    assert_eq!(follower.last_index(), 5);
    assert_eq!(follower.hard_state().commit, 5);
    assert_eq!(all_entries(&follower), []);
    append(&mut follower, &[entry(6, 3), entry(7, 3)]);
    assert_eq!(all_entries(&follower), [(6, 3), (7, 3)]);
    assert_eq!(follower.term(5).unwrap(), 1);
    assert_eq!(follower.term(6).unwrap(), 3);
    follower.compact_to(6).unwrap();
    let engine = follower.engine().clone();
    assert_eq!(
        engine.get(CF_STATE, &keys::kv(b"x")).unwrap().unwrap(),
        b"payload"
    );
    drop(follower);
    drop(engine);
    let follower = open(follower_dir.path());
    assert_eq!(follower.first_index(), 7);
    assert_eq!(follower.term(6).unwrap(), 3);
    assert_eq!(all_entries(&follower), [(7, 3)]);
}

#[test]
fn checksum_mismatch_stops_open_naming_family_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open(dir.path());
    append(&mut log, &[entry(1, 1)]);
    let engine = log.engine().clone();
    let mut raw = frame(b"k/good", b"value");
    raw[5] ^= 0x01;
    engine.put_raw_for_test(CF_STATE, b"k/bad", &raw);
    drop(log);
    drop(engine);
    let err = Engine::open(dir.path())
        .err()
        .expect("open must fail")
        .to_string();
    assert!(err.contains("\"state\""), "names the column family: {err}");
    assert!(err.contains("k/bad"), "names the key: {err}");
    assert!(err.contains("checksum mismatch"), "{err}");
}

#[test]
fn checksum_mismatch_on_read_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.put_raw_for_test(CF_RAFT_LOG, &keys::log_entry(7), b"\0\0\0\0garbage");
    let err = engine.get(CF_RAFT_LOG, &keys::log_entry(7)).unwrap_err();
    match err {
        crate::error::FatalError::Corruption { cf, key, .. } => {
            assert_eq!(cf, CF_RAFT_LOG);
            assert_eq!(key, "0x0000000000000007");
        }
        other => panic!("expected corruption, got {other}"),
    }
}

#[test]
fn syncs_wait_while_the_stall_file_exists_and_other_writes_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let stall = dir.path().join("stall");
    let engine = Engine::open(&dir.path().join("db"))
        .unwrap()
        .stall_syncs_while_exists(stall.clone());
    // No file: a sync goes through.
    engine.sync_wal().unwrap();
    std::fs::write(&stall, b"").unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let syncing = engine.clone();
    let thread = std::thread::spawn(move || {
        let mut batch = Batch::new(&syncing);
        batch.put(CF_STATE, b"k/synced", b"1");
        let written = syncing.write(batch, true);
        let _ = done.send(written.and_then(|()| syncing.sync_wal()));
    });
    // An unsynced write and a read of it go on meanwhile.
    let mut batch = Batch::new(&engine);
    batch.put(CF_STATE, b"k/unsynced", b"2");
    engine.write(batch, false).unwrap();
    assert_eq!(
        engine.get(CF_STATE, b"k/unsynced").unwrap().as_deref(),
        Some(&b"2"[..])
    );
    assert!(
        finished
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err(),
        "a synced write went through while the stall file existed"
    );
    assert_eq!(engine.get(CF_STATE, b"k/synced").unwrap(), None);
    std::fs::remove_file(&stall).unwrap();
    let result = finished
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the sync ends once the file is gone");
    result.unwrap();
    thread.join().unwrap();
    assert_eq!(
        engine.get(CF_STATE, b"k/synced").unwrap().as_deref(),
        Some(&b"1"[..])
    );
}

#[test]
fn truncated_record_is_corruption_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    engine.put_raw_for_test(CF_STATE, b"k/short", b"ab");
    assert!(engine.get(CF_STATE, b"k/short").is_err());
}

#[test]
fn raft_log_on_a_memory_disk_reopens_after_a_power_loss_at_any_cut() {
    let disk = MemoryDisk::new();
    let mut log = open_on(&disk);
    append(&mut log, &(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>());
    // Compaction and the commit index are written without sync.
    log.compact_to(4).unwrap();
    let mut batch = Batch::new(log.engine());
    log.set_commit(&mut batch, 8);
    log.engine().clone().write(batch, false).unwrap();
    let unsynced = disk.unsynced_bytes();
    drop(log);
    let mut seen_compacted = false;
    for kept in 0..=unsynced {
        let copy = disk.clone_for_test();
        copy.lose_power(PowerLoss {
            kept_bytes: kept,
            torn_fill: Some(0x00),
        });
        let engine = Engine::open_memory(&copy).unwrap();
        let log = RaftLog::open(engine, &[], &[], FatalSlot::default())
            .unwrap_or_else(|e| panic!("cut at {kept}: {e}"));
        assert_eq!(
            log.last_index(),
            10,
            "synced entries survive (cut at {kept})"
        );
        assert!(log.first_index() == 1 || log.first_index() == 5);
        seen_compacted |= log.first_index() == 5;
        assert_eq!(all_entries(&log).len() as u64, 11 - log.first_index());
    }
    assert!(seen_compacted, "keeping the whole log keeps the compaction");
}

/// One change to the log in [`reads_agree_with_a_model_of_the_log_through_every_change`].
#[derive(Debug, Clone)]
enum LogOp {
    /// Appends `count` entries of a new term, replacing the newest `back`
    /// (as far as the compaction point allows); `big` entries hold 700 KB,
    /// so that reads are cut by size.
    Append { back: u64, count: u64, big: bool },
    /// Compacts `keep` entries short of the last one.
    Compact { keep: u64 },
    /// Closes and reopens the log from its disk.
    Reopen,
}

fn log_op() -> impl proptest::strategy::Strategy<Value = LogOp> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (0..6u64, 1..6u64, proptest::bool::weighted(0.15))
            .prop_map(|(back, count, big)| LogOp::Append { back, count, big }),
        2 => (0..8u64).prop_map(|keep| LogOp::Compact { keep }),
        1 => Just(LogOp::Reopen),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

    /// Every read of entries and terms agrees with a model of the log
    /// through appends that replace suffixes, compaction, big entries and
    /// reopening.
    #[test]
    fn reads_agree_with_a_model_of_the_log_through_every_change(
        ops in proptest::collection::vec(log_op(), 1..40),
        cache_entries in proptest::prop_oneof![0..12usize, proptest::strategy::Just(usize::MAX)],
    ) {
        let disk = MemoryDisk::new();
        let mut log = open_on(&disk);
        // A cache of 0 entries reads everything from the engine, a small
        // one reads across its edge, the default size holds every entry
        // (though not the 700 KB ones).
        let limits = match cache_entries {
            usize::MAX => (raft_log::MAX_CACHED_ENTRIES, raft_log::MAX_CACHED_BYTES),
            n => (n, u64::MAX),
        };
        log.set_cache_limits(limits.0, limits.1);
        // model[i] = (index, term, payload length) of the entries held.
        let mut model: Vec<(u64, u64, usize)> = Vec::new();
        let mut truncated = (0u64, 0u64);
        let mut term = 1;
        for op in ops {
            match op {
                LogOp::Append { back, count, big } => {
                    term += 1;
                    let first = (log.last_index() + 1).saturating_sub(back).max(truncated.0 + 1);
                    let len = if big { 700_000 } else { 10 };
                    let entries: Vec<Entry> = (first..first + count)
                        .map(|index| Entry {
                            index,
                            term,
                            data: vec![index as u8; len].into(),
                            ..Entry::default()
                        })
                        .collect();
                    append(&mut log, &entries);
                    model.retain(|(index, _, _)| *index < first);
                    model.extend(entries.iter().map(|e| (e.index, e.term, len)));
                }
                LogOp::Compact { keep } => {
                    let to = log.last_index().saturating_sub(keep);
                    if to > truncated.0 {
                        log.compact_to(to).unwrap();
                        let at = model.iter().position(|(index, _, _)| *index == to).unwrap();
                        truncated = (to, model[at].1);
                        model.drain(..=at);
                    }
                }
                LogOp::Reopen => {
                    drop(log);
                    log = open_on(&disk);
                    log.set_cache_limits(limits.0, limits.1);
                }
            }
            proptest::prop_assert_eq!(log.first_index(), truncated.0 + 1);
            proptest::prop_assert_eq!(log.last_index(), model.last().map_or(truncated.0, |e| e.0));
            let last = log.last_index();
            for low in truncated.0 + 1..=last {
                let read = log.entries(low, last + 1, None, GetEntriesContext::empty(false)).unwrap();
                let got: Vec<_> = read.iter().map(|e| (e.index, e.term, e.data.len())).collect();
                let want: Vec<_> = model.iter().filter(|e| e.0 >= low).cloned().collect();
                proptest::prop_assert_eq!(got, want);
                proptest::prop_assert!(read.iter().all(|e| e.data.iter().all(|b| *b == e.index as u8)));
                let cut = log.entries(low, last + 1, 1, GetEntriesContext::empty(false)).unwrap();
                proptest::prop_assert_eq!(cut.len(), 1, "a read is cut at max_size, to one entry at least");
                let term_of = log.term(low).unwrap();
                proptest::prop_assert_eq!(term_of, model.iter().find(|e| e.0 == low).unwrap().1);
            }
            proptest::prop_assert_eq!(log.term(truncated.0).unwrap(), truncated.1);
        }
    }
}
