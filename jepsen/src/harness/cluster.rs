//! The `latchkey serve` processes of a run: start, kill -9, SIGSTOP and
//! SIGCONT, restart with a skewed clock, status, teardown.
//!
//! One [`Cluster`] owns every node process; the nemesis and the status
//! poller share it behind one async mutex, so a pid is signalled only while
//! it still names our (unreaped) child.
//!
//! Each node runs in its own process group (a Ctrl-C in the terminal reaches
//! only the harness, which then tears down in order), in its namespace when
//! there is one, with its stdout/stderr appended to `RUN/nodes/nI.log`, and
//! dies with the harness (`spawn`). `kill_on_drop` covers a panic that
//! unwinds past the cluster.
//!
//! Every node gets `--max-clock-drift-ppm` (the run's drift bound), and
//! `--unsafe-no-fencing` / `--unsafe-unconfirmed-renewals` when the run
//! asks for them.
//!
//! # Clocks
//! Two ways to make a node's clock run at another rate:
//! - **on a running node** ([`Cluster::set_clock_rate`]): with
//!   `clock_rate_files`, every node is started with
//!   `--unsafe-clock-rate-file RUN/nodes/nI.clock-rate`; the node re-reads
//!   the file every 100 ms and its lease deadlines *and* Raft ticks follow
//!   the rate written there from then on, without a jump. This is how a
//!   clock fault hits a leader mid-term.
//! - **at a restart** ([`ClockSkew`]): the node runs under libfaketime
//!   (`LD_PRELOAD`, `FAKETIME="+OFFSETs xRATE"`), which fakes its monotonic
//!   clock too, and also offsets its wall clock. The skew is fixed at exec.
//!
//! # Disks
//! With `disk_stall_files`, every node is started with
//! `--unsafe-disk-stall-file RUN/nodes/nI.disk-stall`: while that file
//! exists, the node's syncs (its Raft log's fsync, every synced write) wait
//! for it to be removed, as on a disk whose flushes hang; its unsynced
//! writes, reads and network go on ([`Cluster::set_disk_stall`]).
//!
//! # Not done yet
//! - A node restarted by `kill` keeps the rate its file says; the nemesis
//!   writes every file back to 1 at its heal. A stalled disk stays stalled
//!   across a restart the same way.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use latchkey_proto::v1::cluster_client::ClusterClient;
use latchkey_proto::v1::{Role, StatusRequest, StatusResponse};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

use super::net::NodeAddrs;
use super::spawn::spawn_child;

/// How long a node gets to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for a SIGKILLed child to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);
/// Bound on one status request.
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(800);

/// A clock a node runs under, applied with libfaketime.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClockSkew {
    pub offset_s: i64,
    pub rate: f64,
}

impl ClockSkew {
    fn faketime_spec(&self) -> String {
        // Rates within a drift bound need more than two decimals (0.995).
        format!("{:+}s x{}", self.offset_s, self.rate)
    }
}

/// How the nodes are started.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub binary: PathBuf,
    pub unsafe_no_fencing: bool,
    pub unsafe_unconfirmed_renewals: bool,
    /// The drift bound every node is told (`--max-clock-drift-ppm`).
    pub max_clock_drift_ppm: u64,
    /// Start every node with `--unsafe-clock-rate-file`, so that
    /// [`Cluster::set_clock_rate`] works.
    pub clock_rate_files: bool,
    /// Start every node with `--unsafe-disk-stall-file`, so that
    /// [`Cluster::set_disk_stall`] works.
    pub disk_stall_files: bool,
    /// libfaketime's shared object, when installed.
    pub faketime_lib: Option<PathBuf>,
}

struct Node {
    addrs: NodeAddrs,
    data_dir: PathBuf,
    log: PathBuf,
    /// `RUN/nodes/nI.clock-rate`, read by the node when `clock_rate_files`.
    rate_file: PathBuf,
    /// `RUN/nodes/nI.disk-stall`: its syncs wait while it exists, when
    /// `disk_stall_files`.
    stall_file: PathBuf,
    child: Option<Child>,
    paused: bool,
    clock: Option<ClockSkew>,
    /// Set when we killed it, so that its exit is not reported as a crash.
    expected_exit: bool,
    channel: Channel,
}

/// One process per node; see the module docs.
pub struct Cluster {
    options: NodeOptions,
    nodes: Vec<Node>,
}

/// A node that exited without being told to.
#[derive(Debug, Clone)]
pub struct UnexpectedExit {
    pub node: u64,
    pub how: String,
}

