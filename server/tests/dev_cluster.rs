//! Real-process tests: `latchkey dev` runs five `latchkey serve` processes on
//! free loopback ports in a temporary directory; the tests drive them with
//! `latchkey status` and `latchkey kv`, kill the leader with SIGKILL, and
//! restart the whole cluster from its data.
//!
//! Readiness is always polled with a deadline (never a bare sleep), and the
//! deadlines are generous: the tests check correctness, not speed. A guard
//! kills `latchkey dev` and every node listed in `cluster.json` when a test
//! ends, even by a failed assertion, so no process outlives its test.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

const LATCHKEY: &str = env!("CARGO_BIN_EXE_latchkey");
/// Five RocksDB-backed debug-build nodes on a small machine: be patient.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);
const FAILOVER_DEADLINE: Duration = Duration::from_secs(10);
/// `latchkey dev` gives its nodes 10 s to stop after SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// For commands that should finish promptly (a failed startup, a CLI call).
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A running `latchkey dev`; kills it and its nodes when dropped.
struct DevCluster {
    child: Option<Child>,
    dir: PathBuf,
    output: PathBuf,
}

/// One node as listed in `cluster.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ManifestNode {
    id: u64,
    pid: u32,
    client_addr: String,
    peer_addr: String,
    http_addr: String,
}

/// What `latchkey status --json` showed.
#[derive(Debug)]
struct View {
    /// id → (role, term, leader_id) of every node that answered.
    nodes: BTreeMap<u64, (String, u64, u64)>,
}

impl View {
    fn leaders(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, (role, _, _))| role == "leader")
            .map(|(id, _)| *id)
            .collect()
    }

    fn terms(&self) -> Vec<u64> {
        let mut terms: Vec<u64> = self.nodes.values().map(|(_, term, _)| *term).collect();
        terms.sort_unstable();
        terms.dedup();
        terms
    }

    /// Every node answered, exactly one leads, all are in its term and follow it.
    fn settled_leader(&self, expected_nodes: usize) -> Option<u64> {
        let leaders = self.leaders();
        let settled = self.nodes.len() == expected_nodes
            && leaders.len() == 1
            && self.terms().len() == 1
            && self
                .nodes
                .values()
                .all(|(_, _, leader)| *leader == leaders[0]);
        settled.then(|| leaders[0])
    }
}

impl DevCluster {
    fn start(dir: &Path, extra_args: &[&str]) -> DevCluster {
        std::fs::create_dir_all(dir).expect("create data dir");
        let output = dir.with_extension(format!("dev-{}.out", unique_suffix()));
        let log = std::fs::File::create(&output).expect("create dev output file");
        let mut command = Command::new(LATCHKEY);
        command
            .arg("dev")
            .arg("--data-dir")
            .arg(dir)
            .args(extra_args)
            .env_remove("LATCHKEY_ENDPOINTS")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone file handle"))
            .stderr(log)
            // Its own process group, so the guard can signal it as a unit.
            .process_group(0);
        // SAFETY: runs in the forked child before exec; prctl is
        // async-signal-safe and nothing is allocated. If the test is killed
        // (a runner timeout) before the guard runs, the kernel kills
        // `latchkey dev`, and its nodes die with it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("spawn latchkey dev");
        DevCluster {
            child: Some(child),
            dir: dir.to_path_buf(),
            output,
        }
    }

    fn manifest(&self) -> Option<Vec<ManifestNode>> {
        let text = std::fs::read_to_string(self.dir.join("cluster.json")).ok()?;
        parse_manifest(&text)
    }

    /// Waits until `cluster.json` lists `count` running nodes.
    fn running_nodes(&mut self, count: usize) -> Vec<ManifestNode> {
        self.poll(
            "cluster.json with every pid",
            STARTUP_DEADLINE,
            |cluster| match cluster.manifest() {
                Some(nodes) if nodes.len() == count && nodes.iter().all(|n| n.pid > 0) => Ok(nodes),
                other => Err(format!("{other:?}")),
            },
        )
    }

