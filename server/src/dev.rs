//! `latchkey dev`: a local cluster of `latchkey serve` processes on loopback.
//!
//! # Layout
//! - this file: the command's flow — prepare, start, wait for a leader,
//!   supervise, stop — and what it prints.
//! - [`manifest`]: `cluster.json`, the nodes' ids, addresses and pids; port
//!   planning and the "port in use" check.
//! - [`supervisor`]: spawning, reaping and signalling the child processes.
//!
//! # Design
//! Every node is a separate OS process running this same binary
//! (`std::env::current_exe()`), so a test or a person can `kill -9` one and
//! watch the others elect a new leader. The data directory holds
//! `cluster.json`, `node-<id>/` (RocksDB) and `node-<id>.log` (the node's
//! stdout and stderr, appended). Running `latchkey dev` again on the same
//! directory restarts the same cluster with its data; flags that contradict
//! `cluster.json` are refused rather than silently ignored.
//!
//! Lifecycle: check every port is free → write `cluster.json` → start the
//! children → print the endpoints → poll `Cluster.Status` until every node
//! answers and they agree on a leader (warn after [`READY_TIMEOUT`] and keep
//! running) → wait for Ctrl-C, SIGTERM or SIGHUP → SIGTERM the children,
//! SIGKILL any still running after [`supervisor::STOP_GRACE`] → exit 0.
//! A node that exits on its own is reported in one line; the rest keep
//! running, and the command exits 1 once none is left.
//!
//! `latchkey dev --nodes N` on a directory whose cluster has another
//! number of nodes grows or shrinks it through Raft membership changes once
//! it is up (`resize.rs`).
//!
//! # Not done yet
//! - Restarting a node that exited (run `latchkey dev` again instead).
//! - Free ports are found by binding port 0 and releasing it; another
//!   program can take one in between, and that node then fails to start
//!   (its log says why). `--base-port` avoids the race.

pub mod manifest;
mod resize;
pub mod supervisor;
pub mod tls;

use std::error::Error;
use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use latchkey_proto::v1::{Role, StatusResponse};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;

use crate::cli::connect::fetch_status_tls;
use manifest::{Manifest, MANIFEST_FILE};
use supervisor::Node;

/// Nodes started when `--nodes` is not given and there is no `cluster.json`.
pub const DEFAULT_NODES: usize = 5;
/// How long to wait for every node to answer and agree on a leader.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two readiness polls.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Deadline for one node's `Cluster.Status` during readiness polling.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// Flags of `latchkey dev`.
#[derive(clap::Args, Debug)]
pub struct DevArgs {
    /// Number of nodes [default: 5, or as many as an existing cluster.json lists].
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Directory for cluster.json, node data and logs; reused if it holds a
    /// cluster [default: $TMPDIR/latchkey-dev, or /tmp/latchkey-dev].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Node i listens for clients on P+2(i-1) and for peers on P+2(i-1)+1
    /// [default: free ports chosen by the kernel].
    #[arg(long, value_name = "P")]
    pub base_port: Option<u16>,
    /// Run with TLS on every port (mutual TLS), with a throwaway CA and
    /// certificates made under DATA_DIR/tls; prints what a client needs.
    /// A cluster made with --tls keeps it when restarted.
    #[arg(long)]
    pub tls: bool,
    /// Turn authentication on once the cluster is ready: makes user `root`
    /// (role `root`, admin) with a random password, printed once.
    #[arg(long)]
    pub auth: bool,
}

/// Runs `latchkey dev` until it is told to stop.
pub fn run(args: DevArgs) -> Result<ExitCode, Box<dyn Error>> {
    // Single-threaded on purpose: the main thread spawns every child, which
    // is what PR_SET_PDEATHSIG is tied to (see `supervisor`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_cluster(args))
}

