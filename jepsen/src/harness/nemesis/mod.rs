//! The nemesis: a seeded schedule of faults, each applied, held, healed.
//!
//! One cycle at a time: a quiet gap, then the faults of one *mix* of the
//! enabled ones (`--nemesis`, see [`plan`]; dealt from a seeded shuffle, so
//! every mix comes up once before any repeats), held for a while, then
//! healed. The loop stops by itself at the end of the fault phase and
//! always finishes with a full heal. Every step is recorded (process
//! `nemesis`: `invoke` when it starts, `info` once in place; the value
//! carries a `description`).
//!
//! | kind | variants | heal |
//! |---|---|---|
//! | `partition` | isolate a node, isolate the leader, random halves, majorities ring, bridge, one-way (a node's inbound or outbound packets); `leader-with-clients` (the leader and every client worker on one side, the other nodes on the other); `clients-cut-from-leader` (no worker reaches the leader; its peers do) | `heal`: all schedule cuts removed |
//! | `kill` | `kill -9` a node, the leader, or a minority | `start`: same data directory |
//! | `pause` | SIGSTOP a node or the leader; a client worker stopped at its next fenced write while holding the lock; a client worker stopped at a random moment | `resume`: SIGCONT |
//! | `clock` | restart a node under libfaketime with one of the clock rates and an offset of ±10 s | `clock-reset`: restart with the real clock |
//! | `clock-rate` | the running leader's, a random node's, or every node's clock runs at one of the clock rates (`--unsafe-clock-rate-file`) | `clock-rate-reset`: rate 1 |
//! | `disk-stall` | the leader's, a random node's, or a random minority's syncs hang (`--unsafe-disk-stall-file`): each node's fsyncs and synced writes wait, the rest of it runs on | `disk-stall-end` |
//! | `client-partition` | `holder`: the next worker to acquire the lock or win the election is cut from every node at that moment, for the client pause; `random`: a random worker, now | `client-heal` |
//!
//! The clock rates are `--clock-rates`, by default four rates within the
//! drift bound ρ: 1 − ρ, 1 − ρ/2, 1 + ρ/2, 1 + ρ.
//!
//! A client stopped at its fenced write, or cut off as the next holder,
//! stays so for the client pause (longer than the lease TTL) whatever the
//! fault schedule does; see `workers`. Arming it is recorded as a `pause`
//! (or `client-partition`) invoke/info pair whose value has `"variant":
//! "client-at-write"` (`"holder"`); the stop or cut itself and its end are
//! single `info` events `client-pause`/`client-resume` and
//! `client-cut`/`client-heal`, because they happen concurrently with the
//! schedule's own steps.
//!
//! # Layout
//! - [`plan`]: the `--nemesis` grammar: kinds, variants, mixes.
//! - `partition`: the cut sets and the partition step.
//! - `process`: kill, pause, and client partitions.
//! - `clock`: clock skew at a restart, and clock rates on running nodes.
//! - `disk`: disks whose syncs hang.
//!
//! # Not done yet
//! - Faults are dealt at random; there is no way to script an exact
//!   timeline beyond narrowing variants and mixing kinds.
//! - A holder cut or stopped at its write is healed by its own timer, not
//!   by the schedule's heal, so it can outlast its cycle.

mod clock;
mod disk;
mod partition;
pub mod plan;
mod process;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::cluster::Cluster;
use super::net::{Cuts, Network};
use super::observer::Views;
use super::recorder::{Event, Recorder};
use super::workers::WorkerPool;
use crate::history::{OpType, Process};
pub use clock::rates_within;
pub use plan::{parse_nemesis, FaultKind, FaultMix, FaultSpec};

/// The network layer the schedule's partitions live in.
const SCHEDULE_LAYER: &str = "schedule";
/// The network layer of client workers the schedule cut off (`random`).
const CLIENT_LAYER: &str = "schedule-clients";

/// The schedule's knobs.
#[derive(Debug, Clone)]
pub struct NemesisOptions {
    pub mixes: Vec<FaultMix>,
    pub seed: u64,
    /// A fault cycle (gap + fault) lasts one to two intervals.
    pub interval: Duration,
    /// Whether client workers reach a fenced write (workload `lock-fenced`).
    pub fenced_clients: bool,
    /// Whether client workers hold grants (a lock or a leadership) that a
    /// `client-partition:holder` can target.
    pub holders: bool,
    pub clock_available: bool,
    /// Rates `clock` and `clock-rate` draw from.
    pub clock_rates: Vec<f64>,
}

