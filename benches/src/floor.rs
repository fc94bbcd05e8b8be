//! The measured floor: how long one synced RocksDB write takes on the
//! disk of the data directory, and how long two sequential ones take.
//!
//! A latchkey commit is at least one synced write of the Raft log on the
//! leader (followers write theirs in parallel), so on this disk
//! - a hand-over (the release that grants the next waiter) costs at least
//!   one synced write: the **one-commit floor**;
//! - a lock-and-release cycle costs at least two sequential ones: the
//!   **two-commit floor**.
//!
//! Writes go through `latchkey_server::storage::Engine`, the server's own
//! storage layer with its options and checksum framing, into the Raft-log
//! column family, one new key per write with a payload the size of a
//! small log entry. Nothing else is counted: no network, no Raft, no
//! apply. The floor is measured in a fresh directory under the run's data
//! directory, so it sees the same filesystem the clusters use.
//!
//! The floor is measured twice: with one writer (the floor the targets
//! name), and with [`CLUSTER_WRITERS`] writers in lockstep, each with its
//! own database, because the five nodes of a local cluster sync to the
//! same disk at the same moment. On some machines the two differ a lot:
//! a filesystem journal can fold concurrent syncs into one commit, and a
//! virtual disk may complete a lone flush only on a timer tick.
//!
//! Beside the RocksDB floor, the same writers sync 132-byte overwrites of
//! a file they zero-filled and synced beforehand: the disk's own cost of a
//! synced write, without what appending to RocksDB's write-ahead log adds
//! (each append grows the file, so each sync also commits the
//! filesystem's journal). The difference is what a Raft log kept in
//! preallocated files of its own would save per commit; the targets do not
//! use it.

use latchkey_server::storage::{Batch, Engine, CF_RAFT_LOG};
use serde::Serialize;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use crate::stats::{LatencySummary, Recorder};

/// Bytes of each write's payload: about one small Raft entry.
const PAYLOAD_BYTES: usize = 128;
/// Writes before sampling starts (the first ones create files).
const WARMUP_WRITES: usize = 20;

/// One-commit and two-commit floors.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    /// One synced write, one writer.
    pub one_write: LatencySummary,
    /// Two synced writes, one after the other, one writer.
    pub two_writes: LatencySummary,
    /// One synced write while [`CLUSTER_WRITERS`] writers (each with its own
    /// database, like the nodes of a local cluster) write at the same moment.
    pub one_write_concurrent: LatencySummary,
    /// Two sequential synced writes, [`CLUSTER_WRITERS`] writers at once.
    pub two_writes_concurrent: LatencySummary,
    /// One synced overwrite of a preallocated file, one writer: the disk
    /// without RocksDB.
    pub file_write: LatencySummary,
    /// The same, [`CLUSTER_WRITERS`] writers at once, each its own file.
    pub file_write_concurrent: LatencySummary,
}

/// Writers in the concurrent floor: one per node of a local cluster.
pub const CLUSTER_WRITERS: usize = 5;

impl Floor {
    pub fn lines(&self) -> Vec<String> {
        let line = |name: &str, s: &LatencySummary| {
            format!(
                "{name}: p50 {:.3} ms, p99 {:.3} ms, p999 {:.3} ms ({} samples)",
                s.p50_ms, s.p99_ms, s.p999_ms, s.count
            )
        };
        vec![
            line(
                "one synced write,  1 writer  (hand-over floor)    ",
                &self.one_write,
            ),
            line(
                "two synced writes, 1 writer  (lock+release floor) ",
                &self.two_writes,
            ),
            line(
                "one synced write,  5 writers at once              ",
                &self.one_write_concurrent,
            ),
            line(
                "two synced writes, 5 writers at once              ",
                &self.two_writes_concurrent,
            ),
            line(
                "one synced write,  1 writer,  preallocated file   ",
                &self.file_write,
            ),
            line(
                "one synced write,  5 writers, preallocated file   ",
                &self.file_write_concurrent,
            ),
        ]
    }
}

