//! What [`super::Node::new`] would otherwise take from the environment — the
//! clock, the boot id, raft-rs's election timeout range, an observer of
//! applied entries, the raft logger — made explicit so that the
//! deterministic simulator (`server/tests/simulation.rs`) can fix it.

use std::time::Instant;

use latchkey_proto::state::v1::CommandResult;
use raft::prelude::Entry;

/// The node's monotonic clock: lease deadlines and ReadIndex timeouts are
/// measured on it. Production uses [`MonotonicClock`]; the simulator a
/// virtual clock that only moves when it says so.
pub trait Clock: Send + 'static {
    fn now(&self) -> Instant;
}

/// `std::time::Instant::now()`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Called with every entry this node applies and, for a command, its
/// result, right after the entry's batch is written. Used by the simulator's
/// checkers; production sets none.
pub type ApplyObserver = Box<dyn FnMut(&Entry, Option<&CommandResult>) + Send>;

/// What [`super::Node::new`] takes from the environment, made explicit so
/// that a simulator can fix it.
pub struct NodeOptions {
    pub clock: Box<dyn Clock>,
    /// Tells this process's proposals apart from an earlier run's.
    pub boot_id: u64,
    /// raft-rs `[min_election_tick, max_election_tick)`; `None` keeps its
    /// default `[election_ticks, 2 × election_ticks)`. raft-rs draws from
    /// this range with `rand::thread_rng`, so a one-value range (`(e, e + 1)`)
    /// is the only way to make its election timeout reproducible.
    pub election_tick_range: Option<(usize, usize)>,
    pub apply_observer: Option<ApplyObserver>,
    /// raft-rs's logger; `None`: [`crate::logging::raft_logger`]. The
    /// simulator discards raft-rs's records, whose formatting would be a
    /// tenth of its time.
    pub raft_logger: Option<slog::Logger>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            clock: Box::new(MonotonicClock),
            boot_id: rand::random(),
            election_tick_range: None,
            apply_observer: None,
            raft_logger: None,
        }
    }
}
