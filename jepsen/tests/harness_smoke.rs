//! Short end-to-end runs of `latchkey-jepsen test` on the binaries cargo
//! built: a real 5-node cluster under faults, a recorded history, the
//! checkers' verdict and the report.
//!
//! The server binary is the `latchkey` in the same target directory as
//! `latchkey-jepsen` (`cargo build --workspace --bins`, or a `--workspace`
//! test run, builds it). Where network namespaces cannot be made (not root,
//! no `ip`/`iptables`) the harness falls back to loopback by itself; these
//! tests run either way, never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A run's time limit plus startup, teardown and checking, with margin.
const RUN_BOUND: Duration = Duration::from_secs(240);

fn jepsen_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_latchkey-jepsen"))
}

fn server_binary() -> PathBuf {
    let jepsen = jepsen_binary();
    let server = jepsen
        .parent()
        .expect("the binary has a directory")
        .join("latchkey");
    assert!(
        server.is_file(),
        "the server binary {} is missing: build it with `cargo build --workspace --bins` \
         (CARGO_TARGET_DIR={}) or run the tests with --workspace",
        server.display(),
        jepsen
            .parent()
            .and_then(Path::parent)
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    server
}

/// Runs `latchkey-jepsen test ARGS --store STORE`, bounded; returns the
/// exit code, stdout+stderr, and the run directory.
fn run_test(store: &Path, args: &[&str]) -> (Option<i32>, String, PathBuf) {
    let mut child = Command::new(jepsen_binary())
        .arg("test")
        .args(args)
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
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let run_dir = std::fs::read_dir(store)
        .expect("the store exists")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir() && !p.ends_with("latest"))
        .unwrap_or_else(|| panic!("no run directory in {}; output:\n{text}", store.display()));
    (status.code(), text, run_dir)
}

fn assert_complete_and_valid(code: Option<i32>, output: &str, run_dir: &Path) {
    for file in ["history.jsonl", "results.json", "index.html"] {
        assert!(
            run_dir.join(file).is_file(),
            "{file} missing; output:\n{output}"
        );
    }
    let history = std::fs::read(run_dir.join("history.jsonl")).expect("history");
    let ops = latchkey_jepsen::history::read_jsonl(&history[..]).expect("history parses");
    let completions = ops
        .iter()
        .filter(|op| op.kind == latchkey_jepsen::history::OpType::Ok)
        .count();
    assert!(
        completions > 50,
        "only {completions} ops succeeded; output:\n{output}"
    );
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("results.json")).expect("results"))
            .expect("results parse");
    assert_eq!(
        results["valid"],
        serde_json::json!(true),
        "output:\n{output}\nresults: {results:#}"
    );
    assert_eq!(code, Some(0), "exit code; output:\n{output}");
    let report = std::fs::read_to_string(run_dir.join("index.html")).expect("report");
    assert!(
        report.contains("<svg") && report.contains("--seed"),
        "report lacks the timeline or the rerun line"
    );
}

#[test]
fn lock_fenced_run_under_partition_kill_and_pause_is_valid_and_reported() {
    let store = tempfile::tempdir().expect("tempdir");
    let (code, output, run_dir) = run_test(
        store.path(),
        &[
            "--workload",
            "lock-fenced",
            "--nemesis",
            "partition,kill,pause",
            "--time-limit",
            "25",
            "--fault-interval",
            "3s",
            "--quiet",
            "4s",
            "--concurrency",
            "5",
            "--seed",
            "11",
        ],
    );
    assert_complete_and_valid(code, &output, &run_dir);
    let history = std::fs::read_to_string(run_dir.join("history.jsonl")).expect("history");
    assert!(
        history.contains("\"process\":\"nemesis\",\"type\":\"info\",\"f\":\"heal\"")
            || history.contains("\"f\":\"start\""),
        "no fault was healed: the nemesis did not run\n{output}"
    );
}

