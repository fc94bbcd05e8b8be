//! Starting the harness's child processes (nodes and client workers) the
//! same way: in their own process group, inside a network namespace when
//! the run has one for them, and killed by the kernel if the harness dies.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that spawned the child exits.
//! The spawning threads are the runtime's worker threads, which live until
//! the runtime shuts down, i.e. until the harness is done.
//!
//! # Not done yet
//! - A child that forks children of its own (none does) would leave them
//!   behind if it were killed.

use std::os::fd::AsRawFd;
use std::path::Path;

use tokio::process::{Child, Command};

/// Spawns `command` in its own process group, inside the network namespace
/// `netns` (a `/run/netns/NAME` file) when given, with `PR_SET_PDEATHSIG`
/// set to SIGKILL.
pub fn spawn_child(command: &mut Command, netns: Option<&Path>) -> std::io::Result<Child> {
    let netns = netns.map(std::fs::File::open).transpose()?;
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let parent = std::process::id();
    command.process_group(0).kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setns, prctl, getppid) without allocating.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let child = command.spawn();
    // The namespace file must stay open until the child has entered it,
    // which it has once spawn returns.
    drop(netns);
    child
}