impl Cluster {
    /// Describes the nodes; starts none.
    pub fn new(
        options: NodeOptions,
        addrs: &[NodeAddrs],
        run_dir: &Path,
    ) -> Result<Cluster, String> {
        let nodes_dir = run_dir.join("nodes");
        std::fs::create_dir_all(&nodes_dir)
            .map_err(|e| format!("cannot create {}: {e}", nodes_dir.display()))?;
        let nodes = addrs
            .iter()
            .map(|addrs| {
                let channel = Endpoint::from_shared(format!("http://{}", addrs.client))
                    .map_err(|e| format!("bad address {}: {e}", addrs.client))?
                    .connect_timeout(STATUS_TIMEOUT)
                    .connect_lazy();
                Ok(Node {
                    data_dir: nodes_dir.join(format!("n{}-data", addrs.id)),
                    log: nodes_dir.join(format!("n{}.log", addrs.id)),
                    rate_file: nodes_dir.join(format!("n{}.clock-rate", addrs.id)),
                    stall_file: nodes_dir.join(format!("n{}.disk-stall", addrs.id)),
                    addrs: addrs.clone(),
                    child: None,
                    paused: false,
                    clock: None,
                    expected_exit: false,
                    channel,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Cluster { options, nodes })
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.addrs.id).collect()
    }

    /// Client endpoints of every node, `HOST:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.addrs.client.to_string())
            .collect()
    }

    pub fn logs(&self) -> Vec<(u64, PathBuf)> {
        self.nodes
            .iter()
            .map(|n| (n.addrs.id, n.log.clone()))
            .collect()
    }

    fn node(&mut self, id: u64) -> &mut Node {
        let index = self
            .nodes
            .iter()
            .position(|n| n.addrs.id == id)
            .unwrap_or_else(|| panic!("node {id} is not in this cluster"));
        &mut self.nodes[index]
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes
            .iter()
            .any(|n| n.addrs.id == id && n.child.is_some())
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.nodes.iter().any(|n| n.addrs.id == id && n.paused)
    }

    /// Sets the clock node `id` gets at its next start.
    pub fn set_clock(&mut self, id: u64, clock: Option<ClockSkew>) {
        self.node(id).clock = clock;
    }

    /// Makes node `id`'s clock run at `rate` from now on (within 100 ms, the
    /// node's polling interval), whether or not it is running; see the
    /// module docs.
    pub fn set_clock_rate(&mut self, id: u64, rate: f64) -> Result<(), String> {
        if !self.options.clock_rate_files {
            return Err("the nodes were started without --unsafe-clock-rate-file".into());
        }
        let path = self.node(id).rate_file.clone();
        write_rate_file(&path, rate)
    }

    /// Stalls node `id`'s disk (its syncs wait) or ends the stall, whether
    /// or not it is running; see the module docs.
    pub fn set_disk_stall(&mut self, id: u64, stalled: bool) -> Result<(), String> {
        if !self.options.disk_stall_files {
            return Err("the nodes were started without --unsafe-disk-stall-file".into());
        }
        let path = self.node(id).stall_file.clone();
        let result = if stalled {
            std::fs::write(&path, b"")
        } else {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            }
        };
        result.map_err(|e| format!("cannot change the disk stall file {}: {e}", path.display()))
    }

    pub fn start_all(&mut self) -> Result<(), String> {
        for id in self.ids() {
            self.start(id)?;
        }
        Ok(())
    }

    /// Starts node `id` (same data directory every time).
    pub fn start(&mut self, id: u64) -> Result<(), String> {
        let options = self.options.clone();
        let node = self.node(id);
        if node.child.is_some() {
            return Ok(());
        }
        let child = spawn_node(&options, node)
            .map_err(|e| format!("cannot start node {id} ({}): {e}", options.binary.display()))?;
        node.child = Some(child);
        node.paused = false;
        node.expected_exit = false;
        Ok(())
    }

    /// `kill -9` node `id` and reap it.
    pub async fn kill(&mut self, id: u64) {
        let node = self.node(id);
        let Some(mut child) = node.child.take() else {
            return;
        };
        node.expected_exit = true;
        node.paused = false;
        // An error means it already exited; the wait reaps it either way.
        let _ = child.start_kill();
        let _ = tokio::time::timeout(REAP_WAIT, child.wait()).await;
    }

    /// SIGTERM node `id`, SIGKILL after a grace period.
    pub async fn stop(&mut self, id: u64) {
        let node = self.node(id);
        let Some(mut child) = node.child.take() else {
            return;
        };
        node.expected_exit = true;
        if node.paused {
            signal(&child, libc::SIGCONT);
            node.paused = false;
        }
        signal(&child, libc::SIGTERM);
        if tokio::time::timeout(STOP_GRACE, child.wait())
            .await
            .is_err()
        {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(REAP_WAIT, child.wait()).await;
        }
    }

