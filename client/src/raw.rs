//! Calls by lease id and token, with nothing kept alive for the caller.
//!
//! [`Client::raw`] gives the requests behind [`crate::Lease`],
//! [`crate::LockGuard`] and [`crate::Leadership`] one by one, for scripts,
//! command-line tools and tests that hold ids and tokens rather than
//! guards: a lease granted here is not renewed unless the caller calls
//! [`Raw::keepalive`], and a grant taken here is not released on drop.
//! Applications should prefer the guards, which know when their lease can
//! no longer be trusted.
//!
//! Every call goes through the same leader-following, retrying path as the
//! rest of the client, and every write carries a request id, so a retry is
//! applied once.

use std::time::Duration;

use latchkey_proto::v1::election_client::ElectionClient;
use latchkey_proto::v1::lease_client::LeaseClient;
use latchkey_proto::v1::lock_client::LockClient;
use latchkey_proto::v1::{
    AcquireRequest, DescribeRequest, LeaseGrantRequest, LeaseListRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest, ReleaseRequest, ResignRequest,
};
use tokio::time::Instant;

use crate::client::{CallSpec, Client, Inner};
use crate::error::Error;
use crate::types::{FencingToken, GrantInfo, LeaseId};

/// Low-level calls; see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Raw<'a> {
    client: &'a Client,
}

/// A lease as the cluster sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: LeaseId,
    /// The TTL it was granted with.
    pub ttl: Duration,
    /// Time left before the leader expires it, unless renewed.
    pub remaining: Duration,
    /// Locks and leaderships it holds.
    pub grants: Vec<GrantInfo>,
    /// Names of the locks and elections it waits for.
    pub waiting: Vec<String>,
}

/// One entry of [`Raw::leases`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSummary {
    pub id: LeaseId,
    pub ttl: Duration,
    /// How many locks and leaderships it holds.
    pub grants: u32,
}

/// Who holds a lock and who waits for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    pub holder: Option<GrantInfo>,
    /// Waiting leases, first in line first.
    pub waiters: Vec<LeaseId>,
}

impl Client {
    /// Calls by lease id and token; see [`crate::raw`].
    pub fn raw(&self) -> Raw<'_> {
        Raw { client: self }
    }
}