/// What the nemesis did, for the results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NemesisSummary {
    pub faults: u64,
    pub by_variant: BTreeMap<String, u64>,
    /// Cycles per mix dealt (`kill`, `clock-rate:leader+client-partition`).
    #[serde(default)]
    pub cycles: BTreeMap<String, u64>,
    pub notes: Vec<String>,
}

/// Faults in place now, for the heal.
#[derive(Default)]
struct InPlace {
    cuts: Cuts,
    cut_clients: Vec<u64>,
    killed: Vec<u64>,
    paused_nodes: Vec<u64>,
    stopped_clients: Vec<u64>,
    skewed: Vec<u64>,
    rated: Vec<u64>,
    stalled_disks: Vec<u64>,
}

/// Everything the nemesis touches.
pub struct Nemesis {
    pub cluster: Arc<Mutex<Cluster>>,
    pub network: Arc<Network>,
    pub workers: Arc<WorkerPool>,
    pub recorder: Recorder,
    pub views: Views,
    options: NemesisOptions,
    rng: StdRng,
    summary: NemesisSummary,
    in_place: InPlace,
}

impl Nemesis {
    pub fn new(
        cluster: Arc<Mutex<Cluster>>,
        network: Arc<Network>,
        workers: Arc<WorkerPool>,
        recorder: Recorder,
        views: Views,
        options: NemesisOptions,
    ) -> Nemesis {
        Nemesis {
            rng: StdRng::seed_from_u64(options.seed),
            cluster,
            network,
            workers,
            recorder,
            views,
            options,
            summary: NemesisSummary::default(),
            in_place: InPlace::default(),
        }
    }

    /// Injects faults until `until`, then heals everything.
    pub async fn run(mut self, until: Instant) -> Result<NemesisSummary, String> {
        let mut mixes = self.options.mixes.clone();
        if !self.options.clock_available && mixes.iter().any(|m| m.has(FaultKind::Clock)) {
            mixes.retain(|m| !m.has(FaultKind::Clock));
            self.note("clock skipped: libfaketime is not installed (scripts/install-deps)");
        }
        // Mixes are dealt from a shuffled deck, so a short run still sees
        // every enabled mix once before any repeats.
        let mut deck: Vec<FaultMix> = Vec::new();
        // Bounded: each pass sleeps at least the gap, and the loop ends at `until`.
        while !mixes.is_empty() {
            let gap = self.interval_fraction(0.4, 0.8);
            let hold = self.interval_fraction(0.6, 1.2);
            if Instant::now() + gap + hold > until {
                break;
            }
            tokio::time::sleep(gap).await;
            if deck.is_empty() {
                deck = mixes.clone();
                deck.shuffle(&mut self.rng);
            }
            // Non-empty: refilled just above from the non-empty `mixes`.
            let mix = deck.pop().expect("the deck was just refilled");
            *self.summary.cycles.entry(mix.to_string()).or_default() += 1;
            for spec in &mix.0 {
                self.start_fault(*spec).await?;
            }
            tokio::time::sleep(hold).await;
            self.heal().await?;
        }
        self.heal().await?;
        Ok(self.summary)
    }

    fn interval_fraction(&mut self, low: f64, high: f64) -> Duration {
        self.options.interval.mul_f64(self.rng.gen_range(low..high))
    }

