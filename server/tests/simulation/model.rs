//! The independent model of the replicated state, replayed over the
//! canonical history, and the per-entry checks it makes.
//!
//! It re-derives, without the server's code: live leases, the holder and
//! FIFO queue of every lock and election, the token of every grant, the
//! fence token of every key, open sessions and what each remembers. Each
//! applied entry is checked against it before it is folded in:
//!
//! - **tokens** (Invariant 1): every grant's token is above every earlier one;
//! - **mutual exclusion** (Invariant 2): no grant while the model has a
//!   holder, only to live leases; releases name the holder's token; a lease
//!   is not removed while it holds anything;
//! - **FIFO**: a lock handed over goes to the lease that queued first
//!   (resent waits keep their place; cancelled and removed leases leave);
//!   a `Queued` answer names the model's position;
//! - **fenced writes and proclaims** (Invariant 3): applied only with the
//!   current token, not below the key's; refused ones really were stale;
//! - **lease safety** (Invariant 4): an `ExpireLeases` never removes a lease
//!   before the deadline its client computed;
//! - **exactly once** (Invariant 5): a duplicate gets the first result and
//!   changes nothing; a request of a session that ended (expired or closed)
//!   or was never opened is refused as `SessionExpired` and changes nothing;
//!   one below what its session remembers is refused.
//!
//! Not done yet: the session window (`SESSION_WINDOW` results per session)
//! is not modelled; simulated clients never have that many in flight.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use latchkey_proto::state::v1::{command, command_result, Command, CommandResult, Put};
use latchkey_proto::v1::{error_details, fence};
use latchkey_server::coordination::{Event, Kind};

use crate::checker::{digest, Stats, Violations};

/// A lock or election name in its namespace.
type Key = (Kind, String);

/// What one open session remembers (mirrors `coordination::sessions`).
#[derive(Debug, Default)]
struct SessionModel {
    /// Sequence number → digest of the first result.
    results: BTreeMap<u64, u64>,
    forgotten_below: u64,
}

/// Whether a request must be applied, answered again, or refused.
enum RequestCheck {
    New,
    Duplicate(u64),
    Refused(&'static str),
}

#[derive(Debug, Default)]
pub struct Model {
    leases: BTreeSet<u64>,
    /// (kind, name) → (holder lease, token).
    holders: BTreeMap<Key, (u64, u64)>,
    /// (kind, name) → waiting leases in order, each with its latest attempt.
    queues: BTreeMap<Key, VecDeque<(u64, u64)>>,
    last_token: u64,
    /// Token → (kind, name, lease) of every grant ever made.
    pub grants: BTreeMap<u64, (Kind, String, u64)>,
    key_tokens: BTreeMap<Vec<u8>, u64>,
    sessions: BTreeMap<u64, SessionModel>,
    /// Lease id → the latest deadline (virtual µs) a client computed for it.
    client_deadlines: BTreeMap<u64, u64>,
}

/// One canonical entry, as the model checks it.
pub struct EntryView<'a> {
    pub index: u64,
    pub command: &'a Command,
    pub result: Option<&'a CommandResult>,
    pub events: &'a [Event],
    pub now_us: u64,
}

impl Model {
    /// A client's deadline for `lease` moved to `deadline_us` (virtual).
    pub fn client_deadline(&mut self, lease: u64, deadline_us: u64) {
        let entry = self.client_deadlines.entry(lease).or_insert(0);
        *entry = (*entry).max(deadline_us);
    }

    /// Checks one entry of the canonical history and folds it in.
    pub fn check(&mut self, entry: &EntryView<'_>, out: &mut Violations, stats: &mut Stats) {
        let index = entry.index;
        let result_body = entry.result.and_then(|r| r.result.as_ref());
        if let Some(request) = entry.command.request.as_ref() {
            if request.client_id != 0 && request.seq != 0 {
                let first = entry
                    .result
                    .map_or(0, |r| digest(&prost::Message::encode_to_vec(r)));
                let key = (request.client_id, request.seq);
                match self.check_request(key.0, key.1) {
                    RequestCheck::New => {
                        self.record_request(key, request.oldest_pending_seq, first)
                    }
                    RequestCheck::Duplicate(recorded) => {
                        if recorded != first {
                            out.add(format!("index {index}: retry of request {key:?} got another result than the first"));
                        }
                        if !entry.events.is_empty() {
                            out.add(format!(
                                "index {index}: retry of request {key:?} changed state"
                            ));
                        }
                        return;
                    }
                    RequestCheck::Refused(why) => {
                        stats.refused_requests += 1;
                        self.check_refused(index, key, why, result_body, entry.events, out);
                        return;
                    }
                }
            }
        }
        self.check_command(entry, result_body, out, stats);
        // Removed leases leave every queue before their grants are handed
        // over, in the same entry.
        for event in entry.events {
            if let Event::LeaseRemoved { lease, .. } = event {
                self.leave_queues(lease.0);
            }
        }
        for event in entry.events {
            self.event(index, event, out, stats);
        }
    }

