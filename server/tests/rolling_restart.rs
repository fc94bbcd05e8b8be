//! A rolling restart of a 5-node cluster of real `latchkey serve`
//! processes under a lock and fenced-write load: each node in turn gets
//! SIGTERM (a leader hands its leadership on first), must exit 0 within the
//! shutdown bound, is started again with the same flags, and must catch up
//! before the next one goes.
//!
//! Checked: no acknowledged write is lost, every lock's tokens keep
//! increasing, and the clients see nothing worse than retries (no error
//! reaches the application). Reported, as figures: how long no client could
//! acquire a lock around each restart.
//!
//! Every process is killed when its handle drops, so a failed assertion
//! leaves nothing behind.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use latchkey_client::Client;
use latchkey_server::cli::connect::fetch_status;
use tokio::process::{Child, Command};

const LATCHKEY: &str = env!("CARGO_BIN_EXE_latchkey");
const NODES: u64 = 5;
/// Clients of the load, each cycling its own lock.
const CLIENTS: usize = 4;
/// For a node to be up, or caught up.
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// SIGTERM to exit: the server's own bound (15 s) plus slack.
const EXIT_DEADLINE: Duration = Duration::from_secs(25);
/// Load before the first restart and after the last.
const STEADY: Duration = Duration::from_secs(2);

fn free_addr() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").to_string()
}

struct Node {
    id: u64,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        let child = Command::new(LATCHKEY)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn latchkey serve");
        self.child = Some(child);
    }

    /// SIGTERM, then the exit status within [`EXIT_DEADLINE`].
    async fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().expect("node runs");
        let pid = child.id().expect("pid");
        let start = Instant::now();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "SIGTERM to node {}", self.id);
        let status = tokio::time::timeout(EXIT_DEADLINE, child.wait())
            .await
            .unwrap_or_else(|_| panic!("node {} did not exit within {EXIT_DEADLINE:?}", self.id))
            .expect("wait");
        (status, start.elapsed())
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// What one client of the load saw.
#[derive(Default, Debug)]
struct Seen {
    /// When each acquire returned, and its token, in order.
    grants: Vec<(Instant, u64)>,
    /// Keys of fenced writes that were acknowledged.
    acked: Vec<String>,
    errors: Vec<String>,
}

/// Acquire its own lock, one fenced write to a new key, release — until `stop`.
async fn client_load(endpoints: String, index: usize, stop: Arc<AtomicBool>) -> Seen {
    let client = Client::connect(endpoints.split(','))
        .await
        .expect("connect");
    let lease = client
        .grant_lease(Duration::from_secs(5))
        .await
        .expect("lease");
    let lock = format!("rolling/{index}");
    let mut seen = Seen::default();
    let mut n = 0u64;
    // Bounded by `stop`, which the test sets within its deadlines.
    while !stop.load(Ordering::Relaxed) {
        let key = format!("acked/{index}/{n:06}");
        let step = async {
            let guard = lease.lock(&lock).await?;
            let granted = (Instant::now(), guard.token().0);
            client.put(key.clone(), n.to_string()).fence(&guard).await?;
            guard.release().await?;
            Ok::<_, latchkey_client::Error>(granted)
        };
        match step.await {
            Ok(granted) => {
                seen.grants.push(granted);
                seen.acked.push(key);
            }
            Err(error) => seen.errors.push(error.to_string()),
        }
        n += 1;
    }
    seen
}

async fn members_caught_up(client: &Client, id: u64) -> bool {
    let Ok(members) = client.members().await else {
        return false;
    };
    members
        .iter()
        .any(|m| m.id == id && m.active && m.lag <= 10 && !m.learner)
        && members.iter().any(|m| m.leader)
}

