//! Delivering one KV request to a node that can serve it.
//!
//! Writes must reach the leader; a follower answers `UNAVAILABLE` and, when it
//! knows the leader, names it in the `latchkey-leader-addr` metadata. Reads
//! are served by any node. [`Router::call`] therefore:
//!
//! 1. tries the endpoints in the order given, skipping ones it cannot connect to;
//! 2. follows a leader hint straight away (at most [`MAX_REDIRECTS`] times), unless
//!    the hinted address just refused a connection (a follower may still name a
//!    leader that died a moment ago);
//! 3. while no leader is known (an election is running), waits with doubling
//!    backoff from [`BACKOFF_START`] up to [`BACKOFF_MAX`], at most
//!    [`MAX_WAITS`] times, and tries the next endpoint;
//! 4. gives up at the overall deadline (`--timeout`).
//!
//! The decisions live in [`Plan`], a pure state machine, so they are tested
//! without a network; [`Router`] only performs the attempts it asks for.
//!
//! A request whose outcome is unknown — the connection broke after it was
//! sent, or the node lost leadership or timed out before confirming it — is
//! resent only if that is harmless: reads, and writes carrying a request id
//! the server deduplicates ([`Idempotence`]). A write without one is resent
//! only when it certainly had no effect (connection refused, "not the leader").

use std::future::Future;
use std::time::Duration;

use latchkey_proto::v1::kv_client::KvClient;
use latchkey_proto::v1::{error_details, ErrorDetails, NotLeader};
use prost::Message;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::connect::{connect, describe_status};
use super::{format_duration, Failure, EXIT_STALE_TOKEN};

/// Leader hints followed per request before giving up.
pub const MAX_REDIRECTS: usize = 5;
/// Backoff rounds per request while no leader is known or a read must be resent.
pub const MAX_WAITS: usize = 10;
/// First backoff; doubles each round.
pub const BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest single backoff.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest wait for one connection, however much of the deadline is left.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Metadata key carrying the leader's client address on a "not the leader" answer.
pub const LEADER_ADDR_METADATA: &str = "latchkey-leader-addr";
/// Metadata key carrying the leader's node id on a "not the leader" answer.
pub const LEADER_ID_METADATA: &str = "latchkey-leader-id";
/// How the server's "not the leader" message starts when it knows no leader
/// (and so sends no metadata).
const NOT_LEADER_MESSAGE: &str = "not the leader";

/// Whether a request may be sent again when its outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotence {
    /// Reads: sending twice is harmless.
    Read,
    /// Writes the server may apply twice: resent only when they certainly
    /// were not applied.
    Write,
    /// Writes carrying a request id that the server deduplicates: a resend
    /// gets the first attempt's result, so it is as safe as a read.
    DeduplicatedWrite,
}

/// How one attempt failed.
#[derive(Debug, Clone)]
pub enum AttemptError {
    /// No connection was made, so nothing was sent.
    Connect(String),
    /// A node refused to serve the request because it is not the leader;
    /// nothing was applied. Carries the leader's client address when known.
    NotLeader { leader_addr: Option<String> },
    /// The request was sent but its fate is unknown: the connection broke,
    /// or the node lost leadership or timed out before confirming it.
    OutcomeUnknown(String),
    /// The node answered with an error that retrying will not change; the
    /// failure carries the exit code for it.
    Rejected(Failure),
    /// The overall deadline passed while waiting for the answer.
    TimedOut,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the request to this endpoint now.
    Try(String),
    /// Wait this long, then send it to this endpoint.
    WaitThenTry(Duration, String),
    /// Stop with this failure.
    GiveUp(Failure),
}

/// Sends KV requests to the cluster behind a list of endpoints.
pub struct Router {
    endpoints: Vec<String>,
    timeout: Duration,
}

impl Router {
    /// `endpoints` must be non-empty (see [`super::parse_endpoints`]).
    pub fn new(endpoints: Vec<String>, timeout: Duration) -> Self {
        assert!(
            !endpoints.is_empty(),
            "a router needs at least one endpoint"
        );
        Router { endpoints, timeout }
    }

    /// Runs `request` against the cluster until one node serves it, following
    /// the rules in the module docs.
    pub async fn call<T, F, Fut>(
        &self,
        idempotence: Idempotence,
        mut request: F,
    ) -> Result<T, Failure>
    where
        F: FnMut(KvClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut plan = Plan::new(&self.endpoints, idempotence, self.timeout);
        let mut target = plan.first();
        // Bounded: every pass either returns or spends one unit of the plan's
        // connect, redirect or wait budgets, and the deadline caps the waits.
        loop {
            let error = match attempt(&target, deadline, &mut request).await {
                Ok(answer) => return Ok(answer),
                Err(error) => error,
            };
            target = match plan.after(&target, error) {
                Step::Try(next) => next,
                Step::WaitThenTry(pause, next) => {
                    tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
                    next
                }
                Step::GiveUp(failure) => return Err(failure),
            };
            if Instant::now() >= deadline {
                return Err(plan.timed_out());
            }
        }
    }
}

