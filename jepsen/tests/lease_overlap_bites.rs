//! `lease-overlap` must bite: one schedule, run twice on a real cluster.
//!
//! The schedule (`--nemesis clock-rate:leader+client-partition:holder`):
//! the running leader's clock is set to a rate, then the next worker to be
//! granted the lock is cut off from every node while its process runs on.
//! Its keepalives stop; it trusts its lock until its local deadline, send
//! time of its last acknowledged keepalive + TTL × (1 − 1 %) − 100 ms =
//! s + 1.88 s with TTL 2 s. The leader expires the lease TTL × (1 + 1 %) on
//! its own clock after it last renewed it, and hands the lock to a waiter.
//!
//! - Rate 2.0, far beyond the 1 % bound: expiry after ≈ 1.01 s of real
//!   time, so the waiter holds the lock while the cut holder still trusts
//!   it, for about 0.7 s (0.1 s at the least, when a renewal reached the
//!   leader but its answer was cut) — far above the checker's 50 ms
//!   tolerance. `lease-overlap` must say invalid; `fenced-writes` must
//!   still say valid, since the stale holder's write (if it gets one out
//!   after the heal) is refused by its token.
//! - Rate 1.01, the edge of the bound: expiry after ≥ 2.0 s, 0.12 s after
//!   the holder stopped trusting; no overlap, every checker valid.
//!
//! Each run has at least one fault cycle (20 s run, 4 s quiet, 5 s fault
//! interval: a cycle takes at most 10 s) and the cut fires at the next
//! grant, within milliseconds on a lock five workers contend for. A run
//! can still miss if no leader is known when the fault starts (the rate
//! then goes to a random node); the beyond-bound test therefore tries up
//! to [`ATTEMPTS`] seeds and reports each miss.
//!
//! Both runs use the server binary next to `latchkey-jepsen` (see
//! `harness_smoke.rs`) and run in the `real-clusters` nextest group.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use latchkey_jepsen::history::{read_jsonl, Op, OpType, Process};
use serde_json::Value;

/// A run's time limit plus startup, teardown and checking, with margin.
const RUN_BOUND: Duration = Duration::from_secs(150);
/// Seeds the beyond-bound test tries before it fails (module docs).
const ATTEMPTS: u64 = 2;
const SCHEDULE: &str = "clock-rate:leader+client-partition:holder";

fn jepsen_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_latchkey-jepsen"))
}

fn server_binary() -> PathBuf {
    let server = jepsen_binary()
        .parent()
        .expect("the binary has a directory")
        .join("latchkey");
    assert!(
        server.is_file(),
        "the server binary {} is missing: build it with `cargo build --workspace --bins`",
        server.display()
    );
    server
}

/// What one run left behind.
struct Run {
    code: Option<i32>,
    output: String,
    results: Value,
    ops: Vec<Op>,
}

impl Run {
    fn verdict(&self, checker: &str) -> Value {
        self.results["checkers"]
            .as_array()
            .and_then(|all| all.iter().find(|c| c["name"] == checker))
            .map(|c| c["valid"].clone())
            .unwrap_or_else(|| panic!("{checker} did not run; output:\n{}", self.output))
    }

    fn nemesis(&self, f: &str) -> Vec<&Op> {
        self.ops
            .iter()
            .filter(|op| op.process == Process::Nemesis && op.kind == OpType::Info && op.f == f)
            .collect()
    }
}

/// Runs the schedule with `rate` on a lock-fenced workload, bounded.
fn run(store: &Path, seed: u64, rate: &str) -> Run {
    let mut child = Command::new(jepsen_binary())
        .args(["test", "--workload", "lock-fenced", "--nemesis", SCHEDULE])
        .args(["--clock-rates", rate, "--time-limit", "20", "--quiet", "4s"])
        .args([
            "--fault-interval",
            "5s",
            "--concurrency",
            "5",
            "--ttl",
            "2s",
        ])
        .args(["--seed", &seed.to_string()])
        .arg("--store")
        .arg(store)
        .arg("--binary")
        .arg(server_binary())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("latchkey-jepsen starts");
    let started = Instant::now();
    // Bounded by RUN_BOUND; SIGTERM makes the harness tear down its cluster.
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > RUN_BOUND {
            // SAFETY: kill(2) with our own unreaped child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let status = child.wait().expect("wait");
            panic!("latchkey-jepsen ran past {RUN_BOUND:?}; stopped it ({status})");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = child.wait_with_output().expect("output");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let run_dir = std::fs::read_link(store.join("latest"))
        .map(|name| store.join(name))
        .unwrap_or_else(|_| panic!("no run directory; output:\n{output}"));
    let read = |file: &str| {
        std::fs::read(run_dir.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}; output:\n{output}"))
    };
    let results = serde_json::from_slice(&read("results.json")).expect("results parse");
    let ops = read_jsonl(&read("history.jsonl")[..]).expect("history parses");
    Run {
        code: status.code(),
        output,
        results,
        ops,
    }
}

/// Whether a holder was cut off and the lock then moved on to another
/// grant: the scenario happened, whatever the verdict.
fn lock_changed_hands_after_a_cut(run: &Run) -> bool {
    let Some(cut) = run.nemesis("client-cut").first().copied() else {
        return false;
    };
    let cut_token = cut.value["token"].as_u64();
    run.ops.iter().any(|op| {
        op.time > cut.time
            && op.kind == OpType::Ok
            && op.f == "acquire"
            && op.value["token"].as_u64() > cut_token
    })
}

#[test]
fn lease_overlap_reports_two_holders_when_the_leaders_clock_runs_twice_as_fast() {
    let mut misses = Vec::new();
    for seed in 1..=ATTEMPTS {
        let store = tempfile::tempdir().expect("tempdir");
        let run = run(store.path(), seed, "2.0");
        assert!(
            !run.nemesis("clock-rate").is_empty(),
            "no clock-rate step; output:\n{}",
            run.output
        );
        if run.verdict("lease-overlap") == Value::Bool(false) {
            assert_eq!(run.code, Some(1), "exit code; output:\n{}", run.output);
            assert_eq!(
                run.verdict("fenced-writes"),
                Value::Bool(true),
                "the fence must still stop the stale holder; output:\n{}",
                run.output
            );
            if !misses.is_empty() {
                eprintln!("bit on seed {seed} after missing: {misses:?}");
            }
            return;
        }
        misses.push(format!(
            "seed {seed}: no overlap ({} cuts, lock moved on: {}); output:\n{}",
            run.nemesis("client-cut").len(),
            lock_changed_hands_after_a_cut(&run),
            run.output
        ));
    }
    panic!("lease-overlap missed on every seed: {misses:#?}");
}

#[test]
fn lease_overlap_reports_nothing_with_the_same_schedule_within_the_drift_bound() {
    let store = tempfile::tempdir().expect("tempdir");
    let run = run(store.path(), 1, "1.01");
    assert!(
        lock_changed_hands_after_a_cut(&run),
        "the schedule did not happen (no cut holder whose lock moved on): the run proves nothing; output:\n{}",
        run.output
    );
    assert_eq!(
        run.verdict("lease-overlap"),
        Value::Bool(true),
        "output:\n{}\nresults: {:#}",
        run.output,
        run.results
    );
    assert_eq!(run.results["valid"], Value::Bool(true), "{:#}", run.results);
    assert_eq!(run.code, Some(0), "exit code; output:\n{}", run.output);
}
