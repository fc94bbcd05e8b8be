//! Disk faults: a node's syncs hang (`disk-stall`), through the file each
//! node is started with (`--unsafe-disk-stall-file`; see `cluster`).
//!
//! While its file exists, a node's fsyncs and synced writes wait; its
//! unsynced writes, reads, network and clock go on. A leader so stalled
//! stops taking input after a tick (its stall guard), stops heartbeating,
//! and the others elect a leader; a stalled follower acknowledges nothing,
//! so no commit counts its copy. After an election timeout the node
//! refuses its clients so that they move on. Every checker must stay
//! valid, as under `pause`, which stops the whole process instead.
//!
//! # Not done yet
//! - Only syncs hang: reads and unsynced writes of a real failing disk can
//!   hang too (a full page cache), and a sync can also fail, not just wait.

use serde_json::json;

use super::Nemesis;
use crate::history::OpType;

impl Nemesis {
    pub(super) async fn disk_stall(&mut self, variant: &'static str) -> Result<(), String> {
        let (targets, who) = self.nodes_for(variant).await;
        let description = format!("syncs of {who} hang");
        let value = json!({"variant": variant, "nodes": targets, "description": description});
        self.record(OpType::Invoke, "disk-stall", &value);
        {
            let mut cluster = self.cluster.lock().await;
            for &node in &targets {
                cluster.set_disk_stall(node, true)?;
            }
        }
        for &node in &targets {
            if !self.in_place.stalled_disks.contains(&node) {
                self.in_place.stalled_disks.push(node);
            }
        }
        self.record(OpType::Info, "disk-stall", &value);
        self.count(&format!("disk-stall/{variant}"));
        Ok(())
    }

    /// Ends every disk stall.
    pub(super) async fn heal_disks(&mut self) -> Result<(), String> {
        let stalled = std::mem::take(&mut self.in_place.stalled_disks);
        if stalled.is_empty() {
            return Ok(());
        }
        let value = json!({"nodes": stalled, "description": format!("syncs of {stalled:?} go on")});
        self.record(OpType::Invoke, "disk-stall-end", &value);
        {
            let mut cluster = self.cluster.lock().await;
            for &node in &stalled {
                cluster.set_disk_stall(node, false)?;
            }
        }
        self.record(OpType::Info, "disk-stall-end", &value);
        Ok(())
    }
}
