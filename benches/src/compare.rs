//! One `compare` run, start to finish.
//!
//! 1. Find the binaries: latchkey (`--latchkey`, else the `latchkey` next
//!    to this program; a debug build is warned about loudly) and etcd
//!    (`--etcd`, else `etcd` on `PATH`; if there is none, the etcd side is
//!    skipped with one line).
//! 2. Make the run directory (`--data-dir`, else `$TMPDIR`), describe the
//!    machine and read the load average.
//! 3. Measure the floor in the run directory.
//! 4. For each workload, each system in turn, on a cluster started for it
//!    and stopped after it. The order of the two systems alternates from one
//!    workload to the next, so neither always runs first (on a warmer or
//!    cooler machine). A workload that fails on one system is reported
//!    and the run goes on. With `--rounds N` the throughput and latency
//!    workloads run N times on each system before the next workload, the
//!    order alternating from round to round, and the table reads the median
//!    round ([`crate::rounds`]).
//! 5. Measure the floor again (it moves with whatever else uses the disk),
//!    read the load average again, judge the targets against the first
//!    floor, print the report and write the JSON file if asked.

use std::path::{Path, PathBuf};

use tokio::time::Instant;

use crate::cli::CompareOptions;
use crate::cluster::{Binaries, Cluster, System};
use crate::floor::{self, QUICK_SAMPLES};
use crate::machine::Machine;
use crate::procfs::load_average;
use crate::report::Report;
use crate::rounds;
use crate::workloads::{self, Measurement, Run, Workload};

/// Runs `compare` and returns the report (already printed).
pub async fn compare(mut options: CompareOptions, command: String) -> Result<Report, String> {
    let started = Instant::now();
    let binaries = find_binaries(&options)?;
    if binaries.etcd.is_none() {
        options.systems.retain(|s| *s != System::Etcd);
    }
    if options.systems.is_empty() {
        return Err("no system left to run".into());
    }
    let run_dir = RunDir::create(options.data_parent.as_deref())?;
    options.settings.data_dir = run_dir.path.clone();
    let machine = Machine::describe(&run_dir.path);
    let load_before = load_average();
    say(format!("run directory {}", run_dir.path.display()));
    let mut problems = Vec::new();
    let floor = match measure_floor(&run_dir.path, options.settings.quick).await {
        Ok(floor) => Some(floor),
        Err(e) => {
            problems.push(format!("floor not measured: {e}"));
            None
        }
    };
    let mut every_round = Vec::new();
    for (index, workload) in options.workloads.iter().enumerate() {
        let rounds = if rounds::takes_rounds(*workload) {
            options.settings.rounds
        } else {
            1
        };
        for round in 1..=rounds {
            for system in turn_order(&options.systems, index + round - 1) {
                if rounds > 1 {
                    say(format!("{}: round {round} of {rounds}", workload.name()));
                }
                match run_one(*workload, system, &binaries, &options).await {
                    Ok(found) => {
                        for mut m in found {
                            say(summary_line(&m));
                            m.round = round;
                            every_round.push(m);
                        }
                    }
                    Err(e) => {
                        let of_round = if rounds > 1 {
                            format!(" (round {round})")
                        } else {
                            String::new()
                        };
                        let line = format!("{} on {system}{of_round}: {e}", workload.name());
                        say(format!("FAILED {line}"));
                        problems.push(line);
                    }
                }
            }
        }
    }
    let measurements = rounds::combine(&every_round);
    let spreads = rounds::spreads(&every_round);
    // The floor again: on a shared or virtual disk it moves with whatever
    // else syncs at the time, and the report should show by how much.
    let floor_after = measure_floor(&run_dir.path, options.settings.quick)
        .await
        .map_err(|e| problems.push(format!("floor not measured at the end: {e}")))
        .ok();
    let targets = crate::targets::evaluate(&measurements, floor.as_ref());
    let report = Report {
        command,
        machine,
        load_average_before: load_before,
        load_average_after: load_average(),
        latchkey_binary: describe_latchkey(&binaries.latchkey),
        etcd_binary: binaries.etcd.as_ref().map(|p| p.display().to_string()),
        settings: options.settings.clone(),
        floor,
        floor_after,
        measurements,
        spreads,
        problems,
        targets,
        elapsed_seconds: started.elapsed().as_secs_f64(),
    };
    run_dir.remove();
    Ok(report)
}

