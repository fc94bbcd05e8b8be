//! Leader election: a lock whose holder publishes a value.
//!
//! [`Election::campaign`] waits until the lease is elected and returns a
//! [`Leadership`], whose token is the leadership term: fence every write the
//! leader makes with it, and a deposed leader that has not noticed yet is
//! refused. Candidates are elected in the order they campaigned. A lease
//! that already leads gets its leadership back, with the value it leads
//! with: campaigning again does not publish the new value
//! ([`Leadership::value`] says what is published; [`Leadership::proclaim`]
//! replaces it). One way to get there: a campaign that gave up (a timeout)
//! raced its own election, and the grant that won stays with the lease.
//!
//! As with locks, leadership lives as long as the lease, unless it is
//! resigned elsewhere with its token: [`Leadership::lost`] completes when
//! the lease is lost, or when a renewal shows the leadership has ended
//! ([`LeaseLost::GrantEnded`]). Campaigning stops with [`Error::LeaseLost`]
//! as soon as the lease is lost locally.
//!
//! [`Election::leader`] reads the current leader (linearizable);
//! [`Election::observe`] streams it and every change (see
//! the `observe` module).
//!
//! # Drop
//! Dropping a leadership without calling [`Leadership::resign`] resigns in
//! the background, best effort (when a Tokio runtime is running), fenced by
//! its token.
//!
//! # Not done yet
//! - No `Describe` for elections: the queue of candidates is only visible
//!   through each lease's time-to-live answer.

use std::future::Future;
use std::time::Duration;

use futures::Stream;
use latchkey_proto::v1::election_client::ElectionClient;
use latchkey_proto::v1::{CampaignRequest, Grant, LeaderRequest, ProclaimRequest};
use tokio::time::Instant;

use crate::client::{CallSpec, Client};
use crate::error::Error;
use crate::lease::{end_in_background, Lease, LeaseLost, LeaseState};
use crate::observe::observe;
use crate::raw::{end_grant, GrantKind};
use crate::types::{Fence, FenceKind, Fenced, FencingToken, GrantInfo};

/// One named election.
#[derive(Debug, Clone)]
pub struct Election {
    client: Client,
    name: String,
}

impl Client {
    /// The election called `name`.
    pub fn election(&self, name: impl Into<String>) -> Election {
        Election {
            client: self.clone(),
            name: name.into(),
        }
    }
}

/// This process's term as leader. See the module docs for what dropping it does.
#[derive(Debug)]
pub struct Leadership {
    lease: Lease,
    name: String,
    token: FencingToken,
    /// The value the election showed when the grant was made or given back.
    value: Vec<u8>,
    /// When the grant reached this client: renewals sent after it list it.
    granted_at: Instant,
    resigned: bool,
}

