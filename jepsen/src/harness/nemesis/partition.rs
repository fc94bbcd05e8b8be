//! Partitions: which directed links each variant cuts, and the step that
//! puts them in force (network layer `schedule`).
//!
//! Node-to-node variants cut only peer traffic: every worker still reaches
//! every node. The two client variants cut worker traffic too:
//! - `leader-with-clients`: the leader and every worker on one side, the
//!   other nodes on the other. The workers can reach only the old leader,
//!   which is what makes a leader that renews without its peers dangerous.
//! - `clients-cut-from-leader`: no worker reaches the leader, which still
//!   leads its peers; workers must go through followers or wait.
//!
//! # Not done yet
//! - The client variants treat every worker alike: no split where some
//!   workers reach only the minority and others only the majority.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::json;

use super::{leader_note, Nemesis, SCHEDULE_LAYER};
use crate::harness::net::{between, worker_member, Cuts};
use crate::history::OpType;

impl Nemesis {
    pub(super) async fn partition(&mut self, variant: &'static str) -> Result<(), String> {
        let mut ids = self.node_ids().await;
        ids.shuffle(&mut self.rng);
        let (cuts, description) = match variant {
            "isolate-one" => (isolate(&ids, ids[0]), format!("isolate n{}", ids[0])),
            "isolate-leader" => {
                let (node, known) = self.leader_or_random().await;
                (
                    isolate(&ids, node),
                    format!("isolate n{node}{}", leader_note(known)),
                )
            }
            "halves" => {
                let (a, b) = ids.split_at(ids.len() / 2);
                (between(a, b), format!("halves {a:?} | {b:?}"))
            }
            "majorities-ring" => (ring(&ids), format!("majorities ring {ids:?}")),
            "bridge" => {
                let third = ids.len() / 3;
                let (a, rest) = ids.split_at(ids.len() / 2 - third / 2);
                let (bridge, b) = rest.split_at(1);
                (between(a, b), format!("bridge {a:?} <{}> {b:?}", bridge[0]))
            }
            "leader-with-clients" | "clients-cut-from-leader" => {
                self.client_side(variant, &ids).await
            }
            _ => self.one_way(&ids).await,
        };
        let value = json!({"variant": variant, "description": description,
            "cut": cuts.iter().map(|(a, b)| [a, b]).collect::<Vec<_>>()});
        self.record(OpType::Invoke, "partition", &value);
        self.in_place.cuts.extend(cuts);
        self.network
            .set_layer(SCHEDULE_LAYER, &self.in_place.cuts)?;
        self.record(OpType::Info, "partition", &value);
        self.count(&format!("partition/{variant}"));
        Ok(())
    }

    /// A node (the leader if known) hears nobody, or nobody hears it.
    async fn one_way(&mut self, ids: &[u64]) -> (Cuts, String) {
        let (node, known) = self.leader_or_random().await;
        let others: Vec<u64> = ids.iter().copied().filter(|&i| i != node).collect();
        if self.rng.gen_bool(0.5) {
            let cuts = others.iter().map(|&o| (o, node)).collect();
            let text = format!("n{node}{} hears nobody (one-way)", leader_note(known));
            (cuts, text)
        } else {
            let cuts = others.iter().map(|&o| (node, o)).collect();
            let text = format!("nobody hears n{node}{} (one-way)", leader_note(known));
            (cuts, text)
        }
    }

    /// `leader-with-clients` or `clients-cut-from-leader` (module docs).
    async fn client_side(&mut self, variant: &str, ids: &[u64]) -> (Cuts, String) {
        let (leader, known) = self.leader_or_random().await;
        let workers: Vec<u64> = self
            .workers
            .slots()
            .into_iter()
            .map(worker_member)
            .collect();
        if variant == "leader-with-clients" {
            let cuts = leader_with_clients(ids, leader, &workers);
            let text = format!(
                "n{leader}{} and every client worker cut from the other nodes",
                leader_note(known)
            );
            (cuts, text)
        } else {
            let cuts = between(&workers, &[leader]);
            let text = format!(
                "no client worker reaches n{leader}{}; its peers do",
                leader_note(known)
            );
            (cuts, text)
        }
    }
}

/// Both directions between `node` and every other node.
pub(super) fn isolate(ids: &[u64], node: u64) -> Cuts {
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != node).collect();
    between(&[node], &others)
}

/// `leader` and `workers` on one side, every other node on the other.
fn leader_with_clients(ids: &[u64], leader: u64, workers: &[u64]) -> Cuts {
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != leader).collect();
    let mut cuts = between(&[leader], &others);
    cuts.extend(between(workers, &others));
    cuts
}

/// Each node keeps only its two neighbours in `order` (taken as a ring), so
/// with five nodes each sees a majority (itself and two), and no two see
/// the same one.
fn ring(order: &[u64]) -> Cuts {
    let n = order.len();
    let mut cuts = BTreeSet::new();
    for i in 0..n {
        for j in 0..n {
            let distance = (i + n - j) % n;
            if i != j && distance != 1 && distance != n - 1 {
                cuts.insert((order[i], order[j]));
            }
        }
    }
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolating_a_node_cuts_both_directions_to_every_other_node() {
        let cuts = isolate(&[1, 2, 3], 2);
        assert_eq!(cuts, BTreeSet::from([(1, 2), (2, 1), (2, 3), (3, 2)]));
    }

    #[test]
    fn in_a_majorities_ring_each_node_keeps_exactly_its_two_neighbours() {
        let order = [3, 1, 4, 5, 2];
        let cuts = ring(&order);
        for &node in &order {
            let reachable = order
                .iter()
                .filter(|&&other| other != node && !cuts.contains(&(node, other)))
                .count();
            assert_eq!(reachable, 2, "node {node}");
        }
        assert!(!cuts.contains(&(3, 1)) && !cuts.contains(&(2, 3)));
        assert!(cuts.contains(&(3, 4)));
    }

    #[test]
    fn with_leader_with_clients_workers_reach_only_the_leader_and_it_only_them() {
        let cuts = leader_with_clients(&[1, 2, 3], 2, &[100, 101]);
        let open = |a, b| !cuts.contains(&(a, b)) && !cuts.contains(&(b, a));
        assert!(open(100, 2) && open(101, 2), "workers keep the leader");
        assert!(!open(100, 1) && !open(101, 3), "workers lose the others");
        assert!(!open(2, 1) && !open(2, 3), "the leader loses its peers");
        assert!(open(1, 3), "the others keep each other");
        assert!(open(100, 101), "workers never cut from each other");
    }
}
