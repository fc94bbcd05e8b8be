//! The connection to a cluster: endpoints, the leader, retries, request ids.
//!
//! # Protocol
//! Writes must reach the Raft leader; a follower refuses them with
//! `UNAVAILABLE` and names the leader's client address in the
//! `latchkey-leader-addr` metadata. The client remembers the last leader it
//! was pointed at (or that accepted a write) and sends every request there
//! first; without one it goes round the endpoints it was given.
//!
//! `Inner::call` runs one request to completion: it sends an attempt,
//! sorts a failure with `retry::classify`, follows a leader hint
//! at once (a few times per call, then with pauses), and otherwise pauses
//! with jittered doubling backoff and tries the next endpoint. It gives up
//! with [`Error::Unavailable`] once failures have gone on for the retry
//! timeout, and with [`Error::Timeout`] when a deadline the caller set
//! passes. Each attempt is bounded by the call timeout, except for calls
//! that block by design (waiting for a lock, campaigning), which are bounded
//! only by the caller's deadline.
//!
//! # Exactly once
//! Every mutating request carries this client's session id and a sequence
//! number taken once per call and reused by all of its attempts, so a
//! write whose first attempt was applied but not acknowledged (connection
//! cut, leader change) is not applied again: the server answers the retry
//! with the first attempt's result. The session is opened with the first
//! write; see [`crate::session`] for the protocol, what happens when it
//! expires, and [`ClientBuilder::sessionless`] clients.
//!
//! Waiting acquires and campaigns are the exception: each attempt takes a
//! new sequence number. Acquiring is idempotent per lease (a lease that
//! holds the lock gets its grant back, one that waits stays in place), and
//! a deduplicated retry would get the first attempt's "queued" answer and
//! then wait for a grant that may already have happened.
//!
//! # TLS and authentication
//! With [`ClientBuilder::tls`] every endpoint is dialed with TLS (an
//! `http://` endpoint is dialed as `https://`), verified against the CA
//! given, presenting the client certificate if one is given. With
//! [`ClientBuilder::credentials`] the client logs in when it connects and
//! sends its bearer token with every call; when the cluster says the token
//! expired or was revoked, it logs in again once and resends the call.
//!
//! # Not done yet
//! - Reads always go to the leader first; spreading linearizable reads over
//!   followers is left for later.
//! - Nothing stops a caller from having more than 64 writes of one
//!   [`Client`] in flight, beyond which a retry of the oldest can no longer
//!   be deduplicated (the server then refuses it as too old).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use latchkey_proto::v1::auth_client::AuthClient;
use latchkey_proto::v1::cluster_client::ClusterClient;
use latchkey_proto::v1::session_client::SessionClient;
use latchkey_proto::v1::{
    error_details, AuthenticateRequest, RequestId, SessionCloseRequest, SessionOpenRequest,
    StatusRequest,
};
use parking_lot::Mutex;
use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::tls::TlsConfig;

use crate::error::{decode_details, describe_status, Error};
use crate::pipeline::Pipelines;
use crate::renewals::Renewals;
use crate::retry::{certainly_not_applied, classify, normalize_endpoint, Backoff, Verdict};
use crate::session::{SessionIds, Ticket};

/// Default bound on one attempt of a call that does not block by design.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a call keeps retrying after its first failure.
pub const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(15);
/// Default bound on opening one connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// First pause between attempts; doubles per failure.
pub(crate) const BACKOFF_FIRST: Duration = Duration::from_millis(20);
/// Longest pause between attempts.
pub(crate) const BACKOFF_LONGEST: Duration = Duration::from_secs(1);
/// Shortest keepalive interval accepted by [`ClientBuilder::keepalive_interval`].
const MIN_KEEPALIVE_INTERVAL: Duration = Duration::from_millis(50);
/// Default of [`ClientBuilder::lease_safety_margin`].
pub const DEFAULT_LEASE_SAFETY_MARGIN: Duration = Duration::from_millis(100);
/// Default of [`ClientBuilder::max_clock_drift_ppm`] (1 %), used until the
/// cluster tells its own bound.
pub const DEFAULT_MAX_CLOCK_DRIFT_PPM: u64 = 10_000;
/// Largest drift bound [`ClientBuilder::max_clock_drift_ppm`] accepts (10 %).
const MAX_MAX_CLOCK_DRIFT_PPM: u64 = 100_000;
/// Leader hints followed without a pause in one call.
const MAX_IMMEDIATE_REDIRECTS: usize = 3;
/// Attempts of one call, however far away its deadline is.
const MAX_ATTEMPTS_PER_CALL: usize = 10_000;
/// Channels kept open: the endpoints given plus leaders the client was
/// pointed at. Past this, channels to hinted leaders are dropped.
const MAX_CHANNELS: usize = 64;
/// HTTP/2 pings on open connections, so that a blocked call or a stream to
/// a node that vanished fails instead of waiting forever.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to one endpoint, carrying the client's bearer token.
pub(crate) type Conn = InterceptedService<Channel, Credentials>;

