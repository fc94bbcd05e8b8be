//! Flags of `latchkey-bench`, and the options they resolve to.
//!
//! ```text
//! latchkey-bench compare [--quick] [--workloads a,b] [--systems latchkey,etcd]
//!                        [--duration D] [--warmup D] [--repeats N] [--rounds N]
//!                        [--json FILE]
//!                        [--latchkey PATH] [--etcd PATH] [--data-dir DIR]
//!                        [--etcd-endpoints leader|all] [--keepalive-ttl D]
//!                        [--keepalive-leases N] [--memory-leases N]
//!                        [--stability-duration D]
//! latchkey-bench floor [--data-dir DIR] [--samples N]
//! ```
//!
//! Durations accept `500ms`, `2s`, `1.5s`, `1m` or plain seconds.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::cluster::System;
use crate::workloads::{failover::FAILOVER_CLIENTS, EtcdEndpoints, Settings, Workload};

/// Full run: warm-up before each window.
pub const DEFAULT_WARMUP: Duration = Duration::from_secs(3);
/// Full run: length of each measurement window.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(15);
/// Full run: repeats of failover and holder-crash.
pub const DEFAULT_REPEATS: usize = 10;
/// `--quick`: warm-up, window and repeats.
pub const QUICK_WARMUP: Duration = Duration::from_secs(1);
pub const QUICK_DURATION: Duration = Duration::from_secs(3);
pub const QUICK_REPEATS: usize = 3;
/// Leases in `lease-keepalive`.
pub const KEEPALIVE_LEASES: usize = 10_000;
/// TTL asked for the crashing holder (latchkey's floor).
pub const HOLDER_TTL: Duration = Duration::from_secs(1);
/// Leases+locks in `memory` (full and `--quick`).
pub const MEMORY_LEASES: usize = 100_000;
pub const QUICK_MEMORY_LEASES: usize = 10_000;
/// Each window of `leader-stability` (full and `--quick`).
pub const STABILITY_DURATION: Duration = Duration::from_secs(600);
pub const QUICK_STABILITY_DURATION: Duration = Duration::from_secs(3);

#[derive(Parser, Debug)]
#[command(
    name = "latchkey-bench",
    about = "latchkey against etcd: same workloads, same run, same machine"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs the workloads on latchkey and etcd in turn and prints the table.
    Compare(Box<CompareArgs>),
    /// Measures only the floor: one and two synced RocksDB writes, and one
    /// synced overwrite of a preallocated file.
    Floor(FloorArgs),
}

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// A few seconds per workload instead of the full run.
    #[arg(long)]
    pub quick: bool,
    /// Workloads to run, comma-separated [default: all, in order:
    /// lock-1c,lock-nc,lock-hot,fenced-write,lease-keepalive,failover,holder-crash,memory,
    /// leader-stability].
    #[arg(long, value_delimiter = ',')]
    pub workloads: Option<Vec<String>>,
    /// Systems to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "latchkey,etcd")]
    pub systems: Vec<String>,
    /// Measurement window of each workload [default: 15s, --quick 3s].
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Warm-up before each window [default: 3s, --quick 1s].
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// Repeats of failover and holder-crash [default: 10, --quick 3].
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Runs of each throughput and latency workload (lock-1c, lock-nc,
    /// lock-hot, fenced-write, lease-keepalive) per system, the systems
    /// alternating; the table shows the median round and every round's ratio.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Also write the whole report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// The latchkey binary [default: `latchkey` next to this program].
    #[arg(long, value_name = "PATH")]
    pub latchkey: Option<PathBuf>,
    /// The etcd binary [default: `etcd` on PATH].
    #[arg(long, value_name = "PATH")]
    pub etcd: Option<PathBuf>,
    /// Where clusters and the floor keep their data: the disk under test
    /// [default: a new directory in $TMPDIR].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Endpoints etcd clients are given: the leader's (etcd's best case,
    /// as latchkey's client also talks to the leader) or all five.
    #[arg(long, value_enum, default_value = "leader")]
    pub etcd_endpoints: EtcdEndpointsArg,
    /// Leases in lease-keepalive.
    #[arg(long, default_value_t = KEEPALIVE_LEASES)]
    pub keepalive_leases: usize,
    /// TTL asked for in lease-keepalive; renewals go every third of it
    /// (etcd raises anything below 2s to 2s).
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub keepalive_ttl: Duration,
    /// Leases+locks in memory [default: 100000, --quick 10000].
    #[arg(long)]
    pub memory_leases: Option<usize>,
    /// Each of leader-stability's two windows, idle and loaded
    /// [default: 10m, --quick 3s].
    #[arg(long, value_parser = parse_duration)]
    pub stability_duration: Option<Duration>,
}

#[derive(clap::Args, Debug)]
pub struct FloorArgs {
    /// Directory on the disk to measure [default: $TMPDIR].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Samples of each kind.
    #[arg(long, default_value_t = crate::floor::DEFAULT_SAMPLES)]
    pub samples: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EtcdEndpointsArg {
    All,
    Leader,
}

/// What `compare` runs, resolved from the flags.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub workloads: Vec<Workload>,
    pub systems: Vec<System>,
    pub settings: Settings,
    pub json: Option<PathBuf>,
    pub latchkey: Option<PathBuf>,
    pub etcd: Option<PathBuf>,
    /// The disk under test, if given (else `$TMPDIR`).
    pub data_parent: Option<PathBuf>,
}

