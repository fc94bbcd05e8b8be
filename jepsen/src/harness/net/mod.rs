//! The test network: one network namespace per node and per client worker,
//! or loopback with in-process proxies when namespaces cannot be made.
//!
//! # Members and cuts
//! Everything that can be cut off is a *member* with a numeric id: node i
//! is member i (1 ≤ i ≤ 9), client worker slot k is member
//! [`WORKER_MEMBER_BASE`] + k. A cut is a directed pair `(from, to)` of
//! members: packets from `from` to `to` are dropped. Cuts come in named
//! *layers* ([`Network::set_layer`]) that the nemesis and the client-cut
//! timers own independently (the schedule's partition, the client a
//! schedule step cut, each holder cut on its own timer); what is in force
//! is the union of every layer, and changing one layer re-applies only the
//! members whose rules changed.
//!
//! # Namespaces (the real thing)
//! See [`namespaces`]: a bridge, a namespace per node and per worker, and
//! a cut `a → b` is a DROP rule for `a`'s address in `b`'s INPUT chain.
//! Client traffic goes from each worker's own namespace through the bridge
//! to the nodes', so it can be cut like peer traffic, and it goes only to
//! namespaces this run created.
//!
//! # Loopback (the fallback)
//! Not root, no `ip`/`iptables`, or creating a namespace failed: nodes bind
//! 127.0.0.1, and every directed peer link `a → b` goes through its own
//! in-process proxy ([`super::proxy`]), which stops forwarding bytes in a
//! cut direction. Each node is given its own `--initial-cluster` naming the
//! proxies it must dial. Each worker dials the nodes through proxies of its
//! own (worker k → node i is member `100 + k` → member i), so client
//! partitions work here too, with the proxies' semantics: bytes in a cut
//! direction are held and delivered after the heal, never dropped. The
//! results say which network a run used.
//!
//! # Stale runs
//! Names carry the harness pid; [`cleanup_stale`] removes namespaces and
//! bridges whose pid no longer runs (a run killed with SIGKILL cannot clean
//! up after itself).
//!
//! # Not done yet
//! - Cuts drop whole hosts; no port-level or rate-limited (lossy, slow)
//!   links.
//! - Loopback and snapshots: the server keeps its members' peer addresses
//!   in the state machine (bootstrapped from `--initial-cluster`), and a
//!   node that installs a snapshot takes the sender's table. In loopback
//!   the tables differ (each names that node's own proxies), so from then
//!   on the node dials its peers through the sender's proxies, and the
//!   sender directly: cuts of its own links no longer reach it. Namespace
//!   mode, where every node is given the same addresses, is unaffected.

pub mod namespaces;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use super::proxy::{LinkTable, Proxy};
pub use namespaces::Namespaces;

/// Member id of client worker slot 0; slot k is this plus k.
pub const WORKER_MEMBER_BASE: u64 = 100;
/// The prefix of every name this harness creates.
const NAME_PREFIX: &str = "lkj";

/// Directed cuts `(from, to)` between members.
pub type Cuts = BTreeSet<(u64, u64)>;

/// The member id of client worker `slot`.
pub fn worker_member(slot: u64) -> u64 {
    WORKER_MEMBER_BASE + slot
}

/// Where node i listens and which peers it dials.
#[derive(Debug, Clone)]
pub struct NodeAddrs {
    pub id: u64,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    /// The `--initial-cluster` value for this node.
    pub initial_cluster: String,
    /// `/run/netns/NAME` to enter before exec, in namespace mode.
    pub netns: Option<PathBuf>,
}

/// The network of one run: its backend and the cut layers in force.
pub struct Network {
    backend: Backend,
    layers: Mutex<BTreeMap<String, Cuts>>,
}

enum Backend {
    Namespaces(Namespaces),
    Loopback(Loopback),
}

impl Network {
    /// Namespaces when possible, else loopback; the reason for a fallback
    /// is returned alongside.
    pub async fn create(nodes: u64, workers: u64) -> Result<(Network, Option<String>), String> {
        let backend = match Namespaces::create(nodes, workers) {
            Ok(namespaces) => (Backend::Namespaces(namespaces), None),
            Err(reason) => {
                let loopback = Loopback::create(nodes, workers).await?;
                (Backend::Loopback(loopback), Some(reason))
            }
        };
        Ok((Network::with(backend.0), backend.1))
    }

    /// Loopback even where namespaces would work (`--network loopback`).
    pub async fn create_loopback(nodes: u64, workers: u64) -> Result<Network, String> {
        let loopback = Loopback::create(nodes, workers).await?;
        Ok(Network::with(Backend::Loopback(loopback)))
    }

