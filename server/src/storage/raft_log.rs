//! [`RaftLog`]: raft-rs's `Storage` over the `raft_log` and `raft_state`
//! column families, plus the writes the Ready loop makes to them.
//!
//! The log holds entries `truncated.index + 1 ..= last_index`. The term of
//! `truncated.index` is kept so that raft-rs can still match the entry just
//! before the first one it has. Snapshots are not stored separately: the
//! state machine in the `state` family *is* the snapshot, read at one
//! instant together with its applied position and membership.
//!
//! What raft-rs reads at start is checked first, because raft-rs stops the
//! process on a bad value instead of returning an error: the stored
//! configuration must restore ([`restorable_conf_state`]), and the hard
//! state must commit an entry the log holds ([`RaftLog::check_commit`]).
//! Either failing is corruption naming its key.
//!
//! The newest entries are also kept decoded in memory (`cache.rs`), so that
//! raft-rs's reads on the node's loop are served without RocksDB.
//!
//! # Bootstrap
//! A node of a new cluster starts as if it had installed a snapshot at
//! index 1, term 1 that holds the initial membership (as raft-rs's own
//! examples bootstrap): the log is empty and starts at 2, the hard state is
//! at term 1 with commit 1, and the state machine is applied to 1. So every
//! node that ever joins later, with an empty log, is brought up to date by
//! a snapshot — which carries the membership — rather than by replaying a
//! log whose first membership was never an entry. A node that joins an
//! existing cluster bootstraps with no voters at all and waits for that
//! snapshot.

mod cache;
pub use cache::{MAX_BYTES as MAX_CACHED_BYTES, MAX_ENTRIES as MAX_CACHED_ENTRIES};
pub mod snapshots;

use std::cell::RefCell;
use std::sync::Arc;

use parking_lot::Mutex;
use protobuf::Message as _;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfState, Entry, HardState, Snapshot};
use raft::{Changer, GetEntriesContext, ProgressTracker, RaftState, StorageError};

use super::keys::{self, raft_state};
use super::{corruption, Batch, Engine, LogPosition, CF_RAFT_LOG, CF_RAFT_STATE, CF_STATE};
use crate::error::FatalError;

/// Where a storage failure seen inside raft-rs is kept, so that the node
/// can stop with the real cause even when raft-rs turns the error into a
/// panic.
pub type FatalSlot = Arc<Mutex<Option<FatalError>>>;

/// Index of the bootstrap snapshot a new cluster starts from.
pub const BOOTSTRAP_INDEX: u64 = 1;
/// Term of the bootstrap snapshot.
pub const BOOTSTRAP_TERM: u64 = 1;

/// The Raft log and hard state of one node.
pub struct RaftLog {
    engine: Engine,
    hard_state: HardState,
    conf_state: ConfState,
    truncated: LogPosition,
    last_index: u64,
    last_term: u64,
    fatal: FatalSlot,
    /// Snapshot files and the last snapshot built for a follower, reused
    /// while still current (see `snapshots.rs`).
    snapshots: RefCell<snapshots::Snapshots>,
    /// The newest entries, decoded (see `cache.rs`).
    cache: cache::EntryCache,
}

impl RaftLog {
    /// Loads the log; on a node that has never run, bootstraps it (see the
    /// module docs) with `voters` as the initial membership and `members`
    /// (encoded `Members`) as their addresses. No voters: a node that joins.
    pub fn open(
        engine: Engine,
        voters: &[u64],
        members: &[u8],
        fatal: FatalSlot,
    ) -> Result<RaftLog, FatalError> {
        let hard_state = load_pb::<HardState>(&engine, raft_state::HARD_STATE)?;
        let conf_state = load_pb::<ConfState>(&engine, raft_state::CONF_STATE)?;
        let truncated: Option<LogPosition> =
            engine.get_message(CF_RAFT_STATE, raft_state::TRUNCATED)?;
        let mut log = RaftLog {
            engine,
            hard_state: hard_state.unwrap_or_default(),
            conf_state: conf_state.clone().unwrap_or_default(),
            truncated: truncated.unwrap_or_default(),
            last_index: 0,
            last_term: 0,
            fatal,
            snapshots: RefCell::new(snapshots::Snapshots::default()),
            cache: cache::EntryCache::default(),
        };
        match &conf_state {
            None => log.bootstrap(voters, members)?,
            Some(conf_state) => restorable_conf_state(conf_state)
                .map_err(|reason| corruption(CF_RAFT_STATE, raft_state::CONF_STATE, reason))?,
        }
        log.load_last()?;
        Ok(log)
    }