async fn attempt<T, F, Fut>(
    endpoint: &str,
    deadline: Instant,
    request: &mut F,
) -> Result<T, AttemptError>
where
    F: FnMut(KvClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(AttemptError::TimedOut);
    }
    let channel = connect(endpoint, left.min(CONNECT_TIMEOUT))
        .await
        .map_err(AttemptError::Connect)?;
    match tokio::time::timeout_at(deadline, request(KvClient::new(channel))).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(classify(&status)),
        Err(_) => Err(AttemptError::TimedOut),
    }
}

/// Sorts a failed call into the cases the plan distinguishes.
///
/// A status built on this side from a transport failure carries a source
/// error; one decoded from a server's answer does not. The server answers
/// `UNAVAILABLE` both for "not the leader" (nothing was proposed) and for
/// "leadership lost" or "shutting down" (the request may have been
/// applied); only the first carries `NotLeader` error details, a leader
/// hint in the metadata, or says "not the leader".
pub fn classify(status: &tonic::Status) -> AttemptError {
    if std::error::Error::source(status).is_some() {
        return AttemptError::OutcomeUnknown(describe_status(status));
    }
    match status.code() {
        tonic::Code::Unavailable if is_not_leader(status) => AttemptError::NotLeader {
            leader_addr: leader_addr(status),
        },
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            AttemptError::OutcomeUnknown(describe_status(status))
        }
        _ if is_stale_token(status) => AttemptError::Rejected(Failure {
            code: EXIT_STALE_TOKEN,
            message: format!(
                "{}; the grant has ended: acquire again for a new token",
                describe_status(status)
            ),
        }),
        _ => AttemptError::Rejected(Failure::failed(describe_status(status))),
    }
}

fn is_stale_token(status: &tonic::Status) -> bool {
    if status.details().is_empty() {
        return false;
    }
    matches!(
        ErrorDetails::decode(status.details())
            .ok()
            .and_then(|d| d.detail),
        Some(error_details::Detail::StaleToken(_))
    )
}

fn is_not_leader(status: &tonic::Status) -> bool {
    not_leader_details(status).is_some()
        || metadata_text(status, LEADER_ID_METADATA).is_some()
        || metadata_text(status, LEADER_ADDR_METADATA).is_some()
        || status.message().starts_with(NOT_LEADER_MESSAGE)
}

/// The leader's client address, from the typed error details if present,
/// else from the metadata.
fn leader_addr(status: &tonic::Status) -> Option<String> {
    not_leader_details(status)
        .map(|details| details.leader_client_addr.trim().to_string())
        .filter(|addr| !addr.is_empty())
        .or_else(|| metadata_text(status, LEADER_ADDR_METADATA))
}

fn not_leader_details(status: &tonic::Status) -> Option<NotLeader> {
    if status.details().is_empty() {
        return None;
    }
    match ErrorDetails::decode(status.details()).ok()?.detail? {
        error_details::Detail::NotLeader(not_leader) => Some(not_leader),
        _ => None,
    }
}

fn metadata_text(status: &tonic::Status, key: &str) -> Option<String> {
    status
        .metadata()
        .get(key)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|text| !text.is_empty())
        .map(str::to_string)
}

/// The retry decisions for one request; pure, so it can be tested alone.
#[derive(Debug)]
pub struct Plan<'a> {
    endpoints: &'a [String],
    idempotence: Idempotence,
    timeout: Duration,
    /// Index in `endpoints` of the next endpoint to try in list order.
    next_endpoint: usize,
    /// Connection failures since the last successful connection.
    connect_failures_in_a_row: usize,
    /// Whether any node answered at all during this request.
    reached_any: bool,
    /// Addresses that refused a connection during this request. Bounded by
    /// the endpoints plus one address per redirect.
    refused: Vec<String>,
    redirects: usize,
    waits: usize,
    last_error: String,
    /// Whether an attempt was sent and never confirmed either way.
    sent_unconfirmed: bool,
}

impl<'a> Plan<'a> {
    pub fn new(endpoints: &'a [String], idempotence: Idempotence, timeout: Duration) -> Self {
        assert!(!endpoints.is_empty(), "a plan needs at least one endpoint");
        Plan {
            endpoints,
            idempotence,
            timeout,
            next_endpoint: 0,
            connect_failures_in_a_row: 0,
            reached_any: false,
            refused: Vec::new(),
            redirects: 0,
            waits: 0,
            last_error: String::new(),
            sent_unconfirmed: false,
        }
    }

    /// The endpoint to try first.
    pub fn first(&mut self) -> String {
        self.next_in_list()
    }