    fn check_request(&self, session: u64, seq: u64) -> RequestCheck {
        let Some(open) = self.sessions.get(&session) else {
            return RequestCheck::Refused("its session is not open");
        };
        if let Some(recorded) = open.results.get(&seq) {
            return RequestCheck::Duplicate(*recorded);
        }
        if seq < open.forgotten_below {
            return RequestCheck::Refused("it is below what its session remembers");
        }
        RequestCheck::New
    }

    fn record_request(&mut self, (session, seq): (u64, u64), oldest_pending: u64, result: u64) {
        // check_request found the session open.
        let open = self.sessions.get_mut(&session).expect("open session");
        open.results.insert(seq, result);
        open.forgotten_below = open.forgotten_below.max(oldest_pending.min(seq));
        let keep = open.results.split_off(&open.forgotten_below);
        open.results = keep;
    }

    fn check_refused(
        &self,
        index: u64,
        key: (u64, u64),
        why: &str,
        result: Option<&command_result::Result>,
        events: &[Event],
        out: &mut Violations,
    ) {
        let detail = match result {
            Some(command_result::Result::Error(error)) => {
                error.details.as_ref().and_then(|d| d.detail.as_ref())
            }
            other => {
                out.add(format!(
                    "index {index}: request {key:?} applied although {why}: {other:?}"
                ));
                return;
            }
        };
        let expired = matches!(detail, Some(error_details::Detail::SessionExpired(_)));
        if expired == self.sessions.contains_key(&key.0) {
            out.add(format!(
                "index {index}: request {key:?} refused with {detail:?}, but {why}"
            ));
        }
        if !events.is_empty() {
            out.add(format!(
                "index {index}: refused request {key:?} changed state"
            ));
        }
    }

    fn check_command(
        &mut self,
        entry: &EntryView<'_>,
        result: Option<&command_result::Result>,
        out: &mut Violations,
        stats: &mut Stats,
    ) {
        let index = entry.index;
        match (&entry.command.command, result) {
            (
                Some(command::Command::GrantLease(_)),
                Some(command_result::Result::LeaseGranted(granted)),
            ) => {
                self.leases.insert(granted.lease);
            }
            (Some(command::Command::Put(put)), _) => self.check_put(index, put, result, out, stats),
            (Some(command::Command::ExpireLeases(expire)), _) => {
                for lease in &expire.leases {
                    self.check_expiry(index, *lease, entry.now_us, out, stats);
                }
            }
            (Some(command::Command::Acquire(acquire)), Some(command_result::Result::Queued(q))) => {
                let key = (kind_of(acquire.kind), acquire.name.clone());
                self.queued(index, key, acquire.lease, q.position, out);
            }
            (Some(command::Command::CancelWait(cancel)), _) => {
                let key = (kind_of(cancel.kind), cancel.name.clone());
                if let Some(queue) = self.queues.get_mut(&key) {
                    queue.retain(|(lease, attempt)| {
                        *lease != cancel.lease
                            || (cancel.attempt != 0 && cancel.attempt != *attempt)
                    });
                }
            }
            (Some(command::Command::Proclaim(proclaim)), Some(result)) => {
                let key = (Kind::Election, proclaim.name.clone());
                let current = self.holders.get(&key).map(|(_, token)| *token);
                let applied = !matches!(result, command_result::Result::Error(_));
                if applied != (current == Some(proclaim.token)) {
                    out.add(format!(
                        "index {index}: proclaim with token {} applied={applied}, but the leadership is {current:?}",
                        proclaim.token
                    ));
                }
            }
            _ => {}
        }
    }

    fn queued(&mut self, index: u64, key: Key, lease: u64, position: u32, out: &mut Violations) {
        let queue = self.queues.entry(key.clone()).or_default();
        let expected = match queue.iter().position(|(l, _)| *l == lease) {
            Some(at) => {
                queue[at].1 = index;
                at
            }
            None => {
                queue.push_back((lease, index));
                queue.len() - 1
            }
        };
        if expected != position as usize {
            out.add(format!(
                "index {index}: lease {lease} queued for {key:?} at position {position}, the model says {expected}"
            ));
        }
    }

    fn leave_queues(&mut self, lease: u64) {
        for queue in self.queues.values_mut() {
            queue.retain(|(l, _)| *l != lease);
        }
    }