    fn bootstrap(&mut self, voters: &[u64], members: &[u8]) -> Result<(), FatalError> {
        let mut conf_state = ConfState::default();
        conf_state.set_voters(voters.to_vec());
        let encoded = encode_pb(&conf_state);
        let mut batch = Batch::new(&self.engine);
        batch.put(CF_RAFT_STATE, raft_state::CONF_STATE, &encoded);
        if !voters.is_empty() {
            let start = LogPosition {
                index: BOOTSTRAP_INDEX,
                term: BOOTSTRAP_TERM,
            };
            let hard_state = HardState {
                term: BOOTSTRAP_TERM,
                commit: BOOTSTRAP_INDEX,
                ..HardState::default()
            };
            batch.put(
                CF_RAFT_STATE,
                raft_state::HARD_STATE,
                &encode_pb(&hard_state),
            );
            batch.put_message(CF_RAFT_STATE, raft_state::TRUNCATED, &start);
            batch.put(CF_STATE, keys::CONF_STATE, &encoded);
            batch.put(CF_STATE, keys::MEMBERS, members);
            batch.put_message(CF_STATE, keys::APPLIED, &start);
            self.hard_state = hard_state;
            self.truncated = start;
        }
        self.engine.write(batch, true)?;
        self.conf_state = conf_state;
        Ok(())
    }

    /// Finds the last entry and checks that the log starts right after the
    /// compaction point.
    fn load_last(&mut self) -> Result<(), FatalError> {
        self.last_index = self.truncated.index;
        self.last_term = self.truncated.term;
        let mut first = None;
        self.engine.scan_prefix(CF_RAFT_LOG, &[], |key, _| {
            first = Some(key.to_vec());
            false
        })?;
        let Some(first) = first else { return Ok(()) };
        let first_index = index_of_key(&first)?;
        if first_index != self.truncated.index + 1 {
            return Err(corruption(
                CF_RAFT_LOG,
                &first,
                format!(
                    "log starts at {first_index}, expected {}",
                    self.truncated.index + 1
                ),
            ));
        }
        let mut expected = first_index;
        let mut last = None;
        self.engine.scan_prefix(CF_RAFT_LOG, &[], |key, payload| {
            last = Some((key.to_vec(), payload));
            expected += 1;
            true
        })?;
        // `first` exists, so the scan saw at least one entry.
        let (key, payload) = last.expect("non-empty log");
        let entry = decode_entry(&key, &payload)?;
        if entry.index != expected - 1 {
            return Err(corruption(
                CF_RAFT_LOG,
                &key,
                format!(
                    "log has a gap: last entry is {}, but {} entries follow {}",
                    entry.index,
                    expected - first_index,
                    first_index - 1
                ),
            ));
        }
        self.last_index = entry.index;
        self.last_term = entry.term;
        Ok(())
    }

