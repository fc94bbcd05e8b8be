//! A counter kept in latchkey's fenced store, incremented under a lock by
//! several workers, with no lost update even when a holder is paused past
//! its lease.
//!
//! Each worker loops: take lock `counter-demo` with its lease, read
//! `counter-demo/value`, write the value plus one fenced with its guard,
//! release. A "stale holder" takes the lock, reads the counter, and then
//! freezes for twice its lease TTL, as in a long GC pause or a `SIGSTOP`.
//! Its lease expires, the workers get the lock and carry on, and when it
//! wakes its write — the old value plus one, which would wipe out their
//! increments — is refused with [`Error::StaleToken`]. At the end the
//! counter equals the number of acknowledged increments.
//!
//! # Running
//! ```sh
//! # latchkey is in target/debug, or in $CARGO_TARGET_DIR/debug if that is set.
//! target/debug/latchkey dev --data-dir /tmp/latchkey-dev &
//! export LATCHKEY_ENDPOINTS=127.0.0.1:41001,...   # the line `latchkey dev` prints
//! cargo run --example fenced_counter   # from the workspace root; see client/README.md
//! ```
//! It exits 0 when every claim it prints held, and 1 with the reason
//! otherwise; it takes about five seconds.
//!
//! # How the pause is simulated
//! The stale holder runs on its own thread with its own single-threaded
//! Tokio runtime, like a separate process, and pauses by blocking that
//! thread (`std::thread::sleep`). Everything of that "process" stops: its
//! lease's keepalive task runs on the same runtime, so no renewal is sent,
//! and the cluster expires the lease one TTL after the last one. Its lock
//! guard stays as it was, with its token — exactly what a paused process
//! holds when it wakes up. (Dropping the lease handle instead would not
//! stop the keepalives: the guard holds a clone of the lease.)

use std::process::ExitCode;
use std::time::Duration;

use latchkey_client::{Client, Error, FencingToken, Lease};
use tokio::sync::oneshot;

mod common;

use common::{describe_token, endpoints_from_env, ensure, log, BoxError};

const LOCK: &str = "counter-demo";
const VALUE_KEY: &str = "counter-demo/value";
const WORKERS: usize = 3;
const INCREMENTS_PER_WORKER: u64 = 5;
/// Short, so that the stale holder's lease expires quickly; must be at least
/// twice the cluster's election timeout (1 s with `latchkey dev`).
const LEASE_TTL: Duration = Duration::from_secs(2);
/// How long the stale holder is frozen: well past its lease's expiry.
const PAUSE: Duration = Duration::from_secs(4);
/// How long the example waits for any one thing before it gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fenced_counter: FAILED: {error}");
            ExitCode::FAILURE
        }
    }
}

/// What the stale holder saw.
struct StaleOutcome {
    token: FencingToken,
    read: u64,
    /// The token that held the lock when its late write was refused.
    current: Option<FencingToken>,
}

async fn run() -> Result<(), BoxError> {
    let endpoints = endpoints_from_env()?;
    log("main", format!("connecting to {}", endpoints.join(",")));
    let client = Client::connect(endpoints.clone()).await?;
    reset_counter(&client).await?;

    let (frozen_tx, frozen_rx) = oneshot::channel();
    let (outcome_tx, outcome_rx) = oneshot::channel();
    let stale_endpoints = endpoints.clone();
    let stale_thread = std::thread::Builder::new()
        .name("stale-holder".into())
        .spawn(move || run_stale_holder(stale_endpoints, frozen_tx, outcome_tx))?;
    // The workers start once the stale holder holds the lock and is frozen,
    // so they queue behind it.
    match tokio::time::timeout(STEP_TIMEOUT, frozen_rx).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            let reason = match outcome_rx.await {
                Ok(Err(error)) => error.to_string(),
                _ => "its thread died".to_string(),
            };
            return Err(format!("the stale holder failed before pausing: {reason}").into());
        }
        Err(_) => return Err("the stale holder did not get the lock in time".into()),
    }

    let mut workers = tokio::task::JoinSet::new();
    for number in 1..=WORKERS {
        workers.spawn(increment(format!("worker-{number}"), endpoints.clone()));
    }
    let mut acknowledged = 0;
    while let Some(joined) = workers.join_next().await {
        acknowledged += joined??;
    }

    let outcome = tokio::time::timeout(STEP_TIMEOUT, outcome_rx)
        .await
        .map_err(|_| "the stale holder did not finish in time")?
        .map_err(|_| "the stale holder's thread died")??;
    let _ = tokio::task::spawn_blocking(move || stale_thread.join()).await;

    let stored = client
        .get(VALUE_KEY)
        .await?
        .ok_or("the counter is missing")?;
    let counter = parse_counter(&stored.value)?;
    log(
        "main",
        format!(
            "the stale holder's write (token {}, from a read of {}) was refused; current grant \
             then: {}",
            outcome.token,
            outcome.read,
            describe_current(outcome.current),
        ),
    );
    log(
        "main",
        format!(
            "{VALUE_KEY} = {counter}, last fenced with token {}; acknowledged increments: \
             {acknowledged}",
            describe_token(stored.token)
        ),
    );
    ensure(
        acknowledged == WORKERS as u64 * INCREMENTS_PER_WORKER,
        format!("only {acknowledged} increments were acknowledged"),
    )?;
    ensure(
        counter == acknowledged,
        format!("lost update: the counter is {counter} after {acknowledged} increments"),
    )?;
    log("main", "all claims held: no lost update");
    Ok(())
}

