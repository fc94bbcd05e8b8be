//! The test network: one network namespace per node, or loopback with an
//! in-process proxy when namespaces cannot be made.
//!
//! # Namespaces (the real thing)
//! For a run with harness pid P the harness creates, and only ever touches:
//! - a bridge `lkjP-br` in the root namespace with address `10.77.S.254/24`
//!   (S is a subnet octet no route on this host uses yet);
//! - per node i a namespace `lkjP-ni` holding `eth0` = `10.77.S.i/24`, the
//!   inner end of a veth pair whose outer end `lkjP-vi` is a bridge port.
//!
//! Nodes bind inside their namespace; the harness and its client workers
//! stay in the root namespace and reach every node through the bridge, so
//! client traffic goes only to namespaces this run created. A cut link
//! `a → b` is an `iptables -A INPUT -s addr(a) -j DROP` rule *inside b's
//! namespace*: packets are dropped by the kernel, not refused, exactly as on
//! a broken network; TCP retransmits them once the rule is gone. Rules die
//! with their namespace, so teardown is deleting the namespaces and the
//! bridge. Client traffic (from `.254`) is never cut.
//!
//! # Loopback (the fallback)
//! Not root, no `ip`/`iptables`, or creating a namespace failed: nodes bind
//! 127.0.0.1, and every peer link `a → b` goes through its own in-process
//! proxy ([`super::proxy`]), which stops forwarding bytes in a cut
//! direction. Each node is given its own `--initial-cluster` naming the
//! proxies it must dial. The results say which network a run used.
//!
//! # Stale runs
//! Names carry the harness pid; [`cleanup_stale`] removes namespaces and
//! bridges whose pid no longer runs (a run killed with SIGKILL cannot clean
//! up after itself).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::proxy::{LinkTable, Proxy};

/// Client and peer ports inside a namespace (each namespace has its own
/// address, so the ports can be fixed).
const NAMESPACE_CLIENT_PORT: u16 = 7001;
const NAMESPACE_PEER_PORT: u16 = 7002;
/// The prefix of every name this harness creates.
const NAME_PREFIX: &str = "lkj";

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

/// The network of one run.
pub enum Network {
    Namespaces(Namespaces),
    Loopback(Loopback),
}

impl Network {
    /// Namespaces when possible, else loopback; the reason for a fallback
    /// is returned alongside.
    pub async fn create(nodes: u64) -> Result<(Network, Option<String>), String> {
        match Namespaces::create(nodes) {
            Ok(namespaces) => Ok((Network::Namespaces(namespaces), None)),
            Err(reason) => {
                let loopback = Loopback::create(nodes).await?;
                Ok((Network::Loopback(loopback), Some(reason)))
            }
        }
    }

    /// Loopback even where namespaces would work (`--network loopback`).
    pub async fn create_loopback(nodes: u64) -> Result<Network, String> {
        Ok(Network::Loopback(Loopback::create(nodes).await?))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Network::Namespaces(_) => "namespaces",
            Network::Loopback(_) => "loopback-proxy",
        }
    }

    pub fn nodes(&self) -> &[NodeAddrs] {
        match self {
            Network::Namespaces(n) => &n.nodes,
            Network::Loopback(l) => &l.nodes,
        }
    }

    /// Replaces every cut with `cuts` (pairs `(from, to)` of node ids whose
    /// packets from `from` to `to` are dropped).
    pub fn set_cuts(&self, cuts: &BTreeSet<(u64, u64)>) -> Result<(), String> {
        match self {
            Network::Namespaces(n) => n.set_cuts(cuts),
            Network::Loopback(l) => {
                l.links.set(cuts.clone());
                Ok(())
            }
        }
    }

    /// Removes everything this network made. Idempotent.
    pub fn teardown(&self) {
        match self {
            Network::Namespaces(n) => n.teardown(),
            Network::Loopback(l) => l.teardown(),
        }
    }
}

/// The namespaces, veths and bridge of one run.
pub struct Namespaces {
    prefix: String,
    bridge: String,
    namespaces: Vec<String>,
    addrs: Vec<Ipv4Addr>,
    nodes: Vec<NodeAddrs>,
    torn_down: AtomicBool,
}

