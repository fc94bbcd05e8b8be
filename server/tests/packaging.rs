//! The packaging (`Dockerfile`, `docker-compose.yml`, the systemd unit and
//! its example config) checked against this build's binary by
//! `scripts/check-packaging`: the compose file's structure, the example
//! config's keys, `systemd-analyze verify` where installed, and the five
//! compose services' commands run for real on 127.0.0.11-15 until they
//! agree on a leader. The Docker image build is left to the script's manual
//! runs (it needs a Docker engine and the network).

use std::process::Command;
use std::time::{Duration, Instant};

const LATCHKEY: &str = env!("CARGO_BIN_EXE_latchkey");
/// The script's own deadline for the election is 30 s; this bounds the rest.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(180);

#[test]
fn compose_services_run_as_a_five_node_cluster_that_elects_a_leader() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/check-packaging");
    let mut child = Command::new(script)
        .args(["--binary", LATCHKEY, "--no-docker-build"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("scripts/check-packaging starts");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > SCRIPT_DEADLINE {
            // The script's EXIT trap stops the nodes it started.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            panic!("scripts/check-packaging did not finish within {SCRIPT_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "check-packaging failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("leader") && stdout.contains("healthz"),
        "the stand-in cluster elected a leader and answered /healthz:\n{stdout}"
    );
}
