//! The exactly-once session table (Invariant 5).
//!
//! A mutating request carries a [`ClientId`] and a [`SequenceNumber`]. Before
//! applying a committed request, apply asks [`Sessions::check`]; after
//! applying it, it records the encoded result with
//! [`super::Coordination::record_session`]. A retry of a request that was
//! already applied then gets the original result back instead of running
//! twice.
//!
//! Per client the table keeps the results of the [`SESSION_WINDOW`] most
//! recent sequence numbers (counting down from the highest one recorded), so
//! a client may have that many requests in flight. Within the window a
//! sequence number that was never recorded is new, even below the highest
//! one: pipelined requests may commit out of order after a leader change.
//! Below the window the table can no longer tell, and says so
//! ([`SessionCheck::TooOld`]) rather than guessing.
//!
//! At most [`MAX_SESSIONS`] clients are kept. Recording for a new client when
//! the table is full evicts the client whose last recorded request has the
//! lowest index; equal indexes evict the lower client id first. Activity is
//! an index, not a time, so every replica evicts the same client.
//!
//! Client id 0 or sequence number 0 means the request asked for no
//! deduplication: it is always new and nothing is recorded.
//!
//! Record every result, refusals included: a retry of a refused request
//! must get the same refusal, not a second attempt that may now succeed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::types::LogIndex;

/// How many of a client's most recent sequence numbers keep their results.
pub const SESSION_WINDOW: u64 = 64;
/// Most clients the table remembers.
pub const MAX_SESSIONS: usize = 10_000;

/// A client of the exactly-once protocol; 0 means "no deduplication".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A client's request number; 0 means "no deduplication".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SequenceNumber(pub u64);

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What to do with a committed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionCheck<'a> {
    /// Not applied before (or no deduplication asked): apply it, then record.
    New,
    /// Already applied: answer with these result bytes and change nothing.
    Duplicate(&'a [u8]),
    /// Below the window: it may or may not have been applied. Refuse it;
    /// `oldest_kept` is the lowest sequence number the table still answers for.
    TooOld { oldest_kept: SequenceNumber },
}

/// One client's remembered results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSession {
    /// Index of the entry that recorded this client's latest result.
    pub last_activity_index: LogIndex,
    /// Encoded results by sequence number; never empty, all within the window.
    pub results: BTreeMap<SequenceNumber, Vec<u8>>,
}

impl ClientSession {
    fn highest(&self) -> Option<SequenceNumber> {
        self.results.last_key_value().map(|(seq, _)| *seq)
    }

    /// Whether `seq` falls below the window that ends at the highest
    /// recorded sequence number.
    fn is_below_window(&self, seq: SequenceNumber) -> bool {
        self.highest()
            .is_some_and(|highest| seq.0.saturating_add(SESSION_WINDOW) <= highest.0)
    }

    fn oldest_kept(&self) -> SequenceNumber {
        let highest = self.highest().map_or(0, |seq| seq.0);
        SequenceNumber(highest.saturating_sub(SESSION_WINDOW - 1).max(1))
    }
}

/// The bounded table of client sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sessions {
    clients: BTreeMap<ClientId, ClientSession>,
    /// `(last_activity_index, client)` of every client: the eviction order.
    by_activity: BTreeSet<(LogIndex, ClientId)>,
}

fn dedup_requested(client: ClientId, seq: SequenceNumber) -> bool {
    client.0 != 0 && seq.0 != 0
}

impl Sessions {
    pub fn check(&self, client: ClientId, seq: SequenceNumber) -> SessionCheck<'_> {
        if !dedup_requested(client, seq) {
            return SessionCheck::New;
        }
        let Some(session) = self.clients.get(&client) else {
            return SessionCheck::New;
        };
        if let Some(result) = session.results.get(&seq) {
            return SessionCheck::Duplicate(result);
        }
        if session.is_below_window(seq) {
            return SessionCheck::TooOld {
                oldest_kept: session.oldest_kept(),
            };
        }
        SessionCheck::New
    }

    pub fn get(&self, client: ClientId) -> Option<&ClientSession> {
        self.clients.get(&client)
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Records the result of `seq`, which [`Sessions::check`] found new.
    /// Returns the clients whose records changed (an evicted one, then
    /// `client`).
    pub(super) fn record(
        &mut self,
        client: ClientId,
        seq: SequenceNumber,
        result: Vec<u8>,
        index: LogIndex,
    ) -> Vec<ClientId> {
        if !dedup_requested(client, seq) {
            return Vec::new();
        }
        let mut touched = Vec::new();
        if !self.clients.contains_key(&client) {
            touched.extend(self.evict_for_one_more());
        }
        let session = self.clients.entry(client).or_insert_with(|| ClientSession {
            last_activity_index: index,
            results: BTreeMap::new(),
        });
        assert!(
            !session.results.contains_key(&seq) && !session.is_below_window(seq),
            "client {client} seq {seq} recorded twice or below its window: apply must check before recording"
        );
        assert!(
            index >= session.last_activity_index,
            "client {client} recorded at index {index} after index {}: indexes must not go back",
            session.last_activity_index
        );
        self.by_activity
            .remove(&(session.last_activity_index, client));
        session.last_activity_index = index;
        session.results.insert(seq, result);
        while let Some((&oldest, _)) = session.results.first_key_value() {
            if !session.is_below_window(oldest) {
                break;
            }
            session.results.pop_first();
        }
        self.by_activity.insert((index, client));
        touched.push(client);
        touched
    }

    /// Evicts the least recently active clients until one more fits.
    fn evict_for_one_more(&mut self) -> Vec<ClientId> {
        let mut evicted = Vec::new();
        while self.clients.len() >= MAX_SESSIONS {
            let Some((_, victim)) = self.by_activity.pop_first() else {
                break;
            };
            self.clients.remove(&victim);
            evicted.push(victim);
        }
        evicted
    }

    /// Adds a session read from its record.
    pub(super) fn insert_loaded(&mut self, client: ClientId, session: ClientSession) {
        self.by_activity
            .insert((session.last_activity_index, client));
        self.clients.insert(client, session);
    }

    /// Checks the table's own invariants; the error names the client.
    pub(super) fn validate(&self) -> Result<(), (ClientId, String)> {
        for (client, session) in &self.clients {
            if !dedup_requested(*client, SequenceNumber(1)) {
                return Err((*client, "client id 0 is never recorded".into()));
            }
            if session.results.is_empty() {
                return Err((*client, "session has no results".into()));
            }
            if session.results.contains_key(&SequenceNumber(0)) {
                return Err((*client, "sequence number 0 is never recorded".into()));
            }
            if let Some((seq, _)) = session.results.first_key_value() {
                if session.is_below_window(*seq) {
                    return Err((*client, format!("seq {seq} is below the window")));
                }
            }
            if !self
                .by_activity
                .contains(&(session.last_activity_index, *client))
            {
                return Err((*client, "missing from the activity index".into()));
            }
        }
        if self.by_activity.len() != self.clients.len() {
            return Err((ClientId(0), "activity index has extra entries".into()));
        }
        Ok(())
    }
}