    /// SIGSTOP node `id`.
    pub fn pause(&mut self, id: u64) {
        let node = self.node(id);
        if let Some(child) = &node.child {
            signal(child, libc::SIGSTOP);
            node.paused = true;
        }
    }

    /// SIGCONT node `id`.
    pub fn resume(&mut self, id: u64) {
        let node = self.node(id);
        if let Some(child) = &node.child {
            signal(child, libc::SIGCONT);
        }
        node.paused = false;
    }

    /// Reaps nodes that exited on their own and reports them.
    pub fn reap_exited(&mut self) -> Vec<UnexpectedExit> {
        let mut exits = Vec::new();
        for node in &mut self.nodes {
            let Some(child) = &mut node.child else {
                continue;
            };
            if let Ok(Some(status)) = child.try_wait() {
                node.child = None;
                node.paused = false;
                if !node.expected_exit {
                    exits.push(UnexpectedExit {
                        node: node.addrs.id,
                        how: describe_exit(status),
                    });
                }
            }
        }
        exits
    }

    /// A status channel to every node, for the poller.
    pub fn status_channels(&self) -> HashMap<u64, StatusTarget> {
        self.nodes
            .iter()
            .map(|n| {
                let target = StatusTarget {
                    channel: n.channel.clone(),
                    id: n.addrs.id,
                    client: n.addrs.client.to_string(),
                    peer: n.addrs.peer.to_string(),
                };
                (n.addrs.id, target)
            })
            .collect()
    }

    /// Resumes and kills every node; idempotent.
    pub async fn teardown(&mut self) {
        for id in self.ids() {
            self.kill(id).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(child) = &mut node.child {
                // kill_on_drop would too; this is explicit for paused nodes.
                let _ = child.start_kill();
            }
        }
    }
}

fn signal(child: &Child, signal: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // unreaped child (module docs), so it names no other process.
        let _ = unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
}

fn spawn_node(options: &NodeOptions, node: &Node) -> std::io::Result<Child> {
    std::fs::create_dir_all(&node.data_dir)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&node.log)?;
    let args = serve_args(options, node);
    let mut command = Command::new(&options.binary);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log.try_clone()?))
        .env("NO_COLOR", "1");
    let mut clock_note = String::new();
    if let (Some(clock), Some(lib)) = (node.clock, &options.faketime_lib) {
        command
            .env("LD_PRELOAD", lib)
            .env("FAKETIME", clock.faketime_spec())
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "0");
        clock_note = format!(" (FAKETIME={:?})", clock.faketime_spec());
    }
    writeln!(
        log,
        "--- latchkey-jepsen: starting {} {}{clock_note}",
        options.binary.display(),
        args.join(" ")
    )?;
    spawn_child(&mut command, node.addrs.netns.as_deref())
}

fn serve_args(options: &NodeOptions, node: &Node) -> Vec<String> {
    let mut args = vec![
        "serve".to_string(),
        "--id".into(),
        node.addrs.id.to_string(),
        "--data-dir".into(),
        node.data_dir.display().to_string(),
        "--listen-client".into(),
        node.addrs.client.to_string(),
        "--listen-peer".into(),
        node.addrs.peer.to_string(),
        "--advertise-client".into(),
        node.addrs.client.to_string(),
        "--initial-cluster".into(),
        node.addrs.initial_cluster.clone(),
    ];
    args.push("--max-clock-drift-ppm".into());
    args.push(options.max_clock_drift_ppm.to_string());
    if options.unsafe_no_fencing {
        args.push("--unsafe-no-fencing".into());
    }
    if options.unsafe_unconfirmed_renewals {
        args.push("--unsafe-unconfirmed-renewals".into());
    }
    if options.clock_rate_files {
        args.push("--unsafe-clock-rate-file".into());
        args.push(node.rate_file.display().to_string());
    }
    if options.disk_stall_files {
        args.push("--unsafe-disk-stall-file".into());
        args.push(node.stall_file.display().to_string());
    }
    args
}

/// Writes `rate` to `path` through a rename, so that the node never reads
/// a half-written file.
fn write_rate_file(path: &Path, rate: f64) -> Result<(), String> {
    let temporary = path.with_extension("clock-rate.new");
    std::fs::write(&temporary, format!("{rate}\n"))
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|e| format!("cannot write the clock rate to {}: {e}", path.display()))
}

