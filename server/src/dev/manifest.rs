//! `cluster.json`: which nodes a dev cluster has, where they listen, which
//! process runs each one.
//!
//! ```json
//! {"nodes":[{"id":1,"pid":4242,"client_addr":"127.0.0.1:7001","peer_addr":"127.0.0.1:7002",
//!            "http_addr":"127.0.0.1:7019",
//!            "data_dir":"/tmp/latchkey-dev/node-1","log":"/tmp/latchkey-dev/node-1.log"}]}
//! ```
//!
//! With `--base-port B`, node i (counting from 0 in the file) listens for
//! clients on `B + 2i`, for peers on `B + 2i + 1` and for HTTP (metrics,
//! health, status page) on `B + 2 * MAX_NODES + i`; without it, on free
//! ports. A manifest written before nodes served HTTP gets free HTTP ports
//! when it is read: unlike the peer address, nothing in the cluster
//! remembers them.
//!
//! The file is written before any node starts (with `pid` 0, meaning "not
//! running") and rewritten with the real pids once they run; `pid` goes back
//! to 0 when a node exits. A later `latchkey dev` on the same directory reads
//! it back so the nodes restart with the same ids, addresses and data: a Raft
//! member must not change its peer address behind its peers' backs.
//! Writes go to a temporary file renamed over the old one, so a reader never
//! sees half a file.

use std::collections::BTreeSet;
use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the manifest inside the data directory.
pub const MANIFEST_FILE: &str = "cluster.json";

/// Most nodes a dev cluster may have: each is a process with its own RocksDB.
pub const MAX_NODES: usize = 9;

/// The whole file.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub nodes: Vec<NodeEntry>,
}

/// One node of the dev cluster.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub id: u64,
    /// Process id of the running `latchkey serve`; 0 when it is not running.
    pub pid: u32,
    pub client_addr: String,
    pub peer_addr: String,
    /// `--listen-http` of the node; empty in manifests from before it.
    #[serde(default)]
    pub http_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

impl Manifest {
    /// A new cluster of `count` nodes in `dir`: ports from `base_port`
    /// (client `B+2(i-1)`, peer `B+2(i-1)+1` for node i) or free ones.
    pub fn plan(dir: &Path, count: usize, base_port: Option<u16>) -> Result<Manifest, String> {
        if count == 0 || count > MAX_NODES {
            return Err(format!(
                "--nodes {count}: a dev cluster has 1 to {MAX_NODES} nodes"
            ));
        }
        let ports = match base_port {
            Some(base) => triples_from_base(base, 0..count)?,
            None => free_ports(3 * count)
                .map_err(|err| format!("cannot find free ports on 127.0.0.1: {err}"))?,
        };
        Ok(Manifest {
            nodes: entries(1, &ports),
        }
        .placed_in(dir))
    }