    /// Waits until every endpoint answers and they agree on one leader.
    fn settled_leader(&mut self, endpoints: &[String]) -> u64 {
        self.poll("a leader every node agrees on", STARTUP_DEADLINE, |_| {
            let view = status(endpoints)?;
            view.settled_leader(endpoints.len())
                .ok_or(format!("{view:?}"))
        })
    }

    /// Calls `check` until it succeeds or `deadline` passes; then fails the
    /// test with the last observation and the cluster's output.
    fn poll<T>(
        &mut self,
        what: &str,
        deadline: Duration,
        mut check: impl FnMut(&mut DevCluster) -> Result<T, String>,
    ) -> T {
        let start = Instant::now();
        loop {
            let last = match check(self) {
                Ok(value) => return value,
                Err(observation) => observation,
            };
            if start.elapsed() >= deadline {
                panic!(
                    "no {what} within {deadline:?}; last saw: {last}\n{}",
                    self.diagnostics()
                );
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "latchkey dev exited ({status}) while waiting for {what}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until `latchkey dev` has printed `needle`.
    fn wait_for_output(&mut self, needle: &str) {
        self.poll(
            &format!("{needle:?} in the output"),
            STARTUP_DEADLINE,
            |cluster| {
                let output = cluster.output_text();
                output.contains(needle).then_some(()).ok_or(output)
            },
        );
    }

    fn output_text(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    fn diagnostics(&self) -> String {
        let mut text = format!("--- latchkey dev output:\n{}", self.output_text());
        for id in 1..=9 {
            let log = self.dir.join(format!("node-{id}.log"));
            if let Ok(content) = std::fs::read_to_string(&log) {
                let tail: Vec<&str> = content.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                text.push_str(&format!(
                    "--- tail of {}:\n{}\n",
                    log.display(),
                    tail.join("\n")
                ));
            }
        }
        text
    }

    /// SIGTERMs `latchkey dev` and waits for it to exit.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("dev is running");
        signal(child.id(), libc::SIGTERM);
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait for latchkey dev") {
                return status;
            }
            if start.elapsed() >= STOP_DEADLINE {
                signal(child.id(), libc::SIGKILL);
                let _ = child.wait();
                panic!(
                    "latchkey dev did not exit within {STOP_DEADLINE:?} of SIGTERM\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: killpg has no memory-safety preconditions; the group is
            // the one `start` created for this child.
            unsafe {
                libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        // The nodes die with `latchkey dev` (PR_SET_PDEATHSIG); this is the
        // belt to those braces.
        for node in self.manifest().unwrap_or_default() {
            if node.pid > 0 && is_latchkey_process(node.pid) {
                signal(node.pid, libc::SIGKILL);
            }
        }
    }
}

fn parse_manifest(text: &str) -> Option<Vec<ManifestNode>> {
    let json: Value = serde_json::from_str(text).ok()?;
    json["nodes"]
        .as_array()?
        .iter()
        .map(|node| {
            Some(ManifestNode {
                id: node["id"].as_u64()?,
                pid: u32::try_from(node["pid"].as_u64()?).ok()?,
                client_addr: node["client_addr"].as_str()?.to_string(),
                peer_addr: node["peer_addr"].as_str()?.to_string(),
                http_addr: node["http_addr"].as_str()?.to_string(),
            })
        })
        .collect()
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn signal(pid: u32, signal: libc::c_int) {
    assert!(pid > 0, "refusing to signal pid 0 (our own process group)");
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

fn process_exists(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// Guards against signalling a recycled pid.
fn is_latchkey_process(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains("latchkey"))
        .unwrap_or(false)
}

/// Runs a command to completion within `deadline`, killing it if it hangs.
fn run(command: &mut Command, deadline: Duration) -> Output {
    let mut child = command
        .env_remove("LATCHKEY_ENDPOINTS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn latchkey");
    let pid = child.id();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        // stderr drains on its own thread so a chatty child cannot block on
        // a full pipe while stdout is being read.
        let stderr_reader = std::thread::spawn(move || {
            let mut err = Vec::new();
            if let Some(mut pipe) = stderr {
                let _ = pipe.read_to_end(&mut err);
            }
            err
        });
        let mut out = Vec::new();
        if let Some(mut pipe) = stdout {
            let _ = pipe.read_to_end(&mut out);
        }
        let err = stderr_reader.join().unwrap_or_default();
        let _ = sender.send((child.wait(), out, err));
    });
    match receiver.recv_timeout(deadline) {
        Ok((status, stdout, stderr)) => Output {
            status: status.expect("wait for latchkey"),
            stdout,
            stderr,
        },
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("{command:?} did not finish within {deadline:?}");
        }
    }
}

fn latchkey(args: &[&str]) -> Output {
    run(Command::new(LATCHKEY).args(args), COMMAND_DEADLINE)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `latchkey status --json` against `endpoints`.
fn status(endpoints: &[String]) -> Result<View, String> {
    let joined = endpoints.join(",");
    let output = latchkey(&[
        "status",
        "--endpoints",
        &joined,
        "--json",
        "--timeout",
        "2s",
    ]);
    let json: Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("status printed no JSON ({e}): {}", text(&output.stderr)))?;
    let mut nodes = BTreeMap::new();
    for node in json["nodes"].as_array().into_iter().flatten() {
        let field = |name: &str| node[name].as_u64().unwrap_or(0);
        let role = node["role"].as_str().unwrap_or("?").to_string();
        nodes.insert(field("id"), (role, field("term"), field("leader_id")));
    }
    Ok(View { nodes })
}

fn kv_put(endpoints: &str, key: &str, value: &str) -> Output {
    latchkey(&[
        "kv",
        "put",
        key,
        value,
        "--endpoints",
        endpoints,
        "--timeout",
        "10s",
    ])
}

fn kv_get(endpoints: &str, key: &str) -> Output {
    latchkey(&[
        "kv",
        "get",
        key,
        "--endpoints",
        endpoints,
        "--timeout",
        "10s",
    ])
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({}): stdout {:?}, stderr {:?}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// Every key in `expected` reads back with its value through `endpoints`.
fn assert_values(endpoints: &str, expected: &BTreeMap<String, String>) {
    for (key, value) in expected {
        let output = kv_get(endpoints, key);
        assert_success(&output, &format!("kv get {key}"));
        assert_eq!(
            text(&output.stdout).trim_end_matches('\n'),
            value,
            "value of {key}"
        );
    }
}

fn client_endpoints(nodes: &[ManifestNode]) -> Vec<String> {
    nodes.iter().map(|n| n.client_addr.clone()).collect()
}

#[test]
fn dev_cluster_survives_leader_kill_and_restarts_with_every_acknowledged_write() {
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = temp.path().join("cluster");
    let mut cluster = DevCluster::start(&dir, &["--nodes", "5"]);
    let nodes = cluster.running_nodes(5);
    let endpoints = client_endpoints(&nodes);
    let leader = cluster.settled_leader(&endpoints);
    let mut acknowledged = put_through_a_follower(&nodes, leader);

    let (old_leader, survivors) = cluster.kill_leader_and_await_successor(&nodes, leader);
    // The dead node comes first: the client must skip it.
    let with_dead_first = format!("{},{}", old_leader.client_addr, survivors.join(","));
    let output = kv_put(&with_dead_first, "after-failover", "still writable");
    assert_success(&output, "kv put after the leader was killed");
    acknowledged.insert("after-failover".into(), "still writable".into());
    assert_values(&survivors[0], &acknowledged);
    cluster.stop_and_check_every_node_is_gone(&nodes);

    // Same directory, no flags: the same cluster comes back with its data.
    let mut restarted = DevCluster::start(&dir, &[]);
    let again = restarted.running_nodes(5);
    assert_eq!(
        addresses(&again),
        addresses(&nodes),
        "restart changed ids or addresses"
    );
    restarted.settled_leader(&endpoints);
    assert_values(&endpoints.join(","), &acknowledged);
    restarted.stop_and_check_every_node_is_gone(&again);
}

#[test]
fn dev_cluster_nodes_serve_metrics_that_follow_a_lock_and_a_status_page() {
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = temp.path().join("cluster");
    let mut cluster = DevCluster::start(&dir, &["--nodes", "5"]);
    let nodes = cluster.running_nodes(5);
    let endpoints = client_endpoints(&nodes);
    let leader = cluster.settled_leader(&endpoints);
    let output = cluster.output_text();
    assert!(
        output.contains(&format!("status page: http://{}/", nodes[0].http_addr)),
        "dev prints where the status page is:\n{output}"
    );
    let http = |node: &ManifestNode| -> std::net::SocketAddr {
        node.http_addr.parse().expect("http_addr is IP:PORT")
    };
    let leader_http = http(nodes.iter().find(|n| n.id == leader).expect("leader"));
    let follower_http = http(nodes.iter().find(|n| n.id != leader).expect("follower"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        for node in &nodes {
            wait_for_metric(http(node), "latchkey_node_ready", |v| v == 1.0).await;
        }
        let client = latchkey_client::Client::connect(endpoints.iter().map(String::as_str))
            .await
            .expect("client connects");
        let lease = client
            .grant_lease(Duration::from_secs(10))
            .await
            .expect("lease");
        let guard = lease.lock("dev/metrics").await.expect("lock");
        for addr in [leader_http, follower_http] {
            let text = wait_for_metric(addr, "latchkey_locks_held", |v| v == 1.0).await;
            assert_eq!(
                support::http::sample(&text, "latchkey_grants_total{kind=\"lock\"}"),
                Some(1.0),
                "{text}"
            );
            assert_eq!(support::http::sample(&text, "latchkey_leases"), Some(1.0));
        }
        guard.release().await.expect("release");
        for addr in [leader_http, follower_http] {
            wait_for_metric(addr, "latchkey_locks_held", |v| v == 0.0).await;
        }
        lease.revoke().await.expect("revoke");
        wait_for_metric(leader_http, "latchkey_leases", |v| v == 0.0).await;
        let (code, page) = support::http::get(follower_http, "/")
            .await
            .expect("status page");
        assert_eq!(code, 200);
        assert!(page.contains("<title>latchkey status</title>"));
    });
    cluster.stop_and_check_every_node_is_gone(&nodes);
}

async fn wait_for_metric(
    addr: std::net::SocketAddr,
    name: &str,
    wanted: impl Fn(f64) -> bool,
) -> String {
    support::http::wait_for_sample(addr, name, wanted, STARTUP_DEADLINE).await
}

/// Writes five keys through a follower, which must redirect to the leader.
fn put_through_a_follower(nodes: &[ManifestNode], leader: u64) -> BTreeMap<String, String> {
    let follower = nodes.iter().find(|n| n.id != leader).expect("a follower");
    let mut acknowledged = BTreeMap::new();
    for i in 0..5 {
        let (key, value) = (format!("key-{i}"), format!("value {i}"));
        let output = kv_put(&follower.client_addr, &key, &value);
        assert_success(&output, "kv put through a follower");
        assert!(
            text(&output.stdout).starts_with("OK revision "),
            "{output:?}"
        );
        acknowledged.insert(key, value);
    }
    acknowledged
}

fn addresses(nodes: &[ManifestNode]) -> Vec<(u64, String, String)> {
    nodes
        .iter()
        .map(|n| (n.id, n.client_addr.clone(), n.peer_addr.clone()))
        .collect()
}

impl DevCluster {
    /// SIGKILLs the leader, waits for the others to elect another and for
    /// `latchkey dev` to report the death. Returns the dead node and the
    /// survivors' endpoints.
    fn kill_leader_and_await_successor(
        &mut self,
        nodes: &[ManifestNode],
        leader: u64,
    ) -> (ManifestNode, Vec<String>) {
        let old_leader = nodes
            .iter()
            .find(|n| n.id == leader)
            .expect("leader in manifest")
            .clone();
        signal(old_leader.pid, libc::SIGKILL);
        let survivors: Vec<String> = client_endpoints(nodes)
            .into_iter()
            .filter(|e| *e != old_leader.client_addr)
            .collect();
        self.poll("a new leader after SIGKILL", FAILOVER_DEADLINE, |_| {
            let view = status(&survivors)?;
            match view.leaders()[..] {
                [id] if id != leader && view.nodes.len() == survivors.len() => Ok(id),
                _ => Err(format!("{view:?}")),
            }
        });
        let exit_line = format!("node {leader} (pid {}) exited: signal 9", old_leader.pid);
        self.poll("the report of the kill", FAILOVER_DEADLINE, |cluster| {
            let output = cluster.output_text();
            output.contains(&exit_line).then_some(()).ok_or(output)
        });
        (old_leader, survivors)
    }

    /// Stops `latchkey dev` and checks it exited 0, took every node with it,
    /// and cleared their pids in `cluster.json`.
    fn stop_and_check_every_node_is_gone(&mut self, nodes: &[ManifestNode]) {
        let status = self.stop();
        assert!(
            status.success(),
            "latchkey dev exited with {status}\n{}",
            self.diagnostics()
        );
        for node in nodes {
            assert!(
                !process_exists(node.pid),
                "node {} (pid {}) outlived latchkey dev",
                node.id,
                node.pid
            );
        }
        let stopped = self.manifest().expect("cluster.json after stop");
        assert!(
            stopped.iter().all(|n| n.pid == 0),
            "pids not cleared: {stopped:?}"
        );
    }
}

/// Asserts a failed startup: non-zero exit, one stderr line containing
/// `needle`, no panic.
fn assert_one_line_failure(output: &Output, needle: &str) {
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, got {}: {stderr}",
        output.status
    );
    assert!(
        !stderr.contains("panicked"),
        "panic instead of an error: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "expected one stderr line, got: {stderr:?}"
    );
    assert!(stderr.contains(needle), "{needle:?} not in {stderr:?}");
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn serve(data_dir: &Path, id: &str, client: &str, peer: &str, cluster: &str) -> Output {
    let data_dir = data_dir.to_str().expect("utf-8 temp path");
    latchkey(&[
        "serve",
        "--id",
        id,
        "--data-dir",
        data_dir,
        "--listen-client",
        client,
        "--listen-peer",
        peer,
        "--initial-cluster",
        cluster,
    ])
}

#[test]
fn serve_with_an_id_missing_from_initial_cluster_exits_with_one_line_error() {
    let temp = tempfile::tempdir().expect("tempdir");
    let (client, peer) = (free_port(), free_port());
    let output = serve(
        &temp.path().join("node"),
        "9",
        &format!("127.0.0.1:{client}"),
        &format!("127.0.0.1:{peer}"),
        &format!("1=127.0.0.1:{peer}"),
    );
    assert_one_line_failure(&output, "--id 9");
}

#[test]
fn serve_on_a_port_in_use_exits_with_one_line_error_naming_the_port() {
    let temp = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let free = free_port();
    let cases = [
        (
            format!("127.0.0.1:{taken_port}"),
            format!("127.0.0.1:{free}"),
        ),
        (
            format!("127.0.0.1:{free}"),
            format!("127.0.0.1:{taken_port}"),
        ),
    ];
    for (case, (client, peer)) in cases.iter().enumerate() {
        let data_dir = temp.path().join(format!("node-{case}"));
        let output = serve(&data_dir, "1", client, peer, &format!("1={peer}"));
        assert_one_line_failure(&output, &taken_port.to_string());
    }
    drop(taken);
}

#[test]
fn dev_on_a_port_in_use_exits_with_one_line_error_naming_the_port() {
    let temp = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = temp.path().join("cluster");
    let output = latchkey(&[
        "dev",
        "--nodes",
        "1",
        "--base-port",
        &port.to_string(),
        "--data-dir",
        dir.to_str().expect("utf-8 temp path"),
    ]);
    assert_one_line_failure(&output, &format!("port {port}"));
    assert!(
        !dir.join("node-1").exists(),
        "a node was started despite the conflict"
    );
    drop(taken);
}

#[test]
fn client_commands_with_no_reachable_endpoint_exit_3_with_one_line_error() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    for args in [
        vec!["kv", "get", "k", "--endpoints", &endpoint],
        vec!["kv", "put", "k", "v", "--endpoints", &endpoint],
        vec!["status", "--endpoints", &endpoint],
    ] {
        let output = latchkey(&args);
        assert_eq!(output.status.code(), Some(3), "{args:?}: {output:?}");
        let stderr = text(&output.stderr);
        assert!(
            stderr.starts_with("latchkey: error: "),
            "{args:?}: {stderr:?}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr:?}");
    }
}

/// `latchkey member list --json` through `endpoints`: id → role.
fn member_roles(endpoints: &str) -> Result<BTreeMap<u64, String>, String> {
    let output = latchkey(&["member", "list", "--json", "--endpoints", endpoints]);
    if !output.status.success() {
        return Err(text(&output.stderr));
    }
    let members: Value = serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    let members = members.as_array().ok_or("not a JSON array")?;
    Ok(members
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap_or(0),
                m["role"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

#[test]
fn dev_cluster_grows_and_shrinks_through_membership_changes() {
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = temp.path().join("cluster");
    let mut cluster = DevCluster::start(&dir, &["--nodes", "3"]);
    let nodes = cluster.running_nodes(3);
    let endpoints = client_endpoints(&nodes);
    cluster.settled_leader(&endpoints);
    let output = kv_put(&endpoints.join(","), "kept", "across resizes");
    assert_success(&output, "kv put");
    let acknowledged = BTreeMap::from([("kept".to_string(), "across resizes".to_string())]);
    cluster.stop_and_check_every_node_is_gone(&nodes);

    // Grow: the same directory with --nodes 5 adds nodes 4 and 5.
    let mut grown = DevCluster::start(&dir, &["--nodes", "5"]);
    grown.wait_for_output("cluster resized to 5 nodes");
    let five = grown.running_nodes(5);
    assert_eq!(
        addresses(&five[..3]),
        addresses(&nodes),
        "the first three keep their ids and addresses"
    );
    let all = client_endpoints(&five).join(",");
    let roles = member_roles(&all).expect("member list");
    assert_eq!(
        roles,
        (1..=5).map(|id| (id, "voter".to_string())).collect(),
        "five voters"
    );
    // The new node serves the data the cluster had.
    assert_values(&five[4].client_addr, &acknowledged);
    grown.stop_and_check_every_node_is_gone(&five);

    // It restarts as five, with no resize.
    let mut again = DevCluster::start(&dir, &[]);
    let same = again.running_nodes(5);
    again.settled_leader(&client_endpoints(&same));
    again.stop_and_check_every_node_is_gone(&same);

    // Shrink to two: nodes 5, 4 and 3 are removed and their data deleted.
    let mut shrunk = DevCluster::start(&dir, &["--nodes", "2"]);
    shrunk.wait_for_output("cluster resized to 2 nodes");
    let two = shrunk.running_nodes(2);
    assert_eq!(two.iter().map(|n| n.id).collect::<Vec<_>>(), vec![1, 2]);
    let roles = member_roles(&client_endpoints(&two).join(",")).expect("member list");
    assert_eq!(
        roles,
        (1..=2).map(|id| (id, "voter".to_string())).collect(),
        "two voters"
    );
    for id in 3..=5 {
        assert!(
            !dir.join(format!("node-{id}")).exists(),
            "node {id}'s data dir is deleted"
        );
    }
    assert_values(&client_endpoints(&two).join(","), &acknowledged);
    shrunk.stop_and_check_every_node_is_gone(&two);
}

/// `latchkey`, with TLS (the dev CA and client certificate `cert`) and
/// extra environment; no endpoints or credentials from the test's own
/// environment leak in.
fn secure(dir: &Path, cert: Option<&str>, env: &[(&str, &str)], args: &[&str]) -> Output {
    let tls = dir.join("tls");
    let mut command = Command::new(LATCHKEY);
    command
        .args(args)
        .env_remove("LATCHKEY_USER")
        .env_remove("LATCHKEY_PASSWORD")
        .env_remove("LATCHKEY_TOKEN")
        .env("LATCHKEY_CACERT", tls.join("ca.pem"));
    match cert {
        Some(cert) => command
            .env("LATCHKEY_CERT", tls.join(format!("{cert}.pem")))
            .env("LATCHKEY_KEY", tls.join(format!("{cert}-key.pem"))),
        None => command
            .env_remove("LATCHKEY_CERT")
            .env_remove("LATCHKEY_KEY"),
    };
    for (name, value) in env {
        command.env(name, value);
    }
    run(&mut command, COMMAND_DEADLINE)
}

/// The root password `latchkey dev --auth` printed.
fn printed_password(output: &str) -> String {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix("export LATCHKEY_PASSWORD="))
        .expect("dev printed the root password")
        .to_string()
}

/// The DER of the certificate `addr` presents, trusting `ca`.
async fn served_certificate(addr: &str, ca: &Path, cert: &Path, key: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pki_types::CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(der.expect("ca pem")).expect("ca usable");
    }
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .map(|c| c.expect("cert pem"))
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).expect("key");
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth");
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let (_, session) = tls.get_ref();
    session.peer_certificates().expect("server certificate")[0].to_vec()
}

#[test]
fn dev_tls_auth_cluster_works_end_to_end_and_rotates_certificates_on_sighup() {
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = temp.path().join("cluster");
    let mut cluster = DevCluster::start(&dir, &["--tls", "--auth"]);
    let nodes = cluster.running_nodes(5);
    cluster.wait_for_output("export LATCHKEY_PASSWORD=");
    let output = cluster.output_text();
    assert!(output.contains("export LATCHKEY_CACERT="), "{output}");
    let password = printed_password(&output);
    let endpoints = client_endpoints(&nodes).join(",");
    let root_login = format!("root:{password}");
    let as_root = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--endpoints", endpoints.as_str()]);
        secure(&dir, Some("root"), &[("LATCHKEY_USER", &root_login)], &all)
    };

    // Status and writes over TLS, as root.
    let status = as_root(&["status", "--json"]);
    assert_success(&status, "status over TLS");
    assert_success(&as_root(&["kv", "put", "app/config", "v1"]), "root writes");
    let who = as_root(&["auth", "status"]);
    assert_success(&who, "auth status");
    assert!(
        text(&who.stdout).contains("enabled; you are root"),
        "{}",
        text(&who.stdout)
    );

    // A user who may lock app/* and nothing under billing/.
    for args in [
        vec!["role", "add", "app"],
        vec!["role", "grant", "app", "lock", "app/"],
        vec!["role", "grant", "app", "lease"],
        vec!["role", "grant", "app", "readwrite", "app/"],
        vec!["user", "add", "alice", "--new-password", "s3cret"],
        vec!["user", "grant-role", "alice", "app"],
    ] {
        assert_success(&as_root(&args), &args.join(" "));
    }
    let as_alice = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--endpoints", endpoints.as_str(), "--timeout", "3s"]);
        secure(
            &dir,
            Some("client"),
            &[("LATCHKEY_USER", "alice:s3cret")],
            &all,
        )
    };
    assert_success(&as_alice(&["kv", "get", "app/config"]), "alice reads app/");
    let denied = as_alice(&["kv", "get", "billing/ledger"]);
    assert_eq!(denied.status.code(), Some(4), "{}", text(&denied.stderr));
    assert!(
        text(&denied.stderr).contains("permission denied"),
        "{}",
        text(&denied.stderr)
    );

    // No credentials at all: the `client` certificate names no user.
    let anonymous = secure(
        &dir,
        Some("client"),
        &[],
        &["kv", "get", "app/config", "--endpoints", &endpoints],
    );
    assert_eq!(
        anonymous.status.code(),
        Some(4),
        "{}",
        text(&anonymous.stderr)
    );
    assert!(
        text(&anonymous.stderr).contains("unauthenticated"),
        "{}",
        text(&anonymous.stderr)
    );
    // A wrong password.
    let wrong = secure(
        &dir,
        Some("client"),
        &[("LATCHKEY_USER", "alice:nope")],
        &["kv", "get", "app/config", "--endpoints", &endpoints],
    );
    assert_eq!(wrong.status.code(), Some(4), "{}", text(&wrong.stderr));
    assert!(!text(&wrong.stderr).contains("nope"), "no secret is echoed");
    // Plaintext (no --cacert) to a TLS port fails quickly.
    let started = Instant::now();
    let plain = run(
        Command::new(LATCHKEY)
            .args(["status", "--endpoints", &endpoints, "--timeout", "1s"])
            .env_remove("LATCHKEY_CACERT")
            .env_remove("LATCHKEY_CERT")
            .env_remove("LATCHKEY_KEY"),
        COMMAND_DEADLINE,
    );
    assert_ne!(plain.status.code(), Some(0), "plaintext is refused");
    assert!(started.elapsed() < Duration::from_secs(10));

    // The client crate: TLS with a client certificate, and a password login.
    let tls_dir = dir.join("tls");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let tls = latchkey_client::TlsConfig::from_files(
            &tls_dir.join("ca.pem"),
            Some(&tls_dir.join("client.pem")),
            Some(&tls_dir.join("client-key.pem")),
        )
        .expect("tls config");
        let client = latchkey_client::Client::builder(client_endpoints(&nodes))
            .tls(tls)
            .credentials("alice", "s3cret")
            .connect()
            .await
            .expect("alice connects");
        let lease = client
            .grant_lease(Duration::from_secs(10))
            .await
            .expect("lease");
        let guard = lease.lock("app/job").await.expect("alice locks app/job");
        match lease.lock("billing/run").await {
            Err(latchkey_client::Error::PermissionDenied { resource, .. }) => {
                assert_eq!(resource, "billing/run")
            }
            other => panic!("billing/run must be refused, got {:?}", other.map(|_| ())),
        }
        guard.release().await.expect("release");
        lease.revoke().await.expect("revoke");
    });

