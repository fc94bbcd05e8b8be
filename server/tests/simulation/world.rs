//! The simulated world: five real nodes on memory disks, their clocks, an
//! in-memory network, and one queue of timed events.
//!
//! Every choice comes from one seeded RNG, and events run one at a time in
//! `(virtual time, sequence number)` order, so a seed fixes the whole run.
//! Faults are injected by `nemesis`; this file owns the state they change
//! (directed link cuts, loss rate, paused and crashed nodes, clock rates).
//!
//! Not done yet: the transport's `Unreachable` reports are not sent
//! (raft-rs works without them, more slowly); clients reach every node
//! whatever the partition (faults cut only peer links).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;

use parking_lot::Mutex;
use raft::prelude::{Message, MessageType};
use rand::seq::SliceRandom;
use rand::Rng;
use tokio::sync::broadcast;

use latchkey_proto::state::v1::CommandResult;
use latchkey_server::config::{Config, RaftTiming, UnsafeSwitches};
use latchkey_server::coordination::Event as AppliedEvent;
use latchkey_server::node::{
    AppliedEvents, Node, NodeHandle, NodeMsg, NodeOptions, Role, Transport,
};
use latchkey_server::storage::{Engine, MemoryDisk, PowerLoss};
use latchkey_server::types::NodeId;

use crate::checker::{digest, AppliedEntry, Checker, Trace};
use crate::clock::{NodeClock, SimRng, VirtualTime};
use crate::nemesis::{Fault, ALL_FAULTS};

pub const NODES: u64 = 5;
pub const TICK_MS: u64 = 50;
pub const ELECTION_TICKS: usize = 10;
pub const MS: u64 = 1000;
pub const SECOND: u64 = 1_000_000;
/// Loss rate of the network when no fault raises it, per mille.
pub const BASE_DROP_PER_MILLE: u32 = 5;
/// Events waiting at once; more means a runaway feedback loop.
const MAX_QUEUED_EVENTS: usize = 1_000_000;

/// How a run is set up, besides its seed.
#[derive(Debug, Clone)]
pub struct Settings {
    pub compact_log_after_entries: u64,
    pub switches: UnsafeSwitches,
    /// The drift bound the servers and clients assume, in ppm.
    pub max_clock_drift_ppm: u64,
    /// Clock rates are drawn within `drift_scale × max_clock_drift_ppm`;
    /// 1 keeps every clock inside the bound.
    pub drift_scale: i64,
    pub session_idle_timeout_ms: u64,
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
    pub incarnation: u64,
}

/// Whose replies an event may have completed: a node answers a request
/// (or drops it, when it goes down) only in its own step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touched {
    Node(u64),
    All,
    /// A client's timer: no node moved.
    Client {
        client: usize,
        generation: u64,
    },
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

/// An event and when it happens; ordered by `(at, seq)` only.
struct Scheduled {
    at_us: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.seq) == (other.at_us, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at_us, self.seq).cmp(&(other.at_us, other.seq))
    }
}

pub struct World {
    pub rng: SimRng,
    pub now_us: u64,
    time: VirtualTime,
    /// Earliest first; sequence numbers are unique, so the order is total.
    queue: BinaryHeap<Reverse<Scheduled>>,
    next_seq: u64,
    pub nodes: BTreeMap<u64, Option<Running>>,
    configs: BTreeMap<u64, Config>,
    /// Each node's data, kept across its crashes and restarts.
    disks: BTreeMap<u64, MemoryDisk>,
    pub clocks: BTreeMap<u64, NodeClock>,
    incarnations: BTreeMap<u64, u64>,
    pub paused_until_us: BTreeMap<u64, u64>,
    /// Directed links `(from, to)` that drop everything.
    pub cut: BTreeSet<(u64, u64)>,
    pub drop_per_mille: u32,
    pub faults_enabled: bool,
    /// The faults the nemesis draws from, with weights.
    pub fault_mix: &'static [(Fault, u32)],
    pub settings: Settings,
    pub checker: Checker,
    pub trace: Trace,
    pub fault_log: Vec<String>,
    pub snapshots_sent: u64,
    pub power_losses: u64,
}