impl Namespaces {
    /// Creates the bridge and one namespace per node. On failure, whatever
    /// was created is removed and the reason returned.
    pub fn create(nodes: u64) -> Result<Namespaces, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        for tool in ["ip", "iptables"] {
            if !command_exists(tool) {
                return Err(format!("`{tool}` is not installed"));
            }
        }
        // Best effort: a stale run's leftovers must not block this one.
        cleanup_stale();
        let prefix = format!("{NAME_PREFIX}{}", std::process::id());
        let subnet = free_subnet_octet()?;
        let mut made = Namespaces {
            bridge: format!("{prefix}-br"),
            prefix,
            namespaces: Vec::new(),
            addrs: Vec::new(),
            nodes: Vec::new(),
            torn_down: AtomicBool::new(false),
        };
        // On error `made` is dropped, which tears down what exists.
        made.build(nodes, subnet)?;
        Ok(made)
    }

    fn build(&mut self, nodes: u64, subnet: u8) -> Result<(), String> {
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
            let namespace = format!("{}-n{id}", self.prefix);
            let outer = format!("{}-v{id}", self.prefix);
            let addr = Ipv4Addr::new(10, 77, subnet, id as u8);
            ip(&["netns", "add", &namespace])?;
            self.namespaces.push(namespace.clone());
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &namespace,
            ])?;
            ip(&["link", "set", &outer, "master", &bridge, "up"])?;
            ip(&[
                "-n",
                &namespace,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &namespace, "link", "set", "eth0", "up"])?;
            ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
            // Fail now, not at the first partition, if iptables cannot work here.
            iptables(&namespace, &["-F", "INPUT"])?;
            self.addrs.push(addr);
        }
        let initial_cluster = (1..=nodes)
            .map(|id| format!("{id}={}:{NAMESPACE_PEER_PORT}", self.addrs[id as usize - 1]))
            .collect::<Vec<_>>()
            .join(",");
        self.nodes = (1..=nodes)
            .map(|id| {
                let addr = self.addrs[id as usize - 1];
                NodeAddrs {
                    id,
                    client: SocketAddr::from((addr, NAMESPACE_CLIENT_PORT)),
                    peer: SocketAddr::from((addr, NAMESPACE_PEER_PORT)),
                    initial_cluster: initial_cluster.clone(),
                    netns: Some(PathBuf::from(format!(
                        "/run/netns/{}",
                        self.namespaces[id as usize - 1]
                    ))),
                }
            })
            .collect();
        Ok(())
    }

    fn set_cuts(&self, cuts: &BTreeSet<(u64, u64)>) -> Result<(), String> {
        for (index, namespace) in self.namespaces.iter().enumerate() {
            let to = index as u64 + 1;
            iptables(namespace, &["-F", "INPUT"])?;
            for &(from, _) in cuts.iter().filter(|(_, t)| *t == to) {
                let source = self.addrs[from as usize - 1].to_string();
                iptables(namespace, &["-A", "INPUT", "-s", &source, "-j", "DROP"])?;
            }
        }
        Ok(())
    }

    fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        for namespace in &self.namespaces {
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

/// Nodes on 127.0.0.1 with a proxy per directed peer link.
pub struct Loopback {
    links: LinkTable,
    nodes: Vec<NodeAddrs>,
    proxies: Mutex<Vec<Proxy>>,
}

impl Loopback {
    async fn create(nodes: u64) -> Result<Loopback, String> {
        let links = LinkTable::default();
        let mut addrs = Vec::new();
        for _ in 1..=nodes {
            addrs.push((free_loopback_port()?, free_loopback_port()?));
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
                let proxy = Proxy::spawn(from, to, peer, links.clone())
                    .await
                    .map_err(|e| format!("cannot start the proxy {from}->{to}: {e}"))?;
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
        Ok(Loopback {
            links,
            nodes: node_addrs,
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

fn free_loopback_port() -> Result<SocketAddr, String> {
    // The port is released before the node binds it; another program could
    // take it in between, which the node would report as "address in use".
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
    listener
        .local_addr()
        .map_err(|e| format!("cannot read a bound address: {e}"))
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

fn iptables(namespace: &str, args: &[&str]) -> Result<(), String> {
    let mut full = vec!["netns", "exec", namespace, "iptables", "-w"];
    full.extend_from_slice(args);
    ip(&full)
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

/// The harness pid in a name this harness made (`lkjP-…`), if it is one.
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let (pid, suffix) = rest.split_once('-')?;
    let kind_ok = suffix == "br" || suffix.starts_with('n') || suffix.starts_with('v');
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
        assert_eq!(owner_pid("lkjx-n1"), None);
        assert_eq!(owner_pid("docker0"), None);
        assert_eq!(owner_pid("lkj12-eth0"), None);
    }

    #[test]
    fn this_process_is_alive() {
        assert!(pid_alive(std::process::id() as i32));
    }
}
