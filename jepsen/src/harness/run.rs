//! One test run, start to finish.
//!
//! 1. Make `STORE/<run>/`, start the history (`history.jsonl`).
//! 2. Build the network (namespaces, or loopback with a note), start the
//!    nodes, wait for a leader.
//! 3. Start the observer (status polling), the client workers and the
//!    nemesis. Faults run for `time limit − quiet`; the nemesis then heals
//!    everything, and the workers carry on through the quiet period.
//! 4. Stop the workers, make the final reads (a fresh process each), stop
//!    the observer, tear the cluster and the network down.
//! 5. Check the history (`check::check_history`), write `results.json`
//!    and `index.html`.
//!
//! SIGINT or SIGTERM during steps 2–4 skips to the teardown and ends the
//! run with a harness error; teardown also happens on early errors and, via
//! the `Drop` of [`Cluster`] and
//! [`Network`], on a panic.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use latchkey_client::Client;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::cluster::{find_faketime_lib, Cluster, NodeOptions};
use super::nemesis::{FaultKind, FaultMix, Nemesis, NemesisOptions, NemesisSummary};
use super::net::Network;
use super::observer::{self, Views};
use super::recorder::{Event, Recorder};
use super::report;
use super::worker::{error_kind, WorkerSpec};
use super::workers::WorkerPool;
use crate::check::{check_history, CheckOptions, Results, Validity};
use crate::history::{OpType, Process};

/// How long the cluster gets to elect its first leader.
const FIRST_LEADER_WAIT: Duration = Duration::from_secs(30);
/// Names the lock workload uses.
const LOCK_NAME: &str = "jepsen-lock";
const COUNTER_KEY: &str = "jepsen-counter";
/// The election of the election workload.
const ELECTION_NAME: &str = "jepsen-election";
/// Keys of the register workload.
const REGISTER_KEYS: usize = 5;
/// Client timeouts of workers and final reads.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_TIMEOUT: Duration = Duration::from_secs(5);
const FINAL_READ_RETRY_TIMEOUT: Duration = Duration::from_secs(15);

/// Everything a run needs, resolved from the flags.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub workload: String,
    pub nemeses: Vec<FaultMix>,
    pub time_limit: Duration,
    pub concurrency: u64,
    pub seed: u64,
    pub store: PathBuf,
    pub binary: PathBuf,
    pub unsafe_no_fencing: bool,
    pub unsafe_unconfirmed_renewals: bool,
    pub max_clock_drift_ppm: u64,
    /// Rates the clock faults draw from.
    pub clock_rates: Vec<f64>,
    pub ttl: Duration,
    pub nodes: u64,
    pub fault_interval: Duration,
    pub quiet: Duration,
    pub loopback_only: bool,
    pub command_line: String,
}

impl RunOptions {
    /// Whether some clock rate lies outside `[1 − ρ, 1 + ρ]`.
    pub fn rates_beyond_bound(&self) -> bool {
        let rho = self.max_clock_drift_ppm as f64 / 1e6;
        let uses_rates = self
            .nemeses
            .iter()
            .any(|m| m.has(FaultKind::Clock) || m.has(FaultKind::ClockRate));
        // A hair of slack for rates written as decimals (1.01 vs 1 + 0.01).
        let slack = 1e-9;
        uses_rates
            && self
                .clock_rates
                .iter()
                .any(|r| (r - 1.0).abs() > rho + slack)
    }
}

/// What the caller prints and how it exits.
pub struct RunOutcome {
    pub valid: Validity,
    pub summary: String,
}

/// Facts about the run, stored in `results.json` under `run`.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub run_dir: PathBuf,
    pub workload: String,
    pub seed: u64,
    pub rerun: String,
    pub network: String,
    pub network_note: Option<String>,
    pub nodes: u64,
    pub concurrency: u64,
    pub time_limit_s: f64,
    pub ttl_ms: u64,
    pub unsafe_no_fencing: bool,
    #[serde(default)]
    pub unsafe_unconfirmed_renewals: bool,
    pub max_clock_drift_ppm: u64,
    pub clock_rates: Vec<f64>,
    /// Some clock rate breaks the drift bound: overlaps are expected.
    pub clock_rates_beyond_bound: bool,
    /// The `--nemesis` mixes, as written.
    pub nemeses: Vec<String>,
    pub nemesis: NemesisSummary,
    pub node_crashes: Vec<String>,
    pub ops: usize,
    pub duration_s: f64,
    pub check_s: f64,
}

