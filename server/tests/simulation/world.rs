//! The simulated world: five real nodes, a virtual clock, an in-memory
//! network with faults, and one queue of timed events.
//!
//! Every choice comes from one seeded RNG, and events run one at a time in
//! `(virtual time, sequence number)` order, so a seed fixes the whole run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use raft::prelude::{Message, MessageType};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::sync::broadcast;

use latchkey_proto::state::v1::CommandResult;
use latchkey_server::config::{Config, RaftTiming, UnsafeSwitches};
use latchkey_server::node::{
    AppliedEvents, Clock, Node, NodeHandle, NodeMsg, NodeOptions, Role, Transport,
};
use latchkey_server::storage::{Engine, MemoryDisk};
use latchkey_server::types::NodeId;

use crate::checker::{fnv, AppliedEntry, Checker, Trace};

pub const NODES: u64 = 5;
pub const TICK_MS: u64 = 50;
pub const ELECTION_TICKS: usize = 10;
const MS: u64 = 1000;

/// Virtual time, shared by every node's clock.
#[derive(Clone)]
pub struct VirtualClock {
    base: Instant,
    now_us: Arc<AtomicU64>,
}

impl VirtualClock {
    fn new() -> VirtualClock {
        VirtualClock {
            base: Instant::now(),
            now_us: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Instant {
        // Only differences between instants matter to the node, so the
        // real `base` does not leak into any result.
        self.base + Duration::from_micros(self.now_us.load(Ordering::Relaxed))
    }
}

/// The node's transport: messages wait in an outbox the world drains after
/// each step.
struct Outbox(Arc<Mutex<Vec<Message>>>);

impl Transport for Outbox {
    fn send(&mut self, messages: Vec<Message>) {
        self.0.lock().extend(messages);
    }
}

/// A node that is up.
pub struct Running {
    node: Node,
    pub handle: NodeHandle,
    pub engine: Engine,
    outbox: Arc<Mutex<Vec<Message>>>,
    applied: Arc<Mutex<Vec<AppliedEntry>>>,
    events: broadcast::Receiver<Arc<AppliedEvents>>,
    incarnation: u64,
}

/// What happens at one instant.
pub enum Event {
    Tick {
        node: u64,
        incarnation: u64,
    },
    Deliver(Box<Message>),
    /// A client request (or transport feedback) reaching a node.
    Request {
        node: u64,
        message: NodeMsg,
    },
    Restart {
        node: u64,
    },
    Resume {
        node: u64,
    },
    Heal,
    Nemesis,
    Client {
        client: usize,
        generation: u64,
    },
}

/// Faults the nemesis can inject; at most one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    IsolateOne,
    IsolateLeader,
    SplitMajority,
    CrashOne,
    CrashLeader,
    PauseLeader,
    Lossy,
}

const FAULTS: [Fault; 7] = [
    Fault::IsolateOne,
    Fault::IsolateLeader,
    Fault::SplitMajority,
    Fault::CrashOne,
    Fault::CrashLeader,
    Fault::PauseLeader,
    Fault::Lossy,
];

pub struct World {
    pub rng: StdRng,
    pub now_us: u64,
    clock: VirtualClock,
    queue: BTreeMap<(u64, u64), Event>,
    next_seq: u64,
    pub nodes: BTreeMap<u64, Option<Running>>,
    configs: BTreeMap<u64, Config>,
    /// Each node's data, kept across its crashes and restarts.
    disks: BTreeMap<u64, MemoryDisk>,
    incarnations: BTreeMap<u64, u64>,
    paused_until_us: BTreeMap<u64, u64>,
    /// Unordered pairs that cannot talk.
    cut: BTreeSet<(u64, u64)>,
    drop_per_mille: u32,
    pub faults_enabled: bool,
    pub checker: Checker,
    pub trace: Trace,
    pub fault_log: Vec<String>,
    pub snapshots_sent: u64,
}

impl World {
    /// Five nodes, started. `unsafe_no_fencing` turns the fence check off
    /// (to prove the checker notices).
    pub fn new(rng: StdRng, compact_log_after_entries: u64, unsafe_no_fencing: bool) -> World {
        let peers: BTreeMap<NodeId, String> = (1..=NODES)
            .map(|id| (NodeId(id), format!("127.0.0.1:{}", 20000 + id)))
            .collect();
        let mut configs = BTreeMap::new();
        for id in 1..=NODES {
            let config = Config {
                advertise_client: format!("sim-{id}"),
                timing: RaftTiming {
                    tick_interval_ms: TICK_MS,
                    election_ticks: ELECTION_TICKS,
                    heartbeat_ticks: 2,
                },
                compact_log_after_entries,
                unsafe_switches: UnsafeSwitches {
                    no_fencing: unsafe_no_fencing,
                    ..UnsafeSwitches::default()
                },
                ..Config::with_defaults(
                    NodeId(id),
                    // Unused: the node's storage is a `MemoryDisk`.
                    format!("/nonexistent/latchkey-sim-{id}").into(),
                    "127.0.0.1:0".parse().expect("literal address"),
                    "127.0.0.1:0".parse().expect("literal address"),
                    peers.clone(),
                )
            };
            configs.insert(id, config);
        }
        let mut world = World {
            rng,
            now_us: 0,
            clock: VirtualClock::new(),
            queue: BTreeMap::new(),
            next_seq: 0,
            nodes: BTreeMap::new(),
            configs,
            disks: (1..=NODES).map(|id| (id, MemoryDisk::new())).collect(),
            incarnations: BTreeMap::new(),
            paused_until_us: BTreeMap::new(),
            cut: BTreeSet::new(),
            drop_per_mille: 5,
            faults_enabled: true,
            checker: Checker::default(),
            trace: Trace::default(),
            fault_log: Vec::new(),
            snapshots_sent: 0,
        };
        // Distinct election timeouts: raft-rs cannot randomise them
        // reproducibly, so the seed does, once per start.
        let mut ticks: Vec<usize> = (ELECTION_TICKS..2 * ELECTION_TICKS).collect();
        ticks.shuffle(&mut world.rng);
        for id in 1..=NODES {
            world.start(id, ticks[id as usize - 1]);
        }
        world
    }

