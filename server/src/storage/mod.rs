//! Durable storage: one RocksDB database per node, three column families
//! (or, in the deterministic simulator, an in-memory model of one).
//!
//! | column family | keys | values |
//! |---|---|---|
//! | `raft_log` | entry index, 8 bytes big-endian | raft-rs `Entry` |
//! | `raft_state` | `hard_state`, `conf_state`, `truncated` | `HardState`, `ConfState`, [`LogPosition`] of the last compacted entry |
//! | `state` | state-machine keys (see [`keys`]) | state-machine records |
//!
//! Every value is framed as `crc32(key ‖ payload)` (4 bytes, big-endian)
//! followed by the payload, and checked on every read. A mismatch is a
//! [`FatalError::Corruption`] naming the column family and key: the node
//! stops rather than serve data it cannot vouch for. Opening the database
//! scans every record once, so a damaged replica refuses to start instead of
//! failing later; RocksDB's own block checksums are verified by that same
//! scan, and its write-ahead log is replayed in a mode that rejects damage in
//! the middle of the log but tolerates a torn final record (a write that was
//! never acknowledged).
//!
//! Durability: Raft entries and hard state go in one `WriteBatch`, fsynced
//! when raft-rs asks (`must_sync`). State-machine changes and the applied
//! index go in one `WriteBatch` without fsync: after a crash the state
//! machine is at some earlier applied index and replays the rest of the
//! (fsynced) log. Compaction only removes entries at or below an applied
//! index that is already in the same write-ahead log, so it never outruns the
//! state it depends on.
//!
//! # Layout
//! - this file: [`Engine`], the opened database with checksummed get/put/scan.
//! - [`memory`]: the in-memory backend of [`Engine`] ([`Engine::open_memory`]),
//!   which models what survives a power loss; for the simulator only.
//! - [`raft_log`]: [`RaftLog`], raft-rs's `Storage` over the first two families.
//! - [`keys`]: the key layout of the `state` family.
//! - [`snapshot_file`]: the checksummed file a snapshot (or a backup) is
//!   written to and streamed from.

pub mod keys;
pub mod memory;
pub mod raft_log;
pub mod snapshot_file;

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DBRecoveryMode, Direction, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};

pub use latchkey_proto::state::v1::LogPosition;
pub use memory::{MemoryDisk, PowerLoss, SyncStall};
pub use raft_log::RaftLog;

use memory::{MemoryEngine, Op};

use crate::error::FatalError;

/// A stored key and its framed value.
pub type RawRecord = (Vec<u8>, Vec<u8>);

/// Column family of the Raft log entries.
pub const CF_RAFT_LOG: &str = "raft_log";
/// Column family of hard state, conf state and the compaction point.
pub const CF_RAFT_STATE: &str = "raft_state";
/// Column family of the state machine.
pub const CF_STATE: &str = "state";

const COLUMN_FAMILIES: [&str; 3] = [CF_RAFT_LOG, CF_RAFT_STATE, CF_STATE];

/// Memtable size of the state machine's column family. Every command
/// inserts a few small records at random places (and their tombstones
/// later); in RocksDB's default 64 MiB memtable each insert's skip-list
/// search misses the CPU caches at most levels, which made it the largest
/// single cost in a profile of `lock-nc`. A small memtable stays cache-warm
/// and is flushed often, which for a working set this small is cheap.
const STATE_WRITE_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Memtable size of the Raft log's column family. The live log is short
/// (compacted to half of `--compact-log-after-entries`, 10 000 entries by
/// default), but a memtable keeps every entry appended since its last
/// flush, compacted or not: RocksDB's default 64 MiB made the log's
/// memtable a large part of a node's resident memory under load. 8 MiB
/// holds the default live log a few times over.
const RAFT_LOG_WRITE_BUFFER_BYTES: usize = 8 * 1024 * 1024;

/// Bytes of the checksum that prefixes every stored value.
const CHECKSUM_LEN: usize = 4;
/// Records a scan of the memory backend copies out per lock taken: the
/// first chunk is small (most scans read a few log entries), later ones
/// double up to the largest.
const MEMORY_SCAN_FIRST_CHUNK: usize = 8;
const MEMORY_SCAN_LARGEST_CHUNK: usize = 256;

