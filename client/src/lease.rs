//! Leases: a server-side grant with a TTL that this client keeps alive, and the
//! client's own view of whether it still holds it.
//!
//! # The local deadline
//! The lease's deadline is kept on this process's monotonic clock as the
//! *send* time of the last acknowledged keepalive plus `TTL × (1 − drift) −
//! margin` (the grant request counts as the first keepalive). `drift` is
//! the bound on clock-rate differences (the larger of this client's and the
//! cluster's, which comes with every grant and renewal) and `margin` is
//! [`crate::ClientBuilder::lease_safety_margin`]. The leader received that
//! keepalive after it was sent, and renewed it only once a quorum confirmed
//! that no other leader could have taken over since; it then expires the
//! lease no earlier than `TTL × (1 + drift)` on its own clock after
//! receiving it, and a new leader restarts every lease at its full TTL. So
//! as long as every clock stays within the drift bound, the cluster never
//! expires the lease before the local deadline (Invariant 4,
//! `docs/semantics.md`). When the local deadline passes, the lease is
//! reported [`LeaseState::Lost`] even if the server has not yet acted: work
//! fenced by the lease must stop then.
//!
//! # Grants ended elsewhere
//! Every renewal lists the tokens of the grants the lease holds. A lock or
//! leadership whose token is missing from the answer to a keepalive sent
//! after it was granted has ended while the lease lives — released or
//! resigned by someone else with its token — and its guard's `lost()`
//! completes with [`LeaseLost::GrantEnded`].
//!
//! # States
//! - [`LeaseState::Held`]: keepalives are being acknowledged.
//! - [`LeaseState::Jeopardy`]: the last keepalive failed, or a renewal is
//!   overdue (nothing acknowledged for two keepalive intervals), but the
//!   deadline has not passed. Work may go on; the lease may yet be saved.
//! - [`LeaseState::Lost`]: the deadline passed, the server said the lease
//!   no longer exists, or it was revoked. Final.
//!
//! The state is computed when asked, from the deadline and the clock, so
//! it turns `Lost` on time even if the keepalive task cannot run.
//!
//! # Keepalives and drop
//! A background task (module `keepalive`) renews the lease every third of
//! its TTL, or more often if [`crate::ClientBuilder::keepalive_interval`]
//! says so (a revoke or expiry elsewhere is then noticed sooner). Clones of a [`Lease`] share it, and so do the lock guards and
//! leaderships taken under it. When the last of them is dropped the task
//! stops and the lease is *not* revoked: the cluster expires it (and
//! releases everything it holds) one TTL after the last keepalive.
//! [`Lease::revoke`] ends it at once.
//! The renewals of all the leases of one [`crate::Client`] share one
//! `KeepAlive` stream per node (module `renewals`), so a client with
//! thousands of leases costs the leader one stream, not thousands.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use latchkey_proto::v1::lease_client::LeaseClient;
use latchkey_proto::v1::{LeaseGrantRequest, LeaseRevokeRequest};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::{CallSpec, Client};
use crate::error::Error;
use crate::keepalive::Keepalive;
use crate::raw::{end_grant, GrantKind};
use crate::types::{FencingToken, LeaseId};

/// How a lease looks from this client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Keepalives are acknowledged.
    Held,
    /// Keepalives are failing, but the deadline has not passed.
    Jeopardy,
    /// The lease is gone, or may be: stop all work done under it.
    Lost,
}

/// Why a lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLost {
    /// The local deadline passed without an acknowledged keepalive.
    DeadlinePassed,
    /// The server said the lease no longer exists (expired or revoked elsewhere).
    NotFound,
    /// [`Lease::revoke`] was called.
    Revoked,
    /// The lease lives, but this grant (a lock or a leadership) ended: it
    /// was released or resigned elsewhere with its token.
    GrantEnded,
}

