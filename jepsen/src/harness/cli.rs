//! `latchkey-jepsen test`: flags, and the exit code of a run.
//!
//! Exit codes: 0 every checker says valid; 1 some checker says invalid;
//! 3 none invalid but some unknown; 2 the harness itself failed (could not
//! build the network, start the cluster, write the run directory, or was
//! interrupted).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::nemesis::{parse_nemesis, rates_within};
use super::run::{self, RunOptions};
use crate::check::Validity;

/// Workloads `--workload` accepts.
pub const WORKLOADS: [&str; 4] = ["lock-fenced", "register", "election", "lease"];

#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// `lock-fenced` (a fenced counter under one lock), `register`
    /// (read/write/cas on a few keys), `election` (campaign, proclaim,
    /// resign, observe) or `lease` (grant, keepalive, revoke, expiry).
    #[arg(long, default_value = "lock-fenced")]
    pub workload: String,
    /// Comma-separated faults: partition, kill, pause, clock, clock-rate,
    /// disk-stall, client-partition; `kind:variant` narrows one to a variant, and
    /// `a+b` applies faults together in one cycle; or `none`.
    #[arg(long, default_value = "partition,kill,pause")]
    pub nemesis: String,
    /// Seconds of workload (faults stop one quiet period before the end).
    #[arg(long, default_value_t = 60)]
    pub time_limit: u64,
    /// Client worker processes.
    #[arg(long, default_value_t = 10)]
    pub concurrency: u64,
    /// Seed of every random choice of the harness (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directory that receives one subdirectory per run.
    #[arg(long, default_value = "store")]
    pub store: PathBuf,
    /// The `latchkey` server binary (default: the one next to this program).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Start every node with `--unsafe-no-fencing`, to show that the checkers
    /// catch what fencing prevents.
    #[arg(long)]
    pub unsafe_no_fencing: bool,
    /// Start every node with `--unsafe-unconfirmed-renewals`: keepalives are
    /// answered without a confirmation round, so a leader cut off from its
    /// peers keeps renewing leases; the control run for `lease-overlap`.
    #[arg(long)]
    pub unsafe_unconfirmed_renewals: bool,
    /// The drift bound the nodes and the workers' clients are given.
    #[arg(long, default_value_t = 10_000)]
    pub max_clock_drift_ppm: u64,
    /// Comma-separated clock rates the `clock` and `clock-rate` faults draw
    /// from (default: four rates within the drift bound). Rates beyond the
    /// bound break the lease guarantee on purpose: `lease-overlap` is then
    /// expected to find overlaps.
    #[arg(long)]
    pub clock_rates: Option<String>,
    /// Lease TTL of the lock, election and lease workers (`2s`, `1500ms`, plain seconds).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Cluster size.
    #[arg(long, default_value_t = 5)]
    pub nodes: u64,
    /// A fault cycle (quiet gap, then fault) lasts one to two of these.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub fault_interval: Duration,
    /// Fault-free time at the end, before the final reads.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub quiet: Duration,
    /// `auto` (namespaces when possible, else loopback) or `loopback`.
    #[arg(long, default_value = "auto")]
    pub network: String,
    /// Remove namespaces and bridges left by runs that died, then exit.
    #[arg(long)]
    pub cleanup_stale: bool,
    /// Internal: run as a client worker with this JSON spec.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
}

/// Accepts `500ms`, `2s`, `1.5s`, `1m`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 500ms, 2s or 1m"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}; use ms, s or m"
            ))
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub fn run(args: TestArgs) -> ExitCode {
    if let Some(spec) = &args.worker {
        return super::worker::main(spec);
    }
    if args.cleanup_stale {
        let removed = super::net::cleanup_stale();
        for item in &removed {
            println!("removed {item}");
        }
        if removed.is_empty() {
            println!("nothing stale to remove");
        }
        return ExitCode::SUCCESS;
    }
    let options = match options(&args) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("latchkey-jepsen: error: {error}");
            return ExitCode::from(2);
        }
    };
    match run::run(options) {
        Ok(outcome) => {
            println!("{}", outcome.summary);
            match outcome.valid {
                Validity::Valid => ExitCode::SUCCESS,
                Validity::Invalid => ExitCode::from(1),
                Validity::Unknown => ExitCode::from(3),
            }
        }
        Err(error) => {
            eprintln!("latchkey-jepsen: error: {error}");
            ExitCode::from(2)
        }
    }
}