/// The opened database. Cheap to clone; every clone shares one database.
#[derive(Clone)]
pub struct Engine {
    backend: Backend,
    /// A fault-injection file: while it exists, syncs wait (see
    /// [`Engine::stall_syncs_while_exists`]).
    stall_file: Option<Arc<PathBuf>>,
}

/// How often a sync held by a stall file looks whether it is gone.
const STALL_FILE_POLL: std::time::Duration = std::time::Duration::from_millis(10);

#[derive(Clone)]
enum Backend {
    Rocks(Arc<DB>),
    Memory(Arc<MemoryEngine>),
}

fn column_family_options(name: &str) -> Options {
    let mut options = Options::default();
    match name {
        CF_STATE => options.set_write_buffer_size(STATE_WRITE_BUFFER_BYTES),
        CF_RAFT_LOG => options.set_write_buffer_size(RAFT_LOG_WRITE_BUFFER_BYTES),
        _ => {}
    }
    options
}

impl Engine {
    /// Opens (creating if missing) the database under `dir` and verifies
    /// every record's checksum.
    pub fn open(dir: &Path) -> Result<Engine, FatalError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_paranoid_checks(true);
        options.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
        options.set_keep_log_file_num(4);
        let descriptors = COLUMN_FAMILIES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, column_family_options(name)));
        let db = DB::open_cf_descriptors(&options, dir, descriptors)
            .map_err(|e| FatalError::storage(format!("opening {}", dir.display()), e))?;
        let engine = Engine {
            backend: Backend::Rocks(Arc::new(db)),
            stall_file: None,
        };
        engine.verify_all()?;
        Ok(engine)
    }

    /// Opens the in-memory backend on `disk` (see [`memory`]), replaying
    /// what survived of its unsynced writes and verifying every record's
    /// checksum. For the deterministic simulator; production uses [`Engine::open`].
    pub fn open_memory(disk: &MemoryDisk) -> Result<Engine, FatalError> {
        let engine = Engine {
            backend: Backend::Memory(Arc::new(MemoryEngine::open(disk)?)),
            stall_file: None,
        };
        engine.verify_all()?;
        Ok(engine)
    }

    fn rocks_cf<'a>(db: &'a DB, name: &'static str) -> &'a ColumnFamily {
        // Every column family in COLUMN_FAMILIES is created by `open`.
        db.cf_handle(name).expect("column family created at open")
    }

    /// Reads and verifies one record; `None` when the key is absent.
    pub fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, FatalError> {
        match &self.backend {
            Backend::Rocks(db) => {
                let raw = db
                    .get_pinned_cf(Engine::rocks_cf(db, cf), key)
                    .map_err(|e| {
                        FatalError::storage(format!("reading {cf}/{}", display_key(key)), e)
                    })?;
                raw.map(|raw| unframe(cf, key, &raw)).transpose()
            }
            Backend::Memory(memory) => memory
                .get(cf_index(cf), key)?
                .map(|raw| unframe(cf, key, &raw))
                .transpose(),
        }
    }

    /// Reads, verifies and decodes one protobuf record.
    pub fn get_message<M: prost::Message + Default>(
        &self,
        cf: &'static str,
        key: &[u8],
    ) -> Result<Option<M>, FatalError> {
        match self.get(cf, key)? {
            None => Ok(None),
            Some(payload) => decode(cf, key, &payload).map(Some),
        }
    }

    /// Visits the verified records of `cf` whose keys start with `prefix`,
    /// in key order, until `visit` returns false.
    pub fn scan_prefix(
        &self,
        cf: &'static str,
        prefix: &[u8],
        mut visit: impl FnMut(&[u8], Vec<u8>) -> bool,
    ) -> Result<(), FatalError> {
        self.scan_from(cf, prefix, |key, payload| {
            key.starts_with(prefix) && visit(key, payload)
        })
    }

    /// Visits the verified records of `cf` from `start` on, in key order,
    /// until `visit` returns false.
    pub fn scan_from(
        &self,
        cf: &'static str,
        start: &[u8],
        mut visit: impl FnMut(&[u8], Vec<u8>) -> bool,
    ) -> Result<(), FatalError> {
        let memory = match &self.backend {
            Backend::Rocks(db) => return Engine::rocks_scan(db, cf, start, visit),
            Backend::Memory(memory) => memory,
        };
        // In chunks, so that `visit` runs without the disk's lock held.
        let mut from = Bound::Included(start.to_vec());
        let mut size = MEMORY_SCAN_FIRST_CHUNK;
        loop {
            let chunk = memory.scan(cf_index(cf), as_slice(&from), size)?;
            let complete = chunk.len() < size;
            size = (size * 2).min(MEMORY_SCAN_LARGEST_CHUNK);
            for (key, raw) in chunk {
                let payload = unframe(cf, &key, &raw)?;
                if !visit(&key, payload) {
                    return Ok(());
                }
                from = Bound::Excluded(key);
            }
            if complete {
                return Ok(());
            }
        }
    }

    fn rocks_scan(
        db: &DB,
        cf: &'static str,
        start: &[u8],
        mut visit: impl FnMut(&[u8], Vec<u8>) -> bool,
    ) -> Result<(), FatalError> {
        let iter = db.iterator_cf(
            Engine::rocks_cf(db, cf),
            IteratorMode::From(start, Direction::Forward),
        );
        for item in iter {
            let (key, raw) = item.map_err(|e| FatalError::storage(format!("scanning {cf}"), e))?;
            let payload = unframe(cf, &key, &raw)?;
            if !visit(&key, payload) {
                break;
            }
        }
        Ok(())
    }

    /// Every record of the `state` family, still framed, as seen at one
    /// instant; the payload of a snapshot.
    pub fn state_records(&self) -> Result<Vec<RawRecord>, FatalError> {
        let records = match &self.backend {
            Backend::Rocks(db) => {
                let snapshot = db.snapshot();
                let iter =
                    snapshot.iterator_cf(Engine::rocks_cf(db, CF_STATE), IteratorMode::Start);
                let mut records = Vec::new();
                for item in iter {
                    let (key, raw) =
                        item.map_err(|e| FatalError::storage("reading a snapshot", e))?;
                    records.push((key.to_vec(), raw.to_vec()));
                }
                records
            }
            Backend::Memory(memory) => {
                memory.scan(cf_index(CF_STATE), Bound::Unbounded, usize::MAX)?
            }
        };
        for (key, raw) in &records {
            unframe(CF_STATE, key, raw)?;
        }
        Ok(records)
    }

    /// Visits every verified record of the `state` family as of one instant
    /// (a RocksDB snapshot), in key order, until `visit` returns false.
    pub fn visit_state_snapshot(
        &self,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, FatalError>,
    ) -> Result<(), FatalError> {
        match &self.backend {
            Backend::Rocks(db) => {
                let snapshot = db.snapshot();
                let iter =
                    snapshot.iterator_cf(Engine::rocks_cf(db, CF_STATE), IteratorMode::Start);
                for item in iter {
                    let (key, raw) =
                        item.map_err(|e| FatalError::storage("reading a snapshot", e))?;
                    unframe(CF_STATE, &key, &raw)?;
                    if !visit(&key, &raw)? {
                        break;
                    }
                }
                Ok(())
            }
            Backend::Memory(_) => {
                for (key, raw) in self.state_records()? {
                    if !visit(&key, &raw)? {
                        break;
                    }
                }
                Ok(())
            }
        }
    }

    /// Whether this is the simulator's in-memory backend.
    pub fn is_memory(&self) -> bool {
        matches!(self.backend, Backend::Memory(_))
    }

    /// Applies a batch; `sync` forces it to disk before returning.
    pub fn write(&self, batch: Batch, sync: bool) -> Result<(), FatalError> {
        if sync {
            self.wait_out_stall_file();
        }
        match (&self.backend, batch.inner) {
            (Backend::Rocks(db), BatchInner::Rocks(inner)) => {
                let mut options = WriteOptions::default();
                options.set_sync(sync);
                db.write_opt(inner, &options)
                    .map_err(|e| FatalError::storage("writing a batch", e))
            }
            (Backend::Memory(memory), BatchInner::Memory(ops)) => memory.write(ops, sync),
            // `Batch::new` makes the batch for the engine it is given, and
            // the node writes it to that engine.
            _ => unreachable!("a batch written to another kind of engine"),
        }
    }

    /// Makes every write so far durable: one fsync of RocksDB's write-ahead
    /// log, which writes made without `sync` sit in until then.
    pub fn sync_wal(&self) -> Result<(), FatalError> {
        self.wait_out_stall_file();
        match &self.backend {
            Backend::Rocks(db) => db
                .flush_wal(true)
                .map_err(|e| FatalError::storage("syncing the write-ahead log", e)),
            Backend::Memory(memory) => memory.flush(),
        }
    }

    /// For fault injection only (`serve --unsafe-disk-stall-file`): from
    /// now on, while `path` exists, every sync of this engine and its
    /// clones (a synced write, a sync of the write-ahead log) waits for it
    /// to be removed before it starts, as on a disk whose flushes hang.
    /// Writes without a sync go on. Set before the engine is cloned.
    pub fn stall_syncs_while_exists(mut self, path: PathBuf) -> Engine {
        self.stall_file = Some(Arc::new(path));
        self
    }

    fn wait_out_stall_file(&self) {
        let Some(path) = &self.stall_file else {
            return;
        };
        // Ends when the file is removed; the fault injector that made it
        // removes it at its heal.
        while path.exists() {
            std::thread::sleep(STALL_FILE_POLL);
        }
    }

    /// Flushes memtables to table files (used on clean shutdown so that a
    /// restart does not need to replay the write-ahead log).
    pub fn flush(&self) -> Result<(), FatalError> {
        let db = match &self.backend {
            Backend::Rocks(db) => db,
            Backend::Memory(memory) => return memory.flush(),
        };
        for cf in COLUMN_FAMILIES {
            db.flush_cf(Engine::rocks_cf(db, cf))
                .map_err(|e| FatalError::storage(format!("flushing {cf}"), e))?;
        }
        Ok(())
    }

    /// Reads every record of every column family, checking RocksDB's block
    /// checksums and ours.
    fn verify_all(&self) -> Result<(), FatalError> {
        let db = match &self.backend {
            Backend::Rocks(db) => db,
            Backend::Memory(_) => {
                for cf in COLUMN_FAMILIES {
                    self.scan_from(cf, &[], |_, _| true)?;
                }
                return Ok(());
            }
        };
        for cf in COLUMN_FAMILIES {
            let mut options = ReadOptions::default();
            options.set_verify_checksums(true);
            options.fill_cache(false);
            for item in db.iterator_cf_opt(Engine::rocks_cf(db, cf), options, IteratorMode::Start) {
                let (key, raw) =
                    item.map_err(|e| FatalError::storage(format!("verifying {cf}"), e))?;
                unframe(cf, &key, &raw)?;
            }
        }
        Ok(())
    }

    /// Writes a raw value, bypassing the framing. Only for tests that need
    /// to plant a damaged record.
    #[doc(hidden)]
    pub fn put_raw_for_test(&self, cf: &'static str, key: &[u8], raw: &[u8]) {
        // Test-only helper: a failed write is a broken test environment.
        match &self.backend {
            Backend::Rocks(db) => db
                .put_cf(Engine::rocks_cf(db, cf), key, raw)
                .expect("raw test write"),
            Backend::Memory(memory) => {
                let op = Op::Put {
                    cf: cf_index(cf),
                    key: key.to_vec(),
                    value: raw.to_vec(),
                };
                memory.write(vec![op], true).expect("raw test write");
            }
        }
    }
}

