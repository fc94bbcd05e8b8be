//! A client worker: a child process of the harness that runs one workload
//! through the real client crate, so that the nemesis can SIGSTOP it — its
//! lease keepalives stop with it, as in a GC pause or a stopped VM.
//!
//! # Protocol (JSON lines)
//! The worker writes [`FromWorker`] lines on stdout and reads [`ToWorker`]
//! lines on stdin. Before it sends a request it writes `invoke` and waits
//! for `ack`: the harness records the invoke *before* the request leaves,
//! so a recorded window always contains the real one. A completion is
//! recorded when its line arrives, i.e. after the answer did. Process
//! numbers, indices and times are the harness's business (`workers`).
//!
//! `arm-pause` asks the worker to stop itself the next time it is about to
//! make a fenced write while holding the lock: it writes `pausing` and
//! raises SIGSTOP; the harness sends SIGCONT later. That is the classic
//! fencing case — a holder frozen between its check and its write for
//! longer than its lease — at exactly the moment that matters.
//!
//! `arm-cut` asks the worker to tell the harness the next time it is
//! granted the lock or a leadership: it writes `cutting` and waits for
//! `ack`, which the harness sends once it has cut the worker off from every
//! node (or decided not to: another worker took the cut). The process then
//! carries on, its keepalives failing, trusting its grant until its local
//! deadline: the classic stale holder, alive and unreachable.
//!
//! # Workloads
//! - `lock-fenced`: grant a lease (reused until lost), `acquire` the lock,
//!   `read` the counter register, fenced `write` of value+1, `release`.
//! - `register`: `read`, `write` and `cas` on a few keys. A `cas {from,
//!   to}` reads the key and, if it holds `from`, writes `to` on condition
//!   that the key's modification revision has not moved since; the write
//!   lands only if no other write came between, so the whole is one atomic
//!   compare-and-set on the value. `fail` means only that the value read
//!   was not `from`; when the revision moved, it reads again (a bounded
//!   number of times), and any other error makes the cas `info`.
//! - `election` (module `election`): candidates `campaign` with a lease
//!   (reused until lost), `proclaim`, `resign`, and record `hold-lost`
//!   when a leadership's lease is lost; observer slots record `observe`
//!   events.
//! - `lease` (module `lease`): `grant`, `keepalive`, `revoke` by lease id,
//!   and expiry.
//!
//! Outcome of an error: a refusal the server decided (stale token, held
//! lock, revision mismatch, lease not found) is `fail`; a timeout, an
//! unavailable cluster or a lease lost locally is `info`. Failed *reads*
//! are `fail` whatever the cause, since a read changes nothing.
//!
//! # Not done yet
//! - `lock-fenced` contends for one lock and one counter; several locks
//!   would test that tokens stay unique across locks under faults.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use latchkey_client::{Client, Error, Lease, LeaseLost, LeaseState, LockGuard};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

use super::recorder::monotonic_ns;
use crate::history::OpType;

mod election;
mod lease;

/// How long a worker waits in the lock queue before giving up (`info`).
const ACQUIRE_WAIT: Duration = Duration::from_secs(5);
/// Read-then-conditional-write rounds of one `cas` before it gives up.
const CAS_ATTEMPTS: usize = 5;
/// Longest pause between two ops of one worker.
const THINK_MAX: Duration = Duration::from_millis(20);

/// What a worker is told at start (one JSON argument).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub slot: u64,
    pub workload: String,
    pub endpoints: Vec<String>,
    pub ttl_ms: u64,
    pub seed: u64,
    pub lock: String,
    pub counter_key: String,
    pub register_keys: Vec<String>,
    /// The election of workload `election`.
    #[serde(default)]
    pub election: String,
    /// Workload `election`: this slot observes instead of campaigning.
    #[serde(default)]
    pub observer: bool,
    pub call_timeout_ms: u64,
    pub retry_timeout_ms: u64,
    /// The client's drift bound (`ClientBuilder::max_clock_drift_ppm`).
    #[serde(default = "default_drift_ppm")]
    pub max_clock_drift_ppm: u64,
    /// The history's time zero as CLOCK_MONOTONIC nanoseconds.
    pub run_start_monotonic_ns: u64,
}

