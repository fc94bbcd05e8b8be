//! Faults on processes: `kill -9` and SIGSTOP of nodes, and the faults on
//! client workers: stopping them (`pause`) and cutting them off from every
//! node while they keep running (`client-partition`).
//!
//! A client partition is the classic stale holder: the worker's keepalives
//! stop reaching the cluster, but the process goes on, trusting its lock
//! or leadership until its own lease deadline passes. In namespace mode the
//! cut is an iptables rule pair between the worker's namespace and each
//! node's; on loopback, its proxies stop carrying its bytes.
//!
//! # Not done yet
//! - A client cut from *some* nodes only (say, the leader's followers) is
//!   a `partition` variant for every worker at once, not a per-worker one.

use rand::Rng;
use serde_json::json;

use super::{leader_note, Nemesis, CLIENT_LAYER};
use crate::harness::net::Cuts;
use crate::history::OpType;

impl Nemesis {
    pub(super) async fn kill(&mut self, variant: &'static str) -> Result<(), String> {
        let (targets, who) = self.nodes_for(variant).await;
        let description = format!("kill -9 {who}");
        let value = json!({"variant": variant, "nodes": targets, "description": description});
        self.record(OpType::Invoke, "kill", &value);
        {
            let mut cluster = self.cluster.lock().await;
            for &node in &targets {
                cluster.kill(node).await;
            }
        }
        self.in_place.killed.extend(&targets);
        self.record(OpType::Info, "kill", &value);
        self.count(&format!("kill/{variant}"));
        Ok(())
    }

    pub(super) async fn pause(&mut self, variant: &'static str) -> Result<(), String> {
        if variant == "client-at-write" || variant == "client" {
            return self.pause_client(variant == "client-at-write").await;
        }
        let (node, description) = if variant == "node" {
            let ids = self.node_ids().await;
            let node = ids[self.rng.gen_range(0..ids.len())];
            (node, format!("SIGSTOP n{node}"))
        } else {
            let (node, known) = self.leader_or_random().await;
            (node, format!("SIGSTOP n{node}{}", leader_note(known)))
        };
        let value = json!({"target": "node", "variant": variant, "nodes": [node], "description": description});
        self.record(OpType::Invoke, "pause", &value);
        self.cluster.lock().await.pause(node);
        self.in_place.paused_nodes.push(node);
        self.record(OpType::Info, "pause", &value);
        self.count(&format!("pause/{variant}"));
        Ok(())
    }

    /// `at_write`: arm a worker to stop itself at its next fenced write
    /// (recorded as `client-pause` by `workers` when it does); else SIGSTOP
    /// a random worker now.
    async fn pause_client(&mut self, at_write: bool) -> Result<(), String> {
        let slots = self.workers.slots();
        if slots.is_empty() {
            return Ok(());
        }
        let slot = slots[self.rng.gen_range(0..slots.len())];
        if at_write && self.options.fenced_clients {
            let description = format!(
                "arm client worker {slot} to SIGSTOP itself at its next fenced write, holding the lock"
            );
            let value = json!({"target": "client", "variant": "client-at-write", "slot": slot, "description": description});
            self.record(OpType::Invoke, "pause", &value);
            self.workers.arm_pause(slot);
            self.record(OpType::Info, "pause", &value);
            self.count("pause/client-at-write");
            return Ok(());
        }
        let description = format!("SIGSTOP client worker {slot}");
        let value = json!({"target": "client", "variant": "client", "slot": slot, "description": description});
        self.record(OpType::Invoke, "pause", &value);
        self.workers.signal(slot, libc::SIGSTOP);
        self.in_place.stopped_clients.push(slot);
        self.record(OpType::Info, "pause", &value);
        self.count("pause/client");
        Ok(())
    }

    /// `holder`: arm every worker; the next one to be granted the lock or
    /// the leadership is cut off at that moment (`workers` records
    /// `client-cut` and heals it after the client pause). `random`, or
    /// `holder` in a workload without grants: cut a random worker now,
    /// until the schedule's heal.
    pub(super) async fn client_partition(&mut self, variant: &'static str) -> Result<(), String> {
        let slots = self.workers.slots();
        if slots.is_empty() {
            return Ok(());
        }
        if variant == "holder" && self.options.holders {
            let description = format!(
                "arm every client worker: the next to be granted the lock or the leadership is cut from every node for {:?}",
                self.workers.client_pause()
            );
            let value =
                json!({"target": "client", "variant": "holder", "description": description});
            self.record(OpType::Invoke, "client-partition", &value);
            self.workers.arm_cut();
            self.record(OpType::Info, "client-partition", &value);
            self.count("client-partition/holder");
            return Ok(());
        }
        let slot = slots[self.rng.gen_range(0..slots.len())];
        let why = if variant == "holder" {
            " (this workload's workers hold no lock or leadership: a random one)"
        } else {
            ""
        };
        let description = format!("cut client worker {slot} from every node{why}");
        let value = json!({"target": "client", "variant": "random", "slot": slot, "description": description});
        self.record(OpType::Invoke, "client-partition", &value);
        self.in_place.cut_clients.push(slot);
        let cuts: Cuts = self
            .in_place
            .cut_clients
            .iter()
            .flat_map(|&slot| self.network.client_isolation(slot))
            .collect();
        self.network.set_layer(CLIENT_LAYER, &cuts)?;
        self.record(OpType::Info, "client-partition", &value);
        self.count("client-partition/random");
        Ok(())
    }
}