/// The position of `cf` in [`COLUMN_FAMILIES`].
fn cf_index(cf: &'static str) -> usize {
    // Callers name one of the three families by its constant.
    COLUMN_FAMILIES
        .iter()
        .position(|name| *name == cf)
        .expect("a known column family")
}

fn as_slice(bound: &Bound<Vec<u8>>) -> Bound<&[u8]> {
    match bound {
        Bound::Included(key) => Bound::Included(key),
        Bound::Excluded(key) => Bound::Excluded(key),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// A set of writes applied atomically by [`Engine::write`].
pub struct Batch {
    inner: BatchInner,
    engine: Engine,
}

enum BatchInner {
    Rocks(WriteBatch),
    Memory(Vec<Op>),
}

impl Batch {
    pub fn new(engine: &Engine) -> Batch {
        let inner = match engine.backend {
            Backend::Rocks(_) => BatchInner::Rocks(WriteBatch::default()),
            Backend::Memory(_) => BatchInner::Memory(Vec::new()),
        };
        Batch {
            inner,
            engine: engine.clone(),
        }
    }

    fn put_raw(&mut self, cf: &'static str, key: &[u8], raw: Vec<u8>) {
        match (&mut self.inner, &self.engine.backend) {
            (BatchInner::Rocks(inner), Backend::Rocks(db)) => {
                inner.put_cf(Engine::rocks_cf(db, cf), key, raw)
            }
            (BatchInner::Memory(ops), _) => ops.push(Op::Put {
                cf: cf_index(cf),
                key: key.to_vec(),
                value: raw,
            }),
            _ => unreachable!("a batch matches its engine (Batch::new)"),
        }
    }

    /// Stores `payload` under `key`, framed with its checksum.
    pub fn put(&mut self, cf: &'static str, key: &[u8], payload: &[u8]) {
        let framed = frame(key, payload);
        self.put_raw(cf, key, framed);
    }

    /// Stores a protobuf record.
    pub fn put_message(&mut self, cf: &'static str, key: &[u8], message: &impl prost::Message) {
        self.put(cf, key, &message.encode_to_vec());
    }

    /// Stores an already framed value (from a snapshot), after checking it.
    pub fn put_framed(
        &mut self,
        cf: &'static str,
        key: &[u8],
        raw: &[u8],
    ) -> Result<(), FatalError> {
        unframe(cf, key, raw)?;
        self.put_raw(cf, key, raw.to_vec());
        Ok(())
    }

    pub fn delete(&mut self, cf: &'static str, key: &[u8]) {
        match (&mut self.inner, &self.engine.backend) {
            (BatchInner::Rocks(inner), Backend::Rocks(db)) => {
                inner.delete_cf(Engine::rocks_cf(db, cf), key)
            }
            (BatchInner::Memory(ops), _) => ops.push(Op::Delete {
                cf: cf_index(cf),
                key: key.to_vec(),
            }),
            _ => unreachable!("a batch matches its engine (Batch::new)"),
        }
    }

    /// Deletes every key in `[from, to)`.
    pub fn delete_range(&mut self, cf: &'static str, from: &[u8], to: &[u8]) {
        match (&mut self.inner, &self.engine.backend) {
            (BatchInner::Rocks(inner), Backend::Rocks(db)) => {
                inner.delete_range_cf(Engine::rocks_cf(db, cf), from, to)
            }
            (BatchInner::Memory(ops), _) => ops.push(Op::DeleteRange {
                cf: cf_index(cf),
                from: from.to_vec(),
                to: to.to_vec(),
            }),
            _ => unreachable!("a batch matches its engine (Batch::new)"),
        }
    }

    pub fn is_empty(&self) -> bool {
        match &self.inner {
            BatchInner::Rocks(inner) => inner.is_empty(),
            BatchInner::Memory(ops) => ops.is_empty(),
        }
    }

    /// Number of writes (puts, deletes, range deletes) in the batch.
    pub fn len(&self) -> usize {
        match &self.inner {
            BatchInner::Rocks(inner) => inner.len(),
            BatchInner::Memory(ops) => ops.len(),
        }
    }
}

fn checksum(key: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(payload);
    hasher.finalize()
}

fn frame(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(CHECKSUM_LEN + payload.len());
    framed.extend_from_slice(&checksum(key, payload).to_be_bytes());
    framed.extend_from_slice(payload);
    framed
}

pub(crate) fn unframe(cf: &'static str, key: &[u8], raw: &[u8]) -> Result<Vec<u8>, FatalError> {
    if raw.len() < CHECKSUM_LEN {
        return Err(corruption(
            cf,
            key,
            format!("record is {} bytes, shorter than its checksum", raw.len()),
        ));
    }
    let (stored, payload) = raw.split_at(CHECKSUM_LEN);
    let stored = u32::from_be_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let computed = checksum(key, payload);
    if stored != computed {
        return Err(corruption(
            cf,
            key,
            format!("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"),
        ));
    }
    Ok(payload.to_vec())
}

/// Decodes a verified protobuf payload; a failure is corruption.
pub fn decode<M: prost::Message + Default>(
    cf: &'static str,
    key: &[u8],
    payload: &[u8],
) -> Result<M, FatalError> {
    M::decode(payload).map_err(|e| corruption(cf, key, format!("does not decode: {e}")))
}

pub(crate) fn corruption(cf: &'static str, key: &[u8], reason: String) -> FatalError {
    FatalError::Corruption {
        cf,
        key: display_key(key),
        reason,
    }
}

/// Renders a key for messages: printable ASCII as is, anything else as hex.
pub fn display_key(key: &[u8]) -> String {
    if !key.is_empty() && key.iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(key).into_owned()
    } else {
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    }
}

#[cfg(test)]
mod tests;
