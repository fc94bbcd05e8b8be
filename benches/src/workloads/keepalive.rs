//! `lease-keepalive`: 10 000 leases, each renewed at a third of its TTL,
//! each system the way its client crate renews.
//!
//! Both systems get the same TTL request (3 s by default, which both
//! accept: latchkey's floor is twice its election timeout, 1 s; etcd's is
//! `ceil(1.5 × election timeout)`, 2 s) and the same renewal interval,
//! TTL/3 of the TTL *asked for*, so the offered load is the same:
//! `leases × 3 / TTL` renewals per second. The TTL each system granted is
//! read from the grant answers and reported; etcd raises a TTL below its
//! minimum without saying so, and that shows up here.
//!
//! Leases are spread over clients, [`LEASES_PER_CLIENT`] each, as if 100
//! applications held 100 leases each. An etcd client (`etcd-client`)
//! opens a long-lived `LeaseKeepAlive` stream per lease, all on the
//! client's one HTTP/2 connection; a latchkey client (`latchkey-client`)
//! renews all its leases on one shared `KeepAlive` stream to the leader,
//! with many renewals in flight. Both servers would take either: etcd's
//! Go client shares one stream per client too, but the Rust crate the
//! bench drives it with does not. Renewals are staggered evenly over one
//! interval. A
//! lease's loop sends one renewal, waits for the answer (latency: send to
//! answer), and sends the next one an interval after the previous *send*,
//! or at once if that time has passed: a server that falls behind gets
//! fewer renewals per second, which is what **keepalives/s acknowledged**
//! shows.
//! A lease the server reports gone (expired) is not renewed again: its
//! one error is counted and the notes say how many leases were lost.
//!
//! latchkey renewals go to the leader (only it renews), as the client
//! crate sends them; etcd clients are given the endpoints as in every
//! other workload (a follower forwards a renewal to its leader).
//!
//! A paced run acknowledges the whole offered load on any server that
//! keeps up, so its rate says nothing about capacity. After the paced
//! window every lease goes on in a **closed loop** — the next renewal as
//! soon as the last is answered — and after a warm-up a second window of
//! the same length measures the keepalives/s each system sustains (variant
//! `… leases, closed loop`), with the same leases, streams and client. The
//! latency target reads the paced window, the throughput target the
//! closed-loop one.
//!
//! Every lease task records into the same two histograms ([`Recorders`]),
//! not into histograms of its own as the other workloads' clients do: a
//! histogram is about 150 KB zeroed when made, and 10 000 leases × two
//! windows of them kept both of the bench's workers in `memset` for
//! seconds at start-up. The leases waiting behind that for their first
//! renewal expired, and the report counted them lost against the server.

use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::stream::{self, StreamExt};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::{
    join_until, timed, Measurement, Metric, Run, Workload, DRAIN_TIMEOUT, SETUP_CONCURRENCY,
};
use crate::cluster::System;
use crate::driver::{lease_is_gone, Conn, KeepaliveStream, KeepaliveTarget, RawLease};
use crate::procfs::{Usage, UsageProbe};
use crate::stats::{per_second, Recorder, Window};

/// Leases renewed through one client (one HTTP/2 connection).
pub const LEASES_PER_CLIENT: usize = 100;
/// Longest time granting every lease may take before the window is
/// opened anyway.
const GRANT_PHASE: Duration = Duration::from_secs(120);
/// Pause between checks of how many leases are granted.
const GRANT_POLL: Duration = Duration::from_millis(50);
/// Renewals one lease sends at most in one run.
const MAX_RENEWALS_PER_LEASE: u64 = 1_000_000;
/// End of the closed-loop variant's name.
pub const CLOSED_LOOP: &str = "closed loop";

/// The two measurement windows: renewals paced at TTL/3, then in a closed
/// loop.
#[derive(Clone, Copy)]
struct Phases {
    paced: Window,
    closed: Window,
}

/// What one lease's task brings back.
struct LeaseOutcome {
    lease: Option<RawLease>,
    /// The server said the lease was gone; its renewals stopped there.
    lost: bool,
}

/// The renewals of all leases, one histogram per window, shared by every
/// lease task (see the module doc for why not one per lease).
#[derive(Clone, Default)]
struct Recorders {
    paced: Arc<Mutex<Recorder>>,
    closed: Arc<Mutex<Recorder>>,
}

impl Recorders {
    fn window(&self, closed_loop: bool) -> MutexGuard<'_, Recorder> {
        let recorder = if closed_loop {
            &self.closed
        } else {
            &self.paced
        };
        // A lease task holds the lock only to record, and cannot panic
        // while it does.
        recorder.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The recorder of one window, once every lease task has stopped.
    fn take(&self, closed_loop: bool) -> Recorder {
        std::mem::take(&mut *self.window(closed_loop))
    }
}

