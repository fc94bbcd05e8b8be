//! `failover` and `holder-crash`: how long locks are unavailable when a
//! process dies.
//!
//! # failover
//! Each repeat: [`FAILOVER_CLIENTS`] clients (64 by default) cycle
//! acquire+release on their own locks for [`FAILOVER_LOAD`]; then the leader
//! is killed with `kill -9` and, right after the signal was sent, a probe
//! client (given every endpoint, connected and holding a lease since
//! before the kill) starts acquiring its own uncontended lock: a new
//! attempt every [`PROBE_SPACING`], without waiting for or cancelling the
//! earlier ones (acquiring is idempotent per lease on both systems). The
//! sample is the time from the kill to the first attempt that succeeds.
//! Every attempt was sent after the kill, so its grant was committed under
//! the new leader. Overlapping attempts measure when the *cluster* can
//! grant again, not how long one unlucky request waits: an etcd request
//! that reached a follower while the old leader was dying is only answered
//! when etcd's request timeout (7 s with the defaults) expires, and the
//! notes show such slow failures. The cycling clients keep running
//! through the failover as load. Then the cycling stops, the killed node is
//! started again with its data and flags (latchkey: `latchkey serve` with
//! the flags from `cluster.json`; etcd: the same command line), and the
//! next repeat waits until all five nodes agree on a leader and have caught
//! up. One cluster serves all repeats.
//!
//! # holder-crash
//! Each repeat: a holder takes lock `holder-crash/R` with a lease nobody
//! renews (TTL asked: 1 s, latchkey's floor; etcd raises it to its own
//! floor, 2 s, and the granted TTL is reported), a waiter with an ordinary
//! lease queues behind it, and once the waiter is seen in the queue the
//! holder renews its lease one last time and "crashes": from the answer to
//! that renewal on, nothing renews the lease or releases the lock. The
//! sample is the time from that answer to the waiter's acquire returning.
//! So each sample is the worst case, a holder that dies just after a
//! renewal; the target is TTL + 100 ms.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{
    clients_variant, join_until, timed, Measurement, Run, Workload, DRAIN_TIMEOUT, ERROR_PAUSE,
    MAX_OPS_PER_CLIENT,
};
use crate::driver::{Conn, Held, Lease};
use crate::stats::Recorder;

/// Cycling clients during a failover.
pub const FAILOVER_CLIENTS: usize = 64;
/// TTL of the cycling clients', the probe's and the waiter's leases: long
/// enough to outlive a failover without depending on keepalives.
const FAILOVER_LEASE_TTL: Duration = Duration::from_secs(60);
/// How long the clients cycle before the kill.
pub const FAILOVER_LOAD: Duration = Duration::from_secs(1);
/// Time between the starts of two probe attempts.
pub const PROBE_SPACING: Duration = Duration::from_millis(20);
/// Probe attempts started at most in one failover.
const PROBE_MAX_ATTEMPTS: usize = 3_000;
/// Give up on one repeat's probe after this long.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(60);
/// Probe descriptions kept in the report.
const MAX_PROBE_NOTES: usize = 3;
/// One attempt of the probe waits at most this long.
const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the waiter to show up in the queue.
const QUEUE_WAIT: Duration = Duration::from_secs(10);
/// Pause between queue polls.
const QUEUE_POLL: Duration = Duration::from_millis(5);

