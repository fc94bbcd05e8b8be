//! One simulated client's beliefs — its session, lease, grants and stale
//! grants — and how each answer changes them and reaches the checker.
//!
//! The lease deadline a client reports to the checker is the client
//! crate's: the send time, on the client's own clock, of the grant request
//! (its first attempt) or of the acknowledged keepalive, plus
//! `TTL × (1 − ρ) − margin`, turned back into virtual time.
//!
//! Not done yet: a client keeps using a lock after its lease's local
//! deadline passed (the client crate would report it lost); the fence is
//! what the checker relies on then.

use rand::Rng;

use latchkey_client::client::DEFAULT_LEASE_SAFETY_MARGIN;
use latchkey_proto::state::v1::command_result;
use latchkey_proto::v1::{error_details, RequestId};
use latchkey_server::lease_clock::KeepAlive;
use latchkey_server::node::KeepAliveAnswer;
use latchkey_server::state_machine::Reader;

use crate::checker::{AckedPut, CompletedRead, Observation};
use crate::clock::{ClientClock, PPM};
use crate::ops::{self, known_name, remember_old, ClientView, Holding, Op};
use crate::workload::Pending;
use crate::world::{World, MS, NODES};

/// How often a client checks again for something to renew when it has
/// no lease.
const NO_LEASE_POLL_US: u64 = 200 * MS;
/// After a keepalive was refused (not ready, unconfirmed), the next one
/// goes elsewhere after this long.
const KEEPALIVE_RETRY_US: u64 = 100 * MS;
/// Chance, in percent, that a due keepalive starts a pause of 1–3 TTLs.
const KEEPALIVE_PAUSE_PERCENT: u32 = 3;

pub struct Client {
    index: usize,
    clock: ClientClock,
    /// The open session, once the cluster granted one.
    pub session: Option<u64>,
    seq: u64,
    pub target: u64,
    /// (lease, TTL in ms).
    lease: Option<(u64, u64)>,
    holdings: Vec<Holding>,
    old_grants: Vec<Holding>,
    next_keepalive_us: u64,
    skip_keepalives_until_us: u64,
}

impl Client {
    pub fn new(index: usize, clock: ClientClock, target: u64) -> Client {
        Client {
            index,
            clock,
            session: None,
            seq: 0,
            target,
            lease: None,
            holdings: Vec::new(),
            old_grants: Vec::new(),
            next_keepalive_us: 0,
            skip_keepalives_until_us: 0,
        }
    }

    /// The next op of the op lane.
    pub fn choose(&mut self, world: &mut World) -> Op {
        if self.session.is_none() {
            return Op::OpenSession;
        }
        let view = ClientView {
            index: self.index,
            lease: self.lease.map(|(lease, _)| lease),
            holdings: &self.holdings,
            old_grants: &self.old_grants,
        };
        ops::choose(world, &view)
    }

    /// The keepalive to send now, or how long to wait before asking again.
    pub fn keepalive_due(&mut self, world: &mut World) -> Result<Op, u64> {
        let now = world.now_us;
        let Some((lease, ttl_ms)) = self.lease else {
            return Err(NO_LEASE_POLL_US);
        };
        let due = self.next_keepalive_us.max(self.skip_keepalives_until_us);
        if now < due {
            return Err(due - now);
        }
        if world.rng.gen_range(0..100) < KEEPALIVE_PAUSE_PERCENT {
            // A stop-the-world pause: keepalives stop for a while.
            let pause = world.rng.gen_range(ttl_ms..3 * ttl_ms) * MS;
            self.skip_keepalives_until_us = now + pause;
            return Err(pause);
        }
        Ok(Op::KeepAlive { lease })
    }

    /// A new request id for `op`, if it is a write and a session is open.
    pub fn request_id(&mut self, op: &Op) -> Option<RequestId> {
        let session = self.session?;
        if ops::op_command(op).is_none() || matches!(op, Op::OpenSession) {
            return None;
        }
        // One op at a time per lane, and keepalives carry no id: every
        // earlier request has been answered or given up on.
        self.seq += 1;
        Some(RequestId {
            client_id: session,
            seq: self.seq,
            oldest_pending_seq: self.seq,
        })
    }

    /// The deadline this client trusts its lease until, in virtual time.
    fn deadline_us(&self, world: &World, sent_at_us: u64, ttl_ms: u64) -> u64 {
        let drift = world.settings.max_clock_drift_ppm as i64;
        let ttl_us = i128::from(ttl_ms * MS);
        let trusted = ttl_us * i128::from(PPM - drift) / i128::from(PPM)
            - DEFAULT_LEASE_SAFETY_MARGIN.as_micros() as i128;
        let trusted = u64::try_from(trusted.max(0)).expect("non-negative");
        self.clock
            .virtual_at(self.clock.local_at(sent_at_us) + trusted)
    }

    fn drop_holding(&mut self, holding: Holding) {
        if let Some(at) = self.holdings.iter().position(|h| *h == holding) {
            self.holdings.remove(at);
            remember_old(&mut self.old_grants, holding);
        }
    }

    pub fn lease_gone(&mut self) {
        self.lease = None;
        for holding in std::mem::take(&mut self.holdings) {
            remember_old(&mut self.old_grants, holding);
        }
    }

    /// A waiting acquire or campaign was granted `token`.
    pub fn granted(&mut self, op: &Op, token: u64) {
        if let Op::Acquire { kind, name, .. } = op {
            let holding = Holding {
                kind: *kind,
                name,
                token,
            };
            if !self.holdings.contains(&holding) {
                self.holdings.push(holding);
            }
        }
    }