async fn run_cluster(args: DevArgs) -> Result<ExitCode, Box<dyn Error>> {
    let dir = std::path::absolute(args.data_dir.clone().unwrap_or_else(default_data_dir))?;
    let (manifest, reused) = prepare(&args, &dir)?;
    if args.tls {
        tls::ensure_ca(&dir).map_err(|e| format!("cannot make the dev certificates: {e}"))?;
    }
    // Another --nodes on an existing cluster grows or shrinks it.
    let target = args.nodes.unwrap_or(manifest.nodes.len());
    let added = manifest.growth(&dir, target, args.base_port)?;
    let mut signals = StopSignals::register()?;
    let exe = std::env::current_exe()?;
    let nodes = supervisor::spawn_all(&exe, &manifest)?;
    let mut cluster = Cluster {
        dir,
        manifest,
        nodes,
        auth: args.auth,
    };
    cluster.record_pids();
    cluster.print_endpoints(reused);
    if target != cluster.manifest.nodes.len() {
        if let Some(code) = cluster
            .resize_when_ready(&exe, added, target, &mut signals)
            .await
        {
            cluster.stop(&mut signals).await;
            return Ok(code);
        }
    }
    let code = cluster.supervise(&mut signals).await;
    cluster.stop(&mut signals).await;
    Ok(code)
}

/// `$TMPDIR/latchkey-dev`, or `/tmp/latchkey-dev`.
pub fn default_data_dir() -> PathBuf {
    std::env::temp_dir().join("latchkey-dev")
}

/// Loads or plans the cluster, checks its ports, and writes `cluster.json`
/// with every pid 0. Returns whether an existing cluster is being restarted.
fn prepare(args: &DevArgs, dir: &Path) -> Result<(Manifest, bool), String> {
    let existing = Manifest::load(dir)?;
    let reused = existing.is_some();
    let mut manifest = match existing {
        Some(manifest) => {
            manifest.check_flags(dir, args.nodes, args.base_port)?;
            manifest
        }
        None => Manifest::plan(dir, args.nodes.unwrap_or(DEFAULT_NODES), args.base_port)?,
    };
    manifest::check_ports_free(&manifest, dir, reused)?;
    for node in &mut manifest.nodes {
        node.pid = 0;
    }
    std::fs::create_dir_all(dir)
        .and_then(|()| manifest.store(dir))
        .map_err(|err| format!("cannot write {}: {err}", dir.join(MANIFEST_FILE).display()))?;
    Ok((manifest, reused))
}

/// The signals that stop the cluster.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl StopSignals {
    fn register() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for the next stop signal and names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "interrupt",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

/// A running dev cluster: its directory, manifest and child processes.
struct Cluster {
    dir: PathBuf,
    manifest: Manifest,
    nodes: Vec<Node>,
    /// `--auth`: turn authentication on once ready.
    auth: bool,
}

/// What happened while waiting.
enum Event {
    Stop(&'static str),
    Exited(usize),
    Ready(Result<(u64, Option<RootCredentials>), String>),
}

impl Cluster {
    /// Waits until the nodes agree on a leader, then grows the cluster by
    /// `added` or shrinks it to `target` (see [`resize`]). A failure is
    /// reported and the cluster keeps running as it is. Returns an exit
    /// code if a stop signal came first.
    async fn resize_when_ready(
        &mut self,
        exe: &Path,
        added: Vec<manifest::NodeEntry>,
        target: usize,
        signals: &mut StopSignals,
    ) -> Option<ExitCode> {
        let from = self.manifest.nodes.len();
        let work = async {
            wait_for_leader(
                self.manifest
                    .nodes
                    .iter()
                    .map(|n| n.client_addr.clone())
                    .collect(),
                Instant::now() + READY_TIMEOUT,
                tls::root_client(&self.dir)?,
            )
            .await?;
            say(format!(
                "resizing the cluster from {from} to {target} nodes"
            ));
            self.resize(exe, added, target).await
        };
        tokio::select! {
            name = signals.recv() => {
                say(format!("received {name}"));
                Some(ExitCode::SUCCESS)
            }
            result = work => {
                match result {
                    Ok(()) => say(format!(
                        "cluster resized to {target} nodes; client endpoints now --endpoints {}",
                        self.manifest.endpoints()
                    )),
                    Err(error) => warn(format!(
                        "resizing stopped at {} nodes: {error}",
                        self.manifest.nodes.len()
                    )),
                }
                None
            }
        }
    }

