//! The namespace network: a bridge, one network namespace per node and per
//! client worker, and iptables rules inside them.
//!
//! For a run with harness pid P the harness creates, and only ever touches:
//! - a bridge `lkjP-br` in the root namespace with address `10.77.S.254/24`
//!   (S is a subnet octet no route on this host uses yet);
//! - per node i a namespace `lkjP-ni` holding `eth0` = `10.77.S.i/24`, the
//!   inner end of a veth pair whose outer end `lkjP-vi` is a bridge port;
//! - per worker slot k a namespace `lkjP-wk` holding `eth0` =
//!   `10.77.S.(100+k)/24`, its veth's outer end `lkjP-uk`.
//!
//! Nodes and workers run inside their namespaces; the harness itself (the
//! status poller, the final reads) stays in the root namespace and reaches
//! the nodes through the bridge from `.254`, which is never cut.
//!
//! A cut link `a → b` is a rule `-A INPUT -s addr(a) -j DROP` *inside b's
//! namespace*: packets are dropped by the kernel, not refused, exactly as
//! on a broken network; TCP retransmits them once the rule is gone. Each
//! changed namespace gets its whole filter table in one `iptables-restore`
//! (the namespaces in parallel), so even a cut of every worker from four
//! nodes lands in tens of milliseconds. Rules die with their namespace, so
//! teardown is deleting the namespaces and the bridge.
//!
//! # Not done yet
//! - IPv4 in one /24: nodes take .1–.99, workers .100–.163, so a run has
//!   at most [`MAX_WORKERS`] workers.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::{
    cleanup_stale, command_exists, ip, output, worker_member, Cuts, NodeAddrs, NAME_PREFIX,
    WORKER_MEMBER_BASE,
};

/// Client and peer ports inside a namespace (each namespace has its own
/// address, so the ports can be fixed).
const NAMESPACE_CLIENT_PORT: u16 = 7001;
const NAMESPACE_PEER_PORT: u16 = 7002;
/// Most workers a namespace network has room for (addresses .100–.163).
pub const MAX_WORKERS: u64 = 64;

/// The namespaces, veths and bridge of one run.
pub struct Namespaces {
    prefix: String,
    bridge: String,
    /// Every namespace made, for teardown, in creation order.
    made: Vec<String>,
    /// Namespace and address of every member (node or worker).
    members: BTreeMap<u64, (String, Ipv4Addr)>,
    nodes: Vec<NodeAddrs>,
    /// The DROP sources in force in each member's INPUT chain.
    applied: Mutex<BTreeMap<u64, BTreeSet<u64>>>,
    torn_down: AtomicBool,
}