    pub fn schedule(&mut self, after_us: u64, event: Event) {
        self.next_seq += 1;
        self.queue
            .insert((self.now_us + after_us, self.next_seq), event);
    }

    fn start(&mut self, id: u64, election_ticks: usize) {
        let config = &self.configs[&id];
        let engine = Engine::open_memory(&self.disks[&id]).expect("simulated node's data opens");
        let outbox = Arc::new(Mutex::new(Vec::new()));
        let applied = Arc::new(Mutex::new(Vec::new()));
        let sink = applied.clone();
        let options = NodeOptions {
            clock: Box::new(self.clock.clone()),
            boot_id: self.rng.gen(),
            election_tick_range: Some((election_ticks, election_ticks + 1)),
            raft_logger: Some(slog::Logger::root(slog::Discard, slog::o!())),
            apply_observer: Some(Box::new(move |entry, result: Option<&CommandResult>| {
                let mut digest_input = entry.data.to_vec();
                digest_input.extend_from_slice(&entry.context);
                sink.lock().push(AppliedEntry {
                    index: entry.index,
                    term: entry.term,
                    digest: fnv(&digest_input),
                    data: entry.data.to_vec(),
                    result: result.cloned(),
                });
            })),
        };
        let (node, handle) = Node::with_options(
            config,
            engine.clone(),
            Box::new(Outbox(outbox.clone())),
            options,
        )
        .expect("simulated node starts");
        let incarnation = self.incarnations.get(&id).copied().unwrap_or(0) + 1;
        self.incarnations.insert(id, incarnation);
        let events = handle.subscribe();
        self.nodes.insert(
            id,
            Some(Running {
                node,
                handle,
                engine,
                outbox,
                applied,
                events,
                incarnation,
            }),
        );
        let phase_us = self.rng.gen_range(0..TICK_MS * MS);
        self.schedule(
            phase_us,
            Event::Tick {
                node: id,
                incarnation,
            },
        );
    }

    /// Drops the node without a clean shutdown: what it wrote stays (the
    /// process died, the machine did not), its memory is gone.
    fn crash(&mut self, id: u64) {
        self.paused_until_us.remove(&id);
        if let Some(Some(running)) = self.nodes.insert(id, None) {
            drop(running);
            self.trace.record(&[self.now_us, 90, id]);
        }
    }