/// Whether the node at `endpoint` answers, knows a leader, and has
/// applied what it knows to be committed.
async fn serves_caught_up(endpoint: &str) -> bool {
    fetch_status(endpoint, Duration::from_secs(1))
        .await
        .is_ok_and(|status| status.leader_id != 0 && status.applied_index >= status.commit_index)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_nothing_and_clients_only_retry() {
    let dir = tempfile::tempdir().expect("temp dir");
    let peers: BTreeMap<u64, String> = (1..=NODES).map(|id| (id, free_addr())).collect();
    let clients: BTreeMap<u64, String> = (1..=NODES).map(|id| (id, free_addr())).collect();
    let initial_cluster = peers
        .iter()
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect::<Vec<_>>()
        .join(",");
    let endpoints = clients.values().cloned().collect::<Vec<_>>().join(",");
    let mut nodes: Vec<Node> = (1..=NODES)
        .map(|id| Node {
            id,
            args: vec![
                "serve".into(),
                "--id".into(),
                id.to_string(),
                "--data-dir".into(),
                dir.path().join(format!("node-{id}")).display().to_string(),
                "--listen-client".into(),
                clients[&id].clone(),
                "--listen-peer".into(),
                peers[&id].clone(),
                "--advertise-client".into(),
                clients[&id].clone(),
                "--initial-cluster".into(),
                initial_cluster.clone(),
            ],
            log: dir.path().join(format!("node-{id}.log")),
            child: None,
        })
        .collect();
    for node in &mut nodes {
        node.spawn();
    }
    let admin = Client::builder(endpoints.split(','))
        .sessionless()
        .connect()
        .await
        .expect("admin connects");
    let start = Instant::now();
    loop {
        let mut all = true;
        for id in 1..=NODES {
            all &= members_caught_up(&admin, id).await;
        }
        if all {
            break;
        }
        assert!(start.elapsed() < READY_DEADLINE, "the cluster never formed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..CLIENTS)
        .map(|index| tokio::spawn(client_load(endpoints.clone(), index, stop.clone())))
        .collect();
    tokio::time::sleep(STEADY).await;

    // Each node in turn: SIGTERM, exit 0, start again, caught up.
    let mut windows = Vec::new();
    for node in &mut nodes {
        let leader = admin
            .members()
            .await
            .ok()
            .and_then(|m| m.into_iter().find(|m| m.leader).map(|m| m.id));
        let from = Instant::now();
        let (status, took) = node.terminate().await;
        assert!(
            status.success(),
            "node {} exits 0 on SIGTERM, not {status}; its log ends:\n{}",
            node.id,
            tail(&node.log)
        );
        node.spawn();
        let up = Instant::now();
        loop {
            if serves_caught_up(&clients[&node.id]).await
                && members_caught_up(&admin, node.id).await
            {
                break;
            }
            assert!(
                up.elapsed() < READY_DEADLINE,
                "node {} never caught up after its restart; its log ends:\n{}",
                node.id,
                tail(&node.log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "node {}{}: exited 0 in {took:?} after SIGTERM, caught up {:?} after its restart",
            node.id,
            if leader == Some(node.id) {
                " (leader)"
            } else {
                ""
            },
            up.elapsed()
        );
        windows.push((node.id, leader == Some(node.id), from, Instant::now()));
    }
    tokio::time::sleep(STEADY).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for worker in workers {
        seen.push(
            tokio::time::timeout(READY_DEADLINE, worker)
                .await
                .expect("load stops")
                .expect("load task"),
        );
    }

    // Nothing worse than retries.
    let errors: Vec<&String> = seen.iter().flat_map(|s| &s.errors).collect();
    assert!(errors.is_empty(), "clients saw errors: {errors:?}");
    // Tokens of each lock keep increasing.
    for (index, client) in seen.iter().enumerate() {
        assert!(!client.grants.is_empty(), "client {index} made progress");
        assert!(
            client.grants.windows(2).all(|pair| pair[0].1 < pair[1].1),
            "tokens of rolling/{index} keep increasing"
        );
    }
    // Every acknowledged write is there.
    let stored: Vec<String> = admin
        .range("acked/")
        .await
        .expect("range")
        .kvs
        .into_iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    let acked: Vec<&String> = seen.iter().flat_map(|s| &s.acked).collect();
    let missing: Vec<&&String> = acked.iter().filter(|key| !stored.contains(key)).collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");

    // The figure: the longest stretch with no acquire anywhere, per restart.
    let mut grants: Vec<Instant> = seen
        .iter()
        .flat_map(|s| s.grants.iter().map(|(at, _)| *at))
        .collect();
    grants.sort();
    let mut total_acquires = 0;
    for (id, was_leader, from, to) in &windows {
        let mut inside: Vec<Instant> = grants
            .iter()
            .copied()
            .filter(|at| at >= from && at <= to)
            .collect();
        total_acquires += inside.len();
        inside.insert(0, *from);
        let next = grants.iter().copied().find(|at| at > to).unwrap_or(*to);
        inside.push(next);
        let gap = inside
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default();
        println!(
            "restart of node {id}{}: longest time with no lock acquired: {} ms",
            if *was_leader { " (leader)" } else { "" },
            gap.as_millis()
        );
    }
    println!(
        "{} writes acknowledged and all found; {total_acquires} acquires during the restarts; 0 client errors",
        acked.len()
    );
}