impl Election {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until `lease` is elected, publishing `value` (for example this
    /// process's address) as the leader's value.
    pub async fn campaign(
        &self,
        lease: &Lease,
        value: impl Into<Vec<u8>>,
    ) -> Result<Leadership, Error> {
        self.campaign_until(lease, value.into(), None).await
    }

    /// Like [`Election::campaign`], but gives up after `timeout` with
    /// [`Error::Timeout`], leaving the queue of candidates.
    pub async fn campaign_with_timeout(
        &self,
        lease: &Lease,
        value: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Leadership, Error> {
        let deadline = Some(Instant::now() + timeout);
        self.campaign_until(lease, value.into(), deadline)
            .await
            .map_err(|error| match error {
                Error::Timeout { .. } => Error::Timeout {
                    message: format!("not elected {:?} within {timeout:?}", self.name),
                },
                other => other,
            })
    }

    async fn campaign_until(
        &self,
        lease: &Lease,
        value: Vec<u8>,
        deadline: Option<Instant>,
    ) -> Result<Leadership, Error> {
        lease.check_not_lost()?;
        let inner = &self.client.inner;
        let id = lease.id();
        let campaign =
            inner.call_write(CallSpec::blocking_write(deadline), |channel, request_id| {
                // A new request id per attempt: see `crate::client`.
                let request = CampaignRequest {
                    name: self.name.clone(),
                    lease: id.0,
                    value: value.clone(),
                    request: request_id,
                };
                async move { ElectionClient::new(channel).campaign(request).await }
            });
        let elected = tokio::select! {
            elected = campaign => elected.map_err(|e| e.about_lease(id))?,
            _ = lease.lost() => return Err(Error::LeaseLost { lease: id }),
        };
        self.leadership_from(lease, elected.leadership)
    }

    fn leadership_from(&self, lease: &Lease, grant: Option<Grant>) -> Result<Leadership, Error> {
        let grant = grant.ok_or_else(|| Error::Rejected {
            code: tonic::Code::Internal,
            message: "campaign answered without a leadership".into(),
        })?;
        if grant.lease != lease.id().0 {
            return Err(Error::Rejected {
                code: tonic::Code::Internal,
                message: format!(
                    "the server elected lease {} for {:?}, not {}",
                    grant.lease,
                    self.name,
                    lease.id()
                ),
            });
        }
        // A leadership that arrives after the local deadline cannot be trusted.
        lease.check_not_lost()?;
        Ok(Leadership {
            lease: lease.clone(),
            name: self.name.clone(),
            token: FencingToken(grant.token),
            value: grant.value,
            granted_at: Instant::now(),
            resigned: false,
        })
    }

    /// The current leader, if any.
    pub async fn leader(&self) -> Result<Option<GrantInfo>, Error> {
        let inner = &self.client.inner;
        let request = LeaderRequest {
            name: self.name.clone(),
            serializable: false,
        };
        let answer = inner
            .call(CallSpec::read(&inner.options), |channel| {
                let request = request.clone();
                async move { ElectionClient::new(channel).leader(request).await }
            })
            .await?;
        Ok(answer.leader.map(GrantInfo::from))
    }

    /// The current leader, then every change (`None` when the election has
    /// no leader). Survives the loss of the node it streams from; see
    /// the `observe` module for what it guarantees across that.
    pub fn observe(&self) -> impl Stream<Item = Result<Option<GrantInfo>, Error>> + Send + 'static {
        observe(self.client.inner.clone(), self.name.clone())
    }
}

impl Leadership {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The leadership term's fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The value the election showed for this leadership when the server
    /// answered the campaign: the campaign's own value, or, for a lease that
    /// already led, the value it led with (see the module docs). Later
    /// proclaims are not reflected here.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The lease the leadership is held by.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// The lease's state: once it is [`LeaseState::Lost`], so is the leadership.
    pub fn state(&self) -> LeaseState {
        let ended = self.lease.grant_ended(self.token, self.granted_at);
        if ended {
            return LeaseState::Lost;
        }
        self.lease.state()
    }

    /// Completes when the leadership can no longer be trusted (its lease is lost).
    pub fn lost(&self) -> impl Future<Output = LeaseLost> + Send + 'static {
        self.lease.lost_or(Some((self.token, self.granted_at)))
    }

    /// Replaces the published value. Fails with [`Error::StaleToken`] if
    /// this leadership has ended.
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        let inner = &self.lease.shared.client.inner;
        let request = ProclaimRequest {
            name: self.name.clone(),
            token: self.token.0,
            value: value.into(),
            request: None,
        };
        inner
            .call_write(CallSpec::write(&inner.options), |channel, id| {
                let mut request = request.clone();
                request.request = id;
                async move { ElectionClient::new(channel).proclaim(request).await }
            })
            .await
            .map(|_| ())
            .map_err(|e| e.about_lease(self.lease.id()))
    }

    /// Gives up leadership; the next candidate is elected with a higher
    /// token. Fails with [`Error::StaleToken`] if it had already ended.
    pub async fn resign(mut self) -> Result<(), Error> {
        self.resigned = true;
        end_grant(
            &self.lease.shared.client.inner,
            GrantKind::Election,
            &self.name,
            self.token,
        )
        .await
        .map_err(|e| e.about_lease(self.lease.id()))
    }
}

impl Fenced for Leadership {
    fn fence(&self) -> Fence {
        Fence {
            name: self.name.clone(),
            token: self.token,
            kind: FenceKind::Election,
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if !self.resigned {
            end_in_background(&self.lease, GrantKind::Election, &self.name, self.token);
        }
    }
}