    /// The spec's variant, or one drawn from the kind's variants.
    fn variant(&mut self, spec: FaultSpec) -> &'static str {
        let variants = spec.kind.variants();
        spec.variant
            .unwrap_or_else(|| variants[self.rng.gen_range(0..variants.len())])
    }

    fn note(&mut self, note: &str) {
        self.summary.notes.push(note.to_string());
        let value = json!({"description": note});
        self.recorder
            .record(Event::new(Process::Nemesis, OpType::Info, "note", value));
    }

    fn record(&self, kind: OpType, f: &str, value: &Value) {
        self.recorder
            .record(Event::new(Process::Nemesis, kind, f, value.clone()));
    }

    fn count(&mut self, variant: &str) {
        self.summary.faults += 1;
        *self
            .summary
            .by_variant
            .entry(variant.to_string())
            .or_default() += 1;
    }

    async fn node_ids(&self) -> Vec<u64> {
        self.cluster.lock().await.ids()
    }

    /// The leader if one is known, else a random node.
    async fn leader_or_random(&mut self) -> (u64, bool) {
        match self.views.leader() {
            Some(leader) => (leader, true),
            None => {
                let ids = self.node_ids().await;
                (ids[self.rng.gen_range(0..ids.len())], false)
            }
        }
    }

    /// The nodes a `leader`, `minority` or single-node variant (`one`,
    /// `node`) names, and how to name them in a description.
    async fn nodes_for(&mut self, variant: &str) -> (Vec<u64>, String) {
        let mut ids = self.node_ids().await;
        ids.shuffle(&mut self.rng);
        match variant {
            "leader" => {
                let (node, known) = self.leader_or_random().await;
                (vec![node], format!("n{node}{}", leader_note(known)))
            }
            "minority" => {
                let minority = ids[..(ids.len() - 1) / 2].to_vec();
                let who = format!("minority {minority:?}");
                (minority, who)
            }
            _ => (vec![ids[0]], format!("n{}", ids[0])),
        }
    }

    async fn start_fault(&mut self, spec: FaultSpec) -> Result<(), String> {
        let variant = self.variant(spec);
        match spec.kind {
            FaultKind::Partition => self.partition(variant).await,
            FaultKind::Kill => self.kill(variant).await,
            FaultKind::Pause => self.pause(variant).await,
            FaultKind::Clock => self.clock().await,
            FaultKind::ClockRate => self.clock_rate(variant).await,
            FaultKind::DiskStall => self.disk_stall(variant).await,
            FaultKind::ClientPartition => self.client_partition(variant).await,
        }
    }

    /// Undoes every fault in place. Client workers stopped at their write
    /// or cut off as holders are healed by their own timers; armed ones
    /// that never fired are disarmed.
    async fn heal(&mut self) -> Result<(), String> {
        if !self.in_place.cuts.is_empty() {
            let value = json!({"description": "remove every iptables rule / reopen every link"});
            self.record(OpType::Invoke, "heal", &value);
            self.network.set_layer(SCHEDULE_LAYER, &Cuts::new())?;
            self.in_place.cuts.clear();
            self.record(OpType::Info, "heal", &value);
        }
        self.heal_clients()?;
        self.heal_disks().await?;
        let killed = std::mem::take(&mut self.in_place.killed);
        if !killed.is_empty() {
            let value = json!({"nodes": killed, "description": format!("restart {killed:?}")});
            self.record(OpType::Invoke, "start", &value);
            let mut cluster = self.cluster.lock().await;
            for &node in &killed {
                cluster.start(node)?;
            }
            drop(cluster);
            self.record(OpType::Info, "start", &value);
        }
        let paused = std::mem::take(&mut self.in_place.paused_nodes);
        if !paused.is_empty() {
            let value = json!({"target": "node", "nodes": paused, "description": format!("SIGCONT {paused:?}")});
            self.record(OpType::Invoke, "resume", &value);
            let mut cluster = self.cluster.lock().await;
            for &node in &paused {
                cluster.resume(node);
            }
            drop(cluster);
            self.record(OpType::Info, "resume", &value);
        }
        self.heal_clocks().await
    }

    /// Resumes stopped workers, reconnects cut ones, disarms armed ones.
    fn heal_clients(&mut self) -> Result<(), String> {
        let cut = std::mem::take(&mut self.in_place.cut_clients);
        if !cut.is_empty() {
            let value = json!({"target": "client", "slots": cut, "description": format!("reconnect client workers {cut:?}")});
            self.record(OpType::Invoke, "client-heal", &value);
            self.network.set_layer(CLIENT_LAYER, &Cuts::new())?;
            self.record(OpType::Info, "client-heal", &value);
        }
        for slot in std::mem::take(&mut self.in_place.stopped_clients) {
            let value = json!({"target": "client", "slot": slot, "description": format!("SIGCONT client worker {slot}")});
            self.record(OpType::Invoke, "resume", &value);
            self.workers.signal(slot, libc::SIGCONT);
            self.record(OpType::Info, "resume", &value);
        }
        let disarmed = self.workers.disarm_all();
        for slot in disarmed.paused {
            let description =
                format!("client worker {slot} reached no fenced write while armed; disarmed");
            let value = json!({"target": "client", "variant": "disarmed", "slot": slot, "description": description});
            self.record(OpType::Invoke, "disarm", &value);
            self.record(OpType::Info, "disarm", &value);
        }
        if disarmed.cut {
            let description = "no worker acquired while armed to be cut off; disarmed";
            let value =
                json!({"target": "client", "variant": "disarmed", "description": description});
            self.record(OpType::Invoke, "disarm", &value);
            self.record(OpType::Info, "disarm", &value);
        }
        Ok(())
    }
}

fn leader_note(known: bool) -> &'static str {
    if known {
        " (leader)"
    } else {
        " (no leader known: random)"
    }
}
