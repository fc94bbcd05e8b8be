//! `--rounds N`: the throughput and latency workloads run N times on each
//! system, the two systems alternating (latchkey first in one round, etcd
//! in the next), and the table and the targets read the median round.
//!
//! On a shared or virtual machine two back-to-back runs of one binary can
//! differ by a third, so one pair of runs can put a ratio anywhere in that
//! spread. Several adjacent pairs show the spread and keep one drifting
//! minute from deciding a verdict.
//!
//! - **Which round stands for a system**: the median by the headline number,
//!   throughput if the workload has one, else the p50 latency. A window run
//!   at a fixed offered rate (`lease-keepalive`'s paced window, which
//!   records [`OFFERED_RATE`]) reaches that rate in every round, so its
//!   rounds are told apart by their p99 latency instead, the number its
//!   target reads. With an even count the worse of the two middle rounds,
//!   so that the median never flatters either system.
//! - **What it takes from the other rounds**: anything that went wrong.
//!   Errors are added up, and first-come-first-served checks of every round
//!   are added up, so a violation in any round fails the target.
//! - **What runs once**: `failover` and `holder-crash` repeat inside one run
//!   (`--repeats`), and `memory` and `leader-stability` are one long
//!   measurement each; a median of them would hide their worst case.
//! - [`Spread`] keeps every round's headline number and the ratio of each
//!   round's pair, printed under the table and written to the JSON file.

use serde::Serialize;

use crate::cluster::System;
use crate::workloads::{FcfsVerdict, Measurement, Workload};

/// The `numbers` key of a window run at a fixed offered rate.
pub const OFFERED_RATE: &str = "offered_per_s";

/// Error samples kept after merging the rounds.
const MAX_ERROR_SAMPLES: usize = 5;

/// Whether `workload` repeats with `--rounds` (see the module docs).
pub fn takes_rounds(workload: Workload) -> bool {
    matches!(
        workload,
        Workload::Lock1c
            | Workload::LockNc
            | Workload::LockHot
            | Workload::FencedWrite
            | Workload::LeaseKeepalive
    )
}

/// Every round's headline number of one workload variant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spread {
    pub workload: Workload,
    pub variant: String,
    /// What the numbers are: the throughput's unit, or `ms p50`.
    pub unit: String,
    /// latchkey's number in each round it was measured (round, value).
    pub latchkey: Vec<(usize, f64)>,
    /// etcd's, likewise.
    pub etcd: Vec<(usize, f64)>,
    /// latchkey ÷ etcd in each round where both were measured (round, ratio).
    pub ratios: Vec<(usize, f64)>,
}

/// The headline number of a measurement and whether higher is better.
fn headline(m: &Measurement) -> Option<(f64, bool)> {
    if m.numbers.contains_key(OFFERED_RATE) {
        return m.latency.map(|l| (l.p99_ms, false));
    }
    if let Some(metric) = &m.metric {
        return Some((metric.value, metric.higher_is_better));
    }
    m.latency.map(|l| (l.p50_ms, false))
}

fn unit(m: &Measurement) -> String {
    if m.numbers.contains_key(OFFERED_RATE) {
        return "ms p99".into();
    }
    match &m.metric {
        Some(metric) => metric.unit.to_string(),
        None => "ms p50".into(),
    }
}

/// One measurement per (workload, variant, system): the median round, with
/// the other rounds' errors and FCFS checks added in. A group measured once
/// is returned as it is.
pub fn combine(all: &[Measurement]) -> Vec<Measurement> {
    let mut out = Vec::new();
    for key in keys(all) {
        let rounds: Vec<&Measurement> = all.iter().filter(|m| same_group(m, &key)).collect();
        out.push(median_round(&rounds));
    }
    out
}

/// The spread of every group measured in more than one round.
pub fn spreads(all: &[Measurement]) -> Vec<Spread> {
    let mut out: Vec<Spread> = Vec::new();
    for key in keys(all) {
        let group: Vec<&Measurement> = all.iter().filter(|m| same_group(m, &key)).collect();
        let values: Vec<(usize, f64)> = group
            .iter()
            .filter_map(|m| headline(m).map(|(v, _)| (m.round, v)))
            .collect();
        let (workload, variant, system) = key;
        let index = match out
            .iter()
            .position(|s| s.workload == workload && s.variant == variant)
        {
            Some(index) => index,
            None => {
                out.push(Spread {
                    workload,
                    variant: variant.clone(),
                    unit: unit(group[0]),
                    latchkey: Vec::new(),
                    etcd: Vec::new(),
                    ratios: Vec::new(),
                });
                out.len() - 1
            }
        };
        match system {
            System::Latchkey => out[index].latchkey = values,
            System::Etcd => out[index].etcd = values,
        }
    }
    for spread in &mut out {
        spread.ratios = spread
            .latchkey
            .iter()
            .filter_map(|(round, lk)| {
                let etcd = spread.etcd.iter().find(|(r, _)| r == round)?.1;
                (etcd > 0.0).then(|| (*round, lk / etcd))
            })
            .collect();
    }
    out.retain(|s| s.latchkey.len() > 1 || s.etcd.len() > 1);
    out
}

