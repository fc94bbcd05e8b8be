//! Client-side commands of the `latchkey` binary: `status`, `kv`, and the
//! lease, lock and election commands.
//!
//! # Layout
//! - this file: the entry points called by `main.rs`, exit codes, and the
//!   parsing and output helpers the commands share.
//! - [`connect`]: dialing one endpoint within a deadline, `Cluster.Status`,
//!   and one-line descriptions of transport errors.
//! - [`status`](mod@status): `latchkey status`, every node's view of the Raft group.
//! - [`kv`](mod@kv): `latchkey kv put|get|del|range`.
//! - [`session`]: what the kv, lease, lock and election commands share:
//!   their flags, a `latchkey-client` connection (one-shot and sessionless,
//!   or with an exactly-once session for commands that hold a lease), exit
//!   codes of client errors, stop requests (signals, end of input).
//! - [`hold`]: holding a lock or leadership while a command runs.
//! - [`lock`](mod@lock): `latchkey lock`, `acquire`, `release`.
//! - [`elect`](mod@elect): `latchkey elect`, `leader`, `observe`, `resign`.
//! - [`lease`](mod@lease): `latchkey lease grant|keepalive|revoke|ttl|list`.
//! - [`member`](mod@member): `latchkey member list|add|promote|remove` and
//!   `latchkey leader transfer`.
//! - [`snapshot`](mod@snapshot): `latchkey snapshot save|restore|info`.
//! - [`auth`](mod@auth): `latchkey auth`, `latchkey user`, `latchkey role`.
//!
//! # Design
//! Each command builds its own single-threaded tokio runtime, sends a few
//! requests and exits; nothing is kept between runs. Results go to stdout
//! (plain text for people and scripts, or one JSON object with `--json`);
//! problems go to stderr as a single `latchkey: error: …` line, never a
//! panic or a backtrace. A closed stdout (`latchkey kv range | head -1`) is
//! not an error.
//!
//! Every command reaches the cluster through `latchkey-client`, as
//! applications do. One-shot commands (`kv`, `acquire`, `release`,
//! `resign`, `lease …`, `leader`, `observe`) connect without an exactly-once
//! session, so they take no slot in the cluster's session table: a write is
//! resent only when it certainly was not applied, and one whose outcome is
//! unknown fails with exit code 4 and says so. `lock` and `elect`, which
//! hold a lease while a command runs, open a session for their writes and
//! close it when they exit.
//!
//! Exit codes, the same for every client command (see `docs/cli.md`):
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | the thing looked up does not exist (`kv get`, `leader`, `lease ttl`) |
//! | 2 | bad invocation (flags, endpoints) |
//! | 3 | no endpoint could be reached, or no leader in time |
//! | 4 | the request failed (rejected, timed out, outcome unknown) |
//! | 5 | the lock (or leadership) is held by another lease and was not acquired |
//! | 6 | a fencing token was refused as stale |
//! | 7 | the lock (or leadership) was lost while held |
//!
//! `lock -- CMD` and `elect -- CMD` otherwise exit with CMD's own code.
//!
//! Every client command takes `--cacert/--cert/--key` (TLS) and
//! `--user/--password` or `--token` (authentication); see
//! [`session::SecurityArgs`].
//!
//! # Not done yet
//! - Keys and values are taken from the command line as UTF-8; binary values
//!   are printed raw by `kv get` but lossily (U+FFFD) in JSON.

pub mod auth;
pub mod connect;
pub mod elect;
pub mod hold;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod member;
pub mod session;
pub mod snapshot;
pub mod status;

use std::error::Error;
use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

pub use auth::{AuthArgs, RoleArgs, UserArgs};
pub use elect::{ElectArgs, LeaderArgs, LeaderCommandArgs, ResignArgs};
pub use kv::{KvArgs, KvCommand};
pub use lease::{LeaseArgs, LeaseCommand};
pub use lock::{AcquireArgs, LockArgs, ReleaseArgs};
pub use member::MemberArgs;
pub use snapshot::SnapshotArgs;
pub use status::StatusArgs;

/// Success.
pub const EXIT_OK: u8 = 0;
/// `kv get` found no such key.
pub const EXIT_NOT_FOUND: u8 = 1;
/// Bad invocation: flags or endpoints that cannot work (clap uses 2 too).
pub const EXIT_USAGE: u8 = 2;
/// No endpoint could be reached at all.
pub const EXIT_UNREACHABLE: u8 = 3;
/// The request reached the cluster but failed, timed out, or its outcome is unknown.
pub const EXIT_FAILED: u8 = 4;
/// The lock or leadership is held by another lease and was not acquired
/// (`--no-wait`, or `--wait-timeout` ran out).
pub const EXIT_NOT_ACQUIRED: u8 = 5;
/// A fencing token was refused as stale: its grant has ended.
pub const EXIT_STALE_TOKEN: u8 = 6;
/// The lock or leadership was lost while held (its lease expired, was
/// revoked, or could not be renewed in time); a running command was stopped.
pub const EXIT_LOST: u8 = 7;