    pub fn leader(&self) -> Option<u64> {
        self.nodes.values().flatten().find_map(|running| {
            let status = running.handle.status();
            (status.role == Role::Leader).then_some(status.id.0)
        })
    }

    pub fn is_up(&self, id: u64) -> bool {
        matches!(self.nodes.get(&id), Some(Some(_)))
    }

    fn paused(&self, id: u64) -> Option<u64> {
        self.paused_until_us
            .get(&id)
            .copied()
            .filter(|until| *until > self.now_us)
    }

    /// Runs the next event; `None` when the queue is empty.
    pub fn next_event(&mut self) -> Option<Event> {
        let ((at, _), event) = self.queue.pop_first()?;
        assert!(at >= self.now_us, "time never goes back");
        self.now_us = at;
        self.clock.now_us.store(at, Ordering::Relaxed);
        Some(event)
    }

    /// Handles the world's own events; hands client events back.
    pub fn dispatch(&mut self, event: Event) -> Option<(usize, u64)> {
        match event {
            Event::Tick { node, incarnation } => self.on_tick(node, incarnation),
            Event::Deliver(message) => self.deliver(*message),
            Event::Request { node, message } => self.request(node, message),
            Event::Restart { node } => {
                let ticks = self.rng.gen_range(ELECTION_TICKS..2 * ELECTION_TICKS);
                self.trace.record(&[self.now_us, 91, node]);
                self.start(node, ticks);
            }
            Event::Resume { node } => {
                self.paused_until_us.remove(&node);
                self.step(node, |node| node.handle_inbox());
            }
            Event::Heal => self.heal(),
            Event::Nemesis => self.nemesis(),
            Event::Client { client, generation } => return Some((client, generation)),
        }
        None
    }

    fn on_tick(&mut self, id: u64, incarnation: u64) {
        let current = self
            .nodes
            .get(&id)
            .and_then(|n| n.as_ref())
            .map(|r| r.incarnation);
        if current != Some(incarnation) {
            return; // a tick of a crashed incarnation
        }
        self.schedule(
            TICK_MS * MS,
            Event::Tick {
                node: id,
                incarnation,
            },
        );
        if self.paused(id).is_some() {
            return;
        }
        self.step(id, |node| node.tick());
    }

    fn deliver(&mut self, message: Message) {
        let to = message.to;
        if let Some(until) = self.paused(to) {
            let delay = until - self.now_us + self.rng.gen_range(0..MS);
            self.schedule(delay, Event::Deliver(Box::new(message)));
            return;
        }
        let Some(Some(running)) = self.nodes.get(&to) else {
            return;
        };
        self.trace.record(&[
            self.now_us,
            1,
            message.from,
            to,
            message.get_msg_type() as u64,
            message.term,
            message.index,
        ]);
        running.handle.report(NodeMsg::Raft(Box::new(message)));
        self.step(to, |node| node.handle_inbox());
    }

    fn request(&mut self, id: u64, message: NodeMsg) {
        if let Some(until) = self.paused(id) {
            let delay = until - self.now_us + self.rng.gen_range(0..MS);
            self.schedule(delay, Event::Request { node: id, message });
            return;
        }
        // A request to a node that is down is dropped with its reply
        // channel: the client sees the connection fail.
        let Some(Some(running)) = self.nodes.get(&id) else {
            return;
        };
        self.trace.record(&[self.now_us, 2, id]);
        running.handle.report(message);
        self.step(id, |node| node.handle_inbox());
    }

    /// Runs one step of node `id` and routes and checks what came out.
    fn step(
        &mut self,
        id: u64,
        work: impl FnOnce(&mut Node) -> Result<(), latchkey_server::error::FatalError>,
    ) {
        let Some(Some(running)) = self.nodes.get_mut(&id) else {
            return;
        };
        if let Err(e) = work(&mut running.node) {
            panic!("node {id} stopped with a fatal error: {e}");
        }
        let messages = std::mem::take(&mut *running.outbox.lock());
        let applied = std::mem::take(&mut *running.applied.lock());
        let mut events: BTreeMap<u64, Vec<latchkey_server::coordination::Event>> = BTreeMap::new();
        while let Ok(batch) = running.events.try_recv() {
            events.insert(batch.index.0, batch.events.clone());
        }
        let status = running.handle.status();
        if status.role == Role::Leader {
            self.checker.leader_seen(status.term, id);
        }
        for entry in applied {
            self.trace
                .record(&[self.now_us, 3, id, entry.index, entry.term, entry.digest]);
            let entry_events = events.remove(&entry.index).unwrap_or_default();
            self.checker.applied(id, entry, &entry_events, self.now_us);
        }
        self.route(id, messages);
    }