/// Adds `authorization: Bearer <token>` to every call once the client has
/// a token. Clones share the token.
#[derive(Clone, Default)]
pub(crate) struct Credentials {
    token: Arc<parking_lot::RwLock<Option<MetadataValue<Ascii>>>>,
}

impl Credentials {
    fn set(&self, token: &str) -> Result<(), Error> {
        let value = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| Error::Config("the token has characters a header cannot carry".into()))?;
        *self.token.write() = Some(value);
        Ok(())
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = self.token.read().clone() {
            request.metadata_mut().insert("authorization", token);
        }
        Ok(request)
    }
}

/// Configures and connects a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    options: Options,
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) call_timeout: Duration,
    pub(crate) retry_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    /// Longest time between two renewals of a lease (default: a third of its TTL).
    pub(crate) keepalive_interval: Option<Duration>,
    /// Writes carry no request id (see [`ClientBuilder::sessionless`]).
    pub(crate) sessionless: bool,
    /// The drift bound this client assumes at least (the cluster's own,
    /// told with each grant and renewal, counts when it is larger).
    pub(crate) max_clock_drift_ppm: u64,
    /// Subtracted from every lease deadline.
    pub(crate) lease_safety_margin: Duration,
    pub(crate) tls: Option<TlsConfig>,
    /// User name and password to log in with.
    pub(crate) login: Option<(String, String)>,
    /// A bearer token given outright.
    pub(crate) token: Option<String>,
    /// Lock acquires and releases go on a `Pipeline` stream per node
    /// ([`crate::pipeline`]) rather than one unary call each.
    pub(crate) lock_pipeline: bool,
}