    /// Waits for readiness, then for a stop signal; returns the exit code.
    async fn supervise(&mut self, signals: &mut StopSignals) -> ExitCode {
        let endpoints: Vec<String> = self
            .manifest
            .nodes
            .iter()
            .map(|n| n.client_addr.clone())
            .collect();
        let tls = tls::root_client(&self.dir);
        let auth = self.auth;
        let probe = async move {
            let tls = tls?;
            let leader = wait_for_leader(
                endpoints.clone(),
                Instant::now() + READY_TIMEOUT,
                tls.clone(),
            )
            .await?;
            let credentials = match auth {
                true => Some(set_up_auth(&endpoints, tls).await?),
                false => None,
            };
            Ok((leader, credentials))
        };
        tokio::pin!(probe);
        let mut probing = true;
        say(format!(
            "waiting for every node to answer and agree on a leader (up to {}s)…",
            READY_TIMEOUT.as_secs()
        ));
        // Bounded: each pass handles one event; there are at most as many
        // exits as nodes, one readiness result, and a stop ends the loop.
        loop {
            let event = tokio::select! {
                name = signals.recv() => Event::Stop(name),
                index = supervisor::next_exit(&mut self.nodes) => Event::Exited(index),
                ready = &mut probe, if probing => Event::Ready(ready),
            };
            match event {
                Event::Stop(name) => {
                    say(format!("received {name}"));
                    return ExitCode::SUCCESS;
                }
                Event::Exited(index) => {
                    if !self.on_exit(index) {
                        return ExitCode::FAILURE;
                    }
                }
                Event::Ready(result) => {
                    probing = false;
                    self.on_ready(result);
                }
            }
        }
    }

    fn on_ready(&self, result: Result<(u64, Option<RootCredentials>), String>) {
        match result {
            Ok((leader, credentials)) => {
                let addr = self
                    .manifest
                    .nodes
                    .iter()
                    .find(|n| n.id == leader)
                    .map_or(String::new(), |n| format!(" ({})", n.client_addr));
                say(format!("cluster ready: leader is node {leader}{addr}"));
                match credentials {
                    Some(RootCredentials::Made { password }) => {
                        say("authentication is on; user root (admin), shown this once:");
                        say("  export LATCHKEY_USER=root");
                        say(format!("  export LATCHKEY_PASSWORD={password}"));
                    }
                    Some(RootCredentials::AlreadyOn) => {
                        say("authentication was already on (root's password was shown when it was turned on)")
                    }
                    None => {}
                }
                say("press Ctrl-C to stop the cluster");
            }
            Err(summary) => warn(format!(
                "cluster not ready after {}s ({summary}); the nodes keep running — see the logs in {}",
                READY_TIMEOUT.as_secs(),
                self.dir.display()
            )),
        }
    }

    /// Reports a node that exited on its own. Returns false once none is left.
    fn on_exit(&mut self, index: usize) -> bool {
        let node = &self.nodes[index];
        let how = node.exit.clone().unwrap_or_default();
        let mut line = format!("node {} (pid {}) exited: {how}", node.id, node.pid);
        if !how.starts_with("signal") {
            if let Some(last) = supervisor::last_log_line(&node.log) {
                line.push_str(&format!("; last log line: {last}"));
            }
        }
        say(line);
        self.record_pids();
        if self.nodes.iter().any(Node::is_running) {
            return true;
        }
        warn("every node has exited; stopping");
        false
    }

    /// SIGTERMs the nodes, waits up to the grace period, SIGKILLs the rest.
    async fn stop(&mut self, signals: &mut StopSignals) {
        let running = self.nodes.iter().filter(|n| n.is_running()).count();
        if running > 0 {
            say(format!("stopping {running} node(s)…"));
            supervisor::terminate_all(&self.nodes);
            let deadline = supervisor::stop_deadline();
            // Bounded: each pass reaps one node or leaves the loop.
            while self.nodes.iter().any(Node::is_running) {
                tokio::select! {
                    _ = supervisor::next_exit(&mut self.nodes) => {}
                    _ = tokio::time::sleep_until(deadline) => break,
                    name = signals.recv() => {
                        say(format!("received {name} again: killing the nodes now"));
                        break;
                    }
                }
            }
            let killed = supervisor::kill_remaining(&mut self.nodes).await;
            if !killed.is_empty() {
                warn(format!(
                    "node(s) {killed:?} did not stop within {}s and were killed",
                    supervisor::STOP_GRACE.as_secs()
                ));
            }
        }
        self.record_pids();
        say("stopped");
    }

