//! The report: the side-by-side table with ratios and floors, what limited
//! each number, the pass/fail lines against the targets, and the JSON file.
//!
//! # Reading the table
//! - One block per workload variant: a throughput line (if the workload
//!   has one) and a latency line `p50 / p99 / p999` in milliseconds.
//! - `lk/etcd` is latchkey's number divided by etcd's, for throughput and
//!   for the p50 latency: above 1 means more throughput, below 1 means
//!   lower latency.
//! - `floor` is the measured floor for the Raft commits the latency needs
//!   (one synced write per commit; see [`crate::floor`]) and latchkey's p50
//!   as a multiple of it.
//! - `limited by` is a rule of thumb from the CPU and disk readings taken
//!   during the window (see [`limited_by`]), for latchkey and for etcd.

use std::fmt::Write as _;

use latchkey_server::cli::status::align_columns;
use serde::Serialize;

use crate::cluster::System;
use crate::floor::{commits_floor_concurrent_ms, commits_floor_ms, Floor};
use crate::machine::Machine;
use crate::rounds::Spread;
use crate::workloads::{Measurement, Settings, Workload};

/// Machine busy above this share of all cores: CPU-bound.
const CPU_BOUND_MACHINE_PCT: f64 = 90.0;
/// Share of the machine's CPU used by the clusters and the bench above
/// which a saturated machine counts as saturated by us.
const OWN_CPU_SHARE_PCT: f64 = 75.0;
/// One server process above this share of one core: CPU-bound.
const CPU_BOUND_PROCESS_PCT: f64 = 90.0;
/// p50 within this multiple of its commits' floor: fsync-bound.
const FSYNC_BOUND_FACTOR: f64 = 2.0;
/// iowait above this share of all cores: disk-bound.
const DISK_BOUND_IOWAIT_PCT: f64 = 30.0;

/// Everything one `compare` run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub load_average_before: Option<[f64; 3]>,
    pub load_average_after: Option<[f64; 3]>,
    pub latchkey_binary: String,
    pub etcd_binary: Option<String>,
    pub settings: Settings,
    /// Measured before the workloads; the table and targets use it.
    pub floor: Option<Floor>,
    /// Measured again after the workloads.
    pub floor_after: Option<Floor>,
    /// One per system and workload variant: the median round when
    /// `--rounds` is above 1.
    pub measurements: Vec<Measurement>,
    /// Every round's number of each variant measured in more than one round.
    pub spreads: Vec<Spread>,
    /// One line per thing that was skipped or failed.
    pub problems: Vec<String>,
    pub targets: Vec<TargetResult>,
    pub elapsed_seconds: f64,
}

/// One target and how this run did against it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TargetResult {
    pub target: String,
    /// `None`: not measured in this run.
    pub pass: Option<bool>,
    pub detail: String,
}

impl Report {
    /// The whole report as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "latchkey-bench: {}", self.command);
        for line in self.machine.lines() {
            let _ = writeln!(out, "  {line}");
        }
        let _ = writeln!(
            out,
            "  load avg:   {} at start, {} at end",
            load(self.load_average_before),
            load(self.load_average_after)
        );
        let _ = writeln!(out, "  latchkey:   {}", self.latchkey_binary);
        let _ = writeln!(
            out,
            "  etcd:       {}",
            self.etcd_binary.as_deref().unwrap_or("not run")
        );
        let _ = writeln!(
            out,
            "  timing:     warm-up {:?}, window {:?}, {} repeats, {} round{}, leader-stability windows {:?}{}",
            self.settings.warmup,
            self.settings.duration,
            self.settings.repeats,
            self.settings.rounds,
            if self.settings.rounds == 1 { "" } else { "s" },
            self.settings.stability_duration,
            if self.settings.quick {
                " (--quick)"
            } else {
                ""
            }
        );
        for (when, floor) in [("before", &self.floor), ("after", &self.floor_after)] {
            let Some(floor) = floor else { continue };
            let _ = writeln!(
                out,
                "\nmeasured floor {when} the workloads (synced writes on the data disk):"
            );
            for line in floor.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        let _ = writeln!(out, "\n{}", table(&self.measurements, self.floor.as_ref()));
        if !self.spreads.is_empty() {
            let _ = writeln!(out, "{}", rounds_table(&self.spreads));
        }
        let _ = writeln!(
            out,
            "{}",
            resources(&self.measurements, self.floor.as_ref())
        );
        let _ = writeln!(out, "targets:");
        for t in &self.targets {
            let verdict = match t.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "n/a ",
            };
            let _ = writeln!(out, "  {verdict}  {}: {}", t.target, t.detail);
        }
        if !self.problems.is_empty() {
            let _ = writeln!(out, "\nproblems:");
            for p in &self.problems {
                let _ = writeln!(out, "  {p}");
            }
        }
        let _ = writeln!(out, "\nelapsed: {:.0} s", self.elapsed_seconds);
        out
    }
}

