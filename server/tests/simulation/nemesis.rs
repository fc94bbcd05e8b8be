//! The faults the simulator injects, one at a time, and healing them.
//!
//! | fault | what happens |
//! |---|---|
//! | `IsolateOne`, `IsolateLeader` | every link of one node cut, both ways |
//! | `SplitMajority` | two nodes cut off from the other three |
//! | `OneWayFromLeader` | the leader's messages to every peer are lost; it still hears them |
//! | `OneWayToLeader` | the leader still sends, but hears nothing back |
//! | `OneWayLinks` | three random directed links lose everything |
//! | `CrashOne`, `CrashLeader` | the process dies: memory lost, disk kept, restart at heal |
//! | `PowerLossOne` | the machine dies: unsynced writes lost (a seeded prefix kept), last record maybe torn |
//! | `PowerLossAll` | every machine at once (rare) |
//! | `PauseLeader` | no ticks and no input for the fault's length (SIGSTOP); its clock runs on |
//! | `Lossy` | 20 % of peer messages lost |
//! | `ClockSkew` | one to three nodes get new clock rates, mostly at the edges of the range |
//!
//! Faults last 1–8 s, 2–6 s apart. Clock rates stay changed after a heal
//! (a clock that drifted does not snap back); everything else heals.
//!
//! Not done yet: one fault at a time (no partition during a crash); no
//! slow or failing disk, no bit flips in stored records (the storage tests
//! plant those).

use rand::seq::SliceRandom;
use rand::Rng;

use crate::world::{drawn_offset, Event, World, BASE_DROP_PER_MILLE, MS, NODES};

/// Faults the nemesis can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    IsolateOne,
    IsolateLeader,
    SplitMajority,
    OneWayFromLeader,
    OneWayToLeader,
    OneWayLinks,
    CrashOne,
    CrashLeader,
    PowerLossOne,
    PowerLossAll,
    PauseLeader,
    Lossy,
    ClockSkew,
}

/// Each fault with its weight in the draw: the default mix.
pub const ALL_FAULTS: &[(Fault, u32)] = &[
    (Fault::IsolateOne, 3),
    (Fault::IsolateLeader, 3),
    (Fault::SplitMajority, 3),
    (Fault::OneWayFromLeader, 2),
    (Fault::OneWayToLeader, 2),
    (Fault::OneWayLinks, 2),
    (Fault::CrashOne, 3),
    (Fault::CrashLeader, 3),
    (Fault::PowerLossOne, 2),
    (Fault::PowerLossAll, 1),
    (Fault::PauseLeader, 3),
    (Fault::Lossy, 2),
    (Fault::ClockSkew, 3),
];

/// Only processes and machines dying: what exposes state that a restart
/// loses (the volatile token counter's broken variant).
pub const CRASH_FAULTS: &[(Fault, u32)] = &[
    (Fault::CrashOne, 3),
    (Fault::CrashLeader, 3),
    (Fault::PowerLossOne, 2),
    (Fault::PowerLossAll, 1),
];

/// Loss rate during a `Lossy` fault, per mille.
const LOSSY_DROP_PER_MILLE: u32 = 200;

impl World {
    /// Injects one fault, heals it later, and schedules the next.
    pub fn nemesis(&mut self) {
        if !self.faults_enabled || self.fault_mix.is_empty() {
            return;
        }
        let fault = self
            .fault_mix
            .choose_weighted(&mut self.rng, |(_, weight)| *weight)
            .expect("weights are positive")
            .0;
        let duration_us = self.rng.gen_range(1_000 * MS..8_000 * MS);
        let random_node = self.rng.gen_range(1..=NODES);
        let target = match fault {
            Fault::IsolateLeader
            | Fault::CrashLeader
            | Fault::PauseLeader
            | Fault::OneWayFromLeader
            | Fault::OneWayToLeader => self.leader().unwrap_or(random_node),
            _ => random_node,
        };
        self.fault_log.push(format!(
            "{:>7} ms {fault:?} node {target} for {} ms",
            self.now_us / MS,
            duration_us / MS
        ));
        let words = [self.now_us, 81, fault as u64, target, duration_us];
        self.trace.record(&words);
        self.inject(fault, target, duration_us);
        self.schedule(duration_us, Event::Heal);
        let gap_us = self.rng.gen_range(2_000 * MS..6_000 * MS);
        self.schedule(duration_us + gap_us, Event::Nemesis);
    }

