//! The invariants of a simulated run, checked as the run goes.
//!
//! The checker sees every entry every node applies (through
//! [`latchkey_server::node::ApplyObserver`] and the node's event stream),
//! every published status, and what clients were told. The first node to
//! apply an index defines the *canonical history*; every other node must
//! apply the very same entry with the very same result there. A small model
//! replayed over the canonical history re-derives leases, lock holders,
//! tokens and the fenced store independently of the server's code and checks
//! each applied entry against it.

use std::collections::{BTreeMap, BTreeSet};

use latchkey_proto::state::v1::{command, command_result, Command, CommandResult};
use latchkey_proto::v1::error_details;
use latchkey_server::coordination::{Event, Kind};
use prost::Message as _;

/// One entry as one node applied it.
#[derive(Debug, Clone)]
pub struct AppliedEntry {
    pub index: u64,
    pub term: u64,
    /// Digest of the entry's data and context.
    pub digest: u64,
    pub data: Vec<u8>,
    pub result: Option<CommandResult>,
}

/// What the canonical history holds at one index.
#[derive(Debug, Clone)]
struct Canonical {
    term: u64,
    digest: u64,
    result_digest: u64,
    /// The decoded command, if the entry carried one.
    command: Option<Command>,
}

/// A put a client saw acknowledged.
#[derive(Debug, Clone)]
pub struct AckedPut {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub revision: u64,
    pub acked_at_us: u64,
}

/// A linearizable read a client completed.
#[derive(Debug, Clone)]
pub struct CompletedRead {
    pub key: Vec<u8>,
    pub invoked_at_us: u64,
    /// `(mod_revision, value)`; `None`: the key did not exist.
    pub observed: Option<(u64, Vec<u8>)>,
    pub node: u64,
}

#[derive(Debug, Clone, Default)]
struct KeyModel {
    token: u64,
}

/// The independent model of the replicated state, replayed over the
/// canonical history.
#[derive(Debug, Default)]
struct Model {
    leases: BTreeSet<u64>,
    /// Lock name → (holder lease, token).
    holders: BTreeMap<String, (u64, u64)>,
    last_token: u64,
    keys: BTreeMap<Vec<u8>, KeyModel>,
    /// (client id, seq) → digest of the first result.
    sessions: BTreeMap<(u64, u64), u64>,
}

/// Collected facts and the violations found so far.
#[derive(Default)]
pub struct Checker {
    canonical: BTreeMap<u64, Canonical>,
    model: Model,
    leaders: BTreeMap<u64, u64>,
    /// Lease id → the latest deadline (µs) a client computed for it.
    client_deadlines: BTreeMap<u64, u64>,
    acked_puts: Vec<AckedPut>,
    reads: Vec<CompletedRead>,
    pub violations: Vec<String>,
    pub stats: Stats,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub grants: u64,
    pub fenced_applied: u64,
    pub fenced_refused: u64,
    pub expired_leases: u64,
    pub leader_terms: u64,
}

impl Checker {
    fn fail(&mut self, message: String) {
        if self.violations.len() < 20 {
            self.violations.push(message);
        }
    }

    /// Election safety: at most one leader per term.
    pub fn leader_seen(&mut self, term: u64, node: u64) {
        match self.leaders.get(&term) {
            Some(&other) if other != node => self.fail(format!(
                "two leaders in term {term}: node {other} and node {node}"
            )),
            Some(_) => {}
            None => {
                self.leaders.insert(term, node);
                self.stats.leader_terms += 1;
            }
        }
    }

    /// Node `node` applied `entry` with `events` at virtual time `now_us`.
    pub fn applied(&mut self, node: u64, entry: AppliedEntry, events: &[Event], now_us: u64) {
        let result_digest = entry.result.as_ref().map_or(0, |r| fnv(&r.encode_to_vec()));
        if let Some(known) = self.canonical.get(&entry.index) {
            if known.term != entry.term || known.digest != entry.digest {
                self.fail(format!(
                    "node {node} applied a different entry at index {} (term {} vs {})",
                    entry.index, entry.term, known.term
                ));
            } else if known.result_digest != result_digest {
                self.fail(format!(
                    "node {node} got a different result at index {}: apply is not deterministic",
                    entry.index
                ));
            }
            return;
        }
        // A new cluster starts from its bootstrap snapshot at index 1.
        let last = self
            .canonical
            .keys()
            .next_back()
            .copied()
            .unwrap_or(latchkey_server::storage::raft_log::BOOTSTRAP_INDEX);
        if entry.index != last + 1 {
            self.fail(format!(
                "node {node} applied index {} first, but the history ends at {last}",
                entry.index
            ));
        }
        let command = (!entry.data.is_empty())
            .then(|| Command::decode(entry.data.as_slice()).ok())
            .flatten();
        self.check_against_model(
            entry.index,
            command.as_ref(),
            entry.result.as_ref(),
            events,
            now_us,
        );
        self.canonical.insert(
            entry.index,
            Canonical {
                term: entry.term,
                digest: entry.digest,
                result_digest,
                command,
            },
        );
    }

