//! Leader election with fencing: a crashed leader is replaced once its lease
//! expires, and its token is refused from then on.
//!
//! Three workers campaign in election `leader-demo`, each with its own
//! [`Client`] and lease, publishing its name. An observer prints every
//! leader change. The leader makes a few writes fenced by its leadership;
//! then the example kills it, the next candidate is elected once the dead
//! leader's lease expires, and its writes carry a higher token. Last, a
//! write presenting the dead leader's token is refused with
//! [`Error::StaleToken`].
//!
//! # Running
//! ```sh
//! # latchkey is in target/debug, or in $CARGO_TARGET_DIR/debug if that is set.
//! target/debug/latchkey dev --data-dir /tmp/latchkey-dev &
//! export LATCHKEY_ENDPOINTS=127.0.0.1:41001,...   # the line `latchkey dev` prints
//! cargo run --example leader_election   # from the workspace root; see client/README.md
//! ```
//! It exits 0 when every claim it prints held, and 1 with the reason
//! otherwise; it takes about three seconds.
//!
//! # How the crash is simulated
//! Each worker runs on its own thread with its own single-threaded Tokio
//! runtime: its client's connections and its lease's keepalive task live
//! there, so to the cluster it is a separate process. Killing a worker drops
//! that runtime, which drops every task on it without running it again.
//!
//! Aborting the worker's task and dropping its [`latchkey_client::Lease`]
//! would *not* be a crash. The keepalive task stops only when the last
//! handle of the lease goes, and the [`latchkey_client::Leadership`] holds
//! one; dropping the leadership resigns in the background (see
//! `client/src/election.rs`), which hands over at once, gracefully. A
//! runtime that is shutting down refuses new tasks, so that resignation is
//! never sent: the cluster just stops hearing from the lease, and expires it
//! one TTL after its last keepalive — which the example checks by timing the
//! takeover.

use std::pin::pin;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use latchkey_client::{
    Client, Election, Error, Fence, FenceKind, FencingToken, GrantInfo, Leadership, Revision,
};
use tokio::sync::{mpsc, oneshot};

mod common;

use common::{describe_token, endpoints_from_env, ensure, log, BoxError};

const ELECTION: &str = "leader-demo";
const OWNER_KEY: &str = "leader-demo/owner";
const WORKERS: [&str; 3] = ["worker-1", "worker-2", "worker-3"];
/// Short, so that the dead leader's lease expires quickly; must be at least
/// twice the cluster's election timeout (1 s with `latchkey dev`).
const LEASE_TTL: Duration = Duration::from_secs(2);
const WRITES_PER_TERM: usize = 3;
const PAUSE_BETWEEN_WRITES: Duration = Duration::from_millis(150);
/// How long the example waits for any one thing before it gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on worker and observer messages not yet read by `main`.
const EVENT_QUEUE: usize = 64;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("leader_election: FAILED: {error}");
            ExitCode::FAILURE
        }
    }
}

/// What a worker tells `main`.
#[derive(Debug)]
enum Event {
    Elected { name: String, token: FencingToken },
    Wrote { name: String, token: FencingToken },
    Failed { name: String, error: String },
}

/// One term of leadership as `main` saw it.
struct Term {
    name: String,
    token: FencingToken,
    elected_at: Instant,
}

async fn run() -> Result<(), BoxError> {
    let endpoints = endpoints_from_env()?;
    log("main", format!("connecting to {}", endpoints.join(",")));
    let client = Client::connect(endpoints.clone()).await?;
    let (observed_tx, mut observed) = mpsc::channel(EVENT_QUEUE);
    let observer = tokio::spawn(observe_leaders(client.election(ELECTION), observed_tx));

    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let mut workers = Vec::new();
    for name in WORKERS {
        workers.push(WorkerProcess::start(name, &endpoints, events_tx.clone())?);
    }

    let first = next_term(&mut events).await?;
    wait_for_writes(&mut events, &first).await?;
    let killed = workers
        .iter_mut()
        .find(|worker| worker.name == first.name)
        .ok_or("the elected worker is not one of ours")?;
    let killed_at = Instant::now();
    log("main", format!("killing {} (the leader)", first.name));
    killed.kill();

    let second = next_term(&mut events).await?;
    let takeover = second.elected_at - killed_at;
    log(
        "main",
        format!(
            "{} took over {:.2}s after the kill; token {} -> {}",
            second.name,
            takeover.as_secs_f64(),
            first.token,
            second.token
        ),
    );
    ensure(
        second.name != first.name,
        "the killed worker was re-elected",
    )?;
    ensure(
        second.token > first.token,
        format!(
            "the new leader's token {} is not above the old {}",
            second.token, first.token
        ),
    )?;
    // The killed leader's last keepalive was at most a third of the TTL
    // before the kill, so its lease cannot expire sooner than this.
    ensure(
        takeover >= LEASE_TTL / 2,
        format!(
            "takeover after {takeover:?}, before the lease could expire: did the leader resign?"
        ),
    )?;
    wait_until_observed(&mut observed, &second).await?;
    wait_for_writes(&mut events, &second).await?;

    write_with_the_dead_leaders_token(&client, &first, &second).await?;

    for worker in workers {
        worker.stop().await?;
    }
    observer.abort();
    log("main", "all claims held");
    Ok(())
}

