//! The `latchkey serve` child processes of a dev cluster.
//!
//! Each node runs in its own process (so one can be killed with `kill -9`
//! while the rest carry on) and its own process group (so a Ctrl-C in the
//! terminal reaches only `latchkey dev`, which then stops the nodes in
//! order). Each child also asks the kernel to SIGKILL it if `latchkey dev`
//! dies without cleaning up (`PR_SET_PDEATHSIG`), so no node outlives its
//! supervisor. That request is tied to the thread that spawned the child,
//! which is why `latchkey dev` runs on a single-threaded runtime: the main
//! thread spawns every child and lives until the process exits.
//!
//! A child is reaped only by [`next_exit`] or [`kill_remaining`], both called from
//! the one task that owns the [`Node`]s, so a pid is signalled only while
//! it still belongs to our child.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::manifest::{Manifest, NodeEntry};

/// How long the nodes get to stop after SIGTERM before they are killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for a SIGKILLed child to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// One child process.
#[derive(Debug)]
pub struct Node {
    pub id: u64,
    pub pid: u32,
    pub log: std::path::PathBuf,
    child: Child,
    /// How it exited, once it has.
    pub exit: Option<String>,
}

impl Node {
    pub fn is_running(&self) -> bool {
        self.exit.is_none()
    }

    /// Waits up to `wait` for the node to exit by itself, then SIGTERMs it
    /// and waits [`STOP_GRACE`], then kills it. Returns how it exited.
    pub async fn wait_exit(&mut self, wait: Duration) -> String {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let status = match tokio::time::timeout(wait, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                terminate_all(std::slice::from_ref(self));
                match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        let _ = self.child.start_kill();
                        self.child.wait().await
                    }
                }
            }
        };
        let exit = match status {
            Ok(status) => describe_exit(status),
            Err(err) => format!("unknown status ({err})"),
        };
        self.exit = Some(exit.clone());
        exit
    }
}

/// Starts one `serve` child per manifest entry. If one fails to start, the
/// ones already started are killed before the error is returned.
pub fn spawn_all(exe: &Path, manifest: &Manifest) -> Result<Vec<Node>, String> {
    let initial_cluster = manifest.initial_cluster();
    let mut nodes: Vec<Node> = Vec::with_capacity(manifest.nodes.len());
    for entry in &manifest.nodes {
        match spawn_one(exe, entry, &initial_cluster) {
            Ok(node) => nodes.push(node),
            Err(err) => {
                for node in &mut nodes {
                    // Best effort: the error below is what the user needs to see.
                    let _ = node.child.start_kill();
                }
                return Err(format!(
                    "cannot start node {} ({}): {err}",
                    entry.id,
                    exe.display()
                ));
            }
        }
    }
    Ok(nodes)
}

fn spawn_one(exe: &Path, entry: &NodeEntry, initial_cluster: &str) -> io::Result<Node> {
    spawn_with(exe, entry, serve_args(entry, initial_cluster))
}

/// Starts a new node that joins the running cluster at `endpoints`
/// (`latchkey serve --join`): it adds itself as a learner.
pub fn spawn_joining(exe: &Path, entry: &NodeEntry, endpoints: &str) -> io::Result<Node> {
    let mut args = serve_args(entry, "");
    let at = args.len() - 2;
    args.truncate(at);
    args.extend([
        "--advertise-peer".into(),
        entry.peer_addr.clone(),
        "--join".into(),
        endpoints.to_string(),
    ]);
    spawn_with(exe, entry, args)
}

fn spawn_with(exe: &Path, entry: &NodeEntry, args: Vec<String>) -> io::Result<Node> {
    std::fs::create_dir_all(&entry.data_dir)?;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&entry.log)?;
    writeln!(
        log,
        "--- latchkey dev: starting {} {}",
        exe.display(),
        args.join(" ")
    )?;
    let mut command = Command::new(exe);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        // The output goes to a file, not a terminal: no colour escapes.
        .env("NO_COLOR", "1")
        .process_group(0)
        .kill_on_drop(false);
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid) without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("child exited before its pid was read"))?;
    Ok(Node {
        id: entry.id,
        pid,
        log: entry.log.clone(),
        child,
        exit: None,
    })
}

