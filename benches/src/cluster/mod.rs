//! Starting, inspecting, killing and restarting the 5-node clusters.
//!
//! # Layout
//! - this file: [`Cluster`], what every workload needs from either system
//!   (client endpoints, the leader, node pids, kill and restart), and the
//!   free-port helper.
//! - [`latchkey`]: a `latchkey dev` cluster; restarts a killed node itself
//!   with the same `latchkey serve` flags `cluster.json` describes.
//! - [`etcd`]: five `etcd` processes with a static initial cluster.
//!
//! Both run on 127.0.0.1 only, in a fresh directory under the run's data
//! directory, with their default timing and durability (every Raft write
//! fsynced before it is acknowledged). A cluster is started for each
//! workload and stopped after it, so no workload sees another's state.
//!
//! # Not done yet
//! - Free ports are found by binding port 0 and releasing it; another
//!   program can take one in between, and that cluster then fails to start
//!   (its logs say why).

pub mod etcd;
pub mod latchkey;

use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

pub use self::etcd::EtcdCluster;
pub use self::latchkey::LatchkeyCluster;

/// Nodes in every cluster.
pub const NODES: usize = 5;
/// How long a cluster may take to start and elect a leader.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between readiness polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Deadline for one status request during polling.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// The two systems under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Latchkey,
    Etcd,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Latchkey => "latchkey",
            System::Etcd => "etcd",
        }
    }
}

impl std::fmt::Display for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A running cluster of either system.
pub enum Cluster {
    Latchkey(LatchkeyCluster),
    Etcd(EtcdCluster),
}

/// Where the binaries are and how etcd clients are pointed.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub latchkey: std::path::PathBuf,
    pub etcd: Option<std::path::PathBuf>,
}

impl Cluster {
    /// Starts a cluster of `system` in a new directory under `parent` and
    /// waits until every node answers and they agree on a leader.
    pub async fn start(
        system: System,
        binaries: &Binaries,
        parent: &Path,
    ) -> Result<Cluster, String> {
        match system {
            System::Latchkey => LatchkeyCluster::start(&binaries.latchkey, parent)
                .await
                .map(Cluster::Latchkey),
            System::Etcd => {
                let etcd = binaries.etcd.as_ref().ok_or("etcd binary not found")?;
                EtcdCluster::start(etcd, parent).await.map(Cluster::Etcd)
            }
        }
    }

    pub fn system(&self) -> System {
        match self {
            Cluster::Latchkey(_) => System::Latchkey,
            Cluster::Etcd(_) => System::Etcd,
        }
    }

    /// Client endpoints of every node, `host:port`.
    pub fn endpoints(&self) -> Vec<String> {
        match self {
            Cluster::Latchkey(c) => c.endpoints(),
            Cluster::Etcd(c) => c.endpoints(),
        }
    }

    /// The node (0-based) that leads now, once all running nodes agree.
    pub async fn leader(&self) -> Result<usize, String> {
        match self {
            Cluster::Latchkey(c) => c.leader().await,
            Cluster::Etcd(c) => c.leader().await,
        }
    }

    /// What each node (by 0-based index) says of its Raft state now;
    /// `None` for a node that did not answer.
    pub async fn raft_views(&self) -> Vec<Option<RaftView>> {
        match self {
            Cluster::Latchkey(c) => c.raft_views().await,
            Cluster::Etcd(c) => c.raft_views().await,
        }
    }

    /// (1-based node number, pid) of every running node.
    pub fn pids(&mut self) -> Vec<(usize, u32)> {
        match self {
            Cluster::Latchkey(c) => c.pids(),
            Cluster::Etcd(c) => c.pids(),
        }
    }

    /// `kill -9` node `index` (0-based).
    pub fn kill(&mut self, index: usize) -> Result<(), String> {
        match self {
            Cluster::Latchkey(c) => c.kill(index),
            Cluster::Etcd(c) => c.kill(index),
        }
    }

    /// Starts a killed node again with its data and flags, and waits until
    /// every node answers, agrees on a leader and has caught up.
    pub async fn restart(&mut self, index: usize) -> Result<(), String> {
        match self {
            Cluster::Latchkey(c) => c.restart(index).await,
            Cluster::Etcd(c) => c.restart(index).await,
        }
    }

    /// Stops every node (SIGTERM, then SIGKILL after a grace period) and
    /// removes the cluster's directory. Blocking.
    pub fn stop(self) {
        match self {
            Cluster::Latchkey(c) => c.stop(),
            Cluster::Etcd(c) => c.stop(),
        }
    }
}

/// `count` distinct free TCP ports on 127.0.0.1.
pub fn free_ports(count: usize) -> std::io::Result<Vec<u16>> {
    // All listeners stay open until every port is picked, so none repeats.
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// A directory for one cluster under `parent`, registered for removal
/// if the bench is interrupted.
pub fn cluster_dir(parent: &Path, prefix: &str) -> Result<tempfile::TempDir, String> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .map_err(|e| format!("cannot create a directory in {}: {e}", parent.display()))?;
    crate::processes::register_dir(dir.path().to_path_buf());
    Ok(dir)
}

/// Removes a cluster directory and takes it off the interrupt list.
pub fn remove_dir(dir: tempfile::TempDir) {
    let path = dir.path().to_path_buf();
    let _ = dir.close();
    crate::processes::unregister_dir(&path);
}

/// One node's term and the leader it names (its member id; 0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftView {
    pub term: u64,
    pub leader: u64,
}

/// Each node's [`RaftView`] from its status answer (`None`: no answer).
pub(crate) fn raft_views_of<S>(
    statuses: &[Option<S>],
    view: impl Fn(&S) -> RaftView,
) -> Vec<Option<RaftView>> {
    statuses.iter().map(|s| s.as_ref().map(&view)).collect()
}

/// What one node said of itself: its own id, and the leader it names (0:
/// none).
pub(crate) type LeaderView = (u64, u64);

/// The 0-based index of the leader every answering node names, if all
/// nodes not in `down` answered (`Some`) and agree.
pub(crate) fn agreed_leader(views: &[Option<LeaderView>], down: &[usize]) -> Option<usize> {
    let mut leader = None;
    for (index, view) in views.iter().enumerate() {
        match view {
            None if down.contains(&index) => continue,
            None => return None,
            Some((_, 0)) => return None,
            Some((_, named)) => match leader {
                None => leader = Some(*named),
                Some(l) if l != *named => return None,
                Some(_) => {}
            },
        }
    }
    let id = leader?;
    views
        .iter()
        .position(|v| v.is_some_and(|(own, _)| own == id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(10).expect("ports");
        let distinct: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), 10);
    }

    #[test]
    fn a_leader_is_agreed_only_when_every_running_node_names_it() {
        let all = [Some((7, 9)), Some((9, 9)), Some((8, 9))];
        assert_eq!(agreed_leader(&all, &[]), Some(1));
        let silent = [Some((7, 9)), Some((9, 9)), None];
        assert_eq!(agreed_leader(&silent, &[]), None);
        assert_eq!(agreed_leader(&silent, &[2]), Some(1));
        let split = [Some((7, 9)), Some((9, 8)), Some((8, 8))];
        assert_eq!(agreed_leader(&split, &[]), None);
        let none = [Some((7, 0)), Some((9, 0))];
        assert_eq!(agreed_leader(&none, &[]), None);
        // Named by all, but not among the answers: no index to give.
        let gone = [Some((7, 5)), Some((9, 5)), None];
        assert_eq!(agreed_leader(&gone, &[2]), None);
    }
}
