//! Session expiry on the node task: the leader's session clock learns of
//! activity from applied entries and proposes `ExpireSessions` for sessions
//! idle too long (see `crate::session_clock`).

use raft::StateRole;

use latchkey_proto::state::v1::{command, Command, ExpireSessions};

use super::Node;
use crate::coordination::{Event, SessionId};

impl Node {
    /// An applied request of `session` (0: none) and the entry's events.
    pub(super) fn note_session_activity(&mut self, session: u64, events: &[Event]) {
        let now = self.clock.now();
        if session != 0 {
            self.session_clock.active(now, SessionId(session));
        }
        for event in events {
            match event {
                Event::SessionOpened { session } => self.session_clock.active(now, *session),
                Event::SessionEnded { session, .. } => self.session_clock.ended(*session),
                _ => {}
            }
        }
    }

    /// Proposes the expiry of sessions idle past the timeout.
    pub(super) fn expire_idle_sessions(&mut self) {
        if self.raw.raft.state != StateRole::Leader || !self.lease_clock.ready() {
            return;
        }
        let due = self.session_clock.due(self.clock.now());
        if due.is_empty() {
            return;
        }
        tracing::info!(node = %self.id, sessions = ?due, "expiring idle sessions");
        let command = Command {
            command: Some(command::Command::ExpireSessions(ExpireSessions {
                sessions: due.iter().map(|session| session.0).collect(),
            })),
            request: None,
        };
        if let Err(e) = self.propose_own(&command) {
            tracing::debug!(node = %self.id, "session expiry proposal dropped: {e}");
        }
    }
}