    /// Checks, before raft-rs reads it, that the hard state commits an
    /// entry the log holds or compacted: raft-rs stops the process on a
    /// commit index outside that range. Call after [`RaftLog::repair_commit`].
    pub fn check_commit(&self) -> Result<(), FatalError> {
        let commit = self.hard_state.commit;
        if commit > self.last_index || commit < self.truncated.index {
            return Err(corruption(
                CF_RAFT_STATE,
                raft_state::HARD_STATE,
                format!(
                    "commits {commit}, but the log holds {}..={}",
                    self.truncated.index, self.last_index
                ),
            ));
        }
        Ok(())
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn first_index(&self) -> u64 {
        self.truncated.index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Bounds the cache of the newest entries (tests: to read across its
    /// edge; benchmarks: to read without it). A node keeps the default.
    pub fn set_cache_limits(&mut self, entries: usize, bytes: u64) {
        self.cache = cache::EntryCache::with_limits(entries, bytes);
    }

    /// Adds `entries` to `batch`, replacing any conflicting suffix.
    pub fn append(&mut self, batch: &mut Batch, entries: &[Entry]) {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return;
        };
        assert!(
            first.index > self.truncated.index,
            "append of entry {} overwrites the compacted log (truncated at {})",
            first.index,
            self.truncated.index
        );
        assert!(
            first.index <= self.last_index + 1,
            "append of entry {} leaves a gap after {}",
            first.index,
            self.last_index
        );
        if first.index <= self.last_index {
            batch.delete_range(
                CF_RAFT_LOG,
                &keys::log_entry(first.index),
                &keys::log_entry(self.last_index + 1),
            );
        }
        for entry in entries {
            batch.put(
                CF_RAFT_LOG,
                &keys::log_entry(entry.index),
                &encode_pb(entry),
            );
        }
        self.cache.append(entries);
        self.last_index = last.index;
        self.last_term = last.term;
    }

    /// Adds the hard state to `batch`.
    pub fn set_hard_state(&mut self, batch: &mut Batch, hard_state: &HardState) {
        batch.put(
            CF_RAFT_STATE,
            raft_state::HARD_STATE,
            &encode_pb(hard_state),
        );
        self.hard_state = hard_state.clone();
    }

    /// Records a new commit index (from a light ready).
    pub fn set_commit(&mut self, batch: &mut Batch, commit: u64) {
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = commit;
        self.set_hard_state(batch, &hard_state);
    }

    /// Records a membership change applied at `batch`'s index, in both the
    /// Raft state and the state machine.
    pub fn set_conf_state(&mut self, batch: &mut Batch, conf_state: &ConfState) {
        let encoded = encode_pb(conf_state);
        batch.put(CF_RAFT_STATE, raft_state::CONF_STATE, &encoded);
        batch.put(CF_STATE, keys::CONF_STATE, &encoded);
        self.conf_state = conf_state.clone();
    }

    /// Removes every entry up to and including `index`, which must be applied.
    pub fn compact_to(&mut self, index: u64) -> Result<(), FatalError> {
        if index <= self.truncated.index {
            return Ok(());
        }
        assert!(
            index <= self.last_index,
            "compaction to {index} past the last entry {}",
            self.last_index
        );
        let term = self.term_of(index)?;
        let truncated = LogPosition { index, term };
        let mut batch = Batch::new(&self.engine);
        batch.delete_range(
            CF_RAFT_LOG,
            &keys::log_entry(self.truncated.index + 1),
            &keys::log_entry(index + 1),
        );
        batch.put_message(CF_RAFT_STATE, raft_state::TRUNCATED, &truncated);
        self.engine.write(batch, false)?;
        self.truncated = truncated;
        self.cache.compact_to(index);
        Ok(())
    }

    /// Replaces the log and the state machine with a snapshot received from
    /// the leader, in one synced batch.
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), FatalError> {
        let meta = snapshot.get_metadata();
        let mut batch = Batch::new(&self.engine);
        batch.delete_range(CF_STATE, &[], keys::END);
        self.snapshot_records(snapshot, &mut batch)?;
        batch.delete_range(CF_RAFT_LOG, &keys::log_entry(0), &keys::log_entry(u64::MAX));
        let truncated = LogPosition {
            index: meta.index,
            term: meta.term,
        };
        batch.put_message(CF_RAFT_STATE, raft_state::TRUNCATED, &truncated);
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = meta.index;
        self.set_hard_state(&mut batch, &hard_state);
        self.set_conf_state(&mut batch, meta.get_conf_state());
        self.cache.clear();
        self.engine.write(batch, true)?;
        self.truncated = truncated;
        self.last_index = meta.index;
        self.last_term = meta.term;
        Ok(())
    }

    fn term_of(&self, index: u64) -> Result<u64, FatalError> {
        if index == self.truncated.index {
            return Ok(self.truncated.term);
        }
        if index == self.last_index {
            return Ok(self.last_term);
        }
        if let Some(term) = self.cache.term(index) {
            return Ok(term);
        }
        let key = keys::log_entry(index);
        match self.engine.get(CF_RAFT_LOG, &key)? {
            Some(payload) => Ok(decode_entry(&key, &payload)?.term),
            None => Err(corruption(
                CF_RAFT_LOG,
                &key,
                "entry missing from the log".into(),
            )),
        }
    }

    fn read_entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, FatalError> {
        if let Some(entries) = self.cache.entries(low, high, max_size) {
            return Ok(entries);
        }
        let mut entries = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        let mut failure = None;
        let mut expected = low;
        self.engine
            .scan_from(CF_RAFT_LOG, &keys::log_entry(low), |key, payload| {
                if expected >= high {
                    return false;
                }
                let entry = match decode_entry(key, &payload) {
                    Ok(entry) if entry.index == expected => entry,
                    Ok(entry) => {
                        failure = Some(corruption(
                            CF_RAFT_LOG,
                            key,
                            format!("found entry {} where {expected} belongs", entry.index),
                        ));
                        return false;
                    }
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                };
                size += u64::from(entry.compute_size());
                let over = max_size.is_some_and(|max| size > max) && !entries.is_empty();
                if over {
                    return false;
                }
                entries.push(entry);
                expected += 1;
                true
            })?;
        if let Some(failure) = failure {
            return Err(failure);
        }
        let complete = expected == high || max_size.is_some() && !entries.is_empty();
        if !complete {
            return Err(corruption(
                CF_RAFT_LOG,
                &keys::log_entry(expected),
                format!("entry missing (log should hold {low}..{high})"),
            ));
        }
        Ok(entries)
    }

    /// Converts a storage failure for raft-rs, remembering the real cause.
    fn fail(&self, err: FatalError) -> raft::Error {
        let message = err.to_string();
        self.fatal.lock().get_or_insert(err);
        raft::Error::Store(StorageError::Other(message.into()))
    }
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= self.last_index + 1,
            "entries up to {high} requested, log ends at {}",
            self.last_index
        );
        self.read_entries(low, high, max_size.into())
            .map_err(|e| self.fail(e))
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index < self.truncated.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        self.term_of(index).map_err(|e| self.fail(e))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let built = self
            .build_snapshot(request_index)
            .map_err(|e| self.fail(e))?;
        let Some(snapshot) = built.filter(|s| s.get_metadata().index >= request_index) else {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        };
        if snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snapshot)
    }
}

