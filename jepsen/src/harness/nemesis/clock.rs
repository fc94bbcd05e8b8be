//! Clock faults: a node restarted under libfaketime (`clock`), and the
//! clock rate of running nodes changed through their rate files
//! (`clock-rate`), which hits a leader mid-term.
//!
//! Both draw their rates from `--clock-rates`. Within the drift bound the
//! server promises that no lease is expired before its client stops
//! trusting it (docs/semantics.md, Invariant 4); beyond it, `lease-overlap`
//! is expected to find two holders at once, which is how the harness shows
//! that the checker bites. Each step's value carries the rates it set.
//!
//! # Not done yet
//! - No clock *jumps* on a running node: its rate file changes the rate
//!   only; a wall-clock offset needs `clock`, which restarts the node.
//! - The workers' clocks always run at rate 1; a slow client clock is the
//!   other half of the drift bound and is not injected.

use std::time::Duration;

use rand::Rng;
use serde_json::json;

use super::{leader_note, Nemesis};
use crate::harness::cluster::ClockSkew;
use crate::history::OpType;

/// Time a node needs to pick up a new rate (it polls its file every
/// 100 ms): the step is recorded as in place only after it.
const CLOCK_RATE_SETTLE: Duration = Duration::from_millis(250);

impl Nemesis {
    fn draw_rate(&mut self) -> f64 {
        let rates = &self.options.clock_rates;
        rates[self.rng.gen_range(0..rates.len())]
    }

    pub(super) async fn clock(&mut self) -> Result<(), String> {
        let ids = self.node_ids().await;
        let node = ids[self.rng.gen_range(0..ids.len())];
        let skew = ClockSkew {
            offset_s: self.rng.gen_range(-10..=10),
            rate: self.draw_rate(),
        };
        let description = format!(
            "restart n{node} with its clock at rate x{} and offset {:+} s",
            skew.rate, skew.offset_s
        );
        let value = json!({"nodes": [node], "rate": skew.rate, "offset_s": skew.offset_s, "description": description});
        self.record(OpType::Invoke, "clock", &value);
        {
            let mut cluster = self.cluster.lock().await;
            cluster.stop(node).await;
            cluster.set_clock(node, Some(skew));
            cluster.start(node)?;
        }
        self.in_place.skewed.push(node);
        self.record(OpType::Info, "clock", &value);
        self.count("clock");
        Ok(())
    }

    /// The running leader's clock (`leader`), a random node's (`node`), or
    /// each node's (`all`) runs at a drawn rate from now until the heal.
    pub(super) async fn clock_rate(&mut self, variant: &'static str) -> Result<(), String> {
        let ids = self.node_ids().await;
        let (targets, who) = match variant {
            "leader" => {
                let (node, known) = self.leader_or_random().await;
                (vec![node], format!("n{node}{}", leader_note(known)))
            }
            "node" => {
                let node = ids[self.rng.gen_range(0..ids.len())];
                (vec![node], format!("n{node}"))
            }
            _ => (ids.clone(), "every node".to_string()),
        };
        let rates: Vec<(u64, f64)> = targets.iter().map(|&n| (n, self.draw_rate())).collect();
        let described: Vec<String> = rates.iter().map(|(n, r)| format!("n{n} x{r}")).collect();
        let description = format!(
            "clock rate of {who} changed while it runs: {}",
            described.join(", ")
        );
        let value = json!({"variant": variant, "nodes": targets, "rate": rates[0].1,
            "rates": rates.iter().map(|(n, r)| json!([n, r])).collect::<Vec<_>>(),
            "description": description});
        self.record(OpType::Invoke, "clock-rate", &value);
        {
            let mut cluster = self.cluster.lock().await;
            for &(node, rate) in &rates {
                cluster.set_clock_rate(node, rate)?;
            }
        }
        for &node in &targets {
            if !self.in_place.rated.contains(&node) {
                self.in_place.rated.push(node);
            }
        }
        tokio::time::sleep(CLOCK_RATE_SETTLE).await;
        self.record(OpType::Info, "clock-rate", &value);
        self.count(&format!("clock-rate/{variant}"));
        Ok(())
    }

    /// Restarts skewed nodes with the real clock and sets every changed
    /// rate back to 1.
    pub(super) async fn heal_clocks(&mut self) -> Result<(), String> {
        let skewed = std::mem::take(&mut self.in_place.skewed);
        if !skewed.is_empty() {
            let value = json!({"nodes": skewed, "description": format!("restart {skewed:?} with the real clock")});
            self.record(OpType::Invoke, "clock-reset", &value);
            let mut cluster = self.cluster.lock().await;
            for &node in &skewed {
                cluster.stop(node).await;
                cluster.set_clock(node, None);
                cluster.start(node)?;
            }
            drop(cluster);
            self.record(OpType::Info, "clock-reset", &value);
        }
        let rated = std::mem::take(&mut self.in_place.rated);
        if !rated.is_empty() {
            let value = json!({"nodes": rated, "rate": 1.0,
                "description": format!("clock rate of {rated:?} back to x1")});
            self.record(OpType::Invoke, "clock-rate-reset", &value);
            {
                let mut cluster = self.cluster.lock().await;
                for &node in &rated {
                    cluster.set_clock_rate(node, 1.0)?;
                }
            }
            tokio::time::sleep(CLOCK_RATE_SETTLE).await;
            self.record(OpType::Info, "clock-rate-reset", &value);
        }
        Ok(())
    }
}

/// The default `--clock-rates` for a drift bound of `ppm`: 1 − ρ, 1 − ρ/2,
/// 1 + ρ/2 and 1 + ρ, all within the bound.
pub fn rates_within(ppm: u64) -> Vec<f64> {
    let rho = ppm as f64 / 1e6;
    // Rounded to parts per million, so that 1 − 0.01 reads 0.99.
    let round = |rate: f64| (rate * 1e6).round() / 1e6;
    [1.0 - rho, 1.0 - rho / 2.0, 1.0 + rho / 2.0, 1.0 + rho]
        .into_iter()
        .map(round)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rates_stay_within_the_drift_bound_and_move_both_ways() {
        let rates = rates_within(10_000);
        assert_eq!(rates, vec![0.99, 0.995, 1.005, 1.01]);
        assert!(rates.iter().all(|r| (0.99..=1.01).contains(r)));
    }
}
