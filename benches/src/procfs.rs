//! What `/proc` and `/sys` tell about processes, the machine and its disk.
//!
//! CPU accounting is how the report says what limited a workload: per
//! process, `utime + stime` from `/proc/PID/stat` (clock ticks, converted
//! with `sysconf(_SC_CLK_TCK)`); for the machine, the `cpu` line of
//! `/proc/stat` (busy, idle and iowait ticks); for the disk that holds the
//! data directory, writes and flush requests completed from
//! `/proc/diskstats` (flushes are what `fsync` costs on a device with a
//! volatile cache). [`UsageProbe`] takes one snapshot of all of these at
//! the start of a measurement window and [`UsageProbe::finish`] turns a
//! second one into rates.
//!
//! # Not done yet
//! - Linux only: elsewhere every reading is absent and the report says so.
//! - A process that exits inside the window (a killed leader) contributes
//!   only the time it had used at the first snapshot; the failover
//!   workload therefore reports no CPU split.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// CPU time a process has used so far; `None` if it is gone.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields are
    // counted after the last ')'. utime and stime are fields 14 and 15.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ticks_to_duration(utime + stime))
}

/// Resident set size of a process in bytes; `None` if it is gone.
pub fn process_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = if per_second > 0 {
        per_second as u64
    } else {
        100
    };
    Duration::from_micros(ticks * 1_000_000 / per_second)
}

/// The three load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut parts = text.split_whitespace().map(|p| p.parse::<f64>().ok());
    Some([parts.next()??, parts.next()??, parts.next()??])
}

/// Machine-wide CPU ticks: (busy, idle, iowait).
fn machine_ticks() -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = *values.get(3)?;
    let iowait = *values.get(4)?;
    let busy: u64 = values.iter().take(8).sum::<u64>() - idle - iowait;
    Some((busy, idle, iowait))
}

/// Writes and flushes completed by the block device holding `dir`.
fn disk_counters(dir: &Path) -> Option<(u64, u64)> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let text = std::fs::read_to_string("/proc/diskstats").ok()?;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 11 {
            continue;
        }
        if fields[0].parse() == Ok(major) && fields[1].parse() == Ok(minor) {
            let writes = fields[7].parse().ok()?;
            // Flush requests are the 16th statistic (kernel 5.5 and later).
            let flushes = fields.get(18).and_then(|f| f.parse().ok()).unwrap_or(0);
            return Some((writes, flushes));
        }
    }
    None
}

/// Resource use over one measurement window.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Usage {
    /// CPU of the busiest server process, in % of one core.
    pub busiest_node_cpu_pct: Option<f64>,
    /// Which node that was (1-based).
    pub busiest_node: Option<usize>,
    /// CPU of all server processes together, in % of one core.
    pub nodes_cpu_pct: Option<f64>,
    /// CPU of the load generator itself, in % of one core.
    pub bench_cpu_pct: Option<f64>,
    /// Busy time of the whole machine, in % of all its cores.
    pub machine_busy_pct: Option<f64>,
    /// Time all cores spent idle waiting for I/O, in % of all cores.
    pub machine_iowait_pct: Option<f64>,
    /// Block-device writes and flushes per second on the data disk.
    pub disk_writes_per_s: Option<f64>,
    pub disk_flushes_per_s: Option<f64>,
}

/// A first snapshot of every counter [`Usage`] is computed from.
pub struct UsageProbe {
    at: Instant,
    nodes: Vec<(usize, u32, Option<Duration>)>,
    bench: Option<Duration>,
    machine: Option<(u64, u64, u64)>,
    disk: Option<(u64, u64)>,
    dir: std::path::PathBuf,
}

impl UsageProbe {
    /// Snapshots the server processes `nodes` (1-based index, pid), this
    /// process, the machine and the disk holding `dir`.
    pub fn start(nodes: &[(usize, u32)], dir: &Path) -> UsageProbe {
        UsageProbe {
            at: Instant::now(),
            nodes: nodes
                .iter()
                .map(|&(index, pid)| (index, pid, process_cpu(pid)))
                .collect(),
            bench: process_cpu(std::process::id()),
            machine: machine_ticks(),
            disk: disk_counters(dir),
            dir: dir.to_path_buf(),
        }
    }

    /// Takes the second snapshot and computes the rates.
    pub fn finish(self) -> Usage {
        let elapsed = self.at.elapsed().as_secs_f64().max(1e-6);
        let pct = |d: Duration| 100.0 * d.as_secs_f64() / elapsed;
        let mut per_node = BTreeMap::new();
        for (index, pid, before) in &self.nodes {
            if let (Some(before), Some(after)) = (before, process_cpu(*pid)) {
                per_node.insert(*index, pct(after.saturating_sub(*before)));
            }
        }
        let busiest = per_node
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, v)| (*i, *v));
        let bench = self
            .bench
            .zip(process_cpu(std::process::id()))
            .map(|(before, after)| pct(after.saturating_sub(before)));
        let (machine_busy_pct, machine_iowait_pct) = machine_split(self.machine);
        let disk = self.disk.zip(disk_counters(&self.dir));
        Usage {
            busiest_node_cpu_pct: busiest.map(|b| b.1),
            busiest_node: busiest.map(|b| b.0),
            nodes_cpu_pct: (!per_node.is_empty()).then(|| per_node.values().sum()),
            bench_cpu_pct: bench,
            machine_busy_pct,
            machine_iowait_pct,
            disk_writes_per_s: disk.map(|(a, b)| b.0.saturating_sub(a.0) as f64 / elapsed),
            disk_flushes_per_s: disk.map(|(a, b)| b.1.saturating_sub(a.1) as f64 / elapsed),
        }
    }
}

fn machine_split(before: Option<(u64, u64, u64)>) -> (Option<f64>, Option<f64>) {
    let Some((busy0, idle0, io0)) = before else {
        return (None, None);
    };
    let Some((busy1, idle1, io1)) = machine_ticks() else {
        return (None, None);
    };
    let busy = busy1.saturating_sub(busy0) as f64;
    let idle = idle1.saturating_sub(idle0) as f64;
    let io = io1.saturating_sub(io0) as f64;
    let total = busy + idle + io;
    if total <= 0.0 {
        return (None, None);
    }
    (Some(100.0 * busy / total), Some(100.0 * io / total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let pid = std::process::id();
        assert!(process_cpu(pid).is_some());
        assert!(process_rss_bytes(pid).unwrap_or(0) > 0);
    }
}