    fn with(backend: Backend) -> Network {
        Network {
            backend,
            layers: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn kind(&self) -> &'static str {
        match &self.backend {
            Backend::Namespaces(_) => "namespaces",
            Backend::Loopback(_) => "loopback-proxy",
        }
    }

    pub fn nodes(&self) -> &[NodeAddrs] {
        match &self.backend {
            Backend::Namespaces(n) => n.nodes(),
            Backend::Loopback(l) => &l.nodes,
        }
    }

    /// The endpoints worker `slot` dials, one per node in node order.
    pub fn worker_endpoints(&self, slot: u64) -> Vec<String> {
        match &self.backend {
            Backend::Namespaces(n) => n.nodes().iter().map(|a| a.client.to_string()).collect(),
            Backend::Loopback(l) => l
                .worker_proxies
                .get(&slot)
                .map(|addrs| addrs.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
        }
    }

    /// The namespace worker `slot` runs in, in namespace mode.
    pub fn worker_netns(&self, slot: u64) -> Option<PathBuf> {
        match &self.backend {
            Backend::Namespaces(n) => n.worker_netns(slot),
            Backend::Loopback(_) => None,
        }
    }

    /// Both directions between worker `slot` and every node: the worker's
    /// client is cut off from the whole cluster.
    pub fn client_isolation(&self, slot: u64) -> Cuts {
        let nodes: Vec<u64> = self.nodes().iter().map(|n| n.id).collect();
        between(&[worker_member(slot)], &nodes)
    }

    /// Replaces the cuts of layer `name` (an empty set removes the layer)
    /// and puts the union of every layer in force.
    pub fn set_layer(&self, name: &str, cuts: &Cuts) -> Result<(), String> {
        // Held while applying, so that concurrent changes apply in order.
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        if cuts.is_empty() {
            layers.remove(name);
        } else {
            layers.insert(name.to_string(), cuts.clone());
        }
        let union: Cuts = layers.values().flatten().copied().collect();
        match &self.backend {
            Backend::Namespaces(n) => n.apply(&union),
            Backend::Loopback(l) => {
                l.links.set(union);
                Ok(())
            }
        }
    }

    /// Removes everything this network made. Idempotent.
    pub fn teardown(&self) {
        match &self.backend {
            Backend::Namespaces(n) => n.teardown(),
            Backend::Loopback(l) => l.teardown(),
        }
    }
}

/// Both directions between every member of `a` and every member of `b`.
pub fn between(a: &[u64], b: &[u64]) -> Cuts {
    let mut cuts = BTreeSet::new();
    for &x in a {
        for &y in b {
            cuts.insert((x, y));
            cuts.insert((y, x));
        }
    }
    cuts
}

/// Nodes on 127.0.0.1 with a proxy per directed peer link and per
/// (worker, node) client link.
pub struct Loopback {
    links: LinkTable,
    nodes: Vec<NodeAddrs>,
    /// Per worker slot, the proxies it dials, in node order.
    worker_proxies: BTreeMap<u64, Vec<SocketAddr>>,
    proxies: Mutex<Vec<Proxy>>,
}

impl Loopback {
    async fn create(nodes: u64, workers: u64) -> Result<Loopback, String> {
        let links = LinkTable::default();
        let mut addrs = Vec::new();
        // Held until every proxy below has its own port: each proxy binds
        // port 0 too, and a node port released early could be handed to a
        // proxy, whose forwarding would then answer for the node.
        let mut reserved = Vec::new();
        for _ in 1..=nodes {
            let (client_hold, client) = reserve_loopback_port()?;
            let (peer_hold, peer) = reserve_loopback_port()?;
            reserved.extend([client_hold, peer_hold]);
            addrs.push((client, peer));
        }
        let mut proxies = Vec::new();
        let mut node_addrs = Vec::new();
        for from in 1..=nodes {
            let mut members = Vec::new();
            for to in 1..=nodes {
                let peer = addrs[to as usize - 1].1;
                if from == to {
                    members.push(format!("{to}={peer}"));
                    continue;
                }
                let proxy = spawn_proxy(from, to, peer, &links).await?;
                members.push(format!("{to}={}", proxy.listen_addr()));
                proxies.push(proxy);
            }
            let (client, peer) = addrs[from as usize - 1];
            node_addrs.push(NodeAddrs {
                id: from,
                client,
                peer,
                initial_cluster: members.join(","),
                netns: None,
            });
        }
        let mut worker_proxies = BTreeMap::new();
        for slot in 0..workers {
            let mut dials = Vec::new();
            for (to, (client, _)) in (1..=nodes).zip(&addrs) {
                let proxy = spawn_proxy(worker_member(slot), to, *client, &links).await?;
                dials.push(proxy.listen_addr());
                proxies.push(proxy);
            }
            worker_proxies.insert(slot, dials);
        }
        // The nodes bind these next.
        drop(reserved);
        Ok(Loopback {
            links,
            nodes: node_addrs,
            worker_proxies,
            proxies: Mutex::new(proxies),
        })
    }

    fn teardown(&self) {
        let mut proxies = self.proxies.lock().unwrap_or_else(|p| p.into_inner());
        for proxy in proxies.drain(..) {
            proxy.stop();
        }
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        self.teardown();
    }
}

async fn spawn_proxy(
    from: u64,
    to: u64,
    target: SocketAddr,
    links: &LinkTable,
) -> Result<Proxy, String> {
    Proxy::spawn(from, to, target, links.clone())
        .await
        .map_err(|e| format!("cannot start the proxy {from}->{to}: {e}"))
}

/// A free loopback port and the listener that holds it. Once the listener
/// is dropped another program could take the port before the node binds
/// it, which the node would report as "address in use" (and the status
/// check as an answer from someone else).
fn reserve_loopback_port() -> Result<(std::net::TcpListener, SocketAddr), String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read a bound address: {e}"))?;
    Ok((listener, addr))
}

fn command_exists(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

fn ip(args: &[&str]) -> Result<(), String> {
    output("ip", args).map(|_| ())
}

/// Runs a command, returning its stdout, or an error with its stderr.
fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The harness pid in a name this harness made (`lkjP-…`), if it is one:
/// `lkjP-br` (bridge), `lkjP-nI`/`lkjP-vI` (node namespace and veth),
/// `lkjP-wK`/`lkjP-uK` (worker namespace and veth).
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, suffix) = rest.split_once('-')?;
    let numbered = |kind: char| {
        suffix
            .strip_prefix(kind)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let kind_ok = suffix == "br" || ['n', 'v', 'w', 'u'].into_iter().any(numbered);
    if !kind_ok || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the pid exists.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes namespaces and bridges left by runs whose harness is gone.
/// Returns what it removed.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let namespaces = output("ip", &["netns", "list"]).unwrap_or_default();
    for name in namespaces
        .lines()
        .filter_map(|l| l.split_whitespace().next())
    {
        if owner_pid(name).is_some_and(|pid| !pid_alive(pid)) && ip(&["netns", "del", name]).is_ok()
        {
            removed.push(format!("namespace {name}"));
        }
    }
    let links = output("ip", &["-o", "link", "show", "type", "bridge"]).unwrap_or_default();
    for line in links.lines() {
        // `12: lkj123-br: <BROADCAST,…`
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        if owner_pid(name).is_some_and(|pid| !pid_alive(pid)) && ip(&["link", "del", name]).is_ok()
        {
            removed.push(format!("bridge {name}"));
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_this_harness_makes_are_recognised_as_its_own() {
        assert_eq!(owner_pid("lkj4242-n3"), Some(4242));
        assert_eq!(owner_pid("lkj4242-br"), Some(4242));
        assert_eq!(owner_pid("lkj4242-v1"), Some(4242));
        assert_eq!(owner_pid("lkj4242-w12"), Some(4242));
        assert_eq!(owner_pid("lkj4242-u0"), Some(4242));
        assert_eq!(owner_pid("lkjx-n1"), None);
        assert_eq!(owner_pid("docker0"), None);
        assert_eq!(owner_pid("lkj12-eth0"), None);
        assert_eq!(owner_pid("lkj12-w"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(pid_alive(std::process::id() as i32));
    }

    #[test]
    fn isolating_a_client_cuts_both_directions_to_every_node_only() {
        let cuts = between(&[worker_member(3)], &[1, 2]);
        assert_eq!(
            cuts,
            BTreeSet::from([(103, 1), (1, 103), (103, 2), (2, 103)])
        );
    }

    #[tokio::test]
    async fn no_loopback_proxy_takes_a_port_picked_for_a_node() {
        // The proxies bind port 0 after the nodes' ports are picked; a node
        // port released too early could be handed to a proxy, and a status
        // check of that node would be answered through it by another node.
        for _ in 0..40 {
            let network = Network::create_loopback(5, 4).await.expect("loopback");
            let Backend::Loopback(l) = &network.backend else {
                unreachable!("made as loopback")
            };
            let node_ports: BTreeSet<SocketAddr> = network
                .nodes()
                .iter()
                .flat_map(|n| [n.client, n.peer])
                .collect();
            assert_eq!(node_ports.len(), 10, "ten distinct node ports");
            let proxies = l.proxies.lock().unwrap_or_else(|p| p.into_inner());
            for proxy in proxies.iter() {
                assert!(
                    !node_ports.contains(&proxy.listen_addr()),
                    "a proxy listens on a node's port {}",
                    proxy.listen_addr()
                );
            }
            drop(proxies);
            network.teardown();
        }
    }

    #[tokio::test]
    async fn loopback_layers_add_up_and_clearing_one_keeps_the_others() {
        let network = Network::create_loopback(2, 1).await.expect("loopback");
        assert_eq!(network.worker_endpoints(0).len(), 2);
        assert_ne!(
            network.worker_endpoints(0)[0],
            network.nodes()[0].client.to_string(),
            "workers dial their own proxies"
        );
        let client = network.client_isolation(0);
        network
            .set_layer("schedule", &BTreeSet::from([(1, 2)]))
            .expect("set");
        network.set_layer("client-0", &client).expect("set");
        let Backend::Loopback(l) = &network.backend else {
            unreachable!("made as loopback")
        };
        assert_eq!(l.links.current().len(), 1 + client.len());
        network.set_layer("client-0", &Cuts::new()).expect("clear");
        assert_eq!(l.links.current(), BTreeSet::from([(1, 2)]));
        network.teardown();
    }
}