/// `signal 9`, `exit code 1`, …
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// One node of this run, as its status is asked for.
#[derive(Clone)]
pub struct StatusTarget {
    pub channel: Channel,
    pub id: u64,
    /// The client address the node was told to listen on.
    pub client: String,
    /// Its own peer address, as its `--initial-cluster` names it.
    pub peer: String,
}

/// Why a node's status is missing.
#[derive(Debug)]
pub enum StatusError {
    /// No answer, or an error answer: the node may be down, paused or cut off.
    Unanswered(String),
    /// Another process answered on the node's client port.
    Foreign(String),
}

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StatusError::Unanswered(e) | StatusError::Foreign(e) => f.write_str(e),
        }
    }
}

/// Asks one node for its status. An answer from another process is
/// [`StatusError::Foreign`]: the ports are picked free and released before
/// the node binds them, so a program started in between (another test's
/// cluster, say) can hold the port while this run's node fails to start,
/// and its leaders and terms are not this run's.
pub async fn status(target: &StatusTarget) -> Result<StatusResponse, StatusError> {
    let mut client = ClusterClient::new(target.channel.clone());
    let status = match tokio::time::timeout(STATUS_TIMEOUT, client.status(StatusRequest {})).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Err(StatusError::Unanswered(status.message().to_string())),
        Err(_) => return Err(StatusError::Unanswered("no answer".into())),
    };
    check_identity(target, &status).map_err(StatusError::Foreign)?;
    Ok(status)
}

/// Whether `status` comes from the node `target` names: its id and its
/// own peer address.
pub fn check_identity(target: &StatusTarget, status: &StatusResponse) -> Result<(), String> {
    if status.id == target.id && status.peer_addr == target.peer {
        return Ok(());
    }
    Err(format!(
        "{} answered as node {} with peer address {:?}, not as this run's n{} ({}): \
         another program holds the port (see nodes/n{}.log for why n{} is not listening)",
        target.client, status.id, status.peer_addr, target.id, target.peer, target.id, target.id
    ))
}

/// `leader`, `follower`, … as in `latchkey status`.
pub fn role_name(role: i32) -> &'static str {
    match Role::try_from(role).unwrap_or(Role::Unspecified) {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::PreCandidate => "pre_candidate",
        Role::Unspecified => "unknown",
    }
}

/// libfaketime's multi-threaded shared object, if installed.
pub fn find_faketime_lib() -> Option<PathBuf> {
    const NAMES: [&str; 2] = ["libfaketimeMT.so.1", "libfaketime.so.1"];
    let mut dirs = vec![
        PathBuf::from("/usr/lib/faketime"),
        PathBuf::from("/usr/local/lib/faketime"),
    ];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(entries.flatten().map(|e| e.path().join("faketime")));
    }
    dirs.iter()
        .flat_map(|dir| NAMES.iter().map(move |name| dir.join(name)))
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faketime_spec_has_a_signed_offset_and_a_rate() {
        let skew = ClockSkew {
            offset_s: -3,
            rate: 1.5,
        };
        assert_eq!(skew.faketime_spec(), "-3s x1.5");
        let skew = ClockSkew {
            offset_s: 7,
            rate: 0.995,
        };
        assert_eq!(skew.faketime_spec(), "+7s x0.995");
    }

    #[tokio::test]
    async fn only_this_runs_node_is_taken_at_its_word() {
        let target = StatusTarget {
            channel: Endpoint::from_static("http://127.0.0.1:9").connect_lazy(),
            id: 5,
            client: "127.0.0.1:40005".into(),
            peer: "127.0.0.1:40006".into(),
        };
        let answer = |id: u64, peer: &str| StatusResponse {
            id,
            peer_addr: peer.into(),
            role: Role::Leader as i32,
            term: 2,
            ..StatusResponse::default()
        };
        assert!(check_identity(&target, &answer(5, "127.0.0.1:40006")).is_ok());
        // Another cluster's node 5 on the same client port.
        let err = check_identity(&target, &answer(5, "127.0.0.1:51234")).expect_err("foreign");
        assert!(err.contains("127.0.0.1:40005"), "{err}");
        assert!(err.contains("another program holds the port"), "{err}");
        assert!(err.contains("nodes/n5.log"), "{err}");
        // Another node of a cluster on that address.
        assert!(check_identity(&target, &answer(3, "127.0.0.1:40006")).is_err());
    }

    #[test]
    fn a_clock_rate_file_holds_just_the_rate_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("n1.clock-rate");
        write_rate_file(&path, 1.005).expect("write");
        write_rate_file(&path, 2.0).expect("overwrite");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "2\n");
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1);
    }
}