    fn check_against_model(
        &mut self,
        index: u64,
        command: Option<&Command>,
        result: Option<&CommandResult>,
        events: &[Event],
        now_us: u64,
    ) {
        let Some(command) = command else { return };
        let result_body = result.and_then(|r| r.result.clone());
        if let Some(request) = &command.request {
            let key = (request.client_id, request.seq);
            let digest = result.map_or(0, |r| fnv(&r.encode_to_vec()));
            if let Some(&first) = self.model.sessions.get(&key) {
                if first != digest {
                    self.fail(format!(
                        "index {index}: retry of request {key:?} got another result than the first"
                    ));
                }
                if !events.is_empty() {
                    self.fail(format!(
                        "index {index}: retry of request {key:?} changed state"
                    ));
                }
                return;
            }
            self.model.sessions.insert(key, digest);
        }
        match (&command.command, &result_body) {
            (
                Some(command::Command::GrantLease(_)),
                Some(command_result::Result::LeaseGranted(g)),
            ) => {
                self.model.leases.insert(g.lease);
            }
            (Some(command::Command::Put(put)), _) => {
                self.check_put(index, put, result_body.as_ref())
            }
            (Some(command::Command::ExpireLeases(expire)), _) => {
                for lease in &expire.leases {
                    self.check_expiry(index, *lease, now_us);
                }
            }
            _ => {}
        }
        for event in events {
            self.model_event(index, event);
        }
    }

    fn check_put(
        &mut self,
        index: u64,
        put: &latchkey_proto::state::v1::Put,
        result: Option<&command_result::Result>,
    ) {
        let stored = self.model.keys.get(&put.key).map_or(0, |k| k.token);
        let applied = matches!(result, Some(command_result::Result::Put(_)));
        let Some(fence) = &put.fence else {
            if applied {
                self.model.keys.entry(put.key.clone()).or_default();
            }
            return;
        };
        let current = self.model.holders.get(&fence.name).map(|(_, token)| *token);
        let valid = current == Some(fence.token) && fence.token >= stored;
        if applied {
            self.stats.fenced_applied += 1;
            if !valid {
                self.fail(format!(
                    "index {index}: fenced write with token {} on {:?} applied, but the lock's grant is {current:?} and the key's token {stored}",
                    fence.token, fence.name
                ));
            }
            self.model
                .keys
                .insert(put.key.clone(), KeyModel { token: fence.token });
            return;
        }
        self.stats.fenced_refused += 1;
        let stale = matches!(
            result,
            Some(command_result::Result::Error(e))
                if matches!(e.details.as_ref().and_then(|d| d.detail.as_ref()), Some(error_details::Detail::StaleToken(_)))
        );
        if valid || !stale {
            self.fail(format!(
                "index {index}: fenced write with valid={valid} token {} got {result:?}",
                fence.token
            ));
        }
    }

    /// Invariant 4: no lease ends before the deadline its client computed.
    fn check_expiry(&mut self, index: u64, lease: u64, now_us: u64) {
        if !self.model.leases.contains(&lease) {
            return;
        }
        self.stats.expired_leases += 1;
        if let Some(&deadline) = self.client_deadlines.get(&lease) {
            if now_us < deadline {
                self.fail(format!(
                    "index {index}: lease {lease} expired at {} ms, before its client's deadline {} ms",
                    now_us / 1000,
                    deadline / 1000
                ));
            }
        }
    }