    // Rotate every node's certificate and SIGHUP the nodes: the cluster
    // stays up and serves the new certificates.
    let first = nodes[0].client_addr.clone();
    let (ca, root_cert, root_key) = (
        tls_dir.join("ca.pem"),
        tls_dir.join("root.pem"),
        tls_dir.join("root-key.pem"),
    );
    let before = runtime.block_on(served_certificate(&first, &ca, &root_cert, &root_key));
    for node in &nodes {
        for file in [
            format!("node-{}.pem", node.id),
            format!("node-{}-key.pem", node.id),
        ] {
            std::fs::remove_file(tls_dir.join(file)).expect("remove old certificate");
        }
        latchkey_server::dev::tls::ensure_node(&dir, node.id).expect("new certificate");
        signal(node.pid, libc::SIGHUP);
    }
    let new_der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_file(
            tls_dir.join(format!("node-{}.pem", nodes[0].id)),
        )
        .expect("new cert")
        .to_vec()
    };
    cluster.poll("the new certificate served", STARTUP_DEADLINE, |_| {
        let served = runtime.block_on(served_certificate(&first, &ca, &root_cert, &root_key));
        (served == new_der && served != before)
            .then_some(())
            .ok_or_else(|| "old certificate still served".to_string())
    });
    for node in &nodes {
        assert!(process_exists(node.pid), "node {} survived SIGHUP", node.id);
    }
    assert_success(
        &as_root(&["kv", "put", "app/config", "v2"]),
        "writes after rotation",
    );
    let got = as_root(&["kv", "get", "app/config"]);
    assert_success(&got, "read after rotation");
    assert_eq!(text(&got.stdout).trim(), "v2");
    cluster.stop_and_check_every_node_is_gone(&nodes);
}
