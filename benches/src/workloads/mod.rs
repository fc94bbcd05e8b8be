//! The workloads, defined once and run against either system.
//!
//! # Layout
//! - this file: [`Workload`] (names and order), [`Settings`],
//!   [`Measurement`] (what one workload variant on one system reports),
//!   and the helpers every workload shares: connecting many clients,
//!   running them through a [`Window`] while CPU and disk are sampled.
//! - [`locks`]: `lock-1c`, `lock-nc`, `fenced-write` (closed loops, each
//!   client on its own lock).
//! - [`hot`]: `lock-hot` (many clients, one lock) and its first-come,
//!   first-served check.
//! - [`keepalive`]: `lease-keepalive` (10 000 leases, one stream each).
//! - [`failover`]: `failover` (kill -9 the leader) and `holder-crash`
//!   (a holder stops renewing).
//! - [`memory`]: bytes per live lease+lock on each node.
//! - [`stability`]: `leader-stability` (elections in an idle and a loaded
//!   cluster over minutes).
//!
//! # Rules every workload follows
//! - Every simulated client has its own connection and its own lease.
//! - Closed loop: a client sends its next request when the previous one
//!   has been answered; there is no think time.
//! - Warm-up first, then a fixed measurement window ([`Window`]); only
//!   operations entirely inside the window count.
//! - Every loop ends at the window's end and after at most
//!   [`MAX_OPS_PER_CLIENT`] operations; every operation has a timeout
//!   ([`OP_TIMEOUT`]) and a failed one is counted, not retried silently.
//!
//! # Not done yet
//! - Election workloads: campaign/resign hand-overs are the same Raft
//!   work as `lock-hot`, and no target names them yet.

pub mod failover;
pub mod hot;
pub mod keepalive;
pub mod locks;
pub mod memory;
pub mod stability;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use futures::stream::{self, StreamExt};
use serde::Serialize;
use tokio::time::Instant;

use crate::cluster::{Cluster, System};
use crate::driver::{Conn, Lease};
use crate::procfs::{Usage, UsageProbe};
use crate::stats::{LatencySummary, Recorder, Window};

/// Operations one client runs at most in one window.
pub const MAX_OPS_PER_CLIENT: u64 = 10_000_000;
/// Longest wait for one operation before it counts as failed.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed operation, so a broken cluster is not hammered.
pub const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Connections or leases set up at once.
pub const SETUP_CONCURRENCY: usize = 64;
/// TTL of the leases that closed-loop lock clients hold.
pub const LOCK_LEASE_TTL: Duration = Duration::from_secs(30);
/// How long clients may take to stop after the window closed.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The workloads, in the order a run takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Workload {
    #[serde(rename = "lock-1c")]
    Lock1c,
    #[serde(rename = "lock-nc")]
    LockNc,
    #[serde(rename = "lock-hot")]
    LockHot,
    #[serde(rename = "fenced-write")]
    FencedWrite,
    #[serde(rename = "lease-keepalive")]
    LeaseKeepalive,
    #[serde(rename = "failover")]
    Failover,
    #[serde(rename = "holder-crash")]
    HolderCrash,
    #[serde(rename = "memory")]
    Memory,
    #[serde(rename = "leader-stability")]
    LeaderStability,
}

impl Workload {
    pub const ALL: [Workload; 9] = [
        Workload::Lock1c,
        Workload::LockNc,
        Workload::LockHot,
        Workload::FencedWrite,
        Workload::LeaseKeepalive,
        Workload::Failover,
        Workload::HolderCrash,
        Workload::Memory,
        Workload::LeaderStability,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Lock1c => "lock-1c",
            Workload::LockNc => "lock-nc",
            Workload::LockHot => "lock-hot",
            Workload::FencedWrite => "fenced-write",
            Workload::LeaseKeepalive => "lease-keepalive",
            Workload::Failover => "failover",
            Workload::HolderCrash => "holder-crash",
            Workload::Memory => "memory",
            Workload::LeaderStability => "leader-stability",
        }
    }

    pub fn parse(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }
}