/// Restores `conf_state` the way raft-rs does when it starts or installs a
/// snapshot, and checks that the result is the same configuration: raft-rs
/// stops the process on one that does not restore.
pub fn restorable_conf_state(conf_state: &ConfState) -> Result<(), String> {
    let single = |id: u64, change_type: ConfChangeType| {
        let mut change = ConfChangeSingle {
            node_id: id,
            ..ConfChangeSingle::default()
        };
        change.set_change_type(change_type);
        change
    };
    let outgoing: Vec<_> = conf_state
        .voters_outgoing
        .iter()
        .map(|id| single(*id, ConfChangeType::AddNode))
        .collect();
    let incoming: Vec<_> = conf_state
        .voters_outgoing
        .iter()
        .map(|id| single(*id, ConfChangeType::RemoveNode))
        .chain(
            conf_state
                .voters
                .iter()
                .map(|id| single(*id, ConfChangeType::AddNode)),
        )
        .chain(
            conf_state
                .learners
                .iter()
                .map(|id| single(*id, ConfChangeType::AddLearnerNode)),
        )
        .chain(
            conf_state
                .learners_next
                .iter()
                .map(|id| single(*id, ConfChangeType::AddLearnerNode)),
        )
        .collect();
    let refused = |e: raft::Error| format!("{conf_state:?} does not restore: {e}");
    let mut tracker = ProgressTracker::new(1);
    let steps: Vec<&[ConfChangeSingle]> = if outgoing.is_empty() {
        incoming.chunks(1).collect()
    } else {
        outgoing.chunks(1).collect()
    };
    for step in steps {
        let (conf, changes) = Changer::new(&tracker).simple(step).map_err(refused)?;
        tracker.apply_conf(conf, changes, 1);
    }
    if !outgoing.is_empty() {
        let (conf, changes) = Changer::new(&tracker)
            .enter_joint(conf_state.auto_leave, &incoming)
            .map_err(refused)?;
        tracker.apply_conf(conf, changes, 1);
    }
    let restored = tracker.conf().to_conf_state();
    if !same_configuration(&restored, conf_state) {
        return Err(format!("{conf_state:?} restores as {restored:?}"));
    }
    Ok(())
}