    /// Sends messages through the faulty network.
    fn route(&mut self, from: u64, messages: Vec<Message>) {
        for message in messages {
            let to = message.to;
            let cut = self.cut.contains(&(from.min(to), from.max(to)));
            let lost = cut || self.rng.gen_range(0..1000) < self.drop_per_mille;
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshots_sent += 1;
                // What the real transport reports once the snapshot is handed
                // to (or refused by) the stream.
                let feedback = NodeMsg::SnapshotSent {
                    to: NodeId(to),
                    ok: !lost,
                };
                self.schedule(
                    MS,
                    Event::Request {
                        node: from,
                        message: feedback,
                    },
                );
            }
            if lost {
                continue;
            }
            let copies = if self.rng.gen_range(0..1000) < 5 {
                2
            } else {
                1
            };
            for _ in 0..copies {
                // Mostly fast, sometimes slow: reorders messages too.
                let delay_us = if self.rng.gen_range(0..100) < 3 {
                    self.rng.gen_range(20 * MS..120 * MS)
                } else {
                    self.rng.gen_range(200..5 * MS)
                };
                self.schedule(delay_us, Event::Deliver(Box::new(message.clone())));
            }
        }
    }

    fn heal(&mut self) {
        self.trace.record(&[self.now_us, 80]);
        self.fault_log
            .push(format!("{:>7} ms heal", self.now_us / MS));
        self.cut.clear();
        self.drop_per_mille = 5;
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

    /// Injects one fault, heals it later, and schedules the next.
    fn nemesis(&mut self) {
        if !self.faults_enabled {
            return;
        }
        let fault = *FAULTS.choose(&mut self.rng).expect("faults are listed");
        let duration_us = self.rng.gen_range(1_000 * MS..8_000 * MS);
        let random_node = self.rng.gen_range(1..=NODES);
        let target = match fault {
            Fault::IsolateLeader | Fault::CrashLeader | Fault::PauseLeader => {
                self.leader().unwrap_or(random_node)
            }
            _ => random_node,
        };
        self.fault_log.push(format!(
            "{:>7} ms {fault:?} node {target} for {} ms",
            self.now_us / MS,
            duration_us / MS
        ));
        self.trace
            .record(&[self.now_us, 81, fault as u64, target, duration_us]);
        match fault {
            Fault::IsolateOne | Fault::IsolateLeader => self.isolate(&[target]),
            Fault::SplitMajority => {
                let mut ids: Vec<u64> = (1..=NODES).collect();
                ids.shuffle(&mut self.rng);
                self.isolate(&ids[..2]);
            }
            Fault::CrashOne | Fault::CrashLeader => self.crash(target),
            Fault::PauseLeader => {
                self.paused_until_us
                    .insert(target, self.now_us + duration_us);
                self.schedule(duration_us, Event::Resume { node: target });
            }
            Fault::Lossy => self.drop_per_mille = 200,
        }
        self.schedule(duration_us, Event::Heal);
        let gap_us = self.rng.gen_range(2_000 * MS..6_000 * MS);
        self.schedule(duration_us + gap_us, Event::Nemesis);
    }

    /// Cuts every link between `side` and the rest.
    fn isolate(&mut self, side: &[u64]) {
        for a in side {
            for b in (1..=NODES).filter(|b| !side.contains(b)) {
                self.cut.insert(((*a).min(b), (*a).max(b)));
            }
        }
    }

    /// Every state record of every running node, for the final comparison.
    pub fn state_digests(&self) -> BTreeMap<u64, (u64, u64)> {
        self.nodes
            .iter()
            .filter_map(|(id, running)| {
                let running = running.as_ref()?;
                let records = running.engine.state_records().expect("state reads");
                let mut bytes = Vec::new();
                for (key, value) in records {
                    bytes.extend_from_slice(&key);
                    bytes.extend_from_slice(&value);
                }
                Some((*id, (running.handle.status().applied_index, fnv(&bytes))))
            })
            .collect()
    }
}
