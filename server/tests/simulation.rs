//! Deterministic simulation of a 5-node latchkey cluster.
//!
//! Replay a seed: `scripts/sim --seed N`, or
//! `LATCHKEY_SIM_SEED=N cargo nextest run --workspace -E 'binary(simulation)'`
//! (both print the run's fault schedule and statistics). `LATCHKEY_SIM_SEEDS`
//! sets how many seeds a normal run covers, `LATCHKEY_SIM_FIRST_SEED` where
//! they start, `LATCHKEY_SIM_SECONDS` the virtual length of each run,
//! `LATCHKEY_SIM_BROKEN` a broken variant to run (see `broken.rs`).
//!
//! # How it works
//!
//! The real [`Node`](latchkey_server::node::Node) — raft-rs `RawNode`, the
//! Ready loop, the storage engine (on its in-memory backend, which models
//! power loss), the state machine, the lease and session clocks — runs five
//! times in one thread. No tokio runtime is involved: the simulator owns
//! the schedule and calls `Node::tick` and `Node::handle_inbox`, which run
//! exactly the code of one iteration of the production loop (`Node::run`).
//! Everything else is replaced:
//!
//! - **time** (`clock.rs`): one virtual timeline that jumps from event to
//!   event; each node's clock runs at its own seeded rate off it, inside the
//!   drift bound, and ticks every 50 ms of its own time;
//! - **network** (`world.rs`): a `node::Transport` that puts messages in
//!   an outbox; the world delivers each with a seeded delay (0.2–5 ms,
//!   sometimes 20–120 ms, which reorders), drops 0.5 %, duplicates 0.5 %,
//!   and drops everything on a cut directed link;
//! - **faults** (`nemesis.rs`, one at a time, 1–8 s each, 2–6 s apart):
//!   partitions, one-way links, crashes, power losses, pauses, loss, clock
//!   rate changes;
//! - **clients** (`workload.rs`, `client.rs`, `ops.rs`, `observers.rs`):
//!   send the same `NodeMsg`s the gRPC API sends (`Propose`, `KeepAlive`,
//!   `ReadIndex`) straight into the inboxes, with a seeded delay, and poll
//!   the reply channels after every event.
//!
//! At the end everything heals and restarts, the workload stops, and the
//! cluster must accept a write and converge. The checks are in `checker.rs`
//! and `model.rs`; see docs/testing.md.
//!
//! # Why not tokio with paused time
//!
//! A paused current-thread runtime would also run `Node::run` itself, but
//! `tokio::select!` picks its first branch with a per-thread RNG that can
//! only be seeded under `--cfg tokio_unstable`, and pausing time needs
//! tokio's `test-util` feature. Driving the node by hand removes the
//! scheduler from the picture: an event queue ordered by (virtual time,
//! sequence number) is the only scheduler, and one seeded generator makes
//! every choice.
//!
//! # What else is pinned down
//!
//! raft-rs draws election timeouts from `rand::thread_rng`; each node gets a
//! one-value range (`NodeOptions::election_tick_range`) drawn from the seed,
//! distinct per node at start, redrawn at restart. Boot ids come from the
//! seed. HashMap order inside the node only changes the order in which
//! reply channels are completed, and clients are polled in a fixed order.
//! raft-rs's own maps use a fixed hasher.
//!
//! # Not done yet
//!
//! See the "Limits" list in docs/testing.md: the gRPC transport, API layer
//! and client crate are stand-ins here; membership changes are not
//! exercised.

#[path = "simulation/broken.rs"]
mod broken;
#[path = "simulation/checker.rs"]
mod checker;
#[path = "simulation/checker_tests.rs"]
mod checker_tests;
#[path = "simulation/client.rs"]
mod client;
#[path = "simulation/clock.rs"]
mod clock;
#[path = "simulation/model.rs"]
mod model;
#[path = "simulation/nemesis.rs"]
mod nemesis;
#[path = "simulation/observers.rs"]
mod observers;
#[path = "simulation/ops.rs"]
mod ops;
#[path = "simulation/runner.rs"]
mod runner;
#[path = "simulation/workload.rs"]
mod workload;
#[path = "simulation/world.rs"]
mod world;

use std::collections::BTreeMap;

use tokio::sync::oneshot;

use latchkey_proto::state::v1::{command, Command, Put};
use latchkey_server::config::{UnsafeSwitches, DEFAULT_MAX_CLOCK_DRIFT_PPM};
use latchkey_server::node::NodeMsg;
use latchkey_server::state_machine::Reader;

use checker::{Stats, Trace};
use clock::SimRng;
use nemesis::{Fault, ALL_FAULTS};
use workload::Workload;
use world::{Event, Settings, Touched, World, MS, NODES, SECOND};

/// Simulated clients.
const CLIENTS: usize = 4;
/// After the workload stops and every fault heals, the cluster must agree
/// within this much virtual time.
const CONVERGENCE_LIMIT_US: u64 = 60 * SECOND;
/// Virtual time given after the heal for leases and sessions to expire
/// (TTLs are at most 4 s, the idle timeout 4 s) and nodes to restart.
const SETTLE_US: u64 = 10 * SECOND;
/// A write after the heal must be acknowledged within this much virtual time.
const FINAL_WRITE_LIMIT_US: u64 = 20 * SECOND;
/// Sessions idle this long are expired by the leader (short, so that runs
/// see sessions end and retries refused).
const SESSION_IDLE_TIMEOUT_MS: u64 = 4_000;

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub seconds: u64,
    /// The faults the nemesis draws from (empty: none).
    pub faults: &'static [(Fault, u32)],
    /// Small enough to compact and send snapshots in some runs.
    pub compact_log_after_entries: u64,
    pub switches: UnsafeSwitches,
    /// Clock rates are drawn within this many times the drift bound.
    pub drift_scale: i64,
}