    /// A proposal of this client was applied with `result`.
    pub fn done(&mut self, world: &mut World, pending: &Pending, result: command_result::Result) {
        let now = world.now_us;
        if let command_result::Result::Error(error) = &result {
            let detail = error.details.as_ref().and_then(|d| d.detail.as_ref());
            match detail {
                Some(error_details::Detail::SessionExpired(_)) => {
                    self.session = None;
                    return;
                }
                Some(error_details::Detail::LeaseNotFound(_)) => self.lease_gone(),
                _ => {}
            }
        }
        match (&pending.op, result) {
            (Op::OpenSession, command_result::Result::SessionOpened(opened)) => {
                self.session = Some(opened.session);
                self.seq = 0;
            }
            (Op::Grant { .. }, command_result::Result::LeaseGranted(granted)) => {
                self.lease_gone();
                self.lease = Some((granted.lease, granted.ttl_ms));
                self.next_keepalive_us = now + granted.ttl_ms * MS / 3;
                let deadline = self.deadline_us(world, pending.invoked_at_us, granted.ttl_ms);
                world.checker.client_deadline(granted.lease, deadline);
            }
            (Op::Acquire { .. }, command_result::Result::Granted(grant)) => {
                self.granted(&pending.op, grant.token)
            }
            (Op::Release { holding }, _) => self.drop_holding(*holding),
            (Op::FencedPut { holding, .. }, command_result::Result::Error(_))
            | (Op::Proclaim { holding, .. }, command_result::Result::Error(_)) => {
                // The grant is gone (released elsewhere, or its lease ended).
                self.drop_holding(*holding)
            }
            (Op::Revoke { .. }, _) => self.lease_gone(),
            (Op::Put { key, value }, command_result::Result::Put(put)) => {
                world.checker.acked_put(AckedPut {
                    key: key.as_bytes().to_vec(),
                    value: value.clone(),
                    revision: put.revision,
                    acked_at_us: now,
                });
            }
            _ => {}
        }
    }

    pub fn kept_alive(&mut self, world: &mut World, pending: &Pending, answer: KeepAliveAnswer) {
        let Op::KeepAlive { lease } = pending.op else {
            unreachable!("keepalive op")
        };
        if self.lease.map(|(l, _)| l) != Some(lease) {
            return; // an answer about a lease this client has moved on from
        }
        match answer.answer {
            KeepAlive::Renewed { ttl_ms } => {
                // Answers are polled right after the step that made them,
                // so the node is up and its term is the one it answered in
                // (or later, if it stepped down in the same step).
                if let Some(running) = world.running(pending.node) {
                    let term = running.handle.status().term;
                    world
                        .checker
                        .renewed(pending.node, term, lease, pending.sent_at_us);
                }
                self.next_keepalive_us = world.now_us + ttl_ms * MS / 3;
                let deadline = self.deadline_us(world, pending.sent_at_us, ttl_ms);
                world.checker.client_deadline(lease, deadline);
                self.sync_holdings(&answer);
            }
            KeepAlive::NotFound => self.lease_gone(),
            KeepAlive::NotReady | KeepAlive::Unconfirmed => {
                self.next_keepalive_us = world.now_us + KEEPALIVE_RETRY_US;
                self.target = world.rng.gen_range(1..=NODES);
            }
        }
    }

    /// A renewal lists every grant the lease holds: adopt grants won
    /// without this client knowing (a grant that beat a cancelled wait),
    /// and forget those that ended elsewhere.
    fn sync_holdings(&mut self, answer: &KeepAliveAnswer) {
        let reported: Vec<Holding> = answer
            .grants
            .iter()
            .filter_map(|grant| {
                Some(Holding {
                    kind: grant.kind,
                    name: known_name(grant.kind, &grant.name)?,
                    token: grant.token.0,
                })
            })
            .collect();
        for holding in self.holdings.clone() {
            if !reported.contains(&holding) {
                self.drop_holding(holding);
            }
        }
        self.holdings = reported;
    }

    /// A read reached its read point on its node: serve it and check it.
    pub fn served(&mut self, world: &mut World, pending: &Pending) {
        let Some(running) = world.running(pending.node) else {
            return;
        };
        let applied = running.handle.status().applied_index;
        let node = pending.node;
        let invoked = pending.invoked_at_us;
        match &pending.op {
            Op::Get { key } => {
                let reader = Reader::new(
                    running.engine.clone(),
                    running.handle.coordination(),
                    running.handle.auth(),
                );
                let record = reader.get(key.as_bytes()).expect("simulated state reads");
                world.checker.read_served("read", node, invoked, applied);
                world.checker.completed_read(CompletedRead {
                    key: key.as_bytes().to_vec(),
                    invoked_at_us: invoked,
                    observed: record.map(|r| (r.mod_revision, r.value)),
                    node,
                });
            }
            Op::Leader { name } => {
                let coordination = running.handle.coordination();
                let leader = coordination
                    .read()
                    .leader(name)
                    .map(|grant| (grant.lease.0, grant.token.0));
                world
                    .checker
                    .read_served("leader query", node, invoked, applied);
                world.checker.observed(Observation {
                    observer: None,
                    name: name.to_string(),
                    node,
                    leader,
                });
            }
            _ => unreachable!("only reads are served"),
        }
    }
}
