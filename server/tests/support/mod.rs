//! A cluster of in-process nodes for tests: real loopback gRPC, a RocksDB
//! per node in a temp dir, free ports.

#![allow(dead_code)]

pub mod http;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use latchkey_proto::v1::kv_client::KvClient;
use latchkey_proto::v1::{GetRequest, PutRequest};
use latchkey_server::config::Config;
use latchkey_server::node::Role;
use latchkey_server::server::RunningServer;
use latchkey_server::types::NodeId;
use tempfile::TempDir;

pub const DEADLINE: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

pub struct TestCluster {
    pub configs: BTreeMap<NodeId, Config>,
    pub servers: BTreeMap<NodeId, RunningServer>,
    _dirs: Vec<TempDir>,
}

/// Attempts at starting a cluster: a port picked free can be taken by
/// another test before the node binds it.
const START_ATTEMPTS: usize = 5;

impl TestCluster {
    /// Starts `nodes` nodes on fresh free ports, picking new ports if one
    /// was taken meanwhile.
    pub async fn start(nodes: u64, compact_log_after_entries: u64) -> TestCluster {
        TestCluster::start_with(nodes, |config| {
            config.compact_log_after_entries = compact_log_after_entries;
        })
        .await
    }

    /// Like [`TestCluster::start`], with every node's configuration
    /// adjusted by `configure` first.
    pub async fn start_with(nodes: u64, configure: impl Fn(&mut Config)) -> TestCluster {
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match TestCluster::try_start(nodes, &configure).await {
                Ok(cluster) => return cluster,
                Err(error) if error.contains("in use") => last_error = error,
                Err(error) => panic!("node starts: {error}"),
            }
        }
        panic!("no free ports after {START_ATTEMPTS} attempts: {last_error}");
    }

    async fn try_start(
        nodes: u64,
        configure: &impl Fn(&mut Config),
    ) -> Result<TestCluster, String> {
        let peers: BTreeMap<NodeId, String> = (1..=nodes)
            .map(|id| (NodeId(id), format!("127.0.0.1:{}", free_port())))
            .collect();
        let mut configs = BTreeMap::new();
        let mut dirs = Vec::new();
        for id in peers.keys() {
            let dir = tempfile::tempdir().expect("temp dir");
            let client: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let mut config = Config::with_defaults(
                *id,
                dir.path().to_path_buf(),
                client,
                peers[id].parse().unwrap(),
                peers.clone(),
            );
            configure(&mut config);
            configs.insert(*id, config);
            dirs.push(dir);
        }
        let mut cluster = TestCluster {
            configs,
            servers: BTreeMap::new(),
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

    /// Client endpoints of the running nodes, comma-separated.
    pub fn endpoints(&self) -> String {
        self.servers
            .values()
            .map(|server| server.client_addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `id` on fresh ports and a fresh data dir, joining the
    /// running cluster with `serve --join`.
    pub async fn join(&mut self, id: NodeId) {
        let dir = tempfile::tempdir().expect("temp dir");
        let client: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let peer: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut config = Config::with_defaults(
            id,
            dir.path().to_path_buf(),
            client,
            peer,
            BTreeMap::from([(id, peer.to_string())]),
        );
        config.join = self.endpoints().split(',').map(str::to_string).collect();
        let server = RunningServer::start(config.clone())
            .await
            .expect("joining node starts");
        self.configs.insert(id, config);
        self.servers.insert(id, server);
        self._dirs.push(dir);
    }

    pub async fn restart(&mut self, id: NodeId) {
        let server = RunningServer::start(self.configs[&id].clone())
            .await
            .expect("node starts");
        self.servers.insert(id, server);
    }

    pub async fn stop(&mut self, id: NodeId) {
        let server = self.servers.remove(&id).expect("node is running");
        server.shutdown().await.expect("clean shutdown");
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

    /// A channel to node `id` whose every call fails after a deadline, so a
    /// stuck request fails the test instead of hanging it.
    pub async fn channel(&self, id: NodeId) -> tonic::transport::Channel {
        let addr = self.servers[&id].client_addr;
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connect")
    }

    pub async fn client(&self, id: NodeId) -> KvClient<tonic::transport::Channel> {
        KvClient::new(self.channel(id).await)
    }

    pub async fn put(&self, key: &str, value: &str) -> u64 {
        let start = Instant::now();
        loop {
            let leader = self.leader().await;
            let request = PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            };
            match self.client(leader).await.put(request).await {
                Ok(response) => return response.into_inner().revision,
                Err(status) => {
                    assert!(
                        start.elapsed() < DEADLINE,
                        "put {key} keeps failing: {status}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    pub async fn get(&self, id: NodeId, key: &str, serializable: bool) -> Option<String> {
        let request = GetRequest {
            key: key.into(),
            serializable,
        };
        let response = self
            .client(id)
            .await
            .get(request)
            .await
            .expect("get")
            .into_inner();
        response.kv.map(|kv| String::from_utf8(kv.value).unwrap())
    }

    /// Waits until node `id` has applied everything up to `index`.
    pub async fn wait_applied(&self, id: NodeId, index: u64) {
        self.wait_applied_within(id, index, DEADLINE).await
    }

    /// [`TestCluster::wait_applied`] with a deadline of its own.
    pub async fn wait_applied_within(&self, id: NodeId, index: u64, deadline: Duration) {
        let start = Instant::now();
        while self.servers[&id].node.status().applied_index < index {
            assert!(
                start.elapsed() < deadline,
                "node {id} stuck at {:?}",
                self.servers[&id].node.status()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