    /// Writes the current pids (0 for exited nodes) to `cluster.json`.
    fn record_pids(&mut self) {
        for (entry, node) in self.manifest.nodes.iter_mut().zip(&self.nodes) {
            entry.pid = if node.is_running() { node.pid } else { 0 };
        }
        if let Err(err) = self.manifest.store(&self.dir) {
            warn(format!(
                "cannot update {}: {err}",
                self.dir.join(MANIFEST_FILE).display()
            ));
        }
    }

    fn print_endpoints(&self, reused: bool) {
        let origin = if reused {
            "restarted from cluster.json"
        } else {
            "new cluster"
        };
        say(format!(
            "latchkey dev: {} nodes ({origin}), data and logs in {}",
            self.manifest.nodes.len(),
            self.dir.display()
        ));
        for node in &self.manifest.nodes {
            say(format!(
                "  node {}  pid {:<7}  client {}  peer {}  http {}  log {}",
                node.id,
                node.pid,
                node.client_addr,
                node.peer_addr,
                node.http_addr,
                node.log.display()
            ));
        }
        if let Some(first) = self.manifest.nodes.first() {
            say(format!(
                "status page: http://{}/  (metrics: /metrics, health: /healthz, /readyz)",
                first.http_addr
            ));
        }
        let endpoints = self.manifest.endpoints();
        say("client endpoints (for latchkey status / kv):");
        say(format!("  --endpoints {endpoints}"));
        say(format!("  export LATCHKEY_ENDPOINTS={endpoints}"));
        if tls::enabled(&self.dir) {
            say("TLS is on (mutual); a client presents a certificate, e.g. root's:");
            for line in tls::client_env(&self.dir, "root") {
                say(format!("  {line}"));
            }
        }
    }
}

/// Polls every endpoint until all answer and agree on a leader, or the
/// deadline passes. Returns the leader's id, or a summary of what was missing.
async fn wait_for_leader(
    endpoints: Vec<String>,
    deadline: Instant,
    tls: Option<latchkey_client::TlsConfig>,
) -> Result<u64, String> {
    // Bounded by the deadline: each pass takes at least READY_POLL_INTERVAL.
    loop {
        let answers = futures::future::join_all(
            endpoints
                .iter()
                .map(|e| fetch_status_tls(e, STATUS_TIMEOUT, tls.as_ref())),
        )
        .await;
        if let Some(leader) = agreed_leader(&answers) {
            return Ok(leader);
        }
        if Instant::now() + READY_POLL_INTERVAL >= deadline {
            let answering = answers.iter().filter(|a| a.is_ok()).count();
            return Err(format!(
                "{answering} of {} nodes answering, no leader agreed on",
                endpoints.len()
            ));
        }
        tokio::time::sleep(READY_POLL_INTERVAL).await;
    }
}

/// What `--auth` did.
enum RootCredentials {
    /// Made user `root` with this password and turned authentication on.
    Made { password: String },
    /// Authentication was on already (a restarted cluster).
    AlreadyOn,
}

/// Makes user and role `root` (admin) with a random password and turns
/// authentication on, unless it is on already.
async fn set_up_auth(
    endpoints: &[String],
    tls: Option<latchkey_client::TlsConfig>,
) -> Result<RootCredentials, String> {
    let mut builder = latchkey_client::Client::builder(endpoints.iter().cloned()).sessionless();
    if let Some(tls) = tls {
        builder = builder.tls(tls);
    }
    let client = builder
        .connect()
        .await
        .map_err(|e| format!("cannot reach the cluster to turn authentication on: {e}"))?;
    let failed = |e: latchkey_client::Error| format!("cannot turn authentication on: {e}");
    match client.auth_status().await {
        Ok(status) if status.enabled => return Ok(RootCredentials::AlreadyOn),
        Ok(_) => {}
        // On, and this client (no certificate) is not let in.
        Err(latchkey_client::Error::Unauthenticated { .. }) => {
            return Ok(RootCredentials::AlreadyOn)
        }
        Err(e) => return Err(failed(e)),
    }
    let password: String = {
        use rand::Rng as _;
        rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(24)
            .map(char::from)
            .collect()
    };
    match client.user_add("root", &password).await {
        Ok(()) => {}
        Err(latchkey_client::Error::Rejected {
            code: tonic::Code::AlreadyExists,
            ..
        }) => {
            client
                .user_change_password("root", &password)
                .await
                .map_err(failed)?;
        }
        Err(e) => return Err(failed(e)),
    }
    match client.role_add("root").await {
        Ok(()) => {}
        Err(latchkey_client::Error::Rejected {
            code: tonic::Code::AlreadyExists,
            ..
        }) => {}
        Err(e) => return Err(failed(e)),
    }
    use latchkey_client::auth::PermissionKind;
    client
        .role_grant("root", PermissionKind::Admin, "")
        .await
        .map_err(failed)?;
    client
        .user_grant_role("root", "root")
        .await
        .map_err(failed)?;
    client.auth_enable().await.map_err(failed)?;
    Ok(RootCredentials::Made { password })
}

/// The leader every node names, if all answered, all name the same one, and
/// that node says it leads.
fn agreed_leader(answers: &[Result<StatusResponse, String>]) -> Option<u64> {
    let statuses: Vec<&StatusResponse> = answers.iter().filter_map(|a| a.as_ref().ok()).collect();
    if statuses.is_empty() || statuses.len() != answers.len() {
        return None;
    }
    let leader = statuses[0].leader_id;
    let all_agree = statuses.iter().all(|s| s.leader_id == leader);
    let leader_leads = statuses
        .iter()
        .any(|s| s.id == leader && s.role() == Role::Leader);
    (leader != 0 && all_agree && leader_leads).then_some(leader)
}

/// Prints a line on stdout; a closed stdout must not stop the supervisor.
fn say(line: impl Display) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// Prints a warning on stderr.
fn warn(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "latchkey dev: warning: {line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: u64, role: Role, leader_id: u64) -> Result<StatusResponse, String> {
        Ok(StatusResponse {
            id,
            role: role as i32,
            leader_id,
            ..StatusResponse::default()
        })
    }

