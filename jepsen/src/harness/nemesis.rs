//! The nemesis: a seeded schedule of faults, each applied, held, healed.
//!
//! One fault at a time: a quiet gap, then a fault of one of the enabled
//! kinds (`--nemesis`; dealt from a seeded shuffle of them, so every kind
//! comes up once before any repeats), held for a while, then healed. The loop stops by
//! itself at the end of the fault phase and always finishes with a full
//! heal. Every step is recorded (process `nemesis`: `invoke` when it starts,
//! `info` once in place; the value carries a `description`).
//!
//! | kind | variants | heal |
//! |---|---|---|
//! | `partition` | isolate a node, isolate the leader, random halves, majorities ring, bridge, one-way (a node's inbound or outbound packets) | `heal`: all rules removed |
//! | `kill` | `kill -9` a node, the leader, or a minority | `start`: same data directory |
//! | `pause` | SIGSTOP a node or the leader; a client worker stopped at its next fenced write while holding the lock; a client worker stopped at a random moment | `resume`: SIGCONT |
//! | `clock` | restart a node under libfaketime with a rate of 0.5–2 and an offset of ±10 s | `clock-reset`: restart with the real clock |
//!
//! A client stopped at its fenced write stays stopped for the client pause
//! (longer than the lease TTL) whatever the fault schedule does; see
//! `workers`. Arming it is recorded as a `pause` invoke/info pair whose
//! value has `"variant": "client-at-write"`; the stop itself and the
//! SIGCONT are single `info` events `client-pause` and `client-resume`,
//! because they happen concurrently with the schedule's own steps.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::cluster::{ClockSkew, Cluster};
use super::net::Network;
use super::observer::Views;
use super::recorder::{Event, Recorder};
use super::workers::WorkerPool;
use crate::history::{OpType, Process};

/// The kinds of fault `--nemesis` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    Partition,
    Kill,
    Pause,
    Clock,
}

impl FaultKind {
    pub fn parse(name: &str) -> Result<FaultKind, String> {
        match name {
            "partition" => Ok(FaultKind::Partition),
            "kill" => Ok(FaultKind::Kill),
            "pause" => Ok(FaultKind::Pause),
            "clock" => Ok(FaultKind::Clock),
            other => Err(format!(
                "unknown nemesis {other:?}; choose from partition, kill, pause, clock"
            )),
        }
    }
}

/// The schedule's knobs.
#[derive(Debug, Clone)]
pub struct NemesisOptions {
    pub kinds: Vec<FaultKind>,
    pub seed: u64,
    /// A fault cycle (gap + fault) lasts one to two intervals.
    pub interval: Duration,
    /// Whether client workers reach a fenced write (workload `lock-fenced`).
    pub fenced_clients: bool,
    pub clock_available: bool,
}