/// Which etcd endpoints its clients are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EtcdEndpoints {
    /// The leader only, the default: every request goes straight to the
    /// leader, as latchkey's client sends it, and no follower forwards it.
    /// etcd's best case. `failover` always gives all five (the leader is
    /// what it kills).
    Leader,
    /// All five, balanced by the client: followers forward to the leader
    /// (a lease renewal becomes an extra HTTP request between members).
    All,
}

/// Everything that shapes a run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub warmup: Duration,
    pub duration: Duration,
    /// Repeats of `failover` and `holder-crash`.
    pub repeats: usize,
    /// Runs of each throughput and latency workload per system ([`crate::rounds`]).
    pub rounds: usize,
    pub lock_nc_clients: Vec<usize>,
    pub lock_hot_clients: Vec<usize>,
    pub fenced_write_clients: Vec<usize>,
    pub keepalive_leases: usize,
    pub keepalive_ttl: Duration,
    /// TTL asked for the crashing holder's lease.
    pub holder_ttl: Duration,
    pub memory_leases: usize,
    pub failover_clients: usize,
    /// Each window of `leader-stability`.
    pub stability_duration: Duration,
    pub etcd_endpoints: EtcdEndpoints,
    /// Parent of every cluster's directory and of the floor's.
    pub data_dir: PathBuf,
}

/// A headline number that is not a latency.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metric {
    pub value: f64,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

/// First-come, first-served verdict of one `lock-hot` run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FcfsVerdict {
    /// Queue snapshots whose every waiter was granted later.
    pub checked: usize,
    /// Snapshots that could not be placed in the grant log.
    pub skipped: usize,
    /// Snapshots after which a later waiter was granted before an earlier one.
    pub violations: usize,
    /// Grants the checked snapshots cover.
    pub grants_covered: usize,
    pub first_violation: Option<String>,
}

/// What one workload variant reports for one system.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub workload: Workload,
    pub variant: String,
    pub system: System,
    pub metric: Option<Metric>,
    pub latency: Option<LatencySummary>,
    /// What one latency sample measures.
    pub latency_of: &'static str,
    /// Raft commits one latency sample needs at least (for the floor).
    pub commits: Option<u32>,
    pub fcfs: Option<FcfsVerdict>,
    pub usage: Option<Usage>,
    pub errors: u64,
    pub error_samples: Vec<String>,
    /// Facts worth printing (granted TTLs, offered rates, sample counts).
    pub notes: Vec<String>,
    /// Named numbers the targets read (e.g. `ttl_granted_ms`).
    pub numbers: std::collections::BTreeMap<String, f64>,
    /// Which of the `--rounds` this is, from 1.
    pub round: usize,
}

impl Measurement {
    pub fn new(workload: Workload, variant: impl Into<String>, system: System) -> Measurement {
        Measurement {
            workload,
            variant: variant.into(),
            system,
            metric: None,
            latency: None,
            latency_of: "",
            commits: None,
            fcfs: None,
            usage: None,
            errors: 0,
            error_samples: Vec::new(),
            notes: Vec::new(),
            numbers: Default::default(),
            round: 1,
        }
    }

    /// Takes latencies and errors from `recorder`.
    pub fn with_recorder(mut self, recorder: &Recorder) -> Measurement {
        self.latency = recorder.summary();
        self.errors = recorder.errors;
        self.error_samples = recorder.error_samples.clone();
        self
    }
}

/// One workload on one system's cluster.
pub struct Run<'a> {
    pub system: System,
    pub cluster: &'a mut Cluster,
    pub settings: &'a Settings,
}