pub async fn lease_keepalive(run: &mut Run<'_>) -> Result<Vec<Measurement>, String> {
    let count = run.settings.keepalive_leases;
    let ttl = run.settings.keepalive_ttl;
    let interval = ttl / 3;
    let endpoints = run.client_endpoints().await?;
    let conns = connections(run.system, &endpoints, SETUP_CONCURRENCY.min(count)).await?;
    let targets = targets(run, count.div_ceil(LEASES_PER_CLIENT)).await?;
    let setup = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let done = Arc::new(AtomicUsize::new(0));
    let recorders = Recorders::default();
    let (set_window, window_rx) = watch::channel(None);
    // Each lease is renewed from an interval after its own grant, so
    // renewals are spread as the grants were and no lease waits for the
    // others to be granted. The window opens an interval plus the warm-up
    // after the last grant.
    let tasks = (0..count)
        .map(|i| {
            let lease = LeaseTask {
                conn: conns[i % conns.len()].clone(),
                target: targets[i / LEASES_PER_CLIENT].clone(),
                setup: setup.clone(),
                done: done.clone(),
                recorders: recorders.clone(),
                ttl,
                interval,
            };
            tokio::spawn(lease.run(window_rx.clone()))
        })
        .collect::<Vec<_>>();
    let deadline = Instant::now() + GRANT_PHASE;
    // Bounded by the deadline.
    while done.load(Ordering::Relaxed) < count && Instant::now() < deadline {
        tokio::time::sleep(GRANT_POLL).await;
    }
    let paced = Window::after(interval + run.settings.warmup, run.settings.duration);
    let closed_start = paced.end + run.settings.warmup;
    let phases = Phases {
        paced,
        closed: Window {
            start: closed_start,
            end: closed_start + run.settings.duration,
        },
    };
    let _ = set_window.send(Some(phases));
    let paced_usage = measure_usage(run, phases.paced).await;
    let closed_usage = measure_usage(run, phases.closed).await;
    let (outcomes, stuck) = join_until(tasks, phases.closed.end + DRAIN_TIMEOUT).await;
    let leases: Vec<RawLease> = outcomes.iter().filter_map(|o| o.lease).collect();
    let summary = |variant: String, window: Window, usage: Usage, total: Recorder| {
        let mut m =
            Measurement::new(Workload::LeaseKeepalive, variant, run.system).with_recorder(&total);
        m.metric = Some(Metric {
            value: per_second(total.count(), window.length()),
            unit: "keepalives/s",
            higher_is_better: true,
        });
        m.latency_of = "renewal sent → answer";
        m.usage = Some(usage);
        m
    };
    let mut paced = summary(
        format!("{count} leases"),
        phases.paced,
        paced_usage,
        recorders.take(false),
    );
    describe_ttls(&mut paced, &leases, ttl, count, interval);
    let mut closed = summary(
        format!("{count} leases, {CLOSED_LOOP}"),
        phases.closed,
        closed_usage,
        recorders.take(true),
    );
    // A task that did not finish is counted once, against the end.
    closed.errors += stuck as u64;
    let lost = outcomes.iter().filter(|o| o.lost).count();
    if lost > 0 {
        paced.notes.push(format!(
            "{lost} leases were reported gone (expired) and no longer renewed; \
             each counts as one error, in the window it was found in"
        ));
    }
    paced.numbers.insert("leases_lost".into(), lost as f64);
    closed.notes.push(format!(
        "{count} leases renewed each as soon as its last renewal was answered"
    ));
    Ok(vec![paced, closed])
}

/// The cluster's resource use over `window`, waited out.
async fn measure_usage(run: &mut Run<'_>, window: Window) -> Usage {
    tokio::time::sleep_until(window.start).await;
    let probe = UsageProbe::start(&run.cluster.pids(), &run.settings.data_dir);
    tokio::time::sleep_until(window.end).await;
    probe.finish()
}

fn describe_ttls(
    m: &mut Measurement,
    leases: &[RawLease],
    asked: Duration,
    count: usize,
    interval: Duration,
) {
    let min = leases
        .iter()
        .map(|l| l.granted_ttl)
        .min()
        .unwrap_or_default();
    let max = leases
        .iter()
        .map(|l| l.granted_ttl)
        .max()
        .unwrap_or_default();
    let granted = if min == max {
        format!("{min:?}")
    } else {
        format!("{min:?}..{max:?}")
    };
    m.notes.push(format!(
        "TTL asked {asked:?}, granted {granted}; renewal every {interval:?}; offered {:.0}/s",
        count as f64 / interval.as_secs_f64()
    ));
    m.numbers
        .insert("ttl_asked_ms".into(), asked.as_millis() as f64);
    m.numbers
        .insert("ttl_granted_ms".into(), min.as_millis() as f64);
    m.numbers.insert(
        crate::rounds::OFFERED_RATE.into(),
        count as f64 / interval.as_secs_f64(),
    );
}

