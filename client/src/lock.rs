//! Named exclusive locks held by a lease.
//!
//! [`Lease::lock`] queues for the lock (first come, first served) and
//! returns a [`LockGuard`] once granted; [`Lease::try_lock`] fails at once
//! with [`Error::LockHeld`] — naming the holder's lease and token — if
//! another lease holds it; [`Lease::lock_with_timeout`] gives up with
//! [`Error::Timeout`] and leaves the queue. A lease that already holds the
//! lock gets its grant back.
//!
//! The guard knows its fencing token and when it can no longer trust the
//! lock: [`LockGuard::lost`] completes when the lease is lost, or when a
//! renewal of the lease shows that the lock was released elsewhere with
//! this guard's token ([`LeaseLost::GrantEnded`], within about one
//! keepalive interval). Fence every write made under the lock with the
//! guard (`client.put(k, v).fence(&guard)`), so that a holder that kept
//! working past its lease is refused.
//!
//! Waiting stops with [`Error::LeaseLost`] as soon as the lease is lost
//! locally, and a grant that arrives for a lease already lost locally is
//! refused the same way rather than handed out.
//!
//! # Drop
//! Dropping a guard without calling [`LockGuard::release`] releases the lock
//! in the background, best effort (when a Tokio runtime is running). The
//! release is fenced by the guard's token, so it can never release a later
//! holder's grant.
//!
//! # Resent waits
//! A waiting acquire whose connection broke is resent. The node it waited
//! on proposes to take the first wait out of the queue; that cancel names
//! the log index of the first attempt, and the server ignores it once the
//! resent acquire has been applied, so the resent one keeps the lease's
//! place. If the cancel lands first, the resent acquire queues again at
//! the back.

use std::future::Future;
use std::time::Duration;

use latchkey_proto::v1::{AcquireRequest, Grant};
use tokio::time::Instant;

use crate::client::CallSpec;
use crate::error::Error;
use crate::lease::{end_in_background, Lease, LeaseLost, LeaseState};
use crate::raw::{end_grant, GrantKind};
use crate::types::{Fence, FenceKind, Fenced, FencingToken, Revision};

/// A held lock. See the module docs for what dropping it does.
#[derive(Debug)]
pub struct LockGuard {
    lease: Lease,
    name: String,
    token: FencingToken,
    revision: Revision,
    /// When the grant reached this client: renewals sent after it list it.
    granted_at: Instant,
    released: bool,
}

impl Lease {
    /// Waits until this lease holds lock `name`. Stops with
    /// [`Error::LeaseLost`] if the lease is lost first.
    pub async fn lock(&self, name: &str) -> Result<LockGuard, Error> {
        self.acquire_waiting(name, None).await
    }

    /// Like [`Lease::lock`], but gives up after `timeout` with
    /// [`Error::Timeout`], leaving the queue.
    pub async fn lock_with_timeout(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<LockGuard, Error> {
        self.acquire_waiting(name, Some(Instant::now() + timeout))
            .await
            .map_err(|error| match error {
                Error::Timeout { .. } => Error::Timeout {
                    message: format!("lock {name:?} was not granted within {timeout:?}"),
                },
                other => other,
            })
    }

    /// Takes lock `name` if it is free (or already held by this lease);
    /// otherwise fails with [`Error::LockHeld`].
    pub async fn try_lock(&self, name: &str) -> Result<LockGuard, Error> {
        self.check_not_lost()?;
        let inner = &self.shared.client.inner;
        let request = AcquireRequest {
            name: name.to_string(),
            lease: self.id().0,
            wait: false,
            request: None,
        };
        let grant = inner
            .call_write_at(CallSpec::write(&inner.options), |target, id| {
                let mut request = request.clone();
                request.request = id;
                inner.acquire_at(target, request)
            })
            .await
            .map_err(|e| e.about_lease(self.id()))?;
        self.guard_from(grant.grant)
    }

    async fn acquire_waiting(
        &self,
        name: &str,
        deadline: Option<Instant>,
    ) -> Result<LockGuard, Error> {
        self.check_not_lost()?;
        let inner = &self.shared.client.inner;
        let lease = self.id();
        let acquire = inner.call_write_at(CallSpec::blocking_write(deadline), |target, id| {
            // A new request id per attempt: see `crate::client`.
            let request = AcquireRequest {
                name: name.to_string(),
                lease: lease.0,
                wait: true,
                request: id,
            };
            inner.acquire_at(target, request)
        });
        let grant = tokio::select! {
            granted = acquire => granted.map_err(|e| e.about_lease(lease))?,
            _ = self.lost() => return Err(Error::LeaseLost { lease }),
        };
        self.guard_from(grant.grant)
    }

    /// Checks a grant the server returned and wraps it in a guard.
    fn guard_from(&self, grant: Option<Grant>) -> Result<LockGuard, Error> {
        let grant = grant.ok_or_else(|| Error::Rejected {
            code: tonic::Code::Internal,
            message: "acquire answered without a grant".into(),
        })?;
        if grant.lease != self.id().0 {
            return Err(Error::Rejected {
                code: tonic::Code::Internal,
                message: format!(
                    "the server answered with a grant of {:?} to lease {}, not {}",
                    grant.name,
                    grant.lease,
                    self.id()
                ),
            });
        }
        // A grant that arrives after the local deadline cannot be trusted.
        self.check_not_lost()?;
        Ok(LockGuard {
            lease: self.clone(),
            name: grant.name,
            token: FencingToken(grant.token),
            revision: Revision(grant.revision),
            granted_at: Instant::now(),
            released: false,
        })
    }
}

impl LockGuard {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this grant.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Revision of the entry that granted the lock (0 when the server did
    /// not report it, as for grants that were waited for).
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The lease the lock is held by.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The lease's state, or [`LeaseState::Lost`] once a renewal showed
    /// the lock was released elsewhere.
    pub fn state(&self) -> LeaseState {
        if self.lease.grant_ended(self.token, self.granted_at) {
            return LeaseState::Lost;
        }
        self.lease.state()
    }

    /// Completes when the lock can no longer be trusted: its lease is lost,
    /// or it was released elsewhere with this guard's token.
    pub fn lost(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        self.lease.lost_or(Some((self.token, self.granted_at)))
    }

    /// Releases the lock; the next waiter gets it with a higher token. Fails
    /// with [`Error::StaleToken`] if the grant had already ended.
    pub async fn release(mut self) -> Result<(), Error> {
        self.released = true;
        end_grant(
            &self.lease.shared.client.inner,
            GrantKind::Lock,
            &self.name,
            self.token,
        )
        .await
        .map_err(|e| e.about_lease(self.lease.id()))
    }
}

impl Fenced for LockGuard {
    fn fence(&self) -> Fence {
        Fence {
            name: self.name.clone(),
            token: self.token,
            kind: FenceKind::Lock,
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            end_in_background(&self.lease, GrantKind::Lock, &self.name, self.token);
        }
    }
}