pub fn run(options: RunOptions) -> Result<RunOutcome, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    runtime.block_on(run_async(options))
}

async fn run_async(options: RunOptions) -> Result<RunOutcome, String> {
    let run_dir = make_run_dir(&options)?;
    eprintln!(
        "latchkey-jepsen: run {} (seed {})",
        run_dir.display(),
        options.seed
    );
    let recorder = Recorder::create(&run_dir.join("history.jsonl"))
        .map_err(|e| format!("cannot create the history: {e}"))?;
    let started = Instant::now();
    let (network, network_note) = if options.loopback_only {
        (
            Network::create_loopback(options.nodes, options.concurrency).await?,
            Some("--network loopback".to_string()),
        )
    } else {
        Network::create(options.nodes, options.concurrency).await?
    };
    let network = Arc::new(network);
    if let Some(note) = &network_note {
        eprintln!("latchkey-jepsen: using loopback with in-process proxies: {note}");
    }
    let faketime_lib = find_faketime_lib();
    let node_options = NodeOptions {
        binary: options.binary.clone(),
        unsafe_no_fencing: options.unsafe_no_fencing,
        unsafe_unconfirmed_renewals: options.unsafe_unconfirmed_renewals,
        max_clock_drift_ppm: options.max_clock_drift_ppm,
        clock_rate_files: options.nemeses.iter().any(|m| m.has(FaultKind::ClockRate)),
        disk_stall_files: options.nemeses.iter().any(|m| m.has(FaultKind::DiskStall)),
        faketime_lib: faketime_lib.clone(),
    };
    if options.rates_beyond_bound() {
        eprintln!(
            "latchkey-jepsen: clock rates {:?} break the drift bound of {} ppm: lease-overlap is expected to find overlaps",
            options.clock_rates, options.max_clock_drift_ppm
        );
    }
    let cluster = Cluster::new(node_options, network.nodes(), &run_dir)?;
    let cluster = Arc::new(Mutex::new(cluster));
    let views = Views::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let context = Phase {
        options: &options,
        run_dir: &run_dir,
        recorder: &recorder,
        cluster: &cluster,
        network: &network,
        views: &views,
        clock_available: faketime_lib.is_some(),
    };
    let observer_task = tokio::spawn(observer::run(
        cluster.clone(),
        recorder.clone(),
        views.clone(),
        stop_rx,
    ));
    let mut interrupts = Interrupts::install()?;
    let phase = tokio::select! {
        result = context.cluster_phase() => result,
        signal = interrupts.next() => Err(format!("interrupted by {signal}; cleaned up")),
    };
    let _ = stop_tx.send(true);
    let _ = observer_task.await;
    cluster.lock().await.teardown().await;
    network.teardown();
    let written = recorder.finish();
    let nemesis_summary = phase?;
    written.map_err(|e| format!("cannot write the history: {e}"))?;
    let duration = started.elapsed();

    let ops = recorder.ops();
    let check_started = Instant::now();
    let checked =
        tokio::task::spawn_blocking(move || check_history(&ops, &CheckOptions::default()));
    let results = tokio::select! {
        results = checked => results.map_err(|e| format!("the checkers panicked: {e}"))?,
        signal = interrupts.next() => return Err(format!("interrupted by {signal} while checking")),
    };
    let crashes = views
        .crashes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(node, how)| format!("n{node}: {how}"))
        .collect();
    let info = RunInfo {
        run_dir: run_dir.clone(),
        workload: options.workload.clone(),
        seed: options.seed,
        rerun: rerun_line(&options),
        network: network.kind().to_string(),
        network_note,
        nodes: options.nodes,
        concurrency: options.concurrency,
        time_limit_s: options.time_limit.as_secs_f64(),
        ttl_ms: options.ttl.as_millis() as u64,
        unsafe_no_fencing: options.unsafe_no_fencing,
        unsafe_unconfirmed_renewals: options.unsafe_unconfirmed_renewals,
        max_clock_drift_ppm: options.max_clock_drift_ppm,
        clock_rates: options.clock_rates.clone(),
        clock_rates_beyond_bound: options.rates_beyond_bound(),
        nemeses: options.nemeses.iter().map(ToString::to_string).collect(),
        nemesis: nemesis_summary,
        node_crashes: crashes,
        ops: recorder.ops().len(),
        duration_s: duration.as_secs_f64(),
        check_s: check_started.elapsed().as_secs_f64(),
    };
    write_outputs(&run_dir, &recorder, &results, &info)
}