    fn check_put(
        &mut self,
        index: u64,
        put: &Put,
        result: Option<&command_result::Result>,
        out: &mut Violations,
        stats: &mut Stats,
    ) {
        let stored = self.key_tokens.get(&put.key).copied().unwrap_or(0);
        let applied = matches!(result, Some(command_result::Result::Put(_)));
        let Some(fence) = &put.fence else { return };
        let kind = match fence.kind() {
            fence::Kind::Lock => Kind::Lock,
            fence::Kind::Election => Kind::Election,
        };
        let current = self
            .holders
            .get(&(kind, fence.name.clone()))
            .map(|(_, token)| *token);
        let valid = current == Some(fence.token) && fence.token >= stored;
        if applied {
            stats.fenced_applied += 1;
            if !valid {
                out.add(format!(
                    "index {index}: fenced write with token {} on {kind:?} {:?} applied, but the grant is {current:?} and the key's token {stored}",
                    fence.token, fence.name
                ));
            }
            self.key_tokens.insert(put.key.clone(), fence.token);
            return;
        }
        stats.fenced_refused += 1;
        let stale = matches!(
            result,
            Some(command_result::Result::Error(e))
                if matches!(e.details.as_ref().and_then(|d| d.detail.as_ref()), Some(error_details::Detail::StaleToken(_)))
        );
        if valid || !stale {
            out.add(format!(
                "index {index}: fenced write with valid={valid} token {} got {result:?}",
                fence.token
            ));
        }
    }

    /// Invariant 4: no lease ends before the deadline its client computed.
    fn check_expiry(
        &mut self,
        index: u64,
        lease: u64,
        now_us: u64,
        out: &mut Violations,
        stats: &mut Stats,
    ) {
        if !self.leases.contains(&lease) {
            return;
        }
        stats.expired_leases += 1;
        if let Some(&deadline) = self.client_deadlines.get(&lease) {
            if now_us < deadline {
                out.add(format!(
                    "index {index}: lease {lease} expired at {} µs, before its client's deadline {} µs",
                    now_us, deadline
                ));
            }
        }
    }

    fn event(&mut self, index: u64, event: &Event, out: &mut Violations, stats: &mut Stats) {
        match event {
            Event::Granted {
                kind,
                name,
                lease,
                token,
                ..
            } => self.granted(index, (*kind, name.clone()), lease.0, token.0, out, stats),
            Event::Released {
                kind, name, token, ..
            } => match self.holders.remove(&(*kind, name.clone())) {
                Some((_, held)) if held == token.0 => {}
                other => out.add(format!(
                    "index {index}: {kind:?} {name:?} released with token {token}, but the model holder is {other:?}"
                )),
            },
            Event::LeaseRemoved { lease, .. } => {
                self.leases.remove(&lease.0);
                if let Some((key, _)) = self.holders.iter().find(|(_, (l, _))| *l == lease.0) {
                    out.add(format!(
                        "index {index}: lease {lease} removed while it still holds {key:?}"
                    ));
                }
            }
            Event::SessionOpened { session } => {
                let fresh = SessionModel {
                    results: BTreeMap::new(),
                    forgotten_below: 1,
                };
                if self.sessions.insert(session.0, fresh).is_some() {
                    out.add(format!("index {index}: session {session} opened twice"));
                }
            }
            Event::SessionEnded { session, expired } => {
                stats.sessions_ended += 1;
                if self.sessions.remove(&session.0).is_none() {
                    out.add(format!(
                        "index {index}: session {session} ended (expired={expired}) but was not open"
                    ));
                }
            }
            Event::LeaderChanged { .. } => {}
        }
    }

    fn granted(
        &mut self,
        index: u64,
        key: Key,
        lease: u64,
        token: u64,
        out: &mut Violations,
        stats: &mut Stats,
    ) {
        stats.grants += 1;
        if token <= self.last_token {
            out.add(format!(
                "index {index}: token {token} for {key:?} is not above the last token {}",
                self.last_token
            ));
        }
        self.last_token = self.last_token.max(token);
        if let Some((holder, held)) = self.holders.get(&key) {
            out.add(format!(
                "index {index}: {key:?} granted to lease {lease} while lease {holder} holds it with token {held}"
            ));
        }
        if !self.leases.contains(&lease) {
            out.add(format!(
                "index {index}: {key:?} granted to lease {lease}, which is not alive"
            ));
        }
        let queue = self.queues.entry(key.clone()).or_default();
        match queue.front() {
            Some((first, _)) if *first == lease => {
                stats.handovers += 1;
                queue.pop_front();
            }
            Some((first, _)) => {
                out.add(format!(
                    "index {index}: {key:?} handed to lease {lease}, but lease {first} queued first"
                ));
                queue.retain(|(l, _)| *l != lease);
            }
            None => {}
        }
        self.grants.insert(token, (key.0, key.1.clone(), lease));
        self.holders.insert(key, (lease, token));
    }
}

fn kind_of(kind: i32) -> Kind {
    if kind == latchkey_proto::state::v1::GrantKind::Election as i32 {
        Kind::Election
    } else {
        Kind::Lock
    }
}
