//! An in-memory backend for [`super::Engine`] that models what a disk
//! keeps when the power fails. Built for the deterministic simulator
//! (`server/tests/simulation.rs`), where RocksDB's file I/O was most of the
//! run time; production always uses RocksDB.
//!
//! # The model
//!
//! A [`MemoryDisk`] outlives the engines opened on it, the way a data
//! directory outlives a process. It holds:
//!
//! - the **durable** tables: what is on the platter for sure;
//! - the **unsynced log**: every batch written since the last synced one,
//!   oldest first — what sits in the OS page cache. On disk it would be a
//!   sequence of checksummed records (`length ‖ crc32 ‖ ops`, big-endian
//!   lengths); the disk keeps the batches as they are and lays them out as
//!   those bytes only when the power fails, since only then do the bytes
//!   matter;
//! - while an engine is open, the **live** tables: durable plus the
//!   unsynced log, which is what reads see.
//!
//! A write goes to the live tables and appends its batch to the unsynced
//! log. A synced write (or [`super::Engine::flush`],
//! which in RocksDB writes table files) folds the whole log into the durable
//! tables: like an fsync of RocksDB's write-ahead log, it makes every earlier
//! write durable too.
//!
//! Dropping the last clone of an engine is a process exit: nothing is lost,
//! the page cache still holds the unsynced log, and the next open replays it.
//! [`MemoryDisk::lose_power`] is a machine failure: the unsynced log is
//! laid out as records, only a prefix of those bytes reaches the disk, and
//! the record the cut falls into may be **torn** (its remaining bytes
//! garbage). Opening replays what reached the disk record by
//! record, checking lengths and checksums, and stops at the first record
//! that is incomplete or fails its checksum, dropping it and everything
//! after it — what RocksDB does with a torn write-ahead-log tail under
//! `TolerateCorruptedTailRecords`. A torn record can only be the last one
//! written (the cut falls in at most one record), and it was never synced,
//! so it was never acknowledged.
//!
//! Records in the tables keep the engine's framing (a crc32 per value), so
//! [`super::Engine`]'s checks work on both backends alike.
//!
//! # Not done yet
//! - No write reordering below a sync: a power loss keeps a *prefix* of the
//!   unsynced log. Real page-cache writeback may persist later pages before
//!   earlier ones; RocksDB's WAL format detects some of that, this model
//!   does not produce it.
//! - Damage to durable records is only planted by tests
//!   ([`super::Engine::put_raw_for_test`]), not by the disk itself.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::RawRecord;
use crate::error::FatalError;

/// How many column families a table set has (`super::COLUMN_FAMILIES`).
pub(super) const FAMILIES: usize = 3;
/// Once the unsynced log grows past this many bytes it is folded into the
/// durable tables, as an OS writes dirty pages back in the end.
pub const WRITEBACK_BYTES: usize = 4 * 1024 * 1024;
/// Bytes of a record's header: length and checksum.
const RECORD_HEADER: usize = 8;

const TAG_PUT: u8 = 1;
const TAG_DELETE: u8 = 2;
const TAG_DELETE_RANGE: u8 = 3;

/// One change in a batch; `cf` indexes `super::COLUMN_FAMILIES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
    Put {
        cf: usize,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: usize,
        key: Vec<u8>,
    },
    DeleteRange {
        cf: usize,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

type Table = BTreeMap<Vec<u8>, Vec<u8>>;
type Tables = [Table; FAMILIES];

/// What a power loss leaves of the unsynced log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerLoss {
    /// Bytes of the unsynced log that reached the disk (capped at its
    /// length; see [`MemoryDisk::unsynced_bytes`]).
    pub kept_bytes: usize,
    /// `Some(byte)`: the record the cut falls into keeps its full length,
    /// with every byte from the cut on set to `byte` (a torn write).
    /// `None`: the log simply ends at the cut.
    pub torn_fill: Option<u8>,
}

/// A simulated disk holding one node's data; cheap to clone, and every
/// clone is the same disk.
#[derive(Clone, Default)]
pub struct MemoryDisk {
    state: Arc<Mutex<DiskState>>,
    stall: Arc<Stall>,
}

/// Whether the disk's syncs hang ([`MemoryDisk::stall_syncs`]).
#[derive(Default)]
struct Stall {
    stalled: Mutex<bool>,
    ended: Condvar,
}

impl Stall {
    fn wait_out(&self) {
        let mut stalled = self.stalled.lock();
        while *stalled {
            self.ended.wait(&mut stalled);
        }
    }
}

/// Keeps a disk's syncs hanging until dropped.
pub struct SyncStall(Arc<Stall>);