fn default_drift_ppm() -> u64 {
    10_000
}

/// A line from the worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum FromWorker {
    Invoke {
        f: String,
        key: Option<String>,
        value: Value,
    },
    Complete {
        kind: OpType,
        f: String,
        key: Option<String>,
        value: Value,
        error: Option<String>,
        raft_index: Option<u64>,
    },
    /// A standalone `info` event (`hold-lost`, `observe`).
    Event {
        f: String,
        key: Option<String>,
        value: Value,
    },
    /// About to SIGSTOP itself, holding `token`.
    Pausing { token: u64 },
    /// Just granted `token` while armed to be cut off; waits for `ack`.
    Cutting { token: u64 },
}

/// A line to the worker.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "kebab-case")]
pub enum ToWorker {
    Ack,
    ArmPause,
    ArmCut,
    /// Withdraws both arms.
    Disarm,
    Finish,
}

/// The worker process's entry point (`latchkey-jepsen test --worker SPEC`).
pub fn main(spec: &str) -> ExitCode {
    let spec: WorkerSpec = match serde_json::from_str(spec) {
        Ok(spec) => spec,
        Err(error) => {
            eprintln!("latchkey-jepsen worker: bad spec: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("latchkey-jepsen worker: cannot start a runtime: {error}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(spec));
    // The stdin reader sits in a blocking read that only the harness's EOF
    // would end; do not wait for it.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("latchkey-jepsen worker: {error}");
            ExitCode::from(2)
        }
    }
}

/// The worker's side of the protocol.
struct Link {
    acks: mpsc::Receiver<()>,
    armed: Arc<AtomicBool>,
    cut_armed: Arc<AtomicBool>,
    finish: Arc<AtomicBool>,
}

/// The harness went away or asked us to finish.
struct Finished;

fn send(message: &FromWorker) {
    let mut out = std::io::stdout().lock();
    // A closed stdout means the harness is gone; stdin's EOF ends us then.
    let _ = serde_json::to_writer(&mut out, message);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

impl Link {
    fn start() -> Link {
        let (ack_tx, acks) = mpsc::channel(1);
        let armed = Arc::new(AtomicBool::new(false));
        let cut_armed = Arc::new(AtomicBool::new(false));
        let finish = Arc::new(AtomicBool::new(false));
        let (armed_in, cut_in, finish_in) = (armed.clone(), cut_armed.clone(), finish.clone());
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<ToWorker>(&line) {
                    Ok(ToWorker::Ack) => {
                        let _ = ack_tx.send(()).await;
                    }
                    Ok(ToWorker::ArmPause) => armed_in.store(true, Ordering::SeqCst),
                    Ok(ToWorker::ArmCut) => cut_in.store(true, Ordering::SeqCst),
                    Ok(ToWorker::Disarm) => {
                        armed_in.store(false, Ordering::SeqCst);
                        cut_in.store(false, Ordering::SeqCst);
                    }
                    // Ops already under way (a hold) still need their acks.
                    Ok(ToWorker::Finish) => finish_in.store(true, Ordering::SeqCst),
                    Err(_) => break,
                }
            }
            finish_in.store(true, Ordering::SeqCst);
            // Dropping ack_tx wakes an invoke waiting for its ack.
        });
        Link {
            acks,
            armed,
            cut_armed,
            finish,
        }
    }

    /// Just granted `token`: if armed to be cut off, asks the harness to
    /// cut this worker off and waits until it has (module docs).
    async fn cut_if_armed(&mut self, token: u64) -> Result<(), Finished> {
        if !self.cut_armed.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        send(&FromWorker::Cutting { token });
        self.acks.recv().await.ok_or(Finished)
    }

    fn finished(&self) -> bool {
        self.finish.load(Ordering::SeqCst)
    }

    /// Announces a new unit of work (an op that starts a cycle) and waits
    /// until the harness has recorded it; refuses once asked to finish.
    async fn invoke(&mut self, f: &str, key: Option<&str>, value: Value) -> Result<(), Finished> {
        if self.finished() {
            return Err(Finished);
        }
        self.invoke_always(f, key, value).await
    }

    /// Announces an op that completes work under way (the rest of a hold:
    /// read, write, release), even after `finish`, so that a run does not
    /// end with a lock held by a worker that just walked away.
    async fn invoke_always(
        &mut self,
        f: &str,
        key: Option<&str>,
        value: Value,
    ) -> Result<(), Finished> {
        send(&FromWorker::Invoke {
            f: f.into(),
            key: key.map(Into::into),
            value,
        });
        self.acks.recv().await.ok_or(Finished)
    }

    fn complete(&self, f: &str, key: Option<&str>, outcome: Outcome) {
        send(&FromWorker::Complete {
            kind: outcome.kind,
            f: f.into(),
            key: key.map(Into::into),
            value: outcome.value,
            error: outcome.error,
            raft_index: outcome.raft_index,
        });
    }
}

