//! What [`super::Node::new`] would otherwise take from the environment — the
//! clock, the boot id, raft-rs's election timeout range, an observer of
//! applied entries, the raft logger — made explicit so that the
//! deterministic simulator (`server/tests/simulation.rs`) can fix it.
//!
//! Also the clocks: [`MonotonicClock`] for production and
//! [`RateFileClock`], a test-only clock whose rate a fault-injection run
//! changes while the node runs.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use latchkey_proto::state::v1::CommandResult;
use raft::prelude::Entry;

/// The node's monotonic clock: lease deadlines and ReadIndex timeouts are
/// measured on it. Production uses [`MonotonicClock`]; the simulator a
/// virtual clock that only moves when it says so.
pub trait Clock: Send + 'static {
    fn now(&self) -> Instant;

    /// How fast this clock runs against real time (1.0: in step). The
    /// production loop divides its tick interval by it, so Raft's timers
    /// follow the clock too.
    fn rate(&self) -> f64 {
        1.0
    }
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
    /// Where the node records its latencies and counts (see
    /// [`crate::metrics`]); a fresh, unexported set by default.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            clock: Box::new(MonotonicClock),
            boot_id: rand::random(),
            election_tick_range: None,
            apply_observer: None,
            raft_logger: None,
            metrics: Arc::default(),
        }
    }
}

/// How often [`RateFileClock`] re-reads its file.
const RATE_FILE_POLL: Duration = Duration::from_millis(100);
/// Rates [`RateFileClock`] accepts; anything else in the file is ignored.
const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.01..=100.0;

/// A clock that runs at the rate written in a file (`1.05`: 5 % fast),
/// re-read every `RATE_FILE_POLL`. A change of rate never makes the clock
/// jump: time read after it continues from where it was. Test-only: it is
/// how the fault-injection harness changes a running node's clock rate
/// (`serve --unsafe-clock-rate-file`).
#[derive(Clone)]
pub struct RateFileClock {
    state: Arc<Mutex<RateState>>,
}

#[derive(Debug, Clone, Copy)]
struct RateState {
    real_base: Instant,
    clock_base: Instant,
    rate: f64,
}

impl RateState {
    fn now(&self, real: Instant) -> Instant {
        let elapsed = real.saturating_duration_since(self.real_base);
        self.clock_base + elapsed.mul_f64(self.rate)
    }
}

impl RateFileClock {
    /// Starts at rate 1 (or the file's rate, if it has one) and polls `path`
    /// on a thread that ends when the last clone of the clock is dropped.
    pub fn start(path: PathBuf) -> RateFileClock {
        let now = Instant::now();
        let clock = RateFileClock {
            state: Arc::new(Mutex::new(RateState {
                real_base: now,
                clock_base: now,
                rate: 1.0,
            })),
        };
        clock.poll(&path);
        let weak = Arc::downgrade(&clock.state);
        std::thread::spawn(move || poll_until_dropped(weak, path));
        clock
    }

    fn poll(&self, path: &std::path::Path) {
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        match text.trim().parse::<f64>() {
            Ok(rate) if RATE_RANGE.contains(&rate) => self.set_rate(rate),
            _ => tracing::warn!("ignoring clock rate {text:?} in {}", path.display()),
        }
    }

    /// Changes the rate from now on, without a jump.
    pub fn set_rate(&self, rate: f64) {
        let mut state = self.state.lock();
        if state.rate == rate {
            return;
        }
        let real = Instant::now();
        *state = RateState {
            clock_base: state.now(real),
            real_base: real,
            rate,
        };
        tracing::warn!(rate, "clock rate changed");
    }
}

fn poll_until_dropped(state: Weak<Mutex<RateState>>, path: PathBuf) {
    // Bounded by the clock's lifetime: the loop ends once it is dropped.
    while let Some(state) = state.upgrade() {
        RateFileClock { state }.poll(&path);
        std::thread::sleep(RATE_FILE_POLL);
    }
}

impl Clock for RateFileClock {
    fn now(&self) -> Instant {
        self.state.lock().now(Instant::now())
    }

    fn rate(&self) -> f64 {
        self.state.lock().rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_change_neither_jumps_nor_goes_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("rate");
        std::fs::write(&path, "2.0").expect("write rate");
        let clock = RateFileClock::start(path.clone());
        assert_eq!(clock.rate(), 2.0);
        let before = clock.now();
        std::thread::sleep(Duration::from_millis(20));
        let fast = clock.now().duration_since(before);
        assert!(fast >= Duration::from_millis(40), "{fast:?}");
        clock.set_rate(0.5);
        let after = clock.now();
        assert!(after >= before + fast, "no jump back");
        std::fs::write(&path, "not a rate").expect("write junk");
        clock.poll(&path);
        assert_eq!(clock.rate(), 0.5, "junk is ignored");
    }
}
