//! A 5-node latchkey cluster run by `latchkey dev`.
//!
//! `latchkey dev --data-dir DIR/cluster --nodes 5` starts the nodes as its
//! own children and writes `cluster.json` with each node's pid, addresses
//! and data directory. Readiness is polled with `Cluster.Status` on every
//! node until all answer and name the same leader.
//!
//! `latchkey dev` does not restart a node that exited, so after a
//! `kill -9` this module starts the node again itself, as a child of the
//! bench, with exactly the `latchkey serve` flags `latchkey dev` uses
//! (`--id`, `--data-dir`, `--listen-client`, `--listen-peer`,
//! `--advertise-client`, `--initial-cluster`, all from `cluster.json`), its
//! output appended to the node's log. The restarted node is stopped with
//! the rest.
//!
//! Nodes inherit the bench's environment, so `LATCHKEY_*` variables tune
//! them as they tune `latchkey dev`; `RUST_LOG` is removed so that a
//! caller's log level cannot change the numbers.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use latchkey_proto::v1::StatusResponse;
use latchkey_server::dev::manifest::Manifest;
use tokio::time::Instant;

use super::{
    agreed_leader, cluster_dir, raft_views_of, remove_dir, LeaderView, RaftView, NODES,
    POLL_INTERVAL, READY_TIMEOUT, STATUS_TIMEOUT,
};
use crate::processes::{Proc, STOP_GRACE};

/// A running `latchkey dev` cluster.
pub struct LatchkeyCluster {
    dir: Option<tempfile::TempDir>,
    binary: PathBuf,
    dev: Proc,
    manifest: Manifest,
    /// Nodes this module restarted, by 0-based index.
    restarted: BTreeMap<usize, Proc>,
    /// Nodes killed and not restarted.
    killed: Vec<usize>,
}