impl CompareArgs {
    pub fn resolve(self) -> Result<CompareOptions, String> {
        let workloads = parse_workloads(self.workloads.as_deref())?;
        let systems = parse_systems(&self.systems)?;
        if systems.is_empty() || workloads.is_empty() {
            return Err("nothing to run: give at least one system and one workload".into());
        }
        let quick = self.quick;
        let pick =
            |given: Option<Duration>, full, fast| given.unwrap_or(if quick { fast } else { full });
        let repeats = self.repeats.unwrap_or(if quick {
            QUICK_REPEATS
        } else {
            DEFAULT_REPEATS
        });
        if repeats == 0 || self.rounds == 0 || self.keepalive_leases == 0 {
            return Err("--repeats, --rounds and --keepalive-leases must be at least 1".into());
        }
        if self.keepalive_ttl < std::time::Duration::from_millis(300) {
            return Err("--keepalive-ttl must be at least 300ms".into());
        }
        let settings = Settings {
            quick,
            warmup: pick(self.warmup, DEFAULT_WARMUP, QUICK_WARMUP),
            duration: pick(self.duration, DEFAULT_DURATION, QUICK_DURATION),
            repeats,
            rounds: self.rounds,
            lock_nc_clients: vec![16, 64, 256],
            lock_hot_clients: vec![8, 64],
            fenced_write_clients: vec![1, 16],
            keepalive_leases: self.keepalive_leases,
            keepalive_ttl: self.keepalive_ttl,
            holder_ttl: HOLDER_TTL,
            memory_leases: self.memory_leases.unwrap_or(if quick {
                QUICK_MEMORY_LEASES
            } else {
                MEMORY_LEASES
            }),
            failover_clients: FAILOVER_CLIENTS,
            stability_duration: pick(
                self.stability_duration,
                STABILITY_DURATION,
                QUICK_STABILITY_DURATION,
            ),
            etcd_endpoints: match self.etcd_endpoints {
                EtcdEndpointsArg::All => EtcdEndpoints::All,
                EtcdEndpointsArg::Leader => EtcdEndpoints::Leader,
            },
            data_dir: PathBuf::new(),
        };
        if settings.duration.is_zero() || settings.stability_duration.is_zero() {
            return Err("--duration and --stability-duration must be above zero".into());
        }
        Ok(CompareOptions {
            workloads,
            systems,
            settings,
            json: self.json,
            latchkey: self.latchkey,
            etcd: self.etcd,
            data_parent: self.data_dir,
        })
    }
}

/// The named workloads in the order given; all of them when none is named.
fn parse_workloads(names: Option<&[String]>) -> Result<Vec<Workload>, String> {
    let Some(names) = names else {
        return Ok(Workload::ALL.to_vec());
    };
    names
        .iter()
        .map(|n| {
            Workload::parse(n.trim()).ok_or_else(|| {
                let all: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
                format!("unknown workload {n:?}; known: {}", all.join(", "))
            })
        })
        .collect()
}

fn parse_systems(names: &[String]) -> Result<Vec<System>, String> {
    names
        .iter()
        .map(|s| match s.trim() {
            "latchkey" => Ok(System::Latchkey),
            "etcd" => Ok(System::Etcd),
            other => Err(format!("unknown system {other:?}; known: latchkey, etcd")),
        })
        .collect()
}

/// `500ms`, `2s`, `1.5s`, `1m`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 2s, 1m)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(args: &[&str]) -> Result<CompareOptions, String> {
        let mut all = vec!["latchkey-bench", "compare"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Compare(args) => (*args).resolve(),
            Command::Floor(_) => Err("not compare".into()),
        }
    }

    #[test]
    fn durations_take_units_and_plain_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn quick_shortens_the_run_and_explicit_flags_win() {
        let options = resolve(&["--quick", "--duration", "5s"]).expect("valid flags");
        assert!(options.settings.quick);
        assert_eq!(options.settings.duration, Duration::from_secs(5));
        assert_eq!(options.settings.warmup, QUICK_WARMUP);
        assert_eq!(options.settings.repeats, QUICK_REPEATS);
        assert_eq!(options.workloads, Workload::ALL.to_vec());
        assert_eq!(options.systems, vec![System::Latchkey, System::Etcd]);
        assert_eq!(
            options.settings.stability_duration,
            QUICK_STABILITY_DURATION
        );
    }

    #[test]
    fn leader_stability_watches_ten_minutes_unless_told() {
        let full = resolve(&["--workloads", "leader-stability"]).expect("valid flags");
        assert_eq!(full.workloads, vec![Workload::LeaderStability]);
        assert_eq!(full.settings.stability_duration, Duration::from_secs(600));
        let short = resolve(&["--stability-duration", "30s"]).expect("valid flags");
        assert_eq!(short.settings.stability_duration, Duration::from_secs(30));
        let error = resolve(&["--stability-duration", "0s"]).expect_err("zero window");
        assert!(error.contains("--stability-duration"), "{error}");
    }

    #[test]
    fn workload_and_system_lists_are_parsed_and_checked() {
        let options = resolve(&["--workloads", "lock-hot,failover", "--systems", "latchkey"])
            .expect("valid flags");
        assert_eq!(
            options.workloads,
            vec![Workload::LockHot, Workload::Failover]
        );
        assert_eq!(options.systems, vec![System::Latchkey]);
        assert!(resolve(&["--workloads", "lock-warm"]).is_err());
        assert!(resolve(&["--systems", "zookeeper"]).is_err());
    }

    #[test]
    fn rounds_default_to_one_and_zero_is_refused() {
        assert_eq!(resolve(&[]).expect("valid flags").settings.rounds, 1);
        let three = resolve(&["--rounds", "3", "--quick"]).expect("valid flags");
        assert_eq!(three.settings.rounds, 3);
        let error = resolve(&["--rounds", "0"]).expect_err("zero rounds");
        assert!(error.contains("--rounds"), "{error}");
        assert!(resolve(&["--rounds", "many"]).is_err());
    }
}
