//! The Lock service, and the waiting shared with elections.
//!
//! A waiting acquire subscribes to this node's applied events *before* it
//! proposes, so it cannot miss its own grant. It waits for a `Granted`
//! event for its lease, or a `LeaseRemoved` for it. If the subscriber
//! lagged, it re-reads the state instead. If the caller goes away (deadline,
//! disconnect) while queued, a `CancelWait` is proposed so the lease leaves
//! the queue; a grant that won that race stays with the lease until it is
//! released or the lease ends. A node that stops leading ends its waits
//! with `UNAVAILABLE`, so callers resend to the new leader, where their
//! leases are still queued. The cancel names the log index of the
//! acquire that gave up, and is ignored if a later waiting acquire of the
//! same lease (a client's resend after a broken connection) has been
//! applied since: that one still waits.

use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use latchkey_proto::state::v1::{command, command_result, Acquire, CancelWait, GrantKind, Release};
use latchkey_proto::v1::lock_server::Lock;
use latchkey_proto::v1::{
    error_details, AcquireRequest, AcquireResponse, DescribeRequest, DescribeResponse,
    ErrorDetails, Grant, PipelineRequest, ReleaseRequest, ReleaseResponse, RequestId,
};
use prost::Message as _;

use super::{header_at, owner_check, refusal, Api};
use crate::auth::Identity;
use crate::coordination::{validate_name, validate_value, Event, Kind, LeaseId};
use crate::error::RequestError;
use crate::node::Role;
use crate::state_machine::grant_proto;
use latchkey_proto::v1::PermissionKind;

#[tonic::async_trait]
impl Lock for Api {
    type PipelineStream = super::pipeline::PipelineStream;

    async fn pipeline(
        &self,
        request: Request<tonic::Streaming<PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        // Refused at once without credentials, as a unary call would be;
        // each request is identified again when it arrives.
        self.identify(&request)?;
        Ok(Response::new(super::pipeline::serve(self, request)))
    }