/// Borrowed state of the cluster phase.
struct Phase<'a> {
    options: &'a RunOptions,
    run_dir: &'a Path,
    recorder: &'a Recorder,
    cluster: &'a Arc<Mutex<Cluster>>,
    network: &'a Arc<Network>,
    views: &'a Views,
    clock_available: bool,
}

impl Phase<'_> {
    /// Steps 2–4 of the module docs, up to (not including) the teardown.
    async fn cluster_phase(&self) -> Result<NemesisSummary, String> {
        let options = self.options;
        self.cluster.lock().await.start_all()?;
        let leader = observer::wait_for_leader(self.cluster, FIRST_LEADER_WAIT).await?;
        eprintln!(
            "latchkey-jepsen: cluster up, leader n{leader}; running for {:?}",
            options.time_limit
        );
        let endpoints = self.cluster.lock().await.endpoints();
        let client_pause = options.ttl * 2 + Duration::from_millis(500);
        let specs = worker_specs(options, self.network, self.recorder.start_monotonic_ns());
        let workers = Arc::new(WorkerPool::spawn(
            specs,
            self.recorder,
            self.run_dir,
            client_pause,
            self.network.clone(),
        )?);
        let start = Instant::now();
        let faults_until = start + options.time_limit.saturating_sub(options.quiet);
        let nemesis = Nemesis::new(
            self.cluster.clone(),
            self.network.clone(),
            workers.clone(),
            self.recorder.clone(),
            self.views.clone(),
            NemesisOptions {
                mixes: options.nemeses.clone(),
                seed: options.seed,
                interval: options.fault_interval,
                fenced_clients: options.workload == "lock-fenced",
                holders: matches!(options.workload.as_str(), "lock-fenced" | "election"),
                clock_available: self.clock_available,
                clock_rates: options.clock_rates.clone(),
            },
        );
        let nemesis_result = nemesis.run(faults_until).await;
        tokio::time::sleep_until(start + options.time_limit).await;
        workers
            .wait_unpaused(client_pause + Duration::from_secs(1))
            .await;
        workers.finish().await;
        let summary = nemesis_result?;
        self.final_reads(&endpoints, &workers).await;
        Ok(summary)
    }

    /// One linearizable read of every key the workload wrote, each by a
    /// fresh process, after the faults are healed.
    async fn final_reads(&self, endpoints: &[String], workers: &WorkerPool) {
        let keys: Vec<String> = match self.options.workload.as_str() {
            "lock-fenced" => vec![COUNTER_KEY.to_string()],
            "register" => register_keys(),
            // Elections and leases write no keys.
            _ => Vec::new(),
        };
        let client = Client::builder(endpoints.to_vec())
            .call_timeout(CALL_TIMEOUT)
            .retry_timeout(FINAL_READ_RETRY_TIMEOUT)
            .connect()
            .await;
        for key in keys {
            let process = Process::Client(workers.processes.fresh());
            let mut invoke = Event::new(process, OpType::Invoke, "read", Value::Null);
            invoke.key = Some(key.clone());
            self.recorder.record(invoke);
            let answer = match &client {
                Ok(client) => client.get(key.as_str()).await,
                Err(error) => Err(error.clone()),
            };
            let mut done = match answer {
                Ok(found) => {
                    let value = found
                        .map(|kv| register_value(&kv.value))
                        .unwrap_or(Value::Null);
                    Event::new(process, OpType::Ok, "read", json!({"value": value}))
                }
                Err(error) => {
                    let mut event = Event::new(process, OpType::Fail, "read", Value::Null);
                    event.error = Some(error.to_string());
                    debug_assert_ne!(error_kind(&error), OpType::Ok);
                    event
                }
            };
            done.key = Some(key);
            self.recorder.record(done);
        }
    }
}

fn register_value(bytes: &[u8]) -> Value {
    let text = String::from_utf8_lossy(bytes);
    match text.parse::<i64>() {
        Ok(n) => json!(n),
        Err(_) => json!(text),
    }
}

fn register_keys() -> Vec<String> {
    (0..REGISTER_KEYS).map(|i| format!("jepsen-r{i}")).collect()
}