/// `count` client connections.
async fn connections(
    system: System,
    endpoints: &[String],
    count: usize,
) -> Result<Vec<Conn>, String> {
    stream::iter(0..count)
        .then(|_| Conn::connect(system, endpoints))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// `count` clients to renew through.
async fn targets(run: &Run<'_>, count: usize) -> Result<Vec<KeepaliveTarget>, String> {
    let mut targets = Vec::with_capacity(count);
    match run.system {
        System::Latchkey => {
            let endpoints = run.client_endpoints().await?;
            for _ in 0..count {
                match Conn::connect(System::Latchkey, &endpoints).await? {
                    Conn::Latchkey(client) => targets.push(KeepaliveTarget::Latchkey(client)),
                    Conn::Etcd(_) => return Err("expected a latchkey connection".into()),
                }
            }
        }
        System::Etcd => {
            let endpoints = run.client_endpoints().await?;
            for _ in 0..count {
                match Conn::connect(System::Etcd, &endpoints).await? {
                    Conn::Etcd(client) => targets.push(KeepaliveTarget::Etcd(client)),
                    Conn::Latchkey(_) => return Err("expected an etcd connection".into()),
                }
            }
        }
    }
    Ok(targets)
}

/// One lease: granted, then renewed on its own stream.
struct LeaseTask {
    conn: Conn,
    target: KeepaliveTarget,
    setup: Arc<Semaphore>,
    /// Counts leases granted (or refused).
    done: Arc<AtomicUsize>,
    recorders: Recorders,
    ttl: Duration,
    interval: Duration,
}

impl LeaseTask {
    /// Grants the lease, then renews it every interval until the paced
    /// window closes, then at once after each answer until the closed-loop
    /// window closes, recording each renewal's latency in the shared
    /// recorder of its window. Returns the lease (if granted) and whether
    /// it was lost.
    async fn run(self, windows: watch::Receiver<Option<Phases>>) -> LeaseOutcome {
        let granted = {
            // The semaphore is never closed.
            let _permit = self.setup.acquire().await.expect("open semaphore");
            timed(self.conn.raw_lease(self.ttl)).await
        };
        self.done.fetch_add(1, Ordering::Relaxed);
        let lease = match granted {
            Ok(lease) => lease,
            Err(e) => {
                self.recorders.window(false).error(format!("granting: {e}"));
                return LeaseOutcome {
                    lease: None,
                    lost: false,
                };
            }
        };
        let mut next = Instant::now() + self.interval;
        let mut stream = None;
        let mut lost = false;
        for _ in 0..MAX_RENEWALS_PER_LEASE {
            tokio::time::sleep_until(next).await;
            let sent = Instant::now();
            // None until every lease is granted.
            let phases = *windows.borrow();
            if phases.is_some_and(|p| sent >= p.closed.end) {
                break;
            }
            let closed_loop = phases.is_some_and(|p| sent >= p.paced.end);
            let answer = self.renew(&mut stream, lease.id).await;
            let answered = Instant::now();
            let counted = phases.is_some_and(|p| {
                p.paced.contains(sent, answered) || p.closed.contains(sent, answered)
            });
            match answer {
                Ok(()) if counted => self.recorders.window(closed_loop).record(answered - sent),
                Ok(()) => {}
                Err(e) if lease_is_gone(&e) => {
                    // Counted once: a lost lease stays lost, and renewing
                    // it in a loop would only spend the bench's CPU.
                    self.recorders.window(closed_loop).error(e);
                    lost = true;
                    break;
                }
                Err(e) => {
                    // The server ends a stream after a failed renewal: open a new one.
                    stream = None;
                    self.recorders.window(closed_loop).error(e);
                }
            }
            next = if closed_loop {
                Instant::now()
            } else {
                (sent + self.interval).max(Instant::now())
            };
        }
        LeaseOutcome {
            lease: Some(lease),
            lost,
        }
    }

    /// One renewal on the lease's stream, opening it first if needed.
    async fn renew(&self, stream: &mut Option<KeepaliveStream>, lease: u64) -> Result<(), String> {
        let attempt = async {
            let Some(open) = stream.as_mut() else {
                let (opened, renewed) = KeepaliveStream::open(&self.target, lease).await?;
                *stream = Some(opened);
                if renewed {
                    return Ok(());
                }
                // Set just above.
                return stream
                    .as_mut()
                    .expect("stream is open")
                    .renew()
                    .await
                    .map(|_| ());
            };
            open.renew().await.map(|_| ())
        };
        match tokio::time::timeout(self.interval * 3, attempt).await {
            Ok(result) => result,
            Err(_) => Err("renewal unanswered within 3 intervals".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_tasks_share_one_recorder_per_window() {
        let recorders = Recorders::default();
        let tasks: Vec<Recorders> = (0..3).map(|_| recorders.clone()).collect();
        for (i, task) in tasks.iter().enumerate() {
            task.window(false)
                .record(Duration::from_millis(1 + i as u64));
            task.window(true).record(Duration::from_millis(10));
        }
        tasks[0].window(false).error("lease 7 not found");

        let paced = recorders.take(false);
        assert_eq!(paced.count(), 3);
        assert_eq!(paced.errors, 1);
        let closed = recorders.take(true);
        assert_eq!(closed.count(), 3);
        assert_eq!(closed.errors, 0);
        // Within the histogram's three significant digits.
        let p50 = closed.summary().expect("samples recorded").p50_ms;
        assert!((p50 - 10.0).abs() < 0.01, "{p50}");
        // Taken once: a second take starts from empty.
        assert_eq!(recorders.take(false).count(), 0);
    }
}