    /// Reads `dir/cluster.json`; `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<Manifest>, String> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(format!("cannot read {}: {err}", path.display())),
        };
        let manifest: Manifest = serde_json::from_str(&text).map_err(|err| {
            format!(
                "{} is not a latchkey dev manifest ({err}); remove {} to start a new cluster",
                path.display(),
                dir.display()
            )
        })?;
        manifest.validate().map_err(|err| {
            format!(
                "{}: {err}; remove {} to start a new cluster",
                path.display(),
                dir.display()
            )
        })?;
        let mut manifest = manifest.placed_in(dir);
        manifest.give_http_ports()?;
        Ok(Some(manifest))
    }

    /// Free HTTP ports for nodes of an older manifest that has none.
    fn give_http_ports(&mut self) -> Result<(), String> {
        let missing = self.nodes.iter().filter(|n| n.http_addr.is_empty()).count();
        let mut ports = free_ports(missing)
            .map_err(|err| format!("cannot find free ports on 127.0.0.1: {err}"))?
            .into_iter();
        for node in self.nodes.iter_mut().filter(|n| n.http_addr.is_empty()) {
            // `free_ports` returned one port per node that lacks one.
            let port = ports.next().expect("one free port per node");
            node.http_addr = format!("127.0.0.1:{port}");
        }
        Ok(())
    }

    /// Writes `dir/cluster.json` atomically.
    pub fn store(&self, dir: &Path) -> io::Result<()> {
        let path = dir.join(MANIFEST_FILE);
        let temporary = dir.join(format!("{MANIFEST_FILE}.tmp"));
        let mut text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        text.push('\n');
        std::fs::write(&temporary, text)?;
        std::fs::rename(&temporary, &path)
    }

    /// Rejects flags that contradict an existing cluster: restarting must keep
    /// every node's id and addresses.
    pub fn check_flags(
        &self,
        dir: &Path,
        nodes: Option<usize>,
        base_port: Option<u16>,
    ) -> Result<(), String> {
        let advice = format!(
            "drop the flag to restart that cluster, or pass another --data-dir (or remove {}) for a new one",
            dir.display()
        );
        if let Some(count) = nodes.filter(|&count| count == 0 || count > MAX_NODES) {
            return Err(format!(
                "--nodes {count}: a dev cluster has 1 to {MAX_NODES} nodes"
            ));
        }
        let Some(base) = base_port else {
            return Ok(());
        };
        let count = nodes.unwrap_or(self.nodes.len()).max(self.nodes.len());
        let wanted = ports_from_base(base, count)?;
        for (node, pair) in self.nodes.iter().zip(wanted.chunks_exact(2)) {
            let client = format!("127.0.0.1:{}", pair[0]);
            if node.client_addr != client {
                return Err(format!(
                    "{} has node {} at {}, but --base-port {base} would put it at {client}; {advice}",
                    dir.join(MANIFEST_FILE).display(),
                    node.id,
                    node.client_addr
                ));
            }
        }
        Ok(())
    }

    /// The nodes that grow this cluster to `count`: ids after the highest,
    /// ports from `base_port` at their positions (as [`Manifest::plan`]
    /// would place them) or free ones. None if it has `count` or more.
    pub fn growth(
        &self,
        dir: &Path,
        count: usize,
        base_port: Option<u16>,
    ) -> Result<Vec<NodeEntry>, String> {
        let have = self.nodes.len();
        if count <= have {
            return Ok(Vec::new());
        }
        let ports = match base_port {
            Some(base) => triples_from_base(base, have..count)?,
            // The cluster's own nodes may not be listening yet (a restart
            // that grows): their ports are free to the kernel, not to us.
            None => free_ports_excluding(3 * (count - have), &self.ports())
                .map_err(|err| format!("cannot find free ports on 127.0.0.1: {err}"))?,
        };
        let first = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let added = Manifest {
            nodes: entries(first, &ports),
        }
        .placed_in(dir);
        let mut all = self.clone();
        all.nodes.extend(added.nodes.iter().cloned());
        all.validate()?;
        check_ports_free(&added, dir, false)?;
        Ok(added.nodes)
    }

    /// Sets each node's data dir and log under `dir`, so a moved directory
    /// still works.
    fn placed_in(mut self, dir: &Path) -> Manifest {
        for node in &mut self.nodes {
            node.data_dir = dir.join(format!("node-{}", node.id));
            node.log = dir.join(format!("node-{}.log", node.id));
        }
        self
    }

    fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() || self.nodes.len() > MAX_NODES {
            return Err(format!(
                "it lists {} nodes (1 to {MAX_NODES} allowed)",
                self.nodes.len()
            ));
        }
        let mut ids = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for node in &self.nodes {
            if node.id == 0 || !ids.insert(node.id) {
                return Err(format!("node id {} is zero or repeated", node.id));
            }
            let http = Some(&node.http_addr).filter(|addr| !addr.is_empty());
            for addr in [&node.client_addr, &node.peer_addr].into_iter().chain(http) {
                if addr.parse::<SocketAddr>().is_err() || !addrs.insert(addr.clone()) {
                    return Err(format!(
                        "node {} address {addr:?} is not IP:PORT or is repeated",
                        node.id
                    ));
                }
            }
        }
        Ok(())
    }

    /// `1=PEER,2=PEER,…` for `--initial-cluster`.
    pub fn initial_cluster(&self) -> String {
        let parts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.peer_addr))
            .collect();
        parts.join(",")
    }

    /// Client addresses, comma-separated, for `--endpoints`.
    pub fn endpoints(&self) -> String {
        let parts: Vec<&str> = self.nodes.iter().map(|n| n.client_addr.as_str()).collect();
        parts.join(",")
    }
}

