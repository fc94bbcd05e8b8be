//! Holding a lock or a leadership for as long as the user wants, or for as
//! long as a command runs: the part `latchkey lock` and `latchkey elect`
//! share.
//!
//! # Contract
//! - Without a command: print the grant (the token alone, or JSON), then
//!   hold it until Ctrl-C, SIGTERM, SIGHUP or the end of standard input;
//!   then revoke the lease (which ends the grant) and exit 0.
//! - With a command: run it with `LATCHKEY_FENCING_TOKEN`,
//!   `LATCHKEY_LEASE_ID` and `LATCHKEY_LOCK` (or `LATCHKEY_ELECTION`) in its
//!   environment and its standard streams inherited. When it exits, revoke
//!   the lease and exit with its exit code (128 + N when it was killed by
//!   signal N). SIGINT, SIGTERM and SIGHUP sent to `latchkey` are passed on
//!   to the command as SIGTERM, and `latchkey` waits for it as above.
//! - If the grant is lost meanwhile (the lease expired or was revoked, or
//!   could not be renewed before its local deadline, or the grant was ended
//!   elsewhere with `latchkey release`/`resign`), send the command
//!   SIGTERM, then SIGKILL after `--kill-after`, and exit with
//!   [`super::EXIT_LOST`] and a one-line message. Without a command, just
//!   exit that way.
//! - The command gets SIGKILL from the kernel if `latchkey` itself dies
//!   (`PR_SET_PDEATHSIG`): a holder whose lease nobody renews any more must
//!   not keep working.
//!
//! The lease is renewed every few hundred milliseconds (see
//! [`super::session`]), and each renewal lists the lease's grants, so a
//! revoke, release or resign from elsewhere stops the command within about
//! one renewal interval.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use latchkey_client::{Leadership, Lease, LockGuard};
use serde::Serialize;
use tokio::process::{Child, Command};

use super::session::{describe_lost, lost, StopSignals};
use super::{parse_duration, parse_ttl, print_error, write_json, write_stdout, Failure, EXIT_OK};

/// Default TTL of the lease `lock` and `elect` grant for themselves.
pub const DEFAULT_TTL: &str = "10s";
/// Default time a command gets between SIGTERM and SIGKILL.
pub const DEFAULT_KILL_AFTER: &str = "10s";

/// Flags `lock` and `elect` share: the lease, the wait, and the command.
#[derive(clap::Args, Debug)]
pub struct HoldArgs {
    /// TTL of the lease that holds the lock or leadership; renewed while it is held.
    #[arg(long, default_value = DEFAULT_TTL, value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Give up waiting after this long (exit code 5); waits until granted if omitted.
    #[arg(long, value_parser = parse_duration)]
    pub wait_timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when the command must be stopped.
    #[arg(long, default_value = DEFAULT_KILL_AFTER, value_parser = parse_duration)]
    pub kill_after: Duration,
    /// The command to run while holding it (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

impl HoldArgs {
    /// Holds `held` while the command runs, or until told to stop.
    pub async fn hold(&self, held: Held, json: bool) -> Result<u8, Failure> {
        if self.command.is_empty() {
            hold(held, json).await
        } else {
            run_command(held, &self.command, self.kill_after).await
        }
    }
}

/// A lock or a leadership being held.
pub enum Held {
    Lock(LockGuard),
    Leadership {
        leadership: Leadership,
        /// The published value.
        value: String,
    },
}

impl Held {
    /// `lock` or `leadership of`, for messages.
    fn what(&self) -> &'static str {
        match self {
            Held::Lock(_) => "lock",
            Held::Leadership { .. } => "leadership of",
        }
    }

    /// The environment variable that carries the name to a command.
    fn name_variable(&self) -> &'static str {
        match self {
            Held::Lock(_) => "LATCHKEY_LOCK",
            Held::Leadership { .. } => "LATCHKEY_ELECTION",
        }
    }

    fn name(&self) -> &str {
        match self {
            Held::Lock(guard) => guard.name(),
            Held::Leadership { leadership, .. } => leadership.name(),
        }
    }

    fn token(&self) -> u64 {
        match self {
            Held::Lock(guard) => guard.token().0,
            Held::Leadership { leadership, .. } => leadership.token().0,
        }
    }

    fn lease(&self) -> &Lease {
        match self {
            Held::Lock(guard) => guard.lease(),
            Held::Leadership { leadership, .. } => leadership.lease(),
        }
    }

    fn value(&self) -> Option<String> {
        match self {
            Held::Lock(_) => None,
            Held::Leadership { value, .. } => Some(value.clone()),
        }
    }

    /// Completes, with the reason in words, when the grant is lost: its
    /// lease is lost, or a renewal showed the grant was ended elsewhere
    /// (`latchkey release` or `resign` with its token).
    async fn lost(&self) -> String {
        let reason = match self {
            Held::Lock(guard) => guard.lost().await,
            Held::Leadership { leadership, .. } => leadership.lost().await,
        };
        describe_lost(reason).to_string()
    }
}