impl ClientBuilder {
    /// A builder for the cluster behind `endpoints` (`host:port` or
    /// `http://host:port`; any subset of the members will do).
    pub fn new<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            options: Options {
                call_timeout: DEFAULT_CALL_TIMEOUT,
                retry_timeout: DEFAULT_RETRY_TIMEOUT,
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                keepalive_interval: None,
                sessionless: false,
                max_clock_drift_ppm: DEFAULT_MAX_CLOCK_DRIFT_PPM,
                lease_safety_margin: DEFAULT_LEASE_SAFETY_MARGIN,
                tls: None,
                login: None,
                token: None,
                lock_pipeline: true,
            },
        }
    }

    /// Bound on one attempt of a call (calls that wait for a lock or a
    /// leadership are bounded only by the deadline their caller gives).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.options.call_timeout = timeout;
        self
    }

    /// How long a call keeps retrying after its first failure before it
    /// returns [`Error::Unavailable`]. Should exceed the cluster's election
    /// timeout comfortably, so that a leader change is ridden out.
    pub fn retry_timeout(mut self, timeout: Duration) -> Self {
        self.options.retry_timeout = timeout;
        self
    }

    /// Bound on opening one connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// Renews leases at least this often, instead of every third of their
    /// TTL. Keepalives cost the leader no Raft write, so a short interval
    /// is cheap; it makes a lease revoked or expired elsewhere show up as
    /// [`crate::LeaseState::Lost`] within about one interval.
    pub fn keepalive_interval(mut self, interval: Duration) -> Self {
        self.options.keepalive_interval = Some(interval.max(MIN_KEEPALIVE_INTERVAL));
        self
    }

    /// Sends writes without a request id, so that this client takes no slot
    /// in the cluster's exactly-once session table: for one-shot tools that
    /// make a request or two and exit. A write whose outcome is unknown (a
    /// timeout, a leader lost mid-request) is then *not* resent, since a
    /// resend could apply it twice; it fails with [`Error::OutcomeUnknown`].
    /// Writes a follower refused, or that never reached a node, are still
    /// resent, and so are acquires and campaigns, which are idempotent per
    /// lease.
    pub fn sessionless(mut self) -> Self {
        self.options.sessionless = true;
        self
    }

    /// Sends lock acquires and releases as unary calls instead of on one
    /// `Lock.Pipeline` stream per node. The answers are the same either
    /// way; the stream costs client and server less per call. Calls to a
    /// node that does not know the stream are unary anyway.
    pub fn unary_lock_calls(mut self) -> Self {
        self.options.lock_pipeline = false;
        self
    }

    /// The largest rate difference between this machine's clock and the
    /// cluster's, in parts per million (default 10 000, 1 %). A lease is
    /// trusted for `TTL × (1 − drift) − margin` after the send time of its
    /// last acknowledged keepalive; the cluster's own bound, which comes
    /// with every grant and renewal, is used when it is larger.
    pub fn max_clock_drift_ppm(mut self, ppm: u64) -> Self {
        self.options.max_clock_drift_ppm = ppm.min(MAX_MAX_CLOCK_DRIFT_PPM);
        self
    }

    /// How long before the cluster could possibly expire a lease this
    /// client stops trusting it (default 100 ms): room for the work between
    /// checking that a lock is held and acting on it.
    pub fn lease_safety_margin(mut self, margin: Duration) -> Self {
        self.options.lease_safety_margin = margin;
        self
    }

    /// Dials every endpoint with TLS under these settings (see [`TlsConfig`]).
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.options.tls = Some(tls);
        self
    }

    /// Logs in as `user` when connecting (`Auth.Authenticate`), and again
    /// whenever the token expires or is revoked.
    pub fn credentials(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.options.login = Some((user.into(), password.into()));
        self
    }

    /// Sends this bearer token (from `latchkey auth login`) with every call.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.options.token = Some(token.into());
        self
    }

    /// Checks the endpoints and contacts the cluster: returns once one
    /// member answers (and adopts the leader it knows), or fails with
    /// [`Error::Unavailable`] when none does within the retry timeout.
    pub async fn connect(self) -> Result<Client, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::Config("no endpoints given".into()));
        }
        let seeds = self
            .endpoints
            .iter()
            .map(|e| normalize_endpoint(e))
            .collect::<Result<Vec<_>, _>>()?;
        let credentials = Credentials::default();
        if let Some(token) = &self.options.token {
            credentials.set(token)?;
        }
        let client = Client {
            inner: Arc::new(Inner {
                router: Router::new(
                    seeds,
                    self.options.connect_timeout,
                    self.options.tls.clone(),
                    credentials,
                ),
                renewals: Renewals::new(self.options.call_timeout),
                pipelines: Pipelines::new(),
                options: self.options,
                sessions: SessionIds::new(),
                cluster_drift_ppm: AtomicU64::new(0),
            }),
        };
        let status = client
            .inner
            .call(
                CallSpec::read(&client.inner.options),
                |channel| async move { ClusterClient::new(channel).status(StatusRequest {}).await },
            )
            .await?;
        if let Ok(leader) = normalize_endpoint(&status.leader_client_addr) {
            client.inner.router.set_leader(leader);
        }
        if client.inner.options.login.is_some() {
            client.inner.login().await?;
        }
        Ok(client)
    }
}

/// A connection to a latchkey cluster. Cheap to clone; clones share
/// connections, the leader they know, and the exactly-once session. When
/// the last clone is dropped the session is closed in the background.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.inner.sessions.current())
            .field("endpoints", &self.inner.router.seeds)
            .finish()
    }
}

impl Client {
    /// Connects with default timeouts; see [`ClientBuilder::connect`].
    pub async fn connect<I, S>(endpoints: I) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder::new(endpoints).connect().await
    }

    /// A builder, to set timeouts before connecting.
    pub fn builder<I, S>(endpoints: I) -> ClientBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ClientBuilder::new(endpoints)
    }

    /// The exactly-once session this client's writes are deduplicated
    /// under, once its first write opened one; `None` before that and for
    /// [`ClientBuilder::sessionless`] clients.
    pub fn session_id(&self) -> Option<u64> {
        self.inner.sessions.current()
    }
}