/// Sets the counter to 0 under the lock, so that the final count is exact.
async fn reset_counter(client: &Client) -> Result<(), BoxError> {
    let lease = client.grant_lease(LEASE_TTL).await?;
    let guard = lease.lock_with_timeout(LOCK, STEP_TIMEOUT).await?;
    client.put(VALUE_KEY, "0").fence(&guard).await?;
    log(
        "main",
        format!("reset {VALUE_KEY} to 0 under token {}", guard.token()),
    );
    guard.release().await?;
    lease.revoke().await?;
    Ok(())
}

/// One worker: `INCREMENTS_PER_WORKER` increments, each under the lock.
/// Returns how many were acknowledged.
async fn increment(name: String, endpoints: Vec<String>) -> Result<u64, BoxError> {
    let client = Client::connect(endpoints).await?;
    let lease = client.grant_lease(LEASE_TTL).await?;
    log(
        &name,
        format!("queues for {LOCK:?} with lease {}", lease.id()),
    );
    let mut acknowledged = 0;
    for _ in 0..INCREMENTS_PER_WORKER {
        increment_once(&name, &client, &lease).await?;
        acknowledged += 1;
    }
    lease.revoke().await?;
    Ok(acknowledged)
}

async fn increment_once(name: &str, client: &Client, lease: &Lease) -> Result<(), BoxError> {
    let guard = lease.lock_with_timeout(LOCK, STEP_TIMEOUT).await?;
    let value = read_counter(client).await?;
    let next = value + 1;
    let written = tokio::select! {
        reason = guard.lost() => return Err(format!("{name} lost the lock: {reason:?}").into()),
        written = client.put(VALUE_KEY, next.to_string()).fence(&guard) => written?,
    };
    log(
        name,
        format!(
            "token {}: {value} -> {next} (revision {written})",
            guard.token()
        ),
    );
    guard.release().await?;
    Ok(())
}

/// The body of the stale holder's thread: a separate runtime, so that
/// blocking it freezes the holder's keepalives too (see the module docs).
fn run_stale_holder(
    endpoints: Vec<String>,
    frozen: oneshot::Sender<()>,
    outcome: oneshot::Sender<Result<StaleOutcome, BoxError>>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(runtime) => runtime.block_on(hold_then_pause(endpoints, frozen)),
        Err(error) => Err(format!("cannot start a runtime: {error}").into()),
    };
    let _ = outcome.send(result);
}

async fn hold_then_pause(
    endpoints: Vec<String>,
    frozen: oneshot::Sender<()>,
) -> Result<StaleOutcome, BoxError> {
    let who = "stale";
    let client = Client::connect(endpoints).await?;
    let lease = client.grant_lease(LEASE_TTL).await?;
    let guard = lease.lock_with_timeout(LOCK, STEP_TIMEOUT).await?;
    let read = read_counter(&client).await?;
    let token = guard.token();
    log(
        who,
        format!("holds {LOCK:?} with token {token}, read {read}; freezes for {PAUSE:?}"),
    );
    let _ = frozen.send(());
    // The pause. It blocks this runtime's only thread, on purpose: the
    // keepalive task cannot run either.
    std::thread::sleep(PAUSE);
    log(
        who,
        format!(
            "wakes; its lease is {:?} locally. A careful holder checks guard.state() and \
             stops; this one writes {} anyway",
            guard.state(),
            read + 1
        ),
    );
    match client
        .put(VALUE_KEY, (read + 1).to_string())
        .fence(&guard)
        .await
    {
        Err(Error::StaleToken {
            presented, current, ..
        }) => {
            log(
                who,
                format!(
                    "write with token {presented} refused: StaleToken (current grant: {})",
                    describe_current(current)
                ),
            );
            Ok(StaleOutcome {
                token,
                read,
                current,
            })
        }
        Ok(revision) => {
            Err(format!("the stale write was accepted at revision {revision}: lost update").into())
        }
        Err(other) => Err(format!("expected StaleToken for the stale write, got: {other}").into()),
    }
}

async fn read_counter(client: &Client) -> Result<u64, BoxError> {
    let stored = client
        .get(VALUE_KEY)
        .await?
        .ok_or("the counter is missing")?;
    parse_counter(&stored.value)
}

fn parse_counter(value: &[u8]) -> Result<u64, BoxError> {
    let text = std::str::from_utf8(value)?;
    text.parse()
        .map_err(|error| format!("{VALUE_KEY} holds {text:?}, not a number: {error}").into())
}

/// The lock's current grant as a `StaleToken` refusal reports it.
fn describe_current(current: Option<FencingToken>) -> String {
    current.map_or_else(
        || "none, the lock is free".to_string(),
        |token| format!("token {token}"),
    )
}