/// How an op ended.
struct Outcome {
    kind: OpType,
    value: Value,
    error: Option<String>,
    raft_index: Option<u64>,
}

impl Outcome {
    fn ok(value: Value) -> Outcome {
        Outcome {
            kind: OpType::Ok,
            value,
            error: None,
            raft_index: None,
        }
    }

    fn error(error: &Error, value: Value) -> Outcome {
        Outcome {
            kind: error_kind(error),
            value,
            error: Some(error.to_string().replace('\n', " ")),
            raft_index: None,
        }
    }

    fn fail(message: String, value: Value) -> Outcome {
        Outcome {
            kind: OpType::Fail,
            value,
            error: Some(message),
            raft_index: None,
        }
    }
}

/// `fail` for refusals the server decided, `info` when the outcome is unknown.
pub fn error_kind(error: &Error) -> OpType {
    match error {
        Error::LockHeld { .. }
        | Error::StaleToken { .. }
        | Error::LeaseNotFound { .. }
        | Error::InvalidArgument { .. }
        | Error::RevisionMismatch { .. }
        | Error::Rejected { .. }
        | Error::Unauthenticated { .. }
        | Error::PermissionDenied { .. }
        | Error::LimitExceeded { .. }
        | Error::Config(_) => OpType::Fail,
        Error::Unavailable { .. }
        | Error::Timeout { .. }
        | Error::LeaseLost { .. }
        | Error::SessionExpired { .. }
        | Error::OutcomeUnknown { .. } => OpType::Info,
    }
}

async fn run(spec: WorkerSpec) -> Result<(), String> {
    let mut link = Link::start();
    let client = Client::builder(spec.endpoints.clone())
        .call_timeout(Duration::from_millis(spec.call_timeout_ms))
        .retry_timeout(Duration::from_millis(spec.retry_timeout_ms))
        .max_clock_drift_ppm(spec.max_clock_drift_ppm)
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let result = match spec.workload.as_str() {
        "lock-fenced" => lock_fenced(&spec, &client, &mut link, &mut rng).await,
        "register" => register(&spec, &client, &mut link, &mut rng).await,
        "election" => election::election(&spec, &client, &mut link, &mut rng).await,
        "lease" => lease::lease(&spec, &client, &mut link, &mut rng).await,
        other => return Err(format!("unknown workload {other:?}")),
    };
    let Err(Finished) = result;
    Ok(())
}

async fn think(rng: &mut StdRng) {
    tokio::time::sleep(rng.gen_range(Duration::ZERO..THINK_MAX)).await;
}

/// A value stored in a register, as an integer (or the raw text).
fn register_value(bytes: &[u8]) -> Value {
    let text = String::from_utf8_lossy(bytes);
    match text.parse::<i64>() {
        Ok(n) => json!(n),
        Err(_) => json!(text),
    }
}

