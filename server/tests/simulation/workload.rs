//! Simulated clients: each runs one operation at a time against the nodes'
//! inboxes (the same `NodeMsg`s the gRPC API sends), follows leader hints,
//! retries with the same request id (exactly once), and reports what it was
//! told to the checker.
//!
//! Operations: lease grant, keepalive (sometimes skipped for a while, as a
//! paused client would, so leases expire), revoke; non-waiting lock acquire
//! and release; fenced puts with the current token and, on purpose, with
//! tokens of earlier grants; plain puts; linearizable gets (ReadIndex on any
//! node, then its applied index, then its state).

use rand::seq::SliceRandom;
use rand::Rng;
use tokio::sync::oneshot;

use latchkey_proto::state::v1::{
    command, command_result, Acquire, Command, GrantKind, GrantLease, OpenSession, Put, Release,
    RevokeLease,
};
use latchkey_proto::v1::{error_details, fence, Fence, RequestId};
use latchkey_server::coordination::LeaseId;
use latchkey_server::error::RequestError;
use latchkey_server::lease_clock::KeepAlive;
use latchkey_server::node::{Applied, KeepAliveAnswer, NodeMsg};
use latchkey_server::state_machine::Reader;
use latchkey_server::types::LogIndex;

use crate::checker::{AckedPut, CompletedRead};
use crate::world::{Event, World, NODES};

const MS: u64 = 1000;
/// An attempt not answered in this time is abandoned (outcome unknown).
const ATTEMPT_TIMEOUT_US: u64 = 2_000 * MS;
/// Attempts per operation, all with the same request id.
const MAX_ATTEMPTS: u32 = 6;
const LOCKS: [&str; 2] = ["a", "b"];
const KEYS: [&str; 3] = ["k0", "k1", "k2"];

#[derive(Debug, Clone)]
enum Op {
    /// Opens the client's exactly-once session (first, and again after it expired).
    OpenSession,
    Grant {
        ttl_ms: u64,
    },
    KeepAlive {
        lease: u64,
    },
    Revoke {
        lease: u64,
    },
    Acquire {
        lock: &'static str,
        lease: u64,
    },
    Release {
        lock: &'static str,
        token: u64,
    },
    FencedPut {
        lock: &'static str,
        token: u64,
        value: Vec<u8>,
    },
    Put {
        key: &'static str,
        value: Vec<u8>,
    },
    Get {
        key: &'static str,
    },
}

enum Wait {
    Proposal(oneshot::Receiver<Result<Applied, RequestError>>),
    KeepAlive(oneshot::Receiver<Result<KeepAliveAnswer, RequestError>>),
    ReadIndex(oneshot::Receiver<Result<LogIndex, RequestError>>),
    /// ReadIndex answered; waiting for the node to apply up to it.
    Applied(u64),
    /// Backing off before the next attempt; the client's timer resends.
    Backoff,
}

struct Pending {
    op: Op,
    request: Option<RequestId>,
    attempts: u32,
    invoked_at_us: u64,
    sent_at_us: u64,
    node: u64,
    wait: Wait,
}