/// Upper bound on `--endpoints` entries; a cluster has a handful of members.
pub const MAX_ENDPOINTS: usize = 64;

/// Longest `--timeout` accepted; anything longer is almost certainly a typo.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Longest lease TTL the server grants.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// `latchkey status`: prints every endpoint's view of the cluster.
pub fn status(args: StatusArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(status::run(args))
}

/// `latchkey kv …`: one request to the replicated key-value store.
pub fn kv(args: KvArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(kv::run(args))
}

/// `latchkey lease …`.
pub fn lease(args: LeaseArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(lease::run(args))
}

/// `latchkey lock NAME [-- CMD…]`.
pub fn lock(args: LockArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(lock::lock(args))
}

/// `latchkey acquire NAME --lease ID`.
pub fn acquire(args: AcquireArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(lock::acquire(args))
}

/// `latchkey release NAME --token T`.
pub fn release(args: ReleaseArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(lock::release(args))
}

/// `latchkey elect NAME --value V [-- CMD…]`.
pub fn elect(args: ElectArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(elect::elect(args))
}

/// `latchkey leader NAME` or `latchkey leader transfer ID`.
pub fn leader(args: LeaderCommandArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(elect::leader_command(args))
}

/// `latchkey snapshot save|restore|info`.
pub fn snapshot(args: SnapshotArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(snapshot::run(args))
}

/// `latchkey member list|add|promote|remove`.
pub fn member(args: MemberArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(member::run(args))
}

/// `latchkey auth enable|disable|status|login`.
pub fn auth(args: AuthArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(auth::run_auth(args))
}

/// `latchkey user …`.
pub fn user(args: UserArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(auth::run_user(args))
}

/// `latchkey role …`.
pub fn role(args: RoleArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(auth::run_role(args))
}

/// `latchkey observe NAME`.
pub fn observe(args: LeaderArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(elect::observe(args))
}

/// `latchkey resign NAME --token T`.
pub fn resign(args: ResignArgs) -> Result<ExitCode, Box<dyn Error>> {
    run_client(elect::resign(args))
}

fn run_client(
    command: impl std::future::Future<Output = Result<u8, Failure>>,
) -> Result<ExitCode, Box<dyn Error>> {
    let runtime = runtime()?;
    Ok(finish(runtime.block_on(command)))
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Why a client command stopped: the exit code and one line for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }

    pub fn unreachable(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_UNREACHABLE,
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_FAILED,
            message: message.into(),
        }
    }
}

fn finish(result: Result<u8, Failure>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            print_error(&failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Prints `latchkey: error: MESSAGE` on stderr, flattened to one line.
pub fn print_error(message: &str) {
    let one_line = message.replace(['\n', '\r'], " ");
    // Nothing useful can be done if stderr itself is gone.
    let _ = writeln!(io::stderr().lock(), "latchkey: error: {one_line}");
}

/// Writes to stdout; a reader that went away (EPIPE) is not an error.
pub fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(err) => Err(Failure::failed(format!("cannot write to stdout: {err}"))),
    }
}

/// Writes `value` as one line of JSON on stdout.
pub fn write_json<T: serde::Serialize>(value: &T) -> Result<(), Failure> {
    let mut text = serde_json::to_string(value)
        .map_err(|err| Failure::failed(format!("cannot encode JSON output: {err}")))?;
    text.push('\n');
    write_stdout(text.as_bytes())
}

/// Turns `--endpoints` values (already split at commas) into a list of
/// distinct `HOST:PORT` strings, in the order given.
///
/// A leading `http://` is accepted and dropped, since etcd users type it.
pub fn parse_endpoints(raw: &[String]) -> Result<Vec<String>, Failure> {
    let mut endpoints: Vec<String> = Vec::new();
    for entry in raw.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let endpoint = check_endpoint(entry)?;
        if !endpoints.contains(&endpoint) {
            endpoints.push(endpoint);
        }
    }
    if endpoints.is_empty() {
        return Err(Failure::usage(
            "no endpoints: pass --endpoints HOST:PORT[,HOST:PORT…] or set LATCHKEY_ENDPOINTS \
             (`latchkey dev` prints both)",
        ));
    }
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(Failure::usage(format!(
            "{} endpoints given; at most {MAX_ENDPOINTS} are accepted",
            endpoints.len()
        )));
    }
    Ok(endpoints)
}