/// A 15 s `register` run on loopback: 4 workers, a fault every 3–6 s.
fn short_register_on_loopback<'a>(nemesis: &'a str, seed: &'a str) -> [&'a str; 16] {
    [
        "--workload",
        "register",
        "--nemesis",
        nemesis,
        "--network",
        "loopback",
        "--time-limit",
        "15",
        "--fault-interval",
        "3s",
        "--quiet",
        "3s",
        "--concurrency",
        "4",
        "--seed",
        seed,
    ]
}

#[test]
fn register_run_on_the_loopback_fallback_is_valid() {
    let store = tempfile::tempdir().expect("tempdir");
    let (code, output, run_dir) = run_test(
        store.path(),
        &short_register_on_loopback("partition,kill", "5"),
    );
    assert_complete_and_valid(code, &output, &run_dir);
    let results = std::fs::read_to_string(run_dir.join("results.json")).expect("results");
    assert!(
        results.contains("loopback-proxy"),
        "results do not say which network ran"
    );
}

/// Every cycle stalls the leader's disk for 1.8–3.6 s, an election timeout
/// (200–400 ms) many times over. A stalled leader must stop taking input
/// and so stop heartbeating: another node leads before each stall ends.
/// And it must stop keeping its clients waiting: ops complete at the new
/// leader while the old one's disk still hangs, from a second after the
/// stall began (the client call timeout here is 2 s).
#[test]
fn a_leader_whose_disk_stalls_is_replaced_and_the_run_stays_valid() {
    use latchkey_jepsen::history::{OpType, Process};

    let store = tempfile::tempdir().expect("tempdir");
    let (code, output, run_dir) = run_test(
        store.path(),
        &short_register_on_loopback("disk-stall:leader", "7"),
    );
    assert_complete_and_valid(code, &output, &run_dir);
    let history = std::fs::read(run_dir.join("history.jsonl")).expect("history");
    let ops = latchkey_jepsen::history::read_jsonl(&history[..]).expect("history parses");
    /// A stall of a known leader: the stalled node, when it began and
    /// ended, and whether another node was seen leading meanwhile.
    #[derive(Debug)]
    struct Stall {
        node: u64,
        began: u64,
        ended: Option<u64>,
        replaced: bool,
    }
    let mut stalls: Vec<Stall> = Vec::new();
    for op in ops
        .iter()
        .filter(|op| op.process == Process::Nemesis && op.kind == OpType::Info)
    {
        let current = stalls.last_mut().filter(|stall| stall.ended.is_none());
        match op.f.as_str() {
            "disk-stall" => {
                let description = op.value["description"].as_str().unwrap_or_default();
                // A stall of a random node (no leader known) proves nothing.
                if description.contains("(leader)") {
                    stalls.push(Stall {
                        node: op.value["nodes"][0].as_u64().expect("a stalled node"),
                        began: op.time,
                        ended: None,
                        replaced: false,
                    });
                }
            }
            "disk-stall-end" => {
                if let Some(stall) = current {
                    stall.ended = Some(op.time);
                }
            }
            "status" if op.value["role"] == "leader" => {
                if let Some(stall) = current {
                    if op.value["node"].as_u64() != Some(stall.node) {
                        stall.replaced = true;
                    }
                }
            }
            _ => {}
        }
    }
    assert!(
        !stalls.is_empty(),
        "no leader's disk stalled; output:\n{output}"
    );
    let second = Duration::from_secs(1).as_nanos() as u64;
    for stall in &stalls {
        assert!(
            stall.replaced,
            "a leader whose disk hung led until the stall ended: {stall:?}; output:\n{output}"
        );
        let ended = stall.ended.expect("every stall ends at the heal");
        let served = ops.iter().any(|op| {
            matches!(op.process, Process::Client(_))
                && op.kind == OpType::Ok
                && op.time > stall.began + second
                && op.time < ended
        });
        assert!(
            served,
            "no op completed from a second into the stall to its end: {stall:?}; output:\n{output}"
        );
    }
}