impl Raw<'_> {
    fn inner(&self) -> &Inner {
        &self.client.inner
    }

    /// Grants a lease and returns its id and the TTL the server granted.
    /// Nothing renews it.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<(LeaseId, Duration), Error> {
        let inner = self.inner();
        let ttl_ms = u64::try_from(ttl.as_millis())
            .map_err(|_| Error::Config(format!("lease TTL {ttl:?} is too long")))?;
        let granted = inner
            .call_write(CallSpec::write(&inner.options), |channel, request| {
                let request = LeaseGrantRequest { ttl_ms, request };
                async move { LeaseClient::new(channel).grant(request).await }
            })
            .await?;
        Ok((
            LeaseId(granted.lease),
            Duration::from_millis(granted.ttl_ms),
        ))
    }

    /// Renews `lease` once and returns the time it has left. Fails with
    /// [`Error::LeaseNotFound`] if the cluster no longer has it. Goes on
    /// the `KeepAlive` stream the client's leases share, so many calls at
    /// once cost one stream, not one each.
    pub async fn keepalive(&self, lease: LeaseId) -> Result<Duration, Error> {
        let inner = self.inner();
        let answer = inner
            .call_at(CallSpec::write(&inner.options), |target| {
                let target = target.to_string();
                async move {
                    let answer = inner.renewals.renew(&inner.router, &target, lease).await?;
                    Ok(tonic::Response::new(answer))
                }
            })
            .await?;
        if !answer.found {
            return Err(Error::LeaseNotFound { lease: Some(lease) });
        }
        Ok(Duration::from_millis(answer.remaining_ms))
    }

    /// Ends `lease`, releasing everything it holds. A lease the cluster no
    /// longer has is reported as [`Error::LeaseNotFound`].
    pub async fn revoke_lease(&self, lease: LeaseId) -> Result<(), Error> {
        let inner = self.inner();
        inner
            .call_write(CallSpec::write(&inner.options), |channel, request| {
                let request = LeaseRevokeRequest {
                    lease: lease.0,
                    request,
                };
                async move { LeaseClient::new(channel).revoke(request).await }
            })
            .await
            .map(|_| ())
            .map_err(|e| e.about_lease(lease))
    }

    /// What the cluster knows of `lease`; `None` if it has no such lease.
    pub async fn lease_info(&self, lease: LeaseId) -> Result<Option<LeaseInfo>, Error> {
        let inner = self.inner();
        let answer = inner
            .call(CallSpec::read(&inner.options), |channel| async move {
                let request = LeaseTimeToLiveRequest {
                    lease: lease.0,
                    serializable: false,
                };
                LeaseClient::new(channel).time_to_live(request).await
            })
            .await?;
        if !answer.found {
            return Ok(None);
        }
        Ok(Some(LeaseInfo {
            id: LeaseId(answer.lease),
            ttl: Duration::from_millis(answer.ttl_ms),
            remaining: Duration::from_millis(answer.remaining_ms),
            grants: answer.grants.into_iter().map(GrantInfo::from).collect(),
            waiting: answer.waiting,
        }))
    }

    /// Every lease the cluster has, by id.
    pub async fn leases(&self) -> Result<Vec<LeaseSummary>, Error> {
        let inner = self.inner();
        let answer = inner
            .call(CallSpec::read(&inner.options), |channel| async move {
                let request = LeaseListRequest {
                    serializable: false,
                };
                LeaseClient::new(channel).list(request).await
            })
            .await?;
        let mut leases: Vec<LeaseSummary> = answer
            .leases
            .into_iter()
            .map(|info| LeaseSummary {
                id: LeaseId(info.lease),
                ttl: Duration::from_millis(info.ttl_ms),
                grants: info.grants,
            })
            .collect();
        leases.sort_by_key(|lease| lease.id);
        Ok(leases)
    }

    /// Acquires lock `name` for `lease`. With `wait` false it fails at once
    /// with [`Error::LockHeld`] if another lease holds the lock; with `wait`
    /// true it queues and waits, until `timeout` if one is given
    /// ([`Error::Timeout`], leaving the queue).
    pub async fn acquire(
        &self,
        name: &str,
        lease: LeaseId,
        wait: bool,
        timeout: Option<Duration>,
    ) -> Result<GrantInfo, Error> {
        let inner = self.inner();
        let spec = if wait {
            CallSpec::blocking_write(timeout.map(|t| Instant::now() + t))
        } else {
            CallSpec::write(&inner.options)
        };
        let answer = inner
            .call_write_at(spec, |target, id| {
                // A waiting acquire takes a new request id per attempt; see
                // `crate::client`.
                let request = AcquireRequest {
                    name: name.to_string(),
                    lease: lease.0,
                    wait,
                    request: id,
                };
                inner.acquire_at(target, request)
            })
            .await
            .map_err(|e| e.about_lease(lease))?;
        answer
            .grant
            .map(GrantInfo::from)
            .ok_or_else(|| Error::Rejected {
                code: tonic::Code::Internal,
                message: "acquire answered without a grant".into(),
            })
    }

    /// Releases lock `name` if `token` is its current grant; otherwise fails
    /// with [`Error::StaleToken`] and changes nothing.
    pub async fn release(&self, name: &str, token: FencingToken) -> Result<(), Error> {
        end_grant(self.inner(), GrantKind::Lock, name, token).await
    }

    /// Ends leadership of election `name` if `token` is its current
    /// leadership; otherwise fails with [`Error::StaleToken`].
    pub async fn resign(&self, name: &str, token: FencingToken) -> Result<(), Error> {
        end_grant(self.inner(), GrantKind::Election, name, token).await
    }

    /// Who holds lock `name` and who waits for it.
    pub async fn describe_lock(&self, name: &str) -> Result<LockInfo, Error> {
        let inner = self.inner();
        let answer = inner
            .call(CallSpec::read(&inner.options), |channel| {
                let request = DescribeRequest {
                    name: name.to_string(),
                    serializable: false,
                };
                async move { LockClient::new(channel).describe(request).await }
            })
            .await?;
        Ok(LockInfo {
            holder: answer.holder.map(GrantInfo::from),
            waiters: answer.waiters.into_iter().map(LeaseId).collect(),
        })
    }
}

/// Which kind of grant [`end_grant`] ends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum GrantKind {
    Lock,
    Election,
}

/// Releases a lock or resigns a leadership, fenced by `token`.
pub(crate) async fn end_grant(
    inner: &Inner,
    kind: GrantKind,
    name: &str,
    token: FencingToken,
) -> Result<(), Error> {
    let spec = CallSpec::write(&inner.options);
    match kind {
        GrantKind::Lock => inner
            .call_write_at(spec, |target, id| {
                let request = ReleaseRequest {
                    name: name.to_string(),
                    token: token.0,
                    request: id,
                };
                inner.release_at(target, request)
            })
            .await
            .map(|_| ()),
        GrantKind::Election => inner
            .call_write(spec, |channel, id| {
                let request = ResignRequest {
                    name: name.to_string(),
                    token: token.0,
                    request: id,
                };
                async move { ElectionClient::new(channel).resign(request).await }
            })
            .await
            .map(|_| ()),
    }
}