impl World {
    /// Five nodes, started.
    pub fn new(mut rng: SimRng, settings: Settings) -> World {
        let time = VirtualTime::new();
        let peers: BTreeMap<NodeId, String> = (1..=NODES)
            .map(|id| (NodeId(id), format!("127.0.0.1:{}", 20000 + id)))
            .collect();
        let mut configs = BTreeMap::new();
        let mut clocks = BTreeMap::new();
        for id in 1..=NODES {
            configs.insert(id, node_config(id, &peers, &settings));
            let offset = drawn_offset(&mut rng, &settings);
            clocks.insert(id, NodeClock::new(&time, offset));
        }
        let mut world = World {
            rng,
            now_us: 0,
            time,
            queue: BinaryHeap::new(),
            next_seq: 0,
            nodes: BTreeMap::new(),
            configs,
            disks: (1..=NODES).map(|id| (id, MemoryDisk::new())).collect(),
            clocks,
            incarnations: BTreeMap::new(),
            paused_until_us: BTreeMap::new(),
            cut: BTreeSet::new(),
            drop_per_mille: BASE_DROP_PER_MILLE,
            faults_enabled: true,
            fault_mix: ALL_FAULTS,
            checker: Checker::new(),
            settings,
            trace: Trace::default(),
            fault_log: Vec::new(),
            snapshots_sent: 0,
            power_losses: 0,
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
        assert!(
            self.queue.len() < MAX_QUEUED_EVENTS,
            "more than {MAX_QUEUED_EVENTS} events queued: a runaway loop"
        );
        self.next_seq += 1;
        self.queue.push(Reverse(Scheduled {
            at_us: self.now_us + after_us,
            seq: self.next_seq,
            event,
        }));
    }

    pub fn start(&mut self, id: u64, election_ticks: usize) {
        let engine = Engine::open_memory(&self.disks[&id]).expect("simulated node's data opens");
        let outbox = Arc::new(Mutex::new(Vec::new()));
        let applied = Arc::new(Mutex::new(Vec::new()));
        let sink = applied.clone();
        let options = NodeOptions {
            clock: Box::new(self.clocks[&id].clone()),
            boot_id: self.rng.gen(),
            election_tick_range: Some((election_ticks, election_ticks + 1)),
            raft_logger: Some(slog::Logger::root(slog::Discard, slog::o!())),
            metrics: Arc::default(),
            apply_observer: Some(Box::new(move |entry, result: Option<&CommandResult>| {
                sink.lock().push(AppliedEntry {
                    index: entry.index,
                    term: entry.term,
                    digest: digest(&entry.data) ^ digest(&entry.context).rotate_left(1),
                    data: entry.data.to_vec(),
                    result: result.cloned(),
                });
            })),
        };
        let (node, handle) = Node::with_options(
            &self.configs[&id],
            engine.clone(),
            Box::new(Outbox(outbox.clone())),
            options,
        )
        .expect("simulated node starts");
        let incarnation = self.incarnations.get(&id).copied().unwrap_or(0) + 1;
        self.incarnations.insert(id, incarnation);
        let events = handle.subscribe();
        let running = Running {
            node,
            handle,
            engine,
            outbox,
            applied,
            events,
            incarnation,
        };
        self.nodes.insert(id, Some(running));
        let phase_us = self.rng.gen_range(0..TICK_MS * MS);
        let tick = Event::Tick {
            node: id,
            incarnation,
        };
        self.schedule(phase_us, tick);
    }

    /// Stops the node without a clean shutdown: its memory is gone. With
    /// `power_loss`, so is part of what it wrote without sync, and the
    /// last record may be torn.
    pub fn crash(&mut self, id: u64, power_loss: bool) {
        self.paused_until_us.remove(&id);
        let Some(Some(running)) = self.nodes.insert(id, None) else {
            return;
        };
        drop(running);
        self.trace
            .record(&[self.now_us, 90, id, u64::from(power_loss)]);
        if !power_loss {
            return;
        }
        let disk = &self.disks[&id];
        let loss = PowerLoss {
            kept_bytes: self.rng.gen_range(0..=disk.unsynced_bytes()),
            torn_fill: self.rng.gen_bool(0.5).then(|| self.rng.gen()),
        };
        disk.lose_power(loss);
        self.power_losses += 1;
    }

    pub fn leader(&self) -> Option<u64> {
        self.nodes.values().flatten().find_map(|running| {
            let status = running.handle.status();
            (status.role == Role::Leader).then_some(status.id.0)
        })
    }

    pub fn running(&self, id: u64) -> Option<&Running> {
        self.nodes.get(&id).and_then(|node| node.as_ref())
    }

    pub fn is_up(&self, id: u64) -> bool {
        self.running(id).is_some()
    }

    fn paused(&self, id: u64) -> Option<u64> {
        self.paused_until_us
            .get(&id)
            .copied()
            .filter(|until| *until > self.now_us)
    }

    /// Takes the next event and moves time to it; `None` when none is left.
    pub fn next_event(&mut self) -> Option<Event> {
        let Reverse(next) = self.queue.pop()?;
        assert!(next.at_us >= self.now_us, "time never goes back");
        self.now_us = next.at_us;
        self.time.set(next.at_us);
        Some(next.event)
    }

    /// Handles the world's own events; hands client events back, and says
    /// which nodes' reply channels may have moved.
    pub fn dispatch(&mut self, event: Event) -> Touched {
        match event {
            Event::Tick { node, incarnation } => {
                self.on_tick(node, incarnation);
                Touched::Node(node)
            }
            Event::Deliver(message) => {
                let to = message.to;
                self.deliver(*message);
                Touched::Node(to)
            }
            Event::Request { node, message } => {
                self.request(node, message);
                Touched::Node(node)
            }
            Event::Restart { node } => {
                let ticks = self.rng.gen_range(ELECTION_TICKS..2 * ELECTION_TICKS);
                self.trace.record(&[self.now_us, 91, node]);
                self.start(node, ticks);
                Touched::Node(node)
            }
            Event::Resume { node } => {
                self.paused_until_us.remove(&node);
                self.step(node, |node| node.handle_inbox());
                Touched::Node(node)
            }
            Event::Heal => {
                self.heal();
                Touched::All
            }
            Event::Nemesis => {
                self.nemesis();
                Touched::All
            }
            Event::Client { client, generation } => Touched::Client { client, generation },
        }
    }

    fn on_tick(&mut self, id: u64, incarnation: u64) {
        if self.running(id).map(|r| r.incarnation) != Some(incarnation) {
            return; // a tick of a crashed incarnation
        }
        // A node ticks every TICK_MS on its own clock.
        let period = self.clocks[&id].virtual_span_us(TICK_MS * MS);
        let tick = Event::Tick {
            node: id,
            incarnation,
        };
        self.schedule(period, tick);
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
        let Some(running) = self.running(to) else {
            return;
        };
        let words = [
            self.now_us,
            1,
            message.from,
            to,
            message.get_msg_type() as u64,
            message.term,
            message.index,
        ];
        running.handle.report(NodeMsg::Raft(Box::new(message)));
        self.trace.record(&words);
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
        let Some(running) = self.running(id) else {
            return;
        };
        running.handle.report(message);
        self.trace.record(&[self.now_us, 2, id]);
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
        let mut events: BTreeMap<u64, Vec<AppliedEvent>> = BTreeMap::new();
        while let Ok(batch) = running.events.try_recv() {
            events.insert(batch.index.0, batch.events.clone());
        }
        let status = running.handle.status();
        assert_eq!(
            *running.handle.watch_standing().borrow(),
            status.standing(),
            "node {id}: the standing it published disagrees with its status"
        );
        if status.role == Role::Leader {
            self.checker.leader_seen(status.term, id, self.now_us);
        }
        for entry in applied {
            self.trace
                .record(&[self.now_us, 3, id, entry.index, entry.term, entry.digest]);
            let entry_events = events.remove(&entry.index).unwrap_or_default();
            self.checker.applied(id, entry, entry_events, self.now_us);
        }
        self.route(id, messages);
    }

    /// Sends messages through the faulty network.
    fn route(&mut self, from: u64, messages: Vec<Message>) {
        for message in messages {
            let to = message.to;
            let lost =
                self.cut.contains(&(from, to)) || self.rng.gen_range(0..1000) < self.drop_per_mille;
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshots_sent += 1;
                // What the real transport reports once the snapshot is handed
                // to (or refused by) the stream.
                let feedback = NodeMsg::SnapshotSent {
                    to: NodeId(to),
                    ok: !lost,
                };
                let event = Event::Request {
                    node: from,
                    message: feedback,
                };
                self.schedule(MS, event);
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
                let delay_us = self.network_delay_us();
                self.schedule(delay_us, Event::Deliver(Box::new(message.clone())));
            }
        }
    }