/// How one call is run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallSpec {
    /// Bound on one attempt; `None` for calls that block by design.
    pub(crate) attempt_timeout: Option<Duration>,
    /// When the caller stops waiting altogether.
    pub(crate) deadline: Option<Instant>,
    /// Whether a success tells us who leads (writes only reach the leader).
    pub(crate) is_write: bool,
    /// Each attempt takes a new request id, and resending is safe without
    /// deduplication (acquires and campaigns: idempotent per lease).
    pub(crate) idempotent: bool,
}

impl CallSpec {
    pub(crate) fn read(options: &Options) -> CallSpec {
        CallSpec {
            attempt_timeout: Some(options.call_timeout),
            deadline: None,
            is_write: false,
            idempotent: false,
        }
    }

    pub(crate) fn write(options: &Options) -> CallSpec {
        CallSpec {
            is_write: true,
            ..CallSpec::read(options)
        }
    }

    /// A write that waits on the server (an acquire or a campaign) until
    /// `deadline`, if any.
    pub(crate) fn blocking_write(deadline: Option<Instant>) -> CallSpec {
        CallSpec {
            attempt_timeout: None,
            deadline,
            is_write: true,
            idempotent: true,
        }
    }
}

/// State shared by the clones of one [`Client`].
pub(crate) struct Inner {
    pub(crate) router: Router,
    pub(crate) options: Options,
    sessions: SessionIds,
    /// The largest drift bound the cluster has told (0: none yet).
    cluster_drift_ppm: AtomicU64,
    /// The `KeepAlive` streams the client's leases share.
    pub(crate) renewals: Renewals,
    /// The `Lock.Pipeline` streams lock calls go on.
    pub(crate) pipelines: Pipelines,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let Some(session) = self.sessions.current() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(channel) = self.router.channel(&self.router.first_target()) else {
            return;
        };
        // Best effort: an unclosed session expires once idle.
        runtime.spawn(async move {
            let request = SessionCloseRequest { session };
            let mut client = SessionClient::new(channel);
            let _ = tokio::time::timeout(DEFAULT_CALL_TIMEOUT, client.close(request)).await;
        });
    }
}

enum AttemptFailed {
    Status(tonic::Status),
    /// The caller's deadline passed.
    Deadline,
}

impl Inner {
    /// The drift bound to count leases with: this client's, or the
    /// cluster's if it told a larger one.
    pub(crate) fn drift_ppm(&self) -> u64 {
        let cluster = self.cluster_drift_ppm.load(Ordering::Relaxed);
        self.options.max_clock_drift_ppm.max(cluster)
    }

    /// How long a lease with `ttl` is trusted after a keepalive was sent.
    pub(crate) fn trusted_for(&self, ttl: Duration) -> Duration {
        crate::lease::trusted_for(ttl, self.drift_ppm(), self.options.lease_safety_margin)
    }

    /// Notes the drift bound the cluster told with a grant or renewal.
    pub(crate) fn cluster_drift(&self, ppm: u64) {
        let ppm = ppm.min(MAX_MAX_CLOCK_DRIFT_PPM);
        self.cluster_drift_ppm.fetch_max(ppm, Ordering::Relaxed);
    }

    /// Logs in with the configured user name and password and keeps the
    /// token for the calls that follow.
    pub(crate) async fn login(&self) -> Result<(), Error> {
        let Some((user, password)) = self.options.login.clone() else {
            return Ok(());
        };
        let answer = self
            .call(CallSpec::read(&self.options), |channel| {
                let request = AuthenticateRequest {
                    user: user.clone(),
                    password: password.clone(),
                };
                async move { AuthClient::new(channel).authenticate(request).await }
            })
            .await?;
        self.router.credentials.set(&answer.token)
    }