fn check_endpoint(entry: &str) -> Result<String, Failure> {
    if entry.starts_with("https://") {
        return Err(Failure::usage(format!(
            "endpoint {entry:?}: TLS is not supported yet; use HOST:PORT"
        )));
    }
    let endpoint = entry.strip_prefix("http://").unwrap_or(entry);
    let valid = match endpoint.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains('/')
                && port.parse::<u16>().is_ok_and(|p| p > 0)
                // What the client will dial: a URI authority of its own.
                && endpoint.parse::<http::uri::Authority>().is_ok_and(|a| a.as_str() == endpoint)
        }
        None => false,
    };
    if !valid {
        return Err(Failure::usage(format!(
            "endpoint {entry:?} is not HOST:PORT (for example 127.0.0.1:7001)"
        )));
    }
    Ok(endpoint.to_string())
}

/// Parses `--timeout` values: `500ms`, `2s`, `1.5s`, `1m`, or a bare number
/// of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_duration_up_to(text, MAX_TIMEOUT)
}

/// Parses `--ttl` values, as [`parse_duration`] but up to 24 hours (`h`
/// is accepted too).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    match text.trim().strip_suffix('h') {
        Some(hours) => {
            let hours: f64 = hours
                .trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a duration (try 10s, 2m or 1h)"))?;
            parse_duration_up_to(&format!("{}m", hours * 60.0), MAX_TTL)
                .map_err(|_| format!("{text:?} is out of range (more than 0, at most 24h)"))
        }
        None => parse_duration_up_to(text, MAX_TTL),
    }
}

fn parse_duration_up_to(text: &str, max: Duration) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit_secs) = if let Some(n) = text.strip_suffix("ms") {
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
        .map_err(|_| format!("{text:?} is not a duration (try 500ms, 2s or 1m)"))?;
    let secs = value * unit_secs;
    // A positive value below a nanosecond would round to zero.
    if !secs.is_finite() || secs < 1e-9 || secs > max.as_secs_f64() {
        return Err(format!(
            "{text:?} is out of range (more than 0, at most {}s)",
            max.as_secs()
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Shows a duration the way a user would type it: `500ms`, `2s`, `1.5s`,
/// `1.25s`; to the millisecond, so that [`parse_duration`] reads it back.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.subsec_millis();
    if millis == 0 {
        format!("{}s", duration.as_secs())
    } else if duration < Duration::from_secs(1) {
        format!("{millis}ms")
    } else {
        let fraction = format!("{millis:03}");
        format!("{}.{}s", duration.as_secs(), fraction.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn endpoints_are_trimmed_deduplicated_and_keep_their_order() {
        let parsed = parse_endpoints(&strings(&[
            " 127.0.0.1:7003",
            "http://127.0.0.1:7001",
            "",
            "127.0.0.1:7003",
            "[::1]:7005",
        ]))
        .expect("valid endpoints");
        assert_eq!(
            parsed,
            strings(&["127.0.0.1:7003", "127.0.0.1:7001", "[::1]:7005"])
        );
    }

    #[test]
    fn malformed_endpoints_are_a_usage_error() {
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            ":7001",
            "host:port",
            "https://a:1",
            "a/b:1",
        ] {
            let err = parse_endpoints(&strings(&[bad])).expect_err(bad);
            assert_eq!(err.code, EXIT_USAGE, "{bad}");
        }
    }

    #[test]
    fn missing_endpoints_are_a_usage_error_that_names_the_env_var() {
        let err = parse_endpoints(&[]).expect_err("no endpoints");
        assert_eq!(err.code, EXIT_USAGE);
        assert!(
            err.message.contains("LATCHKEY_ENDPOINTS"),
            "{}",
            err.message
        );
    }

    #[test]
    fn too_many_endpoints_are_rejected() {
        let many: Vec<String> = (1..=MAX_ENDPOINTS + 1)
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        assert_eq!(
            parse_endpoints(&many).expect_err("too many").code,
            EXIT_USAGE
        );
    }

    #[test]
    fn durations_accept_common_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
    }

    #[test]
    fn zero_negative_huge_and_garbage_durations_are_rejected() {
        for bad in ["0s", "-1s", "2h", "99999", "abc", "", "NaNs"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ttls_go_up_to_a_day() {
        assert_eq!(parse_ttl("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_ttl("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_ttl("24h"), Ok(Duration::from_secs(86_400)));
        for bad in ["25h", "0s", "xh", "-1h"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations_are_shown_the_way_they_are_typed() {
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
    }
}
