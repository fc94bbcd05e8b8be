//! The targets the server is being optimised towards, judged against one
//! run. A target whose inputs were not measured (workload not run, etcd
//! skipped) is reported as "n/a", never as a pass.
//!
//! | target | reads |
//! |---|---|
//! | lock-nc 64 and 256 clients ≥ 5× etcd cycles/s | `lock-nc` throughput of both systems |
//! | lock-1c p50 ≤ 0.6× etcd's | `lock-1c` p50 of both systems |
//! | lock-1c p50 ≤ 1.3× the two-commit floor | `lock-1c` p50 and the floor |
//! | lock-hot 8 clients ≥ 8× etcd hand-overs/s, first come first served | `lock-hot` throughput and latchkey's FCFS verdict |
//! | failover p50 ≤ 300 ms, p99 ≤ 600 ms | latchkey `failover` samples |
//! | no election nobody asked for in 10 idle and 10 loaded minutes | latchkey `leader-stability`, both windows |
//! | holder-crash p99 ≤ TTL + 100 ms | latchkey `holder-crash` samples and its granted TTL |
//! | lease-keepalive p99 ≤ 10 ms, ≥ 3× etcd keepalives/s | `lease-keepalive` of both: the paced window's p99, the closed loop's rate |
//! | memory ≤ 1 KiB per lease+lock at 100 000 leases (n/a below) | latchkey `memory` |

use crate::cluster::System;
use crate::floor::{commits_floor_ms, Floor};
use crate::report::{find, TargetResult};
use crate::workloads::{Measurement, Workload};

/// Judges every target against `measurements`.
pub fn evaluate(measurements: &[Measurement], floor: Option<&Floor>) -> Vec<TargetResult> {
    let lookup = Lookup { measurements };
    let mut out = Vec::new();
    for clients in ["64 clients", "256 clients"] {
        out.push(lookup.throughput_ratio(Workload::LockNc, clients, 5.0));
    }
    out.push(lookup.p50_ratio(Workload::Lock1c, "1 client", 0.6));
    out.push(lock_1c_floor(&lookup, floor));
    out.push(lookup.throughput_ratio(Workload::LockHot, "8 clients", 8.0));
    out.push(fcfs(&lookup, "8 clients"));
    out.push(lookup.latency_bound(Workload::Failover, "p50", 300.0));
    out.push(lookup.latency_bound(Workload::Failover, "p99", 600.0));
    out.push(leader_stability(&lookup));
    out.push(holder_crash(&lookup));
    out.push(lookup.latency_bound(Workload::LeaseKeepalive, "p99", 10.0));
    out.push(keepalive_capacity(&lookup));
    out.push(memory(&lookup));
    out
}

struct Lookup<'a> {
    measurements: &'a [Measurement],
}

fn not_measured(target: String, why: &str) -> TargetResult {
    TargetResult {
        target,
        pass: None,
        detail: why.into(),
    }
}

impl Lookup<'_> {
    /// The measurement of `system` for `workload`; an empty `variant`
    /// takes the first variant of the workload.
    fn get(&self, workload: Workload, variant: &str, system: System) -> Option<&Measurement> {
        if variant.is_empty() {
            return self
                .measurements
                .iter()
                .find(|m| m.workload == workload && m.system == system);
        }
        find(self.measurements, workload, variant, system)
    }

    fn throughput_ratio(&self, workload: Workload, variant: &str, at_least: f64) -> TargetResult {
        let target = format!(
            "{} {}≥ {at_least}× etcd throughput",
            workload.name(),
            if variant.is_empty() {
                String::new()
            } else {
                format!("{variant} ")
            }
        );
        let rate = |s| {
            self.get(workload, variant, s)
                .and_then(|m| m.metric.as_ref())
                .map(|x| (x.value, x.unit))
        };
        match (rate(System::Latchkey), rate(System::Etcd)) {
            (Some((lk, unit)), Some((etcd, _))) if etcd > 0.0 => TargetResult {
                target,
                pass: Some(lk >= at_least * etcd),
                detail: format!("{:.2}× ({lk:.0} vs {etcd:.0} {unit})", lk / etcd),
            },
            _ => not_measured(target, "needs both systems"),
        }
    }

    fn p50_ratio(&self, workload: Workload, variant: &str, at_most: f64) -> TargetResult {
        let target = format!("{} p50 ≤ {at_most}× etcd's", workload.name());
        let p50 = |s| {
            self.get(workload, variant, s)
                .and_then(|m| m.latency)
                .map(|l| l.p50_ms)
        };
        match (p50(System::Latchkey), p50(System::Etcd)) {
            (Some(lk), Some(etcd)) if etcd > 0.0 => TargetResult {
                target,
                pass: Some(lk <= at_most * etcd),
                detail: format!("{:.2}× ({lk:.2} vs {etcd:.2} ms)", lk / etcd),
            },
            _ => not_measured(target, "needs both systems"),
        }
    }

    fn latency_bound(&self, workload: Workload, which: &str, at_most_ms: f64) -> TargetResult {
        let target = format!("{} {which} ≤ {at_most_ms} ms", workload.name());
        let Some(m) = self.get(workload, "", System::Latchkey) else {
            return not_measured(target, "latchkey not measured");
        };
        let Some(l) = m.latency else {
            return not_measured(target, "no successful sample");
        };
        let value = if which == "p50" { l.p50_ms } else { l.p99_ms };
        let errors = if m.errors > 0 {
            format!(", {} failed samples", m.errors)
        } else {
            String::new()
        };
        TargetResult {
            target,
            pass: Some(value <= at_most_ms && m.errors == 0),
            detail: format!("{value:.1} ms over {} samples{errors}", l.count),
        }
    }
}