/// Nodes `first`, `first + 1`, … on loopback, each with the next client,
/// peer and HTTP port of `ports`; not yet placed in a directory.
fn entries(first: u64, ports: &[u16]) -> Vec<NodeEntry> {
    (first..)
        .zip(ports.chunks_exact(3))
        .map(|(id, triple)| NodeEntry {
            id,
            pid: 0,
            client_addr: format!("127.0.0.1:{}", triple[0]),
            peer_addr: format!("127.0.0.1:{}", triple[1]),
            http_addr: format!("127.0.0.1:{}", triple[2]),
            data_dir: PathBuf::new(),
            log: PathBuf::new(),
        })
        .collect()
}

/// Client, peer and HTTP port of the nodes at `positions` (see the module
/// docs for the layout).
fn triples_from_base(base: u16, positions: std::ops::Range<usize>) -> Result<Vec<u16>, String> {
    let pairs = ports_from_base(base, positions.end)?;
    let last_http = u32::from(base) + 2 * MAX_NODES as u32 + positions.end as u32 - 1;
    if last_http > u32::from(u16::MAX) {
        return Err(format!(
            "--base-port {base} puts HTTP ports up to {last_http}; pick a base below {}",
            u32::from(u16::MAX) + 1 - 3 * MAX_NODES as u32
        ));
    }
    Ok(positions
        .flat_map(|at| {
            let http = (u32::from(base) + 2 * MAX_NODES as u32 + at as u32) as u16;
            [pairs[2 * at], pairs[2 * at + 1], http]
        })
        .collect())
}

fn ports_from_base(base: u16, count: usize) -> Result<Vec<u16>, String> {
    let last = u32::from(base) + 2 * count as u32 - 1;
    if base == 0 || last > u32::from(u16::MAX) {
        return Err(format!(
            "--base-port {base} with {count} nodes needs ports {base}..={last}; pick a base between 1024 and {}",
            u32::from(u16::MAX) + 1 - 2 * count as u32
        ));
    }
    Ok((0..2 * count as u32)
        .map(|offset| (u32::from(base) + offset) as u16)
        .collect())
}

/// Asks the kernel for `count` distinct free ports. They are free when this
/// returns, not reserved: another process could take one before a node binds
/// it, in which case that node fails to start and says so in its log.
impl Manifest {
    /// Every port the nodes listed use.
    fn ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .flat_map(|n| [&n.client_addr, &n.peer_addr, &n.http_addr])
            .filter_map(|addr| addr.rsplit_once(':')?.1.parse().ok())
            .collect()
    }
}

/// `count` free ports, none of them in `used`.
fn free_ports_excluding(count: usize, used: &[u16]) -> io::Result<Vec<u16>> {
    // All listeners stay open until every port is known, so no port
    // repeats; bounded: a used port is skipped at most once per entry.
    let mut listeners = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..count + used.len() {
        if ports.len() == count {
            break;
        }
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        if !used.contains(&port) {
            ports.push(port);
        }
        listeners.push(listener);
    }
    if ports.len() < count {
        return Err(io::Error::other("the kernel kept handing out ports in use"));
    }
    Ok(ports)
}

