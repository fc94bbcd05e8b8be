//! The cluster observer: polls every node's `Cluster.Status`, records each
//! change of a node's role or term as a `status` op (process `nemesis`,
//! type `info`, value `{"node", "role", "term"}`) for the
//! one-leader-per-term checker, tells the nemesis who leads, and reports
//! nodes that exited without being told to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::cluster::{self, Cluster};
use super::recorder::{Event, Recorder};
use crate::history::{OpType, Process};

/// Time between two polls of every node.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// A status older than this is not trusted to name the leader.
const FRESH_FOR: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct View {
    role: &'static str,
    term: u64,
    at: Instant,
}

/// The latest status of every node, shared with the nemesis.
#[derive(Clone, Default)]
pub struct Views {
    views: Arc<Mutex<HashMap<u64, View>>>,
    /// Nodes that exited on their own: `(node, how)`.
    pub crashes: Arc<Mutex<Vec<(u64, String)>>>,
}

impl Views {
    /// The node that says it leads in the highest term, among fresh answers.
    pub fn leader(&self) -> Option<u64> {
        let views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        views
            .iter()
            .filter(|(_, v)| v.role == "leader" && v.at.elapsed() < FRESH_FOR)
            .max_by_key(|(_, v)| v.term)
            .map(|(id, _)| *id)
    }
}

/// Polls until `stop` fires.
pub async fn run(
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
    recorder: Recorder,
    views: Views,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let channels = cluster.lock().await.status_channels();
    let mut last: HashMap<u64, (&'static str, u64)> = HashMap::new();
    // Bounded by `stop`, which the run sets when it ends.
    while !*stop.borrow() {
        let polls = channels
            .iter()
            .map(|(id, target)| async move { (*id, cluster::status(target).await) });
        for (id, answer) in futures::future::join_all(polls).await {
            let Ok(status) = answer else { continue };
            let role = cluster::role_name(status.role);
            let view = View {
                role,
                term: status.term,
                at: Instant::now(),
            };
            views
                .views
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, view);
            if last.get(&id) != Some(&(role, status.term)) {
                last.insert(id, (role, status.term));
                let value = json!({"node": id, "role": role, "term": status.term});
                let mut event = Event::new(Process::Nemesis, OpType::Info, "status", value);
                event.term = Some(status.term);
                recorder.record(event);
            }
        }
        for exit in cluster.lock().await.reap_exited() {
            let description = format!("node {} exited on its own: {}", exit.node, exit.how);
            let value = json!({"node": exit.node, "description": description});
            recorder.record(Event::new(
                Process::Nemesis,
                OpType::Info,
                "node-exit",
                value,
            ));
            views
                .crashes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((exit.node, exit.how));
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Waits until some node says it leads; returns it.
pub async fn wait_for_leader(
    cluster: &Arc<tokio::sync::Mutex<Cluster>>,
    bound: Duration,
) -> Result<u64, String> {
    let channels = cluster.lock().await.status_channels();
    let deadline = Instant::now() + bound;
    let mut last_error = String::from("no node answered");
    // Bounded by the deadline.
    while Instant::now() < deadline {
        let polls = channels.values().map(cluster::status);
        let answers = futures::future::join_all(polls).await;
        let mut leader = None;
        for answer in answers {
            match answer {
                Ok(status) if cluster::role_name(status.role) == "leader" => {
                    leader = Some(status.id);
                }
                Ok(_) => {}
                // Not this run's node: what the run would check is not
                // this run's cluster alone, so it stops here instead.
                Err(cluster::StatusError::Foreign(error)) => return Err(error),
                Err(cluster::StatusError::Unanswered(error)) => last_error = error,
            }
        }
        if let Some(leader) = leader {
            return Ok(leader);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "no leader within {bound:?} (last error: {last_error}); see the node logs"
    ))
}