fn worker_specs(
    options: &RunOptions,
    network: &Network,
    run_start_monotonic_ns: u64,
) -> Vec<WorkerSpec> {
    (0..options.concurrency)
        .map(|slot| WorkerSpec {
            slot,
            workload: options.workload.clone(),
            endpoints: network.worker_endpoints(slot),
            ttl_ms: options.ttl.as_millis() as u64,
            // Each worker its own stream, all from the run's seed.
            seed: options.seed ^ (slot + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            lock: LOCK_NAME.into(),
            counter_key: COUNTER_KEY.into(),
            register_keys: register_keys(),
            election: ELECTION_NAME.into(),
            observer: options.workload == "election" && is_observer(slot, options.concurrency),
            call_timeout_ms: CALL_TIMEOUT.as_millis() as u64,
            retry_timeout_ms: RETRY_TIMEOUT.as_millis() as u64,
            max_clock_drift_ppm: options.max_clock_drift_ppm,
            run_start_monotonic_ns,
        })
        .collect()
}

/// Election observers: slot 0, and slot 1 too from five workers on; a
/// single worker campaigns rather than watch an election nobody runs.
fn is_observer(slot: u64, concurrency: u64) -> bool {
    let observers = match concurrency {
        0 | 1 => 0,
        2..=4 => 1,
        _ => 2,
    };
    slot < observers
}

/// SIGINT and SIGTERM.
struct Interrupts {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn install() -> Result<Interrupts, String> {
        let int =
            signal(SignalKind::interrupt()).map_err(|e| format!("cannot catch SIGINT: {e}"))?;
        let term =
            signal(SignalKind::terminate()).map_err(|e| format!("cannot catch SIGTERM: {e}"))?;
        Ok(Interrupts { int, term })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

fn make_run_dir(options: &RunOptions) -> Result<PathBuf, String> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = format!(
        "{}-{}-s{}",
        options.workload,
        utc_stamp(seconds),
        options.seed
    );
    let dir = options.store.join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let latest = options.store.join("latest");
    let _ = std::fs::remove_file(&latest);
    if let Some(name) = dir.file_name() {
        // Best effort: a convenience link only.
        let _ = std::os::unix::fs::symlink(name, &latest);
    }
    Ok(dir)
}

/// `20251128T003512Z` for a Unix time.
fn utc_stamp(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rest = seconds % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The command that reruns this run, seed included.
fn rerun_line(options: &RunOptions) -> String {
    if options.command_line.contains("--seed") {
        options.command_line.clone()
    } else {
        format!("{} --seed {}", options.command_line, options.seed)
    }
}

fn write_outputs(
    run_dir: &Path,
    recorder: &Recorder,
    results: &Results,
    info: &RunInfo,
) -> Result<RunOutcome, String> {
    let mut document = serde_json::to_value(results).map_err(|e| e.to_string())?;
    if let Value::Object(map) = &mut document {
        map.insert(
            "run".into(),
            serde_json::to_value(info).map_err(|e| e.to_string())?,
        );
    }
    let text = serde_json::to_string_pretty(&document).map_err(|e| e.to_string())?;
    let path = run_dir.join("results.json");
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let html = report::render(&recorder.ops(), results, info);
    let path = run_dir.join("index.html");
    std::fs::write(&path, html).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let verdicts = results
        .checkers
        .iter()
        .map(|c| format!("  {}: {} — {}", c.name, verdict(c.valid), c.summary))
        .collect::<Vec<_>>()
        .join("\n");
    // Not a checker's verdict, but a server bug all the same: say so.
    let crashes = if info.node_crashes.is_empty() {
        String::new()
    } else {
        format!(
            "\nWARNING: nodes exited on their own (see nodes/nI.log): {}",
            info.node_crashes.join("; ")
        )
    };
    let summary = format!(
        "{}: {} ops, {} faults, network {}{}\n{}{crashes}\nreport: {}",
        verdict(results.valid),
        info.ops,
        info.nemesis.faults,
        info.network,
        info.network_note
            .as_ref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default(),
        verdicts,
        path.display()
    );
    Ok(RunOutcome {
        valid: results.valid,
        summary,
    })
}

pub fn verdict(valid: Validity) -> &'static str {
    match valid {
        Validity::Valid => "valid",
        Validity::Invalid => "INVALID",
        Validity::Unknown => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps_match_known_dates() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(1_764_290_112), "20251128T003512Z");
    }

    #[test]
    fn elections_keep_candidates_and_have_one_or_two_observers() {
        let observers = |concurrency| {
            (0..concurrency)
                .filter(|&slot| is_observer(slot, concurrency))
                .count()
        };
        assert_eq!(observers(1), 0);
        assert_eq!(observers(2), 1);
        assert_eq!(observers(4), 1);
        assert_eq!(observers(5), 2);
        assert_eq!(observers(10), 2);
        assert!(is_observer(0, 5) && is_observer(1, 5) && !is_observer(2, 5));
    }
}
