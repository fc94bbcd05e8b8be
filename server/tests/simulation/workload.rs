//! Simulated clients: each sends the same `NodeMsg`s the gRPC API sends
//! straight into the nodes' inboxes, follows leader hints, retries, and
//! reports what it was told to the checker.
//!
//! A client has two lanes, like a program using the client crate: an
//! **op lane** that runs one operation at a time (`ops.rs` picks them), and
//! a **keepalive lane** that renews its lease every third of the TTL in the
//! background. Retries of a request reuse its request id (exactly once),
//! except waiting acquires and campaigns, which take a new one per attempt
//! as the client crate does. A waiting acquire that is queued watches the
//! applied events of the node that queued it, as the API does, until its
//! grant, its lease's end, that node losing leadership (then it is resent
//! to the new leader), or its deadline (then it proposes `CancelWait`).
//!
//! Clients misbehave on purpose now and then: a pause that stops their
//! keepalives for 1–3 TTLs (leases expire), a pause longer than the
//! session idle timeout between ops or before a retry (sessions expire and
//! the retry must be refused), and a request delivered twice.
//!
//! Outcome handling is in `client.rs`; election observers in `observers.rs`.
//!
//! Not done yet: one op in flight per lane, so request pipelining (several
//! sequence numbers in flight, out-of-order commits) is not exercised.

use std::sync::Arc;

use rand::Rng;
use tokio::sync::{broadcast, oneshot};

use latchkey_proto::state::v1::{command_result, Command};
use latchkey_proto::v1::RequestId;
use latchkey_server::coordination::Event as AppliedEvent;
use latchkey_server::error::RequestError;
use latchkey_server::node::{Applied, AppliedEvents, KeepAliveAnswer, NodeMsg, Role};
use latchkey_server::types::LogIndex;

use crate::client::Client;
use crate::clock::ClientClock;
use crate::observers::Observers;
use crate::ops::{cancel_wait, op_command, Op};
use crate::world::{Event, Touched, World, MS, NODES};

/// An attempt not answered in this time is abandoned (outcome unknown).
const ATTEMPT_TIMEOUT_US: u64 = 2_000 * MS;
/// Attempts per operation.
const MAX_ATTEMPTS: u32 = 6;
/// The lanes of a client.
pub const OP_LANE: usize = 0;
pub const KEEPALIVE_LANE: usize = 1;
const LANES: usize = 2;
/// Outcomes one lane takes in one poll: an answer, then a read served or
/// a grant found at once, then the next op's immediate failure.
const MAX_OUTCOMES_PER_POLL: usize = 4;
/// Chance, in per mille, that a proposal reaches its node twice.
const DUPLICATE_REQUEST_PER_MILLE: u32 = 10;
/// Chance, in per mille, that a failed attempt is retried only after a
/// pause longer than the session idle timeout.
const LONG_PAUSE_BEFORE_RETRY_PER_MILLE: u32 = 40;

pub enum Wait {
    Proposal(oneshot::Receiver<Result<Applied, RequestError>>),
    KeepAlive(oneshot::Receiver<Result<KeepAliveAnswer, RequestError>>),
    ReadIndex(oneshot::Receiver<Result<LogIndex, RequestError>>),
    /// ReadIndex answered; waiting for the node to apply up to it.
    Applied(u64),
    /// Queued by the entry at `queued_index`; waiting for the grant.
    Grant {
        queued_index: u64,
    },
    /// Backing off before the next attempt; the lane's timer resends.
    Backoff,
}

pub struct Pending {
    pub op: Op,
    pub request: Option<RequestId>,
    pub attempts: u32,
    pub invoked_at_us: u64,
    pub sent_at_us: u64,
    /// A waiting op gives up at this time.
    pub deadline_us: Option<u64>,
    pub node: u64,
    pub wait: Wait,
    /// A waiting op's view of its node's applied events: (incarnation, events).
    events: Option<(u64, broadcast::Receiver<Arc<AppliedEvents>>)>,
}

pub enum Outcome {
    Done {
        index: u64,
        result: command_result::Result,
    },
    KeepAlive(KeepAliveAnswer),
    ReadPoint(LogIndex),
    /// The node's state reached the read point; the read is served.
    Served,
    Granted {
        index: u64,
        token: u64,
    },
    LeaseGone,
    Failed(RequestError),
}

pub struct Lane {
    /// Bumped whenever a wake-up is scheduled; older wake-ups are ignored.
    generation: u64,
    pub pending: Option<Pending>,
}

pub struct Workload {
    pub clients: Vec<Client>,
    lanes: Vec<[Lane; LANES]>,
    pub observers: Observers,
    pub stopped: bool,
    pub ops_done: u64,
    pub session_idle_timeout_us: u64,
}

