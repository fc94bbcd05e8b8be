//! The invariants of a simulated run, checked as the run goes.
//!
//! The checker sees every entry every node applies (through
//! [`latchkey_server::node::ApplyObserver`] and the node's event stream),
//! every published status, and what clients were told. The first node to
//! apply an index defines the *canonical history*; every other node must
//! apply the very same entry there with the very same result and events.
//! The model (`model.rs`) replays the canonical history independently of
//! the server's code and checks each entry against it.
//!
//! Checked here, besides the model's checks:
//!
//! - **election safety**: at most one Raft leader per term;
//! - **log and state-machine safety**: same entry, result and events at
//!   each index on every node (apply is deterministic); no gaps;
//! - **linearizable reads** (Invariant 6): a read (get, leader query,
//!   observe) is served from a state that includes every write
//!   acknowledged before the read began; a get of a single key sees a
//!   revision at least that new, and that revision is that very put;
//! - **observers** never go back: the leadership tokens one observer sees
//!   never decrease, across reconnects, and each is a real grant of that
//!   election;
//! - **durability**: every acknowledged put is in the committed history,
//!   and the final state of its key is at least that new.
//!
//! Not done yet: reads are checked per key and against the applied index,
//! not by a full linearizability checker over concurrent operations (the
//! Jepsen layer has one).

use std::collections::BTreeMap;

use latchkey_proto::state::v1::{command, Command, CommandResult};
use latchkey_server::coordination::{Event, Kind};
use latchkey_server::storage::raft_log::BOOTSTRAP_INDEX;
use prost::Message as _;

use crate::model::{EntryView, Model};

/// Violations kept per run; the first few tell the story.
const MAX_VIOLATIONS: usize = 20;

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
    events: Vec<Event>,
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

/// A linearizable read of one key a client completed.
#[derive(Debug, Clone)]
pub struct CompletedRead {
    pub key: Vec<u8>,
    pub invoked_at_us: u64,
    /// `(mod_revision, value)`; `None`: the key did not exist.
    pub observed: Option<(u64, Vec<u8>)>,
    pub node: u64,
}

/// What an observer (or a one-shot leader query) saw.
#[derive(Debug, Clone)]
pub struct Observation {
    /// `None` for a one-shot leader query.
    pub observer: Option<usize>,
    pub name: String,
    pub node: u64,
    /// `(lease, token)` of the leader seen, if any.
    pub leader: Option<(u64, u64)>,
}

/// Violations found so far, at most [`MAX_VIOLATIONS`].
#[derive(Debug, Default, Clone)]
pub struct Violations(pub Vec<String>);

