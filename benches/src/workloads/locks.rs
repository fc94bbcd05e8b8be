//! `lock-1c`, `lock-nc` and `fenced-write`: closed loops, each client on
//! its own lock, so nothing contends but the servers' resources.
//!
//! - `lock-1c` / `lock-nc`: a cycle is acquire then release of the
//!   client's own lock under its own lease; latency is the whole cycle
//!   (two Raft commits on either system), throughput is cycles/s of all
//!   clients together.
//! - `fenced-write`: each client acquires its lock once, then writes a
//!   64-byte value to its own key, fenced by the grant: latchkey checks the
//!   token in apply; on etcd the write is a `Txn` that compares the lock
//!   key's create revision and then puts (the way etcd's docs fence).
//!   One Raft commit per write on either system.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    clients_variant, timed, Measurement, Metric, Run, Workload, ERROR_PAUSE, LOCK_LEASE_TTL,
    MAX_OPS_PER_CLIENT,
};
use crate::driver::{Conn, Held, Lease};
use crate::stats::{per_second, Recorder, Window};

/// Bytes of each fenced write's value.
const FENCED_VALUE_BYTES: usize = 64;

/// Acquire+release cycles with `counts` clients each (one variant per count).
pub async fn lock_cycles(
    run: &mut Run<'_>,
    workload: Workload,
    counts: &[usize],
) -> Result<Vec<Measurement>, String> {
    let mut out = Vec::new();
    for &count in counts {
        let clients = run.clients_with_leases(count, LOCK_LEASE_TTL).await?;
        let window = Window::after(run.settings.warmup, run.settings.duration);
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(i, (conn, lease))| {
                let name = format!("{}/{count}/{i}", workload.name());
                tokio::spawn(cycle_loop(conn, lease, name, window))
            })
            .collect();
        let (recorders, usage, stuck) = run.through_window(window, tasks).await;
        let total = Recorder::merged(&recorders);
        let mut m =
            Measurement::new(workload, clients_variant(count), run.system).with_recorder(&total);
        m.metric = Some(Metric {
            value: per_second(total.count(), window.length()),
            unit: "cycles/s",
            higher_is_better: true,
        });
        m.latency_of = "acquire+release";
        m.commits = Some(2);
        m.usage = Some(usage);
        m.errors += stuck as u64;
        out.push(m);
    }
    Ok(out)
}

/// One client cycling its own lock through `window`.
pub(super) async fn cycle_loop(conn: Conn, lease: Lease, name: String, window: Window) -> Recorder {
    let mut recorder = Recorder::new();
    for _ in 0..MAX_OPS_PER_CLIENT {
        let started = Instant::now();
        if started >= window.end {
            break;
        }
        let cycle = timed(async {
            let held = lease.lock(&conn, &name).await?;
            held.release(&conn).await
        })
        .await;
        let finished = Instant::now();
        match cycle {
            Ok(()) if window.contains(started, finished) => recorder.record(finished - started),
            Ok(()) => {}
            Err(e) => {
                recorder.error(e);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    // Dropping the lease ends its renewals; the cluster is stopped after the workload.
    drop(lease);
    recorder
}

/// Fenced writes with `counts` clients each.
pub async fn fenced_writes(
    run: &mut Run<'_>,
    counts: &[usize],
) -> Result<Vec<Measurement>, String> {
    let mut out = Vec::new();
    for &count in counts {
        let clients = run.clients_with_leases(count, LOCK_LEASE_TTL).await?;
        let mut held_clients = Vec::with_capacity(count);
        for (i, (conn, lease)) in clients.into_iter().enumerate() {
            let name = format!("fenced-write/{count}/{i}");
            let mut held = timed(lease.lock(&conn, &name)).await?;
            held.prepare_fence(&conn).await?;
            held_clients.push((conn, lease, held, format!("fenced-write/{count}/{i}/key")));
        }
        let window = Window::after(run.settings.warmup, run.settings.duration);
        let tasks = held_clients
            .into_iter()
            .map(|(conn, lease, held, key)| tokio::spawn(put_loop(conn, lease, held, key, window)))
            .collect();
        let (recorders, usage, stuck) = run.through_window(window, tasks).await;
        let total = Recorder::merged(&recorders);
        let mut m = Measurement::new(Workload::FencedWrite, clients_variant(count), run.system)
            .with_recorder(&total);
        m.metric = Some(Metric {
            value: per_second(total.count(), window.length()),
            unit: "puts/s",
            higher_is_better: true,
        });
        m.latency_of = "fenced put";
        m.commits = Some(1);
        m.usage = Some(usage);
        m.errors += stuck as u64;
        out.push(m);
    }
    Ok(out)
}

async fn put_loop(conn: Conn, lease: Lease, held: Held, key: String, window: Window) -> Recorder {
    let value = vec![b'v'; FENCED_VALUE_BYTES];
    let mut recorder = Recorder::new();
    for _ in 0..MAX_OPS_PER_CLIENT {
        let started = Instant::now();
        if started >= window.end {
            break;
        }
        let put = timed(held.fenced_put(&conn, &key, &value)).await;
        let finished = Instant::now();
        match put {
            Ok(()) if window.contains(started, finished) => recorder.record(finished - started),
            Ok(()) => {}
            Err(e) => {
                recorder.error(e);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), held.release(&conn)).await;
    drop(lease);
    recorder
}