/// What the keepalive task and the lease handle share.
#[derive(Debug, Clone)]
pub(crate) struct LeaseStatus {
    /// Send time of the last acknowledged keepalive, plus the TTL.
    pub(crate) deadline: Instant,
    /// Send time of the last acknowledged keepalive.
    pub(crate) last_ack_sent: Instant,
    /// The last keepalive attempt failed.
    pub(crate) failing: bool,
    /// Set once, when the lease is known to be over.
    pub(crate) ended: Option<LeaseLost>,
    /// The grants the lease held, as of the latest answered renewal.
    pub(crate) held: HeldGrants,
}

/// The tokens a renewal said the lease holds, and when that renewal was sent.
#[derive(Debug, Clone, Default)]
pub(crate) struct HeldGrants {
    /// Send time of the renewal that listed them; `None` before the first.
    pub(crate) as_of_sent: Option<Instant>,
    pub(crate) tokens: Arc<BTreeSet<u64>>,
}

impl HeldGrants {
    /// Whether a renewal sent after `since` showed that `token` had ended.
    fn ended(&self, token: FencingToken, since: Instant) -> bool {
        self.as_of_sent.is_some_and(|sent| sent > since) && !self.tokens.contains(&token.0)
    }
}

/// How long a lease with `ttl` is trusted after a keepalive was sent:
/// `ttl × (1 − drift) − margin`, with `drift_ppm` in parts per million.
pub(crate) fn trusted_for(ttl: Duration, drift_ppm: u64, margin: Duration) -> Duration {
    let kept_ppm = 1_000_000u64.saturating_sub(drift_ppm);
    let nanos = ttl.as_nanos() * u128::from(kept_ppm) / 1_000_000;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).saturating_sub(margin)
}

impl LeaseStatus {
    /// The state at `now`, for a lease renewed every `interval`.
    pub(crate) fn state_at(&self, now: Instant, interval: Duration) -> LeaseState {
        if self.ended.is_some() || now >= self.deadline {
            return LeaseState::Lost;
        }
        if self.failing || now >= self.last_ack_sent + interval * 2 {
            return LeaseState::Jeopardy;
        }
        LeaseState::Held
    }

    /// Why the lease is lost at `now`, if it is.
    fn lost_at(&self, now: Instant) -> Option<LeaseLost> {
        match self.ended {
            Some(reason) => Some(reason),
            None if now >= self.deadline => Some(LeaseLost::DeadlinePassed),
            None => None,
        }
    }
}

/// How often a lease with this TTL is renewed: a third of the TTL, or
/// `at_most` if that is shorter.
pub(crate) fn keepalive_interval(ttl: Duration, at_most: Option<Duration>) -> Duration {
    let third = ttl / 3;
    at_most.map_or(third, |bound| third.min(bound))
}

/// A lease this client keeps alive. Cheap to clone; see the module docs for
/// what dropping the last clone does.
#[derive(Clone)]
pub struct Lease {
    pub(crate) shared: Arc<LeaseShared>,
}

pub(crate) struct LeaseShared {
    pub(crate) client: Client,
    pub(crate) id: LeaseId,
    pub(crate) ttl: Duration,
    /// Time between renewals.
    interval: Duration,
    status: Arc<watch::Sender<LeaseStatus>>,
    keepalive: AbortOnDrop,
}

/// Stops the keepalive task when the last handle goes.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.shared.id)
            .field("ttl", &self.shared.ttl)
            .field("state", &self.state())
            .finish()
    }
}

impl Client {
    /// Grants a lease with `ttl` (at least twice the cluster's election
    /// timeout; the server refuses shorter ones) and starts keeping it alive.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<Lease, Error> {
        let ttl_ms = u64::try_from(ttl.as_millis())
            .map_err(|_| Error::Config(format!("lease TTL {ttl:?} is too long")))?;
        // The earliest moment the lease can have started on the server.
        let sent = Instant::now();
        let granted = self
            .inner
            .call_write(CallSpec::write(&self.inner.options), |channel, request| {
                let request = LeaseGrantRequest { ttl_ms, request };
                async move { LeaseClient::new(channel).grant(request).await }
            })
            .await?;
        self.inner.cluster_drift(granted.max_clock_drift_ppm);
        let ttl = Duration::from_millis(granted.ttl_ms);
        let status = LeaseStatus {
            deadline: sent + self.inner.trusted_for(ttl),
            last_ack_sent: sent,
            failing: false,
            ended: None,
            held: HeldGrants::default(),
        };
        let status = Arc::new(watch::Sender::new(status));
        let id = LeaseId(granted.lease);
        let interval = keepalive_interval(ttl, self.inner.options.keepalive_interval);
        let task = Keepalive {
            client: self.inner.clone(),
            lease: id,
            interval,
            status: status.clone(),
        };
        let keepalive = AbortOnDrop(tokio::spawn(task.run()));
        Ok(Lease {
            shared: Arc::new(LeaseShared {
                client: self.clone(),
                id,
                ttl,
                interval,
                status,
                keepalive,
            }),
        })
    }
}

