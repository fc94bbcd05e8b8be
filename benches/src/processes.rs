//! Child processes and temporary directories, and stopping them on every
//! exit path.
//!
//! # Design
//! - Every child is started by one long-lived *spawner thread*, with
//!   `PR_SET_PDEATHSIG(SIGKILL)`: the kernel ties that signal to the thread
//!   that forked the child, and tokio's blocking threads come and go, so
//!   spawning from them could kill a child when an idle thread retires.
//!   If the bench itself dies (even by `kill -9`), every child dies too.
//! - Every child runs in its own process group, so a Ctrl-C typed in the
//!   terminal reaches only the bench, which then stops its children in
//!   order (SIGTERM, a grace period, SIGKILL).
//! - Every child pid and every run directory is also entered in a global
//!   registry. The normal path stops and removes them through their owners
//!   ([`Proc`] and the cluster handles, whose `Drop` kills what is still
//!   running); [`install_signal_handlers`] stops everything left in the
//!   registry on SIGINT, SIGTERM or SIGHUP, removes the directories and
//!   exits with 130.
//!
//! # Not done yet
//! - A `kill -9` of the bench leaves its run directory behind (the
//!   children still die); it is under `$TMPDIR` and named `latchkey-bench-*`.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How long a stopped child gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Pause between two checks of whether a child has exited.
const EXIT_POLL: Duration = Duration::from_millis(10);

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

#[derive(Default)]
struct Registry {
    pids: BTreeSet<u32>,
    dirs: BTreeSet<PathBuf>,
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Registry::default()))
}

fn with_registry<T>(f: impl FnOnce(&mut Registry) -> T) -> T {
    // A panic while holding this lock cannot leave the sets inconsistent.
    let mut guard = registry().lock().unwrap_or_else(|e| e.into_inner());
    f(&mut guard)
}

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (requests, queue) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("bench-spawner".into())
            .spawn(move || {
                // Lives as long as the process: ends only when every sender is gone.
                for (mut command, reply) in queue {
                    let _ = reply.send(spawn_here(&mut command));
                }
            })
            // Without this thread no child can be started safely.
            .expect("spawner thread starts");
        Mutex::new(requests)
    })
}

fn spawn_here(command: &mut Command) -> io::Result<Child> {
    let parent = std::process::id();
    command.process_group(0);
    // SAFETY: runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid), without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn()
}

/// A child process that is stopped when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    exited: bool,
}

impl Proc {
    /// Starts `command` on the spawner thread and registers it.
    pub fn spawn(name: impl Into<String>, command: Command) -> io::Result<Proc> {
        let (reply, answer) = mpsc::channel();
        spawner()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((command, reply))
            .map_err(|_| io::Error::other("spawner thread is gone"))?;
        let child = answer
            .recv()
            .map_err(|_| io::Error::other("spawner thread is gone"))??;
        with_registry(|r| r.pids.insert(child.id()));
        Ok(Proc {
            name: name.into(),
            child,
            exited: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running (reaps it if not).
    pub fn is_running(&mut self) -> bool {
        if !self.exited && matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
            self.exited = true;
            with_registry(|r| r.pids.remove(&self.child.id()));
        }
        !self.exited
    }

    /// `kill -9`, and waits until it is gone.
    pub fn kill9(&mut self) {
        if self.is_running() {
            signal(self.child.id(), libc::SIGKILL);
            let _ = self.child.wait();
            self.exited = true;
            with_registry(|r| r.pids.remove(&self.child.id()));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. Blocking.
    pub fn stop(&mut self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        signal(self.child.id(), libc::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        // Bounded by the grace period.
        while self.is_running() && std::time::Instant::now() < deadline {
            std::thread::sleep(EXIT_POLL);
        }
        self.kill9();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; a stale pid is at
    // worst ESRCH, since our unreaped children keep their pids.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Sends SIGTERM without waiting, so that several children stop in parallel.
pub fn terminate(proc: &mut Proc) {
    if proc.is_running() {
        signal(proc.pid(), libc::SIGTERM);
    }
}

/// Enters `dir` for removal if the bench is interrupted.
pub fn register_dir(dir: PathBuf) {
    with_registry(|r| r.dirs.insert(dir));
}

/// Takes `dir` off the list (its owner removed it).
pub fn unregister_dir(dir: &std::path::Path) {
    with_registry(|r| r.dirs.remove(dir));
}

/// Stops every registered child and removes every registered directory.
/// For the interrupted path only: the owners are not told.
pub fn stop_everything() {
    let (pids, dirs) = with_registry(|r| (r.pids.clone(), r.dirs.clone()));
    for pid in &pids {
        signal(*pid, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + STOP_GRACE;
    // Bounded by the grace period; a child that exited is a zombie until
    // reaped, so probe with waitpid(WNOHANG).
    let mut left: Vec<u32> = pids.into_iter().collect();
    while !left.is_empty() && std::time::Instant::now() < deadline {
        left.retain(|pid| !reaped(*pid));
        std::thread::sleep(EXIT_POLL);
    }
    for pid in left {
        signal(pid, libc::SIGKILL);
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn reaped(pid: u32) -> bool {
    let mut status = 0;
    // SAFETY: waitpid on our own child with WNOHANG only reads its status.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    r != 0
}

/// On SIGINT, SIGTERM or SIGHUP: stops everything and exits 130.
pub fn install_signal_handlers() -> io::Result<()> {
    use tokio::signal::unix::{signal as on, SignalKind};
    let mut interrupt = on(SignalKind::interrupt())?;
    let mut terminate = on(SignalKind::terminate())?;
    let mut hangup = on(SignalKind::hangup())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "interrupt",
            _ = terminate.recv() => "SIGTERM",
            _ = hangup.recv() => "SIGHUP",
        };
        eprintln!("latchkey-bench: {name}: stopping every cluster and removing the run directory");
        // Off the runtime: stopping waits for the children.
        let _ = tokio::task::spawn_blocking(stop_everything).await;
        std::process::exit(130);
    });
    Ok(())
}