/// Shows that the dead leader's token is refused, and that the key still
/// holds the new leader's write.
async fn write_with_the_dead_leaders_token(
    client: &Client,
    dead: &Term,
    current: &Term,
) -> Result<(), BoxError> {
    // A fence can be built by hand from a name and a token, as a process
    // that was handed the token (instead of the leadership) would.
    let stale = Fence {
        name: ELECTION.to_string(),
        token: dead.token,
        kind: FenceKind::Election,
    };
    let late = format!("{} (back from the dead)", dead.name);
    match client.put(OWNER_KEY, late).fence(&stale).await {
        Err(Error::StaleToken {
            presented,
            current: now,
            ..
        }) => {
            log(
                "main",
                format!(
                    "write with {}'s token {presented} refused: StaleToken (current token {})",
                    dead.name,
                    describe_token(now)
                ),
            );
            ensure(
                now == Some(current.token),
                format!("expected current token {}, got {now:?}", current.token),
            )?;
        }
        Ok(revision) => {
            return Err(
                format!("the dead leader's write was accepted at revision {revision}").into(),
            )
        }
        Err(other) => return Err(format!("expected StaleToken, got: {other}").into()),
    }
    let stored = client.get(OWNER_KEY).await?.ok_or("the key is missing")?;
    let value = String::from_utf8_lossy(&stored.value).into_owned();
    log(
        "main",
        format!(
            "{OWNER_KEY} = {value:?}, last fenced with token {}",
            describe_token(stored.token)
        ),
    );
    ensure(
        value == current.name && stored.token == Some(current.token),
        "the key does not hold the current leader's last write",
    )
}

/// Waits for the next worker to be elected.
async fn next_term(events: &mut mpsc::Receiver<Event>) -> Result<Term, BoxError> {
    match next_event(events).await? {
        Event::Elected { name, token } => Ok(Term {
            name,
            token,
            elected_at: Instant::now(),
        }),
        other => Err(format!("expected an election, got {other:?}").into()),
    }
}

/// Waits for the leader of `term` to make its fenced writes.
async fn wait_for_writes(events: &mut mpsc::Receiver<Event>, term: &Term) -> Result<(), BoxError> {
    for _ in 0..WRITES_PER_TERM {
        match next_event(events).await? {
            Event::Wrote { name, token } if name == term.name => ensure(
                token == term.token,
                format!(
                    "{name} wrote with token {token}, not its leadership's {}",
                    term.token
                ),
            )?,
            other => return Err(format!("expected a write by {}, got {other:?}", term.name).into()),
        }
    }
    Ok(())
}

async fn next_event(events: &mut mpsc::Receiver<Event>) -> Result<Event, BoxError> {
    match tokio::time::timeout(STEP_TIMEOUT, events.recv()).await {
        Ok(Some(Event::Failed { name, error })) => Err(format!("{name} failed: {error}").into()),
        Ok(Some(event)) => Ok(event),
        Ok(None) => Err("every worker is gone".into()),
        Err(_) => Err(format!("nothing happened within {STEP_TIMEOUT:?}").into()),
    }
}

/// Waits until the observer has reported `term`'s leader.
async fn wait_until_observed(
    observed: &mut mpsc::Receiver<GrantInfo>,
    term: &Term,
) -> Result<(), BoxError> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    // Bounded by the deadline.
    loop {
        match tokio::time::timeout_at(deadline, observed.recv()).await {
            Ok(Some(leader)) if leader.token == term.token => return Ok(()),
            Ok(Some(_)) => continue,
            Ok(None) => return Err("the observer stopped".into()),
            Err(_) => return Err(format!("the observer never reported {}", term.name).into()),
        }
    }
}

/// Prints the election's leader and every change, and passes each leader on.
async fn observe_leaders(election: Election, observed: mpsc::Sender<GrantInfo>) {
    let mut changes = pin!(election.observe());
    while let Some(change) = changes.next().await {
        match change {
            Ok(Some(leader)) => {
                let name = String::from_utf8_lossy(&leader.value).into_owned();
                log(
                    "observer",
                    format!(
                        "leader is {name} (token {}, lease {})",
                        leader.token, leader.lease
                    ),
                );
                if observed.send(leader).await.is_err() {
                    return;
                }
            }
            Ok(None) => log("observer", "no leader"),
            Err(error) => {
                log("observer", format!("stopped: {error}"));
                return;
            }
        }
    }
}

/// A worker on its own thread and Tokio runtime; see the module docs.
struct WorkerProcess {
    name: String,
    control: Option<oneshot::Sender<Control>>,
    thread: std::thread::JoinHandle<()>,
}

