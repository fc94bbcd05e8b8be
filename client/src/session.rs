//! The client's exactly-once session: opened lazily, numbered requests, and
//! what the server may forget.
//!
//! # Protocol
//! Before its first write a client opens a session (`Session.Open`, one
//! Raft write); the cluster names it by a log index, never reused. Each
//! mutating call then takes a `Ticket`: the session id and the next
//! sequence number, kept by every attempt of the call, so the server
//! applies it at most once and answers a resend with the first attempt's
//! result. Every request also says which is the lowest sequence number
//! whose call has not finished (`oldest_pending_seq`): the server forgets
//! the results below it, so what it remembers per client stays as small as
//! what the client has in flight.
//!
//! A session the cluster expired (idle longer than its idle timeout) or
//! lost is refused with `SessionExpired`. If no attempt of the call can
//! have been applied yet, the call opens a new session and sends again;
//! otherwise it fails with [`crate::Error::SessionExpired`]: the write may
//! or may not have been applied, and only the caller can decide.
//!
//! # Without a session
//! [`crate::ClientBuilder::sessionless`] clients (one-shot tools) send no
//! request id at all, so they take no slot in the cluster's session table.
//! They resend a write only when it certainly was not applied (a follower
//! refused it, or the connection was never made); any other failure ends
//! the call with [`crate::Error::OutcomeUnknown`].

use std::collections::BTreeSet;

use latchkey_proto::v1::RequestId;
use parking_lot::Mutex;

/// The session and its numbering, shared by the clones of one client.
#[derive(Debug)]
pub(crate) struct SessionIds {
    state: Mutex<State>,
    /// Held while a session is being opened, so only one call opens it.
    pub(crate) opening: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    session: Option<u64>,
    /// The last sequence number handed out in this session.
    last_seq: u64,
    /// Sequence numbers of calls that have not finished.
    pending: BTreeSet<u64>,
}

/// One call's request id; its sequence number counts as pending until the
/// ticket is dropped.
#[derive(Debug)]
pub(crate) struct Ticket<'a> {
    ids: &'a SessionIds,
    session: u64,
    seq: u64,
}

impl SessionIds {
    pub(crate) fn new() -> SessionIds {
        SessionIds {
            state: Mutex::new(State::default()),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// The open session, if any.
    pub(crate) fn current(&self) -> Option<u64> {
        self.state.lock().session
    }

    /// Adopts a session the cluster just opened.
    pub(crate) fn opened(&self, session: u64) {
        let mut state = self.state.lock();
        *state = State {
            session: Some(session),
            ..State::default()
        };
    }

    /// The cluster no longer has `session`; the next call opens another.
    pub(crate) fn expired(&self, session: u64) {
        let mut state = self.state.lock();
        if state.session == Some(session) {
            *state = State::default();
        }
    }

    /// A ticket in the open session; `None` when none is open.
    pub(crate) fn ticket(&self) -> Option<Ticket<'_>> {
        let mut state = self.state.lock();
        let session = state.session?;
        state.last_seq += 1;
        let seq = state.last_seq;
        state.pending.insert(seq);
        Some(Ticket {
            ids: self,
            session,
            seq,
        })
    }

    fn oldest_pending(&self, session: u64, fallback: u64) -> u64 {
        let state = self.state.lock();
        if state.session != Some(session) {
            return fallback;
        }
        state.pending.first().copied().unwrap_or(fallback)
    }
}

impl Ticket<'_> {
    /// The id to send now; `oldest_pending_seq` is read afresh each time, so
    /// a resend tells the server about calls that finished meanwhile.
    pub(crate) fn request_id(&self) -> RequestId {
        RequestId {
            client_id: self.session,
            seq: self.seq,
            oldest_pending_seq: self.ids.oldest_pending(self.session, self.seq),
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut state = self.ids.state.lock();
        if state.session == Some(self.session) {
            state.pending.remove(&self.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_pending_call_holds_back_what_the_server_may_forget() {
        let ids = SessionIds::new();
        assert!(ids.ticket().is_none(), "no session yet");
        ids.opened(40);
        let first = ids.ticket().expect("session open");
        let second = ids.ticket().expect("session open");
        assert_eq!((first.seq, second.seq), (1, 2));
        assert_eq!(second.request_id().oldest_pending_seq, 1);
        drop(first);
        assert_eq!(second.request_id().oldest_pending_seq, 2);
        let third = ids.ticket().expect("session open");
        drop(second);
        assert_eq!(third.request_id().oldest_pending_seq, 3);
        assert_eq!(third.request_id().client_id, 40);
    }

    #[test]
    fn an_expired_session_is_forgotten_and_its_tickets_do_not_touch_the_next() {
        let ids = SessionIds::new();
        ids.opened(7);
        let old = ids.ticket().expect("session open");
        ids.expired(7);
        assert_eq!(ids.current(), None);
        ids.opened(9);
        let new = ids.ticket().expect("session open");
        drop(old);
        assert_eq!(new.request_id().seq, 1);
        assert_eq!(new.request_id().oldest_pending_seq, 1);
        ids.expired(7);
        assert_eq!(ids.current(), Some(9), "a stale expiry changes nothing");
    }
}
