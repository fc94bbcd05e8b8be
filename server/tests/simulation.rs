//! Deterministic simulation of a 5-node latchkey cluster.
//!
//! Replay a seed: `LATCHKEY_SIM_SEED=N cargo nextest run --workspace -E 'binary(simulation)'`
//! (also prints the run's fault schedule and statistics). `LATCHKEY_SIM_SEEDS`
//! sets how many seeds a normal run covers, `LATCHKEY_SIM_FIRST_SEED` where
//! they start, `LATCHKEY_SIM_SECONDS` the virtual length of each run.
//!
//! # How it works
//!
//! The real [`Node`](latchkey_server::node::Node) — raft-rs `RawNode`, the
//! Ready loop, RocksDB storage in a temp dir, the state machine, the lease
//! clock — runs five times in one thread. No tokio runtime is involved: the
//! simulator owns the schedule and calls `Node::tick` and
//! `Node::handle_inbox`, which run exactly the code of one iteration of the
//! production loop (`Node::run`). Everything else is replaced:
//!
//! - **time**: one virtual clock (`world::VirtualClock`, a `node::Clock`)
//!   that jumps from event to event; each node ticks every 50 virtual ms
//!   with a seeded phase;
//! - **network**: a `node::Transport` that puts messages in an outbox; the
//!   world delivers each with a seeded delay (0.2–5 ms, sometimes 20–120 ms,
//!   which reorders), drops 0.5 % (20 % during a lossy fault), duplicates
//!   0.5 %, and drops everything across a partition;
//! - **clients**: `workload` sends the same `NodeMsg`s the gRPC API sends
//!   (`Propose`, `KeepAlive`, `ReadIndex`) straight into the inboxes, with a
//!   seeded delay, and polls the reply channels after every event;
//! - **faults** (`world::Fault`, one at a time, 1–8 s each, 2–6 s apart):
//!   isolate a node or the leader, split 2/3, crash a node or the leader
//!   (dropped without shutdown, restarted later from the same RocksDB
//!   directory), pause the leader (no ticks, no input, like SIGSTOP), 20 %
//!   message loss. At the end everything heals and restarts, the workload
//!   stops, and the cluster must converge and accept a write.
//!
//! # Why not tokio with paused time
//!
//! A paused current-thread runtime would also run `Node::run` itself, but
//! `tokio::select!` picks its first branch with a per-thread RNG that can
//! only be seeded under `--cfg tokio_unstable`, and pausing time needs
//! tokio's `test-util` feature. Driving the node by hand removes the
//! scheduler from the picture: an event queue ordered by (virtual time,
//! sequence number) is the only scheduler, and one `StdRng` seeded from the
//! seed makes every choice.
//!
//! # What else is pinned down
//!
//! raft-rs draws election timeouts from `rand::thread_rng`; each node gets a
//! one-value range (`NodeOptions::election_tick_range`) drawn from the seed,
//! distinct per node at start, redrawn at restart. Boot ids come from the
//! seed. RocksDB runs in `/dev/shm` when it exists; its background threads
//! only flush and compact, which does not change what a read returns.
//! HashMap order inside the node only changes the order in which reply
//! channels are completed, and clients are polled in a fixed order.
//! raft-rs's own maps use a fixed hasher.
//!
//! The checks are in `checker`; see docs/testing.md.

#[path = "simulation/checker.rs"]
mod checker;
#[path = "simulation/workload.rs"]
mod workload;
#[path = "simulation/world.rs"]
mod world;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::oneshot;

use latchkey_proto::state::v1::{command, Command, Put};
use latchkey_server::node::NodeMsg;
use latchkey_server::state_machine::Reader;

use checker::{Stats, Trace};
use workload::Workload;
use world::{Event, World, NODES};