    async fn acquire(
        &self,
        request: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        let identity = self.identify(&request)?;
        self.acquire_lock(&identity, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let identity = self.identify(&request)?;
        self.release_lock(&identity, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn describe(
        &self,
        request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        self.require(&request, PermissionKind::Lock, &request.get_ref().name)?;
        let DescribeRequest { name, serializable } = request.into_inner();
        self.check_name(&name)?;
        self.read_point(serializable).await?;
        let header = self.header();
        let state = self.reader.coordination();
        let lock = state.describe(Kind::Lock, &name);
        Ok(Response::new(DescribeResponse {
            header: Some(header),
            holder: lock.map(|lock| grant_proto(&name, &lock.holder)),
            waiters: lock
                .map(|lock| lock.waiters.iter().map(|w| w.lease.0).collect())
                .unwrap_or_default(),
        }))
    }
}

impl Api {
    /// `Lock.Acquire` for `identity`, who has been identified: as a unary
    /// call or as a `Lock.Pipeline` request.
    pub(super) async fn acquire_lock(
        &self,
        identity: &Identity,
        request: AcquireRequest,
    ) -> Result<AcquireResponse, Status> {
        identity.require(PermissionKind::Lock, &request.name)?;
        let AcquireRequest {
            name,
            lease,
            wait,
            request,
        } = request;
        let asker = Asker {
            request,
            caller: owner_check(identity),
        };
        let (header, grant) = self
            .acquire_grant(Kind::Lock, name, LeaseId(lease), wait, Vec::new(), asker)
            .await?;
        Ok(AcquireResponse {
            header: Some(header),
            grant: Some(grant),
        })
    }

    /// `Lock.Release` for `identity`, as [`Api::acquire_lock`].
    pub(super) async fn release_lock(
        &self,
        identity: &Identity,
        request: ReleaseRequest,
    ) -> Result<ReleaseResponse, Status> {
        identity.require(PermissionKind::Lock, &request.name)?;
        let ReleaseRequest {
            name,
            token,
            request,
        } = request;
        let header = self.release_grant(Kind::Lock, name, token, request).await?;
        Ok(ReleaseResponse {
            header: Some(header),
        })
    }
}

/// Who asks for a grant: the exactly-once request id, and the owner the
/// lease must have (see [`owner_check`]).
pub(super) struct Asker {
    pub request: Option<RequestId>,
    pub caller: Option<String>,
}

fn grant_kind(kind: Kind) -> i32 {
    match kind {
        Kind::Lock => GrantKind::Lock as i32,
        Kind::Election => GrantKind::Election as i32,
    }
}

/// Proposes `CancelWait` if dropped while armed: the caller gave up.
struct CancelOnDrop {
    api: Api,
    kind: Kind,
    name: String,
    lease: LeaseId,
    /// The log index the waiting acquire was applied at.
    attempt: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let api = self.api.clone();
        let cancel = CancelWait {
            kind: grant_kind(self.kind),
            name: std::mem::take(&mut self.name),
            lease: self.lease.0,
            attempt: self.attempt,
        };
        tokio::spawn(async move {
            if let Err(e) = api
                .propose_once(command::Command::CancelWait(cancel), None)
                .await
            {
                tracing::debug!("cancelling a wait failed: {e}");
            }
        });
    }
}

impl Api {
    pub(super) fn check_name(&self, name: &str) -> Result<(), Status> {
        validate_name(name).map_err(|e| refusal(name, e))
    }

    /// Acquire or campaign: returns the grant, waiting for it if asked.
    pub(super) async fn acquire_grant(
        &self,
        kind: Kind,
        name: String,
        lease: LeaseId,
        wait: bool,
        value: Vec<u8>,
        asker: Asker,
    ) -> Result<(latchkey_proto::v1::ResponseHeader, Grant), Status> {
        let Asker { request, caller } = asker;
        self.check_name(&name)?;
        validate_value(kind, &value).map_err(|e| refusal(&name, e))?;
        let mut events = self.node.subscribe();
        let acquire = Acquire {
            kind: grant_kind(kind),
            name: name.clone(),
            lease: lease.0,
            wait,
            value,
            caller,
            max_waiters: self.limits.max_waiters_per_lock,
        };
        let (applied, result) = self
            .propose_once(command::Command::Acquire(acquire), request)
            .await?;
        match result {
            command_result::Result::Granted(grant) => {
                return Ok((header_at(self, &applied), grant))
            }
            command_result::Result::Queued(_) => {}
            _ => {
                return Err(Status::internal(
                    "acquire produced another command's result",
                ))
            }
        }
        let mut guard = CancelOnDrop {
            api: self.clone(),
            kind,
            name: name.clone(),
            lease,
            attempt: applied.index.0,
            armed: true,
        };
        let stopping = self.stopping();
        tokio::pin!(stopping);
        // A deposed leader (partitioned away, stepped down) stops serving the
        // wait at once, so the caller resends to the new leader, where the
        // lease is still queued, instead of waiting out its deadline here;
        // so does a leader whose disk has hung past twice the election timeout.
        let mut status = self.node.watch_standing();
        let deposed = async move {
            let _ = status
                .wait_for(|status| status.role != Role::Leader || status.sync_stalled)
                .await;
        };
        tokio::pin!(deposed);
        loop {
            let received = tokio::select! {
                received = events.recv() => received,
                () = &mut stopping => return Err(self.status(RequestError::ShuttingDown)),
                () = &mut deposed => return Err(self.status(RequestError::LeadershipLost)),
            };
            let found = match received {
                Ok(applied) => match_grant(&applied.events, kind, &name, lease),
                Err(RecvError::Lagged(_)) => self.current_grant(kind, &name, lease),
                Err(RecvError::Closed) => Err(self.status(RequestError::ShuttingDown)),
            };
            if let Some(grant) = found? {
                guard.armed = false;
                return Ok((self.header(), grant));
            }
        }
    }

    /// The grant if `lease` now holds `name`; an error if the lease is gone.
    fn current_grant(
        &self,
        kind: Kind,
        name: &str,
        lease: LeaseId,
    ) -> Result<Option<Grant>, Status> {
        let state = self.reader.coordination();
        if state.lease(lease).is_none() {
            return Err(lease_gone(lease));
        }
        Ok(state
            .describe(kind, name)
            .filter(|lock| lock.holder.lease == lease)
            .map(|lock| grant_proto(name, &lock.holder)))
    }

    pub(super) async fn release_grant(
        &self,
        kind: Kind,
        name: String,
        token: u64,
        request: Option<RequestId>,
    ) -> Result<latchkey_proto::v1::ResponseHeader, Status> {
        self.check_name(&name)?;
        let release = Release {
            kind: grant_kind(kind),
            name,
            token,
        };
        let (applied, _) = self
            .propose_once(command::Command::Release(release), request)
            .await?;
        Ok(header_at(self, &applied))
    }
}

fn lease_gone(lease: LeaseId) -> Status {
    let details = ErrorDetails {
        detail: Some(error_details::Detail::LeaseNotFound(
            latchkey_proto::v1::LeaseNotFound { lease: lease.0 },
        )),
    };
    Status::with_details(
        tonic::Code::NotFound,
        format!("lease {lease} ended (expired or revoked) while waiting"),
        details.encode_to_vec().into(),
    )
}

fn match_grant(
    events: &[Event],
    kind: Kind,
    name: &str,
    lease: LeaseId,
) -> Result<Option<Grant>, Status> {
    for event in events {
        match event {
            Event::Granted {
                kind: k,
                name: n,
                lease: l,
                token,
                value,
            } if *k == kind && n == name && *l == lease => {
                return Ok(Some(Grant {
                    name: name.to_string(),
                    lease: lease.0,
                    token: token.0,
                    value: value.clone(),
                    revision: 0,
                }));
            }
            Event::LeaseRemoved { lease: l, .. } if *l == lease => return Err(lease_gone(lease)),
            _ => {}
        }
    }
    Ok(None)
}