type Key = (Workload, String, System);

/// The groups in the order they were first measured.
fn keys(all: &[Measurement]) -> Vec<Key> {
    let mut keys: Vec<Key> = Vec::new();
    for m in all {
        let key = (m.workload, m.variant.clone(), m.system);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

fn same_group(m: &Measurement, key: &Key) -> bool {
    m.workload == key.0 && m.variant == key.1 && m.system == key.2
}

fn median_round(rounds: &[&Measurement]) -> Measurement {
    if let [only] = rounds {
        return (*only).clone();
    }
    // Worst first: with an even count, index (n - 1) / 2 is the worse of
    // the two middle rounds. Rounds without a headline number (every
    // sample failed) count as the worst.
    let mut order: Vec<&Measurement> = rounds.to_vec();
    order.sort_by(|a, b| {
        let goodness = |m: &Measurement| match headline(m) {
            Some((v, true)) => v,
            Some((v, false)) => -v,
            None => f64::NEG_INFINITY,
        };
        goodness(a).total_cmp(&goodness(b))
    });
    let mut median = order[(order.len() - 1) / 2].clone();
    median.errors = rounds.iter().map(|m| m.errors).sum();
    median.error_samples = rounds
        .iter()
        .flat_map(|m| m.error_samples.iter().cloned())
        .take(MAX_ERROR_SAMPLES)
        .collect();
    median.fcfs = merge_fcfs(rounds);
    median.notes.push(format!(
        "median of {} rounds (round {} shown)",
        rounds.len(),
        median.round
    ));
    median
}

fn merge_fcfs(rounds: &[&Measurement]) -> Option<FcfsVerdict> {
    let verdicts: Vec<&FcfsVerdict> = rounds.iter().filter_map(|m| m.fcfs.as_ref()).collect();
    if verdicts.is_empty() {
        return None;
    }
    Some(FcfsVerdict {
        checked: verdicts.iter().map(|v| v.checked).sum(),
        skipped: verdicts.iter().map(|v| v.skipped).sum(),
        violations: verdicts.iter().map(|v| v.violations).sum(),
        grants_covered: verdicts.iter().map(|v| v.grants_covered).sum(),
        first_violation: verdicts.iter().find_map(|v| v.first_violation.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::LatencySummary;
    use crate::workloads::Metric;

    fn lock_nc(system: System, round: usize, rate: f64) -> Measurement {
        let mut m = Measurement::new(Workload::LockNc, "64 clients", system);
        m.round = round;
        m.metric = Some(Metric {
            value: rate,
            unit: "cycles/s",
            higher_is_better: true,
        });
        m
    }

    fn latency_only(round: usize, p50: f64) -> Measurement {
        let mut m = Measurement::new(Workload::Lock1c, "1 client", System::Latchkey);
        m.round = round;
        m.latency = Some(LatencySummary {
            count: 100,
            p50_ms: p50,
            p99_ms: 2.0 * p50,
            p999_ms: 3.0 * p50,
            max_ms: 4.0 * p50,
            clamped: 0,
        });
        m
    }

    fn rate(m: &Measurement) -> f64 {
        m.metric.as_ref().expect("a throughput").value
    }

    #[test]
    fn one_round_is_returned_unchanged() {
        let all = vec![lock_nc(System::Latchkey, 1, 100.0)];
        let combined = combine(&all);
        assert_eq!(combined.len(), 1);
        assert_eq!(rate(&combined[0]), 100.0);
        assert!(combined[0].notes.is_empty());
        assert!(spreads(&all).is_empty());
    }

    #[test]
    fn the_median_round_stands_for_each_system() {
        let all = vec![
            lock_nc(System::Latchkey, 1, 300.0),
            lock_nc(System::Etcd, 1, 100.0),
            lock_nc(System::Etcd, 2, 120.0),
            lock_nc(System::Latchkey, 2, 500.0),
            lock_nc(System::Latchkey, 3, 400.0),
            lock_nc(System::Etcd, 3, 80.0),
        ];
        let combined = combine(&all);
        assert_eq!(combined.len(), 2);
        let lk = combined.iter().find(|m| m.system == System::Latchkey);
        let etcd = combined.iter().find(|m| m.system == System::Etcd);
        assert_eq!(rate(lk.expect("latchkey")), 400.0);
        assert_eq!(rate(etcd.expect("etcd")), 100.0);
        assert_eq!(lk.expect("latchkey").round, 3);
    }

    #[test]
    fn an_even_count_takes_the_worse_middle_round() {
        let all = vec![
            lock_nc(System::Latchkey, 1, 100.0),
            lock_nc(System::Latchkey, 2, 400.0),
            lock_nc(System::Latchkey, 3, 200.0),
            lock_nc(System::Latchkey, 4, 300.0),
        ];
        assert_eq!(rate(&combine(&all)[0]), 200.0);
        // Lower is better for a latency: the worse middle is the higher one.
        let latencies = vec![latency_only(1, 1.0), latency_only(2, 4.0)];
        let p50 = combine(&latencies)[0].latency.expect("latency").p50_ms;
        assert_eq!(p50, 4.0);
        let three = vec![
            latency_only(1, 3.0),
            latency_only(2, 1.0),
            latency_only(3, 2.0),
        ];
        assert_eq!(combine(&three)[0].latency.expect("latency").p50_ms, 2.0);
    }

    #[test]
    fn errors_and_fcfs_violations_of_every_round_are_kept() {
        let mut a = lock_nc(System::Latchkey, 1, 100.0);
        a.errors = 2;
        a.error_samples = vec!["timeout".into()];
        a.fcfs = Some(FcfsVerdict {
            checked: 10,
            violations: 1,
            first_violation: Some("lease 7 before lease 5".into()),
            ..FcfsVerdict::default()
        });
        let mut b = lock_nc(System::Latchkey, 2, 200.0);
        b.fcfs = Some(FcfsVerdict {
            checked: 12,
            ..FcfsVerdict::default()
        });
        let mut c = lock_nc(System::Latchkey, 3, 300.0);
        c.errors = 1;
        let combined = combine(&[a, b, c]);
        let m = &combined[0];
        assert_eq!(rate(m), 200.0, "the median round");
        assert_eq!(m.errors, 3);
        assert_eq!(m.error_samples, vec!["timeout".to_string()]);
        let fcfs = m.fcfs.as_ref().expect("merged verdict");
        assert_eq!((fcfs.checked, fcfs.violations), (22, 1));
        assert_eq!(
            fcfs.first_violation.as_deref(),
            Some("lease 7 before lease 5")
        );
        assert_eq!(m.notes, vec!["median of 3 rounds (round 2 shown)"]);
    }

    #[test]
    fn a_round_without_a_number_counts_as_the_worst() {
        let mut failed = Measurement::new(Workload::Lock1c, "1 client", System::Latchkey);
        failed.round = 2;
        failed.errors = 50;
        let all = vec![latency_only(1, 2.0), failed, latency_only(3, 1.0)];
        let m = &combine(&all)[0];
        assert_eq!(m.latency.expect("a round with samples").p50_ms, 2.0);
        assert_eq!(m.errors, 50);
    }

    #[test]
    fn spreads_pair_the_rounds_of_both_systems() {
        let all = vec![
            lock_nc(System::Latchkey, 1, 300.0),
            lock_nc(System::Etcd, 1, 100.0),
            lock_nc(System::Etcd, 2, 200.0),
            lock_nc(System::Latchkey, 2, 500.0),
        ];
        let spreads = spreads(&all);
        assert_eq!(spreads.len(), 1);
        let s = &spreads[0];
        assert_eq!(s.unit, "cycles/s");
        assert_eq!(s.latchkey, vec![(1, 300.0), (2, 500.0)]);
        assert_eq!(s.etcd, vec![(1, 100.0), (2, 200.0)]);
        assert_eq!(s.ratios, vec![(1, 3.0), (2, 2.5)]);
    }

    #[test]
    fn a_paced_window_is_told_apart_by_its_p99() {
        let paced = |system, round, p99: f64| {
            let mut m = Measurement::new(Workload::LeaseKeepalive, "10000 leases", system);
            m.round = round;
            m.metric = Some(Metric {
                // Rounds 1, 2, 3: 9993, 9990, 9992 renewals/s.
                value: [9993.0, 9990.0, 9992.0][round - 1],
                unit: "keepalives/s",
                higher_is_better: true,
            });
            m.latency = Some(LatencySummary {
                count: 1000,
                p50_ms: 1.0,
                p99_ms: p99,
                p999_ms: 2.0 * p99,
                max_ms: 3.0 * p99,
                clamped: 0,
            });
            m.numbers.insert(OFFERED_RATE.into(), 10_000.0);
            m
        };
        let all = vec![
            paced(System::Latchkey, 1, 9.9),
            paced(System::Latchkey, 2, 8.7),
            paced(System::Latchkey, 3, 1.7),
            paced(System::Etcd, 1, 74.0),
            paced(System::Etcd, 2, 80.0),
            paced(System::Etcd, 3, 70.0),
        ];
        let combined = combine(&all);
        let p99 = |system| {
            let m = combined
                .iter()
                .find(|m| m.system == system)
                .expect("system");
            m.latency.expect("latency").p99_ms
        };
        // By throughput the third round would stand for both (1.7 and 70 ms).
        assert_eq!(p99(System::Latchkey), 8.7);
        assert_eq!(p99(System::Etcd), 74.0);
        let spread = &spreads(&all)[0];
        assert_eq!(spread.unit, "ms p99");
        assert_eq!(spread.latchkey, vec![(1, 9.9), (2, 8.7), (3, 1.7)]);
    }

    #[test]
    fn only_the_throughput_and_latency_workloads_take_rounds() {
        assert!(takes_rounds(Workload::Lock1c));
        assert!(takes_rounds(Workload::LeaseKeepalive));
        assert!(!takes_rounds(Workload::Failover));
        assert!(!takes_rounds(Workload::HolderCrash));
        assert!(!takes_rounds(Workload::Memory));
        assert!(!takes_rounds(Workload::LeaderStability));
    }
}