fn load(average: Option<[f64; 3]>) -> String {
    average.map_or("unknown".into(), |[a, b, c]| {
        format!("{a:.2} {b:.2} {c:.2}")
    })
}

/// The (workload, variant) pairs in the order they were measured.
fn groups(measurements: &[Measurement]) -> Vec<(Workload, String)> {
    let mut seen: Vec<(Workload, String)> = Vec::new();
    for m in measurements {
        let key = (m.workload, m.variant.clone());
        if !seen.contains(&key) {
            seen.push(key);
        }
    }
    seen.sort_by_key(|(w, _)| *w);
    seen
}

/// The measurement of `system` for one group.
pub fn find<'a>(
    measurements: &'a [Measurement],
    workload: Workload,
    variant: &str,
    system: System,
) -> Option<&'a Measurement> {
    measurements
        .iter()
        .find(|m| m.workload == workload && m.variant == variant && m.system == system)
}

/// The main table: throughput and latency side by side.
pub fn table(measurements: &[Measurement], floor: Option<&Floor>) -> String {
    let mut rows = vec![header_row()];
    for (workload, variant) in groups(measurements) {
        let lk = find(measurements, workload, &variant, System::Latchkey);
        let etcd = find(measurements, workload, &variant, System::Etcd);
        let Some(any) = lk.or(etcd) else { continue };
        let mut first = true;
        let mut label = || {
            let cells = if first {
                (workload.name().to_string(), variant.clone())
            } else {
                (String::new(), String::new())
            };
            first = false;
            cells
        };
        if let Some(metric) = &any.metric {
            let value =
                |m: Option<&Measurement>| m.and_then(|m| m.metric.as_ref()).map(|x| x.value);
            let (a, b) = (value(lk), value(etcd));
            let (w, v) = label();
            rows.push(vec![
                w,
                v,
                metric.unit.to_string(),
                num(a),
                num(b),
                ratio(a, b),
                String::new(),
            ]);
        }
        if any.latency.is_some() || any.errors > 0 {
            let p50 = |m: Option<&Measurement>| m.and_then(|m| m.latency).map(|l| l.p50_ms);
            let (w, v) = label();
            rows.push(vec![
                w,
                v,
                format!("ms p50/p99/p999 ({})", any.latency_of),
                percentiles(lk),
                percentiles(etcd),
                ratio(p50(lk), p50(etcd)),
                floor_cell(lk.or(etcd), p50(lk), floor),
            ]);
        }
    }
    let mut text = align_columns(&rows);
    text.push_str(&footnotes(measurements));
    text
}

