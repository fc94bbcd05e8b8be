//! `memory`: bytes of resident memory per live lease+lock on each node.
//!
//! On a fresh cluster: read every node's RSS (`VmRSS` in
//! `/proc/PID/status`), grant N leases (100 000 by default, 10 000 with
//! `--quick`; TTL [`MEMORY_LEASE_TTL`], so none expires and none needs a
//! renewal during the run) and take one uncontended lock with each, then
//! wait [`SETTLE`] and read the RSS again. The report gives
//! `(after − before) / N` for the node that grew most (and the leader's in
//! the notes). RSS includes whatever the allocator and RocksDB's memtables
//! hold for the new state; that is the cost a user pays.

use std::time::Duration;

use futures::stream::{self, StreamExt};
use tokio::time::Instant;

use super::{timed, Measurement, Metric, Run, Workload, SETUP_CONCURRENCY};
use crate::driver::Conn;
use crate::procfs::process_rss_bytes;
use crate::stats::{per_second, Recorder};

/// TTL of the leases that are counted.
pub const MEMORY_LEASE_TTL: Duration = Duration::from_secs(600);
/// Pause before each RSS reading.
pub const SETTLE: Duration = Duration::from_secs(2);

pub async fn memory(run: &mut Run<'_>) -> Result<Vec<Measurement>, String> {
    let count = run.settings.memory_leases;
    tokio::time::sleep(SETTLE).await;
    let before = rss_by_node(run);
    let started = Instant::now();
    let recorder = load(run, count).await?;
    let load_time = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    let after = rss_by_node(run);
    let leader = run.cluster.leader().await.ok().map(|l| l + 1);
    let mut grown: Vec<(usize, f64)> = before
        .iter()
        .filter_map(|(node, b)| {
            let a = after.iter().find(|(n, _)| n == node)?.1;
            Some((*node, (a as f64 - *b as f64) / count as f64))
        })
        .collect();
    grown.sort_by(|a, b| b.1.total_cmp(&a.1));
    let worst = grown
        .first()
        .copied()
        .ok_or("no node's memory could be read")?;
    let mut m = Measurement::new(
        Workload::Memory,
        format!("{count} leases+locks"),
        run.system,
    )
    .with_recorder(&Recorder::new());
    m.errors = recorder.errors;
    m.error_samples = recorder.error_samples.clone();
    m.metric = Some(Metric {
        value: worst.1,
        unit: "bytes/(lease+lock)",
        higher_is_better: false,
    });
    let leader_growth = leader
        .and_then(|l| grown.iter().find(|(n, _)| *n == l))
        .map(|g| g.1);
    m.notes.push(format!(
        "largest growth on node {} of {}; leader (node {}) {}; loaded at {:.0} leases+locks/s",
        worst.0,
        grown.len(),
        leader.map_or("?".into(), |l| l.to_string()),
        leader_growth.map_or("unknown".into(), |g| format!("{g:.0} B each")),
        per_second(count as u64, load_time),
    ));
    let rss: Vec<String> = after
        .iter()
        .map(|(n, a)| format!("node {n} {:.0} MiB", *a as f64 / 1048576.0))
        .collect();
    m.notes.push(format!("RSS after: {}", rss.join(", ")));
    m.numbers.insert("bytes_per_lease_lock".into(), worst.1);
    m.numbers.insert("leases_locks".into(), count as f64);
    Ok(vec![m])
}

fn rss_by_node(run: &mut Run<'_>) -> Vec<(usize, u64)> {
    run.cluster
        .pids()
        .into_iter()
        .filter_map(|(node, pid)| Some((node, process_rss_bytes(pid)?)))
        .collect()
}

/// Grants `count` leases and locks one lock with each.
async fn load(run: &Run<'_>, count: usize) -> Result<Recorder, String> {
    let endpoints = run.client_endpoints().await?;
    let conns: Vec<Conn> = stream::iter(0..SETUP_CONCURRENCY.min(count))
        .then(|_| Conn::connect(run.system, &endpoints))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let results: Vec<Result<(), String>> = stream::iter(0..count)
        .map(|i| {
            let conn = conns[i % conns.len()].clone();
            async move {
                let lease = timed(conn.raw_lease(MEMORY_LEASE_TTL)).await?;
                let _held = timed(conn.lock_raw(&format!("memory/{i}"), lease.id)).await?;
                Ok(())
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    let mut recorder = Recorder::new();
    for result in results {
        if let Err(e) = result {
            recorder.error(e);
        }
    }
    Ok(recorder)
}
