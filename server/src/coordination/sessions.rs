//! The exactly-once session table (Invariant 5).
//!
//! A long-lived client opens a session ([`super::Op::OpenSession`]); its id
//! is the index of the entry that opened it, so ids are never reused. Each
//! mutating request then carries the session id, a [`SequenceNumber`] and
//! the lowest sequence number whose result the client has not yet received
//! (`oldest_pending`). Before applying a committed request, apply asks
//! [`Sessions::check`]; after applying it, it records the encoded result
//! with [`super::Coordination::record_session`]. A retry of a request that
//! was already applied gets the original result back instead of running
//! twice.
//!
//! # What is remembered
//! Per session: the results the client has not yet acknowledged, and
//! `forgotten_below`: every sequence number below it is answered
//! [`SessionCheck::TooOld`] unless its result is still kept. A request
//! raises `forgotten_below` to its `oldest_pending` (the client has the
//! results below it, so it will not retry them) and the results below are
//! dropped. So a session's record stays the size of what its client has in
//! flight, not of its history, and each request writes a few small records
//! rather than rewriting one that grows. At most [`SESSION_WINDOW`] results
//! are kept; past that the lowest is dropped and `forgotten_below` passes it.
//! Within the kept range, a sequence number never recorded is new, even
//! below the highest one: pipelined requests may commit out of order after
//! a leader change.
//!
//! # Ending sessions
//! A session ends when its client closes it or when the leader finds it idle
//! for longer than the idle timeout and proposes its expiry (the leader's
//! session clock, `crate::session_clock`; like lease expiry, the decision
//! is the leader's and takes effect only through a committed entry, so
//! every replica agrees). A request naming a session the table does not
//! have is refused as [`SessionCheck::Expired`]: nothing is applied, and the
//! client learns that an earlier attempt *may* have been. The table never
//! evicts a live session to make room: when [`MAX_SESSIONS`] are open, a new
//! one is refused.
//!
//! Session id 0 or sequence number 0 means the request asked for no
//! deduplication: it is always new and nothing is recorded. One-shot
//! clients use that, and so take no slot.
//!
//! Record every result, refusals included: a retry of a refused request
//! must get the same refusal, not a second attempt that may now succeed.

use std::collections::BTreeMap;
use std::fmt;

use crate::types::LogIndex;

/// Most results one session keeps that its client has not acknowledged.
pub const SESSION_WINDOW: u64 = 64;
/// Most open sessions.
pub const MAX_SESSIONS: usize = 100_000;

/// An exactly-once session: the index of the entry that opened it; 0 means
/// "no deduplication".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
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
    /// Below what the session remembers: it may or may not have been
    /// applied. Refuse it; `oldest_kept` is the lowest sequence number the
    /// table still answers for.
    TooOld { oldest_kept: SequenceNumber },
    /// The session is not open (expired, closed, or never opened): refuse
    /// it; an earlier attempt may have been applied.
    Expired,
}

/// One open session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The index of the entry that opened it (also its id).
    pub opened_index: LogIndex,
    /// Sequence numbers below this are answered only from `results`.
    pub forgotten_below: SequenceNumber,
    /// Encoded results by sequence number, all at or above
    /// `forgotten_below`, at most [`SESSION_WINDOW`].
    pub results: BTreeMap<SequenceNumber, Vec<u8>>,
}

/// The stored records a change to the table touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionChanges {
    /// Sessions whose header record changed (opened, closed, or
    /// `forgotten_below` moved).
    pub headers: Vec<SessionId>,
    /// Result records written or dropped.
    pub results: Vec<(SessionId, SequenceNumber)>,
}

/// The table of open sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sessions {
    sessions: BTreeMap<SessionId, Session>,
}

fn dedup_requested(session: SessionId, seq: SequenceNumber) -> bool {
    session.0 != 0 && seq.0 != 0
}

