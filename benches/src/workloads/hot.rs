//! `lock-hot`: N clients contend for one lock.
//!
//! Each client loops: wait for the lock, note the grant, release at once,
//! queue again. Reported:
//! - **hand-overs/s**: grants inside the window per second;
//! - **hand-over latency**: from the moment the holder *sends* its release
//!   to the moment the next holder's acquire *returns* (both on this
//!   process's monotonic clock; one Raft commit on either system);
//! - **first come, first served**, defined and checked as below.
//!
//! # First come, first served
//! Definition: *the lock is granted in the order of its queue as the
//! server itself keeps it*: whoever is first in line when the lock is
//! released gets it next, and nobody who joined the line later is granted
//! before someone who was already in it.
//!
//! Check: while the clients run, an auditor reads the queue every
//! [`AUDIT_INTERVAL`] — latchkey's `Lock.Describe` (holder with its token,
//! then the waiting leases in queue order); for etcd, the keys under the
//! lock's prefix sorted by create revision, which is the order etcd's lock
//! recipe grants in. Each snapshot `[holder, w1, …, wk]` is a prediction:
//! the k grants after the holder's must go to w1, …, wk, in that order
//! (anyone queueing later is behind wk). Every grant is logged in grant
//! order — mutual exclusion makes the order in which acquires return the
//! order of the grants — and the holder's grant is found in the log by its
//! fencing token (latchkey) or, for etcd, as the first grant of that
//! client whose response revision is at or after the holder key's create
//! revision (the client's previous grant was answered before its key was
//! deleted, hence before its next key was created). A snapshot whose
//! following k grants differ from its waiters is a violation. After the
//! window closes, clients stop queueing again but every waiter already in
//! line is served, so every snapshot's prediction can be checked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    clients_variant, timed, FcfsVerdict, Measurement, Metric, Run, Workload, ERROR_PAUSE,
    LOCK_LEASE_TTL, MAX_OPS_PER_CLIENT,
};
use crate::cluster::System;
use crate::driver::{Conn, Lease, QueueEntry};
use crate::stats::{per_second, Recorder, Window};

/// Time between two queue snapshots.
pub const AUDIT_INTERVAL: Duration = Duration::from_millis(100);
/// Grants logged at most (beyond it the log stops growing and the check covers less).
const MAX_GRANT_LOG: usize = 5_000_000;
/// Snapshots kept at most.
const MAX_SNAPSHOTS: usize = 100_000;
/// Violations described in the report.
const VIOLATION_EXAMPLES: usize = 1;

/// One grant, in grant order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantRecord {
    pub client: usize,
    /// latchkey: fencing token; etcd: revision of the lock response.
    pub mark: u64,
}

#[derive(Default)]
struct Shared {
    last_release_sent: Option<Instant>,
    grants: Vec<GrantRecord>,
    grants_in_window: u64,
}

pub async fn lock_hot(run: &mut Run<'_>, counts: &[usize]) -> Result<Vec<Measurement>, String> {
    let mut out = Vec::new();
    for &count in counts {
        let name = format!("lock-hot/{count}");
        let clients = run.clients_with_leases(count, LOCK_LEASE_TTL).await?;
        let leases: HashMap<u64, usize> = clients
            .iter()
            .enumerate()
            .map(|(i, (_, lease))| (lease.id(), i))
            .collect();
        let auditor_conn = clients[0].0.clone();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let window = Window::after(run.settings.warmup, run.settings.duration);
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(i, (conn, lease))| {
                let client = Contender {
                    index: i,
                    conn,
                    lease,
                    name: name.clone(),
                    shared: shared.clone(),
                };
                tokio::spawn(client.run(window))
            })
            .collect();
        let auditor = tokio::spawn(audit(auditor_conn, name.clone(), window));
        let (recorders, usage, stuck) = run.through_window(window, tasks).await;
        let snapshots = auditor.await.unwrap_or_default();
        let total = Recorder::merged(&recorders);
        let shared = std::mem::take(&mut *lock(&shared));
        let verdict = check_fcfs(run.system, &shared.grants, &snapshots, &leases);
        let mut m = Measurement::new(Workload::LockHot, clients_variant(count), run.system)
            .with_recorder(&total);
        m.metric = Some(Metric {
            value: per_second(shared.grants_in_window, window.length()),
            unit: "hand-overs/s",
            higher_is_better: true,
        });
        m.latency_of = "release sent → next holder";
        m.commits = Some(1);
        m.usage = Some(usage);
        m.errors += stuck as u64;
        m.fcfs = Some(verdict);
        out.push(m);
    }
    Ok(out)
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // The critical sections below cannot panic half-way; a poisoned lock
    // still holds consistent data.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

struct Contender {
    index: usize,
    conn: Conn,
    lease: Lease,
    name: String,
    shared: Arc<Mutex<Shared>>,
}

