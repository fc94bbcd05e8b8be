//! The leader's session clock: when each exactly-once session has been idle
//! for too long, on this node's monotonic clock.
//!
//! Like the lease clock, only the leader keeps times, and its decision takes
//! effect only through a committed `ExpireSessions` entry, so every replica
//! drops the same sessions at the same index. A new leader restarts every
//! session's idle time when it takes over. Unlike lease expiry, session
//! expiry needs no confirmation round: ending a session early never lets a
//! request apply twice (its next request is refused as expired), it only
//! costs the client a new session.
//!
//! Activity is any applied request that names the session, and its opening.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::coordination::{Coordination, SessionId};

/// Most sessions expired by one entry.
pub const MAX_EXPIRED_SESSIONS_PER_ENTRY: usize = 1000;
/// An expiry proposal that has not applied in this time may be made again.
const EXPIRY_RETRY: Duration = Duration::from_secs(5);

/// Idle deadlines of every open session while this node leads.
#[derive(Debug)]
pub struct SessionClock {
    idle_timeout: Duration,
    leading: bool,
    deadlines: BTreeMap<SessionId, Instant>,
    /// Sessions in an expiry proposal that has not applied yet, and when.
    expiring: BTreeMap<SessionId, Instant>,
}

impl SessionClock {
    pub fn new(idle_timeout: Duration) -> SessionClock {
        SessionClock {
            idle_timeout,
            leading: false,
            deadlines: BTreeMap::new(),
            expiring: BTreeMap::new(),
        }
    }

    /// Starts leading: every open session gets a full idle timeout from `now`.
    pub fn lead(&mut self, now: Instant, state: &Coordination) {
        self.leading = true;
        self.expiring.clear();
        let deadline = now + self.idle_timeout;
        self.deadlines = state.sessions().ids().map(|id| (id, deadline)).collect();
    }

    pub fn follow(&mut self) {
        self.leading = false;
        self.deadlines.clear();
        self.expiring.clear();
    }

    /// A session was opened, or a request of it applied, at `now`.
    pub fn active(&mut self, now: Instant, session: SessionId) {
        if self.leading {
            self.deadlines.insert(session, now + self.idle_timeout);
        }
    }

    /// A session ended (applied).
    pub fn ended(&mut self, session: SessionId) {
        self.deadlines.remove(&session);
        self.expiring.remove(&session);
    }

    /// Sessions idle past their deadline and not proposed for expiry within
    /// `EXPIRY_RETRY`; they are recorded as proposed.
    pub fn due(&mut self, now: Instant) -> Vec<SessionId> {
        if !self.leading {
            return Vec::new();
        }
        let due: Vec<SessionId> = self
            .deadlines
            .iter()
            .filter(|(_, deadline)| **deadline <= now)
            .map(|(id, _)| *id)
            .filter(|id| {
                self.expiring
                    .get(id)
                    .is_none_or(|at| now.duration_since(*at) >= EXPIRY_RETRY)
            })
            .take(MAX_EXPIRED_SESSIONS_PER_ENTRY)
            .collect();
        for id in &due {
            self.expiring.insert(*id, now);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordination::{Op, TtlBounds};
    use crate::types::LogIndex;

    fn state_with_session() -> (Coordination, SessionId) {
        let mut state = Coordination::new(TtlBounds {
            min_ttl_ms: 1,
            max_ttl_ms: 1_000_000,
        });
        state.apply(LogIndex(3), Op::OpenSession);
        (state, SessionId(3))
    }

    #[test]
    fn an_idle_session_is_due_once_per_retry_period() {
        let (state, session) = state_with_session();
        let mut clock = SessionClock::new(Duration::from_secs(10));
        let start = Instant::now();
        clock.lead(start, &state);
        assert!(clock.due(start + Duration::from_secs(9)).is_empty());
        clock.active(start + Duration::from_secs(9), session);
        assert!(
            clock.due(start + Duration::from_secs(18)).is_empty(),
            "kept alive"
        );
        let idle = start + Duration::from_secs(19);
        assert_eq!(clock.due(idle), vec![session]);
        assert!(clock.due(idle).is_empty(), "already proposed");
        assert_eq!(
            clock.due(idle + EXPIRY_RETRY),
            vec![session],
            "never applied"
        );
        clock.ended(session);
        assert!(clock.due(idle + EXPIRY_RETRY * 2).is_empty());
    }

    #[test]
    fn a_follower_expires_nothing() {
        let (state, _) = state_with_session();
        let mut clock = SessionClock::new(Duration::from_secs(1));
        let start = Instant::now();
        clock.lead(start, &state);
        clock.follow();
        assert!(clock.due(start + Duration::from_secs(60)).is_empty());
    }
}
