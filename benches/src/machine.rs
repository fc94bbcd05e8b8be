//! The machine a run happened on, as the report prints it: CPU model and
//! cores, memory, the disk and filesystem of the data directory, the
//! kernel, and the load average when the run started and ended.
//!
//! Every field is read from `/proc` and `/sys`; what cannot be read is
//! reported as "unknown" rather than guessed.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

/// What the report says about the machine.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    /// Mount point, device, filesystem type and mount options of the data dir.
    pub data_dir: String,
    pub filesystem: String,
    /// Model and whether the device is rotational, from `/sys/block`.
    pub disk: String,
    pub kernel: String,
}

impl Machine {
    /// Describes this machine and the filesystem that holds `data_dir`.
    pub fn describe(data_dir: &Path) -> Machine {
        Machine {
            cpu_model: cpu_model().unwrap_or_else(unknown),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib: memory_kib().map_or(0.0, |kib| kib as f64 / (1024.0 * 1024.0)),
            data_dir: data_dir.display().to_string(),
            filesystem: filesystem_of(data_dir).unwrap_or_else(unknown),
            disk: disk_of(data_dir).unwrap_or_else(unknown),
            kernel: kernel().unwrap_or_else(unknown),
        }
    }

    /// The lines the report prints.
    pub fn lines(&self) -> Vec<String> {
        vec![
            format!("cpu:        {} ({} cores)", self.cpu_model, self.cores),
            format!("memory:     {:.1} GiB", self.memory_gib),
            format!("data dir:   {}", self.data_dir),
            format!("filesystem: {}", self.filesystem),
            format!("disk:       {}", self.disk),
            format!("kernel:     {}", self.kernel),
        ]
    }
}

fn unknown() -> String {
    "unknown".into()
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

fn memory_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn kernel() -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let version = std::fs::read_to_string("/proc/sys/kernel/version").unwrap_or_default();
    Some(format!("Linux {} {}", release.trim(), version.trim()))
}

/// The mount entry with the longest mount point that contains `dir`.
fn filesystem_of(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let best = mounts
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 4 && dir.starts_with(fields[1])).then_some(fields)
        })
        .max_by_key(|fields| fields[1].len())?;
    Some(format!(
        "{} on {} ({}, {})",
        best[0], best[1], best[2], best[3]
    ))
}

/// The block device of `dir`: name, model, rotational, scheduler.
fn disk_of(dir: &Path) -> Option<String> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    // A partition's attributes live on its parent disk.
    let disk = if sys.join("partition").exists() {
        sys.parent()?.to_path_buf()
    } else {
        sys
    };
    let read = |name: &str| {
        std::fs::read_to_string(disk.join(name))
            .map(|s| s.trim().to_string())
            .ok()
    };
    let name = disk.file_name()?.to_string_lossy().to_string();
    let model = read("device/model").unwrap_or_else(|| "model unknown".into());
    let rotational = match read("queue/rotational").as_deref() {
        Some("0") => "non-rotational",
        Some("1") => "rotational",
        _ => "rotational unknown",
    };
    let cache = read("queue/write_cache").unwrap_or_else(|| "cache unknown".into());
    Some(format!(
        "/dev/{name} ({model}, {rotational}, write cache: {cache})"
    ))
}
