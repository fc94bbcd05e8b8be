//! The `latchkey serve` processes of a run: start, kill -9, SIGSTOP and
//! SIGCONT, restart with a skewed clock, status, teardown.
//!
//! One [`Cluster`] owns every node process; the nemesis and the status
//! poller share it behind one async mutex, so a pid is signalled only while
//! it still names our (unreaped) child.
//!
//! Each node runs in its own process group (a Ctrl-C in the terminal reaches
//! only the harness, which then tears down in order), in its namespace when
//! there is one (`setns` in the forked child, before exec), with its
//! stdout/stderr appended to `RUN/nodes/nI.log`, and asks the kernel to
//! SIGKILL it if the thread that spawned it dies (`PR_SET_PDEATHSIG`). The
//! spawning threads are the runtime's worker threads, which live until the
//! runtime shuts down, i.e. until the harness is done. `kill_on_drop` covers
//! a panic that unwinds past the cluster.
//!
//! # Clock skew
//! A node started with a [`ClockSkew`] runs under libfaketime
//! (`LD_PRELOAD`, `FAKETIME="+OFFSETs xRATE"`), which fakes its monotonic
//! clock too: at rate 2 its Raft ticks and lease deadlines run twice as
//! fast. The skew is fixed at exec, so changing it means a restart.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use latchkey_proto::v1::cluster_client::ClusterClient;
use latchkey_proto::v1::{Role, StatusRequest, StatusResponse};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

use super::net::NodeAddrs;

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
        format!("{:+}s x{:.2}", self.offset_s, self.rate)
    }
}

/// How the nodes are started.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub binary: PathBuf,
    pub unsafe_no_fencing: bool,
    /// libfaketime's shared object, when installed.
    pub faketime_lib: Option<PathBuf>,
}

struct Node {
    addrs: NodeAddrs,
    data_dir: PathBuf,
    log: PathBuf,
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
    pub fn status_channels(&self) -> HashMap<u64, Channel> {
        self.nodes
            .iter()
            .map(|n| (n.addrs.id, n.channel.clone()))
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
        .env("NO_COLOR", "1")
        .process_group(0)
        .kill_on_drop(true);
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
    let netns = node
        .addrs
        .netns
        .as_ref()
        .map(std::fs::File::open)
        .transpose()?;
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setns, prctl, getppid) without allocating.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let child = command.spawn();
    // The namespace file must stay open until the child has entered it.
    drop(netns);
    child
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
    if options.unsafe_no_fencing {
        args.push("--unsafe-no-fencing".into());
    }
    args
}

/// `signal 9`, `exit code 1`, …
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// Asks one node for its status.
pub async fn status(channel: Channel) -> Result<StatusResponse, String> {
    let mut client = ClusterClient::new(channel);
    match tokio::time::timeout(STATUS_TIMEOUT, client.status(StatusRequest {})).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err("no answer".into()),
    }
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
        assert_eq!(skew.faketime_spec(), "-3s x1.50");
        let skew = ClockSkew {
            offset_s: 7,
            rate: 0.5,
        };
        assert_eq!(skew.faketime_spec(), "+7s x0.50");
    }
}