/// Measures the floor in `dir` off the async workers, and prints it.
async fn measure_floor(dir: &Path, quick: bool) -> Result<floor::Floor, String> {
    let samples = if quick {
        QUICK_SAMPLES
    } else {
        floor::DEFAULT_SAMPLES
    };
    let dir = dir.to_path_buf();
    let floor = tokio::task::spawn_blocking(move || floor::measure(&dir, samples))
        .await
        .map_err(|e| e.to_string())??;
    for line in floor.lines() {
        say(format!("floor: {line}"));
    }
    Ok(floor)
}

/// latchkey first on even turns, etcd first on odd ones; a workload's
/// turn is its index plus its round, so rounds alternate too.
fn turn_order(systems: &[System], turn: usize) -> Vec<System> {
    let mut order = systems.to_vec();
    if turn % 2 == 1 {
        order.reverse();
    }
    order
}

async fn run_one(
    workload: Workload,
    system: System,
    binaries: &Binaries,
    options: &CompareOptions,
) -> Result<Vec<Measurement>, String> {
    say(format!("{}: starting a {system} cluster", workload.name()));
    let mut cluster = Cluster::start(system, binaries, &options.settings.data_dir).await?;
    let result = {
        let mut run = Run {
            system,
            cluster: &mut cluster,
            settings: &options.settings,
        };
        workloads::run(workload, &mut run).await
    };
    // Stopping waits for the processes; keep it off the async workers.
    tokio::task::spawn_blocking(move || cluster.stop())
        .await
        .map_err(|e| e.to_string())?;
    result
}

fn find_binaries(options: &CompareOptions) -> Result<Binaries, String> {
    let latchkey = match &options.latchkey {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("latchkey"),
    };
    if !latchkey.is_file() {
        return Err(format!(
            "no latchkey binary at {} (build it with `cargo build --workspace --release --bins`, or pass --latchkey PATH)",
            latchkey.display()
        ));
    }
    if is_debug_build(&latchkey) {
        eprintln!("latchkey-bench: WARNING: {} looks like a DEBUG build; its numbers mean nothing. Build with --release.", latchkey.display());
    }
    let etcd = if options.systems.contains(&System::Etcd) {
        let found = options.etcd.clone().or_else(|| on_path("etcd"));
        if found.is_none() {
            eprintln!("latchkey-bench: etcd not found (install etcd-server or pass --etcd PATH); skipping the etcd side");
        }
        found
    } else {
        None
    };
    Ok(Binaries { latchkey, etcd })
}

/// Whether the binary sits in a cargo `debug` profile directory.
pub fn is_debug_build(path: &Path) -> bool {
    path.parent()
        .and_then(|p| p.file_name())
        .is_some_and(|name| name == "debug")
}

fn describe_latchkey(path: &Path) -> String {
    let profile = if is_debug_build(path) {
        " (DEBUG build)"
    } else {
        ""
    };
    format!("{}{profile}", path.display())
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn say(line: impl AsRef<str>) {
    eprintln!("latchkey-bench: {}", line.as_ref());
}

fn summary_line(m: &Measurement) -> String {
    let metric = m
        .metric
        .as_ref()
        .map_or(String::new(), |x| format!("{:.0} {} ", x.value, x.unit));
    let latency = m.latency.map_or(String::new(), |l| {
        format!("p50 {:.2} ms, p99 {:.2} ms", l.p50_ms, l.p99_ms)
    });
    let errors = if m.errors > 0 {
        format!(" ({} errors)", m.errors)
    } else {
        String::new()
    };
    format!(
        "{} {} [{}]: {metric}{latency}{errors}",
        m.workload.name(),
        m.variant,
        m.system
    )
}

/// The run's directory: created under the given parent or `$TMPDIR`,
/// removed at the end (and on interrupt, through the registry).
struct RunDir {
    path: PathBuf,
}

impl RunDir {
    fn create(parent: Option<&Path>) -> Result<RunDir, String> {
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        std::fs::create_dir_all(&parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("latchkey-bench-")
            .tempdir_in(&parent)
            .map_err(|e| format!("cannot create a directory in {}: {e}", parent.display()))?;
        let path = dir.keep();
        crate::processes::register_dir(path.clone());
        Ok(RunDir { path })
    }

    fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.path);
        crate::processes::unregister_dir(&self.path);
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Also on error and panic paths; removing twice is harmless.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
