//! What the lease, lock and election commands share: their common flags, a
//! connected [`Client`], the exit code of each client error, and waiting for
//! the user to ask for a stop.
//!
//! These commands go through the client crate (`latchkey-client`), so they
//! follow the leader, retry and deduplicate exactly as applications do.

use std::time::Duration;

use latchkey_client::{Client, ClientBuilder, Error, LeaseLost};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use super::{parse_duration, parse_endpoints, Failure};
use super::{EXIT_FAILED, EXIT_LOST, EXIT_NOT_ACQUIRED, EXIT_STALE_TOKEN, EXIT_UNREACHABLE};

/// Flags every lease, lock and election command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Client endpoints, comma-separated HOST:PORT; tried in order, the leader is found from there.
    #[arg(long, env = "LATCHKEY_ENDPOINTS", value_delimiter = ',', global = true)]
    pub endpoints: Vec<String>,
    /// Print one JSON object per result.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long one request keeps retrying through leader changes and
    /// unreachable nodes before the command gives up (500ms, 5s, …).
    #[arg(long, default_value = "5s", value_parser = parse_duration, global = true)]
    pub timeout: Duration,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// TLS and credentials of every client command.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// Dial the endpoints with TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(
        long = "cacert",
        id = "tls_cacert",
        env = "LATCHKEY_CACERT",
        global = true
    )]
    pub cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS; its common name is the user.
    #[arg(
        long = "cert",
        id = "tls_cert",
        env = "LATCHKEY_CERT",
        global = true,
        requires = "tls_key"
    )]
    pub cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(
        long = "key",
        id = "tls_key",
        env = "LATCHKEY_KEY",
        global = true,
        requires = "tls_cert"
    )]
    pub key: Option<std::path::PathBuf>,
    /// Log in as this user (`NAME` with --password, or `NAME:PASSWORD`).
    #[arg(long = "user", id = "auth_user", env = "LATCHKEY_USER", global = true)]
    pub user: Option<String>,
    /// The password of --user.
    #[arg(
        long = "password",
        id = "auth_password",
        env = "LATCHKEY_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// A bearer token from `latchkey auth login`, instead of --user.
    #[arg(
        long = "auth-token",
        id = "auth_token",
        env = "LATCHKEY_TOKEN",
        global = true,
        hide_env_values = true,
        conflicts_with = "auth_user"
    )]
    pub token: Option<String>,
}

impl SecurityArgs {
    /// The TLS settings, if --cacert is given.
    pub fn tls(&self) -> Result<Option<latchkey_client::TlsConfig>, Failure> {
        let Some(ca) = &self.cacert else {
            if self.cert.is_some() {
                return Err(Failure::usage(
                    "--cert needs --cacert (the CA that signed the servers' certificates)",
                ));
            }
            return Ok(None);
        };
        latchkey_client::TlsConfig::from_files(ca, self.cert.as_deref(), self.key.as_deref())
            .map(Some)
            .map_err(|e| Failure::usage(e.to_string()))
    }

    /// The user name and password, if --user is given.
    pub fn login(&self) -> Result<Option<(String, String)>, Failure> {
        let Some(user) = &self.user else {
            return Ok(None);
        };
        match (user.split_once(':'), &self.password) {
            (Some((name, password)), None) => Ok(Some((name.to_string(), password.to_string()))),
            (None, Some(password)) => Ok(Some((user.clone(), password.clone()))),
            (Some(_), Some(_)) => Err(Failure::usage(
                "give the password once: --user NAME:PASSWORD or --user NAME --password PASSWORD",
            )),
            (None, None) => Err(Failure::usage(
                "--user needs a password: --password (or LATCHKEY_PASSWORD), or --user NAME:PASSWORD",
            )),
        }
    }

    /// Applies the TLS settings and credentials to a client builder.
    pub fn apply(&self, mut builder: ClientBuilder) -> Result<ClientBuilder, Failure> {
        if let Some(tls) = self.tls()? {
            builder = builder.tls(tls);
        }
        if let Some((user, password)) = self.login()? {
            builder = builder.credentials(user, password);
        }
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        Ok(builder)
    }
}

/// How often a held lease is renewed. Renewals cost the leader no Raft
/// write, and a short interval means a lease revoked or expired elsewhere
/// is noticed within about this long.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(300);

/// Longest bound on one attempt of a request.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to the cluster behind `--endpoints`, for a command that holds
/// a lease for a while (`lock`, `elect`, `lease keepalive`): its writes are
/// deduplicated under an exactly-once session, closed when it exits.
pub async fn connect(args: &ClientArgs) -> Result<Client, Failure> {
    args.security
        .apply(builder(&args.endpoints, args.timeout)?)?
        .connect()
        .await
        .map_err(failure)
}

/// Connects for a one-shot command (a write or two, then exit): no
/// exactly-once session, so the command takes no slot in the cluster's
/// session table; a write whose outcome is unknown is reported (exit 4),
/// not resent.
pub async fn connect_one_shot(
    endpoints: &[String],
    timeout: Duration,
    security: &SecurityArgs,
) -> Result<Client, Failure> {
    security
        .apply(builder(endpoints, timeout)?)?
        .sessionless()
        .connect()
        .await
        .map_err(failure)
}