enum Control {
    /// Resign, revoke the lease, and exit.
    Stop,
    /// Vanish without a word, like `kill -9`.
    Kill,
}

impl WorkerProcess {
    fn start(
        name: &str,
        endpoints: &[String],
        events: mpsc::Sender<Event>,
    ) -> std::io::Result<WorkerProcess> {
        let (control_tx, control_rx) = oneshot::channel();
        let (owned_name, endpoints) = (name.to_string(), endpoints.to_vec());
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || run_process(owned_name, endpoints, events, control_rx))?;
        Ok(WorkerProcess {
            name: name.to_string(),
            control: Some(control_tx),
            thread,
        })
    }

    fn kill(&mut self) {
        if let Some(control) = self.control.take() {
            let _ = control.send(Control::Kill);
        }
    }

    /// Stops the worker gracefully (if it was not killed) and waits for its
    /// thread to end.
    async fn stop(mut self) -> Result<(), BoxError> {
        if let Some(control) = self.control.take() {
            let _ = control.send(Control::Stop);
        }
        let thread = self.thread;
        let joined = tokio::task::spawn_blocking(move || thread.join());
        match tokio::time::timeout(STEP_TIMEOUT, joined).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(_) => Err(format!("{}'s thread panicked", self.name).into()),
            Err(_) => Err(format!("{} did not stop within {STEP_TIMEOUT:?}", self.name).into()),
        }
    }
}

/// The body of a worker's thread: runs the worker until told to stop or to die.
fn run_process(
    name: String,
    endpoints: Vec<String>,
    events: mpsc::Sender<Event>,
    control: oneshot::Receiver<Control>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            let error = format!("cannot start a runtime: {error}");
            let _ = events.blocking_send(Event::Failed { name, error });
            return;
        }
    };
    let (stop_tx, stop_rx) = oneshot::channel();
    let worker = runtime.spawn(work(name, endpoints, events, stop_rx));
    match runtime.block_on(control) {
        Ok(Control::Stop) => {
            let _ = stop_tx.send(());
            let _ = runtime.block_on(worker);
        }
        // `main` gone counts as a kill too.
        Ok(Control::Kill) | Err(_) => {
            // The crash: every task on the runtime (the worker holding the
            // leadership, the keepalive task, the connections) is dropped
            // without running again; the leadership's resign-on-drop cannot
            // be spawned on a runtime that is shutting down.
            drop(runtime);
        }
    }
}

async fn work(
    name: String,
    endpoints: Vec<String>,
    events: mpsc::Sender<Event>,
    stop: oneshot::Receiver<()>,
) {
    if let Err(error) = campaign_and_lead(&name, endpoints, &events, stop).await {
        let error = error.to_string();
        let _ = events.send(Event::Failed { name, error }).await;
    }
}

/// Campaigns; once elected, makes its fenced writes and leads until told to stop.
async fn campaign_and_lead(
    name: &str,
    endpoints: Vec<String>,
    events: &mpsc::Sender<Event>,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), BoxError> {
    let client = Client::connect(endpoints).await?;
    let lease = client.grant_lease(LEASE_TTL).await?;
    let election = client.election(ELECTION);
    log(name, format!("campaigning with lease {}", lease.id()));
    let leadership = tokio::select! {
        elected = election.campaign(&lease, name) => elected?,
        _ = &mut stop => {
            // Revoking the lease also takes it out of the candidates' queue.
            lease.revoke().await?;
            log(name, "stopped while waiting; lease revoked");
            return Ok(());
        }
    };
    let token = leadership.token();
    log(name, format!("elected with token {token}"));
    let elected = Event::Elected {
        name: name.to_string(),
        token,
    };
    events.send(elected).await?;
    for round in 1..=WRITES_PER_TERM {
        let revision = fenced_write(&client, name, &leadership).await?;
        log(
            name,
            format!("fenced write #{round}: {OWNER_KEY} = {name:?} with token {token} (revision {revision})"),
        );
        let wrote = Event::Wrote {
            name: name.to_string(),
            token,
        };
        events.send(wrote).await?;
        tokio::time::sleep(PAUSE_BETWEEN_WRITES).await;
    }
    tokio::select! {
        reason = leadership.lost() => Err(format!("lost the leadership: {reason:?}").into()),
        _ = stop => {
            leadership.resign().await?;
            lease.revoke().await?;
            log(name, "resigned and revoked its lease");
            Ok(())
        }
    }
}

/// One write fenced by `leadership`, abandoned if the leadership is lost first.
async fn fenced_write(
    client: &Client,
    name: &str,
    leadership: &Leadership,
) -> Result<Revision, BoxError> {
    tokio::select! {
        reason = leadership.lost() => Err(format!("lost the leadership: {reason:?}").into()),
        written = client.put(OWNER_KEY, name).fence(leadership) => Ok(written?),
    }
}
