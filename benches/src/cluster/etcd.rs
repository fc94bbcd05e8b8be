//! A 5-node etcd cluster of `etcd` processes.
//!
//! Node i runs
//! `etcd --name nI --data-dir DIR/nI --listen-client-urls http://127.0.0.1:C
//! --advertise-client-urls http://127.0.0.1:C --listen-peer-urls
//! http://127.0.0.1:P --initial-advertise-peer-urls http://127.0.0.1:P
//! --initial-cluster n1=…,… --initial-cluster-token latchkey-bench
//! --initial-cluster-state new`, with everything else at etcd's defaults:
//! 100 ms heartbeat, 1000 ms election timeout, and every Raft write fsynced
//! before it is acknowledged (the same durability as latchkey). Output goes
//! to `DIR/nI.log`. `ETCD_*` variables are removed from the environment so
//! that only these flags count.
//!
//! Readiness: every node answers `Maintenance.Status`, all name the same
//! leader, and each has applied what the leader had committed when the
//! wait began. A killed node is restarted with the same command line (its
//! data directory exists, so it rejoins rather than bootstrapping).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use etcd_client::{Client, ConnectOptions, StatusResponse};
use tokio::time::Instant;

use super::{
    agreed_leader, cluster_dir, free_ports, raft_views_of, remove_dir, LeaderView, RaftView, NODES,
    POLL_INTERVAL, READY_TIMEOUT, STATUS_TIMEOUT,
};
use crate::processes::{Proc, STOP_GRACE};

/// One etcd member.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    proc: Option<Proc>,
}

/// A running etcd cluster.
pub struct EtcdCluster {
    dir: Option<tempfile::TempDir>,
    binary: PathBuf,
    members: Vec<Member>,
}

impl EtcdCluster {
    pub async fn start(binary: &Path, parent: &Path) -> Result<EtcdCluster, String> {
        let dir = cluster_dir(parent, "etcd-")?;
        let ports = free_ports(2 * NODES).map_err(|e| format!("no free ports: {e}"))?;
        let members = (0..NODES)
            .map(|i| Member {
                name: format!("n{}", i + 1),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                proc: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            dir: Some(dir),
            binary: binary.to_path_buf(),
            members,
        };
        for index in 0..NODES {
            cluster.spawn(index)?;
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    fn dir(&self) -> &Path {
        // Only `stop` and `drop` take the directory, and both consume the cluster.
        self.dir.as_ref().expect("cluster directory").path()
    }

    fn initial_cluster(&self) -> String {
        let parts: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        parts.join(",")
    }

    fn spawn(&mut self, index: usize) -> Result<(), String> {
        let initial = self.initial_cluster();
        let dir = self.dir().to_path_buf();
        let member = &self.members[index];
        let log_path = dir.join(format!("{}.log", member.name));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(&self.binary);
        command
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(dir.join(&member.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", "latchkey-bench"])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().map_err(|e| e.to_string())?))
            .stderr(Stdio::from(log));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(key);
            }
        }
        let proc = Proc::spawn(format!("etcd {}", member.name), command)
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        self.members[index].proc = Some(proc);
        Ok(())
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    async fn statuses(&self) -> Vec<Option<StatusResponse>> {
        let asks = self.endpoints().into_iter().map(status_of);
        futures::future::join_all(asks).await
    }

    fn down(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].proc.is_none())
            .collect()
    }

    pub async fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut target: Option<u64> = None;
        // Bounded by the deadline.
        loop {
            let statuses = self.statuses().await;
            if let Some(leader) = agreed_leader(&leader_views(&statuses), &self.down()) {
                let commit = statuses[leader].as_ref().map_or(0, |s| s.raft_index());
                let goal = *target.get_or_insert(commit);
                if statuses
                    .iter()
                    .flatten()
                    .all(|s| s.raft_applied_index() >= goal)
                {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd cluster not ready within {READY_TIMEOUT:?}; logs in {}",
                    self.dir().display()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    pub async fn raft_views(&self) -> Vec<Option<RaftView>> {
        raft_views_of(&self.statuses().await, |s| RaftView {
            term: s.raft_term(),
            leader: s.leader(),
        })
    }

    pub async fn leader(&self) -> Result<usize, String> {
        let statuses = self.statuses().await;
        agreed_leader(&leader_views(&statuses), &self.down())
            .ok_or_else(|| "no agreed leader".to_string())
    }

    pub fn pids(&mut self) -> Vec<(usize, u32)> {
        self.members
            .iter_mut()
            .enumerate()
            .filter_map(|(i, m)| {
                let proc = m.proc.as_mut()?;
                proc.is_running().then(|| (i + 1, proc.pid()))
            })
            .collect()
    }

    pub fn kill(&mut self, index: usize) -> Result<(), String> {
        let member = self.members.get_mut(index).ok_or("no such node")?;
        let mut proc = member.proc.take().ok_or("node is not running")?;
        proc.kill9();
        Ok(())
    }

    pub async fn restart(&mut self, index: usize) -> Result<(), String> {
        self.spawn(index)?;
        self.wait_ready().await
    }

    pub fn stop(mut self) {
        for member in &mut self.members {
            if let Some(proc) = member.proc.as_mut() {
                crate::processes::terminate(proc);
            }
        }
        for member in &mut self.members {
            if let Some(proc) = member.proc.as_mut() {
                proc.stop(STOP_GRACE);
            }
        }
        if let Some(dir) = self.dir.take() {
            remove_dir(dir);
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Only reached with the directory still here on a panic path.
        if let Some(dir) = self.dir.take() {
            for member in &mut self.members {
                member.proc = None;
            }
            remove_dir(dir);
        }
    }
}

/// A client for one endpoint only, for status polling and probes.
pub async fn single_client(endpoint: &str) -> Option<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(STATUS_TIMEOUT)
        .with_timeout(STATUS_TIMEOUT);
    Client::connect([endpoint], Some(options)).await.ok()
}

async fn status_of(endpoint: String) -> Option<StatusResponse> {
    let ask = async {
        let mut client = single_client(&endpoint).await?;
        client.status().await.ok()
    };
    tokio::time::timeout(STATUS_TIMEOUT, ask)
        .await
        .ok()
        .flatten()
}

/// Each member's own id (0 without a header) and the leader it names.
fn leader_views(statuses: &[Option<StatusResponse>]) -> Vec<Option<LeaderView>> {
    statuses
        .iter()
        .map(|s| {
            s.as_ref()
                .map(|s| (s.header().map_or(0, |h| h.member_id()), s.leader()))
        })
        .collect()
}