impl Contender {
    /// Until the window closes: acquire, log, release, queue again.
    async fn run(self, window: Window) -> Recorder {
        let mut recorder = Recorder::new();
        for _ in 0..MAX_OPS_PER_CLIENT {
            if Instant::now() >= window.end {
                break;
            }
            let held = match timed(self.lease.lock(&self.conn, &self.name)).await {
                Ok(held) => held,
                Err(e) => {
                    recorder.error(e);
                    tokio::time::sleep(ERROR_PAUSE).await;
                    continue;
                }
            };
            let granted = Instant::now();
            {
                let mut shared = lock(&self.shared);
                if shared.grants.len() < MAX_GRANT_LOG {
                    let mark = held.mark();
                    shared.grants.push(GrantRecord {
                        client: self.index,
                        mark,
                    });
                }
                if let Some(released) = shared.last_release_sent {
                    if window.contains(released, granted) {
                        recorder.record(granted - released);
                        shared.grants_in_window += 1;
                    }
                }
                shared.last_release_sent = Some(Instant::now());
            }
            if let Err(e) = timed(held.release(&self.conn)).await {
                recorder.error(e);
            }
        }
        recorder
    }
}

/// Reads the queue every [`AUDIT_INTERVAL`] until the window closes.
async fn audit(conn: Conn, name: String, window: Window) -> Vec<Vec<QueueEntry>> {
    let mut snapshots = Vec::new();
    let mut next = Instant::now();
    // Bounded by the window's end and MAX_SNAPSHOTS.
    while next < window.end && snapshots.len() < MAX_SNAPSHOTS {
        tokio::time::sleep_until(next).await;
        next += AUDIT_INTERVAL;
        if let Ok(Ok(queue)) = tokio::time::timeout(AUDIT_INTERVAL * 10, conn.queue(&name)).await {
            if queue.len() > 1 {
                snapshots.push(queue);
            }
        }
    }
    snapshots
}

/// Checks every snapshot's prediction against the grant log; see the
/// module docs.
pub fn check_fcfs(
    system: System,
    grants: &[GrantRecord],
    snapshots: &[Vec<QueueEntry>],
    client_of_lease: &HashMap<u64, usize>,
) -> FcfsVerdict {
    let mut verdict = FcfsVerdict::default();
    for snapshot in snapshots {
        let Some((holder, waiters)) = snapshot.split_first() else {
            continue;
        };
        let Some(position) = holder_position(system, grants, holder, client_of_lease) else {
            verdict.skipped += 1;
            continue;
        };
        let expected: Option<Vec<usize>> = waiters
            .iter()
            .map(|w| client_of_lease.get(&w.lease).copied())
            .collect();
        let (Some(expected), Some(actual)) = (
            expected,
            grants.get(position + 1..position + 1 + waiters.len()),
        ) else {
            verdict.skipped += 1;
            continue;
        };
        verdict.checked += 1;
        verdict.grants_covered += waiters.len();
        let actual: Vec<usize> = actual.iter().map(|g| g.client).collect();
        if actual != expected {
            verdict.violations += 1;
            if verdict.violations <= VIOLATION_EXAMPLES {
                verdict.first_violation = Some(format!(
                    "queue behind grant #{position} was clients {expected:?}, granted {actual:?}"
                ));
            }
        }
    }
    verdict
}

fn holder_position(
    system: System,
    grants: &[GrantRecord],
    holder: &QueueEntry,
    client_of_lease: &HashMap<u64, usize>,
) -> Option<usize> {
    match system {
        System::Latchkey => grants.iter().position(|g| g.mark == holder.mark),
        System::Etcd => {
            let client = *client_of_lease.get(&holder.lease)?;
            grants
                .iter()
                .position(|g| g.client == client && g.mark >= holder.mark)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(clients: &[usize]) -> Vec<GrantRecord> {
        clients
            .iter()
            .enumerate()
            .map(|(i, &client)| GrantRecord {
                client,
                mark: 100 + i as u64,
            })
            .collect()
    }

    fn leases() -> HashMap<u64, usize> {
        (0..4).map(|c| (1000 + c as u64, c)).collect()
    }

    fn entry(client: usize, mark: u64) -> QueueEntry {
        QueueEntry {
            lease: 1000 + client as u64,
            mark,
        }
    }

    #[test]
    fn grants_in_queue_order_pass_and_an_overtake_is_a_violation() {
        let log = grants(&[0, 1, 2, 3, 0, 1]);
        // Holder is client 1 (token 101); clients 2 then 3 wait.
        let in_order = vec![entry(1, 101), entry(2, 0), entry(3, 0)];
        let verdict = check_fcfs(System::Latchkey, &log, &[in_order], &leases());
        assert_eq!((verdict.checked, verdict.violations), (1, 0));

        let overtaken = vec![entry(1, 101), entry(3, 0), entry(2, 0)];
        let verdict = check_fcfs(System::Latchkey, &log, &[overtaken], &leases());
        assert_eq!((verdict.checked, verdict.violations), (1, 1));
    }

    #[test]
    fn etcd_holder_is_found_by_create_revision() {
        // Client 0 holds twice (marks 100 and 104); a holder key created at
        // revision 103 is its second grant.
        let log = grants(&[0, 1, 2, 3, 0, 1]);
        let snapshot = vec![entry(0, 103), entry(1, 0)];
        let verdict = check_fcfs(System::Etcd, &log, &[snapshot], &leases());
        assert_eq!((verdict.checked, verdict.violations), (1, 0));
    }

    #[test]
    fn snapshots_beyond_the_log_are_skipped_not_judged() {
        let log = grants(&[0, 1]);
        let snapshot = vec![entry(1, 101), entry(2, 0)];
        let verdict = check_fcfs(System::Latchkey, &log, &[snapshot], &leases());
        assert_eq!((verdict.checked, verdict.skipped), (0, 1));
    }
}