/// [`connect_one_shot`] with the shared flags.
pub async fn connect_once(args: &ClientArgs) -> Result<Client, Failure> {
    connect_one_shot(&args.endpoints, args.timeout, &args.security).await
}

fn builder(endpoints: &[String], timeout: Duration) -> Result<ClientBuilder, Failure> {
    let endpoints = parse_endpoints(endpoints)?;
    Ok(Client::builder(endpoints)
        .retry_timeout(timeout)
        .call_timeout(timeout.min(CALL_TIMEOUT))
        .connect_timeout(timeout.min(Duration::from_secs(1)))
        .keepalive_interval(KEEPALIVE_INTERVAL))
}

/// The exit code and message for a client error; see `docs/cli.md`.
pub fn failure(error: Error) -> Failure {
    let code = match &error {
        Error::LockHeld { .. } => EXIT_NOT_ACQUIRED,
        Error::StaleToken { .. } => EXIT_STALE_TOKEN,
        Error::Unavailable { .. } => EXIT_UNREACHABLE,
        Error::Config(_) => super::EXIT_USAGE,
        Error::LeaseNotFound { .. }
        | Error::LeaseLost { .. }
        | Error::InvalidArgument { .. }
        | Error::RevisionMismatch { .. }
        | Error::Timeout { .. }
        | Error::SessionExpired { .. }
        | Error::OutcomeUnknown { .. }
        | Error::Unauthenticated { .. }
        | Error::PermissionDenied { .. }
        | Error::LimitExceeded { .. }
        | Error::Rejected { .. } => EXIT_FAILED,
    };
    let hint = match &error {
        Error::LockHeld { .. } => "; wait for it (drop --no-wait) or try later",
        Error::StaleToken { .. } => "; the grant has ended: acquire again for a new token",
        Error::Unavailable { .. } => {
            "; check --endpoints and `latchkey status` (the write may or may not have been applied)"
        }
        Error::LeaseNotFound { .. } | Error::LeaseLost { .. } => {
            "; grant a new lease (`latchkey lease grant`)"
        }
        Error::Unauthenticated { .. } => {
            "; give --user and --password, --token, or a client certificate (--cert/--key)"
        }
        _ => "",
    };
    Failure {
        code,
        message: format!("{error}{hint}"),
    }
}

/// The failure for a wait that the user bounded with `--wait-timeout`.
pub fn not_acquired(what: &str, name: &str, timeout: Duration) -> Failure {
    Failure {
        code: EXIT_NOT_ACQUIRED,
        message: format!(
            "{what} {name:?} was not granted within {}; it is held by another lease",
            super::format_duration(timeout)
        ),
    }
}

/// Why a lease was lost, in words.
pub fn describe_lost(reason: LeaseLost) -> &'static str {
    match reason {
        LeaseLost::DeadlinePassed => "its lease could not be renewed before its deadline",
        LeaseLost::NotFound => "its lease expired or was revoked",
        LeaseLost::Revoked => "its lease was revoked",
        LeaseLost::GrantEnded => "it was released elsewhere with its token",
    }
}

/// The failure for a grant that ended while it was held.
pub fn lost(what: &str, name: &str, why: &str) -> Failure {
    Failure {
        code: EXIT_LOST,
        message: format!("lost {what} {name:?}: {why}"),
    }
}

/// Why a command that holds something was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    Interrupt,
    Terminate,
    Hangup,
    /// Standard input reached its end.
    InputClosed,
}

/// Completes when the user asks the command to stop: SIGINT (Ctrl-C),
/// SIGTERM, SIGHUP, or — when `watch_stdin` — the end of standard input.
pub struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    input_closed: Option<oneshot::Receiver<()>>,
}

impl StopSignals {
    /// Installs the handlers; from now on these signals no longer kill the
    /// process by default.
    pub fn install(watch_stdin: bool) -> Result<StopSignals, Failure> {
        let install = |kind: SignalKind| {
            signal(kind)
                .map_err(|err| Failure::failed(format!("cannot install a signal handler: {err}")))
        };
        Ok(StopSignals {
            interrupt: install(SignalKind::interrupt())?,
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
            input_closed: watch_stdin.then(stdin_closed),
        })
    }

    /// Waits for the next stop request.
    pub async fn next(&mut self) -> StopRequest {
        let input = async {
            match self.input_closed.as_mut() {
                // A dropped sender means the reader thread hit an error,
                // which is also the end of input.
                Some(closed) => {
                    let _ = closed.await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = self.interrupt.recv() => StopRequest::Interrupt,
            _ = self.terminate.recv() => StopRequest::Terminate,
            _ = self.hangup.recv() => StopRequest::Hangup,
            () = input => StopRequest::InputClosed,
        }
    }
}

/// Reads and discards standard input on a thread of its own (a blocking
/// read would hold up the runtime's shutdown) and reports its end.
fn stdin_closed() -> oneshot::Receiver<()> {
    let (closed, receiver) = oneshot::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buffer = [0u8; 1024];
        let mut stdin = std::io::stdin().lock();
        // Bounded by the input: each pass consumes bytes, and the loop ends
        // at the end of input or on an error.
        loop {
            match stdin.read(&mut buffer) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = closed.send(());
    });
    receiver
}
