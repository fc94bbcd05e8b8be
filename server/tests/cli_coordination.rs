//! The lease, lock and election commands of the real `latchkey` binary,
//! against an in-process 3-node cluster on loopback.
//!
//! Every command runs with a deadline and is killed when its handle is
//! dropped (`kill_on_drop`), so a failed assertion leaves no process behind.
//! Time bounds here are generous deadlines for things that must happen, not
//! performance checks; measured times are printed for the record.

mod support;

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use latchkey_server::types::NodeId;
use support::TestCluster;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const LATCHKEY: &str = env!("CARGO_BIN_EXE_latchkey");
/// For a command that should finish promptly.
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

struct Cli {
    endpoints: String,
}

impl Cli {
    async fn start() -> (TestCluster, Cli) {
        let cluster = TestCluster::start(3, 10_000).await;
        cluster.leader().await;
        let endpoints = cluster
            .configs
            .values()
            .map(|config| config.advertise_client.clone())
            .collect::<Vec<_>>()
            .join(",");
        (cluster, Cli { endpoints })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(LATCHKEY);
        command
            .args(args)
            .env("LATCHKEY_ENDPOINTS", &self.endpoints)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }

    /// Runs a command to completion within [`COMMAND_DEADLINE`].
    async fn run(&self, args: &[&str]) -> Output {
        let child = self.command(args).spawn().expect("spawn latchkey");
        finish(child, args).await
    }