impl Violations {
    pub fn add(&mut self, message: String) {
        if self.0.len() < MAX_VIOLATIONS {
            self.0.push(message);
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub grants: u64,
    pub handovers: u64,
    pub fenced_applied: u64,
    pub fenced_refused: u64,
    pub expired_leases: u64,
    pub leader_terms: u64,
    pub sessions_ended: u64,
    pub refused_requests: u64,
    pub observations: u64,
}

/// Collected facts and the violations found so far.
pub struct Checker {
    canonical: BTreeMap<u64, Canonical>,
    model: Model,
    /// Term → (its leader, virtual time it was first seen leading).
    leaders: BTreeMap<u64, (u64, u64)>,
    /// `(acked_at_us, highest index acknowledged up to then)`, in time order.
    acked_indexes: Vec<(u64, u64)>,
    acked_puts: Vec<AckedPut>,
    reads: usize,
    /// Observer → the last leadership token it saw.
    observed_tokens: BTreeMap<usize, u64>,
    pub violations: Violations,
    pub stats: Stats,
}

impl Checker {
    pub fn new() -> Checker {
        Checker {
            canonical: BTreeMap::new(),
            model: Model::default(),
            leaders: BTreeMap::new(),
            acked_indexes: Vec::new(),
            acked_puts: Vec::new(),
            reads: 0,
            observed_tokens: BTreeMap::new(),
            violations: Violations::default(),
            stats: Stats::default(),
        }
    }

    /// Election safety: at most one leader per term.
    pub fn leader_seen(&mut self, term: u64, node: u64, now_us: u64) {
        match self.leaders.get(&term) {
            Some(&(other, _)) if other != node => self.violations.add(format!(
                "two leaders in term {term}: node {other} and node {node}"
            )),
            Some(_) => {}
            None => {
                self.leaders.insert(term, (node, now_us));
                self.stats.leader_terms += 1;
            }
        }
    }

    /// Renewal safety (what confirmation rounds promise, Invariant 4): a
    /// leader of `term` renews a keepalive sent at `sent_at_us` only if no
    /// later term's leader had taken over by then.
    pub fn renewed(&mut self, node: u64, term: u64, lease: u64, sent_at_us: u64) {
        let successor = self
            .leaders
            .range(term + 1..)
            .find(|(_, (_, since))| *since < sent_at_us);
        if let Some((later, (leader, since))) = successor {
            self.violations.add(format!(
                "node {node} (term {term}) renewed lease {lease} for a keepalive sent at {sent_at_us} µs, but node {leader} had led term {later} since {since} µs"
            ));
        }
    }

    /// Node `node` applied `entry` with `events` at virtual time `now_us`.
    pub fn applied(&mut self, node: u64, entry: AppliedEntry, events: Vec<Event>, now_us: u64) {
        let result_digest = entry
            .result
            .as_ref()
            .map_or(0, |r| digest(&r.encode_to_vec()));
        if let Some(known) = self.canonical.get(&entry.index) {
            let index = entry.index;
            if known.term != entry.term || known.digest != entry.digest {
                self.violations.add(format!(
                    "node {node} applied a different entry at index {index} (term {} vs {})",
                    entry.term, known.term
                ));
            } else if known.result_digest != result_digest || known.events != events {
                self.violations.add(format!(
                    "node {node} got a different result or events at index {index}: apply is not deterministic, or the replicas' states differ"
                ));
            }
            return;
        }
        let last = self.history_len();
        if entry.index != last + 1 {
            self.violations.add(format!(
                "node {node} applied index {} first, but the history ends at {last}",
                entry.index
            ));
        }
        let command = (!entry.data.is_empty())
            .then(|| Command::decode(entry.data.as_slice()).ok())
            .flatten();
        if let Some(command) = &command {
            let view = EntryView {
                index: entry.index,
                command,
                result: entry.result.as_ref(),
                events: &events,
                now_us,
            };
            self.model
                .check(&view, &mut self.violations, &mut self.stats);
        }
        let canonical = Canonical {
            term: entry.term,
            digest: entry.digest,
            result_digest,
            events,
            command,
        };
        self.canonical.insert(entry.index, canonical);
    }

    /// A client's lease deadline moved to `deadline_us` (virtual time).
    pub fn client_deadline(&mut self, lease: u64, deadline_us: u64) {
        self.model.client_deadline(lease, deadline_us);
    }

    /// A client was told that its write applied at `index`.
    pub fn acked_write(&mut self, index: u64, acked_at_us: u64) {
        let highest = self.acked_indexes.last().map_or(0, |(_, i)| *i).max(index);
        self.acked_indexes.push((acked_at_us, highest));
    }

    pub fn acked_put(&mut self, put: AckedPut) {
        self.acked_put_index(&put);
        self.acked_puts.push(put);
    }

    fn acked_put_index(&mut self, put: &AckedPut) {
        self.acked_write(put.revision, put.acked_at_us);
    }

    /// Invariant 6 for any read: node `node` served a read invoked at
    /// `invoked_at_us` from its state at `applied_index`.
    pub fn read_served(&mut self, what: &str, node: u64, invoked_at_us: u64, applied_index: u64) {
        let before = self
            .acked_indexes
            .partition_point(|(at, _)| *at < invoked_at_us);
        let must_include = before
            .checked_sub(1)
            .map_or(0, |at| self.acked_indexes[at].1);
        if applied_index < must_include {
            self.violations.add(format!(
                "stale {what} on node {node}: served at index {applied_index}, but index {must_include} was acknowledged before the read began"
            ));
        }
    }

    /// Linearizability of one read against the acknowledged writes.
    pub fn completed_read(&mut self, read: CompletedRead) {
        self.reads += 1;
        let must_see = self
            .acked_puts
            .iter()
            .filter(|p| p.key == read.key && p.acked_at_us < read.invoked_at_us)
            .map(|p| p.revision)
            .max()
            .unwrap_or(0);
        let seen = read.observed.as_ref().map_or(0, |(revision, _)| *revision);
        if seen < must_see {
            self.violations.add(format!(
                "stale read of {:?} on node {}: saw revision {seen}, but revision {must_see} was acknowledged before the read began",
                String::from_utf8_lossy(&read.key),
                read.node
            ));
        }
        if let Some((revision, value)) = &read.observed {
            if !self.is_put(*revision, &read.key, value) {
                self.violations.add(format!(
                    "read of {:?} saw revision {revision}, which is not that put in the history",
                    String::from_utf8_lossy(&read.key)
                ));
            }
        }
    }

    /// An observer or leader query saw `observation`.
    pub fn observed(&mut self, observation: Observation) {
        self.stats.observations += 1;
        let Some((lease, token)) = observation.leader else {
            return;
        };
        let name = &observation.name;
        match self.model.grants.get(&token) {
            Some((Kind::Election, granted, holder)) if granted == name && *holder == lease => {}
            other => self.violations.add(format!(
                "node {} showed lease {lease} with token {token} as leader of {name:?}, but that grant is {other:?}",
                observation.node
            )),
        }
        let Some(observer) = observation.observer else {
            return;
        };
        let last = self.observed_tokens.entry(observer).or_insert(0);
        if token < *last {
            self.violations.add(format!(
                "observer {observer} of {name:?} went back from token {} to {token} (node {})",
                *last, observation.node
            ));
        }
        *last = (*last).max(token);
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
            let key = String::from_utf8_lossy(&put.key);
            if !self.is_put(put.revision, &put.key, &put.value) {
                self.violations.add(format!(
                    "acknowledged put of {key:?} at revision {} is not in the committed history",
                    put.revision
                ));
            }
            let now = final_revision(&put.key);
            if now < put.revision {
                self.violations.add(format!(
                    "acknowledged put of {key:?} at revision {} lost: final revision is {now}",
                    put.revision
                ));
            }
        }
        self.acked_puts = acked;
    }

    /// The last index of the canonical history. A new cluster starts from
    /// its bootstrap snapshot at index 1, which no node applies as an entry.
    pub fn history_len(&self) -> u64 {
        self.canonical
            .keys()
            .next_back()
            .copied()
            .unwrap_or(BOOTSTRAP_INDEX)
    }

    pub fn acked_put_count(&self) -> usize {
        self.acked_puts.len()
    }

    pub fn read_count(&self) -> usize {
        self.reads
    }
}

/// A fast, fixed, platform-independent digest (FNV-1a over 8-byte words).
pub fn digest(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("chunks of 8"));
        hash = (hash ^ word).wrapping_mul(0x0100_0000_01b3).rotate_left(29);
    }
    for byte in chunks.remainder() {
        hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
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
        let mut hash = self.hash;
        for word in words {
            hash = (hash ^ word).wrapping_mul(0x0100_0000_01b3).rotate_left(23);
        }
        self.hash = hash ^ self.events;
        self.events += 1;
    }
}