impl Lease {
    pub fn id(&self) -> LeaseId {
        self.shared.id
    }

    /// The TTL the server granted.
    pub fn ttl(&self) -> Duration {
        self.shared.ttl
    }

    /// The state now; see the module docs.
    pub fn state(&self) -> LeaseState {
        let status = self.shared.status.borrow();
        status.state_at(Instant::now(), self.shared.interval)
    }

    /// The local deadline: past it, the lease is lost.
    pub fn deadline(&self) -> Instant {
        self.shared.status.borrow().deadline
    }

    /// Completes when the lease is lost, with the reason. Fires at the local
    /// deadline even if the keepalive task is stuck; does not keep the lease
    /// alive by itself.
    pub fn lost(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        self.lost_or(None)
    }

    /// Completes when the lease is lost, or when a renewal sent after
    /// `grant.1` shows that grant `grant.0` has ended.
    pub(crate) fn lost_or(
        &self,
        grant: Option<(FencingToken, Instant)>,
    ) -> impl Future<Output = LeaseLost> + Send + 'static {
        let mut status = self.shared.status.subscribe();
        async move {
            // Bounded: each pass waits for the deadline or for a change,
            // and a lease is renewed at most once per keepalive interval.
            loop {
                let current = status.borrow_and_update().clone();
                if let Some(reason) = current.lost_at(Instant::now()) {
                    return reason;
                }
                if grant.is_some_and(|(token, since)| current.held.ended(token, since)) {
                    return LeaseLost::GrantEnded;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(current.deadline) => {}
                    changed = status.changed() => {
                        if changed.is_err() {
                            // Every handle is gone, so nothing renews it.
                            tokio::time::sleep_until(current.deadline).await;
                            return LeaseLost::DeadlinePassed;
                        }
                    }
                }
            }
        }
    }

    /// Ends the lease now, releasing every lock and leadership it holds.
    /// The lease is reported lost *before* the request is sent, since other
    /// holders may be granted its locks the moment it is applied. A lease
    /// the server no longer has counts as revoked.
    pub async fn revoke(&self) -> Result<(), Error> {
        self.shared.keepalive.0.abort();
        self.shared.status.send_modify(|status| {
            status.ended.get_or_insert(LeaseLost::Revoked);
        });
        let inner = &self.shared.client.inner;
        let lease = self.shared.id.0;
        let revoked = inner
            .call_write(CallSpec::write(&inner.options), |channel, request| {
                let request = LeaseRevokeRequest { lease, request };
                async move { LeaseClient::new(channel).revoke(request).await }
            })
            .await
            .map_err(|e| e.about_lease(self.shared.id));
        match revoked {
            Ok(_) | Err(Error::LeaseNotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Whether a renewal sent after `since` showed grant `token` has ended.
    pub(crate) fn grant_ended(&self, token: FencingToken, since: Instant) -> bool {
        self.shared.status.borrow().held.ended(token, since)
    }

    /// An error for a request that needs the lease, if it is already lost.
    pub(crate) fn check_not_lost(&self) -> Result<(), Error> {
        match self.state() {
            LeaseState::Lost => Err(Error::LeaseLost { lease: self.id() }),
            LeaseState::Held | LeaseState::Jeopardy => Ok(()),
        }
    }
}

/// Releases a lock or resigns a leadership that was dropped without it,
/// in the background and best effort: only while a Tokio runtime runs, and
/// not for a lease already lost (its grants are gone or about to be). The
/// request is fenced by `token`, so it can never end a later grant.
pub(crate) fn end_in_background(lease: &Lease, kind: GrantKind, name: &str, token: FencingToken) {
    if lease.state() == LeaseState::Lost {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let inner = lease.shared.client.inner.clone();
    let name = name.to_string();
    runtime.spawn(async move {
        if let Err(error) = end_grant(&inner, kind, &name, token).await {
            tracing::debug!("ending dropped {kind:?} grant of {name:?} failed: {error}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(now: Instant, ttl: Duration) -> LeaseStatus {
        LeaseStatus {
            deadline: now + ttl,
            last_ack_sent: now,
            failing: false,
            ended: None,
            held: HeldGrants::default(),
        }
    }

    #[test]
    fn a_lease_is_trusted_for_its_ttl_less_the_drift_and_the_margin() {
        let ttl = Duration::from_secs(10);
        let trusted = trusted_for(ttl, 10_000, Duration::from_millis(100));
        assert_eq!(trusted, Duration::from_millis(9_800));
        assert_eq!(trusted_for(ttl, 0, Duration::ZERO), ttl);
        assert_eq!(
            trusted_for(
                Duration::from_millis(50),
                10_000,
                Duration::from_millis(100)
            ),
            Duration::ZERO,
            "never negative"
        );
    }

    #[test]
    fn a_grant_ends_only_by_a_renewal_sent_after_it_that_does_not_list_it() {
        let granted = Instant::now();
        let token = FencingToken(7);
        let before = HeldGrants {
            as_of_sent: Some(granted - Duration::from_millis(1)),
            tokens: Arc::new(BTreeSet::new()),
        };
        assert!(!before.ended(token, granted), "sent before the grant");
        let listed = HeldGrants {
            as_of_sent: Some(granted + Duration::from_millis(1)),
            tokens: Arc::new(BTreeSet::from([7])),
        };
        assert!(!listed.ended(token, granted));
        let missing = HeldGrants {
            as_of_sent: Some(granted + Duration::from_millis(1)),
            tokens: Arc::new(BTreeSet::from([8])),
        };
        assert!(missing.ended(token, granted));
    }

    #[test]
    fn fresh_lease_is_held_then_jeopardy_when_a_renewal_is_overdue_then_lost_at_the_deadline() {
        let start = Instant::now();
        let ttl = Duration::from_secs(3);
        let interval = keepalive_interval(ttl, None);
        let status = status(start, ttl);
        assert_eq!(status.state_at(start, interval), LeaseState::Held);
        let overdue = start + interval * 2;
        assert_eq!(status.state_at(overdue, interval), LeaseState::Jeopardy);
        assert_eq!(status.state_at(start + ttl, interval), LeaseState::Lost);
        assert_eq!(status.lost_at(start + ttl), Some(LeaseLost::DeadlinePassed));
    }

    #[test]
    fn keepalive_interval_is_a_third_of_the_ttl_or_the_configured_bound() {
        let ttl = Duration::from_secs(9);
        assert_eq!(keepalive_interval(ttl, None), Duration::from_secs(3));
        let bound = Some(Duration::from_millis(300));
        assert_eq!(keepalive_interval(ttl, bound), Duration::from_millis(300));
        let short = Duration::from_millis(600);
        assert_eq!(keepalive_interval(short, bound), Duration::from_millis(200));
    }

    #[test]
    fn failing_keepalive_puts_a_lease_in_jeopardy_at_once() {
        let start = Instant::now();
        let ttl = Duration::from_secs(3);
        let mut status = status(start, ttl);
        status.failing = true;
        let interval = keepalive_interval(ttl, None);
        assert_eq!(status.state_at(start, interval), LeaseState::Jeopardy);
    }

    #[test]
    fn ended_lease_is_lost_before_its_deadline() {
        let start = Instant::now();
        let mut status = status(start, Duration::from_secs(3));
        status.ended = Some(LeaseLost::NotFound);
        assert_eq!(
            status.state_at(start, Duration::from_secs(1)),
            LeaseState::Lost
        );
        assert_eq!(status.lost_at(start), Some(LeaseLost::NotFound));
    }
}
