//! Proof that the simulator catches bugs: each broken variant turns one
//! mechanism off (a test-only `UnsafeSwitches` switch, or clocks beyond the
//! drift bound), and its test requires that some seed in `1..=bound` is
//! flagged by the checker with the expected complaint, and that running
//! that seed again gives the very same violations and trace.
//!
//! The bounds are measured, with room to spare (docs/testing.md lists the
//! first failing seeds); a test stops at the first seed that fails, so it
//! usually runs far fewer than `bound` seeds.
//!
//! Not done yet: no variant breaks durability itself (say, acknowledging
//! before the log is synced), although power losses are simulated: there
//! is no switch for it in the server.

use latchkey_server::config::UnsafeSwitches;

use crate::nemesis::CRASH_FAULTS;
use crate::runner::replay_command;
use crate::{run, Scenario};

/// What a broken variant turns off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breakage {
    NoFencing,
    VolatileTokenCounter,
    LocalExpiry,
    LocalReads,
    UnconfirmedRenewals,
    /// Server and client clocks drift up to this many times the bound the
    /// servers assume.
    ClocksBeyondBound(i64),
}

pub struct Broken {
    pub name: &'static str,
    breakage: Breakage,
    /// Some seed in `1..=bound` catches it.
    pub bound: u64,
    /// The first complaint of the checker names one of these.
    expected: &'static [&'static str],
}

/// Every broken variant, with its seed bound.
pub const BROKEN: [Broken; 6] = [
    Broken {
        name: "no-fencing",
        breakage: Breakage::NoFencing,
        bound: 3,
        expected: &["fenced write"],
    },
    Broken {
        name: "volatile-token-counter",
        breakage: Breakage::VolatileTokenCounter,
        bound: 12,
        expected: &["is not above the last token", "not deterministic"],
    },
    Broken {
        name: "local-expiry",
        breakage: Breakage::LocalExpiry,
        bound: 3,
        // The leader's state drifts from the log: replicas disagree, or the
        // model (which follows the log) disagrees with what the leader
        // applied first, in whichever check that shows up.
        expected: &[
            "not deterministic",
            "granted to lease",
            "handed to lease",
            "queued for",
            "fenced write",
        ],
    },
    Broken {
        name: "local-reads",
        breakage: Breakage::LocalReads,
        bound: 3,
        expected: &["stale", "went back"],
    },
    Broken {
        name: "unconfirmed-renewals",
        breakage: Breakage::UnconfirmedRenewals,
        bound: 15,
        expected: &["before its client's deadline", "renewed lease"],
    },
    Broken {
        name: "clocks-beyond-drift-bound",
        breakage: Breakage::ClocksBeyondBound(20),
        bound: 5,
        expected: &["before its client's deadline"],
    },
];

impl Broken {
    pub fn named(name: &str) -> Option<&'static Broken> {
        BROKEN.iter().find(|broken| broken.name == name)
    }

    pub fn names() -> String {
        let names: Vec<&str> = BROKEN.iter().map(|broken| broken.name).collect();
        format!("one of {}", names.join(", "))
    }

    /// The variant `scenario` runs, if any.
    pub fn of(scenario: &Scenario) -> Option<&'static Broken> {
        BROKEN.iter().find(|broken| {
            let made = broken.scenario(Scenario::new(scenario.seed, scenario.seconds));
            made.switches == scenario.switches && made.drift_scale == scenario.drift_scale
        })
    }

    /// `base` with this variant's breakage.
    pub fn scenario(&self, base: Scenario) -> Scenario {
        let mut switches = UnsafeSwitches::default();
        let mut drift_scale = 1;
        let mut faults = base.faults;
        match self.breakage {
            Breakage::NoFencing => switches.no_fencing = true,
            Breakage::VolatileTokenCounter => {
                switches.volatile_token_counter = true;
                faults = CRASH_FAULTS;
            }
            Breakage::LocalExpiry => switches.local_expiry = true,
            Breakage::LocalReads => switches.local_reads = true,
            Breakage::UnconfirmedRenewals => switches.unconfirmed_renewals = true,
            Breakage::ClocksBeyondBound(scale) => drift_scale = scale,
        }
        Scenario {
            switches,
            drift_scale,
            faults,
            ..base
        }
    }
}

/// Seconds of virtual time each seed of a broken variant runs.
const BROKEN_SECONDS: u64 = 60;

fn is_caught_within_its_bound_and_replays(name: &str) {
    let broken = Broken::named(name).expect("a listed variant");
    for seed in 1..=broken.bound {
        let scenario = broken.scenario(Scenario::new(seed, BROKEN_SECONDS));
        let (first, _) = run(&scenario);
        let Some(violation) = first.violations.first() else {
            continue;
        };
        eprintln!(
            "{name}: caught by seed {seed} (trace {:016x}): {violation}",
            first.trace.hash
        );
        assert!(
            broken.expected.iter().any(|e| violation.contains(e)),
            "{name}: seed {seed} failed, but not as expected ({:?}): {violation}\nreplay: {}",
            broken.expected,
            replay_command(&scenario)
        );
        let (again, _) = run(&scenario);
        assert_eq!(
            first,
            again,
            "{name}: seed {seed} did not replay to the same failure\nreplay: {}",
            replay_command(&scenario)
        );
        return;
    }
    panic!("{name}: not caught by seeds 1..={}", broken.bound);
}

#[test]
fn checker_catches_fenced_writes_applied_without_a_token_check() {
    is_caught_within_its_bound_and_replays("no-fencing");
}

#[test]
fn checker_catches_a_token_counter_that_is_not_persisted() {
    is_caught_within_its_bound_and_replays("volatile-token-counter");
}

#[test]
fn checker_catches_lease_expiry_that_bypasses_raft() {
    is_caught_within_its_bound_and_replays("local-expiry");
}

#[test]
fn checker_catches_reads_served_without_read_index() {
    is_caught_within_its_bound_and_replays("local-reads");
}

#[test]
fn checker_catches_renewals_by_an_unconfirmed_leader() {
    is_caught_within_its_bound_and_replays("unconfirmed-renewals");
}

#[test]
fn checker_catches_leases_expired_early_by_clocks_beyond_the_drift_bound() {
    is_caught_within_its_bound_and_replays("clocks-beyond-drift-bound");
}