fn free_ports(count: usize) -> io::Result<Vec<u16>> {
    // All listeners stay open until every port is known, so no port repeats.
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Fails with a one-line message naming the first port of the cluster that
/// something else already listens on.
pub fn check_ports_free(manifest: &Manifest, dir: &Path, reused: bool) -> Result<(), String> {
    for node in &manifest.nodes {
        let roles = [
            (&node.client_addr, "client"),
            (&node.peer_addr, "peer"),
            (&node.http_addr, "http"),
        ];
        for (addr, role) in roles.into_iter().filter(|(addr, _)| !addr.is_empty()) {
            let Err(err) = addr
                .parse::<SocketAddr>()
                .map_err(io::Error::other)
                .and_then(TcpListener::bind)
            else {
                continue;
            };
            let port = addr.rsplit_once(':').map_or("?", |(_, port)| port);
            let what = format!("port {port} (node {} {role} address {addr})", node.id);
            let hint = if reused {
                format!(
                    "stop whatever listens there (`ss -ltnp 'sport = :{port}'`); if it is an earlier \
                     `latchkey dev` on {}, stop that one first, or remove the directory to start a new cluster on other ports",
                    dir.display()
                )
            } else {
                format!("stop whatever listens there (`ss -ltnp 'sport = :{port}'`) or choose other ports with --base-port")
            };
            return Err(match err.kind() {
                ErrorKind::AddrInUse => format!("{what} is already in use; {hint}"),
                ErrorKind::PermissionDenied => {
                    format!("{what} needs privileges to bind; choose --base-port 1024 or higher")
                }
                _ => format!("cannot bind {what}: {err}"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_port_assigns_client_and_peer_ports_pairwise() {
        let manifest = Manifest::plan(Path::new("/d"), 3, Some(7001)).expect("plan");
        let addrs: Vec<(&str, &str)> = manifest
            .nodes
            .iter()
            .map(|n| (n.client_addr.as_str(), n.peer_addr.as_str()))
            .collect();
        assert_eq!(
            addrs,
            vec![
                ("127.0.0.1:7001", "127.0.0.1:7002"),
                ("127.0.0.1:7003", "127.0.0.1:7004"),
                ("127.0.0.1:7005", "127.0.0.1:7006"),
            ]
        );
        let http: Vec<&str> = manifest
            .nodes
            .iter()
            .map(|n| n.http_addr.as_str())
            .collect();
        assert_eq!(
            http,
            vec!["127.0.0.1:7019", "127.0.0.1:7020", "127.0.0.1:7021"]
        );
        assert_eq!(manifest.nodes[2].data_dir, Path::new("/d/node-3"));
        assert_eq!(manifest.nodes[2].log, Path::new("/d/node-3.log"));
        assert_eq!(
            manifest.initial_cluster(),
            "1=127.0.0.1:7002,2=127.0.0.1:7004,3=127.0.0.1:7006"
        );
        assert_eq!(
            manifest.endpoints(),
            "127.0.0.1:7001,127.0.0.1:7003,127.0.0.1:7005"
        );
    }

    #[test]
    fn free_ports_are_distinct() {
        let manifest = Manifest::plan(Path::new("/d"), 5, None).expect("plan");
        let mut ports = BTreeSet::new();
        for node in &manifest.nodes {
            assert!(ports.insert(node.client_addr.clone()));
            assert!(ports.insert(node.peer_addr.clone()));
            assert!(ports.insert(node.http_addr.clone()));
        }
        assert_eq!(ports.len(), 15);
    }

    #[test]
    fn node_counts_and_base_ports_out_of_range_are_rejected() {
        assert!(Manifest::plan(Path::new("/d"), 0, Some(7001)).is_err());
        assert!(Manifest::plan(Path::new("/d"), MAX_NODES + 1, Some(7001)).is_err());
        assert!(Manifest::plan(Path::new("/d"), 5, Some(65530)).is_err());
        assert!(Manifest::plan(Path::new("/d"), 5, Some(0)).is_err());
        // Client and peer ports would fit; the HTTP ports (base + 18 ..) do not.
        assert!(Manifest::plan(Path::new("/d"), 5, Some(65526)).is_err());
        assert!(Manifest::plan(Path::new("/d"), 5, Some(65513)).is_ok());
    }

    #[test]
    fn manifest_round_trips_in_the_documented_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut manifest = Manifest::plan(dir.path(), 2, Some(7001)).expect("plan");
        manifest.nodes[0].pid = 42;
        manifest.store(dir.path()).expect("store");
        let raw: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).expect("read"),
        )
        .expect("json");
        let keys: Vec<&String> = raw["nodes"][0]
            .as_object()
            .expect("object")
            .keys()
            .collect();
        assert_eq!(keys.len(), 7, "{raw}");
        for key in [
            "id",
            "pid",
            "client_addr",
            "peer_addr",
            "http_addr",
            "data_dir",
            "log",
        ] {
            assert!(raw["nodes"][0].get(key).is_some(), "missing {key}: {raw}");
        }
        assert_eq!(Manifest::load(dir.path()).expect("load"), Some(manifest));
    }

    #[test]
    fn a_manifest_from_before_http_ports_gets_free_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = r#"{"nodes":[{"id":1,"pid":0,"client_addr":"127.0.0.1:47101","peer_addr":"127.0.0.1:47102","data_dir":"x","log":"y"}]}"#;
        std::fs::write(dir.path().join(MANIFEST_FILE), old).expect("write");
        let manifest = Manifest::load(dir.path()).expect("load").expect("some");
        let http: SocketAddr = manifest.nodes[0].http_addr.parse().expect("IP:PORT");
        assert!(http.ip().is_loopback());
        assert_eq!(manifest.nodes[0].client_addr, "127.0.0.1:47101");
    }

    #[test]
    fn a_missing_manifest_loads_as_none_and_a_broken_one_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Manifest::load(dir.path()).expect("load"), None);
        std::fs::write(dir.path().join(MANIFEST_FILE), "{\"nodes\":[]}").expect("write");
        assert!(Manifest::load(dir.path()).is_err());
        std::fs::write(dir.path().join(MANIFEST_FILE), "not json").expect("write");
        assert!(Manifest::load(dir.path()).is_err());
    }

    #[test]
    fn growth_continues_the_ids_and_the_base_port_layout() {
        // `growth` checks that the new ports are free. Below Linux's
        // ephemeral range (32768-60999), so the client socket of a test
        // running beside this one cannot be holding one of them.
        const BASE: u16 = 23001;
        let dir = Path::new("/d");
        let manifest = Manifest::plan(dir, 3, Some(BASE)).expect("plan");
        assert!(manifest.growth(dir, 3, None).expect("none").is_empty());
        assert!(manifest.growth(dir, 2, None).expect("none").is_empty());
        let added = manifest.growth(dir, 5, Some(BASE)).expect("growth");
        let planned = Manifest::plan(dir, 5, Some(BASE)).expect("plan");
        assert_eq!(added, planned.nodes[3..].to_vec());
        let free = manifest.growth(dir, 4, None).expect("growth");
        assert_eq!(free.len(), 1);
        assert_eq!(free[0].id, 4);
        assert_eq!(free[0].data_dir, dir.join("node-4"));
        assert!(manifest.growth(dir, 10, None).is_err(), "too many nodes");
    }

    #[test]
    fn flags_that_contradict_an_existing_cluster_are_rejected() {
        let dir = Path::new("/d");
        let manifest = Manifest::plan(dir, 3, Some(7001)).expect("plan");
        assert!(manifest.check_flags(dir, None, None).is_ok());
        assert!(manifest.check_flags(dir, Some(3), Some(7001)).is_ok());
        // Another count grows or shrinks the cluster; out of range, it is refused.
        assert!(manifest.check_flags(dir, Some(5), Some(7001)).is_ok());
        assert!(manifest.check_flags(dir, Some(1), None).is_ok());
        let err = manifest
            .check_flags(dir, Some(10), None)
            .expect_err("too many nodes");
        assert!(err.contains("--nodes 10"), "{err}");
        let err = manifest
            .check_flags(dir, None, Some(8001))
            .expect_err("ports differ");
        assert!(err.contains("--base-port 8001"), "{err}");
        assert!(!err.contains('\n'));
    }

    #[test]
    fn a_port_in_use_is_named_in_the_error() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut manifest = Manifest::plan(Path::new("/d"), 1, None).expect("plan");
        manifest.nodes[0].peer_addr = format!("127.0.0.1:{port}");
        let err = check_ports_free(&manifest, Path::new("/d"), false).expect_err("port taken");
        assert!(
            err.contains(&format!("port {port}")) && err.contains("already in use"),
            "{err}"
        );
        assert!(err.contains("--base-port"), "{err}");
    }
}