    fn inject(&mut self, fault: Fault, target: u64, duration_us: u64) {
        let others: Vec<u64> = (1..=NODES).filter(|id| *id != target).collect();
        match fault {
            Fault::IsolateOne | Fault::IsolateLeader => self.isolate(&[target]),
            Fault::SplitMajority => {
                let mut ids: Vec<u64> = (1..=NODES).collect();
                ids.shuffle(&mut self.rng);
                self.isolate(&ids[..2]);
            }
            Fault::OneWayFromLeader => self.cut_links(&[target], &others),
            Fault::OneWayToLeader => self.cut_links(&others, &[target]),
            Fault::OneWayLinks => {
                for _ in 0..3 {
                    let from = self.rng.gen_range(1..=NODES);
                    let to = self.rng.gen_range(1..=NODES);
                    self.cut.insert((from, to));
                }
            }
            Fault::CrashOne | Fault::CrashLeader => self.crash(target, false),
            Fault::PowerLossOne => self.crash(target, true),
            Fault::PowerLossAll => {
                for id in 1..=NODES {
                    self.crash(id, true);
                }
            }
            Fault::PauseLeader => {
                self.paused_until_us
                    .insert(target, self.now_us + duration_us);
                self.schedule(duration_us, Event::Resume { node: target });
            }
            Fault::Lossy => self.drop_per_mille = LOSSY_DROP_PER_MILLE,
            Fault::ClockSkew => self.skew_clocks(),
        }
    }

    /// New rates for one to three nodes, the leader first; mostly at the
    /// edges of the allowed range, where lease timing is tightest.
    fn skew_clocks(&mut self) {
        let mut ids: Vec<u64> = (1..=NODES).collect();
        ids.shuffle(&mut self.rng);
        if let Some(leader) = self.leader() {
            ids.retain(|id| *id != leader);
            ids.insert(0, leader);
        }
        let count = self.rng.gen_range(1..=3);
        let bound = self.settings.max_clock_drift_ppm as i64 * self.settings.drift_scale;
        for id in ids.into_iter().take(count) {
            let offset = match self.rng.gen_range(0..4) {
                0 => bound,
                1 => -bound,
                _ => drawn_offset(&mut self.rng, &self.settings),
            };
            self.clocks[&id].set_offset_ppm(offset);
            self.fault_log.push(format!(
                "{:>7} ms   node {id} clock rate {:+} ppm",
                self.now_us / MS,
                offset
            ));
            let words = [self.now_us, 82, id, offset as u64];
            self.trace.record(&words);
        }
    }

    /// Cuts every link between `side` and the rest, both ways.
    fn isolate(&mut self, side: &[u64]) {
        let rest: Vec<u64> = (1..=NODES).filter(|id| !side.contains(id)).collect();
        self.cut_links(side, &rest);
        self.cut_links(&rest, side);
    }

    /// Cuts every link from a node of `from` to a node of `to`.
    fn cut_links(&mut self, from: &[u64], to: &[u64]) {
        for a in from {
            for b in to {
                self.cut.insert((*a, *b));
            }
        }
    }

    pub fn heal(&mut self) {
        self.trace.record(&[self.now_us, 80]);
        self.fault_log
            .push(format!("{:>7} ms heal", self.now_us / MS));
        self.cut.clear();
        self.drop_per_mille = BASE_DROP_PER_MILLE;
        let paused: Vec<u64> = self.paused_until_us.keys().copied().collect();
        for id in paused {
            self.paused_until_us.remove(&id);
            self.schedule(MS, Event::Resume { node: id });
        }
        for id in 1..=NODES {
            if !self.is_up(id) {
                self.schedule(MS, Event::Restart { node: id });
            }
        }
    }
}