async fn lock_fenced(
    spec: &WorkerSpec,
    client: &Client,
    link: &mut Link,
    rng: &mut StdRng,
) -> Result<std::convert::Infallible, Finished> {
    let mut lease: Option<Lease> = None;
    // Bounded by the harness: it sends `finish` at the end of the run.
    loop {
        think(rng).await;
        let current = match lease.take().filter(|l| l.state() != LeaseState::Lost) {
            Some(current) => current,
            None => match grant(spec, client, link).await? {
                Some(granted) => granted,
                None => continue,
            },
        };
        lease = Some(current.clone());
        let Some(guard) = acquire(spec, &current, link).await? else {
            continue;
        };
        let watcher = watch_hold(&guard, spec.run_start_monotonic_ns);
        let cut = link.cut_if_armed(guard.token().0).await;
        let held = match cut {
            Ok(()) => hold(spec, client, link, rng, &guard).await,
            Err(finished) => Err(finished),
        };
        let released = release(spec, link, guard, current.id().0).await;
        watcher.abort();
        held?;
        released?;
    }
}

async fn grant(
    spec: &WorkerSpec,
    client: &Client,
    link: &mut Link,
) -> Result<Option<Lease>, Finished> {
    link.invoke("grant", None, json!({"ttl_ms": spec.ttl_ms}))
        .await?;
    match client.grant_lease(Duration::from_millis(spec.ttl_ms)).await {
        Ok(lease) => {
            let value = json!({"lease": lease.id().0, "ttl_ms": lease.ttl().as_millis() as u64});
            link.complete("grant", None, Outcome::ok(value));
            Ok(Some(lease))
        }
        Err(error) => {
            let value = json!({"ttl_ms": spec.ttl_ms});
            link.complete("grant", None, Outcome::error(&error, value));
            Ok(None)
        }
    }
}

async fn acquire(
    spec: &WorkerSpec,
    lease: &Lease,
    link: &mut Link,
) -> Result<Option<LockGuard>, Finished> {
    let lease_id = lease.id().0;
    link.invoke("acquire", Some(&spec.lock), json!({"lease": lease_id}))
        .await?;
    match lease.lock_with_timeout(&spec.lock, ACQUIRE_WAIT).await {
        Ok(guard) => {
            let value = json!({"token": guard.token().0, "lease": lease_id});
            link.complete("acquire", Some(&spec.lock), Outcome::ok(value));
            Ok(Some(guard))
        }
        Err(error) => {
            let outcome = Outcome::error(&error, json!({"lease": lease_id}));
            link.complete("acquire", Some(&spec.lock), outcome);
            Ok(None)
        }
    }
}

async fn release(
    spec: &WorkerSpec,
    link: &mut Link,
    guard: LockGuard,
    lease: u64,
) -> Result<(), Finished> {
    let value = json!({"token": guard.token().0, "lease": lease});
    link.invoke_always("release", Some(&spec.lock), value.clone())
        .await?;
    let outcome = match guard.release().await {
        Ok(()) => Outcome::ok(value.clone()),
        Err(error) => Outcome::error(&error, value),
    };
    link.complete("release", Some(&spec.lock), outcome);
    Ok(())
}

/// Records `hold-lost` the moment the guard's lease is reported lost. The
/// caller aborts the watcher once the hold is over (its lease lives on for
/// later holds, whose loss is theirs to report).
fn watch_hold(guard: &LockGuard, run_start_monotonic_ns: u64) -> tokio::task::JoinHandle<()> {
    let value = json!({"token": guard.token().0, "lease": guard.lease().id().0});
    let key = guard.name().to_string();
    watch_lost(
        guard.lost(),
        guard.lease(),
        key,
        value,
        run_start_monotonic_ns,
    )
}