impl Workload {
    pub fn new(world: &mut World, clients: usize) -> Workload {
        let drift = world.settings.max_clock_drift_ppm as i64 * world.settings.drift_scale;
        let clients: Vec<Client> = (0..clients)
            .map(|index| {
                let clock = ClientClock {
                    offset_ppm: world.rng.gen_range(-drift..=drift),
                };
                Client::new(index, clock, world.rng.gen_range(1..=NODES))
            })
            .collect();
        let lanes = clients
            .iter()
            .map(|_| {
                [(); LANES].map(|()| Lane {
                    generation: 0,
                    pending: None,
                })
            })
            .collect();
        let mut workload = Workload {
            clients,
            lanes,
            observers: Observers::default(),
            stopped: false,
            ops_done: 0,
            session_idle_timeout_us: world.settings.session_idle_timeout_ms * MS,
        };
        for index in 0..workload.clients.len() {
            let delay = world.rng.gen_range(500 * MS..2_000 * MS);
            workload.wake_later(world, index, OP_LANE, delay);
            workload.wake_later(world, index, KEEPALIVE_LANE, delay);
        }
        workload
    }

    pub fn wake_later(&mut self, world: &mut World, index: usize, lane: usize, after_us: u64) {
        let state = &mut self.lanes[index][lane];
        state.generation += 1;
        let event = Event::Client {
            client: index * LANES + lane,
            generation: state.generation,
        };
        world.schedule(after_us, event);
    }

    /// A lane's timer fired: resend, give up on the current attempt, or
    /// start the next operation.
    pub fn wake(&mut self, world: &mut World, slot: usize, generation: u64) {
        let (index, lane) = (slot / LANES, slot % LANES);
        if self.lanes[index][lane].generation != generation {
            return;
        }
        match self.lanes[index][lane].pending.take() {
            Some(pending) if matches!(pending.wait, Wait::Backoff) => {
                self.send(world, index, lane, pending)
            }
            Some(pending) if pending.deadline_us.is_some_and(|d| d <= world.now_us) => {
                self.give_up(world, index, pending)
            }
            Some(pending) => {
                let timeout = RequestError::Timeout("no answer".into());
                self.failed(world, index, lane, pending, timeout)
            }
            None if self.stopped => {}
            None if lane == KEEPALIVE_LANE => self.next_keepalive(world, index),
            None => {
                let op = self.clients[index].choose(world);
                self.begin(world, index, OP_LANE, op);
            }
        }
    }

    fn next_keepalive(&mut self, world: &mut World, index: usize) {
        match self.clients[index].keepalive_due(world) {
            Ok(op) => self.begin(world, index, KEEPALIVE_LANE, op),
            Err(after_us) => self.wake_later(world, index, KEEPALIVE_LANE, after_us),
        }
    }

    /// Checks the pending replies `touched` may have completed, and every
    /// observer; called after each event.
    pub fn poll(&mut self, world: &mut World, touched: Touched) {
        for index in 0..self.clients.len() {
            for lane in 0..LANES {
                let node = self.lanes[index][lane].pending.as_ref().map(|p| p.node);
                let moved = match touched {
                    Touched::All => true,
                    Touched::Node(id) => node == Some(id),
                    Touched::Client { .. } => false,
                };
                if !moved {
                    continue;
                }
                // A read point may already be applied, a queued acquire's
                // grant already in the events: look again at once.
                for _ in 0..MAX_OUTCOMES_PER_POLL {
                    let Some(outcome) = self.check(world, index, lane) else {
                        break;
                    };
                    let pending = self.lanes[index][lane]
                        .pending
                        .take()
                        .expect("checked a pending op");
                    self.finish(world, index, lane, pending, outcome);
                }
            }
        }
        self.observers.poll(world, touched);
    }