/// Measures `samples` single writes and `samples` pairs, first with one
/// writer, then with [`CLUSTER_WRITERS`] writers in lockstep, in new
/// directories under `parent`, which are removed afterwards; then the
/// same into preallocated files. Blocking.
pub fn measure(parent: &Path, samples: usize) -> Result<Floor, String> {
    let (one_write, two_writes) = measure_writers(parent, 1, samples, Sink::Rocks)?;
    let (one_write_concurrent, two_writes_concurrent) =
        measure_writers(parent, CLUSTER_WRITERS, samples, Sink::Rocks)?;
    let (file_write, _) = measure_writers(parent, 1, samples, Sink::File)?;
    let (file_write_concurrent, _) = measure_writers(parent, CLUSTER_WRITERS, samples, Sink::File)?;
    Ok(Floor {
        one_write,
        two_writes,
        one_write_concurrent,
        two_writes_concurrent,
        file_write,
        file_write_concurrent,
    })
}

/// Where a floor writer's synced writes go.
#[derive(Debug, Clone, Copy)]
enum Sink {
    /// The Raft-log column family of a database of its own.
    Rocks,
    /// A file of its own, zero-filled and synced before the first sample.
    File,
}

/// `writers` threads, each with its own database or file, start every
/// sample together (a barrier); every writer's latency is a sample.
fn measure_writers(
    parent: &Path,
    writers: usize,
    samples: usize,
    sink: Sink,
) -> Result<(LatencySummary, LatencySummary), String> {
    let barrier = Arc::new(Barrier::new(writers));
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (parent, barrier) = (parent.to_path_buf(), barrier.clone());
            std::thread::spawn(move || write_samples(&parent, samples, &barrier, sink))
        })
        .collect();
    let mut one = Recorder::new();
    let mut two = Recorder::new();
    for thread in threads {
        let (a, b) = thread
            .join()
            .map_err(|_| "a floor writer panicked".to_string())??;
        one.merge(&a);
        two.merge(&b);
    }
    Ok((
        one.summary().ok_or("no floor samples")?,
        two.summary().ok_or("no floor samples")?,
    ))
}

/// One writer's samples: singles and pairs, alternating, so that both see
/// the same disk conditions.
fn write_samples(
    parent: &Path,
    samples: usize,
    barrier: &Barrier,
    sink: Sink,
) -> Result<(Recorder, Recorder), String> {
    let dir = tempfile::Builder::new()
        .prefix("floor-")
        .tempdir_in(parent)
        .map_err(|e| format!("cannot create a directory in {}: {e}", parent.display()))?;
    let mut write = match sink {
        Sink::Rocks => rocks_writer(dir.path())?,
        Sink::File => file_writer(dir.path(), WARMUP_WRITES + 3 * samples)?,
    };
    for _ in 0..WARMUP_WRITES {
        write()?;
    }
    let mut one = Recorder::new();
    let mut two = Recorder::new();
    // Every writer runs the same number of rounds, so the barrier never
    // waits for a writer that left (a failed write ends the whole measurement).
    for _ in 0..samples {
        barrier.wait();
        let started = Instant::now();
        write()?;
        one.record(started.elapsed());
        barrier.wait();
        let started = Instant::now();
        write()?;
        write()?;
        two.record(started.elapsed());
    }
    Ok((one, two))
}

/// One synced write, however a sink makes it.
type SyncedWrite = Box<dyn FnMut() -> Result<(), String>>;

/// Synced writes of one new key each into a new database under `dir`.
fn rocks_writer(dir: &Path) -> Result<SyncedWrite, String> {
    let engine = Engine::open(dir).map_err(|e| format!("opening RocksDB: {e}"))?;
    let payload = vec![0x5au8; PAYLOAD_BYTES];
    let mut key = 0u64;
    Ok(Box::new(move || {
        key += 1;
        let mut batch = Batch::new(&engine);
        batch.put(CF_RAFT_LOG, &key.to_be_bytes(), &payload);
        engine
            .write(batch, true)
            .map_err(|e| format!("synced write: {e}"))
    }))
}