/// Records a `hold-lost` event with `value` under `key` once `lost`
/// completes: the shared half of [`watch_hold`] and the election worker's
/// leadership watcher.
///
/// A stopped process notices late, so when the local deadline is what
/// passed, the value also carries `deadline`: the history time (ns) at
/// which it fell, from the CLOCK_MONOTONIC time the harness shares.
pub(super) fn watch_lost(
    lost: impl std::future::Future<Output = LeaseLost> + Send + 'static,
    lease: &Lease,
    key: String,
    mut value: Value,
    run_start_monotonic_ns: u64,
) -> tokio::task::JoinHandle<()> {
    let lease = lease.clone();
    tokio::spawn(async move {
        let reason = lost.await;
        if reason == LeaseLost::DeadlinePassed {
            let passed_for =
                tokio::time::Instant::now().saturating_duration_since(lease.deadline());
            let deadline = monotonic_ns()
                .saturating_sub(passed_for.as_nanos() as u64)
                .saturating_sub(run_start_monotonic_ns);
            value["deadline"] = json!(deadline);
        }
        send(&FromWorker::Event {
            f: "hold-lost".into(),
            key: Some(key),
            value,
        });
    })
}

/// Under the lock: read the counter, maybe stop (armed pause), write +1 fenced.
async fn hold(
    spec: &WorkerSpec,
    client: &Client,
    link: &mut Link,
    rng: &mut StdRng,
    guard: &LockGuard,
) -> Result<(), Finished> {
    let key = spec.counter_key.as_str();
    link.invoke_always("read", Some(key), Value::Null).await?;
    let current = match client.get(key).await {
        Ok(found) => {
            let value = found
                .map(|kv| register_value(&kv.value))
                .unwrap_or(Value::Null);
            link.complete("read", Some(key), Outcome::ok(json!({"value": value})));
            value
        }
        Err(error) => {
            let outcome = Outcome::fail(error.to_string(), Value::Null);
            link.complete("read", Some(key), outcome);
            return Ok(());
        }
    };
    let Some(next) = (match &current {
        Value::Null => Some(1),
        Value::Number(n) => n.as_i64().map(|n| n + 1),
        _ => None,
    }) else {
        return Ok(());
    };
    think(rng).await;
    if link.armed.swap(false, Ordering::SeqCst) {
        send(&FromWorker::Pausing {
            token: guard.token().0,
        });
        // SAFETY: raise(2) has no memory-safety preconditions. The whole
        // process stops, keepalive task included, until the harness sends
        // SIGCONT.
        unsafe { libc::raise(libc::SIGSTOP) };
    }
    let value = json!({"value": next, "token": guard.token().0, "lock": guard.name()});
    link.invoke_always("write", Some(key), value.clone())
        .await?;
    let outcome = match client.put(key, next.to_string()).fence(guard).await {
        Ok(revision) => Outcome {
            raft_index: Some(revision.0),
            ..Outcome::ok(value)
        },
        Err(error) => Outcome::error(&error, value),
    };
    link.complete("write", Some(key), outcome);
    Ok(())
}

async fn register(
    spec: &WorkerSpec,
    client: &Client,
    link: &mut Link,
    rng: &mut StdRng,
) -> Result<std::convert::Infallible, Finished> {
    // Bounded by the harness: it sends `finish` at the end of the run.
    loop {
        think(rng).await;
        let key = spec.register_keys[rng.gen_range(0..spec.register_keys.len())].as_str();
        match rng.gen_range(0..10) {
            0..=3 => register_read(client, link, key).await?,
            4..=6 => {
                let value = rng.gen_range(0..5i64);
                let record = json!({"value": value});
                link.invoke("write", Some(key), record.clone()).await?;
                let outcome = match client.put(key, value.to_string()).await {
                    Ok(revision) => Outcome {
                        raft_index: Some(revision.0),
                        ..Outcome::ok(record)
                    },
                    Err(error) => Outcome::error(&error, record),
                };
                link.complete("write", Some(key), outcome);
            }
            _ => {
                let (from, to) = (rng.gen_range(0..5i64), rng.gen_range(0..5i64));
                let record = json!({"from": from, "to": to});
                link.invoke("cas", Some(key), record.clone()).await?;
                let outcome = compare_and_set(client, key, from, to, record).await;
                link.complete("cas", Some(key), outcome);
            }
        }
    }
}