impl Scenario {
    pub fn new(seed: u64, seconds: u64) -> Scenario {
        Scenario {
            seed,
            seconds,
            faults: ALL_FAULTS,
            compact_log_after_entries: if seed.is_multiple_of(3) { 64 } else { 10_000 },
            switches: UnsafeSwitches::default(),
            drift_scale: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub trace: Trace,
    pub history_len: u64,
    /// Node → (applied index, digest of every state record).
    pub final_state: BTreeMap<u64, (u64, u64)>,
    pub violations: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub stats: Stats,
    pub acked_puts: usize,
    pub reads: usize,
    pub ops: u64,
    pub snapshots_sent: u64,
    pub power_losses: u64,
    pub torn_records: u64,
    pub fault_log: Vec<String>,
}

pub fn run(scenario: &Scenario) -> (Report, Summary) {
    let settings = Settings {
        compact_log_after_entries: scenario.compact_log_after_entries,
        switches: scenario.switches.clone(),
        max_clock_drift_ppm: DEFAULT_MAX_CLOCK_DRIFT_PPM,
        drift_scale: scenario.drift_scale,
        session_idle_timeout_ms: SESSION_IDLE_TIMEOUT_MS,
    };
    let mut world = World::new(SimRng::seed_from_u64(scenario.seed), settings);
    let mut workload = Workload::new(&mut world, CLIENTS);
    world.fault_mix = scenario.faults;
    world.schedule(5 * SECOND, Event::Nemesis);
    let end_us = scenario.seconds * SECOND;
    run_until(&mut world, &mut workload, end_us);

    workload.stopped = true;
    world.faults_enabled = false;
    world.schedule(0, Event::Heal);
    run_until(&mut world, &mut workload, end_us + SETTLE_US);
    final_write(&mut world, &mut workload);
    let final_state = converge(&mut world, &mut workload);
    check_final_state(&mut world);
    let report = Report {
        trace: world.trace,
        history_len: world.checker.history_len(),
        final_state,
        violations: world.checker.violations.0.clone(),
    };
    let summary = Summary {
        stats: world.checker.stats.clone(),
        acked_puts: world.checker.acked_put_count(),
        reads: world.checker.read_count(),
        ops: workload.ops_done,
        snapshots_sent: world.snapshots_sent,
        power_losses: world.power_losses,
        torn_records: world.torn_records_dropped(),
        fault_log: std::mem::take(&mut world.fault_log),
    };
    (report, summary)
}

fn run_until(world: &mut World, workload: &mut Workload, until_us: u64) {
    while world.now_us < until_us {
        let Some(event) = world.next_event() else {
            break;
        };
        let touched = world.dispatch(event);
        if let Touched::Client { client, generation } = touched {
            workload.wake(world, client, generation);
        }
        workload.poll(world, touched);
    }
}

/// Liveness after the heal: a write through the leader is acknowledged.
fn final_write(world: &mut World, workload: &mut Workload) {
    let deadline = world.now_us + FINAL_WRITE_LIMIT_US;
    while world.now_us < deadline {
        let Some(leader) = world.leader() else {
            let until = world.now_us + 100 * MS;
            run_until(world, workload, until);
            continue;
        };
        let (reply, mut answer) = oneshot::channel();
        let command = Command {
            command: Some(command::Command::Put(Put {
                key: b"final".to_vec(),
                value: b"written after the heal".to_vec(),
                fence: None,
                expected_mod_revision: None,
            })),
            request: None,
        };
        let message = NodeMsg::Propose { command, reply };
        world.schedule(
            MS,
            Event::Request {
                node: leader,
                message,
            },
        );
        let until = world.now_us + 2 * SECOND;
        while world.now_us < until {
            match answer.try_recv() {
                Ok(Ok(_)) => return,
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => break,
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let step = world.now_us + 10 * MS;
            run_until(world, workload, step);
        }
    }
    world
        .checker
        .violations
        .add("no write was acknowledged within 20 s after the heal".into());
}

/// Runs until every node is up and all hold the same state; returns it.
fn converge(world: &mut World, workload: &mut Workload) -> BTreeMap<u64, (u64, u64)> {
    let deadline = world.now_us + CONVERGENCE_LIMIT_US;
    loop {
        let states = world.state_digests();
        let values: Vec<_> = states.values().collect();
        let agreed = states.len() == NODES as usize && values.windows(2).all(|w| w[0] == w[1]);
        if agreed || world.now_us >= deadline {
            if !agreed {
                world.checker.violations.add(format!(
                    "replicas did not converge after the heal: (applied, state digest) = {states:?}"
                ));
            }
            return states;
        }
        let step = world.now_us + 500 * MS;
        run_until(world, workload, step);
    }
}

/// Durability: every acknowledged put is in the converged state.
fn check_final_state(world: &mut World) {
    let reader = world.running(1).map(|running| {
        Reader::new(
            running.engine.clone(),
            running.handle.coordination(),
            running.handle.auth(),
        )
    });
    let Some(reader) = reader else {
        return;
    };
    world.checker.check_acked_puts(|key| {
        reader
            .get(key)
            .expect("state reads")
            .map_or(0, |record| record.mod_revision)
    });
}