    /// Mostly fast, sometimes slow: reorders messages too.
    pub fn network_delay_us(&mut self) -> u64 {
        if self.rng.gen_range(0..100) < 3 {
            self.rng.gen_range(20 * MS..120 * MS)
        } else {
            self.rng.gen_range(200..5 * MS)
        }
    }

    /// Torn records that opening a disk dropped, over all nodes.
    pub fn torn_records_dropped(&self) -> u64 {
        self.disks
            .values()
            .map(MemoryDisk::torn_records_dropped)
            .sum()
    }

    /// Every state record of every running node, with the applied index it
    /// is of, for the final comparison. A node's engine holds its state as
    /// of its last checkpoint, so each is first asked for one of everything
    /// it has applied.
    pub fn state_digests(&mut self) -> BTreeMap<u64, (u64, u64)> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let mut checkpoints = BTreeMap::new();
        for id in ids {
            let Some(running) = self.running(id) else {
                continue;
            };
            let (reply, mut answer) = tokio::sync::oneshot::channel();
            running.handle.report(NodeMsg::Checkpoint { reply });
            // The step may apply more after the checkpoint: the disk holds
            // the checkpoint's position, which is what the digest is of.
            self.step(id, |node| node.handle_inbox());
            match answer.try_recv() {
                Ok(Ok(position)) => {
                    checkpoints.insert(id, position.index);
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) if !self.is_up(id) => {}
                other => self
                    .checker
                    .violations
                    .add(format!("node {id} wrote no checkpoint: {other:?}")),
            }
        }
        self.nodes
            .iter()
            .filter_map(|(id, running)| {
                let running = running.as_ref()?;
                let checkpoint = *checkpoints.get(id)?;
                let records = running.engine.state_records().expect("state reads");
                let mut bytes = Vec::new();
                for (key, value) in records {
                    bytes.extend_from_slice(&key);
                    bytes.extend_from_slice(&value);
                }
                Some((*id, (checkpoint, digest(&bytes))))
            })
            .collect()
    }
}

fn node_config(id: u64, peers: &BTreeMap<NodeId, String>, settings: &Settings) -> Config {
    Config {
        advertise_client: format!("sim-{id}"),
        timing: RaftTiming {
            tick_interval_ms: TICK_MS,
            election_ticks: ELECTION_TICKS,
            heartbeat_ticks: 2,
        },
        compact_log_after_entries: settings.compact_log_after_entries,
        max_clock_drift_ppm: settings.max_clock_drift_ppm,
        session_idle_timeout_ms: settings.session_idle_timeout_ms,
        unsafe_switches: settings.switches.clone(),
        ..Config::with_defaults(
            NodeId(id),
            // Unused: the node's storage is a `MemoryDisk`.
            format!("/nonexistent/latchkey-sim-{id}").into(),
            "127.0.0.1:0".parse().expect("literal address"),
            "127.0.0.1:0".parse().expect("literal address"),
            peers.clone(),
        )
    }
}

/// A clock rate offset inside the run's drift range.
pub fn drawn_offset(rng: &mut SimRng, settings: &Settings) -> i64 {
    let bound = settings.max_clock_drift_ppm as i64 * settings.drift_scale;
    rng.gen_range(-bound..=bound)
}