fn serve_args(entry: &NodeEntry, initial_cluster: &str) -> Vec<String> {
    let cluster_dir = entry.data_dir.parent().unwrap_or(Path::new("."));
    let tls = super::tls::node_flags(cluster_dir, entry.id).unwrap_or_else(|e| {
        tracing::warn!("node {}: cannot make its certificate: {e}", entry.id);
        Vec::new()
    });
    let mut args = vec![
        "serve".into(),
        "--id".into(),
        entry.id.to_string(),
        "--data-dir".into(),
        entry.data_dir.display().to_string(),
        "--listen-client".into(),
        entry.client_addr.clone(),
        "--listen-peer".into(),
        entry.peer_addr.clone(),
        "--advertise-client".into(),
        entry.client_addr.clone(),
        "--listen-http".into(),
        entry.http_addr.clone(),
    ];
    args.extend(tls);
    // Last: a joining node drops these two.
    args.extend(["--initial-cluster".into(), initial_cluster.to_string()]);
    args
}

/// Waits until some running node exits, records how, and returns its index.
/// Never returns while no node is running.
pub async fn next_exit(nodes: &mut [Node]) -> usize {
    let waits: Vec<_> = nodes
        .iter_mut()
        .enumerate()
        .filter(|(_, node)| node.is_running())
        .map(|(index, node)| Box::pin(async move { (index, node.child.wait().await) }))
        .collect();
    if waits.is_empty() {
        return std::future::pending().await;
    }
    let ((index, result), _, _) = futures::future::select_all(waits).await;
    nodes[index].exit = Some(match result {
        Ok(status) => describe_exit(status),
        Err(err) => format!("unknown status ({err})"),
    });
    index
}

/// `signal 9`, `exit code 1`, …
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// Sends SIGTERM to every running node.
pub fn terminate_all(nodes: &[Node]) {
    for node in nodes.iter().filter(|n| n.is_running()) {
        if let Some(pid) = node.child.id() {
            // SAFETY: kill(2) has no memory-safety preconditions. The pid is our
            // child and not yet reaped (module docs), so it names no other process.
            // A failure means it already exited, which next_exit will record.
            let _ = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
}

/// SIGKILLs every node still running and reaps it. Returns the ids killed.
pub async fn kill_remaining(nodes: &mut [Node]) -> Vec<u64> {
    let mut killed = Vec::new();
    for node in nodes.iter_mut().filter(|n| n.is_running()) {
        // An error means it exited meanwhile; the wait below reaps it either way.
        let _ = node.child.start_kill();
        killed.push(node.id);
        node.exit = Some(
            match tokio::time::timeout(KILL_WAIT, node.child.wait()).await {
                Ok(Ok(status)) => describe_exit(status),
                Ok(Err(err)) => format!("unknown status ({err})"),
                Err(_) => "still running after SIGKILL".to_string(),
            },
        );
    }
    killed
}

/// The instant by which SIGTERMed nodes must have exited.
pub fn stop_deadline() -> Instant {
    Instant::now() + STOP_GRACE
}

/// Reads the last non-empty line of a node's log (at most 4 KiB back), to
/// show why a node stopped.
pub fn last_log_line(log: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL_BYTES: u64 = 4096;
    let mut file = std::fs::File::open(log).ok()?;
    let length = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(TAIL_BYTES)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_are_described_by_code_or_signal() {
        assert_eq!(describe_exit(ExitStatus::from_raw(9)), "signal 9");
        assert_eq!(describe_exit(ExitStatus::from_raw(1 << 8)), "exit code 1");
    }

    #[test]
    fn the_last_log_line_skips_trailing_blank_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("node-1.log");
        std::fs::write(&log, "starting\nlatchkey: error: port 7001 in use\n\n").expect("write");
        assert_eq!(
            last_log_line(&log).as_deref(),
            Some("latchkey: error: port 7001 in use")
        );
        assert_eq!(last_log_line(&dir.path().join("missing.log")), None);
    }

    #[tokio::test]
    async fn next_exit_reports_the_child_that_exited() {
        let mut nodes = Vec::new();
        for (id, script) in [(1, "exec sleep 30"), (2, "exit 3")] {
            let child = Command::new("sh")
                .args(["-c", script])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("sh runs");
            let pid = child.id().expect("running");
            nodes.push(Node {
                id,
                pid,
                log: "unused".into(),
                child,
                exit: None,
            });
        }
        let index = tokio::time::timeout(Duration::from_secs(10), next_exit(&mut nodes))
            .await
            .expect("the short child exits");
        assert_eq!(nodes[index].id, 2);
        assert_eq!(nodes[index].exit.as_deref(), Some("exit code 3"));
        assert!(nodes[0].is_running());
        assert_eq!(kill_remaining(&mut nodes).await, vec![1]);
        assert_eq!(nodes[0].exit.as_deref(), Some("signal 9"));
    }
}