    /// Runs a command that must succeed and returns its stdout, trimmed.
    async fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args).await;
        assert_eq!(
            output.status.code(),
            Some(0),
            "latchkey {args:?}: {}",
            text(&output.stderr)
        );
        text(&output.stdout).trim().to_string()
    }

    /// The id of the lease that holds lock or election `name`, once one does.
    async fn lease_holding(&self, name: &str) -> String {
        let deadline = Instant::now() + COMMAND_DEADLINE;
        // Bounded by the deadline.
        while Instant::now() < deadline {
            for id in self.ok(&["lease", "list"]).await.lines() {
                let id = id.split('\t').next().expect("an id column");
                let ttl = self.run(&["lease", "ttl", id, "--json"]).await;
                if text(&ttl.stdout).contains(&format!("\"name\":\"{name}\"")) {
                    return id.to_string();
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no lease holds {name:?} after {COMMAND_DEADLINE:?}");
    }
}

async fn finish(child: Child, args: &[&str]) -> Output {
    tokio::time::timeout(COMMAND_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("latchkey {args:?} did not finish in {COMMAND_DEADLINE:?}"))
        .expect("wait for latchkey")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn code(output: &Output) -> Option<i32> {
    output.status.code()
}

/// Reads stdout lines of a running child until one satisfies `want`.
async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    want: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + COMMAND_DEADLINE;
    // Bounded by the deadline.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for a line; saw {seen:?}"))
            .expect("read stdout")
            .unwrap_or_else(|| panic!("stdout ended; saw {seen:?}"));
        let done = want(&line);
        seen.push(line);
        if done {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_runs_a_command_with_its_fencing_token_and_lease_in_the_environment() {
    let (cluster, cli) = Cli::start().await;
    let printed = cli
        .ok(&[
            "lock",
            "job",
            "--",
            "sh",
            "-c",
            "echo $LATCHKEY_FENCING_TOKEN $LATCHKEY_LEASE_ID $LATCHKEY_LOCK",
        ])
        .await;
    let fields: Vec<&str> = printed.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{printed:?}");
    assert!(fields[0].parse::<u64>().expect("a token") > 0);
    assert!(fields[1].parse::<u64>().expect("a lease id") > 0);
    assert_eq!(fields[2], "job");

    // The command's exit code is passed through, and the lock is free again.
    let failed = cli.run(&["lock", "job", "--", "sh", "-c", "exit 3"]).await;
    assert_eq!(code(&failed), Some(3), "{}", text(&failed.stderr));
    let missing = cli
        .run(&["lock", "job", "--", "/nonexistent/program"])
        .await;
    assert_eq!(code(&missing), Some(127));
    assert!(text(&missing.stderr).contains("cannot run"));
    let free = cli.run(&["lock", "job", "--no-wait", "--", "true"]).await;
    assert_eq!(code(&free), Some(0), "{}", text(&free.stderr));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_lock_commands_never_overlap_and_the_second_token_is_higher() {
    let (cluster, cli) = Cli::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("log");
    let script = format!(
        "echo start $LATCHKEY_FENCING_TOKEN >> {log}; sleep 1; echo end $LATCHKEY_FENCING_TOKEN >> {log}",
        log = log.display()
    );
    let args = ["lock", "job", "--", "sh", "-c", script.as_str()];
    let first = cli.command(&args).spawn().expect("spawn");
    let second = cli.command(&args).spawn().expect("spawn");
    let (first, second) = tokio::join!(finish(first, &args), finish(second, &args));
    assert_eq!(code(&first), Some(0), "{}", text(&first.stderr));
    assert_eq!(code(&second), Some(0), "{}", text(&second.stderr));
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .expect("read log")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let token = |line: &str| -> u64 { line.split(' ').nth(1).unwrap().parse().unwrap() };
    // Each holder's start and end are adjacent: the runs did not overlap.
    assert!(
        lines[0].starts_with("start") && lines[1].starts_with("end"),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("start") && lines[3].starts_with("end"),
        "{lines:?}"
    );
    assert_eq!(token(&lines[0]), token(&lines[1]));
    assert_eq!(token(&lines[2]), token(&lines[3]));
    assert!(token(&lines[2]) > token(&lines[0]), "{lines:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_lease_stops_the_command_and_exits_with_the_lost_code() {
    let (cluster, cli) = Cli::start().await;
    let args = ["lock", "job", "--ttl", "10s", "--", "sleep", "60"];
    let holder = cli.command(&args).spawn().expect("spawn");
    let lease = cli.lease_holding("job").await;
    let revoked_at = Instant::now();
    cli.ok(&["lease", "revoke", &lease]).await;
    let output = finish(holder, &args).await;
    let took = revoked_at.elapsed();
    eprintln!("the command stopped {took:?} after the revoke");
    assert_eq!(code(&output), Some(7), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("lost lock \"job\""), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // The sleep had 50 s left: the command was stopped, not waited for.
    assert!(took < Duration::from_secs(20), "{took:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_the_lock_elsewhere_stops_the_command() {
    let (cluster, cli) = Cli::start().await;
    let args = ["lock", "job", "--json", "--", "sleep", "60"];
    let holder = cli.command(&args).spawn().expect("spawn");
    let lease = cli.lease_holding("job").await;
    let ttl = cli.ok(&["lease", "ttl", &lease, "--json"]).await;
    let ttl: serde_json::Value = serde_json::from_str(&ttl).expect("json");
    let token = ttl["grants"][0]["token"].as_u64().expect("a token");
    cli.ok(&["release", "job", "--token", &token.to_string()])
        .await;
    let output = finish(holder, &args).await;
    assert_eq!(code(&output), Some(7), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("released elsewhere"), "{stderr}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_without_a_command_prints_the_token_and_releases_when_input_ends() {
    let (cluster, cli) = Cli::start().await;
    let mut holder = cli
        .command(&["lock", "job"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(holder.stdout.take().expect("stdout")).lines();
    let seen = read_until(&mut lines, |_| true).await;
    let token: u64 = seen[0].parse().expect("the token alone on a line");
    assert!(token > 0);
    let held = cli.run(&["lock", "job", "--no-wait", "--", "true"]).await;
    assert_eq!(code(&held), Some(5), "{}", text(&held.stderr));
    drop(holder.stdin.take());
    let status = tokio::time::timeout(COMMAND_DEADLINE, holder.wait())
        .await
        .expect("exits once its input ends")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    let next = cli
        .ok(&[
            "lock",
            "job",
            "--no-wait",
            "--",
            "sh",
            "-c",
            "echo $LATCHKEY_FENCING_TOKEN",
        ])
        .await;
    assert!(next.parse::<u64>().expect("a token") > token);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_level_commands_report_held_stale_and_missing_with_their_exit_codes() {
    let (cluster, cli) = Cli::start().await;
    let a = cli.ok(&["lease", "grant", "--ttl", "30s"]).await;
    let b = cli.ok(&["lease", "grant", "--ttl", "30s"]).await;
    let token = cli.ok(&["acquire", "res", "--lease", &a]).await;
    let token_number: u64 = token.parse().expect("a token");

    let held = cli
        .run(&["acquire", "res", "--lease", &b, "--no-wait"])
        .await;
    assert_eq!(code(&held), Some(5), "{}", text(&held.stderr));
    assert!(text(&held.stderr).contains(&format!("lease {a}")));
    let waited = cli
        .run(&["acquire", "res", "--lease", &b, "--wait-timeout", "300ms"])
        .await;
    assert_eq!(code(&waited), Some(5), "{}", text(&waited.stderr));

    cli.ok(&["kv", "put", "k", "v1", "--lock", "res", "--token", &token])
        .await;
    let stale = (token_number - 1).to_string();
    let refused = cli
        .run(&["kv", "put", "k", "v2", "--lock", "res", "--token", &stale])
        .await;
    assert_eq!(code(&refused), Some(6), "{}", text(&refused.stderr));
    assert_eq!(
        cli.ok(&["kv", "get", "k"]).await,
        "v1",
        "a refused write changes nothing"
    );

    cli.ok(&["release", "res", "--token", &token]).await;
    let again = cli.run(&["release", "res", "--token", &token]).await;
    assert_eq!(code(&again), Some(6), "{}", text(&again.stderr));
    let late = cli
        .run(&["kv", "del", "k", "--lock", "res", "--token", &token])
        .await;
    assert_eq!(code(&late), Some(6), "{}", text(&late.stderr));

    let renewed = cli
        .ok(&["lease", "keepalive", &a, "--once", "--json"])
        .await;
    assert!(renewed.contains(&format!("\"lease\":{a}")), "{renewed}");
    cli.ok(&["lease", "revoke", &a]).await;
    for args in [
        ["lease", "ttl", a.as_str()],
        ["lease", "revoke", a.as_str()],
    ] {
        let missing = cli.run(&args).await;
        assert_eq!(
            code(&missing),
            Some(1),
            "{args:?}: {}",
            text(&missing.stderr)
        );
    }
    let listed = cli.ok(&["lease", "list", "--json"]).await;
    assert!(!listed.contains(&format!("\"lease\":{a},")), "{listed}");
    assert!(listed.contains(&format!("\"lease\":{b},")), "{listed}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_usage_error_that_changes_nothing() {
    let (cluster, cli) = Cli::start().await;
    for args in [
        vec!["lock", "job", "--ttl", "0s", "--", "true"],
        vec!["lock", "job", "--ttl", "25h", "--", "true"],
        vec!["kv", "put", "k", "v", "--token", "5"],
        vec!["kv", "put", "k", "v", "--lock", "res"],
        vec![
            "kv",
            "put",
            "k",
            "v",
            "--lock",
            "a",
            "--election",
            "b",
            "--token",
            "1",
        ],
        vec!["acquire", "res"],
        vec!["lease", "grant", "--ttl", "soon"],
        vec!["elect", "e", "--", "true"],
    ] {
        let output = cli.run(&args).await;
        assert_eq!(code(&output), Some(2), "{args:?}: {}", text(&output.stderr));
    }
    let missing = cli.run(&["kv", "get", "k"]).await;
    assert_eq!(code(&missing), Some(1), "no write happened");
    let listed = cli.ok(&["lease", "list"]).await;
    assert_eq!(listed, "", "no lease was granted");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_sees_every_leader_change_in_order() {
    let (cluster, cli) = Cli::start().await;
    let mut observer = cli.command(&["observe", "e"]).spawn().expect("spawn");
    let mut lines = BufReader::new(observer.stdout.take().expect("stdout")).lines();
    assert_eq!(read_until(&mut lines, |_| true).await, ["-"]);

    let no_leader = cli.run(&["leader", "e"]).await;
    assert_eq!(code(&no_leader), Some(1));

    // Leader "alpha" until its command ends, then "beta" until resigned.
    cli.ok(&["elect", "e", "--value", "alpha", "--", "sleep", "0.3"])
        .await;
    let mut beta = cli
        .command(&["elect", "e", "--value", "beta"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut beta_out = BufReader::new(beta.stdout.take().expect("stdout")).lines();
    // Kept open: `wait` would close it, and the end of input releases.
    let _beta_input = beta.stdin.take();
    let beta_token = read_until(&mut beta_out, |_| true).await[0].clone();
    assert_eq!(cli.ok(&["leader", "e"]).await, "beta");
    let leader: serde_json::Value =
        serde_json::from_str(&cli.ok(&["leader", "e", "--json"]).await).expect("json");
    assert_eq!(leader["holder"]["token"].to_string(), beta_token);
    cli.ok(&["resign", "e", "--token", &beta_token]).await;
    let beta_exit = tokio::time::timeout(COMMAND_DEADLINE, beta.wait())
        .await
        .expect("beta stops once its leadership ended")
        .expect("wait");
    assert_eq!(beta_exit.code(), Some(7));

    let seen = read_until(&mut lines, |line| {
        line.starts_with(&format!("{beta_token} "))
    })
    .await;
    let seen = [vec!["-".to_string()], seen].concat();
    let leaders: Vec<&str> = seen.iter().map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(leaders, ["-", "alpha", "-", "beta"], "{seen:?}");
    let tokens: Vec<u64> = seen
        .iter()
        .filter(|l| *l != "-")
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    assert_eq!(read_until(&mut lines, |_| true).await, ["-"]);
    drop(observer);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_holder_survives_the_loss_of_the_cluster_leader() {
    let (mut cluster, cli) = Cli::start().await;
    let args = ["lock", "job", "--ttl", "10s", "--", "sleep", "5"];
    let holder = cli.command(&args).spawn().expect("spawn");
    cli.lease_holding("job").await;
    let leader = cluster.leader().await;
    cluster.stop(leader).await;
    let output = finish(holder, &args).await;
    assert_eq!(code(&output), Some(0), "{}", text(&output.stderr));
    cluster.restart(NodeId(leader.0)).await;
    cluster.shutdown().await;
}
