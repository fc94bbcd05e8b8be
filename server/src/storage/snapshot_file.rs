//! Snapshot files: the state machine at one applied index, in a file that
//! carries its own checksum. Used for the snapshots a leader streams to a
//! follower that fell behind the compacted log, and for backups
//! (`latchkey snapshot save` / `restore`).
//!
//! # Format (integers big-endian)
//! ```text
//! "LKSNAP01"                                   8 bytes
//! record*:  key length u32 | key | value length u32 | value
//! 0xFFFFFFFF                                   end of records
//! trailer:  length u32 | SnapshotTrailer (protobuf: index, term,
//!           conf state, record count, creation time)
//! crc32 of every byte before it                u32
//! ```
//! Values are the stored, framed values (each with its own crc32), so every
//! record is checked twice: by its frame and by the file's checksum. A
//! reader streams the file and trusts nothing before the final checksum
//! matched: [`read`] hands records to its caller as it goes, and the caller
//! must not act on them unless `read` returns `Ok` (the installer collects
//! them in one batch and writes it only then).
//!
//! A file is written to `<path>.part` and renamed into place once complete
//! and synced, so a file under its final name is never half written.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::ConfState;

use latchkey_proto::state::v1::SnapshotTrailer;

use super::{keys, unframe, Engine, LogPosition, CF_STATE};
use crate::error::FatalError;

const MAGIC: &[u8; 8] = b"LKSNAP01";
const END_OF_RECORDS: u32 = u32::MAX;
/// Longest key a snapshot may hold (keys are at most 1 KiB plus a prefix).
const MAX_KEY_BYTES: u32 = 64 * 1024;
/// Largest value a snapshot may hold (values are at most 1 MiB plus framing).
const MAX_VALUE_BYTES: u32 = 16 * 1024 * 1024;
/// Largest trailer.
const MAX_TRAILER_BYTES: u32 = 1024 * 1024;
/// I/O buffer size.
const BUFFER_BYTES: usize = 1024 * 1024;

/// What a snapshot file holds, from its trailer.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    pub index: u64,
    pub term: u64,
    pub conf_state: ConfState,
    pub records: u64,
    /// Size of the whole file.
    pub bytes: u64,
    /// The file's crc32.
    pub checksum: u32,
    pub created_unix_ms: u64,
}

/// Why a file is not a usable snapshot; one line that says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error(
        "{path} is not a latchkey snapshot (it does not start with {:?})",
        String::from_utf8_lossy(MAGIC)
    )]
    NotASnapshot { path: String },
    #[error("{path} is truncated: it ends inside {what} after {at} bytes")]
    Truncated {
        path: String,
        what: &'static str,
        at: u64,
    },
    #[error("{path} is corrupt: checksum {computed:#010x} computed, {stored:#010x} stored")]
    Checksum {
        path: String,
        stored: u32,
        computed: u32,
    },
    #[error("{path} is corrupt: {reason}")]
    Malformed { path: String, reason: String },
}

/// Writes the `state` family of `engine`, as of one instant, to `path`.
pub fn write_from_engine(engine: &Engine, path: &Path) -> Result<SnapshotInfo, FatalError> {
    let part = part_path(path);
    let io = |e: std::io::Error| FatalError::storage(format!("writing {}", part.display()), e);
    let file = File::create(&part).map_err(io)?;
    let mut writer = Checksummed::new(BufWriter::with_capacity(BUFFER_BYTES, file));
    writer.write_all(MAGIC).map_err(io)?;
    let mut records = 0u64;
    let mut applied = LogPosition::default();
    let mut conf_state = ConfState::default();
    let mut failed = None;
    engine.visit_state_snapshot(|key, raw| {
        if key == keys::APPLIED {
            applied = super::decode(CF_STATE, key, &unframe(CF_STATE, key, raw)?)?;
        } else if key == keys::CONF_STATE {
            let payload = unframe(CF_STATE, key, raw)?;
            conf_state = ConfState::parse_from_bytes(&payload)
                .map_err(|e| super::corruption(CF_STATE, key, format!("does not decode: {e}")))?;
        }
        if let Err(e) = write_record(&mut writer, key, raw) {
            failed = Some(io(e));
            return Ok(false);
        }
        records += 1;
        Ok(true)
    })?;
    if let Some(failure) = failed {
        return Err(failure);
    }
    let created_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let trailer = SnapshotTrailer {
        index: applied.index,
        term: applied.term,
        conf_state: conf_state.write_to_bytes().unwrap_or_default(),
        records,
        created_unix_ms,
    };
    let encoded = trailer.encode_to_vec();
    writer
        .write_all(&END_OF_RECORDS.to_be_bytes())
        .map_err(io)?;
    writer
        .write_all(&(encoded.len() as u32).to_be_bytes())
        .map_err(io)?;
    writer.write_all(&encoded).map_err(io)?;
    let (mut inner, checksum, bytes) = writer.finish();
    inner.write_all(&checksum.to_be_bytes()).map_err(io)?;
    let file = inner.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&part, path).map_err(io)?;
    Ok(SnapshotInfo {
        index: applied.index,
        term: applied.term,
        conf_state,
        records,
        bytes: bytes + 4,
        checksum,
        created_unix_ms,
    })
}

/// Where a file is written before it is complete.
pub fn part_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

fn write_record(out: &mut impl Write, key: &[u8], raw: &[u8]) -> std::io::Result<()> {
    out.write_all(&(key.len() as u32).to_be_bytes())?;
    out.write_all(key)?;
    out.write_all(&(raw.len() as u32).to_be_bytes())?;
    out.write_all(raw)
}

