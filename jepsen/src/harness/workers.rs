//! The harness's side of the client workers: spawn them, record what they
//! report, number their processes, pause and resume them.
//!
//! Worker slot k starts as process k. When one of its ops ends `info`, the
//! slot's process is retired and the slot continues as a fresh process
//! number (the next unused one), as Jepsen does: an op whose outcome is
//! unknown stays open forever, and a process has at most one open op.
//!
//! Each worker is a child process (`latchkey-jepsen test --worker SPEC`),
//! in its own process group and, in namespace mode, its own network
//! namespace, killed by the kernel if the harness dies (`spawn`), its
//! stderr in `RUN/workers/wK.log`. See `worker` for the protocol, which
//! runs over the worker's stdin and stdout and so does not care which
//! namespace it is in.
//!
//! # Client faults on their own timers
//! A worker armed to stop at its fenced write (`client-pause`) or to be
//! cut off when next granted the lock or a leadership (`client-cut`) tells
//! the harness at that moment; the pump records it, and heals it after the
//! client pause (2 × TTL + 0.5 s) whatever the schedule does meanwhile.
//! A cut is in force before the worker is told to go on, so the holder
//! never makes a request past it. The holder cut is armed on every worker
//! at once and taken by the first to be granted; the others are answered
//! at once.
//!
//! # Not done yet
//! - A worker that dies on its own is not restarted; its slot stays silent.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::net::Network;
use super::recorder::{Event, Recorder};
use super::spawn::spawn_child;
use super::worker::{FromWorker, ToWorker, WorkerSpec};
use crate::history::{OpType, Process};

/// How long workers get to finish their current op after `finish`.
const FINISH_WAIT: Duration = Duration::from_secs(20);
/// Messages queued for one worker's stdin.
const TO_WORKER_QUEUE: usize = 16;

/// Process numbers of a run: slots first, then one per retirement.
pub struct Processes {
    next: AtomicU64,
}

impl Processes {
    pub fn new(slots: u64) -> Arc<Processes> {
        Arc::new(Processes {
            next: AtomicU64::new(slots),
        })
    }

    /// A process number never used before.
    pub fn fresh(&self) -> u64 {
        self.next.fetch_add(1, Ordering::SeqCst)
    }
}

/// Client pauses and cuts in progress, shared with the nemesis.
#[derive(Default)]
pub struct ClientPauses {
    /// Slots armed to stop at their next fenced write.
    pub armed: BTreeSet<u64>,
    /// Slots stopped right now.
    pub stopped: BTreeSet<u64>,
    /// Whether the next worker granted a lock or leadership is to be cut off.
    pub cut_armed: bool,
    /// Slots cut off on their own timer right now.
    pub cut: BTreeSet<u64>,
}

/// What [`WorkerPool::disarm_all`] withdrew.
pub struct Disarmed {
    /// Slots armed to pause at their write.
    pub paused: Vec<u64>,
    /// Whether a holder cut was armed.
    pub cut: bool,
}

struct WorkerHandle {
    slot: u64,
    child: Child,
    to_worker: mpsc::Sender<ToWorker>,
    pump: JoinHandle<()>,
}

/// Every worker of a run.
pub struct WorkerPool {
    /// Taken out by [`WorkerPool::finish`].
    workers: Mutex<Vec<WorkerHandle>>,
    pub pauses: Arc<Mutex<ClientPauses>>,
    pub processes: Arc<Processes>,
    client_pause: Duration,
}

/// How pumps behave.
#[derive(Clone)]
struct PumpContext {
    recorder: Recorder,
    processes: Arc<Processes>,
    pauses: Arc<Mutex<ClientPauses>>,
    client_pause: Duration,
    network: Arc<Network>,
}

