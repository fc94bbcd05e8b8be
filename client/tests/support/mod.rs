//! A cluster of in-process nodes for client tests: real loopback gRPC, a
//! RocksDB per node in a temp dir, free ports. Stopped nodes and the temp
//! dirs are cleaned up when the cluster is dropped, even if a test fails.
//!
//! Clients reach each node through a loopback TCP [`Proxy`], which is also
//! the address the node advertises as its client address (so leader hints
//! lead through it too). Stopping a node severs every connection through
//! its proxy, as the exit of a real process would; an in-process node that
//! stops ends its streams but leaves the connections themselves open.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use latchkey_client::Client;
use latchkey_server::config::Config;
use latchkey_server::node::Role;
use latchkey_server::server::RunningServer;
use latchkey_server::types::NodeId;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Generous bound on anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// Forwards loopback connections to one node until severed.
pub struct Proxy {
    pub addr: SocketAddr,
    sever: watch::Sender<u64>,
    blocked: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy port");
        let addr = listener.local_addr().expect("local addr");
        let (sever, severed) = watch::channel(0u64);
        let blocked = Arc::new(AtomicBool::new(false));
        let refuse = blocked.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    continue;
                }
                let mut severed = severed.clone();
                severed.borrow_and_update();
                tokio::spawn(async move {
                    let _ = inbound.set_nodelay(true);
                    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = outbound.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = severed.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            sever,
            blocked,
            task,
        }
    }

    /// Severs every connection and closes new ones at once, until unblocked.
    pub fn block(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        self.sever();
    }

    pub fn unblock(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }

    /// Closes every connection open through the proxy.
    pub fn sever(&self) {
        self.sever.send_modify(|generation| *generation += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct TestCluster {
    pub configs: BTreeMap<NodeId, Config>,
    pub servers: BTreeMap<NodeId, RunningServer>,
    pub proxies: BTreeMap<NodeId, Proxy>,
    _dirs: Vec<TempDir>,
}

/// Cluster starts tried before giving up: a port picked as free may be
/// taken by another test process before the node binds it.
const MAX_START_ATTEMPTS: usize = 5;

impl TestCluster {
    /// Starts `nodes` nodes and waits until they agree on a leader.
    pub async fn start(nodes: u64) -> TestCluster {
        TestCluster::start_with(nodes, |_| {}).await
    }

    /// Starts `nodes` nodes with each config changed by `adjust`.
    pub async fn start_with(nodes: u64, adjust: impl Fn(&mut Config)) -> TestCluster {
        let mut failures = Vec::new();
        for _ in 0..MAX_START_ATTEMPTS {
            match TestCluster::try_start(nodes, &adjust).await {
                Ok(cluster) => {
                    cluster.leader().await;
                    return cluster;
                }
                Err(failure) => failures.push(failure),
            }
        }
        panic!("cluster did not start: {failures:?}");
    }

    async fn try_start(nodes: u64, adjust: &impl Fn(&mut Config)) -> Result<TestCluster, String> {
        let peers: BTreeMap<NodeId, String> = (1..=nodes)
            .map(|id| (NodeId(id), format!("127.0.0.1:{}", free_port())))
            .collect();
        let mut configs = BTreeMap::new();
        let mut proxies = BTreeMap::new();
        let mut dirs = Vec::new();
        for id in peers.keys() {
            let dir = tempfile::tempdir().expect("temp dir");
            let client: SocketAddr = format!("127.0.0.1:{}", free_port())
                .parse()
                .expect("a loopback address parses");
            let proxy = Proxy::start(client).await;
            let mut config = Config {
                advertise_client: proxy.addr.to_string(),
                ..Config::with_defaults(
                    *id,
                    dir.path().to_path_buf(),
                    client,
                    peers[id].parse().expect("a loopback address parses"),
                    peers.clone(),
                )
            };
            adjust(&mut config);
            configs.insert(*id, config);
            proxies.insert(*id, proxy);
            dirs.push(dir);
        }
        let mut cluster = TestCluster {
            configs,
            servers: BTreeMap::new(),
            proxies,
            _dirs: dirs,
        };
        for id in 1..=nodes {
            let config = cluster.configs[&NodeId(id)].clone();
            match RunningServer::start(config).await {
                Ok(server) => {
                    cluster.servers.insert(NodeId(id), server);
                }
                Err(error) => {
                    cluster.shutdown().await;
                    return Err(error.to_string());
                }
            }
        }
        Ok(cluster)
    }

    pub async fn restart(&mut self, id: NodeId) {
        let server = RunningServer::start(self.configs[&id].clone())
            .await
            .expect("node starts");
        self.servers.insert(id, server);
    }

    /// Stops node `id` and severs the connections clients had to it.
    pub async fn stop(&mut self, id: NodeId) {
        let server = self.servers.remove(&id).expect("node is running");
        server.shutdown().await.expect("clean shutdown");
        self.proxies[&id].sever();
    }

    /// The address clients use for node `id`.
    pub fn endpoint(&self, id: NodeId) -> String {
        self.proxies[&id].addr.to_string()
    }

    /// Client addresses of every node, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.proxies.keys().map(|id| self.endpoint(*id)).collect()
    }

    /// A client that knows every node.
    pub async fn client(&self) -> Client {
        Client::connect(self.endpoints())
            .await
            .expect("client connects")
    }

    /// Waits until every running node agrees on one leader in one term.
    pub async fn leader(&self) -> NodeId {
        let start = Instant::now();
        loop {
            let statuses: Vec<_> = self.servers.values().map(|s| s.node.status()).collect();
            let leaders: Vec<_> = statuses.iter().filter(|s| s.role == Role::Leader).collect();
            if let [leader] = leaders.as_slice() {
                let agreed = statuses
                    .iter()
                    .all(|s| s.leader_id == leader.id.0 && s.term == leader.term);
                if agreed {
                    return leader.id;
                }
            }
            assert!(start.elapsed() < DEADLINE, "no agreed leader: {statuses:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A channel straight to node `id`, for checks made around the client.
    pub async fn channel(&self, id: NodeId) -> tonic::transport::Channel {
        let addr = self.servers[&id].client_addr;
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect")
    }

    pub fn servers_ids(&self) -> Vec<NodeId> {
        self.servers.keys().copied().collect()
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<_> = self.servers.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}

/// Awaits `future`, failing the test with `what` if it takes longer than
/// [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: not done within {DEADLINE:?}"),
    }
}

/// Polls `condition` every few milliseconds until it holds, failing the
/// test with `what` after [`DEADLINE`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not true within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