    fn check(&mut self, world: &World, index: usize, lane: usize) -> Option<Outcome> {
        let pending = self.lanes[index][lane].pending.as_mut()?;
        let received = match &mut pending.wait {
            Wait::Proposal(rx) => rx.try_recv().map(|r| match r {
                Ok(applied) => match applied.result.result {
                    Some(result) => Outcome::Done {
                        index: applied.index.0,
                        result,
                    },
                    None => Outcome::Failed(RequestError::ShuttingDown),
                },
                Err(error) => Outcome::Failed(error),
            }),
            Wait::KeepAlive(rx) => rx
                .try_recv()
                .map(|r| r.map_or_else(Outcome::Failed, Outcome::KeepAlive)),
            Wait::ReadIndex(rx) => rx
                .try_recv()
                .map(|r| r.map_or_else(Outcome::Failed, Outcome::ReadPoint)),
            Wait::Backoff => return None,
            Wait::Applied(read_index) => {
                let Some(running) = world.running(pending.node) else {
                    return Some(Outcome::Failed(RequestError::ShuttingDown));
                };
                let caught_up = running.handle.status().applied_index >= *read_index;
                return caught_up.then_some(Outcome::Served);
            }
            Wait::Grant { .. } => return grant_news(world, pending),
        };
        match received {
            Ok(outcome) => Some(outcome),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                Some(Outcome::Failed(RequestError::ShuttingDown))
            }
        }
    }

    fn begin(&mut self, world: &mut World, index: usize, lane: usize, op: Op) {
        if let Op::Observe { name, duration_us } = op {
            self.observers.start(world, name, duration_us);
            self.idle(world, index, lane);
            return;
        }
        let client = &mut self.clients[index];
        let request = client.request_id(&op);
        let node = if op.is_read() {
            world.rng.gen_range(1..=NODES)
        } else {
            client.target
        };
        let deadline_us = op
            .waits()
            .then(|| world.now_us + world.rng.gen_range(1_000 * MS..5_000 * MS));
        let pending = Pending {
            op,
            request,
            attempts: 0,
            invoked_at_us: world.now_us,
            sent_at_us: world.now_us,
            deadline_us,
            node,
            wait: Wait::Backoff,
            events: None,
        };
        self.send(world, index, lane, pending);
    }

    fn send(&mut self, world: &mut World, index: usize, lane: usize, mut pending: Pending) {
        pending.attempts += 1;
        pending.sent_at_us = world.now_us;
        let (message, wait) = match &pending.op {
            Op::KeepAlive { lease } => {
                let (reply, rx) = oneshot::channel();
                let lease = latchkey_server::coordination::LeaseId(*lease);
                (NodeMsg::KeepAlive { lease, reply }, Wait::KeepAlive(rx))
            }
            Op::Get { .. } | Op::Leader { .. } => {
                let (reply, rx) = oneshot::channel();
                (NodeMsg::ReadIndex { reply }, Wait::ReadIndex(rx))
            }
            op => {
                let command = Command {
                    command: op_command(op),
                    request: pending.request,
                };
                let (reply, rx) = oneshot::channel();
                self.maybe_duplicate(world, pending.node, &command);
                (NodeMsg::Propose { command, reply }, Wait::Proposal(rx))
            }
        };
        pending.wait = wait;
        if pending.op.waits() {
            // Subscribed before proposing, as the API does, so that the
            // grant cannot be missed.
            pending.events = world
                .running(pending.node)
                .map(|running| (running.incarnation, running.handle.subscribe()));
        }
        let delay = world.rng.gen_range(100..3 * MS);
        let node = pending.node;
        world.schedule(delay, Event::Request { node, message });
        let timeout = match pending.deadline_us {
            Some(deadline) => deadline.saturating_sub(world.now_us).max(1),
            None => ATTEMPT_TIMEOUT_US,
        };
        self.lanes[index][lane].pending = Some(pending);
        self.wake_later(world, index, lane, timeout);
    }

    /// Now and then the network delivers a client's proposal twice; the
    /// copy's answer goes nowhere.
    fn maybe_duplicate(&mut self, world: &mut World, node: u64, command: &Command) {
        if world.rng.gen_range(0..1000) >= DUPLICATE_REQUEST_PER_MILLE {
            return;
        }
        let (reply, _ignored) = oneshot::channel();
        let message = NodeMsg::Propose {
            command: command.clone(),
            reply,
        };
        let delay = world.rng.gen_range(100..50 * MS);
        world.schedule(delay, Event::Request { node, message });
    }

    fn finish(
        &mut self,
        world: &mut World,
        index: usize,
        lane: usize,
        mut pending: Pending,
        outcome: Outcome,
    ) {
        world
            .trace
            .record(&[world.now_us, 4, index as u64, outcome_code(&outcome)]);
        match outcome {
            Outcome::Done { index: at, result } => {
                if pending.op.waits() && matches!(result, command_result::Result::Queued(_)) {
                    pending.wait = Wait::Grant { queued_index: at };
                    self.lanes[index][lane].pending = Some(pending);
                    return;
                }
                world.checker.acked_write(at, world.now_us);
                self.clients[index].done(world, &pending, result);
            }
            Outcome::Granted { index: at, token } => {
                world.checker.acked_write(at, world.now_us);
                self.clients[index].granted(&pending.op, token);
            }
            Outcome::LeaseGone => self.clients[index].lease_gone(),
            Outcome::KeepAlive(answer) => {
                self.clients[index].kept_alive(world, &pending, answer);
            }
            Outcome::ReadPoint(read_index) => {
                pending.wait = Wait::Applied(read_index.0);
                self.lanes[index][lane].pending = Some(pending);
                return;
            }
            Outcome::Served => self.clients[index].served(world, &pending),
            Outcome::Failed(error) => {
                self.failed(world, index, lane, pending, error);
                return;
            }
        }
        self.idle(world, index, lane);
    }

    /// The attempt failed or timed out: back off, then try again (maybe
    /// elsewhere), or give up (outcome unknown).
    fn failed(
        &mut self,
        world: &mut World,
        index: usize,
        lane: usize,
        mut pending: Pending,
        error: RequestError,
    ) {
        if pending.attempts >= MAX_ATTEMPTS || self.stopped {
            self.idle(world, index, lane);
            return;
        }
        let (node, mut backoff) = match error {
            RequestError::NotLeader {
                leader_id: Some(leader),
                ..
            } => (leader, world.rng.gen_range(MS..10 * MS)),
            _ => (
                world.rng.gen_range(1..=NODES),
                world.rng.gen_range(50 * MS..300 * MS),
            ),
        };
        if pending.request.is_some()
            && world.rng.gen_range(0..1000) < LONG_PAUSE_BEFORE_RETRY_PER_MILLE
        {
            // A long pause: the session may expire before the retry.
            backoff = self.long_pause(world);
        }
        if pending
            .deadline_us
            .is_some_and(|d| d <= world.now_us + backoff)
        {
            self.give_up(world, index, pending);
            return;
        }
        if pending.op.waits() {
            // Each attempt of a waiting acquire is a new request.
            pending.request = self.clients[index].request_id(&pending.op);
        }
        self.clients[index].target = node;
        pending.node = node;
        pending.wait = Wait::Backoff;
        self.lanes[index][lane].pending = Some(pending);
        self.wake_later(world, index, lane, backoff);
    }

    /// A waiting op's deadline passed: if it was queued, leave the queue.
    fn give_up(&mut self, world: &mut World, index: usize, pending: Pending) {
        if let (
            Wait::Grant { queued_index },
            Op::Acquire {
                kind, name, lease, ..
            },
        ) = (&pending.wait, &pending.op)
        {
            let command = Command {
                command: Some(cancel_wait(*kind, name, *lease, *queued_index)),
                request: None,
            };
            let (reply, _ignored) = oneshot::channel();
            let message = NodeMsg::Propose { command, reply };
            world.schedule(
                MS,
                Event::Request {
                    node: pending.node,
                    message,
                },
            );
        }
        self.idle(world, index, OP_LANE);
    }

    /// Longer than the session idle timeout.
    pub fn long_pause(&self, world: &mut World) -> u64 {
        let idle = self.session_idle_timeout_us;
        world.rng.gen_range(idle + idle / 5..2 * idle)
    }

    fn idle(&mut self, world: &mut World, index: usize, lane: usize) {
        if lane == KEEPALIVE_LANE {
            self.next_keepalive(world, index);
            return;
        }
        self.ops_done += 1;
        let think = if self.clients[index].session.is_some() && world.rng.gen_range(0..200) == 0 {
            self.long_pause(world)
        } else {
            world.rng.gen_range(20 * MS..600 * MS)
        };
        self.wake_later(world, index, OP_LANE, think);
    }
}

