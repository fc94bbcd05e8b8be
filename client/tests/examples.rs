//! The examples in `client/examples/` run to completion against a 5-node
//! in-process cluster and exit 0, which each does only when every claim it
//! prints held.
//!
//! Cargo builds the examples along with the tests (`cargo test` and
//! `cargo nextest run` both do); their binaries sit in the `examples`
//! directory next to this test's own.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use support::TestCluster;

/// Each example takes a few seconds; this is a deadline, not a measurement.
const EXAMPLE_DEADLINE: Duration = Duration::from_secs(120);

fn example(name: &str) -> PathBuf {
    let test_binary = std::env::current_exe().expect("current exe");
    // target/debug/deps/examples-HASH -> target/debug/examples/NAME
    let debug_dir = test_binary
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary is in target/PROFILE/deps");
    let path = debug_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing; build it with `cargo build --workspace --examples`",
        path.display()
    );
    path
}

async fn run_example(name: &str) {
    let cluster = TestCluster::start(5).await;
    cluster.leader().await;
    let child = tokio::process::Command::new(example(name))
        .env("LATCHKEY_ENDPOINTS", cluster.endpoints().join(","))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the example");
    let output = tokio::time::timeout(EXAMPLE_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within {EXAMPLE_DEADLINE:?}"))
        .expect("wait for the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{name} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    eprintln!("{stdout}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_example_runs_to_completion() {
    run_example("leader_election").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_counter_example_runs_to_completion() {
    run_example("fenced_counter").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_file_store_example_runs_to_completion() {
    run_example("fenced_file_store").await;
}