/// Synced overwrites, one after the other, of a file under `dir` that is
/// zero-filled and synced first with room for `writes` of them: a sync
/// then flushes data only, since the file's size and blocks never change.
fn file_writer(dir: &Path, writes: usize) -> Result<SyncedWrite, String> {
    // The payload with the 4-byte checksum RocksDB's records carry too.
    let record = vec![0x5au8; PAYLOAD_BYTES + 4];
    let path = dir.join("preallocated");
    let failed = |what: &str, e: std::io::Error| format!("{what} {}: {e}", path.display());
    let mut file = File::create(&path).map_err(|e| failed("creating", e))?;
    let zeros = vec![0u8; 1 << 16];
    let mut left = writes * record.len();
    while left > 0 {
        let n = left.min(zeros.len());
        file.write_all(&zeros[..n])
            .map_err(|e| failed("zero-filling", e))?;
        left -= n;
    }
    file.sync_all().map_err(|e| failed("syncing", e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| failed("syncing the directory of", e))?;
    let mut offset = 0u64;
    Ok(Box::new(move || {
        file.write_all_at(&record, offset)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("synced overwrite: {e}"))?;
        offset += record.len() as u64;
        Ok(())
    }))
}

/// Samples taken by `compare` and by `floor` without `--samples`.
pub const DEFAULT_SAMPLES: usize = 500;
/// Samples taken in `--quick` mode.
pub const QUICK_SAMPLES: usize = 100;

/// The floor of a number of commits, from the measured one- and
/// two-write p50s of one writer (the floor the targets name).
pub fn commits_floor_ms(floor: &Floor, commits: u32) -> f64 {
    match commits {
        0 => 0.0,
        1 => floor.one_write.p50_ms,
        2 => floor.two_writes.p50_ms,
        n => floor.one_write.p50_ms * f64::from(n),
    }
}

/// The same with five writers at once, as a local cluster's nodes write.
pub fn commits_floor_concurrent_ms(floor: &Floor, commits: u32) -> f64 {
    match commits {
        0 => 0.0,
        1 => floor.one_write_concurrent.p50_ms,
        2 => floor.two_writes_concurrent.p50_ms,
        n => floor.one_write_concurrent.p50_ms * f64::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_measurement_runs_once_and_counts_every_sample() {
        let dir = tempfile::tempdir().expect("temp dir");
        let floor = measure(dir.path(), 5).expect("floor measured");
        assert_eq!(floor.one_write.count, 5);
        assert_eq!(floor.two_writes.count, 5);
        assert_eq!(floor.one_write_concurrent.count, 5 * CLUSTER_WRITERS as u64);
        assert_eq!(floor.file_write.count, 5);
        assert_eq!(
            floor.file_write_concurrent.count,
            5 * CLUSTER_WRITERS as u64
        );
        // No timing assertion: a loaded CI machine can make any write slow.
    }

    #[test]
    fn the_preallocated_file_is_overwritten_in_place_and_never_grows() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut write = file_writer(dir.path(), 3).expect("file writer");
        let path = dir.path().join("preallocated");
        let size = std::fs::metadata(&path).expect("file").len();
        assert_eq!(size, 3 * (PAYLOAD_BYTES as u64 + 4));
        assert!(std::fs::read(&path).expect("read").iter().all(|&b| b == 0));
        write().expect("first write");
        write().expect("second write");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes.len() as u64, size, "the writes changed the size");
        let written = 2 * (PAYLOAD_BYTES + 4);
        assert!(bytes[..written].iter().all(|&b| b == 0x5a));
        assert!(bytes[written..].iter().all(|&b| b == 0));
    }
}