/// News for a queued acquire from its node: its grant, its lease's end,
/// or the node going away or losing leadership (then it is resent).
fn grant_news(world: &World, pending: &mut Pending) -> Option<Outcome> {
    let Op::Acquire {
        kind, name, lease, ..
    } = &pending.op
    else {
        unreachable!("only acquires wait for grants")
    };
    let lost = || Some(Outcome::Failed(RequestError::ShuttingDown));
    let Some((incarnation, events)) = pending.events.as_mut() else {
        return lost();
    };
    loop {
        match events.try_recv() {
            Ok(batch) => {
                for event in &batch.events {
                    match event {
                        AppliedEvent::Granted {
                            kind: k,
                            name: n,
                            lease: l,
                            token,
                            ..
                        } if k == kind && n == name && l.0 == *lease => {
                            let index = batch.index.0;
                            return Some(Outcome::Granted {
                                index,
                                token: token.0,
                            });
                        }
                        AppliedEvent::LeaseRemoved { lease: l, .. } if l.0 == *lease => {
                            return Some(Outcome::LeaseGone)
                        }
                        _ => {}
                    }
                }
            }
            Err(broadcast::error::TryRecvError::Empty) => break,
            Err(_) => return lost(),
        }
    }
    match world.running(pending.node) {
        Some(running) if running.incarnation == *incarnation => (running.handle.status().role
            != Role::Leader)
            .then_some(Outcome::Failed(RequestError::LeadershipLost)),
        _ => lost(),
    }
}

fn outcome_code(outcome: &Outcome) -> u64 {
    match outcome {
        Outcome::Done { index, .. } => 1 + (index << 8),
        Outcome::KeepAlive(_) => 3,
        Outcome::ReadPoint(index) => 5 + (index.0 << 8),
        Outcome::Served => 7,
        Outcome::Granted { token, .. } => 8 + (token << 8),
        Outcome::LeaseGone => 9,
        Outcome::Failed(_) => 10,
    }
}
