//! Runs one fuzz target: proptest cases from a seed, as many as CI allows
//! or for as long as a fuzzing campaign asks.
//!
//! - `LATCHKEY_FUZZ_CASES`: cases per seed (default: the target's own,
//!   small enough that every target together takes seconds).
//! - `LATCHKEY_FUZZ_SEED`: the seed (default: fixed per target, so CI runs
//!   the same cases every time). A failure prints the seed that replays it.
//! - `LATCHKEY_FUZZ_SECS`: keep going with fresh seeds (drawn from the
//!   clock) until that many seconds have passed.
//!
//! Every run ends with one line, `fuzz TARGET: cases=N seeds=S secs=T`,
//! which `scripts/fuzz` collects. A failing case is shrunk by proptest and
//! reported with its seed, the smallest input found and the replay command.

use std::cell::Cell;
use std::fmt::Debug;
use std::sync::Once;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

thread_local! {
    /// Panics are expected while a case is shrunk; their messages are kept
    /// in the report instead of flooding the output.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Longest a failing case is shrunk.
const MAX_SHRINK_TIME: Duration = Duration::from_secs(120);

/// Runs `test` on values of `strategy`; panics with a replayable report on
/// the first failure.
pub fn run<S>(
    target: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    install_quiet_hook();
    let cases = env_u64("LATCHKEY_FUZZ_CASES").map_or(default_cases, |n| n.max(1) as u32);
    let fixed_seed = env_u64("LATCHKEY_FUZZ_SEED");
    let budget = env_u64("LATCHKEY_FUZZ_SECS").map(Duration::from_secs);
    let started = Instant::now();
    let calls = Cell::new(0u64);
    let counted = |value: S::Value| {
        calls.set(calls.get() + 1);
        test(value)
    };
    let mut seeds = 0u64;
    let mut failure = None;
    loop {
        let seed = match (fixed_seed, seeds) {
            (Some(seed), 0) => seed,
            (None, 0) if budget.is_none() => default_seed(target),
            _ => fresh_seed(seeds),
        };
        seeds += 1;
        if let Err(report) = run_seed(target, seed, cases, &strategy, &counted) {
            failure = Some(report);
            break;
        }
        let more = budget.is_some_and(|budget| started.elapsed() < budget);
        if !more {
            break;
        }
    }
    // Cases run, shrinking steps of a failure included.
    println!(
        "fuzz {target}: cases={} seeds={seeds} secs={:.1}{}",
        calls.get(),
        started.elapsed().as_secs_f64(),
        if failure.is_some() { " FAILED" } else { "" }
    );
    if let Some(report) = failure {
        panic!("{report}");
    }
}

fn run_seed<S>(
    target: &str,
    seed: u64,
    cases: u32,
    strategy: &S,
    test: &impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> Result<(), String>
where
    S: Strategy,
    S::Value: Debug,
{
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_time: MAX_SHRINK_TIME.as_millis() as u32,
        max_shrink_iters: 100_000,
        ..Config::default()
    };
    let mut seed_bytes = [0u8; 32];
    for chunk in seed_bytes.chunks_mut(8) {
        chunk.copy_from_slice(&seed.to_le_bytes());
    }
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(config, rng);
    QUIET.with(|quiet| quiet.set(true));
    let outcome = runner.run(strategy, test);
    QUIET.with(|quiet| quiet.set(false));
    match outcome {
        Ok(()) => Ok(()),
        Err(TestError::Fail(reason, input)) => Err(format!(
            "fuzz {target} failed with seed {seed}: {reason}\n\
             smallest input found:\n{input:#?}\n\
             replay: LATCHKEY_FUZZ_SEED={seed} LATCHKEY_FUZZ_CASES={cases} \
             cargo nextest run --workspace -E 'binary(fuzz_decoders) & test(={target})'"
        )),
        Err(TestError::Abort(reason)) => {
            Err(format!("fuzz {target} aborted with seed {seed}: {reason}"))
        }
    }
}

/// The seed CI uses for `target`: fixed, different per target.
fn default_seed(target: &str) -> u64 {
    target.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A new seed for a long run: the clock, mixed with the round.
fn fresh_seed(round: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ round.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={value:?} is not a whole number"),
    }
}

fn install_quiet_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                default(info);
            }
        }));
    });
}