impl Sessions {
    pub fn check(&self, session: SessionId, seq: SequenceNumber) -> SessionCheck<'_> {
        if !dedup_requested(session, seq) {
            return SessionCheck::New;
        }
        let Some(open) = self.sessions.get(&session) else {
            return SessionCheck::Expired;
        };
        if let Some(result) = open.results.get(&seq) {
            return SessionCheck::Duplicate(result);
        }
        if seq < open.forgotten_below {
            let oldest_kept = open
                .results
                .first_key_value()
                .map_or(open.forgotten_below, |(seq, _)| *seq);
            return SessionCheck::TooOld { oldest_kept };
        }
        SessionCheck::New
    }

    pub fn get(&self, session: SessionId) -> Option<&Session> {
        self.sessions.get(&session)
    }

    pub fn ids(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.sessions.keys().copied()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Opens the session named by `index`. `None` when the table is full.
    pub(super) fn open(&mut self, index: LogIndex) -> Option<SessionId> {
        if self.sessions.len() >= MAX_SESSIONS {
            return None;
        }
        let id = SessionId(index.0);
        let previous = self.sessions.insert(
            id,
            Session {
                opened_index: index,
                forgotten_below: SequenceNumber(1),
                results: BTreeMap::new(),
            },
        );
        assert!(
            previous.is_none(),
            "session {id} opened twice: entry indexes are applied once each"
        );
        Some(id)
    }

    /// Ends `session`; returns what it had, for the caller to delete.
    pub(super) fn end(&mut self, session: SessionId) -> Option<Session> {
        self.sessions.remove(&session)
    }

    /// Records the result of `seq`, which [`Sessions::check`] found new, and
    /// forgets what the client says it has received (`oldest_pending`).
    pub(super) fn record(
        &mut self,
        session: SessionId,
        seq: SequenceNumber,
        oldest_pending: SequenceNumber,
        result: Vec<u8>,
    ) -> SessionChanges {
        let mut changes = SessionChanges::default();
        if !dedup_requested(session, seq) {
            return changes;
        }
        // Apply checked that the session was open; a command that closes or
        // expires its own session leaves nothing to remember its result in.
        let Some(open) = self.sessions.get_mut(&session) else {
            return changes;
        };
        assert!(
            !open.results.contains_key(&seq) && seq >= open.forgotten_below,
            "session {session} seq {seq} recorded twice or below what it remembers: apply must check before recording"
        );
        open.results.insert(seq, result);
        changes.results.push((session, seq));
        // The client has every result below `oldest_pending`; never past
        // `seq` itself, whose result it is about to receive.
        let forget_below = oldest_pending.min(seq);
        let mut header_changed = false;
        if forget_below > open.forgotten_below {
            open.forgotten_below = forget_below;
            header_changed = true;
        }
        while let Some((&lowest, _)) = open.results.first_key_value() {
            if lowest >= open.forgotten_below {
                break;
            }
            open.results.pop_first();
            changes.results.push((session, lowest));
        }
        while open.results.len() as u64 > SESSION_WINDOW {
            // Checked just above: there is more than one result.
            let (lowest, _) = open.results.pop_first().expect("over the window");
            changes.results.push((session, lowest));
            open.forgotten_below = SequenceNumber(lowest.0 + 1);
            header_changed = true;
        }
        if header_changed {
            changes.headers.push(session);
        }
        changes
    }

    /// Adds a session read from its header record.
    pub(super) fn insert_loaded(&mut self, id: SessionId, session: Session) -> bool {
        self.sessions.insert(id, session).is_none()
    }

    /// Adds a result read from its record; false if its session is unknown
    /// or the result appears twice.
    pub(super) fn insert_loaded_result(
        &mut self,
        id: SessionId,
        seq: SequenceNumber,
        result: Vec<u8>,
    ) -> bool {
        match self.sessions.get_mut(&id) {
            Some(session) => session.results.insert(seq, result).is_none(),
            None => false,
        }
    }

    /// Checks the table's own invariants; the error names the session.
    pub(super) fn validate(&self) -> Result<(), (SessionId, String)> {
        for (id, session) in &self.sessions {
            if id.0 == 0 || id.0 != session.opened_index.0 {
                return Err((*id, format!("opened at index {}", session.opened_index)));
            }
            if session.forgotten_below.0 == 0 {
                return Err((*id, "forgotten_below is 0".into()));
            }
            if session.results.len() as u64 > SESSION_WINDOW {
                return Err((*id, format!("{} results kept", session.results.len())));
            }
            if let Some((seq, _)) = session.results.first_key_value() {
                if *seq < session.forgotten_below {
                    return Err((*id, format!("seq {seq} is below what it remembers")));
                }
            }
        }
        Ok(())
    }
}