/// Every round's number under the main table, and each round's ratio.
pub fn rounds_table(spreads: &[Spread]) -> String {
    // One cell per round, `-` where a system has no number for it (the
    // round failed), so that the two lists line up.
    let value = |values: &[(usize, f64)], round: usize| {
        values.iter().find(|(r, _)| *r == round).map(|(_, v)| *v)
    };
    let list = |values: &[(usize, f64)], rounds: usize| {
        if values.is_empty() {
            return "-".to_string();
        }
        let cells: Vec<String> = (1..=rounds)
            .map(|round| num(value(values, round)))
            .collect();
        cells.join(", ")
    };
    let mut rows = vec![[
        "workload",
        "variant",
        "metric",
        "latchkey",
        "etcd",
        "lk/etcd by round",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for s in spreads {
        let rounds = s
            .latchkey
            .iter()
            .chain(&s.etcd)
            .map(|(round, _)| *round)
            .max()
            .unwrap_or(0);
        let ratios = if s.ratios.is_empty() {
            "-".to_string()
        } else {
            let cells: Vec<String> = (1..=rounds)
                .map(|round| times(value(&s.ratios, round)))
                .collect();
            cells.join(", ")
        };
        rows.push(vec![
            s.workload.name().to_string(),
            s.variant.clone(),
            s.unit.clone(),
            list(&s.latchkey, rounds),
            list(&s.etcd, rounds),
            ratios,
        ]);
    }
    format!(
        "each round (the table above shows the median round of each system):\n{}",
        align_columns(&rows)
    )
}

fn header_row() -> Vec<String> {
    [
        "workload",
        "variant",
        "metric",
        "latchkey",
        "etcd",
        "lk/etcd",
        "floor: 1 writer | 5 writers (lk p50 ÷ floor)",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// FCFS verdicts, notes and errors under the table.
fn footnotes(measurements: &[Measurement]) -> String {
    let mut out = String::new();
    for m in measurements {
        let head = format!("{} {} [{}]", m.workload.name(), m.variant, m.system);
        if let Some(f) = &m.fcfs {
            let verdict = if f.checked == 0 {
                "not checked (no queue snapshot could be placed)".to_string()
            } else if f.violations == 0 {
                format!(
                    "yes ({} queue snapshots, {} grants checked)",
                    f.checked, f.grants_covered
                )
            } else {
                format!(
                    "NO: {} of {} snapshots violated; {}",
                    f.violations,
                    f.checked,
                    f.first_violation.clone().unwrap_or_default()
                )
            };
            let _ = writeln!(out, "  {head}: first come, first served: {verdict}");
        }
        for note in &m.notes {
            let _ = writeln!(out, "  {head}: {note}");
        }
        if m.errors > 0 {
            let _ = writeln!(
                out,
                "  {head}: {} errors, e.g. {}",
                m.errors,
                m.error_samples.first().cloned().unwrap_or_default()
            );
        }
    }
    out
}

fn num(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

fn percentiles(m: Option<&Measurement>) -> String {
    match m.and_then(|m| m.latency) {
        None if m.is_some_and(|m| m.errors > 0) => "errors only".into(),
        None => "-".into(),
        Some(l) => format!("{}/{}/{}", ms(l.p50_ms), ms(l.p99_ms), ms(l.p999_ms)),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    times(match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    })
}

/// A ratio cell: `2.41×`, or `-` when there is none.
fn times(ratio: Option<f64>) -> String {
    ratio.map_or("-".into(), |r| format!("{r:.2}×"))
}

fn floor_cell(m: Option<&Measurement>, p50: Option<f64>, floor: Option<&Floor>) -> String {
    let (Some(m), Some(floor)) = (m, floor) else {
        return String::new();
    };
    let Some(commits) = m.commits else {
        return String::new();
    };
    let cell = |f: f64| match p50 {
        Some(p) if f > 0.0 => format!("{} ({:.2}×)", ms(f), p / f),
        _ => ms(f),
    };
    format!(
        "{} | 5w {}",
        cell(commits_floor_ms(floor, commits)),
        cell(commits_floor_concurrent_ms(floor, commits))
    )
}

/// CPU and disk during each window, and the verdict.
fn resources(measurements: &[Measurement], floor: Option<&Floor>) -> String {
    let mut rows = vec![[
        "workload",
        "variant",
        "system",
        "busiest node %",
        "all nodes %",
        "bench %",
        "machine busy %",
        "iowait %",
        "disk flushes/s",
        "limited by",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for (workload, variant) in groups(measurements) {
        for system in [System::Latchkey, System::Etcd] {
            let Some(m) = find(measurements, workload, &variant, system) else {
                continue;
            };
            let Some(u) = &m.usage else { continue };
            let pct = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
            rows.push(vec![
                workload.name().into(),
                variant.clone(),
                system.name().into(),
                match (u.busiest_node_cpu_pct, u.busiest_node) {
                    (Some(v), Some(n)) => format!("{v:.0} (node {n})"),
                    _ => "-".into(),
                },
                pct(u.nodes_cpu_pct),
                pct(u.bench_cpu_pct),
                pct(u.machine_busy_pct),
                pct(u.machine_iowait_pct),
                pct(u.disk_flushes_per_s),
                limited_by(m, floor),
            ]);
        }
    }
    if rows.len() == 1 {
        return String::new();
    }
    format!(
        "resources during each window (% of one core unless it says machine):\n{}",
        align_columns(&rows)
    )
}

/// Rule of thumb for what bounded a measurement, from its resource
/// readings, in this order:
/// 1. CPU, if the machine was saturated: "CPU" when the clusters and the
///    bench used most of it themselves, "CPU contention" when other
///    programs did;
/// 2. CPU, if one server process used nearly a core by itself;
/// 3. fsync, if the p50 is within `FSYNC_BOUND_FACTOR` of the floor of
///    its commits (the lower of the 1-writer and 5-writer floors);
/// 4. disk, if iowait was high;
/// 5. otherwise "waiting": neither CPU nor disk was saturated, so the time
///    went to waits inside the system (batching, timers, round trips).
pub fn limited_by(m: &Measurement, floor: Option<&Floor>) -> String {
    let Some(u) = &m.usage else {
        return "-".into();
    };
    if let Some(busy) = u.machine_busy_pct.filter(|b| *b >= CPU_BOUND_MACHINE_PCT) {
        let ours = u.nodes_cpu_pct.unwrap_or(0.0) + u.bench_cpu_pct.unwrap_or(0.0);
        let capacity = 100.0 * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let share = 100.0 * ours / capacity;
        return if share >= OWN_CPU_SHARE_PCT {
            format!("CPU (machine {busy:.0}% busy, {share:.0}% of it ours)")
        } else {
            format!("CPU contention (machine {busy:.0}% busy, only {share:.0}% ours)")
        };
    }
    if let (Some(v), Some(n)) = (u.busiest_node_cpu_pct, u.busiest_node) {
        if v >= CPU_BOUND_PROCESS_PCT {
            return format!("CPU (node {n} at {v:.0}%)");
        }
    }
    let floor_ms = floor
        .zip(m.commits)
        .map(|(f, c)| commits_floor_ms(f, c).min(commits_floor_concurrent_ms(f, c)));
    if let (Some(f), Some(l)) = (floor_ms, m.latency) {
        if f > 0.0 && l.p50_ms <= FSYNC_BOUND_FACTOR * f {
            return format!("fsync (p50 {:.1}× floor)", l.p50_ms / f);
        }
    }
    if let Some(io) = u
        .machine_iowait_pct
        .filter(|io| *io >= DISK_BOUND_IOWAIT_PCT)
    {
        return format!("disk (iowait {io:.0}%)");
    }
    "waiting (CPU and disk not saturated)".into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::LatencySummary;
    use crate::workloads::Metric;

    fn measured(system: System, rate: f64, p50: f64) -> Measurement {
        let mut m = Measurement::new(Workload::Lock1c, "1 client", system);
        m.metric = Some(Metric {
            value: rate,
            unit: "cycles/s",
            higher_is_better: true,
        });
        m.latency = Some(LatencySummary {
            count: 10,
            p50_ms: p50,
            p99_ms: p50 * 2.0,
            p999_ms: p50 * 3.0,
            max_ms: p50 * 3.0,
            clamped: 0,
        });
        m.latency_of = "acquire+release";
        m
    }

    #[test]
    fn table_shows_both_systems_and_their_ratio() {
        let rows = [
            measured(System::Latchkey, 400.0, 2.5),
            measured(System::Etcd, 100.0, 10.0),
        ];
        let text = table(&rows, None);
        let throughput = text
            .lines()
            .find(|l| l.contains("cycles/s"))
            .expect("throughput row");
        assert!(
            throughput.contains("400") && throughput.contains("100"),
            "{text}"
        );
        assert!(throughput.contains("4.00×"), "{text}");
        let latency = text
            .lines()
            .find(|l| l.contains("p50/p99/p999"))
            .expect("latency row");
        assert!(
            latency.contains("2.50/5.00/7.50") && latency.contains("0.25×"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_system_shows_a_dash_not_a_ratio() {
        let text = table(&[measured(System::Latchkey, 400.0, 2.5)], None);
        let throughput = text.lines().find(|l| l.contains("cycles/s")).expect("row");
        assert!(throughput.trim_end().ends_with('-'), "{text}");
    }

    #[test]
    fn the_rounds_table_lists_every_round_and_its_ratio() {
        let mut rounds = Vec::new();
        for (round, lk, etcd) in [(1, 300.0, 100.0), (2, 500.0, 200.0), (3, 400.0, 100.0)] {
            for (system, rate) in [(System::Latchkey, lk), (System::Etcd, etcd)] {
                let mut m = measured(system, rate, 1.0);
                m.round = round;
                rounds.push(m);
            }
        }
        let text = rounds_table(&crate::rounds::spreads(&rounds));
        let row = text.lines().find(|l| l.contains("lock-1c")).expect("row");
        assert!(row.contains("300, 500, 400"), "{text}");
        assert!(row.contains("100, 200, 100"), "{text}");
        assert!(row.contains("3.00×, 2.50×, 4.00×"), "{text}");
        // A round that failed on one side shows as `-`, in its place.
        let gap: Vec<Measurement> = rounds
            .iter()
            .filter(|m| !(m.system == System::Etcd && m.round == 2))
            .cloned()
            .collect();
        let text = rounds_table(&crate::rounds::spreads(&gap));
        let row = text.lines().find(|l| l.contains("lock-1c")).expect("row");
        assert!(row.contains("100, -, 100"), "{text}");
        assert!(row.contains("3.00×, -, 4.00×"), "{text}");
        // The main table reads the median rounds: 400 against 100.
        let combined = crate::rounds::combine(&rounds);
        let main = table(&combined, None);
        let throughput = main.lines().find(|l| l.contains("cycles/s")).expect("row");
        assert!(throughput.contains("4.00×"), "{main}");
    }
}