impl LatchkeyCluster {
    pub async fn start(binary: &Path, parent: &Path) -> Result<LatchkeyCluster, String> {
        let dir = cluster_dir(parent, "latchkey-")?;
        let data = dir.path().join("cluster");
        let log = open_log(&dir.path().join("dev.log"))?;
        let mut command = Command::new(binary);
        command
            .arg("dev")
            .arg("--nodes")
            .arg(NODES.to_string())
            .arg("--data-dir")
            .arg(&data)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(log));
        let dev = Proc::spawn("latchkey dev", command)
            .map_err(|e| format!("cannot start {} dev: {e}", binary.display()))?;
        let mut cluster = LatchkeyCluster {
            dir: Some(dir),
            binary: binary.to_path_buf(),
            dev,
            manifest: Manifest { nodes: Vec::new() },
            restarted: BTreeMap::new(),
            killed: Vec::new(),
        };
        cluster.manifest = cluster.wait_for_manifest(&data).await?;
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Waits until `cluster.json` lists every node with a pid.
    async fn wait_for_manifest(&mut self, data: &Path) -> Result<Manifest, String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        // Bounded by the deadline.
        loop {
            if let Ok(Some(manifest)) = Manifest::load(data) {
                if manifest.nodes.len() == NODES && manifest.nodes.iter().all(|n| n.pid != 0) {
                    return Ok(manifest);
                }
            }
            if !self.dev.is_running() {
                return Err(format!("latchkey dev exited; see {}", self.log_hint()));
            }
            if Instant::now() >= deadline {
                return Err(format!("no complete cluster.json; see {}", self.log_hint()));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn log_hint(&self) -> String {
        self.dir
            .as_ref()
            .map_or(String::new(), |d| d.path().display().to_string())
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.manifest
            .nodes
            .iter()
            .map(|n| n.client_addr.clone())
            .collect()
    }

    /// Every running node's status; `None` for nodes that did not answer.
    async fn statuses(&self) -> Vec<Option<StatusResponse>> {
        let asks = self.endpoints().into_iter().map(status_of);
        futures::future::join_all(asks).await
    }

    /// Waits until every node that should run answers, all name the same
    /// leader, and each has applied what that leader had committed when
    /// the wait began.
    pub async fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut target: Option<u64> = None;
        // Bounded by the deadline.
        loop {
            let statuses = self.statuses().await;
            if let Some(leader) = agreed_leader(&leader_views(&statuses), &self.killed) {
                let leader_commit = statuses[leader].as_ref().map_or(0, |s| s.commit_index);
                let goal = *target.get_or_insert(leader_commit);
                let caught_up = statuses.iter().flatten().all(|s| s.applied_index >= goal);
                if caught_up {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "latchkey cluster not ready within {READY_TIMEOUT:?}; logs in {}",
                    self.log_hint()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub async fn raft_views(&self) -> Vec<Option<RaftView>> {
        raft_views_of(&self.statuses().await, |s| RaftView {
            term: s.term,
            leader: s.leader_id,
        })
    }

    pub async fn leader(&self) -> Result<usize, String> {
        let statuses = self.statuses().await;
        agreed_leader(&leader_views(&statuses), &self.killed)
            .ok_or_else(|| "no agreed leader".to_string())
    }

    pub fn pids(&mut self) -> Vec<(usize, u32)> {
        let mut pids = Vec::new();
        for (index, node) in self.manifest.nodes.iter().enumerate() {
            if self.killed.contains(&index) {
                continue;
            }
            let pid = match self.restarted.get_mut(&index) {
                Some(proc) => {
                    if !proc.is_running() {
                        continue;
                    }
                    proc.pid()
                }
                None => node.pid,
            };
            pids.push((index + 1, pid));
        }
        pids
    }

    pub fn kill(&mut self, index: usize) -> Result<(), String> {
        if let Some(mut proc) = self.restarted.remove(&index) {
            proc.kill9();
        } else {
            let pid = self.manifest.nodes.get(index).ok_or("no such node")?.pid;
            // SAFETY: kill has no memory-safety preconditions. The pid is a
            // child of our `latchkey dev`, which reaps it, so it cannot be
            // reused before we are done with it (PDEATHSIG ties it to dev).
            let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            if r != 0 {
                return Err(format!(
                    "kill -9 {pid}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        self.killed.push(index);
        Ok(())
    }

    pub async fn restart(&mut self, index: usize) -> Result<(), String> {
        let node = self
            .manifest
            .nodes
            .get(index)
            .ok_or("no such node")?
            .clone();
        let log = open_log(&node.log)?;
        let mut command = Command::new(&self.binary);
        command
            .arg("serve")
            .args(["--id", &node.id.to_string()])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--listen-client", &node.client_addr])
            .args(["--listen-peer", &node.peer_addr])
            .args(["--advertise-client", &node.client_addr])
            .args(["--initial-cluster", &self.manifest.initial_cluster()])
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(log));
        let proc = Proc::spawn(format!("latchkey node {}", node.id), command)
            .map_err(|e| format!("cannot restart node {}: {e}", node.id))?;
        self.restarted.insert(index, proc);
        self.killed.retain(|&k| k != index);
        self.wait_ready().await
    }

    pub fn stop(mut self) {
        // latchkey dev stops its own nodes on SIGTERM; ours are stopped alongside.
        for proc in self.restarted.values_mut() {
            crate::processes::terminate(proc);
        }
        self.dev.stop(STOP_GRACE);
        for proc in self.restarted.values_mut() {
            proc.stop(STOP_GRACE);
        }
        if let Some(dir) = self.dir.take() {
            remove_dir(dir);
        }
    }
}

impl Drop for LatchkeyCluster {
    fn drop(&mut self) {
        // `stop` took the directory; anything left here is a panic path:
        // Proc's own Drop kills the processes, and the directory goes too.
        if let Some(dir) = self.dir.take() {
            self.dev.kill9();
            self.restarted.clear();
            remove_dir(dir);
        }
    }
}

fn open_log(path: &Path) -> Result<std::fs::File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

async fn status_of(endpoint: String) -> Option<StatusResponse> {
    latchkey_server::cli::connect::fetch_status(&endpoint, STATUS_TIMEOUT)
        .await
        .ok()
}

/// Each node's own id and the leader it names.
fn leader_views(statuses: &[Option<StatusResponse>]) -> Vec<Option<LeaderView>> {
    statuses
        .iter()
        .map(|s| s.as_ref().map(|s| (s.id, s.leader_id)))
        .collect()
}