struct Client {
    /// The open session, once the cluster granted one.
    session: Option<u64>,
    seq: u64,
    /// Bumped whenever a wake-up is scheduled; older wake-ups are ignored.
    generation: u64,
    target: u64,
    lease: Option<(u64, u64)>,
    held: Option<(&'static str, u64)>,
    old_grants: Vec<(&'static str, u64)>,
    next_keepalive_us: u64,
    skip_keepalives_until_us: u64,
    pending: Option<Pending>,
}

enum Outcome {
    Done(Result<command_result::Result, RequestError>),
    KeepAlive(Result<KeepAliveAnswer, RequestError>),
    ReadPoint(Result<LogIndex, RequestError>),
    Read(Option<(u64, Vec<u8>)>),
    Lost,
}

pub struct Workload {
    clients: Vec<Client>,
    pub stopped: bool,
    pub ops_done: u64,
}

impl Workload {
    pub fn new(world: &mut World, clients: usize) -> Workload {
        let clients = (0..clients)
            .map(|_| Client {
                session: None,
                seq: 0,
                generation: 0,
                target: world.rng.gen_range(1..=NODES),
                lease: None,
                held: None,
                old_grants: Vec::new(),
                next_keepalive_us: 0,
                skip_keepalives_until_us: 0,
                pending: None,
            })
            .collect();
        let mut workload = Workload {
            clients,
            stopped: false,
            ops_done: 0,
        };
        for index in 0..workload.clients.len() {
            let delay = world.rng.gen_range(500 * MS..2_000 * MS);
            workload.wake_later(world, index, delay);
        }
        workload
    }

    fn wake_later(&mut self, world: &mut World, index: usize, after_us: u64) {
        let client = &mut self.clients[index];
        client.generation += 1;
        let event = Event::Client {
            client: index,
            generation: client.generation,
        };
        world.schedule(after_us, event);
    }

    /// A client's timer fired: start the next operation, or give up on the
    /// current attempt.
    pub fn wake(&mut self, world: &mut World, index: usize, generation: u64) {
        if self.clients[index].generation != generation {
            return;
        }
        match self.clients[index].pending.take() {
            Some(pending) if matches!(pending.wait, Wait::Backoff) => {
                self.send(world, index, pending)
            }
            Some(pending) => {
                let timeout = RequestError::Timeout("no answer".into());
                self.failed(world, index, pending, timeout)
            }
            None if !self.stopped => {
                let op = self.choose(world, index);
                self.begin(world, index, op);
            }
            None => {}
        }
    }

    /// Checks every pending reply; called after each event.
    pub fn poll(&mut self, world: &mut World) {
        for index in 0..self.clients.len() {
            let Some(outcome) = self.check(world, index) else {
                continue;
            };
            let pending = self.clients[index]
                .pending
                .take()
                .expect("checked a pending op");
            self.finish(world, index, pending, outcome);
        }
    }

    fn check(&mut self, world: &World, index: usize) -> Option<Outcome> {
        let pending = self.clients[index].pending.as_mut()?;
        let received = match &mut pending.wait {
            Wait::Proposal(rx) => rx.try_recv().map(|r| {
                Outcome::Done(
                    r.and_then(|applied| applied.result.result.ok_or(RequestError::ShuttingDown)),
                )
            }),
            Wait::KeepAlive(rx) => rx.try_recv().map(Outcome::KeepAlive),
            Wait::ReadIndex(rx) => rx.try_recv().map(Outcome::ReadPoint),
            Wait::Backoff => return None,
            Wait::Applied(index) => {
                let Some(running) = world.nodes.get(&pending.node).and_then(|n| n.as_ref()) else {
                    return Some(Outcome::Lost);
                };
                if running.handle.status().applied_index < *index {
                    return None;
                }
                let reader = Reader::new(running.engine.clone(), running.handle.coordination());
                let Op::Get { key } = &pending.op else {
                    unreachable!("only gets wait to apply")
                };
                let record = reader.get(key.as_bytes()).expect("simulated state reads");
                return Some(Outcome::Read(record.map(|r| (r.mod_revision, r.value))));
            }
        };
        match received {
            Ok(outcome) => Some(outcome),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Outcome::Lost),
        }
    }

    fn choose(&mut self, world: &mut World, index: usize) -> Op {
        let now = world.now_us;
        let client = &mut self.clients[index];
        if client.session.is_none() {
            return Op::OpenSession;
        }
        let roll = world.rng.gen_range(0..100);
        let Some((lease, ttl_ms)) = client.lease else {
            return if roll < 70 {
                Op::Grant {
                    ttl_ms: world.rng.gen_range(1_500..4_000),
                }
            } else {
                plain_op(world)
            };
        };
        if now >= client.next_keepalive_us && now >= client.skip_keepalives_until_us {
            if roll >= 3 {
                return Op::KeepAlive { lease };
            }
            // A stop-the-world pause: keepalives stop for a while.
            client.skip_keepalives_until_us = now + world.rng.gen_range(ttl_ms..3 * ttl_ms) * MS;
        }
        let lock = *LOCKS.choose(&mut world.rng).expect("locks are listed");
        match (client.held, roll) {
            (_, 0..=2) => Op::Revoke { lease },
            (None, 3..=40) => Op::Acquire { lock, lease },
            (Some((lock, token)), 3..=45) => Op::FencedPut {
                lock,
                token,
                value: value(world, index),
            },
            (Some((lock, token)), 46..=55) => Op::Release { lock, token },
            (_, 56..=65) if !client.old_grants.is_empty() => {
                let (lock, token) = *client.old_grants.choose(&mut world.rng).expect("not empty");
                Op::FencedPut {
                    lock,
                    token,
                    value: value(world, index),
                }
            }
            _ => plain_op(world),
        }
    }

    fn begin(&mut self, world: &mut World, index: usize, op: Op) {
        let client = &mut self.clients[index];
        // One op at a time: every earlier request has ended, answered or
        // given up on, and will not be retried.
        let request = op_command(&op)
            .filter(|_| !matches!(op, Op::OpenSession))
            .and(client.session)
            .map(|session| {
                client.seq += 1;
                RequestId {
                    client_id: session,
                    seq: client.seq,
                    oldest_pending_seq: client.seq,
                }
            });
        let node = match op {
            // Reads may go to any member.
            Op::Get { .. } => world.rng.gen_range(1..=NODES),
            _ => client.target,
        };
        let pending = Pending {
            op,
            request,
            attempts: 0,
            invoked_at_us: world.now_us,
            sent_at_us: world.now_us,
            node,
            wait: Wait::Applied(0),
        };
        self.send(world, index, pending);
    }

    fn send(&mut self, world: &mut World, index: usize, mut pending: Pending) {
        pending.attempts += 1;
        pending.sent_at_us = world.now_us;
        let (message, wait) = match &pending.op {
            Op::KeepAlive { lease } => {
                let (reply, rx) = oneshot::channel();
                (
                    NodeMsg::KeepAlive {
                        lease: LeaseId(*lease),
                        reply,
                    },
                    Wait::KeepAlive(rx),
                )
            }
            Op::Get { .. } => {
                let (reply, rx) = oneshot::channel();
                (NodeMsg::ReadIndex { reply }, Wait::ReadIndex(rx))
            }
            op => {
                let (reply, rx) = oneshot::channel();
                let command = Command {
                    command: op_command(op),
                    request: pending.request,
                };
                (NodeMsg::Propose { command, reply }, Wait::Proposal(rx))
            }
        };
        pending.wait = wait;
        let delay = world.rng.gen_range(100..3 * MS);
        world.schedule(
            delay,
            Event::Request {
                node: pending.node,
                message,
            },
        );
        self.clients[index].pending = Some(pending);
        self.wake_later(world, index, ATTEMPT_TIMEOUT_US);
    }

    fn idle(&mut self, world: &mut World, index: usize) {
        self.ops_done += 1;
        let think = world.rng.gen_range(20 * MS..600 * MS);
        self.wake_later(world, index, think);
    }

    fn finish(&mut self, world: &mut World, index: usize, pending: Pending, outcome: Outcome) {
        world
            .trace
            .record(&[world.now_us, 4, index as u64, outcome_code(&outcome)]);
        match outcome {
            Outcome::Done(Ok(result)) => self.done(world, index, &pending, result),
            Outcome::KeepAlive(Ok(answer)) => self.kept_alive(world, index, &pending, answer),
            Outcome::ReadPoint(Ok(read_index)) => {
                let mut pending = pending;
                pending.wait = Wait::Applied(read_index.0);
                self.clients[index].pending = Some(pending);
                return;
            }
            Outcome::Read(observed) => {
                let Op::Get { key } = &pending.op else {
                    unreachable!("only gets read")
                };
                world.checker.completed_read(CompletedRead {
                    key: key.as_bytes().to_vec(),
                    invoked_at_us: pending.invoked_at_us,
                    observed,
                    node: pending.node,
                });
            }
            Outcome::Done(Err(error))
            | Outcome::KeepAlive(Err(error))
            | Outcome::ReadPoint(Err(error)) => {
                self.failed(world, index, pending, error);
                return;
            }
            Outcome::Lost => {
                self.failed(world, index, pending, RequestError::ShuttingDown);
                return;
            }
        }
        self.idle(world, index);
    }

    /// The attempt failed or timed out: back off, then try again with the
    /// same request id (maybe elsewhere), or give up (outcome unknown).
    fn failed(
        &mut self,
        world: &mut World,
        index: usize,
        mut pending: Pending,
        error: RequestError,
    ) {
        if pending.attempts >= MAX_ATTEMPTS || self.stopped {
            self.idle(world, index);
            return;
        }
        let (node, backoff) = match error {
            RequestError::NotLeader {
                leader_id: Some(leader),
                ..
            } => (leader, world.rng.gen_range(MS..10 * MS)),
            _ => (
                world.rng.gen_range(1..=NODES),
                world.rng.gen_range(50 * MS..300 * MS),
            ),
        };
        self.clients[index].target = node;
        pending.node = node;
        pending.wait = Wait::Backoff;
        self.clients[index].pending = Some(pending);
        self.wake_later(world, index, backoff);
    }

    fn done(
        &mut self,
        world: &mut World,
        index: usize,
        pending: &Pending,
        result: command_result::Result,
    ) {
        let now = world.now_us;
        let client = &mut self.clients[index];
        if let command_result::Result::Error(error) = &result {
            let detail = error.details.as_ref().and_then(|d| d.detail.as_ref());
            if matches!(detail, Some(error_details::Detail::SessionExpired(_))) {
                client.session = None;
                return;
            }
        }
        match (&pending.op, result) {
            (Op::OpenSession, command_result::Result::SessionOpened(opened)) => {
                client.session = Some(opened.session);
                client.seq = 0;
            }
            (Op::Grant { .. }, command_result::Result::LeaseGranted(granted)) => {
                client.lease = Some((granted.lease, granted.ttl_ms));
                client.held = None;
                client.next_keepalive_us = now + granted.ttl_ms * MS / 4;
                world
                    .checker
                    .client_deadline(granted.lease, pending.sent_at_us + granted.ttl_ms * MS);
            }
            (Op::Acquire { lock, .. }, command_result::Result::Granted(grant)) => {
                client.held = Some((lock, grant.token));
            }
            (Op::Release { lock, token }, _)
            | (Op::FencedPut { lock, token, .. }, command_result::Result::Error(_))
                if client.held == Some((lock, *token)) =>
            {
                // Released, or the grant is gone (lease expired): either way
                // the token is an old one now.
                client.held = None;
                client.old_grants.push((lock, *token));
            }
            (Op::Revoke { .. }, _) => {
                if let Some(held) = client.held.take() {
                    client.old_grants.push(held);
                }
                client.lease = None;
            }
            (Op::Put { key, value }, command_result::Result::Put(put)) => {
                world.checker.acked_put(AckedPut {
                    key: key.as_bytes().to_vec(),
                    value: value.clone(),
                    revision: put.revision,
                    acked_at_us: now,
                });
            }
            (Op::Acquire { .. }, command_result::Result::Error(error)) => {
                let detail = error.details.and_then(|d| d.detail);
                if matches!(detail, Some(error_details::Detail::LeaseNotFound(_))) {
                    client.lease = None;
                }
            }
            _ => {}
        }
    }

    fn kept_alive(
        &mut self,
        world: &mut World,
        index: usize,
        pending: &Pending,
        answer: KeepAliveAnswer,
    ) {
        let client = &mut self.clients[index];
        let Op::KeepAlive { lease } = pending.op else {
            unreachable!("keepalive op")
        };
        match answer.answer {
            KeepAlive::Renewed { ttl_ms } => {
                client.next_keepalive_us = world.now_us + ttl_ms * MS / 4;
                world
                    .checker
                    .client_deadline(lease, pending.sent_at_us + ttl_ms * MS);
            }
            KeepAlive::NotFound => {
                if let Some(held) = client.held.take() {
                    client.old_grants.push(held);
                }
                client.lease = None;
            }
            KeepAlive::NotReady | KeepAlive::Unconfirmed => {
                client.next_keepalive_us = world.now_us + 100 * MS;
                client.target = world.rng.gen_range(1..=NODES);
            }
        }
    }
}

fn plain_op(world: &mut World) -> Op {
    let key = *KEYS.choose(&mut world.rng).expect("keys are listed");
    if world.rng.gen_range(0..2) == 0 {
        Op::Get { key }
    } else {
        Op::Put {
            key,
            value: format!("v{}", world.rng.gen::<u32>()).into_bytes(),
        }
    }
}

fn value(world: &mut World, index: usize) -> Vec<u8> {
    format!("c{index}-{}", world.rng.gen::<u32>()).into_bytes()
}

/// The command an op proposes; `None` for keepalives and reads.
fn op_command(op: &Op) -> Option<command::Command> {
    let lock = GrantKind::Lock as i32;
    Some(match op {
        Op::OpenSession => command::Command::OpenSession(OpenSession {}),
        Op::Grant { ttl_ms } => command::Command::GrantLease(GrantLease { ttl_ms: *ttl_ms }),
        Op::Revoke { lease } => command::Command::RevokeLease(RevokeLease { lease: *lease }),
        Op::Acquire { lock: name, lease } => command::Command::Acquire(Acquire {
            kind: lock,
            name: name.to_string(),
            lease: *lease,
            wait: false,
            value: Vec::new(),
        }),
        Op::Release { lock: name, token } => command::Command::Release(Release {
            kind: lock,
            name: name.to_string(),
            token: *token,
        }),
        Op::FencedPut {
            lock: name,
            token,
            value,
        } => command::Command::Put(Put {
            key: format!("f/{name}").into_bytes(),
            value: value.clone(),
            fence: Some(Fence {
                name: name.to_string(),
                token: *token,
                kind: fence::Kind::Lock as i32,
            }),
            expected_mod_revision: None,
        }),
        Op::Put { key, value } => command::Command::Put(Put {
            key: key.as_bytes().to_vec(),
            value: value.clone(),
            fence: None,
            expected_mod_revision: None,
        }),
        Op::KeepAlive { .. } | Op::Get { .. } => return None,
    })
}

fn outcome_code(outcome: &Outcome) -> u64 {
    match outcome {
        Outcome::Done(Ok(_)) => 1,
        Outcome::Done(Err(_)) => 2,
        Outcome::KeepAlive(Ok(_)) => 3,
        Outcome::KeepAlive(Err(_)) => 4,
        Outcome::ReadPoint(Ok(index)) => 5 + (index.0 << 8),
        Outcome::ReadPoint(Err(_)) => 6,
        Outcome::Read(observed) => 7 + (observed.as_ref().map_or(0, |(r, _)| *r) << 8),
        Outcome::Lost => 8,
    }
}
