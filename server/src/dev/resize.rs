//! Growing and shrinking a dev cluster: `latchkey dev --nodes N` on a
//! directory whose `cluster.json` lists another number of nodes.
//!
//! The cluster changes the way a production one does (`docs/operations.md`),
//! through Raft membership changes, one node at a time, once the existing
//! nodes agree on a leader:
//! - **grow**: each new node starts with `latchkey serve --join`, adds
//!   itself as a learner, and is promoted to voter once `member list` shows
//!   it caught up; then it is written to `cluster.json`;
//! - **shrink**: the highest ids go first; each is removed with `member
//!   remove` (a leader hands its leadership on first), exits by itself, is
//!   dropped from `cluster.json`, and its data dir is deleted, since a
//!   removed member can never rejoin with it.
//!
//! Every step has a deadline. A step that fails stops the resize with a
//! warning that says where it stopped; the cluster keeps running as it is,
//! and `cluster.json` always lists the members the cluster has.

use std::path::Path;
use std::time::Duration;

use latchkey_client::Client;
use tokio::time::Instant;

use super::manifest::NodeEntry;
use super::{say, supervisor, Cluster};

/// For one node to catch up as a learner.
const STEP_DEADLINE: Duration = Duration::from_secs(60);
/// For a removed node to stop by itself before it is sent SIGTERM: it
/// stops once it applies its removal, but the leader may stop sending to it
/// before it learns that the removal committed.
const LEAVE_WAIT: Duration = Duration::from_secs(3);
/// Entries a learner may lag behind and still be promoted (the leader
/// refuses more; see `membership::MAX_CATCH_UP_LAG`).
const PROMOTE_LAG: u64 = 10;
const POLL: Duration = Duration::from_millis(200);

impl Cluster {
    /// Grows the running cluster by `added`, or shrinks it to `count`.
    pub(super) async fn resize(
        &mut self,
        exe: &Path,
        added: Vec<NodeEntry>,
        count: usize,
    ) -> Result<(), String> {
        let mut builder = Client::builder(self.manifest.endpoints().split(',')).sessionless();
        if let Some(tls) = super::tls::root_client(&self.dir)? {
            builder = builder.tls(tls);
        }
        let admin = builder
            .connect()
            .await
            .map_err(|e| format!("cannot reach the cluster: {e}"))?;
        for entry in added {
            self.grow_by(exe, &admin, entry).await?;
        }
        while self.manifest.nodes.len() > count {
            self.shrink_by_one(&admin).await?;
        }
        Ok(())
    }

    async fn grow_by(
        &mut self,
        exe: &Path,
        admin: &Client,
        entry: NodeEntry,
    ) -> Result<(), String> {
        let id = entry.id;
        say(format!(
            "adding node {id} (client {}, peer {}): it joins as a learner…",
            entry.client_addr, entry.peer_addr
        ));
        let endpoints = self.manifest.endpoints();
        let node = supervisor::spawn_joining(exe, &entry, &endpoints)
            .map_err(|e| format!("cannot start node {id}: {e}"))?;
        self.nodes.push(node);
        self.manifest.nodes.push(entry);
        self.record_pids();
        let deadline = Instant::now() + STEP_DEADLINE;
        // Bounded by the deadline.
        loop {
            let caught_up = admin.members().await.is_ok_and(|members| {
                members
                    .iter()
                    .any(|m| m.id == id && m.learner && m.active && m.lag <= PROMOTE_LAG)
            });
            if caught_up {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "node {id} did not catch up as a learner within {}s; see its log",
                    STEP_DEADLINE.as_secs()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        admin
            .promote_member(id)
            .await
            .map_err(|e| format!("cannot promote node {id}: {e}"))?;
        say(format!("node {id} is a voter"));
        Ok(())
    }

    async fn shrink_by_one(&mut self, admin: &Client) -> Result<(), String> {
        let index = (0..self.manifest.nodes.len())
            .max_by_key(|&i| self.manifest.nodes[i].id)
            .ok_or("no node left to remove")?;
        let id = self.manifest.nodes[index].id;
        say(format!("removing node {id}…"));
        admin
            .remove_member(id)
            .await
            .map_err(|e| format!("cannot remove node {id}: {e}"))?;
        let exit = self.nodes[index].wait_exit(LEAVE_WAIT).await;
        let entry = self.manifest.nodes.remove(index);
        self.nodes.remove(index);
        self.record_pids();
        let data = std::fs::remove_dir_all(&entry.data_dir)
            .map(|()| "its data dir deleted".to_string())
            .unwrap_or_else(|e| {
                format!("its data dir {} not deleted: {e}", entry.data_dir.display())
            });
        say(format!(
            "node {id} removed ({exit}); {data}; its log stays at {}",
            entry.log.display()
        ));
        Ok(())
    }
}