impl Drop for SyncStall {
    fn drop(&mut self) {
        *self.0.stalled.lock() = false;
        self.0.ended.notify_all();
    }
}

#[derive(Default)]
struct DiskState {
    durable: Tables,
    /// Batches written since the last synced one, oldest first.
    unsynced: Vec<Vec<Op>>,
    /// Their size as records, in bytes.
    unsynced_bytes: usize,
    /// What survived a power loss, as record bytes, until the next open
    /// replays it.
    surviving: Vec<u8>,
    live: Option<Tables>,
    /// Bumped at each open and power loss; an engine of an older
    /// generation is closed.
    generation: u64,
    /// Torn records dropped at open, over the disk's life (for tests).
    torn_records_dropped: u64,
}

impl MemoryDisk {
    pub fn new() -> MemoryDisk {
        MemoryDisk::default()
    }

    /// Makes every sync of this disk (a synced write, a flush) hang until
    /// the returned guard is dropped, as a disk does in a stall; writes
    /// without a sync go on.
    pub fn stall_syncs(&self) -> SyncStall {
        *self.stall.stalled.lock() = true;
        SyncStall(self.stall.clone())
    }

    /// Bytes written since the last synced write, as records.
    pub fn unsynced_bytes(&self) -> usize {
        self.state.lock().unsynced_bytes
    }

    /// How many torn records opens have dropped so far.
    pub fn torn_records_dropped(&self) -> u64 {
        self.state.lock().torn_records_dropped
    }

    /// An independent copy of this disk as it is now, with nothing open
    /// on it; tests use it to try many crashes of one history.
    #[doc(hidden)]
    pub fn clone_for_test(&self) -> MemoryDisk {
        let state = self.state.lock();
        MemoryDisk {
            state: Arc::new(Mutex::new(DiskState {
                durable: state.durable.clone(),
                unsynced: state.unsynced.clone(),
                unsynced_bytes: state.unsynced_bytes,
                surviving: state.surviving.clone(),
                live: None,
                generation: 0,
                torn_records_dropped: state.torn_records_dropped,
            })),
            stall: Arc::default(),
        }
    }

    /// What survived the last power loss, as record bytes, until an open
    /// replays it. For the decoder fuzz tests.
    #[doc(hidden)]
    pub fn surviving_log_for_test(&self) -> Vec<u8> {
        self.state.lock().surviving.clone()
    }

    /// Replaces what survived the last power loss with `log`, as if those
    /// bytes had reached the disk. For the decoder fuzz tests.
    #[doc(hidden)]
    pub fn set_surviving_log_for_test(&self, log: Vec<u8>) {
        self.state.lock().surviving = log;
    }

    /// The machine loses power: an open engine stops working, and of the
    /// unsynced log only what `loss` describes survives.
    pub fn lose_power(&self, loss: PowerLoss) {
        let mut state = self.state.lock();
        state.generation += 1;
        state.live = None;
        if state.unsynced.is_empty() {
            return;
        }
        // Writes need an open engine, and opening replays what survived
        // an earlier power loss.
        assert!(state.surviving.is_empty(), "an open consumed the last loss");
        let mut log = Vec::with_capacity(state.unsynced_bytes);
        for ops in std::mem::take(&mut state.unsynced) {
            encode_record(&mut log, &ops);
        }
        state.unsynced_bytes = 0;
        let cut = loss.kept_bytes.min(log.len());
        match loss.torn_fill {
            Some(fill) => {
                let end = record_end_at(&log, cut);
                log.truncate(end);
                log[cut..].fill(fill);
            }
            None => log.truncate(cut),
        }
        state.surviving = log;
    }
}

/// The end of the record that byte `cut` falls into (or `cut` itself when
/// it is a record boundary or inside a header that was never complete).
fn record_end_at(log: &[u8], cut: usize) -> usize {
    let mut at = 0;
    while at < cut {
        let Some(length) = record_length(&log[at..]) else {
            return cut;
        };
        at += RECORD_HEADER + length;
    }
    at.min(log.len())
}

fn record_length(bytes: &[u8]) -> Option<usize> {
    let header: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(header) as usize)
}

/// An open engine on a [`MemoryDisk`]; dropping it is a process exit.
pub(super) struct MemoryEngine {
    disk: MemoryDisk,
    generation: u64,
}

