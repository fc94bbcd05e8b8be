//! A cluster restored from a backup, on the node task: until its first
//! leader has raised the token floor through Raft, no proposal but that one
//! is taken, so no grant can be made with a token the old cluster may have
//! issued after the backup (see `docs/semantics.md`, Invariant 1).
//!
//! The floor is the leader's wall-clock time in Unix seconds × 2^32: above
//! every token a cluster could have issued before that moment, since none
//! issues four billion tokens a second. The time enters only as a value in
//! the proposed command; apply stays deterministic.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use raft::StateRole;

use latchkey_proto::state::v1::{command, Command, RaiseTokenFloor};

use super::Node;

/// A floor proposal that has not applied in this time is made again.
const FLOOR_RETRY: Duration = Duration::from_secs(1);
/// Token bits below the restore time: tokens of one restore incarnation
/// count up from `unix_seconds << TIME_SHIFT`.
pub const TIME_SHIFT: u32 = 32;

/// The token floor for a restore at wall-clock time `now`.
pub fn floor_at(now: SystemTime) -> u64 {
    let seconds = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    seconds << TIME_SHIFT
}

impl Node {
    /// Whether the applied state still waits for its token floor.
    pub(super) fn restore_pending(&self) -> bool {
        self.state_machine.coordination().read().restore_pending()
    }

    /// Whether `command` may be proposed now.
    pub(super) fn proposal_allowed(&self, command: &Command) -> bool {
        matches!(command.command, Some(command::Command::RaiseTokenFloor(_)))
            || !self.restore_pending()
    }

    /// A ready leader of a restored cluster proposes the floor (again, if
    /// an earlier proposal did not apply within [`FLOOR_RETRY`]).
    pub(super) fn raise_token_floor_if_pending(&mut self) {
        if self.raw.raft.state != StateRole::Leader
            || !self.lease_clock.ready()
            || !self.restore_pending()
        {
            return;
        }
        let now = Instant::now();
        if self
            .floor_proposed_at
            .is_some_and(|at| now.duration_since(at) < FLOOR_RETRY)
        {
            return;
        }
        let floor = floor_at(SystemTime::now());
        let command = Command {
            command: Some(command::Command::RaiseTokenFloor(RaiseTokenFloor { floor })),
            request: None,
        };
        match self.propose_own(&command) {
            Ok(()) => {
                tracing::info!(node = %self.id, floor, "restored cluster: raising the token floor");
                self.floor_proposed_at = Some(now);
            }
            Err(e) => tracing::debug!(node = %self.id, "floor proposal dropped: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_above_every_token_a_cluster_issued_before_it() {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let restored = start + Duration::from_secs(1);
        // An earlier incarnation that started at `start` and issued a
        // billion tokens a second until `restored`.
        let highest_before = floor_at(start) + 1_000_000_000;
        assert!(floor_at(restored) > highest_before);
    }
}