/// Keepalives/s in the closed loop, where each system's rate is what it
/// sustains rather than what was offered.
fn keepalive_capacity(lookup: &Lookup<'_>) -> TargetResult {
    let variant = lookup
        .measurements
        .iter()
        .find(|m| {
            m.workload == Workload::LeaseKeepalive
                && m.variant
                    .ends_with(crate::workloads::keepalive::CLOSED_LOOP)
        })
        .map(|m| m.variant.clone());
    match variant {
        Some(variant) => lookup.throughput_ratio(Workload::LeaseKeepalive, &variant, 3.0),
        None => not_measured(
            "lease-keepalive closed loop ≥ 3× etcd throughput".into(),
            "needs both systems",
        ),
    }
}

fn lock_1c_floor(lookup: &Lookup<'_>, floor: Option<&Floor>) -> TargetResult {
    let target = "lock-1c p50 ≤ 1.3× the two-commit floor".to_string();
    let p50 = lookup
        .get(Workload::Lock1c, "1 client", System::Latchkey)
        .and_then(|m| m.latency)
        .map(|l| l.p50_ms);
    match (p50, floor) {
        (Some(p50), Some(floor)) => {
            let f = commits_floor_ms(floor, 2);
            TargetResult {
                target,
                pass: Some(p50 <= 1.3 * f),
                detail: format!("{:.2}× ({p50:.2} vs {f:.2} ms)", p50 / f),
            }
        }
        _ => not_measured(target, "needs lock-1c and the floor"),
    }
}

fn fcfs(lookup: &Lookup<'_>, variant: &str) -> TargetResult {
    let target = format!("lock-hot {variant} first come, first served");
    let verdict = lookup
        .get(Workload::LockHot, variant, System::Latchkey)
        .and_then(|m| m.fcfs.as_ref());
    match verdict {
        Some(v) if v.checked > 0 => TargetResult {
            target,
            pass: Some(v.violations == 0),
            detail: format!("{} violations in {} snapshots", v.violations, v.checked),
        },
        _ => not_measured(target, "no queue snapshot checked"),
    }
}

fn holder_crash(lookup: &Lookup<'_>) -> TargetResult {
    let target = "holder-crash p99 ≤ TTL + 100 ms".to_string();
    let Some(m) = lookup.get(Workload::HolderCrash, "", System::Latchkey) else {
        return not_measured(target, "latchkey not measured");
    };
    let (Some(l), Some(ttl)) = (m.latency, m.numbers.get("ttl_granted_ms")) else {
        return not_measured(target, "no successful sample");
    };
    let bound = ttl + 100.0;
    TargetResult {
        target,
        pass: Some(l.p99_ms <= bound && m.errors == 0),
        detail: format!("{:.0} ms vs {bound:.0} ms (TTL {ttl:.0} ms)", l.p99_ms),
    }
}

/// Shortest `leader-stability` window the target accepts, in seconds.
const STABILITY_WINDOW_S: f64 = 600.0;

/// No election and no leader change in either `leader-stability` window.
/// An election fails the target whatever the window's length; a quiet
/// window shorter than ten minutes proves nothing, so it is "n/a".
fn leader_stability(lookup: &Lookup<'_>) -> TargetResult {
    let target = "leader-stability: no election in 10 idle or 10 loaded minutes".to_string();
    let windows: Vec<&Measurement> = lookup
        .measurements
        .iter()
        .filter(|m| m.workload == Workload::LeaderStability && m.system == System::Latchkey)
        .collect();
    if windows.is_empty() {
        return not_measured(target, "latchkey not measured");
    }
    let mut quiet = true;
    let mut long_enough = true;
    let mut parts = Vec::new();
    for m in &windows {
        let elections = m.metric.as_ref().map_or(f64::NAN, |x| x.value);
        let changes = m.numbers.get("leader_changes").copied().unwrap_or(f64::NAN);
        let seconds = m.numbers.get("window_s").copied().unwrap_or(0.0);
        quiet &= elections == 0.0 && changes == 0.0;
        long_enough &= seconds >= STABILITY_WINDOW_S;
        parts.push(format!(
            "{}: {elections:.0} elections, {changes:.0} leader changes in {seconds:.0} s",
            m.variant
        ));
    }
    let detail = parts.join("; ");
    let pass = if !quiet {
        Some(false)
    } else if long_enough && windows.len() >= 2 {
        Some(true)
    } else {
        None
    };
    TargetResult {
        target,
        pass,
        detail: if pass.is_none() {
            format!("{detail}; the target needs an idle and a loaded window of 10 minutes each")
        } else {
            detail
        },
    }
}

