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

use latchkey_server::storage::{Batch, Engine, CF_RAFT_LOG};
use serde::Serialize;
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
        ]
    }
}

/// Measures `samples` single writes and `samples` pairs, first with one
/// writer, then with [`CLUSTER_WRITERS`] writers in lockstep, in new
/// directories under `parent`, which are removed afterwards. Blocking.
pub fn measure(parent: &Path, samples: usize) -> Result<Floor, String> {
    let (one_write, two_writes) = measure_writers(parent, 1, samples)?;
    let (one_write_concurrent, two_writes_concurrent) =
        measure_writers(parent, CLUSTER_WRITERS, samples)?;
    Ok(Floor {
        one_write,
        two_writes,
        one_write_concurrent,
        two_writes_concurrent,
    })
}

/// `writers` threads, each with its own database, start every sample
/// together (a barrier); every writer's latency is a sample.
fn measure_writers(
    parent: &Path,
    writers: usize,
    samples: usize,
) -> Result<(LatencySummary, LatencySummary), String> {
    let barrier = Arc::new(Barrier::new(writers));
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (parent, barrier) = (parent.to_path_buf(), barrier.clone());
            std::thread::spawn(move || write_samples(&parent, samples, &barrier))
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
) -> Result<(Recorder, Recorder), String> {
    let dir = tempfile::Builder::new()
        .prefix("floor-")
        .tempdir_in(parent)
        .map_err(|e| format!("cannot create a directory in {}: {e}", parent.display()))?;
    let engine = Engine::open(dir.path()).map_err(|e| format!("opening RocksDB: {e}"))?;
    let payload = vec![0x5au8; PAYLOAD_BYTES];
    let mut key = 0u64;
    let mut write = || -> Result<(), String> {
        key += 1;
        let mut batch = Batch::new(&engine);
        batch.put(CF_RAFT_LOG, &key.to_be_bytes(), &payload);
        engine
            .write(batch, true)
            .map_err(|e| format!("synced write: {e}"))
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
        // No timing assertion: a loaded CI machine can make any write slow.
    }
}