    /// A request id for one call: a ticket in the open session, which is
    /// opened first if there is none. `None` for sessionless clients.
    async fn ticket(&self) -> Result<Option<Ticket<'_>>, Error> {
        if self.options.sessionless {
            return Ok(None);
        }
        if let Some(ticket) = self.sessions.ticket() {
            return Ok(Some(ticket));
        }
        let _opening = self.sessions.opening.lock().await;
        if self.sessions.current().is_none() {
            // Boxed: `call` runs the same retry loop that may ask for a ticket.
            let opened = Box::pin(self.call(
                CallSpec::write(&self.options),
                |channel| async move {
                    SessionClient::new(channel)
                        .open(SessionOpenRequest {})
                        .await
                },
            ))
            .await?;
            self.sessions.opened(opened.session);
        }
        Ok(self.sessions.ticket())
    }

    /// Runs a read (or a call that needs no request id) against the cluster
    /// until it succeeds, fails for good, or runs out of time; see the
    /// module docs.
    pub(crate) async fn call<T, F, Fut>(&self, spec: CallSpec, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.run(spec, None, |target, _| {
            Ok(attempt(self.router.channel_for_call(target)?))
        })
        .await
    }

    /// Runs a read as [`Inner::call`] does, but gives each attempt the
    /// endpoint it goes to instead of a connection to it.
    pub(crate) async fn call_at<T, F, Fut>(
        &self,
        spec: CallSpec,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut(&str) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.run(spec, None, |target, _| Ok(attempt(target))).await
    }

    /// Runs a mutating call: each attempt is given the call's request id
    /// (a new one per attempt for [`CallSpec::idempotent`] calls; `None`
    /// for sessionless clients).
    pub(crate) async fn call_write<T, F, Fut>(
        &self,
        spec: CallSpec,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut(Conn, Option<RequestId>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let ticket = self.ticket().await?;
        self.run(spec, Some(ticket), |target, id| {
            Ok(attempt(self.router.channel_for_call(target)?, id))
        })
        .await
    }

    /// Runs a mutating call as [`Inner::call_write`] does, but gives each
    /// attempt the endpoint it goes to instead of a connection to it.
    pub(crate) async fn call_write_at<T, F, Fut>(
        &self,
        spec: CallSpec,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut(String, Option<RequestId>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let ticket = self.ticket().await?;
        self.run(spec, Some(ticket), |target, id| {
            Ok(attempt(target.to_string(), id))
        })
        .await
    }

    /// The retry loop. `ticket` is `Some` for writes (holding `None` when
    /// sessionless) and `None` for reads. `attempt` is given the endpoint
    /// to try and the request id; an `Err` from it is that attempt's failure.
    async fn run<T, F, Fut>(
        &self,
        spec: CallSpec,
        mut ticket: Option<Option<Ticket<'_>>>,
        mut attempt: F,
    ) -> Result<T, Error>
    where
        F: FnMut(&str, Option<RequestId>) -> Result<Fut, tonic::Status>,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let is_write = ticket.is_some();
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_LONGEST);
        let mut target = self.router.first_target();
        let mut first_failure: Option<Instant> = None;
        let mut redirects = 0;
        // Whether some attempt may have been applied.
        let mut maybe_applied = false;
        let mut logged_in_again = false;
        for attempts in 0..MAX_ATTEMPTS_PER_CALL {
            if spec.idempotent && is_write && attempts > 0 {
                // Drop the old ticket first: it no longer counts as pending.
                drop(ticket.take());
                ticket = Some(self.ticket().await?);
            }
            let id = ticket
                .as_ref()
                .and_then(|t| t.as_ref().map(Ticket::request_id));
            let mut once = |target: &str| attempt(target, id);
            let status = match self.attempt(&target, spec, &mut once).await {
                Ok(answer) => {
                    if spec.is_write {
                        self.router.set_leader(target);
                    }
                    return Ok(answer);
                }
                Err(AttemptFailed::Deadline) => return Err(timed_out(first_failure)),
                Err(AttemptFailed::Status(status)) => status,
            };
            if !logged_in_again && self.options.login.is_some() && token_needs_renewal(&status) {
                // Refused before anything was done: log in again and resend.
                logged_in_again = true;
                Box::pin(self.login()).await?;
                continue;
            }
            if let Some(expired) = expired_session(&status) {
                self.sessions.expired(expired.session);
                if maybe_applied && !spec.idempotent {
                    return Err(Error::SessionExpired {
                        session: expired.session,
                        seq: expired.seq,
                    });
                }
                drop(ticket.take());
                ticket = Some(self.ticket().await?);
                continue;
            }
            let now = Instant::now();
            let since = *first_failure.get_or_insert(now);
            let verdict = classify(&status);
            tracing::debug!(%target, ?verdict, "attempt failed: {}", describe_status(&status));
            if verdict == Verdict::Fail {
                return Err(Error::from_status(&status));
            }
            if is_write && !certainly_not_applied(&status) {
                maybe_applied = true;
                if self.options.sessionless && !spec.idempotent {
                    return Err(Error::OutcomeUnknown {
                        message: describe_status(&status),
                    });
                }
            }
            if now >= since + self.options.retry_timeout {
                return Err(unavailable(&status));
            }
            let pause = match verdict {
                Verdict::FollowLeader(leader) => {
                    let immediate = redirects < MAX_IMMEDIATE_REDIRECTS && leader != target;
                    redirects += 1;
                    self.router.set_leader(leader.clone());
                    target = leader;
                    if immediate {
                        continue;
                    }
                    backoff.next_pause(&mut rand::thread_rng())
                }
                Verdict::TryElsewhere | Verdict::Fail => {
                    target = self.router.after_failure(&target, &status);
                    backoff.next_pause(&mut rand::thread_rng())
                }
            };
            let resume = now + pause;
            if spec.deadline.is_some_and(|deadline| deadline <= resume) {
                return Err(timed_out(first_failure));
            }
            tokio::time::sleep_until(resume).await;
        }
        Err(Error::Unavailable {
            message: format!("gave up after {MAX_ATTEMPTS_PER_CALL} attempts"),
        })
    }

    async fn attempt<T, F, Fut>(
        &self,
        target: &str,
        spec: CallSpec,
        attempt: &mut F,
    ) -> Result<T, AttemptFailed>
    where
        F: FnMut(&str) -> Result<Fut, tonic::Status>,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let call = attempt(target).map_err(AttemptFailed::Status)?;
        let attempt_deadline = spec.attempt_timeout.map(|t| Instant::now() + t);
        let until = match (attempt_deadline, spec.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let answer = match until {
            Some(until) => tokio::time::timeout_at(until, call).await,
            None => Ok(call.await),
        };
        match answer {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(AttemptFailed::Status(status)),
            Err(_) if spec.deadline.is_some_and(|d| Instant::now() >= d) => {
                Err(AttemptFailed::Deadline)
            }
            Err(_) => Err(AttemptFailed::Status(tonic::Status::deadline_exceeded(
                format!("no answer from {target} within the call timeout"),
            ))),
        }
    }
}