    fn model_event(&mut self, index: u64, event: &Event) {
        match event {
            Event::Granted {
                kind: Kind::Lock,
                name,
                lease,
                token,
                ..
            } => {
                self.stats.grants += 1;
                if token.0 <= self.model.last_token {
                    self.fail(format!(
                        "index {index}: token {} for {name:?} is not above the last token {}",
                        token.0, self.model.last_token
                    ));
                }
                self.model.last_token = self.model.last_token.max(token.0);
                if let Some((holder, held)) = self.model.holders.get(name) {
                    self.fail(format!(
                        "index {index}: {name:?} granted to lease {lease} while lease {holder} holds it with token {held}"
                    ));
                }
                if !self.model.leases.contains(&lease.0) {
                    self.fail(format!(
                        "index {index}: {name:?} granted to lease {lease}, which is not alive"
                    ));
                }
                self.model.holders.insert(name.clone(), (lease.0, token.0));
            }
            Event::Released {
                kind: Kind::Lock,
                name,
                token,
                ..
            } => match self.model.holders.remove(name) {
                Some((_, held)) if held == token.0 => {}
                other => self.fail(format!(
                    "index {index}: {name:?} released with token {token}, but the model holder is {other:?}"
                )),
            },
            Event::LeaseRemoved { lease, .. } => {
                self.model.leases.remove(&lease.0);
                if let Some((name, _)) = self.model.holders.iter().find(|(_, (l, _))| *l == lease.0) {
                    self.fail(format!(
                        "index {index}: lease {lease} removed while it still holds {name:?}"
                    ));
                }
            }
            _ => {}
        }
    }

    /// A client's lease deadline moved to `deadline_us`.
    pub fn client_deadline(&mut self, lease: u64, deadline_us: u64) {
        let entry = self.client_deadlines.entry(lease).or_insert(0);
        *entry = (*entry).max(deadline_us);
    }

    pub fn acked_put(&mut self, put: AckedPut) {
        self.acked_puts.push(put);
    }

    /// Linearizability of one read against the acknowledged writes.
    pub fn completed_read(&mut self, read: CompletedRead) {
        let must_see = self
            .acked_puts
            .iter()
            .filter(|p| p.key == read.key && p.acked_at_us < read.invoked_at_us)
            .map(|p| p.revision)
            .max()
            .unwrap_or(0);
        let seen = read.observed.as_ref().map_or(0, |(revision, _)| *revision);
        if seen < must_see {
            self.fail(format!(
                "stale read of {:?} on node {}: saw revision {seen}, but revision {must_see} was acknowledged before the read began",
                String::from_utf8_lossy(&read.key),
                read.node
            ));
        }
        if let Some((revision, value)) = &read.observed {
            if !self.is_put(*revision, &read.key, value) {
                self.fail(format!(
                    "read of {:?} saw revision {revision}, which is not that put in the history",
                    String::from_utf8_lossy(&read.key)
                ));
            }
        }
        self.reads.push(read);
    }

    fn is_put(&self, index: u64, key: &[u8], value: &[u8]) -> bool {
        let Some(entry) = self.canonical.get(&index) else {
            return false;
        };
        matches!(
            entry.command.as_ref().and_then(|c| c.command.as_ref()),
            Some(command::Command::Put(put)) if put.key == key && put.value == value
        )
    }

    /// After the final heal: every acknowledged put is in the history, and
    /// `final_revision(key)` (the converged state) is at least as new.
    pub fn check_acked_puts(&mut self, final_revision: impl Fn(&[u8]) -> u64) {
        let acked = std::mem::take(&mut self.acked_puts);
        for put in &acked {
            if !self.is_put(put.revision, &put.key, &put.value) {
                self.fail(format!(
                    "acknowledged put of {:?} at revision {} is not in the committed history",
                    String::from_utf8_lossy(&put.key),
                    put.revision
                ));
            }
            let now = final_revision(&put.key);
            if now < put.revision {
                self.fail(format!(
                    "acknowledged put of {:?} at revision {} lost: final revision is {now}",
                    String::from_utf8_lossy(&put.key),
                    put.revision
                ));
            }
        }
        self.acked_puts = acked;
    }

    pub fn history_len(&self) -> u64 {
        self.canonical.keys().next_back().copied().unwrap_or(0)
    }

    pub fn acked_put_count(&self) -> usize {
        self.acked_puts.len()
    }

    pub fn read_count(&self) -> usize {
        self.reads.len()
    }
}

/// FNV-1a: a fixed, platform-independent digest for the trace.
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A running digest of everything that happened, in order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    pub hash: u64,
    pub events: u64,
}

impl Trace {
    pub fn record(&mut self, words: &[u64]) {
        let mut hash = if self.hash == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.hash
        };
        for word in words {
            for byte in word.to_le_bytes() {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        self.hash = hash;
        self.events += 1;
    }
}