/// What `lock` and `elect` print for a grant without a command (`--json`).
#[derive(Serialize, Debug)]
pub struct GrantOutput {
    pub name: String,
    pub token: u64,
    pub lease: u64,
    pub ttl_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Holds `held` until a stop is requested or it is lost.
pub async fn hold(held: Held, json: bool) -> Result<u8, Failure> {
    let mut stops = StopSignals::install(true)?;
    if json {
        write_json(&GrantOutput {
            name: held.name().to_string(),
            token: held.token(),
            lease: held.lease().id().0,
            ttl_ms: u64::try_from(held.lease().ttl().as_millis()).unwrap_or(u64::MAX),
            value: held.value(),
        })?;
    } else {
        write_stdout(format!("{}\n", held.token()).as_bytes())?;
        note(&format!(
            "holding {} {:?} with token {} (lease {}); Ctrl-C or end of input releases it",
            held.what(),
            held.name(),
            held.token(),
            held.lease().id()
        ));
    }
    tokio::select! {
        why = held.lost() => return Err(lost(held.what(), held.name(), &why)),
        _ = stops.next() => {}
    }
    end(&held).await;
    Ok(EXIT_OK)
}

/// Runs `command` while holding `held`; see the module docs.
pub async fn run_command(
    held: Held,
    command: &[String],
    kill_after: Duration,
) -> Result<u8, Failure> {
    let mut stops = StopSignals::install(false)?;
    let Some((program, args)) = command.split_first() else {
        return Err(Failure::usage("no command given after --"));
    };
    let mut child = match spawn(&held, program, args) {
        Ok(child) => child,
        Err(err) => {
            end(&held).await;
            let code = if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return Err(Failure {
                code,
                message: format!("cannot run {program:?}: {err}"),
            });
        }
    };
    let why: String;
    tokio::select! {
        status = child.wait() => {
            let status = status.map_err(|err| Failure::failed(format!("waiting for {program:?}: {err}")))?;
            end(&held).await;
            return Ok(exit_code(status));
        }
        reason = held.lost() => why = reason,
        _ = stops.next() => {
            signal_child(&child, libc::SIGTERM);
            let status = stop_child(&mut child, kill_after).await;
            end(&held).await;
            return Ok(status.map_or(EXIT_OK, exit_code));
        }
    }
    let mut failure = lost(held.what(), held.name(), &why);
    signal_child(&child, libc::SIGTERM);
    let how = match tokio::time::timeout(kill_after, child.wait()).await {
        Ok(_) => "stopped it with SIGTERM".to_string(),
        Err(_) => {
            signal_child(&child, libc::SIGKILL);
            let _ = child.wait().await;
            format!(
                "killed it with SIGKILL, {} after SIGTERM",
                super::format_duration(kill_after)
            )
        }
    };
    failure.message = format!("{} while {program:?} ran; {how}", failure.message);
    Err(failure)
}

fn spawn(held: &Held, program: &str, args: &[String]) -> std::io::Result<Child> {
    let mut command = Command::new(program);
    command
        .args(args)
        .env("LATCHKEY_FENCING_TOKEN", held.token().to_string())
        .env("LATCHKEY_LEASE_ID", held.lease().id().to_string())
        .env(held.name_variable(), held.name())
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and calls
    // only prctl and getppid, which are async-signal-safe, without
    // allocating.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other(
                    "latchkey exited before the command started",
                ));
            }
            Ok(())
        });
    }
    command.spawn()
}

fn signal_child(child: &Child, signal: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // own child's, which has not been reaped yet (`child.id()` is
        // `None` once it has).
        unsafe {
            libc::kill(pid as libc::pid_t, signal);
        }
    }
}

/// Waits for a child that was sent SIGTERM; SIGKILLs it after `kill_after`.
async fn stop_child(child: &mut Child, kill_after: Duration) -> Option<ExitStatus> {
    match tokio::time::timeout(kill_after, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            signal_child(child, libc::SIGKILL);
            child.wait().await.ok()
        }
    }
}

/// The exit code a shell would report for `status`.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}

/// Ends the grant by revoking its lease: the next waiter gets the lock (or
/// leadership) at once, instead of after the TTL. Failing to revoke is
/// reported but not fatal: the lease then expires on its own.
async fn end(held: &Held) {
    if let Err(error) = held.lease().revoke().await {
        print_error(&format!(
            "could not revoke lease {} ({error}); it expires within {}",
            held.lease().id(),
            super::format_duration(held.lease().ttl())
        ));
    }
}

/// A remark for a person, on stderr.
fn note(message: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "latchkey: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 143);
    }
}