/// Whether a refusal says the token expired or was revoked.
fn token_needs_renewal(status: &tonic::Status) -> bool {
    use latchkey_proto::v1::unauthenticated::Reason;
    match decode_details(status) {
        Some(error_details::Detail::Unauthenticated(refusal)) => matches!(
            Reason::try_from(refusal.reason),
            Ok(Reason::TokenExpired | Reason::TokenRevoked)
        ),
        _ => false,
    }
}

/// The session a refusal says has expired.
fn expired_session(status: &tonic::Status) -> Option<latchkey_proto::v1::SessionExpired> {
    match decode_details(status)? {
        error_details::Detail::SessionExpired(expired) => Some(expired),
        _ => None,
    }
}

fn unavailable(status: &tonic::Status) -> Error {
    Error::Unavailable {
        message: describe_status(status),
    }
}

fn timed_out(first_failure: Option<Instant>) -> Error {
    let message = match first_failure {
        Some(_) => "the deadline passed while retrying".to_string(),
        None => "the deadline passed".to_string(),
    };
    Error::Timeout { message }
}

/// Endpoints, one lazily connected channel per endpoint, and the leader.
pub(crate) struct Router {
    seeds: Vec<String>,
    connect_timeout: Duration,
    tls: Option<TlsConfig>,
    credentials: Credentials,
    channels: Mutex<HashMap<String, Channel>>,
    leader: Mutex<Option<String>>,
    cursor: AtomicUsize,
}