impl WorkerPool {
    /// Spawns one worker per spec.
    pub fn spawn(
        specs: Vec<WorkerSpec>,
        recorder: &Recorder,
        run_dir: &Path,
        client_pause: Duration,
        network: Arc<Network>,
    ) -> Result<WorkerPool, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
        let logs = run_dir.join("workers");
        std::fs::create_dir_all(&logs)
            .map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
        let processes = Processes::new(specs.len() as u64);
        let pauses = Arc::new(Mutex::new(ClientPauses::default()));
        let context = PumpContext {
            recorder: recorder.clone(),
            processes: processes.clone(),
            pauses: pauses.clone(),
            client_pause,
            network,
        };
        let mut workers = Vec::new();
        for spec in specs {
            let log = logs.join(format!("w{}.log", spec.slot));
            // On error the handles spawned so far are dropped: kill_on_drop.
            let handle = spawn_worker(&exe, &spec, &log, context.clone())
                .map_err(|e| format!("cannot start worker {}: {e}", spec.slot))?;
            workers.push(handle);
        }
        Ok(WorkerPool {
            workers: Mutex::new(workers),
            pauses,
            processes,
            client_pause,
        })
    }

    /// How long a client pause or holder cut lasts.
    pub fn client_pause(&self) -> Duration {
        self.client_pause
    }

    pub fn slots(&self) -> Vec<u64> {
        lock(&self.workers).iter().map(|w| w.slot).collect()
    }

    fn send(&self, slot: u64, message: ToWorker) {
        if let Some(worker) = lock(&self.workers).iter().find(|w| w.slot == slot) {
            // A full queue or a gone worker: nothing useful to do.
            let _ = worker.to_worker.try_send(message);
        }
    }

    /// Asks `slot` to SIGSTOP itself at its next fenced write.
    pub fn arm_pause(&self, slot: u64) {
        lock(&self.pauses).armed.insert(slot);
        self.send(slot, ToWorker::ArmPause);
    }

    /// Arms every worker: the next to be granted a lock or leadership is
    /// cut off from every node (module docs).
    pub fn arm_cut(&self) {
        lock(&self.pauses).cut_armed = true;
        for slot in self.slots() {
            self.send(slot, ToWorker::ArmCut);
        }
    }

    /// Withdraws every armed pause or cut that has not fired.
    pub fn disarm_all(&self) -> Disarmed {
        let (paused, cut) = {
            let mut pauses = lock(&self.pauses);
            let paused: Vec<u64> = std::mem::take(&mut pauses.armed).into_iter().collect();
            (paused, std::mem::take(&mut pauses.cut_armed))
        };
        let slots = if cut { self.slots() } else { paused.clone() };
        for slot in slots {
            self.send(slot, ToWorker::Disarm);
        }
        Disarmed { paused, cut }
    }

    /// Sends SIGSTOP (or SIGCONT) to worker `slot` now.
    pub fn signal(&self, slot: u64, signal: libc::c_int) {
        if let Some(pid) = lock(&self.workers)
            .iter()
            .find(|w| w.slot == slot)
            .and_then(|w| w.child.id())
        {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is
            // our unreaped child.
            let _ = unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// Waits (bounded) until no worker is stopped or cut off by an armed
    /// fault.
    pub async fn wait_unpaused(&self, bound: Duration) {
        let deadline = tokio::time::Instant::now() + bound;
        let busy = || {
            let pauses = lock(&self.pauses);
            !pauses.stopped.is_empty() || !pauses.cut.is_empty()
        };
        while busy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Tells every worker to finish, waits for them (bounded), kills the rest.
    /// Call [`WorkerPool::wait_unpaused`] first, so that no SIGCONT timer
    /// outlives its worker.
    pub async fn finish(&self) {
        let mut workers = std::mem::take(&mut *lock(&self.workers));
        for worker in &workers {
            if let Some(pid) = worker.child.id() {
                // SAFETY: as in `signal`: our unreaped child.
                let _ = unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
            }
            let _ = worker.to_worker.try_send(ToWorker::Finish);
        }
        let deadline = tokio::time::Instant::now() + FINISH_WAIT;
        for worker in &mut workers {
            if tokio::time::timeout_at(deadline, worker.child.wait())
                .await
                .is_err()
            {
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
            }
            // The pump ends at the worker's EOF; give it a moment to record.
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut worker.pump).await;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoned only if a pump panicked; the sets are still consistent.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn spawn_worker(
    exe: &Path,
    spec: &WorkerSpec,
    log: &PathBuf,
    context: PumpContext,
) -> std::io::Result<WorkerHandle> {
    let log = std::fs::File::create(log)?;
    let spec_json = serde_json::to_string(spec).map_err(std::io::Error::other)?;
    let mut command = Command::new(exe);
    command
        .args(["test", "--worker", &spec_json])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .env("NO_COLOR", "1");
    let netns = context.network.worker_netns(spec.slot);
    let mut child = spawn_child(&mut command, netns.as_deref())?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    let stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no stdin"))?;
    let pid = child.id().unwrap_or(0);
    let (to_worker, inbox) = mpsc::channel(TO_WORKER_QUEUE);
    let pump = tokio::spawn(pump(spec.slot, pid, stdout, stdin, inbox, context));
    Ok(WorkerHandle {
        slot: spec.slot,
        child,
        to_worker,
        pump,
    })
}

/// Records one worker's lines and feeds its stdin.
async fn pump(
    slot: u64,
    pid: u32,
    stdout: ChildStdout,
    mut stdin: ChildStdin,
    mut inbox: mpsc::Receiver<ToWorker>,
    context: PumpContext,
) {
    let mut lines = BufReader::new(stdout).lines();
    let mut process = slot;
    // Bounded by the worker: it ends at `finish` (or is killed), closing stdout.
    loop {
        let reply = tokio::select! {
            line = lines.next_line() => {
                let Ok(Some(line)) = line else { break };
                let Ok(message) = serde_json::from_str::<FromWorker>(&line) else {
                    continue;
                };
                if let FromWorker::Cutting { token } = message {
                    client_cut(slot, process, token, &context).await;
                    Some(ToWorker::Ack)
                } else {
                    handle_line(slot, pid, &mut process, message, &context)
                }
            }
            message = inbox.recv() => message,
        };
        if let Some(reply) = reply {
            let mut text = serde_json::to_string(&reply).unwrap_or_default();
            text.push('\n');
            if stdin.write_all(text.as_bytes()).await.is_err() {
                break;
            }
            let _ = stdin.flush().await;
        }
    }
}

/// Records a worker's line; returns what to answer.
fn handle_line(
    slot: u64,
    pid: u32,
    process: &mut u64,
    message: FromWorker,
    context: &PumpContext,
) -> Option<ToWorker> {
    let recorder = &context.recorder;
    match message {
        FromWorker::Invoke { f, key, value } => {
            let mut event = Event::new(Process::Client(*process), OpType::Invoke, &f, value);
            event.key = key;
            recorder.record(event);
            Some(ToWorker::Ack)
        }
        FromWorker::Complete {
            kind,
            f,
            key,
            value,
            error,
            raft_index,
        } => {
            let mut event = Event::new(Process::Client(*process), kind, &f, value);
            event.key = key;
            event.error = error;
            event.raft_index = raft_index;
            recorder.record(event);
            if kind == OpType::Info {
                *process = context.processes.fresh();
            }
            None
        }
        FromWorker::Event { f, key, value } => {
            let mut event = Event::new(Process::Client(*process), OpType::Info, &f, value);
            event.key = key;
            recorder.record(event);
            None
        }
        FromWorker::Pausing { token } => {
            client_paused(slot, pid, *process, token, context);
            None
        }
        // Handled by the pump, which must wait for the cut.
        FromWorker::Cutting { .. } => Some(ToWorker::Ack),
    }
}

/// Worker `slot` was just granted `token` while armed to be cut off: if
/// the cut is still armed (no other worker took it), cut the worker from
/// every node, record it, and heal it after the client pause.
async fn client_cut(slot: u64, process: u64, token: u64, context: &PumpContext) {
    {
        let mut pauses = lock(&context.pauses);
        if !std::mem::take(&mut pauses.cut_armed) {
            return;
        }
        pauses.cut.insert(slot);
    }
    let layer = format!("client-{slot}");
    let network = context.network.clone();
    let cuts = network.client_isolation(slot);
    let (name, set) = (layer.clone(), cuts.clone());
    let applied = tokio::task::spawn_blocking(move || network.set_layer(&name, &set)).await;
    let description = match applied {
        Ok(Ok(())) => format!(
            "client worker {slot} (process {process}), granted token {token}, cut from every node for {:?}",
            context.client_pause
        ),
        Ok(Err(error)) => format!("cutting client worker {slot} off failed: {error}"),
        Err(error) => format!("cutting client worker {slot} off failed: {error}"),
    };
    let value = json!({"target": "client", "variant": "holder", "slot": slot, "process": process, "token": token, "description": description});
    context.recorder.record(Event::new(
        Process::Nemesis,
        OpType::Info,
        "client-cut",
        value,
    ));
    let context = context.clone();
    tokio::spawn(async move {
        tokio::time::sleep(context.client_pause).await;
        let network = context.network.clone();
        let healed =
            tokio::task::spawn_blocking(move || network.set_layer(&layer, &Default::default()))
                .await;
        let mut description = format!("reconnect client worker {slot}");
        if let Ok(Err(error)) = healed {
            description.push_str(&format!(" failed: {error}"));
        }
        let value = json!({"target": "client", "slot": slot, "process": process, "description": description});
        context.recorder.record(Event::new(
            Process::Nemesis,
            OpType::Info,
            "client-heal",
            value,
        ));
        lock(&context.pauses).cut.remove(&slot);
    });
}

/// A worker stopped itself holding `token`: record it and SIGCONT it later.
/// (The arming was recorded by the nemesis as a `pause` invoke/info pair.)
fn client_paused(slot: u64, pid: u32, process: u64, token: u64, context: &PumpContext) {
    {
        let mut pauses = lock(&context.pauses);
        pauses.armed.remove(&slot);
        pauses.stopped.insert(slot);
    }
    let description = format!(
        "client worker {slot} (process {process}) stopped with SIGSTOP holding token {token}, for {:?}",
        context.client_pause
    );
    let value = json!({"target": "client", "slot": slot, "process": process, "token": token, "description": description});
    // Single `info` events (`client-pause`, `client-resume`): these come from
    // the workers' pumps, concurrently with the nemesis's own invoke/info
    // pairs, so they must neither open nor close an op of process nemesis.
    context.recorder.record(Event::new(
        Process::Nemesis,
        OpType::Info,
        "client-pause",
        value,
    ));
    let context = context.clone();
    tokio::spawn(async move {
        tokio::time::sleep(context.client_pause).await;
        let resume = json!({"target": "client", "slot": slot, "process": process,
            "description": format!("SIGCONT client worker {slot}")});
        // SAFETY: kill(2) has no memory-safety preconditions. The worker is
        // stopped, and `finish` waits for this timer before it reaps workers,
        // so the pid is still our child.
        let _ = unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        context.recorder.record(Event::new(
            Process::Nemesis,
            OpType::Info,
            "client-resume",
            resume,
        ));
        lock(&context.pauses).stopped.remove(&slot);
    });
}