impl Namespaces {
    /// Creates the bridge and one namespace per node and per worker. On
    /// failure, whatever was created is removed and the reason returned.
    pub fn create(nodes: u64, workers: u64) -> Result<Namespaces, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        for tool in ["ip", "iptables", "iptables-restore"] {
            if !command_exists(tool) {
                return Err(format!("`{tool}` is not installed"));
            }
        }
        if workers > MAX_WORKERS {
            return Err(format!("at most {MAX_WORKERS} workers have addresses"));
        }
        // Best effort: a stale run's leftovers must not block this one.
        cleanup_stale();
        let prefix = format!("{NAME_PREFIX}{}", std::process::id());
        let subnet = free_subnet_octet()?;
        let mut made = Namespaces {
            bridge: format!("{prefix}-br"),
            prefix,
            made: Vec::new(),
            members: BTreeMap::new(),
            nodes: Vec::new(),
            applied: Mutex::new(BTreeMap::new()),
            torn_down: AtomicBool::new(false),
        };
        // On error `made` is dropped, which tears down what exists.
        made.build(nodes, workers, subnet)?;
        Ok(made)
    }

    fn build(&mut self, nodes: u64, workers: u64, subnet: u8) -> Result<(), String> {
        let bridge = self.bridge.clone();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("10.77.{subnet}.254/24"),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for id in 1..=nodes {
            let addr = Ipv4Addr::new(10, 77, subnet, id as u8);
            self.add_member(id, &format!("n{id}"), &format!("v{id}"), addr)?;
        }
        for slot in 0..workers {
            let member = worker_member(slot);
            let addr = Ipv4Addr::new(10, 77, subnet, member as u8);
            self.add_member(member, &format!("w{slot}"), &format!("u{slot}"), addr)?;
        }
        let addr_of = |id: u64| self.members[&id].1;
        let initial_cluster = (1..=nodes)
            .map(|id| format!("{id}={}:{NAMESPACE_PEER_PORT}", addr_of(id)))
            .collect::<Vec<_>>()
            .join(",");
        self.nodes = (1..=nodes)
            .map(|id| NodeAddrs {
                id,
                client: SocketAddr::from((addr_of(id), NAMESPACE_CLIENT_PORT)),
                peer: SocketAddr::from((addr_of(id), NAMESPACE_PEER_PORT)),
                initial_cluster: initial_cluster.clone(),
                netns: Some(netns_path(&self.members[&id].0)),
            })
            .collect();
        Ok(())
    }

    /// A namespace `PREFIX-NAME` with `eth0` = `addr`, plugged into the
    /// bridge through the veth `PREFIX-OUTER`.
    fn add_member(
        &mut self,
        id: u64,
        name: &str,
        outer: &str,
        addr: Ipv4Addr,
    ) -> Result<(), String> {
        let namespace = format!("{}-{name}", self.prefix);
        let outer = format!("{}-{outer}", self.prefix);
        ip(&["netns", "add", &namespace])?;
        self.made.push(namespace.clone());
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &namespace,
        ])?;
        ip(&["link", "set", &outer, "master", &self.bridge, "up"])?;
        let cidr = format!("{addr}/24");
        ip(&["-n", &namespace, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &namespace, "link", "set", "eth0", "up"])?;
        ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
        if id < WORKER_MEMBER_BASE {
            // Fail now, not at the first partition, if iptables cannot work here.
            restore(&namespace, &BTreeSet::new(), &self.members)?;
        }
        self.members.insert(id, (namespace, addr));
        Ok(())
    }

    pub fn nodes(&self) -> &[NodeAddrs] {
        &self.nodes
    }

    pub fn worker_netns(&self, slot: u64) -> Option<PathBuf> {
        self.members
            .get(&worker_member(slot))
            .map(|(namespace, _)| netns_path(namespace))
    }

    /// Puts exactly `cuts` in force, rewriting only the namespaces whose
    /// rules change.
    pub fn apply(&self, cuts: &Cuts) -> Result<(), String> {
        if let Some((from, to)) = cuts
            .iter()
            .find(|(from, to)| !self.members.contains_key(from) || !self.members.contains_key(to))
        {
            return Err(format!("cut {from} -> {to} names an unknown member"));
        }
        let mut wanted: BTreeMap<u64, BTreeSet<u64>> = self
            .members
            .keys()
            .map(|&id| (id, BTreeSet::new()))
            .collect();
        for &(from, to) in cuts {
            wanted.entry(to).or_default().insert(from);
        }
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let changed: Vec<(u64, BTreeSet<u64>)> = wanted
            .into_iter()
            .filter(|(id, sources)| {
                applied
                    .get(id)
                    .map_or(!sources.is_empty(), |a| a != sources)
            })
            .collect();
        let started: Vec<_> = changed
            .iter()
            .map(|(id, sources)| {
                let namespace = &self.members[id].0;
                (spawn_restore(namespace, sources, &self.members), namespace)
            })
            .collect();
        let mut errors = Vec::new();
        for ((result, namespace), (id, sources)) in started.into_iter().zip(changed) {
            match result.and_then(|child| finish_restore(child, namespace)) {
                Ok(()) => {
                    applied.insert(id, sources);
                }
                Err(error) => errors.push(error),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        for namespace in &self.made {
            // Deleting the namespace deletes its rules and its veth pair.
            if let Err(error) = ip(&["netns", "del", namespace]) {
                eprintln!("latchkey-jepsen: warning: {error}");
            }
        }
        if let Err(error) = ip(&["link", "del", &self.bridge]) {
            eprintln!("latchkey-jepsen: warning: {error}");
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn netns_path(namespace: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{namespace}"))
}

/// The filter table that drops every packet from `sources`.
fn filter_table(sources: &BTreeSet<u64>, members: &BTreeMap<u64, (String, Ipv4Addr)>) -> String {
    let mut table =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for source in sources {
        if let Some((_, addr)) = members.get(source) {
            table.push_str(&format!("-A INPUT -s {addr}/32 -j DROP\n"));
        }
    }
    table.push_str("COMMIT\n");
    table
}

fn spawn_restore(
    namespace: &str,
    sources: &BTreeSet<u64>,
    members: &BTreeMap<u64, (String, Ipv4Addr)>,
) -> Result<std::process::Child, String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", namespace, "iptables-restore", "-w"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run iptables-restore in {namespace}: {e}"))?;
    let table = filter_table(sources, members);
    if let Some(mut stdin) = child.stdin.take() {
        // A failed write shows up as a failed exit below.
        let _ = stdin.write_all(table.as_bytes());
    }
    Ok(child)
}

fn finish_restore(child: std::process::Child, namespace: &str) -> Result<(), String> {
    let out = child
        .wait_with_output()
        .map_err(|e| format!("iptables-restore in {namespace}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables-restore in {namespace} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn restore(
    namespace: &str,
    sources: &BTreeSet<u64>,
    members: &BTreeMap<u64, (String, Ipv4Addr)>,
) -> Result<(), String> {
    finish_restore(spawn_restore(namespace, sources, members)?, namespace)
}

/// A third octet `S` such that no route on this host mentions `10.77.S.`.
fn free_subnet_octet() -> Result<u8, String> {
    let routes = output("ip", &["-4", "route", "show"])?;
    let start = (std::process::id() % 250) as u8;
    (0..250u8)
        .map(|offset| 1 + (start.wrapping_add(offset) % 250))
        .find(|octet| !routes.contains(&format!("10.77.{octet}.")))
        .ok_or_else(|| "every 10.77.S.0/24 subnet is in use".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_table_drops_exactly_the_cut_sources() {
        let members = BTreeMap::from([
            (1, ("a".to_string(), Ipv4Addr::new(10, 77, 5, 1))),
            (100, ("b".to_string(), Ipv4Addr::new(10, 77, 5, 100))),
        ]);
        let table = filter_table(&BTreeSet::from([100]), &members);
        assert!(table.contains("-A INPUT -s 10.77.5.100/32 -j DROP\n"));
        assert!(!table.contains("10.77.5.1/"));
        assert!(table.starts_with("*filter\n") && table.ends_with("COMMIT\n"));
    }
}