impl Router {
    pub(crate) fn new(
        seeds: Vec<String>,
        connect_timeout: Duration,
        tls: Option<TlsConfig>,
        credentials: Credentials,
    ) -> Router {
        assert!(!seeds.is_empty(), "a router needs at least one endpoint");
        Router {
            seeds,
            connect_timeout,
            tls,
            credentials,
            channels: Mutex::new(HashMap::new()),
            leader: Mutex::new(None),
            cursor: AtomicUsize::new(0),
        }
    }

    /// Where a new call goes first: the known leader, else the next seed.
    pub(crate) fn first_target(&self) -> String {
        if let Some(leader) = self.leader.lock().clone() {
            return leader;
        }
        let index = self.cursor.load(Ordering::Relaxed) % self.seeds.len();
        self.seeds[index].clone()
    }

    /// Where to go after `failed` could not serve: the next seed that is
    /// not `failed` (when there is another).
    fn next_target(&self, failed: &str) -> String {
        // Bounded: at most one lap of the seeds.
        for _ in 0..self.seeds.len() {
            let index = self.cursor.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            let candidate = &self.seeds[index % self.seeds.len()];
            if candidate != failed {
                return candidate.clone();
            }
        }
        failed.to_string()
    }

    pub(crate) fn set_leader(&self, leader: String) {
        *self.leader.lock() = Some(leader);
    }

    /// Notes that `target` could not serve: it is no longer taken for the
    /// leader, and a connection that failed is rebuilt on next use.
    fn failed(&self, target: &str, status: &tonic::Status) {
        {
            let mut leader = self.leader.lock();
            if leader.as_deref() == Some(target) {
                *leader = None;
            }
        }
        if std::error::Error::source(status).is_some() {
            self.channels.lock().remove(target);
        }
    }

    /// Notes that `target` could not serve and picks where to go next: the
    /// leader, if one other than `target` is known, else the next seed.
    pub(crate) fn after_failure(&self, target: &str, status: &tonic::Status) -> String {
        self.failed(target, status);
        let next = self.first_target();
        if next != target {
            return next;
        }
        self.next_target(target)
    }

    /// The connection to `endpoint`, created (unconnected) on first use.
    pub(crate) fn channel(&self, endpoint: &str) -> Result<Conn, Error> {
        let channel = self.raw_channel(endpoint)?;
        Ok(InterceptedService::new(channel, self.credentials.clone()))
    }

    /// [`Router::channel`], its failure as the `UNAVAILABLE` status of the
    /// call that needed it.
    pub(crate) fn channel_for_call(&self, endpoint: &str) -> Result<Conn, tonic::Status> {
        self.channel(endpoint)
            .map_err(|error| tonic::Status::unavailable(error.to_string()))
    }

    fn raw_channel(&self, endpoint: &str) -> Result<Channel, Error> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        if channels.len() >= MAX_CHANNELS {
            let seeds = &self.seeds;
            channels.retain(|key, _| seeds.contains(key));
        }
        let dialed = match (&self.tls, endpoint.strip_prefix("http://")) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => endpoint.to_string(),
        };
        let mut target = Endpoint::from_shared(dialed)
            .map_err(|e| Error::Config(format!("endpoint {endpoint:?}: {e}")))?;
        if let Some(tls) = &self.tls {
            target = tls.apply(target)?;
        }
        let channel = target
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
            .connect_lazy();
        channels.insert(endpoint.to_string(), channel.clone());
        Ok(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let seeds = vec!["http://a:1".to_string(), "http://b:1".to_string()];
        Router::new(seeds, DEFAULT_CONNECT_TIMEOUT, None, Credentials::default())
    }

    #[test]
    fn known_leader_is_tried_first_until_it_fails() {
        let router = router();
        router.set_leader("http://c:1".into());
        assert_eq!(router.first_target(), "http://c:1");
        router.failed("http://c:1", &tonic::Status::unavailable("gone"));
        assert_ne!(router.first_target(), "http://c:1");
    }

    #[test]
    fn next_target_skips_the_endpoint_that_failed() {
        let router = router();
        for _ in 0..4 {
            assert_eq!(router.next_target("http://a:1"), "http://b:1");
        }
    }
}