    #[test]
    fn a_leader_is_agreed_when_every_node_names_it_and_it_leads() {
        let answers = [
            status(1, Role::Follower, 2),
            status(2, Role::Leader, 2),
            status(3, Role::Follower, 2),
        ];
        assert_eq!(agreed_leader(&answers), Some(2));
    }

    #[test]
    fn no_leader_is_agreed_while_a_node_is_silent_or_disagrees() {
        let silent = [
            status(1, Role::Follower, 2),
            status(2, Role::Leader, 2),
            Err("refused".into()),
        ];
        assert_eq!(agreed_leader(&silent), None);
        let split = [status(1, Role::Follower, 3), status(2, Role::Leader, 2)];
        assert_eq!(agreed_leader(&split), None);
        let nobody_leads = [status(1, Role::Follower, 2), status(2, Role::Candidate, 2)];
        assert_eq!(agreed_leader(&nobody_leads), None);
        let none = [status(1, Role::Follower, 0), status(2, Role::Follower, 0)];
        assert_eq!(agreed_leader(&none), None);
    }

    #[test]
    fn a_new_cluster_is_planned_and_recorded_with_zero_pids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = DevArgs {
            nodes: Some(3),
            data_dir: None,
            base_port: None,
            tls: false,
            auth: false,
        };
        let (manifest, reused) = prepare(&args, dir.path()).expect("prepare");
        assert!(!reused);
        assert_eq!(manifest.nodes.len(), 3);
        let (again, reused) = prepare(
            &DevArgs {
                nodes: None,
                ..args
            },
            dir.path(),
        )
        .expect("reuse");
        assert!(reused);
        assert_eq!(again, manifest);
        assert!(again.nodes.iter().all(|n| n.pid == 0));
    }
}