async fn register_read(client: &Client, link: &mut Link, key: &str) -> Result<(), Finished> {
    link.invoke("read", Some(key), Value::Null).await?;
    let outcome = match client.get(key).await {
        Ok(found) => {
            let value = found
                .map(|kv| register_value(&kv.value))
                .unwrap_or(Value::Null);
            Outcome::ok(json!({"value": value}))
        }
        Err(error) => Outcome::fail(error.to_string(), Value::Null),
    };
    link.complete("read", Some(key), outcome);
    Ok(())
}

/// Value compare-and-set: read, then write on condition of the revision
/// read (see the module docs for why this is atomic). A revision mismatch
/// does not mean the value differed (another write may have stored the
/// same value), so it reads again, up to [`CAS_ATTEMPTS`] times; after
/// that nothing was written, but whether the comparison held is unknown,
/// so the op ends `info`.
async fn compare_and_set(client: &Client, key: &str, from: i64, to: i64, record: Value) -> Outcome {
    for _ in 0..CAS_ATTEMPTS {
        let found = match client.get(key).await {
            Ok(found) => found,
            // A checker reads a failed cas as "the value was not `from`",
            // which a failed read does not show.
            Err(error) => return unknown_cas(&error, record),
        };
        let (value, revision) = match found {
            Some(kv) => (register_value(&kv.value), kv.mod_revision),
            None => return Outcome::fail("the key does not exist".into(), record),
        };
        if value != json!(from) {
            return Outcome::fail(format!("the value is {value}"), record);
        }
        match client
            .put(key, to.to_string())
            .if_mod_revision(revision)
            .await
        {
            Ok(written) => {
                return Outcome {
                    raft_index: Some(written.0),
                    ..Outcome::ok(record)
                }
            }
            Err(Error::RevisionMismatch { .. }) => continue,
            Err(error) => return unknown_cas(&error, record),
        }
    }
    Outcome {
        kind: OpType::Info,
        value: record,
        error: Some(format!(
            "the key changed under {CAS_ATTEMPTS} attempts; nothing was written"
        )),
        raft_index: None,
    }
}

/// A cas whose comparison was not seen to fail ends `info`, whatever the
/// error: `fail` would claim the value differed.
fn unknown_cas(error: &Error, record: Value) -> Outcome {
    Outcome {
        kind: OpType::Info,
        value: record,
        error: Some(error.to_string()),
        raft_index: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_fail_and_unknown_outcomes_are_info() {
        let stale = Error::StaleToken {
            name: "L".into(),
            presented: latchkey_client::FencingToken(3),
            current: None,
        };
        assert_eq!(error_kind(&stale), OpType::Fail);
        let timeout = Error::Timeout {
            message: "x".into(),
        };
        assert_eq!(error_kind(&timeout), OpType::Info);
        let unavailable = Error::Unavailable {
            message: "x".into(),
        };
        assert_eq!(error_kind(&unavailable), OpType::Info);
    }

    #[test]
    fn protocol_lines_are_tagged_json() {
        let line = serde_json::to_string(&ToWorker::ArmPause).expect("encode");
        assert_eq!(line, r#"{"msg":"arm-pause"}"#);
        let line = serde_json::to_string(&ToWorker::ArmCut).expect("encode");
        assert_eq!(line, r#"{"msg":"arm-cut"}"#);
        let back: FromWorker =
            serde_json::from_str(r#"{"msg":"pausing","token":7}"#).expect("decode");
        assert!(matches!(back, FromWorker::Pausing { token: 7 }));
        let back: FromWorker =
            serde_json::from_str(r#"{"msg":"cutting","token":9}"#).expect("decode");
        assert!(matches!(back, FromWorker::Cutting { token: 9 }));
    }

    #[test]
    fn register_values_are_integers_when_they_parse() {
        assert_eq!(register_value(b"42"), json!(42));
        assert_eq!(register_value(b"x"), json!("x"));
    }
}