fn options(args: &TestArgs) -> Result<RunOptions, String> {
    if !WORKLOADS.contains(&args.workload.as_str()) {
        return Err(format!(
            "unknown workload {:?}; choose from {}",
            args.workload,
            WORKLOADS.join(", ")
        ));
    }
    let nemeses = parse_nemesis(&args.nemesis)?;
    if args.max_clock_drift_ppm > MAX_DRIFT_PPM {
        return Err(format!(
            "--max-clock-drift-ppm must be at most {MAX_DRIFT_PPM} (10 %), as the server requires"
        ));
    }
    let clock_rates = match &args.clock_rates {
        Some(text) => parse_rates(text)?,
        None => rates_within(args.max_clock_drift_ppm),
    };
    if !(1..=9).contains(&args.nodes) {
        return Err(format!("--nodes must be 1 to 9, not {}", args.nodes));
    }
    if !(1..=64).contains(&args.concurrency) {
        return Err(format!(
            "--concurrency must be 1 to 64, not {}",
            args.concurrency
        ));
    }
    if args.time_limit == 0 {
        return Err("--time-limit must be at least 1 second".into());
    }
    if args.fault_interval < Duration::from_millis(500) {
        return Err("--fault-interval must be at least 500ms".into());
    }
    let loopback_only = match args.network.as_str() {
        "auto" => false,
        "loopback" => true,
        other => return Err(format!("--network must be auto or loopback, not {other:?}")),
    };
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => default_binary()?,
    };
    if !binary.is_file() {
        return Err(format!(
            "server binary {} not found; build it with `cargo build --workspace --bins` or pass --binary",
            binary.display()
        ));
    }
    Ok(RunOptions {
        workload: args.workload.clone(),
        nemeses,
        time_limit: Duration::from_secs(args.time_limit),
        concurrency: args.concurrency,
        seed: args.seed.unwrap_or_else(rand::random),
        store: args.store.clone(),
        binary,
        unsafe_no_fencing: args.unsafe_no_fencing,
        unsafe_unconfirmed_renewals: args.unsafe_unconfirmed_renewals,
        max_clock_drift_ppm: args.max_clock_drift_ppm,
        clock_rates,
        ttl: args.ttl,
        nodes: args.nodes,
        fault_interval: args.fault_interval,
        quiet: args.quiet,
        loopback_only,
        command_line: command_line(),
    })
}

/// The server's largest `--max-clock-drift-ppm`.
const MAX_DRIFT_PPM: u64 = 100_000;
/// Clock rates the server's rate file accepts.
const RATE_RANGE: std::ops::RangeInclusive<f64> = 0.01..=100.0;

/// `1.5,2.0` → rates, each one the server accepts.
fn parse_rates(text: &str) -> Result<Vec<f64>, String> {
    let rates = text
        .split(',')
        .map(|part| {
            let rate: f64 = part
                .trim()
                .parse()
                .map_err(|_| format!("--clock-rates: {part:?} is not a number"))?;
            if RATE_RANGE.contains(&rate) {
                Ok(rate)
            } else {
                Err(format!("--clock-rates: {rate} is outside 0.01 to 100"))
            }
        })
        .collect::<Result<Vec<f64>, String>>()?;
    if rates.is_empty() {
        return Err("--clock-rates needs at least one rate".into());
    }
    Ok(rates)
}

/// `latchkey` next to this executable (same cargo target directory).
fn default_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
    let dir = me
        .parent()
        .ok_or_else(|| "my own binary has no directory".to_string())?;
    Ok(dir.join("latchkey"))
}

/// The command line, shell-quoted, for the report's "rerun" line.
fn command_line() -> String {
    std::env::args()
        .map(|arg| {
            if !arg.is_empty()
                && arg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@".contains(c))
            {
                arg
            } else {
                format!("'{}'", arg.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_or_plain_seconds() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn clock_rates_parse_and_rates_the_server_would_ignore_are_refused() {
        assert_eq!(parse_rates("1.5, 2"), Ok(vec![1.5, 2.0]));
        assert!(parse_rates("0").is_err());
        assert!(parse_rates("fast").is_err());
    }
}