/// Leases+locks at which the memory target is judged: fewer leave a larger
/// share of each node's fixed growth (memtables, caches) on every lease.
const MEMORY_TARGET_LEASES: f64 = 100_000.0;

/// Bytes per live lease+lock on the node that grew most, judged only at
/// [`MEMORY_TARGET_LEASES`] or more; a smaller run (`--quick`) is "n/a".
fn memory(lookup: &Lookup<'_>) -> TargetResult {
    let target = "memory ≤ 1 KiB per lease+lock at 100 000 leases".to_string();
    let measured = lookup
        .get(Workload::Memory, "", System::Latchkey)
        .and_then(|m| Some((m, m.numbers.get("bytes_per_lease_lock").copied()?)));
    let Some((m, bytes)) = measured else {
        return not_measured(target, "latchkey not measured");
    };
    let count = m.numbers.get("leases_locks").copied().unwrap_or(0.0);
    let detail = format!("{bytes:.0} bytes on the node that grew most, at {count:.0} leases+locks");
    if count < MEMORY_TARGET_LEASES {
        return TargetResult {
            target,
            pass: None,
            detail: format!("{detail}; the target is judged at 100 000 (--memory-leases 100000)"),
        };
    }
    TargetResult {
        target,
        pass: Some(bytes <= 1024.0),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::stability::{ELECTIONS, IDLE};
    use crate::workloads::Metric;

    fn stability(variant: &str, elections: f64, changes: f64, seconds: f64) -> Measurement {
        let mut m = Measurement::new(Workload::LeaderStability, variant, System::Latchkey);
        m.metric = Some(Metric {
            value: elections,
            unit: ELECTIONS,
            higher_is_better: false,
        });
        m.numbers.insert("leader_changes".into(), changes);
        m.numbers.insert("window_s".into(), seconds);
        m
    }

    fn judged(measurements: &[Measurement]) -> TargetResult {
        leader_stability(&Lookup { measurements })
    }

    fn memory_run(bytes: f64, count: f64) -> TargetResult {
        let mut m = Measurement::new(Workload::Memory, "run", System::Latchkey);
        m.numbers.insert("bytes_per_lease_lock".into(), bytes);
        m.numbers.insert("leases_locks".into(), count);
        memory(&Lookup { measurements: &[m] })
    }

    #[test]
    fn memory_is_judged_only_at_a_hundred_thousand_leases() {
        assert_eq!(memory_run(712.0, 100_000.0).pass, Some(true));
        assert_eq!(memory_run(1100.0, 100_000.0).pass, Some(false));
        let quick = memory_run(1629.0, 10_000.0);
        assert_eq!(quick.pass, None);
        assert!(quick.detail.contains("10000"), "{}", quick.detail);
        assert!(
            quick.detail.contains("judged at 100 000"),
            "{}",
            quick.detail
        );
    }

    #[test]
    fn leader_stability_passes_only_two_quiet_ten_minute_windows() {
        let quiet = [
            stability(IDLE, 0.0, 0.0, 600.0),
            stability("loaded, 64 clients", 0.0, 0.0, 600.0),
        ];
        assert_eq!(judged(&quiet).pass, Some(true));

        let election = [
            stability(IDLE, 0.0, 0.0, 600.0),
            stability("loaded, 64 clients", 1.0, 1.0, 600.0),
        ];
        let failed = judged(&election);
        assert_eq!(failed.pass, Some(false));
        assert!(failed.detail.contains("1 elections"), "{}", failed.detail);

        // An election in a short window still fails; a quiet one proves nothing.
        let short_election = [stability(IDLE, 2.0, 0.0, 3.0)];
        assert_eq!(judged(&short_election).pass, Some(false));
        let short = [
            stability(IDLE, 0.0, 0.0, 3.0),
            stability("loaded, 64 clients", 0.0, 0.0, 3.0),
        ];
        assert_eq!(judged(&short).pass, None);
        let one_window = [stability(IDLE, 0.0, 0.0, 600.0)];
        assert_eq!(judged(&one_window).pass, None);
        assert_eq!(judged(&[]).pass, None);
    }
}