const MS: u64 = 1000;
const SECOND: u64 = 1_000_000;
/// Test functions the default seeds are spread over, so that nextest runs
/// them in parallel.
const SHARDS: u64 = 4;
const DEFAULT_SEEDS: u64 = 24;
const DEFAULT_SECONDS: u64 = 120;
/// After the workload stops and every fault heals, the cluster must agree
/// within this much virtual time.
const CONVERGENCE_LIMIT_US: u64 = 60 * SECOND;

#[derive(Debug, Clone, Copy)]
struct Scenario {
    seed: u64,
    seconds: u64,
    faults: bool,
    /// Small enough to compact and send snapshots in some runs.
    compact_log_after_entries: u64,
    unsafe_no_fencing: bool,
}

impl Scenario {
    fn new(seed: u64, seconds: u64) -> Scenario {
        Scenario {
            seed,
            seconds,
            faults: true,
            compact_log_after_entries: if seed.is_multiple_of(3) { 64 } else { 10_000 },
            unsafe_no_fencing: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    trace: Trace,
    history_len: u64,
    /// Node → (applied index, digest of every state record).
    final_state: BTreeMap<u64, (u64, u64)>,
    violations: Vec<String>,
}

#[derive(Debug, Default)]
struct Summary {
    stats: Stats,
    acked_puts: usize,
    reads: usize,
    ops: u64,
    snapshots_sent: u64,
    fault_log: Vec<String>,
}

fn run(scenario: Scenario) -> (Report, Summary) {
    let rng = StdRng::seed_from_u64(scenario.seed);
    let mut world = World::new(
        rng,
        scenario.compact_log_after_entries,
        scenario.unsafe_no_fencing,
    );
    let mut workload = Workload::new(&mut world, 4);
    world.faults_enabled = scenario.faults;
    world.schedule(5 * SECOND, Event::Nemesis);
    let end_us = scenario.seconds * SECOND;
    run_until(&mut world, &mut workload, end_us);

    workload.stopped = true;
    world.faults_enabled = false;
    world.schedule(0, Event::Heal);
    // Long enough for every lease to expire and every node to restart.
    run_until(&mut world, &mut workload, end_us + 15 * SECOND);
    final_write(&mut world, &mut workload);
    let final_state = converge(&mut world, &mut workload);
    let reference = world.nodes[&1]
        .as_ref()
        .map(|running| Reader::new(running.engine.clone(), running.handle.coordination()));
    if let Some(reader) = reference {
        world.checker.check_acked_puts(|key| {
            reader
                .get(key)
                .expect("state reads")
                .map_or(0, |record| record.mod_revision)
        });
    }
    let report = Report {
        trace: world.trace,
        history_len: world.checker.history_len(),
        final_state,
        violations: world.checker.violations.clone(),
    };
    let summary = Summary {
        stats: world.checker.stats.clone(),
        acked_puts: world.checker.acked_put_count(),
        reads: world.checker.read_count(),
        ops: workload.ops_done,
        snapshots_sent: world.snapshots_sent,
        fault_log: std::mem::take(&mut world.fault_log),
    };
    (report, summary)
}

fn run_until(world: &mut World, workload: &mut Workload, until_us: u64) {
    while world.now_us < until_us {
        let Some(event) = world.next_event() else {
            break;
        };
        if let Some((client, generation)) = world.dispatch(event) {
            workload.wake(world, client, generation);
        }
        workload.poll(world);
    }
}

/// Liveness after the heal: a write through the leader is acknowledged.
fn final_write(world: &mut World, workload: &mut Workload) {
    let deadline = world.now_us + 20 * SECOND;
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
        world.schedule(
            MS,
            Event::Request {
                node: leader,
                message: NodeMsg::Propose { command, reply },
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
        .push("no write was acknowledged within 20 s after the heal".into());
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
                world.checker.violations.push(format!(
                    "replicas did not converge after the heal: (applied, state digest) = {states:?}"
                ));
            }
            return states;
        }
        let step = world.now_us + 500 * MS;
        run_until(world, workload, step);
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

fn seconds() -> u64 {
    env_u64("LATCHKEY_SIM_SECONDS").unwrap_or(DEFAULT_SECONDS)
}

/// Runs one seed; panics with the replay command if any invariant broke.
fn check_seed(scenario: Scenario, verbose: bool) {
    let seed = scenario.seed;
    let replay = format!(
        "replay: LATCHKEY_SIM_SEED={seed} cargo nextest run --workspace -E 'binary(simulation)'"
    );
    eprintln!("simulating seed {seed} ({} virtual s)", scenario.seconds);
    let started = Instant::now();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run(scenario)));
    let (report, summary) = match outcome {
        Ok(result) => result,
        Err(panic) => {
            eprintln!("seed {seed} panicked; {replay}");
            std::panic::resume_unwind(panic);
        }
    };
    eprintln!(
        "seed {seed}: {} entries, {} ops, {} snapshots sent, {} acked puts, {} reads, {:?}, trace {:016x} ({} events), {:.1} s real",
        report.history_len,
        summary.ops,
        summary.snapshots_sent,
        summary.acked_puts,
        summary.reads,
        summary.stats,
        report.trace.hash,
        report.trace.events,
        started.elapsed().as_secs_f64()
    );
    if verbose || !report.violations.is_empty() {
        eprintln!("faults of seed {seed}:\n{}", summary.fault_log.join("\n"));
    }
    assert!(
        report.violations.is_empty(),
        "seed {seed} broke invariants:\n  {}\n{replay}",
        report.violations.join("\n  ")
    );
    // A run that did nothing proves nothing.
    assert!(
        summary.acked_puts > 0 && summary.reads > 0 && summary.stats.grants > 0,
        "seed {seed} made too little progress to check anything: {summary:?}\n{replay}"
    );
}

fn run_shard(shard: u64) {
    if let Some(seed) = env_u64("LATCHKEY_SIM_SEED") {
        if shard == 0 {
            check_seed(Scenario::new(seed, seconds()), true);
        }
        return;
    }
    let first = env_u64("LATCHKEY_SIM_FIRST_SEED").unwrap_or(1);
    let count = env_u64("LATCHKEY_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    for seed in (first..first + count).filter(|seed| seed % SHARDS == shard) {
        check_seed(Scenario::new(seed, seconds()), false);
    }
}

#[test]
fn simulated_cluster_keeps_every_invariant_shard_0() {
    run_shard(0);
}

#[test]
fn simulated_cluster_keeps_every_invariant_shard_1() {
    run_shard(1);
}

#[test]
fn simulated_cluster_keeps_every_invariant_shard_2() {
    run_shard(2);
}

#[test]
fn simulated_cluster_keeps_every_invariant_shard_3() {
    run_shard(3);
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let scenario = Scenario::new(env_u64("LATCHKEY_SIM_SEED").unwrap_or(7), 30);
    let (first, _) = run(scenario);
    let (second, _) = run(scenario);
    assert_eq!(first, second, "seed {} is not deterministic", scenario.seed);
    assert!(
        first.trace.events > 5_000,
        "the trace records the run: {first:?}"
    );
    let (other, _) = run(Scenario::new(scenario.seed + 1, 30));
    assert_ne!(first.trace, other.trace, "another seed gives another run");
}

#[test]
fn checker_catches_stale_fenced_writes_when_fencing_is_off() {
    // With the server's fence check disabled, stale holders' writes land;
    // a checker that stays quiet here would be checking nothing.
    let found = (1..=5).any(|seed| {
        let scenario = Scenario {
            unsafe_no_fencing: true,
            ..Scenario::new(seed, 60)
        };
        let (report, _) = run(scenario);
        report.violations.iter().any(|v| v.contains("fenced write"))
    });
    assert!(
        found,
        "the checker never flagged a stale fenced write with fencing off"
    );
}