/// The same members in each role, in any order (raft-rs's comparison).
fn same_configuration(a: &ConfState, b: &ConfState) -> bool {
    let same = |x: &[u64], y: &[u64]| {
        x.iter().all(|id| y.contains(id)) && y.iter().all(|id| x.contains(id))
    };
    same(&a.voters, &b.voters)
        && same(&a.learners, &b.learners)
        && same(&a.voters_outgoing, &b.voters_outgoing)
        && same(&a.learners_next, &b.learners_next)
        && a.auto_leave == b.auto_leave
}

fn encode_pb(message: &impl protobuf::Message) -> Vec<u8> {
    // Encoding into a Vec only fails for messages missing required fields,
    // which proto3 raft-rs messages do not have.
    message.write_to_bytes().expect("raft-rs message encodes")
}

/// Decodes a verified raft-rs record; a failure is corruption at `key`.
/// Public for the decoder fuzz tests only.
#[doc(hidden)]
pub fn decode_pb<M: protobuf::Message>(
    cf: &'static str,
    key: &[u8],
    payload: &[u8],
) -> Result<M, FatalError> {
    M::parse_from_bytes(payload).map_err(|e| corruption(cf, key, format!("does not decode: {e}")))
}

fn load_pb<M: protobuf::Message>(
    engine: &Engine,
    key: &'static [u8],
) -> Result<Option<M>, FatalError> {
    engine
        .get(CF_RAFT_STATE, key)?
        .map(|payload| decode_pb(CF_RAFT_STATE, key, &payload))
        .transpose()
}

/// Decodes a verified log entry and checks that it is stored under its own
/// index. Public for the decoder fuzz tests only.
#[doc(hidden)]
pub fn decode_entry(key: &[u8], payload: &[u8]) -> Result<Entry, FatalError> {
    let entry: Entry = decode_pb(CF_RAFT_LOG, key, payload)?;
    if key != keys::log_entry(entry.index) {
        return Err(corruption(
            CF_RAFT_LOG,
            key,
            format!("holds entry {}", entry.index),
        ));
    }
    Ok(entry)
}

fn index_of_key(key: &[u8]) -> Result<u64, FatalError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| corruption(CF_RAFT_LOG, key, "log key is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

impl RaftLog {
    /// Makes the commit index at least `applied`. Entries are applied only
    /// once committed, but the applied index can reach disk before the hard
    /// state that records the commit; raft-rs refuses to start if
    /// applied > commit.
    pub fn repair_commit(&mut self, applied: u64) -> Result<(), FatalError> {
        if self.hard_state.commit >= applied {
            return Ok(());
        }
        if applied > self.last_index {
            return Err(corruption(
                CF_STATE,
                keys::APPLIED,
                format!(
                    "applied index {applied} is past the last log entry {}",
                    self.last_index
                ),
            ));
        }
        let mut batch = Batch::new(&self.engine);
        self.set_commit(&mut batch, applied);
        self.engine.write(batch, true)
    }
}