impl Run<'_> {
    /// Endpoints the workload's clients are given.
    pub async fn client_endpoints(&self) -> Result<Vec<String>, String> {
        let all = self.cluster.endpoints();
        if self.system == System::Etcd && self.settings.etcd_endpoints == EtcdEndpoints::Leader {
            let leader = self.cluster.leader().await?;
            return Ok(vec![all[leader].clone()]);
        }
        Ok(all)
    }

    /// `count` clients, each with its own connection (to
    /// [`Run::client_endpoints`]) and a lease of `ttl`.
    pub async fn clients_with_leases(
        &self,
        count: usize,
        ttl: Duration,
    ) -> Result<Vec<(Conn, Lease)>, String> {
        let endpoints = self.client_endpoints().await?;
        self.clients_on(&endpoints, count, ttl).await
    }

    /// `count` clients given `endpoints`, each with its own connection and
    /// a lease of `ttl`.
    pub async fn clients_on(
        &self,
        endpoints: &[String],
        count: usize,
        ttl: Duration,
    ) -> Result<Vec<(Conn, Lease)>, String> {
        let system = self.system;
        let made: Vec<Result<(Conn, Lease), String>> = stream::iter(0..count)
            .map(|_| {
                let endpoints = endpoints.to_vec();
                async move {
                    let conn = Conn::connect(system, &endpoints).await?;
                    let lease = conn.lease(ttl).await?;
                    Ok((conn, lease))
                }
            })
            .buffer_unordered(SETUP_CONCURRENCY)
            .collect()
            .await;
        made.into_iter().collect()
    }

    /// Runs `tasks` (already spawned, each ending by itself after
    /// `window.end`), samples CPU and disk over the window, and collects
    /// what the tasks return. A task still running [`DRAIN_TIMEOUT`] after
    /// the window closed is aborted and reported as an error.
    pub async fn through_window<T: Send + 'static>(
        &mut self,
        window: Window,
        tasks: Vec<tokio::task::JoinHandle<T>>,
    ) -> (Vec<T>, Usage, usize) {
        tokio::time::sleep_until(window.start).await;
        let probe = UsageProbe::start(&self.cluster.pids(), &self.settings.data_dir);
        tokio::time::sleep_until(window.end).await;
        let usage = probe.finish();
        let (results, stuck) = join_until(tasks, window.end + DRAIN_TIMEOUT).await;
        (results, usage, stuck)
    }
}

/// Joins every task, aborting those still running at `deadline`.
/// Returns the results and how many were aborted.
pub async fn join_until<T: Send + 'static>(
    tasks: Vec<tokio::task::JoinHandle<T>>,
    deadline: Instant,
) -> (Vec<T>, usize) {
    let mut results = Vec::with_capacity(tasks.len());
    let mut stuck = 0;
    for mut task in tasks {
        match tokio::time::timeout_at(deadline, &mut task).await {
            Ok(Ok(value)) => results.push(value),
            Ok(Err(_)) => stuck += 1,
            Err(_) => {
                task.abort();
                stuck += 1;
            }
        }
    }
    (results, stuck)
}

/// Runs `op` with [`OP_TIMEOUT`], folding a timeout into the error.
pub async fn timed<T>(op: impl Future<Output = Result<T, String>>) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, op).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
    }
}

/// Runs one workload on one cluster.
pub async fn run(workload: Workload, run: &mut Run<'_>) -> Result<Vec<Measurement>, String> {
    match workload {
        Workload::Lock1c => locks::lock_cycles(run, workload, &[1]).await,
        Workload::LockNc => {
            let clients = run.settings.lock_nc_clients.clone();
            locks::lock_cycles(run, workload, &clients).await
        }
        Workload::FencedWrite => {
            let clients = run.settings.fenced_write_clients.clone();
            locks::fenced_writes(run, &clients).await
        }
        Workload::LockHot => {
            let clients = run.settings.lock_hot_clients.clone();
            hot::lock_hot(run, &clients).await
        }
        Workload::LeaseKeepalive => keepalive::lease_keepalive(run).await,
        Workload::Failover => failover::failover(run).await,
        Workload::HolderCrash => failover::holder_crash(run).await,
        Workload::Memory => memory::memory(run).await,
        Workload::LeaderStability => stability::leader_stability(run).await,
    }
}

/// "N client(s)".
pub fn clients_variant(count: usize) -> String {
    if count == 1 {
        "1 client".into()
    } else {
        format!("{count} clients")
    }
}