/// Checks a whole file: its structure, every record's frame, its checksum.
pub fn verify(path: &Path) -> Result<SnapshotInfo, SnapshotFileError> {
    read(path, |_, _| Ok(()))
}

/// Streams the records of `path` to `visit`, then checks the file's
/// checksum. Do not act on the records unless this returns `Ok`.
pub fn read(
    path: &Path,
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), SnapshotFileError>,
) -> Result<SnapshotInfo, SnapshotFileError> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|e| SnapshotFileError::Io {
        path: name.clone(),
        reason: e.to_string(),
    })?;
    let mut reader = Reader {
        inner: Checksummed::new(BufReader::with_capacity(BUFFER_BYTES, file)),
        path: name.clone(),
    };
    let mut magic = [0u8; 8];
    reader.exact(&mut magic, "the header")?;
    if &magic != MAGIC {
        return Err(SnapshotFileError::NotASnapshot { path: name });
    }
    let mut records = 0u64;
    // Bounded by the file: each pass consumes at least four bytes.
    loop {
        let record_start = reader.inner.count;
        let key_len = reader.u32("a record")?;
        if key_len == END_OF_RECORDS {
            break;
        }
        let key = reader.bytes(key_len, MAX_KEY_BYTES, "a key")?;
        let value_len = reader.u32("a record")?;
        let raw = reader.bytes(value_len, MAX_VALUE_BYTES, "a value")?;
        if unframe(CF_STATE, &key, &raw).is_err() {
            return Err(reader.malformed_at(
                record_start,
                format!(
                    "record {} (key \"{}\") fails its checksum",
                    records + 1,
                    key.escape_ascii()
                ),
            ));
        }
        visit(&key, &raw)?;
        records += 1;
    }
    let trailer_start = reader.inner.count;
    let trailer_len = reader.u32("the trailer")?;
    let trailer = reader.bytes(trailer_len, MAX_TRAILER_BYTES, "the trailer")?;
    let computed = reader.inner.checksum();
    let bytes = reader.inner.count + 4;
    let stored = reader.u32("the checksum")?;
    let mut extra = [0u8; 1];
    if reader.inner.inner.read(&mut extra).unwrap_or(0) != 0 {
        return Err(reader.malformed("bytes follow the checksum".into()));
    }
    if stored != computed {
        return Err(SnapshotFileError::Checksum {
            path: name,
            stored,
            computed,
        });
    }
    let trailer = SnapshotTrailer::decode(trailer.as_slice())
        .map_err(|e| reader.malformed_at(trailer_start, format!("trailer does not decode: {e}")))?;
    if trailer.records != records {
        return Err(reader.malformed_at(
            trailer_start,
            format!("{records} records, the trailer says {}", trailer.records),
        ));
    }
    let conf_state = ConfState::parse_from_bytes(&trailer.conf_state).map_err(|e| {
        reader.malformed_at(trailer_start, format!("membership does not decode: {e}"))
    })?;
    Ok(SnapshotInfo {
        index: trailer.index,
        term: trailer.term,
        conf_state,
        records,
        bytes,
        checksum: stored,
        created_unix_ms: trailer.created_unix_ms,
    })
}

struct Reader<R> {
    inner: Checksummed<R>,
    path: String,
}

impl<R: Read> Reader<R> {
    fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), SnapshotFileError> {
        let at = self.inner.count;
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => SnapshotFileError::Truncated {
                path: self.path.clone(),
                what,
                at,
            },
            _ => SnapshotFileError::Io {
                path: self.path.clone(),
                reason: e.to_string(),
            },
        })
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, SnapshotFileError> {
        let mut buf = [0u8; 4];
        self.exact(&mut buf, what)?;
        Ok(u32::from_be_bytes(buf))
    }

    fn bytes(
        &mut self,
        len: u32,
        most: u32,
        what: &'static str,
    ) -> Result<Vec<u8>, SnapshotFileError> {
        if len > most {
            return Err(self.malformed(format!("{what} of {len} bytes (at most {most})")));
        }
        let mut buf = vec![0u8; len as usize];
        self.exact(&mut buf, what)?;
        Ok(buf)
    }

    /// The file is malformed where the reader stands.
    fn malformed(&self, reason: String) -> SnapshotFileError {
        self.malformed_at(self.inner.count, reason)
    }

    /// The file is malformed at byte `at` (what starts there).
    fn malformed_at(&self, at: u64, reason: String) -> SnapshotFileError {
        SnapshotFileError::Malformed {
            path: self.path.clone(),
            reason: format!("at byte {at}: {reason}"),
        }
    }
}

/// A reader or writer that keeps a crc32 and a count of what passed.
struct Checksummed<T> {
    inner: T,
    hasher: crc32fast::Hasher,
    count: u64,
}

impl<T> Checksummed<T> {
    fn new(inner: T) -> Checksummed<T> {
        Checksummed {
            inner,
            hasher: crc32fast::Hasher::new(),
            count: 0,
        }
    }

    fn checksum(&self) -> u32 {
        self.hasher.clone().finalize()
    }

    fn finish(self) -> (T, u32, u64) {
        (self.inner, self.hasher.finalize(), self.count)
    }
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.hasher.update(&buf[..written]);
        self.count += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Checksummed<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.hasher.update(&buf[..read]);
        self.count += read as u64;
        Ok(read)
    }
}

#[cfg(test)]
mod tests;