impl MemoryEngine {
    /// Opens the disk: replays the unsynced log over the durable tables,
    /// dropping a torn tail. Fails if an engine is already open on it.
    pub fn open(disk: &MemoryDisk) -> Result<MemoryEngine, FatalError> {
        let mut state = disk.state.lock();
        if state.live.is_some() {
            return Err(FatalError::storage(
                "opening a memory disk",
                "another engine holds it open",
            ));
        }
        // What survived a power loss reached the disk; it becomes durable
        // once replayed (RocksDB recovers a WAL into table files).
        let surviving = std::mem::take(&mut state.surviving);
        let replayed = replay(&surviving, &mut state.durable)?;
        if replayed < surviving.len() {
            state.torn_records_dropped += 1;
        }
        let mut live = state.durable.clone();
        for ops in &state.unsynced {
            apply(&mut live, ops);
        }
        state.live = Some(live);
        state.generation += 1;
        Ok(MemoryEngine {
            disk: disk.clone(),
            generation: state.generation,
        })
    }

    /// Runs `read` on the live tables, if this engine is still open.
    fn with_live<T>(&self, read: impl FnOnce(&Tables) -> T) -> Result<T, FatalError> {
        let state = self.disk.state.lock();
        match &state.live {
            Some(live) if state.generation == self.generation => Ok(read(live)),
            _ => Err(closed()),
        }
    }

    pub fn get(&self, cf: usize, key: &[u8]) -> Result<Option<Vec<u8>>, FatalError> {
        self.with_live(|live| live[cf].get(key).cloned())
    }