    fn next_in_list(&mut self) -> String {
        let endpoint = self.endpoints[self.next_endpoint % self.endpoints.len()].clone();
        self.next_endpoint = (self.next_endpoint + 1) % self.endpoints.len();
        endpoint
    }

    /// Decides what follows a failed attempt against `target`.
    pub fn after(&mut self, target: &str, error: AttemptError) -> Step {
        if !matches!(error, AttemptError::Connect(_)) {
            self.reached_any = true;
            self.connect_failures_in_a_row = 0;
        }
        if matches!(
            error,
            AttemptError::OutcomeUnknown(_) | AttemptError::TimedOut
        ) {
            self.sent_unconfirmed = true;
        }
        match error {
            AttemptError::Connect(message) => self.after_connect_failure(target, message),
            AttemptError::NotLeader { leader_addr } => self.after_not_leader(target, leader_addr),
            AttemptError::OutcomeUnknown(message) => self.after_outcome_unknown(target, message),
            AttemptError::Rejected(failure) => Step::GiveUp(failure),
            AttemptError::TimedOut => Step::GiveUp(self.timed_out()),
        }
    }

    fn after_connect_failure(&mut self, target: &str, message: String) -> Step {
        self.last_error = format!("{target}: {message}");
        if !self.refused.iter().any(|r| r == target) {
            self.refused.push(target.to_string());
        }
        self.connect_failures_in_a_row += 1;
        if self.connect_failures_in_a_row < self.endpoints.len() {
            return Step::Try(self.next_in_list());
        }
        if !self.reached_any {
            return Step::GiveUp(Failure::unreachable(format!(
                "cannot reach any endpoint ({}); is the cluster running? (`latchkey dev` starts one)",
                self.refused_summary()
            )));
        }
        // Nodes answered earlier in this request, so the cluster is changing
        // (a node restarting, a leader dying): wait and go round again.
        self.connect_failures_in_a_row = 0;
        self.refused.clear();
        self.wait_then(self.next_endpoint_peek())
    }

    fn after_not_leader(&mut self, target: &str, leader_addr: Option<String>) -> Step {
        let usable = leader_addr.filter(|addr| addr != target && !self.refused.contains(addr));
        match usable {
            Some(leader) => {
                self.last_error = format!("{target} is not the leader; it named {leader}");
                self.redirects += 1;
                if self.redirects > MAX_REDIRECTS {
                    return Step::GiveUp(Failure::failed(format!(
                        "gave up after following {MAX_REDIRECTS} leader hints (last: {})",
                        self.last_error
                    )));
                }
                Step::Try(leader)
            }
            None => {
                self.last_error = format!("{target} knows no leader yet");
                self.wait_then(self.next_endpoint_peek())
            }
        }
    }

    fn after_outcome_unknown(&mut self, target: &str, message: String) -> Step {
        self.last_error = format!("{target}: {message}");
        match self.idempotence {
            Idempotence::Read | Idempotence::DeduplicatedWrite => {
                self.wait_then(self.next_endpoint_peek())
            }
            Idempotence::Write => Step::GiveUp(Failure::failed(format!(
                "{target}: {message}; the write may or may not have been applied \
                 — read the key to find out"
            ))),
        }
    }

    /// Backs off, then tries `next`; gives up once the wait budget is spent.
    fn wait_then(&mut self, next: String) -> Step {
        self.waits += 1;
        if self.waits > MAX_WAITS {
            return Step::GiveUp(Failure::failed(format!(
                "gave up after {MAX_WAITS} retries ({}){}",
                self.last_error,
                self.unconfirmed_write_note()
            )));
        }
        self.next_endpoint = (self.next_endpoint + 1) % self.endpoints.len();
        Step::WaitThenTry(backoff(self.waits), next)
    }

    fn next_endpoint_peek(&self) -> String {
        self.endpoints[self.next_endpoint % self.endpoints.len()].clone()
    }

    fn refused_summary(&self) -> String {
        if self.refused.len() == 1 {
            return self.last_error.clone();
        }
        format!(
            "{} endpoints; last: {}",
            self.refused.len(),
            self.last_error
        )
    }

    /// The failure reported when the deadline passes.
    pub fn timed_out(&self) -> Failure {
        let mut message = format!("no result within {}", format_duration(self.timeout));
        if !self.last_error.is_empty() {
            message.push_str(&format!(" (last: {})", self.last_error));
        }
        message.push_str(self.unconfirmed_write_note());
        Failure::failed(message)
    }

    /// Warns, when giving up on a write, that an attempt may have landed.
    fn unconfirmed_write_note(&self) -> &'static str {
        if self.idempotence != Idempotence::Read && self.sent_unconfirmed {
            "; the write may or may not have been applied — read the key to find out"
        } else {
            ""
        }
    }
}

/// Backoff before wait number `round` (1-based): doubling, capped.
pub fn backoff(round: usize) -> Duration {
    let doublings = u32::try_from(round.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(16);
    BACKOFF_START
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests;