pub async fn failover(run: &mut Run<'_>) -> Result<Vec<Measurement>, String> {
    let count = run.settings.failover_clients;
    // Every client must find the new leader itself: all get every endpoint.
    let endpoints = run.cluster.endpoints();
    let clients: Vec<(Conn, Arc<Lease>)> = run
        .clients_on(&endpoints, count, FAILOVER_LEASE_TTL)
        .await?
        .into_iter()
        .map(|(conn, lease)| (conn, Arc::new(lease)))
        .collect();
    let probe = Conn::connect(run.system, &endpoints).await?;
    let probe_lease = Arc::new(probe.lease(FAILOVER_LEASE_TTL).await?);
    let mut samples = Recorder::new();
    let mut load = Recorder::new();
    let mut probe_notes = Vec::new();
    for repeat in 0..run.settings.repeats {
        let (stop, stopped) = watch::channel(false);
        let tasks: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, (conn, lease))| {
                let name = format!("failover/{repeat}/{i}");
                tokio::spawn(cycle_until_stopped(
                    conn.clone(),
                    lease.clone(),
                    name,
                    stopped.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(FAILOVER_LOAD).await;
        let leader = run.cluster.leader().await?;
        let killed_at = Instant::now();
        run.cluster.kill(leader)?;
        let name = format!("failover/probe/{repeat}");
        match probe_acquire(&probe, &probe_lease, &name).await {
            Ok(outcome) => {
                samples.record(outcome.taken - killed_at);
                probe_notes.extend(describe_probe(repeat, &outcome));
            }
            Err(e) => samples.error(format!("repeat {repeat}: {e}")),
        }
        let _ = stop.send(true);
        let (recorders, _) = join_until(tasks, Instant::now() + DRAIN_TIMEOUT).await;
        load.merge(&Recorder::merged(&recorders));
        run.cluster.restart(leader).await?;
    }
    let mut m = Measurement::new(Workload::Failover, clients_variant(count), run.system)
        .with_recorder(&samples);
    m.latency_of = "kill -9 leader → first acquire";
    m.notes.push(format!(
        "{} repeats (fresh leader each time; killed node restarted in between); \
         the cycling clients saw {} failed operations",
        run.settings.repeats, load.errors
    ));
    m.notes
        .extend(probe_notes.into_iter().take(MAX_PROBE_NOTES));
    m.numbers
        .insert("repeats".into(), run.settings.repeats as f64);
    Ok(vec![m])
}

/// Cycles acquire+release on `name` until told to stop; counts failures.
async fn cycle_until_stopped(
    conn: Conn,
    lease: Arc<Lease>,
    name: String,
    mut stop: watch::Receiver<bool>,
) -> Recorder {
    let mut recorder = Recorder::new();
    for _ in 0..MAX_OPS_PER_CLIENT {
        if *stop.borrow() {
            break;
        }
        let cycle = async {
            let held = lease.lock(&conn, &name).await?;
            held.release(&conn).await
        };
        tokio::select! {
            result = timed(cycle) => {
                if let Err(e) = result {
                    recorder.error(e);
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
            _ = stop.changed() => break,
        }
    }
    recorder
}

/// What the probe went through in one failover.
struct ProbeOutcome {
    /// When its acquire succeeded.
    taken: Instant,
    attempts: usize,
    /// Each failed attempt: how long it took and why it failed.
    failures: Vec<(Duration, String)>,
}

/// Starts an acquire of `name` every [`PROBE_SPACING`], without waiting
/// for the earlier ones, until one succeeds; returns when the first did.
/// Acquiring is idempotent per lease on both systems, so the attempts that
/// are still running then are harmless, and are dropped.
async fn probe_acquire(
    conn: &Conn,
    lease: &Arc<Lease>,
    name: &str,
) -> Result<ProbeOutcome, String> {
    let deadline = Instant::now() + PROBE_DEADLINE;
    let mut attempts: JoinSet<(Instant, Result<Held, String>)> = JoinSet::new();
    let mut failures = Vec::new();
    let mut started = 0;
    let mut next_start = Instant::now();
    // Bounded by the deadline and PROBE_MAX_ATTEMPTS.
    while Instant::now() < deadline {
        if Instant::now() >= next_start && started < PROBE_MAX_ATTEMPTS {
            let (conn, lease, name) = (conn.clone(), lease.clone(), name.to_string());
            attempts.spawn(async move {
                let begun = Instant::now();
                let held = tokio::time::timeout(PROBE_ATTEMPT_TIMEOUT, lease.lock(&conn, &name))
                    .await
                    .unwrap_or_else(|_| Err("attempt timed out".into()));
                (begun, held)
            });
            started += 1;
            next_start += PROBE_SPACING;
        }
        tokio::select! {
            Some(done) = attempts.join_next() => match done {
                Ok((_, Ok(held))) => {
                    let taken = Instant::now();
                    attempts.abort_all();
                    let _ = timed(held.release(conn)).await;
                    return Ok(ProbeOutcome { taken, attempts: started, failures });
                }
                Ok((begun, Err(e))) => failures.push((begun.elapsed(), e)),
                Err(e) => failures.push((Duration::ZERO, e.to_string())),
            },
            _ = tokio::time::sleep_until(next_start) => {}
        }
    }
    let last = failures.last().map_or(String::new(), |f| f.1.clone());
    Err(format!(
        "no acquire within {PROBE_DEADLINE:?}; last error: {last}"
    ))
}

/// One line about a probe: its attempts and its slowest failure.
fn describe_probe(repeat: usize, outcome: &ProbeOutcome) -> Option<String> {
    let slowest = outcome.failures.iter().max_by_key(|f| f.0)?;
    Some(format!(
        "repeat {repeat}: {} probe attempts started; {} failed, the slowest after {:.0} ms: {}",
        outcome.attempts,
        outcome.failures.len(),
        slowest.0.as_secs_f64() * 1000.0,
        slowest.1
    ))
}

pub async fn holder_crash(run: &mut Run<'_>) -> Result<Vec<Measurement>, String> {
    let endpoints = run.client_endpoints().await?;
    let holder = Conn::connect(run.system, &endpoints).await?;
    let waiter = Conn::connect(run.system, &endpoints).await?;
    let waiter_lease = Arc::new(waiter.lease(FAILOVER_LEASE_TTL).await?);
    let asked = run.settings.holder_ttl;
    let mut samples = Recorder::new();
    let mut granted_ttls = Vec::new();
    for repeat in 0..run.settings.repeats {
        let name = format!("holder-crash/{repeat}");
        match crash_once(&holder, &waiter, &waiter_lease, &name, asked).await {
            Ok((latency, granted)) => {
                samples.record(latency);
                granted_ttls.push(granted);
            }
            Err(e) => samples.error(format!("repeat {repeat}: {e}")),
        }
    }
    let granted = granted_ttls.iter().max().copied().unwrap_or_default();
    let mut m = Measurement::new(Workload::HolderCrash, format!("TTL {asked:?}"), run.system)
        .with_recorder(&samples);
    m.latency_of = "last renewal → next holder";
    m.notes.push(format!(
        "TTL asked {asked:?}, granted {granted:?}; {} repeats",
        run.settings.repeats
    ));
    m.numbers
        .insert("ttl_asked_ms".into(), asked.as_millis() as f64);
    m.numbers
        .insert("ttl_granted_ms".into(), granted.as_millis() as f64);
    Ok(vec![m])
}

/// One holder crash; returns the time from the holder's last renewal to
/// the waiter holding the lock, and the TTL the holder's lease was granted.
async fn crash_once(
    holder: &Conn,
    waiter: &Conn,
    waiter_lease: &Arc<Lease>,
    name: &str,
    ttl: Duration,
) -> Result<(Duration, Duration), String> {
    let lease = holder.raw_lease(ttl).await?;
    let _held = timed(holder.lock_raw(name, lease.id)).await?;
    let task = {
        let (waiter, lease, name) = (waiter.clone(), waiter_lease.clone(), name.to_string());
        tokio::spawn(async move {
            let held = timed(lease.lock(&waiter, &name)).await?;
            let taken = Instant::now();
            let _ = timed(held.release(&waiter)).await;
            Ok::<Instant, String>(taken)
        })
    };
    wait_until_queued(waiter, name, waiter_lease.id()).await?;
    holder.keepalive_once(lease.id).await?;
    let crashed = Instant::now();
    let taken = task.await.map_err(|e| e.to_string())??;
    Ok((taken - crashed, lease.granted_ttl))
}

async fn wait_until_queued(conn: &Conn, name: &str, lease: u64) -> Result<(), String> {
    let deadline = Instant::now() + QUEUE_WAIT;
    // Bounded by the deadline.
    while Instant::now() < deadline {
        if let Ok(queue) = conn.queue(name).await {
            if queue.iter().skip(1).any(|entry| entry.lease == lease) {
                return Ok(());
            }
        }
        tokio::time::sleep(QUEUE_POLL).await;
    }
    Err(format!(
        "the waiter did not show up in the queue within {QUEUE_WAIT:?}"
    ))
}