/// What the nemesis did, for the results.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NemesisSummary {
    pub faults: u64,
    pub by_variant: std::collections::BTreeMap<String, u64>,
    pub notes: Vec<String>,
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
    /// Faults in place now.
    cuts: BTreeSet<(u64, u64)>,
    killed: Vec<u64>,
    paused_nodes: Vec<u64>,
    stopped_clients: Vec<u64>,
    skewed: Vec<u64>,
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
            cuts: BTreeSet::new(),
            killed: Vec::new(),
            paused_nodes: Vec::new(),
            stopped_clients: Vec::new(),
            skewed: Vec::new(),
        }
    }

    /// Injects faults until `until`, then heals everything.
    pub async fn run(mut self, until: Instant) -> Result<NemesisSummary, String> {
        let mut kinds = self.options.kinds.clone();
        if kinds.contains(&FaultKind::Clock) && !self.options.clock_available {
            kinds.retain(|k| *k != FaultKind::Clock);
            self.note("clock skipped: libfaketime is not installed (scripts/install-deps)");
        }
        // Kinds are dealt from a shuffled deck, so a short run still sees
        // every enabled kind once before any repeats.
        let mut deck: Vec<FaultKind> = Vec::new();
        // Bounded: each pass sleeps at least the gap, and the loop ends at `until`.
        while !kinds.is_empty() {
            let gap = self.interval_fraction(0.4, 0.8);
            let hold = self.interval_fraction(0.6, 1.2);
            if Instant::now() + gap + hold > until {
                break;
            }
            tokio::time::sleep(gap).await;
            if deck.is_empty() {
                deck = kinds.clone();
                deck.shuffle(&mut self.rng);
            }
            // Non-empty: refilled just above from the non-empty `kinds`.
            let kind = deck.pop().expect("the deck was just refilled");
            self.start_fault(kind).await?;
            tokio::time::sleep(hold).await;
            self.heal().await?;
        }
        self.heal().await?;
        Ok(self.summary)
    }

    fn interval_fraction(&mut self, low: f64, high: f64) -> Duration {
        self.options.interval.mul_f64(self.rng.gen_range(low..high))
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

    async fn start_fault(&mut self, kind: FaultKind) -> Result<(), String> {
        match kind {
            FaultKind::Partition => self.partition().await,
            FaultKind::Kill => self.kill().await,
            FaultKind::Pause => self.pause().await,
            FaultKind::Clock => self.clock().await,
        }
    }

    async fn partition(&mut self) -> Result<(), String> {
        let mut ids = self.node_ids().await;
        ids.shuffle(&mut self.rng);
        let variant = [
            "isolate-one",
            "isolate-leader",
            "halves",
            "majorities-ring",
            "bridge",
            "one-way",
        ][self.rng.gen_range(0..6)];
        let (cuts, description) = match variant {
            "isolate-one" => (isolate(&ids, ids[0]), format!("isolate n{}", ids[0])),
            "isolate-leader" => {
                let (node, known) = self.leader_or_random().await;
                (
                    isolate(&ids, node),
                    format!("isolate n{node}{}", leader_note(known)),
                )
            }
            "halves" => {
                let (a, b) = ids.split_at(ids.len() / 2);
                (between(a, b), format!("halves {a:?} | {b:?}"))
            }
            "majorities-ring" => (ring(&ids), format!("majorities ring {ids:?}")),
            "bridge" => {
                let third = ids.len() / 3;
                let (a, rest) = ids.split_at(ids.len() / 2 - third / 2);
                let (bridge, b) = rest.split_at(1);
                (between(a, b), format!("bridge {a:?} <{}> {b:?}", bridge[0]))
            }
            _ => {
                let (node, known) = self.leader_or_random().await;
                let others: Vec<u64> = ids.iter().copied().filter(|&i| i != node).collect();
                if self.rng.gen_bool(0.5) {
                    let cuts = others.iter().map(|&o| (o, node)).collect();
                    (
                        cuts,
                        format!("n{node}{} hears nobody (one-way)", leader_note(known)),
                    )
                } else {
                    let cuts = others.iter().map(|&o| (node, o)).collect();
                    (
                        cuts,
                        format!("nobody hears n{node}{} (one-way)", leader_note(known)),
                    )
                }
            }
        };
        let value = json!({"variant": variant, "description": description,
            "cut": cuts.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>()});
        self.record(OpType::Invoke, "partition", &value);
        self.network.set_cuts(&cuts)?;
        self.cuts = cuts;
        self.record(OpType::Info, "partition", &value);
        self.count(&format!("partition/{variant}"));
        Ok(())
    }

    async fn kill(&mut self) -> Result<(), String> {
        let mut ids = self.node_ids().await;
        ids.shuffle(&mut self.rng);
        let (variant, targets, description) = match self.rng.gen_range(0..3) {
            0 => ("one", vec![ids[0]], format!("kill -9 n{}", ids[0])),
            1 => {
                let (node, known) = self.leader_or_random().await;
                (
                    "leader",
                    vec![node],
                    format!("kill -9 n{node}{}", leader_note(known)),
                )
            }
            _ => {
                let minority = ids[..(ids.len() - 1) / 2].to_vec();
                let description = format!("kill -9 minority {minority:?}");
                ("minority", minority, description)
            }
        };
        let value = json!({"variant": variant, "nodes": targets, "description": description});
        self.record(OpType::Invoke, "kill", &value);
        {
            let mut cluster = self.cluster.lock().await;
            for &node in &targets {
                cluster.kill(node).await;
            }
        }
        self.killed.extend(&targets);
        self.record(OpType::Info, "kill", &value);
        self.count(&format!("kill/{variant}"));
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), String> {
        let choice = self.rng.gen_range(0..4);
        if choice >= 2 {
            return self.pause_client(choice == 2).await;
        }
        let (node, variant, description) = if choice == 0 {
            let ids = self.node_ids().await;
            let node = ids[self.rng.gen_range(0..ids.len())];
            (node, "node", format!("SIGSTOP n{node}"))
        } else {
            let (node, known) = self.leader_or_random().await;
            (
                node,
                "leader",
                format!("SIGSTOP n{node}{}", leader_note(known)),
            )
        };
        let value = json!({"target": "node", "variant": variant, "nodes": [node], "description": description});
        self.record(OpType::Invoke, "pause", &value);
        self.cluster.lock().await.pause(node);
        self.paused_nodes.push(node);
        self.record(OpType::Info, "pause", &value);
        self.count(&format!("pause/{variant}"));
        Ok(())
    }

    /// `at_write`: arm a worker to stop itself at its next fenced write
    /// (recorded as `pause` info by `workers` when it does); else SIGSTOP a
    /// random worker now.
    async fn pause_client(&mut self, at_write: bool) -> Result<(), String> {
        let slots = self.workers.slots();
        if slots.is_empty() {
            return Ok(());
        }
        let slot = slots[self.rng.gen_range(0..slots.len())];
        if at_write && self.options.fenced_clients {
            let description = format!(
                "arm client worker {slot} to SIGSTOP itself at its next fenced write, holding the lock"
            );
            let value = json!({"target": "client", "variant": "client-at-write", "slot": slot, "description": description});
            self.record(OpType::Invoke, "pause", &value);
            self.workers.arm_pause(slot);
            self.record(OpType::Info, "pause", &value);
            self.count("pause/client-at-write");
            return Ok(());
        }
        let description = format!("SIGSTOP client worker {slot}");
        let value = json!({"target": "client", "variant": "client", "slot": slot, "description": description});
        self.record(OpType::Invoke, "pause", &value);
        self.workers.signal(slot, libc::SIGSTOP);
        self.stopped_clients.push(slot);
        self.record(OpType::Info, "pause", &value);
        self.count("pause/client");
        Ok(())
    }

    async fn clock(&mut self) -> Result<(), String> {
        let ids = self.node_ids().await;
        let node = ids[self.rng.gen_range(0..ids.len())];
        let skew = ClockSkew {
            offset_s: self.rng.gen_range(-10..=10),
            rate: [0.5, 0.75, 1.5, 2.0][self.rng.gen_range(0..4)],
        };
        let description = format!(
            "restart n{node} with its clock at rate x{} and offset {:+} s",
            skew.rate, skew.offset_s
        );
        let value = json!({"nodes": [node], "rate": skew.rate, "offset_s": skew.offset_s, "description": description});
        self.record(OpType::Invoke, "clock", &value);
        {
            let mut cluster = self.cluster.lock().await;
            cluster.stop(node).await;
            cluster.set_clock(node, Some(skew));
            cluster.start(node)?;
        }
        self.skewed.push(node);
        self.record(OpType::Info, "clock", &value);
        self.count("clock");
        Ok(())
    }

    /// Undoes every fault in place. Client workers stopped at their write
    /// are resumed by their own timer; armed ones that never fired are
    /// disarmed.
    async fn heal(&mut self) -> Result<(), String> {
        if !self.cuts.is_empty() {
            let value = json!({"description": "remove every iptables rule / reopen every link"});
            self.record(OpType::Invoke, "heal", &value);
            self.network.set_cuts(&BTreeSet::new())?;
            self.cuts.clear();
            self.record(OpType::Info, "heal", &value);
        }
        let killed = std::mem::take(&mut self.killed);
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
        let paused = std::mem::take(&mut self.paused_nodes);
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
        for slot in std::mem::take(&mut self.stopped_clients) {
            let value = json!({"target": "client", "slot": slot, "description": format!("SIGCONT client worker {slot}")});
            self.record(OpType::Invoke, "resume", &value);
            self.workers.signal(slot, libc::SIGCONT);
            self.record(OpType::Info, "resume", &value);
        }
        for slot in self.workers.disarm_all() {
            let description =
                format!("client worker {slot} reached no fenced write while armed; disarmed");
            let value = json!({"target": "client", "variant": "disarmed", "slot": slot, "description": description});
            self.record(OpType::Invoke, "disarm", &value);
            self.record(OpType::Info, "disarm", &value);
        }
        let skewed = std::mem::take(&mut self.skewed);
        if !skewed.is_empty() {
            let value = json!({"nodes": skewed, "description": format!("restart {skewed:?} with the real clock")});
            self.record(OpType::Invoke, "clock-reset", &value);
            let mut cluster = self.cluster.lock().await;
            for &node in &skewed {
                cluster.stop(node).await;
                cluster.set_clock(node, None);
                cluster.start(node)?;
            }
            drop(cluster);
            self.record(OpType::Info, "clock-reset", &value);
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

/// Both directions between `node` and every other node.
fn isolate(ids: &[u64], node: u64) -> BTreeSet<(u64, u64)> {
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != node).collect();
    between(&[node], &others)
}

/// Both directions between every node of `a` and every node of `b`.
fn between(a: &[u64], b: &[u64]) -> BTreeSet<(u64, u64)> {
    let mut cuts = BTreeSet::new();
    for &x in a {
        for &y in b {
            cuts.insert((x, y));
            cuts.insert((y, x));
        }
    }
    cuts
}

/// Each node keeps only its two neighbours in `order` (taken as a ring), so
/// with five nodes each sees a majority (itself and two), and no two see
/// the same one.
fn ring(order: &[u64]) -> BTreeSet<(u64, u64)> {
    let n = order.len();
    let mut cuts = BTreeSet::new();
    for i in 0..n {
        for j in 0..n {
            let distance = (i + n - j) % n;
            if i != j && distance != 1 && distance != n - 1 {
                cuts.insert((order[i], order[j]));
            }
        }
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolating_a_node_cuts_both_directions_to_every_other_node() {
        let cuts = isolate(&[1, 2, 3], 2);
        assert_eq!(cuts, BTreeSet::from([(1, 2), (2, 1), (2, 3), (3, 2)]));
    }

    #[test]
    fn in_a_majorities_ring_each_node_keeps_exactly_its_two_neighbours() {
        let order = [3, 1, 4, 5, 2];
        let cuts = ring(&order);
        for &node in &order {
            let reachable = order
                .iter()
                .filter(|&&other| other != node && !cuts.contains(&(node, other)))
                .count();
            assert_eq!(reachable, 2, "node {node}");
        }
        assert!(!cuts.contains(&(3, 1)) && !cuts.contains(&(2, 3)));
        assert!(cuts.contains(&(3, 4)));
    }

    #[test]
    fn nemesis_names_parse_and_unknown_ones_are_refused() {
        assert_eq!(FaultKind::parse("kill"), Ok(FaultKind::Kill));
        assert!(FaultKind::parse("flood").unwrap_err().contains("partition"));
    }
}