    /// Up to `limit` records of `cf` after `from`, in key order.
    pub fn scan(
        &self,
        cf: usize,
        from: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<RawRecord>, FatalError> {
        self.with_live(|live| {
            live[cf]
                .range::<[u8], _>((from, Bound::Unbounded))
                .take(limit)
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
    }

    /// Applies `ops` atomically; `sync` makes them, and every earlier
    /// write, durable.
    pub fn write(&self, ops: Vec<Op>, sync: bool) -> Result<(), FatalError> {
        if sync {
            self.disk.stall.wait_out();
        }
        let mut state = self.disk.state.lock();
        let state = &mut *state;
        let Some(live) = state
            .live
            .as_mut()
            .filter(|_| state.generation == self.generation)
        else {
            return Err(closed());
        };
        apply(live, &ops);
        if !ops.is_empty() {
            state.unsynced_bytes += record_len(&ops);
            state.unsynced.push(ops);
        }
        if sync || state.unsynced_bytes > WRITEBACK_BYTES {
            fold(state);
        }
        Ok(())
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), FatalError> {
        self.disk.stall.wait_out();
        let mut state = self.disk.state.lock();
        if state.generation != self.generation || state.live.is_none() {
            return Err(closed());
        }
        fold(&mut state);
        Ok(())
    }
}

impl Drop for MemoryEngine {
    fn drop(&mut self) {
        let mut state = self.disk.state.lock();
        if state.generation == self.generation {
            state.live = None;
        }
    }
}

fn closed() -> FatalError {
    FatalError::storage(
        "using a memory engine",
        "its disk was closed (process exit or power loss)",
    )
}

/// Makes the unsynced log durable.
fn fold(state: &mut DiskState) {
    for ops in std::mem::take(&mut state.unsynced) {
        apply_owned(&mut state.durable, ops);
    }
    state.unsynced_bytes = 0;
}

/// Applies the records of `log` in order, stopping at the first one that
/// is incomplete or fails its checksum (a torn tail); returns the bytes of
/// whole, valid records.
fn replay(log: &[u8], tables: &mut Tables) -> Result<usize, FatalError> {
    let mut at = 0;
    while at < log.len() {
        let Some(payload) = valid_record(&log[at..]) else {
            break;
        };
        let ops = decode_ops(payload).map_err(|reason| {
            FatalError::storage(
                format!("replaying the memory disk's log: the record at byte {at}"),
                format!("is corrupt: {reason}"),
            )
        })?;
        apply_owned(tables, ops);
        at += RECORD_HEADER + payload.len();
    }
    Ok(at)
}

/// The payload of the record at the start of `bytes`, if it is complete
/// and its checksum matches.
fn valid_record(bytes: &[u8]) -> Option<&[u8]> {
    let length = record_length(bytes)?;
    let stored = u32::from_be_bytes(bytes.get(4..RECORD_HEADER)?.try_into().ok()?);
    let payload = bytes.get(RECORD_HEADER..RECORD_HEADER.checked_add(length)?)?;
    (length > 0 && crc32fast::hash(payload) == stored).then_some(payload)
}

fn apply(tables: &mut Tables, ops: &[Op]) {
    for op in ops {
        match op {
            Op::Put { cf, key, value } => {
                tables[*cf].insert(key.clone(), value.clone());
            }
            Op::Delete { cf, key } => {
                tables[*cf].remove(key);
            }
            Op::DeleteRange { cf, from, to } => delete_range(&mut tables[*cf], from, to),
        }
    }
}

fn apply_owned(tables: &mut Tables, ops: Vec<Op>) {
    for op in ops {
        match op {
            Op::Put { cf, key, value } => {
                tables[cf].insert(key, value);
            }
            Op::Delete { cf, key } => {
                tables[cf].remove(&key);
            }
            Op::DeleteRange { cf, from, to } => delete_range(&mut tables[cf], &from, &to),
        }
    }
}

fn delete_range(table: &mut Table, from: &[u8], to: &[u8]) {
    let doomed: Vec<Vec<u8>> = table
        .range::<[u8], _>((Bound::Included(from), Bound::Excluded(to)))
        .map(|(key, _)| key.clone())
        .collect();
    for key in doomed {
        table.remove(&key);
    }
}

/// The size of `ops` as a record.
fn record_len(ops: &[Op]) -> usize {
    let sizes = ops.iter().map(|op| match op {
        Op::Put { key, value, .. } => 2 + 8 + key.len() + value.len(),
        Op::Delete { key, .. } => 2 + 4 + key.len(),
        Op::DeleteRange { from, to, .. } => 2 + 8 + from.len() + to.len(),
    });
    RECORD_HEADER + sizes.sum::<usize>()
}

fn encode_record(log: &mut Vec<u8>, ops: &[Op]) {
    let start = log.len();
    log.extend_from_slice(&[0; RECORD_HEADER]);
    for op in ops {
        match op {
            Op::Put { cf, key, value } => {
                put_head(log, TAG_PUT, *cf, key);
                put_bytes(log, value);
            }
            Op::Delete { cf, key } => put_head(log, TAG_DELETE, *cf, key),
            Op::DeleteRange { cf, from, to } => {
                put_head(log, TAG_DELETE_RANGE, *cf, from);
                put_bytes(log, to);
            }
        }
    }
    let payload = &log[start + RECORD_HEADER..];
    let length = u32::try_from(payload.len()).expect("a batch record is under 4 GiB");
    let crc = crc32fast::hash(payload);
    log[start..start + 4].copy_from_slice(&length.to_be_bytes());
    log[start + 4..start + RECORD_HEADER].copy_from_slice(&crc.to_be_bytes());
    debug_assert_eq!(
        log.len() - start,
        record_len(ops),
        "record_len matches the encoding"
    );
}

fn put_head(log: &mut Vec<u8>, tag: u8, cf: usize, key: &[u8]) {
    log.push(tag);
    log.push(u8::try_from(cf).expect("column family index fits a byte"));
    put_bytes(log, key);
}

fn put_bytes(log: &mut Vec<u8>, bytes: &[u8]) {
    let length = u32::try_from(bytes.len()).expect("a key or value is under 4 GiB");
    log.extend_from_slice(&length.to_be_bytes());
    log.extend_from_slice(bytes);
}

/// Decodes a record whose checksum matched; a failure here is a bug in the
/// encoder or damage the checksum missed, and stops the node (the caller
/// names the record's offset).
fn decode_ops(mut payload: &[u8]) -> Result<Vec<Op>, String> {
    let mut ops = Vec::new();
    while !payload.is_empty() {
        let (tag, cf) = match payload {
            [tag, cf, rest @ ..] if usize::from(*cf) < FAMILIES => {
                payload = rest;
                (*tag, usize::from(*cf))
            }
            _ => return Err("bad op header".into()),
        };
        let key = take_bytes(&mut payload)?;
        ops.push(match tag {
            TAG_PUT => Op::Put {
                cf,
                key,
                value: take_bytes(&mut payload)?,
            },
            TAG_DELETE => Op::Delete { cf, key },
            TAG_DELETE_RANGE => {
                let to = take_bytes(&mut payload)?;
                // The encoder never writes one; the table would panic on it.
                if key > to {
                    return Err("a delete range that ends before it starts".into());
                }
                Op::DeleteRange { cf, from: key, to }
            }
            _ => return Err(format!("unknown op tag {tag}")),
        });
    }
    Ok(ops)
}

fn take_bytes(payload: &mut &[u8]) -> Result<Vec<u8>, String> {
    let length = record_length(payload).ok_or("short length")?;
    let bytes = payload.get(4..4 + length).ok_or("short bytes")?.to_vec();
    *payload = &payload[4 + length..];
    Ok(bytes)
}

#[cfg(test)]
mod tests;
